"""Every command against the plain tool on a long link (issue 24), side by side on the sandbox box.

The box's sshd sits behind a delay proxy (benchmarks/_delay.py) adding DELAY ms each way; the
table is printed at 50 ms each way (a 100 ms round trip) and at 0 ms (no proxy: loopback), so
nothing gets slower there. remotedl reuses its master connection from the round before (as a
user's next command within a minute does); the plain tool is measured "warm" (a multiplexed
master kept up, the same ControlPersist) in the same rounds. Medians.

Round trips: the proxy counts, per command, the *exchanges* on the link (a burst of bytes from
the laptop that follows bytes from the box: a request after an answer). remotedl and the plain
tool are counted the same way, so "exchanges" compares what each waits for; opening a session
on a warm master costs the plain tool ~2 of them too.

Cold: the first command over a new master (the masters are closed before each), vs plain ssh
without a master: one handshake each.

remotedl runs as a user has it installed: the ``remotedl`` script of a virtual environment holding
a regular (non-editable) install of this tree, made once per run (benchmarks/_install.py). The
development venv's editable install imports a path finder at every interpreter start (~15 ms)
that no ``pip``/``pipx``/``uv tool`` install has; timing it would count that against remotedl.

With ``--against DIR`` (a source tree of another remotedl, e.g. ``git archive main | tar -x -C
DIR``), that version runs too, in the same rounds on the same box and link (the same installed
script with PYTHONPATH=DIR: no editable finder either): before/after figures that share the
machine's load, which a shared machine changes by the minute.

Usage: python benchmarks/rtt.py [ROUNDS] [--delays 50,0] [--only status,jobs,...] [--against DIR]
  NAMES: status, jobs, logs, show, kill, detach, noop, edit, run, cold
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from _box import BenchBox
from _delay import DelayProxy
from _install import installed_remotedl

from remotedl.ssh.openssh import CONTROL_PERSIST

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 5
delays = (
    [int(x) for x in sys.argv[sys.argv.index("--delays") + 1].split(",")]
    if "--delays" in sys.argv
    else [50, 0]
)
only = set(sys.argv[sys.argv.index("--only") + 1].split(",")) if "--only" in sys.argv else None
against = str(Path(sys.argv[sys.argv.index("--against") + 1]).resolve()) if "--against" in sys.argv else None
LIMITS = {"status": 1.5, "jobs": 1.5, "logs": 1.5, "show": 1.5, "kill": 1.5, "detach": 2.0,
          "noop": 1.3, "edit": 1.3, "run": 1.3}  # fmt: skip

box = BenchBox()
env = {**box.environ, "REMOTEDL_HOST": box.alias, "PYTHONUNBUFFERED": "1"}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-rtt-"))
proj = work / "proj"
remotedl = installed_remotedl()
config = Path(box.ssh_config)
direct = config.read_text()
port = box.info.port
home = box.home
mux = work / "mux"
mux.mkdir()
ssh = ["ssh", "-F", str(config)]
warm = [
    *ssh,
    "-o",
    "ControlMaster=auto",
    "-o",
    f"ControlPath={mux}/%C",
    "-o",
    f"ControlPersist={CONTROL_PERSIST}",
]
rsync_warm = ["rsync", "-a", "-e", " ".join(warm)]
proxy: DelayProxy | None = None


T = TypeVar("T")


def as_before(fn: Callable[[], T]) -> T:
    """``fn`` with the --against version of remotedl."""
    assert against is not None
    env["PYTHONPATH"] = against
    try:
        return fn()
    finally:
        env.pop("PYTHONPATH")


def wanted(name: str) -> bool:
    return only is None or name in only


def sh(*argv: str, cwd: Path = proj) -> str:
    return subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def rd(*args: str) -> str:
    return sh(*remotedl, *args)


def timed(argv: list[str], **kw: object) -> tuple[float, int]:
    """(seconds, exchanges on the link) of one command."""
    before = proxy.exchanges if proxy else 0
    t0 = time.perf_counter()
    out = subprocess.DEVNULL
    subprocess.run(argv, cwd=proj, env=env, check=True, stdout=out, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t0, (proxy.exchanges - before) if proxy else 0


def link(delay_ms: int) -> None:
    """Point the box's ssh config at the proxy (or straight at sshd), masters closed."""
    global proxy
    subprocess.run([*warm, "-O", "exit", box.alias], check=False, capture_output=True, env=env)
    close_ours()
    if proxy is not None:
        proxy.close()
        proxy = None
    if delay_ms == 0:
        config.write_text(direct)
        return
    proxy = DelayProxy(port, delay_ms / 1000)
    config.write_text(
        direct.replace(f"Port {port}", f"Port {proxy.port}\n    HostKeyAlias [127.0.0.1]:{port}")
    )


