"""run / jobs / logs / kill / attach against the real sshd box with the stand-in nvidia-smi."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remotedl import jobs
from remotedl.agent.client import AgentClient
from remotedl.ssh import resolve_host
from tests.conftest import cli_for, make_env, process_gone, process_start, retry_until, tmux_dir
from tests.terminal import terminal


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(f'remote_dir = "~/job-tests/{tmp_path.name}"\n')
    return project


def script(proj: Path, name: str, body: str, executable: bool = True) -> Path:
    path = proj / name
    path.write_text("#!/bin/sh\n" + body)
    if executable:
        path.chmod(0o755)
    return path


def job_list(run, proj) -> list[dict]:
    r = run("jobs", "--all", "--json", cwd=proj)
    assert r.code == 0, r.err
    return json.loads(r.out)


def laptop_environ(box, base: Path, **extra: str) -> dict[str, str]:
    """The environment of a `remotedl` process on a laptop (state and config under ``base``)
    that knows ``box``."""
    return {
        **os.environ,
        **make_env(base).environ,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "REMOTEDL_HOST": box.name,
        **extra,
    }


def latest_of(run, proj, tmp_path) -> dict:
    """The latest job of this test's project (``proj``'s remote_dir), not of the whole box:
    the session box holds every test's jobs."""
    mine = [j for j in job_list(run, proj) if (j["remote_dir"] or "").endswith(f"/job-tests/{tmp_path.name}")]
    assert mine, job_list(run, proj)
    return max(mine, key=lambda j: j["id"])


def spec_for(box, tmp_path):
    return resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)


def test_run_follows_log_and_passes_exit_code(cli, box, proj):
    script(
        proj,
        "run.sh",
        'echo "gpus=[$CUDA_VISIBLE_DEVICES] order=$CUDA_DEVICE_ORDER"\n'
        'echo "args=$#:$1|$2"\necho err >&2\nexit 7\n',
    )
    r = cli("run", "run.sh", "--gpu", "1", "first arg", "--", "--not-ours", cwd=proj)
    assert r.code == 7, r.err
    assert "gpus=[1] order=PCI_BUS_ID" in r.out
    assert "args=2:first arg|--not-ours" in r.out
    assert "err" in r.out  # stderr goes to the same log
    (rec,) = [j for j in job_list(cli, proj) if j["name"] == "run.sh"]
    assert rec["status"] == "failed"
    assert rec["exit_code"] == 7
    assert rec["gpus"] == [1]
    assert rec["git_commit"] and rec["snapshot"] is True  # run.sh is uncommitted: a snapshot
    assert rec["started"] and rec["ended"] >= rec["started"]
    assert Path(rec["log"]).parent == box.home / ".remotedl" / "logs"
    for key in ("id", "status", "gpus", "exit_code", "command"):
        assert key in rec


