"""``push --watch``: push code and data whenever the project changes.

The project is watched with ``watchfiles`` (inotify / FSEvents / ReadDirectoryChangesW through
the Rust ``notify`` crate): a burst of saves is one push, made ``step`` ms after the burst ends
(at most ``debounce`` ms after it began). Each push is an ordinary ``sync.push`` with the same
rules (snapshot limits, ignores, box edits are refused) over the same shared SSH connection; it
sends code only when code changed and rsyncs only the data paths that changed. A refused or
failed push is reported and watching goes on; the next change tries again.

Pushes into one box directory from this machine take turns (``sync.push_lock``), so a ``run``
started while a watch is going on waits for the watch's push in flight and then pushes itself:
the job sees the saved code.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from remotedl import proc, sync
from remotedl.errors import RemotedlError, RemoteError
from remotedl.rsync import PARTIAL_DIR, ProgressFn
from remotedl.ssh.resolve import HostSpec

EventKind = Literal["pushed", "refused", "failed"]


@dataclass
class WatchEvent:
    """One push of the watch: what changed, and what became of it."""

    kind: EventKind
    changed: list[str]  # paths (relative to the project) that triggered it; [] for the first push
    at: float  # time.time() when it ended
    seconds: float
    result: sync.PushResult | None = None
    error: RemotedlError | None = None


@dataclass
class WatchSummary:
    pushes: int = 0
    refused: int = 0
    failed: int = 0
    events: list[WatchEvent] = field(default_factory=list)


def _watch_filter(root: Path) -> Callable[..., bool]:
    import watchfiles

    class Filter(watchfiles.DefaultFilter):
        # watchfiles' defaults (.git, .venv, __pycache__, editor swap files...), plus what rsync
        # keeps aside and conda environments.
        ignore_dirs = (*watchfiles.DefaultFilter.ignore_dirs, PARTIAL_DIR, ".~tmp~", ".conda")

    return Filter()


def relevant(root: Path, paths: Iterable[str], data: Sequence[str]) -> tuple[bool, list[str], list[str]]:
    """(code changed, data paths changed, the changed paths shown) for a batch of absolute
    paths: files .gitignore excludes are not code, files under a data path are that path's."""
    rels = []
    for p in paths:
        try:
            rel = Path(p).relative_to(root).as_posix()
        except ValueError:
            continue
        if rel != ".":
            rels.append(rel)
    data_hit = [d for d in data if any(r == d or r.startswith(d + "/") for r in rels)]
    code = [r for r in rels if not any(r == d or r.startswith(d + "/") for d in data)]
    if code:
        out = proc.run(
            ["git", "-C", str(root), "check-ignore", "-z", "--stdin"],
            input="".join(r + "\0" for r in code),
            check=False,
        ).stdout
        ignored = set(out.split("\0"))
        code = [r for r in code if r not in ignored]
    in_data = [r for r in rels if any(r == d or r.startswith(d + "/") for d in data_hit)]
    return bool(code), data_hit, sorted({*code, *in_data})


def watch(
    spec: HostSpec,
    project_root: Path,
    remote_dir: str,
    *,
    data: Sequence[str] = (),
    excludes: Sequence[str] = (),
    delete: bool = False,
    force: bool = False,
    max_snapshot_file: int = sync.DEFAULT_MAX_FILE,
    on_event: Callable[[WatchEvent], None] | None = None,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    step_ms: int = 50,
    debounce_ms: int = 1600,
    max_pushes: int | None = None,
    dir_mode: str = sync.DEFAULT_DIR_MODE,
) -> WatchSummary:
    """Push now, then on every change until ``stop`` is set (or Ctrl-C: KeyboardInterrupt
    reaches the caller, in whose thread the pushes run), or after ``max_pushes`` pushes."""
    import watchfiles

    root = sync.git_root(project_root)
    rels = [sync._relative_in(root, d) for d in data]
    summary = WatchSummary()

    def one(changed: list[str], code: bool, data_paths: Sequence[str]) -> None:
        t0 = time.perf_counter()
        event: WatchEvent
        try:
            # Every data path stays out of the snapshot; only the changed ones are rsynced.
            result = sync.push(
                spec, root, remote_dir, data=rels, send_data=data_paths, excludes=excludes,
                delete=delete, force=force, code=code, max_snapshot_file=max_snapshot_file,
                progress=progress, dir_mode=dir_mode,
            )  # fmt: skip
            event = WatchEvent("pushed", changed, time.time(), time.perf_counter() - t0, result)
            summary.pushes += 1
        except RemoteError as e:  # box edits in the way, a failed checkout, a box-side error
            kind: EventKind = "refused" if "not pushed from here" in e.message else "failed"
            event = WatchEvent(kind, changed, time.time(), time.perf_counter() - t0, error=e)
            summary.refused += kind == "refused"
            summary.failed += kind == "failed"
        except RemotedlError as e:  # the connection, the local repository: try again on the next change
            event = WatchEvent("failed", changed, time.time(), time.perf_counter() - t0, error=e)
            summary.failed += 1
        summary.events.append(event)
        if on_event is not None:
            on_event(event)

    def done() -> bool:
        return max_pushes is not None and len(summary.events) >= max_pushes

    # The watcher runs from before the first push, in a thread of its own: a save made while a
    # push runs waits in the queue for the next one, and none is missed.
    ended = threading.Event()
    batches: queue.Queue[set[str] | BaseException] = queue.Queue()
    ready = threading.Event()

    def watcher() -> None:
        try:
            for changes in watchfiles.watch(
                root,
                watch_filter=_watch_filter(root),
                step=step_ms,
                debounce=debounce_ms,
                stop_event=ended,
                rust_timeout=500,
                yield_on_timeout=True,  # an empty batch now and then: the watcher is in place
                raise_interrupt=False,
            ):
                ready.set()
                if changes:
                    batches.put({p for _, p in changes})
        except BaseException as e:  # handed to the caller's thread
            batches.put(e)
        finally:
            ready.set()

    thread = threading.Thread(target=watcher, name="remotedl-watch", daemon=True)
    thread.start()
    try:
        ready.wait(30)
        one([], True, rels)
        while not done() and not (stop is not None and stop.is_set()):
            try:
                got = batches.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(got, BaseException):
                raise RemotedlError(f"watching {root} failed: {got}") from got
            paths = set(got)
            while True:  # saves made during the last push: one push for all of them
                try:
                    more = batches.get_nowait()
                except queue.Empty:
                    break
                if isinstance(more, BaseException):
                    batches.put(more)
                    break
                paths |= more
            code, data_paths, shown = relevant(root, paths, rels)
            if code or data_paths:
                one(shown, code, data_paths)
    finally:
        ended.set()
        thread.join(5)
    return summary
    for changes in watchfiles.watch(
        root,
        watch_filter=_watch_filter(root),
        step=step_ms,
        debounce=debounce_ms,
        stop_event=stop,
        raise_interrupt=True,
    ):
        code, data_paths, shown = relevant(root, (p for _, p in changes), rels)
        if not code and not data_paths:
            continue
        one(shown, code, data_paths)
        if done():
            break
    return summary
