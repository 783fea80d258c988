"""The settings' types (``Setting``, ``Project``, ``Settings``) and finding the project a
directory belongs to."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotedl.errors import ConfigError

PROJECT_FILE = "remotedl.toml"


# Where each source stands in the precedence chain (a Setting's source starts with one).
_RANKS = (("default", 0), ("user config", 1), ("project config", 2), ("environment", 4), ("flag", 5))


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

    @functools.cached_property
    def identity(self) -> str:
        """The project's identity (its first commit; see ``snapshot.project_identity``), or ""
        outside git."""
        from remotedl.snapshot import identity_in_git

        return identity_in_git(self.root)


@dataclass
class Settings:
    project: Project
    values: dict[str, Setting] = field(default_factory=dict)
    tables: dict[str, Setting] = field(default_factory=dict)
    # What the project file sets that can run commands on this machine, when the user has not
    # allowed this version of the file (see ``local_exec`` and ``remotedl allow``).
    needs_allow: list[str] = field(default_factory=list)
    # Per-host settings from [hosts.NAME] tables (user config, then project file, key by key).
    host_tables: dict[str, dict[str, Setting]] = field(default_factory=dict)
    # Named fleets: [fleets] NAME = ["host", ...], used as `--host @NAME`.
    fleets: dict[str, Setting] = field(default_factory=dict)
    # Keys set by the environment or a flag: they beat [hosts.NAME] too.
    overridden: set[str] = field(default_factory=set)
    # Set on the view ``for_host`` gives: the host these settings are for.
    host_name: str | None = None
    # Why each of those needs ``allow`` (setting -> a few words), and every such setting the
    # project file has, allowed or not (what ``remotedl allow`` names).
    allow_reasons: dict[str, str] = field(default_factory=dict)
    # Where each key of a table came from ([dns] merges the user config's and the project's).
    table_sources: dict[str, dict[str, str]] = field(default_factory=dict)
    # When the user allowed an earlier version of the project's files: the files ``allow``
    # covers now (one of them changed, or an ``Include`` glob matches a new one).
    allow_changed: list[Path] = field(default_factory=list)

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
        if value:
            return str(value)
        from remotedl.treeid import default_remote_dir

        return default_remote_dir(self.project.identity, self.project.name)

    def adopt_request(self) -> dict[str, str] | None:
        """With the default ``remote_dir``: what the box needs to keep a tree this project has
        under the older, folder-named default (see ``remotedl.treeid``); None otherwise."""
        if self.get("remote_dir") or not self.project.identity:
            return None
        return {"dir": self.remote_dir, "id": self.project.identity, "legacy": self.project.name}

    def host_names(self) -> list[str]:
        """The hosts to work on, fleets expanded, in order, each once; [] when none is given.

        ``host`` (a name, ``"a,b"``, ``"@lab"``) and ``hosts`` (a list) say the same; the one
        from the higher place in the precedence chain wins (``--host`` beats ``hosts`` in
        remotedl.toml); both in one file is an error."""
        return self._host_list()[0]

    def hosts_source(self) -> str:
        """Where the host list came from (the ``host`` or the ``hosts`` setting's source)."""
        return self._host_list()[1]

    def _host_list(self) -> tuple[list[str], str]:
        host, hosts = self.values["host"], self.values["hosts"]
        if self.host_name is not None:
            return [self.host_name], host.source
        words: list[str] = []
        source = "default"
        if host.value and hosts.value and host.source == hosts.source:
            raise ConfigError(
                f"{host.source}: both 'host' and 'hosts' are set",
                hint='keep one: host = "a" or host = "a,b", or hosts = ["a", "b"]',
            )
        if host.value and (not hosts.value or _rank(host.source) > _rank(hosts.source)):
            words, source = str(host.value).split(","), host.source
        elif hosts.value:
            words, source = list(hosts.value), hosts.source
        out: list[str] = []
        for word in words:
            for name in self._expand(word.strip(), source, ()):
                if name not in out:
                    out.append(name)
        return out, source

    def _expand(self, word: str, source: str, seen: tuple[str, ...]) -> list[str]:
        if not word:
            return []
        if not word.startswith("@"):
            if word.startswith("-") or any(c.isspace() for c in word):
                raise ConfigError(
                    f"{source}: '{word}' is not a host alias", hint="give ssh config Host names"
                )
            return [word]
        name = word[1:]
        fleet = self.fleets.get(name)
        if fleet is None:
            known = ", ".join(f"@{n}" for n in sorted(self.fleets)) or "none defined"
            raise ConfigError(
                f"{source}: no fleet called '{name}' (known: {known})",
                hint=f"define it in the user config ({_USER_CONFIG_HINT}): "
                f'[fleets] {name} = ["gpu1", "gpu2"]',
            )
        if name in seen:
            raise ConfigError(f"{fleet.source}: fleet '{name}' includes itself")
        out: list[str] = []
        for member in fleet.value:
            out += self._expand(str(member).strip(), fleet.source, (*seen, name))
        return out

    def for_host(self, name: str) -> Settings:
        """The effective settings for one host: defaults < user < project < [hosts.NAME] <
        environment < flags, each with its source. ``env`` in [hosts.NAME] adds to (and
        overrides keys of) the general ``env``."""
        values = dict(self.values)
        for key, setting in self.host_tables.get(name, {}).items():
            if key in self.overridden:
                continue
            if key == "env":
                general = values["env"]
                merged = {**general.value, **setting.value}
                source = setting.source if not general.value else f"{general.source} + {setting.source}"
                setting = Setting(merged, source)
            values[key] = setting
        source = self._host_list()[1] if self.host_name is None else self.values["host"].source
        values["host"] = Setting(name, source)
        return Settings(
            self.project,
            values,
            dict(self.tables),
            list(self.needs_allow),
            self.host_tables,
            self.fleets,
            set(self.overridden),
            host_name=name,
            allow_reasons=dict(self.allow_reasons),
            table_sources=self.table_sources,
        )


_USER_CONFIG_HINT = "$XDG_CONFIG_HOME/remotedl/config.toml"


def _rank(source: str) -> int:
    return next((rank for prefix, rank in _RANKS if source.startswith(prefix)), 0)


def find_project(start: Path) -> Project:
    """Walk up from ``start`` to the nearest remotedl.toml, [tool.remotedl] or git root."""
    start = start.resolve()
    git_root: Path | None = None
    for d in [start, *start.parents]:
        if (d / PROJECT_FILE).is_file():
            return Project(d, d / PROJECT_FILE)
        pyproject = d / "pyproject.toml"
        if pyproject.is_file() and "remotedl" in _read_toml(pyproject).get("tool", {}):  # parsed once
            return Project(d, pyproject)
        if git_root is None and (d / ".git").exists():
            git_root = d
    return Project(git_root or start, None)


def _read_toml(path: Path) -> dict[str, Any]:
    # Imported here: a project without a TOML file (and no user config) never parses one.
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"malformed TOML in {path}: {e}", hint="fix the file; see README 'Configuration'"
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith("~") or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def project_relative(root: Path, path: str) -> str:
    """Where a configured path sits in the project (``root``, resolved), by its name: ``data``
    is the project's ``data`` even when it is a symlink to a dataset disk (push sends what it
    points to). Relative paths are read lexically ("." is the project itself, "../x" climbs
    out); an absolute one reached through a symlinked parent (a linked home) has its parent
    resolved, never its last part. The answer starts with ".." when the path is outside."""
    if not os.path.isabs(path):
        return os.path.normpath(path)
    full = os.path.normpath(path)
    rel = os.path.relpath(full, root)
    if rel == ".." or rel.startswith(".." + os.sep):
        parent = os.path.realpath(os.path.dirname(full))
        rel = os.path.relpath(os.path.join(parent, os.path.basename(full)), root)
    return rel
