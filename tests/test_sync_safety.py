"""push and pull under faults and against boxes that are not ours (issue 17): files are whole or
absent, the box's other files and projects are safe, the laptop's .git is never the box's to write."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl import sync
from remotedl.errors import ConnectError, RemotedlError
from remotedl.ssh import resolve_host
from tests.conftest import box_path, cli_for, git, make_env, retry_until


@pytest.fixture
def rdir(tmp_path) -> str:
    return f"~/safety-tests/{tmp_path.name}"


def spec_of(box, tmp_path):
    return resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)


def write_random(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(size >> 22):
            f.write(os.urandom(1 << 22))


def files_over(where: Path, size: int, but: Path | None = None) -> list[Path]:
    found = []
    for dirpath, _, names in os.walk(where):
        for n in names:
            p = Path(dirpath) / n
            try:
                if p != but and p.stat().st_size >= size:
                    found.append(p)
            except OSError:
                pass
    return found


def sshd_children(box) -> list[int]:
    """The box's per-connection sshd processes (children of its listening sshd)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == box.info.pid:
                kids.append(int(entry))
    return kids


def kill_connection(box) -> None:
    for pid in sshd_children(box):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------ files are whole or absent


def test_push_cut_mid_file_leaves_no_truncated_file_and_resumes(fresh_box, project, tmp_path):
    rdir = "~/cut"
    big = project / "data" / "big.bin"
    write_random(big, 256 << 20)
    (project / ".gitignore").write_text("data/\n")
    spec = spec_of(fresh_box, tmp_path)
    target = box_path(fresh_box, rdir, "data/big.bin")
    old = b""
    for round_ in ("new", "changed"):
        outcome: list[object] = []

        def push(outcome: list[object] = outcome) -> None:
            try:
                outcome.append(sync.push(spec, project, rdir, data=["data"]))
            except RemotedlError as e:
                outcome.append(e)

        t = threading.Thread(target=push, daemon=True)
        t.start()
        # Cut the connection once part of the file is on the box (kill the box's sshd children).
        assert retry_until(lambda: files_over(box_path(fresh_box, rdir), 16 << 20, but=target), seconds=60)
        kill_connection(fresh_box)
        t.join(60)
        assert outcome and isinstance(outcome[0], ConnectError), outcome
        if round_ == "new":
            assert not target.exists()  # absent, not 1970-dated and truncated
        else:
            assert target.read_bytes() == old  # the previous version, whole
        partial = box_path(fresh_box, rdir, "data/.remotedl-partial/big.bin")
        assert retry_until(partial.exists, seconds=10)
        kept = partial.stat().st_size
        assert kept > 0
        result = sync.push(spec, project, rdir, data=["data"])
        assert target.read_bytes() == big.read_bytes()
        assert not partial.exists()
        # The resume sent only what was missing (plus what changed), not the whole file again.
        assert result.transfers[0].literal_bytes <= big.stat().st_size - kept + (1 << 20)
        old = big.read_bytes()
        with big.open("r+b") as f:  # the next round: a changed file, cut again
            f.seek(200 << 20)
            f.write(os.urandom(1 << 20))


def test_pull_cut_mid_file_leaves_no_truncated_file(fresh_box, project, tmp_path):
    rdir = "~/cutpull"
    spec = spec_of(fresh_box, tmp_path)
    sync.push(spec, project, rdir)
    src = box_path(fresh_box, rdir, "out/model.bin")
    write_random(src, 256 << 20)
    dest = project / "out" / "model.bin"
    outcome: list[object] = []

    def pull() -> None:
        try:
            outcome.append(sync.pull(spec, project, rdir, ["out"]))
        except RemotedlError as e:
            outcome.append(e)

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    assert retry_until(lambda: files_over(project / "out", 16 << 20) if (project / "out").exists() else [],
                       seconds=60)  # fmt: skip
    kill_connection(fresh_box)
    t.join(60)
    assert outcome and isinstance(outcome[0], RemotedlError), outcome
    assert not dest.exists()
    assert (project / "out" / ".remotedl-partial" / "model.bin").exists()
    result = sync.pull(spec, project, rdir, ["out"])
    assert dest.read_bytes() == src.read_bytes()
    assert result.transfers[0].literal_bytes < src.stat().st_size
    # What rsync kept aside never enters the code snapshot.
    assert "remotedl-partial" not in git(project, "status", "--porcelain")
    snap = sync.take_snapshot(project)
    assert snap.commit is not None
    assert "remotedl-partial" not in git(project, "ls-tree", "-r", "--name-only", snap.commit)


