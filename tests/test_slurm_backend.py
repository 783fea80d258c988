"""remotedl.slurm against the real single-node cluster (tests/slurmcluster.py), through the
login node's real sshd and the one channel (``Box.run``): submit, states from squeue/scontrol
and from the job's own record, scancel, the cluster's status and doctor."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl import slurm, slurmhost
from remotedl.errors import RemoteError
from remotedl.slurm import BatchJob, JobRef, SlurmJob, SlurmSettings
from remotedl.ssh import resolve_host
from remotedl.ssh.channel import Box
from remotedl.waiting import retry_until
from tests.conftest import SlurmBox, make_env


class Jobs:
    """Submits jobs for one test into a work dir of its own; cancels what is left at the end."""

    def __init__(self, login: SlurmBox, box: Box, base: Path) -> None:
        self.login = login
        self.box = box
        self.base = base
        self.refs: list[JobRef] = []
        self.count = 0

    def submit(self, command: str, settings: SlurmSettings | None = None, **kw: object) -> JobRef:
        self.count += 1
        n = str(self.count)
        work = self.base / "work"
        work.mkdir(exist_ok=True)
        job = BatchJob(
            job_id=n,
            command=command,
            workdir=str(work),
            control_dir=str(self.base / "ctl" / n),
            log=str(self.base / "logs" / f"{n}.log"),
            **kw,  # type: ignore[arg-type]
        )
        got = slurmhost.submit(self.box, job, settings or SlurmSettings())
        ref = JobRef(got.slurm_id, got.control_dir, job.log)
        self.refs.append(ref)
        return ref

    def state(self, ref: JobRef) -> SlurmJob:
        return slurmhost.query(self.box, [ref])[ref.slurm_id]

    def wait(self, ref: JobRef, *states: str, seconds: float = 60) -> SlurmJob:
        got = slurmhost.wait_for(self.box, ref, lambda j: j.state in states, seconds=seconds, interval=0.2)
        assert got is not None, f"job {ref.slurm_id} never reached {states}: {self.state(ref)}"
        return got

    def log(self, ref: JobRef) -> str:
        path = Path(ref.log)
        return path.read_text() if path.exists() else ""

    def hold(self, name: str) -> str:
        """A command that waits for ``release(name)`` (no fixed sleeps)."""
        return f"while [ ! -e {self.base}/{name} ]; do sleep 0.1; done"

    def release(self, name: str) -> None:
        (self.base / name).touch()


@pytest.fixture
def jobs(slurm_box: SlurmBox, tmp_path: Path) -> Iterator[Jobs]:
    spec = resolve_host(make_env(tmp_path / "laptop"), slurm_box.name, ssh_config=slurm_box.info.ssh_config)
    base = slurm_box.home / f"sl-{uuid.uuid4().hex[:8]}"
    base.mkdir()
    j = Jobs(slurm_box, Box(spec), base)
    yield j
    if j.refs:
        slurm_box.ssh("scancel " + " ".join(r.slurm_id for r in j.refs), check=False)
        for ref in j.refs:  # the next test starts with both GPUs free
            retry_until(lambda ref=ref: j.state(ref).ended, seconds=30, interval=0.2)


def test_submit_runs_in_the_job_dir_with_the_jobs_environment(jobs):
    secret = f"tok-{uuid.uuid4().hex} 'q' $(nope)"
    ref = jobs.submit(
        'echo "id=$REMOTEDL_JOB_ID order=$CUDA_DEVICE_ORDER cvd=$CUDA_VISIBLE_DEVICES pwd=$PWD"\n'
        'printf "%s\\n" "$TOKEN" > token.out\n'
        f"{jobs.hold('go')}",
        env={"TOKEN": secret},
        name="first try",
        gpus=1,
    )
    running = jobs.wait(ref, "RUNNING")
    assert running.describe() == "RUNNING on localhost"
    assert running.gpus == 1 and len(running.gpu_indices) == 1
    ctl = Path(ref.control_dir)
    # The --env values: a 0600 file while the job runs, in no process's argv.
    assert stat.S_IMODE((ctl / "env").stat().st_mode) == 0o600
    assert stat.S_IMODE(ctl.stat().st_mode) == 0o700
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert secret.encode() not in argv, f"the secret is in the argv of process {pid}"
    jobs.release("go")
    done = jobs.wait(ref, "COMPLETED")
    assert (done.exit_code, done.status) == (0, "succeeded")
    idx = running.gpu_indices[0]
    assert jobs.log(ref) == f"id=1 order=PCI_BUS_ID cvd={idx} pwd={jobs.base / 'work'}\n"
    assert (jobs.base / "work" / "token.out").read_text() == secret + "\n"
    assert not (ctl / "env").exists()  # removed at the job's end
    assert (ctl / "exit").read_text().split()[:2] == ["0", "0"]
    names = jobs.login.ssh(f"squeue --noheader --states=all --jobs={ref.slurm_id} -o %j").stdout
    assert names.strip() == "rdl-1-first_try"


def test_two_jobs_get_disjoint_gpus_and_a_third_waits_for_resources(jobs):
    a = jobs.submit(f"echo $CUDA_VISIBLE_DEVICES; {jobs.hold('a')}", gpus=1)
    b = jobs.submit(f"echo $CUDA_VISIBLE_DEVICES; {jobs.hold('b')}", gpus=1)
    got = [jobs.wait(r, "RUNNING").gpu_indices for r in (a, b)]
    assert sorted(got) == [[0], [1]]
    c = jobs.submit("echo $CUDA_VISIBLE_DEVICES", gpus=1)
    pending = jobs.wait(c, "PENDING")
    assert retry_until(lambda: jobs.state(c).reason == "Resources", seconds=30, interval=0.2)
    assert pending.status == "queued"
    assert jobs.state(c).describe() == "PENDING (Resources)"
    jobs.release("a")
    assert jobs.wait(c, "COMPLETED").exit_code == 0
    assert jobs.log(c) == jobs.log(a)  # it got the GPU the first job gave back
    jobs.release("b")
    jobs.wait(b, "COMPLETED")


def test_failing_job_reports_its_exit_code_also_after_slurm_forgot_it(jobs):
    ref = jobs.submit("echo about to fail; exit 3", gpus=0)
    done = jobs.wait(ref, "FAILED")
    assert (done.exit_code, done.describe(), done.source) == (3, "FAILED (exit 3)", "scontrol")
    assert jobs.log(ref) == "about to fail\n"
    # Once a job has left squeue/scontrol (MinJobAge) on a cluster without accounting, its own
    # record says how it ended: an id Slurm does not know, with this job's control dir.
    gone = JobRef("99999999", ref.control_dir, ref.log)
    state = slurmhost.query(jobs.box, [gone])["99999999"]
    assert (state.source, state.state, state.exit_code, state.nodes) == ("job", "FAILED", 3, "localhost")


def test_cancel_gives_cancelled_and_removes_the_env_file(jobs):
    ref = jobs.submit(jobs.hold("never"), env={"K": "v"}, gpus=1)
    jobs.wait(ref, "RUNNING")
    assert (Path(ref.control_dir) / "env").exists()
    state = slurmhost.cancel(jobs.box, ref)
    assert (state.state, state.status, state.describe()) == ("CANCELLED", "killed", "CANCELLED")
    assert not (Path(ref.control_dir) / "env").exists()
    # The batch script saw the SIGTERM and recorded it.
    assert retry_until((Path(ref.control_dir) / "exit").exists, seconds=30)
    own = slurmhost.query(jobs.box, [JobRef("99999998", ref.control_dir, ref.log)])["99999998"]
    assert own.state == "CANCELLED"


def test_cancel_a_pending_job(jobs):
    holders = [jobs.submit(jobs.hold("x"), gpus=1) for _ in range(2)]
    for h in holders:
        jobs.wait(h, "RUNNING")
    waiting = jobs.submit("true", gpus=1, env={"K": "v"})
    jobs.wait(waiting, "PENDING")
    state = slurmhost.cancel(jobs.box, waiting)
    assert state.state == "CANCELLED"
    assert not (Path(waiting.control_dir) / "env").exists()  # never ran: removed by the cancel
    jobs.release("x")


def test_sbatch_refusal_is_one_clear_error(jobs):
    with pytest.raises(
        RemoteError, match="sbatch refused the job: Requested node configuration is not available"
    ):
        jobs.submit("true", gpus=3)
    with pytest.raises(RemoteError, match=r"sbatch refused the job: invalid partition specified: nope$"):
        jobs.submit("true", SlurmSettings(partition="nope"), gpus=1)
    # Nothing secret left behind by a refused submission.
    assert not list(jobs.base.glob("ctl/*/env"))


def test_hostile_command_paths_and_options_arrive_as_data(jobs):
    odd = jobs.base / "we%ird dir 'q'"
    odd.mkdir()
    work = odd / "work"
    work.mkdir()
    job = BatchJob(
        job_id="9",
        command='printf \'%s\\n\' "a  b" \'$HOME\' "$(printf x)"; echo "cwd=$PWD"',
        workdir=str(work),
        control_dir=str(odd / "ctl"),
        log=str(odd / "l%j.log"),
        name="x; rm -rf ~",
        gpus=0,
    )
    got = slurmhost.submit(jobs.box, job, SlurmSettings(time="5", sbatch_args=("--comment=a b;c",)))
    ref = JobRef(got.slurm_id, got.control_dir, job.log)
    jobs.refs.append(ref)
    assert jobs.wait(ref, "COMPLETED").exit_code == 0
    assert Path(job.log).read_text() == f"a  b\n$HOME\nx\ncwd={work}\n"  # the % was not a pattern


def test_cluster_status(jobs, slurm_box):
    ref = jobs.submit(jobs.hold("s"), gpus=1, name="st")
    jobs.wait(ref, "RUNNING")
    status = slurmhost.cluster_status(jobs.box)
    assert status.user == slurm_box.info.user
    assert status.version.split()[-1][:2].isdigit()
    assert [(p.name, p.default, p.gpus, p.gpus_used) for p in status.partitions] == [("debug", True, 2, 1)]
    assert [(n.name, n.partitions, n.gpus, n.gpus_used) for n in status.nodes] == [
        ("localhost", ["debug"], 2, 1)
    ]
    mine = {j.job_id: j for j in status.jobs}
    assert mine[ref.slurm_id].name == "rdl-1-st" and mine[ref.slurm_id].gpus == 1
    assert mine[ref.slurm_id].describe() == "RUNNING on localhost"
    assert status.to_dict()["gpus_used"] == 1
    jobs.release("s")


def test_doctor_on_the_cluster(jobs):
    checks = {c.name: c for c in slurmhost.doctor_checks(jobs.box, SlurmSettings(partition="debug"))}
    assert checks["slurm commands"].status == "ok"
    assert checks["slurm controller"].status == "ok" and "UP" in checks["slurm controller"].detail
    assert checks["GPU partitions"].detail == "debug (2 GPUs)"
    assert checks["partition"].status == "ok"
    assert checks["test submission"].status == "ok", checks["test submission"].detail
    assert checks["accounting"].status == "skip"
    assert checks["account limits"].status == "skip"
    bad = SlurmSettings(partition="nope", modules=("cuda/12.4",))
    checks = {c.name: c for c in slurmhost.doctor_checks(jobs.box, bad)}
    assert checks["partition"].status == "fail"
    assert checks["test submission"].status == "fail"
    assert checks["test submission"].detail.endswith("settings: invalid partition specified: nope")
    assert checks["modules"].status == "fail"  # the test cluster has no module system
    too_many = {c.name: c for c in slurmhost.doctor_checks(jobs.box, SlurmSettings(time="1", account="x"))}
    assert too_many["test submission"].status in ("ok", "fail")  # no accounting: the account is not checked


def test_follow_waits_while_pending_then_streams_to_the_end(jobs):
    holders = [jobs.submit(jobs.hold("free"), gpus=1) for _ in range(2)]
    for h in holders:
        jobs.wait(h, "RUNNING")
    ref = jobs.submit('for i in 1 2 3; do echo "line $i"; done; exit 4', gpus=1)
    seen: list[str] = []
    got = bytearray()

    def on_state(s: SlurmJob) -> None:
        seen.append(s.describe())
        if s.describe() == "PENDING (Resources)":
            jobs.release("free")  # GPUs come free once the follower has said why it waits

    end = slurmhost.follow_log(jobs.box, ref, got.extend, on_state=on_state)
    assert got.decode() == "line 1\nline 2\nline 3\n"
    assert (end.state, end.exit_code) == ("FAILED", 4)
    assert "PENDING (Resources)" in seen
    assert seen[-1].startswith(("RUNNING", "COMPLETING", "FAILED")), seen
    # Without following: the whole log, or its last lines, and the state.
    whole = bytearray()
    assert slurmhost.follow_log(jobs.box, ref, whole.extend, follow=False).exit_code == 4
    assert whole == got
    last = bytearray()
    slurmhost.follow_log(jobs.box, ref, last.extend, follow=False, lines=1)
    assert last.decode() == "line 3\n"


def _drop_connections(login: SlurmBox) -> int:
    """Kill sshd's per-connection children: every ssh connection to the login node drops."""
    import signal
    import subprocess

    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(login.info.pid)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_follow_resumes_at_its_byte_offset_after_a_dropped_connection(jobs):
    import threading

    ref = jobs.submit(
        f'i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo "line $i"; done; {jobs.hold("more")}\n'
        'i=20; while [ $i -lt 40 ]; do i=$((i+1)); echo "line $i"; done',
        gpus=0,
    )
    got = bytearray()
    reconnects: list[int] = []
    result: dict[str, SlurmJob] = {}

    def follow() -> None:
        result["end"] = slurmhost.follow_log(jobs.box, ref, got.extend, on_reconnect=reconnects.append)

    t = threading.Thread(target=follow)
    t.start()
    assert retry_until(lambda: b"line 20\n" in got, seconds=60)
    assert _drop_connections(jobs.login) >= 1
    jobs.release("more")
    t.join(90)
    assert not t.is_alive()
    assert reconnects, "the connection was dropped, so the follower must have reconnected"
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 41))
    assert result["end"].state == "COMPLETED"


