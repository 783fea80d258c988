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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from remotedl import gpus as gpumod
from remotedl.config import Settings
from remotedl.env import Environment
from remotedl.errors import ExitCode, GpusBusy, RemotedlError, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.cloud import CloudHost
    from remotedl.ssh import Box, HostSpec
    from remotedl.status import BoxStatus
    from remotedl.top import BoxSample

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
        from concurrent.futures import ThreadPoolExecutor  # only with several hosts

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
    # Set when the host is a cloud VM: its provider and its state when resolved.
    cloud: CloudHost | None = None

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

        self.check_running()
        return Box(self.spec, resident=True, python=self.python)

    def check_running(self) -> None:
        """A cloud VM that is not running is said so (with the command that starts it), not
        met as a connection error."""
        if self.cloud is None:
            return
        if self.cloud.error is not None:
            raise self.cloud.error
        if not self.cloud.status.running:
            from remotedl.cloud import VMNotRunning

            raise VMNotRunning(
                f"{self.name} is a cloud VM and it is {self.cloud.status.state} ({self.cloud.vm.name})",
                hint=f"start it with `remotedl up {self.name}`",
            )

    def client(self) -> AgentClient:
        from remotedl.agent.client import AgentClient

        self.check_running()
        return AgentClient(self.spec, python=self.python, adopt=self.settings.adopt_request())


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
    # A cloud VM is known as one here, once: its state, and the address its cloud gives it now.
    # A plain box (no `cloud` setting) never imports the cloud modules.
    if not mine.get("cloud"):
        return Member(name, mine, spec, None)
    from remotedl.cloud import cloud_host, with_address

    cloud = cloud_host(name, mine.get, env.environ)
    if cloud is not None and cloud.address and cloud.vm.address != "ssh":
        spec = with_address(spec, cloud.address, f"cloud ({cloud.vm.name}, {cloud.vm.address} IP)")
    return Member(name, mine, spec, cloud)


@dataclass
class Fleet:
    """The hosts a command works on, with what it takes to reach each."""

    env: Environment
    settings: Settings
    hosts: list[str]
    reach: Reach = field(default_factory=Reach)
    # Hosts resolved already (``ssh -G`` runs once per host per command); may be shared.
    resolved: dict[str, Member] = field(default_factory=dict)

    def member(self, name: str) -> Member:
        found = self.resolved.get(name)
        if found is None:
            found = self.resolved[name] = resolve_member(self.env, self.settings, name, self.reach)
        return found

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


# ------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Candidate:
    """A box a job may go to, in the order to try: ``gpus`` are free there now (the agent picks
    and claims them again under the box's lock), or ``queue`` (nothing free anywhere: wait in
    the box's queue)."""

    host: str
    gpus: list[int]
    queue: bool
    why: str


def fleet_samples(fleet: Fleet) -> FleetResult[BoxSample]:
    """One sample of every box at once: GPUs, their holders, active jobs, load."""
    from remotedl.top import sample_once

    return fleet.map(lambda m: sample_once(m.name, m.box()))


def place(
    samples: Sequence[BoxSample], *, count: int | None = None, queue: bool = False, cpu: bool = False
) -> list[Candidate]:
    """The boxes to try for a job, best first, by the rules a box uses for its own GPUs: a GPU
    is free when no remotedl job holds it and no foreign compute process runs on it, and the
    least used memory wins. Boxes with ``count`` free GPUs come first (least memory used on
    those GPUs, then the order given); with ``queue``, then every box that has ``count`` GPUs
    at all, shortest queue first. A CPU job (``cpu``, or no box with a GPU and no ``count``)
    goes to the least loaded box. Raises when no box could ever run it, or (without
    ``queue``) none can now."""
    if not samples:
        raise UsageError("no box of the fleet answered: nowhere to run the job")
    order = {s.host: i for i, s in enumerate(samples)}
    if cpu or (count is None and not any(s.gpus for s in samples)):
        by_load = sorted(samples, key=lambda s: (_load(s), order[s.host]))
        return [Candidate(s.host, [], False, f"no GPU asked; load {_load(s):.2f}") for s in by_load]
    want = count or 1
    biggest = max(samples, key=lambda s: len(s.gpus))
    if want > len(biggest.gpus):
        raise UsageError(
            f"{plural(want, 'GPU')} asked for, more than any box of the fleet has "
            f"(the most: {len(biggest.gpus)} on {biggest.host})",
            hint=f"ask for at most {len(biggest.gpus)}" if biggest.gpus else "run with --cpu",
        )
    free: list[tuple[tuple[int, int, int], Candidate]] = []
    for s in samples:
        picked = gpumod.pick_free_gpus(s.gpus, s.held_by, want)
        if picked is None:
            continue
        used = sum(g.memory_used_mib or 0 for g in s.gpus if g.index in picked)
        nfree = sum(1 for g in s.gpus if g.index not in s.held_by and not g.processes)
        gpu_words = plural(len(picked), "GPU")
        why = f"{gpu_words} free ({','.join(map(str, picked))}), {used} MiB used on them"
        free.append(((used, -nfree, order[s.host]), Candidate(s.host, picked, False, why)))
    out = [c for _, c in sorted(free, key=lambda x: x[0])]
    if queue:
        able = [s for s in samples if len(s.gpus) >= want]
        for s in sorted(able, key=lambda s: (_queued(s), _running(s), order[s.host])):
            why = f"nothing free; its queue is the shortest ({_queued(s)} waiting)"
            out.append(Candidate(s.host, [], True, why))
    if not out:
        busy = "; ".join(_busy_words(s) for s in samples)
        raise GpusBusy(
            f"no box of the fleet has {plural(want, 'free GPU')}: {busy}",
            hint="wait on the box with the shortest queue with --queue",
        )
    return out


def _load(s: BoxSample) -> float:
    return s.load[0] if s.load else 0.0


def _queued(s: BoxSample) -> int:
    return sum(1 for j in s.jobs if j.status == "queued")


def _running(s: BoxSample) -> int:
    return sum(1 for j in s.jobs if j.status in ("running", "starting"))


def _busy_words(s: BoxSample) -> str:
    from remotedl.status import holder

    held = [f"GPU {g.index} {holder(s.held_by, g)[1]}" for g in s.gpus if holder(s.held_by, g)[0] != "free"]
    free = len(s.gpus) - len(held)
    return f"{s.host}: {free} of {len(s.gpus)} free" + (f" ({', '.join(held)})" if held else "")
