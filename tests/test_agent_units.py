"""The box agent's pure parts, without a box: GPU choice, queue order, id allocation, the index
of active jobs, record state derivation, request/record round trips, the bundle, the import graph.

Each test has a state dir of its own (``REMOTEDL_BOX_STATE``); nothing here starts sshd or tmux.
"""

from __future__ import annotations

import ast
import io
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from remotedl import gpus as gpumod
from remotedl.agent import runtimes, state, store
from remotedl.agent.gpus import blocked_by_earlier, place
from remotedl.agent.runtimes.slurm import SlurmRuntime, slurm_changes
from remotedl.agent.runtimes.tmux import TmuxRuntime
from remotedl.agent.store import AgentError, Context
from remotedl.schema import OPS as schema_ops
from remotedl.schema import JobRecord, SchemaError, StartRequest, encode_mark, parse_mark

AGENT = Path(__file__).resolve().parent.parent / "remotedl" / "agent"


@pytest.fixture
def box_state(tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path / "state"))
    store.ensure_dirs()
    return tmp_path / "state"


def gpu(index: int, used: int = 0, procs: tuple[int, ...] = ()) -> gpumod.Gpu:
    g = gpumod.Gpu(index, "NVIDIA H100", f"GPU-{index}", f"0000:{index:02x}:00.0", used, 81559, 0)
    g.processes = [gpumod.GpuProcess(g.uuid, pid, "/usr/bin/python3", 500, "alice") for pid in procs]
    return g


def record(job_id: int, status: str = "succeeded", **fields) -> dict:
    req = StartRequest(command="python train.py", name=fields.pop("name", None))
    rec = store.new_record(req, {}, job_id, "/home/u/proj", isolate=False, commit=None)
    rec.update(status=status, **fields)
    return rec


# ------------------------------------------------------------------ GPU choice


def test_gpu_choice_takes_the_least_used_free_gpus():
    gpus = [gpu(0, used=900), gpu(1, used=10), gpu(2, used=500), gpu(3)]
    held = [record(1, "running", gpus=[3])]
    assert place({"count": 2}, gpus, held) == [1, 2]
    assert place({"gpus": "auto"}, gpus, held) == [1]
    assert place({"gpus": "none"}, gpus, held) == []


def test_gpu_choice_refuses_what_can_never_be_and_waits_only_when_asked():
    gpus = [gpu(0), gpu(1, procs=(4242,))]
    with pytest.raises(AgentError, match="GPU 7 does not exist") as e:
        place({"gpus": [7]}, gpus, [])
    assert e.value.kind == "usage"
    with pytest.raises(AgentError, match="asks for more GPUs than this box has"):
        place({"count": 3}, gpus, [])
    # GPU 1 runs someone else's process: busy, or a wait with --queue, or shared with --force.
    busy = r"GPU 1 is used by process 4242 \(python3, user alice, 500 MiB\)"
    with pytest.raises(AgentError, match=busy) as e:
        place({"gpus": [1]}, gpus, [])
    assert e.value.kind == "busy"
    assert place({"gpus": [1], "queue": True}, gpus, []) is None
    assert place({"gpus": [1], "force": True}, gpus, []) == [1]
    with pytest.raises(AgentError, match=r"no 2 free GPUs on this box \(GPU 1: process 4242"):
        place({"count": 2}, gpus, [])


def test_a_starting_job_holds_its_gpus_and_a_cpu_box_runs_on_the_cpu():
    gpus = [gpu(0), gpu(1)]
    assert place({"count": 1}, gpus, [record(5, "starting", gpus=[0])]) == [1]
    assert place({"count": 1}, gpus, [record(5, "queued", gpus=[0])]) == [0]  # queued holds nothing
    assert place({}, None, []) == []
    with pytest.raises(AgentError, match="has no NVIDIA GPU"):
        place({"gpus": [0]}, None, [])


# ------------------------------------------------------------------ queue order