def test_attach_gives_a_shell_in_the_jobs_allocation(jobs, tmp_path):
    import shlex
    import subprocess

    ref = jobs.submit(jobs.hold("done"), gpus=1)
    running = jobs.wait(ref, "RUNNING")
    sock = str(tmp_path / "tmux")
    cmd = shlex.join(slurmhost.attach_argv(jobs.box.spec, ref.slurm_id))
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "150", "-y", "30", cmd], check=True)

    def screen() -> str:
        r = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p"], capture_output=True, text=True)
        return r.stdout

    try:
        assert retry_until(lambda: screen().strip(), seconds=30), "no prompt from the shell in the job"
        subprocess.run(
            [
                "tmux",
                "-S",
                sock,
                "send-keys",
                'echo "in-$SLURM_JOB_ID-gpu-$CUDA_VISIBLE_DEVICES-$(tty)"',
                "Enter",
            ],
            check=True,
        )
        want = f"in-{ref.slurm_id}-gpu-{running.gpu_indices[0]}-/dev/pts/"
        assert retry_until(lambda: want in screen(), seconds=30), screen()
        subprocess.run(["tmux", "-S", sock, "send-keys", "exit", "Enter"], check=True)
        assert retry_until(
            lambda: subprocess.run(["tmux", "-S", sock, "has-session"], capture_output=True).returncode != 0,
            seconds=30,
        )
        assert jobs.state(ref).state == "RUNNING"  # the shell ended, the job did not
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False, capture_output=True)
    jobs.release("done")
    with pytest.raises(RemoteError, match="not a Slurm job id"):
        slurmhost.attach_argv(jobs.box.spec, "1; reboot")


