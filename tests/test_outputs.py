"""Outputs home, trackers and compare (issue 28): real jobs on the sshd box, real rsync, real
W&B (offline) and MLflow (file store) writing runs inside jobs, TensorBoard event files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remotedl import compare, outputs
from remotedl.errors import ConnectError, RemotedlError, UsageError
from remotedl.schema import JobRecord, StartRequest
from tests.conftest import make_env, retry_until

PY = sys.executable


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/outputs-tests/{tmp_path.name}"\noutputs = ["metrics.json", "runs/"]\n'
    )
    return project


def script(proj: Path, name: str, body: str) -> Path:
    path = proj / name
    path.write_text(body)
    path.chmod(0o755)
    return path


def commit(proj: Path, message: str = "work") -> None:
    subprocess.run(["git", "-C", str(proj), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(proj), "commit", "-qm", message], check=True)


def job_id_of(r) -> int:
    assert r.code == 0, r.err
    return int(r.out.strip().splitlines()[-1])


def ledger(proj: Path) -> dict[str, outputs.Entry]:
    return outputs.Ledger(proj).read()


# A training script: metrics.json (final numbers and a loss curve) and TensorBoard scalars.
TRAIN = f"""#!{PY}
import json, os, sys, time
lr = float(sys.argv[sys.argv.index("--lr") + 1]) if "--lr" in sys.argv else 0.1
losses = [round(1.0 / (i + 1) + lr, 4) for i in range(5)]
json.dump({{"loss": losses, "eval": {{"acc": round(1 - lr, 3)}}}}, open("metrics.json", "w"))
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
os.makedirs("runs/exp", exist_ok=True)
w = EventFileWriter("runs/exp")
for step, v in enumerate(losses):
    s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="train/loss", simple_value=v)])
    w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=s))
