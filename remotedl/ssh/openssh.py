"""OpenSSH command lines for a ``HostSpec``, the shared connection, and what ssh's failures mean.

Every byte remotedl sends to a box goes through ``ssh`` built here: commands, git, rsync,
tunnels, ``attach`` and ``trust``. One multiplexed master connection per host (ControlMaster)
serves all calls of one invocation and the next ones within a minute, so a push followed by a
run pays one handshake. ProxyJump chains, ProxyCommand and HostKeyAlias behave exactly as in
``ssh``, because it is ``ssh``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from remotedl.errors import ConfigError, ConnectError, HostKeyError
from remotedl.ssh.resolve import HostSpec

CONTROL_PERSIST = 60


# A socket's path must fit sockaddr_un's sun_path: 104 bytes on macOS and the BSDs (108 on
# Linux), the final NUL included. Ours is DIR/FLAVOUR-%C (8 + 1 + 40 characters after DIR/), and
# while ssh sets up a master it binds DIR/FLAVOUR-%C.XXXXXXXXXXXXXXXX first (17 more).
SUN_PATH_MAX = 104
_SOCKET_NAME = 1 + 8 + 1 + 40 + 17


def control_dir() -> Path:
    """The directory of the master connections' sockets (and of push's locks): ours alone."""
    return pick_control_dir(os.environ, Path("/tmp"))


def _fits(path: Path) -> bool:
    return len(os.fsencode(str(path))) + _SOCKET_NAME < SUN_PATH_MAX


def pick_control_dir(environ: Mapping[str, str], tmp: Path) -> Path:
    """A directory only this user can have made: ``$XDG_RUNTIME_DIR/remotedl`` (the system makes
    the runtime directory, 0700, for the user's session), else ``~/.cache/remotedl`` (or under
    ``$XDG_CACHE_HOME``) when its socket paths fit OpenSSH's limit, else ``/tmp/remotedl-UID``,
    which any user could make first. Each is checked the same way (``check_private_dir``); a
    ``/tmp`` one another user made is refused (exit 3) only when neither of the others works."""
    what = "remotedl's connection sockets"
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if runtime.startswith("/") and _fits(Path(runtime) / "remotedl"):
        try:
            check_private_dir(Path(runtime), "the runtime directory")
            return _private_dir(Path(runtime) / "remotedl", what)
        except (ConfigError, OSError):
            pass  # not the user's own (a stale or borrowed variable): the next place
    cache = environ.get("XDG_CACHE_HOME", "")
    home = environ.get("HOME", "")
    base = Path(cache) if cache.startswith("/") else Path(home) / ".cache" if home.startswith("/") else None
    if base is not None and _fits(base / "remotedl"):
        try:
            base.mkdir(parents=True, exist_ok=True)
            if base.stat().st_uid == os.getuid():
                return _private_dir(base / "remotedl", what)
        except (ConfigError, OSError):
            pass
    return _private_dir(tmp / f"remotedl-{os.getuid()}", what)


def _private_dir(path: Path, what: str) -> Path:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    check_private_dir(path, what)
    return path


def check_private_dir(path: Path, what: str) -> None:
    """A directory another user made first (or a symlink to one) would let them sit on our
    connections: refuse anything but a real directory of ours, closed to everyone else."""
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        why = "not a directory"
    elif st.st_uid != os.getuid():
        why = f"owned by uid {st.st_uid}, not by you"
    elif st.st_mode & 0o077:
        why = f"open to others (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise ConfigError(
        f"{path} ({what}) is {why}: refusing to use it",
        hint=f"another user may have made it; remove it (`rm -r {path}`) if it is yours to remove",
    )


def _flavour(spec: HostSpec) -> str:
    """Part of the master's socket name: a connection made under one config (known_hosts,
    keys, jumps) is never reused for the same host under another; %C alone is only
    user@host:port."""
    import hashlib

    ident = repr(
        (
            str(spec.ssh_config),
            spec.known_hosts_files,
            spec.identity_files,
            spec.strict_host_key_checking,
            spec.proxy_jump,
            spec.proxy_command,
            spec.host_key_alias,
        )
    )
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


def config_options(spec: HostSpec) -> list[str]:
    """The config file and what flags changed over it (--user, --port, --identity)."""
    opts: list[str] = []
    if spec.ssh_config is not None:
        opts += ["-F", str(spec.ssh_config)]
    if spec.sources.get("user", "").startswith("flag"):
        opts += ["-l", spec.user]
    if spec.sources.get("port", "").startswith("flag"):
        opts += ["-p", str(spec.port)]
    if spec.sources.get("identityfile", "").startswith("flag"):
        opts += ["-i", spec.identity_files[0]]
    if spec.sources.get("hostname", "").startswith("cloud"):
        # A cloud VM's address now (remotedl.cloud.with_address), its key checked under the
        # name it was trusted as.
        opts += ["-o", f"HostName={spec.hostname}"]
        if spec.host_key_alias:
            opts += ["-o", f"HostKeyAlias={spec.host_key_alias}"]
    return opts


def openssh_options(spec: HostSpec, *, multiplex: bool = True, batch: bool = True) -> list[str]:
    """OpenSSH options (without the host) that reach ``spec`` as resolved."""
    opts = config_options(spec)
    opts += [
        "-o",
        f"StrictHostKeyChecking={spec.strict_host_key_checking}",
        "-o",
        f"ConnectTimeout={max(1, int(spec.connect_timeout))}",
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
            f"ControlPath={control_dir()}/{_flavour(spec)}-%C",
            "-o",
            f"ControlPersist={CONTROL_PERSIST}",
            # The resident agent's forward (remotedl.ssh.resident) replaces a stale socket.
            "-o",
            "StreamLocalBindUnlink=yes",
        ]
    elif not multiplex:
        opts += ["-o", "ControlPath=none", "-o", "ControlMaster=no"]
    return opts


def ssh_argv(
    spec: HostSpec,
    remote_command: str | None = None,
    *,
    tty: bool = False,
    multiplex: bool = True,
    batch: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """``ssh ... -- alias [remote_command]``. The remote command is parsed by the box's login
    shell, whatever it is: callers pass only the constant bootstrap of ``ssh.channel`` or a
    string from ``login_shell_safe``."""
    argv = ["ssh", *openssh_options(spec, multiplex=multiplex, batch=batch), *extra]
    argv.append("-t" if tty else "-T")
    argv += ["--", spec.alias]
    if remote_command is not None:
        argv.append(remote_command)
    return argv


# Characters every login shell (sh, bash, zsh, fish, tcsh) leaves alone inside single quotes.
_UNSAFE_IN_QUOTES = set("'\\!\n\r\0")


def login_shell_safe(script: str) -> str:
    """``exec /bin/sh -c '<script>'``, for the few commands that need a terminal (``attach``)
    and so cannot send their script on stdin. The script may hold no ``'``, backslash, ``!``
    or newline: inside single quotes those differ between fish, tcsh and POSIX shells."""
    bad = _UNSAFE_IN_QUOTES.intersection(script)
    if bad:
        raise ValueError(f"not safe for every login shell: {sorted(bad)!r} in {script!r}")
    return f"exec /bin/sh -c '{script}'"


def ssh_command_string(spec: HostSpec) -> str:
    """The ``ssh ...`` prefix as one shell string, for rsync -e and GIT_SSH_COMMAND."""
    return shlex.join(["ssh", *openssh_options(spec)])


def close_master(spec: HostSpec) -> None:
    """End the multiplexing master for ``spec``, if one runs."""
    from remotedl import proc

    if spec.control_path is not None:
        return
    proc.run(["ssh", *openssh_options(spec), "-O", "exit", spec.alias], check=False, timeout=10)


def _refused(spec: HostSpec) -> ConnectError:
    return ConnectError(
        f"connection refused by {spec.hostname}:{spec.port} (host {spec.alias})",
        hint="is sshd running on the box, and is the Port right in your ssh config?",
    )


# What OpenSSH prints when it, not the remote command, failed (it then exits 255).
SSH_OWN_FAILURES = (
    "host key verification failed",
    "remote host identification has changed",
    "permission denied",
    "could not resolve hostname",
    "connection refused",
    "connection timed out",
    "operation timed out",
    "timed out during banner exchange",
    "kex_exchange_identification",
    "connection closed by",
    "connection reset",
    "no route to host",
    "network is unreachable",
    "broken pipe",
    "stdio forwarding failed",
    "open failed",
    "control socket connect",
    "mux_client",
    "client_loop",
    "closed by remote host",
    "bad configuration option",
    "bad owner or permissions",
    "proxycommand",
    "connection to ",
)


# What ssh prints when a connection drops under a command that was running.
SSH_DROPPED = (
    "closed by remote host",
    "client_loop",
    "broken pipe",
    "connection reset",
    "mux_client",
    "control socket",
    "timeout, server",
)


def connection_dropped(stderr: str) -> bool:
    """Whether ssh's last words say the connection itself was lost (the script had started:
    anything else it printed, even "Connection refused", is the script's own)."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    return bool(lines) and any(s in lines[-1].lower() for s in SSH_DROPPED)


