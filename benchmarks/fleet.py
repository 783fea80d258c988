"""Fleets, side by side (issue 13), on 8 sandbox boxes in one laptop state directory.

- `remotedl status --json` over 8 boxes vs over one: ratio <= 1.5 (the boxes are asked at once,
  one thread and one ssh each, over warm master connections). Beside it, the floor this machine
  sets: remotedl's own status script sent with plain `ssh` (the same warm masters) to 8 boxes at
  once vs to one. The sandbox boxes run on this machine's cores, so 8 boxes' own work (about
  70 ms of CPU each, mostly the stand-in nvidia-smi's two Python starts) competes with the
  laptop side; on a machine with few cores that floor, not remotedl, sets the ratio.
- `remotedl run --detach --gpu auto` over 4 boxes (one sample of every box at once, placement,
  push to the chosen box, start) vs on one box (push, start), in a small git project, ratio <= 1.5
- `remotedl top` in a real terminal (a pty): CPU time on the laptop per refresh (remotedl and its
  ssh clients; the ControlMaster processes, daemons of ssh, are not counted), over 8 boxes and
  over one, from two runs of different length: (cpu_long - cpu_short) / (refreshes_long -
  refreshes_short), so start-up and exit cancel out. Refreshes are counted on the screen.

The stand-in nvidia-smi is a Python script run by `python3` from PATH; the boxes inherit this
process's PATH. With FAST_PYTHON=1 (default) /usr/bin comes first, so a pyenv shim (150 ms a
call here) does not stand in for nvidia-smi's cost; FAST_PYTHON=0 keeps PATH as it is.
Usage: python benchmarks/fleet.py [ROUNDS]
"""

from __future__ import annotations

import fcntl
import os
import pty
import resource
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

from _install import installed_remotedl
from _timing import report, side_by_side, time_argv

from remotedl import sandbox
from remotedl.env import Environment
from remotedl.ssh import Box, resolve_host
from remotedl.ssh.channel import encode_request
from remotedl.status import status_script

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
if os.environ.get("FAST_PYTHON", "1") == "1":
    os.environ["PATH"] = "/usr/bin:" + os.environ["PATH"]
base = Path(tempfile.mkdtemp(prefix="remotedl-bench-fleet-"))
environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
env = Environment(environ=environ, cwd=base)
names = [f"b{i}" for i in range(1, 9)]
remotedl = installed_remotedl()


def plain_parallel(argvs: list[list[str]]) -> float:
    """Wall time of remotedl's status script sent with plain ssh to every box at once."""
    t0 = time.perf_counter()
    procs = []
    for argv in argvs:
        _, payload = encode_request(status_script(), ["~"])
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdin is not None
        p.stdin.write(payload)  # a few KiB: fits the pipe, no deadlock
        p.stdin.close()
        procs.append(p)
    for p in procs:
        assert p.stdout is not None
        p.stdout.read()
        if p.wait() != 0:
            raise SystemExit("plain ssh status failed")
    return time.perf_counter() - t0


def top_cpu(hosts: str, seconds: float, interval: float) -> tuple[float, int]:
    """(CPU seconds of `remotedl top` and its children, refreshes shown) for one run in a pty."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    p = subprocess.Popen(
        [*remotedl, "top", "--interval", str(interval), "--host", hosts],
        stdin=slave, stdout=slave, stderr=slave, env=environ, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    screen = bytearray()

    def drain() -> None:
        while True:
            try:
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    chunk = os.read(master, 65536)
                    if not chunk:
                        return
                    screen.extend(chunk)
                elif p.poll() is not None:
                    return
            except OSError:
                return

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(seconds)
    os.write(master, b"q")
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    os.close(master)
    if p.returncode != 0:
        raise SystemExit(f"top exited {p.returncode}: {bytes(screen[-2000:]).decode(errors='replace')}")
    refreshes = bytes(screen).count(b"remotedl top:")
    return usage.ru_utime + usage.ru_stime, refreshes


try:
    for i, name in enumerate(names):
        sandbox.up(env, name=name, gpus=1 + i % 4)
    everyone = ",".join(names)
    warm = [*remotedl, "status", "--json", "--host", everyone]
    subprocess.run(warm, env=environ, check=True, capture_output=True)  # every master is up

    a, b = side_by_side(
        lambda: time_argv([*remotedl, "status", "--json", "--host", everyone], env=environ),
        lambda: time_argv([*remotedl, "status", "--json", "--host", names[0]], env=environ),
        rounds,
    )
    report("status over 8 boxes vs over 1", a, b, limit=1.5, names=("8 boxes", "1 box"))
    argvs = [Box(resolve_host(env, name)).argv() for name in names]
    c, d = side_by_side(lambda: plain_parallel(argvs), lambda: plain_parallel(argvs[:1]), rounds)
    report("  floor: plain ssh status script to 8 boxes at once vs to 1", c, d, names=("8 boxes", "1 box"))
    report("  remotedl status vs plain ssh, 8 boxes", a, c, names=("remotedl", "plain"))
    report("  remotedl status vs plain ssh, 1 box", b, d, names=("remotedl", "plain"))

    proj = base / "proj"
    proj.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(proj)], check=True)
    (proj / "train.py").write_text("print('trained')\n")
    git_id = ["-c", "user.email=b@example.invalid", "-c", "user.name=bench"]
    subprocess.run(["git", "-C", str(proj), "add", "."], check=True)
    subprocess.run(["git", "-C", str(proj), *git_id, "commit", "-q", "-m", "init"], check=True)
    four = ",".join(names[:4])
    run_argv = [*remotedl, "run", "--detach", "--gpu", "auto", "--host"]

    def quiet(argv: list[str]) -> None:
        subprocess.run(argv, cwd=proj, env=environ, check=True, capture_output=True)

    quiet([*remotedl, "push", "--host", four])
    for name in names[:4]:  # the agent is on every box before timing
        quiet([*run_argv, name, "train.py"])
    a, b = side_by_side(
        lambda: time_argv([*run_argv, four, "train.py"], cwd=proj, env=environ),
        lambda: time_argv([*run_argv, names[0], "train.py"], cwd=proj, env=environ),
        rounds,
    )
    report("run --detach --gpu auto over 4 boxes vs on 1", a, b, limit=1.5, names=("4 boxes", "1 box"))

    interval = 0.5
    for label, hosts in (("8 boxes", everyone), ("1 box", names[0])):
        per: list[float] = []
        for _ in range(max(1, rounds // 3)):
            short_cpu, short_n = top_cpu(hosts, 3.0, interval)
            long_cpu, long_n = top_cpu(hosts, 13.0, interval)
            if long_n > short_n:
                per.append((long_cpu - short_cpu) / (long_n - short_n))
        print(
            f"top over {label}: laptop CPU per refresh median {statistics.median(per) * 1000:.1f} ms "
            f"(runs: {', '.join(f'{x * 1000:.1f}' for x in per)} ms; --interval {interval}; "
            f"refreshes {short_n} and {long_n} in 3 s and 13 s runs)"
        )
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"(this script itself used {own.ru_utime + own.ru_stime:.2f} s CPU)")
finally:
    for name in names:
        try:
            sandbox.down(env, name=name)
        except Exception as e:
            print(f"sandbox down {name}: {e}")
    subprocess.run(["rm", "-rf", str(base)], check=False)
