"""Faults, races and hostile boxes against the sandbox box (issue 17): for each fault, what was
lost (must be nothing) and the time to recover.

Each fault is injected for real: a cut is every SSH connection to the box dropped at once (the
box's sshd per-connection processes, found from the sandbox's own listening sshd pid, killed);
the tmux server is the box's own (its TMUX_TMPDIR); damaged records are written into the box's
~/.remotedl/jobs. Nothing machine-wide is killed by name.

- push cut mid-file: a 256 MB file in a configured data path, the connection cut once >= 16 MB
  of it is on the box; a new file (absent there before) and a changed one (its old version
  there). The real name must be absent or the old version, whole; the next push (timed) must
  leave the file byte-equal, sending only what the kept partial lacks.
- pull cut mid-file: the same for `pull --tree` of a 256 MB box file.
- `logs -f` cut twice while a job writes a numbered line every 20 ms: every line exactly once;
  recovery is the time from each cut to the first line written after it arriving.
- `jobs` listed in a loop while 10 `run --detach` start at once: no job ever shown `lost`, each
  one ran (its log has its line). Time: the batch's wall time (no recovery).
- the box's tmux server killed under a running job: the job lives on and `jobs` says running,
  never lost; time from `remotedl kill` to the state `killed` (its process group gone).
- damaged job records (`{}`, `null`, truncated JSON): jobs / logs / run / jobs rm still work,
  no other job hidden, no id reused.
- 4 first pushes at once into a new remote_dir (4 copies of the project): from one laptop (its
  lock makes them take turns) and with two spellings of the directory (~/x and /abs/x: the local
  lock cannot serialise those, the box's claim must). Time: the batch's wall time.
- checkout into a 1 MiB tmpfs remote_dir (needs root and mount; skipped otherwise): the push
  fails and rolls back to the previous commit, clean; the next push after freeing space (timed)
  works.

Usage: python benchmarks/faults.py [ROUNDS]   (run from benchmarks/, ROUNDS default 3)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _box import BenchBox
from _install import installed_remotedl

from remotedl import jobs
from remotedl.agent.client import AgentClient
from remotedl.errors import RemotedlError
from remotedl.ssh import resolve_host

rounds = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 3
BIG = 256 << 20  # the file cut mid-way
CUT_AT = 16 << 20  # cut once this much of it is on the other side
LINES = 300  # the logs -f job: a line every 20 ms
STARTS = 10  # run --detach at once while jobs lists
remotedl = installed_remotedl()

box = BenchBox()
env = {
    **box.environ,
    "REMOTEDL_HOST": box.alias,
    "REMOTEDL_SSH_CONFIG": box.ssh_config,
    "PYTHONUNBUFFERED": "1",
}
work = Path(tempfile.mkdtemp(prefix="remotedl-bench-faults-"))
RDIR = "~/faults"
box_rdir = box.home / "faults"
records_dir = box.home / ".remotedl" / "jobs"
spec = resolve_host(box.env, box.alias, ssh_config=box.ssh_config)


@dataclass
class Row:
    fault: str
    checked: str
    lost: list[int] = field(default_factory=list)  # per round; must all be 0
    lost_unit: str = ""
    times: list[float] = field(default_factory=list)
    time_note: str = ""  # shown after the figures (what was timed, bytes re-sent, ...)
    skipped: str = ""
    problems: list[str] = field(default_factory=list)

    def lost_cell(self) -> str:
        if self.skipped:
            return "—"
        total = sum(self.lost)
        unit = f" {self.lost_unit}" if self.lost_unit else ""
        return f"**{total}**{unit}" if total == 0 else f"**{total}{unit} LOST**"

    def time_cell(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if not self.times:
            return self.time_note or "n/a"
        figures = f"{statistics.median(self.times):.2f} s, {max(self.times):.2f} s (n={len(self.times)})"
        return f"{figures}; {self.time_note}" if self.time_note else figures


rows: list[Row] = []


# ------------------------------------------------------------------ helpers


def cli(*args: str, cwd: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*remotedl, *args], cwd=cwd, env={**env, **(extra or {})}, capture_output=True, text=True, check=False
    )


def popen(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*remotedl, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def timed_cli(*args: str, cwd: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    t0 = time.perf_counter()
    r = cli(*args, cwd=cwd)
    return time.perf_counter() - t0, r


def git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return r.stdout.strip()


def git_init(proj: Path) -> None:
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init")


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(1 << 24))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def bytes_differing(a: Path, b: Path) -> int:
    """Bytes of ``b`` that are not ``a``'s (a missing or short copy counts what it lacks)."""
    if not b.exists():
        return a.stat().st_size
    diff = abs(a.stat().st_size - b.stat().st_size)
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if not ca or not cb:
                break
            if ca != cb:
                diff += sum(x != y for x, y in zip(ca, cb, strict=False))
    return diff