def test_queue_is_first_in_first_out_per_gpu():
    earlier_gpu0 = record(3, "queued", want={"gpus": [0]})
    earlier_cpu = record(4, "queued", want={"gpus": "none"})
    mine = record(5, "queued", want={"gpus": [1]})
    assert not blocked_by_earlier(mine, [earlier_gpu0, earlier_cpu])  # wants another GPU
    assert blocked_by_earlier(record(6, "queued", want={"gpus": [0]}), [earlier_gpu0])
    assert blocked_by_earlier(record(6, "queued", want={"gpus": "auto"}), [earlier_gpu0])  # any GPU
    assert not blocked_by_earlier(record(2, "queued", want={"gpus": [0]}), [earlier_gpu0])  # it is later
    assert not blocked_by_earlier(record(6, "queued", want={"gpus": [0]}), [record(3, "running", gpus=[0])])


# ------------------------------------------------------------------ ids


def test_ids_count_up_and_skip_whatever_holds_a_number(box_state, tmp_path):
    job_dirs = tmp_path / "proj" / ".remotedl" / "jobs"
    job_dirs.mkdir(parents=True)
    with store.box_lock():
        assert [store.next_id(job_dirs) for _ in range(3)] == [1, 2, 3]
        (store.logs_dir() / "4.log").write_text("")  # a log whose record is gone
        (job_dirs / "5").mkdir()  # a checkout another state dir made
        store.env_path(6).write_text("{}")
        assert store.next_id(job_dirs) == 7
        assert (box_state / "next_id").read_text() == "8"


def test_a_lost_or_damaged_counter_is_rebuilt_past_every_id_there_is(box_state):
    (store.logs_dir() / "41.log").write_text("")
    store.record_path(12).write_text("{}")
    with store.box_lock():
        assert store.next_id(None) == 42  # no counter: past everything there is
        (box_state / "next_id").write_text("garbage")
        assert store.next_id(None) == 42  # 42 holds nothing yet: its record comes with its start
        store.record_path(42).write_text("{}")
        (box_state / "next_id").write_text("-3")
        assert store.next_id(None) == 43


