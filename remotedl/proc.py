"""The one place that runs local programs (ssh, rsync, git, ssh-keygen, sshd, tmux).

Every call is logged with its exact argv (``shlex.join``) at debug level, so
``--debug`` shows what remotedl ran, copy-pasteable into a shell.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
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
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip().splitlines()
        last = err[-1] if err else f"exit status {proc.returncode}"
        raise RemotedlError(f"{Path(args[0]).name} failed: {last}")
    return proc


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
