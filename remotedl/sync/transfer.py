"""``push`` and ``pull``: the code (``remotedl.sync.code``) and the data paths by rsync, under one
multiplexed OpenSSH connection."""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Sequence
from pathlib import Path

from remotedl import proc
from remotedl.config import project_relative
from remotedl.errors import RemoteError, UsageError
from remotedl.rsync import (
    ProgressFn,
    Transfer,
    literal,
    parse_items,
    protect_args_flag,
    rsync_argv,
    run_rsync,
)
from remotedl.snapshot import (
    DEFAULT_MAX_FILE,
    Snapshot,
    project_identity,
    record_pulled,
    repo_facts,
    take_snapshot,
)
from remotedl.ssh.channel import Box, parse_marks
from remotedl.ssh.openssh import ssh_command_string
from remotedl.ssh.resolve import HostSpec
from remotedl.sync.code import (
    Entry,
    _checkout,
    _Known,
    _known_file,
    _load_known,
    _pack,
    _save_known,
    _sweep_control_dir,
    _unchanged,
    push_code,
    push_lock,
    startup_noise_error,
)
from remotedl.sync.common import BOX_EXCLUDES, PullResult, PushResult, _stage
from remotedl.sync.remote_dir import (
    DEFAULT_DIR_MODE,
    _git_dir,
    _in_git,
    claim_remote_dir,
    legacy_name,
    normalize_remote_dir,
)

# ------------------------------------------------------------------ rsync


def _relative_in(root: Path, path: str) -> str:
    """A data path's place in the project, by name (a symlink there to a dataset disk is
    fine: rsync sends what it points to); one that climbs out is refused."""
    rel = project_relative(root.resolve(), path)
    if rel == ".." or rel.startswith(".." + os.sep):
        raise UsageError(f"data path {path} is outside the project ({root})")
    if rel == ".":
        raise UsageError("the project root itself is code: list data directories, not '.'")
    return rel


def code_snapshot(
    project_root: Path, *, data: Sequence[str] = (), max_snapshot_file: int = DEFAULT_MAX_FILE
) -> Snapshot:
    """The code a push with these settings would send now, made as push makes it (the ``data``
    paths and untracked files over ``max_snapshot_file`` left out), without sending it: what
    `diff` compares a job with, and what tells whether a push would change a running job's files."""
    repo = repo_facts(project_root)
    rels = [_relative_in(repo.root, d) for d in data]
    return take_snapshot(repo.root, data=rels, max_file=max_snapshot_file, repo=repo)


