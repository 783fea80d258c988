"""Box side of job events: notifications sent from the box, and stall detection.

The laptop may be asleep when a job ends, so the box sends: the job's runner when the job
ends or starts after waiting in the queue, its stall watch when the job stalls, and a
detached ``notify`` request of the agent when a job ends with no runner left to tell (lost,
or killed before it ran). Each event is sent once (the record's ``events_sent`` is claimed
under the box lock), its outcomes are recorded in the job (``notifications``: masked URL, ok,
error), and nothing here ever fails a job.

The URLs (secrets) live in ``jobs/<id>.notify`` (0600) only as long as the job can still send;
the record holds them masked. Proxy settings of the session that started the job are kept with
them, so a runner whose tmux server has an older environment still reaches the services.

Stall: while a job runs, no output to its log for ``stall_after`` seconds, or (GPU jobs) no
utilization on any of its GPUs that long, marks it ``stalled`` in its record (it keeps
running) and sends one notification; output or GPU activity clears the mark. Utilization comes
from one ``nvidia-smi`` query per interval for the whole box (``gpu-sample.json``, refreshed by
whichever job's watch finds it old).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from remotedl import gpus as gpumod
from remotedl import notify
from remotedl.agent.runtimes.slurm import refresh_slurm
from remotedl.agent.store import (
    AgentError,
    Context,
    active_records,
    box_lock,
    is_slurm,
    load,
    notify_path,
    save,
    state_dir,
)
from remotedl.schema import ACTIVE, NotifyRequest, SlurmWatchRequest
from remotedl.waiting import pid_alive

# What a send needs of the starting session's environment (proxies, the CA store).
PROXY_VARS = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
MAX_OUTCOMES = 60
STALL_MIN_INTERVAL = 0.5  # seconds between looks, at least...
STALL_MAX_INTERVAL = 60.0  # ...and at most
SAMPLE_FILE = "gpu-sample.json"


def save_settings(job_id: int, urls: list[str], host: str | None) -> list[str]:
    """Keep the URLs for the job's runner (0600); the masked URLs for its record."""
    data = {
        "urls": urls,
        "host": host,
        "env": {k: os.environ[k] for k in PROXY_VARS if k in os.environ},
    }
    fd = os.open(notify_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    return [notify.mask_url(u) for u in urls]


def _settings(job_id: int) -> dict[str, Any] | None:
    try:
        data = json.loads(notify_path(job_id).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("urls"), list) or not data["urls"]:
        return None
    return data


def remove_settings(job_id: int) -> None:
    with contextlib.suppress(OSError):
        notify_path(job_id).unlink()


def send(
    job_id: int,
    event: str,
    hide: tuple[str, ...] = (),
    *,
    key: str | None = None,
    note: str | None = None,
    tail: bool = True,
) -> None:
    """Send the job's notification for ``event`` unless it was sent already (``key``: what
    makes it the same event; default the event's name). Outcomes go to the record. ``hide``:
    the job's --env values, known to its runner only, hidden in the log lines it carries (a
    notification sent by another process carries no log lines)."""
    settings = _settings(job_id)
    if settings is None:
        return
    key = key or event
    with box_lock():
        try:
            rec = load(job_id)
        except AgentError:
            return
        if key in (rec.get("events_sent") or []):
            return
        # Claimed by a live process: it sends. A claimant that died mid-send (a queued job's
        # runner is stopped with SIGTERM) leaves it to whoever comes next.
        claims = dict(rec.get("event_claims") or {})
        claimant = claims.get(key)
        if claimant and claimant != os.getpid() and pid_alive(int(claimant)):
            return
        claims[key] = os.getpid()
        rec["event_claims"] = claims
        save(rec)
    for k, v in (settings.get("env") or {}).items():
        if k in PROXY_VARS and isinstance(v, str):
            os.environ[k] = v
    text = notify.log_tail(str(rec.get("log") or ""), hide=hide) if tail else ""
    host = str(settings.get("host") or rec.get("host") or "the box")
    ev = notify.job_event(rec, event, host, tail=text, note=note)
    outcomes = notify.send_all([str(u) for u in settings["urls"]], ev)
    with box_lock(), contextlib.suppress(AgentError):
        rec = load(job_id)
        done = list(rec.get("notifications") or [])
        done += [{"event": event, **o.to_dict()} for o in outcomes]
        rec["notifications"] = done[-MAX_OUTCOMES:]
        rec["events_sent"] = [*(rec.get("events_sent") or []), key]
        rec["event_claims"] = {k: v for k, v in (rec.get("event_claims") or {}).items() if k != key}
        save(rec)


# Sends running beside the job (its start after the queue): finished before the runner exits.
_PENDING: list[threading.Thread] = []


def in_background(fn: Any, *args: Any) -> None:
    t = threading.Thread(target=fn, args=args, daemon=True)
    _PENDING.append(t)
    t.start()


def ended(job_id: int, hide: tuple[str, ...] = ()) -> None:
    """The job ended (its runner says so): send, then drop the URLs."""
    for t in _PENDING:
        t.join(notify.SEND_TIMEOUT + 30)
    try:
        rec = load(job_id)
    except AgentError:
        return
    if rec["status"] in ("succeeded", "failed", "killed", "lost", "preempted"):
        send(job_id, str(rec["status"]), hide, key="ended", tail=rec["status"] != "lost")
        remove_settings(job_id)


def detached(request: dict[str, Any]) -> None:
    """Start the agent on ``request`` in a process of its own (a new session, no terminal, no
    pipes), which outlives the request that started it."""
    argv = [sys.executable, "-E", "-s", "-S", sys.argv[0], json.dumps(request)]
    with contextlib.suppress(OSError):
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )


