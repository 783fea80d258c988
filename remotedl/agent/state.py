"""A job's state: active records that nothing keeps alive any more, and finding a job."""
from __future__ import annotations

import time
from typing import Any

from remotedl.agent.runtimes.slurm import refresh_slurm
from remotedl.agent.runtimes.tmux import _boot_id, _gone
from remotedl.agent.store import (
    AgentError,
    _real,
    all_records,
    box_lock,
    is_slurm,
    kill_marker,
    load,
    notify_path,
    project_of,
    remove_env_file,
    save,
)
from remotedl.schema import ACTIVE


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


def ended_elsewhere(job_id: int, status: str) -> None:
    """A job ended with no runner left to send its notification: a detached agent sends it."""
    if notify_path(job_id).exists():
        from remotedl.agent import events

        events.spawn(job_id, status)
