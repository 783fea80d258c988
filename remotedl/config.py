"""Settings, each with the place it came from.

Precedence, lowest to highest: defaults < user config
(``$XDG_CONFIG_HOME/remotedl/config.toml``) < project ``remotedl.toml`` or
``[tool.remotedl]`` in pyproject.toml < ``REMOTEDL_*`` environment < command-line flags.
Host, user, port and key come from ``~/.ssh/config`` (see ``remotedl.ssh``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotedl.env import Environment
from remotedl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PROJECT_FILE = "remotedl.toml"

# key: (type, default, env var). Tables ([dns], ...) are validated by their own modules.
SCALARS: dict[str, tuple[type, Any, str | None]] = {
    "host": (str, None, "REMOTEDL_HOST"),
    "ssh_config": (str, None, "REMOTEDL_SSH_CONFIG"),
    "remote_dir": (str, None, "REMOTEDL_REMOTE_DIR"),
    "connect_timeout": (float, 10.0, "REMOTEDL_CONNECT_TIMEOUT"),
    "data": (list, [], None),
    "exclude": (list, [], None),
    # bytes: untracked files larger than this stay out of push's code snapshot (listed, not sent)
    "max_snapshot_file": (int, 5 << 20, "REMOTEDL_MAX_SNAPSHOT_FILE"),
    "python": (str, "python3", "REMOTEDL_PYTHON"),
    "env": (dict, {}, None),
    "jupyter_port": (int, 8888, None),
    # jobs: each runs in its own checkout (isolate), in the project's environment on the box
    "isolate": (bool, True, "REMOTEDL_ISOLATE"),
    "shared": (list, [], None),
    "conda": (str, None, None),
    "env_setup": (str, None, None),
    "setup_cmd": (str, None, None),
    # job events: notifications sent from the box, stall detection, outputs home, TensorBoard
    "notify": (list, [], None),
    "notify_desktop": (bool, False, "REMOTEDL_NOTIFY_DESKTOP"),
    "stall_after": (str, "15m", "REMOTEDL_STALL_AFTER"),
    "pull_on_end": (list, [], None),
    "tensorboard_logdir": (str, None, None),
    "tensorboard_port": (int, 6006, None),
}
TABLES = {"dns", "playbook_vars"}
# Settings whose value is a path, resolved against the directory of the file that names it.
PATHS = {"ssh_config"}
DNS_PATHS = ("tsig_key_file", "token_file", "password_file")
ALLOWED_FILE = "allowed.json"


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str


@dataclass
class Project:
    """The local project: the directory remotedl works from."""

    root: Path
    config_file: Path | None

    @property
    def name(self) -> str:
        return self.root.name


@dataclass
class Settings:
    project: Project
    values: dict[str, Setting] = field(default_factory=dict)
    tables: dict[str, Setting] = field(default_factory=dict)
    # What the project file sets that can run commands on this machine, when the user has not
    # allowed this version of the file (see ``local_exec`` and ``remotedl allow``).
    needs_allow: list[str] = field(default_factory=list)

    def get(self, key: str) -> Any:
        return self.values[key].value

    def source(self, key: str) -> str:
        return self.values[key].source

    def table(self, name: str) -> dict[str, Any]:
        setting = self.tables.get(name)
        return dict(setting.value) if setting else {}

    @property
    def remote_dir(self) -> str:
        value = self.get("remote_dir")
        return str(value) if value else f"~/remotedl/{self.project.name}"


def find_project(start: Path) -> Project:
    """Walk up from ``start`` to the nearest remotedl.toml, [tool.remotedl] or git root."""
    start = start.resolve()
    git_root: Path | None = None
    for d in [start, *start.parents]:
        if (d / PROJECT_FILE).is_file():
            return Project(d, d / PROJECT_FILE)
        pyproject = d / "pyproject.toml"
        if (
            pyproject.is_file()
            and "tool" in _read_toml(pyproject)
            and "remotedl" in _read_toml(pyproject).get("tool", {})
        ):
            return Project(d, pyproject)
        if git_root is None and (d / ".git").exists():
            git_root = d
    return Project(git_root or start, None)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"malformed TOML in {path}: {e}", hint="fix the file; see README 'Configuration'"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _coerce(key: str, value: Any, origin: str) -> Any:
    kind = SCALARS[key][0]
    if kind is bool and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    elif kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    elif kind is dict and isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    elif isinstance(value, kind):
        return value
    shown = "a value that may hold secrets" if key in SECRET_VALUES else repr(value)
    raise ConfigError(
        f"{origin}: '{key}' must be {_type_name(kind)}, not {shown}",
        hint="fix the value; `remotedl config` shows what each setting resolves to",
    )


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


# Settings whose values hold secrets (notification URLs carry tokens and passwords).
SECRET_VALUES = {"notify"}


def shown_value(key: str, value: Any) -> Any:
    """A setting's value as ``config`` shows it: notification URLs masked."""
    if key == "notify" and isinstance(value, list):
        from remotedl.notify import mask_url

        return [mask_url(str(u)) for u in value]
    return value


