"""push / pull against the real sshd box: git for code, rsync for data, nothing lost."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from remotedl import sync
from remotedl.errors import RemotedlError
from remotedl.ssh import resolve_host
from tests.conftest import box_path, cli_for, git, make_env, retry_until


def local_state(repo: Path) -> tuple[str, ...]:
    """Everything push must leave alone in the local repository."""
    index = hashlib.sha256((repo / ".git" / "index").read_bytes()).hexdigest()
    return (
        git(repo, "rev-parse", "HEAD"),
        git(repo, "status", "--porcelain", "--untracked-files=all"),
        git(repo, "stash", "list"),
        git(repo, "branch", "-a"),
        index,
        git(repo, "for-each-ref"),
    )


@pytest.fixture
def rdir(tmp_path) -> str:
    return f"~/sync-tests/{tmp_path.name}"


def box_git(box, rdir: str, *args: str) -> str:
    path = rdir.replace("~", box.info.home, 1)
    return box.sh("git -C " + path + " " + " ".join(args)).stdout.strip()


def test_push_clean_tree_checks_out_head(cli, box, project, rdir):
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    head = git(project, "rev-parse", "HEAD")
    assert out["commit"] == head
    assert out["snapshot"] is False
    assert box_git(box, rdir, "rev-parse", "HEAD") == head
    assert (box_path(box, rdir, "README")).read_text() == "hello\n"
    # A second push changes nothing.
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert json.loads(r.out)["code_changed"] is False


def test_uncommitted_work_goes_along_and_local_repo_is_untouched(cli, box, project, rdir):
    (project / ".gitignore").write_text("secret.txt\nbuild/\n")
    git(project, "add", ".gitignore")
    git(project, "commit", "-qm", "ignore")
    (project / "README").write_text("changed\n")  # tracked, modified
    (project / "new.py").write_text("print(1)\n")  # untracked, not ignored
    (project / "staged.py").write_text("x = 1\n")
    git(project, "add", "staged.py")  # staged
    (project / "secret.txt").write_text("never leaves\n")  # ignored
    (project / "build").mkdir()
    (project / "build" / "out.o").write_text("obj")
    git(project, "stash", "list")
    before = local_state(project)
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["snapshot"] is True
    assert out["head"] == before[0]
    assert local_state(project) == before
    assert box_path(box, rdir, "README").read_text() == "changed\n"
    assert box_path(box, rdir, "new.py").read_text() == "print(1)\n"
    assert box_path(box, rdir, "staged.py").exists()
    assert not box_path(box, rdir, "secret.txt").exists()
    assert not box_path(box, rdir, "build").exists()
    box_head = box_git(box, rdir, "rev-parse", "HEAD")
    assert box_head == out["commit"]
    assert box_git(box, rdir, "rev-parse", "HEAD^") == before[0]
    # The same uncommitted state pushed again is the same snapshot: nothing to do.
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    again = json.loads(r.out)
    assert again["commit"] == out["commit"]
    assert again["code_changed"] is False


def test_edits_on_box_are_not_lost(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    box_path(box, rdir, "README").write_text("edited on the box\n")
    (project / "README").write_text("edited here\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "edits that were not pushed from here: README" in r.err
    assert "remotedl pull" in r.err and "--force" in r.err
    assert box_path(box, rdir, "README").read_text() == "edited on the box\n"
    r = cli("push", "--remote-dir", rdir, "--force", cwd=project)
    assert r.code == 0, r.err
    assert box_path(box, rdir, "README").read_text() == "edited here\n"


def test_untracked_box_file_in_the_way_is_not_clobbered(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    box_path(box, rdir, "results.csv").write_text("made by a job\n")  # job output: fine
    box_path(box, rdir, "model.py").write_text("written on the box\n")
    (project / "model.py").write_text("written here\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "model.py" in r.err
    assert "results.csv" not in r.err
    assert box_path(box, rdir, "model.py").read_text() == "written on the box\n"
    box_path(box, rdir, "model.py").unlink()
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    assert box_path(box, rdir, "results.csv").read_text() == "made by a job\n"


def test_data_rsync_never_deletes_unless_asked(cli, box, project, rdir):
    data = project / "data" / "set1"
    data.mkdir(parents=True)
    (data / "a.bin").write_bytes(b"a" * 1000)
    (data / "b.bin").write_bytes(b"b" * 10)
    (project / ".gitignore").write_text("data/\n")
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = ["data"]\nexclude = ["*.tmp"]\n')
    (data / "skip.tmp").write_text("x")
    r = cli("push", "--json", cwd=project)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["transfers"][0]["path"] == "data"
    assert out["transfers"][0]["files_transferred"] == 2
    assert box_path(box, rdir, "data/set1/a.bin").read_bytes() == b"a" * 1000
    assert not box_path(box, rdir, "data/set1/skip.tmp").exists()
    # Only what changed travels.
    (data / "b.bin").write_bytes(b"B" * 11)  # rsync quick check: size or mtime must differ
    out = json.loads(cli("push", "--json", cwd=project).out)
    assert out["transfers"][0]["files_transferred"] == 1
    # A file gone here stays on the box without --delete...
    (data / "a.bin").unlink()
    assert cli("push", cwd=project).code == 0
    assert box_path(box, rdir, "data/set1/a.bin").exists()
    # ...and goes with it.
    assert cli("push", "--delete", cwd=project).code == 0
    assert not box_path(box, rdir, "data/set1/a.bin").exists()
    assert box_path(box, rdir, "data/set1/b.bin").read_bytes() == b"B" * 11


def test_progress_is_reported_for_large_data(box, project, rdir, tmp_path):
    (project / ".gitignore").write_text("big/\n")  # data is not code: git must not carry it too
    (project / "big").mkdir()
    (project / "big" / "blob").write_bytes(b"\0" * (8 << 20))
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    events = []
    result = sync.push(spec, project, rdir, data=["big"], progress=events.append)
    assert result.transfers[0].bytes_transferred == 8 << 20
    assert events
    assert events[-1].percent == 100
    assert events[-1].bytes_done == 8 << 20


def test_not_a_git_repository(cli, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    r = cli("push", cwd=plain)
    assert r.code == 2
    assert "not in a git repository" in r.err
    assert "git init" in r.err


def test_missing_data_path_warns_and_the_code_still_goes(cli, box, project, rdir):
    """A clone without the data paths pushes its code; the box's data stays as it was."""
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = ["data"]\n')
    (project / "data").mkdir()
    (project / "data" / "x.bin").write_bytes(b"x" * 10)
    assert cli("push", cwd=project).code == 0, "first push with the data"
    (project / "data" / "x.bin").unlink()
    (project / "data").rmdir()
    (project / "train.py").write_text("print(1)\n")
    r = cli("push", "--delete", "--json", cwd=project)
    assert r.code == 0, r.err
    assert "data path data does not exist" in r.err and "the code was pushed" in r.err
    out = json.loads(r.out)
    assert out["missing"] == ["data"] and out["transfers"] == []
    assert box_path(box, rdir, "train.py").read_text() == "print(1)\n"
    assert box_path(box, rdir, "data/x.bin").read_bytes() == b"x" * 10  # nothing deleted
    # A flag's path that does not exist is the same warning.
    r = cli("push", "--data", "nope", cwd=project)
    assert r.code == 0, r.err
    assert "data path data, nope does not exist" in r.err


