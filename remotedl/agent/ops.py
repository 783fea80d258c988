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
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remotedl import gpus as gpumod
from remotedl.agent.checkout import (
    _clean_rel,
    _git,
    _own_job_dir,
    disk_usage,
    ensure_excludes,
    git_head,
    job_dirs_of,
    make_job_dir,
    remove_job_dir,
)
from remotedl.agent.envsync import _work_tree, env_in_sync, env_plan, op_envsync
from remotedl.agent.gpus import _holders, choose_gpus, query_gpus
from remotedl.agent.runner import _fail_start, _script_ok, op_runner
from remotedl.agent.runtimes.slurm import SLURM_POLL, _kill_slurm, _own_control_dir, _say_state, _start_slurm
from remotedl.agent.runtimes.tmux import (
    _boot_id,
    _new_session,
    _wait_started,
    check_tmux,
    group_alive,
    kill_session,
    runner_alive,
    session_name,
)
from remotedl.agent.state import ended_elsewhere, refresh, resolve
from remotedl.agent.store import (
    WARNINGS,
    AgentError,
    _ensure_dirs,
    _new_record,
    _next_id,
    _real,
    _save_new,
    _stall_after,
    all_records,
    box_lock,
    env_path,
    is_slurm,
    jobs_dir,
    kill_marker,
    load,
    logs_dir,
    notify_path,
    project_of,
    record_path,
    remove_env_file,
    save,
    update,
)
from remotedl.schema import ACTIVE, ENDED, MAX_REQUEST


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
    pgid = int(rec["pgid"])
    steps = []
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        steps.append(signal.Signals(sig).name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.05)
        if not group_alive(pgid):
            break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and runner_alive(rec) and load(job_id)["status"] in ACTIVE:
        time.sleep(0.05)
    rec = refresh([load(job_id)])[0]  # no runner left to record the end: killed, by the marker
    return {"job": rec, "signals": steps}


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
                if slurm:
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
