"""A Slurm job's runtime on a login node: a batch job (``remotedl.slurm``) with its control
directory and log under ``<remote_dir>/.remotedl/slurm/<id>/`` on the shared filesystem; its
status is Slurm's (scontrol, sacct, or what its batch script recorded).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.agent.checkout import ensure_excludes, job_dirs_of, make_job_dir, remove_job_dir
from remotedl.agent.store import (
    AgentError,
    _epoch,
    _new_record,
    _next_id,
    _save_new,
    _stall_after,
    box_lock,
    is_slurm,
    kill_marker,
    load,
    notify_path,
    save,
    slurm_ref,
    update,
    warn,
)
from remotedl.errors import RemotedlError
from remotedl.schema import ACTIVE, slurm_words

if TYPE_CHECKING:
    from remotedl import slurm as slurmmod


SLURM_DIRS = (".remotedl", "slurm")  # under remote_dir: a Slurm job's control dir and log


SLURM_POLL = 2.0  # seconds between Slurm state checks while following a log (an RPC each)


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
                        from remotedl.agent.state import ended_elsewhere

                        ended_elsewhere(int(fresh["id"]), fresh["status"])
            r.clear()
            r.update(fresh)
        if st.ended:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(str(r.get("control_dir") or ""), "env"))


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
    from remotedl.agent.state import refresh

    return {"job": refresh([load(job_id)])[0], "signals": ["scancel"]}


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


def _say_state(rec: dict[str, Any], said: str | None) -> str:
    """Tell the follower (on stderr) the Slurm job's state when it changed: why it waits."""
    state = str(rec.get("slurm_state") or "PENDING")
    words = slurm_words(state, rec.get("slurm_reason"), rec.get("node"), rec.get("exit_code"))
    if words != said:
        note = {"job": rec["id"], "status": rec["status"], "state": words}
        sys.stderr.write("@@remotedl-state " + json.dumps(note) + "\n")
        sys.stderr.flush()
    return words
