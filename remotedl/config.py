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
}
TABLES = {"dns", "playbook_vars"}


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
    raise ConfigError(
        f"{origin}: '{key}' must be {_type_name(kind)}, not {value!r}",
        hint="fix the value; `remotedl config` shows what each setting resolves to",
    )


def _type_name(kind: type) -> str:
    return {
        str: "a string",
        float: "a number",
        int: "an integer",
        list: "a list of strings",
        dict: "a table",
    }[kind]


def _apply_file(settings: Settings, data: Mapping[str, Any], origin: str) -> None:
    for key, value in data.items():
        if key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [{key}] must be a table")
            settings.tables[key] = Setting(value, origin)
        elif key in SCALARS:
            settings.values[key] = Setting(_coerce(key, value, origin), origin)
        else:
            known = ", ".join(sorted([*SCALARS, *TABLES]))
            raise ConfigError(f"{origin}: unknown setting '{key}'", hint=f"known settings: {known}")


def load_settings(env: Environment, flags: Mapping[str, Any] | None = None) -> Settings:
    """Resolve every setting through the precedence chain, remembering each one's source."""
    project = find_project(env.cwd)
    settings = Settings(project)
    for key, (_, default, _) in SCALARS.items():
        settings.values[key] = Setting(default, "default")

    user_file = env.config_dir / "config.toml"
    if user_file.is_file():
        _apply_file(settings, _read_toml(user_file), f"user config {user_file}")

    if project.config_file is not None:
        data = _read_toml(project.config_file)
        if project.config_file.name == "pyproject.toml":
            data = data.get("tool", {}).get("remotedl", {})
            if not isinstance(data, dict):
                raise ConfigError(f"{project.config_file}: [tool.remotedl] must be a table")
        _apply_file(settings, data, f"project config {project.config_file}")

    for key, (_, _, var) in SCALARS.items():
        if var and env.environ.get(var):
            settings.values[key] = Setting(
                _coerce(key, env.environ[var], f"environment {var}"), f"environment {var}"
            )

    for key, value in (flags or {}).items():
        if value is not None and key in SCALARS:
            flag = "--" + key.replace("_", "-")
            settings.values[key] = Setting(_coerce(key, value, f"flag {flag}"), f"flag {flag}")
    return settings
