"""Code via git, data via rsync: ``push`` and ``pull``.

Code: the local HEAD, plus a snapshot commit of uncommitted work (see ``remotedl.snapshot``: code
only, made in a temporary index so the local repository is left exactly as it was), is pushed over
SSH into a git work tree at ``remote_dir`` on the box and checked out there. No third-party git
host in between.

Data: the configured paths are rsynced to the same relative place under remote_dir,
incrementally and resumably; nothing is deleted unless asked (see ``remotedl.rsync``).

The box's work tree:

- belongs to one project: its repository records the project's identity (``remotedl.project``)
  and a push from another project, into a directory that is not empty and not ours, or into
  ``~``, ``/`` or a top-level directory, is refused;
- is created atomically (``git init`` aside, then renamed into place, under a lock), so
  concurrent first pushes agree;
- is never overwritten where the box holds content the push would not write: one round trip
  compares the box's files with the new commit (only what differs counts), whatever the number
  of untracked files there; files remotedl itself makes on the box (job directories, environments,
  partial transfers) are in the box repository's ``.git/info/exclude``;
- is never left half-updated: a checkout that fails (a full disk) is rolled back to the previous
  commit, and one that was cut is recognised by the next push as its own.

Every ssh, git and rsync call of one push shares one multiplexed OpenSSH connection, and pushes
from this machine into one box directory take turns (a ``run`` during ``push --watch`` waits for
the watch's push, then pushes: the job sees the saved code).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import posixpath
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl import proc
from remotedl.config import project_relative
from remotedl.errors import ConfigError, RemotedlError, RemoteError, UsageError
from remotedl.rsync import (
    PARTIAL_DIR,
    Progress,
    ProgressFn,
    Stage,
    Transfer,
    literal,
    parse_items,
    protect_args_flag,
    rsync_argv,
    rsync_failure,
    run_rsync,
)
from remotedl.snapshot import (
    DEFAULT_MAX_FILE,
    SNAPSHOT_PREFIX,
    LeftOut,
    Snapshot,
    git_root,
    project_identity,
    record_pulled,
    repo_facts,
    take_snapshot,
)
from remotedl.ssh.channel import EXPAND_HOME, Box, parse_marks
from remotedl.ssh.openssh import control_dir, openssh_failure, ssh_command_string
from remotedl.ssh.resolve import HostSpec
from remotedl.treeid import ADOPT, default_remote_dir

if TYPE_CHECKING:
    from remotedl.agent.client import Before

__all__ = [
    "DEFAULT_MAX_FILE",
    "SNAPSHOT_PREFIX",
    "LeftOut",
    "Progress",
    "ProgressFn",
    "PullResult",
    "PushResult",
    "Snapshot",
    "Stage",
    "Transfer",
    "git_root",
    "pull",
    "push",
    "rsync_argv",
    "rsync_failure",
    "verify_remote_dir",
]

PUSHED_REF = "refs/remotedl/pushed"
PACK_IN_MEMORY = 128 << 20  # a larger change goes by `git push`, streamed, not held here
CHECKOUT_REF = "refs/remotedl/checkout"  # set while a checkout runs: a cut one is recognised
# What remotedl makes inside the box's work tree: never a box edit, never pulled with `pull .`.
BOX_EXCLUDES = ("/.remotedl/", "/.venv/", "/venv/", "/.conda/", f"{PARTIAL_DIR}/", ".~tmp~/")
_EXCLUDE_HEADER = "# remotedl: files remotedl makes on the box (jobs, environments, partial transfers)"


@dataclass
class PushResult:
    remote_dir: str
    commit: str | None
    head: str | None
    snapshot: bool
    code_changed: bool
    transfers: list[Transfer] = field(default_factory=list)
    seconds: float = 0.0
    left_out: list[LeftOut] = field(default_factory=list)
    # The mode remote_dir was made with, when this push made it (None: it was there).
    created_mode: str | None = None
    # Data paths that do not exist here (not sent; the box's copy, if any, left as it is).
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    local_dir: str
    transfers: list[Transfer] = field(default_factory=list)
    # Tracked files with uncommitted edits here that the box's copy would have replaced.
    kept: list[str] = field(default_factory=list)
    # Tracked files the box has in another version, left alone: not named (pull a file by
    # its name to take the box's version).
    kept_tracked: list[str] = field(default_factory=list)
    # Files whose copy here is newer than the box's, left alone.
    kept_newer: list[str] = field(default_factory=list)
    # Files here replaced by the box's newer copy, and tracked files replaced because named.
    replaced: list[str] = field(default_factory=list)
    replaced_tracked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stage(progress: ProgressFn | None, text: str) -> None:
    if progress is not None:
        progress(Stage(text))


# ------------------------------------------------------------------ remote_dir: safe and ours

# remote_dir is made private: the pushed code, snapshots (untracked files too), job checkouts
# and outputs are the user's alone unless ``remote_dir_mode`` opens them to a group.
DEFAULT_DIR_MODE = "0700"


def normalize_remote_dir(remote_dir: str) -> str:
    """``remote_dir`` tidied ("~/a//b/" -> "~/a/b"), or a ConfigError when it names the box's
    home, ``/``, a top-level directory, or climbs with "..": remotedl would put the project's
    files among the box's own."""
    flag = "set another with --remote-dir DIR or `remote_dir` in remotedl.toml (default ~/remotedl/ID)"
    value = remote_dir.strip()
    if not value or "\n" in value or "\0" in value:
        raise ConfigError(f"remote_dir {remote_dir!r} is not a directory name", hint=flag)
    if value == "~" or value.startswith("~/"):
        rest = posixpath.normpath(value[2:]) if len(value) > 1 else "."
        tidy = "~" if rest == "." else "~/" + rest
    elif value.startswith("~"):
        raise ConfigError(f"remote_dir {remote_dir!r}: ~user paths are not supported", hint=flag)
    else:
        rest = posixpath.normpath(value)
        tidy = rest
    if ".." in rest.split("/"):
        raise ConfigError(f"remote_dir {remote_dir!r} climbs out with '..'", hint=flag)
    if tidy in ("~", "."):
        raise ConfigError(
            f"remote_dir {remote_dir!r} is the box's home directory: the project's files would "
            "land among the box user's own",
            hint=flag,
        )
    if tidy.startswith("/") and tidy.count("/") == 1:
        what = "the root directory" if tidy == "/" else "a top-level directory"
        raise ConfigError(f"remote_dir {remote_dir!r} is {what} of the box: refusing it", hint=flag)
    return tidy


