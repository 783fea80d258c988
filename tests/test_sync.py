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
from remotedl.ssh import resolve_host
from tests.conftest import cli_for, make_env, retry_until


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


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


def box_path(box, rdir: str, rel: str = "") -> Path:
    return Path(rdir.replace("~", box.info.home, 1)) / rel


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


def test_missing_data_path(cli, project, rdir):
    r = cli("push", "--remote-dir", rdir, "--data", "nope", cwd=project)
    assert r.code == 2
    assert "data path nope does not exist" in r.err


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
