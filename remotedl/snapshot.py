"""The code snapshot: what ``push`` sends through git, made without touching the local repository.

The snapshot is code: the tracked files (whatever their size: the user committed them) plus the
untracked files ``.gitignore`` does not exclude, minus

- the configured ``data`` paths (rsync sends those: nothing travels twice),
- virtual environments and conda environments (a directory holding ``pyvenv.cfg`` or
  ``conda-meta/``): the box makes its own,
- nested git repositories that are not submodules (their own history is not ours to copy),
- untracked files larger than ``max_snapshot_file`` (checkpoints, datasets, archives),
- partial transfers that rsync keeps aside (``.remotedl-partial/``),
- ``.remotedl/`` at the top: outputs that came home and remotedl's notes about them,
- what ``pull`` brought home (outputs, not code: listed in ``.git/remotedl/pulled``) until the
  user ``git add``s it.

Submodules go as their files: each checked-out submodule's own snapshot (its HEAD and its
uncommitted work, by the same rules) takes the place of its gitlink, so the box tree and every
job's checkout hold the submodule's code with no fetch from its upstream. Its objects are copied
into this repository's object store (only those it lacks, as one pack), as ``git add`` would
store them. A submodule not initialised here is left out (the box gets an empty directory) and
named, with the fix.

What was left out is returned so the CLI can list it once, with the fix.

It is built in a temporary index that starts as a copy of the repository's own index, so git
reuses its stat cache: only files changed since the user's last ``git status`` are hashed, and a
push costs what ``git status`` costs. The copy keeps the index file's mtime, so git's racy-clean
check (entries as new as the index itself are re-read) stays right. HEAD, the index, refs and
the work tree are never written; new blobs go into the object store, as ``git add`` would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from remotedl import proc
from remotedl.errors import RemotedlError, UsageError

SNAPSHOT_PREFIX = "remotedl snapshot of uncommitted work on top of "
DEFAULT_MAX_FILE = 5 << 20
# Directories remotedl (rsync) keeps partial transfers in, never part of the code.
PARTIAL_DIR = ".remotedl-partial"
AUX_NAMES = frozenset({PARTIAL_DIR, ".~tmp~"})
# remotedl's own directory in the project (outputs home, their ledger): never code.
STATE_DIR = ".remotedl"
# The local repository's identity, recorded in the box's repository (see sync.claim_remote_dir).
IDENTITY_KEY = "remotedl.project"

Reason = Literal[
    "large", "environment", "repository", "submodule", "submodule-edits", "lfs-pointer", "pulled"
]
# Under the repository's git directory: the files `pull` wrote (NUL-separated, relative to the
# top), which the snapshot leaves out while they are untracked.
PULLED_FILE = ("remotedl", "pulled")
# The first bytes of a Git LFS pointer file (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md).
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
# Lines of a snapshot's message when submodules or LFS content were put in (see snapshot_changes).
WORK_TREE = "work tree: "
EDITED_SUBMODULE = "edited submodule: "


@dataclass(frozen=True)
class LeftOut:
    """An untracked path the snapshot does not carry, and why; "submodule": a submodule not
    initialised here (its files are not carried); "submodule-edits": a note, not a path left
    out: a submodule whose uncommitted changes go along, as the project's own do;
    "lfs-pointer": a Git LFS file that is only its pointer here (not fetched), sent as such."""

    path: str  # relative to the project root; a directory ends with "/"
    reason: Reason
    size: int = 0  # bytes, for "large"


@dataclass
class Snapshot:
    commit: str | None  # None: an empty repository with nothing to send
    head: str | None
    is_snapshot: bool  # True when commit is a snapshot on top of head, not head itself
    left_out: list[LeftOut] = field(default_factory=list)
    untracked: int = 0  # untracked files carried
    edited: bool = False  # uncommitted work (not only submodules' files) in the snapshot


# ------------------------------------------------------------------ git helpers


def git(
    root: Path, *args: str, env: dict[str, str] | None = None, check: bool = True, input: str | None = None
) -> str:
    result = proc.run(["git", "-C", str(root), *args], env=env, check=False, input=input)
    if check and result.returncode != 0:
        raise RemotedlError(f"git {args[0]} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def git_root(path: Path) -> Path:
    result = proc.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], check=False)
    if result.returncode != 0:
        raise UsageError(
            f"{path} is not in a git repository: push sends code with git",
            # `run` has no --no-code: name the whole command, so the hint works where it is shown.
            hint="run `git init` there first (uncommitted files are pushed too), or "
            "`remotedl push --no-code` to push only data",
        )
    return Path(result.stdout.strip())


def _clean_env() -> dict[str, str]:
    """The user's environment without GIT_* variables that would redirect our git calls."""
    drop = ("GIT_INDEX_FILE", "GIT_DIR", "GIT_WORK_TREE", "GIT_OBJECT_DIRECTORY")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _random_id() -> str:
    import uuid  # here: it imports platform (~3 ms), and every command imports this module

    return uuid.uuid4().hex


