"""Code via git, data via rsync: ``push`` and ``pull``.

Code: the local HEAD, plus a snapshot commit of uncommitted work (tracked changes and
untracked files .gitignore does not exclude) made in a temporary index so the local
repository is left exactly as it was, is pushed over SSH into a git work tree at
``remote_dir`` on the box and checked out there. No third-party git host in between.

Data: the configured paths are rsynced to the same relative place under remote_dir,
incrementally and resumably; nothing is deleted unless asked.

Every ssh, git and rsync call of one push shares one multiplexed OpenSSH connection.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl import proc
from remotedl.errors import RemotedlError, RemoteError, UsageError
from remotedl.ssh.channel import EXPAND_HOME, Box, parse_marks
from remotedl.ssh.openssh import openssh_failure, ssh_command_string
from remotedl.ssh.resolve import HostSpec

SNAPSHOT_PREFIX = "remotedl snapshot of uncommitted work on top of "
PUSHED_REF = "refs/remotedl/pushed"


@dataclass
class Progress:
    """One progress report from a long transfer."""

    label: str
    bytes_done: int
    percent: int
    rate: str


ProgressFn = Callable[[Progress], None]


@dataclass
class Transfer:
    path: str
    files_transferred: int
    bytes_transferred: int


@dataclass
class PushResult:
    remote_dir: str
    commit: str | None
    head: str | None
    snapshot: bool
    code_changed: bool
    transfers: list[Transfer] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    local_dir: str
    transfers: list[Transfer] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ local git


def _git(root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = proc.run(["git", "-C", str(root), *args], env=env, check=False)
    if check and result.returncode != 0:
        raise RemotedlError(f"git {args[0]} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def git_root(path: Path) -> Path:
    result = proc.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], check=False)
    if result.returncode != 0:
        raise UsageError(
            f"{path} is not in a git repository: push sends code with git",
            hint="run `git init && git add -A && git commit -m init` first, or use --no-code "
            "to push only data",
        )
    return Path(result.stdout.strip())


def snapshot_commit(root: Path) -> tuple[str, str | None, bool]:
    """(commit to push, HEAD or None, whether it is a snapshot). Leaves the repo untouched."""
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD", check=False) or None
    with tempfile.TemporaryDirectory(prefix="remotedl-index-") as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        if head:
            _git(root, "read-tree", head, env=env)
        # -A: modified, deleted and untracked-but-not-ignored files; .gitignore is honoured.
        _git(root, "add", "-A", "--", ".", env=env)
        tree = _git(root, "write-tree", env=env)
    if head and tree == _git(root, "rev-parse", f"{head}^{{tree}}"):
        return head, head, False
    ident = {
        **os.environ,
        "GIT_AUTHOR_NAME": "remotedl",
        "GIT_AUTHOR_EMAIL": "remotedl@localhost",
        "GIT_COMMITTER_NAME": "remotedl",
        "GIT_COMMITTER_EMAIL": "remotedl@localhost",
        # A fixed date makes the snapshot of an unchanged tree the same commit: no-op pushes stay no-ops.
        "GIT_AUTHOR_DATE": "1700000000 +0000",
        "GIT_COMMITTER_DATE": "1700000000 +0000",
    }
    parents = ["-p", head] if head else []
    message = SNAPSHOT_PREFIX + (head or "an empty repository")
    commit = _git(root, "commit-tree", tree, *parents, "-m", message, env=ident)
    return commit, head, True


# ------------------------------------------------------------------ box side

# "$1": remote_dir as configured ("~/..." allowed).
_PREPARE = EXPAND_HOME + r"""
set -e
command -v git >/dev/null 2>&1 || { echo "@@nogit"; exit 0; }
d=$(expand_home "$1")
mkdir -p -- "$d"
cd -- "$d"
[ -d .git ] || git init -q .
echo "@@dir $(pwd -P)"
echo "@@head $(git rev-parse -q --verify HEAD 2>/dev/null || echo none)"
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo "@@clean" || true
"""

# "$1": the work tree, "$2": the commit to check out, "$3": 1 to overwrite box edits.
_CHECKOUT = r"""
set -e
cd -- "$1"
new=$2
head=$(git rev-parse -q --verify HEAD 2>/dev/null || echo none)
if [ "$head" = "$new" ] && [ -z "$(git status --porcelain --untracked-files=no)" ]; then
  echo "@@unchanged"; exit 0
