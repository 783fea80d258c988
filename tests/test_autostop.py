"""Autostop on the box (issue 26): the idle decision with a clock the test moves, the notice and
its grace period, pre_stop, the stop (a stand-in `shutdown` that records its call; an Azure VM's
managed identity deallocating it through the local Azure API), and a real pty SSH session into
the sandbox box counted as activity."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remotedl.agent import autostop
from remotedl.waiting import retry_until
from tests.cloudfakes import FakeCloud
from tests.conftest import Box, CliResult, kill_if_same, process_gone, process_start
from tests.notifyfakes import Recorder, _Server

T0 = 1_800_000_000.0


@pytest.fixture
def hook() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = _Server("json", recorder)
    import threading

    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"json://127.0.0.1:{server.port}/hook", recorder
    server.shutdown()
    server.server_close()


def standins(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH holding only a stand-in `shutdown` that records its arguments (nothing real can
    be found on it), and the file it records to."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "shutdown.calls"
    (bindir / "shutdown").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bindir / "shutdown").chmod(0o755)
    return {"PATH": str(bindir), "HOME": str(tmp_path)}, calls


class Jobs:
    """The box's jobs as the store gives them to autostop (the test sets their state)."""

    def __init__(self) -> None:
        self.records: dict[int, dict[str, object]] = {}

    def __call__(self) -> list[dict[str, object]]:
        return list(self.records.values())


def job(jobs: Jobs, job_id: int, status: str, **extra: object) -> None:
    jobs.records[job_id] = {"id": job_id, "status": status, "name": f"train{job_id}", **extra}


def texts(recorder: Recorder) -> list[str]:
    return [json.dumps(h.json()) for h in recorder.of("json")]


def test_idle_then_notice_then_pre_stop_and_shutdown(tmp_path: Path, hook: tuple[str, Recorder]) -> None:
    url, recorder = hook
    environ, calls = standins(tmp_path)
    state = tmp_path / "state"
    jobs = Jobs()
    saved = tmp_path / "saved"
    config = autostop.Config(
        idle_seconds=600,
        wait="jobs",
        grace_seconds=120,
        pre_stop=f"echo saved > {saved}",
        notify=[url],
        host="gpu1",
        cloud="aws",
    )
    autostop.configure(state, config, T0)
    assert (state / autostop.FILE).stat().st_mode & 0o777 == 0o600  # notify URLs are secrets

    job(jobs, 1, "running")
    assert autostop.tick(state, T0 + 60, environ, jobs=jobs).action == "active"
    job(jobs, 1, "succeeded")
    assert autostop.tick(state, T0 + 120, environ, jobs=jobs).action == "idle"
    assert autostop.tick(state, T0 + 650, environ, jobs=jobs).action == "idle"  # idle 590 s (since T0 + 60)
    d = autostop.tick(state, T0 + 660, environ, jobs=jobs)
    assert d.action == "notice"
    assert retry_until(lambda: texts(recorder), seconds=10)
    assert "gpu1: stopping the VM at" in texts(recorder)[0]
    assert "no remotedl job for 10 min" in texts(recorder)[0]
    assert autostop.tick(state, T0 + 770, environ, jobs=jobs).action == "wait"
    assert not calls.exists()
    assert autostop.tick(state, T0 + 780, environ, jobs=jobs).action == "stop"
    assert saved.read_text() == "saved\n"
    assert calls.read_text() == "-h now\n"
    after = autostop.load(state)
    assert after.stopped_at == T0 + 780 and "shutdown -h now" in after.stop_result
    assert autostop.tick(state, T0 + 900, environ, jobs=jobs).action == "off"
    assert calls.read_text() == "-h now\n"  # once


def test_activity_in_the_grace_period_cancels(tmp_path: Path, hook: tuple[str, Recorder]) -> None:
    url, recorder = hook
    environ, calls = standins(tmp_path)
    state = tmp_path / "state"
    jobs = Jobs()
    autostop.configure(
        state, autostop.Config(idle_seconds=300, wait="jobs", grace_seconds=60, notify=[url], host="gpu1"), T0
    )
    assert autostop.tick(state, T0 + 300, environ, jobs=jobs).action == "notice"
    job(jobs, 2, "queued")
    assert autostop.tick(state, T0 + 330, environ, jobs=jobs).action == "active"
    assert retry_until(lambda: len(texts(recorder)) == 2, seconds=10)
    assert "autostop cancelled" in texts(recorder)[1] and "job 2 (train2) queued" in texts(recorder)[1]
    job(jobs, 2, "failed")
    assert autostop.tick(state, T0 + 400, environ, jobs=jobs).action == "idle"  # the idle time starts again
    assert autostop.tick(state, T0 + 630, environ, jobs=jobs).action == "notice"
    assert not calls.exists()


