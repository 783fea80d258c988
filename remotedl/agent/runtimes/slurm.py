"""A Slurm job's runtime on a login node: a batch job (``remotedl.slurm``) with its control
directory and log under ``<remote_dir>/.remotedl/slurm/<id>/`` on the shared filesystem; its
status is Slurm's (scontrol, sacct, or what its batch script recorded), read whenever records are.
Notifications and stalls: a watcher on this login node (``events.watch_slurm``, started by the op).
A multi-node run (``slurm.nodes`` in the request) is one such job on N nodes (``want.nodes``).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.agent.checkout import ensure_excludes, job_dirs_of, make_job_dir, remove_job_dir
from remotedl.agent.runtimes.base import Killed, LogFollow, Runtime, StartPlan
from remotedl.agent.store import (
    AgentError,
    Context,
    box_lock,
    epoch,
    is_slurm,
    kill_marker,
    load,
    new_record,
    next_id,
    notify_path,
    save,
    slurm_ref,
    stall_after,
    update,
)
from remotedl.errors import RemotedlError
from remotedl.schema import ACTIVE, slurm_words
from remotedl.waiting import pid_alive

if TYPE_CHECKING:
    from remotedl import slurm as slurmmod

SLURM_DIRS = (".remotedl", "slurm")  # under remote_dir: a Slurm job's control dir and log
SLURM_POLL = 2.0  # seconds between Slurm state checks while following a log (an RPC each)
SUBMIT_TIMEOUT = 150.0  # a submission whose starter lives answers from sbatch within this


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
        changes["started"] = epoch(st.start) or time.time()
    if st.ended:
        changes["exit_code"] = st.exit_code
        changes["ended"] = r.get("ended") or epoch(st.end) or time.time()
        if st.status == "lost" and not r.get("error"):
            changes["error"] = st.reason or "Slurm no longer knows it"
    return {k: v for k, v in changes.items() if r.get(k) != v}


def refresh_slurm(ctx: Context, records: list[dict[str, Any]]) -> None:
    """Ask Slurm about the active Slurm jobs among ``records`` (one scontrol each) and record
    what changed. A controller that does not answer changes nothing. A start after a wait
    and an end are news (``ctx.tell``): the op sends them."""
    todo = [r for r in records if is_slurm(r) and r.get("status") in ACTIVE and r.get("slurm_id")]
    if not todo:
        return
    from remotedl import slurm as slurmmod

    for r in todo:
        try:
            st = slurmmod.state_here(slurm_ref(r))
        except RemotedlError as e:
            ctx.warn(f"job {r.get('id')}: {e}")
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
                    if waited and fresh["status"] == "running":
                        ctx.tell(int(fresh["id"]), "started")
                    if st.ended and kill_marker(int(fresh["id"])).exists():
                        fresh["status"] = "killed"  # remotedl kill asked for its end
                    save(fresh)
                    if fresh["status"] not in ACTIVE:
                        ctx.tell(int(fresh["id"]), fresh["status"])
            r.clear()
            r.update(fresh)
        if st.ended:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(str(r.get("control_dir") or ""), "env"))


def own_control_dir(rec: dict[str, Any]) -> Path | None:
    """A Slurm job's control directory (and log), if it is where they are made."""
    ctl, rdir = rec.get("control_dir"), rec.get("remote_dir")
    if not is_slurm(rec) or not ctl or not rdir:
        return None
    p = Path(str(ctl))
    home = os.path.realpath(Path(str(rdir)).joinpath(*SLURM_DIRS))
    if p.name != str(rec["id"]) or os.path.realpath(p.parent) != home:
        return None
    return p


