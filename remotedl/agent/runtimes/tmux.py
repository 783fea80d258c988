"""A box job's runtime: a runner in a tmux session of its own, and the job's process group.

A job is started by the agent (status ``starting``, the starter's pid recorded), runs under a
runner process (``agent/runner.py``) in a tmux session of its own (the runner records its pid,
then the job's process group), and is ``lost`` only when none of them is alive any more (nor a
process that left the group but carries the job's ``JOB_MARK``), or the box rebooted. tmux is
called through one chokepoint (``_tmux``: argv only, exact ``=name`` targets).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remotedl.agent.checkout import ensure_excludes, job_dirs_of, make_job_dir, remove_job_dir
from remotedl.agent.gpus import choose_gpus
from remotedl.agent.runtimes.base import Killed, LogFollow, Runtime, StartPlan
from remotedl.agent.store import (
    AgentError,
    Context,
    box_lock,
    env_path,
    kill_marker,
    load,
    logs_dir,
    new_record,
    next_id,
    notify_path,
    remove_env_file,
    save,
    stall_after,
    update,
)
from remotedl.schema import ACTIVE, ENDED, outlived_words
from remotedl.waiting import pid_alive as _alive
from remotedl.waiting import retry_until

TMUX_MIN = (3, 0)  # new-session with the command as separate words: no shell in between
START_TIMEOUT = 30.0  # the runner records itself within this, or the start failed


def session_name(job_id: int) -> str:
    return f"remotedl-{job_id}"


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


def boot_id() -> str | None:
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
    if boot and r.get("boot_id") and r["boot_id"] != boot:
        return True  # the box rebooted since
    if not r.get("runner_pid") and _alive(r.get("starter_pid")):
        created = float(r.get("created") or 0)
        if time.time() - created < START_TIMEOUT + 60:
            return False  # being started: the runner records itself in a moment
    if runner_alive(r):
        return False
    return not job_alive(r)


def _login_umask() -> int:
    """This agent's umask: the one an ssh session of the user gets (pam_umask, the login
    shell's start-up files). The job gets it, not the tmux server's, which is whatever the
    first program to start that server had (`remotedl jupyter` starts it with 077)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What tmux says when the server it reached exits under it: the box user's last tmux session
# ended (another job, a closed Jupyter) just as this start connected. A new server is started
# by the next try.
_SERVER_WENT = ("server exited unexpectedly", "lost server")


def _new_session(name: str, cwd: str, argv: list[str], tries: int = 5) -> None:
    for attempt in range(tries):
        r = _tmux("new-session", "-d", "-s", name, "-c", cwd, "-x", "200", "-y", "50", *argv)
        if r.returncode == 0:
            return
        why = r.stderr.strip() or f"exit {r.returncode}"
        if not any(w in why for w in _SERVER_WENT) or attempt == tries - 1:
            raise AgentError(f"tmux could not start the job: {why}")
        time.sleep(0.05 * (attempt + 1))


def _wait_started(job_id: int) -> dict[str, Any]:
    """Until the runner recorded itself (and, unless queued, the job's process group)."""
    deadline = time.monotonic() + START_TIMEOUT
    next_check = time.monotonic() + 0.5
    while True:
        rec = load(job_id)
        started = rec["status"] in ("queued", "running") or rec.get("phase") == "pulling"
        if rec["status"] in ENDED or (rec.get("runner_pid") and started):
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


