"""`remotedl tensorboard`: a real TensorBoard (the tensorboard package) on the sandbox box,
found or started in tmux on the box's 127.0.0.1 and answering through the tunnel."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from remotedl import tensorboard as tb
from tests.conftest import cli_for, tmux_dir

TENSORBOARD = Path(sys.executable).parent / "tensorboard"


def tensorboard_in_box_venv(box, remote_dir: str) -> None:
    """TensorBoard in the box project's .venv (the test environment's own, linked in: the box
    has no PyPI in tests, and its PATH, the test process's, need not hold the venv's bin)."""
    bindir = box.home / remote_dir.removeprefix("~/") / ".venv" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    if not (bindir / "tensorboard").exists():
        (bindir / "tensorboard").symlink_to(TENSORBOARD)


def write_scalars(directory: Path, tag: str, values: list[float]) -> None:
    """Event files as a training script's SummaryWriter leaves them (without TensorFlow)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    directory.mkdir(parents=True, exist_ok=True)
    w = EventFileWriter(str(directory))
    for step, v in enumerate(values):
        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)])
        w.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
    w.close()


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=20) as r:
        return json.loads(r.read())


def stop_tensorboards(box) -> None:
    env = {**os.environ, "TMUX_TMPDIR": tmux_dir(box)}
    out = subprocess.run(
        ["tmux", "list-sessions", "-F", "#{session_name}"], capture_output=True, text=True, env=env
    )
    for name in out.stdout.split():
        if name.startswith(tb.SESSION_PREFIX):
            subprocess.run(["tmux", "kill-session", "-t", f"={name}"], env=env, check=False)


@pytest.fixture
def tb_project(box, project, tmp_path):
    remote = f"~/tb-tests/{tmp_path.name}"
    (project / "remotedl.toml").write_text(f'remote_dir = "{remote}"\n')
    run = cli_for(box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    tensorboard_in_box_venv(box, remote)
    yield run, box.home / remote.removeprefix("~/")
    run("tunnel", "--stop", "all")
    stop_tensorboards(box)


def test_tensorboard_through_the_tunnel(box, project, tb_project):
    run, work = tb_project
    write_scalars(work / "runs" / "exp1", "loss", [1.0, 0.5, 0.25])
    from remotedl.waiting import free_port

    local = free_port()
    r = run("tensorboard", "--local-port", str(local), "--background", cwd=project)
    assert r.code == 0, r.err
    url = r.out.strip().splitlines()[-1]
    assert url == f"http://127.0.0.1:{local}/"
    assert "TensorBoard started on the box" in r.err
    assert f"serving {work.resolve() / 'runs'}" in r.err
    # The real TensorBoard answers through the tunnel, with the run and its scalars.
    runs = get_json(url + "data/runs")
    assert runs == ["exp1"]
    tags = get_json(url + "data/plugin/scalars/tags")
    assert "loss" in tags["exp1"]
    points = get_json(url + "data/plugin/scalars/scalars?run=exp1&tag=loss")
    assert [p[2] for p in points] == [1.0, 0.5, 0.25]
    # Bound to the box's loopback only, and found (not started again) the second time.
    remote_port = int(re.search(r"\(port (\d+),", r.err).group(1))
    with open("/proc/net/tcp") as f:
        rows = [x.split() for x in f.read().splitlines()[1:]]
    listening = [x for x in rows if x[3] == "0A" and int(x[1].rsplit(":", 1)[1], 16) == remote_port]
    assert listening and all(x[1].startswith("0100007F:") for x in listening)
    local2 = free_port()
    r2 = run("tensorboard", "runs", "--local-port", str(local2), "--background", cwd=project)
    assert r2.code == 0, r2.err
    assert "TensorBoard found running on the box" in r2.err
    assert get_json(f"http://127.0.0.1:{local2}/data/runs") == ["exp1"]


def test_tensorboard_on_a_box_that_is_this_machine_needs_no_tunnel(box, project, tb_project):
    """The sandbox box shares this machine's loopback: its TensorBoard on port P is already
    127.0.0.1:P here. Asked for that local port, `tensorboard` refused it as taken (by the very
    server it found), and a tunnel from it would collide: the server is used as it is."""
    run, work = tb_project
    write_scalars(work / "runs" / "exp1", "loss", [1.0, 0.5])
    from remotedl.waiting import free_port

    r = run("tensorboard", "--local-port", str(free_port()), "--background", cwd=project)
    assert r.code == 0, r.err
    remote_port = int(re.search(r"\(port (\d+),", r.err).group(1))
    assert run("tunnel", "--stop", "all").code == 0
    r = run("tensorboard", "--local-port", str(remote_port), cwd=project)  # the foreground command
    assert r.code == 0, r.err
    assert "TensorBoard found running on" in r.err
    assert "no tunnel needed" in r.err
    assert r.out.strip().splitlines()[-1] == f"http://127.0.0.1:{remote_port}/"
    assert get_json(f"http://127.0.0.1:{remote_port}/data/runs") == ["exp1"]


def test_tensorboard_configured_logdir_and_missing_install(box, project, tb_project, tmp_path):
    run, work = tb_project
    (project / "remotedl.toml").write_text(
        (project / "remotedl.toml").read_text() + 'tensorboard_logdir = "logs/tb"\n'
    )
    write_scalars(work / "logs" / "tb" / "a b", "acc", [0.1, 0.9])  # a space in a run's name
    from remotedl.waiting import free_port

    local = free_port()
    r = run("tensorboard", "--local-port", str(local), "--background", cwd=project)
    assert r.code == 0, r.err
    assert get_json(f"http://127.0.0.1:{local}/data/runs") == ["a b"]
    # Without TensorBoard in the project's environment (and none on PATH): what to install.
    (work / ".venv" / "bin" / "tensorboard").unlink()
    if any((Path(d) / "tensorboard").exists() for d in os.environ["PATH"].split(os.pathsep) if d):
        pytest.skip("this PATH has a tensorboard of its own, and the box (sharing it) would use it")
    r = run("tensorboard", "elsewhere", "--local-port", str(free_port()), cwd=project)
    assert r.code == 1
    assert "TensorBoard is not installed on" in r.err
    assert "pip install tensorboard" in r.err


def test_served_directory_of_a_running_tensorboard():
    import base64

    key = base64.b64encode(json.dumps({"working_directory": "/home/u/p", "arguments": []}).encode()).decode()
    assert tb._served({"logdir": "runs", "cache_key": key}) == "/home/u/p/runs"
    assert tb._served({"logdir": "/abs/./runs/", "cache_key": key}) == "/abs/runs"
    spec = base64.b64encode(
        json.dumps({"working_directory": "/w", "arguments": ["--logdir_spec", "a:/x"]}).encode()
    ).decode()
    assert tb._served({"logdir": "a:/x", "cache_key": spec}) == "a:/x"
    assert tb.logdir_spec([("3-train", "/x/3"), ("4", "/x/4")]) == "3-train:/x/3,4:/x/4"
