"""Reaching the box: status, host keys, and every connection error, against a real sshd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remotedl import proc, sandbox
from remotedl.ssh import Box as SshBox
from remotedl.ssh import resolve_host, ssh_argv
from tests.conftest import Box, cli_for, make_env, process_gone, process_start, retry_until


def write_config(path: Path, box: Box, **over: str) -> Path:
    """An ssh config for ``box`` under alias 'gpubox', with some keys replaced."""
    keys = {
        "HostName": "127.0.0.1",
        "Port": str(box.info.port),
        "User": box.info.user,
        "IdentityFile": str(box.dir / "id_ed25519"),
        "IdentitiesOnly": "yes",
        "UserKnownHostsFile": str(box.dir / "known_hosts"),
        "StrictHostKeyChecking": "yes",
    }
    keys.update(over)
    body = "".join(f"    {k} {v}\n" for k, v in keys.items())
    path.write_text(f"Host gpubox\n{body}")
    return path


def run_with(tmp_path: Path, box: Box, config: Path, *argv: str):
    from remotedl.cli import main

    e = make_env(tmp_path / "laptop", cwd=tmp_path)
    code = main(["--host", "gpubox", "--ssh-config", str(config), *argv], e)
    return code, e.stdout.getvalue(), e.stderr.getvalue()


def test_status_reports_box(cli, box):
    r = cli("status", "--json")
    assert r.code == 0, r.err
    st = json.loads(r.out)
    assert st["reachable"] is True
    assert st["hostname"] == socket.gethostname()
    assert st["tools"]["tmux"] and st["tools"]["rsync"] and st["tools"]["git"]
    assert st["nvidia"] is True
    assert [g["index"] for g in st["gpus"]] == [0, 1]
    assert st["gpus"][0]["name"] == "NVIDIA GeForce RTX 3090"
    assert st["gpus"][1]["memory_total_mib"] == 24564
    assert st["disk"]["free_bytes"] > 0
    assert st["driver_version"] == "550.54.14"


def test_status_text_and_gpu_processes_with_user(fresh_box, tmp_path):
    # A real process on the box, listed by nvidia-smi as a compute process on GPU 1.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        state = json.loads((fresh_box.dir / "gpus.json").read_text())
        state["processes"] = [{"gpu": 1, "pid": sleeper.pid, "name": "/usr/bin/python3", "used_memory": 2048}]
        (fresh_box.dir / "gpus.json").write_text(json.dumps(state))
        run = cli_for(fresh_box, tmp_path / "laptop")
        r = run("status", "--json")
        assert r.code == 0, r.err
        gpus = json.loads(r.out)["gpus"]
        assert gpus[0]["processes"] == []
        (p,) = gpus[1]["processes"]
        assert p["pid"] == sleeper.pid
        assert p["user"] == fresh_box.info.user
        assert p["used_memory_mib"] == 2048
        assert gpus[1]["memory_used_mib"] == 2049
        r = run("status")
        assert r.code == 0
        assert "NVIDIA GeForce RTX 4090" in r.out
        assert f"{sleeper.pid} {fresh_box.info.user} python3" in r.out
    finally:
        sleeper.kill()


def test_status_without_nvidia_driver(tmp_path):
    base = tmp_path / "nogpu"
    b = sandbox.up(make_env(base), name="nogpu", gpus=0)
    try:
        run = cli_for(Box(b, {}), tmp_path / "laptop")
        r = run("status", "--json")
        assert r.code == 0, r.err
        st = json.loads(r.out)
        assert st["nvidia"] is False
        assert "no NVIDIA driver" in st["nvidia_error"]
        assert st["tools"]["git"]
        r = run("status")
        assert r.code == 0
        assert "GPUs    none: no NVIDIA driver" in r.out
    finally:
        sandbox.down(make_env(base), name="nogpu")


def test_a_sandbox_whose_sshd_pid_now_names_another_process_is_down(tmp_path):
    """A sandbox box whose sshd died unseen (a reboot) keeps its record; the kernel hands the
    pid to another program. The box is down, and `sandbox down` never signals that program."""
    base = tmp_path / "stale"
    b = sandbox.up(make_env(base), name="stale", gpus=0)
    started = process_start(b.pid)
    os.kill(b.pid, signal.SIGKILL)  # the sshd dies without a word
    assert retry_until(lambda: process_gone(b.pid, started), seconds=30)
    other = subprocess.Popen(["sleep", "300"])
    try:
        record = Path(b.directory) / "sandbox.json"
        record.write_text(json.dumps({**json.loads(record.read_text()), "pid": other.pid}))
        assert sandbox.status(make_env(base), "stale") is None
        assert sandbox.down(make_env(base), name="stale")
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()
        sandbox.down(make_env(base), name="stale")


def test_sandbox_extra_env_reaches_every_session(tmp_path):
    from remotedl.errors import UsageError

    base = tmp_path / "envbox"
    value = "/tmp/a dir/slurm.conf $HOME 'q' é"
    b = sandbox.up(make_env(base), name="envbox", gpus=0, extra_env={"SLURM_CONF": value, "RDL_X": "1"})
    try:
        r = subprocess.run(
            ["ssh", "-F", b.ssh_config, "-o", "BatchMode=yes", "envbox", "printenv SLURM_CONF RDL_X HOME"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert r.stdout.splitlines() == [value, "1", b.home]
    finally:
        sandbox.down(make_env(base), name="envbox")
    for bad in ({"PATH": "/x"}, {"1X": "y"}, {"X": 'a"b'}, {"X": "a\nb"}, {"X": "a\\b"}):
        with pytest.raises(UsageError):
            sandbox.up(make_env(tmp_path / "bad"), name="bad", gpus=0, extra_env=bad)
    assert not sandbox.sandbox_dir(make_env(tmp_path / "bad"), "bad").exists()


def test_unknown_host_key_is_refused_then_trusted(tmp_path, box):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg = write_config(tmp_path / "cfg", box, UserKnownHostsFile=str(empty))
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 4
    host_fp = subprocess.run(
        ["ssh-keygen", "-lf", str(box.dir / "host_key.pub")], capture_output=True, text=True
    ).stdout.split()[1]
    assert "not known" in err
    assert host_fp in err
    assert "remotedl trust gpubox" in err
    assert empty.read_text() == ""  # nothing was added behind the user's back

    # Without a terminal, trust shows the fingerprint and asks for --yes.
    code, _, err = run_with(tmp_path, box, cfg, "trust")
    assert code == 2
    assert host_fp in err
    assert empty.read_text() == ""
    code, out, err = run_with(tmp_path, box, cfg, "trust", "--yes")
    assert code == 0, err
    assert host_fp in out
    assert f"[127.0.0.1]:{box.info.port} ssh-ed25519" in empty.read_text()
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 0, err
    # OpenSSH accepts the recorded line too (same file, same format).
    spec = resolve_host(make_env(tmp_path), "gpubox", ssh_config=str(cfg))
    out = proc.run(ssh_argv(spec, "echo ok", multiplex=False))
    assert out.stdout.strip() == "ok"


def test_changed_host_key_is_refused(tmp_path, box):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, b64 = other.with_suffix(".pub").read_text().split()[:2]
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{box.info.port} {kind} {b64}\n")
    before = kh.read_text()
    cfg = write_config(tmp_path / "cfg", box, UserKnownHostsFile=str(kh))
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 4
    assert "CHANGED" in err
    assert "--replace" in err
    assert "Traceback" not in err
    code, _, err = run_with(tmp_path, box, cfg, "trust", "--yes")
    assert code == 4
    assert "differs" in err
    assert kh.read_text() == before
    code, out, err = run_with(tmp_path, box, cfg, "trust", "--yes", "--replace")
    assert code == 0, err
    assert "replaced" in out
    assert b64 not in kh.read_text()
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 0, err


def test_accept_new_records_unknown_but_never_changed(tmp_path, box):
    kh = tmp_path / "known_hosts"
    cfg = write_config(tmp_path / "cfg", box, UserKnownHostsFile=str(kh), StrictHostKeyChecking="accept-new")
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 0, err
    assert "ssh-ed25519" in kh.read_text()


def test_wrong_key_is_auth_failure_naming_key(tmp_path, box):
    wrong = tmp_path / "wrong_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    cfg = write_config(tmp_path / "cfg", box, IdentityFile=str(wrong))
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 4
    assert "authentication failed" in err
    assert str(wrong) in err
    assert "Traceback" not in err


def test_closed_port_is_refused(tmp_path, box):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_config(tmp_path / "cfg", box, Port=str(port))
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 4
    assert f"connection refused by 127.0.0.1:{port}" in err
    assert "sshd" in err


def test_silent_server_times_out(tmp_path, box):
    # A port that accepts TCP but never speaks SSH: the banner never comes.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    t = threading.Thread(target=lambda: held.append(srv.accept()[0]), daemon=True)
    t.start()
    try:
        cfg = write_config(tmp_path / "cfg", box, Port=str(port))
        code, _, err = run_with(tmp_path, box, cfg, "--connect-timeout", "1", "status")
        assert code == 4
        assert "timed out" in err or "banner" in err
    finally:
        srv.close()
        for c in held:
            c.close()


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root for a private network namespace (no DNS server reachable)",
)
def test_unresolvable_host_name(tmp_path, box):
    cfg = write_config(tmp_path / "cfg", box, HostName="gpubox.example.invalid")
    out = run_without_network(tmp_path, cfg, "gpubox")
    assert out.returncode == 4, out.stderr
    assert "cannot resolve host name 'gpubox.example.invalid'" in out.stderr
    assert "Traceback" not in out.stderr


def run_without_network(tmp_path, cfg, host):
    """`remotedl status` in a network namespace of its own: no resolver is reachable, so name
    resolution fails locally and no query leaves this machine."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "s"), "HOME": str(tmp_path)}
    argv = [
        "unshare",
        "-n",
        sys.executable,
        "-m",
        "remotedl",
        "--host",
        host,
        "--ssh-config",
        str(cfg),
        "status",
    ]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


