"""One line that says what a long step is doing, with its elapsed time (only on a terminal)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from remotedl.env import Environment

Say = Callable[[str], None]


@contextmanager
def status_line(env: Environment, enabled: bool = True) -> Iterator[Say]:
    """Yields ``say(text)``: on a terminal, a transient spinner line "text (12 s)" on stderr;
    elsewhere (pipes, --json, tests) nothing at all."""
    isatty = getattr(env.stderr, "isatty", lambda: False)()
    if not (enabled and isatty):
        yield lambda text: None
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=env.stderr)
    started = time.monotonic()
    with console.status("") as status:

        def say(text: str) -> None:
            status.update(Text(f"{text} ({int(time.monotonic() - started)} s)"))

        yield say
