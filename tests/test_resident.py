"""The resident agent (issue 24): after the first session over a master, requests go through the
master's stream-local forward to one Python per box user and agent version, already loaded;
whatever goes wrong with it, the command still runs (over a session) and nothing runs twice."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl.agent import resident as box_side
from remotedl.ssh.channel import encode_request
from remotedl.waiting import retry_until
from tests.conftest import cli_for, make_env


def _servers(home: Path) -> list[int]:
    """The box's resident agent servers (not a request's passing fork): their parent is init."""
    out = []
    for pid in sandbox.resident_pids(home):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[1] == "1":
            out.append(pid)
    return out


def _remote_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m.getMessage() for m in caplog.records if m.getMessage().startswith("remote ")]


def _resident_up(run, project: Path, home: Path) -> int:  # type: ignore[no-untyped-def]
    """Push, then commands until the box's resident agent answers; its pid."""
    assert run("push", cwd=project).code == 0
    assert run("jobs", cwd=project).code == 0  # installs the agent if needed
    assert run("jobs", cwd=project).code == 0  # starts the resident agent, sets up the forward
    pids = retry_until(lambda: _servers(home), seconds=20)
    assert pids and len(pids) == 1, pids
    return pids[0]


def test_commands_after_the_first_are_answered_by_the_resident_agent(fresh_box, tmp_path, project, caplog):
    run = cli_for(fresh_box, tmp_path / "laptop")
    server = _resident_up(run, project, fresh_box.home)
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")

    def sent(*argv: str) -> tuple[int, str, str, list[str]]:
        caplog.clear()
        r = run(*argv, cwd=project)
        return r.code, r.out, r.err, _remote_lines(caplog)

    code, out, _, lines = sent("jobs", "--json")
    assert code == 0, out
    assert json.loads(out) == [], out
    assert lines and all("(resident)" in x or "resident)" in x for x in lines), lines
    # A start with a secret: through the socket, and the job sees it; exit status and both
    # streams come back as from a session.
    code, out, err, lines = sent(
        "run", "--no-push", "--cpu", "--env", "TOKEN=s3cr3t-value", "--",
        "sh", "-c", 'echo "out $TOKEN"; echo to-stderr >&2; exit 3',
    )  # fmt: skip
    assert code == 3, err
    assert "out s3cr3t-value" in out and "to-stderr" in out + err
    assert lines and all("resident" in x for x in lines), lines
    # Still the same server: nothing started another.
    assert _servers(fresh_box.home) == [server]


def test_a_resident_agent_that_died_is_replaced_and_no_command_fails(fresh_box, tmp_path, project, caplog):
    run = cli_for(fresh_box, tmp_path / "laptop")
    first = _resident_up(run, project, fresh_box.home)
    os.kill(first, signal.SIGKILL)
    retry_until(lambda: first not in _servers(fresh_box.home), seconds=10)
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")
    r = run("jobs", cwd=project)  # the forward finds no server: a session, which starts one
    assert r.code == 0, r.err
    second = retry_until(lambda: _servers(fresh_box.home), seconds=20)
    assert second and second[0] != first
    caplog.clear()
    r = run("run", "--no-push", "--cpu", "--", "echo", "after", cwd=project)
    assert r.code == 0 and "after" in r.out, r.err
    assert any("resident" in x for x in _remote_lines(caplog))


def test_a_changed_login_file_ends_the_resident_agent(fresh_box, tmp_path, project):
    """A line added to the start-up files (a PATH, a variable) or a new group is what a fresh
    login sees: the resident agent (started under the old ones) ends, and the next command's
    job sees the new environment."""
    run = cli_for(fresh_box, tmp_path / "laptop")
    first = _resident_up(run, project, fresh_box.home)
    rc = fresh_box.home / ".bashrc"
    old = rc.read_text() if rc.exists() else ""
    rc.write_text(old + "\nexport RDL_LOGIN_MARK=fresh-login\n")
    r = run("run", "--no-push", "--cpu", "--", "sh", "-c", 'echo "mark=$RDL_LOGIN_MARK"', cwd=project)
    assert r.code == 0, r.err
    assert "mark=fresh-login" in r.out
    assert retry_until(lambda: first not in sandbox.resident_pids(fresh_box.home), seconds=10)
    second = retry_until(lambda: _servers(fresh_box.home), seconds=20)
    assert second and first not in second


