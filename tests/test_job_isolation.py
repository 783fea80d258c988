"""Every job runs exactly the code it was started with (its own checkout), against the real sshd
box: two laptops at once, pushes and runs during a running job, data and shared directories,
pull from jobs, rm/prune, show/diff, and scoping by project."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_for, commit_all, git, retry_until


def write_script(repo: Path, name: str, body: str) -> None:
    path = repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


# Prints what it sees at its start, waits for $GO, prints it again with its checkout's commit.
WAITER = (
    'echo "start $(cat version.txt)"\n'
    'while [ ! -e "$GO" ]; do sleep 0.05; done\n'
    'echo "end $(cat version.txt) $(git rev-parse HEAD)"\n'
)


def jobs_of(run, cwd: Path) -> dict[int, dict]:
    r = run("jobs", "--all", "--json", cwd=cwd)
    assert r.code == 0, r.err
    return {j["id"]: j for j in json.loads(r.out)}


def wait_ended(run, cwd: Path, *ids: int, seconds: float = 30) -> dict[int, dict]:
    def ended():
        jl = jobs_of(run, cwd)
        return jl if all(jl[i]["status"] not in ("queued", "starting", "running") for i in ids) else None

    jl = retry_until(ended, seconds=seconds)
    assert jl, jobs_of(run, cwd)
    return jl


def log_of(run, cwd: Path, job_id: int) -> str:
    r = run("logs", str(job_id), cwd=cwd)
    assert r.code == 0, r.err
    return r.out


@pytest.fixture
def origin(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(f'remote_dir = "~/iso/{tmp_path.name}"\n')
    (project / "version.txt").write_text("origin\n")
    write_script(project, "job.sh", WAITER)
    commit_all(project, "job")
    return project


def clone(origin: Path, dest: Path, version: str) -> tuple[Path, str]:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True)
    git(dest, "config", "user.email", "t@example.invalid")
    git(dest, "config", "user.name", "Test")
    (dest / "version.txt").write_text(version + "\n")
    return dest, commit_all(dest, version)


def test_two_laptops_run_their_own_commit_at_once(box, origin, tmp_path):
    a, commit_a = clone(origin, tmp_path / "a" / "proj", "from-laptop-a")
    b, commit_b = clone(origin, tmp_path / "b" / "proj", "from-laptop-b")
    run_a = cli_for(box, tmp_path / "laptop-a")  # two laptops: own config, state, ssh master
    run_b = cli_for(box, tmp_path / "laptop-b")
    go = tmp_path / "go"
    r = run_a("run", "--detach", "--json", "--cpu", "-e", f"GO={go}", "job.sh", cwd=a)
    assert r.code == 0, r.err
    job_a = json.loads(r.out)
    assert retry_until(lambda: "start from-laptop-a" in log_of(run_a, a, job_a["id"]), seconds=15)
    # Laptop B pushes its own commit into the same remote_dir and runs while A's job runs.
    r = run_b("run", "--detach", "--json", "--cpu", "-e", f"GO={go}", "job.sh", cwd=b)
    assert r.code == 0, r.err
    job_b = json.loads(r.out)
    assert retry_until(lambda: "start from-laptop-b" in log_of(run_b, b, job_b["id"]), seconds=15)
    jl = jobs_of(run_a, a)
    assert jl[job_a["id"]]["status"] == jl[job_b["id"]]["status"] == "running"  # at the same moment
    go.touch()
    jl = wait_ended(run_a, a, job_a["id"], job_b["id"])
    assert log_of(run_a, a, job_a["id"]) == f"start from-laptop-a\nend from-laptop-a {commit_a}\n"
    assert log_of(run_b, b, job_b["id"]) == f"start from-laptop-b\nend from-laptop-b {commit_b}\n"
    assert jl[job_a["id"]]["git_commit"] == commit_a
    assert jl[job_b["id"]]["git_commit"] == commit_b
    assert jl[job_a["id"]]["workdir"] != jl[job_b["id"]]["workdir"]
    assert jl[job_a["id"]]["remote_dir"] == jl[job_b["id"]]["remote_dir"]
    assert jl[job_a["id"]]["workdir"] == f"{jl[job_a['id']]['remote_dir']}/.remotedl/jobs/{job_a['id']}"
    # Laptop A looks at B's job: B's commit is not in A's clone; diff fetches it from the box.
    with pytest.raises(subprocess.CalledProcessError):
        git(a, "cat-file", "-e", commit_b)
    r = run_a("diff", str(job_b["id"]), cwd=a)
    assert r.code == 0, r.err
    assert "-from-laptop-b" in r.out and "+from-laptop-a" in r.out
    assert git(a, "rev-parse", f"refs/remotedl/jobs/{box.name}/{job_b['id']}") == commit_b
    assert git(a, "fsck", "--connectivity-only", "--no-dangling") == ""  # the fetched pack is whole


def test_push_and_a_second_run_leave_a_running_job_alone(box, origin, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    go = tmp_path / "go"
    first = json.loads(run("run", "--detach", "--json", "--cpu", "-e", f"GO={go}", "job.sh", cwd=origin).out)
    workdir = Path(first["workdir"])
    assert retry_until(lambda: "start origin" in log_of(run, origin, first["id"]), seconds=15)
    (origin / "version.txt").write_text("edited\n")  # uncommitted: a snapshot
    r = run("push", cwd=origin)
    assert r.code == 0, r.err
    assert (workdir / "version.txt").read_text() == "origin\n"  # the running job's files: unchanged
    assert (Path(first["remote_dir"]) / "version.txt").read_text() == "edited\n"
    r = run("run", "--detach", "--json", "--cpu", "-e", f"GO={go}", "job.sh", cwd=origin)
    assert r.code == 0, r.err
    second = json.loads(r.out)
    assert retry_until(lambda: "start edited" in log_of(run, origin, second["id"]), seconds=15)
    assert (workdir / "version.txt").read_text() == "origin\n"
    go.touch()
    jl = wait_ended(run, origin, first["id"], second["id"])
    assert log_of(run, origin, first["id"]).splitlines()[1].startswith("end origin ")
    assert log_of(run, origin, second["id"]).splitlines()[1].startswith("end edited ")
    assert jl[second["id"]]["snapshot"] is True
    assert jl[second["id"]]["snapshot_files"] == ["version.txt"]
    assert jl[second["id"]]["git_head"] == git(origin, "rev-parse", "HEAD")
    assert jl[first["id"]]["snapshot"] is False
    # The job's own commit is what its checkout had: git in the job directory says so.
    assert log_of(run, origin, second["id"]).split()[-1] == jl[second["id"]]["git_commit"]


def test_data_shared_outputs_and_pull(box, project, tmp_path):
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/iso/{tmp_path.name}"\ndata = ["data"]\nshared = ["checkpoints"]\n'
    )
    (project / ".gitignore").write_text("data/\nout/\ncheckpoints/\n")
    (project / "data").mkdir()
    (project / "data" / "x.txt").write_text("the data\n")
    write_script(
        project,
        "train.sh",
        'cat data/x.txt\nmkdir -p out checkpoints\necho "result of $1" > out/result.txt\n'
        'echo "ckpt of $1" > checkpoints/c-$1.txt\n',
    )
    commit_all(project, "train")
    run = cli_for(box, tmp_path / "laptop")
    r = run("run", "--cpu", "--json", "--detach", "train.sh", "one", cwd=project)
    assert r.code == 0, r.err
    one = json.loads(r.out)
    wait_ended(run, project, one["id"])
    assert log_of(run, project, one["id"]) == "the data\n"  # ./data works in the job's own checkout
    r = run("run", "--cpu", "train.sh", "two", cwd=project)
    assert r.code == 0, r.err
    two = max(jobs_of(run, project))
    tree = Path(one["remote_dir"])
    assert (tree / "checkpoints" / "c-one.txt").read_text() == "ckpt of one\n"  # shared: in the tree
    assert (tree / "checkpoints" / "c-two.txt").exists()
    assert not (tree / "out").exists()  # outputs stay with their job
    assert (Path(one["workdir"]) / "out" / "result.txt").read_text() == "result of one\n"
    assert (Path(one["workdir"]) / "data").is_symlink()

    r = run("pull", "out/result.txt", cwd=project)
    assert r.code == 0, r.err
    assert (project / "out" / "result.txt").read_text() == "result of two\n"  # the latest job
    assert f"from job {two} (train.sh)" in r.out
    (project / "out" / "result.txt").unlink()
    r = run("pull", "--job", str(one["id"]), "out/result.txt", cwd=project)
    assert r.code == 0, r.err
    assert (project / "out" / "result.txt").read_text() == "result of one\n"
    assert f"from job {one['id']} (train.sh)" in r.out
    r = run("pull", "checkpoints", cwd=project)  # shared: from the work tree, files not links
    assert r.code == 0, r.err
    assert (project / "checkpoints" / "c-one.txt").read_text() == "ckpt of one\n"
    assert not (project / "checkpoints").is_symlink()
    assert "the work tree (shared by job" in r.out
    r = run("pull", "--tree", "out", cwd=project)
    assert r.code == 1
    assert "out does not exist in the work tree" in r.err
    r = run("pull", "nothing-here.txt", cwd=project)
    assert r.code == 1
    assert "nothing-here.txt does not exist in any job of this project nor in the work tree" in r.err


def test_jobs_rm_and_prune(box, origin, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    write_script(origin, "quick.sh", "mkdir -p out && head -c 200000 /dev/zero > out/blob && echo done\n")
    write_script(origin, "hold.sh", "sleep 60\n")
    commit_all(origin, "quick")
    ids = []
    for _ in range(3):
        r = run("run", "--cpu", "--detach", "--json", "quick.sh", cwd=origin)
        assert r.code == 0, r.err
        ids.append(json.loads(r.out)["id"])
    holder = json.loads(run("run", "--cpu", "--detach", "--json", "hold.sh", cwd=origin).out)
    jl = wait_ended(run, origin, *ids)
    first = jl[ids[0]]
    tree = Path(first["remote_dir"])
    r = run("jobs", "rm", str(ids[0]), cwd=origin)  # no terminal, no --yes: asks nothing, removes nothing
    assert r.code == 2
    assert f"this would remove 1 job ({ids[0]})" in r.err and "--yes" in r.err
    assert Path(first["workdir"]).exists()
    r = run("jobs", "rm", str(ids[0]), str(holder["id"]), "--yes", cwd=origin)
    assert r.code == 1  # the running one is refused, the ended one removed
    assert f"job {holder['id']} (hold.sh) is running: kill it first" in r.err
    assert f"removed job {ids[0]} (quick.sh, succeeded)" in r.out
    freed = r.out.strip().splitlines()[-1]
    assert freed.startswith("freed ") and freed.endswith(f"KiB on {box.name}"), r.out
    assert float(freed.split()[1]) >= 195  # the 200 kB blob, the checkout, the log
    assert not Path(first["workdir"]).exists()
    assert not Path(first["log"]).exists()
    assert ids[0] not in jobs_of(run, origin)
    assert first["workdir"] not in git(tree, "worktree", "list")
    r = run("jobs", "rm", "999999", "--yes", cwd=origin)  # no such job: one error and its hint
    assert r.code == 1
    assert r.out == ""
    assert r.err.splitlines() == [
        "remotedl: error: no job 999999 on this box",
        f"  hint: `remotedl jobs --all` lists the jobs on {box.name}",
    ], r.err
    r = run("jobs", "prune", "--older-than", "1d", "--yes", cwd=origin)  # none is that old
    assert r.code == 0, r.err
    assert "nothing to remove" in r.out
    r = run("jobs", "prune", "--yes", "--json", cwd=origin)
    assert r.code == 0, r.err
    pruned = json.loads(r.out)
    assert sorted(j["id"] for j in pruned["removed"]) == ids[1:]
    assert pruned["bytes"] > 200000
    assert holder["id"] in jobs_of(run, origin)  # still running: kept
    assert git(tree, "worktree", "list").count("\n") == 1  # the tree and the holder's checkout
    assert run("kill", str(holder["id"]), cwd=origin).code == 0


def test_show_diff_and_the_local_ref(box, origin, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    (origin / "version.txt").write_text("uncommitted edit\n")
    write_script(origin, "hello.sh", 'echo "hello $(cat version.txt)"\nexit 3\n')
    r = run("run", "--gpu", "1", "-e", "SECRET=hush", "hello.sh", cwd=origin)
    assert r.code == 3
    r = run("show", "--json", cwd=origin)  # no id: this project's latest job
    assert r.code == 0, r.err
    rec = json.loads(r.out)
    assert rec["command"] == "./hello.sh"
    assert rec["gpus"] == [1]
    assert rec["status"] == "failed" and rec["exit_code"] == 3 and rec["state"] == "failed (exit 3)"
    assert rec["snapshot"] is True
    assert sorted(rec["snapshot_files"]) == ["hello.sh", "version.txt"]
    assert rec["env_keys"] == ["SECRET"] and "hush" not in r.out
    assert rec["environment"]["python"]  # the interpreter the job would use
    assert rec["host"] and rec["alias"] == box.name
    assert rec["workdir"].endswith(f"/.remotedl/jobs/{rec['id']}")
    assert rec["log"].endswith(f"/.remotedl/logs/{rec['id']}.log")
    assert rec["started"] <= rec["ended"]
    ref = f"refs/remotedl/jobs/{box.name}/{rec['id']}"
    assert rec["ref"] == ref
    assert git(origin, "rev-parse", ref) == rec["git_commit"]
    git(origin, "gc", "-q", "--prune=now")  # the snapshot commit is referenced by nothing else
    assert "uncommitted edit" in git(origin, "show", f"{rec['git_commit']}:version.txt")
    r = run("jobs", "show", str(rec["id"]), cwd=origin)
    assert r.code == 0, r.err
    shown = ("failed (exit 3)", "snapshot of uncommitted work", "hello.sh, version.txt", "SECRET", "GPUs")
    for words in shown:
        assert words in r.out, r.out
    (origin / "version.txt").write_text("changed after the job\n")
    r = run("diff", str(rec["id"]), cwd=origin)
    assert r.code == 0, r.err
    assert "-uncommitted edit" in r.out and "+changed after the job" in r.out
    r = run("diff", "--stat", cwd=origin)
    assert r.code == 0, r.err
    assert "version.txt" in r.out and "1 file changed" in r.out


def test_scoping_with_two_projects_on_one_box(box, project, tmp_path):
    p1 = project
    (p1 / "remotedl.toml").write_text(f'remote_dir = "~/scope/{tmp_path.name}-1"\n')
    write_script(p1, "one.sh", "echo from project one\n")
    p2 = tmp_path / "p2"
    p2.mkdir()
    subprocess.run(["git", "init", "-q", str(p2)], check=True)
    git(p2, "config", "user.email", "t@example.invalid")
    git(p2, "config", "user.name", "Test")
    (p2 / "remotedl.toml").write_text(f'remote_dir = "~/scope/{tmp_path.name}-2"\n')
    write_script(p2, "two.sh", "echo from project two; sleep 60\n")
    commit_all(p2, "two")
    run = cli_for(box, tmp_path / "laptop")
    assert run("run", "--cpu", "one.sh", cwd=p1).code == 0
    r = run("run", "--cpu", "--detach", "--json", "two.sh", cwd=p2)  # the box's latest job
    assert r.code == 0, r.err
    two = json.loads(r.out)
    r = run("logs", cwd=p1)
    assert r.code == 0, r.err
    assert r.out == "from project one\n"
    assert json.loads(run("show", "--json", cwd=p1).out)["name"] == "one.sh"
    r = run("kill", cwd=p1)  # nothing of project one runs: said so, exit 1, project two untouched
    assert r.code == 1
    assert "no job of this project" in r.err and "is running" in r.err
    one_id = json.loads(run("show", "--json", cwd=p1).out)["id"]
    r = run("kill", str(one_id), cwd=p1)
    assert r.code == 1
    assert f"job {one_id} (one.sh) is not running: it succeeded" in r.err
    assert jobs_of(run, p2)[two["id"]]["status"] == "running"
    assert retry_until(lambda: "from project two" in run("logs", cwd=p2).out, seconds=15)
    r = run("kill", "--json", cwd=p2)
    assert r.code == 0, r.err
    assert json.loads(r.out)["id"] == two["id"]
    assert json.loads(r.out)["status"] == "killed"


def test_isolate_false_runs_in_the_tree_and_push_names_the_job(box, origin, tmp_path):
    (origin / "remotedl.toml").write_text(f'remote_dir = "~/iso/{tmp_path.name}"\nisolate = false\n')
    commit_all(origin, "isolate off")
    run = cli_for(box, tmp_path / "laptop")
    go = tmp_path / "go"
    r = run("run", "--detach", "--json", "--cpu", "-e", f"GO={go}", "job.sh", cwd=origin)
    assert r.code == 0, r.err
    job = json.loads(r.out)
    assert job["isolated"] is False and job["workdir"] is None
    assert job["cwd"] == job["remote_dir"]
    r = run("push", cwd=origin)  # nothing changes: nothing to say
    assert r.code == 0, r.err
    assert "warning" not in r.err
    (origin / "version.txt").write_text("pushed under it\n")
    r = run("push", cwd=origin)
    assert r.code == 0, r.err
    assert f"this push changes the files of running job {job['id']} (job.sh)" in r.err
    go.touch()
    wait_ended(run, origin, job["id"])
    assert log_of(run, origin, job["id"]).splitlines()[1].startswith("end pushed under it")


def test_a_failed_checkout_fails_the_run_and_leaves_nothing_running(box, origin, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    assert run("push", cwd=origin).code == 0
    tree = box.home / "iso" / tmp_path.name
    (tree / ".remotedl").mkdir(exist_ok=True)
    (tree / ".remotedl" / "jobs").write_text("in the way\n")  # a file where job directories go
    r = run("run", "--no-push", "--cpu", "-e", f"GO={tmp_path / 'go'}", "job.sh", cwd=origin)
    assert r.code == 1
    assert "could not start the job" in r.err
    rec = jobs_of(run, origin)[max(jobs_of(run, origin))]
    assert rec["status"] == "failed" and "could not start the job" in rec["error"]
    assert rec["pid"] is None  # the runner never started the command
    sessions = box.sh("tmux list-sessions -F '#{session_name}'", check=False).stdout.split()
    assert rec["session"] not in sessions


def test_pull_never_writes_tracked_files_unless_named_and_outputs_stay_out_of_the_code(box, origin, tmp_path):
    """A job rewrites a committed file with the box's clock an hour ahead and writes an output:
    `pull --job N .` brings the output, keeps the committed file (and says so), and says why
    for what it left or replaced; the output never goes back as code (push, diff)."""
    run = cli_for(box, tmp_path / "laptop")
    (origin / "config.yaml").write_text("lr: 0.1\n")
    write_script(
        origin,
        "train.sh",
        "mkdir -p out\necho '{\"acc\": 0.9}' > out/metrics.json\necho 'lr: 0.5' > config.yaml\n"
        "touch -d '@'$(( $(date +%s) + 3600 )) config.yaml out/metrics.json\n",
    )
    commit_all(origin, "train")
    r = run("run", "--cpu", "train.sh", cwd=origin)
    assert r.code == 0, r.err
    job = json.loads(run("show", "--json", cwd=origin).out)["id"]
    r = run("pull", "--job", str(job), ".", cwd=origin)
    assert r.code == 0, r.err
    assert (origin / "out" / "metrics.json").read_text() == '{"acc": 0.9}\n'
    assert (origin / "config.yaml").read_text() == "lr: 0.1\n"  # tracked, not named: kept
    assert "kept config.yaml here: tracked files (the box has another version)" in r.err
    assert "job.sh" not in r.err and "train.sh" not in r.err  # the same here: nothing to say
    # Again: nothing new, and it says why nothing came.
    r = run("pull", "--job", str(job), "out/metrics.json", cwd=origin)
    assert r.code == 0, r.err
    assert "0 files" in r.out and "(up to date here)" in r.out
    # A newer copy here is kept, by name.
    (origin / "out" / "metrics.json").write_text('{"acc": "mine"}\n')
    future = os.stat(origin / "out" / "metrics.json").st_mtime + 7200
    os.utime(origin / "out" / "metrics.json", (future, future))
    r = run("pull", "--job", str(job), "out/metrics.json", cwd=origin)
    assert r.code == 0, r.err
    assert "kept out/metrics.json here: newer than the box's copy" in r.err
    assert (origin / "out" / "metrics.json").read_text() == '{"acc": "mine"}\n'
    # The output is not code: not in the next push's snapshot, nor in diff.
    r = run("push", "--json", cwd=origin)
    assert r.code == 0, r.err
    pushed = json.loads(r.out)
    assert pushed["snapshot"] is False and pushed["commit"] == git(origin, "rev-parse", "HEAD")
    assert {"path": "out/metrics.json", "reason": "pulled", "size": 0} in pushed["left_out"]
    r = run("diff", "--stat", str(job), cwd=origin)
    assert r.code == 0, r.err
    assert "metrics.json" not in r.out
    # A tracked file named in the pull: the box's version, and why.
    r = run("pull", "--job", str(job), "config.yaml", cwd=origin)
    assert r.code == 0, r.err
    assert (origin / "config.yaml").read_text() == "lr: 0.5\n"
    assert "replaced config.yaml here (tracked): named in the pull" in r.out
    commit_all(origin, "the job's config")  # (out/ is ignored by nothing: committed along)
    os.utime(origin / "config.yaml")  # the same content, another time: nothing to replace, nor say
    r = run("pull", "--job", str(job), "config.yaml", cwd=origin)
    assert r.code == 0, r.err
    assert "replaced" not in r.out and "(up to date here)" in r.out
    # Added by the user, the output is code again.
    (origin / "out" / "metrics.json").write_text('{"acc": "edited"}\n')
    pushed = json.loads(run("push", "--json", cwd=origin).out)
    assert pushed["snapshot"] is True and not pushed["left_out"]
