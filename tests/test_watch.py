"""push --watch against the real sshd box: saves reach the box, a refused push is shown and
watching goes on, and a `run` during a watch still pushes first."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl import watch
from remotedl.ssh import resolve_host
from remotedl.watch import WatchEvent
from tests.conftest import make_env, retry_until


@pytest.fixture
def rdir(tmp_path) -> str:
    return f"~/watch-tests/{tmp_path.name}"


def box_file(box, rdir: str, rel: str) -> Path:
    return Path(rdir.replace("~", box.info.home, 1)) / rel


def reads(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


class Watching:
    """A watch running in a thread, its events collected; stopped at the end of the test."""

    def __init__(self, box, project: Path, rdir: str, tmp_path: Path, **kw: object) -> None:
        self.spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
        self.events: list[WatchEvent] = []
        self.stop = threading.Event()
        self.error: list[BaseException] = []

        def target() -> None:
            try:
                watch.watch(self.spec, project, rdir, on_event=self.events.append, stop=self.stop, **kw)  # type: ignore[arg-type]
            except BaseException as e:  # surfaced by the test, not lost in the thread
                self.error.append(e)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(20)


@pytest.fixture
def watching(box, project, rdir, tmp_path) -> Iterator[Watching]:
    w = Watching(box, project, rdir, tmp_path)
    yield w
    w.close()
    assert not w.thread.is_alive()
    assert not w.error, w.error


def test_watch_pushes_saves_and_goes_on_after_a_refused_push(box, project, rdir, watching):
    assert retry_until(lambda: watching.kinds() == ["pushed"], seconds=30), watching.events
    assert watching.events[0].changed == []  # the first push, before any change
    (project / "train.py").write_text("v1\n")
    assert retry_until(lambda: len(watching.events) == 2, seconds=30), watching.events
    assert reads(box_file(box, rdir, "train.py"), "v1\n")
    assert watching.events[-1].changed == ["train.py"]
    # A box edit in the way: the push is refused, shown, and watching goes on.
    box_file(box, rdir, "train.py").write_text("edited on the box\n")
    (project / "train.py").write_text("v2\n")
    assert retry_until(lambda: "refused" in watching.kinds(), seconds=30), watching.events
    refused = next(e for e in watching.events if e.kind == "refused")
    assert refused.error is not None and "train.py" in refused.error.message
    assert box_file(box, rdir, "train.py").read_text() == "edited on the box\n"
    pushes = watching.kinds().count("pushed")
    box_file(box, rdir, "train.py").write_text("v1\n")  # the box edit undone there
    (project / "other.py").write_text("o\n")
    # One push brings both: wait for it to be over (the box's checkout writes other.py before
    # train.py, so other.py alone may show up while train.py is still being written).
    def both() -> bool:
        return watching.kinds().count("pushed") > pushes and reads(box_file(box, rdir, "other.py"), "o\n")

    assert retry_until(both, seconds=30), watching.events
    assert box_file(box, rdir, "train.py").read_text() == "v2\n"
    assert watching.thread.is_alive()


def test_watch_ignores_what_push_ignores(box, project, rdir, watching):
    (project / ".gitignore").write_text("runs/\n")
    assert retry_until(lambda: reads(box_file(box, rdir, ".gitignore"), "runs/\n"), seconds=30)
    pushes = len(watching.events)
    (project / "runs").mkdir()
    for i in range(5):
        (project / "runs" / f"{i}.log").write_text("x")
    (project / "last.py").write_text("1\n")  # a change that counts, after the ignored ones
    assert retry_until(lambda: reads(box_file(box, rdir, "last.py"), "1\n"), seconds=30)
    assert all("runs" not in " ".join(e.changed) for e in watching.events[pushes:])
    assert not box_file(box, rdir, "runs").exists()


def test_watch_pushes_only_changed_data(box, project, rdir, tmp_path):
    (project / ".gitignore").write_text("data/\nother/\n")
    for d in ("data", "other"):
        (project / d).mkdir()
        (project / d / "a.bin").write_bytes(b"a" * 100)
    w = Watching(box, project, rdir, tmp_path, data=["data", "other"])
    try:
        assert retry_until(lambda: w.kinds() == ["pushed"], seconds=30), w.events
        first = w.events[0].result
        assert first is not None and [t.path for t in first.transfers] == ["data", "other"]
        (project / "data" / "b.bin").write_bytes(b"b" * 10)
        assert retry_until(lambda: len(w.events) == 2, seconds=30), w.events
        assert reads(box_file(box, rdir, "data/b.bin"), "b" * 10)
        last = w.events[-1].result
        assert last is not None and [t.path for t in last.transfers] == ["data"]
        assert last.code_changed is False
    finally:
        w.close()
    assert not w.error, w.error


def test_cli_watch_reports_each_push(cli, box, project, rdir):
    done: list = []
    argv = ("push", "--watch", "--pushes", "2", "--remote-dir", rdir)
    t = threading.Thread(target=lambda: done.append(cli(*argv, cwd=project)), daemon=True)
    t.start()
    assert retry_until(lambda: box_file(box, rdir, "README").exists(), seconds=30)
    (project / "saved.py").write_text("x = 1\n")
    t.join(60)
    assert done, "the watch did not stop after two pushes"
    r = done[0]
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "pushed (first push)" in lines[0]
    assert "pushed (saved.py)" in lines[1] and "code " in lines[1]
    assert "stopped watching after 2 pushes" in r.err
    assert reads(box_file(box, rdir, "saved.py"), "x = 1\n")


def test_run_during_a_watch_pushes_first(cli, box, project, rdir, tmp_path):
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    w = Watching(box, project, rdir, tmp_path)
    try:
        assert retry_until(lambda: w.kinds() == ["pushed"], seconds=30), w.events
        for i in range(3):  # saves and runs racing the watch's own pushes
            (project / "show.sh").write_text(f"echo saved {i}\n")
            r = cli("run", "--cpu", "sh", "show.sh", cwd=project)
            assert r.code == 0, r.err
            assert f"saved {i}" in r.out
    finally:
        w.close()
    assert not w.error, w.error
    assert "refused" not in w.kinds() and "failed" not in w.kinds(), w.events


def test_a_save_during_the_first_push_is_not_missed(box, project, rdir, tmp_path):
    # 4.3 MB of code (under max_snapshot_file): a first push that takes a moment
    (project / "big.py").write_text("# a first push that takes a moment\n" * 120_000)
    w = Watching(box, project, rdir, tmp_path)
    try:
        assert retry_until(lambda: box_file(box, rdir, "").exists(), seconds=30)
        (project / "early.py").write_text("saved while the first push ran\n")
        assert retry_until(lambda: reads(box_file(box, rdir, "early.py"), "saved while the first push ran\n"),
                           seconds=30), w.events  # fmt: skip
    finally:
        w.close()
    assert not w.error, w.error
