"""Outputs home: what a job produces that belongs on the laptop, fetched when the job ends.

A job started with outputs (``outputs = [...]`` in the config, ``run --output PATH``) is written
into this clone's ledger, ``.remotedl/outputs.json`` in the project (``.remotedl/`` holds a
``.gitignore`` of ``*``: git and the code snapshot never see it). The first remotedl command
that talks to the job's box after the job ended brings its outputs home, into
``<outputs_dir>/<host>-<job>/`` (default ``.remotedl/outputs``), with one rsync:

- incrementally (only what changed since the last fetch crosses) and resumable (a cut transfer
  keeps its data in ``.remotedl-partial/`` and the next fetch resumes from it);
- never deleting, and never overwriting a file that changed here since it was fetched (the
  ledger keeps each fetched file's size and mtime; a file that differs, or was removed here, is
  left as it is), nor a file newer here;
- what it wrote inside the work tree is recorded as pulled: the code snapshot leaves it out.

Experiment trackers are outputs too: the box's agent gives a job ``WANDB_DIR``/``WANDB_RUN_ID``/
``WANDB_NAME`` and ``MLFLOW_TRACKING_URI`` (absolute paths in its own directory,
``agent/trackers.py``) unless the user set them, and ``wandb/`` and ``mlruns/`` come home with
the rest when they exist.

The box keeps each job's outputs in its record, so a job started from another clone or laptop
of the project comes home too: the ledger then says what has been fetched (nothing twice).
Which boxes a command talked to, and which jobs ended, come from what the command did anyway
(``Seen``, fed by ``Box.run`` and ``AgentClient``): a command whose answers listed the box's
jobs costs no extra round trip; one that did not (push, pull, status) asks for the project's
jobs with outputs in one listing per box. A project without outputs costs nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from remotedl.errors import UsageError
from remotedl.schema import JobRecord

if TYPE_CHECKING:
    from remotedl.rsync import ProgressFn
    from remotedl.ssh.resolve import HostSpec

__all__ = [
    "SEEN",
    "TRACKER_OUTPUTS",
    "Arrival",
    "Entry",
    "Ledger",
    "due",
    "fetch",
    "job_dest",
    "outputs_root",
]

STATE_DIR = ".remotedl"
LEDGER_NAME = "outputs.json"
DEFAULT_OUTPUTS_DIR = ".remotedl/outputs"
# What trackers write in a job's directory with the environment the box's agent gives it.
TRACKER_OUTPUTS = ("wandb/", "mlruns/")
# The variables the agent may set (the same for every job: not a difference worth showing).
TRACKER_KEYS = frozenset(
    {"WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"}
)
# --env values kept in the ledger (for `compare`) unless their names look like secrets.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|AUTH|CRED|PRIVATE|COOKIE|SESSION|DSN", re.I)

Status = Literal["waiting", "home", "gone"]


@dataclass
class Entry:
    """One job whose outputs come home, as the ledger keeps it."""

    host: str  # the ssh alias it ran on
    job: int
    name: str
    dir: str  # the job's directory on the box (absolute): its checkout, or the work tree
    paths: list[str]  # relative to ``dir``; a trailing "/" is a directory
    dest: str  # where they land here (absolute)
    status: Status = "waiting"  # waiting (for the end), home (fetched after the end), gone
    created: float = 0.0
    fetched: float | None = None  # when the last fetch finished
    files: dict[str, list[int]] = field(default_factory=dict)  # fetched: rel -> [size, mtime_ns]
    env: dict[str, str] = field(default_factory=dict)  # --env values, secret-looking names left out
    wandb_run_id: str | None = None
    synced: list[str] = field(default_factory=list)  # W&B offline runs `wandb sync` took
    trackers_dir: str | None = None  # where wandb/ and mlruns/ are on the box (None: in ``dir``)

    @property
    def key(self) -> str:
        return f"{self.host}:{self.job}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Entry:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def outputs_root(project_root: Path, setting: str | None) -> Path:
    """The directory every job's outputs go under (``outputs_dir``, relative to the project)."""
    base = Path(os.path.expanduser(setting or DEFAULT_OUTPUTS_DIR))
    return base if base.is_absolute() else project_root / base


