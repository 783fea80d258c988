"""Turn library progress callbacks into a rich progress bar (only on a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from remotedl.env import Environment

if TYPE_CHECKING:
    from remotedl.sync import Progress, ProgressFn


@contextmanager
def progress_bar(env: Environment, enabled: bool = True) -> Iterator[ProgressFn | None]:
    isatty = getattr(env.stderr, "isatty", lambda: False)()
    if not (enabled and isatty):
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TaskID, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        DownloadColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=Console(file=env.stderr),
        transient=True,
    )
    tasks: dict[str, TaskID] = {}

    def update(ev: Progress) -> None:
        if ev.label not in tasks:
            tasks[ev.label] = bars.add_task(ev.label, total=100, rate="")
        total = ev.bytes_done * 100 // ev.percent if ev.percent else None
        bars.update(tasks[ev.label], completed=ev.bytes_done, total=total, rate=ev.rate)

    with bars:
        yield update
