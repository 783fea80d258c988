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

The package, by concern: ``common`` (the refs, the names remotedl keeps in the box's work tree,
the results), ``remote_dir`` (safe and ours), ``code`` (the pack, the checkout and the data
listing in one round trip; one push at a time) and ``transfer`` (``push`` and ``pull``). Every
public name is here too.
"""

from __future__ import annotations

from remotedl.rsync import (
    Progress,
    ProgressFn,
    Stage,
    Transfer,
    rsync_argv,
    rsync_failure,
)
from remotedl.snapshot import (
    DEFAULT_MAX_FILE,
    SNAPSHOT_PREFIX,
    LeftOut,
    Snapshot,
    git_root,
    take_snapshot,
)
from remotedl.ssh.channel import (
    Box,
)
from remotedl.sync.code import (
    LISTING_CAP,
    Entry,
    parse_listing,
    push_code,
    push_lock,
    startup_noise_error,
    unquote_git_path,
)
from remotedl.sync.common import (
    BOX_EXCLUDES,
    CHECKOUT_REF,
    PACK_IN_MEMORY,
    PUSHED_REF,
    PullResult,
    PushResult,
)
from remotedl.sync.remote_dir import (
    DEFAULT_DIR_MODE,
    RemoteDir,
    claim_remote_dir,
    legacy_name,
    normalize_remote_dir,
    prepare_remote_dir,
    verify_in_band,
    verify_remote_dir,
)
from remotedl.sync.transfer import (
    _relative_in,
    code_snapshot,
    pull,
    push,
)

__all__ = [
    "BOX_EXCLUDES",
    "CHECKOUT_REF",
    "DEFAULT_DIR_MODE",
    "DEFAULT_MAX_FILE",
    "LISTING_CAP",
    "PACK_IN_MEMORY",
    "PUSHED_REF",
    "SNAPSHOT_PREFIX",
    "Box",
    "Entry",
    "LeftOut",
    "Progress",
    "ProgressFn",
    "PullResult",
    "PushResult",
    "RemoteDir",
    "Snapshot",
    "Stage",
    "Transfer",
    "_relative_in",
    "claim_remote_dir",
    "code_snapshot",
    "git_root",
    "legacy_name",
    "normalize_remote_dir",
    "parse_listing",
    "prepare_remote_dir",
    "pull",
    "push",
    "push_code",
    "push_lock",
    "rsync_argv",
    "rsync_failure",
    "startup_noise_error",
    "take_snapshot",
    "unquote_git_path",
    "verify_in_band",
    "verify_remote_dir",
]
