"""What every handler needs: settings, the host spec, and output in text or JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from remotedl.config import Settings, load_settings, require_allowed
from remotedl.env import Environment
from remotedl.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from remotedl.fleet import Fleet, Member, Reach
    from remotedl.ssh import HostSpec

# How a command reaches a host that is a cloud VM: ``remotedl.cli.cloud.ready`` (started first
# with auto_start, else a clear error). The ``remotedl.cli`` package sets it when it is imported,
# before this module can be (this bottom module imports no command module), so every App, main's
# or a library caller's, gets it.
vm_ready: Callable[[App, Member], HostSpec] | None = None


@dataclass
class App:
    args: argparse.Namespace
    env: Environment
    # Narrowed to one host of several (``for_host``): jobs are named HOST:ID in what it prints.
    narrowed: bool = False
    # Hosts resolved already, shared with the narrowed views: ``ssh -G`` once per host.
    resolved: dict[str, Member] = field(default_factory=dict)

    def flag(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default)

    @cached_property
    def base_settings(self) -> Settings:
        """Every setting as resolved, before any one host's [hosts.NAME] table."""
        flags = {
            "host": self.flag("host"),
            "ssh_config": self.flag("ssh_config"),
            "connect_timeout": self.flag("connect_timeout"),
        }
        settings = load_settings(self.env, flags)
        # `allow` grants it; `config` only shows settings (what is not allowed yet is left out
        # and named as such): it runs nothing, reads no secret file and sends nothing.
        if self.flag("subcommand") not in {"allow", "config"}:
            require_allowed(settings)
        return settings

    @cached_property
    def hosts(self) -> list[str]:
        """The hosts this command works on (fleets expanded); [] when none is given."""
        return self.base_settings.host_names()

    @property
    def is_fleet(self) -> bool:
        return len(self.hosts) > 1

    @cached_property
    def settings(self) -> Settings:
        """The settings of the one host given (with its [hosts.NAME] table), or with several
        hosts (or none) the general ones; ``host_settings(name)`` gives each host's."""
        names = self.hosts
        return self.base_settings.for_host(names[0]) if len(names) == 1 else self.base_settings

    def for_host(self, name: str) -> App:
        """This command narrowed to one host: its settings ([hosts.NAME]) and its spec, so
        every one-host code path works on a host of a fleet unchanged."""
        one = App(self.args, self.env, narrowed=True, resolved=self.resolved)
        one.__dict__["base_settings"] = self.base_settings  # cached_property: already resolved
        one.__dict__["hosts"] = [name]
        return one

    def route_job(self, job: str | None) -> tuple[App, str | None]:
        """A job reference as typed: ``HOST:ID`` (or ``HOST:NAME``) names its host, one of the
        hosts given (any alias when none is given on the command line); a plain id or name
        needs a single host."""
        if job and ":" in job:
            host, _, ref = job.partition(":")  # a job's name may hold a colon, an alias does not
            if host in self.hosts or (not self.hosts and host):
                return self.for_host(host), ref or None
            # HOST:ID as a fleet command prints it (`remotedl logs -f gpu2:3`), typed where the
            # project's file (or REMOTEDL_HOST) names other hosts: the id names its host. Hosts
            # given with --host are kept to; "lr:0.1" there may be a job's name.
            if host and ref.isdigit() and not self.flag("host"):
                return self.for_host(host), ref
        if self.is_fleet:
            example = f"{self.hosts[0]}:{job or 'ID'}"
            raise UsageError(
                f"which host's job? {len(self.hosts)} hosts are given ({', '.join(self.hosts)})",
                hint=f"name it as HOST:ID, e.g. {example} (`remotedl jobs` lists them so)",
            )
        return self, job

    def job_ref(self, job_id: int) -> str:
        """How the user names a job of this command's host: ``HOST:ID`` when it was picked
        from several (or named so), else the id."""
        return f"{self.hosts[0]}:{job_id}" if self.narrowed and self.hosts else str(job_id)

    def host_settings(self, name: str) -> Settings:
        return self.base_settings.for_host(name)

    @property
    def json(self) -> bool:
        return bool(self.flag("json", False))

    def host_alias(self, explicit: str | None = None) -> str:
        if explicit:
            return explicit
        names = self.hosts
        if not names:
            raise _no_host()
        if len(names) > 1:
            raise UsageError(
                f"`remotedl {self.flag('subcommand')}` works on one host; {len(names)} are given "
                f"({', '.join(names)})",
                hint="pick one with --host NAME",
            )
        return names[0]

    def spec(self, explicit: str | None = None) -> HostSpec:
        """The one host's spec (``explicit``, or the one host given)."""
        return self.spec_for(self.host_alias(explicit))

    def spec_for(self, name: str) -> HostSpec:
        """Resolve one host through the ssh config, with its own settings (ssh_config,
        connect_timeout) and the --user/--port/--identity flags."""
        from remotedl.fleet import Fleet

        member = Fleet(self.env, self.base_settings, [name], self.reach(), self.resolved).member(name)
        if member.cloud is not None and vm_ready is not None:
            return vm_ready(self, member)
        return member.spec

    def reach(self) -> Reach:
        from remotedl.fleet import Reach

        return Reach(self.flag("user"), self.flag("port"), self.flag("identity"))

    def fleet(self) -> Fleet:
        """The hosts given, as a fleet (one host is a fleet of one)."""
        from remotedl.fleet import Fleet

        if not self.hosts:
            raise _no_host()
        return Fleet(self.env, self.base_settings, list(self.hosts), self.reach(), self.resolved)

    @cached_property
    def console(self) -> Console:
        # Piped output is read by programs and pagers: no wrapping at rich's default 80 columns.
        width = None if self.env.stdout_isatty else 200
        return self.env.console(self.env.stdout, soft_wrap=True, width=width)

    @cached_property
    def err_console(self) -> Console:
        return self.env.console(self.env.stderr, soft_wrap=True)

    def print_json(self, data: Any) -> None:
        """``--json`` output: indented for a person at a terminal; compact when a program reads
        it (piped, as ``gh`` does), which takes json's C encoder: the pure-Python one that
        ``indent`` needs spent a quarter second on a listing of 5,000 jobs."""
        indent = 2 if self.env.stdout_isatty else None
        self.env.stdout.write(json.dumps(data, indent=indent, default=str) + "\n")

    def out(self, text: str = "") -> None:
        """One line of text on stdout, as ``console.print(text, markup=False)`` prints it. A
        line rich would print as it is (after its emoji codes) is written here without it:
        building the console imports ~30 ms of rich that a one-line answer (`show`, `kill`,
        `run --detach`) does not need. Once the console is made (a table, a live view), every
        line goes through it, in its order."""
        line = None if "console" in self.__dict__ else plain_line(text)
        if line is None:
            self.console.print(text, markup=False)
            return
        self.env.stdout.write(line + "\n")
        self.env.stdout.flush()


def plain_line(text: str) -> str | None:
    """``text`` as ``Console(highlight=False, emoji=False, soft_wrap=True).print(text,
    markup=False)`` writes it (less the newline), or None where that takes rich itself: tabs
    (expanded), newlines and control characters (stripped). tests/test_lean_start.py checks the
    two agree."""
    if not text.isprintable():
        return None
    return text


def _no_host() -> ConfigError:
    return ConfigError(
        "no host given",
        hint="pass --host ALIAS (several: --host a,b or @FLEET), set REMOTEDL_HOST, or put "
        "host = \"ALIAS\" in remotedl.toml (try `remotedl sandbox up` for a local box called 'sandbox')",
    )
