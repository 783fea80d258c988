"""The box's job store: paths under ``~/.remotedl``, the box-wide lock, and job records.

``jobs/<id>.json`` (the record), ``jobs/<id>.env`` / ``.notify`` / ``.kill`` beside it,
``logs/<id>.log``, ``lock`` (flock: choosing and claiming GPUs is one atomic step; so is every
change of a record's status), ``next_id``.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.schema import JobRecord, SchemaError

if TYPE_CHECKING:  # a Slurm login node's code is imported where it is used: box jobs skip it
    from remotedl import slurm as slurmmod


JOB_DIRS = (".remotedl", "jobs")  # under remote_dir


ENV_FILES = ("environment.yml", "uv.lock", "pyproject.toml", "requirements.txt")


class AgentError(Exception):
    def __init__(self, message: str, kind: str = "error", hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


# Warnings for the laptop (damaged records skipped, ...), sent with the answer.
WARNINGS: list[str] = []


def warn(text: str) -> None:
    if text not in WARNINGS:
        WARNINGS.append(text)


def state_dir() -> Path:
    return Path(os.environ.get("REMOTEDL_BOX_STATE") or Path.home() / ".remotedl")


def jobs_dir() -> Path:
    return state_dir() / "jobs"


def logs_dir() -> Path:
    return state_dir() / "logs"


def _ensure_dirs() -> None:
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
    _ensure_dirs()
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


def _parse_record(raw: str, path: Path) -> dict[str, Any] | None:
    """The record in ``raw``, or None (with a warning naming the file) when it is damaged."""
    try:
        data = json.loads(raw)
    except ValueError:
        warn(f"skipped the damaged job record {path} (not JSON; `remotedl jobs rm {path.stem}` removes it)")
        return None
    try:
        JobRecord.from_dict(data)
    except SchemaError as e:
        warn(f"skipped the damaged job record {path} ({e})")
        return None
    if str(data["id"]) != path.stem:
        warn(f"skipped the job record {path}: it names job {data['id']}")
        return None
    return dict(data)


def load(job_id: int) -> dict[str, Any]:
    path = record_path(job_id)
    try:
        raw = path.read_text()
    except FileNotFoundError:
        raise AgentError(f"no job {job_id} on this box", "notfound") from None
    data = _parse_record(raw, path)
    if data is None:
        raise AgentError(
            f"the record of job {job_id} is damaged ({path})",
            hint=f"remove it with `remotedl jobs rm {job_id}`",
        )
    return data


def save(rec: dict[str, Any]) -> None:
    _write_json(record_path(int(rec["id"])), rec)


def update(job_id: int, **fields: Any) -> dict[str, Any]:
    """Change fields of a record under the lock (load, change, save)."""
    with box_lock():
        rec = load(job_id)
        rec.update(fields)
        save(rec)
        return rec


def all_records() -> list[dict[str, Any]]:
    """Every readable record, by id; damaged ones are skipped with a warning."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for p in jobs_dir().glob("*.json"):
            if not p.stem.isdigit():
                continue
            try:
                raw = p.read_text()
            except OSError:
                continue  # removed meanwhile
            data = _parse_record(raw, p)
            if data is not None:
                out.append(data)
    out.sort(key=lambda r: int(r["id"]))
    return out


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path)) if path else ""


_PROJECTS: dict[str, str] = {}


def project_of(r: dict[str, Any]) -> str:
    """The project's work tree of a record (older records only had ``cwd``), resolved."""
    raw = str(r.get("remote_dir") or r.get("cwd") or "")
    if raw not in _PROJECTS:
        _PROJECTS[raw] = _real(raw)
    return _PROJECTS[raw]


def remove_env_file(job_id: int) -> None:
    """The job's --env values (secrets, maybe): removed on every way a job ends."""
    with contextlib.suppress(OSError):
        env_path(job_id).unlink()


def _next_id(job_dirs: Path | None) -> int:
    """A job id never used before on this box: past the counter and past every record, log,
    env file and job directory there is (the counter alone may be lost or stale)."""
    path = state_dir() / "next_id"
    try:
        n = int(path.read_text())
    except (OSError, ValueError):
        n = 1
    seen = 0
    for d in (jobs_dir(), logs_dir(), job_dirs):
        if d is None:
            continue
        with contextlib.suppress(OSError):
            for name in os.listdir(d):
                stem = name.split(".", 1)[0]
                if stem.isdigit():
                    seen = max(seen, int(stem))
    n = max(n, seen + 1)
    tmp = path.with_name(f"next_id.tmp{os.getpid()}")
    tmp.write_text(str(n + 1))
    os.replace(tmp, path)
    return n


def _epoch(iso: str | None) -> float | None:
    """Slurm's local time stamp (``2026-11-23T11:06:23``) as seconds since the epoch."""
    if not iso:
        return None
    try:
        return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def _new_record(
    req: dict[str, Any], spec: dict[str, Any], job_id: int, rdir: str, *, isolate: bool, commit: object
) -> dict[str, Any]:
    """A new job's record, the fields a box job and a Slurm job share (under the box lock)."""
    return {
        "id": job_id,
        "name": req.get("name") or str(job_id),
        "command": req["command"],
        "cwd": rdir,
        "remote_dir": rdir,
        "workdir": None,
        "isolated": isolate,
        "gpus": [],
        "want": {},
        "env_keys": sorted((req.get("env") or {}).keys()),
        "git_commit": commit if isolate else req.get("git_commit"),
        "git_head": req.get("git_head"),
        "snapshot": bool(req.get("snapshot")),
        "snapshot_files": [str(f) for f in req.get("snapshot_files") or []][:1000],
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
    }


def _save_new(rec: dict[str, Any], req: dict[str, Any]) -> None:
    """Saves a new record, with its notification settings (kept aside, 0600) when it has any."""
    urls = [str(u) for u in req.get("notify") or []]
    if urls:
        from remotedl.agent import events

        rec["notify"] = events.save_settings(rec["id"], urls, req.get("host_alias"))
    save(rec)


def _stall_after(value: Any) -> float | None:
    """Seconds without log output or GPU activity that make a running job stalled (None: off)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def is_slurm(r: dict[str, Any]) -> bool:
    return r.get("scheduler") == "slurm"


def slurm_ref(r: dict[str, Any]) -> slurmmod.JobRef:
    from remotedl import slurm as slurmmod

    return slurmmod.JobRef(str(r["slurm_id"]), str(r.get("control_dir") or ""), str(r.get("log") or ""))