def test_a_new_id_reads_no_record(box_state, monkeypatch):
    with store.box_lock():
        for _ in range(50):
            store.save(record(store.next_id(None)))
    assert state.active(Context()) == []  # the index is built from the records the first time
    reads = []
    original = Path.read_text

    def counting(self, *a, **k):
        if self.parent == store.jobs_dir():
            reads.append(self.name)
        return original(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", counting)
    with store.box_lock():
        assert store.next_id(None) == 51
    assert state.active(Context()) == []
    assert reads == []


# ------------------------------------------------------------------ the index of active jobs


def test_the_active_index_follows_saves_and_is_built_once_from_old_records(box_state):
    for i, status in enumerate(["succeeded", "running", "queued", "lost", "starting"], start=1):
        store._write_json(store.record_path(i), record(i, status))  # as an older agent left them
    (box_state / "next_id").write_text("6")
    assert store.active_ids() == [2, 3, 5]  # built from the records
    with store.box_lock():
        rec = store.load(2)
        rec["status"] = "failed"
        store.save(rec)
        store.save(record(store.next_id(None), "queued"))
    assert store.active_ids() == [3, 5, 6]
    assert [r["id"] for r in store.active_records()] == [3, 5, 6]


def test_a_follower_sees_the_end_as_soon_as_the_record_is_saved(box_state):
    # A follower looked at its job only when a periodic look was due (after 0.5 s without
    # output): a short job's end waited for it. It looks as soon as the record is saved too:
    # here the periodic looks never come, and the end is seen from the saved record alone.
    holder = subprocess.Popen(["sleep", "600"], start_new_session=True)  # the job's processes
    try:
        log = box_state / "1.log"
        log.write_bytes(b"hi\n")
        with store.box_lock():
            store.save(record(1, "running", pid=holder.pid, pgid=holder.pid, log=str(log)))
        never_due = (
            "import sys; from remotedl.agent.runtimes import base; base.LogFollow.due = lambda *a: False; "
            "from remotedl.agent.ops import main; sys.exit(main(sys.argv[1:]))"
        )
        request = json.dumps({"op": "logs", "job": 1, "follow": True})
        follower = subprocess.Popen(
            [sys.executable, "-c", never_due, request], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert follower.stderr is not None and follower.stdout is not None
        assert parse_mark(follower.stderr.readline().decode())[0] == "start"
        assert follower.stdout.readline() == b"hi\n"  # it follows, past the log's end
        store.update(1, status="succeeded", exit_code=0, ended=time.time())
        try:
            rest, err = follower.communicate(timeout=30)
        finally:
            follower.kill()
            follower.wait()
        assert follower.returncode == 0 and rest == b""
        mark, value = parse_mark(err.decode().splitlines()[-1]) or ("", {})
        assert mark == "end" and value["job"]["status"] == "succeeded"
    finally:
        holder.kill()
        holder.wait()


def test_a_listing_of_all_splices_the_cached_text_of_ended_records_and_reads_the_rest(box_state):
    from remotedl.agent.listing import CACHE, Spliced, answer_text, listing

    for i, status in enumerate(["succeeded", "failed", "killed", "lost", "running"], start=1):
        store._write_json(store.record_path(i), record(i, status, name=f"job-{i}"))
    store.record_path(6).write_text("{not json")

    def listed() -> tuple[Spliced, list[dict], list[str]]:
        ctx = Context()
        got = listing(ctx)
        return got, json.loads(got.text()), ctx.warnings

    first, recs, warned = listed()
    assert [r["id"] for r in recs] == [1, 2, 3, 4, 5] and all(isinstance(x, dict) for x in first.items)
    assert any("6.json" in w for w in warned)
    cached = (box_state / CACHE).read_text().splitlines()
    assert [int(line.split(" ", 1)[0]) for line in cached] == [1, 2, 3, 4]  # never an active one
    again, recs2, warned2 = listed()
    assert recs2 == recs  # the same answer, from the cache
    assert [type(x).__name__ for x in again.items] == ["str", "str", "str", "str", "dict"]
    assert again.records() == [recs[4]]  # only the active one is there to be refreshed
    assert any("6.json" in w for w in warned2)  # a damaged record is said every time
    # A record saved since is read again; a removed one is gone, from the answer and the cache.
    with store.box_lock():
        store.save(dict(store.load(2), name="renamed"))
    store.record_path(3).unlink()
    _, recs3, _ = listed()
    assert [(r["id"], r["name"]) for r in recs3] == [(1, "job-1"), (2, "renamed"), (4, "job-4"), (5, "job-5")]
    assert [int(line.split(" ", 1)[0]) for line in (box_state / CACHE).read_text().splitlines()] == [1, 2, 4]
    # A damaged cache is only slower: rebuilt.
    (box_state / CACHE).write_text("garbage\n1 2 3\tnot json\n\x00\n")
    _, recs4, _ = listed()
    assert recs4 == recs3
    # The answer with a spliced list is the answer with a plain one.
    answer = {"ok": True, "jobs": listing(Context()), "warnings": ["w"]}
    assert json.loads(answer_text(answer)) == {"ok": True, "jobs": recs3, "warnings": ["w"]}
    assert answer_text({"ok": True, "jobs": []}) == json.dumps({"ok": True, "jobs": []})


def test_the_active_index_catches_up_with_jobs_of_an_agent_that_keeps_none(box_state):
    with store.box_lock():
        store.save(record(store.next_id(None), "running"))
    assert store.active_ids() == [1]
    # Another agent version allocates ids 2 and 3 and saves their records without the index...
    store._write_json(store.record_path(2), record(2, "running"))
    store._write_json(store.record_path(3), record(3, "succeeded"))
    (box_state / "next_id").write_text("4")
    # ...and ends job 1 without taking it out.
    ended = dict(store.load(1), status="failed")
    store._write_json(store.record_path(1), ended)
    assert [r["id"] for r in store.active_records()] == [2]
    assert store.active_ids() == [2]  # the stale marker is gone


# ------------------------------------------------------------------ state


def test_a_box_job_with_nothing_alive_is_lost_or_killed_and_its_news_told(box_state):
    dead = 2**22 + 12345  # no such pid
    gone = record(1, "running", runner_pid=dead, pgid=dead, scheduler="box")
    asked = record(2, "running", runner_pid=dead, pgid=dead)
    store.notify_path(1).write_text("{}")
    store.kill_marker(2).touch()
    live = record(3, "running", runner_pid=os.getpid(), pgid=os.getpgid(0))
    with store.box_lock():
        for r in (gone, asked, live):
            store.save(r)
    ctx = Context()
    out = state.refresh(ctx, [store.load(1), store.load(2), store.load(3)])
    assert [r["status"] for r in out] == ["lost", "killed", "running"]
    assert "vanished" in out[0]["error"] and out[0]["ended"]
    assert ctx.news == [(1, "lost")]  # job 2 has no notifications to send
    assert store.active_ids() == [3]


def test_a_look_starts_no_process_and_the_op_sends_what_it_found(box_state, monkeypatch):
    # A read (state.refresh) records what it finds and leaves the sending to the op: news in
    # the context, and no process started (the notification sender, the Slurm watcher).
    dead = 2**22 + 12345
    box_job = record(1, "running", runner_pid=dead, pgid=dead)
    slurm_job = record(2, "queued", scheduler="slurm", slurm_id=None, starter_pid=dead, stall_after=60.0)
    with store.box_lock():
        for r in (box_job, slurm_job):
            store.save(r)
            store.notify_path(int(r["id"])).write_text("{}")
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("a process"))
    ctx = Context()
    looked = state.active(ctx)
    assert looked == [] and started == []
    assert ctx.news == [(1, "lost"), (2, "lost")]
    spawned = []
    from remotedl.agent import events

    monkeypatch.setattr(events, "detached", spawned.append)
    events.announce(ctx, looked)
    assert spawned == [{"op": "notify", "id": 1, "event": "lost"}, {"op": "notify", "id": 2, "event": "lost"}]
    assert ctx.news == []


def test_a_rebooted_box_loses_its_jobs_and_a_start_in_progress_is_not_lost(box_state):
    rebooted = record(1, "running", runner_pid=os.getpid(), boot_id="another-boot")
    starting = record(2, "starting", starter_pid=os.getpid(), created=time.time())
    rt = TmuxRuntime()
    gone = rt.gone([rebooted, starting])
    assert [r["id"] for r in gone] == ([1] if Path("/proc/sys/kernel/random/boot_id").exists() else [])


def test_a_slurm_job_takes_slurms_word_and_a_dead_submission_is_lost():
    from remotedl.slurm import SlurmJob

    rec = record(4, "queued", scheduler="slurm", slurm_id="77", slurm_state="PENDING")
    running = SlurmJob("77", "RUNNING", nodes="node1", start="2026-11-23T11:06:23")
    changes = slurm_changes(rec, running)
    assert changes["status"] == "running" and changes["node"] == "node1" and changes["started"] > 0
    failed = SlurmJob("77", "FAILED", exit_code=3, end="2026-11-23T12:00:00")
    assert slurm_changes(rec, failed)["exit_code"] == 3
    unsubmitted = record(5, "queued", scheduler="slurm", slurm_id=None, starter_pid=2**22 + 1)
    assert SlurmRuntime().gone([unsubmitted, rec]) == [unsubmitted]


def test_the_runtime_is_chosen_once_by_the_records_kind():
    assert isinstance(runtimes.of(record(1)), TmuxRuntime)  # older records have no scheduler
    assert isinstance(runtimes.of(record(1, scheduler="slurm")), SlurmRuntime)
    assert isinstance(runtimes.for_request(StartRequest(command="x", scheduler="slurm")), SlurmRuntime)
    assert isinstance(runtimes.for_request(StartRequest(command="x")), TmuxRuntime)
    tmux_job = record(1, "running", session="remotedl-1")
    assert runtimes.of(tmux_job).attach(tmux_job) == "exec tmux attach-session -t =remotedl-1"
    slurm_job = record(2, "running", scheduler="slurm", slurm_id="881")
    assert "srun --jobid=881 --overlap --pty" in runtimes.of(slurm_job).attach(slurm_job)
    with pytest.raises(AgentError, match="no allocation to attach to yet"):
        runtimes.of(slurm_job).attach(dict(slurm_job, status="queued"))


def test_resolve_reads_from_the_newest_by_name_and_project(box_state):
    with store.box_lock():
        store.save(record(1, name="train"))
        store.save(dict(record(2, name="train"), remote_dir="/elsewhere", cwd="/elsewhere"))
        store.save(record(3, name="eval"))
    ctx = Context()
    assert state.resolve(ctx, "train", "/home/u/proj")["id"] == 1  # this project's first
    assert state.resolve(ctx, "train", "/nowhere")["id"] == 2  # else the latest of that name
    assert state.resolve(ctx, None, "/home/u/proj")["id"] == 3
    assert state.resolve(ctx, "2")["id"] == 2
    with pytest.raises(AgentError, match=r"no job of this project .* is running"):
        state.resolve(ctx, None, "/home/u/proj", active_only=True)
    with pytest.raises(AgentError, match="no job called 'nope'"):
        state.resolve(ctx, "nope")


def test_damaged_records_are_skipped_with_a_warning_in_the_context(box_state):
    with store.box_lock():
        store.save(record(1))
    store.record_path(2).write_text('{"id": 2, "na')
    store.record_path(3).write_text(json.dumps(dict(record(3), id=9)))
    ctx = Context()
    assert [r["id"] for r in store.all_records(ctx)] == [1]
    assert any("record" in w and "2.json (not JSON" in w for w in ctx.warnings)
    assert any("3.json: it names job 9" in w for w in ctx.warnings)
    with pytest.raises(AgentError, match="the record of job 2 is damaged"):
        store.load(2)


# ------------------------------------------------------------------ round trips


def test_a_new_record_round_trips_through_the_schema():
    req = StartRequest(
        command="python train.py --lr 3e-4",
        name="lr",
        env={"WANDB_API_KEY": "secret"},
        git_head="b" * 40,
        snapshot=True,
        snapshot_files=["a.py"],
    )
    rec = store.new_record(req, {"conda": "ml"}, 12, "/home/u/proj", isolate=True, commit="a" * 40)
    rec.update(status="starting", gpus=[0, 1], stall_after=store.stall_after("600"))
    parsed = JobRecord.from_dict(json.loads(json.dumps(rec)))
    assert parsed.to_dict()["env_keys"] == ["WANDB_API_KEY"]  # the names, never the values
    assert "secret" not in json.dumps(rec)
    assert JobRecord.from_dict(parsed.to_dict()) == parsed
    assert (parsed.git_commit, parsed.environment, parsed.stall_after) == ("a" * 40, {"conda": "ml"}, 600.0)
    assert store.stall_after("0") is None and store.stall_after("x") is None
    # json_dict is to_dict of from_dict without the record: the same data, the same order,
    # defaults for what an older record lacks (fresh lists), unknown fields left out.
    old = {"id": 3, "name": "x", "command": "c", "cwd": "/", "status": "failed", "exit_code": 1, "extra": 1}
    for data in (rec, old):
        got = JobRecord.json_dict(json.loads(json.dumps(data)))
        want = JobRecord.from_dict(json.loads(json.dumps(data))).to_dict()
        assert got == want and list(got) == list(want)
    first, second = JobRecord.json_dict(old), JobRecord.json_dict(old)
    assert first["gpus"] == [] and first["gpus"] is not second["gpus"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gpus": "0"}, "job record field 'gpus': expected a list"),
        ({"status": "done"}, "'done' is not one of queued"),
        ({"exit_code": True}, "job record field 'exit_code': unexpected bool"),
        ({"environment": {1: 2}}, "job record field 'environment': expected an object"),
    ],
)
def test_the_record_checker_names_the_bad_field(change, message):
    rec = record(1)
    rec.update(change)
    with pytest.raises(SchemaError, match=message):
        JobRecord.from_dict(rec)
    with pytest.raises(SchemaError, match=message):
        JobRecord.json_dict(rec)


