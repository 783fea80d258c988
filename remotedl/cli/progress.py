"""Turn library progress callbacks into a status line and rich progress bars (only on a terminal).

Two kinds of report arrive: a ``Stage`` (what a push is doing: the snapshot, git, the box's
check) becomes the one status line with a spinner; a ``Progress`` of an rsync transfer becomes a
bar per data path: bytes sent of the bytes this transfer sends (a pulsing bar until rsync's dry
run beside a long transfer has told that total), the rate and the time left.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from remotedl.env import Environment

if TYPE_CHECKING:
    from remotedl.rsync import Progress, ProgressFn, Stage


def size_text(n: int) -> str:
    from remotedl.cli.basic import _size

    return _size(n)  # the units of every other size remotedl prints


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


@contextmanager
def progress_bar(env: Environment, enabled: bool = True) -> Iterator[ProgressFn | None]:
    isatty = getattr(env.stderr, "isatty", lambda: False)()
    if not (enabled and isatty):
        yield None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, SpinnerColumn, Task, TaskID, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars
    from rich.progress_bar import ProgressBar
    from rich.text import Text

    from remotedl.rsync import Stage

    class _Bar(BarColumn):
        """No bar on the status line."""

        def render(self, task: Task) -> Text | ProgressBar:  # type: ignore[override]
            return Text("") if task.fields.get("stage") else super().render(task)

    bars = Bars(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        _Bar(),
        TextColumn("{task.fields[size]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=Console(file=env.stderr),
        transient=True,
    )
    status: list[TaskID] = []
    tasks: dict[str, TaskID] = {}

    def update(ev: Progress | Stage) -> None:
        if isinstance(ev, Stage):
            text = escape(ev.text)
            if not status:
                status.append(bars.add_task(text, total=None, size="", rate="", stage=True))
            bars.update(status[0], description=text, visible=True)
            return
        if status:
            bars.update(status[0], visible=False)
        if ev.label not in tasks:
            tasks[ev.label] = bars.add_task(escape(ev.label), total=None, size="", rate="")
        completed, total, size = bar_fields(ev)
        bars.update(tasks[ev.label], completed=completed, total=total, size=size, rate=ev.rate)

    with bars:
        yield update
