"""Clones of one project in folders of other names, against the real sshd box: the default
remote_dir is the project's (its first commit), not the folder's, and a tree pushed under the
older folder-named default is kept."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import cli_for, git


def new_project(where: Path) -> Path:
    """A repository whose first commit is this test's own (a unique identity on the shared box)."""
    where.mkdir(parents=True)
    git(where, "init", "-q", "-b", "main")
    git(where, "config", "user.email", "t@example.invalid")
    git(where, "config", "user.name", "Test")
    (where / "unique.txt").write_text(f"{where}\n")
    (where / "job.sh").write_text("#!/bin/sh\necho job of $(cat unique.txt)\n")
    (where / "job.sh").chmod(0o755)
    git(where, "add", "-A")
    git(where, "commit", "-q", "-m", "first")
    return where


def clone(origin: Path, dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True)
    return dest


def test_a_second_clone_under_another_name_is_the_same_project(box, tmp_path):
    a = new_project(tmp_path / "alice" / "resnet")
    b = clone(a, tmp_path / "bob" / "resnet-colleague")
    ident = git(a, "rev-list", "--max-parents=0", "HEAD")
    run_a = cli_for(box, tmp_path / "laptop-a")
    run_b = cli_for(box, tmp_path / "laptop-b")
    r = run_a("config", "--json", cwd=a)
    assert r.code == 0, r.err
    assert json.loads(r.out)["remote_dir"] == f"~/remotedl/{ident[:12]}"
    r = run_a("run", "--cpu", "job.sh", cwd=a)
    assert r.code == 0, r.err
    job = json.loads(run_a("show", "--json", cwd=a).out)
    tree = f"{box.info.home}/remotedl/{ident[:12]}"
    assert job["remote_dir"] == tree
    # The colleague's clone: the same tree (nothing new to check out), and A's job is this
    # project's.
    r = run_b("push", "--json", cwd=b)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["remote_dir"] == tree and out["code_changed"] is False
    r = run_b("show", "--json", cwd=b)
    assert r.code == 0, r.err
    assert json.loads(r.out)["id"] == job["id"]
    assert run_b("logs", cwd=b).out == f"job of {a}\n"
    assert not (box.home / "remotedl" / "resnet").exists()  # no tree named after either folder
    assert not (box.home / "remotedl" / "resnet-colleague").exists()


def test_a_tree_under_the_older_folder_named_default_is_kept(box, tmp_path):
    """Earlier versions named the default after the folder: that tree (its jobs, environment)
    stays the project's, found by every command, from this clone and from another."""
    a = new_project(tmp_path / "lab" / f"old-{tmp_path.name}")
    ident = git(a, "rev-list", "--max-parents=0", "HEAD")
    old = f"~/remotedl/{a.name}"
    run_a = cli_for(box, tmp_path / "laptop-a")
    r = run_a("run", "--cpu", "--remote-dir", old, "job.sh", cwd=a)  # as before
    assert r.code == 0, r.err
    job = json.loads(run_a("show", "--json", "--remote-dir", old, cwd=a).out)
    old_real = f"{box.info.home}/remotedl/{a.name}"
    assert job["remote_dir"] == old_real
    (box.home / "remotedl" / a.name / "outputs.txt").write_text("made on the box\n")
    # With the default: the first command is a look, not a push; the job is still this project's.
    r = run_a("show", "--json", cwd=a)
    assert r.code == 0, r.err
    assert json.loads(r.out)["id"] == job["id"]
    link = box.home / "remotedl" / ident[:12]
    assert link.is_symlink() and os.readlink(link) == a.name  # nothing moved
    r = run_a("push", "--json", cwd=a)
    assert r.code == 0, r.err
    assert json.loads(r.out)["remote_dir"] == old_real
    assert (box.home / "remotedl" / a.name / "outputs.txt").read_text() == "made on the box\n"

    # A clone elsewhere, whose first command is a push (the box finds the tree by the id).
    c = new_project(tmp_path / "lab2" / f"old2-{tmp_path.name}")
    c_old = f"~/remotedl/{c.name}"
    assert run_a("push", "--remote-dir", c_old, cwd=c).code == 0
    d = clone(c, tmp_path / "elsewhere" / "another-name")
    r = cli_for(box, tmp_path / "laptop-d")("push", "--json", cwd=d)
    assert r.code == 0, r.err
    assert json.loads(r.out)["remote_dir"] == f"{box.info.home}/remotedl/{c.name}"
    # A configured remote_dir is the user's: nothing is looked up for it.
    e = new_project(tmp_path / "lab3" / f"old3-{tmp_path.name}")
    assert run_a("push", "--remote-dir", f"~/remotedl/{e.name}", cwd=e).code == 0
    r = run_a("push", "--json", "--remote-dir", f"~/elsewhere-{tmp_path.name}", cwd=e)
    assert r.code == 0, r.err
    e_id = git(e, "rev-list", "--max-parents=0", "HEAD")
    assert not (box.home / "remotedl" / e_id[:12]).exists()


def test_adopt_picks_the_tree_named_after_this_folder_else_the_last_checked_out(tmp_path):
    """The box side's choice, on plain directories: only trees of this identity, never a link,
    this folder's name first, else the one whose index changed last; an existing name stays."""
    from remotedl.treeid import adopt_tree

    parent = tmp_path / "remotedl"

    def tree(name: str, ident: str, age: int) -> None:
        (parent / name / ".git").mkdir(parents=True)
        (parent / name / ".git" / "config").write_text(f"[remotedl]\n\tcreated = 1\n\tproject = {ident}\n")
        (parent / name / ".git" / "index").write_bytes(b"")
        os.utime(parent / name / ".git" / "index", (1_700_000_000 - age, 1_700_000_000 - age))

    tree("other-project", "b" * 40, 0)
    tree("old-clone", "a" * 40, 100)
    tree("newer-clone", "a" * 40, 10)
    tree("mine", "a" * 40, 500)
    (parent / "a-link").symlink_to("mine")
    new = parent / ("a" * 12)
    adopt_tree(str(new), "a" * 40, "mine")
    assert os.readlink(new) == "mine"
    new.unlink()
    adopt_tree(str(new), "a" * 40, "not-there")
    assert os.readlink(new) == "newer-clone"
    adopt_tree(str(new), "a" * 40, "mine")  # exists: left as it is
    assert os.readlink(new) == "newer-clone"
    lone = parent / ("c" * 12)
    adopt_tree(str(lone), "c" * 40, "mine")  # no tree of this project: nothing made
    assert not os.path.lexists(lone)
