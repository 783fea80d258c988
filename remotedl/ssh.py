"""The one place that resolves a host and opens connections to it.

``~/.ssh/config`` (or the file named by ``--ssh-config``) is the source of truth.
``resolve_host`` reads it once into a ``HostSpec``; ``connect`` opens a fabric/paramiko
connection from that spec, and ``openssh_argv`` builds the OpenSSH command line that rsync,
git, tunnels and ``attach`` use from the same spec and the same config file, so both
reach the same machine with the same key and the same host key check.

Host keys are always checked: unknown keys are refused (unless the config says
``StrictHostKeyChecking accept-new``) and changed keys are refused always. fabric's
default of adding unknown keys silently is replaced on every client this module creates.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shlex
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.env import Environment, passwd_home
from remotedl.errors import ConfigError, ConnectError, HostKeyError, RemoteError

if TYPE_CHECKING:
    import paramiko
    from fabric import Connection

log = logging.getLogger("remotedl.ssh")

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
# Hosts that `remotedl sandbox up` (or a later `register`) made: state_dir/boxes/NAME/ssh_config
BOXES_DIR = "boxes"


@dataclass(frozen=True)
class HostSpec:
    """One host, resolved: everything needed to reach it, and where each value came from."""

    alias: str
    hostname: str
    user: str
    port: int
    identity_files: tuple[str, ...]
    known_hosts_files: tuple[str, ...]
    strict_host_key_checking: str  # "yes" or "accept-new"; never "no"
    connect_timeout: float
    server_alive_interval: int | None
    proxy_jump: str | None
    ssh_config: Path | None
    identities_only: bool = False
    control_path: str | None = None  # the user's own ControlPath, if their config sets one
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    jump_specs: tuple[HostSpec, ...] = ()

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH and paramiko look up in known_hosts."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def display(self) -> str:
        return f"{self.alias} ({self.user}@{self.hostname}:{self.port})"


def _expand(path: str) -> str:
    # OpenSSH expands ~ with the passwd home directory, not $HOME: do the same.
    if path == "~" or path.startswith("~/"):
        return str(passwd_home()) + path[1:]
    return os.path.expanduser(path)


def registered_box_config(env: Environment, alias: str) -> Path | None:
    path = env.state_dir / BOXES_DIR / alias / "ssh_config"
    return path if path.is_file() else None


def ssh_config_path(env: Environment, alias: str, explicit: str | None) -> tuple[Path | None, str]:
    """Which ssh config file describes ``alias``, and why."""
    if explicit:
        path = Path(_expand(explicit))
        if not path.is_file():
            raise ConfigError(f"ssh config file {path} does not exist")
        return path, "--ssh-config / REMOTEDL_SSH_CONFIG"
    box = registered_box_config(env, alias)
    if box is not None:
        return box, f"registered box ({box})"
    default = passwd_home() / ".ssh" / "config"
    return (default if default.is_file() else None), "~/.ssh/config"


def _ssh_g(config_path: Path | None, alias: str, *, no_config: bool = False) -> dict[str, Any]:
    """What OpenSSH itself resolves for ``alias`` (``ssh -G``): Include, Match, tokens and all."""
    from remotedl import proc

    argv = ["ssh", "-G"]
    if no_config:
        argv += ["-F", "/dev/null"]
    elif config_path is not None:
        argv += ["-F", str(config_path)]
    result = proc.run([*argv, "--", alias], check=False, timeout=30)
    if result.returncode != 0:
        lines = [x for x in result.stderr.splitlines() if "Pseudo-terminal" not in x]
        raise ConfigError(
            f"ssh config for '{alias}' is not valid: {lines[0] if lines else 'ssh -G failed'}",
            hint=f"fix {config_path or '~/.ssh/config'}; `ssh -G {alias}` shows what OpenSSH reads",
        )
    found: dict[str, Any] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "identityfile":
            found.setdefault(key, []).append(value)
        else:
            found.setdefault(key, value)
    return found


def _lookup(config_path: Path | None, alias: str) -> tuple[dict[str, Any], set[str]]:
    """The resolved options, and the names of those the config set (differ from defaults)."""
    found = _ssh_g(config_path, alias)
    defaults = _ssh_g(None, alias, no_config=True)
    return found, {k for k, v in found.items() if defaults.get(k) != v}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split()


def resolve_host(
    env: Environment,
    alias: str,
    *,
    ssh_config: str | None = None,
    user: str | None = None,
    port: int | None = None,
    identity: str | None = None,
    connect_timeout: float = 10.0,
    _depth: int = 0,
) -> HostSpec:
    """Resolve ``alias`` through the ssh config. Explicit arguments win over the file."""
    config_path, config_why = ssh_config_path(env, alias, ssh_config)
    found, configured = _lookup(config_path, alias)
    src_file = f"ssh config {config_path}" if config_path else "ssh config"
    sources: dict[str, str] = {"ssh_config": config_why}
    for key in (
        "hostname",
        "user",
        "port",
        "identityfile",
        "userknownhostsfile",
        "stricthostkeychecking",
        "proxyjump",
        "serveraliveinterval",
    ):
        sources[key] = src_file if key in configured else "default"

    hostname = str(found.get("hostname") or alias)
    the_user = str(found.get("user"))
    if user is not None:
        the_user, sources["user"] = user, "flag --user"
    the_port = int(found.get("port") or 22)
    if port is not None:
        the_port, sources["port"] = int(port), "flag --port"

    identities = [_expand(p) for p in _as_list(found.get("identityfile"))]
    if identity:
        identities.insert(0, _expand(identity))
        sources["identityfile"] = "flag --identity"
    if not identities:
        home = passwd_home() / ".ssh"
        identities = [str(home / n) for n in DEFAULT_IDENTITIES]

    known = [_expand(p) for p in _as_list(found.get("userknownhostsfile"))]
    if not known:
        known = [str(passwd_home() / ".ssh" / "known_hosts")]

    # 'no' would accept a changed key; remotedl never does: treat it as accept-new.
    # OpenSSH's default 'ask' cannot ask in a tool: it is 'yes' here.
    strict = str(found.get("stricthostkeychecking", "ask")).lower()
    strict = "accept-new" if strict in ("no", "off", "false", "accept-new") else "yes"

    timeout = connect_timeout
    sources["connecttimeout"] = "remotedl setting connect_timeout"
    if found.get("connecttimeout", "none") != "none":
        timeout = float(found["connecttimeout"])
        sources["connecttimeout"] = src_file
    alive_text = found.get("serveraliveinterval", "0")
    alive = alive_text if alive_text not in ("0", "none") else None
    proxy = found.get("proxyjump")
    if proxy and str(proxy).lower() == "none":
        proxy = None
    jumps: list[HostSpec] = []
    if proxy:
        if _depth > 4:
            raise ConfigError(f"ProxyJump chain for {alias} is too long (a loop?)")
        for hop in str(proxy).split(","):
            hop_user, _, rest = hop.rpartition("@")
            hop_host, _, hop_port = rest.partition(":")
            jumps.append(
                resolve_host(
                    env,
                    hop_host,
                    ssh_config=str(config_path) if config_path else None,
                    user=hop_user or None,
                    port=int(hop_port) if hop_port else None,
                    connect_timeout=connect_timeout,
                    _depth=_depth + 1,
                )
            )
    control = found.get("controlpath")
    return HostSpec(
        alias=alias,
        hostname=hostname,
        user=the_user,
        port=the_port,
        identity_files=tuple(identities),
        known_hosts_files=tuple(known),
        strict_host_key_checking=strict,
        connect_timeout=timeout,
        server_alive_interval=int(alive) if alive else None,
        proxy_jump=str(proxy) if proxy else None,
        ssh_config=config_path,
        identities_only=str(found.get("identitiesonly", "no")).lower() in ("yes", "true"),
        control_path=None if not control or str(control).lower() == "none" else str(control),
        sources=sources,
        jump_specs=tuple(jumps),
    )


# ---------------------------------------------------------------- host keys


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_known_hosts(spec: HostSpec) -> paramiko.HostKeys:
    import paramiko

    keys = paramiko.HostKeys()
    for path in spec.known_hosts_files:
        if os.path.isfile(path):
            try:
                keys.load(path)
            except (OSError, paramiko.SSHException) as e:
                raise ConfigError(f"cannot read known_hosts file {path}: {e}") from e
    return keys


def append_known_host(spec: HostSpec, key: paramiko.PKey) -> Path:
    path = Path(spec.known_hosts_files[0])
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = f"{spec.known_hosts_name} {key.get_name()} {key.get_base64()}\n"
    with path.open("a") as f:
        f.write(line)
    return path


def _unknown_key_error(spec: HostSpec, key: paramiko.PKey) -> HostKeyError:
    fp = fingerprint(key)
    return HostKeyError(
        f"host key of {spec.display} is not known ({key.get_name()} {fp})",
        hint=f"check the fingerprint with the box's admin, then run `remotedl trust {spec.alias}`",
        fingerprint=fp,
    )


def _policy(spec: HostSpec) -> paramiko.MissingHostKeyPolicy:
    import paramiko

    class RefuseOrAcceptNew(paramiko.MissingHostKeyPolicy):
        """Unknown key: refuse, or record it under accept-new. Changed keys never get here:
        paramiko raises BadHostKeyException for them before asking the policy."""

        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
            if spec.strict_host_key_checking == "accept-new":
                path = append_known_host(spec, key)
                log.warning("recorded new host key %s for %s in %s", fingerprint(key), hostname, path)
                return
            raise _unknown_key_error(spec, key)

    return RefuseOrAcceptNew()


def fetch_host_key(spec: HostSpec) -> paramiko.PKey:
    """The box's host key, from a key exchange without authentication."""
    import paramiko

    sock = _open_socket(spec)
    transport = paramiko.Transport(sock)
    try:
        known = load_known_hosts(spec).lookup(spec.known_hosts_name)
        if known:
            # Ask for the key type we already hold, so a changed key is seen as changed.
            opts = transport.get_security_options()
            first = next(iter(known.keys()))
            opts.key_types = [first, *[t for t in opts.key_types if t != first]]
        transport.start_client(timeout=spec.connect_timeout)
        return transport.get_remote_server_key()
    except paramiko.SSHException as e:
        raise ConnectError(f"SSH handshake with {spec.display} failed: {e}") from e
    finally:
        transport.close()


