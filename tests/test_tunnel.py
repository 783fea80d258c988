"""Tunnels through the real sshd box: forwarding, self-healing, port errors, Jupyter.

The box shares this machine's loopback, so the two ends of a forward use different ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl import tunnel as tun
from remotedl.ssh import resolve_host
from remotedl.waiting import free_port
from tests.conftest import Box, cli_for, make_env, retry_until


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_server():
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def echo_through(port: int, payload: bytes = b"ping", timeout: float = 10) -> bytes | None:
    """Send payload through the port and read the echo, sending and reading at once (a large
    payload sent whole before reading would stall on full buffers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

            def send() -> None:
                try:
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            sender = threading.Thread(target=send, daemon=True)
            sender.start()
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            sender.join(timeout)
            return got
    except OSError:
        return None


def spec_for(box, tmp_path):
    return resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)


def test_forward_binds_loopback_and_moves_bytes(box, tmp_path, echo_server):
    local = free_port()
    events = []
    t = tun.Tunnel(spec_for(box, tmp_path), [tun.Forward(local, echo_server)], on_event=events.append)
    th = tun.start_in_thread(t)
    try:
        assert t.wait_connected(15), events
        payload = os.urandom(1 << 20)
        assert echo_through(local, payload) == payload
        listeners = tun._listeners_from_proc(local)
        assert listeners and all("ssh" in cmd for _, cmd in listeners)
        # bound to 127.0.0.1 only: the machine's other addresses do not answer
        with open("/proc/net/tcp") as f:
            rows = [r.split() for r in f.read().splitlines()[1:]]
        ours = [r for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == local]
        assert ours and all(r[1].startswith("0100007F:") for r in ours)
    finally:
        t.stop()
        th.join(10)


def test_tunnel_comes_back_after_connection_dies(fresh_box, tmp_path, echo_server):
    local = free_port()
    events = []
    t = tun.Tunnel(spec_for(fresh_box, tmp_path), [tun.Forward(local, echo_server)], on_event=events.append)
    th = tun.start_in_thread(t)
    try:
        assert t.wait_connected(15)
        assert echo_through(local) == b"ping"
        # The link dies (the box's sshd drops every connection, as on a network change).
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(fresh_box.info.pid)], capture_output=True, text=True
        )
        for pid in map(int, out.stdout.split()):
            os.kill(pid, signal.SIGKILL)
        assert retry_until(lambda: t.reconnects >= 1, seconds=10), events
        assert retry_until(lambda: echo_through(local, timeout=3) == b"ping", seconds=30), events
        assert any(e.kind == "reconnecting" for e in events)
    finally:
        t.stop()
        th.join(10)


