"""What every handler needs: settings, the host spec, and output in text or JSON."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from remotedl.config import Settings, load_settings, require_allowed
from remotedl.env import Environment
from remotedl.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console

    from remotedl.ssh import HostSpec


@dataclass
class App:
    args: argparse.Namespace
    env: Environment

    def flag(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default)

    @cached_property
    def settings(self) -> Settings:
        flags = {
            "host": self.flag("host"),
            "ssh_config": self.flag("ssh_config"),
            "connect_timeout": self.flag("connect_timeout"),
        }
        settings = load_settings(self.env, flags)
        if self.flag("subcommand") != "allow":
            require_allowed(settings)
        return settings

    @property
    def json(self) -> bool:
        return bool(self.flag("json", False))

    def host_alias(self, explicit: str | None = None) -> str:
        alias = explicit or self.settings.get("host")
        if not alias:
            raise ConfigError(
                "no host given",
                hint='pass --host ALIAS, set REMOTEDL_HOST, or put host = "ALIAS" in remotedl.toml '
                "(try `remotedl sandbox up` for a local box called 'sandbox')",
            )
        return str(alias)

    def spec(self, explicit: str | None = None) -> HostSpec:
        from remotedl.ssh import resolve_host

        return resolve_host(
            self.env,
            self.host_alias(explicit),
            ssh_config=self.settings.get("ssh_config"),
            user=self.flag("user"),
            port=self.flag("port"),
            identity=self.flag("identity"),
            connect_timeout=float(self.settings.get("connect_timeout")),
        )

    @cached_property
    def console(self) -> Console:
        from rich.console import Console

        # Piped output is read by programs and pagers: no wrapping at rich's default 80 columns.
        width = None if self.env.stdout_isatty else 200
        return Console(file=self.env.stdout, highlight=False, soft_wrap=True, width=width)

    @cached_property
    def err_console(self) -> Console:
        from rich.console import Console

        return Console(file=self.env.stderr, highlight=False, soft_wrap=True)

    def print_json(self, data: Any) -> None:
        self.env.stdout.write(json.dumps(data, indent=2, default=str) + "\n")

    def out(self, text: str = "") -> None:
        self.console.print(text, markup=False)
