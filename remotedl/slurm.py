"""Talking to Slurm on a cluster's login node: batch jobs, their states, the cluster's status and
the checks ``doctor`` runs. Slurm itself queues, places and runs; remotedl only submits and reads.

Everything runs through ``Box.run(script, *values)``: the scripts below are constants and every
value (paths, the command, option words) arrives as "$1"..., never spliced into code.

A job has a control directory on the shared filesystem (given by the caller). ``submit`` writes
into it the batch script (a constant), ``params`` (what to run, where, with which environment:
data, read by the batch script) and ``env`` (the job's ``--env`` values: 0600, read by the batch
script and removed at its end, never in an argv or a world-readable file), then calls ``sbatch``.
The batch script records ``started`` (time, node, Slurm id) and ``exit`` (status, whether it got
SIGTERM, time) there, so the end of a job is known even on a cluster without accounting, after
the job left ``squeue``/``scontrol`` (``MinJobAge``).

Output formats are explicit (``--format``/``-O`` fields, ``--oneliner``, ``--parsable2``) and
work from Slurm 22.05 on; tests/slurm/NOTES.md holds the outputs the parsers were written from.
"""

from __future__ import annotations

import re
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from remotedl.errors import ConfigError, RemoteError, UsageError
from remotedl.schema import Status
from remotedl.ssh.channel import EXPAND_HOME, Box, mark_sections
from remotedl.ssh.openssh import login_shell_safe, ssh_argv
from remotedl.ssh.resolve import HostSpec
from remotedl.waiting import retry_until

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


# The project's environment: the job's .venv or remote_dir's, or a conda environment, then
# env_setup; the same rules (and the same variable names) as a box job's.
ACTIVATE = r"""
_rdl_find_conda() {
  _rdl_cb=
  for _rdl_b in "${CONDA_EXE:+${CONDA_EXE%/bin/conda}}" \
      "$(command -v conda 2>/dev/null | sed -e 's,/bin/conda$,,' -e 's,/condabin/conda$,,')" \
      "$HOME/miniforge3" "$HOME/miniconda3" "$HOME/anaconda3" "$HOME/mambaforge" /opt/conda; do
    if [ -n "$_rdl_b" ] && [ -f "$_rdl_b/etc/profile.d/conda.sh" ]; then _rdl_cb=$_rdl_b; break; fi
  done
  if [ -z "$_rdl_cb" ]; then
    echo "remotedl: conda is not installed on this node" >&2
    return 1
  fi
}
_rdl_activate() {
  if [ -n "$_rdl_conda" ]; then
    _rdl_find_conda || return 1
    . "$_rdl_cb/etc/profile.d/conda.sh" || return 1
    conda activate "$_rdl_conda" || {
      echo "remotedl: could not activate the conda environment '$_rdl_conda'" >&2; return 1; }
  else
    for _rdl_v in "${_rdl_jd:+$_rdl_jd/.venv}" "${_rdl_rd:+$_rdl_rd/.venv}"; do
      if [ -n "$_rdl_v" ] && [ -x "$_rdl_v/bin/python" ]; then
        VIRTUAL_ENV=$_rdl_v; PATH="$_rdl_v/bin:$PATH"; export VIRTUAL_ENV PATH; unset PYTHONHOME
        break
      fi
    done
  fi
  if [ -n "$_rdl_setup" ]; then
    eval "$_rdl_setup" || { echo "remotedl: env_setup failed: $_rdl_setup" >&2; return 1; }
  fi
  return 0
}
"""

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
printf '%s %s %s\n' "$(date +%s)" "${SLURMD_NODENAME:-?}" "${SLURM_JOB_ID:-?}" > "$_rdl_ctl/started.tmp" &&
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