def kept_identity(root: Path) -> str:
    """The identity this clone keeps in its config (``project_identity`` made it once), or ""
    (none kept yet, or not in a git repository: ``--local`` needs one)."""
    return git(root, "config", "--local", "--get", IDENTITY_KEY, env=_clean_env(), check=False)


def identity_in_git(root: Path) -> str:
    """The project's identity, or "" outside a git repository: the kept one in one git call
    (every command after the first), else the check that ``root`` is in one, then made."""
    kept = kept_identity(root)
    if kept:
        return kept
    inside = proc.run(["git", "-C", str(root), "rev-parse", "--git-dir"], check=False)
    return project_identity(root) if inside.returncode == 0 else ""


def project_identity(root: Path) -> str:
    """A stable id of the local project, recorded in the box's repository so that a push from
    another project into the same directory is refused: the first (root) commit of HEAD, or,
    in a repository without commits, a random id. It is kept in the repository's own config
    (``git config remotedl.project``: the history is walked once, and the id survives the first
    commit); HEAD, the index, refs and the work tree are not touched."""
    env = _clean_env()
    kept = kept_identity(root)
    if kept:
        return kept
    roots = git(root, "rev-list", "--max-parents=0", "HEAD", env=env, check=False).split()
    made = sorted(roots)[0] if roots else _random_id()
    shallow = git(root, "rev-parse", "--is-shallow-repository", env=env, check=False) == "true"
    if roots and shallow:
        # A shallow clone's "first" commit is only where its history was cut: not kept, so that
        # after `git fetch --unshallow` the clone has the project's identity like any other.
        return made
    # Concurrent pushes may race here (git's config lock): a root commit is the same for all; a
    # random id is whichever got written first.
    git(root, "config", "--local", IDENTITY_KEY, made, env=env, check=False)
    if roots:
        return made
    return git(root, "config", "--local", "--get", IDENTITY_KEY, env=env, check=False) or made


def known_identity(root: Path) -> str:
    """The identity ``project_identity`` gives, found without recording anything (for a plan
    that must change nothing): the kept id, else the first root commit; "" in a repository
    without commits, or outside git."""
    env = _clean_env()
    kept = git(root, "config", "--local", "--get", IDENTITY_KEY, env=env, check=False)
    roots = git(root, "rev-list", "--max-parents=0", "HEAD", env=env, check=False).split()
    return kept or (sorted(roots)[0] if roots else "")


@dataclass(frozen=True)
class Repo:
    """What one ``git rev-parse`` says about the repository holding a path."""

    root: Path
    index: Path
    head: str | None
    head_tree: str | None


def repo_facts(path: Path) -> Repo:
    result = proc.run(
        ["git", "-C", str(path), "rev-parse", "--show-toplevel", "--git-path", "index",
         "--revs-only", "HEAD", "HEAD^{tree}"],
        env=_clean_env(),
        check=False,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) < 2:
        git_root(path)  # raises the error that says what to do
        raise RemotedlError(f"git rev-parse failed in {path}: {result.stderr.strip()}")
    index = Path(lines[1])
    head = lines[2] if len(lines) >= 4 else None
    return Repo(Path(lines[0]), index if index.is_absolute() else path / index, head,
                lines[3] if head else None)  # fmt: skip


# ------------------------------------------------------------------ the snapshot


