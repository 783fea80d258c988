"""The test Slurm cluster itself (tests/slurmcluster.py), driven as a user would: every command
runs on the login node (a sandbox box) through its real sshd.

These pin what the Slurm backend will rely on: fake GPUs handed out as gres with
CUDA_VISIBLE_DEVICES, waiting for Resources, the states and exit codes squeue and scontrol
report, srun into a running allocation, and a job's port reached through the login node.
Sample outputs for parser authors: tests/slurm/NOTES.md.
"""

from __future__ import annotations

import shlex
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl.waiting import free_port, retry_until
from tests.conftest import SlurmBox, end_process

TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


class Slurm:
    """Slurm commands on the login node, and the jobs one test submitted (cancelled at its end)."""

    def __init__(self, box: SlurmBox, workdir: Path) -> None:
        self.box = box
        self.dir = workdir
        self.jobs: list[str] = []

    def sh(self, script: str) -> str:
        return self.box.ssh(script).stdout

    def sbatch(self, command: str, *options: str) -> str:
        argv = ["sbatch", "--parsable", f"--chdir={self.dir}", f"--output={self.dir}/%j.out", *options]
        job = self.sh(shlex.join([*argv, "--wrap", command])).strip()
        assert job.isdigit(), job
        self.jobs.append(job)
        return job

    def state(self, job: str) -> tuple[str, str]:
        """(state, reason) as `squeue --format='%T|%r'` prints them."""
        out = self.sh(f"squeue --noheader --states=all --jobs={job} --format='%T|%r'").strip()
        state, _, reason = out.partition("|")
        return state, reason

    def wait_state(self, job: str, *states: str) -> tuple[str, str]:
        def reached() -> tuple[str, str] | None:
            now = self.state(job)
            return now if now[0] in states else None

        seen = retry_until(reached, seconds=60, interval=0.2)
        assert seen, f"job {job} never reached {states}: {self.state(job)}"
        return seen

    def show(self, job: str) -> dict[str, str]:
        """`scontrol --oneliner show job` as a dict (values hold no spaces for the fields we read)."""
        out = self.sh(f"scontrol --oneliner show job {job}")
        return dict(w.split("=", 1) for w in out.split() if "=" in w)

    def output(self, job: str) -> str:
        path = self.dir / f"{job}.out"
        return path.read_text() if path.exists() else ""

    def release(self, name: str) -> None:
        (self.dir / name).touch()

    def hold_until(self, name: str) -> str:
        """A job body that waits for ``release(name)`` (no fixed sleeps in the tests)."""
        return f"while [ ! -e {self.dir}/{name} ]; do sleep 0.1; done"


@pytest.fixture
def slurm(slurm_box: SlurmBox) -> Iterator[Slurm]:
    workdir = slurm_box.home / f"slurm-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    s = Slurm(slurm_box, workdir)
    yield s
    if s.jobs:
        slurm_box.ssh(f"scancel {' '.join(s.jobs)}", check=False)
        # The next test starts with both GPUs free.
        for job in s.jobs:
            retry_until(lambda job=job: s.state(job)[0] in (*TERMINAL, ""), seconds=30, interval=0.2)


def test_login_node_reaches_the_cluster(slurm, slurm_box):
    c = slurm_box.cluster
    out = slurm.sh(
        "printenv SLURM_CONF\n"
        "sinfo --noheader --Node --format='%N|%P|%G'\n"
        "scontrol show config | grep -E '^(SlurmctldPort|SlurmdPort|AccountingStorageType) '\n"
    ).splitlines()
    assert out[0] == str(c.conf)
    assert out[1] == f"{c.node}|{c.partition}*|gpu:2"
    config = {line.split("=")[0].strip(): line.split("=", 1)[1].strip() for line in out[2:]}
    assert config == {
        "AccountingStorageType": "accounting_storage/none",
        "SlurmctldPort": str(c.ctld_port),
        "SlurmdPort": str(c.slurmd_port),
    }
    for device in c.gpu_devices:
        assert device.is_char_device()


def test_job_gets_one_gpu_in_cuda_visible_devices(slurm, slurm_box):
    job = slurm.sbatch(
        'echo "CVD=$CUDA_VISIBLE_DEVICES JOB_GPUS=$SLURM_JOB_GPUS NODE=$SLURMD_NODENAME"', "--gres=gpu:1"
    )
    assert slurm.wait_state(job, *TERMINAL) == ("COMPLETED", "None")
    out = slurm.output(job).strip()
    assert out in ("CVD=0 JOB_GPUS=0 NODE=localhost", "CVD=1 JOB_GPUS=1 NODE=localhost")
    # A job that asks for no GPU sees none.
    job = slurm.sbatch('echo "CVD=${CUDA_VISIBLE_DEVICES-unset}"')
    assert slurm.wait_state(job, *TERMINAL)[0] == "COMPLETED"
    assert slurm.output(job).strip() == "CVD=unset"


