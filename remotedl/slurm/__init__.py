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

The package, by concern: ``settings`` (a host's Slurm settings and sbatch's option words),
``script`` (the data files and the batch script), ``states`` (Slurm's states and the parsers of
its commands' output), ``jupyter`` (Jupyter as a batch job), ``cluster`` (sinfo's nodes and
partitions) and ``here`` (what the agent runs on the login node). Every name is here too.
"""

from __future__ import annotations

from remotedl.slurm.cluster import (
    SINFO_FIELDS,
    SINFO_FORMAT,
    ClusterStatus,
    SlurmNode,
    SlurmPartition,
    parse_partitions,
    parse_sinfo_nodes,
)
from remotedl.slurm.here import (
    CONTROL_FILES,
    cancel_here,
    queue_here,
    state_here,
    submit_here,
)
from remotedl.slurm.jupyter import (
    JUPYTER_COMMAND,
    NODE_ADDRESS,
)
from remotedl.slurm.script import (
    BATCH_SCRIPT,
    MODULE_INIT,
    NODES_ENV,
    PARAMS_VERSION,
    Submitted,
    batch_params,
    decode_values,
    encode_values,
    env_file,
    parse_sbatch,
    sbatch_reason,
    submit_error,
)
from remotedl.slurm.settings import (
    SETTING_KEYS,
    BatchJob,
    GpuOption,
    SlurmSettings,
    check_sbatch_args,
    check_time,
    host_settings,
    job_name,
    sbatch_options,
    settings_request,
)
from remotedl.slurm.states import (
    ENDED_STATES,
    SACCT_FIELDS,
    SQUEUE_FIELDS,
    SQUEUE_FORMAT,
    JobRef,
    OwnRecord,
    SlurmJob,
    SlurmStateName,
    gres_count,
    gres_indices,
    job_from_own,
    job_from_scontrol,
    parse_exit_code,
    parse_own,
    parse_sacct,
    parse_scontrol,
    parse_squeue,
    parse_states,
    state_of,
    to_status,
)

__all__ = [
    "BATCH_SCRIPT",
    "CONTROL_FILES",
    "ENDED_STATES",
    "JUPYTER_COMMAND",
    "MODULE_INIT",
    "NODES_ENV",
    "NODE_ADDRESS",
    "PARAMS_VERSION",
    "SACCT_FIELDS",
    "SETTING_KEYS",
    "SINFO_FIELDS",
    "SINFO_FORMAT",
    "SQUEUE_FIELDS",
    "SQUEUE_FORMAT",
    "BatchJob",
    "ClusterStatus",
    "GpuOption",
    "JobRef",
    "OwnRecord",
    "SlurmJob",
    "SlurmNode",
    "SlurmPartition",
    "SlurmSettings",
    "SlurmStateName",
    "Submitted",
    "batch_params",
    "cancel_here",
    "check_sbatch_args",
    "check_time",
    "decode_values",
    "encode_values",
    "env_file",
    "gres_count",
    "gres_indices",
    "host_settings",
    "job_from_own",
    "job_from_scontrol",
    "job_name",
    "parse_exit_code",
    "parse_own",
    "parse_partitions",
    "parse_sacct",
    "parse_sbatch",
    "parse_scontrol",
    "parse_sinfo_nodes",
    "parse_squeue",
    "parse_states",
    "queue_here",
    "sbatch_options",
    "sbatch_reason",
    "settings_request",
    "state_here",
    "state_of",
    "submit_error",
    "submit_here",
    "to_status",
]
