"""The job's runner (the tmux runtime's process): inside the job's tmux session it waits for its
checkout and its GPUs, runs the command in its environment, copies the output to the log, and
records the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from remotedl.agent import trackers
from remotedl.agent.envsync import PROBE, WRAPPER, shell_for
from remotedl.agent.gpus import blocked_by_earlier, choose_gpus
from remotedl.agent.runtimes import container
from remotedl.agent.runtimes.tmux import JOB_MARK, job_processes
from remotedl.agent.state import active
from remotedl.agent.store import (
    AgentError,
    Context,
    box_lock,
    env_path,
    kill_marker,
    load,
    notify_path,
    preempt_marker,
    remove_env_file,
    save,
    update,
)
from remotedl.schema import RunnerRequest
from remotedl.waiting import pid_alive as _alive

QUEUE_POLL = 1.0


def _job_values(rec: dict[str, Any]) -> dict[str, str]:
    """The job's --env values, read once: their file is removed (they may be secrets, and live
    only as long as needed)."""
    values: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        values = {str(k): str(v) for k, v in json.loads(env_path(int(rec["id"])).read_text()).items()}
    remove_env_file(int(rec["id"]))
    return values


def _job_env(rec: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    env.pop("TMUX", None)
    env.pop("TMUX_PANE", None)
    env["PYTHONUNBUFFERED"] = env.get("PYTHONUNBUFFERED", "1")  # logs stream, not block-buffered
    env["REMOTEDL_JOB_ID"] = str(rec["id"])
    if rec.get("mark"):
        env[JOB_MARK] = str(rec["mark"])
    trackers.apply(rec, env)  # W&B and MLflow write into the job's directory
    env["REMOTEDL_JOB_DIR"] = str(rec["cwd"])
    env["REMOTEDL_REMOTE_DIR"] = str(rec.get("remote_dir") or rec["cwd"])
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA numbers GPUs as nvidia-smi does
    if rec.get("gpus"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in rec["gpus"])
    elif rec.get("want", {}).get("gpus") == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job on a GPU box sees no GPU
    return env


def _wait_ready(rec: dict[str, Any]) -> dict[str, Any]:
    """Until the starter has made the job's checkout (or gave up, or died doing it)."""
    job_id = int(rec["id"])
    deadline = time.monotonic() + 3600  # a checkout of a huge tree takes a while
    while rec["status"] in ("starting", "queued") and not rec.get("ready", True):
        if not _alive(rec.get("starter_pid")) or time.monotonic() > deadline:
            rec = load(job_id)
            if rec.get("ready", True) or rec["status"] not in ("starting", "queued"):
                return rec
            with box_lock():
                rec = load(job_id)
                if rec["status"] in ("starting", "queued") and not rec.get("ready", True):
                    rec.update(status="failed", ended=time.time(), error="the start was interrupted")
                    save(rec)
            return rec
        time.sleep(0.002)
        rec = load(job_id)
    return rec


def _wait_in_queue(ctx: Context, rec: dict[str, Any]) -> dict[str, Any]:
    job_id = int(rec["id"])
    said = False
    while rec["status"] == "queued":
        with box_lock():
            rec = load(job_id)
            if rec["status"] != "queued":
                break
            # The queue and the GPUs' holders are active jobs: the index of them is enough.
            others = [r for r in active(ctx) if r["id"] != job_id]
            if not blocked_by_earlier(rec, others):
                try:
                    chosen = choose_gpus(dict(rec["want"], queue=True), others)
                except AgentError as e:
                    rec.update(status="failed", ended=time.time(), error=str(e))
                    save(rec)
                    return rec
                if chosen is not None:
                    rec.update(status="starting", gpus=chosen)
                    save(rec)
                    break
        _announce(ctx)
        if not said:
            with contextlib.suppress(OSError):
                print(f"remotedl: job {job_id} queued, waiting for GPUs...", flush=True)
            said = True
        time.sleep(QUEUE_POLL)
    return rec


def _take_environment(job_id: int, raw: bytes) -> None:
    with contextlib.suppress(ValueError, AgentError):
        info = json.loads(raw.decode(errors="replace"))
        if isinstance(info, dict):
            with box_lock():
                rec = load(job_id)
                rec["environment"] = {**(rec.get("environment") or {}), **info}
                save(rec)


def _exit_of(code: int) -> int:
    return code if code >= 0 else 128 - code


