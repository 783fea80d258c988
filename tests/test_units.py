"""Fast tests of the pure parsers and encoders, no box needed."""

from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest

from remotedl import gpus
from remotedl.config import _coerce
from remotedl.ddns.providers import _hostport, parse_tsig_key_file
from remotedl.ddns.update import parse_interval
from remotedl.errors import ConfigError, UsageError
from remotedl.schema import JobRecord, decode_answer, depth
from remotedl.ssh.channel import BOOTSTRAP, encode_request, mark_sections, parse_marks, split_frame
from remotedl.ssh.hostkeys import _name_matches
from remotedl.ssh.openssh import login_shell_safe
from remotedl.tunnel import Forward, command_words
from remotedl.typecheck import SchemaError
from remotedl.words import printable

# What nvidia-smi really prints for the project's queries (an H100 and two consumer cards).
GPU_CSV = (
    "0, NVIDIA H100 80GB HBM3, GPU-4d5e6f70-1111-2222-3333-444455556666, 00000000:00:06.0, 0, 81559, 0\n"
    "1, NVIDIA GeForce RTX 3090, GPU-aaaa, 00000000:21:00.0, 1234, 24576, [N/A]\n"
)
APPS_CSV = "GPU-aaaa, 777, /opt/torch/.venv/bin/python3, 1634\nGPU-aaaa, 778, train, job, 12\n"


def test_gpu_rows_parse_with_not_available_fields():
    found = gpus.parse_gpus(GPU_CSV)
    assert [g.index for g in found] == [0, 1]
    assert found[0].memory_total_mib == 81559 and found[0].utilization_pct == 0
    assert found[1].utilization_pct is None
    procs = gpus.parse_apps(APPS_CSV)
    assert [p.pid for p in procs] == [777, 778]
    assert procs[1].name == "train, job"  # a process name holding ", "
    gpus.attach_processes(found, procs)
    assert len(found[1].processes) == 2 and not found[0].processes
    with pytest.raises(gpus.NvidiaSmiError):
        gpus.parse_gpus("0, name, only three\n")


def test_gpu_spec_and_free_choice():
    assert gpus.parse_gpu_spec("auto") is None
    assert gpus.parse_gpu_spec("0, 2,2") == [0, 2]
    with pytest.raises(ValueError):
        gpus.parse_gpu_spec("one")
    found = gpus.parse_gpus(GPU_CSV)
    assert gpus.pick_free_gpus(found, held=[], count=1) == [0]  # least memory used
    assert gpus.pick_free_gpus(found, held=[0], count=1) == [1]
    assert gpus.pick_free_gpus(found, held=[0, 1], count=1) is None


def test_forward_parse():
    assert Forward.parse("8888") == Forward(8888, 8888)
    assert Forward.parse("8889:8888") == Forward(8889, 8888)
    assert Forward.parse("8889:gpu-node12:34567") == Forward(8889, 34567, "gpu-node12")
    assert Forward.parse("8889:10.1.2.3:80").target == "10.1.2.3"
    assert Forward.parse(Forward(1, 2, "n1").spec()) == Forward(1, 2, "n1")
    for bad in ("x", "0", "70000", "1:2:3", "", "1:-oProxyCommand=x:2", "1:a b:2", "1:h:2:3"):
        with pytest.raises(UsageError):
            Forward.parse(bad)


def test_host_port_with_ipv6_and_defaults():
    assert _hostport("ns1.example.com", 53) == ("ns1.example.com", 53)
    assert _hostport("127.0.0.1:5353", 53) == ("127.0.0.1", 5353)
    assert _hostport("[2001:db8::1]:5353", 53) == ("2001:db8::1", 5353)
    assert _hostport("[2001:db8::1]", 53) == ("2001:db8::1", 53)
    assert _hostport("2001:db8::1", 53) == ("2001:db8::1", 53)


def test_tsig_key_file_and_intervals():
    assert parse_tsig_key_file('key "k1" { algorithm hmac-sha256; secret "c2VjcmV0"; };') == (
        "k1",
        "hmac-sha256",
        "c2VjcmV0",
    )
    with pytest.raises(ConfigError):
        parse_tsig_key_file("nonsense")
    assert parse_interval("30s") == 30 and parse_interval("5m") == 300 and parse_interval("1h") == 3600


def test_config_coercion():
    assert _coerce("connect_timeout", "7", "x") == 7.0
    assert _coerce("jupyter_port", "8890", "x") == 8890
    assert _coerce("env", {"A": 1}, "x") == {"A": "1"}
    for key, bad in (("connect_timeout", True), ("data", "data/"), ("jupyter_port", "x"), ("host", 3)):
        with pytest.raises(ConfigError):
            _coerce(key, bad, "file")


