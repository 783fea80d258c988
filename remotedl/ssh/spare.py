"""A connection to the box's resident agent opened ahead of the next command: one round trip less.

A request through the master's forward (``remotedl.ssh.resident``) waits for two round trips: the
master opens a channel to the box's socket (the first), then the request goes and its answer comes
(the second), as a plain ``ssh box cmd`` on a warm master waits for its session's opening and its
answer. The first can happen before the command: a small process beside the master (the
*holder*, this module run on its own) keeps one connection open through the forward, greeted by
the box's agent, and hands it to the next command over a Unix socket next to the forward's
(``SCM_RIGHTS``: the command then owns the connection itself, nothing is relayed). It opens
another at once for the command after. A command that comes while none is greeted yet is told
so at once and opens its own: the holder never makes a command wait.

The holder ends when ``idle`` seconds pass without a command taking a connection (an open
channel keeps the master up past its ControlPersist, so this bounds it: the master ends at most
``idle`` + ControlPersist after the last command), when a connection cannot be opened or greeted
(the master or the box's agent is gone; the next command starts over the usual way), or when its
socket is replaced. One runs per forward (a lock beside it).

What a held connection may have missed (a login file changed, the agent replaced) the box's
agent checks when the request comes, and answers "nothing ran" (``remotedl.agent.resident``): the
command then takes the forward itself or a session. The socket lives in the control directory
(only this user's), like the master's own.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

from remotedl.agent.resident import listen_private, still_ours

TAKE_TIMEOUT = 2.0
_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # where the remotedl package is
GREET_TIMEOUT = 10.0


def holder_path(local: Path) -> Path:
    """The holder's socket, beside the forward's local end ``local``."""
    return local.with_suffix(".spare")


def take(local: Path) -> tuple[socket.socket | None, bool]:
    """(a greeted connection to the box's agent, or None; whether a holder answered)."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(TAKE_TIMEOUT)
    try:
        c.connect(str(holder_path(local)))
    except OSError:
        c.close()
        return None, False
    try:
        msg, fds, _, _ = socket.recv_fds(c, 1, 1)
    except OSError:
        return None, True
    finally:
        c.close()
    if msg == b"S" and len(fds) == 1:
        return socket.socket(fileno=fds[0]), True
    for fd in fds:
        os.close(fd)
    return None, True


# The holder runs this file and the box side's module it uses (both stdlib only: a small
# process, without remotedl.ssh's imports), isolated from the environment's Python settings and
# the working directory's modules (``-I``); "$1" is the directory remotedl is installed in.
_RUN = (
    "import importlib.util as u, sys; sys.path.insert(0, sys.argv[1]); "
    "s = u.spec_from_file_location('remotedl_spare', sys.argv[2]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); sys.exit(m.main(sys.argv[3:]))"
)


def start(local: Path, greeting: bytes, idle: float) -> None:
    """A holder for the forward at ``local``, in the background (one that runs already keeps
    its place: the new one leaves at once)."""
    argv = [_ROOT, __file__, str(local), greeting.decode().strip(), str(idle)]
    with contextlib.suppress(OSError):
        subprocess.Popen(
            [sys.executable, "-I", "-c", _RUN, *argv],
            cwd=str(local.parent),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


class _Opening:
    """A connection through the forward on its way to being greeted, read as it comes."""

    def __init__(self, local: str, greeting: bytes) -> None:
        self.greeting = greeting
        self.got = b""
        self.deadline = time.monotonic() + GREET_TIMEOUT
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(local)  # local: the master takes it at once, or no master listens
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)

    def read(self) -> bool | None:
        """True once greeted, False when it never will be, None while it may still be."""
        try:
            chunk = self.sock.recv(len(self.greeting) - len(self.got))
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        self.got += chunk
        if not chunk or not self.greeting.startswith(self.got):
            return False
        return True if self.got == self.greeting else None


def main(argv: list[str]) -> int:
    """The holder: ``LOCAL GREETING IDLE``. It answers each command at once: with the held
    connection when one is greeted, else with none (the command opens its own), so a box slow
    to answer never makes a command wait for the holder."""
    import fcntl

    local, greeting, idle = argv[0], argv[1].encode() + b"\n", float(argv[2])
    path = str(holder_path(Path(local)))
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # one holds already
    listener, ino = listen_private(path, 16)
    last = time.monotonic()
    held: socket.socket | None = None
    opening: _Opening | None = None
    opened = 0.0
    quick_ends = 0
    try:
        while True:
            now = time.monotonic()
            if held is None and opening is None:
                try:
                    opening = _Opening(local, greeting)
                except OSError:
                    return 0  # no master listens any more
            watched: list[socket.socket] = [listener]
            if held is not None:
                watched.append(held)
            wait = min(5.0, max(0.0, idle - (now - last)))
            if opening is not None:
                watched.append(opening.sock)
                wait = min(wait, max(0.0, opening.deadline - now))
            r, _, _ = select.select(watched, [], [], wait)
            now = time.monotonic()
            if opening is not None:
                done = opening.read() if opening.sock in r else None
                if done is None and now > opening.deadline:
                    done = False
                if done is False:  # no agent answers through the forward (or the link is down)
                    return 0
                if done:
                    held, opened, opening = opening.sock, now, None
                    held.setblocking(True)
            elif held is not None and held in r:
                # The box ended it (its agent ended or was replaced, the master is gone): open
                # another, unless they keep ending as soon as they open.
                held.close()
                held = None
                quick_ends = quick_ends + 1 if now - opened < 1.0 else 0
                if quick_ends >= 3:
                    return 0
            if listener in r:
                conn, _ = listener.accept()
                with contextlib.suppress(OSError):
                    if held is not None:
                        socket.send_fds(conn, [b"S"], [held.fileno()])
                    else:
                        conn.sendall(b"N")  # none ready: the command opens its own
                conn.close()
                if held is not None:
                    held.close()
                    held = None
                last = now
            if now - last > idle or not still_ours(path, ino):
                return 0
    finally:
        for s in (held, opening.sock if opening is not None else None, listener):
            if s is not None:
                s.close()
        if still_ours(path, ino):
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.unlink(path + ".lock")  # while held: a holder starting now finds it taken or new
        os.close(lock)
