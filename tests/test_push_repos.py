"""push with what real repositories hold (issue 21): big commits, submodules, Git LFS, shallow
clones, and `push --watch` with data paths; against the real sshd box."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import box_path, cli_for, commit_all, git, make_env, retry_until  # noqa: F401  (fixtures' helpers)


@pytest.fixture
def rdir(tmp_path) -> str:
    return f"~/push-repos/{tmp_path.name}"


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
    from remotedl.sync import code

    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    for i in range(150):
        (project / f"f{i}.py").write_text(f"{i}\n")
    commit_all(project, "150 new files")
    broken = code._CHECKOUT.replace("index-pack --stdin", "index-pack -q --stdin")
    monkeypatch.setattr(code, "_CHECKOUT", broken)
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert box_path(box, rdir, "f149.py").read_text() == "149\n"
    monkeypatch.undo()
    (project / "f1.py").write_text("one\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    assert box_path(box, rdir, "f1.py").read_text() == "one\n"


# ------------------------------------------------------------------ push --watch and data paths


def test_watch_never_puts_data_paths_into_the_code(cli, box, project, rdir, tmp_path):
    """A data path .gitignore does not list: a change there is rsynced, never committed."""
    from tests.test_watch import Watching

    (project / "data").mkdir()
    (project / "data" / "blob.bin").write_bytes(b"a" * 3000)
    (project / "remotedl.toml").write_text(f'data = ["data"]\nremote_dir = "{rdir}"\n')
    (project / "train.py").write_text("print(1)\n")
    w = Watching(box, project, rdir, tmp_path, data=["data"], max_snapshot_file=1000)
    try:
        assert retry_until(lambda: [e.kind for e in w.events] == ["pushed"], seconds=30), w.events
        (project / "data" / "blob.bin").write_bytes(b"b" * 4000)
        blob = box_path(box, rdir, "data/blob.bin")
        assert retry_until(lambda: blob.read_bytes() == b"b" * 4000, seconds=30), w.events
        # Code alone changes: the push that follows rsyncs no data, and must still leave it out.
        (project / "train.py").write_text("print(2)\n")
        code = box_path(box, rdir, "train.py")
        assert retry_until(lambda: code.read_text() == "print(2)\n", seconds=30), w.events
    finally:
        w.close()
    assert not w.error, w.error
    assert all(e.kind == "pushed" for e in w.events), w.events
    assert all(e.result is not None and e.result.left_out == [] for e in w.events), w.events
    tree = git(box_path(box, rdir), "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert "train.py" in tree and not any(p.startswith("data") for p in tree), tree
    # An ordinary push (and so a run) after the watch is not refused.
    r = cli("push", cwd=project)
    assert r.code == 0, r.err
    assert "left out" not in r.out


# ------------------------------------------------------------------ shallow clones


def test_a_shallow_clone_pushes(cli, box, project, rdir, tmp_path):
    for i in range(3):
        (project / "model.py").write_text(f"V = {i}\n")
        commit_all(project, f"v{i}")
    clone = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{project}", str(clone)], check=True)
    assert git(clone, "rev-parse", "--is-shallow-repository") == "true"
    git(clone, "config", "user.email", "t@example.invalid")
    git(clone, "config", "user.name", "Test")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=clone)
    assert r.code == 0, r.err
    assert json.loads(r.out)["commit"] == git(clone, "rev-parse", "HEAD")
    assert box_path(box, rdir, "model.py").read_text() == "V = 2\n"
    # Commits on top, and uncommitted work, go the usual way.
    (clone / "model.py").write_text("V = 3\n")
    head = commit_all(clone, "v3")
    (clone / "extra.py").write_text("E = 1\n")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=clone)
    assert r.code == 0, r.err
    assert git(box_path(box, rdir), "rev-parse", "HEAD^") == head
    assert box_path(box, rdir, "model.py").read_text() == "V = 3\n"
    assert box_path(box, rdir, "extra.py").read_text() == "E = 1\n"
    # A job's own checkout is made in the box's (shallow) repository too.
    (clone / "show.py").write_text("import model\nprint('V is', model.V)\n")
    r = cli("run", "--cpu", "--remote-dir", rdir, "python3", "show.py", cwd=clone)
    assert r.code == 0, r.err + r.out
    assert "V is 3" in r.out


def test_a_shallow_clone_becomes_the_project_once_unshallowed(cli, box, project, tmp_path):
    """A shallow clone cannot know the project's first commit (its history is cut), so its
    default tree is its own; once `git fetch --unshallow` brings the history it is the same
    project as every other clone (the cut commit was not kept as its identity)."""
    for i in range(2):
        (project / "model.py").write_text(f"V = {i}\n")
        commit_all(project, f"v{i}")
    clone = tmp_path / "shallow"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{project}", str(clone)], check=True)

    def default_dir(where: Path) -> str:
        r = cli("config", "--json", cwd=where)
        assert r.code == 0, r.err
        return json.loads(r.out)["remote_dir"]

    full = default_dir(project)
    assert default_dir(clone) != full  # its first commit here is only where the history was cut
    r = cli("push", cwd=clone)
    assert r.code == 0, r.err
    git(clone, "fetch", "-q", "--unshallow")
    assert default_dir(clone) == full


# ------------------------------------------------------------------ submodules


def make_lib(where: Path, files: dict[str, str]) -> Path:
    subprocess.run(["git", "init", "-q", "-b", "main", str(where)], check=True)
    for name, text in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(text)
    git(where, "add", ".")
    git(where, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "lib")
    return where


def add_submodule(project: Path, source: Path, path: str) -> None:
    # A local repository as the submodule's upstream (git refuses file:// for submodules unless asked).
    git(project, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(source), path)


def test_submodules_are_shipped_and_jobs_import_them(cli, box, project, tmp_path):
    rdir = f"~/push-repos/{tmp_path.name}"
    inner = make_lib(tmp_path / "inner", {"deep.py": "DEEP = 'deep'\n"})
    lib = make_lib(tmp_path / "lib", {"mylib/__init__.py": "", "mylib/helper.py": "VALUE = 42\n"})
    git(lib, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(inner), "inner")
    git(lib, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "nested")
    add_submodule(project, lib, "third_party/lib")
    git(project, "-c", "protocol.file.allow=always", "submodule", "update", "-q", "--init", "--recursive")
    (project / "train.py").write_text(
        "import sys\nsys.path.insert(0, 'third_party/lib')\nsys.path.insert(0, 'third_party/lib/inner')\n"
        "from mylib.helper import VALUE\nfrom deep import DEEP\nprint('value', VALUE, DEEP)\n"
    )
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    commit_all(project, "a submodule")
    before = git(project, "status", "--porcelain")
    r = cli("push", cwd=project)
    assert r.code == 0, r.err
    assert "left out" not in r.out and "note" not in r.out, r.out
    # git status is clean: the snapshot holds the submodule's files, no work of the user's.
    assert " with submodule files on " in r.out and "uncommitted" not in r.out, r.out
    assert box_path(box, rdir, "third_party/lib/mylib/helper.py").read_text() == "VALUE = 42\n"
    assert box_path(box, rdir, "third_party/lib/inner/deep.py").read_text() == "DEEP = 'deep'\n"
    assert git(project, "status", "--porcelain") == before  # the local repository as it was
    r = cli("run", "--cpu", "python3", "train.py", cwd=project)
    assert r.code == 0, r.err + r.out
    assert "value 42 deep" in r.out
    # Uncommitted changes in the submodule go along, and are named.
    (project / "third_party/lib/mylib/helper.py").write_text("VALUE = 43\n")
    r = cli("run", "--cpu", "python3", "train.py", cwd=project)
    assert r.code == 0, r.err + r.out
    assert "value 43 deep" in r.out
    assert "third_party/lib/: submodule with uncommitted changes" in r.err
    # What a job records as changed is the user's change, not the submodule's files.
    r = cli("jobs", "--all", "--json", cwd=project)
    records = sorted(json.loads(r.out), key=lambda j: j["id"])
    assert [j["snapshot_files"] for j in records[-2:]] == [[], ["third_party/lib/"]], records
    r = cli("show", str(records[-2]["id"]), cwd=project)
    assert r.code == 0, r.err
    assert "(snapshot with submodule files on top of " in r.out and "uncommitted" not in r.out, r.out
    r = cli("show", str(records[-1]["id"]), cwd=project)
    assert "(snapshot of uncommitted work, with submodule files on top of " in r.out, r.out
    assert "changed: third_party/lib/" in r.out, r.out
    r = cli("push", cwd=project)
    assert r.code == 0, r.err
    assert " of uncommitted work, with submodule files on " in r.out, r.out
    assert "note      third_party/lib/: submodule with uncommitted changes" in r.out
    assert box_path(box, rdir, "third_party/lib/mylib/helper.py").read_text() == "VALUE = 43\n"


def test_a_submodule_not_initialised_here_is_named_with_the_fix(cli, box, project, tmp_path, rdir):
    lib = make_lib(tmp_path / "lib", {"helper.py": "VALUE = 42\n"})
    add_submodule(project, lib, "lib")
    commit_all(project, "a submodule")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)  # no --recursive
    r = cli("push", "--remote-dir", rdir, cwd=clone)
    assert r.code == 0, r.err
    assert "left out  lib/: submodule not initialised here" in r.out
    assert "git submodule update --init --recursive lib" in r.out
    r = cli("push", "--remote-dir", rdir, "--json", cwd=clone)
    assert json.loads(r.out)["left_out"] == [{"path": "lib/", "reason": "submodule", "size": 0}]
    # Initialised, the next push fills the empty directory the gitlink left on the box.
    git(clone, "-c", "protocol.file.allow=always", "submodule", "update", "-q", "--init")
    r = cli("push", "--remote-dir", rdir, cwd=clone)
    assert r.code == 0, r.err
    assert "left out" not in r.out
    assert box_path(box, rdir, "lib/helper.py").read_text() == "VALUE = 42\n"


# ------------------------------------------------------------------ Git LFS


def lfs_project(project: Path, content: bytes) -> None:
    assert shutil.which("git-lfs"), "git-lfs is needed for this test: .ci/deps installs it (apt-get git-lfs)"
    git(project, "lfs", "install", "--local")
    git(project, "lfs", "track", "*.bin")
    (project / "weights.bin").write_bytes(content)
    (project / "read.py").write_text("print('bytes', len(open('weights.bin', 'rb').read()))\n")
    commit_all(project, "weights in Git LFS")
    blob = git(project, "cat-file", "-p", "HEAD:weights.bin")
    assert blob.startswith("version https://git-lfs.github.com/spec/v1"), blob  # really in LFS


def test_lfs_files_arrive_as_their_content_on_a_box_with_git_lfs(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    fresh_box.sh("git lfs install")  # the box's git has the LFS filter, as after `git lfs install`
    assert fresh_box.sh("git config --get filter.lfs.process").stdout.strip()
    content = os.urandom(5000)
    lfs_project(project, content)
    (project / "remotedl.toml").write_text('remote_dir = "~/lfs"\n')
    r = run("push", cwd=project)
    assert r.code == 0, r.err
    assert "lfs       " not in r.out, r.out
    assert " of uncommitted work, with LFS files' content on " in r.out, r.out  # remotedl.toml too
    where = Path(fresh_box.info.home) / "lfs"
    assert (where / "weights.bin").read_bytes() == content
    r = run("push", "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["code_changed"] is False  # the box's tree is clean: nothing to do
    r = run("run", "--cpu", "python3", "read.py", cwd=project)
    assert r.code == 0, r.err + r.out
    assert "bytes 5000" in r.out  # the job's own checkout has the content too
    (job,) = json.loads(run("jobs", "--all", "--json", cwd=project).out)
    assert job["snapshot_files"] == ["remotedl.toml"]  # weights.bin: its content is no change of yours
    commit_all(project, "remote_dir")  # git status clean: only the LFS content is put in
    r = run("push", cwd=project)
    assert r.code == 0, r.err
    assert " with LFS files' content on " in r.out and "uncommitted" not in r.out, r.out
    # A changed LFS file goes too.
    (project / "weights.bin").write_bytes(content[:100])
    assert run("push", cwd=project).code == 0
    assert (where / "weights.bin").read_bytes() == content[:100]


def test_lfs_pointers_not_fetched_here_are_named(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    fresh_box.sh("git lfs install")
    lfs_project(project, os.urandom(3000))
    clone = tmp_path / "clone"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True, env=env)
    assert (clone / "weights.bin").read_bytes().startswith(b"version https://git-lfs")
    r = run("push", "--remote-dir", "~/lfs2", cwd=clone)
    assert r.code == 0, r.err  # the box's git-lfs does not fail the checkout
    assert "lfs       weights.bin: only a Git LFS pointer here" in r.out
    assert "git lfs pull" in r.out
    pointer = (Path(fresh_box.info.home) / "lfs2" / "weights.bin").read_bytes()
    assert pointer == (clone / "weights.bin").read_bytes()