def test_jupyter_as_a_batch_job_reached_through_the_login_node(jobs, slurm_box):
    import json
    import subprocess
    import sys
    import urllib.request

    from remotedl.waiting import free_port

    work = jobs.base / "nb"
    bindir = work / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for tool in ("python", "jupyter"):  # the test's own Jupyter as the project's environment
        (bindir / tool).symlink_to(Path(sys.executable).parent / tool)
    said: list[str] = []
    kw = {
        "workdir": str(work),
        "control_dir": str(jobs.base / "jctl"),
        "log": str(jobs.base / "jctl" / "jupyter.log"),
        "settings": SlurmSettings(),
        "timeout": 120.0,
    }
    server = slurmhost.find_or_start_jupyter(jobs.box, on_progress=said.append, **kw)  # type: ignore[arg-type]
    jobs.refs.append(JobRef(server.slurm_id, server.control_dir, server.log))
    assert server.started and server.node == "localhost" and server.address == "127.0.0.1"
    assert any("RUNNING" in s for s in said), said
    assert "token" not in json.dumps(server.to_dict())
    # The token reached Jupyter through the env file: in no process's argv.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert server.token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    local = free_port()
    forward = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:{server.node}:{server.port}"]
    tunnel = subprocess.Popen(slurm_box.ssh_argv(options=forward), stdin=subprocess.DEVNULL)
    try:

        def status() -> dict[str, object] | None:
            url = f"http://127.0.0.1:{local}/api/status?token={server.token}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return dict(json.loads(r.read()))
            except OSError:
                return None

        answer = retry_until(status, seconds=30, interval=0.2)
        assert answer is not None and "started" in answer
    finally:
        tunnel.terminate()
        tunnel.wait(timeout=10)
    # A second call finds the running job instead of submitting another.
    again = slurmhost.find_or_start_jupyter(jobs.box, **kw)  # type: ignore[arg-type]
    assert (again.slurm_id, again.token, again.started) == (server.slurm_id, server.token, False)
    end = slurmhost.cancel(jobs.box, JobRef(server.slurm_id, server.control_dir, server.log))
    assert end.state == "CANCELLED"


