"""Box side of jobs. One request (JSON on stdin) per exec; one JSON answer on stdout.

State lives under ``~/.remotedl`` so any laptop sees the same jobs:
``jobs/<id>.json`` (the record), ``logs/<id>.log``, ``lock`` (flock: choosing and claiming
GPUs is one atomic step), ``next_id``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from remotedl import gpus as gpumod
from remotedl.schema import ACTIVE, MAX_REQUEST
from remotedl.waiting import pid_alive as _alive

QUEUE_POLL = 2.0


class AgentError(Exception):
    def __init__(self, message: str, kind: str = "error", hint: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def state_dir() -> Path:
    return Path(os.environ.get("REMOTEDL_BOX_STATE") or Path.home() / ".remotedl")


def jobs_dir() -> Path:
    return state_dir() / "jobs"


def logs_dir() -> Path:
    return state_dir() / "logs"


def _ensure_dirs() -> None:
    for d in (state_dir(), jobs_dir(), logs_dir()):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)


@contextlib.contextmanager
def box_lock() -> Iterator[None]:
    _ensure_dirs()
    with open(state_dir() / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def record_path(job_id: int) -> Path:
    return jobs_dir() / f"{job_id}.json"


def load(job_id: int) -> dict[str, Any]:
    try:
        return dict(json.loads(record_path(job_id).read_text()))
    except FileNotFoundError:
        raise AgentError(f"no job {job_id} on this box", "notfound") from None


def save(rec: dict[str, Any]) -> None:
    _write_json(record_path(int(rec["id"])), rec)


def all_records() -> list[dict[str, Any]]:
    out = []
    for p in jobs_dir().glob("*.json"):
        with contextlib.suppress(ValueError, OSError):
            out.append(json.loads(p.read_text()))
    out.sort(key=lambda r: int(r["id"]))
    return out


def session_name(job_id: int) -> str:
    return f"remotedl-{job_id}"


def _tmux_sessions() -> set[str]:
    try:
        out = subprocess.run(
            ["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return set()
    return set(out.stdout.split()) if out.returncode == 0 else set()


def refresh(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark active jobs whose tmux session and runner vanished (box rebooted) as lost."""
    active = [r for r in records if r["status"] in ACTIVE]
    if not active:
        return records
    sessions = _tmux_sessions()
    for r in active:
        if session_name(r["id"]) not in sessions and not _alive(r.get("runner_pid")):
            fresh = load(r["id"])  # the runner may have just finished
            if fresh["status"] in ACTIVE:
                fresh["status"] = "lost"
                fresh["ended"] = fresh.get("ended") or time.time()
                save(fresh)
            r.update(fresh)
    return records


def resolve(ref: str | int | None) -> dict[str, Any]:
    """A job by id, by name (the latest of that name), or the latest job when None."""
    records = refresh(all_records())
    if not records:
        raise AgentError(
            "there are no jobs on this box yet", "notfound", hint="start one with `remotedl run COMMAND`"
        )
    if ref in (None, "", "last"):
        return records[-1]
    if isinstance(ref, int) or str(ref).isdigit():
        return load(int(ref))
    named = [r for r in records if r.get("name") == ref]
    if not named:
        raise AgentError(
            f"no job called '{ref}' on this box", "notfound", hint="`remotedl jobs --all` lists them"
        )
    return named[-1]


def _user_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return pwd.getpwuid(int(line.split()[1])).pw_name
    except (OSError, KeyError, ValueError):
        return None
    return None


