"""Box side of jobs: the request handlers and the dispatch. One request (JSON on stdin) per
exec; one JSON answer on stdout (the streaming ones, ``logs`` and ``envsync``: the stream on
stdout and their start and end as marked lines on stderr).

Records, the lock and the index live in ``store``; a job's runtime (``runtimes``: a tmux
session on the box, or a Slurm batch job on a login node) is chosen once per record and does
what differs between them; ``state`` looks at jobs (a read, which starts nothing); ``events``
sends what a look found. Each job runs in its own checkout of its commit (``checkout``), in the
project's environment (``envsync``), under its runner (``runner``).

Per request, a ``Context`` carries the warnings for the laptop and the news to send. Each
handler gets the typed request of its op (``schema.StartRequest``, ...), built by the dispatch
from the checked JSON: a misspelt field is a type error, not a silent ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from remotedl import gpus as gpumod
from remotedl import treeid
from remotedl.agent import runtimes, trackers
from remotedl.agent.checkout import (
    clean_rel,
    disk_usage,
    git,
    git_head,
    own_job_dir,
    remove_job_dir,
    script_ok,
)
from remotedl.agent.envsync import env_in_sync, env_plan, op_envsync, work_tree
from remotedl.agent.gpus import holders, query_gpus
from remotedl.agent.listing import answer_text, listing
from remotedl.agent.runner import op_runner
from remotedl.agent.state import active, look, recent, refresh, resolve
from remotedl.agent.store import (
    AgentError,
    Context,
    all_records,
    box_lock,
    ensure_dirs,
    env_path,
    is_slurm,
    jobs_dir,
    kill_marker,
    load,
    logs_dir,
    newest_first,
    notify_path,
    preempt_marker,
    project_of,
    real,
    record_path,
    records_after,
    update,
)
from remotedl.schema import (
    ACTIVE,
    ENDED,
    MAX_REQUEST,
    AutostopRequest,
    EnvsyncRequest,
    GetRequest,
    GpusRequest,
    IntreeRequest,
    KillRequest,
    ListRequest,
    LocateRequest,
    LogsRequest,
    NotifyRequest,
    PruneRequest,
    Request,
    RmRequest,
    RunnerRequest,
    SlurmWatchRequest,
    StartRequest,
    encode_mark,
    request_from_dict,
)
from remotedl.typecheck import SchemaError

RECENT = 10  # ended jobs `remotedl jobs` shows besides the active ones


def announce(ctx: Context, records: list[dict[str, Any]]) -> None:
    """Send what the request's looks found (jobs that ended, or started after a wait, with no
    runner left to say so), and make sure a watcher looks after the Slurm jobs among
    ``records`` that need one: processes of their own, started here and not by a read.
    ``events`` (and the notification code) is imported only when there is something to do."""
    if ctx.news or any(is_slurm(r) for r in records):
        from remotedl.agent import events

        events.announce(ctx, records)


# ------------------------------------------------------------------ start


def op_start(ctx: Context, req: StartRequest) -> dict[str, Any]:
    rdir = work_tree(req.remote_dir)
    runtime = runtimes.for_request(req)
    runtime.check()
    data = [str(d) for d in req.data]
    shared = [str(s) for s in req.shared]
    links = [x for x in (clean_rel(p) for p in data + shared) if x]
    isolate = req.isolate
    commit = req.git_commit
    if isolate:
        head = git_head(rdir)
        commit = commit or head
        if commit is None:
            isolate = False  # not a git work tree: nothing to check out, run in it
        elif git(rdir, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
            raise AgentError(
                f"commit {commit[:10]} is not in the box's repository ({rdir})", "usage", hint="push it first"
            )
    script = req.script
    if script and not script_ok(rdir, commit if isolate else None, script, links):
        raise AgentError(
            f"no such script on the box: {os.path.join(rdir, script)}",
            "usage",
            hint="is it committed or pushed? `remotedl push` sends uncommitted files too",
        )
    spec = dict(req.environment)
    if req.env_check:
        plan = env_plan(rdir, spec)
        if plan is not None and not env_in_sync(rdir, plan, spec):
            return {"envsync": plan}
    start = runtimes.StartPlan(req, rdir, isolate, commit, data, shared, spec)
    with box_lock():
        rec = runtime.create(ctx, start, active(ctx))
        job_id = int(rec["id"])
        changes = trackers.planned(req, rdir, job_id, str(rec["name"]), isolate=bool(rec.get("isolated")))
        urls = [str(u) for u in req.notify]
        if urls:  # kept aside (0600) for whoever sends; the record holds them masked
            from remotedl.agent import events

            changes["notify"] = events.save_settings(job_id, urls, req.host_alias)
        if changes:
            rec = update(job_id, **changes)
    rec = runtime.launch(ctx, rec, start)
    announce(ctx, [rec])  # a Slurm job's start after the queue, stalls and end: watched from here
    return {"job": rec}


# ------------------------------------------------------------------ list, get, kill


def op_list(ctx: Context, req: ListRequest) -> dict[str, Any]:
    ensure_dirs()
    if req.project or req.ids:  # outputs home: the project's jobs since ``after``
        records, upto = with_outputs(ctx, req.project or "", req.ids, req.after)
        announce(ctx, records)
        return {"jobs": records, "upto": upto}
    if req.all:  # ended records as the text cached of them; the active ones looked at
        every = listing(ctx)
        live = refresh(ctx, every.records())
        announce(ctx, live)
        return {"jobs": every}
    records = recent(ctx, RECENT)
    announce(ctx, records)
    return {"jobs": records}


def with_outputs(ctx: Context, project: str, ids: list[int], after: Any) -> tuple[list[dict[str, Any]], int]:
    """The jobs of ``project`` (its remote_dir) that have outputs, from whichever clone or
    laptop they were started, with ids above ``after``, and the jobs ``ids``: what a laptop asks
    to bring outputs home. And ``upto``: every job of the project with outputs and an id up to
    it has ended (the laptop's next ``after``); ids are given in order, under the box lock."""
    pdir = real(project) if project else None
    start = int(after or 0)
    wanted = {int(i) for i in ids}
    found, upto = records_after(start, wanted)
    mine = [r for r in found if r.get("outputs") and pdir is not None and project_of(r) == pdir]
    picked = {int(r["id"]) for r in mine} | wanted
    records = refresh(ctx, [r for r in found if int(r["id"]) in picked])
    running = [int(r["id"]) for r in records if r["status"] in ACTIVE and int(r["id"]) > start]
    return records, max(start, min([upto, *(i - 1 for i in running)]))


def op_get(ctx: Context, req: GetRequest) -> dict[str, Any]:
    rec = resolve(ctx, req.job, req.project)
    announce(ctx, [rec])
    return {"job": rec}


def op_intree(ctx: Context, req: IntreeRequest) -> dict[str, Any]:
    """Active jobs running in the work tree itself (isolate = false): a push changes their files."""
    raw = req.remote_dir
    pdir = real(raw)
    if not raw or not os.path.isdir(pdir) or not jobs_dir().exists():
        return {"jobs": []}
    records = active(ctx)
    announce(ctx, records)
    running = [r for r in records if not r.get("isolated") and real(str(r.get("cwd") or "")) == pdir]
    return {"jobs": running, "head": git_head(pdir) if running else None}


def _ended_words(rec: dict[str, Any]) -> str:
    if rec["status"] == "failed" and rec.get("exit_code") is not None:
        return f"failed (exit {rec['exit_code']})"
    return str(rec["status"])


def op_kill(ctx: Context, req: KillRequest) -> dict[str, Any]:
    ref = req.job
    rec = resolve(ctx, ref, req.project, active_only=ref in (None, "", "last"))
    grace = float(req.grace)
    job_id = int(rec["id"])
    if rec["status"] not in ACTIVE:
        announce(ctx, [rec])
        raise AgentError(
            f"job {job_id} ({rec.get('name')}) is not running: it {_ended_words(rec)}",
            "notrunning",
            hint=f"`remotedl logs {job_id}` shows its output",
        )
    final, signals = runtimes.of(rec).kill(ctx, rec, grace)
    rec = final if final is not None else look(ctx, job_id)  # no runner left: killed, by the marker
    announce(ctx, [rec])
    return {"job": rec, "signals": signals} if signals or final is None else {"job": rec}


# ------------------------------------------------------------------ logs


def op_logs(ctx: Context, req: LogsRequest) -> dict[str, Any] | None:
    """Stream the log from ``offset`` (or the last ``lines``) to stdout; with ``follow``,
    until the job ends. The end status goes to stderr as one JSON line."""
    rec = resolve(ctx, req.job, req.project)
    announce(ctx, [rec])
    path = rec["log"]
    out = sys.stdout.buffer
    offset = req.offset
    try:
        f = open(path, "rb")  # noqa: SIM115 - long-lived, closed below
    except FileNotFoundError:
        raise AgentError(f"the log of job {rec['id']} is gone ({path})", "notfound") from None
    with f:
        if req.lines is not None and not offset:
            offset = _tail_offset(f, req.lines)
        f.seek(offset)
        # The client counts bytes from here, so a reconnect resumes exactly where it left off.
        start = {"job": rec["id"], "offset": offset, "warnings": ctx.warnings}
        sys.stderr.write(encode_mark("start", start))
        sys.stderr.flush()
        idle = 0.0
        if not req.follow:
            _send_rest(f, offset)
            sys.stderr.write(encode_mark("end", {"job": rec}))
            return None
        follow = runtimes.of(rec).follow(rec)
        _say(follow.note(rec))
        job_id = int(rec["id"])
        seen = _stamp(job_id)
        last_check = time.monotonic()
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                out.write(chunk)
                idle = 0.0
                continue
            out.flush()
            # The record saved since the last look (the runner recorded the end, a Slurm
            # watcher a new state): looked at now, not when the next periodic look is due.
            stamp = _stamp(job_id)
            if stamp != seen or follow.due(idle, time.monotonic() - last_check):
                last_check = time.monotonic()
                seen = stamp  # before the look: a save during it is seen at the next tick
                rec = look(ctx, job_id)
                announce(ctx, [rec])
                _say(follow.note(rec))
                if rec["status"] not in ACTIVE:
                    chunk = f.read()  # what the job wrote just before it ended
                    if chunk:
                        out.write(chunk)
                        out.flush()
                    break
                idle = 0.0 if idle >= 0.5 else idle
            # Every 10 ms while the job was heard from in the last seconds (its end is seen at
            # once: a short job's whole run is the time to say it ended), then every 50 ms.
            pause = 0.01 if idle < 5.0 else 0.05
            time.sleep(pause)
            idle += pause
    sys.stderr.write(encode_mark("end", {"job": rec}))
    sys.stderr.flush()
    return None


def _stamp(job_id: int) -> tuple[int, int, int] | None:
    """The job's record file as it is now (a save replaces it: a new inode)."""
    try:
        st = os.stat(record_path(job_id))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _say(note: dict[str, Any] | None) -> None:
    """Tell the follower (on stderr) the job's state when it changed (a Slurm job: why it waits)."""
    if note is not None:
        sys.stderr.write(encode_mark("state", note))
        sys.stderr.flush()


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


class _Seen:
    """An iterable over ``it`` that can be gone through again, reading only as far as asked."""

    def __init__(self, it: Iterator[dict[str, Any]]) -> None:
        self.it = it
        self.seen: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self.seen
        for r in self.it:
            self.seen.append(r)
            yield r


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def op_locate(ctx: Context, req: LocateRequest) -> dict[str, Any]:
    """Where each path to pull lives: the project's latest job that has it (or the job asked
    for), or the work tree (``tree``, or a data/shared path, which live there)."""
    pdir = real(req.remote_dir)
    paths = [str(p) for p in req.paths]
    ref = req.job
    if req.tree:
        pool: Iterable[dict[str, Any]] = []
    elif ref not in (None, ""):
        pool = [resolve(ctx, ref, req.remote_dir)]
    else:  # read from the newest, only as far back as the paths asked for are found
        pool = _Seen(refresh(ctx, [r])[0] for r in newest_first(ctx) if project_of(r) == pdir)
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
            target = os.path.realpath(os.path.join(base, rel))
            if _inside(target, real_base) or not _inside(target, pdir):
                found = {"dir": base, "job": r["id"], "name": r.get("name"), "links": r.get("links") or []}
            else:  # a data or shared path: it lives in the work tree
                found = {"dir": pdir, "job": r["id"], "name": r.get("name"), "shared": True, "links": []}
            break
        if found is None and ref not in (None, "") and not req.tree:
            r = next(iter(pool))
            where = f"job {r['id']} ({r.get('name')})'s directory"
            raise AgentError(f"{rel} does not exist in {where}", "notfound")
        if found is None:
            if not pdir or not os.path.lexists(os.path.join(pdir, rel)):
                where = "the work tree" if req.tree else "any job of this project nor in the work tree"
                raise AgentError(f"{rel} does not exist in {where} ({pdir})", "notfound")
            found = {"dir": pdir, "job": None, "name": None, "links": []}
        sources.append({"path": rel, **found})
    return {"sources": sources}


# ------------------------------------------------------------------ rm, prune


def _remove(ctx: Context, job_id: int, *, dry_run: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(what was (or would be) removed, or why not)."""
    with box_lock():
        try:
            rec: dict[str, Any] | None = load(job_id)
        except AgentError as e:
            if e.kind == "notfound":
                return None, f"no job {job_id} on this box"
            rec = None  # damaged: its files go
        if rec is not None:
            rec = refresh(ctx, [rec])[0]
            if rec["status"] in ACTIVE:
                return None, f"job {job_id} ({rec.get('name')}) is {rec['status']}: kill it first"
        files = [
            record_path(job_id),
            env_path(job_id),
            notify_path(job_id),
            kill_marker(job_id),
            preempt_marker(job_id),
            logs_dir() / f"{job_id}.log",
        ]
        if rec is not None and rec.get("log"):
            log = Path(str(rec["log"]))
            if log.parent == logs_dir():
                files.append(log)
        jd = own_job_dir(rec) if rec is not None else None
        dirs = runtimes.of(rec).own_dirs(rec) if rec is not None else []
        if rec is not None and jd is None and _own_trackers_dir(rec) is not None:
            dirs.append(Path(str(rec["trackers_dir"])))  # a job in the work tree: its runs' directory
        size = sum(disk_usage(p) for p in set(files)) + (disk_usage(jd) if jd else 0)
        size += sum(disk_usage(d) for d in dirs)
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
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            for p in set(files):
                with contextlib.suppress(OSError):
                    p.unlink()
        return item, None


def _remove_many(ctx: Context, ids: list[int], dry_run: bool) -> dict[str, Any]:
    removed, refused = [], []
    for job_id in ids:
        item, why = _remove(ctx, job_id, dry_run=dry_run)
        if item is not None:
            removed.append(item)
        if why:
            refused.append(why)
    return {"removed": removed, "refused": refused, "bytes": sum(int(i["bytes"]) for i in removed)}


def _own_trackers_dir(rec: dict[str, Any]) -> Path | None:
    """The trackers' directory of a job in the work tree (``isolate = false``), if it is where
    job directories are (a damaged or hostile record naming another directory is never removed)."""
    raw, rdir = rec.get("trackers_dir"), rec.get("remote_dir")
    if rec.get("isolated") or not raw or not rdir:
        return None
    p = Path(str(raw))
    if p.is_symlink() or os.path.realpath(p) != os.path.realpath(trackers.job_dir(str(rdir), int(rec["id"]))):
        return None
    return p


def op_rm(ctx: Context, req: RmRequest) -> dict[str, Any]:
    return _remove_many(ctx, [int(i) for i in req.ids], req.dry_run)


def op_prune(ctx: Context, req: PruneRequest) -> dict[str, Any]:
    """This project's ended jobs that ended more than ``older_than`` seconds ago."""
    pdir = real(req.remote_dir)
    cutoff = time.time() - float(req.older_than)
    records = refresh(ctx, [r for r in all_records(ctx) if project_of(r) == pdir])
    announce(ctx, records)
    ids = [
        int(r["id"])
        for r in records
        if r["status"] in ENDED and float(r.get("ended") or r.get("created") or 0) <= cutoff
    ]
    result = _remove_many(ctx, ids, req.dry_run)
    if not req.dry_run and os.path.isdir(os.path.join(pdir, ".git")):
        git(pdir, "worktree", "prune")
    return result


# ------------------------------------------------------------------ GPUs, events


def op_gpus(ctx: Context, req: GpusRequest) -> dict[str, Any]:
    found = query_gpus()
    records = active(ctx) if jobs_dir().exists() else []
    announce(ctx, records)
    if found is None:
        return {"gpus": None}
    held = holders(found, records)
    return {"gpus": [{"index": g.index, "name": g.name, "held_by": held.get(g.index)} for g in found]}


def _events_op(ctx: Context, req: NotifyRequest) -> dict[str, Any]:
    from remotedl.agent import events

    return events.op_notify(ctx, req)


def _slurm_watch_op(ctx: Context, req: SlurmWatchRequest) -> dict[str, Any]:
    from remotedl.agent import events

    return events.op_slurm_watch(ctx, req)


def _autostop_watcher() -> None:
    from remotedl.agent.store import AUTOSTOP_FILE, state_dir

    if not (state_dir() / AUTOSTOP_FILE).exists():
        return  # autostop never set on this box: no import of it on every request
    from remotedl.agent import autostop

    with contextlib.suppress(OSError, ValueError):
        autostop.ensure_watcher(state_dir())


def _autostop_op(ctx: Context, req: AutostopRequest) -> dict[str, Any]:
    from remotedl.agent import autostop

    return autostop.op_autostop(ctx, req)


R = TypeVar("R", bound=Request)


@dataclass(frozen=True)
class Handler(Generic[R]):
    """An op's handler and the request type it reads: the dispatch builds that typed request
    (every field checked, ``schema.request_from_dict``) before the handler runs."""

    kind: type[R]
    run: Callable[[Context, R], dict[str, Any] | None]


def handler(kind: type[R], run: Callable[[Context, R], dict[str, Any] | None]) -> Handler[Any]:
    """A table entry. ``R`` is inferred from the arguments alone (the return type does not name
    it), so mypy checks that ``run`` takes a ``kind``."""
    return Handler(kind, run)


OPS: dict[str, Handler[Any]] = {
    "start": handler(StartRequest, op_start),
    "runner": handler(RunnerRequest, op_runner),
    "list": handler(ListRequest, op_list),
    "get": handler(GetRequest, op_get),
    "kill": handler(KillRequest, op_kill),
    "logs": handler(LogsRequest, op_logs),
    "gpus": handler(GpusRequest, op_gpus),
    "locate": handler(LocateRequest, op_locate),
    "rm": handler(RmRequest, op_rm),
    "prune": handler(PruneRequest, op_prune),
    "envsync": handler(EnvsyncRequest, op_envsync),
    "intree": handler(IntreeRequest, op_intree),
    "notify": handler(NotifyRequest, _events_op),
    "slurm_watch": handler(SlurmWatchRequest, _slurm_watch_op),
    "autostop": handler(AutostopRequest, _autostop_op),
}
_HANDLERS = {h.kind: h for h in OPS.values()}
STREAMING = (LogsRequest, EnvsyncRequest)
# The agent's own requests (and autostop's): they start no autostop watcher themselves.
NO_WATCHER = (AutostopRequest, RunnerRequest, NotifyRequest, SlurmWatchRequest)


def read_request(argv: list[str]) -> Request:
    """The request: JSON on stdin from the laptop, or in argv for the agent's own runner, as
    the typed request of its op (every known field of the type schema.py says)."""
    raw = argv[0].encode() if argv else sys.stdin.buffer.read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        raise ValueError("request too large")
    req = request_from_dict(json.loads(raw))
    if type(req) not in _HANDLERS:
        raise ValueError("not a request")
    return req


def main(argv: list[str]) -> int:
    try:
        req = read_request(argv)
        op = _HANDLERS[type(req)]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        # Never echo the request: it may hold secrets. The checker names a field, not its value.
        why = f" ({e})" if isinstance(e, SchemaError) and str(e) != "not a request" else ""
        answer = {"ok": False, "kind": "protocol", "error": f"the agent got a malformed request{why}"}
        print(json.dumps(answer))
        return 2
    adopt = req.adopt
    if isinstance(adopt, dict):  # the default remote_dir: keep a tree under the older default
        treeid.adopt_tree(*(str(adopt.get(k) or "") for k in ("dir", "id", "legacy")))
    ctx = Context()
    try:
        result = op.run(ctx, req)
    except AgentError as e:
        answer = {"ok": False, "kind": e.kind, "error": str(e), "hint": e.hint, "warnings": ctx.warnings}
        if isinstance(req, STREAMING):
            sys.stderr.write(encode_mark("error", answer))
            return 3
        print(json.dumps(answer))
        return 3
    except gpumod.NvidiaSmiError as e:
        print(json.dumps({"ok": False, "kind": "error", "error": str(e)}))
        return 3
    finally:
        announce(ctx, [])  # what the looks found that no op sent yet
        if not isinstance(req, NO_WATCHER):
            _autostop_watcher()
    if result is not None and not isinstance(req, RunnerRequest):
        print(answer_text({"ok": True, **result, **({"warnings": ctx.warnings} if ctx.warnings else {})}))
    return 0
