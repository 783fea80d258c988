"""remotedl.slurm's login-node side (what the agent runs there: submit_here, state_here,
cancel_here) run on this machine, the test cluster's login node; and remotedl.slurmhost's
cluster status and doctor through the login node's real sshd and the one channel (``Box.run``)."""

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


class Here:
    """Jobs submitted from this machine (the login node) with remotedl.slurm; what is left is
    cancelled at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.work = base / "work"
        self.work.mkdir(parents=True)
        self.refs: list[JobRef] = []

    def job(self, n: str, command: str, **kw: object) -> BatchJob:
        ctl, log = str(self.base / "ctl" / n), str(self.base / "logs" / f"{n}.log")
        return BatchJob(n, command, str(self.work), ctl, log, **kw)  # type: ignore[arg-type]

    def submit(self, job: BatchJob, settings: SlurmSettings | None = None) -> JobRef:
        got = slurm.submit_here(job, settings or SlurmSettings())
        ref = JobRef(got.slurm_id, got.control_dir, job.log)
        self.refs.append(ref)
        return ref

    def wait(self, ref: JobRef, *states: str) -> SlurmJob:
        got = retry_until(
            lambda: (s := slurm.state_here(ref)).state in states and s, seconds=60, interval=0.2
        )
        assert got, f"job {ref.slurm_id} never reached {states}: {slurm.state_here(ref)}"
        return got

    def hold(self, name: str) -> str:
        return f"while [ ! -e {self.base}/{name} ]; do sleep 0.1; done"

    def release(self, name: str) -> None:
        (self.base / name).touch()


@pytest.fixture
def here(slurm_box: SlurmBox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Here]:
    monkeypatch.setenv("SLURM_CONF", str(slurm_box.cluster.conf))
    h = Here(tmp_path / "here")
    yield h
    for ref in h.refs:
        if not slurm.state_here(ref).ended:
            slurm.cancel_here(ref)


@pytest.fixture
def login(slurm_box: SlurmBox, tmp_path: Path) -> Box:
    return Box(
        resolve_host(make_env(tmp_path / "laptop"), slurm_box.name, ssh_config=slurm_box.info.ssh_config)
    )


def test_submit_here_runs_the_job_with_its_environment(here):
    secret = f"s-{uuid.uuid4().hex} 'q' $(nope)\n2"
    job = here.job(
        "1",
        'printf "%s|" "$REMOTEDL_JOB_ID" "$CUDA_DEVICE_ORDER" "$CUDA_VISIBLE_DEVICES" "$PWD"\n'
        f"{here.hold('go')}\n"
        'printf "%s" "$TOKEN" > token.out; exit 3',
        env={"TOKEN": secret},
        name="first try",
        gpus=1,
    )
    ref = here.submit(job)
    ctl = Path(ref.control_dir)
    assert stat.S_IMODE(ctl.stat().st_mode) == 0o700
    for name in ("env", "params", "slurm_id"):
        assert stat.S_IMODE((ctl / name).stat().st_mode) == 0o600, name
    running = here.wait(ref, "RUNNING")
    assert running.describe() == "RUNNING on localhost" and running.gpus == 1
    assert running.name == "rdl-1-first_try" and len(running.gpu_indices) == 1
    here.release("go")
    done = here.wait(ref, "FAILED")
    assert (done.exit_code, done.describe(), done.source) == (3, "FAILED (exit 3)", "scontrol")
    gpu = running.gpu_indices[0]
    assert Path(job.log).read_text() == f"1|PCI_BUS_ID|{gpu}|{here.work}|"
    assert (here.work / "token.out").read_text() == secret
    assert not (ctl / "env").exists()  # removed at the job's end
    # Once Slurm forgot the job (MinJobAge) on a cluster without accounting, its own record
    # says how it ended: an id Slurm does not know, with this job's control dir.
    gone = slurm.state_here(JobRef("99999999", ref.control_dir, ref.log))
    assert (gone.source, gone.state, gone.exit_code, gone.nodes) == ("job", "FAILED", 3, "localhost")


def test_cancel_here_running_and_pending(here):
    holders = [here.submit(here.job(str(n), here.hold("x"), gpus=1, env={"K": "v"})) for n in (1, 2)]
    for h in holders:
        here.wait(h, "RUNNING")
    waiting = here.submit(here.job("3", "true", gpus=1, env={"K": "v"}))
    assert retry_until(lambda: slurm.state_here(waiting).reason == "Resources", seconds=30, interval=0.2)
    assert slurm.state_here(waiting).describe() == "PENDING (Resources)"
    assert slurm.cancel_here(waiting).state == "CANCELLED"
    assert not (Path(waiting.control_dir) / "env").exists()  # it never ran: removed by the cancel
    end = slurm.cancel_here(holders[0])
    assert (end.state, end.status, end.describe()) == ("CANCELLED", "killed", "CANCELLED")
    # The batch script saw the SIGTERM and recorded it; after Slurm forgot, that is what is known.
    assert retry_until((Path(holders[0].control_dir) / "exit").exists, seconds=30)
    assert slurm.state_here(JobRef("99999998", holders[0].control_dir, "")).state == "CANCELLED"
    here.release("x")


def test_refusals_are_one_clear_line_and_leave_no_secret(here):
    with pytest.raises(
        RemoteError, match="sbatch refused the job: Requested node configuration is not available"
    ):
        here.submit(here.job("1", "true", gpus=3, env={"K": "v"}))
    with pytest.raises(RemoteError, match=r"sbatch refused the job: invalid partition specified: nope$"):
        here.submit(here.job("2", "true", gpus=1, env={"K": "v"}), SlurmSettings(partition="nope"))
    assert not list(here.base.glob("ctl/*/env"))


def test_hostile_command_paths_and_options_arrive_as_data(here):
    odd = here.base / "we%ird dir 'q'"
    work = odd / "work"
    work.mkdir(parents=True)
    job = BatchJob(
        job_id="9",
        command='printf \'%s\\n\' "a  b" \'$HOME\' "$(printf x)"; echo "cwd=$PWD"',
        workdir=str(work),
        control_dir=str(odd / "ctl"),
        log=str(odd / "l%j.log"),
        name="x; rm -rf ~",
        gpus=0,
    )
    ref = here.submit(job, SlurmSettings(time="5", sbatch_args=("--comment=a b;c",)))
    assert here.wait(ref, "COMPLETED").exit_code == 0
    assert Path(job.log).read_text() == f"a  b\n$HOME\nx\ncwd={work}\n"  # the % was not a pattern


def test_cluster_status(here, login, slurm_box):
    ref = here.submit(here.job("1", here.hold("s"), gpus=1, name="st"))
    here.wait(ref, "RUNNING")
    status = slurmhost.cluster_status(login)
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
    here.release("s")


def test_doctor_on_the_cluster(login):
    checks = {c.name: c for c in slurmhost.doctor_checks(login, SlurmSettings(partition="debug"))}
    assert checks["slurm commands"].status == "ok"
    assert checks["slurm controller"].status == "ok" and "UP" in checks["slurm controller"].detail
    assert checks["GPU partitions"].detail == "debug (2 GPUs)"
    assert checks["partition"].status == "ok"
    assert checks["test submission"].status == "ok", checks["test submission"].detail
    assert checks["accounting"].status == "skip"
    assert checks["account limits"].status == "skip"
    bad = SlurmSettings(partition="nope", modules=("cuda/12.4",))
    checks = {c.name: c for c in slurmhost.doctor_checks(login, bad)}
    assert checks["partition"].status == "fail"
    assert checks["test submission"].status == "fail"
    assert checks["test submission"].detail.endswith("settings: invalid partition specified: nope")
    assert checks["modules"].status == "fail"  # the test cluster has no module system
    assert os.environ.get("SLURM_CONF") is None  # doctor ran on the login node, not here
