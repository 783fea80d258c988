"""Provenance on the laptop: the commit a job ran kept under a ref of the local repository
(fetched from the box when missing), the files of its snapshot, and ``diff``."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from remotedl import proc
from remotedl.errors import RemotedlError, UsageError
from remotedl.schema import JobRecord
from remotedl.snapshot import DEFAULT_MAX_FILE
from remotedl.ssh.channel import Box, NoFrame
from remotedl.ssh.openssh import openssh_failure

# ------------------------------------------------------------------ provenance on the laptop


def snapshot_files(root: Path, head: str | None, commit: str | None, limit: int = 1000) -> list[str]:
    """The files a snapshot commit changed against the HEAD it was made on."""
    if not commit or not head or commit == head:
        return []
    from remotedl.snapshot import snapshot_changes

    return snapshot_changes(root, head, commit)[:limit]


_COMMIT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def job_ref(alias: str, job_id: int) -> str:
    """The local ref that keeps a job's commit reachable: refs/remotedl/jobs/<host>/<id>."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", alias).strip("_") or "box"
    return f"refs/remotedl/jobs/{host}/{job_id}"


def keep_commit(root: Path, alias: str, rec: JobRecord) -> str | None:
    """Point the job's ref at its commit, so `git show` works after `git gc`; the ref, or
    None when this repository does not have the commit (made on another laptop)."""
    if not rec.git_commit or not _COMMIT_ID.fullmatch(rec.git_commit):
        return None
    ref = job_ref(alias, rec.id)
    # update-ref refuses an object the repository does not have: one git call, not two
    r = proc.run(["git", "-C", str(root), "update-ref", ref, rec.git_commit], check=False)
    return ref if r.returncode == 0 else None


# "$1": the box's work tree, "$2": a commit there; then commits the laptop has. Prints "@@pack"
# and a thin pack of "$2"'s objects over those of the laptop's commits the box has too (the
# laptop completes it with `index-pack --fix-thin`), or "@@missing". Reads only.
_PACK_JOB_COMMIT = r"""
cd -- "$1" 2>/dev/null && git cat-file -e "$2^{commit}" 2>/dev/null || { echo "@@missing"; exit 0; }
want=$2; shift 2
echo "@@pack"
{ echo "$want"; for b; do git cat-file -e "$b^{commit}" 2>/dev/null && echo "^$b"; done; } |
  git pack-objects --stdout --revs --thin --delta-base-offset -q
"""


def fetch_job_commit(box: Box, root: Path, rec: JobRecord) -> bool:
    """Bring the job's commit (made by another laptop's push) from the box's repository into
    this one's objects; False when the box no longer has it. One round trip, over the framed
    channel (start-up noise cannot break it, as it would `git fetch`)."""
    commit = rec.git_commit
    if not commit or not _COMMIT_ID.fullmatch(commit):
        return False
    r = proc.run(
        ["git", "-C", str(root), "for-each-ref", "--sort=-committerdate", "--count=32",
         "--format=%(objectname)", "refs/heads", "refs/remotedl", "refs/remotes"],
        check=False,
    )  # fmt: skip
    bases = list(dict.fromkeys(r.stdout.split())) if r.returncode == 0 else []
    stream = box.start(_PACK_JOB_COMMIT, rec.project_dir, commit, *bases)
    try:
        head = b""
        while b"\n" not in head:
            chunk = stream.read()
            if not chunk:
                break
            head += chunk
        mark, _, rest = head.partition(b"\n")
        if mark != b"@@pack":
            return False
        index = proc.popen(
            ["git", "-C", str(root), "index-pack", "--stdin", "--fix-thin"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=False,
        )  # fmt: skip
        assert index.stdin is not None
        assert index.stderr is not None
        try:
            index.stdin.write(rest)
            while chunk := stream.read():
                index.stdin.write(chunk)
        except BrokenPipeError:
            pass
        index.stdin.close()
        err = index.stderr.read().decode(errors="replace").strip()
        if index.wait() != 0:
            raise RemotedlError(f"could not store job {rec.id}'s commit from {box.spec.alias}: {err}")
    except NoFrame:
        raise openssh_failure(box.spec, stream.stderr_text()) from None
    finally:
        stream.kill()
        stream.wait()
    return True


def diff(
    root: Path,
    box: Box,
    rec: JobRecord,
    *,
    stat: bool = False,
    color: bool = False,
    data: Sequence[str] = (),
    max_snapshot_file: int = DEFAULT_MAX_FILE,
) -> str:
    """The job's code against the local work tree, as text: a diff from the job's commit to
    a snapshot of the work tree as it is now, made as push makes it (tracked changes and
    untracked files that .gitignore does not exclude, less the ``data`` paths and untracked
    files over ``max_snapshot_file``). A commit another laptop pushed is fetched from the box
    first."""
    from remotedl.sync import code_snapshot

    if not rec.git_commit:
        raise UsageError(f"job {rec.id} has no commit recorded (its tree on the box is not a git repository)")
    commit = rec.git_commit
    alias = box.spec.alias
    # The job's ref, which is also the test whether this repository has the commit.
    if keep_commit(root, alias, rec) is None and (
        not fetch_job_commit(box, root, rec) or keep_commit(root, alias, rec) is None
    ):
        raise RemotedlError(
            f"job {rec.id}'s commit {commit[:10]} is neither in this repository nor on {alias} any more",
            hint="it was pushed from another clone; fetch it from there",
        )
    now = code_snapshot(root, data=data, max_snapshot_file=max_snapshot_file).commit or commit
    argv = ["git", "-C", str(root), "diff", f"--color={'always' if color else 'never'}"]
    argv += ["--stat"] if stat else []
    r = proc.run([*argv, commit, now, "--"], check=False)
    if r.returncode != 0:
        raise RemotedlError(f"git diff failed: {r.stderr.strip()}")
    return r.stdout