# "$1" control dir, "$2" job dir, "$3" log, "$4" params, "$5" env data, "$6" 1 to run the batch
# script with bash (env_setup, modules); then sbatch's option words.
_SUBMIT = (
    EXPAND_HOME
    + r"""
_ctl=$(expand_home "$1") _wd=$(expand_home "$2") _log=$(expand_home "$3") _params=$4 _envdata=$5 _bash=$6
shift 6
umask 077
command -v sbatch >/dev/null 2>&1 || { echo "@@error sbatch is not on the login node's PATH"; exit 0; }
[ -d "$_wd" ] || { echo "@@error the job's directory $_wd does not exist on the login node"; exit 0; }
mkdir -p "$_ctl" "$(dirname "$_log")" || { echo "@@error cannot make $_ctl"; exit 0; }
rm -f "$_ctl/env" "$_ctl/exit" "$_ctl/started" "$_ctl/slurm_id" "$_ctl/jupyter" "$_log"
if [ "$_bash" = 1 ] && [ -x /bin/bash ]; then echo '#!/bin/bash'; else echo '#!/bin/sh'; fi > "$_ctl/batch.sh"
cat >> "$_ctl/batch.sh" <<'RDL_BATCH_SCRIPT_END'
"""
    + BATCH_SCRIPT
    + r"""RDL_BATCH_SCRIPT_END
chmod 700 "$_ctl/batch.sh"
printf '%s' "$_params" > "$_ctl/params"
[ -z "$_envdata" ] || printf '%s' "$_envdata" > "$_ctl/env"
_pattern=$(printf '%s' "$_log" | sed 's/%/%%/g')  # sbatch reads % in --output as a pattern
_out=$(sbatch --parsable --chdir="$_wd" --output="$_pattern" --open-mode=append \
  "$@" "$_ctl/batch.sh" "$_ctl" 2>"$_ctl/sbatch.err")
_rc=$?
sed 's/^/@@stderr /' "$_ctl/sbatch.err"
if [ "$_rc" -ne 0 ]; then rm -f "$_ctl/env"; echo "@@rc $_rc"; exit 0; fi
printf '@@job %s\n' "$_out"
printf '%s\n' "$_out" > "$_ctl/slurm_id"
printf '@@control %s\n' "$_ctl"
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


def _submit_error(stderr: list[str]) -> RemoteError:
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


def submit(box: Box, job: BatchJob, settings: SlurmSettings) -> Submitted:
    """Write the job's control files and submit it with sbatch; one exec."""
    opts = sbatch_options(job, settings)
    params = batch_params(job, settings.modules)
    use_bash = "1" if (job.env_setup or settings.modules) else "0"
    r = box.run(
        _SUBMIT,
        job.control_dir,
        job.workdir,
        job.log,
        params.decode("utf-8", "surrogateescape"),
        env_file(job.env).decode("utf-8", "surrogateescape"),
        use_bash,
        *opts,
    )
    sections = mark_sections(r.stdout)
    stderr = sections.get("stderr", [])
    if "error" in sections:
        raise RemoteError(sections["error"][0], hint="check remote_dir and push first")
    if "rc" in sections or "job" not in sections:
        raise _submit_error(stderr or r.stderr.splitlines())
    slurm_id, cluster = parse_sbatch(sections["job"][0])
    control = (sections.get("control") or [job.control_dir])[0]
    return Submitted(slurm_id, cluster, control, opts, [x for x in stderr if x.strip()])


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
    )


def job_from_own(job_id: str, own: OwnRecord) -> SlurmJob:
    """The state of a job Slurm no longer knows (no accounting), from what it wrote itself."""
    reason = ""
    if own.exit_code is not None:
        if own.time_limit:
            state = "TIMEOUT"
        elif own.terminated:
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
        start=_iso(own.started),
        end=_iso(own.ended),
        source="job",
    )


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _time.strftime("%Y-%m-%dT%H:%M:%S", _time.localtime(t))


# "$@": triples (Slurm id, control dir, log). Per job: what scontrol knows, else sacct, and what
# the job wrote itself.
_STATE_FN = (
    EXPAND_HOME
    + r"""
rdl_state() {
  _id=$1 _ctl=$(expand_home "$2") _log=$(expand_home "$3")
  printf '@@job %s\n' "$_id"
  _sc=$(scontrol --oneliner --details show job "$_id" 2>/dev/null)
  if [ -n "$_sc" ]; then
    printf '%s\n' "$_sc" | sed 's/^/@@scontrol /'
  else
    sacct --noheader --parsable2 --allocations --jobs="$_id" --format=SACCT_FIELDS 2>/dev/null |
      sed 's/^/@@sacct /'
    if [ -n "$_log" ] && [ -f "$_log" ] && tail -c 4096 "$_log" | grep -q 'DUE TO TIME LIMIT'; then
      echo '@@timelimit'
    fi
  fi
  [ -f "$_ctl/started" ] && printf '@@started %s\n' "$(cat "$_ctl/started")"
  [ -f "$_ctl/exit" ] && printf '@@exit %s\n' "$(cat "$_ctl/exit")"
  echo '@@done'
}
""".replace("SACCT_FIELDS", ",".join(SACCT_FIELDS))
)

_QUERY = (
    _STATE_FN
    + r"""
command -v scontrol >/dev/null 2>&1 || { echo "@@error scontrol is not on the login node's PATH"; exit 0; }
while [ "$#" -ge 3 ]; do rdl_state "$1" "$2" "$3"; shift 3; done
"""
)