w.close()
print("trained", lr)
"""


# ------------------------------------------------------------------ arriving


def test_outputs_of_a_detached_job_arrive_at_the_next_command(cli, box, proj):
    script(proj, "train.py", TRAIN)
    commit(proj)
    job = job_id_of(cli("run", "--detach", "train.py", "--lr", "0.2", "--cpu", cwd=proj))
    (entry,) = [e for e in ledger(proj).values() if e.job == job]
    assert entry.status == "waiting" and entry.paths == ["metrics.json", "runs/", "wandb/", "mlruns/"]
    dest = Path(entry.dest)
    assert dest == proj / ".remotedl" / "outputs" / f"{box.name}-{job}"

    said: list[str] = []

    def arrived() -> bool:
        r = cli("jobs", cwd=proj)  # any command that talks to the box
        assert r.code == 0, r.err
        said.append(r.err)
        return (dest / "metrics.json").exists()

    assert retry_until(arrived, seconds=60)
    assert f"outputs of job {job} (train.py) on {box.name}: " in said[-1]
    assert json.loads((dest / "metrics.json").read_text())["eval"]["acc"] == 0.8
    assert list((dest / "runs" / "exp").glob("events.out.tfevents.*"))
    assert ledger(proj)[f"{box.name}:{job}"].status == "home"
    # Once home, later commands fetch nothing and say nothing.
    r = cli("jobs", cwd=proj)
    assert "outputs of job" not in r.err
    # git and the snapshot never see them: the next push's code leaves .remotedl/ out.
    status = subprocess.run(["git", "-C", str(proj), "status", "--porcelain"], capture_output=True, text=True)
    assert ".remotedl" not in status.stdout
    (proj / ".remotedl" / ".gitignore").unlink()  # even unignored, .remotedl/ is never code
    (proj / "notes.py").write_text("x = 1\n")  # uncommitted work: a snapshot is made
    r = cli("push", "--json", cwd=proj)
    assert r.code == 0, r.err
    snap = json.loads(r.out)["commit"]
    tree = subprocess.run(
        ["git", "-C", str(proj), "ls-tree", "-r", "--name-only", snap], capture_output=True, text=True
    ).stdout.split()
    assert "notes.py" in tree and not [p for p in tree if p.startswith(".remotedl")]
    # `remotedl outputs` lists it.
    r = cli("outputs", cwd=proj)
    assert r.code == 0, r.err
    assert f"{box.name}:{job}" in r.out and "home" in r.out
    # TensorBoard here over what came home, no box needed.
    from remotedl.waiting import free_port
    from tests.test_tensorboard import get_json

    r = cli("tensorboard", "--local", "--background", "--json", "--local-port", str(free_port()), cwd=proj)
    assert r.code == 0, r.err
    served = json.loads(r.out)
    try:
        runs = get_json(served["url"] + "data/runs")
        assert f"{box.name}-{job}/runs/exp" in runs  # type: ignore[operator]
    finally:
        os.kill(served["pid"], 15)


def test_a_followed_job_brings_outputs_home_at_once_and_keeps_local_edits(cli, box, proj, tmp_path):
    (proj / "remotedl.toml").write_text(
        f'remote_dir = "~/outputs-tests/{tmp_path.name}"\noutputs = ["results/"]\noutputs_dir = "home"\n'
    )
    script(
        proj, "train.sh", "#!/bin/sh\nmkdir -p results\necho v1 > results/a.txt\necho v1 > results/b.txt\n"
    )
    commit(proj)
    r = cli("run", "--output", "extra.txt", "train.sh", "--cpu", cwd=proj)
    assert r.code == 0, r.err
    (entry,) = ledger(proj).values()
    dest = Path(entry.dest)
    assert dest == proj / "home" / f"{box.name}-{entry.job}"
    assert (dest / "results" / "a.txt").read_text() == "v1\n"
    assert "2 files" in r.err and "not on the box: extra.txt" in r.err
    # An outputs_dir in the work tree: what arrived there is pulled, not code.
    r = cli("push", "--json", cwd=proj)
    left = json.loads(r.out)["left_out"]
    assert {x["path"] for x in left if x["reason"] == "pulled"} >= {
        f"home/{dest.name}/results/a.txt",
        f"home/{dest.name}/results/b.txt",
    }
    # Changed here after the fetch: the box's newer version never replaces it, nothing is deleted.
    (dest / "results" / "a.txt").write_text("mine\n")
    box_dir = Path(entry.dir)
    (box_dir / "results" / "a.txt").write_text("v2\n")
    (box_dir / "results" / "b.txt").write_text("v2 longer\n")
    (box_dir / "results" / "c.txt").write_text("new\n")
    (dest / "results" / "local-only.txt").write_text("keep\n")
    r = cli("outputs", str(entry.job), cwd=proj)
    assert r.code == 0, r.err
    assert (dest / "results" / "a.txt").read_text() == "mine\n"
    assert (dest / "results" / "b.txt").read_text() == "v2 longer\n"
    assert (dest / "results" / "c.txt").read_text() == "new\n"
    assert (dest / "results" / "local-only.txt").read_text() == "keep\n"
    assert "kept results/a.txt here" in r.err


def test_a_cut_fetch_resumes_and_leaves_no_truncated_file(fresh_box, tmp_path):
    from tests.test_sync_safety import files_over, kill_connection, spec_of, write_random

    src = fresh_box.home / "cutout"
    write_random(src / "ckpt" / "model.bin", 128 << 20)
    (src / "small.txt").write_text("small\n")
    spec = spec_of(fresh_box, tmp_path)
    dest = tmp_path / "laptop-outputs" / "box-1"
    entry = outputs.Entry("b", 1, "train", str(src), ["ckpt/", "small.txt"], str(dest))
    outcome: list[object] = []

    def fetch() -> None:
        try:
            outcome.append(outputs.fetch(spec, entry))
        except RemotedlError as e:
            outcome.append(e)

    t = threading.Thread(target=fetch, daemon=True)
    t.start()
    assert retry_until(lambda: files_over(dest, 8 << 20, but=dest / "ckpt" / "model.bin"), seconds=60)
    kill_connection(fresh_box)
    t.join(60)
    assert outcome and isinstance(outcome[0], ConnectError), outcome
    assert not (dest / "ckpt" / "model.bin").exists()  # absent, not truncated
    partial = dest / "ckpt" / ".remotedl-partial" / "model.bin"
    assert retry_until(partial.exists, seconds=10)
    kept = partial.stat().st_size
    arrival = outputs.fetch(spec, entry)
    assert (dest / "ckpt" / "model.bin").read_bytes() == (src / "ckpt" / "model.bin").read_bytes()
    assert (dest / "small.txt").read_text() == "small\n"
    assert not partial.exists()
    assert entry.status == "home" and "ckpt/model.bin" in entry.files
    assert arrival.files >= 1
    # The resume sent what was missing, not the whole file again.
    assert arrival.sent <= (128 << 20) - kept + (1 << 20)
    # Incremental: a second fetch sends nothing.
    assert outputs.fetch(spec, entry).files == 0


# ------------------------------------------------------------------ trackers


WANDB_MLFLOW = f"""#!{PY}
import os, tempfile
print("env", os.environ["WANDB_NAME"], os.environ["WANDB_RUN_ID"], os.environ["MLFLOW_TRACKING_URI"])
os.chdir(tempfile.mkdtemp())  # a script that changes directory: its runs still land in the job's
import wandb
run = wandb.init(project="remotedl-test", mode="offline")
for i in range(3):
    run.log({{"loss": 1.0 / (i + 1)}})