def _is_env(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or (path / "conda-meta").is_dir()


def _inside(rel: str, prefixes: Sequence[str]) -> bool:
    return any(rel == p or rel.startswith(p + "/") for p in prefixes)


def pulled_file(repo: Repo) -> Path:
    """Where the list of files ``pull`` wrote is kept: beside the index, in the git directory
    (per work tree), never in the work tree."""
    return repo.index.parent.joinpath(*PULLED_FILE)


def read_pulled(repo: Repo) -> frozenset[str]:
    try:
        raw = pulled_file(repo).read_bytes().decode("utf-8", "surrogateescape")
    except OSError:
        return frozenset()
    return frozenset(p for p in raw.split("\0") if p)


def record_pulled(repo: Repo, paths: Sequence[str]) -> None:
    """Add ``paths`` (relative to the top) to the files ``pull`` wrote; those gone are dropped."""
    if not paths:
        return
    known = read_pulled(repo) | set(paths)
    kept = sorted(p for p in known if os.path.lexists(repo.root / p))
    path = pulled_file(repo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes("".join(p + "\0" for p in kept).encode("utf-8", "surrogateescape"))
    tmp.replace(path)


def select_untracked(
    root: Path,
    paths: Sequence[str],
    *,
    data: Sequence[str] = (),
    max_file: int = DEFAULT_MAX_FILE,
    pulled: frozenset[str] = frozenset(),
) -> tuple[list[str], list[LeftOut]]:
    """Split untracked, not-ignored paths (as ``git ls-files --others`` names them, nested
    repositories with a trailing "/") into (those the snapshot carries, those it leaves out)."""
    keep: list[str] = []
    left: list[LeftOut] = []
    envs: dict[str, bool] = {}  # directory (relative) -> is an environment
    seen_env: set[str] = set()
    data = [d.rstrip("/") for d in data]
    for rel in paths:
        if rel.endswith("/"):  # a repository of its own inside the project
            left.append(LeftOut(rel, "repository"))
            continue
        if data and _inside(rel, data):
            continue  # rsync sends it
        if rel in pulled:
            left.append(LeftOut(rel, "pulled"))  # an output brought home, not code
            continue
        parts = rel.split("/")
        if AUX_NAMES.intersection(parts[:-1]) or parts[0] == STATE_DIR:
            continue  # partial transfers; what remotedl keeps here (outputs that came home)
        env_dir = None
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in envs:
                envs[d] = _is_env(root / d)
            if envs[d]:
                env_dir = d
                break
        if env_dir is not None:
            if env_dir not in seen_env:
                seen_env.add(env_dir)
                left.append(LeftOut(env_dir + "/", "environment"))
            continue
        try:
            st = os.lstat(root / rel)
        except FileNotFoundError:
            continue  # gone since git listed it
        if stat.S_ISREG(st.st_mode) and st.st_size > max_file:
            left.append(LeftOut(rel, "large", st.st_size))
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):  # git holds nothing else (fifos...)
            keep.append(rel)
    return keep, left


def _drop_linked_data(root: Path, data: Sequence[str], env: dict[str, str]) -> None:
    """A data path that is a committed symlink (data -> /datasets/imagenet) stays out of the
    snapshot: rsync makes it a directory of the dataset's files on the box, and a link checked
    out there would be replaced by it (a box edit that blocks the next push)."""
    linked = [d.rstrip("/") for d in data if (root / d.rstrip("/")).is_symlink()]
    if not linked:
        return
    listed = git(root, "ls-files", "-z", "-s", "--", *[f":(literal){d}" for d in linked], env=env)
    links = [e.split("\t", 1)[1] for e in listed.split("\0") if e.startswith("120000 ")]
    if links:
        stdin = "".join(x + "\0" for x in links)
        git(root, "update-index", "-z", "--force-remove", "--stdin", env=env, input=stdin)


def _index_facts(root: Path, env: dict[str, str]) -> tuple[list[str], bool]:
    """(the paths of the index's gitlinks (submodules), whether a tracked .gitattributes
    names the Git LFS filter): one pass over the index."""
    listed = proc.run(["git", "-C", str(root), "ls-files", "-s", "-z"], env=env, check=False).stdout
    links, lfs = [], False
    for rec in listed.split("\0"):
        if rec.startswith("160000 "):
            links.append(rec.split("\t", 1)[1])
        elif not lfs and rec.endswith(".gitattributes"):
            rel = rec.split("\t", 1)[1]
            if rel == ".gitattributes" or rel.endswith("/.gitattributes"):
                with contextlib.suppress(OSError):
                    lfs = b"filter=lfs" in (root / rel).read_bytes()
    return links, lfs


def _lfs_content(root: Path, repo: Repo, env: dict[str, str]) -> list[LeftOut]:
    """Put the content of the Git LFS files of the index at ``env``'s GIT_INDEX_FILE in place
    of their pointers, as the work tree has it (the box and a job read the file, not 130 bytes
    of pointer text, and never fetch from an LFS server); the files that are only pointers here
    are named. Hashes are remembered by (size, mtime, inode) beside the index, so an unchanged
    file is hashed once."""
    import json

    listed = git(root, "ls-files", "-s", "-z", "--", ":(attr:filter=lfs)", env=env)
    entries = []
    for rec in listed.split("\0"):
        meta, _, rel = rec.partition("\t")
        if rel and meta.split(" ")[0] in ("100644", "100755"):
            entries.append((meta.split(" ")[0], rel))
    cache_path = repo.index.parent / "remotedl-lfs-hashes.json"
    try:
        cache = json.loads(cache_path.read_text())
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    pointers: list[LeftOut] = []
    known: dict[str, tuple[str, str]] = {}  # path -> (mode, blob)
    fresh: list[tuple[str, str, list[int]]] = []  # (mode, path, stat key) to hash
    for mode, rel in entries:
        try:
            st = os.stat(root / rel)
            with open(root / rel, "rb") as f:
                start = f.read(len(LFS_POINTER))
        except OSError:
            continue
        if start == LFS_POINTER and st.st_size < 1024:
            pointers.append(LeftOut(rel, "lfs-pointer", st.st_size))
            continue
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        hit = cache.get(rel)
        if isinstance(hit, list) and len(hit) == 2 and hit[0] == key and isinstance(hit[1], str):
            known[rel] = (mode, hit[1])
        elif "\n" not in rel:  # hash-object reads paths a line each
            fresh.append((mode, rel, key))
    if known:  # a remembered blob the object store no longer has (gc) is hashed again
        checked = git(
            root, "cat-file", "--batch-check", env=env, input="".join(b + "\n" for _, b in known.values())
        )
        gone = {line.split()[0] for line in checked.splitlines() if line.endswith(" missing")}
        for rel, (mode, blob) in list(known.items()):
            if blob in gone:
                del known[rel]
                st = os.stat(root / rel)
                fresh.append((mode, rel, [st.st_size, st.st_mtime_ns, st.st_ino]))
    if fresh:
        ids = git(root, "hash-object", "-w", "--no-filters", "--stdin-paths", env=env,
                  input="".join(rel + "\n" for _, rel, _ in fresh)).split()  # fmt: skip
        for (mode, rel, key), blob in zip(fresh, ids, strict=True):
            known[rel] = (mode, blob)
            cache[rel] = [key, blob]
        with contextlib.suppress(OSError):
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: v for k, v in cache.items() if k in known}))
            tmp.replace(cache_path)
    if known:
        info = "".join(f"{mode} {blob}\t{rel}\0" for rel, (mode, blob) in known.items())
        git(root, "update-index", "-z", "--index-info", env=env, input=info)
    return pointers