# "$1" Slurm id, "$2" control dir, "$3" log.
_CANCEL = (
    _STATE_FN
    + r"""
command -v scancel >/dev/null 2>&1 || { echo "@@error scancel is not on the login node's PATH"; exit 0; }
scancel "$1" 2>&1 | sed 's/^/@@stderr /'
rm -f "$(expand_home "$2")/env"
rdl_state "$1" "$2" "$3"
"""
)


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
    for line in scontrol:
        fields = parse_scontrol(line)
        if fields.get("JobId") == job_id:
            return job_from_scontrol(fields)
    from_sacct = parse_sacct(sacct, job_id) if sacct else None
    if from_sacct is not None:
        if from_sacct.state in _KILLED | {"TIMEOUT"} and own.exit_code is not None:
            # jobcomp/filetxt says 0:0 for these; the job's own record knows better
            from_sacct.exit_code = own.exit_code
        return from_sacct
    return job_from_own(job_id, own)


def query(box: Box, jobs: Sequence[JobRef]) -> dict[str, SlurmJob]:
    """The state of each job (by Slurm id), one exec for all."""
    if not jobs:
        return {}
    values = [v for j in jobs for v in (j.slurm_id, j.control_dir, j.log)]
    r = box.run(_QUERY, *values)
    marks = mark_sections(r.stdout)
    if "error" in marks and "job" not in marks:
        raise RemoteError(marks["error"][0], hint="is this host a Slurm login node? check `remotedl doctor`")
    return parse_states(r.stdout)


def cancel(box: Box, job: JobRef, *, wait: float = 30.0) -> SlurmJob:
    """scancel the job (and remove its env file), then wait until Slurm says it ended (a
    cancelled running job passes through COMPLETING for up to KillWait seconds)."""
    r = box.run(_CANCEL, job.slurm_id, job.control_dir, job.log)
    marks = mark_sections(r.stdout)
    if "error" in marks and "job" not in marks:
        raise RemoteError(marks["error"][0])
    state = parse_states(r.stdout).get(job.slurm_id) or SlurmJob(job.slurm_id, "UNKNOWN", source="none")
    if state.ended:
        return state

    def ended() -> SlurmJob | None:
        now = query(box, [job]).get(job.slurm_id)
        return now if now is not None and now.ended else None

    return retry_until(ended, seconds=wait, interval=0.2) or query(box, [job]).get(job.slurm_id, state)


def wait_for(
    box: Box, job: JobRef, until: Callable[[SlurmJob], bool], *, seconds: float, interval: float = 0.5
) -> SlurmJob | None:
    """Poll the job's state until ``until`` holds (None when ``seconds`` passed first)."""

    def check() -> SlurmJob | None:
        now = query(box, [job]).get(job.slurm_id)
        return now if now is not None and until(now) else None

    return retry_until(check, seconds=seconds, interval=interval)


# ------------------------------------------------------------------ following a job's log

# Active states: the job may still write to its log (COMPLETING: slurmstepd may add a line).
_ACTIVE_STATES = " ".join(sorted(_QUEUED | _RUNNING))

# "$1" Slurm id, "$2" log, "$3" control dir, "$4" byte offset (empty: from "$6" lines before the
# end, or 0), "$5" 1 to follow until the job ends, "$6" lines. Answers in frames on stdout:
# "S OFFSET" first; "D N" then N bytes of the log; "Q LINE" when scontrol's state or reason
# changed; "E" then the job's state lines (as the state script prints them) at its end.
_FOLLOW = (
    _STATE_FN
    + r"""
_id=$1 _log=$(expand_home "$2") _ctl=$(expand_home "$3") _off=$4 _follow=$5 _lines=$6
_size() { if [ -f "$_log" ]; then wc -c < "$_log" | tr -d ' '; else echo 0; fi; }
if [ -z "$_off" ]; then
  _off=0
  if [ -n "$_lines" ] && [ -f "$_log" ]; then
    _s=$(_size); _t=$(tail -n "$_lines" "$_log" | wc -c | tr -d ' '); _off=$((_s - _t))
  fi
fi
printf 'S %s\n' "$_off"
_copy() {
  _s=$(_size)
  if [ "$_s" -gt "$_off" ]; then
    printf 'D %s\n' $((_s - _off))
    tail -c +$((_off + 1)) "$_log" | head -c $((_s - _off))
    _off=$_s
  fi
}
_seen= _st= _next=0 _n=0
while :; do
  if [ "$_n" -ge "$_next" ] || [ -f "$_ctl/exit" ]; then
    _sc=$(scontrol --oneliner show job "$_id" 2>&1)
    case $_sc in
      JobId=*)
        _st=$(printf '%s\n' "$_sc" | sed -n 's/.* JobState=\([A-Z_]*\).*/\1/p' | head -n 1)
        _rs=$(printf '%s\n' "$_sc" | sed -n 's/.* Reason=\([^ ]*\).*/\1/p' | head -n 1)
        if [ "$_st $_rs" != "$_seen" ]; then
          _seen="$_st $_rs"; printf 'Q %s\n' "$(printf '%s\n' "$_sc" | head -n 1)"
        fi;;
      *"Invalid job id"*) _st=GONE;;
      *) _st=;;  # the controller did not answer: keep following
    esac
    _next=$((_n + 10))
  fi
  _copy
  case " ACTIVE_STATES  " in
    *" $_st "*) ;;
    *) [ -z "$_st" ] || break;;
  esac
  [ "$_follow" = 1 ] || break
  sleep 0.2
  _n=$((_n + 1))
done
_copy
echo E
rdl_state "$_id" "$3" "$2"
""".replace("ACTIVE_STATES", _ACTIVE_STATES)
)


