"""The jobs on the box: list, get, kill, the jobs running in a tree, pull sources, rm/prune, and
the durations and ages their flags take."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.agent.client import AgentClient
from remotedl.errors import ConfigError, RemotedlError, RemoteError, UsageError
from remotedl.jobs.start import Warn, _record, _warnings
from remotedl.schema import (
    GetRequest,
    IntreeRequest,
    JobRecord,
    KillRequest,
    ListRequest,
    LocateRequest,
    PruneRequest,
    RmRequest,
)
from remotedl.snapshot import DEFAULT_MAX_FILE
from remotedl.typecheck import SchemaError, check_type


def list_jobs(client: AgentClient, *, all_jobs: bool = False, warn: Warn | None = None) -> list[JobRecord]:
    answer = client.call(ListRequest(all=all_jobs).to_dict())
    _warnings(answer, warn)
    jobs = answer.get("jobs")
    if not isinstance(jobs, list):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent no job list")
    return [_record(r, client.spec) for r in jobs]


def list_job_dicts(
    client: AgentClient, *, all_jobs: bool = False, warn: Warn | None = None
) -> list[dict[str, Any]]:
    """``list_jobs`` as JSON data (each ``JobRecord.to_dict()``), checked the same way but never
    built into records: what ``jobs --json`` prints."""
    answer = client.call(ListRequest(all=all_jobs).to_dict())
    _warnings(answer, warn)
    jobs = answer.get("jobs")
    if not isinstance(jobs, list):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent no job list")
    try:
        return [JobRecord.json_dict(r) for r in jobs]
    except SchemaError as e:
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent a bad job record ({e})") from None


def jobs_with_outputs(
    client: AgentClient, project: str, ids: Sequence[int] = (), *, after: int = 0
) -> tuple[list[JobRecord], int]:
    """One listing: the jobs of ``project`` (its remote_dir) that have outputs, started from
    any clone, with ids above ``after``, and the jobs ``ids`` (a job the box no longer has is
    not in it); and the id up to which all the project's jobs with outputs have ended (the
    next listing's ``after``)."""
    answer = client.call(ListRequest(project=project, ids=list(ids), after=after).to_dict())
    jobs = answer.get("jobs")
    if not isinstance(jobs, list):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent no job list")
    upto = answer.get("upto")
    return [_record(r, client.spec) for r in jobs], (upto if isinstance(upto, int) else after)


def get_job(
    client: AgentClient, job: str | None, *, project: str | None = None, warn: Warn | None = None
) -> JobRecord:
    """A job by id or name; ``None``: the latest job of ``project`` (its remote_dir)."""
    answer = client.call(GetRequest(job=job, project=project).to_dict())
    _warnings(answer, warn)
    return _record(answer.get("job"), client.spec)


def kill(
    client: AgentClient,
    job: str | None,
    *,
    grace: float = 10.0,
    project: str | None = None,
    warn: Warn | None = None,
) -> JobRecord:
    """Stop a job (``None``: the latest running job of ``project``). A job that is not
    running is an error (exit 1), saying so."""
    answer = client.call(KillRequest(job=job, project=project, grace=grace).to_dict())
    _warnings(answer, warn)
    return _record(answer.get("job"), client.spec)


def _in_tree(client: AgentClient, remote_dir: str) -> tuple[list[JobRecord], str | None]:
    answer = client.call(IntreeRequest(remote_dir=remote_dir).to_dict())
    jobs = answer.get("jobs")
    head = answer.get("head")
    if not isinstance(jobs, list):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent no job list")
    return [_record(r, client.spec) for r in jobs], head if isinstance(head, str) else None


def running_in_tree(client: AgentClient, remote_dir: str) -> list[JobRecord]:
    """Active jobs that run in the work tree ``remote_dir`` itself (``isolate = false``): a push
    there changes their files."""
    return _in_tree(client, remote_dir)[0]


def push_conflicts(
    client: AgentClient,
    project_root: Path,
    remote_dir: str,
    *,
    data: Sequence[str] = (),
    max_snapshot_file: int = DEFAULT_MAX_FILE,
) -> list[JobRecord]:
    """The jobs running in the work tree ``remote_dir`` whose files a push of the local work
    (HEAD plus uncommitted changes, as push takes it with ``data`` and ``max_snapshot_file``)
    would change; [] when none, or when the code is the same."""
    running, head = _in_tree(client, remote_dir)
    if not running:
        return []
    from remotedl.sync import code_snapshot

    with contextlib.suppress(RemotedlError):
        if code_snapshot(project_root, data=data, max_snapshot_file=max_snapshot_file).commit == head:
            return []
    return running