def spawn(job_id: int, event: str) -> None:
    """Send from a detached process of the agent: the caller (an agent request the laptop waits
    for) answers now; the send may take seconds."""
    if notify_path(job_id).exists():
        detached({"op": "notify", "id": job_id, "event": event})


def announce(ctx: Context, records: list[dict[str, Any]]) -> None:
    """What a request's looks found, sent from processes of their own (the request answers
    now), and a watcher for the Slurm jobs among ``records`` that need one."""
    for job_id, event in ctx.news:
        spawn(job_id, event)
    ctx.news.clear()
    if slurm_watched(records):
        watch_slurm()


def op_notify(ctx: Context, req: NotifyRequest) -> dict[str, Any]:
    job_id = req.id
    event = req.event
    if event in ("succeeded", "failed", "killed", "lost", "preempted"):
        ended(job_id)
    elif event == "started":
        send(job_id, "started")
    return {}


# ------------------------------------------------------------------ Slurm jobs, watched

# Seconds between looks at the Slurm jobs that have notifications (one scontrol per job).
SLURM_WATCH_INTERVAL = 30.0
SLURM_WATCH_LOCK = "slurm-watch.lock"


def _slurm_watch_interval() -> float:
    try:
        value = float(os.environ.get("REMOTEDL_SLURM_WATCH_INTERVAL") or SLURM_WATCH_INTERVAL)
    except ValueError:
        return SLURM_WATCH_INTERVAL
    return min(max(value, 0.5), 3600.0)