@dataclass
class Following:
    """Where a log follower stands: its byte offset and how often it reconnected."""

    offset: int | None = None  # None: not started (``lines`` decides the first offset)
    reconnects: int = 0
    state: SlurmJob | None = None  # the last state seen


class _Frames:
    """Parses the follower's frames as bytes arrive."""

    def __init__(self) -> None:
        self.buf = b""
        self.data_left = 0
        self.ended = False  # after "E": the state lines

    def feed(self, chunk: bytes) -> Iterator[tuple[str, bytes]]:
        self.buf += chunk
        while self.buf:
            if self.data_left:
                piece = self.buf[: self.data_left]
                self.buf = self.buf[len(piece) :]
                self.data_left -= len(piece)
                yield "D", piece
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > 1 << 20:
                    raise RemoteError("the log follower sent a line it should not have")
                return
            line, self.buf = self.buf[:nl].decode(errors="replace"), self.buf[nl + 1 :]
            kind, _, rest = line.partition(" ")
            if self.ended:
                yield "L", line.encode()
            elif kind == "D" and rest.isdigit():
                self.data_left = int(rest)
            elif kind in ("S", "Q", "E"):
                self.ended = kind == "E"
                yield kind, rest.encode()
            else:
                raise RemoteError(f"the log follower sent {line[:60]!r}")


def follow_log(
    box: Box,
    job: JobRef,
    write: Callable[[bytes], None],
    *,
    follow: bool = True,
    lines: int | None = None,
    state: Following | None = None,
    on_state: Callable[[SlurmJob], None] | None = None,
    on_reconnect: Callable[[int], None] | None = None,
    reconnect_for: float = 300.0,
) -> SlurmJob:
    """Copy the job's log from the login node to ``write``; following, until the job ends.
    While it waits in the queue ``on_state`` hears each state (PENDING with its reason), and
    each change after. A dropped connection is re-made and the log resumes at the byte offset
    reached: no byte lost, none repeated. Returns the job's state at its end."""
    from remotedl.ssh.channel import NoFrame
    from remotedl.ssh.openssh import openssh_failure

    st = state or Following()
    down_since: float | None = None
    while True:
        p = box.start(
            _FOLLOW,
            job.slurm_id,
            job.log,
            job.control_dir,
            "" if st.offset is None else str(st.offset),
            "1" if follow else "0",
            str(lines) if lines is not None and st.offset is None else "",
        )
        frames = _Frames()
        ended: list[str] | None = None
        framed = True
        try:
            while True:
                try:
                    chunk = p.read()
                except NoFrame:
                    framed = False
                    break
                if not chunk:
                    break
                for kind, data in frames.feed(chunk):
                    if kind == "L" and ended is not None:
                        ended.append(data.decode(errors="replace"))
                    elif kind == "D":
                        write(data)
                        st.offset = (st.offset or 0) + len(data)
                    elif kind == "S" and st.offset is None:
                        st.offset = int(data)
                    elif kind == "Q":
                        seen = job_from_scontrol(parse_scontrol(data.decode(errors="replace")))
                        st.state = seen
                        if on_state is not None:
                            on_state(seen)
                    elif kind == "E":
                        ended = []
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        if ended is not None:
            tail = frames.buf.decode(errors="replace").splitlines()
            final = parse_states("\n".join([*ended, *tail])).get(job.slurm_id)
            st.state = final or st.state or SlurmJob(job.slurm_id, "UNKNOWN", source="none")
            return st.state
        err = p.stderr_text()
        if (code == 255 or not framed) and follow:
            now = _time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_for:
                raise openssh_failure(box.spec, err)
            st.reconnects += 1
            if on_reconnect is not None:
                on_reconnect(st.reconnects)
            _time.sleep(min(0.2 * 2 ** min(st.reconnects, 5), 5.0))
            continue
        if code == 255 or not framed:
            raise openssh_failure(box.spec, err)
        last = (p.stderr_lines or [f"exit {code}"])[-1]
        raise RemoteError(f"reading the log of Slurm job {job.slurm_id} failed: {last}")


def attach_argv(spec: HostSpec, slurm_id: str) -> list[str]:
    """ssh with a terminal to the login node, then ``srun --overlap --pty`` into the job's
    allocation: an interactive shell on its node, with its GPUs (``exit`` ends the shell, not
    the job)."""
    if not re.fullmatch(r"\d+", slurm_id):
        raise RemoteError(f"{slurm_id!r} is not a Slurm job id")
    script = f'exec srun --jobid={slurm_id} --overlap --pty "${{SHELL:-/bin/sh}}"'
    return ssh_argv(spec, login_shell_safe(script), tty=True, batch=False)


