"""Box side of jobs. One request (JSON on stdin) per exec; one JSON answer on stdout.

State lives under ``~/.remotedl`` so any laptop sees the same jobs:
``jobs/<id>.json`` (the record), ``logs/<id>.log``, ``lock`` (flock: choosing and claiming
GPUs is one atomic step; so is every change of a record's status), ``next_id``.

Each job runs in its own checkout of its commit, ``<remote_dir>/.remotedl/jobs/<id>/`` (a git
worktree of the project's work tree on the box: it shares its objects), with the configured
data paths and ``shared`` directories linked to the ones in ``remote_dir``. Later pushes check
out other commits in ``remote_dir``; a job's own files never change under it.

A job is started by this agent (status ``starting``, the starter's pid recorded), runs under a
runner process in a tmux session of its own (the runner records its pid, then the job's process
group), and is ``lost`` only when none of them is alive any more, or the box rebooted.

On a Slurm login node (requests with ``scheduler: "slurm"``) the same records and checkouts
serve a second backend: the job is a Slurm batch job (``remotedl.slurm``), its control directory
and log under ``<remote_dir>/.remotedl/slurm/<id>/`` on the shared filesystem, and its status is
Slurm's (scontrol, sacct, or what its batch script recorded), read whenever records are.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl import gpus as gpumod
from remotedl import treeid
from remotedl.activate import ACTIVATE
from remotedl.errors import RemotedlError
from remotedl.schema import ACTIVE, ENDED, MAX_REQUEST, JobRecord, SchemaError, outlived_words, slurm_words
from remotedl.waiting import pid_alive as _alive

if TYPE_CHECKING:  # a Slurm login node's code is imported where it is used: box jobs skip it
    from remotedl import slurm as slurmmod

QUEUE_POLL = 1.0
START_TIMEOUT = 30.0  # the runner records itself within this, or the start failed
TMUX_MIN = (3, 0)  # new-session with the command as separate words: no shell in between
JOB_DIRS = (".remotedl", "jobs")  # under remote_dir
SLURM_DIRS = (".remotedl", "slurm")  # under remote_dir: a Slurm job's control dir and log
SLURM_POLL = 2.0  # seconds between Slurm state checks while following a log (an RPC each)
# Never part of the project's commits; excluded so they never block a push.
EXCLUDES = ("/.remotedl/", "/.venv/")
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


def session_name(job_id: int) -> str:
    return f"remotedl-{job_id}"


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path)) if path else ""


_PROJECTS: dict[str, str] = {}


def project_of(r: dict[str, Any]) -> str:
    """The project's work tree of a record (older records only had ``cwd``), resolved."""
    raw = str(r.get("remote_dir") or r.get("cwd") or "")
    if raw not in _PROJECTS:
        _PROJECTS[raw] = _real(raw)
    return _PROJECTS[raw]


# ------------------------------------------------------------------ tmux


def _tmux(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=False, env=env)


def kill_session(name: str) -> None:
    """Exactly this session: ``=name`` (a bare ``remotedl-1`` would also match remotedl-12)."""
    with contextlib.suppress(OSError):
        _tmux("kill-session", "-t", "=" + name)


def tmux_sessions() -> set[str] | None:
    try:
        out = _tmux("list-sessions", "-F", "#{session_name}")
    except OSError:
        return None
    return set(out.stdout.split()) if out.returncode == 0 else set()


def check_tmux() -> None:
    try:
        out = _tmux("-V")
    except FileNotFoundError:
        raise AgentError(
            "tmux is not installed on the box",
            "usage",
            hint="install it there (`sudo apt-get install tmux`) or run `remotedl setup base`",
        ) from None
    text = (out.stdout or out.stderr).strip()
    m = re.search(r"(\d+)\.(\d+)", text)
    if m and (int(m.group(1)), int(m.group(2))) < TMUX_MIN:
        raise AgentError(
            f"{text} on the box is too old: remotedl needs tmux 3.0 or newer "
            "(it starts the job's command without a shell in between)",
            "usage",
            hint="upgrade tmux there (Debian 11, Ubuntu 20.04 and later have 3.x), "
            "or put a newer tmux first on the box's PATH",
        )


# ------------------------------------------------------------------ liveness


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def group_alive(pgid: int) -> bool:
    """A process of the group still runs (zombies do not count: where nothing reaps orphans,
    as under some container inits, a dead job's processes linger as zombies)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc to look closer
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


# In every job process's environment: finds the processes that left the job's process group
# (setsid, a daemon's double fork), as long as they keep the environment they were given.
JOB_MARK = "REMOTEDL_JOB_MARK"


def job_processes(r: dict[str, Any]) -> list[int]:
    """The job's live processes (zombies do not count): its process group's, and the user's
    own processes whose environment carries the job's mark."""
    pgid = str(r.get("pgid") or "")
    mark = f"{JOB_MARK}={r['mark']}".encode() if r.get("mark") else None
    uid = os.getuid()
    try:
        entries = os.listdir("/proc")
    except OSError:  # no /proc to look closer: the group as a whole
        return [int(pgid)] if pgid and group_alive(int(pgid)) else []
    found = []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if fields[0] in ("Z", "X"):
                continue
            if fields[2] == pgid:
                found.append(int(name))
            elif mark and os.stat(f"/proc/{name}").st_uid == uid:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        found.append(int(name))
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def job_alive(r: dict[str, Any]) -> bool:
    if r.get("pgid") and group_alive(int(r["pgid"])):
        return True
    return bool(r.get("mark") and job_processes(r))


def signal_job(r: dict[str, Any], sig: int) -> bool:
    """``sig`` to the job's process group and to its processes outside it (each once); False:
    none was left."""
    pgid = int(r["pgid"]) if r.get("pgid") else None
    sent = False
    if pgid:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
            sent = True
    for pid in job_processes(r):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid is None or os.getpgid(pid) != pgid:
                os.kill(pid, sig)
                sent = True
    return sent


def runner_alive(r: dict[str, Any]) -> bool:
    """The job's runner is alive (a reused pid of another program does not count)."""
    pid = r.get("runner_pid")
    if not _alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to tell: trust the pid
    return b'"runner"' in cmdline and f'"id": {r["id"]}}}'.encode() in cmdline


def _gone(r: dict[str, Any], boot: str | None) -> bool:
    """Nothing of an active job is alive any more: not its starter, runner or processes."""
    if is_slurm(r):
        # Slurm says how it is (refresh_slurm); only a submission that died before sbatch
        # answered has nothing to ask about.
        if r.get("slurm_id"):
            return False
        created = float(r.get("created") or 0)
        return not (_alive(r.get("starter_pid")) and time.time() - created < START_TIMEOUT + 120)
    if boot and r.get("boot_id") and r["boot_id"] != boot:
        return True  # the box rebooted since
    if not r.get("runner_pid") and _alive(r.get("starter_pid")):
        created = float(r.get("created") or 0)
        if time.time() - created < START_TIMEOUT + 60:
            return False  # being started: the runner records itself in a moment
    if runner_alive(r):
        return False
    return not job_alive(r)


def is_slurm(r: dict[str, Any]) -> bool:
    return r.get("scheduler") == "slurm"


def slurm_ref(r: dict[str, Any]) -> slurmmod.JobRef:
    from remotedl import slurm as slurmmod

    return slurmmod.JobRef(str(r["slurm_id"]), str(r.get("control_dir") or ""), str(r.get("log") or ""))