# "$1": remote_dir (normalised; "~/..." allowed), "$2": the project's identity ("" if it has
# none), "$3": create (push) | check (run --no-push: must be ours) | pull (must exist, not
# another project's), "$4": a commit: report whether the box is clean at it; "$5": the mode of
# remote_dir when this makes it (octal); "$6": with the default remote_dir, the folder-named
# default of earlier versions (a tree of this project there is kept: see remotedl.treeid), else
# ""; "$7"...: the lines of the box repository's
# .git/info/exclude that are remotedl's (the first is their header).
_PREPARE = (
    EXPAND_HOME
    + ADOPT
    + r"""
set -e
command -v git >/dev/null 2>&1 || { echo "@@nogit"; exit 0; }
id=$2 mode=$3 commit=$4 dmode=$5
d=$(expand_home "$1")
case $d in /*) ;; *) d="$HOME/$d";; esac
if [ -n "$6" ]; then adopt_tree "$d" "$id" "$6"; fi
# The physical path, through the deepest directory that exists (symlinks resolved).
p=$d rest=
while [ ! -d "$p" ]; do rest="/${p##*/}$rest"; p=$(dirname -- "$p"); done
base=$(cd -- "$p" && pwd -P); [ "$base" = / ] && base=
real=$base$rest
home=$(cd -- "$HOME" && pwd -P)
case $real in
  /*/*) ;;
  *) echo "@@unsafe $real is a top-level directory"; exit 0;;
esac
[ "$real" = "$home" ] && { echo "@@unsafe $real is the home directory"; exit 0; }
case $home/ in "$real"/*) echo "@@unsafe $real holds the home directory"; exit 0;; esac
echo "@@dir $real"

owner() {  # the identity check of an existing repository: empty output means go on
  have=$(git -C "$real" config --get remotedl.project 2>/dev/null || true)
  if [ -n "$have" ]; then
    if [ -n "$id" ] && [ "$have" != "$id" ]; then echo "@@other $have"; fi
  elif git -C "$real" config --get remotedl.created >/dev/null 2>&1 \
       || git -C "$real" rev-parse -q --verify refs/remotedl/pushed >/dev/null 2>&1; then
    if [ "$mode" = create ] && [ -n "$id" ]; then git -C "$real" config remotedl.project "$id"; fi
  elif [ "$mode" != pull ]; then
    echo "@@foreign"
  fi
}

if [ -d "$real/.git" ]; then
  verdict=$(owner); [ -n "$verdict" ] && { echo "$verdict"; exit 0; }
elif [ "$mode" = check ]; then
  if [ -e "$real" ]; then echo "@@notours"; else echo "@@missing"; fi; exit 0
elif [ "$mode" = pull ]; then
  [ -d "$real" ] || { echo "@@missing"; exit 0; }
else
  # A new work tree: made aside and renamed into place, under a lock on the parent directory,
  # so that concurrent first pushes agree on one repository (all checks again under it).
  parent=${real%/*}; [ -n "$parent" ] || parent=/
  mkdir -p -- "$parent"
  if command -v flock >/dev/null 2>&1; then exec 9<"$parent"; flock -w 120 9 || true; fi
  if [ -d "$real/.git" ]; then
    verdict=$(owner); [ -n "$verdict" ] && { echo "$verdict"; exit 0; }
  elif [ -e "$real" ] && { [ ! -d "$real" ] || [ -n "$(ls -A -- "$real")" ]; }; then
    echo "@@notempty"; exit 0
  else
    tmp=$(mktemp -d "$parent/.remotedl-new.XXXXXX")
    git init -q "$tmp"
    git -C "$tmp" config remotedl.created 1
    if [ -n "$id" ]; then git -C "$tmp" config remotedl.project "$id"; fi
    # Private unless the user opened it (remote_dir_mode): home directories are often 0755.
    [ -d "$real" ] || { mkdir -m "$dmode" -- "$real"; echo "@@created $dmode"; }
    mv -- "$tmp/.git" "$real/.git"
    rmdir -- "$tmp"
  fi
  exec 9<&-
fi
[ "$mode" = create ] || exit 0
ex=$real/.git/info/exclude
if ! grep -qxF "$7" "$ex" 2>/dev/null; then
  mkdir -p -- "$real/.git/info"
  shift 6; printf '%s\n' "$@" >>"$ex"
fi
cd -- "$real"
head=$(git rev-parse -q --verify HEAD 2>/dev/null || echo none)
echo "@@head $head"
if [ "$head" = "$commit" ] && ! git rev-parse -q --verify refs/remotedl/checkout >/dev/null 2>&1 \
   && [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "@@clean"
fi
"""
)


