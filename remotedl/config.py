"""Settings, each with the place it came from.

Precedence, lowest to highest: defaults < user config
(``$XDG_CONFIG_HOME/remotedl/config.toml``) < project ``remotedl.toml`` or
``[tool.remotedl]`` in pyproject.toml < ``REMOTEDL_*`` environment < command-line flags.
Host, user, port and key come from ``~/.ssh/config`` (see ``remotedl.ssh``).

Several hosts (a fleet): ``--host a,b``, ``host = "a,b"``, ``hosts = ["a", "b"]``, and named
fleets in the user config (``[fleets] lab = ["gpu1", "gpu2"]``, used as ``@lab``). Settings of
one host go in ``[hosts.NAME]`` tables; for that host they sit between the project file and the
environment: defaults < user < project < ``[hosts.NAME]`` < ``REMOTEDL_*`` < flags
(``Settings.for_host``).
"""

from __future__ import annotations

import functools
import os
import pwd
import re
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
    # the mode push makes remote_dir with: private; "0750" or "2770" opens it to the group
    "remote_dir_mode": (str, "0700", "REMOTEDL_REMOTE_DIR_MODE"),
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
    # outputs home: what a job writes that belongs here, fetched when it ends (remotedl.outputs)
    "outputs": (list, [], None),
    "outputs_dir": (str, None, "REMOTEDL_OUTPUTS_DIR"),
    "trackers": (bool, True, "REMOTEDL_TRACKERS"),  # WANDB_*/MLFLOW_* per job
    "wandb_sync": (bool, False, "REMOTEDL_WANDB_SYNC"),  # `wandb sync` offline runs that came home
    "tensorboard_logdir": (str, None, None),
    "tensorboard_port": (int, 6006, None),
    # Several hosts at once (a fleet); `host = "a,b"` and `--host a,b,@lab` say the same.
    "hosts": (list, [], None),
    # multi-node runs: the address the other nodes reach this box at (default: ssh's HostName)
    "node_addr": (str, None, None),
    # Slurm hosts: a host whose scheduler is "slurm" is the login node of a Slurm cluster;
    # the rest are sbatch's defaults for jobs there (usually in [hosts.NAME] tables).
    "scheduler": (str, "box", None),
    "partition": (str, None, None),
    "account": (str, None, None),
    "qos": (str, None, None),
    "time": (str, None, None),
    "constraint": (str, None, None),
    "sbatch_args": (list, [], None),
    "modules": (list, [], None),
    # Jobs in a container image: the image (`--image`, `--no-image`), the engine on the box
    # (docker or podman; default: the one found), how the job's GPUs enter the container, and
    # more words for `docker run` (shm size, extra mounts).
    "image": (str, None, "REMOTEDL_IMAGE"),
    "container": (str, None, None),
    "container_gpus": (str, "nvidia", None),
    "container_args": (list, [], None),
    "jupyter_image": (str, None, None),  # `remotedl jupyter` in a container of this image
    "tensorboard_image": (str, None, None),  # `remotedl tensorboard` in a container of this image
    # Cloud VMs (usually in [hosts.NAME] tables): which cloud, what identifies the VM there,
    # its price, the address ssh goes to, starting it when needed and stopping it when idle.
    "cloud": (str, None, None),
    "region": (str, None, None),
    "instance_id": (str, None, None),
    "project": (str, None, None),
    "zone": (str, None, None),
    "instance": (str, None, None),
    "subscription": (str, None, None),
    "resource_group": (str, None, None),
    "vm": (str, None, None),
    "price_per_hour": (float, None, None),
    "address": (str, "public", None),
    "auto_start": (bool, False, "REMOTEDL_AUTO_START"),
    "autostop": (str, None, "REMOTEDL_AUTOSTOP"),
    "autostop_wait": (str, "all", None),
    "pre_stop": (str, None, None),
    # Azure: the autostop playbook gave the VM a managed identity that may deallocate it
    "managed_identity": (bool, False, None),
    # what running jobs get when the cloud takes a spot VM back (they may save a checkpoint)
    "preempt_signal": (str, "TERM", None),
}
# Settings whose value must be one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": ("box", "slurm"),
    "container": ("docker", "podman"),
    "container_gpus": ("nvidia", "cdi", "devices", "none"),
    "cloud": ("aws", "gcp", "azure"),
    # public: the VM's public IP from the cloud's API; private: its private one (VPN, same
    # network); ssh: the ssh config's HostName as it is (a DNS name kept by `remotedl dns`)
    "address": ("public", "private", "ssh"),
    "autostop_wait": ("all", "jobs"),
}
# String settings that also take a whole number (Slurm's --time in minutes).
STR_OR_INT = {"time"}
# What a [hosts.NAME] table may not set: which hosts there are.
NOT_PER_HOST = {"host", "hosts"}
TABLES = {"dns", "playbook_vars", "fleets"}
# Where each source stands in the precedence chain (a Setting's source starts with one).
_RANKS = (("default", 0), ("user config", 1), ("project config", 2), ("environment", 4), ("flag", 5))
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

    @functools.cached_property
    def identity(self) -> str:
        """The project's identity (its first commit; see ``snapshot.project_identity``), or ""
        outside git."""
        from remotedl import proc
        from remotedl.snapshot import project_identity

        inside = proc.run(["git", "-C", str(self.root), "rev-parse", "--git-dir"], check=False)
        return project_identity(self.root) if inside.returncode == 0 else ""


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


_USER_CONFIG_HINT = "$XDG_CONFIG_HOME/remotedl/config.toml"


def _rank(source: str) -> int:
    return next((rank for prefix, rank in _RANKS if source.startswith(prefix)), 0)


def _coerce(key: str, value: Any, origin: str) -> Any:
    value = _coerce_type(key, value, origin)
    if key == "remote_dir_mode":
        return _dir_mode(value, origin)
    choices = CHOICES.get(key)
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(
            f"{origin}: '{key}' must be one of {', '.join(choices)}, not {value!r}",
            hint="fix the value; `remotedl config` shows what each setting resolves to",
        )
    return value


def _coerce_type(key: str, value: Any, origin: str) -> Any:
    kind = SCALARS[key][0]
    if key in STR_OR_INT and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == "host" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # host = ["a", "b"]: beside [hosts.NAME] tables, where hosts = [...] cannot be
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
    elif kind in (str, bool) and isinstance(value, kind):
        # Not for lists (a list of numbers is no list of strings) nor numbers (true is no port).
        return value
    shown = "a value that may hold secrets" if key in SECRET_VALUES else repr(value)
    raise ConfigError(
        f"{origin}: '{key}' must be {_type_name(kind)}, not {shown}",
        hint="fix the value; `remotedl config` shows what each setting resolves to",
    )


def _dir_mode(value: str, origin: str) -> str:
    """An octal directory mode the owner can use and no one else may write to."""
    text = value.strip()
    if not re.fullmatch(r"[0-7]{3,4}", text) or int(text, 8) & 0o700 != 0o700 or int(text, 8) & 0o002:
        raise ConfigError(
            f"{origin}: 'remote_dir_mode' must be an octal mode that gives you rwx and nobody "
            f"else write, not {value!r}",
            hint='e.g. "0700" (yours alone), "0750" (your group reads), "2770" (a team works in it)',
        )
    return text if len(text) == 4 else "0" + text


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


# Settings naming directories of the project (data sent by rsync, outputs all jobs share).
PROJECT_PATHS = ("data", "shared")


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