def looks_like_ssh_failure(stderr: str) -> bool:
    low = stderr.lower()
    return any(s in low for s in SSH_OWN_FAILURES)


def openssh_failure(spec: HostSpec, stderr: str) -> ConnectError:
    """Map OpenSSH's own failure (exit 255) to one clear error."""
    lines = [x for x in stderr.strip().splitlines() if x.strip() and not x.startswith("debug")]
    last = lines[-1].strip() if lines else "ssh exited with status 255"
    low = stderr.lower()
    trust = f"`remotedl trust {spec.alias}`"
    if "remote host identification has changed" in low:
        return HostKeyError(
            f"host key of {spec.display} has CHANGED",
            hint=f"if the box was reinstalled, run `remotedl trust {spec.alias} --replace`; "
            "otherwise someone may be intercepting the connection",
        )
    if "host key verification failed" in low or "no matching host key" in low:
        m = re.search(r"host key is known for (\S+) and", stderr)
        if m and m.group(1) != spec.known_hosts_name and spec.proxy_jump:
            return HostKeyError(
                f"host key of {m.group(1)} (a jump host on the way to {spec.alias}) is not known",
                hint=f"trust the jump host first: `remotedl trust JUMP` for each of {spec.proxy_jump}",
            )
        return HostKeyError(
            f"host key of {spec.display} is not known",
            hint=f"check the fingerprint with the box's admin, then run {trust}",
        )
    if "permission denied" in low:
        tried = ", ".join(p for p in spec.identity_files if os.path.isfile(p)) or "no key file found"
        agent = "" if spec.identities_only else " and the ssh agent's keys"
        return ConnectError(
            f"authentication failed for {spec.user}@{spec.hostname}:{spec.port} (keys tried: {tried}{agent})",
            hint=f"check User and IdentityFile for {spec.alias}, or install the public key on the "
            "box with `ssh-copy-id`",
        )
    if "could not resolve hostname" in low:
        if spec.sources.get("hostname") == "default" and not spec.proxy_jump:
            return ConnectError(
                f"unknown host '{spec.alias}': no Host entry for it in "
                f"{spec.ssh_config or '~/.ssh/config'}, and it does not resolve as a host name",
                hint="add a Host entry (see sshconfig.example), or check the spelling",
            )
        return ConnectError(
            f"cannot resolve host name '{spec.hostname}' (host {spec.alias})",
            hint="check the HostName in your ssh config, or the DNS name (`remotedl dns check`)",
        )
    if "bad configuration option" in low or "bad owner or permissions" in low:
        return ConnectError(f"ssh cannot use its configuration: {last}", hint="fix the ssh config file")
    if spec.proxy_jump and ("open failed" in low or "stdio forwarding failed" in low):
        return ConnectError(
            f"the jump host {spec.proxy_jump} could not reach {spec.hostname}:{spec.port}: {last}",
            hint=f"is the box up, and is its HostName/Port right as seen from {spec.proxy_jump}?",
        )
    if "connection refused" in low:
        return _refused(spec)
    if "banner exchange" in low:
        return ConnectError(
            f"no SSH greeting from {spec.hostname}:{spec.port} within "
            f"{spec.connect_timeout:g} s (host {spec.alias}): timed out",
            hint="is that port an SSH server, and is the box not overloaded?",
        )
    if "timed out" in low:
        return ConnectError(
            f"timed out after {spec.connect_timeout:g} s connecting to "
            f"{spec.hostname}:{spec.port} (host {spec.alias})",
            hint="is the box on and reachable from here (VPN, firewall, router port forward)?",
        )
    if "no route to host" in low or "network is unreachable" in low:
        return ConnectError(
            f"cannot reach {spec.hostname}:{spec.port} (host {spec.alias}): {last}",
            hint="is the box on and reachable from here?",
        )
    if "closed by remote host" in low or "connection reset" in low or "kex_exchange" in low:
        return ConnectError(
            f"{spec.display} closed the connection: {last}",
            hint="is the box's sshd overloaded (MaxStartups) or refusing this address?",
        )
    return ConnectError(f"ssh to {spec.display} failed: {last}")