# ------------------------------------------------------------------ push


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
    max_snapshot_file: int = DEFAULT_MAX_FILE,
    progress: ProgressFn | None = None,
    send_data: Sequence[str] | None = None,
    dir_mode: str = DEFAULT_DIR_MODE,
) -> PushResult:
    """Push the code (``code``) and rsync the ``data`` paths. ``send_data``: the data paths to
    rsync this time (``push --watch``: those that changed); all of ``data`` when None. The
    snapshot leaves out every configured ``data`` path whichever are sent."""
    t0 = time.perf_counter()
    repo = repo_facts(project_root) if code else None
    root = repo.root if repo is not None else project_root
    rels = [_relative_in(root, d) for d in data]
    # A clone without the data (or a dataset disk not mounted) still pushes its code; the
    # box's copy of a missing path stays as it is (named in the result, nothing deleted).
    missing = [rel for rel in rels if not (root / rel).exists()]
    tidy = normalize_remote_dir(remote_dir)
    git_dir = repo.index.parent if repo is not None else _git_dir(root)
    ident = project_identity(root) if git_dir is not None else ""
    _sweep_control_dir()
    with push_lock(spec, tidy):
        snap = Snapshot(None, None, False)
        if code and repo is not None:
            _stage(progress, "snapshot: reading the work tree")
            snap = take_snapshot(
                root,
                data=rels,
                max_file=max_snapshot_file,
                stage=lambda text: _stage(progress, text),
                repo=repo,
            )
        box = Box(spec)
        memo = _known_file(spec, tidy, ident, git_dir)
        sending = rels if send_data is None else [_relative_in(root, d) for d in send_data]
        sending = [rel for rel in sending if rel not in missing]
        # The data paths the checkout's request lists on the box, so that rsync runs only where
        # it has something to send (with --delete or excludes, rsync always decides).
        listable = [] if delete or excludes else sending
        listed: dict[str, dict[str, Entry] | None] = {}
        known = _load_known(memo)
        changed = False
        created: str | None = None
        marks: dict[str, str] | None = None
        if known is not None and (snap.commit is None or not code):
            abs_dir = known.path
        elif known is not None and snap.commit:
            # The usual push: one round trip sends the new objects as a pack and checks out.
            abs_dir = known.path
            pack = None if known.commit in (None, snap.commit) else _pack(root, snap.commit, known.commit)
            if pack is not None or known.commit == snap.commit:
                _stage(progress, f"code: sending {snap.commit[:10]} and checking out")
                marks = _checkout(
                    box, abs_dir, snap.commit, force=force, ident=ident, pack=pack,
                    listing=listable, listed=listed,
                )  # fmt: skip
            if marks is None:
                known = None
        if known is None:
            _stage(progress, f"box: preparing {tidy}")
            legacy = legacy_name(tidy, ident, project_root)
            rd = claim_remote_dir(
                box, tidy, root, commit=snap.commit, ident=ident, dir_mode=dir_mode, legacy=legacy
            )
            created = rd.created
            abs_dir = rd.path
            if code and snap.commit and not (rd.clean and rd.head == snap.commit):
                changed = push_code(
                    box, root, abs_dir, snap.commit, force=force, ident=ident, progress=progress
                )
        else:
            changed = marks is not None and "changed" in marks
        if snap.commit:
            _save_known(memo, _Known(abs_dir, snap.commit))
        result = PushResult(
            abs_dir, snap.commit, snap.head, snap.is_snapshot, changed, left_out=snap.left_out,
            created_mode=created, missing=missing,
        )  # fmt: skip
        if marks is None:
            listed = {}  # the tree was (re)claimed since: the listing may be of another one
        unchanged = {
            rel for rel in sending if (box_files := listed.get(rel)) and _unchanged(root, rel, box_files)
        }
        if [rel for rel in sending if rel not in unchanged] and box.noise:
            raise startup_noise_error(box, "rsync")
        for rel in sending:
            if rel in unchanged:
                result.transfers.append(Transfer(rel, 0, 0))
                continue
            _stage(progress, f"data: {rel}")
            # A symlink to a directory (data -> /datasets/imagenet) is followed at the top, so
            # the box gets the dataset's files under the same name; links inside stay links.
            linked_dir = (root / rel).is_symlink() and (root / rel).is_dir()
            source = f"{root}/./{rel}" + ("/" if linked_dir else "")
            argv = rsync_argv(spec, [source], f"{spec.alias}:{abs_dir}/", delete=delete, excludes=excludes)
            result.transfers.append(run_rsync(spec, argv, rel, progress))
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------ pull

# "$1": the directory to pull from (absolute), then the paths (relative to it): each one
# missing is named.
_PULL_CHECK = r"""
cd -- "$1" 2>/dev/null || { echo "@@nodir"; exit 0; }
shift
i=0
for p; do
  [ -e "$p" ] || [ -L "$p" ] || echo "@@absent$i"
  i=$((i + 1))
done
"""


def _pull_path(path: str, remote_dir: str) -> str:
    rel = posixpath.normpath(path.replace(os.sep, "/")) if path else ""
    if not rel or rel.startswith("/") or rel == ".." or rel.startswith("../"):
        raise UsageError(f"{path}: give paths relative to the remote directory {remote_dir}")
    if ".git" in rel.split("/"):
        raise UsageError(
            f"{path}: pull never writes into .git (a box could plant hooks or config that run here)",
            hint="pull the work tree's outputs; bring commits home with git itself",
        )
    return rel


def _check_local_target(root: Path, rel: str) -> None:
    """Refuse a destination that resolves into a .git directory (a symlink here pointing there)."""
    target = (root / rel) if rel != "." else root
    probe = target
    while not probe.exists() and not probe.is_symlink() and probe != root:
        probe = probe.parent
    real = probe.resolve()
    if ".git" in real.parts:
        raise UsageError(f"{rel}: it leads into {real} here, and pull never writes into .git")


