"""Client side of jobs: run, list, logs (with reconnect), kill, attach, show, pull sources,
rm/prune, and the provenance kept in the local repository.

The box is the source of truth: every answer comes from the agent's records under
``~/.remotedl`` on the box, one exec per operation. Without an id, a command means this
project's latest job (records carry the project's ``remote_dir``), never another project's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl import proc
from remotedl.agent.client import AgentClient, error_from
from remotedl.errors import ConfigError, RemotedlError, RemoteError, UsageError
from remotedl.schema import (
    AGENT_MISSING,
    MARK_PREFIX,
    GetRequest,
    IntreeRequest,
    JobRecord,
    KillRequest,
    ListRequest,
    LocateRequest,
    LogsRequest,
    PruneRequest,
    RmRequest,
    SchemaError,
    StartRequest,
    check_type,
    parse_mark,
)
from remotedl.snapshot import DEFAULT_MAX_FILE
from remotedl.ssh.channel import Box, NoFrame, box_key, no_base64
from remotedl.ssh.openssh import login_shell_safe, openssh_failure, ssh_argv
from remotedl.ssh.resolve import HostSpec

__all__ = [
    "EnvOutOfDate",
    "EnvSpec",
    "JobRecord",
    "build_command",
    "get_job",
    "kill",
    "list_jobs",
    "locate",
    "prune",
    "remove",
    "running_in_tree",
    "start",
    "stream_logs",
]

SCRIPT_SUFFIXES = (".sh", ".bash", ".py")


def _record(data: Any, spec: HostSpec) -> JobRecord:
    try:
        return JobRecord.from_dict(data)
    except SchemaError as e:
        raise RemoteError(f"the remotedl agent on {spec.alias} sent a bad job record ({e})") from None


def build_command(
    argv: Sequence[str], project_root: Path | None, *, must_exist: bool = True
) -> tuple[str, str | None]:
    """(shell command line, script path relative to the work tree or None).

    A first word that names a file in the project is that script, whatever its name holds
    (spaces, quotes). Else one word with spaces or shell syntax is a command line as typed;
    otherwise the words are quoted one by one, so arguments arrive exactly as given. A script in
    the project is run as ./script when executable, else through python3 or bash by its suffix.
    A script that is not here is an error when ``must_exist`` (we are about to push), else the
    box must have it."""
    if not argv:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    first, rest = argv[0], list(argv[1:])
    local = project_root / first if project_root is not None and not os.path.isabs(first) else None
    in_project = local is not None and local.is_file()
    if not in_project and len(argv) == 1 and any(c in first for c in " \t;|&$<>()`'\"*?"):
        return first, None
    if not in_project and (
        not (first.endswith(SCRIPT_SUFFIXES) or first.startswith("./")) or os.path.isabs(first)
    ):
        return shlex.join([first, *rest]), None
    script = os.path.normpath(first)
    if local is not None and in_project:
        if os.access(local, os.X_OK):
            first = first if "/" in first else "./" + first
        else:
            rest = [first, *rest]
            first = "python3" if first.endswith(".py") else "bash"
    elif must_exist:
        raise UsageError(
            f"no such script: {local or first}", hint="check the name; scripts run from the project root"
        )
    else:
        first = first if "/" in first else "./" + first
    return shlex.join([first, *rest]), script


Warn = Callable[[str], None]


def _warnings(answer: Mapping[str, Any], warn: Warn | None) -> None:
    """Pass the agent's warnings (damaged records it skipped, ...) on; box text, bounded."""
    found = answer.get("warnings")
    if warn is None or not isinstance(found, list):
        return
    for w in found[:20]:
        if isinstance(w, str):
            warn(w[:500])


@dataclass
class EnvSpec:
    """How the box makes and enters the project's environment (remotedl.toml)."""

    conda: str | None = None  # a conda environment by name
    env_setup: str | None = None  # a shell line run before the job, in its shell
    setup_cmd: str | None = None  # replaces the built-in environment sync

    @classmethod
    def from_settings(cls, settings: Any) -> EnvSpec:
        return cls(
            conda=settings.get("conda") or None,
            env_setup=settings.get("env_setup") or None,
            setup_cmd=settings.get("setup_cmd") or None,
        )

    def to_request(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}


class EnvOutOfDate(RemotedlError):
    """The project's requirements changed since the box's environment was last synced: sync
    (``envsync.sync``), then start again."""

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(f"the environment on the box is out of date ({plan.get('kind')})")
        self.plan = plan


