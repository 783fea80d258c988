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

The package: ``keys`` (the settings there are and how values are checked), ``model`` (the
``Settings`` types, finding the project), ``trust`` (what a project file may do before
``remotedl allow``), ``load`` (``load_settings``). Every name is importable from
``remotedl.config``.
"""

from __future__ import annotations

from remotedl.config.keys import (
    CHOICES,
    DNS_PATHS,
    NOT_PER_HOST,
    PATHS,
    PROJECT_PATHS,
    SCALARS,
    SECRET_VALUES,
    STR_OR_INT,
    TABLES,
    _coerce,
    shown_value,
)
from remotedl.config.load import load_settings
from remotedl.config.model import PROJECT_FILE, Project, Setting, Settings, find_project, project_relative
from remotedl.config.trust import (
    ALLOWED_FILE,
    allow,
    allow_files,
    allowed_before,
    is_allowed,
    local_exec,
    require_allowed,
    ssh_config_files,
    trust_risks,
    without_local_exec,
)

__all__ = [
    "ALLOWED_FILE",
    "CHOICES",
    "DNS_PATHS",
    "NOT_PER_HOST",
    "PATHS",
    "PROJECT_FILE",
    "PROJECT_PATHS",
    "SCALARS",
    "SECRET_VALUES",
    "STR_OR_INT",
    "TABLES",
    "Project",
    "Setting",
    "Settings",
    "_coerce",
    "allow",
    "allow_files",
    "allowed_before",
    "find_project",
    "is_allowed",
    "load_settings",
    "local_exec",
    "project_relative",
    "require_allowed",
    "shown_value",
    "ssh_config_files",
    "trust_risks",
    "without_local_exec",
]
