"""Client side of jobs: run, list, logs (with reconnect), kill, attach.

The box is the source of truth: every answer comes from the agent's records under
``~/.remotedl`` on the box, one exec per operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from remotedl import proc
from remotedl.agent import ship
from remotedl.errors import RemotedlError, RemoteError, UsageError
from remotedl.ssh import HostSpec, openssh_argv, openssh_failure

SCRIPT_SUFFIXES = (".sh", ".bash", ".py")


@dataclass
class JobRecord:
    id: int
    name: str
    command: str
    cwd: str
    status: str
    gpus: list[int] = field(default_factory=list)
    exit_code: int | None = None
    created: float | None = None
    started: float | None = None
    ended: float | None = None
    log: str = ""
    session: str = ""
    git_commit: str | None = None
    snapshot: bool = False
    env_keys: list[str] = field(default_factory=list)
    error: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def duration(self) -> float | None:
        if not self.started:
            return None
        return (self.ended or time.time()) - self.started


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
    spec: HostSpec,
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
    python: str = "python3",
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
    return JobRecord.from_dict(ship.call(spec, request, python=python)["job"])


def list_jobs(spec: HostSpec, *, all_jobs: bool = False, python: str = "python3") -> list[JobRecord]:
    answer = ship.call(spec, {"op": "list", "all": all_jobs}, python=python)
    return [JobRecord.from_dict(r) for r in answer["jobs"]]


def get_job(spec: HostSpec, job: str | None, *, python: str = "python3") -> JobRecord:
    return JobRecord.from_dict(ship.call(spec, {"op": "get", "job": job}, python=python)["job"])


def kill(spec: HostSpec, job: str | None, *, grace: float = 10.0, python: str = "python3") -> JobRecord:
    answer = ship.call(spec, {"op": "kill", "job": job, "grace": grace}, python=python)
    return JobRecord.from_dict(answer["job"])


@dataclass
class LogState:
    job_id: int | None = None
    offset: int = 0
    reconnects: int = 0


def stream_logs(
    spec: HostSpec,
    job: str | None,
    write: Callable[[bytes], None],
    *,
    follow: bool = False,
    lines: int | None = None,
    python: str = "python3",
    reconnect_for: float = 300.0,
    on_reconnect: Callable[[int], None] | None = None,
    state: LogState | None = None,
    out_fd: int | None = None,
) -> JobRecord:
    """Copy the job's log to ``write``. Following, a dropped connection is re-made and the log
    resumes at the byte offset reached: no byte lost, none repeated. Not following, with
    ``out_fd``, ssh writes the log straight to that file descriptor (no copy through Python)."""
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
        argv = openssh_argv(spec, ship.agent_command(spec, python, request))
        direct = out_fd is not None and not follow
        p = proc.popen(argv, stdout=out_fd if direct else subprocess.PIPE, stderr=subprocess.PIPE, text=False)
        marks: dict[str, Any] = {}
        err_lines: list[str] = []
        reader = threading.Thread(target=_read_marks, args=(p, marks, err_lines), daemon=True)
        reader.start()
        got_start = False
        try:
            while not direct:
                assert p.stdout is not None
                fd = p.stdout.fileno()
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                if not got_start:
                    # stdout bytes only come after the start mark was written; wait for it
                    _wait_for(marks, "start", 5)
                    got_start = True
                    _take_start(st, marks)
                write(chunk)
                st.offset += len(chunk)
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        reader.join(5)
        if not got_start and "start" in marks:
            _take_start(st, marks)
        if "end" in marks:
            return JobRecord.from_dict(marks["end"]["job"])
        if "error" in marks:
            answer = marks["error"]
            if answer.get("kind") == "usage":
                raise UsageError(answer["error"], answer.get("hint"))
            raise RemotedlError(answer["error"], answer.get("hint"))
        if code == ship.MISSING:
            ship.upload_agent(spec, ship.build_agent(), python)
            continue
        if code == 255 and follow:
            now = time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_for:
                raise openssh_failure(spec, "\n".join(err_lines))
            st.reconnects += 1
            if on_reconnect is not None:
                on_reconnect(st.reconnects)
            time.sleep(min(0.2 * 2 ** min(st.reconnects, 5), 5.0))
            continue
        if code == 255:
            raise openssh_failure(spec, "\n".join(err_lines))
        raise RemoteError(f"reading the log failed: {(err_lines or ['exit ' + str(code)])[-1]}")


def _take_start(st: LogState, marks: dict[str, Any]) -> None:
    start = marks.get("start")
    if start is not None and st.job_id is None:
        st.job_id = int(start["job"])
        st.offset = int(start["offset"])


def _wait_for(marks: dict[str, Any], key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while key not in marks and time.monotonic() < deadline:
        time.sleep(0.001)


def _read_marks(p: subprocess.Popen[bytes], marks: dict[str, Any], err_lines: list[str]) -> None:
    assert p.stderr is not None
    for raw in p.stderr:
        line = raw.decode(errors="replace").rstrip("\n")
        for key in ("start", "end", "error"):
            tag = f"@@remotedl-{key} "
            if line.startswith(tag):
                with contextlib.suppress(ValueError):
                    marks[key] = json.loads(line[len(tag) :])
                break
        else:
            err_lines.append(line)


def attach_argv(spec: HostSpec, record: JobRecord) -> list[str]:
    return openssh_argv(
        spec, "exec tmux attach-session -t " + shlex.quote("=" + record.session), tty=True, batch=False
    )
