"""A job in a container image, `remotedl run --image IMG --no-push CMD`, vs a plain
`ssh BOX docker run --rm IMG CMD`, side by side (issue 25: ratio at most 1.3 on loopback), on a
real dockerd (tests/dockerengine.py: its own socket and data root, vfs, the locally imported
test image) behind a sandbox box's sshd.

Both run the container to its end and print its output: remotedl's also makes the job's own
checkout, its record, the runner in tmux, its log, and follows it. The plain command is
measured cold (a fresh ssh handshake each time: `ssh box docker run ...` as a user types it, the
comparison issue 25 names) and warm (a multiplexed master kept up, as remotedl keeps its own:
what is left of remotedl's own cost). A third line compares the same job with and without the
image: the container's own share of remotedl's start. Needs root (dockerd).
Usage: python benchmarks/container.py [ROUNDS]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _box import project_on_box
from _timing import report, side_by_side, time_argv

from tests import dockerengine

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
engine = dockerengine.start(gpus=0)
try:
    with project_on_box(
        "container",
        "bench-docker",
        files={"README": "bench\n"},
        settings=lambda host: (
            f'host = "{host}"\nremote_dir = "~/bench-container"\nimage = "{dockerengine.IMAGE}"\n'
        ),
        extra_env={"DOCKER_HOST": engine.host},
        warm_up=["run", "--no-push", "--cpu", "true"],
    ) as box:
        proj, run_env = box.proj, box.run_env
        ours = [*box.remotedl, "run", "--no-push", "--cpu", "--", "echo", "hi"]
        plain = f"docker run --rm --init {dockerengine.IMAGE} echo hi"
        for name, ssh in (("cold", box.cold), ("warm", box.warm)):
            a, b = side_by_side(
                lambda: time_argv(ours, cwd=proj, env=run_env),
                lambda ssh=ssh: time_argv([*ssh, plain]),
                rounds,
            )
            what = " (the issue's comparison)" if name == "cold" else " (reference)"
            report(f"run --image vs {name} ssh docker run{what}", a, b, limit=1.3)
        # The container's own share: the same job on the box itself (tmux, no image).
        a, b = side_by_side(
            lambda: time_argv(ours, cwd=proj, env=run_env),
            lambda: time_argv([*ours[:4], "--no-image", *ours[4:]], cwd=proj, env=run_env),
            rounds,
        )
        report("run --image vs run --no-image (the same job on the box)", a, b, limit=1.3)
finally:
    dockerengine.stop(engine)
