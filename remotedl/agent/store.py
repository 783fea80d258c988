"""The box's job store: paths under ``~/.remotedl``, the box-wide lock, and job records.

``jobs/<id>.json`` (the record), ``jobs/<id>.env`` / ``.notify`` / ``.kill`` beside it,
``logs/<id>.log``, ``lock`` (flock: choosing and claiming GPUs is one atomic step; so is every
change of a record's status), ``next_id`` (the id counter), ``active/<id>`` and ``active.upto``
(the index of active jobs). A question about one job reads that job's record, and the few
active ones: never every record (a sweep leaves thousands).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.schema import ACTIVE, JobRecord, StartRequest
from remotedl.typecheck import SchemaError

if TYPE_CHECKING:  # a Slurm login node's code is imported where it is used: box jobs skip it
    from remotedl import slurm as slurmmod

JOB_DIRS = (".remotedl", "jobs")  # under remote_dir
ENV_FILES = ("environment.yml", "uv.lock", "pyproject.toml", "requirements.txt")


class AgentError(Exception):
    def __init__(self, message: str, kind: str = "error", hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


@dataclass
class Context:
    """One request's state, passed down from the dispatch (never module globals):
    ``warnings`` for the laptop (damaged records skipped, ...), sent with the answer, and
    ``news``: (job id, event) of jobs whose start or end a look found, which need a
    notification sent by a process of its own (``events.announce``, called by the op), and
    ``hide``: the values a runner hides in the notifications it sends."""

    warnings: list[str] = field(default_factory=list)
    news: list[tuple[int, str]] = field(default_factory=list)
    hide: tuple[str, ...] = ()  # a runner's job's --env values: hidden in the log lines it sends

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def tell(self, job_id: int, event: str) -> None:
        """The job ended (or started after a wait) with no runner left to say so."""
        if notify_path(job_id).exists() and (job_id, event) not in self.news:
            self.news.append((job_id, event))


def state_dir() -> Path:
    return Path(os.environ.get("REMOTEDL_BOX_STATE") or Path.home() / ".remotedl")


# Autostop's settings and state (remotedl.agent.autostop): named here so that a request can
# see that autostop is off without importing it (urllib, ssl: ~20 ms of every request).
AUTOSTOP_FILE = "autostop.json"


def jobs_dir() -> Path:
    return state_dir() / "jobs"


def logs_dir() -> Path:
    return state_dir() / "logs"


def ensure_dirs() -> None:
    for d in (state_dir(), jobs_dir(), logs_dir()):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)


# Per thread: the runner's stall watch takes the lock from a thread of its own, and must wait
# for the main thread's hold like any other process would (flock on its own descriptor does).
_LOCK_STATE = threading.local()


@contextlib.contextmanager
def box_lock() -> Iterator[None]:
    """The box-wide lock (reentrant within one thread: flock on a second descriptor of the
    same file would wait for ourselves)."""
    depth = getattr(_LOCK_STATE, "depth", 0)
    if depth:
        _LOCK_STATE.depth = depth + 1
        try:
            yield
        finally:
            _LOCK_STATE.depth -= 1
        return
    ensure_dirs()
    with open(state_dir() / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _LOCK_STATE.depth = 1
        try:
            yield
        finally:
            _LOCK_STATE.depth = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def record_path(job_id: int) -> Path:
    return jobs_dir() / f"{job_id}.json"


def env_path(job_id: int) -> Path:
    return jobs_dir() / f"{job_id}.env"


def notify_path(job_id: int) -> Path:
    """The job's notification URLs (secrets, 0600), while it can still send (agent/events.py)."""
    return jobs_dir() / f"{job_id}.notify"


def kill_marker(job_id: int) -> Path:
    return jobs_dir() / f"{job_id}.kill"


def preempt_marker(job_id: int) -> Path:
    """Made when the cloud took the (spot) VM away under the job (agent/autostop.py)."""
    return jobs_dir() / f"{job_id}.preempt"


def _parse_record(raw: str, path: str, job_id: int, ctx: Context | None) -> dict[str, Any] | None:
    """The record in ``raw`` (read from ``path``, the record of ``job_id``), or None (with a
    warning naming the file, to ``ctx``) when it is damaged."""
    why = None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
        why = f"skipped the damaged job record {path} (not JSON; `remotedl jobs rm {job_id}` removes it)"
    if why is None:
        try:
            JobRecord.check_dict(data)
        except SchemaError as e:
            why = f"skipped the damaged job record {path} ({e})"
    if why is None and str(data["id"]) != str(job_id):
        why = f"skipped the job record {path}: it names job {data['id']}"
    if why is not None:
        if ctx is not None:
            ctx.warn(why)
        return None
    return dict(data)


