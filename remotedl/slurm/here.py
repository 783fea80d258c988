"""On the login node itself: what the agent runs there (Slurm's commands as argv lists, no
shell; files written by Python)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Sequence

from remotedl.errors import RemoteError
from remotedl.slurm.script import BATCH_SCRIPT, Submitted, batch_params, env_file, parse_sbatch, submit_error
from remotedl.slurm.settings import BatchJob, SlurmSettings, sbatch_options
from remotedl.slurm.states import SACCT_FIELDS, SQUEUE_FORMAT, JobRef, SlurmJob, parse_squeue, state_of


def _slurm_cmd(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
        )
    except FileNotFoundError:
        raise RemoteError(
            f"{argv[0]} is not on the login node's PATH", hint="is this host a Slurm login node?"
        ) from None
    except subprocess.TimeoutExpired:
        raise RemoteError(
            f"{argv[0]} did not answer within {timeout:g} s", hint="is the cluster's controller up?"
        ) from None


def _write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# What a control directory holds: removed before a (re)submission.
CONTROL_FILES = ("env", "exit", "started", "slurm_id", "jupyter", "params", "batch.sh", "hostfile")


def submit_here(job: BatchJob, settings: SlurmSettings) -> Submitted:
    """Write the job's control files and submit it with sbatch, on the login node."""
    ctl = os.path.expanduser(job.control_dir)
    workdir = os.path.expanduser(job.workdir)
    log = os.path.expanduser(job.log)
    if not os.path.isdir(workdir):
        raise RemoteError(f"the job's directory {workdir} does not exist on the login node")
    opts = sbatch_options(job, settings)
    env_data = env_file(job.env)
    old = os.umask(0o077)
    try:
        os.makedirs(ctl, exist_ok=True)
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
        for name in (*CONTROL_FILES, log):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(ctl, name))
        bash = (job.env_setup or settings.modules) and os.access("/bin/bash", os.X_OK)
        script = ("#!/bin/bash\n" if bash else "#!/bin/sh\n") + BATCH_SCRIPT
        batch = os.path.join(ctl, "batch.sh")
        _write_private(batch, script.encode(), 0o700)
        _write_private(os.path.join(ctl, "params"), batch_params(job, settings.modules))
        if env_data:
            _write_private(os.path.join(ctl, "env"), env_data)
        _write_private(log, b"")  # there while the job waits; slurmstepd appends to it
        argv = [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--output={log.replace('%', '%%')}",  # sbatch reads % in --output as a pattern
            "--open-mode=append",
            *opts,
            batch,
            ctl,
        ]
        r = _slurm_cmd(argv, timeout=120)
        warnings = [x for x in r.stderr.splitlines() if x.strip()]
        if r.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(ctl, "env"))
            raise submit_error(warnings or [f"sbatch exited with status {r.returncode}"])
        slurm_id, cluster = parse_sbatch(r.stdout)
        _write_private(os.path.join(ctl, "slurm_id"), f"{slurm_id}\n".encode())
    finally:
        os.umask(old)
    return Submitted(slurm_id, cluster, ctl, opts, warnings)


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(4096).decode(errors="replace").strip()
    except OSError:
        return None


def _ends_with_time_limit(log: str) -> bool:
    try:
        with open(log, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            return b"DUE TO TIME LIMIT" in f.read()
    except OSError:
        return False


def state_here(job: JobRef) -> SlurmJob:
    """The job's state, on the login node: scontrol while Slurm knows it, then sacct where there
    is accounting, then what the batch script recorded (the same rules as the state script)."""
    ctl = os.path.expanduser(job.control_dir)
    lines: list[str] = []
    r = _slurm_cmd(["scontrol", "--oneliner", "--details", "show", "job", job.slurm_id])
    if r.returncode == 0 and r.stdout.strip():
        lines += [f"@@scontrol {x}" for x in r.stdout.splitlines()]
    elif r.returncode != 0 and "Invalid job id" not in r.stderr:
        lines.append(f"@@unreachable {(r.stderr.strip().splitlines() or ['no answer'])[-1]}")
    else:
        sacct = ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job.slurm_id}"]
        s = _slurm_cmd([*sacct, f"--format={','.join(SACCT_FIELDS)}"]) if shutil.which("sacct") else None
        if s is not None and s.returncode == 0:
            lines += [f"@@sacct {x}" for x in s.stdout.splitlines()]
        if job.log and _ends_with_time_limit(os.path.expanduser(job.log)):
            lines.append("@@timelimit")
    for name in ("started", "exit"):
        text = _read_small(os.path.join(ctl, name))
        if text is not None:
            lines.append(f"@@{name} {text}")
    return state_of(job.slurm_id, lines)


def queue_here() -> dict[str, SlurmJob] | None:
    """The user's jobs in Slurm's queue, by Slurm job id, in one squeue call (one RPC for
    all of them); None when squeue did not answer."""
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name  # as `id -un` (never $USER, which may be anything)
    try:
        r = _slurm_cmd(["squeue", "--noheader", f"--user={user}", "-O", SQUEUE_FORMAT])
    except RemoteError:
        return None
    if r.returncode != 0:
        return None
    return {j.job_id: j for j in parse_squeue(r.stdout)}


def cancel_here(job: JobRef, *, wait: float = 30.0) -> SlurmJob:
    """scancel the job, remove its env file, and wait until Slurm says it ended (a cancelled
    running job passes through COMPLETING for up to KillWait seconds)."""
    from remotedl.waiting import retry_until

    r = _slurm_cmd(["scancel", job.slurm_id])
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(os.path.expanduser(job.control_dir), "env"))
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise RemoteError(f"scancel {job.slurm_id} failed: {last}")

    def ended() -> SlurmJob | None:
        now = state_here(job)
        return now if now.ended else None

    return retry_until(ended, seconds=wait, interval=0.2) or state_here(job)
