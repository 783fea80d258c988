"""push vs bare rsync / ssh, side by side on the sandbox box (issues 3, 11, 16).

Each remotedl figure is set against the plain command run two ways, in the same rounds:
"cold" (plain `ssh -F CONFIG`, a new handshake each time) and "warm" (the same command through
an OpenSSH master started beforehand, ControlPersist as remotedl's). remotedl's own calls reuse
its master connection from the round before (as a user's second command within a minute does).

- push after one tracked edit in a generated 20,000-file, ~200 MB repository vs `rsync -a` of
  the tree: target ratio <= 1.3
- the same push with a 500 MB untracked file in the project vs without it: <= 1.5, and neither
  the local nor the box's .git grows
- the same push with 12,000 untracked files in the box's work tree vs without them: <= 1.5
- push --watch: save-to-box latency of a one-file save in the 3,000-file sample project,
  median and max over 20 saves: median <= 1 s
- push after one file changed in a 3,000-file data tree vs `rsync -a` of it: <= 1.5
- a 1 GB data file pushed vs bare rsync: <= 1.1
- a no-op push vs `ssh HOST true`: <= 3

Usage: python benchmarks/push.py [ROUNDS] [--gb SIZE] [--only NAME,...]
  NAMES: repo, untracked, boxfiles, watch, data, noop, big
"""

from __future__ import annotations

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
from _timing import time_argv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 7
gb = float(sys.argv[sys.argv.index("--gb") + 1]) if "--gb" in sys.argv else 1.0
only = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else None

box = BenchBox()
env = {**box.environ, "REMOTEDL_HOST": box.alias}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-proj-"))
remotedl = installed_remotedl()
cold_ssh = ["ssh", "-F", box.ssh_config]
control = Path(tempfile.mkdtemp(prefix="rdl-mux-"))
warm_ssh = [
    *cold_ssh,
    "-o",
    "ControlMaster=auto",
    "-o",
    f"ControlPath={control}/%C",
    "-o",
    "ControlPersist=60",
]
results: list[str] = []


def wanted(name: str) -> bool:
    return only is None or name in only


def sh(*argv: str, cwd: Path) -> None:
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, env=env)


def rsync_e(ssh: list[str]) -> list[str]:
    return ["rsync", "-a", "-e", " ".join(ssh)]


def warm_up() -> None:
    """(Re)start the plain master, so the warm command never pays a handshake."""
    subprocess.run([*warm_ssh, box.alias, "true"], check=True, capture_output=True)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def three_way(
    name: str,
    ours: Callable[[], float],
    cold: Callable[[], float],
    warm: Callable[[], float],
    *,
    limit: float,
    n: int | None = None,
) -> None:
    """Alternate the three in every round so drift in machine load hits all alike."""
    a: list[float] = []
    b: list[float] = []
    c: list[float] = []
    for _ in range(n or rounds):
        a.append(ours())
        b.append(cold())
        warm_up()
        c.append(warm())
    ma, mb, mc = med(a), med(b), med(c)
    rc, rw = ma / mb, ma / mc
    ok = lambda r: "OK" if r <= limit else "OVER"  # noqa: E731
    line = (
        f"{name}: remotedl {ma:.3f} s | plain cold {mb:.3f} s, ratio {rc:.2f} [{ok(rc)} <= {limit}] | "
        f"plain warm {mc:.3f} s, ratio {rw:.2f} [{ok(rw)} <= {limit}]  (medians, n={len(a)})"
    )
    print(line, flush=True)
    results.append(line)


def pair(name: str, with_: Callable[[], float], without: Callable[[], float], *, limit: float) -> None:
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(with_())
        b.append(without())
    ratio = med(a) / med(b)
    line = (
        f"{name}: with {med(a):.3f} s | without {med(b):.3f} s | ratio {ratio:.2f} "
        f"[{'OK' if ratio <= limit else 'OVER'} <= {limit}]  (medians, n={rounds})"
    )
    print(line, flush=True)
    results.append(line)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def git_init(proj: Path) -> None:
    sh("git", "init", "-q", cwd=proj)
    sh("git", "add", "-A", cwd=proj)
    sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init", cwd=proj)