run.finish()
import mlflow
with mlflow.start_run(run_name=os.environ["WANDB_NAME"]):
    mlflow.log_param("lr", 0.1)
    for i in range(3):
        mlflow.log_metric("val_loss", 0.5 / (i + 1), step=i)
    open("artifact.txt", "w").write("art")
    mlflow.log_artifact("artifact.txt")
print("done")
"""


def test_wandb_offline_and_mlflow_runs_come_home_per_job(cli, box, proj, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    script(proj, "track.py", WANDB_MLFLOW)
    commit(proj)
    fake = tmp_path / "fakebin"
    fake.mkdir()
    seen = tmp_path / "wandb-sync.txt"
    (fake / "wandb").write_text(f'#!/bin/sh\necho "$@" >> {seen}\n')
    (fake / "wandb").chmod(0o755)
    env = {"WANDB_SILENT": "true", "PATH": f"{fake}:{os.environ['PATH']}"}
    r = cli("run", "--name", "sweep-a", "track.py", "--cpu", cwd=proj, env=env)
    assert r.code == 0, r.err + r.out
    (entry,) = ledger(proj).values()
    # Set on the box, absolute, in the job's own directory (its checkout).
    assert entry.trackers_dir == entry.dir and entry.dir.endswith(f"/.remotedl/jobs/{entry.job}")
    assert f"env sweep-a {entry.wandb_run_id} {entry.dir}/mlruns\n" in r.out
    dest = Path(entry.dest)
    (run_dir,) = outputs.wandb_offline_runs(dest)
    assert run_dir.name.endswith("-" + str(entry.wandb_run_id))
    assert list(run_dir.glob("run-*.wandb"))
    assert "upload with: wandb sync" in r.err
    (artifact,) = dest.glob("mlruns/*/*/artifacts/artifact.txt")
    assert artifact.read_text() == "art"
    assert compare.metrics(dest)["val_loss"] == pytest.approx(0.5 / 3)
    # wandb_sync = true: the offline runs are synced from the laptop, once.
    with (proj / "remotedl.toml").open("a") as f:
        f.write("wandb_sync = true\n")
    r = cli("run", "--name", "sweep-b", "track.py", "--cpu", cwd=proj, env=env)
    assert r.code == 0, r.err
    synced = seen.read_text().split()
    assert synced[0] == "sync" and len(synced) == 2 and "offline-run-" in synced[1]
    assert "1 run of job" in r.err


# ------------------------------------------------------------------ compare


def test_compare_three_jobs_with_different_arguments(cli, box, proj, tmp_path):
    pytest.importorskip("matplotlib")
    script(proj, "train.py", TRAIN)
    commit(proj)
    ids = [job_id_of(cli("run", "--detach", "train.py", "--lr", "0.1", "--cpu", cwd=proj))]
    ids.append(
        job_id_of(cli("run", "--detach", "-e", "SEED=2", "train.py", "--lr", "0.2", "--cpu", cwd=proj))
    )
    (proj / "model.py").write_text("layers = 3\n")
    commit(proj, "deeper")
    ids.append(
        job_id_of(cli("run", "--detach", "-e", "SEED=3", "train.py", "--lr", "0.3", "--cpu", cwd=proj))
    )

    # Three waiting jobs: one listing asks about them all, never one request per job.
    r = cli("--debug", "outputs", cwd=proj)
    assert r.code == 0, r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err

    def home() -> bool:
        cli("outputs", cwd=proj)
        return all(ledger(proj)[f"{box.name}:{i}"].status == "home" for i in ids)

    assert retry_until(home, seconds=90)
    r = cli("compare", *map(str, ids), cwd=proj)
    assert r.code == 0, r.err
    rows = {
        line.split()[0]: line for line in r.out.splitlines() if line.split() and line.split()[0].isdigit()
    }
    assert "--lr 0.1" in rows[str(ids[0])] and "0.9" in rows[str(ids[0])]
    assert "--lr 0.3" in rows[str(ids[2])] and "SEED=3" in rows[str(ids[2])] and "0.7" in rows[str(ids[2])]
    assert f"code {ids[0]} -> {ids[2]}: 1 file changed" in r.out
    data = json.loads(cli("compare", *map(str, ids), "--json", cwd=proj).out)
    by = {j["job"]: j for j in data["jobs"]}
    assert by[str(ids[1])]["metrics"]["eval.acc"] == 0.8
    assert by[str(ids[1])]["metrics"]["train/loss"] == pytest.approx(0.2 + 1 / 5)
    assert by[str(ids[1])]["env"] == {"SEED": "2"}
    # A PNG plot, opened and checked.
    png = tmp_path / "loss.png"
    r = cli("compare", *map(str, ids), "--plot", "train/loss", "--out", str(png), cwd=proj)
    assert r.code == 0, r.err
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 450)
    # A terminal chart.
    r = cli("compare", *map(str, ids), "--plot", "loss", cwd=proj)
    assert r.code == 0, r.err
    assert f"* {ids[0]}  o {ids[1]}  + {ids[2]}" in r.out and r.out.count("*") >= 5 and "step" in r.out
    r = cli("compare", *map(str, ids), "--plot", "nope", cwd=proj)
    assert r.code == 1 and "no values of 'nope'" in r.err


# ------------------------------------------------------------------ units


def rec(job_id: int, status: str = "succeeded", **kw) -> JobRecord:
    ended = None if status in ("running", "queued", "starting") else 1.0
    return JobRecord(id=job_id, name="t", command="train.py", cwd="/w", status=status, ended=ended, **kw)  # type: ignore[arg-type]


def test_which_waiting_jobs_are_due_comes_from_the_records_seen():
    e = [outputs.Entry("b", i, "t", "/w", ["m"], "/d") for i in (1, 2, 3)]
    done, unknown = outputs.due(e, {1: rec(1), 2: rec(2, "running")})
    assert [x.job for x in done] == [1] and [x.job for x in unknown] == [3]
    seen = outputs.Seen()
    spec = type("S", (), {"alias": "b"})()
    seen.note(spec, {"jobs": [rec(5).to_dict(), {"bad": 1}], "job": rec(6, "failed").to_dict()})  # type: ignore[arg-type]
    assert sorted(seen.records["b"]) == [5, 6] and seen.hosts() == ["b"]


def test_output_paths_and_tracker_env():
    assert outputs.check_output_path("runs/") == "runs/"
    assert outputs.check_output_path("./a/../m.json") == "m.json"
    for bad in ("/etc/passwd", "../x", ".git/config", "."):
        with pytest.raises(UsageError):
            outputs.check_output_path(bad)
    assert outputs.kept_env({"LR": "0.1", "HF_TOKEN": "s", "API_KEY": "k"}) == {"LR": "0.1"}
    assert outputs.job_dest(Path("/o"), "gpu box", 7) == Path("/o/gpu_box-7")


def test_trackers_are_planned_on_the_box_in_the_jobs_own_directory(tmp_path):
    from remotedl.agent import trackers

    req = StartRequest(command="x", trackers=True, env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    got = trackers.planned(req, str(tmp_path), 7, "exp", isolate=False)
    where = str(tmp_path / ".remotedl" / "jobs" / "7")
    assert got["trackers_dir"] == where and os.path.isdir(where)  # a job in the work tree: its own
    planned = got["trackers"]
    assert (
        planned["WANDB_DIR"] == where and planned["WANDB_NAME"] == "exp" and len(planned["WANDB_RUN_ID"]) == 8
    )
    assert "MLFLOW_TRACKING_URI" not in planned and "MLFLOW_ALLOW_FILE_STORE" not in planned  # the user's
    alone = StartRequest(command="x", trackers=True)
    isolated = trackers.planned(alone, str(tmp_path), 8, "x", isolate=True)["trackers"]
    assert isolated["MLFLOW_TRACKING_URI"] == str(tmp_path / ".remotedl" / "jobs" / "8" / "mlruns")
    assert not (tmp_path / ".remotedl" / "jobs" / "8").exists()  # its checkout is made there later
    assert trackers.planned(StartRequest(command="x"), str(tmp_path), 9, "x", isolate=False) == {}
    # What the box's environment sets wins too.
    env = {"WANDB_NAME": "mine"}
    added = trackers.apply({"trackers": planned}, env)
    assert env["WANDB_NAME"] == "mine" and "WANDB_NAME" not in added and env["WANDB_DIR"] == where


def test_metrics_from_json_tensorboard_and_mlflow(tmp_path):
    from tests.test_tensorboard import write_scalars

    (tmp_path / "metrics.json").write_text(
        json.dumps({"loss": [3, 2, 1.5], "eval": {"acc": 0.5}, "note": "x"})
    )
    write_scalars(tmp_path / "runs" / "a", "val/loss", [0.9, 0.4])
    m = tmp_path / "mlruns" / "0" / "abc" / "metrics"
    m.mkdir(parents=True)
    (m / "f1").write_text("1 0.2 0\n2 0.3 1\n")
    got = compare.metrics(tmp_path)
    assert got == {"loss": 1.5, "eval.acc": 0.5, "val/loss": pytest.approx(0.4), "f1": 0.3}
    assert compare.series(tmp_path, "val/loss") == [(0.0, pytest.approx(0.9)), (1.0, pytest.approx(0.4))]
    assert compare.series(tmp_path, "loss") == [(0.0, 3.0), (1.0, 2.0), (2.0, 1.5)]


def test_fetch_without_a_box_fails_with_one_line(tmp_path):
    from remotedl.ssh import resolve_host

    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host nobox\n  HostName 127.0.0.1\n  Port 1\n  ConnectTimeout 2\n")
    spec = resolve_host(make_env(tmp_path), "nobox", ssh_config=str(cfg))
    entry = outputs.Entry("nobox", 1, "t", "/w", ["m"], str(tmp_path / "d"))
    with pytest.raises(RemotedlError) as e:
        outputs.fetch(spec, entry)
    assert e.value.exit_code == 4 and entry.status == "waiting"


def wait_ended(box, job: int, ends: tuple[str, ...] = ("succeeded", "failed")) -> None:
    """Until the job's record on the box says it ended one of these ways."""
    record = box.home / ".remotedl" / "jobs" / f"{job}.json"

    def ended() -> bool:
        try:
            return json.loads(record.read_text())["status"] in ends
        except (OSError, ValueError, KeyError):
            return False

    assert retry_until(ended, seconds=60)