def test_detach_then_jobs_logs_and_kill(cli, box, proj):
    script(proj, "loop.sh", 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.1; done\n')
    r = cli("run", "--detach", "--cpu", "loop.sh", cwd=proj)
    assert r.code == 0, r.err
    job_id = r.out.strip()
    assert job_id.isdigit()
    jl = {str(j["id"]): j for j in job_list(cli, proj)}
    assert jl[job_id]["status"] == "running"
    assert retry_until(lambda: "tick 3" in cli("logs", job_id, cwd=proj).out)
    r = cli("logs", job_id, "-n", "2", cwd=proj)
    assert len(r.out.strip().splitlines()) == 2
    r = cli("kill", job_id, "--json", cwd=proj)
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "killed"
    r = cli("logs", "-f", job_id, cwd=proj)  # an ended job: prints all and returns
    assert "tick 1" in r.out


def test_gpu_out_of_range_creates_no_job(cli, proj):
    before = len(job_list(cli, proj))
    script(proj, "x.sh", "echo hi\n")
    r = cli("run", "--gpu", "5", "x.sh", cwd=proj)
    assert r.code == 2
    assert "GPU 5 does not exist" in r.err
    assert "0 (NVIDIA GeForce RTX 3090), 1 (NVIDIA GeForce RTX 4090)" in r.err
    assert len(job_list(cli, proj)) == before
    r = cli("run", "--gpu", "zero", "x.sh", cwd=proj)
    assert r.code == 2
    assert "not a GPU list" in r.err


def test_missing_script_is_an_error_before_anything(cli, proj):
    before = len(job_list(cli, proj))
    r = cli("run", "nope.sh", cwd=proj)
    assert r.code == 2
    assert "no such script" in r.err
    assert len(job_list(cli, proj)) == before


def test_options_after_the_command_word_are_the_scripts(cli, proj):
    script(
        proj,
        "args.sh",
        'echo "gpus=[$CUDA_VISIBLE_DEVICES]"; for a in "$@"; do printf "<%s>" "$a"; done; echo\n',
    )
    # (-e without KEY=VALUE is the script's; --env/-e KEY=VALUE is remotedl's: see the env tests)
    words = ["--port", "29500", "--name", "x", "-e", "s/a=b/", "--data", "d", "-d", "--debug"]
    r = cli("run", "args.sh", "--gpu", "1", *words, cwd=proj)
    assert r.code == 0, r.err
    assert "gpus=[1]" in r.out
    assert "".join(f"<{w}>" for w in words) in r.out
    took = [line for line in r.err.splitlines() if "took" in line]
    assert took == ["remotedl: took --gpu 1 for remotedl; to pass it to the script, put it after --"]
    # remotedl's options before the command word; after `--` even --gpu is the script's
    r = cli("run", "--cpu", "--name", "mine", "args.sh", "--", "--gpu", "0", cwd=proj)
    assert r.code == 0, r.err
    assert "gpus=[]" in r.out
    assert "<--gpu><0>" in r.out
    assert "took" not in r.err
    assert [j for j in job_list(cli, proj) if j["name"] == "mine"]


def test_a_file_named_like_a_shell_line_is_the_script(cli, box, proj):
    script(proj, "it's x.sh", "echo ran the script\n")
    for word in ("./it's x.sh", "it's x.sh"):
        r = cli("run", "--cpu", word, cwd=proj)
        assert r.code == 0, r.err
        assert r.out == "ran the script\n"


def test_more_gpus_than_the_box_has_is_a_usage_error(cli, proj):
    before = len(job_list(cli, proj))
    script(proj, "x.sh", "echo hi\n")
    for extra in ([], ["--queue"]):  # --queue must not wait for what can never be
        r = cli("run", "--gpus", "3", *extra, "x.sh", cwd=proj)
        assert r.code == 2, r.err
        assert "--gpus 3 asks for more GPUs than this box has: it has 2 GPUs" in r.err
        assert "ask for at most 2" in r.err
        r = cli("run", "--gpu", "5", *extra, "x.sh", cwd=proj)
        assert r.code == 2, r.err
        assert "GPU 5 does not exist on this box; it has 2 GPUs" in r.err
    assert len(job_list(cli, proj)) == before


def test_gpu_choice_busy_force_and_foreign_processes(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "hold.sh", "sleep 300\n")  # holds its GPU for the whole test, however slow
    state_file = fresh_box.dir / "gpus.json"
    state = json.loads(state_file.read_text())
    state["gpus"][0]["memory_used"] = 5000  # GPU 1 is the less used: auto picks it first
    state_file.write_text(json.dumps(state))
    r = run("run", "--detach", "--json", "hold.sh", cwd=project)
    assert r.code == 0, r.err
    first = json.loads(r.out)
    assert first["gpus"] == [1]
    r = run("run", "--detach", "--gpu", "1", "hold.sh", cwd=project)
    assert r.code == 1
    assert f"GPU 1 is used by job {first['id']} (hold.sh)" in r.err
    r = run("run", "--detach", "--json", "--gpu", "1", "--force", "hold.sh", cwd=project)
    assert r.code == 0, r.err
    # A foreign compute process on GPU 0 (someone else's training): not free either.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state["processes"] = [{"gpu": 0, "pid": sleeper.pid, "name": "/usr/bin/python3", "used_memory": 900}]
        state_file.write_text(json.dumps(state))
        r = run("run", "--detach", "hold.sh", cwd=project)
        assert r.code == 1
        assert f"process {sleeper.pid} (python3, user {fresh_box.info.user}, 900 MiB)" in r.err
        r = run("run", "--detach", "--gpu", "0", "hold.sh", cwd=project)
        assert r.code == 1
        assert f"GPU 0 is used by process {sleeper.pid}" in r.err
    finally:
        sleeper.kill()


def test_queue_waits_for_the_gpu(fresh_box, project, tmp_path, monkeypatch):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "hold.sh", "sleep 300\n")  # holds its GPU for the whole test, however slow
    script(project, "after.sh", 'echo "got [$CUDA_VISIBLE_DEVICES]"\n')
    holder = json.loads(run("run", "--detach", "--json", "--gpu", "0", "hold.sh", cwd=project).out)
    r = run("run", "--detach", "--json", "--gpu", "0", "--queue", "after.sh", cwd=project)
    assert r.code == 0, r.err
    queued = json.loads(r.out)
    assert queued["status"] == "queued"
    assert queued["gpus"] == []
    assert run("kill", str(holder["id"]), cwd=project).code == 0

    def done():
        jl = {j["id"]: j for j in job_list(run, project)}
        return jl[queued["id"]]["status"] == "succeeded" and jl[queued["id"]]

    rec = retry_until(done, seconds=20)
    assert rec, job_list(run, project)
    assert rec["gpus"] == [0]
    assert "got [0]" in run("logs", str(queued["id"]), cwd=project).out


