"""Several hosts at once: a parallel map over hosts with a result per host.

A fleet is a list of host aliases (``--host a,b``, ``hosts = [...]``, ``--host @lab``). Each
host is resolved with its own settings (``Settings.for_host``: its ``[hosts.NAME]`` table) and
reached over its own OpenSSH master connection, so hosts never wait for each other. One thread
per host runs the same function; a host that is down or refuses gives its error in its own
``HostResult`` and the others still answer. The CLI renders the rows and exits non-zero when
any host failed (``FleetResult.exit_code``).

The Slurm backend and run placement build on ``Member`` (one host with its settings) and
``run_on_hosts``; a member's ``scheduler`` setting says which kind of host it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from remotedl.config import Settings
from remotedl.env import Environment
from remotedl.errors import ExitCode, RemotedlError

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.ssh import Box, HostSpec
    from remotedl.status import BoxStatus

log = logging.getLogger("remotedl.fleet")

T = TypeVar("T")
U = TypeVar("U")

MAX_WORKERS = 64  # threads at once; each mostly waits on its own ssh process


@dataclass
class HostResult(Generic[T]):
    """What one host gave: a value, or the error it met (never both)."""

    host: str
    value: T | None = None
    error: RemotedlError | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def error_dict(self) -> dict[str, Any] | None:
        if self.error is None:
            return None
        return {
            "error": self.error.message,
            "hint": self.error.hint,
            "exit_code": int(self.error.exit_code),
        }


@dataclass
class FleetResult(Generic[T]):
    """Every host's result, in the order the hosts were given."""

    results: list[HostResult[T]] = field(default_factory=list)

    @property
    def ok(self) -> list[HostResult[T]]:
        return [r for r in self.results if r.error is None]

    @property
    def failed(self) -> list[HostResult[T]]:
        return [r for r in self.results if r.error is not None]

    def values(self) -> list[tuple[str, T]]:
        """(host, value) of every host that answered."""
        return [(r.host, r.value) for r in self.results if r.error is None and r.value is not None]

    @property
    def exit_code(self) -> int:
        """0 when every host answered; else the failures' exit code when they share one (4: all
        unreachable), else 1."""
        codes = {int(r.error.exit_code) for r in self.results if r.error is not None}
        if not codes:
            return int(ExitCode.OK)
        return codes.pop() if len(codes) == 1 else int(ExitCode.ERROR)


def run_on_hosts(
    hosts: Sequence[str],
    fn: Callable[[str], T],
    *,
    workers: int | None = None,
    on_result: Callable[[HostResult[T]], None] | None = None,
) -> FleetResult[T]:
    """``fn(host)`` for every host at once, one thread each. A ``RemotedlError`` becomes that
    host's result; any other exception is a bug and is raised once every host is done.
    ``on_result`` sees each host's result as it comes (from the worker thread)."""
    unexpected: list[BaseException] = []

    def one(host: str) -> HostResult[T]:
        t0 = time.perf_counter()
        try:
            result: HostResult[T] = HostResult(host, value=fn(host))
        except RemotedlError as e:
            log.debug("host %s failed: %s", host, e, exc_info=True)
            result = HostResult(host, error=e)
        except Exception as e:
            unexpected.append(e)
            result = HostResult(host, error=RemotedlError(f"internal error: {type(e).__name__}: {e}"))
        result.seconds = time.perf_counter() - t0
        if on_result is not None:
            on_result(result)
        return result

    if len(hosts) == 1:  # no thread for one host: tracebacks and Ctrl-C stay plain
        results = [one(hosts[0])]
    else:
        pool = ThreadPoolExecutor(max_workers=min(workers or MAX_WORKERS, len(hosts)) or 1)
        try:
            results = list(pool.map(one, hosts))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    if unexpected:
        raise unexpected[0]
    return FleetResult(results)


# ------------------------------------------------------------------ members


@dataclass(frozen=True)
class Member:
    """One host of a fleet, resolved: its name, its effective settings and its spec."""

    name: str
    settings: Settings
    spec: HostSpec

    @property
    def remote_dir(self) -> str:
        return self.settings.remote_dir

    @property
    def python(self) -> str:
        return str(self.settings.get("python"))

    @property
    def scheduler(self) -> str:
        """ "box" (the agent and tmux) or "slurm" (a login node: sbatch)."""
        return str(self.settings.get("scheduler") or "box")

    def box(self) -> Box:
        from remotedl.ssh import Box

        return Box(self.spec)

    def client(self) -> AgentClient:
        from remotedl.agent.client import AgentClient

        return AgentClient(self.spec, python=self.python)


@dataclass(frozen=True)
class Reach:
    """How to reach hosts beyond their ssh config: the --user, --port and --identity flags."""

    user: str | None = None
    port: int | None = None
    identity: str | None = None


def resolve_member(env: Environment, settings: Settings, name: str, reach: Reach = Reach()) -> Member:
    """One host with its own settings (its [hosts.NAME] table: ssh_config, connect_timeout,
    remote_dir, ...) resolved through its ssh config."""
    from remotedl.ssh import resolve_host

    mine = settings.for_host(name)
    spec = resolve_host(
        env,
        name,
        ssh_config=mine.get("ssh_config"),
        user=reach.user,
        port=reach.port,
        identity=reach.identity,
        connect_timeout=float(mine.get("connect_timeout")),
    )
    return Member(name, mine, spec)


@dataclass
class Fleet:
    """The hosts a command works on, with what it takes to reach each."""

    env: Environment
    settings: Settings
    hosts: list[str]
    reach: Reach = field(default_factory=Reach)

    def member(self, name: str) -> Member:
        return resolve_member(self.env, self.settings, name, self.reach)

    def map(
        self,
        fn: Callable[[Member], U],
        *,
        on_result: Callable[[HostResult[U]], None] | None = None,
    ) -> FleetResult[U]:
        """Resolve each host and run ``fn`` on it, every host at once; resolution errors
        (a bad ssh config) are that host's result too."""
        return run_on_hosts(self.hosts, lambda name: fn(self.member(name)), on_result=on_result)


# ------------------------------------------------------------------ status


def fleet_status(fleet: Fleet) -> FleetResult[BoxStatus]:
    """``status`` of every box at once (one exec each, as on one box)."""
    from remotedl.status import box_status

    return fleet.map(lambda m: box_status(m.box(), m.remote_dir))
