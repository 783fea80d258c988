"""`remotedl run --detach` on a Slurm host vs `ssh LOGIN sbatch --wrap 'sleep 1'`, side by side
(issue 14: ratio at most 2), on the test cluster (tests/slurmcluster.py: slurmctld, slurmd and
munge on this machine, as root) behind a sandbox box's sshd as the login node.

remotedl's run includes what plain sbatch does not: the job's own checkout of the pushed commit
(a git worktree), its record, and its control files. The plain command is measured cold (a fresh
ssh handshake each time) and warm (a multiplexed master kept up, as remotedl keeps its own).
Usage: python benchmarks/slurm.py [ROUNDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _box import project_on_box
from _timing import report, side_by_side, time_argv

from tests import slurmcluster

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
cluster = slurmcluster.start_cluster(gpus=2, cpus=64)
try:
    with project_on_box(
        "slurm",
        "bench-login",
        files={"train.py": "print('hi')\n"},
        settings=lambda host: (
            f'host = "{host}"\nremote_dir = "~/bench-slurm"\n\n[hosts.{host}]\nscheduler = "slurm"\n'
        ),
        extra_env=cluster.env,
        # the agent is on the login node, and the master connection up, before timing
        warm_up=["run", "--no-push", "--detach", "--cpu", "true"],
    ) as box:
        proj, run_env = box.proj, box.run_env
        ours = [*box.remotedl, "run", "--no-push", "--detach", "--cpu", "--", "sleep", "1"]
        plain = "sbatch --output=/dev/null --wrap 'sleep 1'"
        for name, ssh in (("cold", box.cold), ("warm", box.warm)):
            a, b = side_by_side(
                lambda: time_argv(ours, cwd=proj, env=run_env),
                lambda ssh=ssh: time_argv([*ssh, plain]),
                rounds,
            )
            report(f"run --detach on Slurm vs {name} ssh sbatch --wrap", a, b, limit=2)
finally:
    for problem in slurmcluster.stop_cluster(cluster):
        print(f"cluster stop: {problem}")