def start(
    client: AgentClient,
    *,
    command: str,
    remote_dir: str,
    script: str | None = None,
    gpus: str | list[int] | None = None,
    count: int | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    queue: bool = False,
    force: bool = False,
    git_commit: str | None = None,
    snapshot: bool = False,
    git_head: str | None = None,
    snapshot_files: Sequence[str] = (),
    isolate: bool = True,
    data: Sequence[str] = (),
    shared: Sequence[str] = (),
    environment: EnvSpec | None = None,
    env_check: bool = True,
    notify: Sequence[str] = (),
    host_alias: str | None = None,
    stall_after: float | None = None,
    warn: Warn | None = None,
    slurm: Mapping[str, Any] | None = None,
    image: str | None = None,
    container: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    trackers: bool = False,
    project_id: str | None = None,
) -> JobRecord:
    """Start a job; it runs in its own checkout of ``git_commit`` (``None``: the box tree's
    HEAD) under ``remote_dir`` unless ``isolate`` is off. Answers once the job's runner
    recorded itself on the box. Raises ``EnvOutOfDate`` (nothing started) when ``env_check``
    finds the project's requirements changed since the environment was synced.

    ``slurm`` (the host's Slurm settings: partition, account, qos, time, constraint,
    sbatch_args, modules) makes the box a Slurm login node: the job is submitted with sbatch
    (``count`` GPUs, Slurm picks them) and the record carries its Slurm id.

    ``image`` runs the command in that container image on the box (``container``: the engine,
    ``gpus``, the way its GPUs enter the container, and ``args`` for ``docker run``)."""
    request = StartRequest(
        command=command,
        remote_dir=remote_dir,
        script=script,
        gpus=gpus if gpus is not None else "auto",
        count=count,
        env=dict(env or {}),
        name=name,
        queue=queue,
        force=force,
        git_commit=git_commit,
        git_head=git_head,
        snapshot=snapshot,
        snapshot_files=list(snapshot_files),
        isolate=isolate,
        data=list(data),
        shared=list(shared),
        environment=dict((environment or EnvSpec()).to_request()),
        env_check=env_check,
        # Sent from the box at the job's events; URLs travel on stdin like --env values.
        notify=list(notify),
        host_alias=host_alias,
        stall_after=stall_after,
        scheduler="slurm" if slurm is not None else None,
        slurm=dict(slurm) if slurm is not None else None,
        image=image,
        container=dict(container) if container is not None else None,
        # In the record: any laptop of the project brings them home; the box sets the trackers'.
        outputs=list(outputs),
        trackers=trackers,
        project_id=project_id,
    )
    answer = client.call(request.to_dict())
    _warnings(answer, warn)
    plan = answer.get("envsync")
    if isinstance(plan, dict):
        raise EnvOutOfDate(plan)
    return _record(answer.get("job"), client.spec)


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


# ------------------------------------------------------------------ provenance on the laptop


def snapshot_files(root: Path, head: str | None, commit: str | None, limit: int = 1000) -> list[str]:
    """The files a snapshot commit changed against the HEAD it was made on."""
    if not commit or not head or commit == head:
        return []
    from remotedl.snapshot import snapshot_changes

    return snapshot_changes(root, head, commit)[:limit]


_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def job_ref(alias: str, job_id: int) -> str:
    """The local ref that keeps a job's commit reachable: refs/remotedl/jobs/<host>/<id>."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", alias).strip("_") or "box"
    return f"refs/remotedl/jobs/{host}/{job_id}"


def keep_commit(root: Path, alias: str, rec: JobRecord) -> str | None:
    """Point the job's ref at its commit, so `git show` works after `git gc`; the ref, or
    None when this repository does not have the commit (made on another laptop)."""
    if not rec.git_commit or not _COMMIT_ID.fullmatch(rec.git_commit):
        return None
    ref = job_ref(alias, rec.id)
    # update-ref refuses an object the repository does not have: one git call, not two
    r = proc.run(["git", "-C", str(root), "update-ref", ref, rec.git_commit], check=False)
    return ref if r.returncode == 0 else None


# "$1": the box's work tree, "$2": a commit there; then commits the laptop has. Prints "@@pack"
# and a thin pack of "$2"'s objects over those of the laptop's commits the box has too (the
# laptop completes it with `index-pack --fix-thin`), or "@@missing". Reads only.
_PACK_JOB_COMMIT = r"""
cd -- "$1" 2>/dev/null && git cat-file -e "$2^{commit}" 2>/dev/null || { echo "@@missing"; exit 0; }
want=$2; shift 2
echo "@@pack"
{ echo "$want"; for b; do git cat-file -e "$b^{commit}" 2>/dev/null && echo "^$b"; done; } |
  git pack-objects --stdout --revs --thin --delta-base-offset -q