def load(job_id: int, ctx: Context | None = None) -> dict[str, Any]:
    path = record_path(job_id)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise AgentError(f"no job {job_id} on this box", "notfound") from None
    data = _parse_record(raw, str(path), job_id, ctx)
    if data is None:
        raise AgentError(
            f"the record of job {job_id} is damaged ({path})",
            hint=f"remove it with `remotedl jobs rm {job_id}`",
        )
    return data


def save(rec: dict[str, Any]) -> None:
    """Write the record (atomically; callers hold the box lock) and keep the index of active
    jobs in step with its status."""
    job_id = int(rec["id"])
    _write_json(record_path(job_id), rec)
    _mark_active(job_id, rec.get("status") in ACTIVE)


def update(job_id: int, **fields: Any) -> dict[str, Any]:
    """Change fields of a record under the lock (load, change, save)."""
    with box_lock():
        rec = load(job_id)
        rec.update(fields)
        save(rec)
        return rec


def record_ids() -> list[int]:
    """The ids of the records there are, ascending (names only: nothing is read)."""
    try:
        names = os.listdir(jobs_dir())
    except FileNotFoundError:
        return []
    return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())


def _read(job_id: int, ctx: Context | None, where: str | None = None) -> dict[str, Any] | None:
    path = os.path.join(where or str(jobs_dir()), f"{job_id}.json")
    try:
        with open(path) as f:
            raw = f.read()
    except OSError:
        return None  # removed meanwhile
    return _parse_record(raw, path, job_id, ctx)


def all_records(ctx: Context | None = None) -> list[dict[str, Any]]:
    """Every readable record, by id; damaged ones are skipped with a warning."""
    where = str(jobs_dir())
    records = (_read(job_id, ctx, where) for job_id in record_ids())
    return [r for r in records if r is not None]


def records_after(after: int, ids: set[int], ctx: Context | None = None) -> tuple[list[dict[str, Any]], int]:
    """(the records with an id above ``after`` or in ``ids``, the largest id there is): a
    laptop's question about the jobs since its last one reads only those."""
    where = str(jobs_dir())
    known = record_ids()
    records = (_read(i, ctx, where) for i in known if i > after or i in ids)
    return [r for r in records if r is not None], (known[-1] if known else 0)


def newest_first(ctx: Context | None = None) -> Iterator[dict[str, Any]]:
    """The records from the newest, read one at a time as the caller goes: a question about
    the latest job of a project, or of a name, reads only as far back as its answer."""
    where = str(jobs_dir())
    for job_id in reversed(record_ids()):
        rec = _read(job_id, ctx, where)
        if rec is not None:
            yield rec


# ------------------------------------------------------------------ the index of active jobs
#
# ``active/<id>``: an empty file per queued, starting or running job, kept by ``save`` (under the
# box lock), so that choosing GPUs, the queue and the liveness checks read the few active records,
# not all of them. ``active.upto``: the ids below it are in the index; ids a different agent version
# made since (the shared ``next_id`` counter went past it) are looked at once and added. A marker
# whose record ended (by an agent that keeps no index) is dropped when it is read.


def active_dir() -> Path:
    return state_dir() / "active"


def _upto_path() -> Path:
    return state_dir() / "active.upto"


def _mark_active(job_id: int, active: bool) -> None:
    marker = active_dir() / str(job_id)
    if active:
        with contextlib.suppress(FileNotFoundError):  # no index yet: it is built from the records
            if not marker.exists():
                marker.touch()
    else:
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _write_int(path: Path, n: int) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(str(n))
    os.replace(tmp, path)


def _build_index(ctx: Context | None) -> None:
    """The index from every record (the first time, or when it is damaged), under the lock."""
    counter = _read_int(state_dir() / "next_id") or 1
    records = all_records(ctx)
    tmp = state_dir() / f"active.new{os.getpid()}"
    if tmp.exists():
        for p in tmp.iterdir():
            p.unlink()
    else:
        tmp.mkdir(mode=0o700)
    for r in records:
        if r.get("status") in ACTIVE:
            (tmp / str(r["id"])).touch()
    old = active_dir()
    if old.exists():
        gone = old.with_name(f"active.old{os.getpid()}")
        os.replace(old, gone)
        for p in gone.iterdir():
            p.unlink()
        gone.rmdir()
    os.replace(tmp, old)
    top = max([counter, *(int(r["id"]) + 1 for r in records)])
    _write_int(_upto_path(), top)


def active_ids(ctx: Context | None = None) -> list[int]:
    """The ids in the index of active jobs, ascending (built or caught up first when needed)."""
    upto = _read_int(_upto_path())
    counter = _read_int(state_dir() / "next_id")
    if upto is None or not active_dir().is_dir() or (counter is not None and counter > upto):
        with box_lock():
            upto = _read_int(_upto_path())
            counter = _read_int(state_dir() / "next_id")
            if upto is None or not active_dir().is_dir():
                _build_index(ctx)
            elif counter is not None and counter > upto:
                for job_id in range(upto, counter):  # made by an agent that keeps no index
                    rec = _read(job_id, None)
                    if rec is not None:
                        _mark_active(job_id, rec.get("status") in ACTIVE)
                _write_int(_upto_path(), counter)
    try:
        names = os.listdir(active_dir())
    except FileNotFoundError:
        return []
    return sorted(int(n) for n in names if n.isdigit())


