"""One training run across several boxes: placement, the variables each node gets, starting
every node at once (all or nothing), and watching them as one run.

A multi-node run is N ordinary jobs, one per box, started together with the same commit and
told about each other through the environment (``node_env``): rank 0's box is the master;
``MASTER_ADDR`` is its address *as the other nodes reach it* (``node_addr`` in its
``[hosts.NAME]`` table, else the address ssh goes to), ``MASTER_PORT`` a port free on it
when the nodes' jobs start (picked after the push, outside its ephemeral port range:
``remotedl.ports``). An MPI-style hostfile (``ADDR slots=G`` per node) is written on
every node for DeepSpeed and mpirun.

Who ends the other nodes when one fails: the laptop that follows the run (``supervise``). The
boxes need not reach each other over SSH (only the master's port), and the laptop is the one
place that reaches every box; the failed node's job ends on its own, the others get the
``kill`` treatment (TERM, then KILL after the grace), so no rank waits forever on a
collective. A detached run is not watched: `remotedl logs -f RUN` watches it again.
"""

from __future__ import annotations

import json
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.errors import GpusBusy, RemotedlError, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.fleet import Candidate, Member
    from remotedl.schema import JobRecord
    from remotedl.ssh import Box
    from remotedl.top import BoxSample


@dataclass(frozen=True)
class Node:
    """One node of a run: its rank, its host alias, the address its peers reach it at."""

    rank: int
    host: str
    addr: str


@dataclass(frozen=True)
class NodePlan:
    """Where a run goes and what every node is told."""

    run_id: str
    nodes: list[Node]
    master_port: int
    gpus_per_node: int | None = None

    @property
    def master(self) -> Node:
        return self.nodes[0]

    def hostfile(self) -> str:
        """MPI-style: one ``ADDR slots=G`` line per node (DeepSpeed's and mpirun's format)."""
        slots = self.gpus_per_node or 1
        return "".join(f"{n.addr} slots={slots}\n" for n in self.nodes)

    def env(self, rank: int, hostfile: str | None = None) -> dict[str, str]:
        """The variables node ``rank`` gets: remotedl's own and the names torchrun, Accelerate
        and DeepSpeed read. ``WORLD_SIZE`` counts processes: nodes times GPUs per node (one
        process per GPU, as torchrun starts them), or the nodes for a CPU run."""
        n = len(self.nodes)
        out = {
            "REMOTEDL_RUN_ID": self.run_id,
            "REMOTEDL_NODE_RANK": str(rank),
            "REMOTEDL_NUM_NODES": str(n),
            "REMOTEDL_NODE_ADDRS": ",".join(x.addr for x in self.nodes),
            "REMOTEDL_MASTER_ADDR": self.master.addr,
            "REMOTEDL_MASTER_PORT": str(self.master_port),
            "MASTER_ADDR": self.master.addr,
            "MASTER_PORT": str(self.master_port),
            "NODE_RANK": str(rank),
            "NNODES": str(n),
            "WORLD_SIZE": str(n * (self.gpus_per_node or 1)),
        }
        # torchrun reads these for its flags (PET_ + the flag's name): `torchrun train.py`
        out.update(PET_NNODES=str(n), PET_NODE_RANK=str(rank), PET_MASTER_ADDR=self.master.addr,
                   PET_MASTER_PORT=str(self.master_port))  # fmt: skip
        if self.gpus_per_node:
            out["REMOTEDL_GPUS_PER_NODE"] = out["PET_NPROC_PER_NODE"] = str(self.gpus_per_node)
        if hostfile:
            out["REMOTEDL_HOSTFILE"] = hostfile
        return out


def new_run_id() -> str:
    return "run-" + time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def choose(samples: Sequence[BoxSample], nodes: int, *, count: int | None, cpu: bool) -> list[Candidate]:
    """``nodes`` distinct boxes for a run, the best by the fleet's placement rules (each with
    ``count`` free GPUs), in the order the hosts were given: the first is the master (with
    ``--host a,b``, ``a``). Raises ``GpusBusy`` when fewer boxes can take a node now."""
    from remotedl.fleet import place

    if nodes < 2:
        raise UsageError(f"--nodes {nodes}: a multi-node run has 2 nodes or more")
    if len(samples) < nodes:
        raise UsageError(
            f"--nodes {nodes} asks for {nodes} boxes and {plural(len(samples), 'box')} answered",
            hint="name more hosts with --host a,b or `hosts = [...]`",
        )
    try:
        picked = [c for c in place(samples, count=count, cpu=cpu) if not c.queue][:nodes]
    except GpusBusy:
        picked = []
    if len(picked) < nodes:
        free = ", ".join(c.host for c in picked) or "none"
        what = plural(count or 1, "free GPU") if not cpu else "room"
        raise GpusBusy(
            f"--nodes {nodes}: only {plural(len(picked), 'box')} of the fleet has {what} now ({free})",
            hint="`remotedl status` shows who holds the GPUs; run again later",
        )
    order = {x.host: i for i, x in enumerate(samples)}
    return sorted(picked, key=lambda c: order[c.host])


