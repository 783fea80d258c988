"""The resident agent: one Python per box user and agent version, its modules loaded, answering on
a Unix socket that the laptop reaches through its ssh master's stream-local forward.

Without it every request is an ssh session: sshd forks, the login shell reads its start-up
files, /bin/sh reads the framed script, and the agent's Python starts and imports (~70 ms on a
box before any work). Through the forward, a request is a connection to this socket: no session,
no login shell, no interpreter start. What it runs is exactly what the session would have run:

- the framed script (``remotedl.ssh.channel.encode_request``'s bytes) goes to ``/bin/sh`` on its
  stdin, read the way the login shell's bootstrap reads it, in the box user's home;
- an agent call's script (``remotedl.agent.client``) ends, when the python it names is the one
  this server runs, with exit status ``HERE`` instead of starting a Python; the request (the
  last bytes of the payload) then goes to the agent's ``main`` in a process forked from this one,
  whose modules are already imported.

Its output comes back as frames (a type byte, a 4-byte length, the bytes): ``a`` (the request is
taken) first, then ``o`` stdout, ``e`` stderr, ``x`` the exit status, last. The server greets
each connection first; a laptop that gets no greeting (the server is gone, or sshd refused the
forward) knows nothing ran. A greeted connection may wait for its request a while (the laptop
keeps one open ahead of the next command: ``remotedl.ssh.spare``): when the request comes, a
login file changed meanwhile or the agent's directory is gone, the answer is ``n`` (nothing
ran: take a session) instead of ``a``; and one still waiting when the server ends is closed.

Trust: the socket lives in a directory only the user can enter (``~/.remotedl/run``, or a
``/tmp/remotedl-UID`` checked to be the user's own, 0700), so reaching it takes being the user on
the box or holding the laptop's master connection: the same trust as an ssh session. The
environment is the login shell's of the session that started the server; when a file that
shapes a login's environment changes (start-up files, /etc/group for a new group, ...), the
server stops taking requests and ends, and the next session starts a fresh one. It also ends
after ``IDLE`` seconds without a request, or when its socket is replaced.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import stat
import struct
import sys
import time

GREETING = b"remotedl-resident 2\n"
HERE = 219  # exit status of an agent call's script: "run the agent here, with the request"
IDLE = 900.0  # seconds without a request before the server ends
MAX_PAYLOAD = 1 << 34
_FRAME = struct.Struct(">cI")
_CHUNK = 1 << 20

# Read the framed script the way ``ssh.channel.BOOTSTRAP`` does, with ``_rdl_here`` set to the
# python this server runs under: a shell variable, not exported, so no job inherits it.
_SH = '_rdl_here=$RDL_HERE; unset RDL_HERE; read -r n; eval "$(dd bs=1 count=$n 2>/dev/null)"'

# What shapes a login's environment: when one of these changes, a fresh session (and server)
# must see it (a PATH line added to ~/.profile, the user added to the docker group, ...).
_LOGIN_FILES = (
    "/etc/passwd",
    "/etc/group",
    "/etc/environment",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/zsh/zshenv",
    "/etc/zsh/zprofile",
    "/etc/zsh/zshrc",
    "/etc/security/pam_env.conf",
    "/etc/security/limits.conf",
    "/etc/security/limits.d",
    "/etc/ssh/sshd_config",  # SetEnv, AcceptEnv
    "/etc/ssh/sshd_config.d",
    "~/.profile",
    "~/.bash_profile",
    "~/.bash_login",
    "~/.bashrc",
    "~/.zshenv",
    "~/.zprofile",
    "~/.zshrc",
    "~/.config/fish/config.fish",
    "~/.config/fish/conf.d",
    "~/.cshrc",
    "~/.tcshrc",
    "~/.login",
    "~/.ssh/environment",
    "~/.pam_environment",
)


def login_state() -> tuple[tuple[str, float, int, int], ...]:
    """(path, mtime, size, inode) of each login file that exists."""
    home = os.environ.get("HOME", "")
    out = []
    for p in _LOGIN_FILES:
        path = home + p[1:] if p.startswith("~/") else p
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((path, st.st_mtime, st.st_size, st.st_ino))
    return tuple(out)


def private_dir(path: str) -> bool:
    """Make ``path`` (0700) or accept it when it is a directory of ours that no one else can
    enter or write; never follow a link someone put there."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        return False
    if st.st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:
            return False
    return True