def files_over(where: Path, size: int, but: Path | None = None) -> list[Path]:
    found = []
    for dirpath, _, names in os.walk(where):
        for n in names:
            p = Path(dirpath) / n
            with contextlib.suppress(OSError):
                if p != but and p.stat().st_size >= size:
                    found.append(p)
    return found


def wait_for(cond: Callable[[], object], seconds: float, step: float = 0.005) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return None


def cut() -> int:
    """Drop every SSH connection to the box: the per-connection processes below the sandbox's
    listening sshd (by its pid), never the listener, never what the sessions started."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append((int(entry), comm))
    pids, todo = [], [box.info.pid]
    while todo:
        for pid, comm in children.get(todo.pop(), []):
            if comm.startswith("sshd"):
                pids.append(pid)
                todo.append(pid)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def box_tmux(*args: str) -> subprocess.CompletedProcess[str]:
    """tmux on the box's own server (its TMUX_TMPDIR), as the box user (this user)."""
    tenv = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    tenv["TMUX_TMPDIR"] = box.info.tmux_dir
    return subprocess.run(["tmux", *args], env=tenv, capture_output=True, text=True, check=False)


def job_list(cwd: Path) -> dict[int, dict[str, Any]]:
    r = cli("jobs", "--all", "--json", cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"jobs failed: {r.stderr}")
    return {int(j["id"]): j for j in json.loads(r.stdout)}


def run_detached(cwd: Path, *command: str) -> dict[str, Any]:
    r = cli("run", "--no-push", "--detach", "--json", "--cpu", "--", *command, cwd=cwd)
    if r.returncode != 0:
        raise RuntimeError(f"run failed: {r.stderr}")
    rec: dict[str, Any] = json.loads(r.stdout)
    return rec