@dataclass
class RemoteDir:
    path: str  # absolute, physical
    head: str | None  # the checked-out commit (None: nothing yet)
    clean: bool  # at ``head``, no tracked file changed on the box, no checkout pending
    created: str | None = None  # the mode it was made with, when this call made it


def _remote_dir_error(box: Box, remote_dir: str, marks: dict[str, str], ident: str) -> None:
    alias = box.spec.alias
    where = f"{alias}:{marks.get('dir', remote_dir)}"
    flag = "choose another directory with --remote-dir DIR or `remote_dir` in remotedl.toml"
    if "nogit" in marks:
        raise RemoteError(
            f"git is not installed on {alias}",
            hint="install it there (`sudo apt-get install git`), or run `remotedl setup base`",
        )
    if "unsafe" in marks:
        raise ConfigError(f"remote_dir {remote_dir!r} is unsafe on {alias}: {marks['unsafe']}", hint=flag)
    if "other" in marks:
        raise RemoteError(
            f"{where} belongs to another project (its id {marks['other'][:12]}, this project's "
            f"{ident[:12]}): refusing to replace its files",
            hint=flag,
        )
    if "foreign" in marks:
        raise RemoteError(
            f"{where} is a git repository remotedl did not make: refusing to replace its files", hint=flag
        )
    if "notempty" in marks:
        raise RemoteError(
            f"{where} exists, is not empty and is not remotedl's: refusing to push there", hint=flag
        )
    if "notours" in marks:
        raise RemoteError(f"{where} was not made by remotedl: nothing of this project is there", hint=flag)
    if "missing" in marks:
        raise RemoteError(f"{where} does not exist", hint="push first (`remotedl push`)")


def claim_remote_dir(
    box: Box,
    remote_dir: str,
    project_root: Path | None,
    *,
    mode: str = "create",
    commit: str | None = None,
    ident: str | None = None,
    dir_mode: str = DEFAULT_DIR_MODE,
    legacy: str = "",
) -> RemoteDir:
    """Check (and with mode "create", make) the box's work tree for this project; see _PREPARE.
    ``ident``: the project's identity, if the caller has it already; ``legacy``: see
    ``legacy_name``."""
    tidy = normalize_remote_dir(remote_dir)
    if ident is None:
        ident = project_identity(project_root) if project_root is not None and _in_git(project_root) else ""
    out = box.run(
        _PREPARE, tidy, ident, mode, commit or "-", dir_mode, legacy, _EXCLUDE_HEADER, *BOX_EXCLUDES
    )
    marks = parse_marks(out.stdout)
    _remote_dir_error(box, remote_dir, marks, ident)
    head = marks.get("head")
    head = None if head in (None, "none") else head
    return RemoteDir(marks["dir"], head, "clean" in marks, marks.get("created"))


def prepare_remote_dir(box: Box, remote_dir: str) -> tuple[str, str | None]:
    """(absolute path, its HEAD if clean) of a work tree not tied to a project (kept for
    callers of the earlier interface)."""
    rd = claim_remote_dir(box, remote_dir, None)
    return rd.path, rd.head if rd.clean else None


