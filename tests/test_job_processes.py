"""What a job's processes get and how long a job lives: stdin, umask, processes it leaves
behind. Against the real sshd box with its tmux."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_for, retry_until


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
    script(proj, "write.sh", 'echo hi > out.txt; mkdir made; stat -c %a out.txt made\n')
    run = cli_for(fresh_box, tmp_path / "laptop")
    r = run("run", "--cpu", "write.sh", cwd=proj)
    assert r.code == 0, r.err
    assert r.out == f"{0o666 & ~mask:o}\n{0o777 & ~mask:o}\n"
