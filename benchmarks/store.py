"""The box's job store with thousands of records (issue 23), side by side on two sandbox boxes.

A sweep leaves thousands of records on a box. One box holds 10 records, the other 5,000 (the
same project and jobs, and 4,990 finished records beside them); each command runs on both in
turn, so drift in machine load hits both alike.

- commands about one job (`run --detach --no-push --cpu`, `logs ID`, `logs` (the project's
  latest), `show`, `kill` of a queued job) at 5,000 records vs at 10: ratio <= 1.2
- `jobs --all --json` at 5,000 records vs `ssh box 'cat ~/.remotedl/jobs/*.json'` on a warm
  (multiplexed) connection, the same ControlPersist remotedl uses: ratio <= 2

Usage: python benchmarks/store.py [ROUNDS] [--records N]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _box import BenchBox
from _install import installed_remotedl
from _timing import report, time_argv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 9
many = int(sys.argv[sys.argv.index("--records") + 1]) if "--records" in sys.argv else 5000
remotedl = installed_remotedl()
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-store-"))


def interleave(fns: list[Callable[[], float]], n: int) -> list[list[float]]:
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for i, fn in enumerate(fns):
            out[i].append(fn())
    return out


class Side:
    """One box, one clone of the project on the laptop."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.box = BenchBox(gpus=1)
        self.env = {**self.box.environ, "REMOTEDL_HOST": self.box.alias, "PYTHONUNBUFFERED": "1"}
        self.proj = work / label
        self.proj.mkdir()
        subprocess.run(["git", "init", "-q"], cwd=self.proj, check=True)
        (self.proj / "train.py").write_text("print('hi')\n")
        subprocess.run(["git", "add", "-A"], cwd=self.proj, check=True)
        commit = ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "one"]
        subprocess.run(commit, cwd=self.proj, check=True)
        self.rd("push")
        self.rd("run", "--no-push", "--cpu", "true")
        self.state = self.box.home / ".remotedl"

    def rd(self, *args: str, check: bool = True) -> str:
        return subprocess.run(
            [*remotedl, *args], cwd=self.proj, env=self.env, check=check, capture_output=True, text=True
        ).stdout

    def time(self, *args: str) -> float:
        return time_argv([*remotedl, *args], cwd=self.proj, env=self.env)

    def fill(self, total: int) -> None:
        """Finished records (copies of the real one, each with its log) up to ``total``."""
        jobs = self.state / "jobs"
        real = sorted(jobs.glob("*.json"), key=lambda p: int(p.stem))
        template = json.loads(real[-1].read_text())
        top = int(real[-1].stem)
        for job_id in range(top + 1, top + 1 + total - len(real)):
            log = self.state / "logs" / f"{job_id}.log"
            log.write_text(f"job {job_id}\n" * 20)
            rec = {**template, "id": job_id, "name": f"sweep-{job_id}", "log": str(log),
                   "session": f"remotedl-{job_id}", "workdir": None,
                   "cwd": template["remote_dir"]}  # fmt: skip
            (jobs / f"{job_id}.json").write_text(json.dumps(rec, indent=1))
        # As an older agent (or a sweep) would leave them: the counter past them, no index.
        (self.state / "next_id").write_text(str(top + 1 + total - len(real)))

    def latest(self) -> int:
        return int(json.loads(self.rd("show", "--json"))["id"])

    def run_detached(self) -> float:
        t = self.time("run", "--no-push", "--detach", "--cpu", "true")
        job = self.latest()
        while json.loads(self.rd("show", "--json", str(job)))["status"] in ("queued", "starting", "running"):
            time.sleep(0.05)  # ended before the next round: the runner's writes are not timed
        return t

    def kill_queued(self) -> float:
        """A job queued behind a held GPU, then killed: a kill resolves and ends one job."""
        job = json.loads(self.rd("run", "--no-push", "--detach", "--json", "--gpu", "0", "--queue", "true"))
        return self.time("kill", str(job["id"]))

    def close(self) -> None:
        self.box.close()


few = Side("few")
lots = Side("lots")
try:
    few.fill(10)
    lots.fill(many)
    # The first look at an old store builds its index of active jobs: once, before timing.
    for side in (few, lots):
        side.rd("jobs")
    holder = {}
    for side in (few, lots):  # GPU 0 held, so that a --queue job waits and can be killed
        holder[side.label] = json.loads(
            side.rd("run", "--no-push", "--detach", "--json", "--gpu", "0", "--", "sleep", "3600")
        )["id"]
    fixed = {side.label: str(side.latest()) for side in (few, lots)}

    def both(fn: Callable[[Side], float]) -> list[Callable[[], float]]:
        return [lambda: fn(few), lambda: fn(lots)]

    print(f"# {len(list((few.state / 'jobs').glob('*.json')))} records vs "
          f"{len(list((lots.state / 'jobs').glob('*.json')))} records")  # fmt: skip
    one_job: dict[str, Callable[[Side], float]] = {
        "run --detach --no-push --cpu": Side.run_detached,
        "logs ID": lambda s: s.time("logs", fixed[s.label]),
        "logs (the project's latest)": lambda s: s.time("logs"),
        "show --json (the latest)": lambda s: s.time("show", "--json"),
        "kill ID (a queued job)": Side.kill_queued,
    }
    for name, fn in one_job.items():
        at_few, at_many = interleave(both(fn), rounds)
        report(f"{name}: {many} records vs 10", at_many, at_few, limit=1.2, names=(str(many), "10"))

    warm = lots.box.plain_ssh(warm=True)
    cold = lots.box.plain_ssh(warm=False)
    listing = [*remotedl, "jobs", "--all", "--json"]
    cat = "cat ~/.remotedl/jobs/*.json"
    ours, plain_warm, plain_cold = interleave(
        [
            lambda: time_argv(listing, cwd=lots.proj, env=lots.env),
            lambda: time_argv([*warm, cat]),
            lambda: time_argv([*cold, cat]),
        ],
        rounds,
    )
    report(f"jobs --all --json ({many} records) vs warm ssh cat jobs/*.json", ours, plain_warm, limit=2)
    report(f"jobs --all --json ({many} records) vs cold ssh cat jobs/*.json", ours, plain_cold, limit=2)
finally:
    for side in (few, lots):
        side.close()
    subprocess.run(["rm", "-rf", str(work)], check=False)