def _copy_objects(sub: Path, root: Path, tree: str, env: dict[str, str]) -> None:
    """Copy ``tree`` and all it holds from the repository at ``sub`` into ``root``'s object
    store: only what ``root`` lacks, as one pack (made visible at once: a present tree means
    all its objects are)."""
    import tempfile  # here: a command that makes no snapshot does not import it

    if proc.run(["git", "-C", str(root), "cat-file", "-e", tree], env=env, check=False).returncode == 0:
        return
    listed = git(sub, "rev-list", "--objects", "--no-object-names", tree, env=env)
    ids = listed.split()
    checked = git(root, "cat-file", "--batch-check", env=env, input="".join(i + "\n" for i in ids))
    lacking = [line.split()[0] for line in checked.splitlines() if line.endswith(" missing")]
    with tempfile.TemporaryFile() as wanted:
        wanted.write("".join(i + "\n" for i in lacking).encode())
        wanted.seek(0)
        packer = proc.popen(
            ["git", "-C", str(sub), "pack-objects", "--stdout", "-q"],
            env=env, stdin=wanted.fileno(), stderr=subprocess.DEVNULL, text=False,
        )  # fmt: skip
        assert packer.stdout is not None
        indexer = proc.popen(
            ["git", "-C", str(root), "index-pack", "--stdin"],
            env=env, stdin=packer.stdout.fileno(), stdout=subprocess.DEVNULL,
        )  # fmt: skip
        packer.stdout.close()
        _, err = indexer.communicate()
        packed = packer.wait()
    if indexer.returncode != 0 or packed != 0:
        raise RemotedlError(f"could not copy the objects of submodule {sub.name}: {err.strip()}")