def test_the_login_node_side_submits_reads_states_and_cancels(slurm_box, tmp_path, monkeypatch):
    """What the agent runs on the login node (submit_here, state_here, cancel_here), run here:
    this machine is the test cluster's login node."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_box.cluster.conf))
    work = tmp_path / "work"
    work.mkdir()

    def job(n: str, command: str, env: dict[str, str], gpus: int) -> BatchJob:
        ctl, log = str(tmp_path / "ctl" / n), str(tmp_path / "logs" / f"{n}.log")
        return BatchJob(n, command, str(work), ctl, log, env=env, gpus=gpus)

    hold = f"while [ ! -e {tmp_path}/go ]; do sleep 0.1; done"
    secret = f"s-{uuid.uuid4().hex}"
    first = job("1", f'echo "$TOKEN $REMOTEDL_JOB_ID"; {hold}; exit 3', env={"TOKEN": secret}, gpus=1)
    got = slurm.submit_here(first, SlurmSettings())
    ref = JobRef(got.slurm_id, got.control_dir, first.log)
    try:
        assert stat.S_IMODE(os.stat(Path(ref.control_dir) / "env").st_mode) == 0o600
        running = retry_until(lambda: (s := slurm.state_here(ref)).state == "RUNNING" and s, seconds=60)
        assert running and running.gpu_indices in ([0], [1])
        (tmp_path / "go").touch()
        done = retry_until(lambda: (s := slurm.state_here(ref)).ended and s, seconds=60)
        assert done and (done.state, done.exit_code) == ("FAILED", 3)
        assert Path(first.log).read_text() == f"{secret} 1\n"
        assert not (Path(ref.control_dir) / "env").exists()
        # After Slurm forgot it (no accounting here): the job's own record.
        gone = slurm.state_here(JobRef("99999997", ref.control_dir, ref.log))
        assert (gone.source, gone.state, gone.exit_code) == ("job", "FAILED", 3)

        second = job("2", "sleep 300", env={"K": "v"}, gpus=0)
        got2 = slurm.submit_here(second, SlurmSettings())
        ref2 = JobRef(got2.slurm_id, got2.control_dir, second.log)
        assert retry_until(lambda: slurm.state_here(ref2).state == "RUNNING", seconds=60)
        end = slurm.cancel_here(ref2)
        assert (end.state, end.status) == ("CANCELLED", "killed")
        assert not (Path(ref2.control_dir) / "env").exists()

        with pytest.raises(RemoteError, match="sbatch refused the job: Requested node configuration"):
            slurm.submit_here(job("3", "true", env={"K": "v"}, gpus=5), SlurmSettings())
        assert not (tmp_path / "ctl" / "3" / "env").exists()
    finally:
        (tmp_path / "go").touch()