# ------------------------------------------------------------------ Jupyter as a batch job

# The job's command (a constant; the token arrives as JUPYTER_TOKEN from the job's env file).
# It binds the address the node's name resolves to (what the login node reaches), picks a free
# port there, and writes "ADDRESS PORT APP NODE" to the control directory ($_rdl_ctl, set by
# the batch script) before Jupyter starts.
JUPYTER_COMMAND = r"""
_node=${SLURMD_NODENAME:-$(hostname)}
_addr=$(getent ahostsv4 "$_node" 2>/dev/null | awk 'NR == 1 { print $1 }')
[ -n "$_addr" ] || _addr=0.0.0.0
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

# "$1" control dir, "$2" log: what a look at a Jupyter job needs besides its Slurm state.
_JUPYTER_LOOK = (
    EXPAND_HOME
    + r"""
_ctl=$(expand_home "$1") _log=$(expand_home "$2")
[ -f "$_ctl/slurm_id" ] && printf '@@slurm_id %s\n' "$(cat "$_ctl/slurm_id")"
[ -f "$_ctl/jupyter" ] && printf '@@jupyter %s\n' "$(cat "$_ctl/jupyter")"
[ -f "$_ctl/jupyter" ] && [ -f "$_log" ] && grep -q 'is running at' "$_log" && echo '@@ready'
[ -f "$_ctl/env" ] && { echo '@@env'; od -An -v -tx1 "$_ctl/env"; }
[ -f "$_log" ] && { echo '@@log'; tail -n 5 "$_log"; }
echo '@@end'
"""
)


@dataclass
class SlurmJupyter:
    """A Jupyter server running as a Slurm job."""

    slurm_id: str
    node: str  # the node's name, from Slurm (the tunnel's target, resolved by the login node)
    address: str  # the address Jupyter listens on, on the node
    port: int
    token: str
    lab: bool
    control_dir: str
    log: str
    started: bool  # True when this call submitted it

    def url(self, local_port: int) -> str:
        return f"http://127.0.0.1:{local_port}/{'lab' if self.lab else ''}?token={self.token}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token")  # a secret: only in the URL the user asked for
        return out


def _token_from_env(hex_lines: Sequence[str]) -> str | None:
    """JUPYTER_TOKEN from the job's env file, as ``od -An -tx1`` printed it."""
    try:
        values = decode_values(bytes.fromhex("".join("".join(hex_lines).split())))
    except ValueError:
        return None
    return dict(zip(values[::2], values[1::2], strict=False)).get("JUPYTER_TOKEN")


def look_jupyter(box: Box, control_dir: str, log: str) -> tuple[dict[str, list[str]], SlurmJob | None]:
    """What the control directory of a Jupyter job says, and its Slurm state (two execs only
    when a job id is there)."""
    marks = mark_sections(box.run(_JUPYTER_LOOK, control_dir, log).stdout)
    slurm_id = (marks.get("slurm_id") or [""])[0].strip()
    if not slurm_id:
        return marks, None
    return marks, query(box, [JobRef(slurm_id, control_dir, log)]).get(slurm_id)


def _running_jupyter(
    marks: Mapping[str, list[str]], state: SlurmJob | None, control_dir: str, log: str, started: bool
) -> SlurmJupyter | None:
    if state is None or state.state != "RUNNING" or "ready" not in marks or not marks.get("jupyter"):
        return None
    parts = marks["jupyter"][0].split()
    token = _token_from_env(marks.get("env", []))
    if len(parts) < 4 or not parts[1].isdigit() or token is None:
        return None
    return SlurmJupyter(
        slurm_id=state.job_id,
        node=state.nodes or parts[3],
        address=parts[0],
        port=int(parts[1]),
        token=token,
        lab=parts[2] == "lab",
        control_dir=control_dir,
        log=log,
        started=started,
    )