def test_a_shape_seen_before_still_has_its_values_checked():
    # The checker plans once per shape (keys and value types): a record of a known shape
    # whose list holds something else, whose status is another word, or whose object has
    # other keys is refused all the same; an int where a float goes becomes a float.
    good = record(1)
    good.update(gpus=[0], want={"gpus": "0"}, stalled=None, created=1.5)
    for data in (good, dict(good, gpus=[]), dict(good, want={})):
        assert JobRecord.json_dict(data)["gpus"] == data["gpus"]
    for change, message in (
        ({"gpus": ["0"]}, "field 'gpus': expected an integer"),
        ({"gpus": [True]}, "field 'gpus': expected an integer"),
        ({"status": "done"}, "'done' is not one of queued"),
        ({"want": {1: "0"}}, "field 'want': expected an object"),
        ({"env_keys": [3]}, "field 'env_keys': expected str"),
    ):
        for check in (JobRecord.json_dict, JobRecord.check_dict, JobRecord.from_dict):
            with pytest.raises(SchemaError, match=message):
                check(dict(good, **change))
    as_int = dict(good, created=2)
    assert JobRecord.json_dict(as_int)["created"] == 2.0
    assert type(JobRecord.json_dict(as_int)["created"]) is float
    assert type(JobRecord.check_dict(as_int)["created"]) is float
    assert JobRecord.json_dict(dict(good, stalled={"since": 1}))["stalled"] == {"since": 1}
    without = {k: v for k, v in good.items() if k != "status"}
    with pytest.raises(SchemaError, match="job record without 'status'"):
        JobRecord.json_dict(without)