def peer_address(member: Member) -> str:
    """The address the other nodes reach this box at: its ``node_addr`` setting, else the
    address ssh goes to (fine on one network; a box behind a bastion or with a public name
    needs ``node_addr``)."""
    given = member.settings.get("node_addr")
    return str(given) if given else member.spec.hostname


# A port free on the master, on every address (as the rendezvous binds it): remotedl.ports.
_FREE_PORT = """\
"$1" -c "$2"
"""

# The run's hostfile under ~/.remotedl/runs (private), its path said back.
_HOSTFILE = """\
d="$HOME/.remotedl/runs"
mkdir -p "$d" && chmod 700 "$d" && cat > "$d/$1.hostfile" && printf '%s\\n' "$d/$1.hostfile"
"""


def free_port(box: Box, python: str) -> int:
    """The run's master port, picked on the master (``remotedl.ports``: outside its ephemeral
    range), just before the nodes' jobs start."""
    from remotedl.ports import PICK_PORT

    r = box.run(_FREE_PORT, python, PICK_PORT, check=False)
    text = r.stdout.strip()
    if r.exit_code != 0 or not text.isdigit():
        raise RemotedlError(
            f"could not find a free port on {box.spec.alias} for the run's master: "
            f"{(r.stderr.strip() or text or '?')[:200]}",
            hint="check that `python` (the setting) runs there",
        )
    return int(text)


def write_hostfile(box: Box, run_id: str, text: str) -> str:
    r = box.run(_HOSTFILE, run_id, stdin=text, check=False)
    path = r.stdout.strip()
    if r.exit_code != 0 or not path:
        raise RemotedlError(
            f"could not write the run's hostfile on {box.spec.alias}: {r.stderr.strip()[:200]}"
        )
    return path


# ------------------------------------------------------------------ a run's jobs


@dataclass
class NodeJob:
    """One node's job once started (``job_id`` on ``host``), and how it ended."""

    rank: int
    host: str
    job_id: int
    status: str = "running"
    exit_code: int | None = None
    commit: str | None = None
    error: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.host}:{self.job_id}"


@dataclass
class Run:
    """A multi-node run: its plan and its nodes' jobs; what the laptop keeps of it."""

    run_id: str
    name: str
    command: str
    master_addr: str
    master_port: int
    nodes: list[NodeJob] = field(default_factory=list)
    started: float = 0.0
    skew: float = 0.0  # seconds between the first and the last node's start
    failed_rank: int | None = None

    @property
    def exit_code(self) -> int:
        """0 when every node succeeded; else the first failed node's exit status (1 when it
        had none: lost, killed)."""
        if self.failed_rank is not None:
            bad = self.nodes[self.failed_rank]
            return bad.exit_code if bad.exit_code not in (None, 0) else 1
        if all(n.status == "succeeded" for n in self.nodes):
            return 0
        return next((n.exit_code or 1 for n in self.nodes if n.status != "succeeded"), 1)

    @property
    def state(self) -> str:
        """``failed (node 1 exit 3)``, ``succeeded``, ``running``, ``killed`` ..."""
        if self.failed_rank is not None:
            bad = self.nodes[self.failed_rank]
            why = f"exit {bad.exit_code}" if bad.exit_code is not None else bad.status
            return f"failed (node {bad.rank} {why})"
        statuses = {n.status for n in self.nodes}
        return (
            statuses.pop()
            if len(statuses) == 1
            else ", ".join(f"node {n.rank} {n.status}" for n in self.nodes)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state, "exit_code": self.exit_code}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        nodes = [NodeJob(**n) for n in d.get("nodes") or []]
        names = ("run_id", "name", "command", "master_addr", "master_port", "started", "skew")
        keep = {k: d[k] for k in names if k in d}
        return cls(**keep, nodes=nodes, failed_rank=d.get("failed_rank"))


def runs_dir(state_dir: Path) -> Path:
    """Where the laptop keeps its runs (``Environment.state_dir``/runs)."""
    return state_dir / "runs"