class SlurmFollow(LogFollow):
    """Each look is an RPC to slurmctld: every few seconds, or at once when the batch script
    has recorded its end. The follower hears the state in Slurm's words when it changes (why
    it waits)."""

    def __init__(self, rec: dict[str, Any]) -> None:
        super().__init__(rec)
        self.said: str | None = None
        self.exit_file = os.path.join(str(rec.get("control_dir")), "exit")

    def due(self, idle: float, since_look: float) -> bool:
        return since_look >= (0.2 if os.path.exists(self.exit_file) else SLURM_POLL)

    def note(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        state = str(rec.get("slurm_state") or "PENDING")
        words = slurm_words(state, rec.get("slurm_reason"), rec.get("node"), rec.get("exit_code"))
        if words == self.said:
            return None
        self.said = words
        return {"job": rec["id"], "status": rec["status"], "state": words}


class SlurmRuntime(Runtime):
    kind = "slurm"

    def create(self, ctx: Context, plan: StartPlan, active: list[dict[str, Any]]) -> dict[str, Any]:
        """The job's record (Slurm picks the node and the GPUs, and queues it until they are free)."""
        from remotedl import slurm as slurmmod

        req = plan.req
        try:
            settings = slurmmod.SlurmSettings.from_settings(req.slurm or {})
        except RemotedlError as e:
            raise AgentError(e.message, "usage", hint=e.hint) from None
        count = 0 if req.gpus == "none" else int(req.count or 1)
        job_id = next_id(job_dirs_of(plan.rdir))
        ctl = Path(plan.rdir).joinpath(*SLURM_DIRS) / str(job_id)
        rec = new_record(req, plan.spec, job_id, plan.rdir, isolate=plan.isolate, commit=plan.commit)
        rec.update(
            want={"gpus": req.gpus, "count": count, "nodes": settings.nodes},
            status="queued",
            log=str(ctl / "output.log"),
            ready=True,
            scheduler="slurm",
            control_dir=str(ctl),
            slurm_id=None,
            stall_after=stall_after(req.stall_after),  # log silence only (events.LogSilence)
            stalled=None,
        )  # notifications and stalls: a watcher on this login node (events.watch_slurm)
        save(rec)
        return rec

    def launch(self, ctx: Context, rec: dict[str, Any], plan: StartPlan) -> dict[str, Any]:
        """Make the job's checkout and submit it with sbatch. Answers once sbatch has."""
        from remotedl import slurm as slurmmod

        req, rdir = plan.req, plan.rdir
        job_id = int(rec["id"])
        try:
            settings = slurmmod.SlurmSettings.from_settings(req.slurm or {})
            workdir = rdir
            if plan.isolate:
                ensure_excludes(rdir)
                workdir, linked = make_job_dir(rdir, job_id, str(plan.commit), plan.data, plan.shared)
                rec = update(job_id, workdir=workdir, cwd=workdir, links=linked)
            job = slurmmod.BatchJob(
                job_id=str(job_id),
                command=req.command,
                workdir=workdir,
                control_dir=str(rec["control_dir"]),
                log=rec["log"],
                remote_dir=rdir,
                name=rec["name"],
                gpus=int(rec["want"]["count"]),
                env={**(rec.get("trackers") or {}), **req.env},
                conda=plan.spec.get("conda"),
                env_setup=plan.spec.get("env_setup"),
                nodes=settings.nodes,
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
            ctx.warn(w)
        return update(job_id, slurm_id=submitted.slurm_id, slurm_state="PENDING", starter_pid=None)

    def gone(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Slurm says how a submitted job is (``refresh``); only a submission that died before
        sbatch answered has nothing to ask about."""
        now = time.time()
        return [
            r
            for r in records
            if r["status"] in ACTIVE
            and not r.get("slurm_id")
            and not (pid_alive(r.get("starter_pid")) and now - float(r.get("created") or 0) < SUBMIT_TIMEOUT)
        ]

    def refresh(self, ctx: Context, records: list[dict[str, Any]]) -> None:
        refresh_slurm(ctx, records)

    def kill(self, ctx: Context, rec: dict[str, Any], grace: float) -> Killed:
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
        return None, ["scancel"]

    def follow(self, rec: dict[str, Any]) -> LogFollow:
        return SlurmFollow(rec)

    def attach(self, rec: dict[str, Any]) -> str:
        """An interactive shell in the job's allocation, on its node, with its GPUs (``exit``
        ends the shell, not the job)."""
        slurm_id = str(rec.get("slurm_id") or "")
        if rec.get("status") != "running" or not slurm_id:
            queued = rec.get("status") == "queued"
            why = "there is no allocation to attach to yet" if queued else "nothing to attach to"
            raise AgentError(f"job {rec['id']} is {rec.get('status')}: {why}", "usage")
        if not re.fullmatch(r"\d+", slurm_id):
            raise AgentError(f"{slurm_id!r} is not a Slurm job id")
        return f"exec srun --jobid={shlex.quote(slurm_id)} --overlap --pty " + '"${SHELL:-/bin/sh}"'

    def own_dirs(self, rec: dict[str, Any]) -> list[Path]:
        ctl = own_control_dir(rec)
        return [ctl] if ctl is not None else []