def send(conn: socket.socket, kind: bytes, data: bytes) -> None:
    """One frame (``data`` is at most a chunk: far below the 4-byte length's limit); a big one
    without copying it behind its header."""
    if len(data) > 65536:
        conn.sendall(_FRAME.pack(kind, len(data)))
        conn.sendall(data)
    else:
        conn.sendall(_FRAME.pack(kind, len(data)) + data)


def _read_line(conn: socket.socket, limit: int = 128) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        b = conn.recv(1)
        if not b or len(line) > limit:
            raise ConnectionError("no request")
        line += b
    return line


class _Pump:
    """Moves bytes between the laptop's connection and one child process: ``remaining`` bytes of
    the connection (then ``pending``) to the child's stdin, its stdout and stderr back as frames.
    Keeps the last ``tail_len`` bytes of what came from the connection (the agent's request)."""

    def __init__(self, conn: socket.socket, remaining: int, tail_len: int) -> None:
        self.conn = conn
        self.remaining = remaining
        self.tail_from = remaining - tail_len
        self.seen = 0
        self.tail = bytearray()
        self.gone = False  # the laptop went away

    def run(self, feed: int | None, pending: bytes, sources: dict[int, bytes]) -> None:
        """Until every source is at its end (or the laptop is gone)."""
        buf = bytearray(pending)
        open_src = dict(sources)
        if feed is not None:
            os.set_blocking(feed, False)  # a child writing, not reading, never stalls the relay
        while open_src:
            rlist = list(open_src)
            wlist = []
            if feed is not None and buf:
                wlist.append(feed)
            if not self.gone and ((self.remaining > 0 and len(buf) < _CHUNK) or self.remaining == 0):
                rlist.append(self.conn.fileno())
            if feed is not None and not buf and self.remaining == 0:
                os.close(feed)
                feed = None
            r, w, _ = select.select(rlist, wlist, [])
            if self.conn.fileno() in r:
                if self.remaining > 0:
                    data = self.conn.recv(min(self.remaining, _CHUNK))
                    if not data:
                        self.gone = True
                        self.remaining = 0
                    else:
                        self._keep(data)
                        self.remaining -= len(data)
                        if feed is not None:
                            buf += data
                else:
                    # Nothing more may come: an end (or anything) here means the laptop left.
                    self.gone = True
                if self.gone:
                    for fd in open_src:
                        os.close(fd)  # the child's next write fails, as under a lost session
                    open_src = {}
                    break
            if feed is not None and feed in w:
                try:
                    n = os.write(feed, buf[:_CHUNK])
                    del buf[:n]
                except BlockingIOError:
                    pass
                except OSError:  # the child stopped reading: the rest goes nowhere
                    buf.clear()
                    os.close(feed)
                    feed = None
            for fd in [fd for fd in r if fd in open_src]:
                data = os.read(fd, _CHUNK)
                if not data:
                    os.close(fd)
                    del open_src[fd]
                    continue
                try:
                    send(self.conn, open_src[fd], data)
                except OSError:
                    self.gone = True
                    for o in open_src:
                        os.close(o)
                    open_src = {}
                    break
        if feed is not None:
            os.close(feed)
        # The rest of the request, when the child did not want it (kept for the agent).
        while self.remaining > 0 and not self.gone:
            data = self.conn.recv(min(self.remaining, _CHUNK))
            if not data:
                self.gone = True
                break
            self._keep(data)
            self.remaining -= len(data)

    def _keep(self, data: bytes) -> None:
        end = self.seen + len(data)
        if end > self.tail_from:
            self.tail += data[max(0, self.tail_from - self.seen) :]
        self.seen = end


