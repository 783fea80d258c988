"""push vs bare rsync / ssh, side by side on the sandbox box (issue 3).

- push after one file changed in a 3,000-file data tree vs `rsync -a` of that tree over the
  same SSH config: target ratio <= 1.5
- a 1 GB data file pushed vs bare rsync: target ratio <= 1.1
- a no-op push vs `ssh HOST true`: target ratio <= 3
Usage: python benchmarks/push.py [ROUNDS] [--gb SIZE]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _box import BenchBox
from _timing import report, side_by_side, time_argv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 7
gb = float(sys.argv[sys.argv.index("--gb") + 1]) if "--gb" in sys.argv else 1.0

box = BenchBox()
env = {**box.environ, "REMOTEDL_HOST": box.alias}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-proj-"))
proj = work / "proj"
proj.mkdir()
ssh = f"ssh -F {box.ssh_config}"


def sh(*argv: str, cwd: Path = proj) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, env=env)


sh("git", "init", "-q")
(proj / "train.py").write_text("print('hi')\n")
(proj / ".gitignore").write_text("data/\nbig/\n")
sh("git", "add", "-A")
sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")
tree = proj / "data"
for d in range(30):
    (tree / f"d{d}").mkdir(parents=True)
    for f in range(100):
        (tree / f"d{d}" / f"f{f}.txt").write_bytes(os.urandom(2048))
remotedl = [sys.executable, "-m", "remotedl"]
try:
    # first transfers, not timed
    sh(*remotedl, "push", "--data", "data")
    sh("rsync", "-a", "-e", ssh, "data", f"{box.alias}:{box.home}/bare-copy/")
    counter = [0]

    def touch_one() -> None:
        counter[0] += 1
        (tree / "d7" / "f7.txt").write_bytes(os.urandom(2048 + counter[0]))

    def ours() -> float:
        touch_one()
        return time_argv([*remotedl, "push", "--data", "data"], cwd=proj, env=env)

    def plain() -> float:
        touch_one()
        return time_argv(
            ["rsync", "-a", "-e", ssh, "data", f"{box.alias}:{box.home}/bare-copy/"], cwd=proj, env=env
        )

    a, b = side_by_side(ours, plain, rounds)
    report("push, 1 of 3,000 files changed vs rsync -a", a, b, limit=1.5)

    noop = [*remotedl, "push"]
    a, b = side_by_side(
        lambda: time_argv(noop, cwd=proj, env=env),
        lambda: time_argv(["ssh", "-F", box.ssh_config, box.alias, "true"], env=env),
        rounds,
    )
    report("no-op push vs ssh HOST true", a, b, limit=3)

    size = int(gb * (1 << 30))
    big = proj / "big"
    big.mkdir()
    with (big / "blob.bin").open("wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(1 << 24))
    rounds_big = max(5, rounds)

    def clear_ours() -> None:
        subprocess.run(["rm", "-rf", str(box.home / "remotedl" / "proj" / "big")], check=True)

    def clear_plain() -> None:
        subprocess.run(["rm", "-rf", str(box.home / "bare-big")], check=True)

    def ours_big() -> float:
        clear_ours()
        return time_argv([*remotedl, "push", "--no-code", "--data", "big"], cwd=proj, env=env)

    def plain_big() -> float:
        clear_plain()
        return time_argv(
            ["rsync", "-a", "-e", ssh, "big", f"{box.alias}:{box.home}/bare-big/"], cwd=proj, env=env
        )

    a, b = side_by_side(ours_big, plain_big, rounds_big)
    report(f"push of a {gb:g} GB file vs rsync -a", a, b, limit=1.1)
finally:
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base)], check=False)