def test_gpus_are_disjoint_and_a_third_job_waits_for_resources(slurm):
    first = slurm.sbatch(f'echo "CVD=$CUDA_VISIBLE_DEVICES"; {slurm.hold_until("a")}', "--gres=gpu:1")
    second = slurm.sbatch(f'echo "CVD=$CUDA_VISIBLE_DEVICES"; {slurm.hold_until("b")}', "--gres=gpu:1")
    for job in (first, second):
        slurm.wait_state(job, "RUNNING")
        assert retry_until(lambda job=job: slurm.output(job), seconds=30), job
    gpus = {slurm.output(first).strip(), slurm.output(second).strip()}
    assert gpus == {"CVD=0", "CVD=1"}

    third = slurm.sbatch('echo "CVD=$CUDA_VISIBLE_DEVICES"', "--gres=gpu:1")
    # The reason is None until the scheduler has looked at the job, then Resources.
    assert retry_until(lambda: slurm.state(third) == ("PENDING", "Resources"), seconds=30, interval=0.2), (
        slurm.state(third)
    )
    assert slurm.show(third)["JobState"] == "PENDING"

    slurm.release("a")
    assert slurm.wait_state(third, *TERMINAL) == ("COMPLETED", "None")
    # It got the GPU the first job gave back.
    assert slurm.output(third) == slurm.output(first)
    assert slurm.state(second) == ("RUNNING", "None")
    slurm.release("b")
    assert slurm.wait_state(second, *TERMINAL)[0] == "COMPLETED"


def test_scancel_gives_cancelled(slurm):
    job = slurm.sbatch(slurm.hold_until("never"))
    slurm.wait_state(job, "RUNNING")
    slurm.sh(f"scancel {job}")
    assert slurm.wait_state(job, *TERMINAL)[0] == "CANCELLED"
    info = slurm.show(job)
    assert info["JobState"] == "CANCELLED"
    assert info["ExitCode"] == "0:15"  # killed by SIGTERM


def test_failing_job_exit_code_is_reported(slurm):
    job = slurm.sbatch("echo about to fail; exit 3")
    assert slurm.wait_state(job, *TERMINAL) == ("FAILED", "NonZeroExitCode")
    info = slurm.show(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")
    assert slurm.output(job) == "about to fail\n"
    # No accounting daemon: plain sacct refuses; `sacct -c` reads the jobcomp/filetxt file.
    r = slurm.box.ssh(f"sacct -j {job}", check=False)
    assert r.returncode == 1
    assert "accounting storage is disabled" in r.stdout + r.stderr
    out = slurm.sh(f"sacct -c --parsable2 --noheader -j {job} --format=JobID,State,ExitCode,NodeList")
    assert out.strip() == f"{job}|FAILED|3:0|localhost"


def test_srun_overlap_runs_in_a_running_job(slurm):
    job = slurm.sbatch(slurm.hold_until("done"), "--gres=gpu:1")
    slurm.wait_state(job, "RUNNING")
    out = slurm.sh(
        f"srun --jobid={job} --overlap sh -c 'echo \"$SLURM_JOB_ID ${{CUDA_VISIBLE_DEVICES-none}}\"'"
    )
    assert out.split()[0] == job
    assert out.split()[1] in ("0", "1")
    slurm.release("done")
    assert slurm.wait_state(job, *TERMINAL)[0] == "COMPLETED"


def test_srun_pty_gives_an_interactive_shell_in_the_allocation(slurm, slurm_box, tmp_path):
    job = slurm.sbatch(slurm.hold_until("done"))
    slurm.wait_state(job, "RUNNING")
    sock = str(tmp_path / "tmux")
    # As `remotedl attach` will: ssh -t to the login node, srun into the job with a pty.
    cmd = shlex.join(slurm_box.ssh_argv(f"srun --jobid={job} --overlap --pty $SHELL", options=["-tt"]))
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "120", "-y", "30", cmd], check=True)
    try:

        def screen() -> str:
            r = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p"], capture_output=True, text=True)
            return r.stdout

        assert retry_until(lambda: screen().strip(), seconds=30), "no prompt from the shell in the job"
        subprocess.run(
            ["tmux", "-S", sock, "send-keys", 'echo "in-$SLURM_JOB_ID-step-$SLURM_STEP_ID-$(tty)"', "Enter"],
            check=True,
        )
        assert retry_until(lambda: f"in-{job}-step-0-/dev/pts/" in screen(), seconds=30), screen()
        subprocess.run(["tmux", "-S", sock, "send-keys", "exit", "Enter"], check=True)
        # The shell's step ends; the job itself keeps running.
        assert retry_until(
            lambda: subprocess.run(["tmux", "-S", sock, "has-session"], capture_output=True).returncode != 0,
            seconds=30,
        )
        assert slurm.state(job)[0] == "RUNNING"
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False, capture_output=True)
    slurm.release("done")


def test_port_in_a_job_is_reached_through_the_login_node(slurm, slurm_box, tmp_path):
    token = uuid.uuid4().hex
    (slurm.dir / "token.txt").write_text(token)
    port, local_port = free_port(), free_port()
    job = slurm.sbatch(f"exec python3 -m http.server {port} --bind 127.0.0.1 --directory {slurm.dir}")
    slurm.wait_state(job, "RUNNING")
    node = slurm.sh(f"squeue --noheader --jobs={job} --format=%N").strip()
    assert node == slurm_box.cluster.node == "localhost"
    assert slurm.sh(f"getent hosts {node}").split()[0] == "127.0.0.1"
    # As the Jupyter tunnel will: laptop port -> login node -> the job's node and port.
    forward = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local_port}:{node}:{port}"]
    tunnel = subprocess.Popen(
        slurm_box.ssh_argv(options=forward),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def fetch() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local_port}/token.txt", timeout=2) as r:
                    return str(r.read().decode())
            except OSError:
                return None

        assert retry_until(fetch, seconds=30, interval=0.2) == token
    finally:
        end_process(tunnel)