def query_gpus() -> list[gpumod.Gpu] | None:
    """The box's GPUs with their compute processes; None when there is no NVIDIA driver."""
    try:
        out = subprocess.run(gpumod.QUERY_GPUS, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        raise AgentError("nvidia-smi failed: " + (out.stdout + out.stderr).strip().splitlines()[0])
    found = gpumod.parse_gpus(out.stdout)
    apps = subprocess.run(gpumod.QUERY_APPS, capture_output=True, text=True, check=False)
    procs = gpumod.parse_apps(apps.stdout) if apps.returncode == 0 else []
    for p in procs:
        p.user = _user_of(p.pid)
    gpumod.attach_processes(found, procs)
    return found


def _holders(gpus: list[gpumod.Gpu], records: list[dict[str, Any]]) -> dict[int, str]:
    """GPU index -> who holds it, in words."""
    held: dict[int, str] = {}
    for r in records:
        if r["status"] == "running":
            for g in r.get("gpus") or []:
                held[g] = f"job {r['id']} ({r.get('name')})"
    for g in gpus:
        if g.index not in held and g.processes:
            p = g.processes[0]
            mem = f", {p.used_memory_mib} MiB" if p.used_memory_mib is not None else ""
            held[g.index] = f"process {p.pid} ({p.name.rsplit('/', 1)[-1]}, user {p.user or '?'}{mem})"
    return held


def _gpus_text(n: int, word: str = "GPU") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def choose_gpus(req: dict[str, Any], records: list[dict[str, Any]]) -> list[int] | None:
    """GPUs for the job, or None when it must wait (``queue``). Raises when it cannot run."""
    wanted = req.get("gpus")  # list of indices, "auto", or "none"
    count = int(req.get("count") or 1)
    if wanted == "none":
        return []
    gpus = query_gpus()
    if gpus is None:
        if wanted in (None, "auto") and not req.get("count"):
            return []  # a CPU box: the job runs on the CPU
        raise AgentError(
            "this box has no NVIDIA GPU (nvidia-smi is not on its PATH)",
            "usage",
            hint="run without --gpu/--gpus to use the CPU",
        )
    indices = [g.index for g in gpus]
    held = _holders(gpus, records)
    # What can never be: a usage error now, never a wait (``queue`` would wait forever).
    names = ", ".join(f"{g.index} ({g.name})" for g in gpus) or "none"
    if isinstance(wanted, list):
        missing = [i for i in wanted if i not in indices]
        if missing:
            raise AgentError(
                f"GPU {', '.join(map(str, missing))} does not exist on this box; "
                f"it has {_gpus_text(len(gpus))}: {names}",
                "usage",
                hint="pick from those with --gpu",
            )
        busy = {i: held[i] for i in wanted if i in held}
        if busy and not req.get("force"):
            if req.get("queue"):
                return None
            who = "; ".join(f"GPU {i} is used by {w}" for i, w in busy.items())
            raise AgentError(
                who,
                "busy",
                hint="pick another with --gpu, wait with --queue, or share it anyway with --force",
            )
        return list(wanted)
    if not gpus and not req.get("count"):
        return []
    if count > len(gpus):
        raise AgentError(
            f"--gpus {count} asks for more GPUs than this box has: it has {_gpus_text(len(gpus))}: {names}",
            "usage",
            hint=f"ask for at most {len(gpus)}" if gpus else "run with --cpu",
        )
    picked = gpumod.pick_free_gpus(gpus, held, count)
    if picked is None:
        if req.get("queue"):
            return None
        who = "; ".join(f"GPU {i}: {w}" for i, w in sorted(held.items()))
        raise AgentError(
            f"no {_gpus_text(count, 'free GPU')} on this box ({who})",
            "busy",
            hint="wait for them with --queue, or choose one with --gpu N --force",
        )
    return picked


def _next_id() -> int:
    path = state_dir() / "next_id"
    try:
        n = int(path.read_text())
    except (OSError, ValueError):
        n = max([int(r["id"]) for r in all_records()] + [0]) + 1
    path.write_text(str(n + 1))
    return n


def op_start(req: dict[str, Any]) -> dict[str, Any]:
    cwd = os.path.expanduser(req["cwd"])
    if not os.path.isdir(cwd):
        raise AgentError(
            f"the work tree {cwd} does not exist on the box", "usage", hint="push first (drop --no-push)"
        )
    script = req.get("script")
    if script and not os.path.exists(os.path.join(cwd, script)):
        raise AgentError(
            f"no such script on the box: {os.path.join(cwd, script)}",
            "usage",
            hint="is it committed or pushed? `remotedl push` sends uncommitted files too",
        )
    if subprocess.run(["sh", "-c", "command -v tmux"], capture_output=True, check=False).returncode:
        raise AgentError(
            "tmux is not installed on the box",
            "usage",
            hint="install it there (`sudo apt-get install tmux`) or run `remotedl setup base`",
        )
    with box_lock():
        records = refresh(all_records())
        chosen = choose_gpus(req, records)
        job_id = _next_id()
        rec: dict[str, Any] = {
            "id": job_id,
            "name": req.get("name") or str(job_id),
            "command": req["command"],
            "cwd": cwd,
            "gpus": chosen if chosen is not None else [],
            "want": {k: req.get(k) for k in ("gpus", "count", "force")},
            "env_keys": sorted((req.get("env") or {}).keys()),
            "git_commit": req.get("git_commit"),
            "snapshot": bool(req.get("snapshot")),
            "status": "queued" if chosen is None else "running",
            "exit_code": None,
            "created": time.time(),
            "started": None,
            "ended": None,
            "log": str(logs_dir() / f"{job_id}.log"),
            "session": session_name(job_id),
            "runner_pid": None,
            "pid": None,
        }
        save(rec)
        env_file = jobs_dir() / f"{job_id}.env"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(req.get("env") or {}, f)
        Path(rec["log"]).touch(mode=0o600)
        runner = shlex.join(
            [sys.executable, "-E", "-s", "-S", sys.argv[0], json.dumps({"op": "runner", "id": job_id})]
        )
        import libtmux

        try:
            libtmux.Server().new_session(
                session_name=rec["session"],
                window_command=runner,
                start_directory=cwd,
                detach=True,
                x=200,
                y=50,
            )
        except Exception as e:
            rec["status"] = "failed"
            rec["ended"] = time.time()
            save(rec)
            raise AgentError(f"tmux could not start the job: {e}") from e
    # The GPUs are claimed and the tmux session runs the job: answer now (the runner records
    # its pid a moment later; waiting for it would cost a Python start-up per run).
    return {"job": load(job_id)}


def _job_env(rec: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env_file = jobs_dir() / f"{rec['id']}.env"
    with contextlib.suppress(OSError, ValueError):
        env.update(json.loads(env_file.read_text()))
    with contextlib.suppress(OSError):
        env_file.unlink()  # values may be secrets: they live only as long as needed
    env.pop("TMUX", None)
    env.pop("TMUX_PANE", None)
    env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")  # logs stream, not block-buffered
    env["REMOTEDL_JOB_ID"] = str(rec["id"])
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers GPUs as nvidia-smi does
    if rec.get("gpus"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in rec["gpus"])
    elif rec.get("want", {}).get("gpus") == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job on a GPU box sees no GPU
    return env


def op_runner(req: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the job's tmux session: wait for GPUs if queued, run, record the end."""
    job_id = int(req["id"])
    rec = load(job_id)
    rec["runner_pid"] = os.getpid()
    save(rec)
    while rec["status"] == "queued":
        with box_lock():
            rec = load(job_id)
            if rec["status"] != "queued":
                break
            others = [r for r in refresh(all_records()) if r["id"] != job_id]
            want = dict(rec["want"], queue=True)
            try:
                chosen = choose_gpus(want, others)
            except AgentError as e:
                rec.update(status="failed", ended=time.time(), error=str(e))
                save(rec)
                return {}
            if chosen is not None:
                rec.update(status="running", gpus=chosen)
                save(rec)
                break
        print(f"remotedl: job {job_id} queued, waiting for GPUs...", flush=True)
        time.sleep(QUEUE_POLL)
    if rec["status"] != "running":
        return {}
    env = _job_env(rec)
    log = open(rec["log"], "ab", buffering=0)  # noqa: SIM115 - closed below after the pump
    try:
        child = subprocess.Popen(
            ["sh", "-c", rec["command"]],
            cwd=rec["cwd"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        log.write(f"remotedl: cannot start: {e}\n".encode())
        rec.update(status="failed", ended=time.time(), error=str(e))
        save(rec)
        return {}
    rec.update(pid=child.pid, pgid=child.pid, started=time.time())
    save(rec)
    assert child.stdout is not None
    out = sys.stdout.buffer
    fd = child.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        log.write(chunk)
        with contextlib.suppress(OSError):
            out.write(chunk)
            out.flush()
    code = child.wait()
    log.close()
    rec = load(job_id)
    killed = (jobs_dir() / f"{job_id}.kill").exists()
    exit_code = code if code >= 0 else 128 - code
    rec.update(
        status="killed" if killed else ("succeeded" if exit_code == 0 else "failed"),
        exit_code=exit_code,
        ended=time.time(),
    )
    save(rec)
    return {}


def op_list(req: dict[str, Any]) -> dict[str, Any]:
    _ensure_dirs()
    records = refresh(all_records())
    if not req.get("all"):
        recent = [r for r in records if r["status"] not in ACTIVE][-10:]
        records = [r for r in records if r["status"] in ACTIVE or r in recent]
    return {"jobs": records}


def op_get(req: dict[str, Any]) -> dict[str, Any]:
    return {"job": resolve(req.get("job"))}


def op_kill(req: dict[str, Any]) -> dict[str, Any]:
    rec = resolve(req.get("job"))
    grace = float(req.get("grace", 10))
    job_id = int(rec["id"])
    if rec["status"] not in ACTIVE:
        return {"job": rec, "already": True}
    (jobs_dir() / f"{job_id}.kill").touch()
    if rec["status"] == "queued" or not rec.get("pgid"):
        import libtmux

        with contextlib.suppress(Exception):
            libtmux.Server().kill_session(rec["session"])
        with box_lock():
            rec = load(job_id)
            if rec["status"] == "queued":
                rec.update(status="killed", ended=time.time())
                save(rec)
        return {"job": load(job_id)}
    pgid = int(rec["pgid"])
    steps = []
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        steps.append(signal.Signals(sig).name)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            time.sleep(0.05)
        if not _group_alive(pgid):
            break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and load(job_id)["status"] in ACTIVE:
        time.sleep(0.05)
    return {"job": load(job_id), "signals": steps}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def op_logs(req: dict[str, Any]) -> dict[str, Any] | None:
    """Stream the log from ``offset`` (or the last ``lines``) to stdout; with ``follow``,
    until the job ends. The end status goes to stderr as one JSON line."""
    rec = resolve(req.get("job"))
    path = rec["log"]
    out = sys.stdout.buffer
    offset = int(req.get("offset") or 0)
    try:
        f = open(path, "rb")  # noqa: SIM115 - long-lived, closed below
    except FileNotFoundError:
        raise AgentError(f"the log of job {rec['id']} is gone ({path})", "notfound") from None
    with f:
        if req.get("lines") is not None and not offset:
            offset = _tail_offset(f, int(req["lines"]))
        f.seek(offset)
        # The client counts bytes from here, so a reconnect resumes exactly where it left off.
        sys.stderr.write("@@remotedl-start " + json.dumps({"job": rec["id"], "offset": offset}) + "\n")
        sys.stderr.flush()
        idle = 0.0
        if not req.get("follow"):
            _send_rest(f, offset)
            sys.stderr.write("@@remotedl-end " + json.dumps({"job": rec}) + "\n")
            return None
        while True:
            chunk = f.read(1 << 20)
            if chunk:
                out.write(chunk)
                idle = 0.0
                continue
            out.flush()
            if not req.get("follow"):
                break
            if idle >= 0.5 or idle == 0.0:
                rec = refresh([load(int(rec["id"]))])[0]
                if rec["status"] not in ACTIVE:
                    chunk = f.read()  # what the job wrote just before it ended
                    if chunk:
                        out.write(chunk)
                        out.flush()
                    break
                idle = 0.0 if idle >= 0.5 else idle
            time.sleep(0.05)
            idle += 0.05
    sys.stderr.write("@@remotedl-end " + json.dumps({"job": rec}) + "\n")
    sys.stderr.flush()
    return None


def _send_rest(f: Any, offset: int) -> None:
    """Copy the file from ``offset`` to stdout in the kernel (sendfile), else by chunks."""
    out_fd = sys.stdout.fileno()
    sys.stdout.flush()
    try:
        while True:
            sent = os.sendfile(out_fd, f.fileno(), offset, 1 << 24)
            if sent == 0:
                return
            offset += sent
    except OSError:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()


def _tail_offset(f: Any, lines: int) -> int:  # f: a binary file
    f.seek(0, os.SEEK_END)
    end = pos = f.tell()
    found = 0
    while pos > 0:
        step = min(65536, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        if pos + step == end and block.endswith(b"\n"):
            block = block[:-1]
        for i in range(len(block) - 1, -1, -1):
            if block[i] == 10:
                found += 1
                if found == lines:
                    return int(pos + i + 1)
    return 0


def op_gpus(req: dict[str, Any]) -> dict[str, Any]:
    found = query_gpus()
    records = refresh(all_records()) if jobs_dir().exists() else []
    if found is None:
        return {"gpus": None}
    held = _holders(found, records)
    return {"gpus": [{"index": g.index, "name": g.name, "held_by": held.get(g.index)} for g in found]}


OPS = {
    "start": op_start,
    "runner": op_runner,
    "list": op_list,
    "get": op_get,
    "kill": op_kill,
    "logs": op_logs,
    "gpus": op_gpus,
}


def read_request(argv: list[str]) -> dict[str, Any]:
    """The request: JSON on stdin from the laptop, or in argv for the agent's own runner."""
    raw = argv[0].encode() if argv else sys.stdin.buffer.read(MAX_REQUEST + 1)
    if len(raw) > MAX_REQUEST:
        raise ValueError("request too large")
    req = json.loads(raw)
    if not isinstance(req, dict) or req.get("op") not in OPS:
        raise ValueError("not a request")
    return req


def main(argv: list[str]) -> int:
    try:
        req = read_request(argv)
        op = OPS[req["op"]]
    except (ValueError, KeyError, UnicodeDecodeError):
        # Never echo the request: it may hold secrets.
        print(json.dumps({"ok": False, "kind": "protocol", "error": "the agent got a malformed request"}))
        return 2
    try:
        result = op(req)
    except AgentError as e:
        answer = {"ok": False, "kind": e.kind, "error": str(e), "hint": e.hint}
        if req["op"] == "logs":
            sys.stderr.write("@@remotedl-error " + json.dumps(answer) + "\n")
            return 3
        print(json.dumps(answer))
        return 3
    except gpumod.NvidiaSmiError as e:
        print(json.dumps({"ok": False, "kind": "error", "error": str(e)}))
        return 3
    if result is not None and req["op"] != "runner":
        print(json.dumps({"ok": True, **result}))
    return 0
