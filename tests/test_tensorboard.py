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
    assert re.fullmatch(rf"http://127\.0\.0\.1:{local}/[0-9a-f]{{32}}/", url), url  # the secret prefix
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
    url2 = r2.out.strip().splitlines()[-1]
    assert url2 == url.replace(str(local), str(local2))
    assert get_json(url2 + "data/runs") == ["exp1"]


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
    url = r.out.strip().splitlines()[-1]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{remote_port}/[0-9a-f]{{32}}/", url), url
    assert get_json(url + "data/runs") == ["exp1"]


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
    assert get_json(r.out.strip().splitlines()[-1] + "data/runs") == ["a b"]
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


def test_another_users_record_is_not_trusted_and_the_port_alone_shows_nothing(
    box, project, tb_project, other_user, tmp_path
):
    """A second user of the box plants a TensorBoard record for the job's directory, backed by
    a live server of theirs: remotedl starts its own instead. And that user, who can reach
    TensorBoard's 127.0.0.1 port, reads no scalars through it (the path prefix is secret: in
    no argv, no file they can read)."""
    import base64
    import shutil
    import stat
    import tempfile

    from remotedl.waiting import free_port, port_answers, retry_until

    run, work = tb_project
    write_scalars(work / "runs" / "exp1", "loss", [1.0, 0.5])
    serves = str((work / "runs").resolve())
    # The other user's server: a page of theirs under a long "secret" prefix.
    site = Path(tempfile.mkdtemp(prefix="rdl-other-site-"))
    planted_prefix = "b" * 32
    (site / planted_prefix / "data").mkdir(parents=True)
    (site / planted_prefix / "data" / "runs").write_text('["planted"]')
    for p in [site, *site.rglob("*")]:
        os.chown(p, other_user.uid, other_user.gid)
    site.chmod(0o755)
    fake_port = free_port()
    fake = other_user.popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(fake_port), "-d", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    info_dir = Path("/tmp/.tensorboard-info")
    record = info_dir / f"pid-{fake.pid}.info"
    try:
        if not info_dir.exists():
            info_dir.mkdir()
            info_dir.chmod(0o777)  # as TensorBoard makes it
        assert retry_until(lambda: port_answers("127.0.0.1", fake_port), seconds=30)
        cache = {"working_directory": str(work), "arguments": ["--logdir", serves], "configure_kwargs": {}}
        info = {
            "version": "2.21.0",
            "start_time": int(time.time()),
            "port": fake_port,
            "pid": fake.pid,
            "path_prefix": "/" + planted_prefix,
            "logdir": serves,
            "db": "",
            "cache_key": base64.b64encode(json.dumps(cache).encode()).decode(),
        }
        planted = other_user.run(["sh", "-c", 'cat > "$1"', "sh", str(record)], input=json.dumps(info))
        assert planted.returncode == 0, planted.stderr
        assert record.stat().st_uid == other_user.uid

        local = free_port()
        r = run("tensorboard", "--local-port", str(local), "--background", cwd=project)
        assert r.code == 0, r.err
        assert "TensorBoard started on the box" in r.err  # not "found running": not theirs
        url = r.out.strip().splitlines()[-1]
        assert planted_prefix not in url
        assert get_json(url + "data/runs") == ["exp1"]

        # What the other user can see of it: the port, the process's argv. Not the prefix.
        remote_port = int(re.search(r"\(port (\d+),", r.err).group(1))
        secret = url.rstrip("/").rsplit("/", 1)[1]
        mine = list((box.home / ".remotedl" / "tensorboard" / ".tensorboard-info").glob("pid-*.info"))
        live = [i for i in (json.loads(f.read_text()) for f in mine) if Path(f"/proc/{i['pid']}").exists()]
        # By its secret, not its port alone: a record left by a killed TensorBoard of an earlier
        # test may name the same default port and a pid the kernel has since handed out again.
        (tb_pid,) = [i["pid"] for i in live if i["port"] == remote_port and i["path_prefix"] == "/" + secret]
        for f in mine:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        flags = list((box.home / ".remotedl").glob("*.flags"))
        assert flags and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in flags)
        look = other_user.run(["cat", f"/proc/{tb_pid}/cmdline"])
        assert look.returncode == 0 and "--flagfile=" in look.stdout and secret not in look.stdout
        probe = (
            "import sys, urllib.request, urllib.error\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        urllib.request.urlopen(path, timeout=20).read(); print(path, 'READ')\n"
            "    except urllib.error.HTTPError as e:\n"
            "        print(path, e.code)\n"
        )
        base = f"http://127.0.0.1:{remote_port}/"
        paths = [base + "data/runs", base + "data/plugin/scalars/scalars?run=exp1&tag=loss", base]
        tried = other_user.run([sys.executable, "-c", probe, *paths])
        assert tried.returncode == 0, tried.stderr
        assert "READ" not in tried.stdout and tried.stdout.count(" 404") == 3, tried.stdout
    finally:
        fake.kill()
        fake.wait()
        record.unlink(missing_ok=True)
        shutil.rmtree(site, ignore_errors=True)


def test_a_record_whose_pid_now_names_another_process_is_not_trusted(box, project, tb_project):
    """TensorBoard killed hard leaves its record behind; the kernel later hands its pid to some
    other process of the same user. That record, for the very directory and with a secret
    prefix, is not a running TensorBoard: remotedl starts one of its own."""
    from remotedl.waiting import free_port

    run, work = tb_project
    write_scalars(work / "runs" / "exp1", "loss", [1.0])
    serves = str((work / "runs").resolve())
    other = subprocess.Popen(["sleep", "300"])  # the box user's, like the reused pid would be
    records = box.home / ".remotedl" / "tensorboard" / ".tensorboard-info"
    records.mkdir(parents=True, exist_ok=True)
    record = records / f"pid-{other.pid}.info"
    try:
        record.write_text(
            json.dumps(
                {
                    "version": "2.21.0",
                    "start_time": int(time.time()) - 3600,
                    "port": free_port(),
                    "pid": other.pid,
                    "path_prefix": "/" + "c" * 32,
                    "logdir": serves,
                    "db": "",
                    "cache_key": "",
                }
            )
        )
        record.chmod(0o600)
        r = run("tensorboard", "--local-port", str(free_port()), "--background", cwd=project)
        assert r.code == 0, r.err
        assert "TensorBoard started on the box" in r.err, r.err
        url = r.out.strip().splitlines()[-1]
        assert "c" * 32 not in url
        assert get_json(url + "data/runs") == ["exp1"]
    finally:
        other.kill()
        other.wait()
        record.unlink(missing_ok=True)