def verify_remote_dir(spec: HostSpec, project_root: Path, remote_dir: str) -> str:
    """For ``run --no-push``: the absolute path of ``remote_dir`` on the box. Refused when it is
    missing, unsafe, or another remotedl project's tree (two projects of one name must never
    run each other's code). A directory remotedl did not make is the user's own choice of
    code on the box ("run what is there"), and runs."""
    box = Box(spec)
    ident = project_identity(project_root) if _in_git(project_root) else ""
    tidy = normalize_remote_dir(remote_dir)
    legacy = legacy_name(tidy, ident, project_root)
    out = box.run(
        _PREPARE, tidy, ident, "check", "-", DEFAULT_DIR_MODE, legacy, _EXCLUDE_HEADER, *BOX_EXCLUDES
    )
    marks = {k: v for k, v in parse_marks(out.stdout).items() if k not in ("foreign", "notours")}
    _remote_dir_error(box, remote_dir, marks, ident)
    return marks["dir"]


# The gate of ``verify_in_band``: the agent call follows only when the check found nothing to
# refuse (its marks are all among these) and the tree is where the agent will look for it
# (``remote_dir`` as given, home expanded, symlinks resolved); else the laptop decides.
_VERIFY_GATE = (
    EXPAND_HOME
    + r"""
case $out in *"@@dir "*) ;; *) exit 0;; esac
if printf '%s\n' "$out" | grep '^@@' | grep -Evq '^@@(dir|head|clean|foreign|notours)( |$)'; then exit 0; fi
real=$(printf '%s\n' "$out" | sed -n 's/^@@dir //p' | head -n 1)
want=$(cd -P -- "$(expand_home "$1")" 2>/dev/null && pwd -P) || exit 0
[ "$want" = "$real" ] || exit 0
"""
)


def verify_in_band(spec: HostSpec, project_root: Path, remote_dir: str) -> Before | None:
    """``verify_remote_dir``'s check as a ``Before`` of the next agent call, so that
    ``run --no-push`` checks the tree and starts the job in one round trip. None where the
    agent could not find the tree by the name given (a relative ``remote_dir``)."""
    from remotedl.agent.client import Before

    tidy = normalize_remote_dir(remote_dir)
    if not tidy.startswith(("/", "~/")):
        return None
    ident = project_identity(project_root) if _in_git(project_root) else ""
    legacy = legacy_name(tidy, ident, project_root)
    args = (tidy, ident, "check", "-", DEFAULT_DIR_MODE, legacy, _EXCLUDE_HEADER, *BOX_EXCLUDES)

    def then(out: str) -> dict[str, Any]:
        marks = {k: v for k, v in parse_marks(out).items() if k not in ("foreign", "notours")}
        _remote_dir_error(Box(spec), remote_dir, marks, ident)
        return {"remote_dir": marks["dir"]}

    return Before(_PREPARE, args, _VERIFY_GATE, then)


def legacy_name(tidy: str, ident: str, project_root: Path) -> str:
    """With the default ``remote_dir`` (named after the identity): the name earlier versions
    gave it (the project folder's), so that the box keeps a tree this project has there;
    "" for a configured remote_dir."""
    return project_root.name if ident and tidy == default_remote_dir(ident, "") else ""


def _in_git(path: Path) -> bool:
    return _git_dir(path) is not None


def _git_dir(path: Path) -> Path | None:
    """The git directory of the repository holding ``path`` (per work tree), or None."""
    r = proc.run(["git", "-C", str(path), "rev-parse", "--absolute-git-dir"], check=False)
    return Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None


# ------------------------------------------------------------------ code: push and check out