def test_unknown_alias_without_config_entry(tmp_path, box):
    cfg = write_config(tmp_path / "cfg", box)
    from remotedl.cli import main

    e = make_env(tmp_path / "laptop", cwd=tmp_path)
    code = main(["--host", "127.0.0.2", "--ssh-config", str(cfg), "--port", "1", "status"], e)
    assert code == 4
    assert "connection refused by 127.0.0.2:1" in e.stderr.getvalue()


def test_box_channel_and_plain_ssh_reach_same_box_with_same_key(tmp_path, box):
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    with SshBox(spec) as b:
        via_channel = b.run('echo "$HOME"; echo "$SSH_CONNECTION"').stdout.split()
    via_openssh = proc.run(ssh_argv(spec, "echo $HOME; echo $SSH_CONNECTION")).stdout.split()
    assert via_channel[0] == via_openssh[0] == box.info.home
    assert via_channel[-1] == via_openssh[-1] == str(box.info.port)


def test_hostile_remote_values_arrive_exactly_and_run_nothing(tmp_path, box):
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    marker = tmp_path / "pwned"
    hostile = [
        f"a b; touch {marker}; $(touch {marker}) `touch {marker}` 'q\" é",
        "a\\b \\d+ \\n",
        "line1\nline2\n",
        "",
        "-n",
        "%s !x ~ * $HOME",
        "x" * 300_000,  # past one argument's limit (128 KiB): values never travel in argv
    ]
    out = SshBox(spec).run('for a; do printf "%s\\0" "$a"; done', *hostile)
    assert out.stdout.split("\0")[:-1] == hostile
    assert not marker.exists()


