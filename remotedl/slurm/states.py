"""Slurm's job states and the parsers of squeue, scontrol and sacct output."""

from __future__ import annotations

import re
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.schema import Status

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