def test_any_command_that_talks_to_the_box_brings_them_and_a_listing_asks_nothing_more(cli, box, proj):
    script(proj, "train.py", TRAIN)
    commit(proj)
    job = job_id_of(cli("run", "--detach", "train.py", "--cpu", cwd=proj))
    wait_ended(box, job, ("succeeded",))
    # push talks to the box without asking about jobs: one listing of the project's jobs.
    r = cli("--debug", "push", cwd=proj)
    assert r.code == 0, r.err
    assert f"outputs of job {job} (train.py)" in r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err
    dest = Path(ledger(proj)[f"{box.name}:{job}"].dest)
    assert (dest / "metrics.json").exists()
    # A listing carries the records: the job's end is known without another request.
    job = job_id_of(cli("run", "--detach", "train.py", "--cpu", cwd=proj))
    wait_ended(box, job, ("succeeded",))
    r = cli("--debug", "jobs", cwd=proj)
    assert r.code == 0, r.err
    assert f"outputs of job {job} (train.py)" in r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err
    # Not talking to the box (config): the ledger is read, nothing more.
    assert "outputs of job" not in cli("config", cwd=proj).err


def test_watch_fetches_while_the_job_runs_and_once_more_at_its_end(cli, box, proj, tmp_path):
    script(
        proj,
        "slow.sh",
        "#!/bin/sh\nmkdir -p out\necho one > out/step1.txt\n"
        "while [ ! -e go ]; do sleep 0.1; done\necho two > out/step2.txt\n",
    )
    commit(proj)
    job = job_id_of(cli("run", "--detach", "--output", "out/", "slow.sh", "--cpu", cwd=proj))
    entry = ledger(proj)[f"{box.name}:{job}"]
    dest = Path(entry.dest)
    done: list[object] = []
    t = threading.Thread(
        target=lambda: done.append(cli("outputs", str(job), "--watch", "--interval", "0.2", cwd=proj)),
        daemon=True,
    )
    t.start()
    try:
        # While it runs: what it wrote so far is here already, and the job is still waiting.
        assert retry_until((dest / "out" / "step1.txt").exists, seconds=60)
        assert ledger(proj)[entry.key].status == "waiting"
        assert not (dest / "out" / "step2.txt").exists()
    finally:
        (Path(entry.dir) / "go").write_text("")
    t.join(90)
    assert done, "outputs --watch did not return after the job ended"
    r = done[0]
    assert r.code == 0, r.err  # type: ignore[attr-defined]
    assert (dest / "out" / "step2.txt").read_text() == "two\n"
    assert ledger(proj)[entry.key].status == "home"