def test_requests_round_trip_and_the_box_checks_them_like_records(tmp_path):
    from remotedl.schema import REQUESTS, LogsRequest, StartRequest, check_request

    start = StartRequest(command="python train.py", gpus=[0, 1], env={"TOKEN": "s3cret"}, stall_after=60)
    data = json.loads(json.dumps(start.to_dict()))
    assert check_request(data) is data and StartRequest(**StartRequest.check_dict(data)) == start
    assert LogsRequest(job=3, follow=True).to_dict()["op"] == "logs"
    for op, cls in REQUESTS.items():
        required = {"command": "x"} if op == "start" else {"id": 1} if op in ("runner", "notify") else {}
        assert check_request(cls(**required).to_dict())["op"] == op
    with pytest.raises(SchemaError, match="request field 'gpus': unexpected dict"):
        check_request({"op": "start", "command": "x", "gpus": {"a": 1}})
    with pytest.raises(SchemaError, match="request without 'command'"):
        check_request({"op": "start"})
    # The agent answers a malformed request with the field, never the values.
    from remotedl.agent.client import build_agent

    zipfile.ZipFile(io.BytesIO(build_agent().zip_bytes())).extractall(tmp_path / "agent")
    bad = {"op": "start", "command": "x", "env": {"TOKEN": "s3cret"}, "grace": 1, "count": "two"}
    r = subprocess.run(
        [sys.executable, "-E", "-s", "-S", str(tmp_path / "agent")],
        input=json.dumps(bad).encode(),
        capture_output=True,
        env={**os.environ, "REMOTEDL_BOX_STATE": str(tmp_path / "state")},
        check=False,
    )
    answer = json.loads(r.stdout)
    assert r.returncode == 2 and answer["kind"] == "protocol"
    assert "field 'count'" in answer["error"] and "s3cret" not in r.stdout.decode()


