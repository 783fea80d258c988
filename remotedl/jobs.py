"""Client side of jobs: run, list, logs (with reconnect), kill, attach.

The box is the source of truth: every answer comes from the agent's records under
``~/.remotedl`` on the box, one exec per operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl.agent.client import AgentClient, error_from
from remotedl.errors import RemoteError, UsageError
from remotedl.schema import AGENT_MISSING, JobRecord, SchemaError
from remotedl.ssh.channel import NoFrame
from remotedl.ssh.openssh import login_shell_safe, openssh_failure, ssh_argv
from remotedl.ssh.resolve import HostSpec

__all__ = ["JobRecord", "build_command", "kill", "list_jobs", "start", "stream_logs"]

SCRIPT_SUFFIXES = (".sh", ".bash", ".py")


def _record(data: Any, spec: HostSpec) -> JobRecord:
    try:
        return JobRecord.from_dict(data)
    except SchemaError as e:
        raise RemoteError(f"the remotedl agent on {spec.alias} sent a bad job record ({e})") from None


def build_command(
    argv: Sequence[str], project_root: Path | None, *, must_exist: bool = True
) -> tuple[str, str | None]:
    """(shell command line, script path relative to the work tree or None).

    A first word that names a file in the project is that script, whatever its name holds
    (spaces, quotes). Else one word with spaces or shell syntax is a command line as typed;
    otherwise the words are quoted one by one, so arguments arrive exactly as given. A script in
    the project is run as ./script when executable, else through python3 or bash by its suffix.
    A script that is not here is an error when ``must_exist`` (we are about to push), else the
    box must have it."""
    if not argv:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    first, rest = argv[0], list(argv[1:])
    local = project_root / first if project_root is not None and not os.path.isabs(first) else None
    in_project = local is not None and local.is_file()
    if not in_project and len(argv) == 1 and any(c in first for c in " \t;|&$<>()`'\"*?"):
        return first, None
    if not in_project and (
        not (first.endswith(SCRIPT_SUFFIXES) or first.startswith("./")) or os.path.isabs(first)
    ):
        return shlex.join([first, *rest]), None
    script = os.path.normpath(first)
    if local is not None and in_project:
        if os.access(local, os.X_OK):
            first = first if "/" in first else "./" + first
        else:
            rest = [first, *rest]
            first = "python3" if first.endswith(".py") else "bash"
    elif must_exist:
        raise UsageError(
            f"no such script: {local or first}", hint="check the name; scripts run from the project root"
        )
    else:
        first = first if "/" in first else "./" + first
    return shlex.join([first, *rest]), script


def start(
    client: AgentClient,
    *,
    command: str,
    cwd: str,
    script: str | None = None,
    gpus: str | list[int] | None = None,
    count: int | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    queue: bool = False,
    force: bool = False,
    git_commit: str | None = None,
    snapshot: bool = False,
) -> JobRecord:
    request = {
        "op": "start",
        "command": command,
        "cwd": cwd,
        "script": script,
        "gpus": gpus if gpus is not None else "auto",
        "count": count,
        "env": dict(env or {}),
        "name": name,
        "queue": queue,
        "force": force,
        "git_commit": git_commit,
        "snapshot": snapshot,
    }
    return _record(client.call(request).get("job"), client.spec)


def list_jobs(client: AgentClient, *, all_jobs: bool = False) -> list[JobRecord]:
    answer = client.call({"op": "list", "all": all_jobs})
    jobs = answer.get("jobs")
    if not isinstance(jobs, list):
        raise RemoteError(f"the remotedl agent on {client.spec.alias} sent no job list")
    return [_record(r, client.spec) for r in jobs]


def get_job(client: AgentClient, job: str | None) -> JobRecord:
    return _record(client.call({"op": "get", "job": job}).get("job"), client.spec)


def kill(client: AgentClient, job: str | None, *, grace: float = 10.0) -> JobRecord:
    answer = client.call({"op": "kill", "job": job, "grace": grace})
    return _record(answer.get("job"), client.spec)


@dataclass
class LogState:
    job_id: int | None = None
    offset: int = 0
    reconnects: int = 0


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
) -> JobRecord:
    """Copy the job's log to ``write``. Following, a dropped connection is re-made and the log
    resumes at the byte offset reached: no byte lost, none repeated."""
    spec = client.spec
    st = state or LogState()
    down_since: float | None = None
    while True:
        request: dict[str, Any] = {
            "op": "logs",
            "job": st.job_id if st.job_id is not None else job,
            "follow": follow,
            "offset": st.offset,
        }
        if st.job_id is None and lines is not None:
            request["lines"] = lines
        p = client.stream(request)
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
                    _take_start(st, _marks(p.stderr_lines))
                write(chunk)
                st.offset += len(chunk)
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        marks = _marks(p.stderr_lines)
        if not got_start and "start" in marks:
            _take_start(st, marks)
        if "end" in marks:
            return _record(marks["end"].get("job"), spec)
        if "error" in marks:
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
            if on_reconnect is not None:
                on_reconnect(st.reconnects)
            time.sleep(min(0.2 * 2 ** min(st.reconnects, 5), 5.0))
            continue
        if code == 255 or not framed:
            raise openssh_failure(spec, err_text)
        lines_out = [x for x in p.stderr_lines if not x.startswith("@@remotedl-")]
        raise RemoteError(f"reading the log failed: {(lines_out or ['exit ' + str(code)])[-1]}")


def _marks(lines: list[str]) -> dict[str, Any]:
    marks: dict[str, Any] = {}
    for line in list(lines):
        for key in ("start", "end", "error"):
            tag = f"@@remotedl-{key} "
            if line.startswith(tag):
                with contextlib.suppress(ValueError):
                    value = json.loads(line[len(tag) :])
                    if isinstance(value, dict):
                        marks[key] = value
    return marks


def _take_start(st: LogState, marks: dict[str, Any]) -> None:
    start = marks.get("start")
    if start is not None and st.job_id is None:
        with contextlib.suppress(TypeError, ValueError):
            st.job_id = int(start["job"])
            st.offset = int(start["offset"])


def _wait_for(lines: list[str], key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while key not in _marks(lines) and time.monotonic() < deadline:
        time.sleep(0.001)


def attach_argv(spec: HostSpec, record: JobRecord) -> list[str]:
    if not record.session.replace("-", "").isalnum():
        raise RemoteError(f"job {record.id} has an odd tmux session name: {record.session!r}")
    return ssh_argv(
        spec, login_shell_safe(f"exec tmux attach-session -t ={record.session}"), tty=True, batch=False
    )
