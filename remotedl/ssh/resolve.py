"""Resolving a host alias into everything needed to reach it, once, by OpenSSH itself.

``ssh -G`` reads ``~/.ssh/config`` (or ``--ssh-config``) exactly as ``ssh`` will when remotedl
runs it: Include, Match, tokens, ProxyJump chains, ProxyCommand and HostKeyAlias all count.
The result is a ``HostSpec``; every connection remotedl makes (commands, git, rsync, tunnels,
``attach``, ``trust``) is an OpenSSH command line built from it and the same config file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotedl.env import Environment, passwd_home
from remotedl.errors import ConfigError

DEFAULT_IDENTITIES = ("id_ed25519", "id_ecdsa", "id_rsa")
# Hosts that `remotedl sandbox up` made: state_dir/boxes/NAME/ssh_config
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
    proxy_command: str | None = None
    host_key_alias: str | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH looks up in known_hosts (HostKeyAlias wins, as in ssh)."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    @property
    def display(self) -> str:
        via = f" via {self.proxy_jump}" if self.proxy_jump else ""
        return f"{self.alias} ({self.user}@{self.hostname}:{self.port}{via})"


def expand_user_path(path: str) -> str:
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
        path = Path(expand_user_path(explicit))
        if not path.is_file():
            raise ConfigError(f"ssh config file {path} does not exist")
        return path, "--ssh-config / REMOTEDL_SSH_CONFIG"
    box = registered_box_config(env, alias)
    if box is not None:
        return box, f"registered box ({box})"
    default = passwd_home() / ".ssh" / "config"
    return (default if default.is_file() else None), "~/.ssh/config"


def _ssh_g_argv(config_path: Path | None, alias: str, *, no_config: bool = False) -> list[str]:
    argv = ["ssh", "-G"]
    if no_config:
        argv += ["-F", "/dev/null"]
    elif config_path is not None:
        argv += ["-F", str(config_path)]
    return [*argv, "--", alias]


def _parse_ssh_g(result: Any, config_path: Path | None, alias: str) -> dict[str, Any]:
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


def ssh_g(config_path: Path | None, alias: str, *, no_config: bool = False) -> dict[str, Any]:
    """What OpenSSH itself resolves for ``alias`` (``ssh -G``)."""
    from remotedl import proc

    result = proc.run(_ssh_g_argv(config_path, alias, no_config=no_config), check=False, timeout=30)
    return _parse_ssh_g(result, config_path, alias)


def ssh_g_with_defaults(config_path: Path | None, alias: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ssh -G`` for ``alias`` under its config, and under none (OpenSSH's defaults, to tell
    which values the config set): both at once, one wait instead of two on every command."""
    from remotedl import proc

    found, defaults = proc.run_all(
        [_ssh_g_argv(config_path, alias), _ssh_g_argv(None, alias, no_config=True)], timeout=30
    )
    return _parse_ssh_g(found, config_path, alias), _parse_ssh_g(defaults, None, alias)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value).split()


def _none(value: Any) -> str | None:
    return None if value is None or str(value).lower() == "none" else str(value)


def resolve_host(
    env: Environment,
    alias: str,
    *,
    ssh_config: str | None = None,
    user: str | None = None,
    port: int | None = None,
    identity: str | None = None,
    connect_timeout: float = 10.0,
) -> HostSpec:
    """Resolve ``alias`` through the ssh config. Explicit arguments win over the file."""
    if not alias or alias.startswith("-") or any(c.isspace() for c in alias):
        raise ConfigError(f"'{alias}' is not a host alias", hint="give an ssh config Host name")
    config_path, config_why = ssh_config_path(env, alias, ssh_config)
    found, defaults = ssh_g_with_defaults(config_path, alias)
    configured = {k for k, v in found.items() if defaults.get(k) != v}
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
        "proxycommand",
        "hostkeyalias",
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

    identities = [expand_user_path(p) for p in _as_list(found.get("identityfile"))]
    if identity:
        identities.insert(0, expand_user_path(identity))
        sources["identityfile"] = "flag --identity"
    if not identities:
        home = passwd_home() / ".ssh"
        identities = [str(home / n) for n in DEFAULT_IDENTITIES]

    known = [expand_user_path(p) for p in _as_list(found.get("userknownhostsfile"))]
    if not known:
        known = [str(passwd_home() / ".ssh" / "known_hosts")]

    # 'no' would accept a changed key; remotedl never does: treat it as accept-new.
    # OpenSSH's default 'ask' cannot ask in a tool: it is 'yes' here.
    strict = str(found.get("stricthostkeychecking", "ask")).lower()
    strict = "accept-new" if strict in ("no", "off", "false", "accept-new") else "yes"

    timeout = connect_timeout
    sources["connecttimeout"] = "remotedl setting connect_timeout"
    if _none(found.get("connecttimeout")):
        timeout = float(found["connecttimeout"])
        sources["connecttimeout"] = src_file
    alive = _none(found.get("serveraliveinterval", "0"))
    return HostSpec(
        alias=alias,
        hostname=hostname,
        user=the_user,
        port=the_port,
        identity_files=tuple(identities),
        known_hosts_files=tuple(known),
        strict_host_key_checking=strict,
        connect_timeout=timeout,
        server_alive_interval=int(alive) if alive and alive != "0" else None,
        proxy_jump=_none(found.get("proxyjump")),
        ssh_config=config_path,
        identities_only=str(found.get("identitiesonly", "no")).lower() in ("yes", "true"),
        control_path=_none(found.get("controlpath")),
        proxy_command=_none(found.get("proxycommand")),
        host_key_alias=_none(found.get("hostkeyalias")),
        sources=sources,
    )