def test_any_request_carries_adopt_and_the_client_fills_it_in():
    """``adopt`` (the default remote_dir's older, folder-named tree: remotedl.treeid) goes with
    every kind of request, checked like the other fields; the client adds its own to a request
    that has none, and leaves one that has its own alone."""
    from remotedl.agent.client import AgentClient
    from remotedl.schema import GetRequest, ListRequest, check_request
    from remotedl.ssh.resolve import HostSpec

    spec = HostSpec("b", "127.0.0.1", "u", 22, (), (), "yes", 5.0, None, None, None)

    adopt = {"dir": "~/remotedl/proj-0123", "id": "0123", "legacy": "proj"}
    assert check_request(ListRequest(adopt=adopt).to_dict())["adopt"] == adopt
    with pytest.raises(SchemaError, match="request field 'adopt': unexpected str"):
        check_request({"op": "list", "adopt": "proj"})
    client = AgentClient(spec, adopt=adopt)
    assert json.loads(client._body(GetRequest(job=1).to_dict()))["adopt"] == adopt
    own = {**adopt, "legacy": "other"}
    assert json.loads(client._body(ListRequest(adopt=own).to_dict()))["adopt"] == own
    plain = AgentClient(spec)
    assert json.loads(plain._body(ListRequest().to_dict()))["adopt"] is None