@dataclass(frozen=True)
class TrustResult:
    alias: str
    known_hosts_name: str
    key_type: str
    fingerprint: str
    known_hosts_file: str
    status: str  # "added", "already-known", "replaced"


def trust_host(spec: HostSpec, *, replace: bool = False) -> TrustResult:
    """Record the box's current host key in known_hosts. A changed key needs ``replace``."""
    from remotedl import proc

    key = fetch_host_key(spec)
    fp = fingerprint(key)
    known = load_known_hosts(spec).lookup(spec.known_hosts_name)
    path = spec.known_hosts_files[0]
    if known is not None:
        held = known.get(key.get_name())
        if held is not None and held.asbytes() == key.asbytes():
            return TrustResult(spec.alias, spec.known_hosts_name, key.get_name(), fp, path, "already-known")
        if not replace:
            raise HostKeyError(
                f"host key of {spec.display} differs from the one recorded in {path} "
                f"(now {key.get_name()} {fp})",
                hint="if the box was reinstalled, run `remotedl trust "
                f"{spec.alias} --replace`; otherwise someone may be intercepting the connection",
                fingerprint=fp,
            )
        for kh in spec.known_hosts_files:
            if os.path.isfile(kh):
                proc.run(["ssh-keygen", "-R", spec.known_hosts_name, "-f", kh], check=False)
        append_known_host(spec, key)
        return TrustResult(spec.alias, spec.known_hosts_name, key.get_name(), fp, path, "replaced")
    append_known_host(spec, key)
    return TrustResult(spec.alias, spec.known_hosts_name, key.get_name(), fp, path, "added")


