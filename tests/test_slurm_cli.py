"""The same commands on a Slurm host: `[hosts.NAME] scheduler = "slurm"`, the real test
cluster's login node (a sandbox box's sshd). run/logs/jobs/kill/attach/status/doctor/jupyter
through the CLI, as a user types them."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl.waiting import free_port, retry_until
from tests.conftest import CliResult, SlurmBox, cli_for, make_env


class Project:
    """A local project whose host is the Slurm login node, and the CLI run from it."""

    def __init__(self, login: SlurmBox, root: Path, laptop: Path) -> None:
        self.login = login
        self.root = root
        self.laptop = laptop
        self.rdir = f"~/slurm-cli/{uuid.uuid4().hex[:8]}"
        self.flags = login.home / "flags" / uuid.uuid4().hex[:8]
        self.flags.mkdir(parents=True)
        (root / "remotedl.toml").write_text(
            f'remote_dir = "{self.rdir}"\n\n[hosts.{login.name}]\nscheduler = "slurm"\ntime = "30"\n'
        )
        self.cli = cli_for(login, laptop)

    def __call__(self, *argv: str) -> CliResult:
        return self.cli(*argv, cwd=self.root)

    def script(self, name: str, body: str) -> None:
        path = self.root / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def hold(self, name: str) -> str:
        return f"while [ ! -e {self.flags}/{name} ]; do sleep 0.1; done"

    def release(self, name: str) -> None:
        (self.flags / name).touch()

    def jobs(self) -> dict[int, dict[str, object]]:
        r = self("jobs", "--all", "--json")
        assert r.code == 0, r.err
        mine = self.rdir.removeprefix("~")  # the login node's jobs of this project only
        return {int(j["id"]): j for j in json.loads(r.out) if str(j.get("remote_dir")).endswith(mine)}

    def wait_state(self, job: int, pattern: str, seconds: float = 60) -> dict[str, object]:
        def reached() -> dict[str, object] | None:
            rec = self.jobs()[job]
            return rec if re.fullmatch(pattern, str(rec.get("slurm_state"))) else None

        got = retry_until(reached, seconds=seconds, interval=0.3)
        assert got, f"job {job} never reached {pattern}: {self.jobs()[job]}"
        return got

    def environ(self) -> dict[str, str]:
        """The environment of a CLI run as a separate process (the laptop's)."""
        e = make_env(self.laptop, cwd=self.root)
        return {
            **dict(e.environ),
            "REMOTEDL_SSH_CONFIG": self.login.info.ssh_config,
            "REMOTEDL_HOST": self.login.name,
            "PYTHONUNBUFFERED": "1",
        }


@pytest.fixture
def proj(slurm_box: SlurmBox, project: Path, tmp_path: Path) -> Iterator[Project]:
    p = Project(slurm_box, project, tmp_path / "laptop")
    yield p
    for name in ("a", "b", "go", "done"):
        p.release(name)
    with_ids = [j for j in p.jobs().values() if j["status"] in ("queued", "starting", "running")]
    for j in with_ids:
        if j.get("slurm_id"):
            slurm_box.ssh(f"scancel {j['slurm_id']}", check=False)
    for j in with_ids:  # the next test starts with both GPUs free
        retry_until(lambda j=j: p.jobs()[int(j["id"])]["status"] not in ("queued", "running"), seconds=60)


def test_run_submits_and_follows_to_the_end_with_the_exit_status(proj):
    proj.script(
        "train.sh", 'echo "job=$REMOTEDL_JOB_ID cvd=$CUDA_VISIBLE_DEVICES lr=$1 token=$TOKEN"; exit 3\n'
    )
    r = proj("run", "-e", "TOKEN=s3cr3t value", "train.sh", "0.1", "--gpus", "1")
    assert r.code == 3, r.err
    assert re.search(r"job (\d+) \(train.sh\) submitted to Slurm on slurmbox as job \d+: PENDING", r.err), (
        r.err
    )
    job = int(re.findall(r"job (\d+) \(train.sh\)", r.err)[0])
    assert re.fullmatch(rf"job={job} cvd=[01] lr=0.1 token=s3cr3t value\n", r.out), r.out
    rec = proj.jobs()[job]
    assert (rec["status"], rec["exit_code"], rec["slurm_state"]) == ("failed", 3, "FAILED")
    assert rec["scheduler"] == "slurm" and str(rec["workdir"]).endswith(f"/.remotedl/jobs/{job}")
    table = proj("jobs").out
    assert re.search(rf"^{job}\s+train\.sh\s+FAILED \(exit 3\)\s+[01]\s+3\s", table, re.M), table
    shown = proj("show", str(job)).out
    assert re.search(
        rf"status\s+FAILED \(exit 3\)\n.*\n\s+Slurm job\s+{rec['slurm_id']} on localhost, ", shown
    ), shown


def test_gpu_index_refused_and_slurm_flags_only_for_slurm_hosts(proj, slurm_box):
    proj.script("t.sh", "true\n")
    r = proj("run", "t.sh", "--gpu", "0")
    assert r.code == 2
    assert (
        "--gpu 0 picks GPUs by their index, but on a Slurm cluster Slurm chooses the devices: "
        "the job sees the ones it got as CUDA_VISIBLE_DEVICES starting at 0"
    ) in r.err
    assert "--gpus N" in r.err
    assert proj.jobs() == {}  # nothing submitted
    (proj.root / "remotedl.toml").write_text(f'remote_dir = "{proj.rdir}"\n')  # a plain box now
    r = proj("run", "--time", "10", "--partition", "gpu", "t.sh")
    assert r.code == 2
    assert "--time, --partition: for Slurm hosts only, and slurmbox is not one" in r.err


def test_detach_logs_follow_pending_jobs_table_and_kill(proj):
    proj.script("hold.sh", f"echo holding $CUDA_VISIBLE_DEVICES; {proj.hold('a')}\n")
    ids = []
    for _ in range(2):
        r = proj("run", "--detach", "hold.sh")
        assert r.code == 0, r.err
        ids.append(int(r.out.strip()))
    for j in ids:
        proj.wait_state(j, "RUNNING")
    proj.script("third.sh", 'echo "third on $CUDA_VISIBLE_DEVICES"\n')
    r = proj("run", "--detach", "--time", "5", "--sbatch-arg=--comment=third one", "third.sh")
    assert r.code == 0, r.err
    third = int(r.out.strip())
    assert f"`remotedl logs -f {third}` to follow" in r.err
    proj.wait_state(third, "PENDING")
    assert retry_until(lambda: "PENDING (Resources)" in proj("jobs").out, seconds=30, interval=0.3)
    table = proj("jobs").out
    assert re.search(rf"^{third}\s+third\.sh\s+PENDING \(Resources\)", table, re.M), table
    assert re.search(rf"^{ids[0]}\s+hold\.sh\s+RUNNING on localhost\s+[01]\s", table, re.M), table
    # logs -f says why it waits, then streams once a GPU is free
    # (a GPU is freed once the follower has said so: not on a timer, which under load can fire
    # before the follower's first look and let the job start unseen)
    follower = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "logs", "-f", str(third)],
        cwd=proj.root,
        env=proj.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: list[str] = []
    try:
        assert follower.stderr is not None
        for line in follower.stderr:
            said.append(line)
            if "waits in Slurm's queue" in line:
                break
    finally:
        proj.release("a")
    out, rest = follower.communicate(timeout=120)
    err = "".join(said) + rest
    assert follower.returncode == 0, err
    assert f"remotedl: job {third} waits in Slurm's queue: PENDING (Resources)" in err, err
    assert re.fullmatch(r"third on [01]\n", out), out
    limit = proj.login.ssh(f"scontrol show job {proj.jobs()[third]['slurm_id']}").stdout
    assert "TimeLimit=00:05:00" in limit and "Comment=third one" in limit
    # kill: scancel, and the state says so
    proj.script("forever.sh", f"{proj.hold('never')}\n")
    r = proj("run", "--detach", "--cpu", "forever.sh")
    victim = int(r.out.strip())
    proj.wait_state(victim, "RUNNING")
    r = proj("kill", str(victim))
    assert r.code == 0, r.err
    assert r.out.strip() == f"job {victim} (forever.sh): CANCELLED"
    assert proj.jobs()[victim]["status"] == "killed"
    assert proj("kill", str(victim)).code != 0  # not running any more: said, exit 1