def find_or_start_jupyter(
    box: Box,
    *,
    workdir: str,
    control_dir: str,
    log: str,
    settings: SlurmSettings,
    remote_dir: str = "",
    gpus: int = 1,
    conda: str | None = None,
    env_setup: str | None = None,
    timeout: float = 600.0,
    on_progress: Callable[[str], None] | None = None,
) -> SlurmJupyter:
    """Reuse the project's Jupyter job when it runs; else submit one (``gpus`` GPUs, the host's
    settings), wait while it is PENDING (saying why) until Jupyter answers on its node."""
    import secrets

    say = on_progress or (lambda text: None)
    marks, state = look_jupyter(box, control_dir, log)
    found = _running_jupyter(marks, state, control_dir, log, started=False)
    if found is not None:
        return found
    if state is not None and not state.ended:
        cancel(box, JobRef(state.job_id, control_dir, log))  # a leftover that never came up
    token = secrets.token_hex(24)
    job = BatchJob(
        job_id="jupyter",
        name="jupyter",
        command=JUPYTER_COMMAND,
        workdir=workdir,
        control_dir=control_dir,
        log=log,
        remote_dir=remote_dir,
        gpus=gpus,
        env={"JUPYTER_TOKEN": token},
        conda=conda,
        env_setup=env_setup,
    )
    sub = submit(box, job, settings)
    ref = JobRef(sub.slurm_id, sub.control_dir, log)
    said = ""

    def up() -> SlurmJupyter | None:
        nonlocal said
        look, now = look_jupyter(box, control_dir, log)
        if now is not None and now.ended:
            tail = " ".join(look.get("log", [])[-2:]).strip()
            raise RemoteError(
                f"the Jupyter job {sub.slurm_id} ended: {now.describe()}" + (f": {tail}" if tail else ""),
                hint=f"its output is in {log} on the login node",
            )
        words = now.describe() if now is not None else "submitted"
        if words != said:
            said = words
            say(f"Jupyter job {sub.slurm_id}: {words}")
        return _running_jupyter(look, now, control_dir, log, started=True)

    try:
        server = retry_until(up, seconds=timeout, interval=1.0)
    except BaseException:
        cancel(box, ref)
        raise
    if server is None:
        cancel(box, ref)
        raise RemoteError(
            f"Jupyter did not come up within {timeout:g} s (job {sub.slurm_id}: {said}); cancelled it",
            hint="see `remotedl status` for the queue, or ask for fewer GPUs",
        )
    return server


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


_STATUS = r"""
command -v sinfo >/dev/null 2>&1 || { echo "@@error sinfo is not on the login node's PATH"; exit 0; }
echo @@user; id -un
echo @@version; sinfo --version 2>&1 | head -n 1
echo @@partitions; scontrol --oneliner show partition 2>&1
echo @@nodes; sinfo --noheader --Node -O 'SINFO_FORMAT' 2>&1
echo @@jobs; squeue --noheader --user="$(id -un)" -O 'SQUEUE_FORMAT' 2>&1
echo @@end
""".replace("SINFO_FORMAT", SINFO_FORMAT).replace("SQUEUE_FORMAT", SQUEUE_FORMAT)


def cluster_status(box: Box) -> ClusterStatus:
    """Partitions, nodes with their GPUs (total, allocated), and the user's jobs; one exec."""
    r = box.run(_STATUS)
    s = mark_sections(r.stdout)
    if "error" in s:
        raise RemoteError(s["error"][0], hint="is this host a Slurm login node? check `remotedl doctor`")
    nodes = parse_sinfo_nodes("\n".join(s.get("nodes", [])))
    return ClusterStatus(
        host=box.spec.alias,
        user=(s.get("user") or [""])[0].strip(),
        version=(s.get("version") or [""])[0].strip(),
        partitions=parse_partitions("\n".join(s.get("partitions", [])), nodes),
        nodes=nodes,
        jobs=parse_squeue("\n".join(s.get("jobs", []))),
    )


# ------------------------------------------------------------------ doctor

SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun", "sacct", "sacctmgr")
NEEDED = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
ASSOC_FIELDS = ("Account", "Partition", "QOS", "DefaultQOS", "GrpTRES", "MaxTRES", "MaxWall", "MaxJobs",
                "MaxSubmit")  # fmt: skip
QOS_FIELDS = ("Name", "MaxWall", "MaxTRESPU", "MaxJobsPU", "MaxSubmitPU", "MaxTRES")

