"""Reading the settings: defaults, the user config, the project file and its ``[hosts.NAME]``
tables, ``REMOTEDL_*`` and flags, each value with the place it came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remotedl.config.keys import DNS_PATHS, NOT_PER_HOST, PATHS, PROJECT_PATHS, SCALARS, TABLES, _coerce
from remotedl.config.model import Setting, Settings, _read_toml, _resolve_path, find_project, project_relative
from remotedl.config.trust import (
    _project_data,
    allow_files,
    allowed_before,
    is_allowed,
    local_exec,
    trust_risks,
    without_local_exec,
)
from remotedl.env import Environment
from remotedl.errors import ConfigError


def _apply_file(settings: Settings, data: Mapping[str, Any], origin: str, base: Path) -> None:
    for key, value in data.items():
        if key == "hosts" and isinstance(value, dict):
            _apply_host_tables(settings, value, origin, base)
        elif key == "fleets":
            _apply_fleets(settings, value, origin)
        elif key in TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: [{key}] must be a table")
            if key == "dns":
                value = {
                    k: _resolve_path(v, base) if k in DNS_PATHS and isinstance(v, str) and v else v
                    for k, v in value.items()
                }
                # Key by key over the user config's [dns]: a project names its box's record and
                # server, the user's own config (or the environment) holds the secrets.
                merged = {**(settings.tables[key].value if key in settings.tables else {}), **value}
                sources = settings.table_sources.setdefault(key, {})
                sources.update(dict.fromkeys(value, origin))
                origins = sorted(set(sources.values()))
                value = merged
                origin = " + ".join(origins) if len(origins) > 1 else origin
            settings.tables[key] = Setting(value, origin)
        elif key in SCALARS:
            coerced = _coerce(key, value, origin)
            if key in PATHS and coerced:
                coerced = _resolve_path(coerced, base)
            settings.values[key] = Setting(coerced, origin)
        else:
            known = ", ".join(sorted([*SCALARS, *TABLES]))
            raise ConfigError(f"{origin}: unknown setting '{key}'", hint=f"known settings: {known}")


def _apply_host_tables(settings: Settings, tables: Mapping[str, Any], origin: str, base: Path) -> None:
    """[hosts.NAME] tables: any setting but which hosts there are, checked as at the top level."""
    allowed = sorted(k for k in SCALARS if k not in NOT_PER_HOST)
    for name, table in tables.items():
        where = f"{origin} [hosts.{name}]"
        if not isinstance(table, dict):
            raise ConfigError(
                f"{origin}: hosts.{name} must be a table of settings, not {table!r}",
                hint='e.g. [hosts.gpu1] remote_dir = "/scratch/me/proj"; list the hosts with '
                'host = ["gpu1", "gpu2"] in a file that has [hosts.NAME] tables',
            )
        if not name or name.startswith(("-", "@")) or any(c.isspace() for c in name):
            raise ConfigError(f"{origin}: [hosts.{name}]: '{name}' is not a host alias")
        mine = settings.host_tables.setdefault(name, {})
        for key, value in table.items():
            if key not in SCALARS or key in NOT_PER_HOST:
                raise ConfigError(
                    f"{where}: unknown setting '{key}'", hint=f"a host table may set: {', '.join(allowed)}"
                )
            coerced = _coerce(key, value, where)
            if key in PATHS and coerced:
                coerced = _resolve_path(coerced, base)
            mine[key] = Setting(coerced, where)


def _apply_fleets(settings: Settings, fleets: Any, origin: str) -> None:
    if not isinstance(fleets, dict):
        raise ConfigError(f"{origin}: [fleets] must be a table", hint='e.g. [fleets] lab = ["gpu1", "gpu2"]')
    for name, members in fleets.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(
                f"{origin}: fleet '{name}' must be a list of host names, not {members!r}",
                hint=f'e.g. {name} = ["gpu1", "gpu2"]',
            )
        settings.fleets[name] = Setting(list(members), f"{origin} [fleets]")
    settings.tables["fleets"] = Setting({n: f.value for n, f in settings.fleets.items()}, origin)


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
        data = _project_data(project)
        risky = local_exec(data)
        allowed: bool | None = None
        if risky:
            allowed = is_allowed(env, project)
            if not allowed:
                # Not applied: a cloned repository runs nothing here until the user allowed it.
                settings.needs_allow = list(risky)
                data = without_local_exec(data, risky)
        user_dns = settings.tables.get("dns"), dict(settings.table_sources.get("dns", {}))
        _apply_file(settings, data, f"project config {project.config_file}", project.config_file.parent)
        settings.allow_reasons = dict.fromkeys(risky, "can run commands on this machine")
        # (an ssh_config outside the project is already there: it runs commands, it is not only read)
        more = {k: why for k, why in trust_risks(settings, env.environ).items() if k not in risky}
        settings.allow_reasons.update(more)
        if more and not (allowed if allowed is not None else is_allowed(env, project)):
            # Not applied either: the user's [dns] stays as the user config has it.
            settings.needs_allow += [key for key in more if key not in settings.needs_allow]
            if user_dns[0] is None:
                settings.tables.pop("dns", None)
                settings.table_sources.pop("dns", None)
            else:
                settings.tables["dns"], settings.table_sources["dns"] = user_dns[0], user_dns[1]
        if settings.needs_allow and allowed_before(env, project):
            settings.allow_changed = allow_files(env, project)

    for key, (_, _, var) in SCALARS.items():
        if var and env.environ.get(var):
            value = _coerce(key, env.environ[var], f"environment {var}")
            if key in PATHS and value:
                value = _resolve_path(value, env.cwd)
            settings.values[key] = Setting(value, f"environment {var}")
            settings.overridden.add(key)

    for key, value in (flags or {}).items():
        if value is not None and key in SCALARS:
            flag = "--" + key.replace("_", "-")
            value = _coerce(key, value, f"flag {flag}")
            if key in PATHS and value:
                value = _resolve_path(value, env.cwd)
            settings.values[key] = Setting(value, f"flag {flag}")
            settings.overridden.add(key)
    _check_project_paths(settings)
    return settings


def _check_project_paths(settings: Settings) -> None:
    """A configured data or shared path must lie inside the project, and not be all of it
    (the box would skip it without a word, or push would refuse it as a usage error)."""
    root = settings.project.root
    for key in PROJECT_PATHS:
        setting = settings.values[key]
        for path in setting.value:
            rel = project_relative(root, path)
            if rel in {".", ".."} or rel.startswith(".." + os.sep):
                where = "is the project itself" if rel == "." else f"is outside the project ({root})"
                raise ConfigError(
                    f"{setting.source}: {key} path '{path}' {where}",
                    hint=f"list directories inside the project in `{key}`, relative to {root}",
                )