def save_run(state_dir: Path, run: Run) -> Path:
    d = runs_dir(state_dir)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{run.run_id}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run.to_dict(), indent=1))
    tmp.replace(path)
    return path


def load_run(state_dir: Path, ref: str | None) -> Run | None:
    """A run by id (``None``: the latest one); None when there is none."""
    d = runs_dir(state_dir)
    if ref is not None:
        path = d / f"{ref}.json"
        if not path.is_file():
            return None
    else:
        found = sorted(d.glob("run-*.json")) if d.is_dir() else []
        if not found:
            return None
        path = found[-1]
    return Run.from_dict(json.loads(path.read_text()))


def start_all(
    nodes: Sequence[Node],
    start_one: Callable[[Node], JobRecord],
    stop_one: Callable[[NodeJob], None],
) -> tuple[list[NodeJob], float]:
    """Start every node's job at once (one thread each). All or nothing: when any node fails
    to start (its GPUs were taken, it is down), the nodes that started are stopped, which
    releases their GPUs, and the first error is raised. Returns the jobs and the start skew
    (seconds between the first and the last node's job answering as started)."""
    from remotedl.fleet import run_on_hosts

    by_host = {n.host: n for n in nodes}
    at: dict[str, float] = {}

    def one(host: str) -> JobRecord:
        rec = start_one(by_host[host])
        at[host] = time.monotonic()
        return rec

    result = run_on_hosts([n.host for n in nodes], one)
    started = [
        NodeJob(by_host[host].rank, host, rec.id, status=rec.status, commit=rec.git_commit)
        for host, rec in result.values()
    ]
    if result.failed:
        for job in started:
            try:
                stop_one(job)
            except RemotedlError:
                pass  # said by the caller's error; the box's own record shows the job
        first = result.failed[0]
        assert first.error is not None
        first.error.message = f"node {by_host[first.host].rank} ({first.host}): {first.error.message}"
        raise first.error
    times = sorted(at.values())
    return sorted(started, key=lambda j: j.rank), (times[-1] - times[0]) if times else 0.0


def supervise(
    run: Run,
    follow_one: Callable[[NodeJob], JobRecord],
    stop_one: Callable[[NodeJob], None],
    on_failure: Callable[[NodeJob], None] | None = None,
) -> Run:
    """Follow every node's job to its end (``follow_one``, one thread each). The first node
    that fails (a non-zero exit, lost, killed) has the others stopped (``stop_one``: TERM,
    then KILL after the grace) so no rank waits on a collective forever; the run is failed
    with that node's status. Returns ``run`` with every node's end filled in."""
    done: queue.Queue[tuple[NodeJob, JobRecord | None, str | None]] = queue.Queue()

    def watch(job: NodeJob) -> None:
        try:
            done.put((job, follow_one(job), None))
        except RemotedlError as e:
            done.put((job, None, e.message))
        except Exception as e:  # a bug: said as this node's error, the others still watched
            done.put((job, None, f"internal error: {type(e).__name__}: {e}"))

    for job in run.nodes:
        threading.Thread(target=watch, args=(job,), daemon=True, name=f"node-{job.rank}").start()
    left = len(run.nodes)
    while left:
        job, rec, error = done.get()
        left -= 1
        if rec is not None:
            job.status, job.exit_code = rec.status, rec.exit_code
        else:
            job.status, job.error = "unknown", error
        if job.status != "succeeded" and run.failed_rank is None:
            run.failed_rank = job.rank
            if on_failure is not None:
                on_failure(job)
            for other in run.nodes:
                if other is not job and other.status in ("running", "starting", "queued"):
                    try:
                        stop_one(other)
                    except RemotedlError:
                        pass  # ended meanwhile, or out of reach: its watcher says how it ended
    return run


# ------------------------------------------------------------------ doctor --nodes

# On the master: listen on the address its peers use, say the port, then go on in the
# background (stdout closed, so the ssh session ends) answering up to $3 peers for $2 seconds.
_LISTEN = """\
"$1" -c 'import os, socket, sys
addr, wait, peers = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
try:
    s.bind((addr, 0))
except OSError as e:
    print("bind", e.strerror or e)
    sys.exit(0)
s.listen(peers)
print("port", s.getsockname()[1], flush=True)
if os.fork():
    os._exit(0)
os.setsid()
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
s.settimeout(wait)
try:
    for _ in range(peers):
        c, _ = s.accept()
        c.sendall(b"remotedl-node-check\\n")
        c.close()
except OSError:
    pass' "$2" "$3" "$4"
"""