# "$1" modules (one a line), then the sbatch option words of a one-GPU test submission.
_DOCTOR = (
    MODULE_INIT
    + r"""
_mods=$1; shift
echo @@commands; for t in SLURM_COMMANDS; do printf '%s %s\n' "$t" "$(command -v "$t" 2>/dev/null)"; done
command -v sinfo >/dev/null 2>&1 || { echo @@end; exit 0; }
echo @@version; sinfo --version 2>&1 | head -n 1
echo @@ping; scontrol ping 2>&1; echo "@@ping_rc $?"
echo @@select; scontrol show config 2>/dev/null | grep -E '^(SelectType|GresTypes|AccountingStorageType) '
echo @@nodes; sinfo --noheader --Node -O 'SINFO_FORMAT' 2>&1
echo @@testonly; sbatch --test-only "$@" --wrap true 2>&1; echo "@@testonly_rc $?"
_o=$(sacct --noheader --allocations --starttime=now 2>&1); _rc=$?
echo @@sacct; printf '%s\n' "$_o" | tail -n 2; echo "@@sacct_rc $_rc"
echo @@assoc; sacctmgr --noheader --parsable2 show assoc where user="$(id -un)" format=ASSOC_FIELDS 2>&1
echo "@@assoc_rc $?"
echo @@qos; sacctmgr --noheader --parsable2 show qos format=QOS_FIELDS 2>&1; echo "@@qos_rc $?"
if [ -n "$_mods" ]; then
  echo @@modules
  if _rdl_module_init; then
    while IFS= read -r _m; do
      [ -n "$_m" ] || continue
      if module is-avail "$_m" >/dev/null 2>&1; then echo "ok $_m"; else echo "missing $_m"; fi
    done <<RDL_MODULES
$_mods
RDL_MODULES
  else
    echo "@@nomodule"
  fi
fi
echo @@end
""".replace("SLURM_COMMANDS", " ".join(SLURM_COMMANDS))
    .replace("SINFO_FORMAT", SINFO_FORMAT)
    .replace("ASSOC_FIELDS", ",".join(ASSOC_FIELDS))
    .replace("QOS_FIELDS", ",".join(QOS_FIELDS))
)


@dataclass
class SlurmCheck:
    """One doctor line (the same shape as ``doctor.Check``)."""

    name: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""


def doctor_checks(box: Box, settings: SlurmSettings) -> list[SlurmCheck]:
    """Commands present, the controller up, partitions with GPUs, a test submission with the
    host's settings, accounting, the user's account/QOS limits when sacctmgr answers, modules."""
    probe = BatchJob(job_id="doctor", command="true", workdir="", control_dir="", log="", gpus=1)
    opts = [o for o in sbatch_options(probe, settings) if not o.startswith("--job-name=")]
    r = box.run(_DOCTOR, "\n".join(settings.modules), "--job-name=remotedl-doctor", *opts)
    return checks_from(mark_sections(r.stdout), settings)


