"""A real terminal for interactive commands in tests: a tmux server of the test's own (its own
socket), driven with libtmux: start a command in a pane, read the screen, type keys. The
server is reaped when the block ends, whatever happened."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import libtmux


class Terminal:
    def __init__(self, pane: libtmux.Pane) -> None:
        self.pane = pane

    def screen(self) -> str:
        """What the terminal shows now."""
        return "\n".join(self.pane.capture_pane())

    def type(self, keys: str, *, enter: bool = False) -> None:
        if keys.startswith("-"):  # send-keys would read it as an option
            raise ValueError(f"cannot type {keys!r} through tmux send-keys")
        self.pane.send_keys(keys, enter=enter, literal=not enter)


@contextmanager
def terminal(
    command: str, socket: Path, *, env: Mapping[str, str], width: int = 120, height: int = 30
) -> Iterator[Terminal]:
    """``command`` (a shell line) running in a ``width`` x ``height`` terminal."""
    environ = {k: v for k, v in env.items() if k not in ("TMUX", "TMUX_PANE")}
    server = libtmux.Server(socket_path=str(socket))
    session = server.new_session(
        session_name="t", window_command=command, x=width, y=height, environment=environ
    )
    try:
        pane = session.active_window.active_pane
        assert pane is not None
        yield Terminal(pane)
    finally:
        try:
            server.kill()
        except Exception as e:  # a finalizer never raises
            print(f"tmux kill-server: {e}")