def test_a_job_stalled_that_long_does_not_keep_the_vm_up(tmp_path: Path, hook: tuple[str, Recorder]) -> None:
    url, recorder = hook
    environ, _ = standins(tmp_path)
    state = tmp_path / "state"
    jobs = Jobs()
    autostop.configure(state, autostop.Config(idle_seconds=600, notify=[url], host="gpu1", wait="jobs"), T0)
    job(jobs, 3, "running", stalled={"since": T0 - 1000, "reason": "no output for 15m"})
    assert autostop.tick(state, T0 + 600, environ, jobs=jobs).action == "notice"
    assert retry_until(lambda: texts(recorder), seconds=10)
    assert "not counted: job 3 (train3), stalled since" in texts(recorder)[0]
    # stalled for less than the idle time: still a job that counts
    job(jobs, 4, "running", stalled={"since": T0 + 500, "reason": "no output"})
    assert autostop.tick(state, T0 + 620, environ, jobs=jobs).action == "active"


def test_off_does_nothing(tmp_path: Path) -> None:
    environ, calls = standins(tmp_path)
    state = tmp_path / "state"
    jobs = Jobs()
    autostop.configure(state, autostop.Config(idle_seconds=None), T0)
    assert autostop.tick(state, T0 + 10**6, environ, jobs=jobs).action == "off"
    assert not calls.exists()


def test_azure_managed_identity_deallocates_from_the_box(tmp_path: Path) -> None:
    fake = FakeCloud("azure", power="running").start()
    try:
        environ, calls = standins(tmp_path)
        environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = fake.url
        environ["AZURE_RESOURCE_MANAGER_ENDPOINT"] = fake.url
        state = tmp_path / "state"
        jobs = Jobs()
        config = autostop.Config(
            idle_seconds=60,
            wait="jobs",
            grace_seconds=0,
            host="gpu1",
            cloud="azure",
            managed_identity=True,
            azure={"subscription": fake.subscription, "resource_group": fake.resource_group, "vm": fake.vm},
        )
        autostop.configure(state, config, T0)
        assert autostop.tick(state, T0 + 60, environ, jobs=jobs).action == "notice"
        assert autostop.tick(state, T0 + 61, environ, jobs=jobs).action == "stop"
        assert fake.ops("deallocate") == ["deallocate"]
        assert not calls.exists()  # deallocated, not merely powered off
        assert "Azure deallocate requested" in autostop.load(state).stop_result
    finally:
        fake.stop_server()


