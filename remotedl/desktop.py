"""A desktop notification on the laptop (``notify_desktop = true``): ``notify-send`` on Linux
desktops, ``osascript`` on macOS, nothing where neither is found.

The title and text are arguments of their own (``osascript`` reads them as ``argv`` of a
constant script), never spliced into code.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from remotedl import proc

_OSASCRIPT = (
    "on run argv",
    "display notification (item 2 of argv) with title (item 1 of argv)",
    "end run",
)


@dataclass
class DesktopResult:
    shown: bool
    tool: str | None  # notify-send, osascript, or None when the laptop has neither
    error: str | None = None


def desktop_argv(title: str, text: str, environ: Mapping[str, str] | None = None) -> list[str] | None:
    path = (environ or {}).get("PATH")
    if tool := shutil.which("notify-send", path=path):
        return [tool, "--app-name=remotedl", "--", title, text]
    if tool := shutil.which("osascript", path=path):
        script: list[str] = []
        for line in _OSASCRIPT:
            script += ["-e", line]
        return [tool, *script, title, text]
    return None


def notify_desktop(title: str, text: str, environ: Mapping[str, str] | None = None) -> DesktopResult:
    """Show a notification; never raises (a laptop without a desktop just has none)."""
    argv = desktop_argv(title, text[:500], environ)
    if argv is None:
        return DesktopResult(False, None)
    tool = argv[0].rsplit("/", 1)[-1]
    try:
        r = proc.run(argv, check=False, timeout=10, env=environ)
    except Exception as e:  # a notification never fails the command that shows it
        return DesktopResult(False, tool, str(e))
    if r.returncode != 0:
        err = (r.stderr or "").strip().splitlines()
        return DesktopResult(False, tool, err[-1] if err else f"exit {r.returncode}")
    return DesktopResult(True, tool)
