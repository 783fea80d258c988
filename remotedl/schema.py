"""What crosses the wire between the laptop and the box's agent: one definition, both sides.

Standard library only (it ships inside the agent, whose python may be as old as 3.10).
A job record is written by the agent under ``~/.remotedl/jobs/<id>.json`` and read back by
any laptop; ``JobRecord.from_dict`` checks every field's type, so a broken or hostile box
gives one clear error instead of a crash deep inside the CLI.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from remotedl.typecheck import SchemaError, field_checks, plain, run_checks, shape_plan, template

Status = Literal["queued", "starting", "running", "succeeded", "failed", "killed", "lost", "preempted"]
STATUSES: tuple[str, ...] = get_args(Status)
ACTIVE: tuple[Status, ...] = ("queued", "starting", "running")
ENDED: tuple[Status, ...] = ("succeeded", "failed", "killed", "lost", "preempted")

Op = Literal[
    "start",
    "runner",
    "list",
    "get",
    "kill",
    "logs",
    "gpus",
    "locate",
    "rm",
    "prune",
    "envsync",
    "intree",
    "notify",
    "slurm_watch",
    "autostop",
]
OPS: tuple[str, ...] = get_args(Op)

# Exit statuses of the agent's wrapper script (the agent itself exits 0, 2 or 3).
AGENT_MISSING = 97  # this agent version is not on the box yet: upload it
AGENT_NO_PYTHON = 127
AGENT_CANNOT_INSTALL = 96

MAX_REQUEST = 16 << 20

# A streaming request (logs, envsync) sends its stream on stdout and marked lines on stderr:
# ``@@remotedl-start {...}`` (where the stream starts, warnings), ``-state`` (a Slurm job's state
# as it changes), ``-end`` (the result) and ``-error`` (an error answer instead).
Mark = Literal["start", "state", "end", "error"]
MARKS: tuple[str, ...] = get_args(Mark)
MARK_PREFIX = "@@remotedl-"


def encode_mark(mark: Mark, value: dict[str, Any]) -> str:
    """One marked line (with its newline)."""
    return f"{MARK_PREFIX}{mark} {json.dumps(value)}\n"


def parse_mark(line: str) -> tuple[str, dict[str, Any]] | None:
    """(mark, value) of a marked line; None for any other line, or a mark whose value is not
    a JSON object."""
    if not line.startswith(MARK_PREFIX):
        return None
    mark, _, rest = line[len(MARK_PREFIX) :].partition(" ")
    if mark not in MARKS:
        return None
    try:
        value = json.loads(rest)
    except ValueError:
        return None
    return (mark, value) if isinstance(value, dict) else None



@dataclass
class JobRecord:
    id: int
    name: str
    command: str
    cwd: str
    status: Status
    gpus: list[int] = field(default_factory=list)
    exit_code: int | None = None
    created: float | None = None
    started: float | None = None
    ended: float | None = None
    log: str = ""
    session: str = ""
    git_commit: str | None = None
    snapshot: bool = False
    env_keys: list[str] = field(default_factory=list)
    error: str | None = None
    want: dict[str, Any] = field(default_factory=dict)
    runner_pid: int | None = None
    pid: int | None = None
    pgid: int | None = None
    # Added with per-job checkouts (all optional: records of older agents lack them).
    remote_dir: str | None = None  # the project's work tree on the box (absolute): its identity
    workdir: str | None = None  # the job's own checkout (<remote_dir>/.remotedl/jobs/<id>), or None
    isolated: bool = False  # ran in its own checkout (False: in remote_dir itself)
    host: str | None = None  # the box's hostname
    git_head: str | None = None  # the commit a snapshot was made on top of
    snapshot_files: list[str] = field(default_factory=list)  # files the snapshot changed vs git_head
    links: list[str] = field(default_factory=list)  # data/shared paths linked into workdir
    environment: dict[str, Any] = field(default_factory=dict)  # python, torch, venv/conda/env_setup
    starter_pid: int | None = None  # the agent process starting the job (status "starting")
    ready: bool = True  # its checkout is made (False while the starter makes it: the runner waits)
    boot_id: str | None = None  # the box's boot when the job started: a reboot means lost
    umask: int | None = None  # the job's umask: the user's login one, not the tmux server's
    mark: str | None = None  # REMOTEDL_JOB_MARK in its processes' environment (leftovers found by it)
    # A job runs until the processes its main process left behind are gone too.
    main_exit: int | None = None  # its main process's exit status, once that exited
    leftovers: int = 0  # while running: how many of its processes are left after it
    # Job events (agent/events.py).
    notify: list[str] = field(default_factory=list)  # notification URLs, masked
    notifications: list[dict[str, Any]] = field(default_factory=list)  # event, url, ok, error, at
    stall_after: float | None = None  # seconds; None: no stall detection
    stalled: dict[str, Any] | None = None  # {since, reason} while it is stalled (still running)
    stalls: int = 0  # how many times it stalled
    events_sent: list[str] = field(default_factory=list)  # events whose notification went out
    event_claims: dict[str, Any] = field(default_factory=dict)  # event -> pid sending it now
    # A Slurm login node's jobs (scheduler "slurm"): a batch job; its state is Slurm's.
    scheduler: str = "box"  # box (tmux on the box) or slurm (sbatch on a login node)
    slurm_id: str | None = None
    slurm_state: str | None = None  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT...
    slurm_reason: str | None = None  # why it waits: Resources, Priority...
    node: str | None = None  # the node(s) it runs on, as Slurm names them
    control_dir: str | None = None  # the batch script and its records, on the shared filesystem
    # A job in a container image (the ``container`` runtime: tmux, the runner runs `docker run`).
    image: str | None = None  # as asked for: a tag, or name@digest
    image_digest: str | None = None  # what ran: its registry digest (name@sha256:...), else its id
    engine: str | None = None  # the engine's program on the box (docker, podman)
    container: str | None = None  # the container's name (remotedl-ID-MARK)
    container_gpus: str | None = None  # how GPUs enter it: nvidia, cdi, devices, none
    container_args: list[str] = field(default_factory=list)  # the user's words for `docker run`
    setup_cmd: str | None = None  # run inside the container before the command
    # Outputs home (issue 28): what the job produces that belongs on a laptop of its project
    # (paths relative to its directory), and the trackers' variables its runner sets.
    outputs: list[str] = field(default_factory=list)
    project_id: str | None = None  # the project's identity (its root commit): laptops know theirs by it
    trackers_dir: str | None = None  # the job's own directory W&B and MLflow write in (absolute)
    trackers: dict[str, str] = field(default_factory=dict)  # WANDB_*/MLFLOW_* as the job got them

    @classmethod
    def from_dict(cls, data: Any) -> JobRecord:
        """A record from JSON data, every known field type-checked; unknown fields ignored
        (a newer agent may add some)."""
        return cls(**cls.check_dict(data))

    @classmethod
    def check_dict(cls, data: Any) -> dict[str, Any]:
        """The known fields of JSON data, type-checked (what ``from_dict`` builds the record of;
        the agent checks records it reads with this alone)."""
        if not isinstance(data, dict):
            raise SchemaError(f"a job record must be an object, not {type(data).__name__}")
        plan = shape_plan(cls, data)
        values = dict(data)
        for name in plan.unknown:
            del values[name]
        run_checks(plan, data, values)
        return values

    @classmethod
    def json_dict(cls, data: Any) -> dict[str, Any]:
        """``from_dict(data).to_dict()`` without building the record: a ``jobs --all --json``
        of thousands prints records it never uses as objects. Every field in order, the
        defaults of those missing (new lists and objects: nothing shared between records)."""
        if not isinstance(data, dict):
            raise SchemaError(f"a job record must be an object, not {type(data).__name__}")
        plan = shape_plan(cls, data)
        # The defaults in field order, overwritten by the record's values (an existing key
        # keeps its place): the merge runs in C; what it brought that is not a field goes.
        out = {**template(cls), **data}
        for name in plan.unknown:
            del out[name]
        for name, make in plan.fresh:
            out[name] = make()
        run_checks(plan, data, out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON data (a copy: lists and objects are new; ``asdict`` deep-copies
        each value through ``copy.deepcopy``, ~0.15 ms a record, which a listing of thousands
        pays)."""
        return {name: plain(getattr(self, name)) for name, _, _, _ in field_checks(type(self))}

    @property
    def duration(self) -> float | None:
        import time

        if not self.started:
            return None
        return (self.ended or time.time()) - self.started

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def project_dir(self) -> str:
        """The project's work tree on the box (older records only knew ``cwd``)."""
        return self.remote_dir or self.cwd

    @property
    def state(self) -> str:
        """The status in words: ``failed (exit 3)``; the others as they are. A Slurm job's in
        Slurm's words: ``PENDING (Resources)``, ``RUNNING on node1``, ``FAILED (exit 3)``, and
        ``RUNNING on node1, stalled``."""
        if self.scheduler == "slurm" and self.slurm_state:
            words = slurm_words(self.slurm_state, self.slurm_reason, self.node, self.exit_code)
            return f"{words}, stalled" if self.status == "running" and self.stalled else words
        if self.status == "failed" and self.exit_code is not None:
            return f"failed (exit {self.exit_code})"
        if self.status == "running" and self.stalled:
            return "stalled"
        if self.status == "running" and self.main_exit is not None and self.leftovers:
            return outlived_words(self.main_exit, self.leftovers)
        return self.status



