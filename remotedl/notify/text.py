"""What a notification says: the ``Event``, and a job's event text (name, host, GPUs, duration,
exit status, the last lines of its log)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

from remotedl.notify.urls import MASK


@dataclass
class Event:
    """What a notification says: a title, text, and the job's fields for JSON consumers."""

    kind: str  # succeeded, failed, killed, lost, started, stalled, test
    title: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> str:  # Apprise's notification types
        if self.kind == "succeeded":
            return "success"
        if self.kind in ("failed", "lost", "killed", "preempted"):
            return "failure"
        if self.kind == "stalled":
            return "warning"
        return "info"


# ------------------------------------------------------------------ what a job's notification says

LOG_LINES = 15


def duration_words(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def log_tail(path: str, lines: int = LOG_LINES, limit: int = 1200, hide: tuple[str, ...] = ()) -> str:
    """The last lines of a log, bounded, with ``hide`` (the job's env values) replaced by ****."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    # Strip terminal escapes (colours, progress bars) that notifications would show raw.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text)
    kept = [x.rstrip() for x in text.splitlines() if x.strip()][-lines:]
    out = "\n".join(kept)
    for value in sorted(hide, key=len, reverse=True):
        if len(value) >= 4:
            out = out.replace(value, MASK)
    if len(out) > limit:
        out = "…" + out[-(limit - 1) :]
    return out


def job_event(rec: dict[str, Any], kind: str, host: str, *, tail: str = "", note: str | None = None) -> Event:
    """The notification for a job: name, host, GPUs, duration, exit status, last log lines."""
    name = rec.get("name") or str(rec.get("id"))
    gpus = rec.get("gpus") or []
    gpu_words = ("GPU " if len(gpus) == 1 else "GPUs ") + ",".join(map(str, gpus)) if gpus else "CPU"
    code = rec.get("exit_code")
    started, ended = rec.get("started"), rec.get("ended")
    now = time.time()
    if kind in ("succeeded", "failed", "killed", "lost", "preempted"):
        dur = (ended or now) - started if started else None
    else:
        dur = now - started if started else None
    what = {
        "succeeded": "succeeded",
        "failed": f"failed (exit {code})" if code is not None else "failed",
        "killed": "was killed",
        "lost": "was lost",
        "preempted": "was preempted (the cloud took the spot VM back)",
        "started": "started after waiting in the queue",
        "stalled": "stalled",
        "test": "test notification",
    }.get(kind, kind)
    title = f"remotedl: job {rec.get('id')} ({name}) {what} on {host}"
    lines = [
        f"job {rec.get('id')} ({name}) on {host}, {gpu_words}",
        f"command: {str(rec.get('command', ''))[:200]}",
    ]
    if kind in ("succeeded", "failed", "killed", "lost", "preempted"):
        lines.append(f"duration: {duration_words(dur)}")
        lines.append(f"exit status: {code if code is not None else '-'}")
    elif kind == "started":
        waited = (started or now) - (rec.get("created") or started or now)
        lines.append(f"waited {duration_words(waited)} in the queue")
    else:
        lines.append(f"running for {duration_words(dur)}")
    if note:
        lines.append(note)
    if rec.get("error"):
        lines.append(f"error: {str(rec['error'])[:300]}")
    if tail:
        lines += ["", "last lines of the log:", tail]
    fields = {
        "job": rec.get("id"),
        "name": name,
        "host": host,
        "gpus": gpus,
        "status": rec.get("status"),
        "exit_code": code,
        "duration": round(dur, 1) if dur is not None else None,
        "command": str(rec.get("command", ""))[:200],
        "commit": rec.get("git_commit"),
        "log_tail": tail,
    }
    if note:
        fields["note"] = note
    return Event(kind, title, "\n".join(lines), fields)