def tree(where: Path, dirs: int, files: int, size: int, ext: str = ".py") -> None:
    for d in range(dirs):
        (where / f"d{d}").mkdir(parents=True)
        for f in range(files):
            (where / f"d{d}" / f"f{f}{ext}").write_bytes(os.urandom(size))


try:
    # ------------------------------------------------------------ the 20,000-file repository
    big_repo = work / "repo20k"
    if wanted("repo") or wanted("untracked") or wanted("boxfiles"):
        big_repo.mkdir()
        tree(big_repo, 200, 100, 10_000)  # 20,000 files, 200 MB
        git_init(big_repo)
        sh(*remotedl, "push", "--remote-dir", "~/repo20k", cwd=big_repo)
        bare = f"{box.alias}:{box.home}/bare-repo20k/"
        sh(*rsync_e(cold_ssh), "--exclude=.git", "./", bare, cwd=big_repo)
        n = [0]

        def edit() -> None:
            n[0] += 1
            (big_repo / "d7" / "f7.py").write_bytes(os.urandom(10_000 + n[0]))

        def push20k() -> float:
            edit()
            return time_argv([*remotedl, "push", "--remote-dir", "~/repo20k"], cwd=big_repo, env=env)

        def rsync20k(ssh: list[str]) -> Callable[[], float]:
            def go() -> float:
                edit()
                return time_argv([*rsync_e(ssh), "--exclude=.git", "./", bare], cwd=big_repo, env=env)

            return go

        if wanted("repo"):
            three_way(
                "push, 1 tracked edit in a 20,000-file 200 MB repo vs rsync -a",
                push20k,
                rsync20k(cold_ssh),
                rsync20k(warm_ssh),
                limit=1.3,
            )

        if wanted("untracked"):
            blob = work / "ckpt.pt"
            with blob.open("wb") as f:
                for _ in range(500 >> 4):
                    f.write(os.urandom(16 << 20))
            inside = big_repo / "ckpt.pt"
            local_git, box_git = big_repo / ".git", box.home / "repo20k" / ".git"
            before = du(local_git), du(box_git)

            def with_blob() -> float:
                blob.rename(inside) if blob.exists() else None
                return push20k()

            def without_blob() -> float:
                inside.rename(blob) if inside.exists() else None
                return push20k()

            pair(
                "push with a 500 MB untracked file in the project vs without",
                with_blob,
                without_blob,
                limit=1.5,
            )
            after = du(local_git), du(box_git)
            grew = (after[0] - before[0], after[1] - before[1])
            line = (
                f"  .git growth over those {2 * rounds} pushes: local {grew[0] / 1e6:.2f} MB, "
                f"box {grew[1] / 1e6:.2f} MB "
                f"[{'OK' if max(grew) < 50e6 else 'OVER'}: the 500 MB file never entered]"
            )
            print(line, flush=True)
            results.append(line)
            if inside.exists():
                inside.unlink()
            blob.unlink(missing_ok=True)

        if wanted("boxfiles"):
            scratch_in = box.home / "repo20k" / "scratch"
            scratch_out = box.home / "scratch-aside"
            scratch_out.mkdir()
            for d in range(120):
                (scratch_out / f"s{d}").mkdir()
                for f in range(100):
                    (scratch_out / f"s{d}" / f"{f}.txt").write_text(str(f))

            def with_files() -> float:
                if scratch_out.exists():
                    scratch_out.rename(scratch_in)
                return push20k()

            def without_files() -> float:
                if scratch_in.exists():
                    scratch_in.rename(scratch_out)
                return push20k()

            pair(
                "push with 12,000 untracked files in the box's work tree vs without",
                with_files,
                without_files,
                limit=1.5,
            )

    # ------------------------------------------------------------ the 3,000-file sample project
    proj = work / "proj"
    proj.mkdir()
    (proj / ".gitignore").write_text("data/\nbig/\n")
    tree(proj / "src", 30, 100, 2048)  # 3,000 code files
    git_init(proj)
    tree(proj / "data", 30, 100, 2048, ext=".txt")  # 3,000 data files
    sh(*remotedl, "push", "--data", "data", cwd=proj)
    sh(*rsync_e(cold_ssh), "data", f"{box.alias}:{box.home}/bare-copy/", cwd=proj)

    if wanted("watch"):
        target = box.home / "remotedl" / "proj" / "src" / "d3" / "f3.py"
        w = subprocess.Popen(
            [*remotedl, "push", "--watch"],
            cwd=proj,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert w.stdout is not None
        first = w.stdout.readline()
        assert "pushed" in first, first
        lat: list[float] = []
        for i in range(20):
            content = (f"x = {i}  # {time.time()}\n" + "#" * 2000).encode()
            (proj / "src" / "d3" / "f3.py").write_bytes(content)
            t0 = time.perf_counter()
            while True:
                try:
                    if target.read_bytes() == content:
                        break
                except OSError:
                    pass
                if time.perf_counter() - t0 > 30:
                    w.kill()
                    raise SystemExit(f"watch: a save did not reach the box within 30 s: {w.stdout.read()}")
                time.sleep(0.002)
            lat.append(time.perf_counter() - t0)
            time.sleep(0.3)  # one save at a time, not a burst
        w.terminate()
        w.wait(10)
        m = med(lat)
        line = (
            f"push --watch, one-file save in the 3,000-file project to the box: median {m:.3f} s, "
            f"max {max(lat):.3f} s, min {min(lat):.3f} s [{'OK' if m <= 1 else 'OVER'} median <= 1 s]  (n=20)"
        )
        print(line, flush=True)
        results.append(line)

    if wanted("data"):
        counter = [0]

        def touch_one() -> None:
            counter[0] += 1
            (proj / "data" / "d7" / "f7.txt").write_bytes(os.urandom(2048 + counter[0]))

        def ours() -> float:
            touch_one()
            return time_argv([*remotedl, "push", "--data", "data"], cwd=proj, env=env)

        def plain(ssh: list[str]) -> Callable[[], float]:
            def go() -> float:
                touch_one()
                return time_argv(
                    [*rsync_e(ssh), "data", f"{box.alias}:{box.home}/bare-copy/"], cwd=proj, env=env
                )

            return go

        three_way(
            "push, 1 of 3,000 data files changed vs rsync -a",
            ours,
            plain(cold_ssh),
            plain(warm_ssh),
            limit=1.5,
        )

    if wanted("noop"):
        three_way(
            "no-op push vs ssh HOST true",
            lambda: time_argv([*remotedl, "push"], cwd=proj, env=env),
            lambda: time_argv([*cold_ssh, box.alias, "true"], env=env),
            lambda: time_argv([*warm_ssh, box.alias, "true"], env=env),
            limit=3,
        )

    if wanted("big"):
        size = int(gb * (1 << 30))
        big = proj / "big"
        big.mkdir()
        with (big / "blob.bin").open("wb") as f:
            for _ in range(size >> 24):
                f.write(os.urandom(1 << 24))

        def clear(path: Path) -> None:
            shutil.rmtree(path, ignore_errors=True)

        def ours_big() -> float:
            clear(box.home / "remotedl" / "proj" / "big")
            return time_argv([*remotedl, "push", "--no-code", "--data", "big"], cwd=proj, env=env)

        def plain_big(ssh: list[str]) -> Callable[[], float]:
            def go() -> float:
                clear(box.home / "bare-big")
                return time_argv(
                    [*rsync_e(ssh), "big", f"{box.alias}:{box.home}/bare-big/"], cwd=proj, env=env
                )

            return go

        three_way(
            f"push of a {gb:g} GB file vs rsync -a",
            ours_big,
            plain_big(cold_ssh),
            plain_big(warm_ssh),
            limit=1.1,
            n=max(5, rounds),
        )
finally:
    subprocess.run([*warm_ssh, "-O", "exit", box.alias], capture_output=True, check=False)
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base), str(control)], check=False)

print("\nsummary (medians):")
for line in results:
    print(" ", line)