def test_status_and_doctor_on_the_cluster(proj):
    proj.script("hold.sh", f"{proj.hold('b')}\n")
    job = int(proj("run", "--detach", "--name", "st", "hold.sh").out.strip())
    slurm_id = str(proj.wait_state(job, "RUNNING")["slurm_id"])
    r = proj("status")
    assert r.code == 0, r.err
    assert "Slurm login node" in r.out and "GPUs 1 used of 2" in r.out
    assert re.search(r"^debug\*\s+UP\s+1\s+1 / 2\s+UNLIMITED", r.out, re.M), r.out
    assert re.search(r"^localhost\s+debug\s+mixed\s+1 / 2\s", r.out, re.M), r.out
    assert re.search(rf"^{slurm_id}\s+rdl-{job}-st\s+RUNNING on localhost\s+1\s", r.out, re.M), r.out
    data = json.loads(proj("status", "--json").out)
    assert data["scheduler"] == "slurm" and data["gpus"] == 2 and data["gpus_used"] == 1
    proj.release("b")
    r = proj("doctor")
    lines = r.out.splitlines()
    assert any(re.match(r"OK\s+slurm\s+slurm controller: Slurmctld", x) for x in lines), r.out
    assert any(re.match(r"OK\s+slurm\s+test submission: a 1-GPU job would be accepted", x) for x in lines)
    assert any(re.match(r"OK\s+slurm\s+GPU partitions: debug \(2 GPUs\)", x) for x in lines), r.out
    assert any(re.match(r"SKIP\s+slurm\s+accounting", x) for x in lines), r.out
    assert any(re.match(r"SKIP\s+box\s+GPUs: a Slurm login node", x) for x in lines), r.out
    (proj.root / "remotedl.toml").write_text(
        f'remote_dir = "{proj.rdir}"\n[hosts.{proj.login.name}]\nscheduler = "slurm"\npartition = "nope"\n'
    )
    r = proj("doctor")
    assert r.code == 1
    assert re.search(r"FAIL\s+slurm\s+partition: partition 'nope' does not exist", r.out), r.out


