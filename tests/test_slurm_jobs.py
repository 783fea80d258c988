"""The job interface's second backend: a Slurm login node (the real test cluster behind a
sandbox box's sshd). The same library calls as on a box (jobs.start, list_jobs, stream_logs,
kill, attach_argv), answered by the agent on the login node through sbatch, scontrol, scancel."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from remotedl import jobs, sync
from remotedl.agent.client import AgentClient
from remotedl.errors import RemotedlError
from remotedl.schema import JobRecord
from remotedl.ssh import resolve_host
from remotedl.waiting import retry_until
from tests.conftest import SlurmBox, end_process, make_env


class Cluster:
    """A project pushed to the login node, and the jobs one test started there."""

    def __init__(self, login: SlurmBox, root: Path, laptop: Path) -> None:
        self.login = login
        self.root = root
        self.spec = resolve_host(make_env(laptop), login.name, ssh_config=login.info.ssh_config)
        self.client = AgentClient(self.spec)
        self.rdir = f"~/slurm-projects/{uuid.uuid4().hex[:8]}"
        self.flags = login.home / "flags" / uuid.uuid4().hex[:8]
        self.flags.mkdir(parents=True)
        self.started: list[JobRecord] = []

    def push(self) -> sync.PushResult:
        return sync.push(self.spec, self.root, self.rdir)

    def start(self, command: str, gpus: int = 1, **kw: Any) -> JobRecord:
        pushed = self.push()
        rec = jobs.start(
            self.client,
            command=command,
            remote_dir=pushed.remote_dir,
            count=gpus or None,
            gpus="none" if gpus == 0 else None,
            git_commit=pushed.commit,
            slurm=kw.pop("slurm", {}),
            **kw,
        )
        self.started.append(rec)
        return rec

    def get(self, rec: JobRecord | int) -> JobRecord:
        return jobs.get_job(self.client, str(rec if isinstance(rec, int) else rec.id))

    def wait(self, rec: JobRecord, *states: str, seconds: float = 60) -> JobRecord:
        got = retry_until(
            lambda: (r := self.get(rec)).slurm_state in states and r, seconds=seconds, interval=0.2
        )
        assert got, f"job {rec.id} never reached {states}: {self.get(rec).state}"
        return got

    def hold(self, name: str) -> str:
        return f"while [ ! -e {self.flags}/{name} ]; do sleep 0.1; done"

    def release(self, name: str) -> None:
        (self.flags / name).touch()


@pytest.fixture
def cluster(slurm_box: SlurmBox, project: Path, tmp_path: Path) -> Any:
    c = Cluster(slurm_box, project, tmp_path / "laptop")
    yield c
    for name in ("a", "b", "go", "more", "done"):
        c.release(name)
    for rec in c.started:
        with_id = c.get(rec)
        if with_id.active and with_id.slurm_id:
            slurm_box.ssh(f"scancel {with_id.slurm_id}", check=False)
    for rec in c.started:  # the next test starts with both GPUs free
        retry_until(lambda rec=rec: not c.get(rec).active, seconds=60, interval=0.2)


def _commit(root: Path, name: str, text: str) -> None:
    (root / name).write_text(text)
    subprocess.run(["git", "-C", str(root), "add", name], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", name], check=True)


def test_run_on_slurm_in_its_own_checkout_and_follow_to_the_end(cluster):
    _commit(cluster.root, "config.txt", "lr=0.1\n")
    secret = f"tok-{uuid.uuid4().hex}"
    rec = cluster.start(
        'echo "cfg=$(cat config.txt) id=$REMOTEDL_JOB_ID order=$CUDA_DEVICE_ORDER"'
        ' "cvd=$CUDA_VISIBLE_DEVICES"\n'
        f'echo "token=$TOKEN"; {cluster.hold("go")}; cat config.txt; exit 4',
        env={"TOKEN": secret},
        name="train",
    )
    assert rec.scheduler == "slurm" and rec.slurm_id and rec.slurm_id.isdigit()
    assert rec.status == "queued" and rec.workdir and rec.workdir.endswith(f"/.remotedl/jobs/{rec.id}")
    running = cluster.wait(rec, "RUNNING")
    assert running.status == "running" and running.node == "localhost"
    assert running.state == "RUNNING on localhost" and len(running.gpus) == 1
    # The env value is in no process's argv while the job runs.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    # A push while the job runs changes the work tree, not the job's checkout.
    _commit(cluster.root, "config.txt", "lr=0.5\n")
    cluster.push()
    got = bytearray()
    states: list[str] = []

    def seen(state: dict[str, object]) -> None:  # the job goes on once the follower saw it run
        states.append(str(state["state"]))
        cluster.release("go")

    end = jobs.stream_logs(cluster.client, str(rec.id), got.extend, follow=True, on_state=seen)
    gpu = running.gpus[0]
    assert got.decode() == (f"cfg=lr=0.1 id={rec.id} order=PCI_BUS_ID cvd={gpu}\ntoken={secret}\nlr=0.1\n")
    assert (end.status, end.exit_code, end.state) == ("failed", 4, "FAILED (exit 4)")
    assert states and states[0] == "RUNNING on localhost"
    assert end.ended and end.started and end.ended >= end.started
    assert not (Path(end.control_dir or "") / "env").exists()


def test_two_jobs_disjoint_gpus_a_third_pending_then_running(cluster):
    a = cluster.start(f"echo $CUDA_VISIBLE_DEVICES; {cluster.hold('a')}", name="a")
    b = cluster.start(f"echo $CUDA_VISIBLE_DEVICES; {cluster.hold('b')}", name="b")
    ga, gb = (cluster.wait(r, "RUNNING").gpus for r in (a, b))
    assert sorted(ga + gb) == [0, 1]
    c = cluster.start("echo $CUDA_VISIBLE_DEVICES", name="c")
    assert retry_until(lambda: cluster.get(c).state == "PENDING (Resources)", seconds=30, interval=0.2)
    listed = {r.id: r for r in jobs.list_jobs(cluster.client)}
    assert listed[c.id].state == "PENDING (Resources)" and listed[c.id].status == "queued"
    assert listed[a.id].state == "RUNNING on localhost"
    states: list[str] = []
    got = bytearray()

    def seen(state: dict[str, object]) -> None:  # a GPU is freed once the follower saw the wait
        states.append(str(state["state"]))
        cluster.release("a")

    end = jobs.stream_logs(cluster.client, str(c.id), got.extend, follow=True, on_state=seen)
    assert states[0] == "PENDING (Resources)"  # the follower said why it waited
    assert end.state == "COMPLETED" and end.exit_code == 0
    assert end.gpus == ga and got.decode().strip() == str(ga[0])  # the GPU a gave back
    cluster.release("b")


def test_notifications_go_out_from_the_login_node_with_no_laptop_looking(cluster, tmp_path):
    # A Slurm job has no runner of ours beside it: its start after the queue and its end were
    # sent only when a laptop next asked about it (`jobs`, `logs -f`), so a closed laptop got
    # nothing. A watcher on the login node sends them.
    from tests import notifyfakes

    services = notifyfakes.start_services(tmp_path / "ca")
    try:

        def hooks(job_id: int, event: str) -> list[dict[str, Any]]:
            return [
                p
                for h in services.recorder.of("json")
                if (p := h.json())["remotedl"]["job"] == job_id and p["remotedl"]["event"] == event
            ]

        holders = [cluster.start(cluster.hold("a")) for _ in range(2)]
        for h in holders:
            cluster.wait(h, "RUNNING")
        rec = cluster.start(f"echo working; {cluster.hold('more')}; exit 3", notify=[services.urls()["json"]])
        assert retry_until(lambda: cluster.get(rec).state == "PENDING (Resources)", seconds=30, interval=0.2)
        cluster.release("a")
        # From here on nothing asks the login node about the job: no jobs, no logs, no get.
        started = retry_until(lambda: hooks(rec.id, "started"), seconds=30)
        assert started, services.recorder.hits
        assert "started after waiting in the queue" in started[0]["title"]
        cluster.release("more")
        ended = retry_until(lambda: hooks(rec.id, "failed"), seconds=30)
        assert ended, services.recorder.hits
        assert ended[0]["remotedl"]["exit_code"] == 3
        assert "working" in ended[0]["message"]
        done = cluster.get(rec)
        assert done.state == "FAILED (exit 3)"
        assert [n["event"] for n in done.notifications] == ["started", "failed"]
        assert all(n["ok"] for n in done.notifications)
        # The watcher leaves once no Slurm job with notifications is active.
        gone = retry_until(
            lambda: "slurm_watch" not in cluster.login.ssh("ps -eo args").stdout, seconds=15
        )
        assert gone, cluster.login.ssh("ps -eo args").stdout
    finally:
        services.stop()


def test_a_silent_slurm_job_shows_stalled_and_notifies_then_clears(cluster, tmp_path):
    # Stall detection was a box job's only. On a Slurm host the login node's watcher sees the
    # job's log (on the shared filesystem) stop growing; the node's GPUs it cannot see.
    from tests import notifyfakes

    services = notifyfakes.start_services(tmp_path / "ca")
    try:
        url = services.urls()["json"]
        command = f"echo first; {cluster.hold('more')}; echo second; {cluster.hold('done')}"
        rec = cluster.start(command, gpus=1, notify=[url], stall_after=2.0)
        running = cluster.wait(rec, "RUNNING")
        assert running.stall_after == 2.0 and not running.stalled
        stalled = retry_until(lambda: (r := cluster.get(rec)).stalled and r, seconds=30, interval=0.2)
        assert stalled, cluster.get(rec)
        assert stalled.state == "RUNNING on localhost, stalled" and stalled.status == "running"
        assert "no new log output for 2 s" in stalled.stalled["reason"]

        def hook() -> list[dict[str, Any]]:
            return [
                p
                for h in services.recorder.of("json")
                if (p := h.json())["remotedl"]["job"] == rec.id and p["remotedl"]["event"] == "stalled"
            ]

        sent = retry_until(hook, seconds=30)
        assert sent and "no new log output" in sent[0]["message"], services.recorder.hits
        cluster.release("more")  # output again: the mark goes
        cleared = retry_until(lambda: not (r := cluster.get(rec)).stalled and r, seconds=30, interval=0.2)
        assert cleared and cleared.state == "RUNNING on localhost", cluster.get(rec)
        assert cleared.stalls == 1
        cluster.release("done")
        assert cluster.wait(rec, "COMPLETED").exit_code == 0
    finally:
        services.stop()


def test_kill_cancels_and_a_pending_kill_too(cluster):
    rec = cluster.start(cluster.hold("never"), gpus=0, env={"K": "v"})
    cluster.wait(rec, "RUNNING")
    killed = jobs.kill(cluster.client, str(rec.id))
    assert (killed.status, killed.state) == ("killed", "CANCELLED")
    assert not (Path(killed.control_dir or "") / "env").exists()
    with pytest.raises(RemotedlError, match="is not running"):
        jobs.kill(cluster.client, str(rec.id))
    holders = [cluster.start(cluster.hold("a")) for _ in range(2)]
    for h in holders:
        cluster.wait(h, "RUNNING")
    waiting = cluster.start("true")
    cluster.wait(waiting, "PENDING")
    assert jobs.kill(cluster.client, str(waiting.id)).state == "CANCELLED"


def test_refused_submission_fails_the_run_with_sbatchs_words(cluster):
    with pytest.raises(RemotedlError, match="sbatch refused the job: invalid partition specified: nope"):
        cluster.start("true", slurm={"partition": "nope"})
    with pytest.raises(RemotedlError, match="sbatch_args: remotedl sets --output itself"):
        cluster.start("true", slurm={"sbatch_args": ["--output=/tmp/x"]})
    failed = jobs.list_jobs(cluster.client, all_jobs=True)[-1]
    assert failed.status == "failed" and "invalid partition" in (failed.error or "")


def _drop_connections(login: SlurmBox) -> int:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(login.info.pid)], capture_output=True, text=True)
    pids = [int(p) for p in out.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_logs_resume_at_their_offset_after_a_dropped_connection(cluster):
    rec = cluster.start(
        f'i=0; while [ $i -lt 20 ]; do i=$((i+1)); echo "line $i"; done; {cluster.hold("more")}\n'
        'i=20; while [ $i -lt 40 ]; do i=$((i+1)); echo "line $i"; done',
        gpus=0,
    )
    got = bytearray()
    reconnects: list[int] = []
    result: dict[str, JobRecord] = {}

    def follow() -> None:
        result["end"] = jobs.stream_logs(
            cluster.client, str(rec.id), got.extend, follow=True, on_reconnect=reconnects.append
        )

    t = threading.Thread(target=follow)
    t.start()
    assert retry_until(lambda: b"line 20\n" in got, seconds=60)
    assert _drop_connections(cluster.login) >= 1
    cluster.release("more")
    t.join(90)
    assert not t.is_alive()
    assert reconnects
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 41))
    assert result["end"].state == "COMPLETED"


def test_attach_gives_a_shell_in_the_jobs_allocation(cluster, tmp_path):
    import shlex

    rec = cluster.start(cluster.hold("done"))
    with pytest.raises(RemotedlError, match=r"no allocation to attach to yet|nothing to attach to"):
        # a record as it was before Slurm started it
        jobs.attach_argv(cluster.spec, rec)
    running = cluster.wait(rec, "RUNNING")
    sock = str(tmp_path / "tmux")
    cmd = shlex.join(jobs.attach_argv(cluster.spec, running))
    subprocess.run(["tmux", "-S", sock, "new-session", "-d", "-x", "150", "-y", "30", cmd], check=True)

    def screen() -> str:
        r = subprocess.run(["tmux", "-S", sock, "capture-pane", "-p"], capture_output=True, text=True)
        return r.stdout

    try:
        assert retry_until(lambda: screen().strip(), seconds=30), "no prompt from the shell in the job"
        probe = 'echo "in-$SLURM_JOB_ID-gpu-$CUDA_VISIBLE_DEVICES-$(tty)"'
        subprocess.run(["tmux", "-S", sock, "send-keys", probe, "Enter"], check=True)
        want = f"in-{running.slurm_id}-gpu-{running.gpus[0]}-/dev/pts/"
        assert retry_until(lambda: want in screen(), seconds=30), screen()
        subprocess.run(["tmux", "-S", sock, "send-keys", "exit", "Enter"], check=True)
        assert retry_until(
            lambda: subprocess.run(["tmux", "-S", sock, "has-session"], capture_output=True).returncode != 0,
            seconds=30,
        )
        assert cluster.get(rec).status == "running"  # the shell ended, the job did not
    finally:
        subprocess.run(["tmux", "-S", sock, "kill-server"], check=False, capture_output=True)


def test_jupyter_as_a_batch_job_reached_through_the_login_node(cluster, slurm_box):
    import json
    import sys
    import urllib.request

    from remotedl import slurmhost
    from remotedl.waiting import free_port

    pushed = cluster.push()
    bindir = slurm_box.home / cluster.rdir.removeprefix("~/") / ".venv" / "bin"
    bindir.mkdir(parents=True)
    for tool in ("python", "jupyter"):  # the test's own Jupyter as the project's environment
        (bindir / tool).symlink_to(Path(sys.executable).parent / tool)
    said: list[str] = []
    server = slurmhost.find_or_start_jupyter(
        cluster.client, remote_dir=cluster.rdir, settings={}, timeout=120, on_progress=said.append
    )
    rec = cluster.get(server.job_id)
    cluster.started.append(rec)
    assert server.started and server.node == "localhost" and server.address == "127.0.0.1"
    assert rec.name == "jupyter" and rec.project_dir == pushed.remote_dir and rec.status == "running"
    assert any("RUNNING" in s for s in said), said
    assert "token" not in json.dumps(server.to_dict())
    for pid in filter(str.isdigit, os.listdir("/proc")):  # the token is in no argv
        try:
            assert server.token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    local = free_port()
    forward = ["-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:{server.node}:{server.port}"]
    tunnel = subprocess.Popen(slurm_box.ssh_argv(options=forward), stdin=subprocess.DEVNULL)
    try:

        def status() -> dict[str, object] | None:
            url = f"http://127.0.0.1:{local}/api/status?token={server.token}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return dict(json.loads(r.read()))
            except OSError:
                return None

        answer = retry_until(status, seconds=30, interval=0.2)
        assert answer is not None and "started" in answer
    finally:
        end_process(tunnel)
    again = slurmhost.find_or_start_jupyter(cluster.client, remote_dir=cluster.rdir, settings={})
    assert (again.job_id, again.token, again.started) == (server.job_id, server.token, False)
    assert slurmhost.stop_jupyter(cluster.client, server).state == "CANCELLED"