def test_frame_split_drops_noise_and_reads_the_login_shell():
    assert split_frame(b"Welcome\n\n@@rdl:abc fish\nout\n", "abc", with_shell=True) == (
        b"Welcome\n",
        b"out\n",
        "fish",
    )
    # Noise without a newline, then our marker (which starts with one).
    assert split_frame(b"\x1b]0;title\x07\n@@rdl:abc\nrest", "abc") == (b"\x1b]0;title\x07", b"rest", "")
    assert split_frame(b"no marker at all", "abc") is None
    assert split_frame(b"@@rdl:other\nx", "abc") is None


@pytest.mark.parametrize("shell", ["/bin/sh", "bash"])
def test_encoded_request_is_what_sh_reads(tmp_path, shell):
    # Values on one line each (read, no process) or by length (dd: those with a newline);
    # leading/trailing blanks, backslashes, a leading "=" and a trailing CR kept byte for byte.
    values = ["a\\b", "", "x\ny\n", "é", "$(touch pwned)", "=x", "  two  ", "\t", "-n", "cr\r", "\\", "\n"]
    nonce, payload = encode_request('for a; do printf "[%s]" "$a"; done; cat', values, b"tail")
    if shutil.which(shell) is None:
        pytest.fail(f"{shell} is needed for this test")
    bootstrap = BOOTSTRAP.removeprefix("exec ").replace("/bin/sh", shell)
    out = subprocess.run(["sh", "-c", bootstrap], input=payload,
                         capture_output=True, cwd=tmp_path, check=True)  # fmt: skip
    body = split_frame(out.stdout, nonce)
    assert body is not None
    assert body[1].decode() == "".join(f"[{v}]" for v in values) + "tail"
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError):
        encode_request("true", ["nul\0byte"])


def test_login_shell_safe_refuses_what_shells_disagree_on():
    assert login_shell_safe("exec tmux attach-session -t =remotedl-5") == (
        "exec /bin/sh -c 'exec tmux attach-session -t =remotedl-5'"
    )
    for bad in ("it's", "a\\b", "!x", "a\nb"):
        with pytest.raises(ValueError):
            login_shell_safe(bad)


def test_marks_and_sections():
    assert parse_marks("noise\n@@dir /x y\n@@clean\n@@dir second\n") == {"dir": "/x y", "clean": ""}
    assert mark_sections("@@a\n1\n2\n@@rc 0\n@@b\n3\n") == {"a": ["1", "2"], "rc": ["0"], "b": ["3"]}


def test_known_hosts_patterns(tmp_path):
    assert _name_matches("[127.0.0.1]:2222", "[127.0.0.1]:2222")
    assert not _name_matches("[127.0.0.1]:2222", "[127.0.0.1]:2223")
    assert _name_matches("gpu.lab", "*.lab,!bad.lab")
    assert not _name_matches("bad.lab", "*.lab,!bad.lab")
    # hashed (HashKnownHosts yes): the line as `ssh-keygen -H` writes it
    kh = tmp_path / "known_hosts"
    kh.write_text(
        "[gpubox]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0bHGhsOpy0cHvkdwHzWSqUhqkB3Ny2Bxm6Vmdz1pIT\n"
    )
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    hashed = kh.read_text().split()[0]
    assert hashed.startswith("|1|")
    assert _name_matches("[gpubox]:2222", hashed)
    assert not _name_matches("[gpubox]:2223", hashed)