# "$1": the work tree, "$2": the commit to check out, "$3": 1 to overwrite box edits, "$4": the
# project's identity (the tree must be this project's), "$5": empty, or a commit the box has, and
# then a pack of "$2"'s objects over it follows on stdin ("$6" objects): one round trip sends and
# checks out (without it, `git push` has sent them).
# A box file is in the way only if its content differs from what the push would write there:
#   conflicts = (DN & DH) | (DN & added) | (DH & deleted)
# DH: tracked files whose box content differs from HEAD (`git status`); DN: files of the new
# commit whose box content differs from it; added/deleted: what the new commit adds to or
# removes from HEAD. When the box is clean and no added path exists there (the usual push),
# there can be none, and DN is not computed. Both diffs reuse the box index's stat cache, so
# only changed files are hashed, and untracked files elsewhere on the box cost nothing. Paths
# are compared as git quotes them.
_CHECKOUT = r"""
set -e
trap '' HUP PIPE  # a dropped connection must not stop a checkout half-way
{ cd -- "$1" && [ -d .git ]; } 2>/dev/null || { echo "@@gone"; exit 0; }
new=$2
have=$(git config --get remotedl.project 2>/dev/null || true)
if [ -n "$4" ] && [ "$have" != "$4" ]; then
  if [ -n "$have" ]; then echo "@@other $have"; else echo "@@gone"; fi; exit 0  # unclaimed: prepare
fi
if command -v flock >/dev/null 2>&1; then exec 9<.git; flock -w 300 9 || true; fi
# Files arrive as the laptop has them (Git LFS content included): no Git LFS filter of the
# box's git rewrites them (one would fetch pointers from a server the box cannot reach).
if [ "$(git config --local --get filter.lfs.required 2>/dev/null)" != false ]; then
  for k in process clean smudge; do git config "filter.lfs.$k" ""; done
  git config filter.lfs.required false
fi
if [ -n "$5" ]; then
  # The new commit's objects follow on stdin, as a pack over "$5", a commit the box has.
  git cat-file -e "$5^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
  # (index-pack has no -q; whatever goes wrong here, `git push` sends the objects instead.)
  if [ "$6" -lt 100 ]; then git unpack-objects -q 2>/dev/null || true
  else git index-pack --stdin --fix-thin >/dev/null 2>&1 || true; fi
  git cat-file -e "$new^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
  git update-ref refs/remotedl/pushed "$new"
  nohup git gc --auto -q </dev/null >/dev/null 2>&1 9<&- &
else
  git cat-file -e "$new^{commit}" 2>/dev/null || { echo "@@needpush"; exit 0; }
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/remotedl-checkout.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
head=$(git rev-parse -q --verify HEAD 2>/dev/null || echo none)
pending=$(git rev-parse -q --verify refs/remotedl/checkout 2>/dev/null || true)
git status --porcelain --untracked-files=no --no-renames >"$tmp/st"
if [ "$head" = "$new" ] && [ -z "$pending" ] && [ ! -s "$tmp/st" ]; then
  echo "@@unchanged"; exit 0
fi
if [ "$3" != 1 ]; then
  { grep -v -e '^.D ' -e '^D  ' "$tmp/st" || true; } | cut -c4- >"$tmp/dh_m"
  if [ "$head" != none ]; then
    git diff --name-only -z --no-renames --diff-filter=A "$head" "$new" -- >"$tmp/add0"
  else
    git ls-tree -r -z --name-only "$new" >"$tmp/add0"
  fi
  in_way=$(xargs -0 sh -c 'for p; do if [ -e "$p" ] || [ -L "$p" ]; then echo y; exit; fi; done' sh \
    <"$tmp/add0")
  if [ -s "$tmp/dh_m" ] || [ -n "$in_way" ]; then
    tab=$(printf '\t')
    if [ "$head" != none ]; then
      git diff --name-status --no-renames "$head" "$new" -- >"$tmp/sw"
    else
      git ls-tree -r --name-only "$new" | sed "s/^/A$tab/" >"$tmp/sw"
    fi
    if [ -f .git/index ]; then cp -p .git/index "$tmp/index"; fi
    GIT_INDEX_FILE=$tmp/index git read-tree -m "$new" 2>/dev/null \
      || GIT_INDEX_FILE=$tmp/index git read-tree "$new"
    GIT_INDEX_FILE=$tmp/index git update-index -q --refresh >/dev/null 2>&1 || true
    GIT_INDEX_FILE=$tmp/index git diff-files --name-status >"$tmp/dn"
    { grep -v '^D' "$tmp/dn" || true; } | cut -f2- >"$tmp/dn_m"
    { grep '^A' "$tmp/sw" || true; } | cut -f2- >"$tmp/add"
    { grep '^D' "$tmp/sw" || true; } | cut -f2- >"$tmp/del"
    {
      grep -Fxf "$tmp/dh_m" "$tmp/dn_m" || true
      grep -Fxf "$tmp/add" "$tmp/dn_m" || true
      grep -Fxf "$tmp/del" "$tmp/dh_m" || true
    } | sort -u >"$tmp/c"
    if [ -n "$pending" ] && [ -s "$tmp/c" ]; then
      # A checkout of ours was cut: the files it was writing are ours, whatever they hold now.
      if [ "$head" != none ]; then git diff --name-only --no-renames "$head" "$pending" --
      else git ls-tree -r --name-only "$pending"; fi >"$tmp/ours"
      { grep -vFxf "$tmp/ours" "$tmp/c" || true; } >"$tmp/c2"
      mv -- "$tmp/c2" "$tmp/c"
    fi
    if [ -s "$tmp/c" ]; then echo "@@dirty"; cat -- "$tmp/c"; exit 0; fi
  fi
fi
git update-ref refs/remotedl/checkout "$new"
if git checkout -q -f --detach "$new" 2>"$tmp/err"; then
  git update-ref -d refs/remotedl/checkout
  echo "@@changed"; exit 0
fi
# Failed half-way (a full disk...): what it added goes, the rest goes back to the old commit.
if [ "$head" != none ]; then
  git diff --name-only -z --no-renames --diff-filter=A "$head" "$new" -- | xargs -0 rm -f --
  git checkout -q -f --detach "$head" 2>/dev/null && git update-ref -d refs/remotedl/checkout \
    && echo "@@rolledback" || true
else
  git ls-tree -r -z --name-only "$new" | xargs -0 rm -f --
  git update-ref -d refs/remotedl/checkout && echo "@@rolledback" || true
fi
echo "@@failed"; head -n 3 -- "$tmp/err"
"""


