"""Start skew of a multi-node run (issue 27): how far apart the nodes' jobs start.

N sandbox boxes on loopback (one laptop state directory, as a user's fleet), a small git project
whose script prints `time.time()` as its first act. Each round: `remotedl run --nodes N --detach
-- python3 stamp.py`, then `remotedl logs RUN`; the skew is the spread of the nodes' stamps (the
boxes share this machine's clock, so the stamps compare exactly), beside the skew remotedl
itself says (between the nodes' start answers). Goal: all nodes started within 0.5 s.
Usage: python benchmarks/multinode.py [ROUNDS] [NODES]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _install import installed_remotedl

from remotedl import sandbox
from remotedl.env import Environment

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
count = int(sys.argv[2]) if len(sys.argv) > 2 else 2
base = Path(tempfile.mkdtemp(prefix="remotedl-bench-nodes-"))
environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
if os.path.exists("/usr/bin/python3"):
    environ["REMOTEDL_PYTHON"] = "/usr/bin/python3"
env = Environment(environ=environ, cwd=base)
names = [f"m{i}" for i in range(1, count + 1)]
remotedl = installed_remotedl()

proj = base / "proj"
proj.mkdir()
(proj / "stamp.py").write_text(
    "import time, os\nprint('stamp', os.environ['NODE_RANK'], repr(time.time()))\n"
)
(proj / "remotedl.toml").write_text('remote_dir = "~/bench-nodes"\n')
for argv in (["init", "-q", "-b", "main"], ["add", "."], ["-c", "user.email=b@example.invalid", "-c",
             "user.name=b", "commit", "-q", "-m", "stamp"]):  # fmt: skip
    subprocess.run(["git", "-C", str(proj), *argv], check=True)

try:
    for name in names:
        sandbox.up(env, name=name, gpus=1)
    stamped: list[float] = []
    said: list[float] = []
    for _ in range(rounds):
        started = subprocess.run(
            [*remotedl, "run", "--nodes", str(count), "--detach", "--host", ",".join(names), "--",
             "python3", "stamp.py"],
            cwd=proj, env=environ, capture_output=True, text=True, check=True,
        )  # fmt: skip
        run_id = started.stdout.strip()
        m = re.search(r"start skew ([0-9.]+) s", started.stderr)
        said.append(float(m[1]) if m else float("nan"))
        stamps: dict[str, float] = {}
        for _attempt in range(100):
            logs = subprocess.run(
                [*remotedl, "logs", run_id],
                cwd=proj,
                env=environ,
                capture_output=True,
                text=True,
                check=False,
            )
            stamps = {r: float(t) for r, t in re.findall(r"stamp (\d+) ([0-9.]+)", logs.stdout)}
            if len(stamps) == count:
                break
        stamped.append(max(stamps.values()) - min(stamps.values()))
    print(f"{count} nodes on loopback, {rounds} runs")
    print(f"skew between the nodes' first lines (their clocks): median {statistics.median(stamped):.3f} s, "
          f"max {max(stamped):.3f} s")  # fmt: skip
    print(
        f"skew remotedl says (start answers): median {statistics.median(said):.3f} s, max {max(said):.3f} s"
    )
    print(f"goal <= 0.5 s: {'met' if max(stamped) <= 0.5 else 'NOT met'}")
finally:
    for name in names:
        try:
            sandbox.down(env, name=name)
        except Exception as e:
            print(f"sandbox down {name}: {e}")
