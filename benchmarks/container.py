"""A job in a container image, `remotedl run --image IMG --no-push CMD`, vs a plain
`ssh BOX docker run --rm IMG CMD`, side by side (issue 25: ratio at most 1.3 on loopback), on a
real dockerd (tests/dockerengine.py: its own socket and data root, vfs, the locally imported
test image) behind a sandbox box's sshd.

Both run the container to its end and print its output: remotedl's also makes the job's own
checkout, its record, the runner in tmux, its log, and follows it. The plain command is
measured cold (a fresh ssh handshake each time) and warm (a multiplexed master kept up, as
remotedl keeps its own). A third line compares the same job with and without the image: the
container's own share of remotedl's start. Needs root (dockerd).
Usage: python benchmarks/container.py [ROUNDS]
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
from tests import dockerengine

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
base = Path(tempfile.mkdtemp(prefix="remotedl-bench-container-"))
environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
env = Environment(environ=environ, cwd=base)
engine = dockerengine.start(gpus=0)
try:
    info = sandbox.up(env, name="bench-docker", gpus=0, extra_env={"DOCKER_HOST": engine.host})
    try:
        proj = base / "proj"
        proj.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main", str(proj)], check=True)
        (proj / "README").write_text("bench\n")
        (proj / "remotedl.toml").write_text(
            f'host = "{info.name}"\nremote_dir = "~/bench-container"\nimage = "{dockerengine.IMAGE}"\n'
        )
        subprocess.run(["git", "-C", str(proj), "add", "."], check=True)
        who = ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
        subprocess.run(["git", "-C", str(proj), *who, "commit", "-qm", "init"], check=True)
        remotedl = [sys.executable, "-m", "remotedl"]
        run_env = {**environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([*remotedl, "push"], cwd=proj, env=run_env, check=True, capture_output=True)
        # the agent is on the box, and the master connection up, before timing
        subprocess.run(
            [*remotedl, "run", "--no-push", "--cpu", "true"], cwd=proj, env=run_env, check=True,
            capture_output=True,
        )  # fmt: skip
        ours = [*remotedl, "run", "--no-push", "--cpu", "--", "echo", "hi"]
        cold = ["ssh", "-F", info.ssh_config, "-o", "ControlPath=none", info.name]
        control = base / "plain-%C"
        warm = ["ssh", "-F", info.ssh_config, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
                "-o", "ControlPersist=60", info.name]  # fmt: skip
        subprocess.run([*warm, "true"], check=True, capture_output=True)
        plain = f"docker run --rm --init {dockerengine.IMAGE} echo hi"
        for name, ssh in (("cold", cold), ("warm", warm)):
            a, b = side_by_side(
                lambda: time_argv(ours, cwd=proj, env=run_env),
                lambda ssh=ssh: time_argv([*ssh, plain]),
                rounds,
            )
            report(f"run --image vs {name} ssh docker run", a, b, limit=1.3)
        # The container's own share: the same job on the box itself (tmux, no image).
        a, b = side_by_side(
            lambda: time_argv(ours, cwd=proj, env=run_env),
            lambda: time_argv([*ours[:4], "--no-image", *ours[4:]], cwd=proj, env=run_env),
            rounds,
        )
        report("run --image vs run --no-image (the same job on the box)", a, b, limit=1.3)
    finally:
        sandbox.down(env, name="bench-docker")
finally:
    dockerengine.stop(engine)