LISTING_CAP = 8_000_000  # bytes of listing; past it, rsync decides (a huge data tree)

# The same checkout, then (in the same round trip) a listing of the data paths under "$1":
# "$7" is a token naming the listing's start, "$8"...: the data paths relative to "$1". From it
# the laptop decides whether rsync has anything to send (``_unchanged``). GNU find's -printf
# only: elsewhere no listing comes, and rsync decides as before.
_CHECKOUT_AND_LIST = (
    "_rdl_checkout() {\n"
    + _CHECKOUT
    + r"""}
( _rdl_checkout "$@" ) || exit $?
d=$1; tok=$7; shift 7
cd -- "$d" 2>/dev/null || exit 0
find --version >/dev/null 2>&1 || exit 0
printf '\n@@list %s\n' "$tok"
find "$@" -printf '%y %m %s %T@ %p\0%l\0' 2>/dev/null | head -c {cap}
""".replace("{cap}", str(LISTING_CAP))
)


def _split_listing(stdout: bytes, token: str) -> tuple[str, bytes | None]:
    """(the checkout's answer, the listing or None when none came)."""
    marker = f"\n@@list {token}\n".encode()
    at = stdout.find(marker)
    if at < 0:
        return stdout.decode(errors="replace"), None
    return stdout[:at].decode(errors="replace"), stdout[at + len(marker) :]


Entry = tuple[str, str, int, int, str]  # type (find's %y), mode (octal), size, mtime in ns, link


def parse_listing(raw: bytes) -> dict[str, Entry] | None:
    """The box's entries by path, or None if the listing was cut (too big) or unreadable."""
    if len(raw) >= LISTING_CAP or (raw and not raw.endswith(b"\0")):
        return None
    parts = raw.split(b"\0")[:-1]
    if len(parts) % 2:
        return None
    out: dict[str, Entry] = {}
    try:
        for head, link in zip(parts[0::2], parts[1::2], strict=True):
            kind, mode, size, mtime, path = head.split(b" ", 4)
            sec, _, frac = mtime.decode().partition(".")
            ns = int(sec) * 1_000_000_000 + int((frac + "000000000")[:9])
            out[os.fsdecode(path)] = (kind.decode(), mode.decode(), int(size), ns, os.fsdecode(link))
    except ValueError:
        return None
    return out


def _entry(st: os.stat_result, path: str) -> Entry | None:
    import stat

    mode = format(stat.S_IMODE(st.st_mode), "o")
    if stat.S_ISREG(st.st_mode):
        return ("f", mode, st.st_size, st.st_mtime_ns, "")
    if stat.S_ISDIR(st.st_mode):
        return ("d", mode, 0, 0, "")
    if stat.S_ISLNK(st.st_mode):
        return ("l", mode, 0, 0, os.readlink(path))
    return None  # a fifo, socket or device: rsync decides


def _same(here: Entry, there: Entry) -> bool:
    kind, mode, size, mtime, link = here
    if kind != there[0]:
        return False
    if kind == "f":
        return (mode, size, mtime) == there[1:4]
    if kind == "d":
        return mode == there[1]
    return link == there[4]


def _unchanged(root: Path, rel: str, box: dict[str, Entry], limit: int = 200_000) -> bool:
    """Whether rsync -a of ``rel`` would find nothing to send: every file here is on the box
    with the same type, mode, size and modification time (to the nanosecond: rsync's quick
    check, stricter), every link with the same target. Any doubt: False (rsync decides)."""
    top = root / rel
    try:
        linked_dir = top.is_symlink() and top.is_dir()  # followed at the top, as push sends it
        first = _entry(top.stat() if linked_dir else top.lstat(), str(top))
        if first is None or not _same(first, box.get(rel, ("", "", 0, 0, ""))):
            return False
        if first[0] != "d":
            return True
        stack = [(str(top), rel)]
        seen = 0
        while stack:
            here, name = stack.pop()
            with os.scandir(here) as it:
                for e in it:
                    seen += 1
                    if seen > limit:
                        return False
                    path = f"{name}/{e.name}"
                    mine = _entry(e.stat(follow_symlinks=False), e.path)
                    if mine is None or not _same(mine, box.get(path, ("", "", 0, 0, ""))):
                        return False
                    if mine[0] == "d":
                        stack.append((e.path, path))
    except OSError:
        return False
    return True


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