@pytest.fixture
def small_disk(box, rdir) -> Iterator[Path]:
    """remote_dir on a 1 MiB tmpfs (needs root and mount)."""
    where = box_path(box, rdir)
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_checkout_out_of_disk_rolls_back_and_next_push_works(cli, box, project, rdir, small_disk):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    first = git(project, "rev-parse", "HEAD")
    (project / "README").write_text("changed\n")
    for i in range(3):  # 1.8 MB on the box; a few kB as git objects
        (project / f"big{i}.txt").write_text("the same line again\n" * 30_000)
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "checkout on" in r.err and "failed" in r.err
    assert "back at the previous commit" in r.err
    assert git(small_disk, "rev-parse", "HEAD") == first
    assert git(small_disk, "status", "--porcelain", "--untracked-files=all") == ""
    assert (small_disk / "README").read_text() == "hello\n"
    assert not list(small_disk.glob("big*"))
    for i in range(3):
        (project / f"big{i}.txt").unlink()
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err  # not refused as "edits not pushed from here"
    assert (small_disk / "README").read_text() == "changed\n"


def test_a_cut_checkout_is_recognised_as_ours(cli, box, project, rdir):
    (project / "a.py").write_text("a = 1\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    before = box_path(box, rdir)
    old = git(before, "rev-parse", "HEAD")
    (project / "a.py").write_text("a = 2\n" * 100)
    (project / "b.py").write_text("b = 2\n" * 100)
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    new = git(before, "rev-parse", "HEAD")
    # The box as a checkout from old to new cut half-way leaves it: HEAD old, files half-written.
    git(before, "checkout", "-q", "--detach", old)
    (before / "a.py").write_text("a = 2\n" * 10)
    (before / "b.py").write_text("b = 2\n" * 3)
    git(before, "update-ref", "refs/remotedl/checkout", new)
    (project / "c.py").write_text("c\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert (before / "a.py").read_text() == "a = 2\n" * 100
    assert (before / "b.py").read_text() == "b = 2\n" * 100
    assert git(before, "status", "--porcelain") == ""
    assert subprocess.run(["git", "-C", str(before), "rev-parse", "-q", "--verify", "refs/remotedl/checkout"],
                          capture_output=True).returncode == 1  # fmt: skip
    # A real box edit made after such a cut is still refused.
    (before / "c.py").write_text("box\n")
    (project / "c.py").write_text("laptop\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1 and "c.py" in r.err


def test_concurrent_first_pushes_agree_on_one_repository(box, project, rdir, tmp_path):
    env = {**os.environ, **box.env_vars, "REMOTEDL_HOST": box.name}
    env["REMOTEDL_SSH_CONFIG"] = box.info.ssh_config
    (project / "train.py").write_text("print(1)\n")
    argv = [sys.executable, "-m", "remotedl", "push", "--remote-dir", rdir]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen(argv, cwd=project, env=env, **pipes) for _ in range(4)]
    results = [(p.wait(60), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    assert all(code == 0 for code, _ in results), results
    where = box_path(box, rdir)
    assert (where / "train.py").read_text() == "print(1)\n"
    assert not (where / ".git" / ".git").exists()
    assert not list(where.parent.glob(".remotedl-new.*"))


def test_concurrent_claims_on_the_box_are_atomic(box, project, tmp_path):
    """Past this machine's own lock (as from several laptops): the box side alone agrees."""
    spec = spec_of(box, tmp_path)
    rdir = f"~/safety-tests/claims-{tmp_path.name}"
    start = threading.Barrier(6)
    got: list[object] = []

    def claim() -> None:
        start.wait()
        try:
            got.append(sync.claim_remote_dir(sync.Box(spec), rdir, project).path)
        except RemotedlError as e:
            got.append(e)

    threads = [threading.Thread(target=claim) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    where = box_path(box, rdir)
    assert got == [str(where)] * 6
    assert git(where, "config", "remotedl.project") == git(project, "rev-list", "--max-parents=0", "HEAD")
    assert not (where / ".git" / ".git").exists()
    assert not list(where.parent.glob(".remotedl-new.*"))


# ------------------------------------------------------------------ the box's files and other projects


@pytest.mark.parametrize("bad", ["~", "~/", "/", "/usr", "/etc", "/home", "/tmp", "~/../.."])
def test_unsafe_remote_dirs_are_refused(cli, project, bad):
    r = cli("push", "--remote-dir", bad, cwd=project)
    assert r.code == 3, r.err
    assert "remote_dir" in r.err and "--remote-dir" in r.err


def test_remote_dir_through_a_symlink_to_home_is_refused(cli, box, project, tmp_path):
    link = box.home / f"home-link-{tmp_path.name}"
    link.symlink_to(box.home)
    r = cli("push", "--remote-dir", f"~/{link.name}", cwd=project)
    assert r.code == 3, r.err
    assert "is the home directory" in r.err
    assert not (box.home / ".git").exists() and not (box.home / "README").exists()


def test_existing_directories_that_are_not_ours_are_refused(cli, box, project, tmp_path):
    other = box.home / f"their-repo-{tmp_path.name}"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "theirs.txt").write_text("keep\n")
    git(other, "add", ".")
    git(other, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "theirs")
    head, branch = git(other, "rev-parse", "HEAD"), git(other, "symbolic-ref", "HEAD")
    r = cli("push", "--remote-dir", str(other), cwd=project)
    assert r.code == 1
    assert "git repository remotedl did not make" in r.err and "--remote-dir" in r.err
    assert (other / "theirs.txt").read_text() == "keep\n"
    assert git(other, "rev-parse", "HEAD") == head and git(other, "symbolic-ref", "HEAD") == branch
    plain = box.home / f"their-dir-{tmp_path.name}"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine\n")
    r = cli("push", "--remote-dir", str(plain), cwd=project)
    assert r.code == 1
    assert "is not empty and is not remotedl's" in r.err
    assert sorted(os.listdir(plain)) == ["notes.txt"]
    empty = box.home / f"empty-{tmp_path.name}"
    empty.mkdir()
    assert cli("push", "--remote-dir", str(empty), cwd=project).code == 0


def test_another_project_is_refused_and_run_no_push_can_tell(cli, box, project, rdir, tmp_path):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    twin = tmp_path / "elsewhere" / project.name  # same directory name, another project
    twin.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(twin)], check=True)
    (twin / "other.py").write_text("other\n")
    git(twin, "add", ".")
    git(twin, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "other")
    r = cli("push", "--remote-dir", rdir, cwd=twin)
    assert r.code == 1
    assert "belongs to another project" in r.err and "--remote-dir" in r.err
    assert box_path(box, rdir, "README").read_text() == "hello\n"
    assert not box_path(box, rdir, "other.py").exists()
    spec = spec_of(box, tmp_path)
    assert sync.verify_remote_dir(spec, project, rdir) == str(box_path(box, rdir))
    with pytest.raises(RemotedlError, match="belongs to another project"):
        sync.verify_remote_dir(spec, twin, rdir)
    with pytest.raises(RemotedlError, match="does not exist"):
        sync.verify_remote_dir(spec, project, rdir + "-never-pushed")
    r = cli("run", "--no-push", "--remote-dir", rdir, "--cpu", "--", "cat", "README", cwd=twin)
    assert r.code == 1  # the twin's run never runs this project's code
    assert "belongs to another project" in r.err
    # An empty repository's identity survives its first commit.
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "init", "-q", str(fresh)], check=True)
    (fresh / "x.py").write_text("x\n")
    frdir = rdir + "-fresh"
    assert cli("push", "--remote-dir", frdir, cwd=fresh).code == 0
    git(fresh, "add", ".")
    git(fresh, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "first")
    assert cli("push", "--remote-dir", frdir, cwd=fresh).code == 0


