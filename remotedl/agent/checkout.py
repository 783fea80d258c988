"""Per-job checkouts: a git worktree of the job's commit under ``<remote_dir>/.remotedl/jobs/<id>/``,
with the configured data paths and ``shared`` directories linked to the ones in ``remote_dir``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from remotedl.agent.store import JOB_DIRS, AgentError

# Never part of the project's commits; excluded so they never block a push.
EXCLUDES = ("/.remotedl/", "/.venv/")


def git(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", cwd, *args], capture_output=True, text=True, check=False)


def git_head(tree: str) -> str | None:
    if not os.path.exists(os.path.join(tree, ".git")):
        return None
    r = git(tree, "rev-parse", "-q", "--verify", "HEAD^{commit}")
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def job_dirs_of(rdir: str) -> Path:
    return Path(rdir).joinpath(*JOB_DIRS)


def ensure_excludes(rdir: str) -> None:
    """``/.remotedl/`` and ``/.venv/`` are never the project's files (idempotent)."""
    info = Path(rdir) / ".git" / "info"
    if not info.parent.is_dir():
        return
    path = info / "exclude"
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    lines = text.splitlines()
    missing = [e for e in EXCLUDES if e not in lines]
    if missing:
        info.mkdir(parents=True, exist_ok=True)
        add = ("" if not text or text.endswith("\n") else "\n") + "".join(f"{e}\n" for e in missing)
        with open(path, "a") as f:
            f.write(add)


def clean_rel(path: str) -> str | None:
    rel = os.path.normpath(path)
    if os.path.isabs(rel) or rel == "." or rel.startswith(".."):
        return None
    return rel


def make_job_dir(
    rdir: str, job_id: int, commit: str, data: list[str], shared: list[str]
) -> tuple[str, list[str]]:
    """The job's own checkout of ``commit``: (its directory, the paths linked to remote_dir)."""
    jd = job_dirs_of(rdir) / str(job_id)
    jd.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(jd):
        raise AgentError(f"the job directory {jd} exists already")
    r = git(rdir, "worktree", "add", "--detach", str(jd), commit)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        if os.path.lexists(jd):  # a half-made checkout (a full disk): gone, and git forgets it
            shutil.rmtree(jd, ignore_errors=True)
        git(rdir, "worktree", "prune")
        raise AgentError(f"could not check out {commit[:10]} for the job in {jd}: {last}")
    linked: list[str] = []
    for rel, is_shared in [*((d, False) for d in data), *((s, True) for s in shared)]:
        clean = clean_rel(rel)
        if clean is None or clean in linked:
            continue
        src = Path(rdir) / clean
        dst = jd / clean
        if is_shared:
            src.mkdir(parents=True, exist_ok=True)
        elif not os.path.lexists(src):
            continue  # not pushed yet: nothing to see
        if os.path.lexists(dst):  # tracked files at that place: the data/shared copy wins
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            else:
                dst.unlink()
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
        linked.append(clean)
    return str(jd), linked


def disk_usage(path: Path) -> int:
    """Bytes on disk under ``path`` (links not followed, hard links once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_blocks * 512
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                s = os.lstat(os.path.join(root, name))
                if (s.st_dev, s.st_ino) in seen:
                    continue
                seen.add((s.st_dev, s.st_ino))
                total += s.st_blocks * 512
    return total


def own_job_dir(rec: dict[str, Any]) -> Path | None:
    """The record's job directory, if it is where job directories are (a damaged or hostile
    record naming another directory is never removed)."""
    wd = rec.get("workdir")
    rdir = rec.get("remote_dir")
    if not wd or not rdir or not rec.get("isolated"):
        return None
    p = Path(wd)
    if p.name != str(rec["id"]) or os.path.realpath(p.parent) != os.path.realpath(job_dirs_of(rdir)):
        return None
    return p


def remove_job_dir(rec: dict[str, Any]) -> None:
    p = own_job_dir(rec)
    if p is None:
        return
    rdir = str(rec["remote_dir"])
    if os.path.lexists(p):
        for rel in rec.get("links") or []:  # the shared data stays where it is
            link = p / rel
            if link.is_symlink():
                link.unlink()
        git(rdir, "worktree", "remove", "--force", "--force", str(p))
        if os.path.lexists(p):
            shutil.rmtree(p, ignore_errors=True)
    git(rdir, "worktree", "prune")


def script_ok(rdir: str, commit: str | None, script: str, links: list[str]) -> bool:
    if commit is None:
        return os.path.exists(os.path.join(rdir, script))
    if git(rdir, "cat-file", "-e", f"{commit}:{script}").returncode == 0:
        return True
    first = os.path.normpath(script).split(os.sep, 1)[0]
    return first in links and os.path.exists(os.path.join(rdir, script))