def unquote_git_path(name: str) -> str:
    """A path as git prints it (C-quoted when it holds odd bytes) back to the path."""
    if not (len(name) >= 2 and name[0] == '"' and name[-1] == '"'):
        return name
    raw = bytearray()
    body = name[1:-1].encode("utf-8", "surrogateescape")
    i = 0
    simple = {
        ord("n"): 10,
        ord("t"): 9,
        ord("r"): 13,
        ord("a"): 7,
        ord("b"): 8,
        ord("f"): 12,
        ord("v"): 11,
        ord("\\"): 92,
        ord('"'): 34,
    }
    while i < len(body):
        c = body[i]
        if c == 92 and i + 1 < len(body):
            n = body[i + 1]
            if n in simple:
                raw.append(simple[n])
                i += 2
                continue
            if 48 <= n <= 55 and i + 3 < len(body):
                raw.append(int(body[i + 1 : i + 4], 8))
                i += 4
                continue
        raw.append(c)
        i += 1
    return raw.decode("utf-8", "replace")


def _git_push(box: Box, root: Path, abs_dir: str, commit: str) -> None:
    spec = box.spec
    env = {**os.environ, "GIT_SSH_COMMAND": ssh_command_string(spec), "GIT_SSH_VARIANT": "ssh"}
    url = f"ssh://{spec.alias}{abs_dir}"
    argv = ["git", "-C", str(root), "push", "-q", "--no-verify", url, f"+{commit}:{PUSHED_REF}"]
    shallow = proc.run(["git", "-C", str(root), "rev-parse", "--is-shallow-repository"], check=False)
    if shallow.stdout.strip() == "true":
        # A shallow clone (`git clone --depth N`): the box takes its history as shallow as it
        # is here, where receive-pack would refuse it ("shallow update not allowed").
        argv[4:4] = ["--receive-pack=git -c receive.shallowUpdate=true receive-pack"]
    for attempt in range(3):
        result = proc.run(argv, env=env, check=False)
        if result.returncode == 0:
            return
        if "Could not read from remote repository" in result.stderr:
            raise openssh_failure(spec, result.stderr)
        # Another laptop's push moved the same ref at this moment: take turns.
        if "lock" in result.stderr and attempt < 2:
            time.sleep(0.2 * (attempt + 1))
            continue
        break
    raise RemotedlError(f"git push to {spec.alias} failed: {result.stderr.strip()}")