def _flatten_submodules(
    root: Path, paths: Sequence[str], env: dict[str, str], *, max_file: int, say: Callable[[str], None]
) -> list[LeftOut]:
    """Put each checked-out submodule's snapshot tree in place of its gitlink in the index at
    ``env``'s GIT_INDEX_FILE (see the module's doc); what was left out, and notes."""
    notes: list[LeftOut] = []
    for path in paths:
        sub = root / path
        top = proc.run(["git", "-C", str(sub), "rev-parse", "--show-toplevel"], env=_clean_env(), check=False)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != sub.resolve():
            notes.append(LeftOut(path + "/", "submodule"))  # not initialised: nothing to send
            continue
        say(f"snapshot: submodule {path}")
        snap = take_snapshot(sub, max_file=max_file)
        if snap.commit is None:
            notes.append(LeftOut(path + "/", "submodule"))
            continue
        tree = git(sub, "rev-parse", f"{snap.commit}^{{tree}}", env=_clean_env())
        _copy_objects(sub, root, tree, _clean_env())
        git(root, "update-index", "--force-remove", "--", path, env=env)
        git(root, "read-tree", f"--prefix={path}/", tree, env=env)
        if snap.edited:
            notes.append(LeftOut(path + "/", "submodule-edits"))
        notes += [LeftOut(f"{path}/{x.path}", x.reason, x.size) for x in snap.left_out]
    return notes


