"""`remotedl run --detach` on a Slurm host vs `ssh LOGIN sbatch --wrap 'sleep 1'`, side by side
(issue 14: ratio at most 2), on the test cluster (tests/slurmcluster.py: slurmctld, slurmd and
munge on this machine, as root) behind a sandbox box's sshd as the login node.

remotedl's run includes what plain sbatch does not: the job's own checkout of the pushed commit
(a git worktree), its record, and its control files. The plain command is measured cold (a fresh
ssh handshake each time) and warm (a multiplexed master kept up, as remotedl keeps its own).
Usage: python benchmarks/slurm.py [ROUNDS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import report, side_by_side, time_argv

from remotedl import sandbox
from remotedl.env import Environment
from tests import slurmcluster

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
base = Path(tempfile.mkdtemp(prefix="remotedl-bench-slurm-"))
environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
env = Environment(environ=environ, cwd=base)
cluster = slurmcluster.start_cluster(gpus=2, cpus=64)
try:
    info = sandbox.up(env, name="bench-login", gpus=0, extra_env=cluster.env)
    try:
        proj = base / "proj"
        proj.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main", str(proj)], check=True)
        (proj / "train.py").write_text("print('hi')\n")
        (proj / "remotedl.toml").write_text(
            f'host = "{info.name}"\nremote_dir = "~/bench-slurm"\n\n'
            f'[hosts.{info.name}]\nscheduler = "slurm"\n'
        )
        subprocess.run(["git", "-C", str(proj), "add", "."], check=True)
        who = ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
        subprocess.run(["git", "-C", str(proj), *who, "commit", "-qm", "init"], check=True)
        remotedl = [sys.executable, "-m", "remotedl"]
        run_env = {**environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([*remotedl, "push"], cwd=proj, env=run_env, check=True, capture_output=True)
        # the agent is on the login node, and the master connection up, before timing
        subprocess.run(
            [*remotedl, "run", "--no-push", "--detach", "--cpu", "true"], cwd=proj, env=run_env, check=True,
            capture_output=True,
        )  # fmt: skip
        ours = [*remotedl, "run", "--no-push", "--detach", "--cpu", "--", "sleep", "1"]
        cold = ["ssh", "-F", info.ssh_config, "-o", "ControlPath=none", info.name]
        control = base / "plain-%C"
        warm = ["ssh", "-F", info.ssh_config, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
                "-o", "ControlPersist=60", info.name]  # fmt: skip
        subprocess.run([*warm, "true"], check=True, capture_output=True)
        plain = "sbatch --output=/dev/null --wrap 'sleep 1'"
        for name, ssh in (("cold", cold), ("warm", warm)):
            a, b = side_by_side(
                lambda: time_argv(ours, cwd=proj, env=run_env),
                lambda ssh=ssh: time_argv([*ssh, plain]),
                rounds,
            )
            report(f"run --detach on Slurm vs {name} ssh sbatch --wrap", a, b, limit=2)
    finally:
        sandbox.down(env, name="bench-login")
finally:
    for problem in slurmcluster.stop_cluster(cluster):
        print(f"cluster stop: {problem}")