def test_removing_a_job_brings_its_outputs_home_first(cli, box, proj):
    script(proj, "train.py", TRAIN)
    commit(proj)
    job = job_id_of(cli("run", "--detach", "train.py", "--cpu", cwd=proj))
    wait_ended(box, job, ("succeeded",))
    r = cli("jobs", "rm", str(job), "--yes", cwd=proj)
    assert r.code == 0, r.err
    assert f"outputs of job {job} (train.py)" in r.err and f"removed job {job}" in r.out
    entry = ledger(proj)[f"{box.name}:{job}"]
    assert entry.status == "home" and (Path(entry.dest) / "metrics.json").exists()
    assert not Path(entry.dir).exists()


# ------------------------------------------------------------------ jobs from other clones


def test_a_job_started_from_another_clone_comes_home_at_the_next_command(cli, box, proj, tmp_path):
    script(proj, "train.py", TRAIN)
    commit(proj)
    other = tmp_path / "elsewhere-named"  # a clone under another folder name: the same project
    subprocess.run(["git", "clone", "-q", str(proj), str(other)], check=True)
    job = job_id_of(cli("run", "--detach", "train.py", "--lr", "0.3", "--cpu", cwd=other))
    assert f"{box.name}:{job}" in ledger(other) and f"{box.name}:{job}" not in ledger(proj)
    wait_ended(box, job)
    # The first clone's next command (push: no listing of its own) asks once, and it arrives.
    r = cli("--debug", "push", cwd=proj)
    assert r.code == 0, r.err
    assert f"outputs of job {job} (train.py)" in r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err
    entry = ledger(proj)[f"{box.name}:{job}"]
    assert entry.status == "home" and entry.paths == ["metrics.json", "runs/", "wandb/", "mlruns/"]
    assert json.loads((Path(entry.dest) / "metrics.json").read_text())["eval"]["acc"] == 0.7
    # Fetched once: the next command brings nothing again.
    r = cli("push", cwd=proj)
    assert r.code == 0 and "outputs of job" not in r.err, r.err
    # A listing the command made anyway carries the other clone's job: no request more.
    job = job_id_of(cli("run", "--detach", "train.py", "--cpu", cwd=other))
    wait_ended(box, job)
    r = cli("--debug", "jobs", cwd=proj)
    assert r.code == 0, r.err
    assert f"outputs of job {job} (train.py)" in r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err
    # `remotedl outputs` asks each box in one listing, never one job at a time.
    r = cli("--debug", "outputs", cwd=other)
    assert r.code == 0, r.err
    assert r.err.count("agent request: op=list") == 1 and "op=get" not in r.err
    assert all(e.status == "home" for e in ledger(other).values())
    # Removed from the first clone before anything fetched it: its outputs come home first.
    job = job_id_of(cli("run", "--detach", "train.py", "--cpu", cwd=other))
    wait_ended(box, job)
    r = cli("jobs", "rm", str(job), "--yes", cwd=proj)
    assert r.code == 0, r.err
    assert r.err.index(f"outputs of job {job}") < len(r.err) and f"removed job {job}" in r.out
    assert (Path(ledger(proj)[f"{box.name}:{job}"].dest) / "metrics.json").exists()


