"""push with what real repositories hold (issue 21): big commits, submodules, Git LFS, shallow
clones, and `push --watch` with data paths; against the real sshd box."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import cli_for, make_env, retry_until  # noqa: F401  (fixtures' helpers)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def rdir(tmp_path) -> str:
    return f"~/push-repos/{tmp_path.name}"


def box_path(box, rdir: str, rel: str = "") -> Path:
    return Path(rdir.replace("~", box.info.home, 1)) / rel


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD")


# ------------------------------------------------------------------ big commits


def test_commits_of_hundreds_of_objects_push(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    pkg = project / "pkg"
    pkg.mkdir()
    for i in range(150):
        (pkg / f"m{i}.py").write_text(f"X = {i}\n")
    head = commit_all(project, "150 new files")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["commit"] == head
    assert (box_path(box, rdir, "pkg/m149.py")).read_text() == "X = 149\n"
    # 120 files changed at once, then a branch of its own with a merge.
    for i in range(120):
        (pkg / f"m{i}.py").write_text(f"X = {i} * 2\n")
    commit_all(project, "120 changed")
    git(project, "checkout", "-qb", "side", "HEAD~1")
    for i in range(130):
        (pkg / f"side{i}.py").write_text(f"S = {i}\n")
    commit_all(project, "a side branch")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    assert (box_path(box, rdir, "pkg/side129.py")).read_text() == "S = 129\n"
    assert (box_path(box, rdir, "pkg/m3.py")).read_text() == "X = 3\n"
    git(project, "checkout", "-q", "main")
    git(project, "merge", "-q", "--no-edit", "side")
    head = git(project, "rev-parse", "HEAD")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["commit"] == head
    assert (box_path(box, rdir, "pkg/m3.py")).read_text() == "X = 3 * 2\n"
    assert (box_path(box, rdir, "pkg/side7.py")).read_text() == "S = 7\n"
    assert git(box_path(box, rdir), "rev-parse", "HEAD") == head


def test_a_tree_a_failed_pack_left_behind_takes_the_next_push(cli, box, project, rdir, monkeypatch):
    """A pack the box cannot take (the old `index-pack -q`) must not stick: `git push` sends
    the objects, and every later push works, --force or not."""
    from remotedl import sync

    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    for i in range(150):
        (project / f"f{i}.py").write_text(f"{i}\n")
    commit_all(project, "150 new files")
    broken = sync._CHECKOUT.replace("index-pack --stdin", "index-pack -q --stdin")
    monkeypatch.setattr(sync, "_CHECKOUT", broken)
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert box_path(box, rdir, "f149.py").read_text() == "149\n"
    monkeypatch.undo()
    (project / "f1.py").write_text("one\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    assert box_path(box, rdir, "f1.py").read_text() == "one\n"