fi
if [ "$3" != 1 ]; then
  # Edits made on the box: tracked files changed since the last push...
  changed=$(git status --porcelain --untracked-files=no | cut -c4-)
  # ...and untracked files the new commit would overwrite.
  clobber=$(git ls-files --others --exclude-standard -z | xargs -0 -r sh -c '
    c=$1; shift; for f; do git cat-file -e "$c:$f" 2>/dev/null && printf "%s\n" "$f"; done; :' sh "$new")
  if [ -n "$changed$clobber" ]; then
    echo "@@dirty"; printf '%s\n' "$changed" "$clobber" | sed '/^$/d'; exit 0
  fi
  git checkout -q --detach "$new"
else
  git checkout -q -f --detach "$new"
fi
echo "@@changed"
"""


def startup_noise_error(box: Box, tool: str) -> RemoteError:
    """git and rsync speak a protocol over the session: start-up output breaks it."""
    from remotedl.shells import noise_advice

    where, fix = noise_advice(box.login_shell)
    first = box.noise.splitlines()[0][:60] if box.noise else ""
    return RemoteError(
        f"{tool} cannot work with {box.spec.alias}: its shell start-up files print "
        f"({first!r}) for non-interactive logins, which breaks {tool}'s protocol",
        hint=f"make {where} quiet unless the shell is interactive: {fix}",
    )


def prepare_remote_dir(box: Box, remote_dir: str) -> tuple[str, str | None]:
    """Create the work tree on the box if needed; (absolute path, its HEAD if the tracked
    files are clean, else None)."""
    out = box.run(_PREPARE, remote_dir)
    marks = parse_marks(out.stdout)
    if "nogit" in marks:
        raise RemoteError(
            f"git is not installed on {box.spec.alias}",
            hint="install it there (`sudo apt-get install git`), or run `remotedl setup base`",
        )
    head = marks.get("head")
    return marks["dir"], (None if head in (None, "none") or "clean" not in marks else head)


def push_code(box: Box, root: Path, abs_dir: str, commit: str, *, force: bool) -> bool:
    """Send ``commit`` to the box and check it out there; True if the box's tree changed."""
    spec = box.spec
    if box.noise:
        raise startup_noise_error(box, "git")
    env = {**os.environ, "GIT_SSH_COMMAND": ssh_command_string(spec), "GIT_SSH_VARIANT": "ssh"}
    url = f"ssh://{spec.alias}{abs_dir}" if abs_dir.startswith("/") else f"{spec.alias}:{abs_dir}"
    result = proc.run(
        ["git", "-C", str(root), "push", "-q", "--no-verify", url, f"+{commit}:{PUSHED_REF}"],
        env=env,
        check=False,
    )
    if result.returncode != 0:
        if "Could not read from remote repository" in result.stderr:
            raise openssh_failure(spec, result.stderr)
        raise RemotedlError(f"git push to {spec.alias} failed: {result.stderr.strip()}")
    marks_out = box.run(_CHECKOUT, abs_dir, commit, "1" if force else "0")
    marks = parse_marks(marks_out.stdout)
    if "dirty" in marks:
        files = marks_out.stdout.split("@@dirty", 1)[1].strip().splitlines()
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        raise RemoteError(
            f"the work tree on {spec.alias} ({abs_dir}) has edits that were not pushed from here: {shown}",
            hint="bring them home with `remotedl pull PATH...`, "
            "or overwrite them with `remotedl push --force`",
        )
    return "changed" in marks


# ------------------------------------------------------------------ rsync

_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)")
_STATS_FILES = re.compile(r"Number of regular files transferred: ([\d,]+)")
_STATS_BYTES = re.compile(r"Total transferred file size: ([\d,]+)")


def rsync_argv(
    spec: HostSpec,
    sources: Sequence[str],
    dest: str,
    *,
    delete: bool = False,
    excludes: Sequence[str] = (),
    update: bool = False,
) -> list[str]:
    argv = [
        "rsync",
        "-a",
        "--relative",  # keep each path's place relative to the project root (the "./" anchor)
        "--partial",  # an interrupted large file resumes instead of starting over
        "--secluded-args" if _rsync_new() else "--protect-args",  # names never reach a shell
        "--info=progress2",
        "--no-inc-recursive",  # a total known up front, so the percentage means something
        "--stats",
        "-e",
        ssh_command_string(spec),
    ]
    if delete:
        argv.append("--delete")
    if update:
        argv.append("--update")  # never overwrite a newer file on the receiving side
    for pattern in excludes:
        argv += ["--exclude", pattern]
    return [*argv, "--", *sources, dest]


_RSYNC_NEW: bool | None = None


def _rsync_new() -> bool:
    global _RSYNC_NEW
    if _RSYNC_NEW is None:
        out = proc.run(["rsync", "--version"], check=False).stdout
        m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
        _RSYNC_NEW = bool(m) and tuple(int(x) for x in m.groups()) >= (3, 2, 4)  # type: ignore[union-attr]
    return _RSYNC_NEW