def checks_from(s: Mapping[str, list[str]], settings: SlurmSettings) -> list[SlurmCheck]:
    """The doctor lines from the doctor script's sections (pure: unit-tested)."""
    out: list[SlurmCheck] = []
    where: dict[str, str] = {}
    for line in s.get("commands", []):
        name, _, path = line.partition(" ")
        where[name] = path.strip()
    missing = [c for c in NEEDED if not where.get(c)]
    if missing:
        out.append(
            SlurmCheck(
                "slurm commands",
                "fail",
                f"{', '.join(missing)} not on the login node's PATH",
                "is this host a Slurm login node? (a module may provide them: set modules, or PATH in "
                "the login shell's start-up files)",
            )
        )
        return out
    extra = [c for c in ("srun", "sacct", "sacctmgr") if not where.get(c)]
    detail = "sbatch, squeue, scancel, sinfo, scontrol" + (f"; no {', '.join(extra)}" if extra else "")
    fix = "attach needs srun" if "srun" in extra else ""
    out.append(SlurmCheck("slurm commands", "warn" if "srun" in extra else "ok", detail, fix))

    version = (s.get("version") or [""])[0].strip()
    m = re.search(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < (22, 5):
        out.append(SlurmCheck("slurm version", "warn", f"{version}: remotedl is tested with 22.05 and newer"))
    elif version:
        out.append(SlurmCheck("slurm version", "ok", version))

    ping = "\n".join(s.get("ping", [])).strip()
    ping_rc = (s.get("ping_rc") or ["1"])[0].strip()
    if ping_rc == "0" and "UP" in ping:
        out.append(SlurmCheck("slurm controller", "ok", ping.splitlines()[0]))
    else:
        out.append(
            SlurmCheck(
                "slurm controller",
                "fail",
                (ping.splitlines() or ["no answer"])[-1],
                "slurmctld does not answer: ask the cluster's admins",
            )
        )

    nodes = parse_sinfo_nodes("\n".join(s.get("nodes", [])))
    with_gpus: dict[str, int] = {}
    for n in nodes:
        for p in n.partitions:
            with_gpus[p] = with_gpus.get(p, 0) + n.gpus
    gpu_parts = {p: g for p, g in with_gpus.items() if g}
    if gpu_parts:
        text = ", ".join(f"{p} ({g} GPUs)" for p, g in sorted(gpu_parts.items()))
        out.append(SlurmCheck("GPU partitions", "ok", text))
    else:
        out.append(
            SlurmCheck(
                "GPU partitions",
                "warn",
                "no partition has GPUs as gres (gpu)",
                "jobs asking for GPUs will be refused; run with --gpus 0, or ask the admins",
            )
        )
    if settings.partition:
        if settings.partition not in with_gpus:
            known = ", ".join(sorted(with_gpus)) or "none"
            out.append(
                SlurmCheck(
                    "partition",
                    "fail",
                    f"partition {settings.partition!r} does not exist (partitions: {known})",
                    "fix partition in [hosts.NAME]",
                )
            )
        elif not with_gpus[settings.partition]:
            out.append(
                SlurmCheck("partition", "warn", f"partition {settings.partition!r} has no GPUs as gres")
            )
        else:
            out.append(
                SlurmCheck("partition", "ok", f"{settings.partition}: {with_gpus[settings.partition]} GPUs")
            )

    test = [x for x in s.get("testonly", []) if x.strip()]
    test_rc = (s.get("testonly_rc") or ["1"])[0].strip()
    last = re.sub(r"^sbatch: ", "", test[-1].strip()) if test else ""
    if test_rc == "0":
        out.append(SlurmCheck("test submission", "ok", f"a 1-GPU job would be accepted: {last}"))
    else:
        out.append(
            SlurmCheck(
                "test submission",
                "fail",
                f"sbatch --test-only refused a 1-GPU job with this host's settings: {sbatch_reason(test)}",
                "check partition, account, qos, time and sbatch_args in [hosts.NAME]",
            )
        )

    sacct_rc = (s.get("sacct_rc") or ["1"])[0].strip()
    sacct_text = " ".join(s.get("sacct", [])).strip()
    if sacct_rc == "0" and "disabled" not in sacct_text:
        out.append(SlurmCheck("accounting", "ok", "sacct answers: finished jobs' states come from it"))
    else:
        out.append(
            SlurmCheck(
                "accounting",
                "skip",
                "sacct does not answer (no accounting database): a finished job's state comes from "
                "what its batch script recorded",
            )
        )

    assoc_rc = (s.get("assoc_rc") or ["1"])[0].strip()
    if assoc_rc != "0":
        out.append(SlurmCheck("account limits", "skip", "sacctmgr does not answer (no accounting database)"))
    else:
        out.extend(_assoc_checks(s.get("assoc", []), s.get("qos", []), settings))

    if "modules" in s or "nomodule" in s:
        if "nomodule" in s:
            out.append(
                SlurmCheck(
                    "modules",
                    "fail",
                    "modules are set for this host but it has no module command "
                    "(Lmod or Environment Modules)",
                    "remove modules from [hosts.NAME]",
                )
            )
        else:
            lines = s.get("modules", [])
            gone = [x.split(" ", 1)[1] for x in lines if x.startswith("missing ")]
            if gone:
                out.append(
                    SlurmCheck(
                        "modules",
                        "fail",
                        f"not available: {', '.join(gone)}",
                        "`module avail` on the login node lists them",
                    )
                )
            else:
                out.append(SlurmCheck("modules", "ok", ", ".join(settings.modules)))
    return out


def _rows(lines: Iterable[str], fields: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for line in lines:
        parts = line.split("|")
        if len(parts) == len(fields):
            rows.append(dict(zip(fields, parts, strict=True)))
    return rows


def _assoc_checks(assoc: Sequence[str], qos: Sequence[str], settings: SlurmSettings) -> list[SlurmCheck]:
    rows = _rows(assoc, ASSOC_FIELDS)
    out: list[SlurmCheck] = []
    if not rows:
        return [SlurmCheck("account", "warn", "sacctmgr lists no association for this user",
                           "ask the admins for an account on the cluster")]  # fmt: skip
    accounts = sorted({r["Account"] for r in rows if r["Account"]})
    if settings.account and settings.account not in accounts:
        out.append(
            SlurmCheck(
                "account",
                "fail",
                f"account {settings.account!r} is not yours (yours: {', '.join(accounts) or 'none'})",
                "fix account in [hosts.NAME]",
            )
        )
    else:
        out.append(SlurmCheck("account", "ok", ", ".join(accounts)))
    allowed = sorted({q for r in rows for q in r["QOS"].split(",") if q})
    if settings.qos and allowed and settings.qos not in allowed:
        out.append(
            SlurmCheck(
                "qos",
                "fail",
                f"QOS {settings.qos!r} is not allowed for you (allowed: {', '.join(allowed)})",
                "fix qos in [hosts.NAME]",
            )
        )
    limits = []
    for r in rows:
        got = [f"{k} {r[k]}" for k in ("GrpTRES", "MaxTRES", "MaxWall", "MaxJobs", "MaxSubmit") if r[k]]
        if got:
            limits.append(f"{r['Account']}{'/' + r['Partition'] if r['Partition'] else ''}: {', '.join(got)}")
    wanted_qos = {settings.qos} if settings.qos else set(allowed)
    for q in _rows(qos, QOS_FIELDS):
        if q["Name"] in wanted_qos:
            got = [f"{k} {q[k]}" for k in QOS_FIELDS[1:] if q[k]]
            if got:
                limits.append(f"QOS {q['Name']}: {', '.join(got)}")
    out.append(SlurmCheck("limits", "ok", "; ".join(limits) if limits else "no limits set"))
    return out