def close_ours() -> None:
    from remotedl.ssh.openssh import close_master
    from remotedl.ssh.resolve import resolve_host

    close_master(resolve_host(box.env, box.alias, ssh_config=str(config)))


rows: list[tuple[str, str, float, float, float, int, int, float]] = []


Timed = Callable[[], tuple[float, int]]


def compare(
    key: str,
    what: str,
    ours: Timed,
    plain: Timed,
    setup: Callable[[bool], None] | None = None,
) -> None:
    """``setup(ours)`` runs before each timed command, untimed."""
    a: list[float] = []
    b: list[float] = []
    c: list[float] = []  # the --against version
    ea: list[int] = []
    eb: list[int] = []
    for side, fn in (
        (True, ours),
        (False, plain),
    ):  # warm both masters (and caches) first
        if setup:
            setup(side)
        fn()
    if against:
        as_before(lambda: (setup(True) if setup else None, ours()))
    for i in range(rounds):
        # With --against, the two versions take turns going first: the one after the plain
        # tool's command of the round before would otherwise always meet the box still busy.
        if against and i % 2:
            c.append(as_before(lambda: (setup(True) if setup else None, ours()))[1][0])
        if setup:
            setup(True)
        t, e = ours()
        a.append(t)
        ea.append(e)
        if against and not i % 2:
            c.append(as_before(lambda: (setup(True) if setup else None, ours()))[1][0])
        if setup:
            setup(False)
        t, e = plain()
        b.append(t)
        eb.append(e)
    ma, mb = statistics.median(a), statistics.median(b)
    mc = statistics.median(c) if c else float("nan")
    r = ma / mb
    limit = LIMITS.get(key)
    row = (key, what, ma, mb, r, int(statistics.median(ea)), int(statistics.median(eb)), mc)
    rows.append(row)
    verdict = f" [{'OK' if limit is None or r <= limit else 'OVER'} <= {limit}]" if limit else ""
    before = f" (--against: {mc:.3f} s, ratio {mc / mb:.2f})" if c else ""
    print(f"  {key}: remotedl {ma:.3f} s{before}, plain warm {mb:.3f} s, ratio {r:.2f}{verdict}  "
          f"exchanges {row[5]} vs {row[6]}  (medians, n={rounds})", flush=True)  # fmt: skip


def make_project() -> None:
    proj.mkdir()
    for d in range(10):
        (proj / "src" / f"d{d}").mkdir(parents=True)
        for f in range(30):
            (proj / "src" / f"d{d}" / f"m{f}.py").write_bytes(os.urandom(1024).hex().encode())
    (proj / "train.py").write_text("import sys\nprint('trained', sys.argv[1:])\n")
    (proj / ".gitignore").write_text("data/\n")
    (proj / "remotedl.toml").write_text('data = ["data/"]\n')
    (proj / "data").mkdir()
    for f in range(100):
        (proj / "data" / f"x{f}.bin").write_bytes(os.urandom(4096))
    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")