@dataclass
class PullSource:
    """Where one path to pull lives on the box."""

    path: str  # relative, as asked
    dir: str  # the absolute box directory it is relative to
    job: int | None  # the job whose directory has it (None: the work tree)
    name: str | None = None
    shared: bool = False  # a data/shared path of that job: it lives in the work tree
    links: list[str] = field(default_factory=list)  # the job's data/shared links (not pulled)


def locate(
    client: AgentClient,
    remote_dir: str,
    paths: Sequence[str],
    *,
    job: str | None = None,
    tree: bool = False,
) -> list[PullSource]:
    """For each path: this project's latest job that has it (or ``job``'s directory, or the
    work tree with ``tree``)."""
    answer = client.call(
        LocateRequest(remote_dir=remote_dir, paths=list(paths), job=job, tree=tree).to_dict()
    )
    raw = answer.get("sources")
    if not isinstance(raw, list) or len(raw) != len(paths):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent a bad answer (sources)")
    out = []
    for s in raw:
        try:
            out.append(
                PullSource(
                    path=check_type(s.get("path"), str, "path"),
                    dir=check_type(s.get("dir"), str, "dir"),
                    job=check_type(s.get("job"), int | None, "job"),
                    name=check_type(s.get("name"), str | None, "name"),
                    shared=bool(s.get("shared")),
                    links=check_type(s.get("links") or [], list[str], "links"),
                )
            )
        except (SchemaError, AttributeError) as e:
            raise RemoteError(f"the remotedl agent on {client.spec.alias} sent a bad answer ({e})") from None
    return out


@dataclass
class RemovedJob:
    id: int
    name: str | None
    status: str
    bytes: int
    dir: str | None


@dataclass
class Removal:
    removed: list[RemovedJob] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    bytes: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _removal(client: AgentClient, answer: Mapping[str, Any], dry_run: bool) -> Removal:
    try:
        removed = [
            RemovedJob(
                id=check_type(r.get("id"), int, "id"),
                name=check_type(r.get("name"), str | None, "name"),
                status=str(r.get("status")),
                bytes=check_type(r.get("bytes"), int, "bytes"),
                dir=check_type(r.get("dir"), str | None, "dir"),
            )
            for r in check_type(answer.get("removed"), list, "removed")
        ]
        refused = [str(x) for x in check_type(answer.get("refused"), list, "refused")]
    except (SchemaError, AttributeError) as e:
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent a bad answer ({e})") from None
    return Removal(removed, refused, sum(r.bytes for r in removed), dry_run)


def remove(client: AgentClient, ids: Sequence[int], *, dry_run: bool = False) -> Removal:
    """Remove ended jobs: record, log and job directory (its git worktree)."""
    return _removal(client, client.call(RmRequest(ids=list(ids), dry_run=dry_run).to_dict()), dry_run)


def prune(client: AgentClient, remote_dir: str, *, older_than: float = 0.0, dry_run: bool = False) -> Removal:
    """Remove this project's jobs that ended more than ``older_than`` seconds ago."""
    request = PruneRequest(remote_dir=remote_dir, older_than=older_than, dry_run=dry_run).to_dict()
    return _removal(client, client.call(request), dry_run)


_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$")


def parse_duration(text: str | float | int | None, what: str = "stall_after") -> float | None:
    """``30s``, ``15m``, ``1h``, ``2d`` or a number of seconds -> seconds; ``0``/``off``/``false``: None."""
    if text is None:
        return None
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text) if text > 0 else None
    value = str(text).strip().lower()
    if value in ("", "0", "off", "false", "no", "never"):
        return None
    m = _DURATION.match(value)
    if not m:
        raise ConfigError(f"{what} = {text!r}: give a duration like 15m, 90s, 1h (or off)")
    unit = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]
    seconds = float(m.group(1)) * unit
    return seconds if seconds > 0 else None


def parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d``, ``2w`` (a bare number is days) -> seconds."""
    m = _AGE.match(text)
    if not m:
        raise UsageError(f"--older-than {text!r}: give an age like 7d, 12h, 30m")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "": 86400}[m.group(2)]
    return float(m.group(1)) * unit