def wide_pipe() -> tuple[int, int]:
    """A pipe of 1 MiB where the kernel allows it (64 KiB is the default): a 1 GB log moves
    in 1 MiB frames, not 64 KiB ones, each a turn through Python on both ends."""
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        import fcntl

        fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), _CHUNK)
    return r, w


def _status(pid: int) -> int:
    _, st = os.waitpid(pid, 0)
    if os.WIFEXITED(st):
        return os.WEXITSTATUS(st)
    return 128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else 255


def _spawn_sh(python: str) -> tuple[int, int, int, int]:
    """(pid, stdin, stdout, stderr) of /bin/sh reading a framed script."""
    i_r, i_w = os.pipe()
    o_r, o_w = wide_pipe()
    e_r, e_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(i_r, 0)
            os.dup2(o_w, 1)
            os.dup2(e_w, 2)
            os.closerange(3, _max_fd())
            for sig in ("SIGPIPE", "SIGXFZ", "SIGXFSZ"):  # as subprocess leaves them
                if hasattr(signal, sig):
                    signal.signal(getattr(signal, sig), signal.SIG_DFL)
            env = dict(os.environ)
            env["RDL_HERE"] = python
            os.execve("/bin/sh", ["sh", "-c", _SH], env)  # noqa: S606 (a fixed program)
        finally:
            os._exit(127)
    for fd in (i_r, o_w, e_w):
        os.close(fd)
    return pid, i_w, o_r, e_r


def _spawn_agent() -> tuple[int, int, int, int]:
    """(pid, stdin, stdout, stderr) of the agent's ``main`` in a fork of this process."""
    i_r, i_w = os.pipe()
    o_r, o_w = wide_pipe()
    e_r, e_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(i_r, 0)
            os.dup2(o_w, 1)
            os.dup2(e_w, 2)
            os.closerange(3, _max_fd())
            signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as a fresh interpreter has it
            # Streams on the new 0, 1 and 2, as a fresh interpreter would make them.
            old = (sys.stdin, sys.stdout, sys.stderr)
            enc = [getattr(f, "encoding", None) or "utf-8" for f in old]
            sys.stdin = open(0, encoding=enc[0], closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", encoding=enc[1], closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", encoding=enc[2], errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
            from remotedl.agent.ops import main

            code = main([])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os._exit(code)
    for fd in (i_r, o_w, e_w):
        os.close(fd)
    return pid, i_w, o_r, e_r


def _max_fd() -> int:
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (ValueError, OSError):
        return 1024


def handle(
    conn: socket.socket,
    python: str,
    *,
    ended: int | None = None,
    login: tuple[tuple[str, float, int, int], ...] | None = None,
    agent_dir: str = "",
) -> None:
    """One connection: the greeting, the request, its answer as frames. ``ended`` turns
    readable (at its end) when the server ends: a connection still waiting for its request is
    closed then. ``login``: the login files as the server started (``login_state``)."""
    conn.sendall(GREETING)
    if ended is not None:
        r, _, _ = select.select([conn.fileno(), ended], [], [])
        if conn.fileno() not in r:
            raise ConnectionError("the server ended")
    head = _read_line(conn).split()
    if len(head) != 3 or head[0] != b"RUN" or not head[1].isdigit() or not head[2].isdigit():
        raise ConnectionError("not a request")
    size, tail_len = int(head[1]), int(head[2])
    if size > MAX_PAYLOAD or tail_len > size:
        raise ConnectionError("request too large")
    if (login is not None and login_state() != login) or (agent_dir and not os.path.isdir(agent_dir)):
        # A fresh login would see another environment, or another agent: nothing runs. The rest
        # of the request is read (until the laptop closes), so the answer is not lost to a reset.
        send(conn, b"n", b"")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(30)
        with contextlib.suppress(OSError):
            while conn.recv(_CHUNK):
                pass
        return
    send(conn, b"a", b"")
    pump = _Pump(conn, size, tail_len)
    pid, feed, out, err = _spawn_sh(python)
    pump.run(feed, b"", {out: b"o", err: b"e"})
    code = _status(pid)
    if code == HERE and not pump.gone:
        pid, feed, out, err = _spawn_agent()
        pump.run(feed, bytes(pump.tail), {out: b"o", err: b"e"})
        code = _status(pid)
    if not pump.gone:
        with contextlib.suppress(OSError):
            send(conn, b"x", str(code).encode())


def _daemonize() -> None:
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1, 2):
        os.dup2(fd, n)
    if fd > 2:
        os.close(fd)