def _checkout(
    box: Box,
    abs_dir: str,
    commit: str,
    *,
    force: bool,
    ident: str,
    pack: tuple[str, int, bytes] | None = None,
    listing: Sequence[str] = (),
    listed: dict[str, dict[str, Entry] | None] | None = None,
) -> dict[str, str] | None:
    """Run _CHECKOUT; its marks, or None when the box wants a `git push` first (the tree went
    away, or lacks the pack's base). ``listing``: data paths the same request lists, into
    ``listed`` (left empty where the box gave no listing)."""
    import secrets

    spec = box.spec
    base, count, data = pack if pack is not None else ("", 0, b"")
    args = [abs_dir, commit, "1" if force else "0", ident, base, str(count)]
    if listing:
        token = secrets.token_hex(8)
        out = box.run(_CHECKOUT_AND_LIST, *args, token, *listing, stdin=data)
        stdout, raw = _split_listing(out.stdout_bytes, token)
        if raw is not None and listed is not None:
            entries = parse_listing(raw)
            listed.update(dict.fromkeys(listing, entries))
    else:
        out = box.run(_CHECKOUT, *args, stdin=data)
        stdout = out.stdout
    marks = parse_marks(stdout)
    if "gone" in marks or "needpush" in marks:
        return None
    if "other" in marks:
        raise RemoteError(
            f"{spec.alias}:{abs_dir} belongs to another project (its id {marks['other'][:12]}, this "
            f"project's {ident[:12]}): refusing to replace its files",
            hint="choose another directory with --remote-dir DIR or `remote_dir` in remotedl.toml",
        )
    if "dirty" in marks:
        listed_files = stdout.split("@@dirty", 1)[1].strip().splitlines()
        files = [unquote_git_path(f) for f in listed_files]
        shown = ", ".join(files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
        raise RemoteError(
            f"the work tree on {spec.alias} ({abs_dir}) has edits that were not pushed from here: {shown}",
            hint="bring them home with `remotedl pull PATH...`, "
            "or overwrite them with `remotedl push --force`",
        )
    if "failed" in marks:
        why = stdout.split("@@failed", 1)[1].strip().splitlines()
        reason = next((w for w in why if w.strip()), "git checkout failed")
        state = (
            "the box's tree is back at the previous commit"
            if "rolledback" in marks
            else "the next push will finish it"
        )
        raise RemoteError(
            f"checkout on {spec.alias} ({abs_dir}) failed: {reason.removeprefix('error: ')}; {state}",
            hint="free space on the box (`remotedl status` shows its disks) and push again",
        )
    return marks


def push_code(
    box: Box, root: Path, abs_dir: str, commit: str, *, force: bool, ident: str = "",
    progress: ProgressFn | None = None,
) -> bool:  # fmt: skip
    """Send ``commit`` to the box with `git push` and check it out there; True if the box's
    tree changed."""
    if box.noise:
        raise startup_noise_error(box, "git")
    _stage(progress, f"code: sending {commit[:10]}")
    _git_push(box, root, abs_dir, commit)
    _stage(progress, "code: checking the box's files and checking out")
    marks = _checkout(box, abs_dir, commit, force=force, ident=ident)
    if marks is None:
        raise RemoteError(f"{abs_dir} went away on {box.spec.alias} during the push", hint="push again")
    return "changed" in marks


def _pack(root: Path, commit: str, base: str) -> tuple[str, int, bytes] | None:
    """A thin pack of ``commit``'s objects that ``base`` lacks, or None (base not here)."""
    if proc.run(["git", "-C", str(root), "cat-file", "-e", f"{base}^{{commit}}"], check=False).returncode:
        return None
    done = proc.communicate(
        ["git", "-C", str(root), "pack-objects", "--stdout", "--revs", "--thin", "--delta-base-offset", "-q"],
        input=f"{commit}\n^{base}\n".encode(),
        max_stdout=PACK_IN_MEMORY,  # past it, `git push` streams the objects instead
    )
    if done.returncode != 0 or done.truncated or len(done.stdout) < 12:
        return None
    return base, int.from_bytes(done.stdout[8:12], "big"), done.stdout


@dataclass
class _Known:
    """What this machine learnt of a box work tree at the last push: its path, and the commit
    it holds (a base for the next pack). Only a shortcut: the box checks both every time."""

    path: str
    commit: str | None


def _known_file(spec: HostSpec, tidy: str, ident: str, git_dir: Path | None) -> Path | None:
    """Where the memo of one box work tree is kept: in the project's git directory (beside its
    index, so it goes with the project), one per host and directory; none outside git."""
    if git_dir is None:
        return None
    key = f"{spec.user}@{spec.hostname}:{spec.port}:{tidy}:{ident}"
    return git_dir / f"remotedl-push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _sweep_control_dir() -> None:
    """Remove what older versions left in the control directory for good: a ``push-*.json``
    memo per project and host (now in the project's git directory) and a ``push-*.lock`` each
    (now removed after its push): those no push holds."""
    with contextlib.suppress(OSError):
        for old in control_dir().glob("push-*.json"):
            old.unlink(missing_ok=True)
        for lock in control_dir().glob("push-*.lock"):
            with _held(lock, block=False) as got:
                if got:
                    lock.unlink(missing_ok=True)


def _load_known(path: Path | None) -> _Known | None:
    import json

    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        p, c = raw["path"], raw.get("commit")
        if isinstance(p, str) and p.startswith("/") and (c is None or isinstance(c, str)):
            return _Known(p, c)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _save_known(path: Path | None, known: _Known | None) -> None:
    import json

    if path is None:
        return
    if known is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(known)))
    tmp.replace(path)


# ------------------------------------------------------------------ one push at a time


@contextlib.contextmanager
def push_lock(spec: HostSpec, abs_or_configured_dir: str) -> Iterator[None]:
    """Pushes from this machine into one box directory take turns (``push --watch`` and ``run``)."""
    key = f"{spec.user}@{spec.hostname}:{spec.port}:{abs_or_configured_dir}"
    path = control_dir() / f"push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    with _held(path, block=True):
        try:
            yield
        finally:
            # Gone with the push that held it: a push waiting on it finds it unlinked and
            # takes the next one (``_held``), so no lock file outlives its pushes.
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def _held(path: Path, *, block: bool) -> Iterator[bool]:
    """Hold an exclusive lock on the file at ``path`` (made if missing): the lock of the file
    that is at ``path`` once locked, not of one unlinked meanwhile. False when ``block`` is
    False and another holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # unlinked by the push that held it: lock the next one
    try:
        yield True
    finally:
        os.close(fd)


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