def test_attach_through_the_cli_in_a_terminal(proj, tmp_path):
    proj.script("hold.sh", f"{proj.hold('done')}\n")
    job = int(proj("run", "--detach", "hold.sh").out.strip())
    rec = proj.wait_state(job, "RUNNING")
    sock = str(tmp_path / "tmux")
    env = proj.environ()
    cmd = shlex.join(
        ["env", *[f"{k}={v}" for k, v in env.items()], sys.executable, "-m", "remotedl", "attach", str(job)]
    )
    subprocess.run(
        ["tmux", "-S", sock, "new-session", "-d", "-x", "200", "-y", "30", "-c", str(proj.root), cmd],
        check=True,
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "-S", sock, "capture-pane", "-p"], capture_output=True, text=True
        ).stdout

    try:
        assert retry_until(lambda: "`exit` leaves it" in screen(), seconds=30), screen()
        subprocess.run(["tmux", "-S", sock, "send-keys", 'echo "in-$SLURM_JOB_ID"', "Enter"], check=True)
        assert retry_until(lambda: f"in-{rec['slurm_id']}" in screen(), seconds=30), screen()
        subprocess.run(["tmux", "-S", sock, "send-keys", "exit", "Enter"], check=True)
        assert retry_until(
            lambda: subprocess.run(["tmux", "-S", sock, "has-session"], capture_output=True).returncode != 0,
            seconds=30,
        )
        assert proj.jobs()[job]["status"] == "running"
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False, capture_output=True)


def test_log_resume_across_a_dropped_connection(proj):
    proj.script(
        "count.sh",
        f'i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo "line $i"; done; {proj.hold("go")}\n'
        'i=20; while [ $i -lt 40 ]; do i=$((i+1)); echo "line $i"; done\n',
    )
    job = int(proj("run", "--detach", "--cpu", "count.sh").out.strip())
    proj.wait_state(job, "RUNNING")
    env = proj.environ()
    p = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "logs", "-f", str(job)],
        cwd=proj.root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    got = bytearray()

    def read() -> None:
        assert p.stdout is not None
        while chunk := os.read(p.stdout.fileno(), 65536):
            got.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # the follower has streamed the first part: its connection is the one to drop
    assert retry_until(lambda: b"line 20\n" in got, seconds=30)
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(proj.login.info.pid)], capture_output=True, text=True
    )
    for pid in out.stdout.split():  # every ssh connection to the login node drops
        os.kill(int(pid), signal.SIGKILL)
    proj.release("go")
    assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    reader.join(10)
    err = p.stderr.read().decode() if p.stderr else ""
    assert "connection lost, reconnecting" in err, err
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 41))


def _jupyter_venv(proj: Project) -> None:
    bindir = proj.login.home / proj.rdir.removeprefix("~/") / ".venv" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("python", "jupyter"):  # the test's own Jupyter as the project's environment
        if not (bindir / tool).exists():
            (bindir / tool).symlink_to(Path(sys.executable).parent / tool)


def test_jupyter_on_a_node_through_the_login_node_and_ctrl_c_cancels_it(proj):
    assert proj("push").code == 0
    _jupyter_venv(proj)
    local = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "jupyter", str(local), "--gpus", "1"],
        cwd=proj.root,
        env=proj.environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        url = p.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{local}/") and "token=" in url, (url, p.poll())
        token = url.split("token=", 1)[1]

        def status() -> dict[str, object] | None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{local}/api/status?token={token}", timeout=2
                ) as r:
                    return dict(json.loads(r.read()))
            except OSError:
                return None

        assert retry_until(status, seconds=30, interval=0.3), "Jupyter did not answer through the tunnel"
        jupyter = [j for j in proj.jobs().values() if j["name"] == "jupyter"]
        assert len(jupyter) == 1 and jupyter[0]["status"] == "running" and jupyter[0]["node"] == "localhost"
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "Jupyter started on node localhost as Slurm job" in err, err
    assert re.search(r"cancelled the Jupyter job \d+: CANCELLED", err), err
    assert token not in err
    assert [j["status"] for j in proj.jobs().values() if j["name"] == "jupyter"] == ["killed"]


def test_run_refuses_a_fleet_with_a_slurm_host(proj, slurm_box):
    proj.script("t.sh", "true\n")
    r = proj("run", "--host", f"{slurm_box.name},other", "t.sh")
    assert r.code == 2, r.err
    assert f"{slurm_box.name}: a Slurm host is not placed among a fleet's boxes" in r.err