def test_symlinked_dataset_directory_is_sent_by_its_name(cli, box, project, rdir, tmp_path):
    """data -> /datasets/imagenet: the box gets the dataset's files under data/, nothing of it
    goes into the code snapshot, and a path that itself climbs out is still refused."""
    dataset = tmp_path / "datasets" / "imagenet"
    (dataset / "train").mkdir(parents=True)
    (dataset / "train" / "a.jpg").write_bytes(b"jpeg" * 100)
    (dataset / "labels.txt").write_text("cat\ndog\n")
    (dataset / "latest").symlink_to("train")  # links inside the dataset stay links
    (project / "data").symlink_to(dataset)  # not in .gitignore: git sees the link itself
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = ["data"]\n')
    (project / "model.py").write_text("import torch\n")
    r = cli("push", "--json", cwd=project)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert out["transfers"][0]["path"] == "data"
    assert out["transfers"][0]["files_transferred"] == 2
    on_box = box_path(box, rdir, "data")
    assert on_box.is_dir() and not on_box.is_symlink()
    assert (on_box / "train" / "a.jpg").read_bytes() == b"jpeg" * 100
    assert (on_box / "labels.txt").read_text() == "cat\ndog\n"
    assert os.readlink(on_box / "latest") == "train"
    tree = box_git(box, rdir, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert "model.py" in tree
    assert not any(p == "data" or p.startswith("data/") for p in tree), tree
    # A run sees the same (its own push goes through the same path check).
    r = cli("push", "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["code_changed"] is False
    # Paths that climb out are config errors, symlinked or not.
    for bad in ('"../elsewhere"', f'"{dataset}"'):
        (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = [{bad}]\n')
        r = cli("push", cwd=project)
        assert r.code == 3, r.err
        assert "is outside the project" in r.err
    # The project's own name for it, absolute, is fine.
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = ["{project / "data"}"]\n')
    r = cli("push", "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["transfers"][0]["path"] == "data"
    # A committed link is the same data path: the box keeps a directory of the dataset's
    # files (never the link), and pushes go on.
    git(project, "add", "data", "model.py")
    git(project, "commit", "-qm", "the data link")
    (dataset / "labels.txt").write_text("cat\ndog\nbird\n")
    for _ in range(2):
        (project / "model.py").write_text((project / "model.py").read_text() + "# more\n")
        r = cli("push", "--json", cwd=project)
        assert r.code == 0, r.err
        assert json.loads(r.out)["code_changed"] is True
    assert on_box.is_dir() and not on_box.is_symlink()
    assert (on_box / "labels.txt").read_text() == "cat\ndog\nbird\n"
    tree = box_git(box, rdir, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert "data" not in tree


def test_diff_and_run_take_the_code_as_push_does(cli, box, project, rdir, tmp_path):
    """`diff` compares a job with the code push would send (the data link and untracked files
    over max_snapshot_file left out, as the job never had them), and `run` pushes with the
    project's max_snapshot_file as `push` does."""
    dataset = tmp_path / "datasets" / "shakespeare"
    dataset.mkdir(parents=True)
    (dataset / "input.txt").write_text("First Citizen:\n")
    (project / "data").symlink_to(dataset)  # not in .gitignore: git sees the link itself
    (project / "big.bin").write_bytes(b"w" * 3000)  # untracked, over this project's limit
    (project / "mid.bin").write_bytes(b"m" * 1500)  # untracked, under it
    (project / "remotedl.toml").write_text(
        f'remote_dir = "{rdir}"\ndata = ["data"]\nmax_snapshot_file = 2000\n'
    )
    r = cli("run", "--cpu", "--", "sh", "-c", "ls -1 .", cwd=project)
    assert r.code == 0, r.err
    assert "mid.bin" in r.out and "big.bin" not in r.out, r.out
    assert "big.bin (2.9 KiB): untracked, over max_snapshot_file (2.0 KiB)" in r.err, r.err
    r = cli("diff", cwd=project)
    assert r.code == 0, r.err
    assert r.out == "", r.out  # neither the data link nor big.bin is a code difference
    assert "no difference" in r.err
    (project / "mid.bin").write_bytes(b"n" * 1500)
    r = cli("diff", "--stat", cwd=project)
    assert r.code == 0, r.err
    assert "mid.bin" in r.out and "data" not in r.out and "big.bin" not in r.out, r.out


def test_pull_never_deletes_or_overwrites_newer(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    out = box_path(box, rdir, "runs/exp1")
    out.mkdir(parents=True)
    (out / "log.txt").write_text("from box\n")
    (out / "ckpt.pt").write_bytes(b"weights")
    local = project / "runs" / "exp1"
    local.mkdir(parents=True)
    (local / "mine.txt").write_text("only here\n")
    (local / "ckpt.pt").write_bytes(b"newer local weights")
    # local ckpt is newer than the box's
    import os
    import time

    old = time.time() - 3600
    os.utime(out / "ckpt.pt", (old, old))
    r = cli("pull", "--remote-dir", rdir, "runs/exp1", "--json", cwd=project)
    assert r.code == 0, r.err
    assert (local / "log.txt").read_text() == "from box\n"
    assert (local / "mine.txt").read_text() == "only here\n"
    assert (local / "ckpt.pt").read_bytes() == b"newer local weights"
    r = cli("pull", "--remote-dir", rdir, "runs/nothing", cwd=project)
    assert r.code == 1
    assert "runs/nothing does not exist" in r.err


HOSTILE = [
    "with space.txt",
    "quote'single.txt",
    'quote"double.txt',
    "$(touch PWNED).txt",
    "semi;colon.txt",
    "back`tick`.txt",
    "ünïcødé データ.txt",
    "-dash-first.txt",
]


def test_hostile_names_sync_and_execute_nothing(cli, box, project, rdir, tmp_path):
    for name in HOSTILE:
        (project / name).write_text(name)
    data = project / "d a t a;$(touch PWNED)"
    data.mkdir()
    for name in HOSTILE:
        (data / name).write_text("data " + name)
    (project / ".gitignore").write_text("d a t a*\n")
    r = cli("push", "--remote-dir", rdir, "--data", data.name, cwd=project)
    assert r.code == 0, r.err
    for name in HOSTILE:
        assert box_path(box, rdir, name).read_text() == name
        assert box_path(box, rdir, f"{data.name}/{name}").read_text() == "data " + name
    for where in (project, box_path(box, rdir), box.home, tmp_path):
        assert not (where / "PWNED").exists()
    back = project / "back"
    r = cli("pull", "--remote-dir", rdir, HOSTILE[3], cwd=project)
    assert r.code == 0, r.err
    assert not back.exists()


def test_one_ssh_handshake_per_push(fresh_box, project, tmp_path):
    data = project / "data"
    data.mkdir()
    (data / "x").write_text("x")
    log = fresh_box.dir / "sshd.log"
    run = cli_for(fresh_box, tmp_path / "laptop")
    before = log.read_text().count("Accepted publickey")
    r = run("push", "--data", "data", cwd=project)
    assert r.code == 0, r.err
    assert log.read_text().count("Accepted publickey") - before == 1
    assert "data  data: 1 file, 1 B sent" in r.out


def hide_from_box_path(box, program: str) -> None:
    """Give the box's sshd a PATH on which ``program`` is missing (as the sandbox hides
    nvidia-smi: each directory holding it is replaced by a shadow linking everything else),
    and wait until new logins see it."""
    cfg = box.dir / "sshd_config"
    text = cfg.read_text()
    path = re.search(r" PATH=(\S+)", text).group(1)  # type: ignore[union-attr]
    dirs = []
    for i, d in enumerate(path.split(":")):
        if d and os.path.exists(os.path.join(d, program)):
            shadow = box.dir / f"no-{program}" / f"path{i}"
            shadow.mkdir(parents=True)
            for entry in os.listdir(d):
                if entry != program:
                    (shadow / entry).symlink_to(os.path.join(d, entry))
            d = str(shadow)
        dirs.append(d)
    cfg.write_text(text.replace(f" PATH={path} ", f" PATH={':'.join(dirs)} "))
    os.kill(box.info.pid, signal.SIGHUP)  # sshd re-reads its configuration
    ssh = ["ssh", "-F", box.info.ssh_config, "-o", "BatchMode=yes", box.name, f"command -v {program}"]
    assert retry_until(lambda: subprocess.run(ssh, capture_output=True).returncode == 1, seconds=10)


def test_rsync_missing_on_the_box_says_how_to_install_it(fresh_box, project, tmp_path):
    hide_from_box_path(fresh_box, "rsync")
    (project / "data").mkdir()
    (project / "data" / "x").write_text("x")
    r = cli_for(fresh_box, tmp_path / "laptop")("push", "--data", "data", cwd=project)
    assert r.code == 1, r.err
    assert f"remotedl: error: rsync is not installed on {fresh_box.name}" in r.err
    assert "hint: install it there (`sudo apt-get install rsync`), or run `remotedl setup base`" in r.err


# stderr of rsync (3.5.0) when the box has no rsync, by the box user's login shell: bash's and
# dash's lines as captured here (ssh passes the shell's exit status 127 on); zsh's and fish's
# wording differs, the status is the same
RSYNC_NOT_FOUND = {
    "bash": "bash: line 1: rsync: command not found\n",
    "dash": "sh: 1: rsync: not found\n",
    "zsh": "zsh:1: command not found: rsync\n",
    "fish": "fish: Unknown command: rsync\n",
}
RSYNC_TAIL = (
    "rsync: connection unexpectedly closed (0 bytes received so far) [sender]\n"
    "rsync error: remote command not found (code 127) at io.c(285) [sender=3.5.0]\n"
)
# ... and when the box's shell prints a greeting for non-interactive logins
RSYNC_NOISY_SHELL = (
    "protocol version mismatch -- is your shell clean?\n"
    "(see the rsync manpage for an explanation)\n"
    "rsync error: protocol incompatibility (code 2) at compat.c(625) [sender=3.5.0]\n"
)


@pytest.mark.parametrize("shell", sorted(RSYNC_NOT_FOUND))
def test_rsync_failure_mapping(shell):
    err = sync.rsync_failure("gpubox", "data", 127, RSYNC_NOT_FOUND[shell] + RSYNC_TAIL)
    assert err.message == "rsync is not installed on gpubox"
    assert err.hint is not None
    assert "sudo apt-get install rsync" in err.hint
    assert "remotedl setup base" in err.hint
    err = sync.rsync_failure("gpubox", "data", 2, RSYNC_NOISY_SHELL)
    assert "breaks rsync's protocol" in err.message
    assert err.hint is not None
    assert "print nothing" in err.hint
    missing = 'rsync: [sender] change_dir "/x" failed: No such file or directory (2)\n'
    assert sync.rsync_failure("gpubox", "data", 23, missing).message.startswith("data: no such file:")


# ------------------------------------------------------------------ the snapshot is code (issue 11)


def object_count(repo: Path) -> int:
    """Objects in a repository's store, loose and packed (what a snapshot adds to it)."""
    out = git(repo, "count-objects", "-v")
    fields = dict(line.split(": ") for line in out.splitlines())
    return int(fields["count"]) + int(fields["in-pack"])


def test_large_untracked_file_is_left_out_and_listed(cli, box, project, rdir):
    (project / "train.py").write_text("print('train')\n")
    (project / "ckpt.pt").write_bytes(os.urandom(3 << 20))
    (project / "remotedl.toml").write_text("max_snapshot_file = 1048576\n")
    before = object_count(project)
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    listed = [line for line in r.out.splitlines() if line.startswith("left out")]
    assert len(listed) == 1, r.out
    assert "ckpt.pt (3.0 MiB)" in listed[0]
    assert "max_snapshot_file" in listed[0] and ".gitignore" in listed[0] and "`data`" in listed[0]
    assert box_path(box, rdir, "train.py").read_text() == "print('train')\n"
    assert not box_path(box, rdir, "ckpt.pt").exists()
    # Never hashed: neither .git grew by it (train.py and remotedl.toml, a tree and a commit did).
    assert object_count(project) - before < 10
    box_objects = box_path(box, rdir, ".git/objects")
    assert sum(f.stat().st_size for f in box_objects.rglob("*") if f.is_file()) < 1 << 20
    # --json carries the list; a tracked file of the same size is sent (the user committed it).
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert json.loads(r.out)["left_out"] == [{"path": "ckpt.pt", "reason": "large", "size": 3 << 20}]
    git(project, "add", "ckpt.pt")
    git(project, "commit", "-qm", "a checkpoint, committed")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["left_out"] == []
    assert box_path(box, rdir, "ckpt.pt").read_bytes() == (project / "ckpt.pt").read_bytes()


def test_data_paths_are_not_in_the_snapshot(cli, box, project, rdir):
    data = project / "data"
    data.mkdir()
    (data / "train.csv").write_text("a,b\n1,2\n")  # not ignored: once went through git AND rsync
    (project / "model.py").write_text("import torch\n")
    (project / "remotedl.toml").write_text('data = ["data"]\n')
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    tree = box_git(box, rdir, "ls-tree", "-r", "--name-only", "HEAD").splitlines()
    assert "model.py" in tree
    assert not any(p.startswith("data") for p in tree), tree
    assert out["transfers"][0]["files_transferred"] == 1
    assert box_path(box, rdir, "data/train.csv").read_text() == "a,b\n1,2\n"
    # The next push is a no-op for git: rsync's copy is not a box edit.
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["code_changed"] is False


def make_venv(where: Path, files: int, content: str) -> None:
    (where / "bin").mkdir(parents=True)
    (where / "pyvenv.cfg").write_text("home = /usr/bin\n")
    lib = where / "lib" / "python3" / "site-packages"
    lib.mkdir(parents=True)
    for i in range(files):
        (lib / f"mod{i}.py").write_text(f"{content} {i}\n")


def test_local_and_box_venvs_never_conflict(cli, box, project, rdir):
    make_venv(project / ".venv", 30, "laptop")
    make_venv(project / "envs" / "cpu", 3, "laptop")  # named anything: pyvenv.cfg tells
    (project / "envs" / "conda").mkdir(parents=True)
    (project / "envs" / "conda" / "conda-meta").mkdir()
    (project / "envs" / "conda" / "python.txt").write_text("conda\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    make_venv(box_path(box, rdir, ".venv"), 40, "box")  # `remotedl setup jupyter` makes one
    (project / "README").write_text("changed\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert "left out  .venv/, envs/conda/, envs/cpu/: environment" in r.out
    assert box_path(box, rdir, "README").read_text() == "changed\n"
    assert box_path(box, rdir, ".venv/lib/python3/site-packages/mod0.py").read_text() == "box 0\n"
    assert not box_path(box, rdir, "envs").exists()
    # remotedl's own files on the box are outside the box repository's view.
    exclude = box_path(box, rdir, ".git/info/exclude").read_text().splitlines()
    for entry in ("/.remotedl/", "/.venv/", "/venv/", ".remotedl-partial/"):
        assert entry in exclude
    assert ".venv" not in box_git(box, rdir, "status", "--porcelain")


def test_pull_then_push_is_not_refused(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    ckpt = box_path(box, rdir, "checkpoints")
    ckpt.mkdir()
    (ckpt / "ep1.pt").write_bytes(b"weights " * 100)
    r = cli("pull", "--remote-dir", rdir, "checkpoints", cwd=project)
    assert r.code == 0, r.err
    assert (project / "checkpoints" / "ep1.pt").read_bytes() == b"weights " * 100
    # What pull brought is an output, not code: out of the snapshot (listed), so the box's
    # copy is never in the way, even once it changed on both sides.
    (project / "train.py").write_text("print(2)\n")
    r = cli("push", "--remote-dir", rdir, "--json", cwd=project)
    assert r.code == 0, r.err
    assert {"path": "checkpoints/ep1.pt", "reason": "pulled", "size": 0} in json.loads(r.out)["left_out"]
    assert box_path(box, rdir, "train.py").read_text() == "print(2)\n"
    (ckpt / "ep1.pt").write_bytes(b"retrained")
    (project / "train.py").write_text("print(3)\n")
    (project / "checkpoints" / "ep1.pt").write_bytes(b"weights, changed here")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert "checkpoints/ep1.pt: brought by pull" in r.out
    assert (ckpt / "ep1.pt").read_bytes() == b"retrained"
    # Once the user adds it, it is code: a different box copy is in the way.
    git(project, "add", "checkpoints/ep1.pt")
    (project / "train.py").write_text("print(4)\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "edits that were not pushed from here: checkpoints/ep1.pt" in r.err
    assert (ckpt / "ep1.pt").read_bytes() == b"retrained"


def test_box_edit_equal_to_the_push_is_not_a_conflict(cli, box, project, rdir):
    (project / "a.py").write_text("a = 1\n")
    (project / "b.py").write_text("b = 1\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    box_path(box, rdir, "a.py").write_text("a = 2\n")  # made on the box, then brought home
    (project / "a.py").write_text("a = 2\n")
    box_path(box, rdir, "b.py").write_text("b = box\n")  # a real box edit, listed
    box_path(box, rdir, "c.py").write_text("c = box\n")  # an untracked one the push would write
    (project / "c.py").write_text("c = here\n")
    (project / "d.py").write_text("d = 1\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "edits that were not pushed from here: b.py, c.py" in r.err
    box_path(box, rdir, "b.py").write_text("b = 1\n")  # as pushed: not an edit any more
    box_path(box, rdir, "c.py").write_text("c = here\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert box_path(box, rdir, "d.py").read_text() == "d = 1\n"
    assert box_git(box, rdir, "status", "--porcelain") == ""


def test_many_untracked_box_files_do_not_block(cli, box, project, rdir):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    outputs = box_path(box, rdir, "outputs")
    outputs.mkdir()
    for i in range(2000):
        (outputs / f"{i}.txt").write_text(str(i))
    (project / "README").write_text("changed\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert box_path(box, rdir, "README").read_text() == "changed\n"
    assert len(list(outputs.iterdir())) == 2000


def test_status_line_stages_and_a_true_bar(box, project, rdir, tmp_path):
    (project / ".gitignore").write_text("big/\n")
    (project / "big").mkdir()
    (project / "big" / "blob").write_bytes(os.urandom(4 << 20))
    (project / "big" / "old").write_bytes(os.urandom(4 << 20))
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    sync.push(spec, project, rdir, data=["big"])
    (project / "big" / "blob").write_bytes(os.urandom((4 << 20) + 1))  # quick check: the size differs
    (project / "code.py").write_text("x = 1\n")
    events: list = []
    result = sync.push(spec, project, rdir, data=["big"], progress=events.append)
    stages = [e.text for e in events if isinstance(e, sync.Stage)]
    assert stages[0] == "snapshot: reading the work tree"
    assert "snapshot: listing untracked files" in stages
    assert any(s.startswith("code: sending") for s in stages)
    assert "data: big" in stages
    bars = [e for e in events if isinstance(e, sync.Progress)]
    # One file of two changed: the bar ends at the bytes sent (rsync's own percent would end
    # near 50), and never shows more done than its total.
    assert bars[-1].done and bars[-1].total == bars[-1].bytes_done == (4 << 20) + 1
    assert result.transfers[0].bytes_transferred == (4 << 20) + 1
    for e in bars:
        assert e.total is None or e.bytes_done <= e.total or e.done


def test_progress_frames_and_bar_fields():
    from remotedl.cli.progress import bar_fields
    from remotedl.rsync import Progress, parse_progress

    # rsync 3.5.0 --info=progress2 frames, as printed for a 60 MB transfer of a 100 MB data set
    first = parse_progress("         32,768   0%    0.00kB/s    0:00:00  ")
    mid = parse_progress("     40,000,000  39%  214.13MB/s    0:00:00 (xfr#2, to-chk=53/56)")
    assert first == (32768, 0, "0.00kB/s")
    assert mid == (40000000, 39, "214.13MB/s")
    assert parse_progress("Number of files: 56 (reg: 55, dir: 1)") is None
    # Before the total is known: bytes sent, no total (not "100% 32,768/100 bytes").
    assert bar_fields(Progress("d", 32768, 0, "0.00kB/s")) == (32768.0, None, "32.0 KiB sent")
    # With it: of the bytes this transfer sends (not of the whole data set).
    done, total, text = bar_fields(Progress("d", 38_100_000, 38, "1MB/s", 60_000_000))
    assert (done, total, text) == (38_100_000.0, 60_000_000.0, "36.3 MiB of 57.2 MiB")
    assert bar_fields(Progress("d", 70_000_000, 70, "1MB/s", 60_000_000))[0] == 60_000_000.0
    assert bar_fields(Progress("d", 0, 100, "", 0, done=True))[0:2] == (1.0, 1.0)


def test_dry_run_total_is_the_bytes_a_transfer_sends(box, project, rdir, tmp_path, monkeypatch):
    import remotedl.rsync as rs

    (project / "d").mkdir()
    (project / "d" / "same").write_bytes(b"s" * 300_000)
    (project / "d" / "new").write_bytes(b"n" * 100_000)
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    dest = box_path(box, rdir)
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "same").write_bytes(b"s" * 300_000)
    os.utime(dest / "d" / "same", ns=(os.stat(project / "d" / "same").st_mtime_ns,) * 2)
    monkeypatch.setattr(rs, "TOTAL_AFTER", 0)  # the dry run at once, as for a long transfer
    total = rs._Total(sync.rsync_argv(spec, [f"{project}/./d"], f"{box.name}:{dest}/"), None)
    total.start()
    total._thread.join(30)
    assert total.value == 100_000  # the new file; the one already there is not counted
    assert not (dest / "d" / "new").exists()  # a dry run sends nothing


def test_normalize_remote_dir():
    from remotedl.errors import ConfigError

    assert sync.normalize_remote_dir("~/a//b/") == "~/a/b"
    assert sync.normalize_remote_dir("/data/x/") == "/data/x"
    assert sync.normalize_remote_dir("proj") == "proj"
    for bad in ("~", "~/", "~/.", "/", "/usr", "/tmp", "/home/", "/etc", ".", "~/../x", "a/../..", "~bob/x"):
        with pytest.raises(ConfigError) as e:
            sync.normalize_remote_dir(bad)
        assert "--remote-dir" in (e.value.hint or "") and "remote_dir" in (e.value.hint or "")


def test_a_cut_rsync_is_a_connection_error_a_missing_one_is_not(box, tmp_path, monkeypatch):
    from remotedl import rsync
    from remotedl.errors import ConnectError, RemoteError

    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    fake = tmp_path / "rsync-says"  # an rsync that fails as the real one does
    fake.write_text("#!/bin/sh\nprintf '%s' \"$RSYNC_ERR\" >&2\nexit \"$RSYNC_CODE\"\n")
    fake.chmod(0o755)
    cases = [
        # the connection cut mid-file (the box's sshd killed), rsync 3.5.0's words
        (10, "rsync: [sender] write error: Broken pipe (32)\n", ConnectError),
        # rsync missing on the box: sometimes 12, not 127, with "connection unexpectedly closed"
        (12, "bash: line 1: rsync: command not found\n" + RSYNC_TAIL, RemoteError),
    ]
    for code, err, kind in cases:
        monkeypatch.setenv("RSYNC_ERR", err)
        monkeypatch.setenv("RSYNC_CODE", str(code))
        with pytest.raises(RemotedlError) as e:
            rsync.run_rsync(spec, [str(fake)], "data", None)
        assert type(e.value) is kind, e.value


def rsync_runs(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("run: rsync -a")]


def test_unchanged_data_is_not_rsynced_again(cli, box, project, rdir, caplog):
    """The checkout's request lists the data paths on the box: rsync runs only where it has
    something to send (issue 24: no rsync round trips on a push that changes no data)."""
    import logging

    data = project / "data" / "set"
    data.mkdir(parents=True)
    (data / "a.bin").write_bytes(b"a" * 1000)
    (data / "b.bin").write_bytes(b"b" * 10)
    (data / "link").symlink_to("a.bin")
    (project / ".gitignore").write_text("data/\n")
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\ndata = ["data"]\n')
    assert cli("push", cwd=project).code == 0
    caplog.set_level(logging.DEBUG, logger="remotedl.proc")

    def push() -> dict:
        caplog.clear()
        r = cli("push", "--json", cwd=project)
        assert r.code == 0, r.err
        return json.loads(r.out)

    out = push()
    assert rsync_runs(caplog) == []
    assert out["transfers"] == [
        {"path": "data", "files_transferred": 0, "bytes_transferred": 0, "literal_bytes": 0}
    ]
    (project / "train.py").write_text("print('code only')\n")  # a code edit: still no rsync
    push()
    assert rsync_runs(caplog) == []
    assert box_path(box, rdir, "train.py").read_text() == "print('code only')\n"
    # Whatever rsync's quick check would see sends it: same size with another time...
    st = (data / "a.bin").stat()
    (data / "a.bin").write_bytes(b"A" * 1000)
    os.utime(data / "a.bin", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert push()["transfers"][0]["files_transferred"] == 1
    assert len(rsync_runs(caplog)) == 1
    assert box_path(box, rdir, "data/set/a.bin").read_bytes() == b"A" * 1000
    # ...another mode, a new file, a link pointing elsewhere.
    (data / "b.bin").chmod(0o600)
    push()
    assert len(rsync_runs(caplog)) == 1
    assert box_path(box, rdir, "data/set/b.bin").stat().st_mode & 0o777 == 0o600
    (data / "sub").mkdir()
    (data / "sub" / "c").write_text("c")
    push()
    assert box_path(box, rdir, "data/set/sub/c").read_text() == "c"
    (data / "link").unlink()
    (data / "link").symlink_to("b.bin")
    push()
    assert os.readlink(box_path(box, rdir, "data/set/link")) == "b.bin"
    push()
    assert rsync_runs(caplog) == []


def test_push_leaves_no_files_in_the_control_dir(box, project, rdir, tmp_path):
    """A push's lock goes with it and its memo of the box tree lives in the project's git
    directory: nothing piles up in the control directory per project and host (issue 24)."""
    import fcntl

    from remotedl.ssh.openssh import control_dir

    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    ctl = control_dir()
    legacy_memo = ctl / "push-0123456789abcdef.json"  # what older versions left
    legacy_memo.write_text('{"path": "/x", "commit": null}')
    stale_lock = ctl / "push-0123456789abcdee.lock"
    stale_lock.write_text("")
    held_lock = ctl / "push-0123456789abcded.lock"  # a push of another process holds this one
    fd = os.open(held_lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        first = sync.push(spec, project, rdir)
        (project / "README").write_text("changed\n")
        second = sync.push(spec, project, rdir)
        assert held_lock.exists()
    finally:
        os.close(fd)
        held_lock.unlink(missing_ok=True)
    assert not legacy_memo.exists() and not stale_lock.exists()
    key = f"{spec.user}@{spec.hostname}:{spec.port}:{sync.normalize_remote_dir(rdir)}"
    assert not (ctl / f"push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock").exists()
    memos = list((project / ".git").glob("remotedl-push-*.json"))
    assert len(memos) == 1
    assert json.loads(memos[0].read_text()) == {"path": first.remote_dir, "commit": second.commit}
    assert box_path(box, rdir, "README").read_text() == "changed\n"


def test_push_lock_takes_turns_though_each_holder_removes_it():
    import threading
    from types import SimpleNamespace

    from remotedl.ssh.openssh import control_dir

    spec = SimpleNamespace(user="u", hostname=f"turns-{os.getpid()}", port=22)
    inside, most, rounds = [0], [0], 30
    guard = threading.Lock()

    def pusher() -> None:
        for _ in range(rounds):
            with sync.push_lock(spec, "~/x"):  # type: ignore[arg-type]
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                for _ in range(200):
                    pass
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=pusher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert most[0] == 1
    key = f"u@{spec.hostname}:22:~/x"
    assert not (control_dir() / f"push-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock").exists()