def job_dest(base: Path, alias: str, job_id: int) -> Path:
    """``<base>/<host>-<job>``: one directory per job, named so two boxes never share one."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", alias).strip("._") or "box"
    return base / f"{host}-{job_id}"


def check_output_path(path: str) -> str:
    """An output as the user gave it: relative to the job's directory, never into ``.git``."""
    rel = path.replace(os.sep, "/").strip()
    norm = os.path.normpath(rel).replace(os.sep, "/") if rel else ""
    if not norm or norm == "." or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise UsageError(
            f"output {path!r}: give a path relative to the job's directory (checkpoints/, metrics.json)"
        )
    if ".git" in norm.split("/"):
        raise UsageError(f"output {path!r}: outputs never come from .git")
    return norm + ("/" if rel.endswith("/") else "")


def kept_env(env: Mapping[str, str]) -> dict[str, str]:
    """The --env values worth showing in `compare`: names that do not look like secrets."""
    return {k: v for k, v in env.items() if not _SECRET_NAME.search(k)}


# ------------------------------------------------------------------ the ledger


class Ledger:
    """This clone's jobs with outputs (``.remotedl/outputs.json``), read and written under a
    lock: two commands of one project at once never lose each other's entries."""

    def __init__(self, project_root: Path) -> None:
        self.root = project_root
        self.dir = project_root / STATE_DIR
        self.path = self.dir / LEDGER_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def _prepare(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        ignore = self.dir / ".gitignore"
        if not ignore.exists():
            # git (and so the code snapshot) never sees what remotedl keeps here
            ignore.write_text("# made by remotedl: outputs and state, never code\n*\n")

    def _raw(self) -> dict[str, Any]:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def read(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for item in self._raw().get("jobs", []):
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                e = Entry.from_dict(item)
                out[e.key] = e
        return out

    def listed_upto(self, key: str) -> int:
        """The box's job ids up to which the project's jobs with outputs were all ended at the
        last listing (``key``: host and remote_dir): a listing reads only the later ones."""
        listed = self._raw().get("listed")
        value = listed.get(key) if isinstance(listed, dict) else None
        return value if isinstance(value, int) and value > 0 else 0

    @contextlib.contextmanager
    def edit(self, listed: Mapping[str, int] | None = None) -> Iterator[dict[str, Entry]]:
        """The entries, to change in place; written back (atomically) at the end, with
        ``listed`` (``listed_upto``'s values) changed too."""
        self._prepare()
        with open(self.dir / ".outputs.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.read()
            yield entries
            kept = self._raw().get("listed")
            marks = {**(kept if isinstance(kept, dict) else {}), **(listed or {})}
            tmp = self.path.with_name(f".{LEDGER_NAME}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"jobs": [e.to_dict() for e in entries.values()], "listed": marks}, f, indent=1)
            tmp.replace(self.path)

    def waiting(self, host: str | None = None) -> list[Entry]:
        return [e for e in self.read().values() if e.status == "waiting" and host in (None, e.host)]


def register(ledger: Ledger, entry: Entry) -> None:
    with ledger.edit() as entries:
        entries[entry.key] = entry


def entry_for(
    rec: JobRecord,
    host: str,
    paths: Sequence[str],
    base: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> Entry:
    """The ledger entry of a job just started, or of a job met later (started from another
    clone: its record's outputs; or with the configured ones)."""
    return Entry(
        host=host,
        job=rec.id,
        name=rec.name,
        dir=rec.workdir or rec.cwd,
        paths=list(dict.fromkeys(paths)),
        dest=str(job_dest(base, host, rec.id)),
        status="home" if rec.ended and rec.status not in ("running", "queued", "starting") else "waiting",
        created=rec.created or time.time(),
        env=kept_env(env or {}),
        wandb_run_id=(env or {}).get("WANDB_RUN_ID") or rec.trackers.get("WANDB_RUN_ID"),
        trackers_dir=rec.trackers_dir,
    )


def theirs(rec: JobRecord, project_id: str | None) -> bool:
    """A job of this project with outputs (started from any clone: the project's identity)."""
    return bool(rec.outputs) and project_id is not None and rec.project_id == project_id


# ------------------------------------------------------------------ which jobs ended


class Seen:
    """The job records the agent's answers carried during this command, by host: which jobs
    ended is known without asking again. ``AgentClient.call`` notes every answer here."""

    def __init__(self) -> None:
        self._records: dict[str, dict[int, JobRecord]] = {}
        # The answers' raw records, typed on the first look at ``records``: only a project
        # with outputs looks, and checking a listing of 5,000 jobs a second time (the command
        # checked them once) cost a third of `jobs --all`'s time (issues 23, 24).
        self._pending: dict[str, list[Any]] = {}
        self.specs: dict[str, HostSpec] = {}
        self.listed: set[str] = set()  # hosts whose jobs an answer listed (``list``)

    @property
    def records(self) -> dict[str, dict[int, JobRecord]]:
        """By host, the job records the answers carried (a later answer's record wins)."""
        for alias, items in self._pending.items():
            found = self._records.setdefault(alias, {})
            for item in items:
                with contextlib.suppress(Exception):  # a bad record is the command's own error to tell
                    rec = JobRecord.from_dict(item)
                    found[rec.id] = rec
        self._pending.clear()
        return self._records

    def clear(self) -> None:
        self._records.clear()
        self._pending.clear()
        self.specs.clear()
        self.listed.clear()

    def contact(self, spec: HostSpec) -> None:
        """The command talked to this box (any request: push, pull, status...)."""
        self.specs.setdefault(spec.alias, spec)

    def note(self, spec: HostSpec, answer: Mapping[str, Any], op: object = None) -> None:
        self.specs.setdefault(spec.alias, spec)
        if op == "list":
            self.listed.add(spec.alias)
        self._records.setdefault(spec.alias, {})
        raw = answer.get("jobs")
        items = list(raw) if isinstance(raw, list) else []
        if isinstance(answer.get("job"), dict):
            items.append(answer["job"])
        self._pending.setdefault(spec.alias, []).extend(items)

    def hosts(self) -> list[str]:
        return list(self.specs)


SEEN = Seen()


def ended(rec: JobRecord) -> bool:
    return rec.status not in ("running", "queued", "starting") and rec.ended is not None


def due(waiting: Sequence[Entry], records: Mapping[int, JobRecord]) -> tuple[list[Entry], list[Entry]]:
    """(entries whose job ended, entries whose job is not in ``records``: to ask about)."""
    done, unknown = [], []
    for e in waiting:
        rec = records.get(e.job)
        if rec is None:
            unknown.append(e)
        elif ended(rec):
            done.append(e)
    return done, unknown


# ------------------------------------------------------------------ the fetch


@dataclass
class Arrival:
    """What one fetch of a job's outputs did."""

    host: str
    job: int
    name: str
    dest: str
    files: int = 0  # files written (new or changed on the box)
    bytes: int = 0  # their size
    sent: int = 0  # what crossed the link (rsync sends only what the laptop lacks)
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed or removed here since fetched: left so
    kept_newer: list[str] = field(default_factory=list)  # newer here than the box's copy
    missing: list[str] = field(default_factory=list)  # asked for, absent on the box and here
    ended: bool = True  # the job had ended (the entry is home)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _local_files(dest: Path) -> dict[str, list[int]]:
    """Every file under ``dest`` (partial transfers aside): rel -> [size, mtime_ns]."""
    from remotedl.rsync import PARTIAL_DIR

    out: dict[str, list[int]] = {}
    for dirpath, dirnames, filenames in os.walk(dest):
        dirnames[:] = [d for d in dirnames if d not in (PARTIAL_DIR, ".~tmp~")]
        for name in filenames:
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = p.lstat()
                out[p.relative_to(dest).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def changed_here(dest: Path, files: Mapping[str, list[int]]) -> list[str]:
    """Fetched files that differ here now (edited, replaced or removed since the fetch)."""
    out = []
    for rel, (size, mtime) in files.items():
        try:
            st = (dest / rel).lstat()
        except OSError:
            out.append(rel)
            continue
        if st.st_size != size or st.st_mtime_ns != mtime:
            out.append(rel)
    return sorted(out)


def fetch(
    spec: HostSpec,
    entry: Entry,
    *,
    progress: ProgressFn | None = None,
    job_ended: bool = True,
    work_tree: Path | None = None,
) -> Arrival:
    """Bring ``entry``'s outputs home (one rsync from the box), updating ``entry`` (its file
    list, and ``status`` once ``job_ended``). Raises what rsync meets (a lost connection: run
    again, the transfer resumes). What lands inside ``work_tree`` is recorded as pulled."""
    # Here, not at the top: every command imports this module (the agent client notes the jobs
    # it sees in SEEN), and only a fetch needs rsync's (its regular expressions: ~2 ms).
    from remotedl.rsync import literal, parse_items, rsync_argv, run_rsync

    dest = Path(entry.dest)
    dest.mkdir(parents=True, exist_ok=True)
    kept = changed_here(dest, entry.files)

    # The trackers' runs are in the job's own directory (a job in the work tree has one too).
    def base(p: str) -> str:
        return entry.trackers_dir if p in TRACKER_OUTPUTS and entry.trackers_dir else entry.dir

    sources = [f"{spec.alias}:{base(p)}/./{p}" for p in entry.paths]
    argv = rsync_argv(
        spec,
        sources,
        f"{dest}/",
        excludes=[".git", "/.remotedl/"],
        update=True,  # a file newer here stays
        exclude_from_stdin=True,
        itemize=True,
    )
    # An output the job has not written (yet) is no error: the others still come.
    argv.insert(argv.index("--"), "--ignore-missing-args")
    stdin = "".join(f"/{literal(k)}\0" for k in kept).encode("utf-8", "surrogateescape")
    lines: list[str] = []
    label = f"job {entry.job} outputs"
    transfer = run_rsync(spec, argv, label, progress, stdin=stdin, lines=lines)
    items = parse_items(lines)
    now = _local_files(dest)
    # Every file here now that was not left alone is the box's version: remember it as fetched.
    for rel, stat in now.items():
        if rel not in kept and rel not in items.newer_here:
            entry.files[rel] = stat
    arrival = Arrival(
        entry.host, entry.job, entry.name, str(dest), transfer.files_transferred, transfer.bytes_transferred,
        transfer.literal_bytes, items.written, kept, items.newer_here, ended=job_ended,
    )  # fmt: skip
    for p in entry.paths:
        rel = p.rstrip("/")
        if (
            p not in TRACKER_OUTPUTS
            and not (dest / rel).exists()
            and not any(k == rel or k.startswith(rel + "/") for k in entry.files)
        ):
            arrival.missing.append(p)
    entry.fetched = time.time()
    if job_ended:
        entry.status = "home"
    if work_tree is not None and items.written:
        _record_in_tree(work_tree, dest, items.written)
    return arrival


def _record_in_tree(work_tree: Path, dest: Path, written: Sequence[str]) -> None:
    """Outputs written inside the work tree (an ``outputs_dir`` there) are pulled files: the
    code snapshot leaves them out (``.remotedl/`` is ignored by git already)."""
    from remotedl.snapshot import record_pulled, repo_facts

    try:
        rel_dest = dest.resolve().relative_to(work_tree.resolve())
    except ValueError:
        return  # outside the work tree: nothing to keep out of the code
    if rel_dest.parts[:1] == (STATE_DIR,):
        return
    with contextlib.suppress(Exception):  # not a git work tree: there is no snapshot to keep it out of
        repo = repo_facts(work_tree)
        base = dest.resolve().relative_to(repo.root.resolve())
        record_pulled(repo, [(base / w).as_posix() for w in written])


def wandb_offline_runs(dest: Path) -> list[Path]:
    """The W&B offline runs that came home (``wandb/offline-run-*``)."""
    wandb_dir = dest / "wandb"
    if not wandb_dir.is_dir():
        return []
    return sorted(p for p in wandb_dir.iterdir() if p.is_dir() and p.name.startswith("offline-run-"))


def local_tensorboard_argv(base: Path, port: int, tensorboard: str | None = None) -> list[str]:
    """TensorBoard here over the outputs that came home (one run per job directory and event
    directory below it, named ``<host>-<job>/...``), on 127.0.0.1 only: no box needed."""
    import shutil
    import sys

    exe = tensorboard or shutil.which("tensorboard")
    if exe is None:
        # the tensorboard package in this interpreter, when its script is not on PATH
        return [sys.executable, "-m", "tensorboard.main", "--logdir", str(base),
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    return [exe, "--logdir", str(base), "--host", "127.0.0.1", "--port", str(port)]
