"""Client side of jobs: run, list, logs (with reconnect), kill, attach, show, pull sources,
rm/prune, and the provenance kept in the local repository.

The box is the source of truth: every answer comes from the agent's records under
``~/.remotedl`` on the box, one exec per operation. Without an id, a command means this
project's latest job (records carry the project's ``remote_dir``), never another project's.

The package, by concern: ``start`` (the command, the environment spec, ``start``), ``manage``
(list, get, kill, pull sources, rm/prune, durations), ``provenance`` (the job's commit kept
here, its snapshot's files, ``diff``) and ``logs`` (the log with reconnect, ``attach``). Every
public name is here too.
"""

from __future__ import annotations

from remotedl.jobs.logs import (
    LogState,
    _marks,
    attach_argv,
    stream_logs,
)
from remotedl.jobs.manage import (
    PullSource,
    Removal,
    RemovedJob,
    get_job,
    jobs_with_outputs,
    kill,
    list_job_dicts,
    list_jobs,
    locate,
    parse_age,
    parse_duration,
    prune,
    push_conflicts,
    remove,
    running_in_tree,
)
from remotedl.jobs.provenance import (
    diff,
    fetch_job_commit,
    job_ref,
    keep_commit,
    snapshot_files,
)
from remotedl.jobs.start import (
    SCRIPT_SUFFIXES,
    EnvOutOfDate,
    EnvSpec,
    Warn,
    build_command,
    start,
)
from remotedl.schema import (
    JobRecord,
)

__all__ = [
    "SCRIPT_SUFFIXES",
    "EnvOutOfDate",
    "EnvSpec",
    "JobRecord",
    "LogState",
    "PullSource",
    "Removal",
    "RemovedJob",
    "Warn",
    "_marks",
    "attach_argv",
    "build_command",
    "diff",
    "fetch_job_commit",
    "get_job",
    "job_ref",
    "jobs_with_outputs",
    "keep_commit",
    "kill",
    "list_job_dicts",
    "list_jobs",
    "locate",
    "parse_age",
    "parse_duration",
    "prune",
    "push_conflicts",
    "remove",
    "running_in_tree",
    "snapshot_files",
    "start",
    "stream_logs",
]