def serve(path: str, python: str, *, idle: float = IDLE, detach: bool = True) -> int:
    """Serve on ``path`` until idle, replaced, or a login file changed. Exit status 0 also when
    another server already has the path (its lock is held)."""
    import fcntl

    if not private_dir(os.path.dirname(path)):
        return 3
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # one runs already
    if detach:
        _daemonize()  # the lock (an open file description) stays held across the forks
    _sweep(path)
    with contextlib.suppress(OSError):
        os.chdir(os.environ.get("HOME") or "/")
    # The agent's modules, loaded once: what every request's fork gets for nothing.
    import remotedl.agent.ops  # noqa: F401

    listener, ino = listen_private(path, 64)
    agent_dir = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    login = login_state()
    last = time.monotonic()
    # Its write end closes with this process: the relays still waiting for a request see it.
    ended, ending = os.pipe()
    # Each request's relay is reaped as it ends (no zombie waits for the next look).
    signal.signal(signal.SIGCHLD, _reap)
    try:
        while True:
            r, _, _ = select.select([listener], [], [], 5.0)
            if not still_ours(path, ino) or (agent_dir and not os.path.isdir(agent_dir)):
                return 0
            if not r:
                if time.monotonic() - last > idle:
                    return 0
                continue
            conn, _ = listener.accept()
            last = time.monotonic()
            if login_state() != login:
                # A fresh login would see another environment: no more requests here (the
                # laptop, greeted by nobody, takes the session path, which starts a new server:
                # the path and the lock are free before it can ask).
                if still_ours(path, ino):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                os.close(lock)
                conn.close()
                return 0
            pid = os.fork()
            if pid == 0:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the relay waits for its own
                listener.close()
                os.close(lock)
                os.close(ending)
                code = 0
                try:
                    handle(conn, python, ended=ended, login=login, agent_dir=agent_dir)
                except (OSError, ConnectionError):
                    code = 1
                finally:
                    with contextlib.suppress(OSError):
                        conn.close()
                    os._exit(code)
            conn.close()
    finally:
        if still_ours(path, ino):
            with contextlib.suppress(OSError):
                os.unlink(path)
        listener.close()
        os.close(ending)
        os.close(ended)


def _sweep(path: str) -> None:
    """The lock and socket files of servers that no longer run (other agent versions, other
    homes' in /tmp), left beside ours: each removed while its lock is held here, so no server
    of it can be starting meanwhile (one that tries then finds the lock taken and leaves it to
    the next session)."""
    import fcntl

    folder, mine = os.path.split(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.endswith(".sock.lock") or name == mine + ".lock":
            continue
        lock = os.path.join(folder, name)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its server runs
            continue
        for stale in (lock[: -len(".lock")], lock):
            with contextlib.suppress(OSError):
                os.unlink(stale)
        os.close(fd)


def _reap(signum: int, frame: object) -> None:
    """The ended relays' exit statuses (SIGCHLD in the server)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def listen_private(path: str, backlog: int) -> tuple[socket.socket, int]:
    """A Unix socket listening at ``path`` (replacing a file left there), made under umask 077
    (only this user reaches it, whatever the directory allows), and its inode (``still_ours``).
    The laptop's holder of connections (``remotedl.ssh.spare``) makes its own the same way."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(backlog)
    return listener, os.stat(path).st_ino


def still_ours(path: str, ino: int) -> bool:
    """Whether ``path`` is still the socket bound with inode ``ino`` (not removed or replaced)."""
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False