# ------------------------------------------------------------------ the laptop is not the box's to write


def test_pull_never_writes_into_git(cli, box, project, rdir, tmp_path):
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    where = box_path(box, rdir)
    # A hostile box: its repository's config runs a command at the next `git status` that reads it.
    git(where, "config", "core.fsmonitor", f"touch {tmp_path}/PWNED")
    nested = where / "vendor" / "lib"
    nested.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(nested)], check=True)
    git(nested, "config", "core.fsmonitor", f"touch {tmp_path}/PWNED")
    (where / "results.txt").write_text("result\n")
    (where / ".remotedl").mkdir()
    (where / ".remotedl" / "state").write_text("remotedl's own\n")
    config = (project / ".git" / "config").read_bytes()
    for bad in (".git", ".git/config", "./.git", "vendor/lib/.git", "x/../.git/hooks"):
        r = cli("pull", "--remote-dir", rdir, bad, cwd=project)
        assert r.code == 2, (bad, r.err)
        assert "never writes into .git" in r.err
    r = cli("pull", "--remote-dir", rdir, ".", cwd=project)
    assert r.code == 0, r.err
    assert (project / "results.txt").read_text() == "result\n"
    assert (project / ".git" / "config").read_bytes() == config
    assert not (project / "vendor" / "lib" / ".git").exists()
    assert not (project / ".remotedl").exists()
    git(project, "status")
    subprocess.run(["git", "-C", str(project / "vendor" / "lib"), "status"], capture_output=True)
    assert not (tmp_path / "PWNED").exists()
    # Nor through a symlink here that leads into .git.
    (project / "out").symlink_to(".git")
    (where / "out").mkdir()
    (where / "out" / "config").write_text("[core]\n\tfsmonitor = touch PWNED\n")
    r = cli("pull", "--remote-dir", rdir, "out", cwd=project)
    assert r.code == 2 and "never writes into .git" in r.err
    assert (project / ".git" / "config").read_bytes() == config


