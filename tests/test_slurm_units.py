"""The Slurm backend's pure parts: option words, the data files the batch script reads, the
batch script itself (run here with sh and bash, as slurmd would run it), and the parsers, fed
the outputs recorded from the real cluster (tests/slurm/NOTES.md). No Slurm needed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from remotedl import slurm, slurmhost
from remotedl.errors import ConfigError, UsageError
from remotedl.slurm import BatchJob, SlurmSettings

# ------------------------------------------------------------------ settings and options


def _job(**kw: object) -> BatchJob:
    base: dict[str, object] = {
        "job_id": "7",
        "command": "python3 train.py",
        "workdir": "~/p/.remotedl/jobs/7",
        "control_dir": "~/p/.remotedl/slurm/7",
        "log": "~/.remotedl/logs/7.log",
    }
    base.update(kw)
    return BatchJob(**base)  # type: ignore[arg-type]


def test_options_from_settings_then_flags():
    s = SlurmSettings.from_settings(
        {
            "scheduler": "slurm",
            "partition": "gpu",
            "account": "lab",
            "qos": "normal",
            "time": "1:00:00",
            "constraint": "a100",
            "sbatch_args": ["--mem=32G", "-c8"],
            "modules": ["cuda/12.4"],
        }
    )
    assert s.modules == ("cuda/12.4",)
    assert slurm.sbatch_options(_job(gpus=2, name="lr 0.1/x"), s) == [
        "--job-name=rdl-7-lr_0.1_x",
        "--gres=gpu:2",
        "--time=1:00:00",
        "--partition=gpu",
        "--account=lab",
        "--qos=normal",
        "--constraint=a100",
        "--mem=32G",
        "-c8",
    ]
    flagged = s.with_flags(time="2-00:00:00", partition="long", sbatch_args=["--exclusive"])
    opts = slurm.sbatch_options(_job(gpus=0), flagged)
    assert "--time=2-00:00:00" in opts and "--partition=long" in opts and opts[-1] == "--exclusive"
    assert not any(o.startswith(("--gres", "--gpus")) for o in opts)  # a CPU job asks for none
    gpus = SlurmSettings(gpu_option="gpus")
    assert slurm.sbatch_options(_job(gpus=1), gpus)[1] == "--gpus=1"


@pytest.mark.parametrize("value", ["90", "0:05", "1:30:00", "2-00", "2-00:00", "2-00:00:00", "UNLIMITED"])
def test_time_limits_slurm_takes(value):
    assert slurm.check_time(value) == value


@pytest.mark.parametrize("value", ["1h", "", "1:2:3:4", "-5", "2 days"])
def test_time_limits_refused(value):
    with pytest.raises(UsageError, match="not a Slurm time limit"):
        slurm.check_time(value)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--output=/tmp/x"], "sets --output itself"),
        (["-o", "x"], "sets -o itself"),
        (["--chdir=/"], "sets --chdir"),
        (["--wrap=true"], "sets --wrap"),
        (["--mem", "32G"], "'32G' is not an sbatch option"),
        (["train.sh"], "not an sbatch option"),
        (["--array=1-3"], "one remotedl job is one Slurm job"),
    ],
)
def test_sbatch_args_refused(args, match):
    with pytest.raises(ConfigError, match=match):
        slurm.check_sbatch_args(args)


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="list of strings"):
        SlurmSettings.from_settings({"sbatch_args": "--mem=1G --x"} | {"modules": [1]})
    with pytest.raises(ConfigError, match="gpu_option"):
        SlurmSettings.from_settings({"gpu_option": "cards"})
    with pytest.raises(UsageError, match="not a Slurm time limit"):
        SlurmSettings.from_settings({"time": "a week"})


def test_values_round_trip_and_env_names_checked():
    values = ["", "a\nb\n\n", "ü €", "x" * 5000, "'$(rm -rf ~)'"]
    assert slurm.decode_values(slurm.encode_values(values)) == values
    with pytest.raises(UsageError, match="NUL"):
        slurm.encode_values(["a\0b"])
    with pytest.raises(UsageError, match="not a variable name"):
        slurm.env_file({"A-B": "x"})
    with pytest.raises(UsageError, match="not a variable name"):
        slurm.env_file({"_rdl_cmd": "x"})
    assert slurm.env_file({}) == b""


# ------------------------------------------------------------------ the batch script, run here


def _shells() -> list[str]:
    return [s for s in ("/bin/sh", "/bin/bash", "/bin/dash") if os.path.exists(s)]


def _run_batch(
    tmp_path: Path,
    shell: str,
    job: BatchJob,
    modules: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    ctl = Path(job.control_dir)
    ctl.mkdir(parents=True, exist_ok=True)
    (ctl / "batch.sh").write_text("#!" + shell + "\n" + slurm.BATCH_SCRIPT)
    (ctl / "params").write_bytes(slurm.batch_params(job, modules))
    data = slurm.env_file(job.env)
    if data:
        fd = os.open(ctl / "env", os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, data)
        os.close(fd)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "SLURM_JOB_ID": "41",
        "SLURMD_NODENAME": "node7",
        **(extra_env or {}),
    }
    r = subprocess.run(
        [shell, str(ctl / "batch.sh"), str(ctl)],
        cwd=job.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r, ctl


@pytest.mark.parametrize("shell", _shells())
def test_batch_script_runs_the_command_with_the_jobs_environment(tmp_path, shell):
    work = tmp_path / "work dir"
    work.mkdir()
    secret = "s3cret 'quoted' $(not run)\nline2\n"
    job = _job(
        command='printf \'%s|\' "$REMOTEDL_JOB_ID" "$CUDA_DEVICE_ORDER" "${CUDA_VISIBLE_DEVICES-unset}" '
        '"$PYTHONUNBUFFERED" "$TOKEN" "$PWD"; exit 3',
        workdir=str(work),
        control_dir=str(tmp_path / "ctl"),
        gpus=0,
        env={"TOKEN": secret},
    )
    r, ctl = _run_batch(tmp_path, shell, job)
    assert r.returncode == 3, r.stderr
    assert r.stdout.split("|")[:-1] == ["7", "PCI_BUS_ID", "", "1", secret, str(work)]
    assert not (ctl / "env").exists()  # the values lived only as long as the job
    code, term, ended = (ctl / "exit").read_text().split()
    assert (code, term) == ("3", "0") and ended.isdigit()
    started = (ctl / "started").read_text().split()
    assert started[1:] == ["node7", "41", "-"]


@pytest.mark.parametrize("shell", _shells())
def test_batch_script_keeps_slurms_gpus_and_activates_the_venv(tmp_path, shell):
    work = tmp_path / "w"
    (work / ".venv" / "bin").mkdir(parents=True)
    py = work / ".venv" / "bin" / "python"
    py.write_text("#!/bin/sh\necho venv-python\n")
    py.chmod(0o755)
    job = _job(
        command='echo "$CUDA_VISIBLE_DEVICES $VIRTUAL_ENV"; python',
        workdir=str(work),
        control_dir=str(tmp_path / "c"),
        gpus=1,
    )
    r, _ = _run_batch(tmp_path, shell, job, extra_env={"CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_GPUS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"1 {work}/.venv", "venv-python"]


def test_batch_script_without_a_module_system_says_so(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    job = _job(command="echo ran", workdir=str(work), control_dir=str(tmp_path / "c"))
    r, ctl = _run_batch(tmp_path, "/bin/sh", job, modules=("cuda/12.4",))
    if r.returncode == 0:
        pytest.skip("this machine has a module system; the failure path cannot be shown")
    assert r.returncode == 125
    assert "has no module command" in r.stderr and "ran" not in r.stdout
    assert (ctl / "exit").read_text().split()[0] == "125"


def test_batch_script_loads_modules_with_a_module_command(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    # A module system of the simplest kind: MODULESHOME/init/sh defines `module`.
    home = tmp_path / "modules"
    (home / "init").mkdir(parents=True)
    (home / "init" / "sh").write_text(
        'module() { [ "$1" = load ] || return 1; case $2 in missing*) return 1;; esac\n'
        '  LOADED="${LOADED:+$LOADED,}$2"; export LOADED; }\n'
    )
    job = _job(command='echo "loaded=$LOADED"', workdir=str(work), control_dir=str(tmp_path / "c"))
    r, _ = _run_batch(tmp_path, "/bin/sh", job, ("cuda/12.4", "gcc 12"), {"MODULESHOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "loaded=cuda/12.4,gcc 12"
    r, _ = _run_batch(tmp_path, "/bin/sh", job, ("missing/1",), {"MODULESHOME": str(home)})
    assert r.returncode == 125 and "module load missing/1 failed" in r.stderr


def test_batch_script_records_sigterm(tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    job = _job(
        command=f"touch {tmp_path}/up; while :; do sleep 0.05; done",
        workdir=str(work),
        control_dir=str(tmp_path / "c"),
    )
    ctl = Path(job.control_dir)
    ctl.mkdir()
    (ctl / "batch.sh").write_text("#!/bin/sh\n" + slurm.BATCH_SCRIPT)
    (ctl / "params").write_bytes(slurm.batch_params(job))
    p = subprocess.Popen(["/bin/sh", str(ctl / "batch.sh"), str(ctl)], cwd=work, start_new_session=True)
    from remotedl.waiting import retry_until

    assert retry_until((tmp_path / "up").exists, seconds=20)
    os.killpg(p.pid, 15)  # as slurmstepd does: every process of the job
    assert p.wait(timeout=20) == 143
    code, term, _ = (ctl / "exit").read_text().split()
    assert (code, term) == ("143", "1")
    own = slurm.parse_own(None, (ctl / "exit").read_text())
    assert slurm.job_from_own("5", own).state == "CANCELLED"


def test_bad_params_file_is_refused(tmp_path):
    ctl = tmp_path / "c"
    ctl.mkdir()
    (ctl / "batch.sh").write_text("#!/bin/sh\n" + slurm.BATCH_SCRIPT)
    (ctl / "params").write_bytes(slurm.encode_values(["9", "x"]))
    r = subprocess.run(["/bin/sh", str(ctl / "batch.sh"), str(ctl)], capture_output=True, text=True)
    assert r.returncode == 125 and "cannot read" in r.stderr


def test_the_scripts_parse():
    for script in (slurmhost._STATUS, slurmhost._DOCTOR, slurmhost._JUPYTER_LOOK, slurm.BATCH_SCRIPT):
        assert subprocess.run(["sh", "-n"], input=script, text=True).returncode == 0
    assert subprocess.run(["sh", "-n"], input=slurm.JUPYTER_COMMAND, text=True).returncode == 0


# ------------------------------------------------------------------ parsers (outputs from NOTES.md)

SQUEUE = (
    "3|PENDING|Resources||0:00|UNLIMITED|N/A|N/A|gres:gpu:1|N/A|debug|root|wrap|\n"
    "4|PENDING|Priority||0:00|UNLIMITED|N/A|N/A|N/A|N/A|debug|root|wrap|\n"
    "1|RUNNING|None|localhost|0:05|UNLIMITED|2026-11-23T11:34:11|NONE|N/A|gres:gpu:1|debug|root|a|b c|\n"
    "2|RUNNING|None|localhost|0:05|UNLIMITED|2026-11-23T11:34:11|NONE|gres:gpu:1|N/A|debug|root|wrap|\n"
)


def test_squeue_rows():
    jobs = {j.job_id: j for j in slurm.parse_squeue(SQUEUE + "slurm_load_jobs error: Invalid job id\n")}
    assert set(jobs) == {"1", "2", "3", "4"}
    assert jobs["3"].describe() == "PENDING (Resources)" and jobs["3"].status == "queued"
    assert jobs["3"].gpus == 1 and jobs["4"].gpus == 0
    assert jobs["1"].name == "a|b c"  # the name is last: it may hold the separator
    assert jobs["1"].gpus == 1  # --gpus=1 shows as tres-per-job
    assert jobs["1"].describe() == "RUNNING on localhost"
    assert jobs["1"].start == "2026-11-23T11:34:11" and jobs["1"].end is None


SCONTROL_PENDING = (
    "JobId=3 JobName=third UserId=root(0) GroupId=root(0) MCS_label=N/A Priority=4294901757 Nice=0 "
    "Account=(null) QOS=(null) JobState=PENDING Reason=Resources Dependency=(null) Requeue=1 Restarts=0 "
    "BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED TimeMin=N/A "
    "SubmitTime=2026-11-23T11:06:24 EligibleTime=2026-11-23T11:06:24 AccrueTime=2026-11-23T11:06:24 "
    "StartTime=Unknown EndTime=Unknown Deadline=N/A SuspendTime=None SecsPreSuspend=0 "
    "LastSchedEval=2026-11-23T11:06:24 Scheduler=Main Partition=debug AllocNode:Sid=localhost:13124 "
    "ReqNodeList=(null) ExcNodeList=(null) NodeList= NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 "
    "ReqB:S:C:T=0:0:*:* TRES=cpu=1,mem=24105M,node=1,billing=1 Socks/Node=* NtasksPerN:B:S:C=0:0:*:* "
    "CoreSpec=* MinCPUsNode=1 MinMemoryNode=0 MinTmpDiskNode=0 Features=(null) DelayBoot=00:00:00 "
    "OverSubscribe=OK Contiguous=0 Licenses=(null) Network=(null) Command=(null) WorkDir=/root "
    "StdErr=/w/3.out StdIn=/dev/null StdOut=/w/3.out Power= TresPerNode=gres:gpu:1"
)
SCONTROL_RUNNING = (
    "JobId=1 JobName=train a x=y UserId=root(0) GroupId=root(0) MCS_label=N/A JobState=RUNNING "
    "Reason=None Dependency=(null) ExitCode=0:0 DerivedExitCode=0:0 RunTime=00:00:05 "
    "TimeLimit=UNLIMITED StartTime=2026-11-23T11:34:11 EndTime=Unknown Partition=debug "
    "NodeList=localhost BatchHost=localhost NumNodes=1 TRES=cpu=1,node=1,billing=1 "
    "JOB_GRES=gpu:1   Nodes=localhost CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:1) MinCPUsNode=1 "
    "Command=/w/my job.sh --lr=0.1 WorkDir=/w StdOut=/w/1.out Power= TresPerJob=gres:gpu:1"
)


def test_scontrol_lines_split_on_known_keys():
    f = slurm.parse_scontrol(SCONTROL_PENDING)
    assert f["JobState"] == "PENDING" and f["Reason"] == "Resources" and f["NodeList"] == ""
    assert f["TRES"] == "cpu=1,mem=24105M,node=1,billing=1"
    assert f["AllocNode:Sid"] == "localhost:13124" and f["Power"] == ""
    job = slurm.job_from_scontrol(f)
    assert job.describe() == "PENDING (Resources)" and job.gpus == 1 and job.exit_code is None
    f = slurm.parse_scontrol(SCONTROL_RUNNING)
    assert f["JobName"] == "train a x=y"  # a value that holds a space and an '='
    assert f["Command"] == "/w/my job.sh --lr=0.1"
    job = slurm.job_from_scontrol(f)
    assert (job.state, job.nodes, job.gpu_indices, job.gpus) == ("RUNNING", "localhost", [1], 1)
    node = slurm.parse_scontrol(
        "NodeName=localhost Arch=x86_64 CoresPerSocket=1  CPUAlloc=0 Gres=gpu:2 GresUsed=gpu:0 "
        "OS=Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=24105 State=IDLE"
    )
    assert node["OS"] == "Linux 6.18.44-fc-v657 #1 SMP PREEMPT_DYNAMIC @0" and node["RealMemory"] == "24105"


@pytest.mark.parametrize(
    ("line", "state", "exit_code", "signal", "words"),
    [
        ("JobId=1 JobState=COMPLETED Reason=None ExitCode=0:0", "COMPLETED", 0, None, "COMPLETED"),
        ("JobId=4 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0", "FAILED", 3, None, "FAILED (exit 3)"),
        ("JobId=5 JobState=CANCELLED Reason=None ExitCode=0:15", "CANCELLED", 143, 15, "CANCELLED"),
        (
            "JobId=6 JobState=FAILED Reason=JobLaunchFailure ExitCode=0:9",
            "FAILED",
            137,
            9,
            "FAILED (signal 9)",
        ),
        (
            "JobId=7 JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15",
            "TIMEOUT",
            143,
            15,
            "TIMEOUT (signal 15)",
        ),
        ("JobId=8 JobState=COMPLETING Reason=None ExitCode=0:0", "COMPLETING", None, None, "COMPLETING"),
    ],
)
def test_ended_states_and_exit_codes(line, state, exit_code, signal, words):
    job = slurm.job_from_scontrol(slurm.parse_scontrol(line))
    assert (job.state, job.exit_code, job.signal, job.describe()) == (state, exit_code, signal, words)
    expected = {"COMPLETED": "succeeded", "FAILED": "failed", "TIMEOUT": "failed", "CANCELLED": "killed"}
    assert job.status == expected.get(state, "running")


SACCT = (
    "3|COMPLETED|0:0|localhost|2026-11-23T11:06:27|2026-11-23T11:06:27|00:00:00|debug|third\n"
    "4|FAILED|3:0|localhost|2026-11-23T11:06:29|2026-11-23T11:06:30|00:00:01|debug|wrap\n"
    "4.batch|FAILED|3:0|localhost|2026-11-23T11:06:29|2026-11-23T11:06:30|00:00:01||batch\n"
    "5|CANCELLED by 0|0:0|localhost|2026-11-23T11:06:29|2026-11-23T11:06:30|00:00:01|debug|a|b\n"
)


def test_sacct_rows():
    four = slurm.parse_sacct(SACCT, "4")
    assert four is not None and four.describe() == "FAILED (exit 3)" and four.source == "sacct"
    five = slurm.parse_sacct(SACCT, "5")
    assert five is not None and five.state == "CANCELLED" and five.name == "a|b"
    assert slurm.parse_sacct(SACCT, "9") is None


def test_state_prefers_scontrol_then_sacct_then_the_jobs_own_record():
    text = (
        "@@job 4\n@@scontrol " + "JobId=4 JobState=FAILED Reason=NonZeroExitCode ExitCode=3:0\n"
        "@@started 1700000000 localhost 4\n@@exit 3 0 1700000001\n@@done\n"
        "@@job 5\n@@sacct 5|CANCELLED by 0|0:0|localhost|||00:00:01|debug|x\n"
        "@@started 1700000000 localhost 5\n@@exit 143 1 1700000009\n@@done\n"
        "@@job 6\n@@started 1700000000 node3 6 1,3\n@@exit 2 0 1700000009\n@@done\n"
        "@@job 11\n@@started 1700000000 node3 11\n@@exit 143 0 1700000009\n@@done\n"
        "@@job 7\n@@started 1700000000 node3 7\n@@timelimit\n@@exit 143 1 1700000099\n@@done\n"
        "@@job 8\n@@started 1700000000 node3 8\n@@done\n"
        "@@job 9\n@@done\n"
        "@@job 10\n@@unreachable slurm_load_jobs error: Unable to contact slurm controller\n"
        "@@exit 0 0 1700000001\n@@done\n"
    )
    states = slurm.parse_states(text)
    assert states["4"].source == "scontrol" and states["4"].exit_code == 3
    # jobcomp says 0:0 for a cancelled job; the job's own record has the status it ended with
    assert (states["5"].source, states["5"].state, states["5"].exit_code) == ("sacct", "CANCELLED", 143)
    six = states["6"]
    assert (six.source, six.describe(), six.nodes, six.gpu_indices) == (
        "job",
        "FAILED (exit 2)",
        "node3",
        [1, 3],
    )
    assert states["7"].state == "TIMEOUT"
    assert states["11"].state == "CANCELLED"  # its command died of SIGTERM first
    assert states["8"].state == "UNKNOWN" and "without recording its end" in states["8"].reason
    assert states["8"].status == "lost"
    assert states["9"].state == "UNKNOWN" and "before it started" in states["9"].reason
    # No answer from the controller: nothing is known (the job's own files are not guessed from)
    ten = states["10"]
    assert (ten.state, ten.known, ten.ended) == ("UNREACHABLE", False, False)
    assert "Unable to contact" in ten.reason


@pytest.mark.parametrize(
    ("text", "count", "indices"),
    [
        ("gpu:2", 2, []),
        ("gpu:0", 0, []),
        ("gpu:1(IDX:0)", 1, [0]),
        ("gpu:a100:4(S:0-1)", 4, []),
        ("gpu:a100:3(IDX:0-1,3)", 3, [0, 1, 3]),
        ("gpu:a100:2,gpu:v100:1(S:0),shard:8", 3, []),
        ("gres:gpu:1", 1, []),
        ("gres/gpu:a100=2", 2, []),
        ("gres:gpu", 1, []),
        ("(null)", 0, []),
        ("N/A", 0, []),
        ("", 0, []),
    ],
)
def test_gres_strings(text, count, indices):
    assert slurm.gres_count(text) == count
    assert slurm.gres_indices(text) == indices


def test_cluster_status_from_sinfo_and_scontrol():
    nodes = slurm.parse_sinfo_nodes(
        "localhost|debug*|mixed|gpu:2|gpu:1|1/7/0/8|24105|\n"
        "localhost|long|mixed|gpu:2|gpu:1|1/7/0/8|24105|\n"
        "cpu1|cpu|idle|(null)|gpu:0|0/64/0/64|256000|\n"
    )
    assert [(n.name, n.partitions, n.gpus, n.gpus_used) for n in nodes] == [
        ("localhost", ["debug", "long"], 2, 1),
        ("cpu1", ["cpu"], 0, 0),
    ]
    assert (nodes[0].cpus_alloc, nodes[0].cpus_total, nodes[0].memory_mib) == (1, 8, 24105)
    parts = slurm.parse_partitions(
        "PartitionName=debug AllowGroups=ALL Default=YES DefaultTime=NONE MaxTime=UNLIMITED "
        "Nodes=localhost State=UP TotalCPUs=8 TotalNodes=1\n"
        "PartitionName=cpu Default=NO MaxTime=2-00:00:00 State=UP TotalNodes=1\n",
        nodes,
    )
    assert [(p.name, p.default, p.max_time, p.gpus, p.gpus_used) for p in parts] == [
        ("debug", True, "UNLIMITED", 2, 1),
        ("cpu", False, "2-00:00:00", 0, 0),
    ]


def test_sbatch_answers_and_refusals():
    assert slurm.parse_sbatch("12\n") == ("12", None)
    assert slurm.parse_sbatch("12;remotedl\n") == ("12", "remotedl")
    with pytest.raises(Exception, match="expected a job id"):
        slurm.parse_sbatch("Submitted batch job 12")
    err = slurm.submit_error(
        ["sbatch: error: Batch job submission failed: Requested node configuration is not available"]
    )
    assert err.message == "sbatch refused the job: Requested node configuration is not available"
    assert err.hint is not None and "GPUs" in err.hint


def _doctor_sections(**over: list[str]) -> dict[str, list[str]]:
    s: dict[str, list[str]] = {
        "commands": [f"{c} /usr/bin/{c}" for c in slurmhost.SLURM_COMMANDS],
        "version": ["slurm-wlm 22.05.8"],
        "ping": ["Slurmctld(primary) at vm is UP"],
        "ping_rc": ["0"],
        "nodes": ["localhost|debug*|idle|gpu:2|gpu:0|0/8/0/8|24105|"],
        "testonly": ["sbatch: Job 9 to start at 2026-11-23T11:40:00 using 1 processors on nodes localhost"],
        "testonly_rc": ["0"],
        "sacct": ["Slurm accounting storage is disabled"],
        "sacct_rc": ["1"],
        "assoc": ["You are not running a supported accounting_storage plugin"],
        "assoc_rc": ["1"],
    }
    s.update(over)
    return s


def test_doctor_lines():
    checks = {c.name: c for c in slurmhost.checks_from(_doctor_sections(), SlurmSettings(partition="debug"))}
    assert checks["slurm commands"].status == "ok"
    assert checks["GPU partitions"].detail == "debug (2 GPUs)"
    assert checks["partition"].status == "ok"
    assert (
        checks["test submission"].status == "ok" and "would be accepted" in checks["test submission"].detail
    )
    assert checks["accounting"].status == "skip" and checks["account limits"].status == "skip"

    checks = {
        c.name: c
        for c in slurmhost.checks_from(
            _doctor_sections(
                assoc=["lab||normal,long|normal||gres/gpu=4|1-00:00:00|10|20", "other||||||||"],
                assoc_rc=["0"],
                qos=["normal|12:00:00|gres/gpu=2|4||", "long|7-00:00:00||||"],
                testonly=[
                    "sbatch: error: invalid partition specified: nope",
                    "allocation failure: Invalid partition name specified",
                ],
                testonly_rc=["1"],
                modules=["ok cuda/12.4", "missing gcc/99"],
                version=["slurm 21.08.8"],
            ),
            SlurmSettings(partition="nope", account="lab", qos="gold", modules=("cuda/12.4", "gcc/99")),
        )
    }
    assert checks["partition"].status == "fail" and "'nope' does not exist" in checks["partition"].detail
    assert checks["test submission"].status == "fail"
    assert "invalid partition specified: nope" in checks["test submission"].detail
    assert checks["account"].status == "ok" and checks["account"].detail == "lab, other"
    assert checks["qos"].status == "fail" and "allowed: long, normal" in checks["qos"].detail
    assert "lab: MaxTRES gres/gpu=4, MaxWall 1-00:00:00, MaxJobs 10, MaxSubmit 20" in checks["limits"].detail
    assert checks["modules"].status == "fail" and checks["modules"].detail == "not available: gcc/99"
    assert checks["slurm version"].status == "warn"

    missing = slurmhost.checks_from(
        _doctor_sections(commands=["sbatch ", "squeue /usr/bin/squeue"]), SlurmSettings()
    )
    assert [c.status for c in missing] == ["fail"] and "sbatch" in missing[0].detail


def test_the_notification_watcher_asks_scontrol_only_about_jobs_that_moved(monkeypatch):
    # One squeue answers for every watched job; only a job whose state or reason changed, or
    # that left the queue, costs an scontrol (refresh_slurm) of its own.
    from remotedl.agent import events

    queue = {
        "11": slurm.SlurmJob("11", "PENDING", reason="Resources"),
        "12": slurm.SlurmJob("12", "RUNNING", nodes="n1"),
        "13": slurm.SlurmJob("13", "RUNNING", nodes="n1"),
    }
    records = [
        {"id": 1, "slurm_id": "11", "slurm_state": "PENDING", "slurm_reason": "Resources"},  # as it was
        {"id": 2, "slurm_id": "12", "slurm_state": "PENDING", "slurm_reason": "Priority"},  # started
        {"id": 3, "slurm_id": "13", "slurm_state": "RUNNING", "slurm_reason": None},  # as it was
        {"id": 4, "slurm_id": "14", "slurm_state": "RUNNING", "slurm_reason": None},  # left the queue
    ]
    monkeypatch.setattr(slurm, "queue_here", lambda: queue)
    assert [r["id"] for r in events._moved(records)] == [2, 4]
    monkeypatch.setattr(slurm, "queue_here", lambda: None)  # squeue did not answer: ask about each
    assert [r["id"] for r in events._moved(records)] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("getent", "addresses", "expected"),
    [
        ("10.9.8.7       STREAM gpu-a12", "10.1.2.3 fe80::1", "10.9.8.7"),  # the name resolves
        ("", "10.1.2.3 fe80::1", "10.1.2.3"),  # it does not: the node's first address
        ("", "", None),  # nothing to bind: an error, never 0.0.0.0
    ],
)
def test_jupyter_on_a_node_binds_one_address_never_all(tmp_path, getent, addresses, expected):
    # The batch job's Jupyter bound 0.0.0.0 (every network of the node) when the node's name
    # did not resolve.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, body in (
        ("getent", f"printf '%s\\n' '{getent}' | grep . || true"),
        ("hostname", f'[ "$1" = -I ] && echo "{addresses}" || echo gpu-a12'),
    ):
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SLURMD_NODENAME": "gpu-a12"}
    script = slurm.NODE_ADDRESS + 'echo "$_addr"'
    r = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=10)
    if expected is None:
        assert r.returncode == 1 and r.stdout == ""
        assert "cannot tell the address of node gpu-a12" in r.stderr
    else:
        assert (r.returncode, r.stdout) == (0, expected + "\n"), r.stderr
    assert "0.0.0.0" not in slurm.JUPYTER_COMMAND
