"""Waiting without bare sleeps: poll a condition until it holds or time runs out."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retry_until(
    fn: Callable[[], T | None],
    *,
    seconds: float = 8.0,
    interval: float = 0.05,
    max_interval: float | None = None,
) -> T | None:
    """Call ``fn`` until it returns something truthy or ``seconds`` pass; return its last value.
    With ``max_interval``, the pause starts at ``interval`` and doubles up to it (soon after an
    event that usually lands within milliseconds, then less often)."""
    deadline = time.monotonic() + seconds
    pause = interval
    while True:
        value = fn()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(pause)
        if max_interval is not None:
            pause = min(pause * 2, max_interval)


def port_answers(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out to outgoing connections (their source ports)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a server started next. Picked at random below the
    kernel's ephemeral range: a port from that range (what binding port 0 gives) may be taken
    as the source port of any outgoing connection before the server binds it, and the random
    pick makes a port used a moment ago unlikely to come up again."""
    import random

    low = _ephemeral_low()
    if low > 10000:
        for _ in range(50):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this pid runs (one of another user counts). A zombie does not:
    it has ended, and where nothing reaps orphans (some container inits) it stays one."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # after "pid (comm)"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone since; without /proc, kill's answer stands
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def pid_runs(pid: int | None, *marks: bytes) -> bool:
    """Whether ``pid`` runs the program a record says it does: alive (``pid_alive``) and, where
    /proc tells, with each of ``marks`` in its command line. A record left by a process that
    died unseen (a reboot, kill -9) names a pid the kernel hands out again."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # no /proc to tell: trust the pid
    return all(m in cmdline for m in marks)
