"""``remote_dir``: safe and ours. Normalised, made private, claimed for one project (a push from
another project, into a directory not ours, or into ``~``, ``/`` or a top-level directory is
refused) and verified before a job runs in it."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl import proc
from remotedl.errors import ConfigError, RemoteError
from remotedl.snapshot import identity_in_git
from remotedl.ssh.channel import EXPAND_HOME, Box, parse_marks
from remotedl.ssh.resolve import HostSpec
from remotedl.sync.common import _EXCLUDE_HEADER, BOX_EXCLUDES
from remotedl.treeid import ADOPT, default_remote_dir

if TYPE_CHECKING:
    from remotedl.agent.client import Before

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
        ident = identity_in_git(project_root) if project_root is not None else ""
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
    ident = identity_in_git(project_root)
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
    ident = identity_in_git(project_root)
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