def _wait_all(rec: dict[str, Any], child: subprocess.Popen[bytes]) -> None:
    """The job's main process, then what it left running (``nohup cmd &``, a daemon): the job
    runs, and holds its GPUs, until they are gone too; its record says how many are left."""
    child.wait()
    said = None
    while left := len(job_processes(rec)):
        if left != said:
            with box_lock():
                fresh = load(int(rec["id"]))
                if fresh["status"] == "running":
                    fresh.update(main_exit=_exit_of(child.returncode), leftovers=left)
                    save(fresh)
            said = left
        time.sleep(QUEUE_POLL)


def _announce(ctx: Context) -> None:
    """Send what a look found (jobs that ended with no runner left): from processes of their own."""
    if ctx.news:
        from remotedl.agent import events

        events.announce(ctx, [])


def _in_container(
    rec: dict[str, Any], inner: list[str], values: dict[str, str]
) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The job's shell in its container: ``docker run`` (its argv), the client's environment
    (the box's, where the engine's settings are, and the values the env file cannot hold), and
    the job's environment inside."""
    job_id = int(rec["id"])
    inside = container.container_env(rec, values)
    trackers.apply(rec, inside)  # W&B and MLflow write into the job's directory, mounted
    path, by_name = container.write_env_file(job_id, inside)
    argv = container.run_argv(str(rec["engine"]), rec, inner, path, by_name)
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env.update({k: inside[k] for k in by_name})
    if rec.get("mark"):
        env[JOB_MARK] = str(rec["mark"])
    return argv, env, inside


def _forget_env_file(rec: dict[str, Any], child: subprocess.Popen[bytes]) -> None:
    """The container's env file, removed once the engine made the container (its client has
    read it then), or once the client exited."""
    engine, name = str(rec["engine"]), str(rec["container"])
    while child.poll() is None:
        with contextlib.suppress(OSError):
            made = container.engine_run(engine, "container", "inspect", "--format", "{{.Id}}", name)
            if made.returncode == 0:
                break
        time.sleep(0.05)
    container.remove_env_file(int(rec["id"]))