def test_a_box_jobs_umask_and_mark_are_typed_record_fields():
    rec = record(1)
    rec.update(umask=0o022, mark="ab" * 8, main_exit=3, leftovers=2, status="running")
    parsed = JobRecord.from_dict(rec)
    assert (parsed.umask, parsed.mark) == (0o022, "ab" * 8)
    assert parsed.state == "running (main process exited 3, 2 processes left)"
    with pytest.raises(SchemaError, match="job record field 'umask'"):
        JobRecord.from_dict({**rec, "umask": "022"})


def test_stream_marks_round_trip_and_other_lines_are_not_marks():
    line = encode_mark("state", {"job": 3, "state": "PENDING (Resources)"})
    assert line == '@@remotedl-state {"job": 3, "state": "PENDING (Resources)"}\n'
    assert parse_mark(line.rstrip("\n")) == ("state", {"job": 3, "state": "PENDING (Resources)"})
    assert parse_mark("@@remotedl-end []") is None  # not an object
    assert parse_mark("@@remotedl-bogus {}") is None
    assert parse_mark("remotedl: job 3 queued") is None


def test_every_op_the_agent_answers_is_in_the_schema():
    from remotedl.agent.ops import OPS

    assert set(OPS) == set(schema_ops)


def test_handlers_get_the_typed_request_of_their_op():
    """The dispatch hands each handler the request object of its op (fields as attributes, so a
    misspelt one is a mypy error), built from the checked JSON; unknown fields are dropped."""
    from remotedl.agent.ops import OPS, read_request
    from remotedl.schema import REQUESTS, KillRequest, LogsRequest, StartRequest, request_from_dict

    assert {op: h.kind for op, h in OPS.items()} == REQUESTS
    kill = read_request([json.dumps({"op": "kill", "job": "train", "grace": 2, "newer_field": 1})])
    assert kill == KillRequest(job="train", grace=2.0)
    assert not hasattr(kill, "newer_field")
    logs = read_request([json.dumps(LogsRequest(job=3, follow=True, lines=20).to_dict())])
    assert isinstance(logs, LogsRequest)
    assert (logs.job, logs.follow, logs.lines, logs.offset) == (3, True, 20, 0)
    start = StartRequest(command="python train.py", gpus=[0, 1], env={"K": "v"}, adopt={"dir": "d"})
    assert request_from_dict(json.loads(json.dumps(start.to_dict()))) == start  # the wire, both ways
    for bad in ({"op": "nope"}, ["op", "kill"], {"op": "start"}, {"op": "kill", "grace": "soon"}):
        with pytest.raises(SchemaError):
            read_request([json.dumps(bad)])


# ------------------------------------------------------------------ the bundle and the import graph