def ours(pid: int) -> bool:
    """The process is one of this box's (its command line names the box's directory)."""
    try:
        return str(box.base).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stop_leftover_jobs() -> None:
    """Jobs outlive their tmux server by design, so the sandbox's own teardown (which kills only
    that server) leaves a job still running behind, and its runner later writes its record into
    the removed box home. A round that failed half-way may leave one: end it, by the pids in
    this box's own records (checked to be this box's processes), before the box goes."""
    for path in records_dir.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("status") not in ("queued", "starting", "running"):
            continue
        for key, kill in (("runner_pid", os.kill), ("pgid", os.killpg)):
            pid = rec.get(key)
            if isinstance(pid, int) and pid > 1 and ours(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    kill(pid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mb(values: list[int]) -> str:
    return f"{statistics.median(values) / (1 << 20):.0f} MB"


def note(row: Row, text: str) -> None:
    row.problems.append(text)
    print(f"  ! {row.fault}: {text}", flush=True)


# ------------------------------------------------------------------ the project


def make_project(where: Path) -> Path:
    where.mkdir(parents=True)
    (where / "train.py").write_text("print('hi')\n")
    (where / "README").write_text("hello\n")
    (where / ".gitignore").write_text("data/\nout/\n")
    (where / "remotedl.toml").write_text(f'remote_dir = "{RDIR}"\ndata = ["data"]\n')
    (where / "data").mkdir()
    (where / "data" / "small.txt").write_text("small\n")
    git_init(where)
    return where


# ------------------------------------------------------------------ 1. push cut mid-file


def push_cut(proj: Path) -> None:
    big = proj / "data" / "big.bin"
    target = box_rdir / "data" / "big.bin"
    partial = box_rdir / "data" / ".remotedl-partial" / "big.bin"
    rows_by = {
        kind: Row(
            f"push cut mid-file ({kind})",
            f"256 MB file in a data path, every SSH connection cut at >= 16 MB on the box: real name "
            f"{'absent' if kind == 'new file' else 'still the old version, whole'}; next push byte-equal",
            lost_unit="bytes / truncated files",
        )
        for kind in ("new file", "changed file")
    }
    resent: dict[str, list[int]] = {k: [] for k in rows_by}
    kepts: dict[str, list[int]] = {k: [] for k in rows_by}
    write_random(big, BIG)
    for r in range(rounds):
        for kind, row in rows_by.items():
            if kind == "new file":
                target.unlink(missing_ok=True)
                partial.unlink(missing_ok=True)
                old = None
            else:
                if not target.exists():  # the previous version, whole, on the box
                    cli("push", cwd=proj).check_returncode()
                old = digest(target)
                with big.open("r+b") as f:  # a changed file: 1 MB rewritten at 200 MB
                    f.seek(200 << 20)
                    f.write(os.urandom(1 << 20))
            p = popen("push", "--json", cwd=proj)

            def cut_point(p: subprocess.Popen[str] = p) -> object:
                return p.poll() is not None or files_over(box_rdir / "data", CUT_AT, but=target)

            seen = wait_for(cut_point, 60)
            if p.poll() is not None or not seen:
                p.communicate()
                note(row, f"round {r}: the push ended before the cut (exit {p.returncode}); not counted")
                continue
            killed = cut()
            p.communicate(timeout=60)
            if p.returncode == 0:
                note(row, f"round {r}: the cut push ({killed} connections dropped) still exited 0")
            wait_for(partial.exists, 10, 0.05)
            lost = 0
            if old is None and target.exists():
                lost += 1
                note(row, f"round {r}: {target.stat().st_size} bytes under the real name after the cut")
            if old is not None and digest(target) != old:
                lost += 1
                note(row, f"round {r}: the old version under the real name is not whole after the cut")
            kept = partial.stat().st_size if partial.exists() else 0
            if kept == 0:
                note(row, f"round {r}: no partial kept on the box after the cut")
            t, res = timed_cli("push", "--json", cwd=proj)
            if res.returncode != 0:
                lost += 1
                note(row, f"round {r}: the resuming push failed: {res.stderr.strip()[-300:]}")
            else:
                sent = sum(
                    tr["literal_bytes"] for tr in json.loads(res.stdout)["transfers"] if "data" in tr["path"]
                )
                resent[kind].append(sent)
                kepts[kind].append(kept)
                row.times.append(t)
            lost += bytes_differing(big, target)
            if partial.exists():
                note(row, f"round {r}: the partial is still on the box after the resuming push")
            row.lost.append(lost)
            print(f"  push cut ({kind}) round {r}: kept {kept >> 20} MB, resume {t:.2f} s, lost {lost}",
                  flush=True)  # fmt: skip
    for kind, row in rows_by.items():
        if resent[kind]:
            row.time_note = (
                f"the resuming push; partial kept on the box {mb(kepts[kind])}, "
                f"re-sent {mb(resent[kind])} of {BIG >> 20} MB (medians)"
            )
        rows.append(row)
    big.unlink()
    target.unlink(missing_ok=True)


# ------------------------------------------------------------------ 2. pull cut mid-file


def pull_cut(proj: Path) -> None:
    row = Row(
        "pull cut mid-file",
        "`pull --tree out` of a 256 MB box file, every SSH connection cut at >= 16 MB here: "
        "real name absent here; next pull byte-equal",
        lost_unit="bytes / truncated files",
    )
    src = box_rdir / "out" / "model.bin"
    write_random(src, BIG)
    dest = proj / "out" / "model.bin"
    partial = proj / "out" / ".remotedl-partial" / "model.bin"
    resent: list[int] = []
    kepts: list[int] = []
    for r in range(rounds):
        shutil.rmtree(proj / "out", ignore_errors=True)
        p = popen("pull", "--tree", "--json", "out", cwd=proj)

        def cut_point(p: subprocess.Popen[str] = p) -> object:
            return p.poll() is not None or files_over(proj / "out", CUT_AT)

        seen = wait_for(cut_point, 60)
        if p.poll() is not None or not seen:
            _, err = p.communicate()
            note(row, f"round {r}: the pull ended before the cut (exit {p.returncode}): {err.strip()[-200:]}")
            continue
        cut()
        p.communicate(timeout=60)
        if p.returncode == 0:
            note(row, f"round {r}: the cut pull still exited 0")
        lost = 0
        if dest.exists():
            lost += 1
            note(row, f"round {r}: {dest.stat().st_size} bytes under the real name after the cut")
        kept = partial.stat().st_size if partial.exists() else 0
        if kept == 0:
            note(row, f"round {r}: no partial kept here after the cut")
        t, res = timed_cli("pull", "--tree", "--json", "out", cwd=proj)
        if res.returncode != 0:
            lost += 1
            note(row, f"round {r}: the resuming pull failed: {res.stderr.strip()[-300:]}")
        else:
            resent.append(sum(tr["literal_bytes"] for tr in json.loads(res.stdout)["transfers"]))
            kepts.append(kept)
            row.times.append(t)
        lost += bytes_differing(src, dest)
        row.lost.append(lost)
        print(f"  pull cut round {r}: kept {kept >> 20} MB, resume {t:.2f} s, lost {lost}", flush=True)
    if resent:
        row.time_note = (
            f"the resuming pull; partial kept here {mb(kepts)}, "
            f"fetched again {mb(resent)} of {BIG >> 20} MB (medians)"
        )
    rows.append(row)
    shutil.rmtree(proj / "out", ignore_errors=True)
    src.unlink()


# ------------------------------------------------------------------ 3. logs -f cut twice


COUNTER = (
    "import time\n"
    f"for i in range(1, {LINES + 1}):\n"
    "    print(i, repr(time.time()), flush=True)\n"
    "    time.sleep(0.02)\n"
)


def logs_cut(proj: Path) -> None:
    row = Row(
        "`logs -f` cut twice mid-job",
        f"a job writes {LINES} numbered lines, one per 20 ms; every SSH connection cut twice while "
        "`logs -f` follows: each line exactly once, follower exits 0",
        lost_unit="missing + repeated lines",
    )
    by_cut: dict[int, list[float]] = {}
    for r in range(rounds):
        job = run_detached(proj, "python3", "-c", COUNTER)
        p = popen("logs", "-f", str(job["id"]), cwd=proj)
        got: list[tuple[float, int, float]] = []  # (arrival, number, written)
        errs: list[str] = []

        def read_out(p: subprocess.Popen[str] = p, got: list[tuple[float, int, float]] = got) -> None:
            assert p.stdout is not None
            for line in p.stdout:
                now = time.time()
                try:
                    n, written = line.split()
                    got.append((now, int(n), float(written)))
                except ValueError:
                    got.append((now, -1, 0.0))

        def read_err(p: subprocess.Popen[str] = p, errs: list[str] = errs) -> None:
            assert p.stderr is not None
            errs.extend(p.stderr)

        readers = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
        for t in readers:
            t.start()
        cuts: list[float] = []
        for after in (50, 60):
            # Cut once `after` lines written after the previous cut (or the start) have arrived.
            since = cuts[-1] if cuts else 0.0

            def enough(
                since: float = since, after: int = after, got: list[tuple[float, int, float]] = got
            ) -> bool:
                return sum(g[2] > since for g in got) >= after

            if not wait_for(enough, 30):
                note(row, f"round {r}: the follower got no lines to cut after ({len(got)} so far)")
                break
            cuts.append(time.time())
            if cut() == 0:
                note(row, f"round {r}: no connection to cut")
        try:
            code = p.wait(60)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
            note(row, f"round {r}: the follower did not end within 60 s of the cuts")
        for t in readers:
            t.join(10)
        numbers = [n for _, n, _ in got]
        missing = len(set(range(1, LINES + 1)) - set(numbers))
        repeated = len(numbers) - len(set(numbers))
        if code != 0:
            note(row, f"round {r}: the follower exited {code}: {''.join(errs).strip()[-300:]}")
        if missing or repeated or numbers != list(range(1, LINES + 1)):
            note(row, f"round {r}: {missing} lines missing, {repeated} repeated (or out of order)")
        row.lost.append(missing + repeated + (0 if code == 0 else 1))
        gaps = []
        for c in cuts:
            after_cut = [arrival for arrival, _, written in got if written > c]
            if after_cut:
                gaps.append(min(after_cut) - c)
        row.times.extend(gaps)
        for i, g in enumerate(gaps):
            by_cut.setdefault(i, []).append(g)
        reconnects = sum("reconnecting" in e for e in errs)
        print(f"  logs -f round {r}: {len(numbers)} lines, gaps {[round(g, 2) for g in gaps]} s, "
              f"{reconnects} reconnect notes, lost {row.lost[-1]}", flush=True)  # fmt: skip
    per_cut = " / ".join(f"{statistics.median(v):.2f} s" for _, v in sorted(by_cut.items()))
    row.time_note = (
        "from each cut to the first line written after it arriving (2 cuts a round); "
        f"1st / 2nd cut of a follow: {per_cut} (medians)"
    )
    rows.append(row)


# ------------------------------------------------------------------ 4. jobs listed while jobs start


def jobs_while_starting(proj: Path) -> None:
    row = Row(
        "`jobs` while jobs start",
        f"{STARTS} `run --detach` at once while the jobs list is read in a loop: none ever "
        "shown lost, each ran (its log has its line) and succeeded",
        lost_unit="jobs shown lost / not run",
    )
    for r in range(rounds):
        seen_lost: set[int] = set()
        lists = [0]
        done = threading.Event()

        def lister(
            seen_lost: set[int] = seen_lost,
            done: threading.Event = done,
            lists: list[int] = lists,
            r: int = r,
        ) -> None:
            # In this process (the library under `remotedl jobs`), so it lists as often as the box
            # answers rather than once per Python start-up.
            client = AgentClient(spec, python=env.get("REMOTEDL_PYTHON", "python3"))
            while not done.is_set():
                try:
                    recs = jobs.list_jobs(client, all_jobs=True)
                except RemotedlError as e:
                    note(row, f"round {r}: a listing failed: {e}")
                    time.sleep(0.1)
                    continue
                lists[0] += 1
                seen_lost.update(j.id for j in recs if j.status == "lost")

        t = threading.Thread(target=lister)
        t.start()
        t0 = time.perf_counter()
        try:
            start = ["run", "--no-push", "--detach", "--json", "--cpu"]
            procs = [
                popen(*start, "--name", f"start-{r}-{i}", "--", "sh", "-c", f"echo ran {r}-{i}", cwd=proj)
                for i in range(STARTS)
            ]
            results = [(p.wait(120), *p.communicate()) for p in procs]
            batch = time.perf_counter() - t0
        finally:
            done.set()
            t.join(60)
        ids: dict[int, str] = {}
        failed = 0
        for i, (code, out, err) in enumerate(results):
            if code != 0:
                failed += 1
                note(row, f"round {r}: run {i} failed ({code}): {err.strip()[-200:]}")
            else:
                ids[json.loads(out)["id"]] = f"ran {r}-{i}\n"

        def ended(ids: dict[int, str] = ids) -> dict[int, dict[str, Any]] | None:
            jl = job_list(proj)
            return jl if all(jl[i]["status"] not in ("queued", "starting", "running") for i in ids) else None

        final = wait_for(ended, 30, 0.2)
        jl = final if isinstance(final, dict) else job_list(proj)
        not_run = 0
        for job_id, line in ids.items():
            rec = jl.get(job_id, {})
            log = Path(rec.get("log") or "/nonexistent")
            text = log.read_text() if log.exists() else ""
            if rec.get("status") != "succeeded" or text != line:
                not_run += 1
                note(row, f"round {r}: job {job_id} ended {rec.get('status')!r}, log {text!r}")
        ours_lost = seen_lost & set(ids)
        if ours_lost:
            note(row, f"round {r}: jobs {sorted(ours_lost)} were shown lost while starting")
        row.lost.append(failed + not_run + len(ours_lost))
        row.times.append(batch)
        print(f"  jobs while starting round {r}: {len(ids)} started in {batch:.2f} s, {lists[0]} listings, "
              f"lost {row.lost[-1]}", flush=True)  # fmt: skip
    row.time_note = f"not a recovery: the wall time of the {STARTS} starts"
    rows.append(row)


# ------------------------------------------------------------------ 5. tmux server killed


def tmux_killed(proj: Path) -> None:
    row = Row(
        "box's tmux server killed under a running job",
        "`tmux kill-server` on the box's socket: the job's process group lives on, `jobs` shows it "
        "running (3 listings), `remotedl kill` ends it",
        lost_unit="jobs ended or shown lost wrongly",
    )
    for r in range(rounds):
        job = run_detached(proj, "sleep", "300")
        job_id = int(job["id"])

        def started(job_id: int = job_id) -> dict[str, Any] | None:
            rec = job_list(proj)[job_id]
            return rec if rec.get("pgid") else None

        rec = wait_for(started, 15, 0.1)
        if not isinstance(rec, dict):
            note(row, f"round {r}: job {job['id']} never recorded its process group")
            continue
        pgid = int(rec["pgid"])
        k = box_tmux("kill-server")
        if k.returncode != 0:
            note(row, f"round {r}: tmux kill-server failed: {k.stderr.strip()}")
        wrong = 0
        for _ in range(3):
            status = job_list(proj)[job_id]["status"]
            if status != "running":
                wrong += 1
                note(row, f"round {r}: job {job['id']} shown {status!r} while its processes run")
            time.sleep(0.2)
        if not group_alive(pgid):
            wrong += 1
            note(row, f"round {r}: the job's process group died with the tmux server")
        t0 = time.perf_counter()
        res = cli("kill", str(job_id), "--grace", "1", "--json", cwd=proj)

        def killed_state(job_id: int = job_id) -> bool:
            return bool(job_list(proj)[job_id]["status"] == "killed")

        def group_gone(pgid: int = pgid) -> bool:
            return not group_alive(pgid)

        killed = wait_for(killed_state, 15, 0.05)
        gone = wait_for(group_gone, 15, 0.01)
        t = time.perf_counter() - t0
        if res.returncode != 0 or not killed or not gone:
            wrong += 1
            note(row, f"round {r}: kill: exit {res.returncode}, state killed {bool(killed)}, group gone "
                      f"{bool(gone)}: {res.stderr.strip()[-200:]}")  # fmt: skip
        else:
            row.times.append(t)
        row.lost.append(wrong)
        print(f"  tmux killed round {r}: kill to killed {t:.2f} s, lost {wrong}", flush=True)
    row.time_note = "from `remotedl kill` to the state `killed`, its process group gone"
    rows.append(row)


# ------------------------------------------------------------------ 6. damaged job records


def damaged_records(proj: Path) -> None:
    row = Row(
        "damaged job records",
        "`{}`, `null` and truncated JSON as the next 3 ids' records: `jobs`, `logs`, `run`, "
        "`jobs rm` work; no other job hidden; no id reused",
        lost_unit="jobs hidden / ids reused / commands failed",
    )
    for r in range(rounds):
        first = int(run_detached(proj, "sh", "-c", "echo fine")["id"])

        def succeeded(first: int = first) -> bool:
            return bool(job_list(proj)[first]["status"] == "succeeded")

        wait_for(succeeded, 15, 0.1)
        known = set(job_list(proj))
        bad = {first + 1: "{}", first + 2: "null", first + 3: '{"id": 7, "na'}
        for job_id, text in bad.items():
            (records_dir / f"{job_id}.json").write_text(text)
        lost = 0
        res = cli("jobs", "--all", "--json", cwd=proj)
        if res.returncode != 0:
            lost += 1
            note(row, f"round {r}: jobs failed: {res.stderr.strip()[-200:]}")
        else:
            listed = {j["id"] for j in json.loads(res.stdout)}
            hidden = known - listed
            lost += len(hidden)
            if hidden:
                note(row, f"round {r}: jobs {sorted(hidden)} hidden by the damaged records")
            if listed & set(bad):
                note(row, f"round {r}: damaged records listed as jobs: {sorted(listed & set(bad))}")
        res = cli("logs", str(first), cwd=proj)
        if res.returncode != 0 or res.stdout != "fine\n":
            lost += 1
            why = f"exit {res.returncode}, {res.stdout!r} {res.stderr.strip()[-200:]}"
            note(row, f"round {r}: logs {first}: {why}")
        try:
            second = run_detached(proj, "sh", "-c", "echo fine")["id"]
            if second <= first + 3:
                lost += 1
                note(row, f"round {r}: id {second} reused (damaged records at {first + 1}..{first + 3})")
        except RuntimeError as e:
            lost += 1
            note(row, f"round {r}: {e}")
        res = cli("jobs", "rm", *(str(i) for i in bad), "--yes", cwd=proj)
        if res.returncode != 0 or any((records_dir / f"{i}.json").exists() for i in bad):
            lost += 1
            why = f"exit {res.returncode} {res.stderr.strip()[-200:]}"
            note(row, f"round {r}: jobs rm of the damaged records: {why}")
        row.lost.append(lost)
        print(f"  damaged records round {r}: lost {lost}", flush=True)
    row.time_note = "n/a (nothing to recover: every command works at once)"
    rows.append(row)


# ------------------------------------------------------------------ 7. concurrent first pushes


def first_pushes(copies: list[Path]) -> None:
    variants: dict[str, Callable[[str], list[str]]] = {
        "one laptop": lambda name: [f"~/{name}"] * 4,
        "~/x and /abs/x": lambda name: [f"~/{name}", str(box.home / name)] * 2,
    }
    for label, spellings in variants.items():
        row = Row(
            f"4 first pushes at once into a new remote_dir ({label})",
            "4 copies of the project push into the same new directory at once: all succeed, one "
            "repository there with the files, no leftovers"
            + (" (two spellings: the local lock cannot serialise them, the box's claim must)"
               if label != "one laptop" else " (this machine's lock makes them take turns)"),
            lost_unit="failed pushes / damaged trees",
        )  # fmt: skip
        for r in range(rounds):
            name = f"first-{label[:3].strip('~/ ')}-{r}"
            t0 = time.perf_counter()
            procs = [
                popen("push", "--no-data", "--remote-dir", d, cwd=c)
                for c, d in zip(copies, spellings(name), strict=True)
            ]
            results = [(p.wait(120), p.communicate()[1]) for p in procs]
            batch = time.perf_counter() - t0
            failed = [err.strip()[-200:] for code, err in results if code != 0]
            for err in failed:
                note(row, f"round {r}: a push failed: {err}")
            where = box.home / name
            damaged = 0
            text = (where / "train.py").read_text() if (where / "train.py").exists() else ""
            if text != "print('hi')\n":
                damaged += 1
                note(row, f"round {r}: {where}/train.py missing or wrong")
            if (where / ".git" / ".git").exists() or list(where.parent.glob(".remotedl-new.*")):
                damaged += 1
                note(row, f"round {r}: a nested .git or a .remotedl-new.* leftover on the box")
            row.lost.append(len(failed) + damaged)
            row.times.append(batch)
            print(f"  first pushes ({label}) round {r}: {batch:.2f} s, lost {row.lost[-1]}", flush=True)
        row.time_note = "not a recovery: the wall time of the 4 pushes together"
        rows.append(row)


# ------------------------------------------------------------------ 8. out of disk on the box


def out_of_disk(tiny: Path) -> None:
    row = Row(
        "checkout runs out of disk on the box",
        "remote_dir on a 1 MiB tmpfs, a push of 1.8 MB of new files: it fails, the tree is back at "
        "the previous commit and clean; after freeing the space the next push works",
        lost_unit="bad rollbacks / failed pushes",
    )
    probe = work / "mount-probe"
    probe.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs"]
    m = subprocess.run([*mount, str(probe)], capture_output=True, text=True, check=False)
    if m.returncode != 0:
        row.skipped = f"cannot mount a tmpfs here ({m.stderr.strip()})"
        rows.append(row)
        return
    subprocess.run(["umount", str(probe)], check=False)
    for r in range(rounds):
        proj = work / f"disk-{r}"
        shutil.copytree(tiny, proj, symlinks=True)
        rdir = f"~/small-disk-{r}"
        where = box.home / f"small-disk-{r}"
        where.mkdir()
        subprocess.run([*mount, str(where)], check=True)
        try:
            lost = 0
            res = cli("push", "--no-data", "--remote-dir", rdir, cwd=proj)
            if res.returncode != 0:
                note(row, f"round {r}: the first push failed: {res.stderr.strip()[-200:]}")
                row.lost.append(1)
                continue
            before = git(where, "rev-parse", "HEAD")
            (proj / "README").write_text("changed\n")
            for i in range(3):
                (proj / f"big{i}.txt").write_text("the same line again\n" * 30_000)
            res = cli("push", "--no-data", "--remote-dir", rdir, cwd=proj)
            if res.returncode == 0 or "back at the previous commit" not in res.stderr:
                why = f"exit {res.returncode}: {res.stderr.strip()[-300:]}"
                note(row, f"round {r}: the full-disk push did not fail and roll back as promised: {why}")
            if (
                git(where, "rev-parse", "HEAD") != before
                or git(where, "status", "--porcelain", "--untracked-files=all") != ""
                or (where / "README").read_text() != "hello\n"
                or list(where.glob("big*"))
            ):
                lost += 1
                note(row, f"round {r}: the tree was not rolled back whole")
            for i in range(3):
                (proj / f"big{i}.txt").unlink()
            t, res = timed_cli("push", "--no-data", "--remote-dir", rdir, cwd=proj)
            if res.returncode != 0 or (where / "README").read_text() != "changed\n":
                lost += 1
                why = f"exit {res.returncode} {res.stderr.strip()[-300:]}"
                note(row, f"round {r}: the push after freeing space: {why}")
            else:
                row.times.append(t)
            row.lost.append(lost)
            print(f"  out of disk round {r}: next push {t:.2f} s, lost {lost}", flush=True)
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
    row.time_note = "the next push after freeing the space"
    rows.append(row)


# ------------------------------------------------------------------ main


t_all = time.perf_counter()
try:
    proj = make_project(work / "proj")
    cli("push", cwd=proj).check_returncode()
    run_detached(proj, "true")  # the agent is on the box before anything is timed
    tiny = work / "tiny"
    tiny.mkdir()
    (tiny / "train.py").write_text("print('hi')\n")
    (tiny / "README").write_text("hello\n")
    git_init(tiny)
    copies = []
    for i in range(4):
        copies.append(work / f"copy{i}" / "tiny")  # the same project (same root commit), 4 places
        shutil.copytree(tiny, copies[-1], symlinks=True)

    steps: list[tuple[str, Callable[[], None]]] = [
        ("push cut mid-file", lambda: push_cut(proj)),
        ("pull cut mid-file", lambda: pull_cut(proj)),
        ("logs -f cut", lambda: logs_cut(proj)),
        ("jobs while jobs start", lambda: jobs_while_starting(proj)),
        ("tmux server killed", lambda: tmux_killed(proj)),
        ("damaged records", lambda: damaged_records(proj)),
        ("concurrent first pushes", lambda: first_pushes(copies)),
        ("out of disk", lambda: out_of_disk(tiny)),
    ]
    for name, step in steps:
        t0 = time.perf_counter()
        print(f"# {name}", flush=True)
        step()
        print(f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
finally:
    stop_leftover_jobs()
    box.close()
    subprocess.run(["rm", "-rf", str(work), str(box.base)], check=False)

print(f"\n## Faults and figures (N={rounds} rounds per fault, {time.perf_counter() - t_all:.0f} s in all)\n")
print("| fault | what was checked | lost | time to recover (median, max over N) |")
print("|---|---|---|---|")
for row in rows:
    print(f"| {row.fault} | {row.checked} | {row.lost_cell()} | {row.time_cell()} |")
problems = [f"- {row.fault}: {p}" for row in rows for p in row.problems]
if problems:
    print("\nNot as the issue promises:")
    print("\n".join(problems))
lost_total = sum(sum(row.lost) for row in rows)
print(f"\n{'nothing lost' if lost_total == 0 else f'LOST: {lost_total}'}; {len(problems)} problem(s) noted")
sys.exit(1 if lost_total or problems else 0)