def test_pull_keeps_uncommitted_edits_and_says_so(cli, box, project, rdir):
    (project / "notes.md").write_text("v1\n")
    git(project, "add", "notes.md")
    git(project, "commit", "-qm", "notes")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    box_path(box, rdir, "notes.md").write_text("written by a job\n")
    box_path(box, rdir, "README").write_text("box readme\n")
    (project / "notes.md").write_text("my uncommitted edit\n")
    past = os.stat(project / "notes.md").st_mtime - 3600  # older than the box's: --update would take it
    os.utime(project / "notes.md", (past, past))
    r = cli("pull", "--remote-dir", rdir, ".", cwd=project)
    assert r.code == 0, r.err
    assert (project / "notes.md").read_text() == "my uncommitted edit\n"
    assert "kept notes.md here" in r.err and "commit or stash" in r.err
    # Unmodified here, but tracked: not named, so kept, and said so.
    assert (project / "README").read_text() == "hello\n"
    assert "kept README here: tracked files (the box has another version)" in r.err
    assert "remotedl pull [--job ID] README" in r.err
    r = cli("pull", "--remote-dir", rdir, "notes.md", "--json", cwd=project)
    assert json.loads(r.out)["kept"] == ["notes.md"]
    r = cli("pull", "--remote-dir", rdir, "README", cwd=project)  # named: taken, and said why
    assert r.code == 0, r.err
    assert (project / "README").read_text() == "box readme\n"
    assert "replaced README here (tracked): named in the pull; `git restore README`" in r.out