def test_a_box_that_refuses_stream_forwarding_is_reached_by_sessions(fresh_box, tmp_path, project, caplog):
    from remotedl.ssh import resolve_host
    from remotedl.ssh.openssh import close_master, control_dir

    config = Path(fresh_box.info.directory) / "sshd_config"
    config.write_text("AllowStreamLocalForwarding no\n" + config.read_text())
    os.kill(fresh_box.info.pid, signal.SIGHUP)  # sshd reads its config again
    close_master(
        resolve_host(make_env(tmp_path / "laptop"), fresh_box.name, ssh_config=fresh_box.info.ssh_config)
    )
    run = cli_for(fresh_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")
    for _ in range(4):
        r = run("run", "--no-push", "--cpu", "--", "echo", "via-session", cwd=project)
        assert r.code == 0 and "via-session" in r.out, r.err
    # Tried a few times at most, then sessions only: this box's .off marker.
    from remotedl.agent.client import build_agent
    from remotedl.ssh import resident

    spec = resolve_host(make_env(tmp_path / "laptop"), fresh_box.name, ssh_config=fresh_box.info.ssh_config)
    local = resident.local_path(spec, build_agent().digest)
    assert local.parent == control_dir()
    assert resident.is_off(local)
    caplog.clear()
    assert run("jobs", cwd=project).code == 0
    lines = _remote_lines(caplog)
    assert lines and not any("resident" in x for x in lines), lines


def test_a_big_log_comes_through_the_resident_agent_byte_for_byte(fresh_box, tmp_path, project):
    run = cli_for(fresh_box, tmp_path / "laptop")
    _resident_up(run, project, fresh_box.home)
    script = (
        "import sys\nfor i in range(200000):\n    sys.stdout.write(f'line {i} ' + 'x' * (i % 50) + '\\n')\n"
    )
    (project / "big.py").write_text(script)
    subprocess.run(["git", "-C", str(project), "add", "big.py"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "big"], check=True)
    r = run("run", "--detach", "--json", "--cpu", "python3", "big.py", cwd=project)
    assert r.code == 0, r.err
    job = str(json.loads(r.out)["id"])

    def ended() -> bool:
        return json.loads(run("show", "--json", job, cwd=project).out)["status"] == "succeeded"

    assert retry_until(ended, seconds=60)
    expected = "".join(f"line {i} " + "x" * (i % 50) + "\n" for i in range(200000))
    out = run("logs", job, cwd=project).out
    assert len(out) == len(expected) and out == expected


def _holders(local: Path) -> list[int]:
    """The laptop's holders (``remotedl.ssh.spare``) of connections to the forward at ``local``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(local)) in argv and any(a.endswith(b"spare.py") for a in argv):
            found.append(int(entry.name))
    return found


def _forward_of(fresh_box, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    from remotedl.agent.client import build_agent
    from remotedl.ssh import resident, resolve_host

    spec = resolve_host(make_env(tmp_path / "laptop"), fresh_box.name, ssh_config=fresh_box.info.ssh_config)
    return resident.local_path(spec, build_agent().digest)


def test_a_connection_held_ahead_answers_the_next_command_but_never_for_an_old_login(
    fresh_box, tmp_path, project, caplog
):
    """After a command the resident agent answered, a holder beside the master keeps a greeted
    connection for the next one (one round trip less). What a held connection missed meanwhile
    (here a line added to .bashrc) is checked when the request comes: the job sees the new
    login, and the holder goes when the master does."""
    from remotedl.ssh import resolve_host, spare
    from remotedl.ssh.channel import Box
    from remotedl.ssh.openssh import close_master

    run = cli_for(fresh_box, tmp_path / "laptop")
    _resident_up(run, project, fresh_box.home)
    local = _forward_of(fresh_box, tmp_path)
    assert run("jobs", cwd=project).code == 0  # answered through the forward: starts the holder
    assert retry_until(lambda: spare.holder_path(local).exists() and _holders(local), seconds=10)
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")
    for n in range(3):  # each command takes the one held, and the holder opens the next
        caplog.clear()
        r = run("run", "--no-push", "--cpu", "--", "echo", f"held-{n}", cwd=project)
        assert r.code == 0 and f"held-{n}" in r.out, r.err
        assert any("held ahead" in m.getMessage() for m in caplog.records), [
            m.getMessage() for m in caplog.records
        ]
    assert len(_holders(local)) == 1
    # Give the holder time to open its next connection, then change what a login sees.
    retry_until(lambda: len(sandbox.resident_pids(fresh_box.home)) >= 2, seconds=10)
    rc = fresh_box.home / ".bashrc"
    rc.write_text((rc.read_text() if rc.exists() else "") + "\nexport RDL_LOGIN_MARK=after-hold\n")
    # What the agent itself runs sees it (a job gets a fresh login's environment anyway).
    caplog.clear()
    spec = resolve_host(make_env(tmp_path / "laptop"), fresh_box.name, ssh_config=fresh_box.info.ssh_config)
    out = Box(spec, resident=True).run('printf "mark=%s" "${RDL_LOGIN_MARK-}"').stdout
    assert any("held ahead" in m.getMessage() for m in caplog.records)
    assert out.endswith("mark=after-hold"), out
    # The master's end takes the holder with it (and the relays it kept waiting on the box).
    close_master(spec)
    assert retry_until(lambda: not _holders(local), seconds=15), _holders(local)
    assert not spare.holder_path(local).exists()


def test_a_held_connection_ends_with_the_resident_agent(fresh_box, tmp_path, project):
    """The box's relay kept waiting for a request ends when its server does; the holder, finding
    no server to open another to, leaves too: nothing is left on either side."""
    from remotedl.ssh import spare

    run = cli_for(fresh_box, tmp_path / "laptop")
    server = _resident_up(run, project, fresh_box.home)
    local = _forward_of(fresh_box, tmp_path)
    assert run("jobs", cwd=project).code == 0
    assert retry_until(
        lambda: _holders(local) and len(sandbox.resident_pids(fresh_box.home)) >= 2, seconds=10
    )
    os.kill(server, signal.SIGTERM)
    assert retry_until(lambda: not sandbox.resident_pids(fresh_box.home), seconds=10), sandbox.resident_pids(
        fresh_box.home
    )
    assert retry_until(lambda: not _holders(local), seconds=15)
    assert not spare.holder_path(local).exists()
    r = run("run", "--no-push", "--cpu", "--", "echo", "still-works", cwd=project)
    assert r.code == 0 and "still-works" in r.out, r.err


# ------------------------------------------------------------------ the box side, without a box


def _request(conn: socket.socket, payload: bytes, tail: int) -> tuple[bytes, bytes, int]:
    import threading

    assert conn.recv(len(box_side.GREETING)) == box_side.GREETING
    # Sent while the answer is read, as the laptop does (``ssh.resident.Link``).
    threading.Thread(target=conn.sendall, args=(b"RUN %d %d\n" % (len(payload), tail) + payload,)).start()
    out, err, code, buf = b"", b"", None, b""
    while code is None:
        chunk = conn.recv(65536)
        assert chunk, "the server ended without an exit frame"
        buf += chunk
        while len(buf) >= 5:
            kind, size = buf[:1], int.from_bytes(buf[1:5], "big")
            if len(buf) < 5 + size:
                break
            data, buf = buf[5 : 5 + size], buf[5 + size :]
            if kind == b"o":
                out += data
            elif kind == b"e":
                err += data
            elif kind == b"x":
                code = int(data)
    return out, err, code


def _serve_one(conn: socket.socket) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            box_side.handle(conn, sys.executable)
        finally:
            os._exit(0)
    conn.close()
    return pid


def test_the_box_side_runs_a_framed_script_and_the_agent_in_a_fork(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    # A script: values as "$@", stdin after them, both streams and the exit status.
    ours, theirs = socket.socketpair()
    pid = _serve_one(theirs)
    _, payload = encode_request('echo "$1-$2"; cat; echo oops >&2; exit 7', ["a b", "c\nd"], b"rest of stdin")
    out, err, code = _request(ours, payload, len(b"rest of stdin"))
    os.waitpid(pid, 0)
    assert code == 7
    assert out.endswith(b"a b-c\nd\nrest of stdin") and err.endswith(b"oops\n")
    # An agent call's script says HERE when the python is the server's: the agent answers from
    # a fork of this process, with the request that followed the values.
    ours, theirs = socket.socketpair()
    pid = _serve_one(theirs)
    request = json.dumps({"op": "list", "all": True}).encode()
    script = f'[ "${{_rdl_here-}}" = "$1" ] && exit {box_side.HERE}\necho "not here"; exit 9'
    _, payload = encode_request(script, [sys.executable], request)
    out, err, code = _request(ours, payload, len(request))
    os.waitpid(pid, 0)
    assert code == 0, err
    answer = json.loads(out.decode().strip().splitlines()[-1])
    assert answer["ok"] is True and answer["jobs"] == []


def test_a_request_that_waited_past_a_login_change_runs_nothing(tmp_path, monkeypatch):
    """A connection greeted before a login file changed (held ahead by the laptop) gets "n" for
    its request: nothing ran, the laptop takes a session. One whose server ended while it
    waited is closed before any request."""
    monkeypatch.setenv("HOME", str(tmp_path))
    marker = tmp_path / "ran"
    _, payload = encode_request(f"touch {marker}", [], b"")
    (tmp_path / ".profile").write_text("# before\n")
    login = box_side.login_state()
    (tmp_path / ".profile").write_text("# after: another line\n")
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        try:
            box_side.handle(theirs, sys.executable, login=login)
        finally:
            os._exit(0)
    theirs.close()
    assert ours.recv(len(box_side.GREETING)) == box_side.GREETING
    ours.sendall(b"RUN %d 0\n" % len(payload) + payload)
    answer = b""
    while len(answer) < 5 and (chunk := ours.recv(100)):
        answer += chunk
    ours.close()
    os.waitpid(pid, 0)
    assert answer == b"n\0\0\0\0" and not marker.exists()
    # The server's end, while a connection waits for its request.
    ended, ending = os.pipe()
    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        os.close(ending)
        try:
            box_side.handle(theirs, sys.executable, ended=ended, login=box_side.login_state())
        finally:
            os._exit(0)
    theirs.close()
    os.close(ended)
    assert ours.recv(len(box_side.GREETING)) == box_side.GREETING
    os.close(ending)
    assert ours.recv(100) == b""  # closed: nothing was read, nothing ran
    os.waitpid(pid, 0)


def test_the_socket_directory_must_be_the_users_own(tmp_path):
    ours = tmp_path / "run"
    assert box_side.private_dir(str(ours)) and (ours.stat().st_mode & 0o777) == 0o700
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert not box_side.private_dir(str(link))
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        assert not box_side.private_dir(str(foreign))


def test_a_new_server_sweeps_the_files_of_servers_that_no_longer_run(tmp_path):
    import fcntl

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    dead = run / "0000000000000000.sock"
    dead.write_text("")
    (run / "0000000000000000.sock.lock").write_text("")
    live = run / "1111111111111111.sock"
    live.write_text("")
    held = os.open(run / "1111111111111111.sock.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)  # its server runs
    laptop_files = [run / "push-abc.lock", run / "r-1234-5678.sock"]  # never a server's
    for f in laptop_files:
        f.write_text("")
    try:
        box_side._sweep(str(run / "2222222222222222.sock"))
        assert not dead.exists() and not (run / "0000000000000000.sock.lock").exists()
        assert live.exists() and (run / "1111111111111111.sock.lock").exists()
        assert all(f.exists() for f in laptop_files)
    finally:
        os.close(held)


def test_a_script_that_writes_before_it_reads_its_stdin_does_not_stall(tmp_path, monkeypatch):
    """A script that prints a lot before reading a big stdin: the relay keeps moving its
    output while the input waits (a blocking write to its stdin would stall both)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    ours, theirs = socket.socketpair()
    pid = _serve_one(theirs)
    data = b"y" * (4 << 20)
    _, payload = encode_request("head -c 3000000 /dev/zero | tr '\\0' x; wc -c", [], data)
    out, err, code = _request(ours, payload, 0)
    os.waitpid(pid, 0)
    assert code == 0, err
    assert out.count(b"x") == 3000000 and out.rstrip().endswith(str(len(data)).encode())


def test_forward_sockets_no_master_listens_on_are_swept(tmp_path):
    """A master leaves its forward's socket file when it ends; the next forward made removes
    such files (and markers past their time), not the ones a master still listens on."""
    from remotedl.ssh import resident

    def bound(name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        s.listen(1)
        return s

    live = bound("r-live-0.sock")
    bound("r-dead-0.sock").close()  # its file stays: no one listens on it
    old, recent = tmp_path / "r-old-0.off", tmp_path / "r-recent-0.strikes"
    old.touch()
    recent.write_text("1")
    past = old.stat().st_mtime - resident.OFF_FOR - 60
    os.utime(old, (past, past))
    other = tmp_path / "push-x.lock"
    other.touch()
    resident.sweep(tmp_path)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["push-x.lock", "r-live-0.sock", "r-recent-0.strikes"]
    live.close()


def test_the_holder_answers_at_once_and_hands_over_the_connection_it_opened(tmp_path):
    """The holder (``remotedl.ssh.spare``) against a stand-in forward: before the box greets its
    connection a command is told "none" (it opens its own, it does not wait), after it gets that
    very connection; the holder opens the next one at once, and leaves when no agent answers."""
    from remotedl.ssh import spare

    local = tmp_path / "r-h-d.sock"
    forward = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    forward.bind(str(local))
    forward.listen(4)
    forward.settimeout(20)
    spare.start(local, b"hello 1\n", 60)
    first, _ = forward.accept()  # the holder's connection, not greeted yet
    assert retry_until(lambda: spare.holder_path(local).exists(), seconds=10)
    asked = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    asked.settimeout(10)
    asked.connect(str(spare.holder_path(local)))
    assert asked.recv(1) == b"N"  # none ready: said, not waited for
    asked.close()
    assert spare.take(local) == (None, True)
    first.sendall(b"hello 1\n")
    taken = retry_until(lambda: spare.take(local)[0], seconds=10)
    assert taken is not None
    taken.sendall(b"RUN")
    assert first.recv(3) == b"RUN"  # the same connection, now the command's
    taken.close()
    second, _ = forward.accept()  # the next one, opened at once
    second.close()  # no greeting: no agent there any more
    assert retry_until(lambda: not spare.holder_path(local).exists(), seconds=10)
    forward.close()
    first.close()


def test_a_request_the_box_never_took_is_an_error_not_a_second_run(tmp_path, monkeypatch):
    """Against a stand-in forward that greets: a connection that ends before the box took the
    request (``a``) means nothing ran, so a session may run it; one that goes silent after the
    request may have run it, so the command stops with an error instead of running it twice."""
    import threading

    from remotedl.errors import ConnectError
    from remotedl.ssh import resident

    monkeypatch.setattr(resident, "GREET_TIMEOUT", 0.5)
    local = tmp_path / "r-s-d.sock"
    forward = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    forward.bind(str(local))
    forward.listen(4)
    forward.settimeout(20)
    kept: list[socket.socket] = []

    def box(then_close: bool) -> None:
        conn, _ = forward.accept()
        conn.sendall(box_side.GREETING)
        conn.recv(100)
        if then_close:
            conn.close()
        else:
            kept.append(conn)  # silent

    for then_close, expected in ((True, resident.Unavailable), (False, ConnectError)):
        t = threading.Thread(target=box, args=(then_close,))
        t.start()
        with pytest.raises(expected):
            resident.Link(local).open(b"payload", 0)
        t.join()
    forward.close()
    for c in kept:
        c.close()
