"""An injectable environment: streams, variables, directories.

Passed down from the CLI so that tests run everything in-process with their own
directories and variables (HTTPie's ``Environment``).
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from rich.console import Console


def passwd_home() -> Path:
    """The home directory OpenSSH uses: the passwd entry's, not $HOME."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def _stream(stream: TextIO | None) -> TextIO:
    """A standard stream, or a sink where it was closed (`remotedl ... >&-`)."""
    if stream is not None:
        return stream
    return open(os.devnull, "w")  # lives as long as the process


def _isatty(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):  # closed or detached
        return False


@dataclass
class Environment:
    environ: Mapping[str, str] = field(default_factory=os.environ.copy)
    cwd: Path = field(default_factory=Path.cwd)
    stdout: TextIO = field(default_factory=lambda: _stream(sys.stdout))
    stderr: TextIO = field(default_factory=lambda: _stream(sys.stderr))
    # A closed stdin (`remotedl ... <&-`) is not a terminal: nothing may prompt.
    stdin_isatty: bool = field(default_factory=lambda: _isatty(sys.stdin))

    @property
    def home(self) -> Path:
        return Path(self.environ.get("HOME") or passwd_home())

    @property
    def config_dir(self) -> Path:
        base = self.environ.get("XDG_CONFIG_HOME") or str(self.home / ".config")
        return Path(base) / "remotedl"

    @property
    def state_dir(self) -> Path:
        base = self.environ.get("XDG_STATE_HOME") or str(self.home / ".local" / "state")
        return Path(base) / "remotedl"

    @property
    def stdout_isatty(self) -> bool:
        return bool(getattr(self.stdout, "isatty", lambda: False)())

    def console(self, file: TextIO, **options: Any) -> Console:
        """Every rich console remotedl prints with. It reads TERM, COLUMNS, NO_COLOR... from this
        Environment (rich's _environ), not from the process: in-process runs get what they
        passed (TERM=dumb here turned the status line of a test's own "terminal" off). No
        highlighting of what it prints unless asked, and no emoji codes: a job's name or command
        with ":smile:" in it is shown as it is."""
        from rich.console import Console

        options.setdefault("highlight", False)
        return Console(file=file, emoji=False, _environ=self.environ, **options)