def _watch_lock() -> int | None:
    """The watcher's lock (held for its life), or None when another watcher holds it."""
    fd = os.open(state_dir() / SLURM_WATCH_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def watch_slurm() -> None:
    """Make sure a watcher runs on this login node: a Slurm job has no runner of ours beside it
    to say when it starts after the queue, stalls or ends, and the laptop may be asleep."""
    fd = _watch_lock()
    if fd is None:
        return  # one runs
    os.close(fd)  # released: the detached watcher takes it (or a rival one did: fine)
    detached({"op": "slurm_watch"})


def slurm_watched(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The active Slurm jobs among ``records`` that the watcher looks after: those with
    notifications or a stall watch."""
    active = [r for r in records if is_slurm(r) and r.get("status") in ACTIVE and r.get("slurm_id")]
    return [r for r in active if r.get("stall_after") or notify_path(int(r["id"])).exists()]


def _watched_slurm_jobs() -> list[dict[str, Any]]:
    return slurm_watched(active_records())


def _moved(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Those of ``records`` whose Slurm state may have changed: one squeue for all of them,
    so a job that sits in the queue or runs on costs no scontrol of its own."""
    from remotedl import slurm as slurmmod

    queue = slurmmod.queue_here()
    if queue is None:
        return records  # no squeue answer: ask about each
    out = []
    for r in records:
        seen = queue.get(str(r.get("slurm_id")))
        if seen is None or (seen.state, seen.reason or None) != (r.get("slurm_state"), r.get("slurm_reason")):
            out.append(r)  # left the queue, or moved on in it
    return out


def op_slurm_watch(ctx: Context, req: SlurmWatchRequest) -> dict[str, Any]:
    """The watcher: every interval, Slurm's state of the active Slurm jobs that have
    notifications or a stall watch (``refresh_slurm`` records it and sends their start after a
    wait and their end), and the logs of those running (``LogSilence``); gone when none is
    left. One per user and login node (a lock in the state dir)."""
    interval = _slurm_watch_interval()
    stalls: dict[int, LogSilence] = {}
    while True:
        fd = _watch_lock()
        if fd is None:
            return {}  # another watcher has it
        try:
            while todo := _watched_slurm_jobs():
                refresh_slurm(ctx, _moved(todo))
                for job_id, event in ctx.news:  # a start after the queue, an end
                    spawn(job_id, event)
                ctx.news.clear()
                running = [r for r in todo if r.get("status") == "running" and r.get("stall_after")]
                stalls = {int(r["id"]): stalls.get(int(r["id"])) or LogSilence(r) for r in running}
                for watch in stalls.values():
                    with contextlib.suppress(Exception):  # the watch never breaks anything
                        watch.look()
                time.sleep(min([interval, *(w.interval for w in stalls.values())]))
        finally:
            os.close(fd)
        # A job submitted while this one was leaving found the lock held and started no
        # watcher: look once more with the lock released.
        if not _watched_slurm_jobs():
            return {}


# ------------------------------------------------------------------ GPU utilization, shared


def gpu_utilization(max_age: float) -> dict[int, int | None] | None:
    """Utilization per GPU index from a sample at most ``max_age`` seconds old; one nvidia-smi
    query refreshes it for every job on the box. None: no NVIDIA driver, or it failed."""
    path = state_dir() / SAMPLE_FILE
    fresh = _read_sample(path, max_age)
    if fresh is not None:
        return fresh
    with open(state_dir() / (SAMPLE_FILE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fresh = _read_sample(path, max_age)  # another job's watch took it meanwhile
            if fresh is not None:
                return fresh
            try:
                out = subprocess.run(
                    gpumod.QUERY_GPUS, capture_output=True, text=True, check=False, timeout=30
                )
                found = gpumod.parse_gpus(out.stdout) if out.returncode == 0 else None
            except (OSError, subprocess.TimeoutExpired, gpumod.NvidiaSmiError):
                found = None
            util = {g.index: g.utilization_pct for g in found} if found is not None else None
            tmp = path.with_name(f"{SAMPLE_FILE}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"at": time.time(), "util": util}))
            os.replace(tmp, path)
            return util
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_sample(path: Any, max_age: float) -> dict[int, int | None] | None:
    try:
        data = json.loads(path.read_text())
        if time.time() - float(data["at"]) > max_age:
            return None
        util = data["util"]
        return {int(k): v for k, v in util.items()} if isinstance(util, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------ stall watch


class Stall:
    """Whether one running job is stalled: no log output (``output()`` says there was), or no
    utilization on any of its GPUs, for ``stall_after``; marks the record and notifies once per
    stall, and clears the mark on activity."""

    def __init__(self, rec: dict[str, Any], *, gpus: bool = True, hide: tuple[str, ...] = ()) -> None:
        self.job_id = int(rec["id"])
        self.hide = hide
        self.gpus = [int(g) for g in rec.get("gpus") or []] if gpus else []
        self.after = float(rec["stall_after"])
        self.interval = min(max(self.after / 4, STALL_MIN_INTERVAL), STALL_MAX_INTERVAL)
        now = time.time()
        self.last_output = now
        self.last_gpu = now
        self.stalled_since: float | None = None

    def output(self) -> None:
        self.last_output = time.time()

    def reasons(self, now: float) -> list[str]:
        out = []
        span = notify.duration_words(self.after)
        if now - self.last_output >= self.after:
            out.append(f"no new log output for {span}")
        if self.gpus and now - self.last_gpu >= self.after:
            which = ("GPU " if len(self.gpus) == 1 else "GPUs ") + ",".join(map(str, self.gpus))
            out.append(f"no activity on {which} for {span}")
        return out

    def look(self) -> None:
        now = time.time()
        if self.gpus:
            util = gpu_utilization(self.interval)
            if util is None or any((util.get(g) or 0) > 0 for g in self.gpus):
                # No reading is no evidence of a stall; any activity on any of its GPUs counts.
                self.last_gpu = now
        reasons = self.reasons(now)
        if reasons and self.stalled_since is None:
            self.stalled_since = now
            reason = "; ".join(reasons)
            if self._mark({"since": now, "reason": reason}):
                send(self.job_id, "stalled", self.hide, key=f"stalled@{now:.3f}", note="stalled: " + reason)
        elif not reasons and self.stalled_since is not None:
            self.stalled_since = None
            self._mark(None)

    def _mark(self, stalled: dict[str, Any] | None) -> bool:
        with box_lock():
            try:
                rec = load(self.job_id)
            except AgentError:
                return False
            if rec["status"] != "running":
                return False
            rec["stalled"] = stalled
            if stalled is not None:
                rec["stalls"] = int(rec.get("stalls") or 0) + 1
            save(rec)
            return True


class StallWatch(threading.Thread):
    """A box job's stall watch, a thread of its runner, which sees every chunk of its output."""

    def __init__(self, rec: dict[str, Any], hide: tuple[str, ...] = ()) -> None:
        super().__init__(daemon=True, name=f"stall-watch-{rec['id']}")
        self.stall = Stall(rec, hide=hide)
        self.done = threading.Event()

    def output(self) -> None:
        self.stall.output()

    def stop(self) -> None:
        self.done.set()
        self.join(5)

    def run(self) -> None:
        while not self.done.wait(self.stall.interval):
            with contextlib.suppress(Exception):  # the watch never breaks the job
                self.stall.look()


class LogSilence(Stall):
    """A Slurm job's stall watch, from the login node: its log (on the shared filesystem) not
    growing. Its GPUs are on a node the login node cannot see."""

    def __init__(self, rec: dict[str, Any]) -> None:
        super().__init__(rec, gpus=False)
        self.log = os.path.expanduser(str(rec.get("log") or ""))
        self.size = self._size()

    def _size(self) -> int:
        try:
            return os.stat(self.log).st_size
        except OSError:
            return -1

    def look(self) -> None:
        size = self._size()
        if size != self.size:
            self.size = size
            self.output()
        super().look()