def _epoch(iso: str | None) -> float | None:
    """Slurm's local time stamp (``2026-11-23T11:06:23``) as seconds since the epoch."""
    if not iso:
        return None
    try:
        return time.mktime(time.strptime(iso, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def slurm_changes(r: dict[str, Any], st: slurmmod.SlurmJob) -> dict[str, Any]:
    """What a Slurm job's state changes in its record."""
    changes: dict[str, Any] = {
        "status": st.status,
        "slurm_state": st.state,
        "slurm_reason": st.reason or None,
    }
    if st.nodes:
        changes["node"] = st.nodes
    if st.gpu_indices:
        changes["gpus"] = st.gpu_indices
    if st.start and not r.get("started") and st.state not in ("PENDING", "CONFIGURING"):
        changes["started"] = _epoch(st.start) or time.time()
    if st.ended:
        changes["exit_code"] = st.exit_code
        changes["ended"] = r.get("ended") or _epoch(st.end) or time.time()
        if st.status == "lost" and not r.get("error"):
            changes["error"] = st.reason or "Slurm no longer knows it"
    return {k: v for k, v in changes.items() if r.get(k) != v}


def refresh_slurm(records: list[dict[str, Any]]) -> None:
    """Ask Slurm about the active Slurm jobs among ``records`` (one scontrol each) and record
    what changed. A controller that does not answer changes nothing."""
    todo = [r for r in records if is_slurm(r) and r.get("status") in ACTIVE and r.get("slurm_id")]
    if not todo:
        return
    from remotedl import slurm as slurmmod

    for r in todo:
        try:
            st = slurmmod.state_here(slurm_ref(r))
        except RemotedlError as e:
            warn(f"job {r.get('id')}: {e}")
            continue
        if not st.known or not slurm_changes(r, st):
            continue
        with box_lock():
            try:
                fresh = load(int(r["id"]))
            except AgentError:
                continue
            if fresh["status"] in ACTIVE:
                changes = slurm_changes(fresh, st)
                # Slurm said why it waited (Resources, Priority, ...): its start is news.
                waited = fresh["status"] == "queued" and fresh.get("slurm_reason") not in (None, "", "None")
                if changes:
                    fresh.update(changes)
                    if waited and fresh["status"] == "running" and notify_path(int(fresh["id"])).exists():
                        from remotedl.agent import events

                        events.spawn(int(fresh["id"]), "started")
                    if st.ended and kill_marker(int(fresh["id"])).exists():
                        fresh["status"] = "killed"  # remotedl kill asked for its end
                    save(fresh)
                    if fresh["status"] not in ACTIVE:
                        ended_elsewhere(int(fresh["id"]), fresh["status"])
            r.clear()
            r.update(fresh)
        if st.ended:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(str(r.get("control_dir") or ""), "env"))


def remove_env_file(job_id: int) -> None:
    """The job's --env values (secrets, maybe): removed on every way a job ends."""
    with contextlib.suppress(OSError):
        env_path(job_id).unlink()


def ended_elsewhere(job_id: int, status: str) -> None:
    """A job ended with no runner left to send its notification: a detached agent sends it."""
    if notify_path(job_id).exists():
        from remotedl.agent import events

        events.spawn(job_id, status)


def refresh(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark active jobs that nothing keeps alive any more as lost (or killed, when asked to),
    under the lock, after reading each record afresh. Slurm jobs take Slurm's state."""
    refresh_slurm(records)
    if any(is_slurm(r) for r in records):
        from remotedl.agent import events

        if events.slurm_watched(records):
            events.watch_slurm()  # one watches with no laptop looking (a no-op while it runs)
    boot = _boot_id()
    suspects = [r for r in records if r["status"] in ACTIVE and _gone(r, boot)]
    if not suspects:
        return records
    with box_lock():
        for r in suspects:
            try:
                fresh = load(int(r["id"]))
            except AgentError:
                continue
            if fresh["status"] in ACTIVE and _gone(fresh, boot):
                killed = kill_marker(int(fresh["id"])).exists()
                fresh["status"] = "killed" if killed else "lost"
                fresh["ended"] = fresh.get("ended") or time.time()
                if not killed and not fresh.get("error"):
                    fresh["error"] = "its runner and processes vanished (box rebooted, or killed)"
                save(fresh)
                remove_env_file(int(fresh["id"]))
                ended_elsewhere(int(fresh["id"]), fresh["status"])
            r.clear()
            r.update(fresh)
    return records


def resolve(
    ref: str | int | None, project: str | None = None, *, active_only: bool = False
) -> dict[str, Any]:
    """A job by id, by name (the latest of that name, this project's first), or, when None,
    this project's latest (``active_only``: latest active) job."""
    records = refresh(all_records())
    pdir = _real(project) if project else ""
    if ref in (None, "", "last"):
        pool = [r for r in records if project_of(r) == pdir] if pdir else records
        where = f"of this project ({pdir})" if pdir else "on this box"
        if active_only:
            pool = [r for r in pool if r["status"] in ACTIVE]
            if not pool:
                raise AgentError(
                    f"no job {where} is running", "notrunning", hint="`remotedl jobs` lists the box's jobs"
                )
        if not pool:
            raise AgentError(
                f"there are no jobs {where} yet", "notfound", hint="start one with `remotedl run COMMAND`"
            )
        return pool[-1]
    if isinstance(ref, int) or str(ref).isdigit():
        return refresh([load(int(ref))])[0]
    named = [r for r in records if r.get("name") == ref]
    mine = [r for r in named if project_of(r) == pdir]
    named = mine or named
    if not named:
        raise AgentError(
            f"no job called '{ref}' on this box", "notfound", hint="`remotedl jobs --all` lists them"
        )
    return named[-1]


# ------------------------------------------------------------------ GPUs


def _user_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return pwd.getpwuid(int(line.split()[1])).pw_name
    except (OSError, KeyError, ValueError):
        return None
    return None


def query_gpus() -> list[gpumod.Gpu] | None:
    """The box's GPUs with their compute processes; None when there is no NVIDIA driver."""
    try:
        out = subprocess.run(gpumod.QUERY_GPUS, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        raise AgentError("nvidia-smi failed: " + (out.stdout + out.stderr).strip().splitlines()[0])
    found = gpumod.parse_gpus(out.stdout)
    apps = subprocess.run(gpumod.QUERY_APPS, capture_output=True, text=True, check=False)
    procs = gpumod.parse_apps(apps.stdout) if apps.returncode == 0 else []
    for p in procs:
        p.user = _user_of(p.pid)
    gpumod.attach_processes(found, procs)
    return found


def _holders(gpus: list[gpumod.Gpu], records: list[dict[str, Any]]) -> dict[int, str]:
    """GPU index -> who holds it, in words. A starting job holds its GPUs already; a running
    job holds them while its process group lives, even without its tmux session."""
    held: dict[int, str] = {}
    for r in records:
        if r["status"] in ("starting", "running"):
            for g in r.get("gpus") or []:
                held[g] = f"job {r['id']} ({r.get('name')})"
    for g in gpus:
        if g.index not in held and g.processes:
            p = g.processes[0]
            mem = f", {p.used_memory_mib} MiB" if p.used_memory_mib is not None else ""
            held[g.index] = f"process {p.pid} ({p.name.rsplit('/', 1)[-1]}, user {p.user or '?'}{mem})"
    return held


def _gpus_text(n: int, word: str = "GPU") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def choose_gpus(req: dict[str, Any], records: list[dict[str, Any]]) -> list[int] | None:
    """GPUs for the job, or None when it must wait (``queue``). Raises when it cannot run."""
    wanted = req.get("gpus")  # list of indices, "auto", or "none"
    count = int(req.get("count") or 1)
    if wanted == "none":
        return []
    gpus = query_gpus()
    if gpus is None:
        if wanted in (None, "auto") and not req.get("count"):
            return []  # a CPU box: the job runs on the CPU
        raise AgentError(
            "this box has no NVIDIA GPU (nvidia-smi is not on its PATH)",
            "usage",
            hint="run without --gpu/--gpus to use the CPU",
        )
    indices = [g.index for g in gpus]
    held = _holders(gpus, records)
    # What can never be: a usage error now, never a wait (``queue`` would wait forever).
    names = ", ".join(f"{g.index} ({g.name})" for g in gpus) or "none"
    if isinstance(wanted, list):
        missing = [i for i in wanted if i not in indices]
        if missing:
            raise AgentError(
                f"GPU {', '.join(map(str, missing))} does not exist on this box; "
                f"it has {_gpus_text(len(gpus))}: {names}",
                "usage",
                hint="pick from those with --gpu",
            )
        busy = {i: held[i] for i in wanted if i in held}
        if busy and not req.get("force"):
            if req.get("queue"):
                return None
            who = "; ".join(f"GPU {i} is used by {w}" for i, w in busy.items())
            raise AgentError(
                who,
                "busy",
                hint="pick another with --gpu, wait with --queue, or share it anyway with --force",
            )
        return list(wanted)
    if not gpus and not req.get("count"):
        return []
    if count > len(gpus):
        raise AgentError(
            f"--gpus {count} asks for more GPUs than this box has: it has {_gpus_text(len(gpus))}: {names}",
            "usage",
            hint=f"ask for at most {len(gpus)}" if gpus else "run with --cpu",
        )
    picked = gpumod.pick_free_gpus(gpus, held, count)
    if picked is None:
        if req.get("queue"):
            return None
        who = "; ".join(f"GPU {i}: {w}" for i, w in sorted(held.items()))
        raise AgentError(
            f"no {_gpus_text(count, 'free GPU')} on this box ({who})",
            "busy",
            hint="wait for them with --queue, or choose one with --gpu N --force",
        )
    return picked


def _candidates(want: dict[str, Any]) -> set[int] | None:
    """The GPUs a queued job could take: a set, or None for any."""
    g = want.get("gpus")
    if isinstance(g, list):
        return {int(x) for x in g}
    return set() if g == "none" else None


def blocked_by_earlier(rec: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """First in, first out: an earlier queued job that wants any of the same GPUs goes first."""
    mine = _candidates(rec.get("want") or {})
    for r in records:
        if r["status"] != "queued" or int(r["id"]) >= int(rec["id"]):
            continue
        theirs = _candidates(r.get("want") or {})
        if mine is None or theirs is None or mine & theirs:
            return True
    return False


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


# ------------------------------------------------------------------ per-job checkouts


def _git(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, check=False)


def git_head(tree: str) -> str | None:
    if not os.path.exists(os.path.join(tree, ".git")):
        return None
    r = _git(tree, "rev-parse", "-q", "--verify", "HEAD^{commit}")
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def job_dirs_of(rdir: str) -> Path:
    return Path(rdir).joinpath(*JOB_DIRS)


def ensure_excludes(rdir: str) -> None:
    """``/.remotedl/`` and ``/.venv/`` are never the project's files (idempotent)."""
    info = Path(rdir) / ".git" / "info"
    if not info.parent.is_dir():
        return
    path = info / "exclude"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    lines = text.splitlines()
    missing = [e for e in EXCLUDES if e not in lines]
    if missing:
        info.mkdir(parents=True, exist_ok=True)
        add = ("" if not text or text.endswith("\n") else "\n") + "".join(f"{e}\n" for e in missing)
        with open(path, "a") as f:
            f.write(add)


def _clean_rel(path: str) -> str | None:
    rel = os.path.normpath(path)
    if os.path.isabs(rel) or rel == "." or rel.startswith(".."):
        return None
    return rel


def make_job_dir(
    rdir: str, job_id: int, commit: str, data: list[str], shared: list[str]
) -> tuple[str, list[str]]:
    """The job's own checkout of ``commit``: (its directory, the paths linked to remote_dir)."""
    jd = job_dirs_of(rdir) / str(job_id)
    jd.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(jd):
        raise AgentError(f"the job directory {jd} exists already")
    r = _git(rdir, "worktree", "add", "--detach", str(jd), commit)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if os.path.lexists(jd):  # a half-made checkout (a full disk): gone, and git forgets it
            shutil.rmtree(jd, ignore_errors=True)
        _git(rdir, "worktree", "prune")
        raise AgentError(f"could not check out {commit[:10]} for the job in {jd}: {last}")
    linked: list[str] = []
    for rel, is_shared in [*((d, False) for d in data), *((s, True) for s in shared)]:
        clean = _clean_rel(rel)
        if clean is None or clean in linked:
            continue
        src = Path(rdir) / clean
        dst = jd / clean
        if is_shared:
            src.mkdir(parents=True, exist_ok=True)
        elif not os.path.lexists(src):
            continue  # not pushed yet: nothing to see
        if os.path.lexists(dst):  # tracked files at that place: the data/shared copy wins
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            else:
                dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
        linked.append(clean)
    return str(jd), linked


def disk_usage(path: Path) -> int:
    """Bytes on disk under ``path`` (links not followed, hard links once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_blocks * 512
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                s = os.lstat(os.path.join(root, name))
                if (s.st_dev, s.st_ino) in seen:
                    continue
                seen.add((s.st_dev, s.st_ino))
                total += s.st_blocks * 512
    return total


def _own_job_dir(rec: dict[str, Any]) -> Path | None:
    """The record's job directory, if it is where job directories are (a damaged or hostile
    record naming another directory is never removed)."""
    wd = rec.get("workdir")
    rdir = rec.get("remote_dir")
    if not wd or not rdir or not rec.get("isolated"):
        return None
    p = Path(wd)
    if p.name != str(rec["id"]) or os.path.realpath(p.parent) != os.path.realpath(job_dirs_of(rdir)):
        return None
    return p


def _own_control_dir(rec: dict[str, Any]) -> Path | None:
    """A Slurm job's control directory (and log), if it is where they are made."""
    ctl, rdir = rec.get("control_dir"), rec.get("remote_dir")
    if not is_slurm(rec) or not ctl or not rdir:
        return None
    p = Path(str(ctl))
    home = os.path.realpath(Path(str(rdir)).joinpath(*SLURM_DIRS))
    if p.name != str(rec["id"]) or os.path.realpath(p.parent) != home:
        return None
    return p


def remove_job_dir(rec: dict[str, Any]) -> None:
    p = _own_job_dir(rec)
    if p is None:
        return
    rdir = str(rec["remote_dir"])
    if os.path.lexists(p):
        for rel in rec.get("links") or []:  # the shared data stays where it is
            link = p / rel
            if link.is_symlink():
                link.unlink()
        _git(rdir, "worktree", "remove", "--force", "--force", str(p))
        if os.path.lexists(p):
            shutil.rmtree(p, ignore_errors=True)
    _git(rdir, "worktree", "prune")


# ------------------------------------------------------------------ environments


# What the job's environment is: its interpreter and, without importing it, torch's version.
PROBE = """\
import json, os, sys
info = {"python": sys.executable, "python_version": "%d.%d.%d" % sys.version_info[:3]}
for k in ("VIRTUAL_ENV", "CONDA_DEFAULT_ENV", "CONDA_PREFIX"):
    if os.environ.get(k):
        info[k.lower()] = os.environ[k]
try:
    from importlib.metadata import version
    info["torch"] = version("torch")
except Exception:
    pass
print(json.dumps(info))
"""

# The job's shell: "$1" the command line, "$2" the job's directory (or empty), "$3" remote_dir,
# "$4" the conda environment, "$5" env_setup, "$6" a nonce for the environment line, "$7" the
# probe. The environment line goes to the runner, which takes it out of the log.
WRAPPER = (
    '_rdl_c=$1 _rdl_jd=$2 _rdl_rd=$3 _rdl_conda=$4 _rdl_setup=$5 _rdl_nonce=$6 _rdl_probe=$7\nshift 7\n'
    + ACTIVATE
    + r"""
_rdl_activate || exit 125
_rdl_py=$(command -v python 2>/dev/null || command -v python3 2>/dev/null)
_rdl_info=
[ -n "$_rdl_py" ] && _rdl_info=$("$_rdl_py" -c "$_rdl_probe" 2>/dev/null)
[ -n "$_rdl_info" ] || _rdl_info='{}'
printf '@@remotedl-env:%s %s\n' "$_rdl_nonce" "$_rdl_info"
unset _rdl_jd _rdl_rd _rdl_conda _rdl_setup _rdl_nonce _rdl_probe _rdl_py _rdl_info _rdl_v _rdl_b _rdl_cb
eval "$_rdl_c"
"""
)


def shell_for(setup: str | None) -> str:
    """``env_setup`` lines are often bash (``source ...``): bash runs them where there is one."""
    return "bash" if setup and shutil.which("bash") else "sh"


def _pyproject_deps(text: str) -> list[str] | None:
    """[project].dependencies of a pyproject.toml, or None when it declares none."""
    try:
        import tomllib

        data = tomllib.loads(text)
        deps = data.get("project", {}).get("dependencies")
        return [str(d) for d in deps] if isinstance(deps, list) and deps else None
    except ImportError:  # python 3.10: read the one array we need
        m = re.search(r"^\[project\][^\[]*?^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        if not m:
            return None
        deps = re.findall(r"""["']([^"']+)["']""", m.group(1))
        return deps or None
    except ValueError:
        return None


def env_plan(rdir: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """What makes the project's environment, and a hash of it; None: nothing to sync."""
    files: dict[str, bytes] = {}
    for name in ENV_FILES:
        with contextlib.suppress(OSError):
            files[name] = (Path(rdir) / name).read_bytes()
    pyproject = files.get("pyproject.toml")
    if pyproject is not None and _pyproject_deps(pyproject.decode(errors="replace")) is None:
        files.pop("pyproject.toml")
        files.pop("uv.lock", None)
    if "pyproject.toml" not in files:
        files.pop("uv.lock", None)
    setup_cmd = spec.get("setup_cmd")
    if setup_cmd:
        kind, used = "setup_cmd", sorted(files)
    elif "environment.yml" in files:
        kind, used = "environment.yml", ["environment.yml"]
    elif "uv.lock" in files:
        kind, used = "uv.lock", ["pyproject.toml", "uv.lock"]
    elif "requirements.txt" in files:
        kind, used = "requirements.txt", ["requirements.txt"]
    elif "pyproject.toml" in files:
        kind, used = "pyproject.toml", ["pyproject.toml"]
    else:
        return None
    conda = spec.get("conda") or None
    if kind == "environment.yml" and not conda:
        m = re.search(rb"^name:\s*(\S+)", files["environment.yml"], re.M)
        conda = m.group(1).decode() if m else None
    h = hashlib.sha256()
    for part in (kind, setup_cmd, conda, spec.get("env_setup"), sys.executable):
        h.update(str(part or "").encode() + b"\0")
    for name in used:
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    if conda or spec.get("env_setup"):
        target = f"conda environment {conda}" if conda else "the environment env_setup activates"
    else:
        target = os.path.join(rdir, ".venv")
    return {"kind": kind, "files": used, "hash": h.hexdigest()[:20], "conda": conda, "target": target}


def _stamp_path(rdir: str) -> Path:
    return Path(rdir) / ".remotedl" / "env.json"


def env_in_sync(rdir: str, plan: dict[str, Any], spec: dict[str, Any]) -> bool:
    try:
        stamp = json.loads(_stamp_path(rdir).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("hash") != plan["hash"]:
        return False
    if plan["conda"] or spec.get("env_setup") or plan["kind"] == "setup_cmd":
        return True
    return os.access(os.path.join(rdir, ".venv", "bin", "python"), os.X_OK)


# Run by the project venv's python after pip installed requirements file "$1": uninstall what
# that file no longer needs. pip has no sync of its own; its parser (the one pip-tools uses) reads
# the file as pip does (-r includes, markers, -e and paths), and the installed packages' metadata
# gives what they need in turn, offline. pip, setuptools and wheel (the venv's own) and what they
# need stay.
PRUNE = """\
import contextlib, json, os, subprocess, sys
from importlib.metadata import distributions

def needed(path, installed):
    from pip._internal.network.session import PipSession
    from pip._internal.req.constructors import install_req_from_parsed_requirement
    from pip._internal.req.req_file import parse_requirements
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as canon

    def by_url(url):
        for key, d in installed.items():
            with contextlib.suppress(ValueError):
                if json.loads(d.read_text("direct_url.json") or "{}").get("url") == url:
                    return key
    todo = [(seed, frozenset()) for seed in ("pip", "setuptools", "wheel")]  # the venv's own
    for parsed in parse_requirements(path, session=PipSession()):
        req = install_req_from_parsed_requirement(parsed)
        if req.constraint or not req.match_markers():
            continue
        name = canon(req.name) if req.name else req.link and by_url(req.link.url_without_fragment)
        if not name:
            raise ValueError(f"cannot tell what {req} installs")
        todo.append((name, frozenset(req.extras)))
    keep, seen = set(), set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) not in seen:
            seen.add((name, extras))
            keep.add(name)
            for line in (installed[name].requires or []) if name in installed else []:
                r = Requirement(line)
                if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras or {""}):
                    todo.append((canon(r.name), frozenset(r.extras)))
    return keep

try:
    from pip._vendor.packaging.utils import canonicalize_name as canon
    prefix = os.path.realpath(sys.prefix) + os.sep
    installed = {
        canon(d.metadata["Name"]): d for d in distributions()
        if d.metadata["Name"] and os.path.realpath(str(d.locate_file(""))).startswith(prefix)
    }
    keep = needed(sys.argv[1], installed)
except Exception as e:  # the install stands; only the removal is skipped
    print(f"remotedl: warning: cannot tell what {sys.argv[1]} needs ({e}): nothing uninstalled")
    sys.exit(0)
extra = sorted(d.metadata["Name"] for key, d in installed.items() if key not in keep)
if extra:
    print("remotedl: pip uninstall (no longer required):", " ".join(extra), flush=True)
    cmd = [sys.executable, "-m", "pip", "uninstall", "--disable-pip-version-check", "-y", *extra]
    sys.exit(subprocess.call(cmd))
"""

# "$1" kind, "$2" remote_dir, "$3" conda env, "$4" env_setup, "$5" the base python, "$6" setup_cmd,
# "$7" a requirements file made from pyproject.toml (pip without uv), "$8" PRUNE. Never the
# system pip. The project's .venv is made to match the file exactly (uv pip install --exact, or
# pip install and PRUNE); a conda or env_setup environment, shared and made by other means, only
# gets what the file adds.
INSTALL = (
    '_rdl_kind=$1 _rdl_rd=$2 _rdl_conda=$3 _rdl_setup=$4 _rdl_base=$5 _rdl_cmd=$6 _rdl_req=$7\n'
    '_rdl_prune=$8 _rdl_jd=\n'
    + ACTIVATE
    + r"""
cd "$_rdl_rd" || exit 1
say() { printf 'remotedl: %s\n' "$*"; }
if [ "$_rdl_kind" = setup_cmd ]; then
  _rdl_activate || exit 1
  say "setup_cmd: $_rdl_cmd"
  eval "$_rdl_cmd"
  exit $?
fi
if [ "$_rdl_kind" = environment.yml ]; then
  _rdl_find_conda || exit 1
  say "conda env update -n $_rdl_conda -f environment.yml"
  "$_rdl_cb/bin/conda" env update -n "$_rdl_conda" -f environment.yml
  exit $?
fi
if [ -n "$_rdl_conda$_rdl_setup" ]; then
  _rdl_activate || exit 1
  py=$(command -v python 2>/dev/null || command -v python3 2>/dev/null)
  "$py" -c 'import os, sys
sys.exit(sys.prefix == sys.base_prefix and not os.path.isdir(os.path.join(sys.prefix, "conda-meta")))' || {
    echo "remotedl: $py is a system interpreter, not a venv or conda environment:" \
      "remotedl never installs into it (set setup_cmd, or let env_setup activate a venv)" >&2
    exit 1; }
else
  py=$_rdl_rd/.venv/bin/python
  if [ ! -x "$py" ]; then
    if command -v uv >/dev/null 2>&1; then
      say "uv venv .venv"
      uv venv --python "$_rdl_base" "$_rdl_rd/.venv" || exit $?
    else
      say "$_rdl_base -m venv .venv"
      "$_rdl_base" -m venv "$_rdl_rd/.venv" || exit $?
    fi
  fi
fi
_rdl_exact=
[ -n "$_rdl_conda$_rdl_setup" ] || _rdl_exact=1
if command -v uv >/dev/null 2>&1; then
  case $_rdl_kind in
    uv.lock)
      say "uv sync --frozen --no-install-project"
      UV_PROJECT_ENVIRONMENT=$("$py" -c 'import sys; print(sys.prefix)') \
        uv sync --frozen --no-install-project ;;
    *)
      # --exact (uv 0.5 and later): resolved as an install (what is there and fits stays), then
      # what the file no longer needs is uninstalled.
      if [ -n "$_rdl_exact" ] && uv pip install --help 2>/dev/null | grep -q -e --exact; then
        say "uv pip install --exact -r $_rdl_kind"
        uv pip install --exact --python "$py" -r "$_rdl_kind"
      else
        [ -z "$_rdl_exact" ] ||
          say "warning: $(uv --version) has no pip install --exact: packages no longer required stay"
        say "uv pip install -r $_rdl_kind"
        uv pip install --python "$py" -r "$_rdl_kind"
      fi ;;
  esac
else
  case $_rdl_kind in
    requirements.txt) _rdl_req=requirements.txt ;;
  esac
  say "pip install -r $_rdl_req"
  "$py" -m pip install --disable-pip-version-check --no-input -r "$_rdl_req" || exit $?
  [ -z "$_rdl_exact" ] || "$py" -c "$_rdl_prune" "$_rdl_req"
fi
"""
)


@contextlib.contextmanager
def _project_lock(rdir: str) -> Iterator[None]:
    d = Path(rdir) / ".remotedl"
    d.mkdir(exist_ok=True)
    with open(d / "env.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _work_tree(req: dict[str, Any]) -> str:
    raw = str(req.get("remote_dir") or "")
    rdir = os.path.expanduser(raw)
    if not raw or not os.path.isdir(rdir):
        raise AgentError(
            f"the work tree {rdir or '(none)'} does not exist on the box",
            "usage",
            hint="push first (drop --no-push)",
        )
    return os.path.realpath(rdir)


def op_envsync(req: dict[str, Any]) -> None:
    """Make the project's environment match its requirements (when they changed since the
    last sync). The installer's output streams on stdout; the result is one line on stderr."""
    rdir = _work_tree(req)
    spec = dict(req.get("env") or {})
    out = sys.stdout.buffer
    sys.stderr.write("@@remotedl-start {}\n")
    sys.stderr.flush()
    plan = env_plan(rdir, spec)
    result: dict[str, Any] = {"ok": True, "needed": plan is not None, "synced": False, "plan": plan}
    if plan is not None:
        ensure_excludes(rdir)
        with _project_lock(rdir):
            if req.get("force") or not env_in_sync(rdir, plan, spec):
                req_file = ""
                if plan["kind"] in ("pyproject.toml", "uv.lock") and not shutil.which("uv"):
                    deps = _pyproject_deps((Path(rdir) / "pyproject.toml").read_text()) or []
                    req_path = Path(rdir) / ".remotedl" / "pyproject-requirements.txt"
                    req_path.write_text("".join(d + "\n" for d in deps))
                    req_file = str(req_path)
                argv = [
                    shell_for(spec.get("env_setup")),
                    "-c",
                    INSTALL,
                    "remotedl-env",
                    plan["kind"],
                    rdir,
                    plan["conda"] or "",
                    spec.get("env_setup") or "",
                    sys.executable,
                    spec.get("setup_cmd") or "",
                    req_file,
                    PRUNE,
                ]
                child = subprocess.Popen(
                    argv, cwd=rdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
                assert child.stdout is not None
                while chunk := os.read(child.stdout.fileno(), 65536):
                    out.write(chunk)
                    out.flush()
                code = child.wait()
                if code != 0:
                    error = f"installing the environment ({plan['kind']}) failed, exit {code}"
                    result.update(ok=False, error=error)
                else:
                    _stamp_path(rdir).write_text(json.dumps({"hash": plan["hash"], "when": time.time()}))
                    result["synced"] = True
    out.flush()
    sys.stderr.write("@@remotedl-end " + json.dumps({**result, "warnings": WARNINGS}) + "\n")
    sys.stderr.flush()


# ------------------------------------------------------------------ start


def _script_ok(rdir: str, commit: str | None, script: str, links: list[str]) -> bool:
    if commit is None:
        return os.path.exists(os.path.join(rdir, script))
    if _git(rdir, "cat-file", "-e", f"{commit}:{script}").returncode == 0:
        return True
    first = os.path.normpath(script).split(os.sep, 1)[0]
    return first in links and os.path.exists(os.path.join(rdir, script))


def _stall_after(value: Any) -> float | None:
    """Seconds without log output or GPU activity that make a running job stalled (None: off)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if seconds > 0 else None


def _fail_start(job_id: int, error: str) -> None:
    rec: dict[str, Any] | None = None
    with box_lock():
        with contextlib.suppress(AgentError):
            rec = load(job_id)
            if rec["status"] in ACTIVE:
                rec.update(status="failed", ended=time.time(), error=error)
                save(rec)
        remove_env_file(job_id)
        with contextlib.suppress(OSError):
            notify_path(job_id).unlink()  # the laptop is told at once; nothing to send
    kill_session(session_name(job_id))
    if rec is not None and runner_alive(rec):
        with contextlib.suppress(OSError):
            os.kill(int(rec["runner_pid"]), signal.SIGTERM)
    if rec is not None and not rec.get("pgid"):
        remove_job_dir(rec)  # nothing ran in it


def _new_session(name: str, cwd: str, argv: list[str]) -> None:
    r = _tmux("new-session", "-d", "-s", name, "-c", cwd, "-x", "200", "-y", "50", *argv)
    if r.returncode != 0:
        why = r.stderr.strip() or f"exit {r.returncode}"
        raise AgentError(f"tmux could not start the job: {why}")


def _wait_started(job_id: int) -> dict[str, Any]:
    """Until the runner recorded itself (and, unless queued, the job's process group)."""
    deadline = time.monotonic() + START_TIMEOUT
    next_check = time.monotonic() + 0.5
    while True:
        rec = load(job_id)
        if rec["status"] in ENDED or (rec.get("runner_pid") and rec["status"] in ("queued", "running")):
            return rec
        now = time.monotonic()
        if now >= next_check:
            if rec.get("runner_pid") and not runner_alive(rec):
                rec = load(job_id)
                if rec["status"] in ENDED:
                    return rec
                raise AgentError("the job's runner died while starting the job")
            sessions = tmux_sessions() if not rec.get("runner_pid") else None
            if sessions is not None and session_name(job_id) not in sessions:
                raise AgentError("the job's runner exited at once in tmux (see the box's tmux configuration)")
            next_check = now + 0.5
        if now >= deadline:
            raise AgentError(f"the job's runner did not start within {START_TIMEOUT:g} s")
        time.sleep(0.002)


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


def _login_umask() -> int:
    """This agent's umask: the one an ssh session of the user gets (pam_umask, the login
    shell's start-up files). The job gets it, not the tmux server's, which is whatever the
    first program to start that server had (`remotedl jupyter` starts it with 077)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def op_start(req: dict[str, Any]) -> dict[str, Any]:
    rdir = _work_tree(req)
    slurm = req.get("scheduler") == "slurm"
    if not slurm:
        check_tmux()
    data = [str(d) for d in req.get("data") or []]
    shared = [str(s) for s in req.get("shared") or []]
    links = [x for x in (_clean_rel(p) for p in data + shared) if x]
    isolate = bool(req.get("isolate", True))
    commit = req.get("git_commit")
    if isolate:
        head = git_head(rdir)
        commit = commit or head
        if commit is None:
            isolate = False  # not a git work tree: nothing to check out, run in it
        elif _git(rdir, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            raise AgentError(
                f"commit {commit[:10]} is not in the box's repository ({rdir})", "usage", hint="push it first"
            )
    script = req.get("script")
    if script and not _script_ok(rdir, commit if isolate else None, script, links):
        raise AgentError(
            f"no such script on the box: {os.path.join(rdir, script)}",
            "usage",
            hint="is it committed or pushed? `remotedl push` sends uncommitted files too",
        )
    spec = dict(req.get("environment") or {})
    if req.get("env_check"):
        plan = env_plan(rdir, spec)
        if plan is not None and not env_in_sync(rdir, plan, spec):
            return {"envsync": plan}
    if slurm:
        return _start_slurm(req, rdir, isolate=isolate, commit=commit, data=data, shared=shared, spec=spec)
    with box_lock():
        records = refresh(all_records())
        chosen = choose_gpus(req, records)
        job_id = _next_id(job_dirs_of(rdir))
        rec = _new_record(req, spec, job_id, rdir, isolate=isolate, commit=commit)
        rec.update(
            gpus=chosen if chosen is not None else [],
            want={k: req.get(k) for k in ("gpus", "count", "force")},
            status="queued" if chosen is None else "starting",
            log=str(logs_dir() / f"{job_id}.log"),
            session=session_name(job_id),
            boot_id=_boot_id(),
            ready=not isolate,
            runner_pid=None,
            pid=None,
            stall_after=_stall_after(req.get("stall_after")),  # stall detection: agent/events.py
            stalled=None,
            umask=_login_umask(),
            mark=secrets.token_hex(8),  # JOB_MARK in its processes' environment
        )
        _save_new(rec, req)
        fd = os.open(env_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(req.get("env") or {}, f)
        Path(rec["log"]).touch(mode=0o600)
    try:
        runner = [sys.executable, "-E", "-s", "-S", sys.argv[0], json.dumps({"op": "runner", "id": job_id})]
        # Several words: tmux (>= 3.0) runs them directly, not through the user's login shell.
        # The runner starts while the checkout is made, and waits for it ("ready").
        _new_session(rec["session"], rdir, runner)
        if isolate:
            ensure_excludes(rdir)
            workdir, linked = make_job_dir(rdir, job_id, str(commit), data, shared)
            rec = update(job_id, workdir=workdir, cwd=workdir, links=linked, ready=True)
        rec = _wait_started(job_id)
    except (AgentError, OSError) as e:
        error = e if isinstance(e, AgentError) else AgentError(f"could not start the job: {e}")
        _fail_start(job_id, str(error))
        raise error from None
    return {"job": rec}


def _start_slurm(
    req: dict[str, Any],
    rdir: str,
    *,
    isolate: bool,
    commit: str | None,
    data: list[str],
    shared: list[str],
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Record the job, make its checkout, and submit it with sbatch: Slurm picks the node and
    the GPUs, and queues it until they are free. Answers once sbatch has."""
    from remotedl import slurm as slurmmod

    try:
        settings = slurmmod.SlurmSettings.from_settings(req.get("slurm") or {})
    except RemotedlError as e:
        raise AgentError(e.message, "usage", hint=e.hint) from None
    count = 0 if req.get("gpus") == "none" else int(req.get("count") or 1)
    with box_lock():
        job_id = _next_id(job_dirs_of(rdir))
        ctl = Path(rdir).joinpath(*SLURM_DIRS) / str(job_id)
        rec = _new_record(req, spec, job_id, rdir, isolate=isolate, commit=commit)
        rec.update(
            want={"gpus": req.get("gpus"), "count": count},
            status="queued",
            log=str(ctl / "output.log"),
            ready=True,
            scheduler="slurm",
            control_dir=str(ctl),
            slurm_id=None,
            stall_after=_stall_after(req.get("stall_after")),  # log silence only (events.LogSilence)
            stalled=None,
        )  # notifications and stalls: a watcher on this login node (events.watch_slurm)
        _save_new(rec, req)
    try:
        workdir = rdir
        if isolate:
            ensure_excludes(rdir)
            workdir, linked = make_job_dir(rdir, job_id, str(commit), data, shared)
            rec = update(job_id, workdir=workdir, cwd=workdir, links=linked)
        job = slurmmod.BatchJob(
            job_id=str(job_id),
            command=req["command"],
            workdir=workdir,
            control_dir=str(ctl),
            log=rec["log"],
            remote_dir=rdir,
            name=rec["name"],
            gpus=count,
            env=req.get("env") or {},
            conda=spec.get("conda"),
            env_setup=spec.get("env_setup"),
        )
        submitted = slurmmod.submit_here(job, settings)
    except (RemotedlError, AgentError, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        hint = getattr(e, "hint", None)
        with box_lock(), contextlib.suppress(AgentError):
            failed = load(job_id)
            failed.update(status="failed", ended=time.time(), error=message)
            save(failed)
            remove_job_dir(failed)
            with contextlib.suppress(OSError):
                notify_path(job_id).unlink()  # the laptop is told at once; nothing to send
        raise AgentError(message, "error", hint=hint) from None
    for w in submitted.warnings:
        warn(w)
    rec = update(job_id, slurm_id=submitted.slurm_id, slurm_state="PENDING", starter_pid=None)
    if rec.get("stall_after") or notify_path(job_id).exists():
        from remotedl.agent import events

        events.watch_slurm()  # its start after the queue, stalls and end are watched from here
    return {"job": rec}


# ------------------------------------------------------------------ the runner


def _job_env(rec: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    with contextlib.suppress(OSError, ValueError):
        env.update(json.loads(env_path(int(rec["id"])).read_text()))
    remove_env_file(int(rec["id"]))  # values may be secrets: they live only as long as needed
    env.pop("TMUX", None)
    env.pop("TMUX_PANE", None)
    env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")  # logs stream, not block-buffered
    env["REMOTEDL_JOB_ID"] = str(rec["id"])
    if rec.get("mark"):
        env[JOB_MARK] = str(rec["mark"])
    env["REMOTEDL_JOB_DIR"] = str(rec["cwd"])
    env["REMOTEDL_REMOTE_DIR"] = str(rec.get("remote_dir") or rec["cwd"])
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers GPUs as nvidia-smi does
    if rec.get("gpus"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in rec["gpus"])
    elif rec.get("want", {}).get("gpus") == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job on a GPU box sees no GPU
    return env


def _wait_ready(rec: dict[str, Any]) -> dict[str, Any]:
    """Until the starter has made the job's checkout (or gave up, or died doing it)."""
    job_id = int(rec["id"])
    deadline = time.monotonic() + 3600  # a checkout of a huge tree takes a while
    while rec["status"] in ("starting", "queued") and not rec.get("ready", True):
        if not _alive(rec.get("starter_pid")) or time.monotonic() > deadline:
            rec = load(job_id)
            if rec.get("ready", True) or rec["status"] not in ("starting", "queued"):
                return rec
            with box_lock():
                rec = load(job_id)
                if rec["status"] in ("starting", "queued") and not rec.get("ready", True):
                    rec.update(status="failed", ended=time.time(), error="the start was interrupted")
                    save(rec)
            return rec
        time.sleep(0.002)
        rec = load(job_id)
    return rec


def _wait_in_queue(rec: dict[str, Any]) -> dict[str, Any]:
    job_id = int(rec["id"])
    said = False
    while rec["status"] == "queued":
        with box_lock():
            rec = load(job_id)
            if rec["status"] != "queued":
                break
            others = [r for r in refresh(all_records()) if r["id"] != job_id]
            if not blocked_by_earlier(rec, others):
                try:
                    chosen = choose_gpus(dict(rec["want"], queue=True), others)
                except AgentError as e:
                    rec.update(status="failed", ended=time.time(), error=str(e))
                    save(rec)
                    return rec
                if chosen is not None:
                    rec.update(status="starting", gpus=chosen)
                    save(rec)
                    break
        if not said:
            with contextlib.suppress(OSError):
                print(f"remotedl: job {job_id} queued, waiting for GPUs...", flush=True)
            said = True
        time.sleep(QUEUE_POLL)
    return rec


def _take_environment(job_id: int, raw: bytes) -> None:
    with contextlib.suppress(ValueError, AgentError):
        info = json.loads(raw.decode(errors="replace"))
        if isinstance(info, dict):
            with box_lock():
                rec = load(job_id)
                rec["environment"] = {**(rec.get("environment") or {}), **info}
                save(rec)


def _exit_of(code: int) -> int:
    return code if code >= 0 else 128 - code


def _wait_all(rec: dict[str, Any], child: subprocess.Popen[bytes]) -> None:
    """The job's main process, then what it left running (``nohup cmd &``, a daemon): the job
    runs, and holds its GPUs, until they are gone too; its record says how many are left."""
    child.wait()
    said = None
    while left := len(job_processes(rec)):
        if left != said:
            with box_lock():
                fresh = load(int(rec["id"]))
                if fresh["status"] == "running":
                    fresh.update(main_exit=_exit_of(child.returncode), leftovers=left)
                    save(fresh)
            said = left
        time.sleep(QUEUE_POLL)


def _run_job(rec: dict[str, Any], *, waited: bool = False) -> None:
    job_id = int(rec["id"])
    env = _job_env(rec)
    watched = notify_path(job_id).exists() or bool(rec.get("stall_after"))
    spec = rec.get("environment") or {}
    nonce = secrets.token_hex(8)
    argv = [
        shell_for(spec.get("env_setup")),
        "-c",
        WRAPPER,
        "remotedl-job",
        rec["command"],
        rec.get("workdir") or "",
        str(rec.get("remote_dir") or rec["cwd"]),
        spec.get("conda") or "",
        spec.get("env_setup") or "",
        nonce,
        PROBE,
    ]
    log = open(rec["log"], "ab", buffering=0)  # noqa: SIM115 - closed below after the pump
    with box_lock():
        rec = load(job_id)
        if rec["status"] != "starting":
            log.close()
            return  # killed while it was being started
        try:
            child = subprocess.Popen(
                argv,
                cwd=rec["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,  # a read gets EOF, never waits on the tmux pane
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=int(rec["umask"]) if rec.get("umask") is not None else -1,
            )
        except OSError as e:
            log.write(f"remotedl: cannot start: {e}\n".encode())
            log.close()
            rec.update(status="failed", ended=time.time(), error=str(e))
            save(rec)
            return
        rec.update(status="running", pid=child.pid, pgid=child.pid, started=time.time())
        save(rec)
    watch = None
    if watched:  # imported once the job runs: its start never waits for this
        from remotedl.agent import events

        events.HIDE = tuple(env[k] for k in rec.get("env_keys") or [] if k in env)
        if waited:  # it waited in the queue: say it started, without holding up its output
            events.in_background(events.send, job_id, "started")
        if rec.get("stall_after"):
            watch = events.StallWatch(rec)
            watch.start()
    assert child.stdout is not None
    waiter = threading.Thread(target=_wait_all, args=(rec, child), daemon=True)
    waiter.start()  # the output of processes left behind goes on to the log meanwhile
    out = sys.stdout.buffer
    fd = child.stdout.fileno()
    tag = f"@@remotedl-env:{nonce} ".encode()
    pending = b""
    probing = True
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if probing:  # the environment line goes to the record, not the log
            pending += chunk
            at = pending.find(tag)
            end = pending.find(b"\n", at) if at >= 0 else -1
            if end >= 0:
                _take_environment(job_id, pending[at + len(tag) : end])
                chunk = pending[:at] + pending[end + 1 :]
            elif len(pending) > (1 << 20):
                chunk = pending
            else:
                continue
            probing = False
            pending = b""
        log.write(chunk)
        if watch is not None:
            watch.output()
        with contextlib.suppress(OSError):  # the pane may be gone: the log is what counts
            out.write(chunk)
            out.flush()
    if pending:
        log.write(pending)
    log.close()
    waiter.join()
    if watch is not None:
        watch.stop()
    exit_code = _exit_of(child.wait())  # the main process's: the job's exit status
    with box_lock():
        rec = load(job_id)
        killed = kill_marker(job_id).exists()
        rec.update(
            status="killed" if killed else ("succeeded" if exit_code == 0 else "failed"),
            exit_code=exit_code,
            ended=time.time(),
            stalled=None,
            leftovers=0,
        )
        save(rec)


def _ignore(signum: int, frame: Any) -> None:
    pass


def op_runner(req: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the job's tmux session: wait for GPUs if queued, run, record the end.
    It outlives its tmux session (SIGHUP is caught, not ignored: the job gets the default
    disposition back at exec), so the log and the end are recorded even then."""
    job_id = int(req["id"])
    signal.signal(signal.SIGHUP, _ignore)
    try:
        rec = update(job_id, runner_pid=os.getpid())
        rec = _wait_ready(rec)
        waited = rec["status"] == "queued"
        rec = _wait_in_queue(rec)
        if rec["status"] == "starting":
            _run_job(rec, waited=waited)
    finally:
        remove_env_file(job_id)
        if notify_path(job_id).exists():  # the end, from the box: the laptop may be asleep
            from remotedl.agent import events

            events.ended(job_id)
    return {}


# ------------------------------------------------------------------ list, get, kill


def op_list(req: dict[str, Any]) -> dict[str, Any]:
    _ensure_dirs()
    records = refresh(all_records())
    if not req.get("all"):
        recent = [r for r in records if r["status"] not in ACTIVE][-10:]
        records = [r for r in records if r["status"] in ACTIVE or r in recent]
    return {"jobs": records}


def op_get(req: dict[str, Any]) -> dict[str, Any]:
    return {"job": resolve(req.get("job"), req.get("project"))}


def op_intree(req: dict[str, Any]) -> dict[str, Any]:
    """Active jobs running in the work tree itself (isolate = false): a push changes their files."""
    raw = str(req.get("remote_dir") or "")
    pdir = _real(raw)
    if not raw or not os.path.isdir(pdir) or not jobs_dir().exists():
        return {"jobs": []}
    records = refresh(all_records())
    running = [
        r
        for r in records
        if r["status"] in ACTIVE and not r.get("isolated") and _real(str(r.get("cwd") or "")) == pdir
    ]
    return {"jobs": running, "head": git_head(pdir) if running else None}


def _ended_words(rec: dict[str, Any]) -> str:
    if rec["status"] == "failed" and rec.get("exit_code") is not None:
        return f"failed (exit {rec['exit_code']})"
    return str(rec["status"])


def _kill_slurm(rec: dict[str, Any], grace: float) -> dict[str, Any]:
    """scancel, then wait until Slurm says the job ended (KillWait may be 30 s or more)."""
    from remotedl import slurm as slurmmod

    job_id = int(rec["id"])
    if not rec.get("slurm_id"):
        raise AgentError(
            f"job {job_id} is being submitted to Slurm right now", hint="kill it again in a moment"
        )
    kill_marker(job_id).touch()
    try:
        slurmmod.cancel_here(slurm_ref(rec), wait=max(60.0, 3 * grace))
    except RemotedlError as e:
        raise AgentError(e.message, hint=e.hint) from None
    return {"job": refresh([load(job_id)])[0], "signals": ["scancel"]}


def op_kill(req: dict[str, Any]) -> dict[str, Any]:
    ref = req.get("job")
    rec = resolve(ref, req.get("project"), active_only=ref in (None, "", "last"))
    grace = float(req.get("grace", 10))
    job_id = int(rec["id"])
    if rec["status"] not in ACTIVE:
        raise AgentError(
            f"job {job_id} ({rec.get('name')}) is not running: it {_ended_words(rec)}",
            "notrunning",
            hint=f"`remotedl logs {job_id}` shows its output",
        )
    if is_slurm(rec):
        return _kill_slurm(rec, grace)
    kill_marker(job_id).touch()
    with box_lock():
        rec = load(job_id)
        not_started = rec["status"] in ("queued", "starting") and not rec.get("pgid")
        if not_started:
            rec.update(status="killed", ended=time.time())
            save(rec)
            remove_env_file(job_id)
    if not_started:
        kill_session(rec["session"])
        if runner_alive(rec):
            with contextlib.suppress(OSError):
                os.kill(int(rec["runner_pid"]), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and runner_alive(rec):
                time.sleep(0.02)
        ended_elsewhere(job_id, "killed")  # after the runner: it may have died mid-send
        return {"job": load(job_id)}
    if rec["status"] not in ACTIVE:
        return {"job": rec}
    steps = []  # to its process group and its processes that left the group
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not signal_job(rec, sig):
            break
        steps.append(signal.Signals(sig).name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and job_alive(rec):
            time.sleep(0.1)
        if not job_alive(rec):
            break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and runner_alive(rec) and load(job_id)["status"] in ACTIVE:
        time.sleep(0.05)
    rec = refresh([load(job_id)])[0]  # no runner left to record the end: killed, by the marker
    return {"job": rec, "signals": steps}


# ------------------------------------------------------------------ logs


def op_logs(req: dict[str, Any]) -> dict[str, Any] | None:
    """Stream the log from ``offset`` (or the last ``lines``) to stdout; with ``follow``,
    until the job ends. The end status goes to stderr as one JSON line."""
    rec = resolve(req.get("job"), req.get("project"))
    path = rec["log"]
    out = sys.stdout.buffer
    offset = int(req.get("offset") or 0)
    try:
        f = open(path, "rb")  # noqa: SIM115 - long-lived, closed below
    except FileNotFoundError:
        raise AgentError(f"the log of job {rec['id']} is gone ({path})", "notfound") from None
    with f:
        if req.get("lines") is not None and not offset:
            offset = _tail_offset(f, int(req["lines"]))
        f.seek(offset)
        # The client counts bytes from here, so a reconnect resumes exactly where it left off.
        start = {"job": rec["id"], "offset": offset, "warnings": WARNINGS}
        sys.stderr.write("@@remotedl-start " + json.dumps(start) + "\n")
        sys.stderr.flush()
        idle = 0.0
        if not req.get("follow"):
            _send_rest(f, offset)
            sys.stderr.write("@@remotedl-end " + json.dumps({"job": rec}) + "\n")
            return None
        slurm = is_slurm(rec)
        said = _say_state(rec, None) if slurm else None
        last_check = time.monotonic()
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                out.write(chunk)
                idle = 0.0
                continue
            out.flush()
            if slurm:
                # Each look is an RPC to slurmctld: every few seconds, or at once when the batch
                # script has recorded its end.
                ended = os.path.exists(os.path.join(str(rec.get("control_dir")), "exit"))
                due = time.monotonic() - last_check >= (0.2 if ended else SLURM_POLL)
            else:
                due = idle >= 0.5 or idle == 0.0
            if due:
                last_check = time.monotonic()
                rec = refresh([load(int(rec["id"]))])[0]
                said = _say_state(rec, said)
                if rec["status"] not in ACTIVE:
                    chunk = f.read()  # what the job wrote just before it ended
                    if chunk:
                        out.write(chunk)
                        out.flush()
                    break
                idle = 0.0 if idle >= 0.5 else idle
            time.sleep(0.05)
            idle += 0.05
    sys.stderr.write("@@remotedl-end " + json.dumps({"job": rec}) + "\n")
    sys.stderr.flush()
    return None


def _say_state(rec: dict[str, Any], said: str | None) -> str | None:
    """Tell the follower (on stderr) the Slurm job's state when it changed: why it waits; a
    box job's once its main process exited and processes it left still run."""
    if not is_slurm(rec):
        left = int(rec.get("leftovers") or 0)
        if rec["status"] != "running" or rec.get("main_exit") is None or not left:
            return said
        words = outlived_words(int(rec["main_exit"]), left)
    else:
        state = str(rec.get("slurm_state") or "PENDING")
        words = slurm_words(state, rec.get("slurm_reason"), rec.get("node"), rec.get("exit_code"))
    if words != said:
        note = {"job": rec["id"], "status": rec["status"], "state": words}
        sys.stderr.write("@@remotedl-state " + json.dumps(note) + "\n")
        sys.stderr.flush()
    return words


def _send_rest(f: Any, offset: int) -> None:
    """Copy the file from ``offset`` to stdout in the kernel (sendfile), else by chunks."""
    out_fd = sys.stdout.fileno()
    sys.stdout.flush()
    try:
        while True:
            sent = os.sendfile(out_fd, f.fileno(), offset, 1 << 24)
            if sent == 0:
                return
            offset += sent
    except OSError:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


def _tail_offset(f: Any, lines: int) -> int:  # f: a binary file
    f.seek(0, os.SEEK_END)
    end = pos = f.tell()
    found = 0
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        if pos + step == end and block.endswith(b"\n"):
            block = block[:-1]
        for i in range(len(block) - 1, -1, -1):
            if block[i] == 10:
                found += 1
                if found == lines:
                    return int(pos + i + 1)
    return 0


# ------------------------------------------------------------------ pull sources


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def op_locate(req: dict[str, Any]) -> dict[str, Any]:
    """Where each path to pull lives: the project's latest job that has it (or the job asked
    for), or the work tree (``tree``, or a data/shared path, which live there)."""
    pdir = _real(str(req.get("remote_dir") or ""))
    paths = [str(p) for p in req.get("paths") or []]
    ref = req.get("job")
    if req.get("tree"):
        pool: list[dict[str, Any]] = []
    elif ref not in (None, ""):
        pool = [resolve(ref, req.get("remote_dir"))]
    else:
        pool = [r for r in reversed(refresh(all_records())) if project_of(r) == pdir]
    sources = []
    for path in paths:
        rel = os.path.normpath(path)
        if os.path.isabs(rel) or rel.startswith(".."):
            raise AgentError(f"{path}: give paths relative to the project", "usage")
        found: dict[str, Any] | None = None
        for r in pool:
            base = str(r.get("workdir") or r.get("cwd") or "")
            if not base or not os.path.lexists(os.path.join(base, rel)):
                continue
            real_base = os.path.realpath(base)
            real = os.path.realpath(os.path.join(base, rel))
            if _inside(real, real_base) or not _inside(real, pdir):
                found = {"dir": base, "job": r["id"], "name": r.get("name"), "links": r.get("links") or []}
            else:  # a data or shared path: it lives in the work tree
                found = {"dir": pdir, "job": r["id"], "name": r.get("name"), "shared": True, "links": []}
            break
        if found is None and ref not in (None, "") and not req.get("tree"):
            r = pool[0]
            where = f"job {r['id']} ({r.get('name')})'s directory"
            raise AgentError(f"{rel} does not exist in {where}", "notfound")
        if found is None:
            if not pdir or not os.path.lexists(os.path.join(pdir, rel)):
                where = "the work tree" if req.get("tree") else "any job of this project nor in the work tree"
                raise AgentError(f"{rel} does not exist in {where} ({pdir})", "notfound")
            found = {"dir": pdir, "job": None, "name": None, "links": []}
        sources.append({"path": rel, **found})
    return {"sources": sources}


# ------------------------------------------------------------------ rm, prune


def _remove(job_id: int, *, dry_run: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(what was (or would be) removed, or why not)."""
    with box_lock():
        try:
            rec: dict[str, Any] | None = load(job_id)
        except AgentError as e:
            if e.kind == "notfound":
                return None, f"no job {job_id} on this box"
            rec = None  # damaged: its files go
        if rec is not None:
            rec = refresh([rec])[0]
            if rec["status"] in ACTIVE:
                return None, f"job {job_id} ({rec.get('name')}) is {rec['status']}: kill it first"
        files = [
            record_path(job_id),
            env_path(job_id),
            notify_path(job_id),
            kill_marker(job_id),
            logs_dir() / f"{job_id}.log",
        ]
        if rec is not None and rec.get("log"):
            log = Path(str(rec["log"]))
            if log.parent == logs_dir():
                files.append(log)
        jd = _own_job_dir(rec) if rec is not None else None
        ctl = _own_control_dir(rec) if rec is not None else None
        size = sum(disk_usage(p) for p in set(files)) + (disk_usage(jd) if jd else 0)
        size += disk_usage(ctl) if ctl else 0
        item = {
            "id": job_id,
            "name": (rec or {}).get("name"),
            "status": (rec or {}).get("status", "damaged"),
            "bytes": size,
            "dir": str(jd) if jd else None,
        }
        if not dry_run:
            if rec is not None:
                remove_job_dir(rec)
            if ctl is not None:
                shutil.rmtree(ctl, ignore_errors=True)
            for p in set(files):
                with contextlib.suppress(OSError):
                    p.unlink()
        return item, None


def _remove_many(ids: list[int], dry_run: bool) -> dict[str, Any]:
    removed, refused = [], []
    for job_id in ids:
        item, why = _remove(job_id, dry_run=dry_run)
        if item is not None:
            removed.append(item)
        if why:
            refused.append(why)
    return {"removed": removed, "refused": refused, "bytes": sum(int(i["bytes"]) for i in removed)}


def op_rm(req: dict[str, Any]) -> dict[str, Any]:
    ids = [int(i) for i in req.get("ids") or []]
    return _remove_many(ids, bool(req.get("dry_run")))


def op_prune(req: dict[str, Any]) -> dict[str, Any]:
    """This project's ended jobs that ended more than ``older_than`` seconds ago."""
    pdir = _real(str(req.get("remote_dir") or ""))
    cutoff = time.time() - float(req.get("older_than") or 0)
    ids = [
        int(r["id"])
        for r in refresh(all_records())
        if project_of(r) == pdir
        and r["status"] in ENDED
        and float(r.get("ended") or r.get("created") or 0) <= cutoff
    ]
    result = _remove_many(ids, bool(req.get("dry_run")))
    if not req.get("dry_run") and os.path.isdir(os.path.join(pdir, ".git")):
        _git(pdir, "worktree", "prune")
    return result


# ------------------------------------------------------------------ GPUs


def op_gpus(req: dict[str, Any]) -> dict[str, Any]:
    found = query_gpus()
    records = refresh(all_records()) if jobs_dir().exists() else []
    if found is None:
        return {"gpus": None}
    held = _holders(found, records)
    return {"gpus": [{"index": g.index, "name": g.name, "held_by": held.get(g.index)} for g in found]}


def _events_op(req: dict[str, Any]) -> dict[str, Any]:
    from remotedl.agent import events

    return events.op_notify(req)


def _slurm_watch_op(req: dict[str, Any]) -> dict[str, Any]:
    from remotedl.agent import events

    return events.op_slurm_watch(req)


OPS: dict[str, Callable[[dict[str, Any]], dict[str, Any] | None]] = {
    "start": op_start,
    "runner": op_runner,
    "list": op_list,
    "get": op_get,
    "kill": op_kill,
    "logs": op_logs,
    "gpus": op_gpus,
    "locate": op_locate,
    "rm": op_rm,
    "prune": op_prune,
    "envsync": op_envsync,
    "intree": op_intree,
    "notify": _events_op,
    "slurm_watch": _slurm_watch_op,
}
STREAMING = ("logs", "envsync")


def read_request(argv: list[str]) -> dict[str, Any]:
    """The request: JSON on stdin from the laptop, or in argv for the agent's own runner."""
    raw = argv[0].encode() if argv else sys.stdin.buffer.read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        raise ValueError("request too large")
    req = json.loads(raw)
    if not isinstance(req, dict) or req.get("op") not in OPS:
        raise ValueError("not a request")
    return req


def main(argv: list[str]) -> int:
    try:
        req = read_request(argv)
        op = OPS[req["op"]]
    except (ValueError, KeyError, UnicodeDecodeError):
        # Never echo the request: it may hold secrets.
        print(json.dumps({"ok": False, "kind": "protocol", "error": "the agent got a malformed request"}))
        return 2
    adopt = req.get("adopt")
    if isinstance(adopt, dict):  # the default remote_dir: keep a tree under the older default
        treeid.adopt_tree(*(str(adopt.get(k) or "") for k in ("dir", "id", "legacy")))
    try:
        result = op(req)
    except AgentError as e:
        answer = {"ok": False, "kind": e.kind, "error": str(e), "hint": e.hint, "warnings": WARNINGS}
        if req["op"] in STREAMING:
            sys.stderr.write("@@remotedl-error " + json.dumps(answer) + "\n")
            return 3
        print(json.dumps(answer))
        return 3
    except gpumod.NvidiaSmiError as e:
        print(json.dumps({"ok": False, "kind": "error", "error": str(e)}))
        return 3
    if result is not None and req["op"] != "runner":
        print(json.dumps({"ok": True, **result, **({"warnings": WARNINGS} if WARNINGS else {})}))
    return 0