# ------------------------------------------------------------------ requests
#
# One JSON object on the agent's stdin per request. The laptop builds them from these classes;
# the agent checks what it reads with the same checker as records (``check_request``), so a
# field of the wrong type is one clear protocol error, not a crash deep in a handler. Unknown
# fields are ignored (a newer laptop may send some); every field but a few has a default.


@dataclass
class Request:
    """A request's fields, ``op`` among them, are declared by each kind of request; ``adopt``
    goes with any of them."""

    WHAT = "request"
    # With the default remote_dir, on every request: the box keeps a tree this project has
    # under the older, folder-named default ({dir, id, legacy}: remotedl.treeid.adopt_tree),
    # before the op runs.
    adopt: dict[str, str] | None = field(default=None, kw_only=True)

    @classmethod
    def check_dict(cls, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise SchemaError(f"a request must be an object, not {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, required, check, where in field_checks(cls):
            if name not in data:
                if required:
                    raise SchemaError(f"request without '{name}'")
                continue
            values[name] = check(data[name], where)
        return values

    def to_dict(self) -> dict[str, Any]:
        """The request as JSON data, ``op`` first."""
        fields = {name: plain(getattr(self, name)) for name, _, _, _ in field_checks(type(self))}
        return {"op": fields.pop("op"), **fields}


JobRef = int | str | None  # an id, a name, or None/"last": the project's latest


@dataclass
class StartRequest(Request):
    command: str
    op: Op = "start"
    remote_dir: str = ""
    script: str | None = None
    gpus: list[int] | str | None = "auto"  # indices, "auto" or "none"
    count: int | None = None
    env: dict[str, Any] = field(default_factory=dict)  # --env values (secrets, maybe)
    name: str | None = None
    queue: bool = False
    force: bool = False
    git_commit: str | None = None
    git_head: str | None = None
    snapshot: bool = False
    snapshot_files: list[str] = field(default_factory=list)
    isolate: bool = True
    data: list[str] = field(default_factory=list)
    shared: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # conda, env_setup, setup_cmd
    env_check: bool = False
    notify: list[str] = field(default_factory=list)  # notification URLs (secrets)
    host_alias: str | None = None
    stall_after: float | None = None
    scheduler: str | None = None  # "slurm": a batch job on a login node
    slurm: dict[str, Any] | None = None
    image: str | None = None  # run the command inside this container image
    container: dict[str, Any] | None = None  # engine, gpus (nvidia, cdi, devices, none), args
    outputs: list[str] = field(default_factory=list)  # relative to the job's directory
    project_id: str | None = None  # the project's identity (snapshot.project_identity)
    trackers: bool = False  # W&B and MLflow write into the job's own directory


@dataclass
class ListRequest(Request):
    op: Op = "list"
    all: bool = False
    # Instead of the usual listing: the jobs of the project in ``project`` (its remote_dir)
    # that have outputs, and the jobs ``ids`` (outputs home: which ended, from any clone).
    project: str | None = None
    ids: list[int] = field(default_factory=list)
    after: int = 0  # of the project's jobs, only those with a larger id (the answer's ``upto``)


@dataclass
class GetRequest(Request):
    op: Op = "get"
    job: JobRef = None
    project: str | None = None


@dataclass
class KillRequest(Request):
    op: Op = "kill"
    job: JobRef = None
    project: str | None = None
    grace: float = 10.0


@dataclass
class LogsRequest(Request):
    op: Op = "logs"
    job: JobRef = None
    project: str | None = None
    follow: bool = False
    offset: int = 0
    lines: int | None = None


@dataclass
class GpusRequest(Request):
    op: Op = "gpus"


@dataclass
class LocateRequest(Request):
    op: Op = "locate"
    remote_dir: str = ""
    paths: list[str] = field(default_factory=list)
    job: JobRef = None
    tree: bool = False


@dataclass
class RmRequest(Request):
    op: Op = "rm"
    ids: list[int] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class PruneRequest(Request):
    op: Op = "prune"
    remote_dir: str = ""
    older_than: float = 0.0
    dry_run: bool = False


@dataclass
class EnvsyncRequest(Request):
    op: Op = "envsync"
    remote_dir: str = ""
    env: dict[str, Any] = field(default_factory=dict)
    force: bool = False


@dataclass
class IntreeRequest(Request):
    op: Op = "intree"
    remote_dir: str = ""


@dataclass
class RunnerRequest(Request):  # the agent's own: a job's runner, in its tmux session
    id: int
    op: Op = "runner"


@dataclass
class NotifyRequest(Request):  # the agent's own: a detached notification sender
    id: int
    op: Op = "notify"
    event: str = ""


@dataclass
class SlurmWatchRequest(Request):  # the agent's own: the login node's Slurm watcher
    op: Op = "slurm_watch"


@dataclass
class AutostopRequest(Request):
    """``set`` (``config``: the box's autostop settings, notification URLs among them), ``show``,
    ``resume`` (after a start: the settings the box had, its watcher started again),
    ``preempt`` (what the watcher does when the cloud takes a spot VM back: the jobs get their
    signal and end as preempted), or the agent's own ``watch`` (the detached watcher)."""

    op: Op = "autostop"
    action: Literal["set", "show", "resume", "watch", "preempt"] = "show"
    config: dict[str, Any] | None = None
    notice: str | None = None  # preempt: the cloud's words


REQUESTS: dict[str, type[Request]] = {
    "start": StartRequest,
    "runner": RunnerRequest,
    "list": ListRequest,
    "get": GetRequest,
    "kill": KillRequest,
    "logs": LogsRequest,
    "gpus": GpusRequest,
    "locate": LocateRequest,
    "rm": RmRequest,
    "prune": PruneRequest,
    "envsync": EnvsyncRequest,
    "intree": IntreeRequest,
    "notify": NotifyRequest,
    "slurm_watch": SlurmWatchRequest,
    "autostop": AutostopRequest,
}


def check_request(data: Any) -> dict[str, Any]:
    """A request read on the box: its op known and every known field of the right type (the
    data itself is returned, unknown fields kept). Raises SchemaError naming the field, never
    its value (a request may hold secrets)."""
    if not isinstance(data, dict) or data.get("op") not in REQUESTS:
        raise SchemaError("not a request")
    REQUESTS[str(data["op"])].check_dict(data)
    return data


def request_from_dict(data: Any) -> Request:
    """A request read on the box, as the typed object of its op (``StartRequest``, ...): checked
    as ``check_request`` checks it, unknown fields dropped. The handlers read its attributes,
    so a misspelt field is a type error, not a silent ``None``."""
    if not isinstance(data, dict) or data.get("op") not in REQUESTS:
        raise SchemaError("not a request")
    cls = REQUESTS[str(data["op"])]
    return cls(**cls.check_dict(data))


def outlived_words(main_exit: int, leftovers: int) -> str:
    """A running job whose main process exited while processes it started still run."""
    return f"running (main process exited {main_exit}, {leftovers} process{'es' * (leftovers != 1)} left)"


def slurm_words(state: str, reason: str | None, node: str | None, exit_code: int | None) -> str:
    """A Slurm job's state as ``jobs`` shows it."""
    if state in ("PENDING", "CONFIGURING", "REQUEUED") and reason and reason != "None":
        return f"{state} ({reason})"
    if state in ("RUNNING", "COMPLETING") and node:
        return f"{state} on {node}"
    if state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL") and exit_code:
        return f"{state} (exit {exit_code})"
    if state == "UNKNOWN" and reason:
        return f"UNKNOWN ({reason})"
    return state


def job_holders(records: list[JobRecord]) -> dict[int, str]:
    """GPU index -> the job holding it, in words: running (or starting) jobs' GPUs."""
    held: dict[int, str] = {}
    for r in records:
        if r.status in ("running", "starting"):
            for g in r.gpus:
                held[g] = f"job {r.id} ({r.name})"
    return held


MAX_DEPTH = 64  # levels of arrays and objects an answer may have


def decode_answer(body: bytes) -> dict[str, Any]:
    """The agent's one JSON answer, refused when nested more than ``MAX_DEPTH`` levels: code
    that walks what it holds (copies, renders) recurses per level. json's parser recurses too:
    a hostile nesting deeper than the interpreter's recursion limit stops it with
    RecursionError, refused the same way."""
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        raise SchemaError("an empty answer")
    try:
        answer = json.loads(text)
    except RecursionError:
        raise SchemaError("an answer nested too deeply") from None
    except ValueError:
        raise SchemaError(f"not JSON: {text[:60]!r}") from None
    if depth(answer, MAX_DEPTH) > MAX_DEPTH:
        raise SchemaError("an answer nested too deeply")
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise SchemaError("not an agent answer (an object with 'ok')")
    return answer


_CONTAINER = frozenset({dict, list}).__contains__


def depth(value: Any, limit: int) -> int:
    """How many levels of lists and dicts ``value`` (parsed JSON) has, counted up to
    ``limit + 1``. Level by level, without recursion; the values of each container are
    sorted in C (``compress`` by their type) and empty ones go at once (they end their
    branch), so a listing of thousands of records takes milliseconds."""
    level = [value] if _CONTAINER(type(value)) else []
    levels = 0
    while level and levels <= limit:
        levels += 1
        inner: list[Any] = []
        for x in level:
            values = x.values() if type(x) is dict else x
            inner.extend(itertools.compress(values, map(_CONTAINER, map(type, values))))
        level = list(filter(None, inner))
        if inner and not level:  # only empty ones below: one level more, and the end
            levels += 1
    return min(levels, limit + 1)