def test_schema_checks_types_and_nesting():
    rec = JobRecord.from_dict(
        {"id": 3, "name": "n", "command": "c", "cwd": "/", "status": "failed", "exit_code": 2}
    )
    assert rec.status == "failed" and rec.exit_code == 2
    for bad in ({}, None, [], {"id": True, "name": "n", "command": "c", "cwd": "/", "status": "failed"}):
        with pytest.raises(SchemaError):
            JobRecord.from_dict(bad)
    assert depth(json.loads('{"a": "[[[[", "b": [[1]]}'), 64) == 3  # brackets in strings are text
    assert depth([[[[]]], {}], 2) == 3  # counted up to the limit and one more
    assert depth("x", 64) == 0
    with pytest.raises(SchemaError, match="nested too deeply"):
        decode_answer(b'{"ok": true, "x": ' + b"[" * 100 + b"]" * 100 + b"}")
    # Deeper than json's parser recurses: its RecursionError, refused the same way.
    with pytest.raises(SchemaError, match="nested too deeply"):
        decode_answer(b'{"ok": true, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    assert decode_answer(b'{"ok": true, "x": ' + b"[" * 63 + b"]" * 63 + b"}")["ok"]
    with pytest.raises(SchemaError):
        decode_answer(b'{"no": "ok"}')


def test_printable_escapes_terminal_controls():
    assert printable("ok\x1b]0;pwned\x07\x9b31m\ttab\nline") == "ok\\x1b]0;pwned\\x07\\x9b31m\ttab\nline"
    assert printable("a\nb", newlines=False) == "a\\nb"


def test_status_line_only_on_a_terminal():
    from remotedl.cli.statusline import status_line
    from remotedl.env import Environment

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet = Environment(environ={}, stdout=io.StringIO(), stderr=io.StringIO(), stdin_isatty=False)
    with status_line(quiet) as say:
        say("starting Jupyter")
    assert quiet.stderr.getvalue() == ""
    loud = Environment(environ={}, stdout=io.StringIO(), stderr=Tty(), stdin_isatty=False)
    with status_line(loud) as say:
        say("starting Jupyter")
    assert "starting Jupyter" in loud.stderr.getvalue()


def test_a_port_holder_is_named_by_program_and_cut_at_a_word():
    # The holder of a busy local port was its command line cut at 80 characters, mid-word,
    # with the program's full path and any escape sequence it held sent raw.
    jupyter = b"/home/u/p/.venv/bin/python\0-m\0jupyter\0lab\0--no-browser\0--port\08888\0"
    jupyter += b"--ServerApp.token_file=/home/u/.remotedl/tokens/a\0"
    assert command_words(jupyter) == "python -m jupyter lab --no-browser --port 8888 ..."
    assert command_words(b"/usr/sbin/sshd\0-D\0") == "sshd -D"
    assert command_words(b"evil\x1b]0;owned\x07\0") == "evil\\x1b]0;owned\\x07"
    assert command_words(b"x" * 100, limit=20) == "x" * 19 + " ..."
    assert command_words(b"") == "?"


@pytest.mark.parametrize(
    "said",
    [
        "bash: line 1: rsync: command not found",
        "sh: 1: rsync: not found",
        "zsh:1: command not found: rsync",
        "fish: Unknown command: rsync",
        "rsync: Command not found.",
    ],
)
def test_rsync_missing_is_told_whichever_way_rsync_exits(said):
    # rsync exits 127 when it sees the box's shell fail, but 12 (protocol data stream) when the
    # pipe closed first: the suite's missing-rsync test failed one run in many on that race.
    from remotedl.rsync import rsync_failure

    for code in (127, 12):
        closed = "\nrsync: connection unexpectedly closed (0 bytes received so far)\n"
        err = rsync_failure("gpubox", "data", code, said + closed)
        assert err.message == "rsync is not installed on gpubox"
        assert "apt-get install rsync" in (err.hint or "")
    missing_dir = 'rsync: change_dir "/x" failed: No such file or directory (2)'
    other = rsync_failure("gpubox", "data", 12, missing_dir)
    assert other.message.startswith("rsync of data failed (12)")


def test_free_port_is_never_one_an_outgoing_connection_can_take():
    # A port from the ephemeral range (what binding port 0 gives) can become the source port of
    # any connection made before the server binds it: the server then fails to start.
    import socket

    from remotedl.waiting import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = [free_port() for _ in range(20)]
    assert all(p < low for p in ports), (low, ports)
    for p in ports[:3]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free indeed


def test_every_package_is_installed_and_the_shipped_playbooks_with_it():
    """pyproject lists packages by name: one missing installs a remotedl that cannot import it
    (remotedl.ssh and remotedl.init were missing from a non-editable install)."""
    import sys
    from pathlib import Path

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on 3.10 only
        import tomli as tomllib

    from remotedl import playbooks

    root = Path(__file__).resolve().parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "remotedl").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    listed = set(setuptools["packages"])
    assert found <= listed, f"not installed: {sorted(found - listed)}"
    assert listed - found == {"remotedl.playbooks.shipped"}
    # The YAML playbooks install inside the playbooks package; from the source tree they are
    # found in the top-level playbooks/ folder.
    assert setuptools["package-dir"] == {"remotedl.playbooks.shipped": "playbooks"}
    assert setuptools["package-data"]["remotedl.playbooks.shipped"] == ["*.yaml"]
    assert playbooks.shipped_dir() == root / "playbooks"
    assert (playbooks.shipped_dir() / "base.yaml").is_file()


def test_only_requests_without_secrets_may_travel_in_the_command_line():
    from remotedl.agent.client import holds_no_secret
    from remotedl.schema import KillRequest, ListRequest, StartRequest

    assert holds_no_secret(ListRequest().to_dict())
    assert holds_no_secret(KillRequest(job=3).to_dict())
    assert holds_no_secret(StartRequest(command="python train.py").to_dict())
    assert not holds_no_secret(StartRequest(command="x", env={"TOKEN": "s3cr3t"}).to_dict())
    assert not holds_no_secret(StartRequest(command="x", notify=["https://hooks.example/T/secret"]).to_dict())
    assert not holds_no_secret({"op": "envsync", "remote_dir": "~/p"})
