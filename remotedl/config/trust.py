"""What a cloned project may not do until ``remotedl allow``: the settings that can run
commands here, read files outside the project or send the user's secrets; the files an allow
covers (the project file and the ssh configs it names, with their Includes) and their digests."""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remotedl.config.keys import DNS_PATHS, PATHS
from remotedl.config.model import Project, Setting, Settings, _read_toml, _resolve_path
from remotedl.env import Environment
from remotedl.errors import ConfigError

ALLOWED_FILE = "allowed.json"


def local_exec(data: Mapping[str, Any]) -> list[str]:
    """The settings in ``data`` that can make remotedl run commands on this machine: an ssh
    config (ProxyCommand, Match exec, LocalCommand, KnownHostsCommand) and ``cmd:`` sources of
    the public IP. A cloned repository must not get to run code by being cd'ed into."""
    found = []
    if data.get("ssh_config"):
        found.append("ssh_config")
    dns = data.get("dns")
    if isinstance(dns, dict):
        sources = [*(dns.get("ip_sources") or []), *(dns.get("ip_sources_v6") or [])]
        if any(isinstance(x, str) and x.startswith("cmd:") for x in sources):
            found.append("dns.ip_sources (cmd:)")
    hosts = data.get("hosts")
    if isinstance(hosts, dict):
        found += [
            f"hosts.{name}.ssh_config"
            for name, table in hosts.items()
            if isinstance(table, dict) and table.get("ssh_config")
        ]
    return found


def without_local_exec(data: Mapping[str, Any], risky: list[str]) -> dict[str, Any]:
    """``data`` without what ``local_exec`` found (for a project file not allowed yet)."""
    out = dict(data)
    if "ssh_config" in risky:
        out.pop("ssh_config", None)
    if "dns.ip_sources (cmd:)" in risky:
        out.pop("dns", None)
    hosts = out.get("hosts")
    if isinstance(hosts, dict):
        out["hosts"] = {
            name: {k: v for k, v in table.items() if k != "ssh_config"} if isinstance(table, dict) else table
            for name, table in hosts.items()
        }
    return out


def _outside(path: str, root: Path) -> bool:
    full = os.path.realpath(os.path.expanduser(path))
    rel = os.path.relpath(full, os.path.realpath(root))
    return rel == ".." or rel.startswith(".." + os.sep)