def test_the_bundle_carries_the_whole_package_and_answers_from_a_zip(tmp_path):
    from remotedl.agent.client import build_agent

    agent = build_agent()
    names = [arc for arc, _ in agent.files]
    assert "remotedl/agent/runtimes/tmux.py" in names and "remotedl/agent/store.py" in names
    assert "remotedl/agent/client.py" not in names  # the laptop's side stays home
    zipfile.ZipFile(io.BytesIO(agent.zip_bytes())).extractall(tmp_path / "agent")
    env = {**os.environ, "REMOTEDL_BOX_STATE": str(tmp_path / "state")}
    r = subprocess.run(
        [sys.executable, "-E", "-s", "-S", str(tmp_path / "agent")],
        input=b'{"op": "list"}',
        capture_output=True,
        env=env,
        check=False,
    )
    assert json.loads(r.stdout) == {"ok": True, "jobs": []}, r.stderr
    # Every module of it imports with no site-packages at all: the standard library only.
    shipped = [arc for arc in names if arc.startswith("remotedl/")]
    modules = [arc[:-3].replace("/", ".").removesuffix(".__init__") for arc in shipped]
    code = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
    r = subprocess.run(
        [sys.executable, "-E", "-s", "-S", "-c", code, *modules],
        cwd=tmp_path / "agent",
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def agent_imports() -> dict[str, set[str]]:
    """Module -> the agent modules it imports (at any depth of the file: lazy imports count)."""
    graph: dict[str, set[str]] = {}
    for path in AGENT.rglob("*.py"):
        rel = path.relative_to(AGENT.parent.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("remotedl.agent"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("remotedl.agent"))
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_the_agent_package_has_no_import_circle():
    graph = agent_imports()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(m: str) -> None:
        if m in done:
            return
        assert m not in visiting, " -> ".join([*visiting[visiting.index(m) :], m])
        visiting.append(m)
        for d in sorted(graph[m]):
            visit(d)
        visiting.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    # The cuts of the redesign: the store and the state never call the events; runtimes
    # never call the ops, the state or the events.
    assert "remotedl.agent.events" not in graph["remotedl.agent.store"] | graph["remotedl.agent.state"]
    for rt in ("remotedl.agent.runtimes.tmux", "remotedl.agent.runtimes.slurm"):
        assert not graph[rt] & {"remotedl.agent.events", "remotedl.agent.state", "remotedl.agent.ops"}


def _stand_in_tmux(bindir: Path, fail_times: int, message: str) -> Path:
    """A `tmux` that fails its first FAIL_TIMES calls as the real one does, then succeeds; each
    call's argv is a line of the returned file."""
    calls = bindir / "calls"
    tmux = bindir / "tmux"
    tmux.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{calls}"\n'
        f'n=$(wc -l < "{calls}")\n'
        f'if [ "$n" -le {fail_times} ]; then echo "{message}" >&2; exit 1; fi\n'
    )
    tmux.chmod(0o755)
    return calls


def test_a_tmux_server_that_exits_under_a_start_is_tried_again(tmp_path, monkeypatch):
    """The box user's last tmux session ends just as a job starts: the server the start reached
    exits under it ("server exited unexpectedly"). The start tries again (a new server), where
    it failed the job (seen in a full test run: one job ending as the next started)."""
    from remotedl.agent.runtimes import tmux as rt

    calls = _stand_in_tmux(tmp_path, 2, "server exited unexpectedly")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    rt._new_session("remotedl-7", "/tmp", ["sh", "-c", "true"])
    tries = calls.read_text().splitlines()
    assert len(tries) == 3 and all(t.startswith("new-session -d -s remotedl-7 ") for t in tries)


def test_other_tmux_errors_fail_the_start_at_once(tmp_path, monkeypatch):
    from remotedl.agent.runtimes import tmux as rt

    calls = _stand_in_tmux(tmp_path, 9, "duplicate session: remotedl-7")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(AgentError, match="tmux could not start the job: duplicate session: remotedl-7"):
        rt._new_session("remotedl-7", "/tmp", ["true"])
    assert len(calls.read_text().splitlines()) == 1
    calls.unlink()
    lasting = _stand_in_tmux(tmp_path, 99, "server exited unexpectedly")
    with pytest.raises(AgentError, match="server exited unexpectedly"):
        rt._new_session("remotedl-7", "/tmp", ["true"])
    assert len(lasting.read_text().splitlines()) == 5  # tried, not forever
