"""Where a project's work tree lives on a box by default, and the tree under the older default.

The default ``remote_dir`` is named after the project's identity (the first commit of its
history, see ``remotedl.snapshot.project_identity``), not after the local folder: two clones of
one repository, in folders of any names, on one laptop or two, share the box's tree, its jobs
and its environment. Projects without an identity (not in git) keep the folder's name.

Earlier versions named the default after the folder (``~/remotedl/<folder>``). A box that holds
such a tree of this project keeps it: when the identity's directory does not exist yet, the box
looks for a tree of this identity under ``~/remotedl/`` (the one named after this folder first,
else the one checked out last) and makes the new name a symbolic link to it. Nothing moves: its
environment (whose scripts hold absolute paths), its jobs' checkouts and their records stay
valid, and remotedl resolves the link wherever it compares trees. Done by push (``ADOPT`` runs
inside the push's own round trip) and by every agent request that carries the ``adopt`` field.

Standard library only: the agent ships this module.
"""

from __future__ import annotations

import os
import subprocess

DEFAULT_PARENT = "~/remotedl"
ID_CHARS = 12  # of the identity in the directory's name: a root commit's abbreviation


def default_remote_dir(identity: str, folder: str) -> str:
    """The default ``remote_dir``: by identity when there is one, else by the folder's name."""
    return f"{DEFAULT_PARENT}/{identity[:ID_CHARS]}" if identity else f"{DEFAULT_PARENT}/{folder}"


# A shell function: `adopt_tree DIR ID OLDNAME` (DIR absolute, the default directory). When DIR
# does not exist, a work tree of project ID directly beside it (the one called OLDNAME first,
# else the one whose index changed last) gets DIR as a relative symbolic link. Only reads each
# candidate's .git/config (no git process per directory). Always returns 0.
ADOPT = r"""
adopt_tree() {
  if [ -e "$1" ] || [ -L "$1" ] || [ -z "$2" ]; then return 0; fi
  _at_parent=${1%/*} _at_pick=
  [ -d "$_at_parent" ] || return 0
  for _at_d in "$_at_parent"/*/; do
    _at_d=${_at_d%/}
    [ -L "$_at_d" ] && continue
    [ -f "$_at_d/.git/config" ] || continue
    grep -qxF "	project = $2" "$_at_d/.git/config" 2>/dev/null || continue
    if [ "${_at_d##*/}" = "$3" ]; then _at_pick=$_at_d; break; fi
    if [ -z "$_at_pick" ] || [ "$_at_d/.git/index" -nt "$_at_pick/.git/index" ]; then _at_pick=$_at_d; fi
  done
  if [ -n "$_at_pick" ]; then ln -s -- "${_at_pick##*/}" "$1" 2>/dev/null || true; fi
  return 0
}
"""


def adopt_tree(remote_dir: str, identity: str, old_name: str) -> None:
    """On the box (the agent): run ``ADOPT`` for ``remote_dir`` (``~/...``) if it is missing."""
    path = os.path.expanduser(remote_dir)
    if not identity or not old_name or os.path.lexists(path) or not os.path.isabs(path):
        return
    subprocess.run(
        ["sh", "-c", ADOPT + 'adopt_tree "$@"', "sh", path, identity, old_name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