def trust_risks(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What the project file makes remotedl do with this machine's files and the user's
    secrets, by what each setting is rather than by its name (setting -> why it needs
    ``allow``):

    - a setting that names a local file (``PATHS``, ``DNS_PATHS``) and comes from the project
      file may not point outside the project: remotedl would read, and maybe send, it;
    - a place the project names that a provider sends its secret to (``SECRET_ROUTES``) may not
      get a secret of the user's: one from the environment or from a file the user config names.
    A project's own secrets (files inside it) go where it says."""
    from remotedl.ddns.settings import SECRET_ROUTES

    root = settings.project.root
    risks: dict[str, str] = {}

    def from_project(source: str) -> bool:
        return source.startswith("project config")

    files = [(k, settings.values[k]) for k in PATHS]
    files += [(f"hosts.{h}.{k}", t[k]) for h, t in settings.host_tables.items() for k in PATHS if k in t]
    dns = settings.table("dns")
    dns_sources = settings.table_sources.get("dns", {})
    files += [(f"dns.{k}", Setting(dns[k], dns_sources.get(k, ""))) for k in DNS_PATHS if dns.get(k)]
    for key, setting in files:
        if setting.value and from_project(setting.source) and _outside(str(setting.value), root):
            risks[key] = f"reads {setting.value}, outside the project"

    route = SECRET_ROUTES.get(str(dns.get("provider")))
    sent_to = dns_sources.get(route.destination, "") if route is not None else ""
    if route is not None and dns.get(route.destination) and from_project(sent_to):
        where = str(dns[route.destination])
        if environ.get(route.env_var):
            secret = f"your {route.what} from {route.env_var}"
        elif dns.get(route.file_key) and not from_project(dns_sources.get(route.file_key, "")):
            secret = f"your {route.what} from {dns[route.file_key]} (named in {dns_sources[route.file_key]})"
        else:
            secret = ""
        if secret:
            risks[f"dns.{route.destination}"] = f"sends {secret} to {_shown_place(where)}"
    return risks


def _shown_place(where: str) -> str:
    """A server or URL as an error may show it: scheme, host and path, no user or password."""
    from urllib.parse import urlsplit

    if "://" not in where:
        return where
    parts = urlsplit(where)
    return f"{parts.scheme}://{parts.hostname or ''}{':' + str(parts.port) if parts.port else ''}{parts.path}"


# OpenSSH reads at most this many nested Include levels (READCONF_MAX_DEPTH).
_SSH_INCLUDE_DEPTH = 16


# "Include a b", "Include=a", "  include = a" (keywords are case-insensitive; Include may sit
# inside a Host or Match block and is read all the same).
_INCLUDE = re.compile(r"^\s*include(?:\s*=\s*|\s+)(.*)$", re.IGNORECASE)


def ssh_config_files(path: Path, home: Path) -> list[Path]:
    """``path`` and every file it ``Include``s, recursively, as OpenSSH finds them: globs
    expanded, ``~`` and ``${VAR}`` expanded, relative names under ~/.ssh (ssh -F reads a user
    configuration). Missing files are listed too: creating one later changes what runs."""
    import glob
    import shlex

    out: list[Path] = []

    def visit(p: Path, depth: int) -> None:
        if p in out or depth > _SSH_INCLUDE_DEPTH:
            return
        out.append(p)
        try:
            text = p.read_text(errors="replace")
        except OSError:
            return
        for line in text.splitlines():
            m = _INCLUDE.match(line)
            if m is None:
                continue
            rest = m.group(1)
            try:
                names = shlex.split(rest)
            except ValueError:
                names = rest.split()
            for name in names:
                name = os.path.expandvars(name)
                if name == "~" or name.startswith("~/"):
                    name = str(home) + name[1:]
                elif name.startswith("~"):
                    name = os.path.expanduser(name)
                full = name if os.path.isabs(name) else str(home / ".ssh" / name)
                matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
                for found in matches:
                    visit(Path(found), depth + 1)

    visit(path, 0)
    return out


def _project_data(project: Project) -> dict[str, Any]:
    if project.config_file is None:
        return {}
    data = _read_toml(project.config_file)
    if project.config_file.name == "pyproject.toml":
        data = data.get("tool", {}).get("remotedl", {})
        if not isinstance(data, dict):
            raise ConfigError(f"{project.config_file}: [tool.remotedl] must be a table")
    return data


def allow_files(env: Environment, project: Project) -> list[Path]:
    """Every file ``allow`` vouches for: the project file, each ssh config it names with what
    that ``Include``s (ProxyCommand, Match exec, LocalCommand run from any of them), and the
    project's playbooks that need ``allow`` (they shadow a shipped one, or run steps as root).
    A change to any of them needs a new ``allow``."""
    from remotedl.playbooks import risky_project_playbooks

    files: list[Path] = [project.config_file] if project.config_file is not None else []
    data = _project_data(project)
    named = [data.get("ssh_config")]
    hosts = data.get("hosts")
    if isinstance(hosts, dict):
        named += [t.get("ssh_config") for t in hosts.values() if isinstance(t, dict)]
    # OpenSSH expands ~ in Include from the passwd entry, not $HOME.
    home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    base = project.config_file.parent if project.config_file is not None else project.root
    for value in named:
        if isinstance(value, str) and value:
            path = Path(os.path.expanduser(_resolve_path(value, base)))
            files += [f for f in ssh_config_files(path, home) if f not in files]
    files += [book for book in risky_project_playbooks(project.root) if book not in files]
    return files


def _digest(paths: list[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        h.update(str(path).encode() + b"\0")
        try:
            h.update(hashlib.sha256(path.read_bytes()).hexdigest().encode())
        except OSError as e:
            h.update(f"unreadable: {e.strerror}".encode())
        h.update(b"\0")
    return h.hexdigest()


def _allow_key(project: Project) -> str:
    # The project file; a project with none (its playbooks need allow) by its directory.
    return str((project.config_file or project.root).resolve())


def _allowed(env: Environment) -> dict[str, str]:
    import json

    try:
        data = json.loads((env.state_dir / ALLOWED_FILE).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_allowed(env: Environment, project: Project) -> bool:
    """The user allowed this project's files exactly as they are now."""
    return _allowed(env).get(_allow_key(project)) == _digest(allow_files(env, project))


def allowed_before(env: Environment, project: Project) -> bool:
    """The user allowed some version of this project's files (maybe not the one there now)."""
    return _allow_key(project) in _allowed(env)


def allow(env: Environment, project: Project, *, revoke: bool = False) -> list[Path] | None:
    """Record (or forget) that the user trusts this exact content of a project's files
    (``allow_files``), as direnv's ``allow`` does. Any change to one needs a new ``allow``.
    Returns the files allowed (None when revoking a project that was not allowed)."""
    import json

    allowed = _allowed(env)
    key = _allow_key(project)
    files: list[Path] | None = None
    if revoke:
        files = [] if allowed.pop(key, None) is not None else None
    else:
        files = allow_files(env, project)
        allowed[key] = _digest(files)
    env.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = env.state_dir / (ALLOWED_FILE + f".{os.getpid()}")
    tmp.write_text(json.dumps(allowed, indent=1))
    tmp.replace(env.state_dir / ALLOWED_FILE)
    return files


def require_allowed(settings: Settings) -> None:
    """Refuse to go on while the project file holds settings that would run local commands,
    read files of this machine outside the project or send the user's secrets to places it
    names, and the user has not allowed this version of it."""
    if settings.needs_allow and settings.project.config_file is not None:
        reasons = settings.allow_reasons
        what = "; ".join(f"{key} ({reasons.get(key, 'needs allow')})" for key in settings.needs_allow)
        if settings.allow_changed:
            # Allowed once: the user must learn that a file changed, and which ones to read again.
            root = settings.project.root
            names = ", ".join(
                str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in settings.allow_changed
            )
            raise ConfigError(
                f"{settings.project.config_file} sets {what}, and a file `remotedl allow` covers "
                f"changed since you allowed it ({names}, or a new file an Include matches); "
                "remotedl does not use them until you allow this version",
                hint="read those files again (what changed in them), then run `remotedl allow`",
            )
        raise ConfigError(
            f"{settings.project.config_file} sets {what}; "
            "remotedl does not use it until you allow this version of the file",
            hint="read the file (and the ssh config it names), then run `remotedl allow`",
        )
