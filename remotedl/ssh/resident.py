"""Laptop side of the resident agent (``remotedl.agent.resident``): a request as a connection to a
Unix socket that the host's ssh master forwards to the agent's socket on the box.

The first request over a new master goes the usual way (an ssh session); its script starts the
box's resident agent when none runs (``SPAWN``: in the background, the request does not wait for
it) and says where its socket is. The laptop then asks the master for a stream-local forward
(``ssh -O forward -L LOCAL:REMOTE``: local to the master, no round trip) and the next requests,
from this command or the next one within the master's life, connect to LOCAL: no ssh process
here, no session, login shell or Python start there.

Nothing is sent before the box's resident greets the connection, and nothing runs before it
answers the request with ``a``, so a failure up to then (no master, no server, sshd refusing the
forward, a connection held ahead by ``remotedl.ssh.spare`` gone stale) only means: take the
session path. When the
forward keeps leading to no server (sshd refuses stream-local forwarding there), resident
requests for that box stop for ``OFF_FOR`` seconds after ``STRIKES`` such misses in a row
(``REMOTEDL_RESIDENT=0`` turns them off).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from remotedl.agent.resident import GREETING, HERE, wide_pipe
from remotedl.errors import ConnectError
from remotedl.ssh import spare
from remotedl.ssh.resolve import HostSpec

log = logging.getLogger("remotedl.ssh")

OFF_FOR = 600.0
STRIKES = 3
GREET_TIMEOUT = 30.0
_FRAME = struct.Struct(">cI")
MARK = "@@resident "

__all__ = ["HERE", "SPAWN", "Link", "Unavailable", "spawn_script"]

# Rides ahead of a session's script ("$1": the python; shifted away before the script runs).
# The socket's path must fit sun_path: under ~/.remotedl/run when it does, else a directory of
# the user's own in /tmp (the server checks it is), named after the home too.
SPAWN = """\
_rdl_d="$HOME/.remotedl/agent/{digest}"
if [ -f "$_rdl_d/__main__.py" ] && command -v "$1" >/dev/null 2>&1; then
  _rdl_s="$HOME/.remotedl/run/{digest}.sock"
  [ ${{#_rdl_s}} -le 100 ] ||
    _rdl_s="/tmp/remotedl-$(id -u)/{digest}-$(printf %s "$HOME" | cksum | cut -d' ' -f1).sock"
  "$1" -E -s -S "$_rdl_d" --serve "$_rdl_s" "$1" </dev/null >/dev/null 2>&1 &
  printf '%s%s\\n' '{mark}' "$_rdl_s" >&2
fi
unset _rdl_d _rdl_s
shift
"""


def spawn_script(digest: str) -> str:
    return SPAWN.format(digest=digest, mark=MARK)


class Unavailable(Exception):
    """Nothing was sent: take the session path."""

    def __init__(self, greeted_by_nobody: bool) -> None:
        super().__init__("no resident agent")
        self.greeted_by_nobody = greeted_by_nobody  # the master took the connection: no server


def enabled(spec: HostSpec) -> bool:
    """Only through remotedl's own master (a user's ControlPath is theirs)."""
    return (
        spec.control_path is None
        and os.environ.get("REMOTEDL_RESIDENT", "1") != "0"
        and hasattr(socket, "AF_UNIX")
    )


def local_path(spec: HostSpec, digest: str) -> Path:
    from remotedl.ssh.channel import box_key
    from remotedl.ssh.openssh import control_dir

    h = hashlib.sha256(repr(box_key(spec)).encode()).hexdigest()[:12]
    return control_dir() / f"r-{h}-{digest}.sock"


def _off_marker(local: Path) -> Path:
    return local.with_suffix(".off")


def is_off(local: Path) -> bool:
    try:
        return time.time() - _off_marker(local).stat().st_mtime < OFF_FOR
    except OSError:
        return False


def turn_off(local: Path) -> None:
    with contextlib.suppress(OSError):
        _off_marker(local).touch()
    with contextlib.suppress(OSError):
        local.unlink()


def forward(spec: HostSpec, local: Path, remote: str) -> bool:
    """Ask the master for LOCAL -> REMOTE (it binds LOCAL, replacing a stale socket file:
    ``StreamLocalBindUnlink``; nothing crosses the link). A master that has this forward
    already keeps it; one whose LOCAL was removed meanwhile binds it again."""
    from remotedl import proc
    from remotedl.ssh.openssh import openssh_options

    if ":" in str(local) or ":" in remote or not remote.startswith("/"):
        return False
    base = ["ssh", *openssh_options(spec)]
    spec_arg = ["-L", f"{local}:{remote}", spec.alias]
    ok = proc.run([*base, "-O", "forward", *spec_arg], check=False, timeout=10).returncode == 0
    if ok and not local.exists():
        proc.run([*base, "-O", "cancel", *spec_arg], check=False, timeout=10)
        ok = proc.run([*base, "-O", "forward", *spec_arg], check=False, timeout=10).returncode == 0
    return ok and local.exists()


def sweep(folder: Path) -> None:
    """The forwards' socket files that no master listens on any more (a master leaves its
    stream-local listener's file behind when it ends), and miss counts and off markers past
    their time: removed when a new forward is made, once per master, so the control directory
    does not keep one file per master that ever was."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    now = time.time()
    for name in names:
        if not name.startswith("r-"):
            continue
        path = folder / name
        if name.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except ConnectionRefusedError:  # a file no one listens on
                with contextlib.suppress(OSError):
                    path.unlink()
            except OSError:
                pass
            finally:
                s.close()
        elif name.endswith((".off", ".strikes")):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > OFF_FOR:
                    path.unlink()


def _strikes(local: Path) -> Path:
    return local.with_suffix(".strikes")


def strike(local: Path) -> int:
    """One more time the forward led to no server; how many in a row."""
    path = _strikes(local)
    try:
        n = int(path.read_text() or "0") + 1
    except (OSError, ValueError):
        n = 1
    with contextlib.suppress(OSError):
        path.write_text(str(n))
    return n


def answered(local: Path) -> None:
    """The resident agent answered: earlier misses do not count any more."""
    with contextlib.suppress(FileNotFoundError):
        _strikes(local).unlink()


def after_session(spec: HostSpec, local: Path, stderr: str, *, failed_before: bool) -> str:
    """The session's stderr without the spawn's line; the forward set up as it says. When the
    forward led to no server ``STRIKES`` times in a row (sshd refuses stream-local forwarding,
    or the server cannot start there), sessions only, for ``OFF_FOR`` seconds."""
    lines = stderr.split("\n")
    said = [x for x in lines if x.startswith(MARK)]
    if not said:
        return stderr
    remote = said[-1][len(MARK) :]
    if failed_before and strike(local) >= STRIKES:
        log.debug(
            "resident agent: no answer through the forward to %s; sessions for %.0f s", spec.alias, OFF_FOR
        )
        turn_off(local)
        answered(local)
    else:
        sweep(local.parent)
        if not forward(spec, local, remote):
            turn_off(local)
    return "\n".join(x for x in lines if not x.startswith(MARK))


class Link:
    """One request over the socket: ``open`` sends it once the box greeted; the frames follow."""

    def __init__(self, local: Path) -> None:
        self.local = local
        self.sock: socket.socket | None = None

    def open(self, payload: bytes, tail_len: int) -> None:
        """Send the request on a greeted connection: the one the holder keeps open ahead
        (``remotedl.ssh.spare``; one round trip less), else a new one. Returns once the box
        took it (``Unavailable``: nothing ran)."""
        s, held = spare.take(self.local)
        if s is not None:
            log.debug("resident agent: a connection held ahead")
            try:
                self._send(s, payload, tail_len)
                return
            except Unavailable:
                pass  # it went stale while held: a new connection
        s = self._greeted()
        self._send(s, payload, tail_len)
        if not held:  # for the next command
            from remotedl.ssh.openssh import CONTROL_PERSIST

            spare.start(self.local, GREETING, CONTROL_PERSIST)

    def _greeted(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(GREET_TIMEOUT)
        try:
            s.connect(str(self.local))
        except OSError:
            s.close()
            raise Unavailable(False) from None
        got = b""
        try:
            while not got.endswith(b"\n") and len(got) < len(GREETING):
                chunk = s.recv(len(GREETING) - len(got))
                if not chunk:
                    break
                got += chunk
        except OSError:
            got = b""
        if got != GREETING:
            s.close()
            raise Unavailable(True)
        return s

    def _send(self, s: socket.socket, payload: bytes, tail_len: int) -> None:
        """The request, then the box's first frame: ``a`` (taken) or ``n`` (nothing ran). A
        connection that ends before either ran nothing either (``a`` comes before anything
        runs); one that says nothing for ``GREET_TIMEOUT`` seconds may have taken the request,
        so that is an error, not a session that could run it twice."""
        s.settimeout(None)  # a big request's sending thread must not be cut short
        head = b"RUN %d %d\n" % (len(payload), tail_len)
        try:
            if len(payload) <= 1 << 16:
                s.sendall(head + payload)
            else:  # while the box answers (a big answer must not wait for the whole input)
                threading.Thread(target=_send_quietly, args=(s, head + payload), daemon=True).start()
            kind = _first_kind(s, GREET_TIMEOUT)
        except TimeoutError:
            s.close()
            raise ConnectError(
                f"the box's resident agent said nothing for {GREET_TIMEOUT:g} s after a request "
                "(it may have run)",
                hint="check the link, and `remotedl jobs` before running it again; "
                "REMOTEDL_RESIDENT=0 makes every request an ssh session",
            ) from None
        except OSError:
            kind = b""
        if kind != b"a":
            s.close()
            raise Unavailable(False)
        self.sock = s

    def frames(self, timeout: float | None = None) -> Iterator[tuple[bytes, bytes]]:
        """(kind, bytes) until the exit frame; ConnectionError if the link ended before it.
        Each frame's bytes are read straight into their own buffer (no copy of a 1 MiB frame)."""
        assert self.sock is not None
        s = self.sock
        s.settimeout(timeout)
        head = bytearray(_FRAME.size)
        while True:
            self._fill(memoryview(head))
            kind, size = _FRAME.unpack(head)
            body = bytearray(size)
            self._fill(memoryview(body))
            yield kind, body  # type: ignore[misc]
            if kind == b"x":
                return

    def _fill(self, view: memoryview) -> None:
        assert self.sock is not None
        while view:
            n = self.sock.recv_into(view)
            if not n:
                raise ConnectionError("the connection to the box's agent ended")
            view = view[n:]

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def _first_kind(s: socket.socket, seconds: float) -> bytes:
    """The kind of the first frame (b"" when the connection ended first); TimeoutError."""
    deadline = time.monotonic() + seconds
    got = b""
    while len(got) < _FRAME.size:
        r, _, _ = select.select([s], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            raise TimeoutError
        chunk = s.recv(_FRAME.size - len(got))
        if not chunk:
            return b""
        got += chunk
    kind, size = _FRAME.unpack(got)
    return kind if size == 0 else b""


def _send_quietly(s: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        s.sendall(data)


class SocketProcess:
    """A streaming request over the socket, shaped as the ``subprocess.Popen`` that
    ``ssh.channel.FramedProcess`` reads: stdout and stderr are pipes a thread fills from the
    frames; the exit status is the box's, 255 when the link ended first (as ssh's)."""

    def __init__(self, link: Link, spec: HostSpec) -> None:
        self.link = link
        self.spec = spec
        o_r, self._o_w = wide_pipe()
        e_r, self._e_w = os.pipe()
        self.stdout = os.fdopen(o_r, "rb", buffering=0)
        self.stderr = os.fdopen(e_r, "rb")
        self.stdin = _NoInput()
        self.returncode: int | None = None
        self._thread = threading.Thread(target=self._demux, daemon=True)
        self._thread.start()

    def _demux(self) -> None:
        code = 255
        try:
            for kind, data in self.link.frames():
                if kind == b"x":
                    code = int(data or b"255")
                elif kind in (b"o", b"e"):
                    _write_all(self._o_w if kind == b"o" else self._e_w, data)
        except (OSError, ConnectionError, ValueError):
            with contextlib.suppress(OSError):
                _write_all(self._e_w, f"\nConnection to {self.spec.alias} closed by remote host.\n".encode())
        finally:
            self.link.close()
            for fd in (self._o_w, self._e_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.returncode = code

    def wait(self, timeout: float | None = None) -> int:
        self._thread.join(timeout)
        return 255 if self.returncode is None else self.returncode

    def kill(self) -> None:
        sock = self.link.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _NoInput:
    """The request went with the connection's opening: nothing more to write."""

    def write(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        pass
