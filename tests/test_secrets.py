"""No secret in any process's arguments, on the box or the laptop (here: the same machine, so
one scan of every process sees both), nor in files other users can read: the Jupyter token,
--env values, DNS API tokens. A thread reads every /proc/*/cmdline while the work runs."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import dnsfakes
from tests.conftest import cli_for, retry_until
from tests.test_jobs import _kill_sessions
from tests.test_tunnel import jupyter_in_box_venv


@contextmanager
def watch_argv(*secrets: str) -> Iterator[list[str]]:
    """Collect every process command line that contains one of ``secrets`` while the block runs."""
    seen: list[str] = []
    stop = threading.Event()
    wanted = [s.encode() for s in secrets]
    me = str(os.getpid())  # pytest's own argv holds nothing, but its thread reads the secrets

    def scan() -> None:
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                except OSError:
                    continue
                if any(w in cmd for w in wanted):
                    seen.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            stop.wait(0.01)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join(5)


def test_jupyter_token_in_no_argv_and_kept_across_reconnect(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    rdir = f"~/secret-tests/{tmp_path.name}"
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    assert run("push", cwd=project).code == 0
    jupyter_in_box_venv(fresh_box, rdir)
    from remotedl.waiting import free_port

    local = free_port()
    with watch_argv("token=") as seen_start:
        r = run("jupyter", str(local), "--background", cwd=project)
        assert r.code == 0, r.err
        token = r.out.strip().split("token=")[1]
    try:
        with watch_argv(token) as seen:
            # The supervisor reconnects after every connection to the box is cut...
            assert _kill_sessions(fresh_box) >= 1

            def reconnected() -> bool:
                (rec,) = json.loads(run("tunnel", "--list", "--json").out)
                return rec["status"] == "connected" and rec["reconnects"] >= 1

            assert retry_until(reconnected, seconds=20)
        (rec,) = json.loads(run("tunnel", "--list", "--json").out)
        assert rec["url"] and rec["url"].endswith(token)  # ...and its record keeps the URL
        record = Path(tmp_path / "laptop" / "state" / "remotedl" / "tunnels").glob("*.json")
        for f in record:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert not seen, seen
        assert not [c for c in seen_start if token in c], seen_start
        # On the box no file other users can read holds it.
        for f in (fresh_box.home / ".remotedl").rglob("*"):
            if f.is_file() and token.encode() in f.read_bytes():
                assert not f.stat().st_mode & 0o077, f
    finally:
        run("tunnel", "--stop", "all")
        fresh_box.sh("tmux kill-session -t =remotedl-jupyter", check=False)


def test_env_values_in_no_argv_and_not_in_debug(cli, box, project):
    secret = "s3cr3t-" + os.urandom(6).hex()
    (project / "wait.sh").write_text('#!/bin/sh\n[ "$API_KEY" = "$1" ] && echo same; sleep 1\n')
    (project / "wait.sh").chmod(0o755)
    with watch_argv(secret) as seen:
        r = cli("--debug", "run", "--cpu", "-e", f"API_KEY={secret}", "wait.sh", "x", cwd=project)
    assert r.code == 0, r.err
    assert secret not in r.err and secret not in r.out
    assert not seen, seen
    # The job record keeps the key, not the value; the env file is gone once the job ran.
    for f in (box.home / ".remotedl").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


def test_dns_token_in_no_argv(tmp_path):
    token = "cf-" + os.urandom(8).hex()
    cf = dnsfakes.Cloudflare(token, "example.test")
    echo = dnsfakes.ip_echo({"a": "81.2.69.160", "b": "81.2.69.160"})
    try:
        proj = tmp_path / "proj"
        proj.mkdir()
        # The user's own [dns] (a project's api_url gets the user's token only once allowed).
        (tmp_path / "cfg" / "remotedl").mkdir(parents=True)
        (tmp_path / "cfg" / "remotedl" / "config.toml").write_text(
            "[dns]\n"
            'name = "gpubox.example.test"\nprovider = "cloudflare"\nzone = "example.test"\n'
            f'api_url = "{cf.api}"\nip_sources = ["{echo.url}/a", "{echo.url}/b"]\n'
        )
        env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s"),
               "XDG_CONFIG_HOME": str(tmp_path / "cfg"), "REMOTEDL_CLOUDFLARE_TOKEN": token}  # fmt: skip
        with watch_argv(token) as seen:
            out = subprocess.run([sys.executable, "-m", "remotedl", "--debug", "dns", "update"],
                                 cwd=proj, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert token not in out.stdout + out.stderr
        assert not seen, seen
    finally:
        cf.http.stop()
        echo.stop()
