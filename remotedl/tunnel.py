"""Port forwards through OpenSSH (``ssh -L``), supervised so they heal themselves.

Why OpenSSH and not paramiko: on loopback, paramiko's forward_local moved 18 MB/s where
``ssh -L`` moved about 420 MB/s. remotedl runs ``ssh -N -L`` on a connection of its own and
watches it like autossh: keepalives notice a dead link, and a dropped connection is re-made
with a short capped backoff, so the port works again within seconds of the box being back.
Forwards bind 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from remotedl import proc
from remotedl.errors import ConnectError, HostKeyError, RemotedlError, UsageError
from remotedl.ssh import HostSpec, openssh_failure, ssh_argv
from remotedl.words import printable

BACKOFF_CAP = 3.0  # seconds: with ~1 s to connect, a box that is back is reached within 10 s


# A host name with a letter in it (a node name like gpu-a12), or an IPv4 address.
_TARGET = re.compile(r"^(?:(?=[^:]*[A-Za-z])[A-Za-z0-9][A-Za-z0-9._-]*|\d{1,3}(?:\.\d{1,3}){3})$")


@dataclass(frozen=True)
class Forward:
    local: int
    remote: int
    # Where the box connects to: itself, or a machine it reaches (a Slurm job's compute node,
    # as Slurm names it: the login node resolves the name).
    target: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str) -> Forward:
        parts = text.split(":")
        target = "127.0.0.1"
        if len(parts) == 3:
            target = parts.pop(1)
            if not _TARGET.match(target):
                raise UsageError(f"'{target}' in '{text}' is not a host name")
        local, remote = parts[0], parts[1] if len(parts) > 1 else ""
        usage = f"'{text}' is not PORT or LOCAL:REMOTE (e.g. 8888 or 8889:8888; or LOCAL:HOST:REMOTE)"
        if len(parts) > 2:
            raise UsageError(usage)
        try:
            lp, rp = int(local), int(remote or local)
        except ValueError:
            raise UsageError(usage) from None
        for p in (lp, rp):
            if not 0 < p < 65536:
                raise UsageError(f"port {p} is out of range (1-65535)")
        return cls(lp, rp, target)

    def __str__(self) -> str:
        if self.target != "127.0.0.1":
            return f"127.0.0.1:{self.local} -> {self.target}:{self.remote} (through the box)"
        return f"127.0.0.1:{self.local} -> box 127.0.0.1:{self.remote}"

    def spec(self) -> str:
        """As ``parse`` reads it back (for a background tunnel's supervisor)."""
        if self.target != "127.0.0.1":
            return f"{self.local}:{self.target}:{self.remote}"
        return f"{self.local}:{self.remote}"


@dataclass
class TunnelEvent:
    kind: str  # "connected", "disconnected", "reconnecting", "refused", "error"
    message: str
    at: float = field(default_factory=time.time)


# ------------------------------------------------------------------ local ports


def _listeners_from_proc(port: int) -> list[tuple[int, str]]:
    """(pid, command) of processes listening on TCP ``port`` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(parts[9])
    found: list[tuple[int, str]] = []
    if not inodes:
        return found
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to look at
        for fd in fds:
            try:  # one fd closed between the listing and this look says nothing of the rest
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as c:
                    found.append((int(pid), command_words(c.read())))
                break
    return found


def listeners(port: int) -> set[int]:
    """The pids listening on local TCP ``port`` that can be told (Linux /proc; else none)."""
    return {pid for pid, _ in _listeners_from_proc(port)} if os.path.isdir("/proc/net") else set()


def local_json(url: str, timeout: float = 3.0) -> Any:
    """What an HTTP ``url`` on this machine's 127.0.0.1 answers as JSON, or None (not 200, not
    JSON, nothing there). Never through an ``http_proxy``: it is a local port."""
    import json
    import urllib.error
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(url, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def command_words(cmdline: bytes, limit: int = 72) -> str:
    """A process's command line (``/proc/PID/cmdline``) in a few words: the program's name
    without its directory, then its arguments, cut at a word with an ellipsis past ``limit``
    characters, control characters escaped."""
    args = [a.decode(errors="replace") for a in cmdline.rstrip(b"\0").split(b"\0")]
    if not args or not args[0]:
        return "?"
    words = [os.path.basename(args[0]) or args[0], *args[1:]]
    text = printable(" ".join(words), newlines=False)
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0] if " " in text[: limit - 1] else text[: limit - 1]
    return cut + " ..."


def port_holder(port: int) -> str | None:
    """Who holds a local port, in words, if it can be told."""
    if os.path.isdir("/proc/net"):
        holders = _listeners_from_proc(port)
        if holders:
            return ", ".join(f"pid {pid} ({cmd})" for pid, cmd in holders)
    if shutil_which("lsof"):
        out = proc.run(["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN"], check=False).stdout.splitlines()
        if len(out) > 1:
            cols = out[1].split()
            return f"pid {cols[1]} ({cols[0]})"
    return None


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As ssh binds: SO_REUSEADDR, so a closed connection in TIME_WAIT does not count as in use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen(1)
            return True
        except OSError:
            return False


def suggest_port(port: int, avoid: Sequence[int] = ()) -> int | None:
    for candidate in range(port + 1, min(port + 200, 65535)):
        if candidate not in avoid and port_free(candidate):
            return candidate
    return None


def _tunnel_usage(f: Forward, free: int) -> str:
    return f"remotedl tunnel {free}:{f.remote}"


def check_local_ports(
    forwards: Sequence[Forward], suggest: Callable[[Forward, int], str] | None = None
) -> None:
    """Fail fast, naming the holder and a free port, when a local port is taken. ``suggest``
    words the command to use instead, given the forward and the free port (default: the
    same forward from the free port, `remotedl tunnel FREE:REMOTE`)."""
    seen: set[int] = set()
    for f in forwards:
        if f.local in seen:
            raise UsageError(f"local port {f.local} is given twice")
        seen.add(f.local)
        if not port_free(f.local):
            holder = port_holder(f.local)
            free = suggest_port(f.local, [x.local for x in forwards])
            raise RemotedlError(
                f"local port {f.local} is already in use" + (f" by {holder}" if holder else ""),
                hint=(
                    f"use another local port, e.g. `{(suggest or _tunnel_usage)(f, free)}`"
                    if free
                    else "use another local port"
                ),
            )


# ------------------------------------------------------------------ the tunnel

# ssh prints "listening on" *before* bind() and listen(); the port takes connections once the
# listener channel is made ("channel N: new ... [port listener]").
_LISTENING = re.compile(r"Local forwarding listening on 127\.0\.0\.1 port (\d+)")
_LISTENER_READY = re.compile(r"channel \d+: new .*\[port listener\]")
_REQUESTED = re.compile(r"Connection to port (\d+) forwarding to \S+ port (\d+) requested")
# "bind [127.0.0.1]:8888: Address already in use", "cannot listen to port: 8888"
_CANNOT_LISTEN = re.compile(r"bind \[?[\d.]+\]?:(\d+): Address already in use|cannot listen to port: (\d+)")
_OPEN_FAILED = re.compile(r"channel \d+: open failed: connect failed: (.*)")


class Tunnel:
    """``ssh -N -L`` for the forwards, restarted whenever the connection drops."""

    def __init__(
        self,
        spec: HostSpec,
        forwards: Sequence[Forward],
        *,
        on_event: Callable[[TunnelEvent], None] | None = None,
        keepalive: int = 5,
    ) -> None:
        self.spec = spec
        self.forwards = list(forwards)
        self.on_event = on_event or (lambda e: None)
        self.keepalive = keepalive
        self.connected = threading.Event()
        self.stopped = threading.Event()
        self.process: subprocess.Popen[str] | None = None
        self.connections = 0
        self.reconnects = 0
        self.fatal: RemotedlError | None = None

    def argv(self) -> list[str]:
        extra = [
            "-N",
            "-o", "ExitOnForwardFailure=yes",
            "-o", f"ServerAliveInterval={self.keepalive}",
            "-o", "ServerAliveCountMax=2",
            "-o", "LogLevel=DEBUG1",  # how we learn that forwards listen, and which ones fail
        ]  # fmt: skip
        for f in self.forwards:
            if not _TARGET.match(f.target):
                raise UsageError(f"'{f.target}' is not a host name")
            extra += ["-L", f"127.0.0.1:{f.local}:{f.target}:{f.remote}"]
        return ssh_argv(self.spec, multiplex=False, extra=extra)

    def bytes_moved(self) -> int | None:
        """I/O of the ssh process (read + written, both sides), halved: a fair estimate of
        the bytes that crossed the tunnel. None where /proc is not there."""
        p = self.process
        if p is None:
            return None
        try:
            with open(f"/proc/{p.pid}/io") as f:
                io = dict(line.split(": ") for line in f.read().splitlines())
            return (int(io["rchar"]) + int(io["wchar"])) // 2
        except (OSError, KeyError, ValueError):
            return None

    def _read_stderr(self, p: subprocess.Popen[str], tail: list[str]) -> None:
        assert p.stderr is not None
        wanted = {f.local for f in self.forwards}
        listening: set[int] = set()
        announced: int | None = None
        last_remote: int | None = None
        for line in p.stderr:
            line = line.rstrip()
            if not line.startswith("debug"):
                tail.append(line)
            m = _LISTENING.search(line)
            if m:
                announced = int(m.group(1))
                continue
            if announced is not None and _LISTENER_READY.search(line):
                listening.add(announced)
                announced = None
                if listening >= wanted and not self.connected.is_set():
                    self.connected.set()
                    self.on_event(TunnelEvent("connected", f"connected to {self.spec.alias}"))
                continue
            m = _REQUESTED.search(line)
            if m:
                self.connections += 1
                last_remote = int(m.group(2))
                continue
            m = _OPEN_FAILED.search(line)
            if m:
                port = f" {last_remote}" if last_remote else ""
                self.on_event(TunnelEvent(
                    "refused",
                    f"nothing is listening on the box's port{port} ({m.group(1)}); the tunnel stays up",
                ))  # fmt: skip

    def _fatal_from(self, tail: list[str]) -> RemotedlError | None:
        text = "\n".join(tail)
        low = text.lower()
        if "address already in use" in low or "cannot listen to port" in low:
            return self._port_taken(text)
        err = openssh_failure(self.spec, text)
        if isinstance(err, HostKeyError) or "authentication failed" in err.message:
            return err
        if "cannot resolve" in err.message and not self.connections and not self.reconnects:
            return err
        return None

    def _port_taken(self, text: str) -> RemotedlError:
        """ssh could not listen on a local port (taken since it was checked): which one, who
        holds it, and a free one, as the check before the start says it."""
        m = _CANNOT_LISTEN.search(text)
        port = int(m.group(1) or m.group(2)) if m else None
        if port is None:
            return RemotedlError(
                "a local port of the tunnel is already in use", hint="pick another local port"
            )
        holder = port_holder(port)
        free = suggest_port(port, [f.local for f in self.forwards])
        f = next((f for f in self.forwards if f.local == port), Forward(port, port))
        instead = f", e.g. `{_tunnel_usage(f, free)}`" if free else ""
        return RemotedlError(
            f"local port {port} is already in use" + (f" by {holder}" if holder else ""),
            hint=f"use another local port{instead}",
        )

    def run(self) -> None:
        """Keep the tunnel up until ``stop()``. Raises only for errors retrying cannot fix."""
        backoff = 0.5
        first = True
        while not self.stopped.is_set():
            tail: list[str] = []
            started = time.monotonic()
            self.connected.clear()
            p = proc.popen(
                self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            self.process = p
            reader = threading.Thread(target=self._read_stderr, args=(p, tail), daemon=True)
            reader.start()
            p.wait()
            reader.join(2)
            if self.stopped.is_set():
                break
            fatal = self._fatal_from(tail)
            if fatal is not None and (first or isinstance(fatal, HostKeyError)):
                self.fatal = fatal
                self.on_event(TunnelEvent("error", fatal.message))
                raise fatal
            first = False
            if time.monotonic() - started > 30:
                backoff = 0.5  # it was up for a while: retry quickly
            why = tail[-1] if tail else f"ssh exited with status {p.returncode}"
            self.reconnects += 1
            self.on_event(TunnelEvent("disconnected", f"connection lost ({why})"))
            self.on_event(TunnelEvent("reconnecting", f"reconnecting in {backoff:g} s"))
            if self.stopped.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_CAP)

    def stop(self) -> None:
        self.stopped.set()
        p = self.process
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()

    def wait_connected(self, seconds: float) -> bool:
        return self.connected.wait(seconds)


def start_in_thread(tunnel: Tunnel) -> threading.Thread:
    def target() -> None:
        with contextlib.suppress(RemotedlError):
            tunnel.run()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


def raise_if_failed(tunnel: Tunnel) -> None:
    if tunnel.fatal is not None:
        raise tunnel.fatal
    if not tunnel.connected.is_set():
        raise ConnectError(f"the tunnel to {tunnel.spec.alias} did not come up")