def test_an_interactive_ssh_session_is_activity(box: Box, tmp_path: Path) -> None:
    """A real pty session into the sandbox box (sshd on this machine) is found by the box side."""
    ssh = subprocess.Popen(
        ["ssh", "-F", box.info.ssh_config, "-tt", box.name, "tty; exec sleep 120"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert ssh.stdout is not None
        os.set_blocking(ssh.stdout.fileno(), False)
        seen = b""

        def tty() -> str | None:
            nonlocal seen
            seen += ssh.stdout.read() or b""  # type: ignore[union-attr]
            line = next((x for x in seen.decode(errors="replace").splitlines() if "/dev/pts/" in x), None)
            return line.strip().removeprefix("/dev/") if line else None

        pts = retry_until(tty, seconds=20)
        assert pts, seen
        found = retry_until(lambda: [s for s in autostop.ssh_sessions() if f"on {pts} " in s], seconds=10)
        assert found, autostop.ssh_sessions()
        state = tmp_path / "state"
        jobs = Jobs()
        autostop.configure(state, autostop.Config(idle_seconds=60, host="gpu1"), time.time() - 3600)
        seen_now = autostop.look(
            autostop.load(state).config, time.time(), {"PATH": "", "HOME": str(tmp_path)}, jobs
        )
        assert any(f"on {pts} " in a for a in seen_now.activity)
    finally:
        ssh.kill()
        ssh.wait(timeout=10)


@pytest.mark.parametrize("cloud", ["aws", "gcp", "azure"])
def test_the_clouds_preemption_notice_is_read_from_its_metadata_service(cloud: str) -> None:
    fake = FakeCloud("gcp").start()
    try:
        host = fake.url.removeprefix("http://")
        environ = {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": fake.url,
            "GCE_METADATA_HOST": host,
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": fake.url,
        }
        config = autostop.Config(cloud=cloud, spot=True)
        assert autostop.preemption_notice(config, environ) is None
        fake.preempted = True
        notice = autostop.preemption_notice(config, environ)
        assert notice is not None
        assert {"aws": "AWS spot terminate", "gcp": "GCE preempted", "azure": "Azure Preempt"}[
            cloud
        ] in notice
    finally:
        fake.stop_server()


def test_preemption_signals_running_jobs_once(
    tmp_path: Path, hook: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, recorder = hook
    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path / "boxstate"))
    (tmp_path / "boxstate" / "jobs").mkdir(parents=True)
    environ, _ = standins(tmp_path)
    state = tmp_path / "state"
    saved = tmp_path / "saved"
    config = autostop.Config(
        spot=True, cloud="gcp", host="gpu1", notify=[url], pre_stop=f"echo saved > {saved}"
    )
    autostop.configure(state, config, T0)
    worker = subprocess.Popen(["sleep", "300"], start_new_session=True)  # a job's process group
    try:
        jobs = Jobs()
        job(jobs, 7, "running", pgid=worker.pid)
        job(jobs, 8, "queued")
        told = autostop.preempt(state, "GCE preempted the VM", T0 + 5, environ, jobs)
        assert told == ["job 7 (train7)"]
        assert retry_until(lambda: worker.poll() is not None, seconds=10)
        assert worker.returncode == -15  # SIGTERM: the job may save a checkpoint
        assert (tmp_path / "boxstate" / "jobs" / "7.preempt").exists()  # its end is recorded as preempted
        assert (tmp_path / "boxstate" / "jobs" / "8.preempt").exists()
        assert saved.read_text() == "saved\n"
        assert retry_until(lambda: texts(recorder), seconds=10)
        assert (
            "the cloud is taking the VM back" in texts(recorder)[0]
            and "job 7 (train7) got SIGTERM" in texts(recorder)[0]
        )
        assert autostop.preempt(state, "again", T0 + 10, environ, jobs) == []  # once
    finally:
        worker.kill()
        worker.wait()


def test_a_job_on_the_box_ends_as_preempted(box: Box, cli: Callable[..., CliResult], project: Path) -> None:
    """The agent's preempt request on a real box: the job's runner records `preempted`."""
    from remotedl.agent.client import AgentClient
    from remotedl.schema import AutostopRequest
    from remotedl.ssh import resolve_host
    from tests.conftest import make_env

    r = cli("run", "--detach", "--name", "spotjob", "--cpu", "sleep", "300", cwd=project)
    assert r.code == 0, r.err
    spec = resolve_host(make_env(project.parent / "laptop2"), box.name, ssh_config=box.info.ssh_config)
    try:
        answer = AgentClient(spec).call(
            AutostopRequest(action="preempt", notice="GCE preempted the VM").to_dict()
        )
        assert any("(spotjob)" in x for x in answer["signalled"])

        def status() -> str | None:
            jobs = json.loads(cli("jobs", "--json", cwd=project).out)
            rows = jobs if isinstance(jobs, list) else jobs.get("jobs", [])
            found = [j["status"] for j in rows if j.get("name") == "spotjob"]
            return found[0] if found and found[0] == "preempted" else None

        assert retry_until(status, seconds=30) == "preempted"
    finally:
        box.sh("rm -f ~/.remotedl/autostop.json", check=False)
        cli("kill", "spotjob", cwd=project)


def test_a_busy_jupyter_kernel_is_activity(tmp_path: Path) -> None:
    """A real Jupyter server with a real kernel running a cell: busy while it runs."""
    import asyncio
    import sys
    import uuid

    import requests
    from tornado.websocket import websocket_connect

    from remotedl.waiting import free_port

    runtime = tmp_path / "runtime"
    port, token = free_port(), uuid.uuid4().hex
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    argv = [
        sys.executable,
        "-m",
        "jupyter_server",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp_path}",
        *(["--allow-root"] if os.geteuid() == 0 else []),
    ]
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        auth = {"Authorization": f"token {token}"}
        assert retry_until(lambda: list(runtime.glob("jpserver-*.json")), seconds=60)

        def answers() -> bool:
            try:
                return requests.get(f"{base}/api/status", headers=auth, timeout=5).ok
            except requests.RequestException:
                return False

        assert retry_until(answers, seconds=60)
        environ = {"JUPYTER_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
        kernel = requests.post(
            f"{base}/api/kernels", json={"name": "python3"}, headers=auth, timeout=60
        ).json()
        assert autostop.busy_kernels(environ) == []  # started, running nothing

        async def run_cell() -> None:
            ws = await websocket_connect(
                f"ws://127.0.0.1:{port}/api/kernels/{kernel['id']}/channels?token={token}"
            )
            msg_id = uuid.uuid4().hex
            ws.write_message(
                json.dumps(
                    {
                        "header": {
                            "msg_id": msg_id,
                            "username": "t",
                            "session": uuid.uuid4().hex,
                            "msg_type": "execute_request",
                            "version": "5.3",
                        },
                        "parent_header": {},
                        "metadata": {},
                        "channel": "shell",
                        "buffers": [],
                        "content": {
                            "code": "import time; time.sleep(60)",
                            "silent": False,
                            "store_history": False,
                            "user_expressions": {},
                            "allow_stdin": False,
                        },
                    }
                )
            )
            ws.close()

        asyncio.run(run_cell())
        busy = retry_until(lambda: autostop.busy_kernels(environ), seconds=30)
        assert busy == [f"busy Jupyter kernel {kernel['id']}"]
        state = tmp_path / "state"
        autostop.configure(state, autostop.Config(idle_seconds=60, host="gpu1"), T0)
        seen = autostop.look(autostop.load(state).config, T0 + 120, environ, Jobs())
        assert f"busy Jupyter kernel {kernel['id']}" in seen.activity
        requests.post(f"{base}/api/kernels/{kernel['id']}/interrupt", headers=auth, timeout=10)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def test_a_gpu_process_is_activity(box: Box, tmp_path: Path) -> None:
    """The box's nvidia-smi (the sandbox's stand-in) lists a compute process: the box is busy."""
    from remotedl import sandbox

    state = json.loads((Path(box.info.home).parent / "gpus.json").read_text())
    state["processes"] = []
    fake = tmp_path / "gpus.json"
    fake.write_text(json.dumps(state))
    bindir = Path(sandbox.__file__).parent / "sandbox_bin"
    environ = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "REMOTEDL_FAKE_GPUS": str(fake),
        "HOME": str(tmp_path),
    }
    assert autostop.gpu_processes(environ) == []
    gpu = state["gpus"][0]["index"]
    state["processes"] = [{"gpu": gpu, "pid": 4242, "name": "python3 train.py", "used_memory": 1024}]
    fake.write_text(json.dumps(state))
    assert autostop.gpu_processes(environ) == ["GPU process 4242, python3 train.py"]