def take_snapshot(
    path: Path,
    *,
    data: Sequence[str] = (),
    max_file: int = DEFAULT_MAX_FILE,
    stage: Callable[[str], None] | None = None,
    repo: Repo | None = None,
) -> Snapshot:
    """The commit that holds the work tree's code (see the module's doc); the repository is
    left exactly as it was."""
    import tempfile

    env0 = _clean_env()
    say = stage or (lambda _text: None)
    repo = repo or repo_facts(path)
    root, head = repo.root, repo.head
    with tempfile.TemporaryDirectory(prefix="remotedl-index-") as tmp:
        index = Path(tmp) / "index"
        env = {**env0, "GIT_INDEX_FILE": str(index)}
        if repo.index.is_file():
            shutil.copy2(repo.index, index)  # with its mtime: git's racy-clean check stays right
        elif head:
            git(root, "read-tree", head, env=env)
        say("snapshot: checking tracked files")
        # Tracked files: modified, deleted, and (re)staged; only files whose stat differs from
        # the copied cache are hashed.
        result = proc.run(["git", "-C", str(root), "add", "-u"], env=env, check=False)
        if result.returncode != 0:
            # An index git cannot use from another place (a split index...): start from HEAD.
            index.unlink(missing_ok=True)
            if head:
                git(root, "read-tree", head, env=env)
            git(root, "add", "-u", env=env)
        _drop_linked_data(root, data, env)
        say("snapshot: listing untracked files")
        listed = git(root, "ls-files", "-z", "--others", "--exclude-standard", env=env)
        untracked = [p for p in listed.split("\0") if p]
        keep, left = select_untracked(root, untracked, data=data, max_file=max_file, pulled=read_pulled(repo))
        if keep:
            say(f"snapshot: adding {len(keep)} untracked file{'s' if len(keep) != 1 else ''}")
            proc.run(
                ["git", "-C", str(root), "update-index", "--add", "-z", "--stdin"],
                env=env,
                input="".join(p + "\0" for p in keep),
            )
        tree = git(root, "write-tree", env=env)
        edited = tree != repo.head_tree if head else True
        plain = tree
        links, lfs = _index_facts(root, env)
        if lfs:
            left += _lfs_content(root, repo, env)
        if links:
            left += _flatten_submodules(root, links, env, max_file=max_file, say=say)
        if lfs or links:
            tree = git(root, "write-tree", env=env)
    if head and tree == repo.head_tree:
        return Snapshot(head, head, False, left, len(keep))
    if not head and tree == git(root, "hash-object", "-t", "tree", "--stdin", env=env0, input=""):
        return Snapshot(None, None, False, left, 0)
    ident = {
        **env0,
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
    if tree != plain:
        # Submodules' files and LFS content in place of gitlinks and pointers: the tree of the
        # work itself is kept, so a job's "changed files" are the user's changes, not those.
        edits = "".join(f"\n{EDITED_SUBMODULE}{x.path}" for x in left if x.reason == "submodule-edits")
        message += f"\n\n{WORK_TREE}{plain}{edits}"
    commit = git(root, "commit-tree", tree, *parents, "-m", message, env=ident)
    return Snapshot(commit, head, True, left, len(keep), edited)


def snapshot_changes(root: Path, head: str, commit: str) -> list[str]:
    """The paths a snapshot commit changed against ``head`` as the user changed them: a
    submodule's files or an LFS file's content that the snapshot put in are not changes (a
    submodule with uncommitted changes is its path, ending in "/")."""
    body = git(root, "log", "-1", "--format=%b", commit, check=False)
    base, edited = commit, []
    for line in body.splitlines():
        if line.startswith(WORK_TREE):
            base = line[len(WORK_TREE) :].strip()
        elif line.startswith(EDITED_SUBMODULE):
            edited.append(line[len(EDITED_SUBMODULE) :])
    r = proc.run(["git", "-C", str(root), "diff", "--name-only", "--no-renames", head, base], check=False)
    return (r.stdout.splitlines() if r.returncode == 0 else []) + edited


def snapshot_holds(root: Path, head: str, commit: str) -> list[str]:
    """What a snapshot commit holds besides ``head``, in words: "uncommitted work" (the user's
    changes, a submodule's included), "LFS files' content" and "submodule files" (put in place
    of pointers and gitlinks: no change of the user's). [] when ``commit`` is not in ``root``."""
    body = proc.run(["git", "-C", str(root), "log", "-1", "--format=%b", commit], check=False)
    if body.returncode != 0:
        return []
    base, edited = commit, False
    for line in body.stdout.splitlines():
        if line.startswith(WORK_TREE):
            base = line[len(WORK_TREE) :].strip()
        elif line.startswith(EDITED_SUBMODULE):
            edited = True
    if base == commit:
        return ["uncommitted work"]
    held = []
    same = proc.run(["git", "-C", str(root), "diff", "--quiet", head, base], check=False)
    if edited or same.returncode != 0:
        held.append("uncommitted work")
    links = [
        rec.partition("\t")[2]
        for rec in git(root, "ls-tree", "-r", "-z", base, check=False).split("\0")
        if rec.startswith("160000 ")
    ]
    put = git(root, "diff", "--name-only", "--no-renames", "-z", base, commit, check=False).split("\0")
    under = [any(p == x or p.startswith(x + "/") for x in links) for p in put if p]
    if not all(under):
        held.append("LFS files' content")
    if any(under):
        held.append("submodule files")
    return held


def snapshot_words(held: Sequence[str]) -> str:
    """``snapshot_holds`` as a push or show says it: "of uncommitted work", "of uncommitted
    work, with submodule files", "with LFS files' content"."""
    extra = [x for x in held if x != "uncommitted work"]
    parts = ["of uncommitted work"] if "uncommitted work" in held or not held else []
    if extra:
        parts.append("with " + " and ".join(extra))
    return ", ".join(parts)
