"""Fleets against real boxes: three sandbox sshd boxes with 1, 2 and 3 stand-in GPUs (their state
in each box's gpus.json), status as one table, a box down, `top` in a real terminal, push to all."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl.errors import ConnectError, ExitCode, RemotedlError
from remotedl.fleet import run_on_hosts
from tests.conftest import Box, CliResult, LaptopBoxes, laptop_boxes, make_env, retry_until
from tests.terminal import terminal

GPUS = {"f1": 1, "f2": 2, "f3": 3}


class FleetBoxes(LaptopBoxes):
    def kill_all_jobs(self, proj: Path) -> None:
        for name in self.boxes:
            r = self.run("jobs", "--json", "--host", name, cwd=proj)
            for job in json.loads(r.out) if r.code == 0 else []:
                if job["status"] in ("running", "queued", "starting"):
                    self.run("kill", "--grace", "1", str(job["id"]), "--host", name, cwd=proj)


def has_row(text: str, *first: str) -> bool:
    """Whether a line of a table starts with these cells."""
    return any(line.split()[: len(first)] == list(first) for line in text.splitlines())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetBoxes]:
    with laptop_boxes(tmp_path_factory.mktemp("fleet"), GPUS) as boxes:
        yield FleetBoxes(boxes.base, boxes.boxes, boxes.gpus)


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(f'remote_dir = "~/fleet-tests/{tmp_path.name}"\n')
    (project / "hold.sh").write_text("#!/bin/sh\nsleep 60\n")
    (project / "hold.sh").chmod(0o755)
    subprocess.run(["git", "-C", str(project), "add", "."], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-q", "-m", "hold"], check=True)
    return project


@pytest.fixture
def down_box(fleet: FleetBoxes, tmp_path: Path) -> Iterator[Box]:
    """A fourth box, known to the laptop through a [hosts.NAME] ssh_config in the user config,
    whose sshd is stopped: the box is down."""
    base = tmp_path / "down"
    env = make_env(base)
    info = sandbox.up(env, name="f4", gpus=1)
    config = fleet.base / "config" / "remotedl" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[hosts.f4]\nssh_config = "{info.ssh_config}"\n')
    os.kill(info.pid, 15)
    assert retry_until(lambda: not sandbox._alive(info.pid), seconds=10)
    try:
        yield Box(info, dict(env.environ))
    finally:
        config.unlink()
        sandbox.down(env, name="f4")


def test_status_is_one_table_of_every_gpu_of_every_box(fleet, proj):
    sleeper = subprocess.Popen(["sleep", "60"])
    user = fleet.boxes["f1"].info.user
    try:
        # someone else's training on f1's GPU 0; a remotedl job on f2's GPU 1
        fleet.gpu_state(
            "f1", processes=[{"gpu": 0, "pid": sleeper.pid, "name": "/usr/bin/python3", "used_memory": 900}]
        )
        fleet.gpu_state("f2")
        fleet.gpu_state("f3")
        r = fleet.run("run", "--detach", "--json", "--gpu", "1", "--host", "f2", "hold.sh", cwd=proj)
        assert r.code == 0, r.err
        job = json.loads(r.out)

        r = fleet.run("status", "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        lines = r.out.splitlines()
        assert "3 boxes of 3 reachable, 6 GPUs (4 free)" in lines[0]
        rows = [line.split() for line in lines[2:]]
        assert [(row[0], row[1]) for row in rows] == [
            ("f1", "0"), ("f2", "0"), ("f2", "1"), ("f3", "0"), ("f3", "1"), ("f3", "2"),
        ]  # fmt: skip
        assert f"process {sleeper.pid} (python3, user {user})" in lines[2]
        assert f"job {job['id']} (hold.sh)" in lines[4]
        assert lines[3].rstrip().endswith("free")
        assert "RTX A6000" in lines[7]

        r = fleet.run("status", "--json", "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        data = json.loads(r.out)
        assert [h["host"] for h in data["hosts"]] == ["f1", "f2", "f3"]
        assert all(h["ok"] for h in data["hosts"])
        holders = {(g["host"], g["index"]): (g["holder"], g["held_by"]) for g in data["gpus"]}
        assert holders[("f1", 0)] == ("process", f"process {sleeper.pid} (python3, user {user})")
        assert holders[("f2", 1)] == ("job", f"job {job['id']} (hold.sh)")
        assert holders[("f3", 2)] == ("free", None)
        assert data["gpus"][0]["processes"][0]["user"] == user
    finally:
        sleeper.kill()
        fleet.kill_all_jobs(proj)
        fleet.gpu_state("f1")


def test_a_box_down_shows_its_error_and_the_rest_still_work(fleet, down_box, proj):
    r = fleet.run("status", "--host", f"f1,{down_box.name},f3", cwd=proj)
    assert r.code == ExitCode.CONNECTION  # every failure a connection failure: exit 4
    assert "2 boxes of 3 reachable, 4 GPUs" in r.out
    assert has_row(r.out, "f1", "0")
    assert has_row(r.out, "f3", "2")
    assert f"{down_box.name}: connection refused by 127.0.0.1:{down_box.info.port}" in r.err
    r = fleet.run("status", "--json", "--host", f"f1,{down_box.name},f3", cwd=proj)
    assert r.code == ExitCode.CONNECTION
    data = json.loads(r.out)
    down = data["hosts"][1]
    assert down["host"] == down_box.name
    assert down["ok"] is False
    assert "connection refused" in down["error"]["error"]
    assert down["error"]["exit_code"] == 4
    assert {g["host"] for g in data["gpus"]} == {"f1", "f3"}
    # a host that is not even in any ssh config: its own row too, the others unaffected
    r = fleet.run("status", "--host", "f1,no-such-host-xyz", cwd=proj)
    assert r.code != 0
    assert "no-such-host-xyz:" in r.err
    assert "1 box of 2 reachable" in r.out


def test_top_json_once_is_one_snapshot_of_every_box(fleet, proj):
    for name in GPUS:
        fleet.gpu_state(name)
    try:
        r = fleet.run("run", "--detach", "--json", "--gpus", "2", "--host", "f3", "hold.sh", cwd=proj)
        assert r.code == 0, r.err
        job = json.loads(r.out)
        r = fleet.run("top", "--json", "--once", "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        snap = json.loads(r.out)
        boxes = {b["host"]: b for b in snap["boxes"]}
        assert list(boxes) == ["f1", "f2", "f3"]
        assert all(b["state"] == "live" for b in boxes.values())
        assert [len(b["gpus"]) for b in boxes.values()] == [1, 2, 3]
        f3 = boxes["f3"]
        assert [(j["id"], j["status"], j["gpus"]) for j in f3["jobs"]] == [
            (job["id"], "running", job["gpus"])
        ]
        assert {int(k) for k in f3["held_by"]} == set(job["gpus"])
        assert boxes["f1"]["jobs"] == []
        # one host works the same
        r = fleet.run("top", "--json", "--once", "--host", "f2", cwd=proj)
        assert r.code == 0, r.err
        assert [b["host"] for b in json.loads(r.out)["boxes"]] == ["f2"]
    finally:
        fleet.kill_all_jobs(proj)


def test_top_once_with_a_box_down(fleet, down_box, proj):
    r = fleet.run("top", "--once", "--host", f"f1,{down_box.name}", cwd=proj)
    assert r.code == ExitCode.CONNECTION
    assert "1/2 boxes live" in r.out
    # (one attempt or more, as long as the other box takes to answer)
    assert re.search(rf"{down_box.name}: reconnecting \(attempt \d+\): connection refused", r.out), r.out
    assert has_row(r.out, "f1", "0")


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux on the laptop side for a real terminal")
def test_top_in_a_terminal_shows_every_box_and_leaves_cleanly(fleet, proj, tmp_path):
    for name in GPUS:
        fleet.gpu_state(name)
    fleet.gpu_state("f2", gpus=[dict(g, utilization=73) for g in sandbox.fake_gpus(2)["gpus"]])  # type: ignore[union-attr]
    r = fleet.run("run", "--detach", "--gpu", "0", "--host", "f1", "hold.sh", cwd=proj)
    assert r.code == 0, r.err
    env = fleet.environ()
    # After top: the shell's terminal settings and a marker, so the test sees top left and
    # gave the terminal back as it found it (echo and canonical mode on).
    cmd = (
        f"cd {proj} && stty -g > {tmp_path}/before; {sys.executable} -m remotedl top --interval 0.5 "
        f'--host {fleet.names}; echo "top exited $?"; stty -g > {tmp_path}/after; sleep 60'
    )
    try:
        with terminal(cmd, tmp_path / "laptop-tmux", env=env, width=150, height=40) as term:
            screen = term.screen
            assert retry_until(lambda: "3/3 boxes live" in screen(), seconds=30), screen()
            shown = screen()
            for name, count in GPUS.items():
                for index in range(count):
                    assert has_row(shown, name, str(index)), shown
            assert "73%" in shown
            assert "hold.sh" in shown  # the running job
            assert "q or Ctrl-C quits" in shown
            # it refreshes: new samples from the same streams (the job's age counts up)
            assert retry_until(lambda: screen() != shown, seconds=20)
            term.type("q")
            assert retry_until(lambda: "top exited 0" in screen(), seconds=20), screen()
            after = screen()
            assert "remotedl top" not in after  # the alternate screen is gone
            assert retry_until((tmp_path / "after").exists, seconds=10)
            assert (tmp_path / "after").read_text() == (tmp_path / "before").read_text()
    finally:
        fleet.kill_all_jobs(proj)


def test_top_stream_reconnects_after_a_drop(fleet, tmp_path):
    """One long-lived stream per box; when it drops the box shows as reconnecting, and it
    comes back by itself once the box answers again."""
    from remotedl.ssh import close_master, resolve_host
    from remotedl.top import Target, Watch

    base = tmp_path / "flaky"
    env = make_env(base)
    info = sandbox.up(env, name="flaky", gpus=1)
    restarted: int | None = None
    try:
        spec = resolve_host(env, "flaky")
        from remotedl.ssh import Box as SshBox

        with Watch([Target("flaky", box=SshBox(spec))], interval=0.3) as watch:
            assert watch.wait_first(30)
            assert retry_until(lambda: watch.snapshot()[0].samples >= 3, seconds=30), watch.snapshot()
            first = watch.snapshot()[0]
            assert first.state == "live"
            assert len(first.gpus) == 1
            # The box goes away: its sshd stops, and the connection the stream rides is cut.
            os.kill(info.pid, 15)
            assert retry_until(lambda: not sandbox._alive(info.pid), seconds=10)
            close_master(spec)
            down = retry_until(
                lambda: (
                    (s := watch.snapshot()[0]).state == "reconnecting"
                    and "connection refused" in (s.error or "")
                    and s
                ),
                seconds=30,
            )
            assert down, watch.snapshot()
            assert down.gpus  # the last sample stays on show meanwhile
            # It comes back on the same port: the stream is started again by itself.
            sshd = shutil.which("sshd") or "/usr/sbin/sshd"
            config, log = f"{info.directory}/sshd_config", f"{info.directory}/sshd.log"
            subprocess.run([sshd, "-f", config, "-E", log], check=True)
            restarted = retry_until(lambda: sandbox._read_pid(Path(info.directory)), seconds=10)
            back = retry_until(
                lambda: (s := watch.snapshot()[0]).state == "live" and s.samples > first.samples and s,
                seconds=60,
            )
            assert back, watch.snapshot()
            assert back.attempts == 0
    finally:
        if restarted and restarted != info.pid:  # the sshd this test started again
            os.kill(restarted, 15)
        sandbox.down(env, name="flaky")


def test_push_to_a_fleet_reaches_every_box_with_its_own_settings(fleet, proj):
    (proj / "data").mkdir()
    (proj / "data" / "x.bin").write_bytes(b"x" * 5000)
    (proj / "remotedl.toml").write_text(
        'remote_dir = "~/fleet-push"\ndata = ["data"]\n[hosts.f2]\nremote_dir = "~/f2-elsewhere"\n'
    )
    (proj / "train.py").write_text("print('v1')\n")
    r = fleet.run("push", "--json", "--host", fleet.names, cwd=proj)
    assert r.code == 0, r.out + r.err
    data = json.loads(r.out)
    results = {h["host"]: h["result"] for h in data["hosts"]}
    assert list(results) == ["f1", "f2", "f3"]
    commits = {res["commit"] for res in results.values()}
    assert len(commits) == 1  # the same snapshot everywhere
    for name, box in fleet.boxes.items():
        where = "f2-elsewhere" if name == "f2" else "fleet-push"
        assert results[name]["remote_dir"] == str(box.home / where)
        assert (box.home / where / "train.py").read_text() == "print('v1')\n"
        assert (box.home / where / "data" / "x.bin").stat().st_size == 5000
    r = fleet.run("push", "--host", fleet.names, cwd=proj)
    assert r.code == 0, r.err
    assert sorted(line.split(":")[0] for line in r.out.splitlines()) == ["f1", "f2", "f3"]
    assert "already there" in r.out


def test_push_with_a_box_down_pushes_to_the_others(fleet, down_box, proj):
    r = fleet.run("push", "--host", f"f1,{down_box.name}", cwd=proj)
    assert r.code == ExitCode.CONNECTION
    assert r.out.startswith("f1: code ")
    assert f"{down_box.name}: connection refused" in r.err


def test_run_on_hosts_keeps_each_hosts_result():
    def answer(host: str) -> str:
        if host == "down":
            raise ConnectError(f"{host} is unreachable", hint="check it")
        if host == "broken":
            raise RemotedlError("a command failed")
        return host.upper()

    result = run_on_hosts(["a", "down", "b"], answer)
    assert [r.host for r in result.results] == ["a", "down", "b"]
    assert result.values() == [("a", "A"), ("b", "B")]
    assert [r.host for r in result.failed] == ["down"]
    assert result.failed[0].error_dict() == {
        "error": "down is unreachable",
        "hint": "check it",
        "exit_code": 4,
    }
    assert result.exit_code == ExitCode.CONNECTION
    assert run_on_hosts(["a", "down", "broken"], answer).exit_code == ExitCode.ERROR
    assert run_on_hosts(["a", "b"], answer).exit_code == 0

    def bug(host: str) -> str:
        raise KeyError(host)

    with pytest.raises(KeyError):  # not a host's failure: a bug, raised
        run_on_hosts(["a", "b"], bug)


def sample(host: str, used: list[int], held: dict[int, str] | None = None, foreign: int | None = None,
           queued: int = 0, load: float = 0.0):  # fmt: skip
    """A box as `top` samples it: GPUs with ``used`` MiB each, jobs holding some, a foreign
    process on one, ``queued`` jobs waiting."""
    from remotedl.gpus import Gpu, GpuProcess
    from remotedl.schema import JobRecord
    from remotedl.top import BoxSample

    gpus = [Gpu(i, "GPU", f"u{i}", f"b{i}", mib, 24000, 0) for i, mib in enumerate(used)]
    if foreign is not None:
        gpus[foreign].processes.append(GpuProcess(f"u{foreign}", 4242, "python3", 500, "bob"))
    jobs = [JobRecord(id=100 + i, name="q", command="x", cwd="/", status="queued") for i in range(queued)]
    return BoxSample(host, "live", gpus=gpus, held_by=held or {}, jobs=jobs, load=[load])


def test_placement_picks_free_gpus_by_the_boxes_own_rules():
    from remotedl.errors import GpusBusy, UsageError
    from remotedl.fleet import place

    boxes = [
        sample("a", [10], held={0: "job 1 (x)"}),  # its one GPU held by a job
        sample("b", [5000, 300]),  # two free, one little used
        sample("c", [100, 100], foreign=1),  # GPU 1 runs someone else's process
    ]
    first, *rest = place(boxes, count=1)
    assert (first.host, first.gpus, first.queue) == ("c", [0], False)  # least memory used (100 MiB)
    assert [(c.host, c.gpus) for c in rest] == [("b", [1])]
    assert [(c.host, c.gpus) for c in place(boxes, count=2)] == [("b", [0, 1])]
    with pytest.raises(UsageError, match="more than any box of the fleet has"):
        place(boxes, count=3)
    full = [
        sample("a", [10], held={0: "job 1 (x)"}, queued=2),
        sample("b", [10, 10], held={1: "job 2 (y)"}, foreign=0, queued=1),
    ]
    with pytest.raises(GpusBusy, match="no box of the fleet has 2 free GPUs"):
        place(full, count=2)
    # --queue: nothing free anywhere, so the shortest queue among boxes that have the GPUs at all
    queued = place(full, count=1, queue=True)
    assert [(c.host, c.queue) for c in queued] == [("b", True), ("a", True)]
    assert place(full, count=2, queue=True)[0].host == "b"  # a has one GPU: never enough
    # --queue with a free box: the free box first, the queues after it
    mixed = place([*full, sample("d", [10])], count=1, queue=True)
    # (d's queue too: should another laptop take its GPU first, the job waits there)
    assert [(c.host, c.queue) for c in mixed] == [("d", False), ("d", True), ("b", True), ("a", True)]
    # a CPU job goes to the least loaded box
    assert [c.host for c in place([sample("a", [1], load=3.0), sample("b", [1], load=0.5)], cpu=True)] == [
        "b",
        "a",
    ]


# ------------------------------------------------------------------ run placement, jobs on a fleet


def started(r: CliResult) -> dict:
    assert r.code == 0, r.out + r.err
    return json.loads(r.out)


def test_run_places_the_job_on_the_free_box(fleet, proj, tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        fleet.gpu_state(
            "f1", processes=[{"gpu": 0, "pid": sleeper.pid, "name": "python3", "used_memory": 500}]
        )
        fleet.gpu_state("f2", gpus=[dict(g, memory_used=10) for g in sandbox.fake_gpus(2)["gpus"]])  # type: ignore[union-attr]
        fleet.gpu_state("f3", gpus=[dict(g, memory_used=5000) for g in sandbox.fake_gpus(3)["gpus"]])  # type: ignore[union-attr]
        # one GPU: the free one with the least memory used, f2's (f1's runs someone else's process)
        r = fleet.run(
            "run", "--detach", "--json", "--gpu", "auto", "--host", fleet.names, "hold.sh", cwd=proj
        )
        first = started(r)
        assert (first["alias"], first["gpus"], first["status"]) == ("f2", [0], "running")
        assert "placing the job on f2: 1 GPU free (0)" in r.err
        # the code went there: the job runs its own checkout of it
        where = f"fleet-tests/{tmp_path.name}"  # this project's remote_dir
        assert (fleet.boxes["f2"].home / where / "hold.sh").is_file()
        assert not (fleet.boxes["f1"].home / where).exists()
        # two GPUs: only f3 has two free now
        second = started(
            fleet.run("run", "--detach", "--json", "--gpus", "2", "--host", fleet.names, "hold.sh", cwd=proj)
        )
        assert (second["alias"], second["gpus"]) == ("f3", [0, 1])
        # three: no box has three free; the error names what holds each box
        r = fleet.run("run", "--detach", "--gpus", "3", "--host", fleet.names, "hold.sh", cwd=proj)
        assert r.code == 1
        assert "no box of the fleet has 3 free GPUs" in r.err
        assert f"f1: 0 of 1 free (GPU 0 process {sleeper.pid}" in r.err
        # four: more than any box has, a usage error
        r = fleet.run("run", "--detach", "--gpus", "4", "--host", fleet.names, "hold.sh", cwd=proj)
        assert r.code == 2
        assert "more than any box of the fleet has (the most: 3 on f3)" in r.err
        # GPUs by index belong to one box
        r = fleet.run("run", "--detach", "--gpu", "0", "--host", fleet.names, "hold.sh", cwd=proj)
        assert r.code == 2
        assert "names GPUs of one box" in r.err
    finally:
        sleeper.kill()
        fleet.kill_all_jobs(proj)
        fleet.gpu_state("f1")


def test_a_busy_fleet_queues_on_the_shortest_queue(fleet, proj):
    for name in GPUS:
        fleet.gpu_state(name)
    try:
        # every GPU held: f1 by one job, f2 by one 2-GPU job, f3 by one 3-GPU job
        for name, count in GPUS.items():
            job = started(
                fleet.run(
                    "run", "--detach", "--json", "--gpus", str(count), "--host", name, "hold.sh", cwd=proj
                )
            )
            assert job["status"] == "running"
        # queues: f1 two waiting, f3 one waiting, f2 none
        for name in ("f1", "f1", "f3"):
            r = fleet.run(
                "run", "--detach", "--json", "--queue", "--gpus", "1", "--host", name, "hold.sh", cwd=proj
            )
            assert started(r)["status"] == "queued"
        r = fleet.run("run", "--detach", "--gpus", "1", "--host", fleet.names, "hold.sh", cwd=proj)
        assert r.code == 1
        assert "no box of the fleet has 1 free GPU" in r.err
        assert "--queue" in r.err
        r = fleet.run(
            "run", "--detach", "--json", "--queue", "--gpus", "1", "--host", fleet.names, "hold.sh", cwd=proj
        )
        job = started(r)
        assert (job["alias"], job["status"]) == ("f2", "queued")
        assert "placing the job on f2: nothing free; its queue is the shortest (0 waiting)" in r.err
        # two GPUs: f1 has one GPU only; f2 and f3 have one waiting and one running each: the order given
        r = fleet.run(
            "run", "--detach", "--json", "--queue", "--gpus", "2", "--host", fleet.names, "hold.sh", cwd=proj
        )
        job = started(r)
        assert (job["alias"], job["status"]) == ("f2", "queued")
    finally:
        fleet.kill_all_jobs(proj)


def test_jobs_of_a_fleet_and_host_id_routing(fleet, proj):
    for name in GPUS:
        fleet.gpu_state(name)
    (proj / "hello.sh").write_text(
        '#!/bin/sh\necho "hello from $(hostname) GPU $CUDA_VISIBLE_DEVICES"\nsleep 60\n'
    )
    (proj / "hello.sh").chmod(0o755)
    try:
        a = started(
            fleet.run("run", "--detach", "--json", "--gpus", "3", "--host", fleet.names, "hello.sh", cwd=proj)
        )
        b = started(
            fleet.run("run", "--detach", "--json", "--gpus", "2", "--host", fleet.names, "hello.sh", cwd=proj)
        )
        assert (a["alias"], b["alias"]) == ("f3", "f2")
        ref_a, ref_b = f"f3:{a['id']}", f"f2:{b['id']}"
        r = fleet.run("jobs", "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        assert has_row(r.out, "f3", ref_a, "hello.sh", "running", "0,1,2")
        assert has_row(r.out, "f2", ref_b, "hello.sh", "running", "0,1")
        listed = json.loads(fleet.run("jobs", "--json", "--host", fleet.names, cwd=proj).out)
        assert {j["ref"] for j in listed["jobs"]} >= {ref_a, ref_b}
        # HOST:ID names the host, with the fleet given or without any host at all
        for hosts in (["--host", fleet.names], []):
            got = retry_until(
                lambda h=hosts: "hello from" in (x := fleet.run("logs", ref_b, *h, cwd=proj)).out and x,
                seconds=20,
            )
            assert got, fleet.run("logs", ref_b, *hosts, cwd=proj)
            assert "GPU 0,1" in got.out
        shown = json.loads(fleet.run("show", "--json", ref_a, cwd=proj).out)
        assert (shown["alias"], shown["id"], shown["gpus"]) == ("f3", a["id"], [0, 1, 2])
        # a plain id on a fleet is ambiguous
        r = fleet.run("logs", str(a["id"]), "--host", fleet.names, cwd=proj)
        assert r.code == 2
        assert "name it as HOST:ID" in r.err
        # kill by HOST:ID; kill without an id: this project's latest running job on any host
        r = fleet.run("kill", "--grace", "1", ref_a, "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        assert f"job {ref_a} (hello.sh): killed" in r.out
        r = fleet.run("kill", "--grace", "1", "--host", fleet.names, cwd=proj)
        assert r.code == 0, r.err
        assert f"job {ref_b} (hello.sh): killed" in r.out
        r = fleet.run("kill", "--host", fleet.names, cwd=proj)
        assert r.code == 1
        assert "no running job of this project on f1, f2, f3" in r.err
    finally:
        fleet.kill_all_jobs(proj)


def test_concurrent_placements_never_share_a_gpu(fleet, proj, tmp_path):
    """Two laptops (state and config of their own, the boxes known to the second through
    [hosts.NAME] ssh_config) place 8 one-GPU jobs at once on a fleet with 6 free GPUs: 6 run,
    each on a GPU of its own, and 2 are refused."""
    for name in GPUS:
        fleet.gpu_state(name)
    assert fleet.run("push", "--host", fleet.names, cwd=proj).code == 0
    laptop_b = tmp_path / "laptop-b"
    config = laptop_b / "config" / "remotedl" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(
        "".join(f'[hosts.{n}]\nssh_config = "{b.info.ssh_config}"\n' for n, b in fleet.boxes.items())
    )
    envs = [fleet.environ(), {**os.environ, **make_env(laptop_b).environ}]
    argv = [sys.executable, "-m", "remotedl", "run", "--no-push", "--detach", "--json", "--gpus", "1",
            "--host", fleet.names, "hold.sh"]  # fmt: skip
    try:
        procs = [
            subprocess.Popen(
                argv, cwd=proj, env=envs[i % 2], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for i in range(8)
        ]
        results = [(p.wait(120), *p.communicate()) for p in procs]
        ok = [json.loads(out) for code, out, _ in results if code == 0]
        refused = [json.loads(out) for code, out, _ in results if code != 0]
        assert len(ok) == 6, results
        claimed = [(j["alias"], g) for j in ok for g in j["gpus"]]
        assert sorted(claimed) == [("f1", 0), ("f2", 0), ("f2", 1), ("f3", 0), ("f3", 1), ("f3", 2)], results
        assert len(refused) == 2
        assert all(r["exit_code"] == 1 for r in refused), refused
        assert all("free GPU" in r["error"] or "taken" in r["error"] for r in refused), refused
    finally:
        fleet.kill_all_jobs(proj)