def _pull(rec: dict[str, Any]) -> dict[str, Any]:
    """The job's image on the box (pulled when missing, the engine's output in the log and the
    pane), and its digest in the record; a failed pull fails the job. The starter looked the
    image up while this runner started (``ContainerRuntime.launch``): a digest in the record
    says it is there, and the engine is asked nothing more."""
    job_id = int(rec["id"])
    engine, image = str(rec["engine"]), str(rec["image"])
    have = load(job_id).get("image_digest") or None
    error = ""
    if have is None:
        try:
            have = container.image_digest(engine, image)
        except OSError as e:
            error = str(e)
    if have is None and not error:
        rec = update(job_id, phase="pulling")  # the starter answers: the follower sees the pull
        with open(rec["log"], "ab", buffering=0) as log:

            def say(line: bytes) -> None:
                log.write(line)
                with contextlib.suppress(OSError):
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()

            say(f"remotedl: pulling {image} on the box...\n".encode())
            last = b""
            try:
                proc = subprocess.Popen(
                    [engine, "pull", image],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
                assert proc.stdout is not None
                for line in proc.stdout:
                    say(line)
                    last = line.strip() or last
                code = proc.wait()
            except OSError as e:
                code, last = -1, str(e).encode()
            if code != 0:
                why = last.decode(errors="replace")[-300:] or f"exit {code}"
                error = f"could not pull {image}: {why} (a private registry: `docker login` on the box first)"
                say(f"remotedl: {error}\n".encode())
            else:
                with contextlib.suppress(OSError):
                    have = container.image_digest(engine, image)  # what the pull brought
    with box_lock():
        rec = load(job_id)
        rec.pop("phase", None)
        if have and not error:
            rec["image_digest"] = have
        if error and rec["status"] in ("starting", "queued"):
            rec.update(status="failed", ended=time.time(), error=error)
        save(rec)
    return rec


def _run_job(ctx: Context, rec: dict[str, Any], *, waited: bool = False) -> None:
    job_id = int(rec["id"])
    values = _job_values(rec)
    env = _job_env(rec, values)
    watched = notify_path(job_id).exists() or bool(rec.get("stall_after"))
    spec = rec.get("environment") or {}
    nonce = secrets.token_hex(8)
    in_image = bool(rec.get("image"))
    command = str(rec["command"])
    if in_image and rec.get("setup_cmd"):  # in each container: it starts from the image
        command = "{ " + str(rec["setup_cmd"]) + "\n} || exit $?\n" + command
    argv = [
        "sh" if in_image else shell_for(spec.get("env_setup")),
        "-c",
        WRAPPER,
        "remotedl-job",
        command,
        # In an image, the image is the environment: no venv of the box's is activated.
        "" if in_image else rec.get("workdir") or "",
        "" if in_image else str(rec.get("remote_dir") or rec["cwd"]),
        spec.get("conda") or "",
        spec.get("env_setup") or "",
        nonce,
        PROBE,
    ]
    job_env = env  # the job's own environment (for a container job: inside it)
    if in_image:
        try:
            argv, env, job_env = _in_container(rec, argv, values)
        except (AgentError, OSError) as e:
            with open(rec["log"], "ab") as early:
                early.write(f"remotedl: cannot start the container: {e}\n".encode())
            update(job_id, status="failed", ended=time.time(), error=str(e))
            return
    log = open(rec["log"], "ab", buffering=0)  # noqa: SIM115 - closed below after the pump
    with box_lock():
        rec = load(job_id)
        if rec["status"] != "starting":
            log.close()
            return  # killed while it was being started
        try:
            child = subprocess.Popen(
                argv,
                cwd=rec["cwd"],
                env=env,
                stdin=subprocess.DEVNULL,  # a read gets EOF, never waits on the tmux pane
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                umask=int(rec["umask"]) if rec.get("umask") is not None else -1,
            )
        except OSError as e:
            log.write(f"remotedl: cannot start: {e}\n".encode())
            log.close()
            rec.update(status="failed", ended=time.time(), error=str(e))
            save(rec)
            return
        rec.update(status="running", pid=child.pid, pgid=child.pid, started=time.time())
        if rec.get("trackers"):  # what the job got: a variable of the box's environment won
            rec["trackers"] = {k: v for k, v in rec["trackers"].items() if job_env.get(k) == v}
        save(rec)
    if in_image:
        threading.Thread(target=_forget_env_file, args=(rec, child), daemon=True).start()
    watch = None
    if watched:  # imported once the job runs: its start never waits for this
        from remotedl.agent import events

        ctx.hide = tuple(job_env[k] for k in rec.get("env_keys") or [] if k in job_env)
        if waited:  # it waited in the queue: say it started, without holding up its output
            events.in_background(events.send, job_id, "started", ctx.hide)
        if rec.get("stall_after"):
            watch = events.StallWatch(rec, ctx.hide)
            watch.start()
    assert child.stdout is not None
    waiter = threading.Thread(target=_wait_all, args=(rec, child), daemon=True)
    waiter.start()  # the output of processes left behind goes on to the log meanwhile
    out = sys.stdout.buffer
    fd = child.stdout.fileno()
    tag = f"@@remotedl-env:{nonce} ".encode()
    pending = b""
    probing = True
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if probing:  # the environment line goes to the record, not the log
            pending += chunk
            at = pending.find(tag)
            end = pending.find(b"\n", at) if at >= 0 else -1
            if end >= 0:
                _take_environment(job_id, pending[at + len(tag) : end])
                chunk = pending[:at] + pending[end + 1 :]
            elif len(pending) > (1 << 20):
                chunk = pending
            else:
                continue
            probing = False
            pending = b""
        log.write(chunk)
        if watch is not None:
            watch.output()
        with contextlib.suppress(OSError):  # the pane may be gone: the log is what counts
            out.write(chunk)
            out.flush()
    if pending:
        log.write(pending)
    log.close()
    waiter.join()
    if watch is not None:
        watch.stop()
    exit_code = _exit_of(child.wait())  # the main process's: the job's exit status
    with box_lock():
        rec = load(job_id)
        killed = kill_marker(job_id).exists()
        preempted = preempt_marker(job_id).exists()
        by_exit = "succeeded" if exit_code == 0 else "failed"
        rec.update(
            status="killed" if killed else "preempted" if preempted else by_exit,
            exit_code=exit_code,
            ended=time.time(),
            stalled=None,
            leftovers=0,
        )
        save(rec)


def _ignore(signum: int, frame: Any) -> None:
    pass


def op_runner(ctx: Context, req: RunnerRequest) -> dict[str, Any]:
    """Runs inside the job's tmux session: wait for GPUs if queued, run, record the end.
    It outlives its tmux session (SIGHUP is caught, not ignored: the job gets the default
    disposition back at exec), so the log and the end are recorded even then."""
    job_id = req.id
    signal.signal(signal.SIGHUP, _ignore)
    try:
        rec = update(job_id, runner_pid=os.getpid())
        rec = _wait_ready(rec)
        waited = rec["status"] == "queued"
        rec = _wait_in_queue(ctx, rec)
        if rec["status"] == "starting" and rec.get("image"):
            rec = _pull(rec)
        if rec["status"] == "starting":
            _run_job(ctx, rec, waited=waited)
    finally:
        remove_env_file(job_id)
        container.remove_env_file(job_id)
        if notify_path(job_id).exists():  # the end, from the box: the laptop may be asleep
            from remotedl.agent import events

            events.ended(job_id, ctx.hide)
    return {}