def test_any_request_brings_back_a_watcher_that_a_reboot_ended(
    box: Box, cli: Callable[..., CliResult], project: Path
) -> None:
    """Autostop on, its watcher gone (the VM restarted from the cloud's console): the next
    request of any remotedl command starts it again."""
    from remotedl.agent.client import AgentClient
    from remotedl.schema import AutostopRequest
    from remotedl.ssh import resolve_host
    from tests.conftest import make_env

    spec = resolve_host(make_env(project.parent / "laptop3"), box.name, ssh_config=box.info.ssh_config)
    client = AgentClient(spec)

    def watcher() -> int | None:
        pid = json.loads(box.sh("cat ~/.remotedl/autostop.json").stdout).get("watcher_pid")
        return pid if pid and not process_gone(pid) else None

    pids: dict[int, int | None] = {}  # each watcher by its pid and start (pids are reused)
    try:
        config = {"idle_seconds": 7200, "wait": "jobs", "host": box.name, "cloud": "aws"}
        client.call(AutostopRequest(action="set", config=config).to_dict())
        first = retry_until(watcher, seconds=20)
        assert first
        pids[first] = process_start(first)
        os.kill(first, 15)
        assert retry_until(lambda: watcher() is None, seconds=30)
        assert cli("jobs", cwd=project).code == 0  # any command's request
        second = retry_until(watcher, seconds=20)
        assert second and second != first
        pids[second] = process_start(second)
    finally:
        client.call(AutostopRequest(action="set", config={"idle_seconds": None}).to_dict())
        for pid, started in pids.items():
            kill_if_same(pid, started)
        box.sh("rm -f ~/.remotedl/autostop.json", check=False)
