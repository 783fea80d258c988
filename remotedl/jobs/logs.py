"""A job's output and terminal: its log streamed (with reconnect) and ``attach``'s ssh argv."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from remotedl.agent.client import AgentClient, error_from
from remotedl.errors import RemoteError, UsageError
from remotedl.jobs.start import Warn, _record, _warnings
from remotedl.schema import AGENT_MISSING, MARK_PREFIX, JobRecord, LogsRequest, parse_mark
from remotedl.ssh.channel import Box, NoFrame, box_key, no_base64
from remotedl.ssh.openssh import login_shell_safe, openssh_failure, ssh_argv
from remotedl.ssh.resolve import HostSpec


@dataclass
class LogState:
    job_id: int | None = None
    offset: int = 0
    reconnects: int = 0
    warned: bool = False


def stream_logs(
    client: AgentClient,
    job: str | None,
    write: Callable[[bytes], None],
    *,
    follow: bool = False,
    lines: int | None = None,
    reconnect_for: float = 300.0,
    on_reconnect: Callable[[int], None] | None = None,
    state: LogState | None = None,
    project: str | None = None,
    warn: Warn | None = None,
    out_fd: int | None = None,
    on_state: Callable[[dict[str, Any]], None] | None = None,
) -> JobRecord:
    """Copy the job's log to ``write``. Not following, with ``out_fd`` (where ``write`` goes,
    flushed), the bytes after the first chunk move to it in the kernel. Following, a dropped
    connection is re-made and the log resumes at the byte offset reached: no byte lost, none
    repeated. Each outage may last ``reconnect_for`` seconds: the window, the back-off between
    attempts (0.2 s doubling to 5 s) and the attempt count ``on_reconnect`` hears start again
    after every successful reconnect. ``on_state`` hears a Slurm job's state as it changes (e.g.
    ``{"state": "PENDING (Resources)", ...}`` while it waits), as the agent says it."""
    spec = client.spec
    on_line = None
    if on_state is not None:
        listener = on_state

        def on_line(line: str) -> None:
            mark = parse_mark(line)
            if mark is not None and mark[0] == "state":
                listener(mark[1])

    st = state or LogState()
    down_since: float | None = None
    attempt = 0  # reconnect attempts in this outage: the back-off and the count start over
    while True:
        request = LogsRequest(
            job=st.job_id if st.job_id is not None else job,
            follow=follow,
            offset=st.offset,
            project=project,
            lines=lines if st.job_id is None else None,
        ).to_dict()
        p = client.stream(request, on_line=on_line)
        got_start = False
        framed = True
        try:
            while True:
                try:
                    chunk = p.read()
                except NoFrame:
                    framed = False
                    break
                if not chunk:
                    break
                if not got_start:
                    # stdout bytes only come after the start mark was written; wait for it
                    _wait_for(p.stderr_lines, "start", 5)
                    got_start = True
                    down_since, attempt = None, 0  # connected again: a later cut starts afresh
                    _take_start(st, _marks(p.stderr_lines), warn)
                write(chunk)
                st.offset += len(chunk)
                if out_fd is not None and not follow:
                    while moved := p.copy_to(out_fd):
                        st.offset += moved
                    break
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        if not framed and p.inline and no_base64(p.stderr_text()):
            Box.no_base64[box_key(spec)] = True  # on stdin from now on
            continue
        marks = _marks(p.stderr_lines)
        if not got_start and "start" in marks:
            down_since, attempt = None, 0
            _take_start(st, marks, warn)
        if "end" in marks:
            return _record(marks["end"].get("job"), spec)
        if "error" in marks:
            _warnings(marks["error"], warn)
            raise error_from(marks["error"])
        if code == AGENT_MISSING:
            client.upload()
            continue
        err_text = p.stderr_text()
        if (code == 255 or not framed) and follow:
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_for:
                raise openssh_failure(spec, err_text)
            st.reconnects += 1
            attempt += 1
            if on_reconnect is not None:
                on_reconnect(attempt)
            time.sleep(min(0.2 * 2 ** (attempt - 1), 5.0))
            continue
        if code == 255 or not framed:
            raise openssh_failure(spec, err_text)
        lines_out = [x for x in p.stderr_lines if not x.startswith(MARK_PREFIX)]
        raise RemoteError(f"reading the log failed: {(lines_out or ['exit ' + str(code)])[-1]}")


def _marks(lines: list[str]) -> dict[str, Any]:
    marks: dict[str, Any] = {}
    for line in list(lines):
        mark = parse_mark(line)
        if mark is not None and mark[0] != "state":
            marks[mark[0]] = mark[1]
    return marks


def _take_start(st: LogState, marks: dict[str, Any], warn: Warn | None = None) -> None:
    start = marks.get("start")
    if start is not None and not st.warned:
        st.warned = True
        _warnings(start, warn)
    if start is not None and st.job_id is None:
        with contextlib.suppress(TypeError, ValueError):
            st.job_id = int(start["job"])
            st.offset = int(start["offset"])


def _wait_for(lines: list[str], key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while key not in _marks(lines) and time.monotonic() < deadline:
        time.sleep(0.001)


def attach_argv(spec: HostSpec, record: JobRecord) -> list[str]:
    """ssh with a terminal into the job: its tmux session, or on a Slurm login node an
    interactive shell in its allocation (``srun --overlap --pty``). The command on the box is
    the job's runtime's (``agent/runtimes``: one definition for each kind of job)."""
    from remotedl.agent import runtimes
    from remotedl.agent.store import AgentError

    if record.scheduler == "slurm" and (not record.slurm_id or record.status != "running"):
        raise UsageError(
            f"job {record.id} is {record.state}: there is no allocation to attach to yet"
            if record.status == "queued"
            else f"job {record.id} is {record.state}: nothing to attach to",
            hint=f"`remotedl logs -f {record.id}` follows it",
        )
    rec = record.to_dict()
    try:
        command = runtimes.of(rec).attach(rec)
    except AgentError as e:  # an odd session name, a Slurm id that is not one
        raise RemoteError(str(e)) from None
    return ssh_argv(spec, login_shell_safe(command), tty=True, batch=False)
