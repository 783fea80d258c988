"""What Slurm takes and prints, for jobs on a cluster's login node: sbatch's option words, the
batch script and the data files it reads, and parsers for squeue, scontrol, sacct and sinfo output.

Standard library only (it ships inside the agent, which runs on the login node): no connections
here. ``remotedl.slurmhost`` drives a login node through ``Box.run``.

A job has a control directory on the shared filesystem. It holds the batch script (a constant),
``params`` (what to run, where, with which environment: data, read by the batch script) and
``env`` (the job's ``--env`` values: 0600, read by the batch script and removed at its end,
never in an argv or a world-readable file). The batch script records ``started`` (time, node,
Slurm id) and ``exit`` (status, whether it got SIGTERM, time) there, so the end of a job is
known even on a cluster without accounting, after the job left ``squeue``/``scontrol``
(``MinJobAge``).

Output formats are explicit (``--format``/``-O`` fields, ``--oneliner``, ``--parsable2``) and
work from Slurm 22.05 on; tests/slurm/NOTES.md holds the outputs the parsers were written from.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from remotedl.activate import ACTIVATE
from remotedl.errors import ConfigError, RemoteError, UsageError
from remotedl.schema import Status

GpuOption = Literal["gres", "gpus"]

# Words sbatch gets from remotedl itself; a setting or flag naming them would break the job's
# directory, log or id.
_OWN_OPTIONS = {
    "--output": "remotedl writes the job's output to its log (remotedl logs JOB)",
    "-o": "remotedl writes the job's output to its log (remotedl logs JOB)",
    "--error": "stderr goes to the job's log with stdout",
    "-e": "stderr goes to the job's log with stdout",
    "--chdir": "the job runs in its own code directory",
    "-D": "the job runs in its own code directory",
    "--job-name": "use --name",
    "-J": "use --name",
    "--open-mode": "the log is appended to so that logs -f can resume",
    "--parsable": "remotedl reads sbatch's answer itself",
    "--wrap": "remotedl writes the batch script",
    "--array": "one remotedl job is one Slurm job",
    "-a": "one remotedl job is one Slurm job",
    "--test-only": "use remotedl doctor to test a submission",
    "--input": "a batch job has no input",
    "-i": "a batch job has no input",
}

_TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$"
)
_NAME = re.compile(r"[^A-Za-z0-9._+-]")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_time(value: str, where: str = "--time") -> str:
    """A Slurm time limit as sbatch takes it (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    text = value.strip()
    if text.upper() in ("UNLIMITED", "INFINITE") or _TIME.match(text):
        return text
    raise UsageError(
        f"{where} {value!r} is not a Slurm time limit",
        hint="write minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)",
    )


def check_sbatch_args(args: Iterable[str], where: str = "sbatch_args") -> tuple[str, ...]:
    """Extra sbatch option words, each one word (``--mem=32G``, ``-c8``). A word that is not an
    option would be taken by sbatch as the batch script; options remotedl sets itself are refused."""
    out = []
    for a in args:
        if not isinstance(a, str) or not a.startswith("-") or a in ("-", "--"):
            raise ConfigError(
                f"{where}: {a!r} is not an sbatch option",
                hint='give each option as one word with its value: ["--mem=32G", "--cpus-per-task=8"]',
            )
        if "\n" in a or "\0" in a:
            raise ConfigError(f"{where}: {a!r} holds a newline")
        name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
        reason = _OWN_OPTIONS.get(name)
        if reason:
            raise ConfigError(f"{where}: remotedl sets {name} itself ({reason})")
        out.append(a)
    return tuple(out)


def _opt_str(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\n" in value:
        raise ConfigError(f"{key} must be one line of text, not {value!r}")
    return value


def _str_list(settings: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = settings.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key} must be a list of strings, e.g. {key} = ["..."]')
    return tuple(value)


@dataclass(frozen=True)
class SlurmSettings:
    """A Slurm host's settings (``[hosts.NAME]`` with ``scheduler = "slurm"``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # the default time limit of a job
    constraint: str | None = None
    sbatch_args: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    gpu_option: GpuOption = "gres"  # --gres=gpu:N works on every GPU cluster; --gpus=N needs cons_tres

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SlurmSettings:
        """From settings as a mapping (a host's table, or the merged settings); checked."""
        modules = _str_list(settings, "modules")
        for m in modules:
            if not m.strip() or "\n" in m:
                raise ConfigError(f"modules: {m!r} is not a module name")
        time = _opt_str(settings, "time")
        given = settings.get("gpu_option") or "gres"
        option: GpuOption
        if given == "gres":
            option = "gres"
        elif given == "gpus":
            option = "gpus"
        else:
            raise ConfigError(f'gpu_option must be "gres" or "gpus", not {given!r}')
        return cls(
            partition=_opt_str(settings, "partition"),
            account=_opt_str(settings, "account"),
            qos=_opt_str(settings, "qos"),
            time=check_time(time, "time") if time else None,
            constraint=_opt_str(settings, "constraint"),
            sbatch_args=check_sbatch_args(_str_list(settings, "sbatch_args")),
            modules=modules,
            gpu_option=option,
        )

    def with_flags(
        self, *, time: str | None = None, partition: str | None = None, sbatch_args: Sequence[str] = ()
    ) -> SlurmSettings:
        """Flags win over settings (``--time``, ``--partition``, ``--sbatch-arg``, added last)."""
        return replace(
            self,
            time=check_time(time) if time else self.time,
            partition=partition or self.partition,
            sbatch_args=self.sbatch_args + check_sbatch_args(sbatch_args, "--sbatch-arg"),
        )


SETTING_KEYS = ("partition", "account", "qos", "time", "constraint", "sbatch_args", "modules")


def host_settings(settings: Any) -> SlurmSettings | None:
    """The host's Slurm settings when it is a Slurm login node (``scheduler = "slurm"``), else
    None; checked here, so a bad value is a config error before anything reaches the host."""

    def get(key: str) -> Any:
        try:
            return settings.get(key)
        except KeyError:  # a setting this version does not know
            return None

    if get("scheduler") != "slurm":
        return None
    return SlurmSettings.from_settings({k: get(k) for k in SETTING_KEYS})


def settings_request(s: SlurmSettings) -> dict[str, Any]:
    """What the agent's start request carries (it checks them again on the login node)."""
    return {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "time": s.time,
        "constraint": s.constraint,
        "sbatch_args": list(s.sbatch_args),
        "modules": list(s.modules),
        "gpu_option": s.gpu_option,
    }


@dataclass(frozen=True)
class BatchJob:
    """One job to submit. Paths are on the login node (a leading ``~`` is its user's home) and
    on the filesystem it shares with the nodes."""

    job_id: str  # remotedl's id: REMOTEDL_JOB_ID and part of the Slurm job name
    command: str  # a shell command line, run in ``workdir``
    workdir: str  # the job's own code (--chdir)
    control_dir: str  # batch.sh, params, env, started, exit
    log: str  # stdout and stderr, appended (--output)
    remote_dir: str = ""  # the project's tree: its .venv serves when workdir has none
    name: str | None = None
    gpus: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    conda: str | None = None  # a conda environment to activate
    env_setup: str | None = None  # a shell line run before the command (in bash where there is one)


def job_name(job: BatchJob) -> str:
    """The Slurm job name: ``rdl-ID`` or ``rdl-ID-NAME``, in characters every tool prints as is."""
    base = f"rdl-{job.job_id}"
    if job.name and job.name != job.job_id:
        base += "-" + _NAME.sub("_", job.name)
    return base[:100]


def sbatch_options(job: BatchJob, settings: SlurmSettings) -> list[str]:
    """The option words remotedl gives sbatch besides --chdir, --output, --open-mode and
    --parsable (the submit script adds those after expanding ``~``)."""
    if job.gpus < 0:
        raise UsageError(f"--gpus {job.gpus}: a job cannot ask for fewer than 0 GPUs")
    opts = [f"--job-name={job_name(job)}"]
    if job.gpus:
        opts.append(f"--gres=gpu:{job.gpus}" if settings.gpu_option == "gres" else f"--gpus={job.gpus}")
    for flag, value in (
        ("--time", settings.time),
        ("--partition", settings.partition),
        ("--account", settings.account),
        ("--qos", settings.qos),
        ("--constraint", settings.constraint),
    ):
        if value:
            opts.append(f"{flag}={value}")
    opts.extend(settings.sbatch_args)
    return opts


# ------------------------------------------------------------------ data files for the batch script


def encode_values(values: Sequence[str]) -> bytes:
    """The count, then each value as its byte length and its bytes: how the batch script reads
    data (the same framing as the channel's values), with no quoting and no parser involved."""
    parts = [f"{len(values)}\n".encode()]
    for v in values:
        if "\0" in v:
            raise UsageError("a value for a Slurm job cannot hold a NUL byte")
        raw = v.encode("utf-8", "surrogateescape")
        parts += [f"{len(raw)}\n".encode(), raw]
    return b"".join(parts)


def decode_values(data: bytes) -> list[str]:
    """The inverse of ``encode_values`` (for tests and for reading a job's params back)."""
    count_raw, _, rest = data.partition(b"\n")
    out = []
    for _ in range(int(count_raw)):
        n_raw, _, rest = rest.partition(b"\n")
        n = int(n_raw)
        out.append(rest[:n].decode("utf-8", "surrogateescape"))
        rest = rest[n:]
    return out


PARAMS_VERSION = "1"


def batch_params(job: BatchJob, modules: Sequence[str] = ()) -> bytes:
    """``params``: what the batch script runs and how (its positional order is the format)."""
    return encode_values(
        [
            PARAMS_VERSION,
            str(job.job_id),
            job.command,
            job.workdir,
            job.remote_dir,
            job.conda or "",
            job.env_setup or "",
            "\n".join(modules),
            str(job.gpus),
        ]
    )


def env_file(env: Mapping[str, str]) -> bytes:
    """``env``: the job's --env values, name then value. Names are checked here (and again by
    the batch script)."""
    values: list[str] = []
    for k, v in env.items():
        if not _ENV_KEY.match(k) or k.startswith("_rdl_"):
            raise UsageError(f"--env {k!r}: not a variable name", hint="use letters, digits and _")
        values += [k, v]
    return encode_values(values) if values else b""



# Makes `module` a command where a module system (Lmod, Environment Modules) is installed.
MODULE_INIT = r"""
_rdl_module_init() {
  command -v module >/dev/null 2>&1 && return 0
  for _rdl_f in "${MODULESHOME:+$MODULESHOME/init/sh}" /etc/profile.d/lmod.sh /etc/profile.d/modules.sh \
      /usr/share/lmod/lmod/init/sh /usr/share/Modules/init/sh /usr/share/modules/init/sh; do
    if [ -n "$_rdl_f" ] && [ -r "$_rdl_f" ]; then . "$_rdl_f"; break; fi
  done
  command -v module >/dev/null 2>&1
}
"""

# Loads "$1" ... into the current shell's positional parameters from the file on stdin.
_LOAD = r"""read -r _rdl_n || _rdl_n=0
  case $_rdl_n in ''|*[!0-9]*) _rdl_n=0;; esac
  set --
  while [ "$#" -lt "$_rdl_n" ]; do
    read -r _rdl_l || break
    _rdl_v=$(dd bs=1 count="$_rdl_l" 2>/dev/null; echo .); set -- "$@" "${_rdl_v%.}"
  done"""

# The batch script (after its #! line). "$1" is the control directory.
BATCH_SCRIPT = (
    r"""# remotedl batch job: what it runs is data in its control directory "$1" (params; env holds
# the job's --env values, 0600, removed at the end). It records `started` and `exit` there.
umask 077
_rdl_ctl=$1
_rdl_term=0
_rdl_end() {
  printf '%s %s %s\n' "$1" "$_rdl_term" "$(date +%s)" > "$_rdl_ctl/exit.tmp" &&
    mv -f "$_rdl_ctl/exit.tmp" "$_rdl_ctl/exit"
  rm -f "$_rdl_ctl/env"
  exit "$1"
}
{
  """
    + _LOAD
    + r"""
} < "$_rdl_ctl/params"
if [ "$#" -lt 9 ] || [ "$1" != 1 ]; then
  echo "remotedl: cannot read $_rdl_ctl/params (written by another version of remotedl?)" >&2
  _rdl_end 125
fi
_rdl_id=$2 _rdl_cmd=$3 _rdl_jd=$4 _rdl_rd=$5 _rdl_conda=$6 _rdl_setup=$7 _rdl_mods=$8 _rdl_gpus=$9
rm -f "$_rdl_ctl/exit"
printf '%s %s %s %s\n' "$(date +%s)" "${SLURMD_NODENAME:-?}" "${SLURM_JOB_ID:-?}" \
  "${SLURM_JOB_GPUS:-${SLURM_STEP_GPUS:--}}" > "$_rdl_ctl/started.tmp" &&
  mv -f "$_rdl_ctl/started.tmp" "$_rdl_ctl/started"
if [ -f "$_rdl_ctl/env" ]; then
  {
  """
    + _LOAD
    + r"""
  } < "$_rdl_ctl/env"
  while [ "$#" -ge 2 ]; do
    case $1 in
      ''|[0-9]*|*[!A-Za-z0-9_]*|_rdl_*) echo "remotedl: skipped a variable with a bad name" >&2;;
      *) export "$1=$2";;
    esac
    shift 2
  done
fi
set --
PYTHONUNBUFFERED=${PYTHONUNBUFFERED-1}
REMOTEDL_JOB_ID=$_rdl_id
CUDA_DEVICE_ORDER=PCI_BUS_ID
export PYTHONUNBUFFERED REMOTEDL_JOB_ID CUDA_DEVICE_ORDER
if [ "$_rdl_gpus" = 0 ] && [ -z "${SLURM_JOB_GPUS-}${SLURM_STEP_GPUS-}" ]; then
  CUDA_VISIBLE_DEVICES=; export CUDA_VISIBLE_DEVICES  # a CPU job sees no GPU, as on a box
fi
"""
    + MODULE_INIT
    + r"""
if [ -n "$_rdl_mods" ]; then
  _rdl_module_init || {
    echo "remotedl: modules are set for this host but this node has no module command" >&2; _rdl_end 125; }
  while IFS= read -r _rdl_m; do
    [ -n "$_rdl_m" ] || continue
    module load "$_rdl_m" || { echo "remotedl: module load $_rdl_m failed" >&2; _rdl_end 125; }
  done <<RDL_MODULES
$_rdl_mods
RDL_MODULES
fi
"""
    + ACTIVATE
    + r"""
_rdl_activate || _rdl_end 125
trap '_rdl_term=1' TERM
(
  unset _rdl_id _rdl_jd _rdl_rd _rdl_conda _rdl_setup _rdl_mods _rdl_gpus _rdl_term
  unset _rdl_n _rdl_l _rdl_v _rdl_m _rdl_f _rdl_b _rdl_cb
  eval "$_rdl_cmd"
)
_rdl_end "$?"
"""
)


@dataclass(frozen=True)
class Submitted:
    slurm_id: str
    cluster: str | None  # set when sbatch answered ID;CLUSTER (a federation or -M)
    control_dir: str  # expanded on the login node
    options: list[str]
    warnings: list[str] = field(default_factory=list)


def parse_sbatch(stdout: str) -> tuple[str, str | None]:
    """``sbatch --parsable``'s answer: ``ID`` or ``ID;CLUSTER``."""
    lines = [x.strip() for x in stdout.splitlines() if x.strip()]
    if not lines:
        raise RemoteError("sbatch answered nothing (expected a job id)")
    job, _, cluster = lines[-1].partition(";")
    if not re.fullmatch(r"\d+", job):
        raise RemoteError(f"sbatch answered {lines[-1][:80]!r} (expected a job id)")
    return job, cluster or None


def sbatch_reason(lines: Sequence[str]) -> str:
    """sbatch's reason for a refusal: its first ``error:`` line (the most specific: "invalid
    partition specified: gpu" comes before "Batch job submission failed: Invalid partition
    name specified"), else its first line, without the prefixes."""
    lines = [x.strip() for x in lines if x.strip()]
    first = next((x for x in lines if "error:" in x), lines[0] if lines else "")
    for prefix in (r"^sbatch: (error: )?", r"^Batch job submission failed:\s*", r"^allocation failure:\s*"):
        first = re.sub(prefix, "", first)
    return first or "no reason given"


def submit_error(stderr: list[str]) -> RemoteError:
    text = " ".join(x.strip() for x in stderr if x.strip())
    reason = sbatch_reason(stderr)
    low = text.lower()
    if "node configuration is not available" in low or "requested node config" in low:
        hint = "no node of the partition has that many GPUs (or that constraint): see `remotedl status`"
    elif "invalid partition" in low:
        hint = "set partition in [hosts.NAME] or pass --partition; `remotedl status` lists them"
    elif "invalid account" in low or "invalid qos" in low or "association" in low:
        hint = "check account/qos in [hosts.NAME]; `remotedl doctor` lists yours when sacctmgr answers"
    elif "time limit" in low:
        hint = "ask for less with --time, or pick a partition with a longer limit"
    else:
        hint = "this is sbatch's own message; `remotedl doctor` checks the host's Slurm settings"
    return RemoteError(f"sbatch refused the job: {reason}", hint=hint)


# ------------------------------------------------------------------ states

SlurmStateName = str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ... or UNKNOWN

_QUEUED = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
_RUNNING = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
_FAILED = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
_KILLED = {"CANCELLED", "PREEMPTED", "REVOKED"}
ENDED_STATES = {"COMPLETED", *_FAILED, *_KILLED}


def to_status(state: str) -> Status:
    """remotedl's status for a Slurm state."""
    if state in _QUEUED:
        return "queued"
    if state in _RUNNING:
        return "running"
    if state == "COMPLETED":
        return "succeeded"
    if state in _FAILED:
        return "failed"
    if state in _KILLED:
        return "killed"
    return "lost"


@dataclass
class SlurmJob:
    """A Slurm job as remotedl reads it, from whichever source knew it (``source``)."""

    job_id: str
    state: str
    reason: str = ""
    name: str = ""
    nodes: str = ""
    exit_code: int | None = None  # the status, or 128+signal when a signal ended it (as on a box)
    signal: int | None = None
    start: str | None = None
    end: str | None = None
    elapsed: str | None = None
    time_limit: str | None = None
    partition: str = ""
    user: str = ""
    gpus: int | None = None  # GPUs asked for
    gpu_indices: list[int] = field(default_factory=list)  # the node's GPU indices it holds
    source: str = ""  # squeue, scontrol, sacct, job (what the batch script wrote), none

    @property
    def status(self) -> Status:
        return to_status(self.state)

    @property
    def known(self) -> bool:
        """Slurm answered (False: its controller could not be reached; nothing is known)."""
        return self.state != "UNREACHABLE"

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES or self.state == "UNKNOWN"

    def describe(self) -> str:
        """In words: ``PENDING (Resources)``, ``RUNNING on node1``, ``FAILED (exit 3)``."""
        if self.state in _QUEUED:
            return f"{self.state} ({self.reason})" if self.reason and self.reason != "None" else self.state
        if self.state in _RUNNING:
            return f"{self.state} on {self.nodes}" if self.nodes else self.state
        if self.state == "UNKNOWN":
            return f"UNKNOWN ({self.reason})" if self.reason else "UNKNOWN"
        if self.state == "COMPLETED" or self.state in _KILLED:
            return self.state
        if self.signal:
            return f"{self.state} (signal {self.signal})"
        if self.exit_code is not None and self.exit_code != 0:
            return f"{self.state} (exit {self.exit_code})"
        return self.state

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status, "describe": self.describe()}


def parse_exit_code(text: str) -> tuple[int | None, int | None]:
    """Slurm's ``EXIT:SIGNAL`` as (exit status as a box records it, signal or None)."""
    m = re.fullmatch(r"\s*(\d+):(\d+)\s*", text or "")
    if not m:
        return None, None
    code, sig = int(m.group(1)), int(m.group(2))
    if sig:
        return 128 + sig, sig
    return code, None


def _none(text: str | None) -> str | None:
    if text is None:
        return None
    t = text.strip()
    return None if t in ("", "N/A", "NONE", "None", "Unknown", "(null)") else t


def gres_count(text: str, name: str = "gpu") -> int:
    """How many of gres ``name`` a gres string names: ``gpu:2``, ``gpu:a100:4(S:0-1)``,
    ``gres:gpu:1``, ``gres/gpu:a100=2``, ``gpu:a100:2,gpu:v100:1`` (summed)."""
    total = 0
    for item in _split_outside_parens(text or ""):
        item = re.sub(r"\(.*?\)", "", item).strip()
        item = re.sub(r"^(gres[:/])", "", item)
        parts = re.split(r"[:=]", item)
        if not parts or parts[0] != name:
            continue
        count = parts[-1] if len(parts) > 1 else "1"
        if count.isdigit():
            total += int(count)
        elif len(parts) >= 2 and not any(p.isdigit() for p in parts[1:]):
            total += 1  # gpu:a100 means one of them
    return total


def _split_outside_parens(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def gres_indices(text: str, name: str = "gpu") -> list[int]:
    """GPU indices in a detailed gres string: ``gpu:1(IDX:0)``, ``gpu:a100:3(IDX:0-1,3)``."""
    found: list[int] = []
    for item in _split_outside_parens(text or ""):
        item = re.sub(r"^(gres[:/])", "", item.strip())
        if not item.startswith(name):
            continue
        m = re.search(r"\(IDX:([0-9,\-]+)\)", item)
        if not m:
            continue
        for part in m.group(1).split(","):
            lo, _, hi = part.partition("-")
            if lo.isdigit() and (not hi or hi.isdigit()):
                found.extend(range(int(lo), int(hi or lo) + 1))
    return found


# squeue -O fields (22.05+): the name last, since it may hold the separator.
SQUEUE_FIELDS = (
    "JobID", "State", "Reason", "NodeList", "TimeUsed", "TimeLimit", "StartTime", "EndTime",
    "tres-per-node", "tres-per-job", "Partition", "UserName", "Name",
)  # fmt: skip
SQUEUE_FORMAT = ",".join(f"{f}:|" for f in SQUEUE_FIELDS)


def parse_squeue(text: str) -> list[SlurmJob]:
    """``squeue --noheader -O SQUEUE_FORMAT`` lines."""
    jobs = []
    for line in text.splitlines():
        if not line.strip() or "|" not in line:
            continue
        body = line[:-1] if line.endswith("|") else line
        parts = body.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) < len(SQUEUE_FIELDS) or not re.fullmatch(r"[0-9_+\[\]-]+", parts[0].strip()):
            continue
        f = dict(zip(SQUEUE_FIELDS, (p.strip() for p in parts), strict=True))
        f["Name"] = parts[-1]
        gpus = gres_count(f["tres-per-node"]) or gres_count(f["tres-per-job"])
        jobs.append(
            SlurmJob(
                job_id=f["JobID"],
                state=f["State"].split()[0] if f["State"] else "UNKNOWN",
                reason=f["Reason"] if f["Reason"] != "None" else "",
                name=f["Name"],
                nodes=f["NodeList"],
                start=_none(f["StartTime"]),
                end=_none(f["EndTime"]),
                elapsed=f["TimeUsed"],
                time_limit=f["TimeLimit"],
                partition=f["Partition"],
                user=f["UserName"],
                gpus=gpus,
                source="squeue",
            )
        )
    return jobs


# Keys whose values may hold spaces (or look like `key=value`): inside them only a key from
# _KNOWN_KEYS starts a new field.
_FREE_TEXT = {"JobName", "Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Comment", "OS", "Reason",
              "AdminComment", "SystemComment", "Features", "ActiveFeatures", "AvailableFeatures",
              "Name", "Partitions", "Reservation"}  # fmt: skip
_KNOWN_KEYS = {
    "JobId", "JobName", "UserId", "GroupId", "MCS_label", "Priority", "Nice", "Account", "QOS",
    "JobState", "Reason", "Dependency", "Requeue", "Restarts", "BatchFlag", "Reboot", "ExitCode",
    "DerivedExitCode", "RunTime", "TimeLimit", "TimeMin", "SubmitTime", "EligibleTime", "AccrueTime",
    "StartTime", "EndTime", "Deadline", "SuspendTime", "SecsPreSuspend", "LastSchedEval", "Scheduler",
    "Partition", "AllocNode:Sid", "ReqNodeList", "ExcNodeList", "NodeList", "BatchHost", "NumNodes",
    "NumCPUs", "NumTasks", "CPUs/Task", "ReqB:S:C:T", "TRES", "Socks/Node", "NtasksPerN:B:S:C",
    "CoreSpec", "JOB_GRES", "Nodes", "CPU_IDs", "Mem", "GRES", "MinCPUsNode", "MinMemoryNode",
    "MinTmpDiskNode", "Features", "DelayBoot", "OverSubscribe", "Contiguous", "Licenses", "Network",
    "Command", "WorkDir", "StdErr", "StdIn", "StdOut", "Power", "TresPerNode", "TresPerJob",
    "TresPerTask", "Comment", "MemPerNode", "MemPerCPU", "CpusPerTres", "MemPerTres", "Reservation",
    "NodeName", "Arch", "CoresPerSocket", "CPUAlloc", "CPUEfctv", "CPUTot", "CPULoad",
    "AvailableFeatures", "ActiveFeatures", "Gres", "GresDrain", "GresUsed", "NodeAddr",
    "NodeHostName", "Version", "OS", "RealMemory", "AllocMem", "FreeMem", "Sockets", "Boards",
    "State", "ThreadsPerCore", "TmpDisk", "Weight", "Owner", "Partitions", "BootTime",
    "SlurmdStartTime", "LastBusyTime", "CfgTRES", "AllocTRES", "CapWatts", "CurrentWatts",
    "AveWatts", "ExtSensorsJoules", "ExtSensorsWatts", "ExtSensorsTemp", "PartitionName",
    "AllowGroups", "AllowAccounts", "AllowQos", "AllocNodes", "Default", "DefaultTime",
    "DisableRootJobs", "ExclusiveUser", "GraceTime", "Hidden", "MaxNodes", "MaxTime", "MinNodes",
    "LLN", "MaxCPUsPerNode", "PriorityJobFactor", "PriorityTier", "RootOnly", "ReqResv",
    "PreemptMode", "TotalCPUs", "TotalNodes", "SelectTypeParameters", "JobDefaults",
    "DefMemPerNode", "MaxMemPerNode", "OverTimeLimit", "ArrayJobId", "ArrayTaskId", "HetJobId",
    "Container", "ContainerID", "Prolog", "Epilog", "ResvPorts", "MaxCPUsPerSocket",
    "DenyAccounts", "DenyQos", "TRESBillingWeights", "Deny", "MCS",
}  # fmt: skip
_FIELD = re.compile(r"(?:(?<=\s)|^)([A-Za-z][A-Za-z0-9_:/]*)=")


def parse_scontrol(line: str) -> dict[str, str]:
    """One ``scontrol --oneliner show job|node|partition`` line as key -> value. Values may
    hold spaces (``JobName=train a``, ``OS=Linux 6.1 #1 SMP``): within a free-text value only
    a known key starts the next field. A key seen twice keeps its first value."""
    fields: dict[str, str] = {}
    spans: list[tuple[str, int, int]] = []  # key, value start, key start
    current: str | None = None
    for m in _FIELD.finditer(line):
        key = m.group(1)
        if current in _FREE_TEXT and key not in _KNOWN_KEYS:
            continue
        spans.append((key, m.end(), m.start()))
        current = key
    for i, (key, start, _) in enumerate(spans):
        end = spans[i + 1][2] if i + 1 < len(spans) else len(line)
        fields.setdefault(key, line[start:end].strip())
    return fields


def job_from_scontrol(fields: Mapping[str, str]) -> SlurmJob:
    exit_code, sig = parse_exit_code(fields.get("ExitCode", ""))
    state = (fields.get("JobState") or "UNKNOWN").split()[0]
    gres = fields.get("GRES", "")
    tres = fields.get("TresPerNode", "") or fields.get("TresPerJob", "")
    return SlurmJob(
        job_id=fields.get("JobId", ""),
        state=state,
        reason=fields.get("Reason", "") if fields.get("Reason") != "None" else "",
        name=fields.get("JobName", ""),
        nodes=_none(fields.get("NodeList")) or "",
        exit_code=exit_code if state in ENDED_STATES else None,
        signal=sig if state in ENDED_STATES else None,
        start=_none(fields.get("StartTime")),
        end=_none(fields.get("EndTime")),
        elapsed=fields.get("RunTime"),
        time_limit=fields.get("TimeLimit"),
        partition=fields.get("Partition", ""),
        user=(fields.get("UserId") or "").split("(")[0],
        gpus=gres_count(tres) if tres else None,
        gpu_indices=gres_indices(gres),
        source="scontrol",
    )


SACCT_FIELDS = ("JobID", "State", "ExitCode", "NodeList", "Start", "End", "Elapsed", "Partition", "JobName")


def parse_sacct(text: str, job_id: str) -> SlurmJob | None:
    """The job's allocation line from ``sacct --parsable2 --noheader --format=SACCT_FIELDS``."""
    for line in text.splitlines():
        parts = line.split("|", len(SACCT_FIELDS) - 1)
        if len(parts) < len(SACCT_FIELDS) or parts[0] != job_id:
            continue
        f = dict(zip(SACCT_FIELDS, parts, strict=True))
        state = (f["State"].split() or ["UNKNOWN"])[0]  # "CANCELLED by 1000"
        exit_code, sig = parse_exit_code(f["ExitCode"])
        return SlurmJob(
            job_id=job_id,
            state=state,
            name=f["JobName"],
            nodes=_none(f["NodeList"]) or "",
            exit_code=exit_code,
            signal=sig,
            start=_none(f["Start"]),
            end=_none(f["End"]),
            elapsed=f["Elapsed"],
            partition=f["Partition"],
            source="sacct",
        )
    return None


@dataclass(frozen=True)
class OwnRecord:
    """What the batch script wrote in the control directory."""

    started: float | None = None
    node: str = ""
    exit_code: int | None = None
    terminated: bool = False  # it got SIGTERM (scancel, time limit, preemption)
    ended: float | None = None
    time_limit: bool = False  # the log ends with slurmstepd's DUE TO TIME LIMIT line
    gpus: tuple[int, ...] = ()  # SLURM_JOB_GPUS: the node's GPU indices it got


def parse_own(started: str | None, exit_line: str | None, time_limit: bool = False) -> OwnRecord:
    s = (started or "").split()
    e = (exit_line or "").split()
    return OwnRecord(
        started=float(s[0]) if s and s[0].isdigit() else None,
        node=s[1] if len(s) > 1 and s[1] != "?" else "",
        exit_code=int(e[0]) if e and e[0].isdigit() else None,
        terminated=len(e) > 1 and e[1] == "1",
        ended=float(e[2]) if len(e) > 2 and e[2].isdigit() else None,
        time_limit=time_limit,
        gpus=tuple(int(g) for g in s[3].split(",") if g.isdigit()) if len(s) > 3 else (),
    )


def job_from_own(job_id: str, own: OwnRecord) -> SlurmJob:
    """The state of a job Slurm no longer knows (no accounting), from what it wrote itself."""
    reason = ""
    if own.exit_code is not None:
        if own.time_limit:
            state = "TIMEOUT"
        elif own.terminated or own.exit_code == 128 + 15:
            # SIGTERM is how Slurm cancels: slurmstepd signals every process of the job, and the
            # command may die of it before the batch shell's own signal arrives
            state = "CANCELLED"
        else:
            state = "COMPLETED" if own.exit_code == 0 else "FAILED"
    elif own.time_limit:
        state = "TIMEOUT"
    else:
        state = "UNKNOWN"
        if own.started is not None:
            reason = "it left the queue without recording its end (killed, or its node failed)"
        else:
            reason = "it left the queue before it started (cancelled while pending?)"
    return SlurmJob(
        job_id,
        state,
        reason=reason,
        nodes=own.node,
        exit_code=own.exit_code,
        gpu_indices=list(own.gpus),
        start=_iso(own.started),
        end=_iso(own.ended),
        source="job",
    )


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.localtime(t))


@dataclass(frozen=True)
class JobRef:
    """A submitted job as the caller knows it: where to look for its state."""

    slurm_id: str
    control_dir: str
    log: str = ""


def parse_states(text: str) -> dict[str, SlurmJob]:
    """Slurm id -> state, from the answer of the state script (one block per job)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@@job "):
            current = blocks.setdefault(line[6:].strip(), [])
        elif current is not None:
            current.append(line)
    return {job_id: state_of(job_id, lines) for job_id, lines in blocks.items()}


def state_of(job_id: str, lines: Sequence[str]) -> SlurmJob:
    """One job's state from its block: scontrol first, then sacct, then the job's own files."""
    scontrol = [x[len("@@scontrol ") :] for x in lines if x.startswith("@@scontrol ")]
    sacct = "\n".join(x[len("@@sacct ") :] for x in lines if x.startswith("@@sacct "))
    started = next((x[len("@@started ") :] for x in lines if x.startswith("@@started ")), None)
    exit_line = next((x[len("@@exit ") :] for x in lines if x.startswith("@@exit ")), None)
    own = parse_own(started, exit_line, "@@timelimit" in lines)
    unreachable = next((x[len("@@unreachable ") :] for x in lines if x.startswith("@@unreachable ")), None)
    if unreachable is not None:
        # the controller did not answer: say so rather than guess from the job's own files
        return SlurmJob(job_id, "UNREACHABLE", reason=unreachable, source="none")
    for line in scontrol:
        fields = parse_scontrol(line)
        if fields.get("JobId") == job_id:
            found = job_from_scontrol(fields)
            if not found.gpu_indices and own.gpus:  # scontrol's details stop at the job's end
                found.gpu_indices = list(own.gpus)
            return found
    from_sacct = parse_sacct(sacct, job_id) if sacct else None
    if from_sacct is not None:
        if from_sacct.state in _KILLED | {"TIMEOUT"} and own.exit_code is not None:
            # jobcomp/filetxt says 0:0 for these; the job's own record knows better
            from_sacct.exit_code = own.exit_code
        from_sacct.gpu_indices = list(own.gpus)
        return from_sacct
    return job_from_own(job_id, own)


# ------------------------------------------------------------------ Jupyter as a batch job

# The address Jupyter binds on the node: the one its name resolves to (what the login node
# reaches), else the node's first address; never every interface, which would put Jupyter on
# whatever networks the node is on.
NODE_ADDRESS = r"""
_node=${SLURMD_NODENAME:-$(hostname)}
_addr=$(getent ahostsv4 "$_node" 2>/dev/null | awk 'NR == 1 { print $1 }')
[ -n "$_addr" ] || _addr=$(hostname -I 2>/dev/null | awk '{ print $1 }')
[ -n "$_addr" ] || {
  echo "remotedl: cannot tell the address of node $_node (its name does not resolve)" >&2; exit 1; }
"""

# The job's command (a constant; the token arrives as JUPYTER_TOKEN from the job's env file).
# It binds NODE_ADDRESS, picks a free port there, and writes "ADDRESS PORT APP NODE" to the
# control directory ($_rdl_ctl, set by the batch script) before Jupyter starts.
JUPYTER_COMMAND = NODE_ADDRESS + r"""
_j=$(command -v jupyter) || {
  echo "remotedl: jupyter is not installed in the project's environment on $_node" >&2; exit 127; }
_py=$(command -v python3 || command -v python)
_port=$("$_py" -c 'import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$_addr") || exit 1
_app=server; "$_j" lab --version >/dev/null 2>&1 && _app=lab
_root=--ServerApp.allow_root=False; [ "$(id -u)" = 0 ] && _root=--allow-root
printf '%s %s %s %s\n' "$_addr" "$_port" "$_app" "$_node" > "$_rdl_ctl/jupyter"
exec "$_j" "$_app" --no-browser --ServerApp.ip="$_addr" --ServerApp.port="$_port" \
  --ServerApp.port_retries=0 --ServerApp.root_dir=. "$_root"
"""

# ------------------------------------------------------------------ the cluster


@dataclass
class SlurmNode:
    name: str
    partitions: list[str]
    state: str  # idle, mixed, allocated, drained, down...
    gpus: int  # GPUs as gres
    gpus_used: int
    gres: str = ""
    cpus_alloc: int | None = None
    cpus_total: int | None = None
    memory_mib: int | None = None


@dataclass
class SlurmPartition:
    name: str
    default: bool = False
    state: str = ""
    max_time: str = ""
    default_time: str = ""
    nodes: int = 0
    gpus: int = 0
    gpus_used: int = 0


@dataclass
class ClusterStatus:
    host: str
    user: str = ""
    version: str = ""
    partitions: list[SlurmPartition] = field(default_factory=list)
    nodes: list[SlurmNode] = field(default_factory=list)
    jobs: list[SlurmJob] = field(default_factory=list)  # the user's jobs, as squeue lists them

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def gpus_used(self) -> int:
        return sum(n.gpus_used for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["jobs"] = [j.to_dict() for j in self.jobs]
        out["gpus"], out["gpus_used"] = self.gpus, self.gpus_used
        return out


SINFO_FIELDS = ("NodeList", "Partition", "StateLong", "Gres", "GresUsed", "CPUsState", "Memory")
SINFO_FORMAT = ",".join(f"{f}:|" for f in SINFO_FIELDS)


def parse_sinfo_nodes(text: str) -> list[SlurmNode]:
    """``sinfo --noheader --Node -O SINFO_FORMAT``: a line per node and partition, merged per node."""
    nodes: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.rstrip("|").split("|")]
        if len(parts) < len(SINFO_FIELDS) or not parts[0]:
            continue
        f = dict(zip(SINFO_FIELDS, parts, strict=False))
        part = f["Partition"].rstrip("*")
        node = nodes.get(f["NodeList"])
        if node is None:
            alloc, total = _cpus(f["CPUsState"])
            node = nodes[f["NodeList"]] = SlurmNode(
                name=f["NodeList"],
                partitions=[],
                state=f["StateLong"],
                gpus=gres_count(f["Gres"]),
                gpus_used=gres_count(f["GresUsed"]),
                gres=f["Gres"] if f["Gres"] != "(null)" else "",
                cpus_alloc=alloc,
                cpus_total=total,
                memory_mib=int(f["Memory"]) if f["Memory"].isdigit() else None,
            )
        if part and part not in node.partitions:
            node.partitions.append(part)
    return list(nodes.values())


def _cpus(text: str) -> tuple[int | None, int | None]:
    parts = text.split("/")  # allocated/idle/other/total
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[3])
    return None, None


def parse_partitions(text: str, nodes: Sequence[SlurmNode] = ()) -> list[SlurmPartition]:
    """``scontrol --oneliner show partition`` lines; GPU totals from the nodes (sinfo)."""
    out = []
    for line in text.splitlines():
        f = parse_scontrol(line)
        name = f.get("PartitionName")
        if not name:
            continue
        members = [n for n in nodes if name in n.partitions]
        out.append(
            SlurmPartition(
                name=name,
                default=f.get("Default") == "YES",
                state=f.get("State", ""),
                max_time=f.get("MaxTime", ""),
                default_time=f.get("DefaultTime", ""),
                nodes=int(f["TotalNodes"]) if f.get("TotalNodes", "").isdigit() else len(members),
                gpus=sum(n.gpus for n in members),
                gpus_used=sum(n.gpus_used for n in members),
            )
        )
    return out


# ------------------------------------------------------------------ on the login node itself
# What the agent runs on the login node: Slurm's commands as argv lists (no shell), files
# written by Python (the env file 0600 from its first byte).


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
CONTROL_FILES = ("env", "exit", "started", "slurm_id", "jupyter", "params", "batch.sh")


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
