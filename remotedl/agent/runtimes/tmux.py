"""A box job's runtime: a runner in a tmux session of its own, and the job's process group."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from remotedl.agent.store import AgentError, is_slurm, load
from remotedl.schema import ENDED
from remotedl.waiting import pid_alive as _alive

TMUX_MIN = (3, 0)  # new-session with the command as separate words: no shell in between


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
    return not (r.get("pgid") and group_alive(int(r["pgid"])))


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


START_TIMEOUT = 30.0  # the runner records itself within this, or the start failed