# ---------------------------------------------------------------- paramiko / fabric


def _refused(spec: HostSpec) -> ConnectError:
    return ConnectError(
        f"connection refused by {spec.hostname}:{spec.port} (host {spec.alias})",
        hint="is sshd running on the box, and is the Port right in your ssh config?",
    )


def _open_socket(spec: HostSpec) -> socket.socket:
    try:
        return socket.create_connection((spec.hostname, spec.port), timeout=spec.connect_timeout)
    except socket.gaierror as e:
        if spec.sources.get("hostname") == "default":
            raise ConnectError(
                f"unknown host '{spec.alias}': no Host entry for it in "
                f"{spec.ssh_config or '~/.ssh/config'}, and it does not resolve as a host name",
                hint="add a Host entry (see sshconfig.example), or check the spelling",
            ) from e
        raise ConnectError(
            f"cannot resolve host name '{spec.hostname}' (host {spec.alias})",
            hint="check the HostName in your ssh config, or the DNS name (`remotedl dns check`)",
        ) from e
    except ConnectionRefusedError as e:
        raise _refused(spec) from e
    except TimeoutError as e:
        raise ConnectError(
            f"timed out after {spec.connect_timeout:g} s connecting to "
            f"{spec.hostname}:{spec.port} (host {spec.alias})",
            hint="is the box on and reachable from here (VPN, firewall, router port forward)?",
        ) from e
    except OSError as e:
        raise ConnectError(
            f"cannot reach {spec.hostname}:{spec.port} (host {spec.alias}): {e.strerror or e}",
            hint="is the box on and reachable from here?",
        ) from e