def test_concurrent_runs_never_share_a_gpu(fresh_box, project, tmp_path):
    # Each holds its GPU for the whole test: one that ended while the last run was still
    # starting (a loaded machine) would free its GPU for a third.
    script(project, "hold.sh", "sleep 300\n")
    run = cli_for(fresh_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    env = laptop_environ(fresh_box, tmp_path / "laptop")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "remotedl",
                "run",
                "--no-push",
                "--detach",
                "--json",
                "--gpus",
                "1",
                "hold.sh",
            ],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(5)
    ]
    results = [(p.wait(60), *p.communicate()) for p in procs]
    started = [json.loads(out) for code, out, _ in results if code == 0]
    # --json: a refusal is a JSON object on stdout too
    refused = [json.loads(out)["error"] for code, out, _ in results if code != 0]
    assert len(started) == 2, results
    assert sorted(g for s in started for g in s["gpus"]) == [0, 1]
    assert len(refused) == 3
    assert all("no 1 free GPU" in e for e in refused), refused


def test_cpu_box(tmp_path, project):
    from remotedl import sandbox

    base = tmp_path / "cpu"
    info = sandbox.up(make_env(base), name="cpubox", gpus=0)
    try:
        from tests.conftest import Box

        run = cli_for(Box(info, {}), tmp_path / "laptop")
        script(project, "show.sh", 'echo "cvd=${CUDA_VISIBLE_DEVICES-unset}"\n')
        r = run("run", "--gpu", "0", "show.sh", cwd=project)
        assert r.code == 2
        assert "no NVIDIA GPU" in r.err
        r = run("run", "show.sh", cwd=project)
        assert r.code == 0, r.err
        assert "cvd=unset" in r.out
    finally:
        sandbox.down(make_env(base), name="cpubox")


def _kill_sessions(box) -> int:
    """Drop every SSH connection to the box: all of its sshd's per-connection processes (the
    privileged monitor and, for a non-root user, the unprivileged child that carries the
    channels), never the listener itself nor anything the sessions started."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True, text=True)
    children: dict[int, list[tuple[int, str]]] = {}
    for line in out.stdout.splitlines():
        pid, ppid, comm = line.split(None, 2)
        children.setdefault(int(ppid), []).append((int(pid), comm.strip()))
    pids, todo = [], [box.info.pid]
    while todo:
        for pid, comm in children.get(todo.pop(), []):
            if comm == "sshd":
                pids.append(pid)
                todo.append(pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def test_logs_follow_survives_dropped_connection(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "count.sh", 'i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo "line $i"; sleep 0.05; done\n')
    r = run("run", "--detach", "--cpu", "count.sh", cwd=project)
    assert r.code == 0, r.err
    job_id = r.out.strip()
    spec = spec_for(fresh_box, tmp_path)
    got = bytearray()
    reconnects = []
    result = {}

    def follow():
        result["rec"] = jobs.stream_logs(
            AgentClient(spec), job_id, got.extend, follow=True, on_reconnect=reconnects.append
        )

    t = threading.Thread(target=follow)
    t.start()
    assert retry_until(lambda: b"line 5\n" in got, seconds=10)
    assert _kill_sessions(fresh_box) >= 1
    t.join(30)
    assert not t.is_alive()
    assert reconnects, "the connection was dropped, so the follower must have reconnected"
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 41))
    assert result["rec"].status == "succeeded"


def test_kill_escalates_when_sigint_is_ignored(cli, proj):
    script(proj, "stubborn.sh", "trap 'echo got INT' INT\necho ready\nwhile true; do sleep 0.1; done\n")
    r = cli("run", "--detach", "--cpu", "stubborn.sh", cwd=proj)
    job_id = r.out.strip()
    # Its trap is set (a SIGINT before that ends it at once, as it would any shell).
    assert retry_until(lambda: "ready" in cli("logs", job_id, cwd=proj).out, seconds=20)
    r = cli("kill", job_id, "--grace", "0.5", "--json", cwd=proj)
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "killed"
    assert "got INT" in cli("logs", job_id, cwd=proj).out


def box_tmux(box, *args: str) -> subprocess.CompletedProcess[str]:
    """tmux on the box's own server (its TMUX_TMPDIR), as the box user."""
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    env["TMUX_TMPDIR"] = tmux_dir(box)
    return subprocess.run(["tmux", *args], env=env, capture_output=True, text=True, check=False)


def record(run, proj, job_id) -> dict:
    return {str(j["id"]): j for j in job_list(run, proj)}[str(job_id)]


