"""Jobs against plain ssh, side by side on the sandbox box (issue 4).

- `remotedl run --detach` until the job is running vs `ssh HOST "tmux new -d 'sleep 1'"`: ratio <= 2
- `remotedl logs` of a 100 MB log vs `ssh HOST cat LOG`: throughput ratio >= 0.8
- a line written on the box appears in `remotedl logs -f` within 0.5 s (median)
Usage: python benchmarks/jobs.py [ROUNDS]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _box import BenchBox
from _timing import report, side_by_side, time_argv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
box = BenchBox()
env = {**box.environ, "REMOTEDL_HOST": box.alias, "PYTHONUNBUFFERED": "1"}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-jobs-"))
proj = work / "proj"
proj.mkdir()
remotedl = [sys.executable, "-m", "remotedl"]
ssh = ["ssh", "-F", box.ssh_config, box.alias]


def rd(*args: str) -> str:
    return subprocess.run(
        [*remotedl, *args], cwd=proj, env=env, check=True, capture_output=True, text=True
    ).stdout


try:
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    rd("push")  # the work tree and the agent are on the box before timing
    rd("run", "--no-push", "--cpu", "true")

    a, b = side_by_side(
        lambda: time_argv(
            [*remotedl, "run", "--no-push", "--detach", "--cpu", "sleep", "1"], cwd=proj, env=env
        ),
        lambda: time_argv([*ssh, "tmux new -d 'sleep 1'"], env=env),
        rounds,
    )
    report("run --detach --no-push vs ssh tmux new -d", a, b, limit=2)
    a2, _ = side_by_side(
        lambda: time_argv([*remotedl, "run", "--detach", "--cpu", "sleep", "1"], cwd=proj, env=env),
        lambda: 0.0,
        rounds,
    )
    report("run --detach (with its push) vs ssh tmux new -d", a2, b, limit=2)

    job = json.loads(
        rd(
            "run",
            "--no-push",
            "--detach",
            "--json",
            "--cpu",
            "--",
            "sh",
            "-c",
            "yes 'a log line of some forty characters......' | head -c 100000000",
        )
    )
    log = job["log"]
    time.sleep(0.5)
    while json.loads(rd("jobs", "--all", "--json"))[-1]["status"] == "running":
        time.sleep(0.2)
    size = Path(log).stat().st_size
    ours_argv = [*remotedl, "logs", str(job["id"])]
    plain_argv = [*ssh, f"cat {log}"]

    def t(argv: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(argv, cwd=proj, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    a, b = side_by_side(
        lambda: size / t(ours_argv) / 1e6, lambda: size / t(plain_argv) / 1e6, max(3, rounds // 2)
    )
    report(
        f"logs of a {size / 1e6:.0f} MB log vs ssh cat (throughput)",
        a,
        b,
        unit="MB/s",
        higher_is_better=True,
        limit=0.8,
    )

    job = json.loads(
        rd(
            "run",
            "--no-push",
            "--detach",
            "--json",
            "--cpu",
            "--",
            "python3",
            "-c",
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
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base)], check=False)
