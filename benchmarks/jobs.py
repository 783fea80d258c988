"""Jobs against plain ssh, side by side on the sandbox box (issues 4, 10, 16).

- `remotedl run --detach --no-push` in a 3,000-file project, including the job's own checkout,
  until the job is running, vs `ssh HOST "tmux new -d 'sleep 1'"`: ratio <= 2. Reported twice:
  against a cold plain ssh (a handshake each time) and against plain ssh on a warm multiplexed
  connection (ControlMaster, the same ControlPersist remotedl uses).
- the per-job checkout in a 20,000-file, ~200 MB repository vs a plain `git worktree add` of the
  same commit: ratio <= 1.2
- `remotedl logs` of a 1 GB log (BENCH_LOG_MB) vs `ssh HOST cat LOG` (cold and warm): throughput
- a line written on the box appears in `remotedl logs -f` within 0.5 s (median)
Usage: python benchmarks/jobs.py [ROUNDS] [--skip-big]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _box import BenchBox
from _install import installed_remotedl
from _timing import report, time_argv, time_call

from remotedl.agent import checkout as agent
from remotedl.ssh.openssh import CONTROL_PERSIST

# The log for the throughput figure: big enough that bytes/s, not the two Python start-ups
# (the CLI here, the agent there, ~0.2 s together), is what is measured.
LOG_MB = int(os.environ.get("BENCH_LOG_MB", "1000"))
rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 9
box = BenchBox()
env = {**box.environ, "REMOTEDL_HOST": box.alias, "PYTHONUNBUFFERED": "1"}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-jobs-"))
proj = work / "proj"
proj.mkdir()
remotedl = installed_remotedl()
cold_ssh = ["ssh", "-F", box.ssh_config, "-o", "ControlPath=none", box.alias]
warm_ssh = [
    "ssh", "-F", box.ssh_config, "-o", "ControlMaster=auto", "-o", f"ControlPath={work}/cm-%C",
    "-o", f"ControlPersist={CONTROL_PERSIST}", box.alias,
]  # fmt: skip


def rd(*args: str) -> str:
    return subprocess.run(
        [*remotedl, *args], cwd=proj, env=env, check=True, capture_output=True, text=True
    ).stdout


def interleave(fns: list[Callable[[], float]], n: int) -> list[list[float]]:
    """Round-robin, so drift in machine load hits all alike."""
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for i, fn in enumerate(fns):
            out[i].append(fn())
    return out


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return r.stdout.strip()


def make_tree(root: Path, dirs: int, files: int, size: int) -> None:
    for d in range(dirs):
        (root / f"pkg{d}").mkdir(parents=True)
        for f in range(files):
            (root / f"pkg{d}" / f"m{f}.py").write_bytes(os.urandom(size))


try:
    # ---- run --detach --no-push in a 3,000-file project (its own checkout included)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    make_tree(proj, 30, 100, 2048)
    (proj / "train.py").write_text("print('hi')\n")
    git(proj, "add", "-A")
    git(proj, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "3000 files")
    rd("push")  # the work tree and the agent are on the box before timing
    rd("run", "--no-push", "--cpu", "true")
    subprocess.run([*warm_ssh, "true"], check=True, env=env)  # the plain master connection, up

    run_argv = [*remotedl, "run", "--no-push", "--detach", "--cpu", "sleep", "1"]
    ours, cold, warm = interleave(
        [
            lambda: time_argv(run_argv, cwd=proj, env=env),
            lambda: time_argv([*cold_ssh, "tmux new -d 'sleep 1'"], env=env),
            lambda: time_argv([*warm_ssh, "tmux new -d 'sleep 1'"], env=env),
        ],
        rounds,
    )
    shown = json.loads(rd("show", "--json"))
    files = sum(1 for _ in Path(shown["workdir"]).rglob("*.py"))
    tree = Path(shown["remote_dir"])
    counter = [0]

    def plain_add() -> float:
        counter[0] += 1
        d = work / f"plain-{counter[0]}"
        t = time_argv(["git", "-C", str(tree), "worktree", "add", "--detach", str(d), shown["git_commit"]])
        git(tree, "worktree", "remove", "--force", str(d))
        return t

    (checkout,) = interleave([plain_add], rounds)
    print(
        f"# run --detach --no-push: each job checked out {files} files in its own directory; "
        f"a plain `git worktree add` of that commit alone takes {statistics.median(checkout):.4f} s (median)"
    )
    report("run --detach --no-push vs cold ssh tmux new -d", ours, cold, limit=2)
    report("run --detach --no-push vs warm (multiplexed) ssh tmux new -d", ours, warm, limit=2)

    # ---- the per-job checkout in a 20,000-file, ~200 MB repository vs git worktree add
    if "--skip-big" not in sys.argv:
        big = work / "big"
        big.mkdir()
        git(big, "init", "-q")
        make_tree(big, 200, 100, 10 * 1024)
        (big / "data").mkdir()
        git(big, "add", "-A")
        git(big, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "20000 files")
        commit = git(big, "rev-parse", "HEAD")
        size = sum(p.stat().st_size for p in big.rglob("*.py"))
        agent.ensure_excludes(str(big))
        plain_dirs = work / "plain-worktrees"
        counter = [0]

        def ours_checkout() -> float:
            counter[0] += 1
            t = time_call(
                lambda: agent.make_job_dir(str(big), counter[0], commit, ["data"], ["checkpoints"])
            )
            agent.remove_job_dir(
                {"id": counter[0], "isolated": True, "remote_dir": str(big), "links": ["data", "checkpoints"],
                 "workdir": str(agent.job_dirs_of(str(big)) / str(counter[0]))}
            )  # fmt: skip
            return t

        def plain_checkout() -> float:
            counter[0] += 1
            d = plain_dirs / str(counter[0])
            t = time_argv(["git", "-C", str(big), "worktree", "add", "--detach", str(d), commit])
            git(big, "worktree", "remove", "--force", str(d))
            return t

        n = max(3, rounds // 2)
        ours_big, plain_big = interleave([ours_checkout, plain_checkout], n)
        print(f"# checkout: {20000} files, {size / 1e6:.0f} MB of content")
        report("per-job checkout vs git worktree add (20,000 files)", ours_big, plain_big, limit=1.2)
        shutil.rmtree(big, ignore_errors=True)

    # ---- logs of a 100 MB log vs ssh cat
    job = json.loads(
        rd(
            "run", "--no-push", "--detach", "--json", "--cpu", "--", "sh", "-c",
            "yes 'a log line of some forty characters......' | head -c " + str(LOG_MB * 1_000_000),
        )
    )
    log = job["log"]
    while json.loads(rd("show", "--json", str(job["id"])))["status"] == "running":
        time.sleep(0.2)
    size = Path(log).stat().st_size
    ours_argv = [*remotedl, "logs", str(job["id"])]

    def throughput(argv: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=proj, env=env, check=True, stdout=subprocess.DEVNULL)
        return size / (time.perf_counter() - t0) / 1e6

    n = max(3, rounds // 2)
    a, b, c = interleave(
        [
            lambda: throughput(ours_argv),
            lambda: throughput([*cold_ssh, f"cat {log}"]),
            lambda: throughput([*warm_ssh, f"cat {log}"]),
        ],
        n,
    )
    what = f"logs of a {size / 1e6:.0f} MB log"
    report(f"{what} vs cold ssh cat (throughput)", a, b, unit="MB/s", higher_is_better=True, limit=0.8)
    report(f"{what} vs warm ssh cat (throughput)", a, c, unit="MB/s", higher_is_better=True, limit=0.9)

    # ---- logs -f latency
    job = json.loads(
        rd(
            "run", "--no-push", "--detach", "--json", "--cpu", "--", "python3", "-c",
            "import time\nfor i in range(25):\n    time.sleep(0.2)\n    print(repr(time.time()), flush=True)",
        )
    )
    p = subprocess.Popen(
        [*remotedl, "logs", "-f", str(job["id"])], cwd=proj, env=env, stdout=subprocess.PIPE, text=True
    )
    lat = []
    assert p.stdout is not None
    for line in p.stdout:
        lat.append(time.time() - float(line))
    p.wait()
    print(
        f"logs -f line latency: median {statistics.median(lat):.3f} s, max {max(lat):.3f} s "
        f"(n={len(lat)})  [{'OK' if statistics.median(lat) <= 0.5 else 'OVER'} <= 0.5 s]"
    )
finally:
    subprocess.run([*warm_ssh[:-1], "-O", "exit", box.alias], check=False, capture_output=True)
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base)], check=False)
