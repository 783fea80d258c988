"""Turn library progress callbacks into a status line and rich progress bars (only on a terminal).

Two kinds of report arrive: a ``Stage`` (what a push is doing: the snapshot, git, the box's
check) becomes the one status line with a spinner; a ``Progress`` of an rsync transfer becomes a
bar per data path: bytes sent of the bytes this transfer sends (a pulsing bar until rsync's dry
run beside a long transfer has told that total), the rate and the time left.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from remotedl.cli.common import size_text  # the units of every other size remotedl prints
from remotedl.env import Environment

if TYPE_CHECKING:
    from remotedl.rsync import Progress, ProgressFn, Stage


def bar_fields(ev: Progress) -> tuple[float, float | None, str]:
    """(completed, total or None, text) for a transfer's bar: never more done than the total,
    and 100% only when the transfer ended."""
    if ev.done:
        total = float(max(ev.total or 0, ev.bytes_done, 1))
        return total, total, f"{size_text(ev.bytes_done)} sent"
    if ev.total is None:
        return float(ev.bytes_done), None, f"{size_text(ev.bytes_done)} sent"
    total = float(max(ev.total, 1))
    done = float(min(ev.bytes_done, ev.total))
    return done, total, f"{size_text(int(done))} of {size_text(ev.total)}"


class LiveProgress:
    """The ProgressFn a terminal gets, plus ``log`` for lines printed above the live display
    (through its console, so the status line is redrawn below them, not torn)."""

    def __init__(self, env: Environment) -> None:
        from rich.progress import BarColumn, SpinnerColumn, Task, TaskID, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars
        from rich.progress_bar import ProgressBar
        from rich.text import Text

        class _Bar(BarColumn):
            """No bar on the status line."""

            def render(self, task: Task) -> Text | ProgressBar:  # type: ignore[override]
                return Text("") if task.fields.get("stage") else super().render(task)

        class _Left(TimeRemainingColumn):
            """No time left on the status line."""

            def render(self, task: Task) -> Text:
                return Text("") if task.fields.get("stage") else super().render(task)

        self.bars = Bars(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            _Bar(),
            TextColumn("{task.fields[size]}"),
            TextColumn("{task.fields[rate]}"),
            _Left(),
            console=env.console(env.stderr),
            transient=True,
        )
        self._status: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}

    def __call__(self, ev: Progress | Stage) -> None:
        from rich.markup import escape

        from remotedl.rsync import Stage

        bars = self.bars
        if isinstance(ev, Stage):
            text = escape(ev.text)
            if self._status is None:
                self._status = bars.add_task(text, total=None, size="", rate="", stage=True)
            bars.update(self._status, description=text, visible=True)
            return
        if self._status is not None:
            bars.update(self._status, visible=False)
        if ev.label not in self._tasks:
            self._tasks[ev.label] = bars.add_task(escape(ev.label), total=None, size="", rate="")
        completed, total, size = bar_fields(ev)
        # A finished transfer's bar goes; the next transfer of the same path gets it back.
        bars.update(self._tasks[ev.label], completed=completed, total=total, size=size, rate=ev.rate,
                    visible=not ev.done)  # fmt: skip
        if ev.done:
            bars.reset(self._tasks[ev.label], total=None, visible=False)

    def log(self, text: str) -> None:
        self.bars.console.print(text, markup=False, highlight=False)


@contextmanager
def progress_bar(env: Environment, enabled: bool = True) -> Iterator[LiveProgress | None]:
    """A LiveProgress on a terminal (stderr is a tty and ``enabled``), else None."""
    isatty = getattr(env.stderr, "isatty", lambda: False)()
    if not (enabled and isatty):
        yield None
        return
    live = LiveProgress(env)
    with live.bars:
        yield live


class HostBars:
    """A progress line per host (``fleet_progress``): "gpu1: code", then "gpu1: data/ 40%",
    then "gpu1: done" or "failed". Every method may be called from any host's thread."""

    def __init__(self, bars: Any = None, hosts: Sequence[str] = ()) -> None:
        self._bars = bars
        self._tasks: dict[str, Any] = {}
        if bars is not None:
            for host in hosts:
                self._tasks[host] = bars.add_task(f"{host}: code", total=None, rate="")

    def progress(self, host: str) -> ProgressFn | None:
        if self._bars is None:
            return None
        bars, task = self._bars, self._tasks[host]

        def update(ev: Progress | Stage) -> None:
            from remotedl.rsync import Stage

            if isinstance(ev, Stage):
                bars.update(task, description=f"{host}: {ev.text}")
                return
            done, total, _ = bar_fields(ev)
            bars.update(task, description=f"{host}: {ev.label}", completed=done, total=total, rate=ev.rate)

        return update

    def done(self, host: str, ok: bool) -> None:
        if self._bars is not None and host in self._tasks:
            word = "done" if ok else "failed"
            self._bars.update(self._tasks[host], description=f"{host}: {word}", total=1, completed=1, rate="")


@contextmanager
def fleet_progress(env: Environment, hosts: Sequence[str], enabled: bool = True) -> Iterator[HostBars]:
    """Progress lines for several hosts at once (only on a terminal)."""
    isatty = getattr(env.stderr, "isatty", lambda: False)()
    if not (enabled and isatty):
        yield HostBars()
        return
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=env.console(env.stderr, highlight=True),
        transient=True,
    )
    with bars:
        yield HostBars(bars, hosts)