def connect(spec: HostSpec) -> Connection:
    """An open fabric Connection with checked host keys, or a ``ConnectError``."""
    import paramiko
    from fabric import Config, Connection

    gateway = connect(spec.jump_specs[-1]) if spec.jump_specs else None
    keys = [p for p in spec.identity_files if os.path.isfile(p)]
    conn = Connection(
        host=spec.hostname,
        user=spec.user,
        port=spec.port,
        config=Config(ssh_config=paramiko.SSHConfig()),  # we resolved the config ourselves
        gateway=gateway,
        connect_timeout=spec.connect_timeout,
        connect_kwargs={
            "key_filename": keys,
            "look_for_keys": False,
            "allow_agent": not spec.identities_only,
            "banner_timeout": spec.connect_timeout,
            "auth_timeout": spec.connect_timeout,
        },
    )
    client: paramiko.SSHClient = conn.client
    client.set_missing_host_key_policy(_policy(spec))  # refuse (or accept-new), never auto-add
    for path in spec.known_hosts_files:
        if os.path.isfile(path):
            client.load_system_host_keys(path)
    try:
        if gateway is None:
            # Our own socket gives the same clear errors as fetch_host_key.
            conn.connect_kwargs["sock"] = _open_socket(spec)
        conn.open()
    except paramiko.BadHostKeyException as e:
        raise HostKeyError(
            f"host key of {spec.display} has CHANGED: the box offers {e.key.get_name()} "
            f"{fingerprint(e.key)}, known_hosts has {fingerprint(e.expected_key)}",
            hint="if the box was reinstalled, run `remotedl trust "
            f"{spec.alias} --replace`; otherwise someone may be intercepting the connection",
            fingerprint=fingerprint(e.key),
        ) from e
    except paramiko.AuthenticationException as e:
        tried = ", ".join(keys) if keys else "no key file found"
        agent = "" if spec.identities_only else " and the ssh agent's keys"
        raise ConnectError(
            f"authentication failed for {spec.user}@{spec.hostname}:{spec.port} (keys tried: {tried}{agent})",
            hint=f"check User and IdentityFile for {spec.alias}, or install the public key on "
            "the box with `ssh-copy-id`",
        ) from e
    except paramiko.ssh_exception.NoValidConnectionsError as e:
        raise _refused(spec) from e
    except TimeoutError as e:
        raise ConnectError(
            f"timed out talking to {spec.display}", hint="is the box overloaded or the link down?"
        ) from e
    except paramiko.SSHException as e:
        transport = conn.client.get_transport()
        cause = getattr(transport, "saved_exception", None) if transport else None
        # paramiko 5 reports a missing banner as "No existing session": no remote version read.
        no_banner = transport is not None and not getattr(transport, "remote_version", "x")
        if no_banner or "banner" in str(cause or e).lower():
            raise ConnectError(
                f"no SSH greeting from {spec.hostname}:{spec.port} within "
                f"{spec.connect_timeout:g} s (host {spec.alias}): timed out",
                hint="is that port an SSH server, and is the box not overloaded?",
            ) from e
        raise ConnectError(f"SSH connection to {spec.display} failed: {cause or e}") from e
    except OSError as e:
        if isinstance(e, ConnectError):
            raise
        raise ConnectError(f"connection to {spec.display} failed: {e}") from e
    return conn


@dataclass(frozen=True)
class RemoteResult:
    command: str
    stdout: str
    stderr: str
    exit_code: int