def table(delay_ms: int) -> None:
    print(f"# {delay_ms} ms each way ({2 * delay_ms} ms round trip)", flush=True)
    rd("push")
    sh(*rsync_warm, "data/", f"{box.alias}:plain-data/")
    sh(*rsync_warm, "src", "train.py", f"{box.alias}:plain-src/")
    job = json.loads(
        rd(
            "run",
            "--no-push",
            "--detach",
            "--json",
            "--cpu",
            "--",
            "sh",
            "-c",
            "seq 20000",
        )
    )
    while json.loads(rd("show", "--json", str(job["id"])))["status"] == "running":
        time.sleep(0.1)
    jid, log = str(job["id"]), job["log"]

    if wanted("status"):
        compare("status", "`status` vs `ssh box 'nvidia-smi; uptime; df'`",
                lambda: timed([*remotedl, "status"]),
                lambda: timed([*warm, box.alias, "nvidia-smi; uptime; df"]))  # fmt: skip
    if wanted("jobs"):
        compare("jobs", "`jobs` vs `ssh box 'ls ~/.remotedl/jobs'`",
                lambda: timed([*remotedl, "jobs"]),
                lambda: timed([*warm, box.alias, "ls ~/.remotedl/jobs"]))  # fmt: skip
    if wanted("logs"):
        compare("logs", "`logs` (20k lines) vs `ssh box cat LOG`",
                lambda: timed([*remotedl, "logs", jid]),
                lambda: timed([*warm, box.alias, f"cat {log}"]))  # fmt: skip
    if wanted("show"):
        compare("show", "`show` vs `ssh box cat ~/.remotedl/jobs/ID.json`",
                lambda: timed([*remotedl, "show", jid]),
                lambda: timed([*warm, box.alias, f"cat ~/.remotedl/jobs/{jid}.json"]))  # fmt: skip
    if wanted("kill"):
        victim = [""]

        def start_victim(ours: bool) -> None:
            if ours:
                victim[0] = str(
                    json.loads(
                        rd(
                            "run",
                            "--no-push",
                            "--detach",
                            "--json",
                            "--cpu",
                            "sleep",
                            "600",
                        )
                    )["id"]
                )
            else:
                sh(*warm, box.alias, "tmux new -d -s plainvictim 'sleep 600'")

        compare("kill", "`kill` vs `ssh box 'tmux kill-session -t S'`",
                lambda: timed([*remotedl, "kill", victim[0]]),
                lambda: timed([*warm, box.alias, "tmux kill-session -t plainvictim"]),
                setup=start_victim)  # fmt: skip
    if wanted("detach"):
        compare("detach", "`run --detach --no-push` vs `ssh box 'tmux new -d true'`",
                lambda: timed([*remotedl, "run", "--no-push", "--detach", "--cpu", "true"]),
                lambda: timed([*warm, box.alias, "tmux new -d true"]))  # fmt: skip
    if wanted("noop"):
        compare("noop", "`push` no-op (one data path) vs `rsync -a data/ box:`",
                lambda: timed([*remotedl, "push"]),
                lambda: timed([*rsync_warm, "data/", f"{box.alias}:plain-data/"]))  # fmt: skip
    if wanted("edit"):
        n = [0]

        def edit(_: bool) -> None:
            n[0] += 1
            (proj / "src" / "d3" / "m3.py").write_text(f"x = {n[0]}\n")

        compare("edit", "`push`, one edit in 300 files, vs `rsync -a` of the tree",
                lambda: timed([*remotedl, "push"]),
                lambda: timed([*rsync_warm, "src", "train.py", f"{box.alias}:plain-src/"]),
                setup=edit)  # fmt: skip
    if wanted("run"):
        n = [0]

        def edit_train(_: bool) -> None:
            n[0] += 1
            (proj / "train.py").write_text(f"import sys\nprint('trained', {n[0]}, sys.argv[1:])\n")

        def plain_run() -> tuple[float, int]:
            t1, e1 = timed([*rsync_warm, "src", "train.py", f"{box.alias}:plain-src/"])
            t2, e2 = timed([*warm, box.alias, "cd plain-src && python3 train.py"])
            return t1 + t2, e1 + e2

        compare("run", "`run train.py` (push, start, follow to exit) vs rsync + `ssh box python3 train.py`",
                lambda: timed([*remotedl, "run", "--cpu", "python3", "train.py"]),
                plain_run, setup=edit_train)  # fmt: skip
    if wanted("cold"):

        def cold_ours() -> tuple[float, int]:
            close_ours()
            return timed([*remotedl, "jobs"])

        def cold_plain() -> tuple[float, int]:
            return timed([*ssh, "-o", "ControlPath=none", box.alias, "ls ~/.remotedl/jobs"])

        compare("cold", "cold `jobs` (new master) vs `ssh box 'ls ~/.remotedl/jobs'` (no master)",
                cold_ours, cold_plain)  # fmt: skip


try:
    make_project()
    results: dict[int, list[tuple[str, str, float, float, float, int, int, float]]] = {}
    for d in delays:
        link(d)
        rows = []
        table(d)
        results[d] = rows
    print()
    # Round trips waited for: what the long link added to the command's time, in round trips
    # (the same command at 0 ms, same run, is the rest: start-ups, the box's work).
    base = {row[0]: row for row in results.get(0, [])}
    for d, rs in results.items():
        print(f"## {d} ms each way, medians of {rounds}; exchanges = request/answer turns on the link")
        print("| command | remotedl | plain, warm | ratio | exchanges | round trips waited |"
              + (" --against | its ratio |" if against else ""))  # fmt: skip
        print("|---|---|---|---|---|---|" + ("---|---|" if against else ""))
        for key, what, ma, mb, r, ea, eb, mc in rs:
            ex = f"{ea} / {eb}" if d else "-"
            waited = "-"
            if d and key in base:
                rtt = 2 * d / 1000
                waited = f"{(ma - base[key][2]) / rtt:.1f} / {(mb - base[key][3]) / rtt:.1f}"
            extra = f" {mc:.2f} s | {mc / mb:.2f} |" if against else ""
            print(f"| {what} | {ma:.2f} s | {mb:.2f} s | {r:.2f} | {ex} | {waited} |{extra}")
        print()
finally:
    subprocess.run([*warm, "-O", "exit", box.alias], check=False, capture_output=True, env=env)
    config.write_text(direct)
    if proxy is not None:
        proxy.close()
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base)], check=False)
