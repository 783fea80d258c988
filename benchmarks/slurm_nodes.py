"""Start skew of a multi-node run on Slurm (issue 27): how far apart srun starts the nodes.

The two-node test cluster of tests/slurmcluster.py (two slurmd on this machine, nodes at
127.0.0.1 and 127.0.0.2; needs root and Debian's slurm-wlm) behind a sandbox login box, a small
git project whose script prints `time.time()` as its first act. Each round: `remotedl run
--nodes 2 --gpus 1 -- python3 stamp.py` (followed to its end); the skew is the spread of the
nodes' stamps (one clock). Goal: all nodes started within 0.5 s.
Usage: sudo python benchmarks/slurm_nodes.py [ROUNDS]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _install import installed_remotedl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remotedl import sandbox
from remotedl.env import Environment
from tests import slurmcluster

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
base = Path(tempfile.mkdtemp(prefix="remotedl-bench-slurm-nodes-"))
environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
env = Environment(environ=environ, cwd=base)
remotedl = installed_remotedl()

proj = base / "proj"
proj.mkdir()
(proj / "stamp.py").write_text(
    "import time, os\nprint('stamp', os.environ['NODE_RANK'], repr(time.time()))\n"
)
(proj / "remotedl.toml").write_text(
    '[hosts.slurmbench]\nscheduler = "slurm"\nremote_dir = "~/bench-slurm-nodes"\ntime = "10"\n'
)
for argv in (["init", "-q", "-b", "main"], ["add", "."], ["-c", "user.email=b@example.invalid", "-c",
             "user.name=b", "commit", "-q", "-m", "stamp"]):  # fmt: skip
    subprocess.run(["git", "-C", str(proj), *argv], check=True)

cluster = slurmcluster.start_cluster(gpus=2, node="rdln", nodes=2)
try:
    info = sandbox.up(env, name="slurmbench", gpus=0, extra_env=cluster.env)
    run_env = {**environ, "REMOTEDL_HOST": "slurmbench", "REMOTEDL_SSH_CONFIG": info.ssh_config}
    stamped: list[float] = []
    took: list[float] = []
    for _ in range(rounds):
        began = time.monotonic()
        r = subprocess.run(
            [*remotedl, "run", "--nodes", "2", "--gpus", "1", "--", "python3", "stamp.py"],
            cwd=proj, env=run_env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        took.append(time.monotonic() - began)
        stamps = {rank: float(t) for rank, t in re.findall(r"^\d+: stamp (\d+) ([0-9.]+)$", r.stdout, re.M)}
        assert len(stamps) == 2, r.stdout + r.stderr
        stamped.append(max(stamps.values()) - min(stamps.values()))
    print(f"2 Slurm nodes on one machine (srun --nodes 2), {rounds} runs")
    print(
        f"skew between the nodes' first lines: median {statistics.median(stamped):.3f} s, "
        f"max {max(stamped):.3f} s"
    )
    print(f"whole run (push, sbatch, srun, follow to the end): median {statistics.median(took):.2f} s")
    print(f"goal <= 0.5 s: {'met' if max(stamped) <= 0.5 else 'NOT met'}")
finally:
    try:
        sandbox.down(env, name="slurmbench")
    except Exception as e:
        print(f"sandbox down: {e}")
    for problem in slurmcluster.stop_cluster(cluster):
        print(f"slurm cluster stop: {problem}")
