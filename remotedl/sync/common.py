"""What every part of a push or pull shares: the refs and the names remotedl keeps in the box's
work tree, the results of ``push`` and ``pull``, and the progress stages."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.rsync import PARTIAL_DIR, ProgressFn, Stage, Transfer
from remotedl.snapshot import LeftOut

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
