"""The one place that runs local programs (ssh, rsync, git, ssh-keygen, sshd, tmux).

Every call is logged with its exact argv (``shlex.join``) at debug level, so
``--debug`` shows what remotedl ran, copy-pasteable into a shell.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from remotedl.errors import RemotedlError

log = logging.getLogger("remotedl.proc")


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    capture: bool = True,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion. With ``check``, a non-zero exit raises ``RemotedlError``."""
    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    proc = subprocess.run(
        args,
        check=False,
        capture_output=capture,
        input=input,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        timeout=timeout,
        text=text,
    )
    log.debug("exit %d: %s", proc.returncode, args[0])
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()
        last = err[-1] if err else f"exit status {proc.returncode}"
        raise RemotedlError(f"{Path(args[0]).name} failed: {last}")
    return proc


def run_all(
    argvs: Sequence[Sequence[str | os.PathLike[str]]], *, timeout: float | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run several short programs at once (text, captured, unchecked) and wait for all: one
    wait instead of one per program. Their output must be small (each is read in turn)."""
    started: list[tuple[list[str], subprocess.Popen[str]]] = []
    try:
        for argv in argvs:
            args = [str(a) for a in argv]
            log.debug("run: %s", shlex.join(args))
            p = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            started.append((args, p))
        done = []
        for args, p in started:
            out, err = p.communicate(timeout=timeout)
            log.debug("exit %d: %s", p.returncode, args[0])
            done.append(subprocess.CompletedProcess(args, p.returncode, out, err))
        return done
    finally:
        for _, p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def popen(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.PIPE,
    text: bool = True,
    start_new_session: bool = False,
) -> subprocess.Popen[Any]:
    """Start argv and return the process; the caller owns its lifetime."""
    args = [str(a) for a in argv]
    log.debug("popen: %s", shlex.join(args))
    return subprocess.Popen(
        args,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=start_new_session,
    )


class Completed:
    """What ``communicate`` returns: bytes, bounded."""

    def __init__(self, returncode: int, stdout: bytes, stderr: bytes, truncated: bool) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.truncated = truncated  # stdout passed ``max_stdout``: the process was killed


def communicate(
    argv: Sequence[str | os.PathLike[str]],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    timeout: float | None = None,
    max_stdout: int | None = None,
    max_stderr: int = 1 << 20,
    on_stdout: Callable[[bytes], None] | None = None,
) -> Completed:
    """Run argv, feeding ``input`` and reading both pipes at once (never one to the end first:
    that deadlocks when the other fills). stdout is kept up to ``max_stdout`` bytes (beyond it
    the process is killed: a hostile peer cannot make us hold gigabytes), or handed chunk by
    chunk to ``on_stdout``; stderr keeps its last ``max_stderr`` bytes."""
    import threading
    import time

    args = [str(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    p = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    assert p.stdout is not None
    assert p.stderr is not None
    err = bytearray()

    def feed() -> None:
        assert p.stdin is not None
        try:
            p.stdin.write(input or b"")
        except (BrokenPipeError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                p.stdin.close()

    done = threading.Event()

    def drain() -> None:
        # A grandchild (ssh's ControlMaster going to the background) may hold stderr open past
        # the child's exit: look with select and stop when told, so the pipe is never closed
        # under a read (its fd number could already be another file's).
        import select

        assert p.stderr is not None
        fd = p.stderr.fileno()
        while not done.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            err.extend(chunk)
            if len(err) > max_stderr:
                del err[: len(err) - max_stderr]

    threads = [threading.Thread(target=drain, daemon=True)]
    if input is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    for t in threads:
        t.start()
    killer: threading.Timer | None = None
    if timeout is not None:
        killer = threading.Timer(timeout, p.kill)
        killer.start()
    out = bytearray()
    truncated = False
    started = time.monotonic()
    try:
        fd = p.stdout.fileno()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            if on_stdout is not None:
                on_stdout(chunk)
                continue
            out.extend(chunk)
            if max_stdout is not None and len(out) > max_stdout:
                truncated = True
                p.kill()
                break
    except BaseException:
        p.kill()
        raise
    finally:
        code = p.wait()
        if killer is not None:
            killer.cancel()
        threads[0].join(5)
        done.set()
        for t in threads:
            t.join()
        p.stdout.close()
        p.stderr.close()
    log.debug("exit %d: %s", code, args[0])
    if timeout is not None and code < 0 and time.monotonic() - started >= timeout:
        raise subprocess.TimeoutExpired(args, timeout)
    return Completed(code, bytes(out), bytes(err), truncated)