def test_pull_from_a_source_dir(box, project, rdir, tmp_path):
    spec = spec_of(box, tmp_path)
    sync.push(spec, project, rdir)
    job = box_path(box, rdir, ".remotedl/jobs/7")
    (job / "out").mkdir(parents=True)
    (job / "out" / "metrics.json").write_text("{}\n")
    result = sync.pull(spec, project, rdir, ["out"], source_dir=str(job))
    assert (project / "out" / "metrics.json").read_text() == "{}\n"
    assert result.transfers[0].files_transferred == 1
    with pytest.raises(RemotedlError, match=r"never writes into \.git"):
        sync.pull(spec, project, rdir, [".git"], source_dir=str(job))
    with pytest.raises(RemotedlError, match="absolute"):
        sync.pull(spec, project, rdir, ["out"], source_dir="relative/dir")
    with pytest.raises(RemotedlError, match="does not exist"):
        sync.pull(spec, project, rdir, ["out"], source_dir=str(job) + "-gone")


def test_one_handshake_per_push_still(fresh_box, project, tmp_path):
    log = fresh_box.dir / "sshd.log"
    run = cli_for(fresh_box, tmp_path / "laptop")
    for _ in range(2):
        before = log.read_text().count("Accepted publickey")
        (project / "README").write_text(f"{before}\n")
        assert run("push", cwd=project).code == 0
        assert log.read_text().count("Accepted publickey") - before <= 1


def test_what_this_machine_remembers_of_a_box_tree_is_only_a_shortcut(cli, box, project, rdir, tmp_path):
    (project / "a.py").write_text("a\n")
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    where = box_path(box, rdir)
    subprocess.run(["rm", "-rf", str(where)], check=True)  # the box tree went away
    (project / "a.py").write_text("a2\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert (where / "a.py").read_text() == "a2\n"
    # Gone again, and another project took the place: ours is refused, theirs left alone.
    subprocess.run(["rm", "-rf", str(where)], check=True)
    other = tmp_path / "other"
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    (other / "b.py").write_text("b\n")
    git(other, "add", ".")
    git(other, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-qm", "other")
    assert cli("push", "--remote-dir", rdir, cwd=other).code == 0
    (project / "a.py").write_text("a3\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 1
    assert "belongs to another project" in r.err
    assert sorted(p.name for p in where.iterdir()) == [".git", "b.py"]
    # The box's objects were pruned under us: the next push sends them again.
    subprocess.run(["rm", "-rf", str(where)], check=True)
    assert cli("push", "--remote-dir", rdir, cwd=project).code == 0
    git(where, "checkout", "-q", "--detach", git(where, "rev-parse", "HEAD^"))
    git(where, "update-ref", "-d", "refs/remotedl/pushed")
    git(where, "reflog", "expire", "--expire=now", "--all")
    git(where, "gc", "-q", "--prune=now")
    (project / "a.py").write_text("a4\n")
    r = cli("push", "--remote-dir", rdir, cwd=project)
    assert r.code == 0, r.err
    assert (where / "a.py").read_text() == "a4\n"


def test_pull_lands_where_push_took_it_from(cli, box, project, rdir):
    sub = project / "sub"
    sub.mkdir()
    (sub / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')  # the project file below the top
    (sub / "tracked.txt").write_text("v1\n")
    git(project, "add", ".")
    git(project, "commit", "-qm", "sub")
    assert cli("push", cwd=sub).code == 0
    assert box_path(box, rdir, "sub/tracked.txt").read_text() == "v1\n"  # push sends the top
    box_path(box, rdir, "sub/out.txt").write_text("made on the box\n")
    box_path(box, rdir, "sub/tracked.txt").write_text("box version\n")
    (sub / "tracked.txt").write_text("edited here\n")
    past = os.stat(sub / "tracked.txt").st_mtime - 3600
    os.utime(sub / "tracked.txt", (past, past))
    r = cli("pull", "sub", cwd=sub)
    assert r.code == 0, r.err
    assert (sub / "out.txt").read_text() == "made on the box\n"
    assert not (sub / "sub").exists()
    assert (sub / "tracked.txt").read_text() == "edited here\n"
    assert "kept sub/tracked.txt here" in r.err