def _modified_tracked(root: Path, rels: Sequence[str]) -> list[str]:
    """Tracked files under ``rels`` (relative to ``root``, which may be below the repository's
    top) whose content here differs from HEAD: uncommitted edits, deletions included."""
    if not _in_git(root):
        return []
    specs = [f":(literal){r}" if r != "." else "." for r in rels]
    out = proc.run(
        [
            "git",
            "-C",
            str(root),
            "diff",
            "HEAD",
            "--relative",
            "--name-only",
            "-z",
            "--no-renames",
            "--",
            *specs,
        ],
        check=False,
    ).stdout
    return sorted({p for p in out.split("\0") if p})


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
    """Bring box paths (relative to remote_dir, or to the absolute box directory ``source_dir``)
    home. Never deletes; never overwrites newer files; never writes into ``.git``; never writes
    a tracked file unless it is named itself (then the box's version, whatever the clocks say,
    as long as it has no uncommitted edits here); names what it kept and what it replaced.
    ``.`` means the work tree's outputs: the repository and what remotedl keeps there stay on
    the box. What it writes is listed as pulled: the code snapshot leaves it out."""
    if not paths:
        raise UsageError("name at least one path to pull, relative to the remote directory")
    where = source_dir or remote_dir
    rels = [_pull_path(p, where) for p in paths]
    # remote_dir mirrors the repository's top (that is what push sends), wherever the project's
    # remotedl.toml is.
    top = proc.run(["git", "-C", str(project_root), "rev-parse", "--show-toplevel"], check=False)
    root = Path(top.stdout.strip()) if top.returncode == 0 else project_root
    for rel in rels:
        _check_local_target(root, rel)
    box = Box(spec)
    if source_dir is not None:
        if not source_dir.startswith("/"):
            raise UsageError(f"source_dir {source_dir!r} must be an absolute path on the box")
        abs_dir = posixpath.normpath(source_dir)
    else:
        abs_dir = claim_remote_dir(box, remote_dir, root, mode="pull").path
    out = box.run(_PULL_CHECK, abs_dir, *rels)
    marks = parse_marks(out.stdout)
    if "nodir" in marks:
        raise RemoteError(f"{abs_dir} does not exist on {spec.alias}")
    for i, rel in enumerate(rels):
        if f"absent{i}" in marks:
            raise RemoteError(f"{rel} does not exist on {spec.alias} in {abs_dir}")
    if box.noise:
        raise startup_noise_error(box, "rsync")
    result = PullResult(str(root))
    repo = repo_facts(root) if _in_git(root) else None
    modified = _modified_tracked(root, rels)
    tracked = set(_tracked(root, rels)) if repo is not None else set()
    written: list[str] = []
    for rel in rels:
        mine = [m for m in modified if rel in (".", m) or m.startswith(rel + "/")]
        named = rel in tracked and rel not in mine  # a tracked file asked for by its name
        under = sorted(t for t in tracked if t != rel and (rel == "." or t.startswith(rel + "/")))
        edited = set(mine)
        others = [t for t in under if t not in edited]
        protect = [f"/{literal(m)}" for m in [*mine, *others]]
        if rel == ".":
            protect += list(BOX_EXCLUDES)
        stdin = "".join(p + "\0" for p in protect).encode("utf-8", "surrogateescape")
        argv = rsync_argv(
            spec,
            [f"{spec.alias}:{abs_dir}/./{rel}"],
            f"{root}/",
            excludes=[".git", *excludes],
            update=not named,  # named: the box's version, whichever clock is ahead
            checksum=named,
            exclude_from_stdin=True,
            itemize=True,
        )
        lines: list[str] = []
        result.transfers.append(run_rsync(spec, argv, rel, progress, stdin=stdin, lines=lines))
        items = parse_items(lines)
        written += [w for w in items.written if w not in tracked]
        result.kept_newer += items.newer_here
        for path in items.replaced:
            (result.replaced_tracked if path in tracked else result.replaced).append(path)
        if mine:
            result.kept += _differs(spec, abs_dir, root, mine)
        if others:
            result.kept_tracked += _differs(spec, abs_dir, root, others)
    if repo is not None:
        record_pulled(repo, written)
    return result


def _tracked(root: Path, rels: Sequence[str]) -> list[str]:
    """Files under ``rels`` (relative to the top ``root``) that git tracks (in the index)."""
    specs = [f":(literal){r}" if r != "." else "." for r in rels]
    out = proc.run(["git", "-C", str(root), "ls-files", "-z", "--", *specs], check=False).stdout
    return sorted({p for p in out.split("\0") if p})


def _differs(spec: HostSpec, abs_dir: str, root: Path, files: Sequence[str]) -> list[str]:
    """Which of ``files`` (relative) the box has with other contents: a dry run over just
    those, by checksum (clocks say nothing about which version is wanted)."""
    argv = [
        "rsync",
        "-a",
        "-n",
        "--checksum",
        "--out-format=%n",
        "--from0",
        "--files-from=-",
        protect_args_flag(),
        "-e",
        ssh_command_string(spec),
        "--",
        f"{spec.alias}:{abs_dir}/",
        f"{root}/",
    ]
    stdin = "".join(f + "\0" for f in files).encode("utf-8", "surrogateescape")
    done = proc.communicate(argv, input=stdin, max_stdout=1 << 20)
    if done.returncode not in (0, 23):
        return list(files)  # cannot tell: say all of them were kept
    named = set(done.stdout.decode(errors="replace").splitlines())
    return [f for f in files if f in named]