def rsync_failure(alias: str, label: str, code: int, err: str) -> RemotedlError:
    """The error for an rsync that exited ``code`` (not an ssh failure), from its stderr."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    detail = lines[0] if lines else f"exit status {code}"
    if code == 127 or "remote command not found" in err:
        # The box's shell could not find rsync ("bash: line 1: rsync: command not found";
        # rsync itself says "remote command not found (code 127)").
        return RemoteError(
            f"rsync is not installed on {alias}",
            hint="install it there (`sudo apt-get install rsync`), or run `remotedl setup base`",
        )
    if "protocol version mismatch" in err or "is your shell clean" in err:
        return RemoteError(
            f"rsync of {label} failed: the box's shell prints text that breaks rsync's protocol",
            hint="make the start-up files of the box's shell (~/.bashrc, ...) print nothing "
            "when not interactive (test: `ssh BOX true` must print nothing)",
        )
    if code == 23 and "No such file or directory" in err:
        return RemotedlError(f"{label}: no such file: {detail}")
    return RemotedlError(f"rsync of {label} failed ({code}): {detail}")


def run_rsync(box: Box, argv: list[str], label: str, progress: ProgressFn | None) -> Transfer:
    spec = box.spec
    if box.noise:
        raise startup_noise_error(box, "rsync")
    tail = b""
    collected = bytearray()

    def on_stdout(chunk: bytes) -> None:
        nonlocal tail
        collected.extend(chunk)
        tail += chunk
        parts = re.split(rb"[\r\n]", tail)
        tail = parts.pop()
        for raw in parts:
            m = _PROGRESS.match(raw.decode(errors="replace"))
            if m and progress is not None:
                progress(Progress(label, int(m.group(1).replace(",", "")), int(m.group(2)), m.group(3)))

    done = proc.communicate(argv, on_stdout=on_stdout)
    err = done.stderr.decode(errors="replace")
    code = done.returncode
    text = collected.decode(errors="replace")
    if code == 255 or (code == 12 and "connection unexpectedly closed" in err and "ssh" in err.lower()):
        raise openssh_failure(spec, err)
    if code != 0:
        raise rsync_failure(spec.alias, label, code, err)
    files = _STATS_FILES.search(text)
    size = _STATS_BYTES.search(text)
    return Transfer(
        label,
        int(files.group(1).replace(",", "")) if files else 0,
        int(size.group(1).replace(",", "")) if size else 0,
    )


def _relative_in(root: Path, path: str) -> str:
    p = (root / path).resolve() if not os.path.isabs(path) else Path(path).resolve()
    try:
        rel = p.relative_to(root.resolve())
    except ValueError as e:
        raise UsageError(f"data path {path} is outside the project ({root})") from e
    if str(rel) == ".":
        raise UsageError("the project root itself is code: list data directories, not '.'")
    return str(rel)


# ------------------------------------------------------------------ push / pull


def push(
    spec: HostSpec,
    project_root: Path,
    remote_dir: str,
    *,
    data: Sequence[str] = (),
    excludes: Sequence[str] = (),
    delete: bool = False,
    force: bool = False,
    code: bool = True,
    progress: ProgressFn | None = None,
) -> PushResult:
    t0 = time.perf_counter()
    root = git_root(project_root) if code else project_root
    rels = [_relative_in(root, d) for d in data]
    for rel in rels:
        if not (root / rel).exists():
            raise UsageError(f"data path {rel} does not exist in {root}")
    commit = head = None
    snapshot = False
    if code:
        commit, head, snapshot = snapshot_commit(root)
    box = Box(spec)
    abs_dir, box_head = prepare_remote_dir(box, remote_dir)
    changed = False
    if code and commit and box_head != commit:  # already checked out and clean: nothing to send
        changed = push_code(box, root, abs_dir, commit, force=force)
    result = PushResult(abs_dir, commit, head, snapshot, changed)
    for rel in rels:
        argv = rsync_argv(
            spec, [f"{root}/./{rel}"], f"{spec.alias}:{abs_dir}/", delete=delete, excludes=excludes
        )
        result.transfers.append(run_rsync(box, argv, rel, progress))
    result.seconds = time.perf_counter() - t0
    return result


def pull(
    spec: HostSpec,
    project_root: Path,
    remote_dir: str,
    paths: Sequence[str],
    *,
    excludes: Sequence[str] = (),
    progress: ProgressFn | None = None,
    source_dir: str | None = None,
) -> PullResult:
    """Bring box paths (relative to remote_dir, or to ``source_dir``, an absolute box
    directory such as a job's own checkout) home. Never deletes; never overwrites newer files."""
    if not paths:
        raise UsageError("name at least one path to pull, relative to the remote directory")
    box = Box(spec)
    abs_dir = source_dir or prepare_remote_dir(box, remote_dir)[0]
    result = PullResult(str(project_root))
    for path in paths:
        rel = os.path.normpath(path)
        if rel.startswith("..") or os.path.isabs(rel):
            raise UsageError(f"{path}: give paths relative to the remote directory {remote_dir}")
        check = box.run('test -e "$1"', abs_dir + "/" + rel, check=False)
        if check.exit_code != 0:
            raise RemoteError(f"{rel} does not exist on {spec.alias} in {abs_dir}")
        argv = rsync_argv(
            spec, [f"{spec.alias}:{abs_dir}/./{rel}"], f"{project_root}/", excludes=excludes, update=True
        )
        result.transfers.append(run_rsync(box, argv, rel, progress))
    return result