# A job that changes directory, in the work tree itself (isolate = false): its trackers'
# variables still point into a directory of its own.
TRACKER_FILES = f"""#!{PY}
import os, sys, tempfile
os.chdir(tempfile.mkdtemp())
w = os.path.join(os.environ["WANDB_DIR"], "wandb")
os.makedirs(w, exist_ok=True)
open(os.path.join(w, "run.txt"), "w").write(os.environ["REMOTEDL_JOB_ID"])
m = os.environ["MLFLOW_TRACKING_URI"]
os.makedirs(m, exist_ok=True)
open(os.path.join(m, "store.txt"), "w").write(os.environ["REMOTEDL_JOB_ID"])
print("uri", m, os.environ.get("WANDB_NAME"))
"""


def test_jobs_in_the_work_tree_get_a_tracker_directory_each(cli, box, proj):
    with (proj / "remotedl.toml").open("a") as f:
        f.write("isolate = false\n")
    script(proj, "track.py", TRACKER_FILES)
    commit(proj)
    ids = [job_id_of(cli("run", "--detach", "track.py", "--cpu", cwd=proj)) for _ in range(2)]
    ids.append(job_id_of(cli("run", "--detach", "-e", "WANDB_NAME=mine", "track.py", "--cpu", cwd=proj)))
    for job in ids:
        wait_ended(box, job)
    r = cli("outputs", cwd=proj)
    assert r.code == 0, r.err
    for job in ids:
        entry = ledger(proj)[f"{box.name}:{job}"]
        assert entry.status == "home"
        assert entry.trackers_dir and entry.trackers_dir.endswith(f"/.remotedl/jobs/{job}")
        assert entry.dir != entry.trackers_dir  # the work tree: shared by both jobs
        dest = Path(entry.dest)
        assert (dest / "wandb" / "run.txt").read_text() == str(job)
        assert (dest / "mlruns" / "store.txt").read_text() == str(job)
    log = cli("logs", str(ids[2]), cwd=proj).out
    assert log.strip().endswith(" mine")  # --env wins over what the box sets
    # Its directory goes with the job (`jobs rm`), and only its own.
    first, second = (Path(ledger(proj)[f"{box.name}:{j}"].trackers_dir or "") for j in ids[:2])
    assert first.is_dir() and second.is_dir()  # the box is this machine
    r = cli("jobs", "rm", str(ids[0]), "--yes", cwd=proj)
    assert r.code == 0, r.err
    assert not first.exists() and second.is_dir()