class Box:
    """One connection to the box, reused for every command of one invocation."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn = connect(self.spec)
        return self._conn

    def run(
        self,
        script: str,
        *,
        check: bool = True,
        stdin: str | None = None,
        timeout: float | None = None,
    ) -> RemoteResult:
        """Run a POSIX sh script on the box (whatever the login shell is) and wait for it."""
        import io

        command = "sh -c " + shlex.quote(script)
        log.debug("remote %s: %s", self.spec.alias, script)
        result = self.conn.run(
            command,
            hide=True,
            warn=True,
            in_stream=io.StringIO(stdin) if stdin is not None else False,
            timeout=timeout,
        )
        out = RemoteResult(script, result.stdout, result.stderr, result.exited)
        if check and out.exit_code != 0:
            last = (out.stderr.strip().splitlines() or [f"exit status {out.exit_code}"])[-1]
            raise RemoteError(f"command on {self.spec.alias} failed: {last}")
        return out

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def open_box(spec: HostSpec) -> Iterator[Box]:
    box = Box(spec)
    try:
        yield box
    finally:
        box.close()


# ---------------------------------------------------------------- OpenSSH


def control_dir() -> Path:
    path = Path(f"/tmp/remotedl-{os.getuid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def openssh_options(spec: HostSpec, *, multiplex: bool = True, batch: bool = True) -> list[str]:
    """OpenSSH options (without the host) that reach ``spec`` exactly as ``connect`` does."""
    opts: list[str] = []
    if spec.ssh_config is not None:
        opts += ["-F", str(spec.ssh_config)]
    if spec.sources.get("user", "").startswith("flag"):
        opts += ["-l", spec.user]
    if spec.sources.get("port", "").startswith("flag"):
        opts += ["-p", str(spec.port)]
    if spec.sources.get("identityfile", "").startswith("flag"):
        opts += ["-i", spec.identity_files[0]]
    opts += [
        "-o",
        f"StrictHostKeyChecking={spec.strict_host_key_checking}",
        "-o",
        f"ConnectTimeout={int(spec.connect_timeout)}",
    ]
    if batch:
        opts += ["-o", "BatchMode=yes"]
    if multiplex and spec.control_path is None:
        # Reuse one SSH connection across the ssh, rsync and git calls of a command (and the
        # next command within a minute): one handshake instead of one per call.
        opts += [
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={control_dir()}/%C",
            "-o",
            "ControlPersist=60",
        ]
    elif not multiplex:
        opts += ["-o", "ControlPath=none", "-o", "ControlMaster=no"]
    return opts


def openssh_argv(
    spec: HostSpec,
    *remote: str,
    tty: bool = False,
    multiplex: bool = True,
    batch: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    argv = ["ssh", *openssh_options(spec, multiplex=multiplex, batch=batch), *extra]
    if tty:
        argv.append("-t")
    argv += ["--", spec.alias]
    if remote:
        argv.append("sh -c " + shlex.quote(" ".join(remote)))
    return argv


def ssh_command_string(spec: HostSpec) -> str:
    """The ``ssh ...`` prefix as one shell string, for rsync -e and GIT_SSH_COMMAND."""
    return shlex.join(["ssh", *openssh_options(spec)])


def close_master(spec: HostSpec) -> None:
    """End the multiplexing master for ``spec``, if one runs."""
    from remotedl import proc

    proc.run(["ssh", *openssh_options(spec), "-O", "exit", spec.alias], check=False, timeout=10)


def remote_path(path: str) -> str:
    """A shell word for a box path; a leading ~ becomes "$HOME" so the rest stays quoted."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def openssh_failure(spec: HostSpec, stderr: str) -> ConnectError:
    """Map OpenSSH's own failure (exit 255) to the same errors ``connect`` raises."""
    text = stderr.strip()
    last = text.splitlines()[-1] if text else "ssh exited with status 255"
    low = text.lower()
    if "remote host identification has changed" in low:
        return HostKeyError(
            f"host key of {spec.display} has CHANGED",
            hint=f"if the box was reinstalled, run `remotedl trust {spec.alias} --replace`",
        )
    if "host key verification failed" in low or "no matching host key" in low:
        return HostKeyError(
            f"host key of {spec.display} is not known",
            hint=f"check the fingerprint, then run `remotedl trust {spec.alias}`",
        )
    if "permission denied" in low:
        return ConnectError(
            f"authentication failed for {spec.user}@{spec.hostname}:{spec.port}",
            hint=f"check User and IdentityFile for {spec.alias}, or `ssh-copy-id` the key",
        )
    if "could not resolve hostname" in low:
        return ConnectError(f"cannot resolve host name '{spec.hostname}' (host {spec.alias})")
    if "connection refused" in low:
        return _refused(spec)
    if "timed out" in low:
        return ConnectError(f"timed out connecting to {spec.display}")
    return ConnectError(f"ssh to {spec.display} failed: {last}")


def run_openssh(
    spec: HostSpec, script: str, *, check: bool = True, stdin: str | None = None, timeout: float | None = None
) -> RemoteResult:
    """Run a sh script on the box through OpenSSH (sharing the multiplexed connection)."""
    from remotedl import proc

    result = proc.run(openssh_argv(spec, script), check=False, input=stdin, timeout=timeout)
    if result.returncode == 255 and not result.stdout:
        raise openssh_failure(spec, result.stderr)
    out = RemoteResult(script, result.stdout, result.stderr, result.returncode)
    if check and out.exit_code != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.exit_code}"])[-1]
        raise RemoteError(f"command on {spec.alias} failed: {last}")
    return out