def active_records(ctx: Context | None = None) -> list[dict[str, Any]]:
    """The active (queued, starting, running) records, by id, as they are saved (a look at
    whether they still live is ``state.refresh``)."""
    out = []
    for job_id in active_ids(ctx):
        rec = _read(job_id, ctx)
        if rec is not None and rec.get("status") in ACTIVE:
            out.append(rec)
        elif rec is not None or not record_path(job_id).exists():
            _mark_active(job_id, False)  # ended, or removed: never active again
    return out


def real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path)) if path else ""


_PROJECTS: dict[str, str] = {}


def project_of(r: dict[str, Any]) -> str:
    """The project's work tree of a record (older records only had ``cwd``), resolved."""
    raw = str(r.get("remote_dir") or r.get("cwd") or "")
    if raw not in _PROJECTS:
        _PROJECTS[raw] = real(raw)
    return _PROJECTS[raw]


def remove_env_file(job_id: int) -> None:
    """The job's --env values (secrets, maybe): removed on every way a job ends."""
    with contextlib.suppress(OSError):
        env_path(job_id).unlink()


def next_id(job_dirs: Path | None) -> int:
    """A job id never used before on this box (under the lock): the counter, moved past any
    record, log, env file or job directory that has its number (a counter that was lost or
    damaged: past every one there is, which is read only then)."""
    path = state_dir() / "next_id"
    n = _read_int(path)
    if n is None or n < 1:
        n = 1
        for d in (jobs_dir(), logs_dir(), job_dirs):
            if d is None:
                continue
            with contextlib.suppress(OSError):
                for name in os.listdir(d):
                    stem = name.split(".", 1)[0]
                    if stem.isdigit():
                        n = max(n, int(stem) + 1)
    while _used(n, job_dirs):
        n += 1
    _write_int(path, n + 1)
    if _read_int(_upto_path()) == n:  # the index is whole up to here: its record is saved next
        _write_int(_upto_path(), n + 1)
    return n


def _used(n: int, job_dirs: Path | None) -> bool:
    paths = [record_path(n), env_path(n), logs_dir() / f"{n}.log"]
    if job_dirs is not None:
        paths.append(job_dirs / str(n))
    return any(os.path.lexists(p) for p in paths)


def epoch(iso: str | None) -> float | None:
    """Slurm's local time stamp (``2026-11-23T11:06:23``) as seconds since the epoch."""
    if not iso:
        return None
    try:
        return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def new_record(
    req: StartRequest, spec: dict[str, Any], job_id: int, rdir: str, *, isolate: bool, commit: object
) -> dict[str, Any]:
    """A new job's record, the fields a box job and a Slurm job share (under the box lock)."""
    return {
        "id": job_id,
        "name": req.name or str(job_id),
        "command": req.command,
        "cwd": rdir,
        "remote_dir": rdir,
        "workdir": None,
        "isolated": isolate,
        "gpus": [],
        "want": {},
        "env_keys": sorted(req.env.keys()),
        "git_commit": commit if isolate else req.git_commit,
        "git_head": req.git_head,
        "snapshot": req.snapshot,
        "snapshot_files": [str(f) for f in req.snapshot_files][:1000],
        "environment": {k: spec[k] for k in ("conda", "env_setup") if spec.get(k)},
        "status": "queued",
        "exit_code": None,
        "created": time.time(),
        "started": None,
        "ended": None,
        "log": "",
        "session": "",
        "host": socket.gethostname(),
        "starter_pid": os.getpid(),
        "ready": True,
        "notify": [],  # job events (agent/events.py): notifications sent from the box
        "notifications": [],
        "outputs": [str(p) for p in req.outputs][:1000],  # a laptop of the project fetches them
        "project_id": req.project_id,
    }


def stall_after(value: Any) -> float | None:
    """Seconds without log output or GPU activity that make a running job stalled (None: off)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def kind_of(r: dict[str, Any]) -> str:
    """Which runtime holds the job (``runtimes.of``): ``slurm``, ``container`` (a tmux session
    whose runner runs the job in its image), or ``box`` (a tmux session; records of older
    agents have no ``scheduler``). Read once per record."""
    if r.get("scheduler") == "slurm":
        return "slurm"
    return "container" if r.get("image") else "box"


def is_slurm(r: dict[str, Any]) -> bool:
    return kind_of(r) == "slurm"


def slurm_ref(r: dict[str, Any]) -> slurmmod.JobRef:
    from remotedl import slurm as slurmmod

    return slurmmod.JobRef(str(r["slurm_id"]), str(r.get("control_dir") or ""), str(r.get("log") or ""))