"""


def fetch_job_commit(box: Box, root: Path, rec: JobRecord) -> bool:
    """Bring the job's commit (made by another laptop's push) from the box's repository into
    this one's objects; False when the box no longer has it. One round trip, over the framed
    channel (start-up noise cannot break it, as it would `git fetch`)."""
    commit = rec.git_commit
    if not commit or not _COMMIT_ID.fullmatch(commit):
        return False
    r = proc.run(
        ["git", "-C", str(root), "for-each-ref", "--sort=-committerdate", "--count=32",
         "--format=%(objectname)", "refs/heads", "refs/remotedl", "refs/remotes"],
        check=False,
    )  # fmt: skip
    bases = list(dict.fromkeys(r.stdout.split())) if r.returncode == 0 else []
    stream = box.start(_PACK_JOB_COMMIT, rec.project_dir, commit, *bases)
    try:
        head = b""
        while b"\n" not in head:
            chunk = stream.read()
            if not chunk:
                break
            head += chunk
        mark, _, rest = head.partition(b"\n")
        if mark != b"@@pack":
            return False
        index = proc.popen(
            ["git", "-C", str(root), "index-pack", "--stdin", "--fix-thin"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=False,
        )  # fmt: skip
        assert index.stdin is not None
        assert index.stderr is not None
        try:
            index.stdin.write(rest)
            while chunk := stream.read():
                index.stdin.write(chunk)
        except BrokenPipeError:
            pass
        index.stdin.close()
        err = index.stderr.read().decode(errors="replace").strip()
        if index.wait() != 0:
            raise RemotedlError(f"could not store job {rec.id}'s commit from {box.spec.alias}: {err}")
    except NoFrame:
        raise openssh_failure(box.spec, stream.stderr_text()) from None
    finally:
        stream.kill()
        stream.wait()
    return True


def diff(
    root: Path,
    box: Box,
    rec: JobRecord,
    *,
    stat: bool = False,
    color: bool = False,
    data: Sequence[str] = (),
    max_snapshot_file: int = DEFAULT_MAX_FILE,
) -> str:
    """The job's code against the local work tree, as text: a diff from the job's commit to
    a snapshot of the work tree as it is now, made as push makes it (tracked changes and
    untracked files that .gitignore does not exclude, less the ``data`` paths and untracked
    files over ``max_snapshot_file``). A commit another laptop pushed is fetched from the box
    first."""
    from remotedl.sync import code_snapshot

    if not rec.git_commit:
        raise UsageError(f"job {rec.id} has no commit recorded (its tree on the box is not a git repository)")
    commit = rec.git_commit
    alias = box.spec.alias
    # The job's ref, which is also the test whether this repository has the commit.
    if keep_commit(root, alias, rec) is None and (
        not fetch_job_commit(box, root, rec) or keep_commit(root, alias, rec) is None
    ):
        raise RemotedlError(
            f"job {rec.id}'s commit {commit[:10]} is neither in this repository nor on {alias} any more",
            hint="it was pushed from another clone; fetch it from there",
        )
    now = code_snapshot(root, data=data, max_snapshot_file=max_snapshot_file).commit or commit
    argv = ["git", "-C", str(root), "diff", f"--color={'always' if color else 'never'}"]
    argv += ["--stat"] if stat else []
    r = proc.run([*argv, commit, now, "--"], check=False)
    if r.returncode != 0:
        raise RemotedlError(f"git diff failed: {r.stderr.strip()}")
    return r.stdout


@dataclass
class LogState:
    job_id: int | None = None
    offset: int = 0
    reconnects: int = 0
    warned: bool = False


def stream_logs(
    client: AgentClient,
    job: str | None,
    write: Callable[[bytes], None],
    *,
    follow: bool = False,
    lines: int | None = None,
    reconnect_for: float = 300.0,
    on_reconnect: Callable[[int], None] | None = None,
    state: LogState | None = None,
    project: str | None = None,
    warn: Warn | None = None,
    out_fd: int | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
) -> JobRecord:
    """Copy the job's log to ``write``. Not following, with ``out_fd`` (where ``write`` goes,
    flushed), the bytes after the first chunk move to it in the kernel. Following, a dropped
    connection is re-made and the log resumes at the byte offset reached: no byte lost, none
    repeated. Each outage may last ``reconnect_for`` seconds: the window, the back-off between
    attempts (0.2 s doubling to 5 s) and the attempt count ``on_reconnect`` hears start again
    after every successful reconnect. ``on_state`` hears a Slurm job's state as it changes (e.g.
    ``{"state": "PENDING (Resources)", ...}`` while it waits), as the agent says it."""
    spec = client.spec
    on_line = None
    if on_state is not None:
        listener = on_state

        def on_line(line: str) -> None:
            mark = parse_mark(line)
            if mark is not None and mark[0] == "state":
                listener(mark[1])

    st = state or LogState()
    down_since: float | None = None
    attempt = 0  # reconnect attempts in this outage: the back-off and the count start over
    while True:
        request = LogsRequest(
            job=st.job_id if st.job_id is not None else job,
            follow=follow,
            offset=st.offset,
            project=project,
            lines=lines if st.job_id is None else None,
        ).to_dict()
        p = client.stream(request, on_line=on_line)
        got_start = False
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
                if not got_start:
                    # stdout bytes only come after the start mark was written; wait for it
                    _wait_for(p.stderr_lines, "start", 5)
                    got_start = True
                    down_since, attempt = None, 0  # connected again: a later cut starts afresh
                    _take_start(st, _marks(p.stderr_lines), warn)
                write(chunk)
                st.offset += len(chunk)
                if out_fd is not None and not follow:
                    while moved := p.copy_to(out_fd):
                        st.offset += moved
                    break
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        if not framed and p.inline and no_base64(p.stderr_text()):
            Box.no_base64[box_key(spec)] = True  # on stdin from now on
            continue
        marks = _marks(p.stderr_lines)
        if not got_start and "start" in marks:
            down_since, attempt = None, 0
            _take_start(st, marks, warn)
        if "end" in marks:
            return _record(marks["end"].get("job"), spec)
        if "error" in marks:
            _warnings(marks["error"], warn)
            raise error_from(marks["error"])
        if code == AGENT_MISSING:
            client.upload()
            continue
        err_text = p.stderr_text()
        if (code == 255 or not framed) and follow:
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_for:
                raise openssh_failure(spec, err_text)
            st.reconnects += 1
            attempt += 1
            if on_reconnect is not None:
                on_reconnect(attempt)
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
            continue
        if code == 255 or not framed:
            raise openssh_failure(spec, err_text)
        lines_out = [x for x in p.stderr_lines if not x.startswith(MARK_PREFIX)]
        raise RemoteError(f"reading the log failed: {(lines_out or ['exit ' + str(code)])[-1]}")


def _marks(lines: list[str]) -> dict[str, Any]:
    marks: dict[str, Any] = {}
    for line in list(lines):
        mark = parse_mark(line)
        if mark is not None and mark[0] != "state":
            marks[mark[0]] = mark[1]
    return marks


def _take_start(st: LogState, marks: dict[str, Any], warn: Warn | None = None) -> None:
    start = marks.get("start")
    if start is not None and not st.warned:
        st.warned = True
        _warnings(start, warn)
    if start is not None and st.job_id is None:
        with contextlib.suppress(TypeError, ValueError):
            st.job_id = int(start["job"])
            st.offset = int(start["offset"])


def _wait_for(lines: list[str], key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while key not in _marks(lines) and time.monotonic() < deadline:
        time.sleep(0.001)


def attach_argv(spec: HostSpec, record: JobRecord) -> list[str]:
    """ssh with a terminal into the job: its tmux session, or on a Slurm login node an
    interactive shell in its allocation (``srun --overlap --pty``). The command on the box is
    the job's runtime's (``agent/runtimes``: one definition for each kind of job)."""
    from remotedl.agent import runtimes
    from remotedl.agent.store import AgentError

    if record.scheduler == "slurm" and (not record.slurm_id or record.status != "running"):
        raise UsageError(
            f"job {record.id} is {record.state}: there is no allocation to attach to yet"
            if record.status == "queued"
            else f"job {record.id} is {record.state}: nothing to attach to",
            hint=f"`remotedl logs -f {record.id}` follows it",
        )
    rec = record.to_dict()
    try:
        command = runtimes.of(rec).attach(rec)
    except AgentError as e:  # an odd session name, a Slurm id that is not one
        raise RemoteError(str(e)) from None
    return ssh_argv(spec, login_shell_safe(command), tty=True, batch=False)