def test_sandbox_up_down(tmp_path):
    from remotedl.cli import main

    e = make_env(tmp_path)
    assert main(["sandbox", "up", "--name", "sb1", "--gpus", "3", "--json"], e) == 0
    info = json.loads(e.stdout.getvalue())
    assert info["gpus"] == 3
    d = Path(info["directory"])
    assert (d / "ssh_config").is_file()
    # Registered: the alias works with no --ssh-config at all.
    e2 = make_env(tmp_path)
    assert main(["--host", "sb1", "status", "--json"], e2) == 0, e2.stderr.getvalue()
    assert len(json.loads(e2.stdout.getvalue())["gpus"]) == 3
    # status without a name lists every running sandbox
    e_list = make_env(tmp_path)
    assert main(["sandbox", "status", "--json"], e_list) == 0
    assert [b["name"] for b in json.loads(e_list.stdout.getvalue())] == ["sb1"]
    # up again finds it running
    e3 = make_env(tmp_path)
    assert main(["sandbox", "up", "--name", "sb1", "--json"], e3) == 0
    assert json.loads(e3.stdout.getvalue())["port"] == info["port"]
    e4 = make_env(tmp_path)
    assert main(["sandbox", "down", "--name", "sb1"], e4) == 0
    assert not d.exists()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", info["port"])) != 0
    e5 = make_env(tmp_path)
    assert main(["sandbox", "status", "--name", "sb1"], e5) == 1
    e6 = make_env(tmp_path)
    assert main(["sandbox", "status"], e6) == 1  # none running: says so
    assert "no sandbox is running" in e6.stdout.getvalue()