def test_the_box_lists_a_projects_jobs_with_outputs_since_the_last_listing(tmp_path, monkeypatch):
    import time

    from remotedl.agent import ops, store

    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path / "state"))
    store.ensure_dirs()
    proj_dir = str(tmp_path / "proj")

    def save(job_id: int, rdir: str, outs: list[str], status: str = "succeeded", **fields) -> None:
        req = StartRequest(command="python train.py", outputs=outs)
        rec = store.new_record(req, {}, job_id, rdir, isolate=False, commit=None)
        rec.update(status=status, **fields)
        store.save(rec)

    save(1, proj_dir, ["metrics.json"])
    save(2, str(tmp_path / "other"), ["metrics.json"])  # another project's
    save(3, proj_dir, [])  # no outputs
    # Being started (its starter is alive): active.
    save(4, proj_dir, ["m"], "starting", starter_pid=os.getpid(), runner_pid=None, created=time.time())
    save(5, proj_dir, ["m"])

    def listed(ids: list[int], after: int) -> tuple[list[int], int]:
        records, upto = ops.with_outputs(store.Context(), proj_dir, ids, after)
        return sorted(int(r["id"]) for r in records), upto

    assert listed([], 0) == ([1, 4, 5], 3)  # up to 3 all ended; 4 still runs
    assert listed([], 3) == ([4, 5], 3)
    save(4, proj_dir, ["m"])  # it ended
    assert listed([], 3) == ([4, 5], 5)
    assert listed([], 5) == ([], 5)  # nothing new: no record read
    assert listed([2, 9], 5) == ([2], 5)  # asked by id: any job the box has
