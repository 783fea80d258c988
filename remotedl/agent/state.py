"""A job's state: each runtime's word on its active jobs, the ones nothing keeps alive any more
marked lost (or killed, when asked to), and finding a job by id, name or project.

A look only reads and records: it starts no process. What it found that needs a notification
sent (a job that ended with no runner left to say so) is news in the request's ``Context``;
the op sends it (``events.announce``).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from remotedl.agent import runtimes
from remotedl.agent.store import (
    AgentError,
    Context,
    active_records,
    box_lock,
    kill_marker,
    kind_of,
    load,
    newest_first,
    preempt_marker,
    project_of,
    real,
    remove_env_file,
    save,
)
from remotedl.schema import ACTIVE


def refresh(ctx: Context, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Take each runtime's word on its active jobs among ``records``, and mark those that
    nothing keeps alive any more as lost (or killed, when asked to), under the lock, after
    reading each record afresh. ``records`` are changed in place, and returned."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") in ACTIVE:
            by_kind.setdefault(kind_of(r), []).append(r)
    suspects: list[tuple[runtimes.Runtime, dict[str, Any]]] = []
    for kind, mine in by_kind.items():
        runtime = runtimes.RUNTIMES[kind]
        runtime.refresh(ctx, mine)
        suspects += [(runtime, r) for r in runtime.gone(mine)]
    if not suspects:
        return records
    with box_lock():
        for runtime, r in suspects:
            try:
                fresh = load(int(r["id"]))
            except AgentError:
                continue
            if fresh["status"] in ACTIVE and runtime.gone([fresh]):
                killed = kill_marker(int(fresh["id"])).exists()
                preempted = preempt_marker(int(fresh["id"])).exists()
                fresh["status"] = "killed" if killed else "preempted" if preempted else "lost"
                fresh["ended"] = fresh.get("ended") or time.time()
                if fresh["status"] == "lost" and not fresh.get("error"):
                    fresh["error"] = "its runner and processes vanished (box rebooted, or killed)"
                save(fresh)
                remove_env_file(int(fresh["id"]))
                ctx.tell(int(fresh["id"]), fresh["status"])
            r.clear()
            r.update(fresh)
    return records


def active(ctx: Context) -> list[dict[str, Any]]:
    """The box's active jobs, looked at (the index of active jobs: no other record is read)."""
    return [r for r in refresh(ctx, active_records(ctx)) if r["status"] in ACTIVE]


def look(ctx: Context, job_id: int) -> dict[str, Any]:
    """One job's record, looked at."""
    return refresh(ctx, [load(job_id, ctx)])[0]


def resolve(
    ctx: Context, ref: str | int | None, project: str | None = None, *, active_only: bool = False
) -> dict[str, Any]:
    """A job by id, by name (the latest of that name, this project's first), or, when None,
    this project's latest (``active_only``: latest active) job. Reads records from the newest
    only as far back as the answer."""
    pdir = real(project) if project else ""
    if ref in (None, "", "last"):
        where = f"of this project ({pdir})" if pdir else "on this box"
        if active_only:
            pool = [r for r in active(ctx) if not pdir or project_of(r) == pdir]
            if not pool:
                raise AgentError(
                    f"no job {where} is running", "notrunning", hint="`remotedl jobs` lists the box's jobs"
                )
            return pool[-1]
        latest = next((r for r in newest_first(ctx) if not pdir or project_of(r) == pdir), None)
        if latest is None:
            raise AgentError(
                f"there are no jobs {where} yet", "notfound", hint="start one with `remotedl run COMMAND`"
            )
        return refresh(ctx, [latest])[0]
    if isinstance(ref, int) or str(ref).isdigit():
        return look(ctx, int(ref))
    named = (r for r in newest_first(ctx) if r.get("name") == ref)
    first = next(named, None)
    if first is None:
        raise AgentError(
            f"no job called '{ref}' on this box", "notfound", hint="`remotedl jobs --all` lists them"
        )
    mine = first if project_of(first) == pdir else next((r for r in named if project_of(r) == pdir), None)
    return refresh(ctx, [mine or first])[0]


def recent(ctx: Context, ended: int) -> list[dict[str, Any]]:
    """The active jobs and the latest ``ended`` of those that ended, by id (``remotedl jobs``)."""
    live = active(ctx)
    done = list(itertools.islice((r for r in newest_first(ctx) if r["status"] not in ACTIVE), ended))
    ids = {int(r["id"]) for r in live}
    return sorted([*live, *(r for r in done if int(r["id"]) not in ids)], key=lambda r: int(r["id"]))