def test_job_outliving_its_tmux_session_is_not_lost(fresh_box, project, tmp_path):
    from remotedl.agent.runtimes.tmux import group_alive

    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "quiet.sh", "sleep 300\n")  # writes nothing
    job = json.loads(run("run", "--detach", "--json", "--gpu", "0", "quiet.sh", cwd=project).out)
    rec = retry_until(lambda: record(run, project, job["id"]).get("pgid") and record(run, project, job["id"]))
    assert rec, job
    # Its tmux session vanishes (the tmux server is killed)...
    assert box_tmux(fresh_box, "kill-server").returncode == 0
    assert rec["status"] == "running"
    # ...and so does its runner: only the job's own process group is left.
    runner, started = rec["runner_pid"], process_start(rec["runner_pid"])
    os.kill(runner, signal.SIGKILL)
    assert retry_until(lambda: process_gone(runner, started), seconds=30)
    assert group_alive(rec["pgid"])
    assert record(run, project, job["id"])["status"] == "running"  # not lost: it runs
    r = run("run", "--detach", "--gpu", "0", "quiet.sh", cwd=project)  # and it keeps its GPU
    assert r.code == 1
    assert f"GPU 0 is used by job {job['id']} (quiet.sh)" in r.err
    r = run("kill", str(job["id"]), "--grace", "1", "--json", cwd=project)  # kill reaches the group
    assert r.code == 0, r.err
    assert json.loads(r.out)["status"] == "killed"
    assert retry_until(lambda: not group_alive(rec["pgid"]), seconds=30)


def test_vanished_job_is_lost(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "long.sh", "sleep 60\n")
    job_id = run("run", "--detach", "--cpu", "long.sh", cwd=project).out.strip()
    rec = retry_until(lambda: record(run, project, job_id).get("pgid") and record(run, project, job_id))
    assert rec
    # The box "reboots": its tmux server, the runner and the job's processes are all gone.
    box_tmux(fresh_box, "kill-server")
    os.kill(rec["runner_pid"], signal.SIGKILL)
    os.killpg(rec["pgid"], signal.SIGKILL)  # only the job's own group: nothing machine-wide by name
    lost = retry_until(lambda: record(run, project, job_id)["status"] == "lost", seconds=10)
    assert lost, record(run, project, job_id)
    assert "vanished" in record(run, project, job_id)["error"]


def test_tmux_targets_are_exact(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "hold.sh", "sleep 60\n")
    holder = json.loads(run("run", "--detach", "--json", "--gpu", "0", "hold.sh", cwd=project).out)
    queued = json.loads(run("run", "--detach", "--json", "--gpu", "0", "--queue", "hold.sh", cwd=project).out)
    assert queued["status"] == "queued"
    decoy = f"remotedl-{queued['id']}9"  # `-t remotedl-N` without `=` matches remotedl-N9 too
    assert box_tmux(fresh_box, "new-session", "-d", "-s", decoy, "sleep", "300").returncode == 0
    try:
        # The queued job's own session is gone (its runner lives on, waiting).
        assert box_tmux(fresh_box, "kill-session", "-t", f"={queued['session']}").returncode == 0
        r = run("kill", str(queued["id"]), "--json", cwd=project)
        assert r.code == 0, r.err
        assert json.loads(r.out)["status"] == "killed"
        assert box_tmux(fresh_box, "has-session", "-t", f"={decoy}").returncode == 0
    finally:
        box_tmux(fresh_box, "kill-session", "-t", f"={decoy}")
        run("kill", str(holder["id"]), cwd=project)


