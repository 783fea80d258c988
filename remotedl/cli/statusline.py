"""One line that says what a long step is doing, with a running clock (only on a terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from remotedl.env import Environment

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

Say = Callable[[str], None]


class StatusLine:
    """A transient spinner line on stderr, "text 0:00:12", whose clock runs by itself. Nothing
    at all with --json or when stderr is not a terminal. ``end`` clears it, so results can be
    printed between lines."""

    def __init__(self, env: Environment, *, enabled: bool = True) -> None:
        self.env = env
        self.enabled = enabled and bool(getattr(env.stderr, "isatty", lambda: False)())
        self._line: Progress | None = None
        self._task: TaskID | None = None

    def begin(self, text: str) -> None:
        """A new line, its clock from zero."""
        self.end()
        if not self.enabled:
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._line = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=self.env.console(self.env.stderr),
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._task = self._line.add_task(text, total=None)
        self._line.start()

    def say(self, text: str) -> None:
        """New words on the running line (same clock); begins one if none runs."""
        if self._line is None or self._task is None:
            self.begin(text)
        else:
            self._line.update(self._task, description=text)

    def end(self) -> None:
        if self._line is not None:
            self._line.stop()
            self._line = None
            self._task = None


@contextmanager
def status_line(env: Environment, enabled: bool = True) -> Iterator[Say]:
    """Yields ``say(text)`` for a library's progress callback; the line is gone afterwards."""
    line = StatusLine(env, enabled=enabled)
    try:
        yield line.say
    finally:
        line.end()