def _type_name(kind: type) -> str:
    return {
        bool: "true or false",
        str: "a string",
        float: "a number",
        int: "an integer",
        list: "a list of strings",
        dict: "a table",
    }[kind]


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith("~") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def _apply_file(settings: Settings, data: Mapping[str, Any], origin: str, base: Path) -> None:
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [{key}] must be a table")
            if key == "dns":
                value = {
                    k: _resolve_path(v, base) if k in DNS_PATHS and isinstance(v, str) and v else v
                    for k, v in value.items()
                }
            settings.tables[key] = Setting(value, origin)
        elif key in SCALARS:
            coerced = _coerce(key, value, origin)
            if key in PATHS and coerced:
                coerced = _resolve_path(coerced, base)
            settings.values[key] = Setting(coerced, origin)
        else:
            known = ", ".join(sorted([*SCALARS, *TABLES]))
            raise ConfigError(f"{origin}: unknown setting '{key}'", hint=f"known settings: {known}")


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
    return found


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _allowed(env: Environment) -> dict[str, str]:
    import json

    try:
        data = json.loads((env.state_dir / ALLOWED_FILE).read_text())
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def is_allowed(env: Environment, path: Path) -> bool:
    return _allowed(env).get(str(path.resolve())) == _digest(path)


def allow(env: Environment, path: Path, *, revoke: bool = False) -> bool:
    """Record (or forget) that the user trusts this exact content of a project file, as
    direnv's ``allow`` does. Any change to the file needs a new ``allow``."""
    import json
    import os

    allowed = _allowed(env)
    key = str(path.resolve())
    if revoke:
        found = allowed.pop(key, None) is not None
    else:
        allowed[key] = _digest(path)
        found = True
    env.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = env.state_dir / (ALLOWED_FILE + f".{os.getpid()}")
    tmp.write_text(json.dumps(allowed, indent=1))
    tmp.replace(env.state_dir / ALLOWED_FILE)
    return found


def load_settings(env: Environment, flags: Mapping[str, Any] | None = None) -> Settings:
    """Resolve every setting through the precedence chain, remembering each one's source."""
    project = find_project(env.cwd)
    settings = Settings(project)
    for key, (_, default, _) in SCALARS.items():
        settings.values[key] = Setting(default, "default")

    user_file = env.config_dir / "config.toml"
    if user_file.is_file():
        _apply_file(settings, _read_toml(user_file), f"user config {user_file}", user_file.parent)

    if project.config_file is not None:
        data = _read_toml(project.config_file)
        if project.config_file.name == "pyproject.toml":
            data = data.get("tool", {}).get("remotedl", {})
            if not isinstance(data, dict):
                raise ConfigError(f"{project.config_file}: [tool.remotedl] must be a table")
        risky = local_exec(data)
        if risky and not is_allowed(env, project.config_file):
            # Not applied: a cloned repository runs nothing here until the user allowed it.
            settings.needs_allow = risky
            data = {k: v for k, v in data.items() if k != "ssh_config"}
            if "dns" in data and "dns.ip_sources (cmd:)" in risky:
                data = {k: v for k, v in data.items() if k != "dns"}
        _apply_file(settings, data, f"project config {project.config_file}", project.config_file.parent)

    for key, (_, _, var) in SCALARS.items():
        if var and env.environ.get(var):
            value = _coerce(key, env.environ[var], f"environment {var}")
            if key in PATHS and value:
                value = _resolve_path(value, env.cwd)
            settings.values[key] = Setting(value, f"environment {var}")

    for key, value in (flags or {}).items():
        if value is not None and key in SCALARS:
            flag = "--" + key.replace("_", "-")
            value = _coerce(key, value, f"flag {flag}")
            if key in PATHS and value:
                value = _resolve_path(value, env.cwd)
            settings.values[key] = Setting(value, f"flag {flag}")
    return settings


def require_allowed(settings: Settings) -> None:
    """Refuse to go on while the project file holds settings that would run local commands
    and the user has not allowed this version of it."""
    if settings.needs_allow and settings.project.config_file is not None:
        what = ", ".join(settings.needs_allow)
        raise ConfigError(
            f"{settings.project.config_file} sets {what}, which can run commands on this machine; "
            "remotedl does not use it until you allow this version of the file",
            hint="read the file (and the ssh config it names), then run `remotedl allow`",
        )