def test_port_in_use_is_refused_fast_naming_holder(cli, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        # Fast: refused before anything reaches for the box, here at a port that answers nothing
        # (a connection error would say so). No clock: a loaded CI machine makes a limit a flake.
        r = cli("tunnel", f"{port}:{port + 1}", "--port", str(free_port()))
        assert r.code == 1
        assert f"local port {port} is already in use by pid {os.getpid()}" in r.err
        # a free local port to the same box port
        assert re.search(rf"e\.g\. `remotedl tunnel \d+:{port + 1}`", r.err), r.err
        assert "Traceback" not in r.err
    finally:
        holder.close()


def test_port_in_use_hints_keep_the_box_port_and_the_command(cli, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        r = cli("tunnel", f"{port}:7777")
        assert r.code == 1
        m = re.search(r"e\.g\. `remotedl tunnel (\d+):7777`", r.err)
        assert m, r.err
        assert int(m.group(1)) != port
        r = cli("tunnel", "--jupyter", str(port), "9000:9001")
        assert re.search(r"e\.g\. `remotedl tunnel \d+ 9000:9001 --jupyter`", r.err), r.err
        r = cli("jupyter", str(port))
        assert r.code == 1
        assert re.search(r"e\.g\. `remotedl jupyter \d+`", r.err), r.err
        proj = tmp_path / "jproj"
        proj.mkdir()
        (proj / "remotedl.toml").write_text(f"jupyter_port = {port}\n")
        r = cli("jupyter", cwd=proj)  # the configured default port is busy
        assert re.search(r"e\.g\. `remotedl jupyter \d+`", r.err), r.err
        r = cli("jupyter", f"{port}:8890")
        assert re.search(r"e\.g\. `remotedl jupyter \d+:8890`", r.err), r.err
    finally:
        holder.close()


def test_nothing_listening_on_box_side_keeps_tunnel_up(box, tmp_path):
    local = free_port()
    # The box shares this loopback: the two ends must differ, or the tunnel forwards to itself.
    remote = retry_until(lambda: p if (p := free_port()) != local else None, seconds=5)
    assert remote
    events = []
    t = tun.Tunnel(spec_for(box, tmp_path), [tun.Forward(local, remote)], on_event=events.append)
    th = tun.start_in_thread(t)
    try:
        assert t.wait_connected(15)
        assert echo_through(local, timeout=2) in (b"", None)
        assert retry_until(lambda: any(e.kind == "refused" for e in events), seconds=15), events
        msg = next(e.message for e in events if e.kind == "refused")
        assert f"port {remote}" in msg
        assert "stays up" in msg
        # Start the service on the box: the same tunnel now reaches it.
        srv = socketserver.ThreadingTCPServer(("127.0.0.1", remote), Echo)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            assert retry_until(lambda: echo_through(local) == b"ping", seconds=15)
        finally:
            srv.shutdown()
            srv.server_close()
        assert t.reconnects == 0
    finally:
        t.stop()
        th.join(10)


def test_background_list_and_stop(box, tmp_path, echo_server):
    run = cli_for(box, tmp_path / "laptop")
    local = free_port()
    r = run("tunnel", f"{local}:{echo_server}", "--background")
    assert r.code == 0, r.err
    assert echo_through(local) == b"ping"
    r = run("tunnel", "--list", "--json")
    (rec,) = json.loads(r.out)
    assert rec["forwards"] == [f"{local}:{echo_server}"]
    assert rec["status"] == "connected"
    r = run("tunnel", "--stop", str(local))
    assert r.code == 0, r.err
    assert retry_until(lambda: echo_through(local, timeout=1) is None, seconds=5)
    assert json.loads(run("tunnel", "--list", "--json").out) == []
    r = run("tunnel", "--stop", str(local))
    assert r.code == 2


def test_a_tunnel_record_whose_pid_now_names_another_process_is_no_tunnel(box, tmp_path):
    """A background tunnel that died without a word (a reboot, kill -9) leaves its record; the
    kernel hands its pid to another program. That is no tunnel: not listed, and `--stop` never
    signals the program that has the pid now."""
    run = cli_for(box, tmp_path / "laptop")
    other = subprocess.Popen(["sleep", "300"])
    records = make_env(tmp_path / "laptop").state_dir / "tunnels"
    records.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (records / f"{port}.json").write_text(
        json.dumps({"host": box.name, "forwards": [f"{port}:8888"], "status": "connected", "pid": other.pid,
                    "started": time.time() - 3600})
    )  # fmt: skip
    try:
        r = run("tunnel", "--list", "--json")
        assert r.code == 0, r.err
        assert json.loads(r.out) == []
        r = run("tunnel", "--stop", "all")
        assert r.code == 2 and "no background tunnel" in r.err, r.err
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


JUPYTER = Path(sys.executable).parent / "jupyter"


def jupyter_in_box_venv(box, remote_dir: str) -> None:
    """Jupyter in the box project's .venv, as `remotedl setup jupyter` leaves it (the test
    environment's own Jupyter, linked in: the box has no PyPI in tests). The box's PATH is
    the test process's, which need not hold any jupyter."""
    bindir = box.home / remote_dir.removeprefix("~/") / ".venv" / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (bindir / "jupyter").symlink_to(JUPYTER)


def test_jupyter_through_tunnel(box, project, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    (project / "remotedl.toml").write_text(f'remote_dir = "~/jupyter-tests/{tmp_path.name}"\n')
    assert run("push", cwd=project).code == 0
    jupyter_in_box_venv(box, f"~/jupyter-tests/{tmp_path.name}")
    local = free_port()
    r = run("jupyter", str(local), "--background", cwd=project)
    assert r.code == 0, r.err
    url = r.out.strip().splitlines()[-1]
    assert url.startswith(f"http://127.0.0.1:{local}/")
    assert "token=" in url
    token = url.split("token=")[1]
    status = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{local}/api/status?token={token}", timeout=10).read()
    )
    assert "started" in status
    # Without the token the server answers 403: the token is real.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://127.0.0.1:{local}/api/contents", timeout=10)
    assert e.value.code == 403
    # The server is bound to the box's loopback and its root is the synced work tree.
    servers = subprocess.run(
        [str(JUPYTER), "server", "list", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": box.info.home},
    ).stdout
    mine = [json.loads(x) for x in servers.splitlines() if token in x]
    assert mine
    assert mine[0]["root_dir"].endswith(f"jupyter-tests/{tmp_path.name}")
    assert mine[0]["hostname"] in ("127.0.0.1", "localhost")
    # A second tunnel finds the running server instead of starting another.
    local2 = free_port()
    r2 = run("jupyter", str(local2), "--background", cwd=project)
    assert r2.code == 0, r2.err
    assert "found running" in r2.err
    assert r2.out.strip().endswith(token)
    assert run("tunnel", "--stop", "all").code == 0
    subprocess.run(
        ["tmux", "kill-session", "-t", "=remotedl-jupyter"],
        check=False,
        env={**os.environ, "TMUX_TMPDIR": str(sandbox._tmux_dir(box.dir))},
    )


def test_jupyter_on_a_box_that_is_this_machine_needs_no_tunnel(box, project, tmp_path):
    """The sandbox box shares this machine's loopback: its Jupyter on port P is already
    127.0.0.1:P here, where a tunnel from P collided with it ("a local port of the tunnel is
    already in use"). The server is used as it is; a second run finds it running."""
    run = cli_for(box, tmp_path / "laptop")
    (project / "remotedl.toml").write_text(f'remote_dir = "~/jupyter-tests/{tmp_path.name}"\n')
    assert run("push", cwd=project).code == 0
    jupyter_in_box_venv(box, f"~/jupyter-tests/{tmp_path.name}")
    port = free_port()
    try:
        r = run("jupyter", f"{port}:{port}", cwd=project)  # the foreground command
        assert r.code == 0, r.err
        assert "no tunnel needed" in r.err
        url = r.out.strip().splitlines()[-1]
        assert url.startswith(f"http://127.0.0.1:{port}/")
        token = url.split("token=")[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=10) as resp:
            assert "started" in json.loads(resp.read())
        # again: the local port is taken by that very server, which is found running
        r2 = run("jupyter", f"{port}:{port}", cwd=project)
        assert r2.code == 0, r2.err
        assert "found running" in r2.err and "no tunnel needed" in r2.err
        assert r2.out.strip().endswith(token)
    finally:
        subprocess.run(
            ["tmux", "kill-session", "-t", "=remotedl-jupyter"],
            check=False,
            env={**os.environ, "TMUX_TMPDIR": str(sandbox._tmux_dir(box.dir))},
        )


def _jupyter_stand_in(token: str | None):
    """An HTTP server answering as Jupyter's /api and /api/status do: with ``token`` only to
    that token (403 otherwise); with None to any, as a server without a token does."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            given = dict(p.partition("=")[::2] for p in query.split("&") if p).get("token")
            if path == "/api":
                body: dict = {"version": "2.0.0"}
            elif path == "/api/status" and (token is None or given == token):
                body = {"started": "2026-01-01T00:00:00Z"}
            else:
                self.send_response(403)
                self.end_headers()
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def test_only_the_boxs_own_jupyter_counts_as_reached():
    """What holds the local port is taken for the box's server only when it is: its own
    process, or a server that checks tokens and takes this one's. A local Jupyter without a
    token takes any token: it is not the box's."""
    from remotedl import jupyter

    def server(token: str, pid: int | None) -> jupyter.JupyterServer:
        return jupyter.JupyterServer(1, token, "/w", "/", True, started=True, pid=pid)

    checking, open_one = _jupyter_stand_in("T0K3N"), _jupyter_stand_in(None)
    try:
        port, open_port = checking.server_address[1], open_one.server_address[1]
        assert jupyter.serves_jupyter(port) and jupyter.serves_jupyter(open_port)
        assert server("T0K3N", None).reached_at(port)  # through a tunnel: the token tells
        assert not server("other", None).reached_at(port)
        assert not server("T0K3N", None).reached_at(open_port)  # takes any token
        assert not server("", None).reached_at(open_port)
        assert server("", os.getpid()).reached_at(open_port)  # its own process listens there
        assert not jupyter.serves_jupyter(free_port())
    finally:
        checking.shutdown()
        open_one.shutdown()


def test_a_port_taken_under_the_tunnel_is_named_with_its_holder(box, tmp_path):
    """A port taken after the check (ssh itself cannot listen): the port and who holds it."""
    from remotedl.errors import RemotedlError

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        t = tun.Tunnel(spec_for(box, tmp_path), [tun.Forward(port, port + 1)])
        with pytest.raises(RemotedlError) as e:
            t.run()
        assert f"local port {port} is already in use by pid {os.getpid()}" in e.value.message
        assert e.value.hint and re.search(rf"`remotedl tunnel \d+:{port + 1}`", e.value.hint)
    finally:
        holder.close()


def test_colab_runtime_allows_colab_origin(box, project, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    (project / "remotedl.toml").write_text(f'remote_dir = "~/jupyter-tests/{tmp_path.name}"\n')
    assert run("push", cwd=project).code == 0
    jupyter_in_box_venv(box, f"~/jupyter-tests/{tmp_path.name}")
    local, remote = free_port(), free_port()
    r = run("jupyter", f"{local}:{remote}", "--colab", "--background", cwd=project)
    try:
        assert r.code == 0, r.err
        token = r.out.strip().split("token=")[1]
        # Colab's page calls the runtime from its own origin: the CORS preflight must allow it.
        req = urllib.request.Request(
            f"http://127.0.0.1:{local}/api/status?token={token}",
            method="OPTIONS",
            headers={"Origin": "https://colab.research.google.com", "Access-Control-Request-Method": "GET"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.headers["Access-Control-Allow-Origin"] == "https://colab.research.google.com"
        assert f"remote {remote}" in r.err or str(remote) in r.err  # exactly the port asked for
    finally:
        run("tunnel", "--stop", "all")
        subprocess.run(
            ["tmux", "kill-session", "-t", "=remotedl-jupyter"],
            check=False,
            env={**os.environ, "TMUX_TMPDIR": str(sandbox._tmux_dir(box.dir))},
        )


def test_no_jupyter_on_box_says_how_to_install(tmp_path, project, monkeypatch):
    # A box whose PATH has no jupyter (only the system's directories).
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    base = tmp_path / "nojup"
    info = sandbox.up(make_env(base), name="nojup", gpus=0)
    monkeypatch.undo()
    try:
        run = cli_for(Box(info, {}), tmp_path / "laptop")
        r = run("jupyter", str(free_port()), cwd=project)
        assert r.code == 1
        assert "Jupyter is not installed on nojup" in r.err
        assert "pip install jupyterlab" in r.err
    finally:
        sandbox.down(make_env(base), name="nojup")


def test_tunnel_cli_foreground_prints_and_closes(box, tmp_path, echo_server):
    env = {
        **os.environ,
        **make_env(tmp_path / "laptop").environ,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "REMOTEDL_HOST": box.name,
    }
    local = free_port()
    p = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "tunnel", f"{local}:{echo_server}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert retry_until(lambda: echo_through(local) == b"ping", seconds=15)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=15)
    assert p.returncode == 0
    assert f"forwarding 127.0.0.1:{local} -> box 127.0.0.1:{echo_server}" in err
    assert retry_until(lambda: echo_through(local, timeout=1) is None, seconds=5)


def test_bad_port_spec(cli):
    r = cli("tunnel", "http")
    assert r.code == 2
    assert "is not PORT or LOCAL:REMOTE" in r.err
    assert cli("tunnel", "70000").code == 2


def test_a_jupyter_runtime_file_whose_pid_now_names_another_process_is_not_a_server(box, project, tmp_path):
    """Jupyter killed hard (SIGHUP from its tmux session, OOM, a reboot) leaves its runtime file;
    `jupyter server list` lists it as long as some process has its pid, and the kernel hands
    pids out again. That file, for this very project, is no running server: one is started."""
    run = cli_for(box, tmp_path / "laptop")
    rdir = f"~/jupyter-tests/{tmp_path.name}"
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    assert run("push", cwd=project).code == 0
    jupyter_in_box_venv(box, rdir)
    other = subprocess.Popen(["sleep", "300"])  # the box user's, as the reused pid would be
    runtime = box.home / ".local" / "share" / "jupyter" / "runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    stale = runtime / f"jpserver-{other.pid}.json"
    root = str((box.home / rdir.removeprefix("~/")).resolve())
    port = free_port()
    stale.write_text(json.dumps({
        "base_url": "/", "hostname": "127.0.0.1", "password": False, "pid": other.pid, "port": port,
        "root_dir": root, "secure": False, "sock": "", "token": "stale" * 8, "url": f"http://127.0.0.1:{port}/",
        "version": "2.14.2",
    }))  # fmt: skip
    try:
        r = run("jupyter", str(free_port()), "--background", cwd=project)
        assert r.code == 0, r.err
        assert "found running" not in r.err, r.err
        url = r.out.strip().splitlines()[-1]
        assert "stale" not in url
        token = url.split("token=")[1]
        local = int(url.split(":")[2].split("/")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{local}/api/status?token={token}", timeout=10) as resp:
            assert "started" in json.loads(resp.read())
    finally:
        run("tunnel", "--stop", "all")
        subprocess.run(
            ["tmux", "kill-session", "-t", "=remotedl-jupyter"],
            check=False,
            env={**os.environ, "TMUX_TMPDIR": str(sandbox._tmux_dir(box.dir))},
        )
        other.kill()
        other.wait()
        stale.unlink(missing_ok=True)