# On a peer: connect to the master's address and port; the listener's greeting proves it is ours.
_CONNECT = """\
"$1" -c 'import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(float(sys.argv[3]))
    print("ok" if c.recv(64).startswith(b"remotedl-node-check") else "other")
except OSError as e:
    print("error", type(e).__name__, e.strerror or e)' "$2" "$3" "$4"
"""


@dataclass(frozen=True)
class NodeReach:
    """Whether ``host`` reaches the master (``master`` at ``addr``:``port``)."""

    host: str
    master: str
    addr: str
    port: int | None
    ok: bool
    detail: str


def check_nodes(members: Sequence[Member], *, timeout: float = 5.0) -> list[NodeReach]:
    """`doctor --nodes`: the first member is the master. It listens on a free port of the
    address its peers use (``peer_address``); every other member connects there at once.
    A master that does not have that address says so and no peer tries."""
    from remotedl.fleet import run_on_hosts

    master, peers = members[0], list(members[1:])
    addr = peer_address(master)
    wait = timeout * 2 + 10
    r = master.box().run(_LISTEN, master.python, addr, f"{wait:g}", str(len(peers)), check=False)
    words = r.stdout.split(maxsplit=1)
    if r.exit_code != 0 or not words or words[0] != "port":
        said = words[1].strip() if words and words[0] == "bind" else (r.stderr.strip() or r.stdout.strip())
        detail = (
            f"{master.name} cannot listen on {addr} ({said[:200]}): is {addr} an address of {master.name}?"
        )
        return [NodeReach(p.name, master.name, addr, None, False, detail) for p in peers]
    port = int(words[1])
    by_name = {p.name: p for p in peers}

    def one(name: str) -> NodeReach:
        p = by_name[name]
        got = p.box().run(_CONNECT, p.python, addr, str(port), f"{timeout:g}", check=False).stdout.strip()
        if got == "ok":
            return NodeReach(name, master.name, addr, port, True, f"reaches {master.name} at {addr}:{port}")
        if got == "other":
            why = "something else answered there"
        elif got.startswith("error"):
            why = got.split(maxsplit=1)[1] if " " in got else got
        else:
            why = got or "no answer from python"
        return NodeReach(
            name, master.name, addr, port, False, f"cannot reach {master.name} at {addr}:{port}: {why}"
        )

    result = run_on_hosts(list(by_name), one)
    out = []
    for x in result.results:
        if x.value is not None:
            out.append(x.value)
        else:
            out.append(NodeReach(x.host, master.name, addr, port, False, f"not checked: {x.error}"))
    return out


# ------------------------------------------------------------------ one row per run

_RUN_NAME = re.compile(r"^(?P<name>.*) \[(?P<run>run-[0-9]{8}-[0-9]{6}-[0-9a-f]{4}) node (?P<rank>[0-9]+)\]$")


def job_name(name: str, run_id: str, rank: int) -> str:
    """A node's job's name: the run's name, its id and the node's rank (``jobs`` groups by it)."""
    return f"{name} [{run_id} node {rank}]"


@dataclass
class RunRow:
    """The jobs of one run as the fleet's boxes list them: (host, record) per node, by rank."""

    run_id: str
    name: str
    nodes: list[tuple[int, str, JobRecord]]

    @property
    def state(self) -> str:
        for rank, _, rec in self.nodes:
            if rec.status in ("failed", "lost"):
                why = f"exit {rec.exit_code}" if rec.exit_code is not None else rec.status
                return f"failed (node {rank} {why})"
        states = {rec.status for _, _, rec in self.nodes}
        return states.pop() if len(states) == 1 else "mixed"

    @property
    def exit_code(self) -> int | None:
        codes = [rec.exit_code for _, _, rec in self.nodes]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)


def group_runs(rows: Sequence[tuple[str, JobRecord]]) -> tuple[list[RunRow], list[tuple[str, JobRecord]]]:
    """Split a fleet's jobs into multi-node runs (one ``RunRow`` each, nodes by rank) and the
    other jobs, in the order given."""
    runs: dict[str, RunRow] = {}
    rest: list[tuple[str, JobRecord]] = []
    for host, rec in rows:
        m = _RUN_NAME.match(rec.name or "")
        if m is None:
            rest.append((host, rec))
            continue
        row = runs.setdefault(m["run"], RunRow(m["run"], m["name"], []))
        row.nodes.append((int(m["rank"]), host, rec))
    for row in runs.values():
        row.nodes.sort(key=lambda n: n[0])
    return list(runs.values()), rest
