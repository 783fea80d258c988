"""The data files the batch script reads, the batch script itself, and sbatch's answer.

A multi-node run (``BatchJob.nodes``, `run --nodes N`) is one batch job on N nodes: its batch
step, on the first node, sets the variables every node shares (``NODES_ENV``) and starts the
command once per node with srun (one task per node, labelled ``R: `` in the log); the first
node to fail ends the others and gives the job its exit status."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from remotedl.activate import ACTIVATE
from remotedl.errors import RemoteError, UsageError
from remotedl.ports import PICK_PORT
from remotedl.slurm.settings import _ENV_KEY, BatchJob


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
            str(job.nodes) if job.nodes is not None else "",
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

# A multi-node run (`run --nodes N`): in the batch step, on the allocation's first node (node 0,
# the master), the variables every node shares, exported so that srun hands them to each node:
# the master is the first node of `scontrol show hostnames` at its NodeAddr (where Slurm itself
# reaches it), MASTER_PORT a port free on it now (remotedl.ports; picked here, on the master,
# when the run starts: never at submission, which may be hours earlier), the hostfile (ADDR slots=G) in the
# control directory. The names are those a fleet's run sets (remotedl.multinode.NodePlan.env).
NODES_ENV = (
    r"""
_rdl_nodes_env() {
  _rdl_names=$(scontrol show hostnames "${SLURM_JOB_NODELIST-}") && [ -n "$_rdl_names" ] || {
    echo "remotedl: cannot tell the run's nodes (scontrol show hostnames \"\$SLURM_JOB_NODELIST\")" >&2
    return 1; }
  _rdl_table=$(scontrol --oneliner show node "$SLURM_JOB_NODELIST" 2>/dev/null | awk '{
    n = ""; a = ""
    for (i = 1; i <= NF; i++) {
      if ($i ~ /^NodeName=/) n = substr($i, 10)
      if ($i ~ /^NodeAddr=/) a = substr($i, 10)
    }
    if (n != "") print n, a }')
  _rdl_slots=$_rdl_gpus; [ "$_rdl_slots" -gt 0 ] 2>/dev/null || _rdl_slots=1
  _rdl_master= _rdl_addrs= _rdl_count=0
  : > "$_rdl_ctl/hostfile.tmp" || return 1
  for _rdl_h in $_rdl_names; do
    _rdl_a=$(printf '%s\n' "$_rdl_table" | awk -v h="$_rdl_h" '$1 == h && $2 != "" { print $2; exit }')
    [ -n "$_rdl_a" ] || _rdl_a=$_rdl_h
    [ -n "$_rdl_master" ] || _rdl_master=$_rdl_a
    _rdl_addrs=${_rdl_addrs:+$_rdl_addrs,}$_rdl_a
    _rdl_count=$((_rdl_count + 1))
    printf '%s slots=%s\n' "$_rdl_a" "$_rdl_slots" >> "$_rdl_ctl/hostfile.tmp" || return 1
  done
  mv -f "$_rdl_ctl/hostfile.tmp" "$_rdl_ctl/hostfile" || return 1
  rm -f "$_rdl_ctl"/node-*.exit
  if [ "$_rdl_count" != "$_rdl_nodes" ]; then
    echo "remotedl: the allocation has $_rdl_count nodes ($SLURM_JOB_NODELIST), not $_rdl_nodes" >&2
    return 1
  fi
  _rdl_port=
  _rdl_py=$(command -v python3 || command -v python) && _rdl_port=$("$_rdl_py" -c '"""
    + PICK_PORT
    + r"""' 2>/dev/null)
  case $_rdl_port in ''|*[!0-9]*) _rdl_port=$((10000 + ${SLURM_JOB_ID:-0} % 20000));; esac
  MASTER_ADDR=$_rdl_master MASTER_PORT=$_rdl_port NNODES=$_rdl_nodes
  WORLD_SIZE=$((_rdl_nodes * _rdl_slots))
  REMOTEDL_RUN_ID=slurm-${SLURM_JOB_ID:-$_rdl_id} REMOTEDL_NUM_NODES=$_rdl_nodes
  REMOTEDL_NODE_ADDRS=$_rdl_addrs REMOTEDL_MASTER_ADDR=$_rdl_master REMOTEDL_MASTER_PORT=$_rdl_port
  REMOTEDL_HOSTFILE=$_rdl_ctl/hostfile
  PET_NNODES=$_rdl_nodes PET_MASTER_ADDR=$_rdl_master PET_MASTER_PORT=$_rdl_port
  export MASTER_ADDR MASTER_PORT NNODES WORLD_SIZE REMOTEDL_RUN_ID REMOTEDL_NUM_NODES \
    REMOTEDL_NODE_ADDRS REMOTEDL_MASTER_ADDR REMOTEDL_MASTER_PORT REMOTEDL_HOSTFILE \
    PET_NNODES PET_MASTER_ADDR PET_MASTER_PORT
  if [ "$_rdl_gpus" -gt 0 ] 2>/dev/null; then
    REMOTEDL_GPUS_PER_NODE=$_rdl_gpus PET_NPROC_PER_NODE=$_rdl_gpus
    export REMOTEDL_GPUS_PER_NODE PET_NPROC_PER_NODE
  fi
  # each node's task gets the job's CPUs per task (srun of some Slurm versions does not inherit them)
  if [ -n "${SLURM_CPUS_PER_TASK-}" ] && [ -z "${SRUN_CPUS_PER_TASK-}" ]; then
    SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK; export SRUN_CPUS_PER_TASK
  fi
  echo "remotedl: run across $_rdl_nodes nodes ($_rdl_addrs), master $_rdl_master:$_rdl_port" >&2
}
# What srun runs on each node ("$1": the command, "$2": the control directory): the node's rank,
# then the command; a node whose command fails records its status and when (node-R.exit).
_rdl_node_task='_rdl_c=$1 _rdl_d=$2; shift 2
NODE_RANK=${SLURM_NODEID:?} REMOTEDL_NODE_RANK=$SLURM_NODEID PET_NODE_RANK=$SLURM_NODEID
export NODE_RANK REMOTEDL_NODE_RANK PET_NODE_RANK
( eval "$_rdl_c" )
_rdl_s=$?
[ "$_rdl_s" = 0 ] ||
  printf "%s %s %s\n" "$_rdl_s" "$(date +%s)" "${SLURMD_NODENAME:-?}" > "$_rdl_d/node-$SLURM_NODEID.exit"
exit "$_rdl_s"'
# srun ends with the highest status of the nodes: a node ended because another failed says 143.
# The run's status is the first failed node's own (its node-R.exit), said in one line. A node
# that srun ended (SIGTERM: 143) may record its end within the same second as the one that
# failed: a status other than 143 comes first, then the earliest, then the lowest rank.
_rdl_first_failed() {
  _rdl_first=$(for _rdl_f in "$_rdl_ctl"/node-*.exit; do
      [ -f "$_rdl_f" ] || continue
      _rdl_r=${_rdl_f##*/node-}; _rdl_r=${_rdl_r%.exit}
      read -r _rdl_c _rdl_t _rdl_h < "$_rdl_f" || continue
      _rdl_p=0; [ "$_rdl_c" = 143 ] && _rdl_p=1
      echo "$_rdl_p $_rdl_t $_rdl_r $_rdl_c $_rdl_h"
    done | sort -n -k1,1 -k2,2 -k3,3 | head -n 1)
  [ -n "$_rdl_first" ] || return 0
  set -- $_rdl_first
  echo "remotedl: node $3 ($5) exited with status $4 first; srun ended the other nodes" >&2
  _rdl_s=$4
}
"""
)

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
_rdl_nodes=${10-}
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
"""
    + NODES_ENV
    + r"""
if [ -n "$_rdl_nodes" ]; then
  _rdl_nodes_env || _rdl_end 125
fi
trap '_rdl_term=1' TERM
if [ -n "$_rdl_nodes" ]; then
  # the command once per node, each with its rank; one node failing ends the others
  srun --nodes="$_rdl_nodes" --ntasks="$_rdl_nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    --label "${BASH:-/bin/sh}" -c "$_rdl_node_task" remotedl-node "$_rdl_cmd" "$_rdl_ctl"
  _rdl_s=$?
  [ "$_rdl_s" = 0 ] || _rdl_first_failed
  _rdl_end "$_rdl_s"
else
  (
    unset _rdl_id _rdl_jd _rdl_rd _rdl_conda _rdl_setup _rdl_mods _rdl_gpus _rdl_nodes _rdl_term
    unset _rdl_n _rdl_l _rdl_v _rdl_m _rdl_f _rdl_b _rdl_cb
    eval "$_rdl_cmd"
  )
fi
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
