"""Turn library progress callbacks into a rich progress bar (only on a terminal)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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

        def update(ev: Progress) -> None:
            total = ev.bytes_done * 100 // ev.percent if ev.percent else None
            bars.update(task, description=f"{host}: {ev.label}", completed=ev.bytes_done, total=total,
                        rate=ev.rate)  # fmt: skip

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
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    bars = Bars(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=Console(file=env.stderr),
        transient=True,
    )
    with bars:
        yield HostBars(bars, hosts)