class TmuxFollow(LogFollow):
    """The follower hears once the job's main process exited while processes it left still
    run (the job runs until they are gone), and again when how many are left changes."""

    def __init__(self, rec: dict[str, Any]) -> None:
        super().__init__(rec)
        self.said: str | None = None

    def note(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        left = int(rec.get("leftovers") or 0)
        if rec["status"] != "running" or rec.get("main_exit") is None or not left:
            return None
        words = outlived_words(int(rec["main_exit"]), left)
        if words == self.said:
            return None
        self.said = words
        return {"job": rec["id"], "status": rec["status"], "state": words}


class TmuxRuntime(Runtime):
    kind = "box"

    def check(self) -> None:
        check_tmux()

    def create(self, ctx: Context, plan: StartPlan, active: list[dict[str, Any]]) -> dict[str, Any]:
        """Choose the GPUs (or queue), and record the job (under the box lock)."""
        req = plan.req
        want = {"gpus": req.gpus, "count": req.count, "force": req.force}
        chosen = choose_gpus({**want, "queue": req.queue}, active)
        job_id = next_id(job_dirs_of(plan.rdir))
        rec = new_record(req, plan.spec, job_id, plan.rdir, isolate=plan.isolate, commit=plan.commit)
        rec.update(
            gpus=chosen if chosen is not None else [],
            want=want,
            status="queued" if chosen is None else "starting",
            log=str(logs_dir() / f"{job_id}.log"),
            session=session_name(job_id),
            boot_id=boot_id(),
            ready=not plan.isolate,
            runner_pid=None,
            pid=None,
            stall_after=stall_after(req.stall_after),  # stall detection: agent/events.py
            stalled=None,
            umask=_login_umask(),
            mark=secrets.token_hex(8),  # JOB_MARK in its processes' environment
        )
        save(rec)
        fd = os.open(env_path(job_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(req.env, f)
        Path(rec["log"]).touch(mode=0o600)
        return rec

    def launch(self, ctx: Context, rec: dict[str, Any], plan: StartPlan) -> dict[str, Any]:
        """The runner in a tmux session; the checkout while it starts; until it recorded itself."""
        job_id = int(rec["id"])
        try:
            request = json.dumps({"op": "runner", "id": job_id})
            runner = [sys.executable, "-E", "-s", "-S", sys.argv[0], request]
            # Several words: tmux (>= 3.0) runs them directly, not through the user's login shell.
            # The runner starts while the checkout is made, and waits for it ("ready").
            _new_session(rec["session"], plan.rdir, runner)
            if plan.isolate:
                ensure_excludes(plan.rdir)
                workdir, linked = make_job_dir(plan.rdir, job_id, str(plan.commit), plan.data, plan.shared)
                rec = update(job_id, workdir=workdir, cwd=workdir, links=linked, ready=True)
            return _wait_started(job_id)
        except (AgentError, OSError) as e:
            error = e if isinstance(e, AgentError) else AgentError(f"could not start the job: {e}")
            _fail_start(job_id, str(error))
            raise error from None

    def gone(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        boot = boot_id()
        return [r for r in records if r["status"] in ACTIVE and _gone(r, boot)]

    def kill(self, ctx: Context, rec: dict[str, Any], grace: float) -> Killed:
        """A job not started yet: killed in its record, its runner stopped. A running one: its
        process group, and its processes that left the group (``job_processes``), get SIGINT,
        SIGTERM, SIGKILL (``grace`` seconds apart) until they are gone; its runner records the
        end."""
        job_id = int(rec["id"])
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
                _until_done(lambda: runner_alive(rec), 5)
            ctx.tell(job_id, "killed")  # after the runner: it may have died mid-send
            return load(job_id), []
        if rec["status"] not in ACTIVE:
            return rec, []
        steps = []  # to its process group and its processes that left the group
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not signal_job(rec, sig):
                break
            steps.append(signal.Signals(sig).name)
            _until_done(lambda: job_alive(rec), wait)
            if not job_alive(rec):
                break
        _until_done(lambda: runner_alive(rec) and load(job_id)["status"] in ACTIVE, 5)
        return None, steps  # no runner left to record the end: the look says killed, by the marker

    def follow(self, rec: dict[str, Any]) -> LogFollow:
        return TmuxFollow(rec)

    def attach(self, rec: dict[str, Any]) -> str:
        session = str(rec.get("session") or "")
        if not session.replace("-", "").isalnum():
            raise AgentError(f"job {rec['id']} has an odd tmux session name: {session!r}")
        return "exec tmux attach-session -t " + shlex.quote("=" + session)


def _until_done(busy: Callable[[], bool], seconds: float) -> None:
    """Up to ``seconds`` while ``busy()``: a signalled process ends within milliseconds, so the
    look comes again after 5 ms, then less often (a kill waits for nothing longer)."""
    retry_until(lambda: not busy(), seconds=seconds, interval=0.005, max_interval=0.1)