def test_malformed_ssh_config_names_the_line(tmp_path, box):
    cfg = tmp_path / "cfg"
    cfg.write_text("Host gpubox\n    HostName 127.0.0.1\n    Bogus yes\n")
    code, _, err = run_with(tmp_path, box, cfg, "status")
    assert code == 3
    assert "line 3: Bad configuration option: bogus" in err
    assert "Traceback" not in err


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root for a private network namespace (no DNS server reachable)",
)
def test_unknown_alias_says_so(tmp_path, box):
    cfg = write_config(tmp_path / "cfg", box)
    out = run_without_network(tmp_path, cfg, "gpubxo")
    assert out.returncode == 4, out.stderr
    assert "unknown host 'gpubxo': no Host entry for it" in out.stderr


def test_status_shows_gpus_held_by_remotedl_jobs(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    (project / "hold.sh").write_text("#!/bin/sh\nsleep 300\n")  # runs until killed below
    (project / "hold.sh").chmod(0o755)
    r = run("run", "--detach", "--gpu", "1", "hold.sh", cwd=project)
    assert r.code == 0, r.err
    job_id = r.out.strip()
    try:
        st = json.loads(run("status", "--json").out)
        assert st["held_by"] == {"1": f"job {job_id} (hold.sh)"}
        r = run("status")
        line = next(x for x in r.out.splitlines() if x.lstrip().startswith("1 "))
        assert f"job {job_id} (hold.sh)" in line
        line0 = next(x for x in r.out.splitlines() if x.lstrip().startswith("0 "))
        assert "free" in line0
    finally:
        run("kill", job_id)


def test_a_scripts_own_exit_255_is_not_a_connection_failure(tmp_path, box):
    spec = resolve_host(make_env(tmp_path), box.name, ssh_config=box.info.ssh_config)
    r = SshBox(spec).run(
        "echo out; echo 'ssh: connect to host x port 22: Connection refused' >&2; exit 255", check=False
    )
    assert r.exit_code == 255
    assert r.stdout == "out\n"
    assert "Connection refused" in r.stderr
