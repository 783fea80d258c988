"""What a job's processes get and how long a job lives: stdin, umask, processes it leaves
behind. Against the real sshd box with its tmux."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import cli_for, process_gone, process_start, retry_until


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(f'remote_dir = "~/proc-tests/{tmp_path.name}"\n')
    return project


def script(proj: Path, name: str, body: str) -> None:
    path = proj / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def record(run, proj: Path, job_id: int | str) -> dict:
    r = run("show", str(job_id), "--json", cwd=proj)
    assert r.code == 0, r.err
    return json.loads(r.out)


def test_a_script_that_reads_stdin_gets_eof(box, proj, tmp_path):
    script(proj, "ask.sh", 'echo "name?"\nread name\necho "read exit $? [$name]"\n')
    run = cli_for(box, tmp_path / "laptop")
    job = json.loads(run("run", "--detach", "--json", "--cpu", "ask.sh", cwd=proj).out)
    try:
        ended = retry_until(lambda: record(run, proj, job["id"])["status"] != "running", seconds=30)
        assert ended, "the job still waits on its stdin"
    finally:
        run("kill", str(job["id"]), cwd=proj)
    rec = record(run, proj, job["id"])
    assert rec["status"] == "succeeded", rec
    assert run("logs", str(job["id"]), cwd=proj).out == "name?\nread exit 1 []\n"


def login_umask(box) -> int:
    """The umask an ssh session of the box's user gets."""
    argv = ["ssh", "-F", box.info.ssh_config, "-o", "BatchMode=yes", box.name, "umask"]
    return int(subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip(), 8)


def test_a_job_gets_the_login_umask_not_the_tmux_servers(fresh_box, proj, tmp_path):
    mask = login_umask(fresh_box)
    assert mask != 0o077, "the test needs a login umask other than the tmux server's"
    # The box's tmux server is started by something with umask 077 (as `remotedl jupyter` does).
    fresh_box.sh("tmux kill-server 2>/dev/null; umask 077; tmux new-session -d -s first sleep 600")
    assert "first" in fresh_box.sh("tmux list-sessions -F '#{session_name}'").stdout
    script(proj, "write.sh", "echo hi > out.txt; mkdir made; stat -c %a out.txt made\n")
    run = cli_for(fresh_box, tmp_path / "laptop")
    r = run("run", "--cpu", "write.sh", cwd=proj)
    assert r.code == 0, r.err
    assert r.out == f"{0o666 & ~mask:o}\n{0o777 & ~mask:o}\n"


DAEMONS = """\
nohup sleep 300 >/dev/null 2>&1 &
setsid sleep 301 >/dev/null 2>&1 </dev/null &
echo started
exit 0
"""


def sleeps_of(workdir: str) -> list[int]:
    """The `sleep` processes started by the job that runs in ``workdir``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[0] == b"sleep" and f"REMOTEDL_JOB_DIR={workdir}".encode() in environ:
            found.append(int(pid))
    return found


def test_a_job_lives_while_the_processes_it_left_run(fresh_box, proj, tmp_path):
    """`nohup cmd &` stays in the job's process group; `setsid cmd &` leaves it, and is found by
    the job's mark in its environment. The job keeps running, and its GPU, until kill."""
    script(proj, "daemons.sh", DAEMONS)
    run = cli_for(fresh_box, tmp_path / "laptop")
    job = json.loads(run("run", "--detach", "--json", "--gpu", "0", "daemons.sh", cwd=proj).out)
    workdir = str(fresh_box.home / "proc-tests" / tmp_path.name / ".remotedl" / "jobs" / str(job["id"]))
    assert retry_until(lambda: len(sleeps_of(workdir)) == 2, seconds=20)
    pids = sleeps_of(workdir)
    starts = {p: process_start(p) for p in pids}
    try:
        rec = retry_until(lambda: (r := record(run, proj, job["id"])).get("leftovers") == 2 and r, seconds=20)
        assert rec, record(run, proj, job["id"])
        assert rec["status"] == "running" and rec["main_exit"] == 0 and rec["exit_code"] is None
        assert rec["state"] == "running (main process exited 0, 2 processes left)"
        assert "main process exited 0, 2 processes left" in run("jobs", cwd=proj).out
        r = run("run", "--detach", "--gpu", "0", "daemons.sh", cwd=proj)  # it keeps its GPU
        assert r.code == 1
        assert f"GPU 0 is used by job {job['id']} (daemons.sh)" in r.err
        r = run("kill", str(job["id"]), "--grace", "1", "--json", cwd=proj)  # kill reaches both
        assert r.code == 0, r.err
        assert json.loads(r.out)["status"] == "killed"
        assert retry_until(lambda: all(process_gone(p, s) for p, s in starts.items()), seconds=30)
        rec = record(run, proj, job["id"])
        assert rec["status"] == "killed" and rec["ended"] and rec["leftovers"] == 0
        r = run("kill", str(job["id"]), cwd=proj)
        assert r.code == 1 and "is not running: it killed" in r.err
    finally:
        for pid in sleeps_of(workdir):
            os.kill(pid, signal.SIGKILL)


LATE = """\
python3 -c 'import os, time
while not os.path.exists("go"):
    time.sleep(0.05)
print("late", flush=True)' &
echo main
exit 3
"""


def test_run_follows_until_the_leftovers_end_and_passes_the_main_exit(box, proj, tmp_path):
    script(proj, "late.sh", LATE)
    env = {
        **os.environ,
        "REMOTEDL_HOST": box.name,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "XDG_STATE_HOME": str(tmp_path / "st"),
        "XDG_CONFIG_HOME": str(tmp_path / "cf"),
    }
    p = subprocess.Popen([sys.executable, "-m", "remotedl", "run", "--cpu", "late.sh"], cwd=proj, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(p.stderr.readline, "")), daemon=True)
    reader.start()
    run = cli_for(box, tmp_path / "laptop")
    try:
        note = "is running (main process exited 3, 1 process left)"
        assert retry_until(lambda: any(note in line for line in err), seconds=30), err
        rec = record(run, proj, "last")
        assert rec["status"] == "running"
        Path(rec["workdir"], "go").touch()  # the process it left ends
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 3  # the main process's exit status, once all of the job ended
    assert out == "main\nlate\n"  # what it left wrote to the pipe goes on to the log
    rec = record(run, proj, rec["id"])
    assert rec["status"] == "failed" and rec["exit_code"] == 3 and rec["leftovers"] == 0