def test_too_old_tmux_is_refused(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    fake = fresh_box.home.parent / "bin" / "tmux"
    real = shutil.which("tmux")
    fake.write_text(f'#!/bin/sh\n[ "$1" = -V ] && {{ echo "tmux 2.9a"; exit 0; }}\nexec {real} "$@"\n')
    fake.chmod(0o755)
    script(project, "x.sh", "echo hi\n")
    r = run("run", "--cpu", "x.sh", cwd=project)
    assert r.code == 2
    assert "tmux 2.9a on the box is too old: remotedl needs tmux 3.0 or newer" in r.err
    assert job_list(run, project) == []


def test_listing_jobs_while_they_start_never_loses_one(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    env = laptop_environ(fresh_box, tmp_path / "laptop")
    seen_lost: list[dict] = []
    done = threading.Event()

    def lister() -> None:
        lister_run = cli_for(fresh_box, tmp_path / "lister")
        while not done.is_set():
            r = lister_run("jobs", "--all", "--json", cwd=project)
            if r.code == 0:
                seen_lost.extend(j for j in json.loads(r.out) if j["status"] == "lost")

    t = threading.Thread(target=lister)
    t.start()
    try:
        argv = [sys.executable, "-m", "remotedl", "run", "--no-push", "--detach", "--json", "--cpu", "true"]
        procs = [
            subprocess.Popen(
                argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for _ in range(12)
        ]
        results = [(p.wait(120), *p.communicate()) for p in procs]
    finally:
        done.set()
        t.join(60)
    assert all(code == 0 for code, _, _ in results), results
    ids = [json.loads(out)["id"] for _, out, _ in results]

    def all_succeeded() -> bool:
        jl = {j["id"]: j for j in job_list(run, project)}
        return all(jl[i]["status"] == "succeeded" for i in ids)

    assert retry_until(all_succeeded, seconds=20), job_list(run, project)
    assert seen_lost == []


def test_damaged_records_are_skipped_and_ids_never_reused(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "ok.sh", "echo fine\n")
    r = run("run", "--cpu", "--detach", "--json", "ok.sh", cwd=project)
    assert r.code == 0, r.err
    first = json.loads(r.out)["id"]
    records = fresh_box.home / ".remotedl" / "jobs"
    bad = {first + 1: "{}", first + 2: "null", first + 3: '{"id": 7, "na'}
    for job_id, text in bad.items():
        (records / f"{job_id}.json").write_text(text)
    r = run("jobs", "--all", "--json", cwd=project)
    assert r.code == 0, r.err
    assert [j["id"] for j in json.loads(r.out)] == [first]
    for job_id in bad:
        assert f"skipped the damaged job record {records}/{job_id}.json" in r.err
    # Detached: the job may not have written its line yet when `logs` (not following) looks.
    logs = retry_until(lambda: (r := run("logs", str(first), cwd=project)).code == 0 and r.out, seconds=20)
    assert logs == "fine\n"
    r = run("kill", cwd=project)
    assert r.code == 1
    assert "is running" in r.err and "internal error" not in r.err
    r = run("show", str(first + 1), cwd=project)
    assert r.code == 1
    assert f"the record of job {first + 1} is damaged" in r.err
    r = run("run", "--cpu", "--detach", "--json", "ok.sh", cwd=project)
    assert r.code == 0, r.err
    second = json.loads(r.out)["id"]
    assert second > first + 3  # past the damaged records too
    # The id counter is lost, and so is the latest record: its log still names the id.
    retry_until(lambda: record(run, project, second)["status"] == "succeeded")
    (fresh_box.home / ".remotedl" / "next_id").unlink()
    (records / f"{second}.json").unlink()
    r = run("run", "--cpu", "--json", "--detach", "ok.sh", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["id"] > second
    r = run("jobs", "rm", str(first + 1), str(first + 2), str(first + 3), "--yes", cwd=project)
    assert r.code == 0, r.err
    assert not any((records / f"{j}.json").exists() for j in bad)


def test_queue_is_first_in_first_out(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "hold.sh", "sleep 60\n")
    order = tmp_path / "order.txt"
    holder = json.loads(run("run", "--detach", "--json", "--gpu", "0", "hold.sh", cwd=project).out)
    queued = []
    for i in range(1, 7):
        r = run(
            "run", "--detach", "--json", "--gpu", "0", "--queue", "--name", f"f{i}",
            "--", "sh", "-c", f"echo f{i} >> {order}", cwd=project,
        )  # fmt: skip
        assert r.code == 0, r.err
        assert json.loads(r.out)["status"] == "queued"
        queued.append(json.loads(r.out)["id"])
    assert run("kill", str(holder["id"]), cwd=project).code == 0
    done = retry_until(
        lambda: all(record(run, project, i)["status"] == "succeeded" for i in queued), seconds=60
    )
    assert done, job_list(run, project)
    assert order.read_text().split() == [f"f{i}" for i in range(1, 7)]


def test_env_file_is_removed_on_every_end(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "hold.sh", "sleep 60\n")
    records = fresh_box.home / ".remotedl" / "jobs"
    r = run("run", "--detach", "--json", "--gpu", "0", "-e", "S=1", "hold.sh", cwd=project)
    holder = json.loads(r.out)
    assert retry_until(lambda: not (records / f"{holder['id']}.env").exists())  # read, then removed
    r = run("run", "--detach", "--json", "--gpu", "0", "--queue", "-e", "SECRET=hush", "hold.sh", cwd=project)
    queued = json.loads(r.out)
    assert queued["status"] == "queued"
    assert (records / f"{queued['id']}.env").exists()  # kept for when it starts
    r = run("kill", str(queued["id"]), cwd=project)
    assert r.code == 0, r.err
    assert not (records / f"{queued['id']}.env").exists()
    assert run("kill", str(holder["id"]), cwd=project).code == 0
    assert not list(records.glob("*.env"))


def test_logs_follow_outage_window_restarts_after_each_reconnect(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    loop = 'i=0; while [ $i -lt 100 ]; do i=$((i+1)); echo "line $i"; sleep 0.05; done\n'
    script(project, "count.sh", loop)
    job_id = run("run", "--detach", "--cpu", "count.sh", cwd=project).out.strip()
    spec = spec_for(fresh_box, tmp_path)
    got = bytearray()
    reconnects: list[int] = []
    result: dict = {}

    def follow() -> None:
        try:
            result["rec"] = jobs.stream_logs(
                AgentClient(spec), job_id, got.extend, follow=True, on_reconnect=reconnects.append,
                reconnect_for=1.0,
            )  # fmt: skip
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=follow)
    t.start()
    assert retry_until(lambda: b"line 5\n" in got, seconds=15)
    assert _kill_sessions(fresh_box) >= 1
    # The job writes a line each 0.05 s: line 60 comes at least 2.75 s after line 5, well past
    # the 1 s window of the first cut. A second cut then gets a window of its own.
    assert retry_until(lambda: b"line 60\n" in got, seconds=30)
    assert _kill_sessions(fresh_box) >= 1
    t.join(60)
    assert not t.is_alive()
    assert "error" not in result, result
    assert len(reconnects) >= 2
    # Each outage counts (and backs off) from its first attempt: a follow that had reconnected
    # before does not wait longer, or say "attempt 7", at its next cut.
    assert reconnects.count(1) == 2, reconnects
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 101))
    assert result["rec"].status == "succeeded"


HOSTILE_ARGS = ["a b", "it's", 'say "hi"', "$(touch PWNED)", "; touch PWNED", "`touch PWNED`", "ü データ"]


def test_hostile_script_names_and_arguments(cli, box, proj):
    name = "my script;$(touch PWNED).sh"
    script(proj, name, 'for a in "$@"; do printf "<%s>\\n" "$a"; done\n')
    r = cli("run", "--cpu", name, *HOSTILE_ARGS, cwd=proj)
    assert r.code == 0, r.err
    assert r.out.splitlines() == [f"<{a}>" for a in HOSTILE_ARGS]
    for where in (proj, box.home, Path(str(box.home) + "/job-tests")):
        assert not (where / "PWNED").exists()
    r = cli("run", "--cpu", "--", "printf", "[%s]", *HOSTILE_ARGS, cwd=proj)
    assert r.out == "".join(f"[{a}]" for a in HOSTILE_ARGS)


def test_env_and_agent_uploaded_once(cli, box, proj):
    r = cli(
        "run",
        "--cpu",
        "-e",
        "SECRET_TOKEN=s3cr3t value",
        "--",
        "sh",
        "-c",
        'echo "[$SECRET_TOKEN]"',
        cwd=proj,
    )
    assert r.code == 0, r.err
    assert "[s3cr3t value]" in r.out
    rec = job_list(cli, proj)[-1]
    assert rec["env_keys"] == ["SECRET_TOKEN"]
    assert "s3cr3t" not in json.dumps(rec)  # values are not kept in the record
    agents = [p for p in (box.home / ".remotedl" / "agent").iterdir() if not p.name.startswith(".")]
    assert len(agents) == 1


def test_env_after_the_script_is_the_jobs_not_an_argument(cli, box, proj):
    """`remotedl run train.py --env TOKEN=...` gave the script `--env TOKEN=...` as arguments,
    so the secret was in `jobs`, the record and notifications: it is the job's environment."""
    script(proj, "env.sh", 'echo "args:[$*] token:[$SECRET_TOKEN]"\n')
    r = cli("run", "--cpu", "env.sh", "--lr", "1", "--env", "SECRET_TOKEN=s3cr3t", cwd=proj)
    assert r.code == 0, r.err
    assert "args:[--lr 1] token:[s3cr3t]" in r.out
    assert "took --env SECRET_TOKEN for remotedl" in r.err
    assert "s3cr3t" not in r.err
    rec = job_list(cli, proj)[-1]
    assert rec["env_keys"] == ["SECRET_TOKEN"]
    assert "s3cr3t" not in json.dumps(rec)


def test_logs_json_wraps_the_bytes_in_json_lines(cli, proj):
    """`--json logs` printed the log's raw bytes: it prints one JSON object per line, text as
    text and a line that is not UTF-8 as base64; joined they are the log byte for byte."""
    import base64

    script(proj, "mixed.sh", "echo 'plain ü'; printf 'bin \\377\\376\\n'; printf 'no newline'\n")
    r = cli("run", "--detach", "--cpu", "mixed.sh", cwd=proj)
    assert r.code == 0, r.err
    job_id = r.out.strip()
    expected = "plain ü\n".encode() + b"bin \xff\xfe\n" + b"no newline"
    for extra in (["-f"], [], ["-f", "-n", "5"]):  # follows to the end first, then as it is
        r = cli("--json", "logs", *extra, job_id, cwd=proj)
        assert r.code == 0, r.err
        objs = [json.loads(line) for line in r.out.splitlines()]
        assert objs[0] == {"text": "plain ü\n"}
        assert objs[1] == {"base64": base64.b64encode(b"bin \xff\xfe\n").decode()}
        assert objs[2] == {"text": "no newline"}
        joined = b"".join(o["text"].encode() if "text" in o else base64.b64decode(o["base64"]) for o in objs)
        assert joined == expected
    r = cli("--json", "logs", "-n", "1", job_id, cwd=proj)
    assert [json.loads(line) for line in r.out.splitlines()] == [{"text": "no newline"}]
    # a followed `run --json` prints its log so too
    r = cli("--json", "run", "--cpu", "mixed.sh", cwd=proj)
    assert r.code == 0, r.err
    assert [json.loads(line) for line in r.out.splitlines()] == objs


def test_ctrl_c_detaches_and_job_keeps_running(box, proj, tmp_path):
    script(proj, "slow.sh", "echo started; sleep 300\n")  # runs on until killed below
    env = laptop_environ(box, tmp_path / "laptop", PYTHONUNBUFFERED="1")
    p = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "run", "--cpu", "slow.sh"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = p.stdout.readline()
    assert first.strip() == "started"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 130
    assert "detached" in err
    assert "remotedl attach" in err
    run = cli_for(box, tmp_path / "laptop2")
    rec = latest_of(run, proj, tmp_path)
    try:
        assert rec["name"] == "slow.sh"
        assert rec["status"] == "running"
    finally:
        run("kill", str(rec["id"]), cwd=proj)


def test_ctrl_c_after_the_start_request_names_the_job(box, proj, tmp_path):
    """Ctrl-C once the box has started the job, before `run` said so (it was keeping the
    job's commit in the local repository): the interrupt names the job that now runs."""
    script(proj, "slow.sh", "echo started; sleep 300\n")  # runs on until killed below
    mark = tmp_path / "keeping"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    # git as it is, except that keeping a job's commit waits: the window, held open for the test
    (bindir / "git").write_text(
        "#!/bin/sh\n"
        'case "$*" in *"update-ref refs/remotedl/jobs/"*) : > "$MARK"; sleep 60;; esac\n'
        f'exec {shutil.which("git")} "$@"\n'
    )
    (bindir / "git").chmod(0o755)
    env = laptop_environ(box, tmp_path / "laptop", PATH=f"{bindir}:{os.environ['PATH']}", MARK=str(mark))
    p = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "run", "--cpu", "slow.sh"],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        assert retry_until(mark.exists, seconds=60), "the start request never came back"
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    run = cli_for(box, tmp_path / "laptop2")
    rec = latest_of(run, proj, tmp_path)
    try:
        assert rec["name"] == "slow.sh" and rec["status"] == "running"
        assert p.returncode == 130, err
        said = f"interrupted: job {rec['id']} (slow.sh) was started on {box.name} and keeps running"
        assert said in err, err
        assert f"remotedl kill {rec['id']}" in err
    finally:
        run("kill", str(rec["id"]), cwd=proj)


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux on the laptop side")
def test_attach_shows_the_job_in_a_terminal(box, proj, tmp_path):
    script(proj, "chatty.sh", 'i=0; while true; do i=$((i+1)); echo "chat $i"; sleep 0.2; done\n')
    run = cli_for(box, tmp_path / "laptop")
    job_id = run("run", "--detach", "--cpu", "chatty.sh", cwd=proj).out.strip()
    env = laptop_environ(box, tmp_path / "laptop")
    cmd = f"cd {proj} && {sys.executable} -m remotedl attach {job_id}"
    try:
        with terminal(cmd, tmp_path / "local-tmux", env=env) as term:
            assert retry_until(lambda: "chat " in term.screen(), seconds=15), term.screen()
    finally:
        run("kill", job_id, cwd=proj)


def test_logs_to_a_file_and_a_pipe_are_byte_exact(cli, box, proj, tmp_path):
    """`remotedl logs > file` and `| consumer` move the log in the kernel after the first chunk:
    every byte, in order, once."""
    payload = bytes(range(256)) * 40000 + b"end\n"  # 10 MB, every byte value
    (proj / "emit.py").write_text(
        "import sys\nsys.stdout.buffer.write(bytes(range(256)) * 40000 + b'end\\n')\n"
    )
    r = cli("run", "--cpu", "emit.py", cwd=proj)
    assert r.code == 0, r.err
    job_id = str(job_list(cli, proj)[-1]["id"])
    env = {
        **os.environ,
        "REMOTEDL_HOST": box.name,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "XDG_STATE_HOME": str(tmp_path / "st"),
        "XDG_CONFIG_HOME": str(tmp_path / "cf"),
    }
    out = tmp_path / "log.bin"
    with out.open("wb") as f:
        subprocess.run([sys.executable, "-m", "remotedl", "logs", job_id], stdout=f, env=env, cwd=proj,
                       check=True, timeout=120)  # fmt: skip
    assert out.read_bytes() == payload
    piped = subprocess.run([sys.executable, "-m", "remotedl", "logs", job_id], capture_output=True, env=env,
                           cwd=proj, check=True, timeout=120)  # fmt: skip
    assert piped.stdout == payload


def test_sandbox_down_ends_the_jobs_still_running_there(fresh_box, project, tmp_path):
    """A job outlives its tmux server by design; the throwaway box's teardown ends it (and its
    runner, which would otherwise write its record into the removed box home)."""
    from remotedl import sandbox
    from remotedl.agent.runtimes.tmux import group_alive

    run = cli_for(fresh_box, tmp_path / "laptop")
    script(project, "long.sh", "echo started; sleep 300\n")
    rec = json.loads(run("run", "--detach", "--json", "--cpu", "long.sh", cwd=project).out)
    records = fresh_box.home / ".remotedl" / "jobs"
    assert retry_until(lambda: json.loads((records / f"{rec['id']}.json").read_text()).get("pgid"))
    saved = json.loads((records / f"{rec['id']}.json").read_text())
    pgid, runner = saved["pgid"], saved["runner_pid"]
    started = process_start(runner)
    os.killpg(pgid, 0)  # alive
    assert sandbox.down(make_env(tmp_path / "fresh"), name="fresh")
    # Ended: no process of the group runs (a zombie has ended; where nothing reaps orphans it
    # stays one, and killpg(pgid, 0) still finds it), and neither does the runner.
    assert retry_until(lambda: not group_alive(pgid), seconds=30)
    assert retry_until(lambda: process_gone(runner, started), seconds=30)
    assert not fresh_box.home.exists()  # nothing wrote into the removed home afterwards


def box_requests(caplog) -> list[str]:
    """The requests remotedl sent to the box (one ssh session each), from its debug log."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "remotedl.ssh" and r.getMessage().startswith("remote ")
    ]


def test_run_no_push_checks_the_tree_and_starts_in_one_request(cli, box, proj, tmp_path, caplog):
    """The work tree's check rides with the start (issue 24), and still refuses what it refused."""
    import logging

    rdir = f"~/one-request-{tmp_path.name}"
    (proj / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    assert cli("push", cwd=proj).code == 0
    assert cli("run", "--no-push", "--cpu", "true", cwd=proj).code == 0  # the agent is on the box
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")
    caplog.clear()
    r = cli("run", "--no-push", "--detach", "--json", "--cpu", "--", "sh", "-c", "pwd", cwd=proj)
    assert r.code == 0, r.err
    assert len(box_requests(caplog)) == 1
    rec = json.loads(r.out)
    assert rec["remote_dir"] == str((box.home / rdir[2:]).resolve())
    # A tree reached through a symlink: the same tree.
    link = box.home / f"link-{tmp_path.name}"
    link.symlink_to(box.home / rdir[2:])
    caplog.clear()
    r = cli(
        "run", "--no-push", "--detach", "--json", "--remote-dir", f"~/{link.name}", "--cpu", "true", cwd=proj
    )
    assert r.code == 0, r.err
    assert len(box_requests(caplog)) == 1
    assert json.loads(r.out)["remote_dir"] == rec["remote_dir"]
    # Nothing there: refused by the check, nothing started.
    caplog.clear()
    r = cli("run", "--no-push", "--remote-dir", rdir + "-never", "--cpu", "true", cwd=proj)
    assert r.code == 1 and "does not exist" in r.err
    assert len(box_requests(caplog)) == 1


def test_jobs_of_several_projects_say_whose_each_is(cli, project, tmp_path):
    # The box is shared by projects: `jobs` lists all of them, each with its project's name.
    ids = {}
    for name in ("alpha", "beta"):
        (project / "remotedl.toml").write_text(f'remote_dir = "~/job-projects/{tmp_path.name}/{name}"\n')
        r = cli("run", "--detach", "--json", "--cpu", "--name", f"in-{name}", "--", "true", cwd=project)
        assert r.code == 0, r.err
        ids[name] = json.loads(r.out)["id"]
    r = cli("jobs", "--all", cwd=project)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split()[-2:] == ["project", "command"], r.out
    for name, job in ids.items():
        (row,) = [line.split() for line in lines if line.split()[:1] == [str(job)]]
        assert row[1] == f"in-{name}" and row[-2:] == [name, "true"], r.out
    listed = {j["id"]: j for j in json.loads(cli("jobs", "--all", "--json", cwd=project).out)}
    assert listed[ids["beta"]]["remote_dir"].endswith(f"/{tmp_path.name}/beta")


def test_project_labels_are_the_shortest_names_that_tell_projects_apart():
    from remotedl.cli.jobs import job_columns, project_labels

    assert project_labels([("", "/h/remotedl/a"), ("", "/h/remotedl/a"), ("", "/h/remotedl/a")]) == {}
    labels = project_labels([("", "/h/x/proj"), ("", "/h/y/proj"), ("", "/h/z/other"), ("", None)])
    assert labels == {("", "/h/x/proj"): "x/proj", ("", "/h/y/proj"): "y/proj", ("", "/h/z/other"): "other",
                      ("", None): "-"}  # fmt: skip
    # a project of one name on two hosts is the same project there: one name, no column
    assert project_labels([("a", "/home/u/remotedl/p"), ("b", "/home/v/remotedl/p")]) == {}
    plain = ["id", "name", "status", "GPUs", "exit", "started", "duration", "command"]
    assert job_columns(("id",), {}) == plain
    assert job_columns(("id",), labels)[-2:] == ["project", "command"]
