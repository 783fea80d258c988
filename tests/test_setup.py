"""Playbooks and doctor against the real sshd box."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from remotedl.waiting import free_port
from tests.conftest import cli_for, retry_until


def write_book(project: Path, name: str, text: str) -> Path:
    d = project / "playbooks"
    d.mkdir(exist_ok=True)
    p = d / f"{name}.yaml"
    p.write_text(text)
    return p


MARKER_BOOK = """
name: marker
description: a file on the box
vars:
  file: marker.txt
steps:
  - name: the work dir exists
    check: test -d "$HOME/setup-tests"
    run: mkdir -p "$HOME/setup-tests"
  - name: the marker holds the greeting
    check: |
      [ "$(cat "$HOME/setup-tests/"{{ file }} 2>/dev/null)" = {{ greeting }} ]
    run: printf '%s' {{ greeting }} > "$HOME/setup-tests/"{{ file }}
  - name: only on boxes with apt
    when: command -v no-such-tool-here
    run: exit 1
"""


def test_format_errors_name_file_and_line(cli, project):
    cases = {
        "unknown": ("steps:\n  - name: a\n    chek: true\n", ":3: unknown key 'chek'"),
        "noname": ("steps:\n  - run: true\n", ":2: a step needs a 'name'"),
        "badyaml": ("steps:\n  - name: a\n    run: [unclosed\n", "not valid YAML"),
        "empty": ("name: x\n", ":1: no 'steps'"),
        "nothing": ("steps:\n  - name: a\n    sudo: true\n", "has neither 'check' nor 'run'"),
        "twice": (
            "steps:\n  - name: a\n    run: 'true'\n  - name: a\n    run: 'true'\n",
            ":4: two steps are called 'a'",
        ),
        "sudo": ("steps:\n  - name: a\n    run: 'true'\n    sudo: maybe\n", ":4: sudo must be true or false"),
    }
    for name, (text, expected) in cases.items():
        write_book(project, name, text)
        r = cli("setup", name, cwd=project)
        assert r.code == 3, (name, r.err)
        assert expected in r.err, (name, r.err)
        assert f"playbooks/{name}.yaml" in r.err


def test_idempotent_check_mode_and_vars(cli, box, project):
    write_book(project, "marker", MARKER_BOOK)
    target = box.home / "setup-tests" / "marker.txt"
    target.unlink(missing_ok=True)
    r = cli("setup", "marker", "--check", "--var", "greeting=hi there", cwd=project)
    assert r.code == 0, r.err
    assert "would change" in r.out
    assert not target.exists()  # --check changed nothing
    r = cli("setup", "marker", "--var", "greeting=hi there", "--json", cwd=project)
    assert r.code == 0, r.err
    (res,) = json.loads(r.out)
    assert res["summary"]["changed"] >= 1
    assert res["summary"]["skipped"] == 1
    assert target.read_text() == "hi there"
    r = cli("setup", "marker", "--var", "greeting=hi there", "--json", cwd=project)
    (res,) = json.loads(r.out)
    assert res["summary"]["changed"] == 0  # a second run changes nothing
    assert res["summary"]["ok"] == 2
    r = cli("setup", "marker", "--var", "greeting=hi there", cwd=project)
    assert "0 changed" in r.out


def test_hostile_variables_execute_nothing(cli, box, project, tmp_path):
    write_book(project, "marker", MARKER_BOOK)
    evil = f"$(touch {tmp_path}/PWNED); `touch {tmp_path}/PWNED` ' \" ;"
    r = cli("setup", "marker", "--var", f"greeting={evil}", cwd=project)
    assert r.code == 0, r.err
    assert (box.home / "setup-tests" / "marker.txt").read_text() == evil
    assert not (tmp_path / "PWNED").exists()


def test_failed_step_stops_with_output(cli, box, project):
    write_book(
        project,
        "broken",
        """
steps:
  - name: first fails
    check: 'false'
    run: echo "disk is on fire" >&2; exit 3
  - name: never reached
    run: touch "$HOME/setup-tests-never"
""",
    )
    r = cli("setup", "broken", "--json", cwd=project)
    assert r.code == 1
    (res,) = json.loads(r.out)
    assert [s["status"] for s in res["steps"]] == ["failed"]
    assert "disk is on fire" in res["steps"][0]["output"]
    assert not (box.home / "setup-tests-never").exists()
    r = cli("setup", "broken", cwd=project)
    assert "FAILED" in r.out and "disk is on fire" in r.out


def test_shipped_playbooks_on_the_test_box(cli, project):
    r = cli("setup", "--list", "--json", cwd=project)
    names = {b["name"] for b in json.loads(r.out)}
    assert {"base", "ssh-hardening", "jupyter", "ddns", "gpu-check"} <= names
    r = cli("setup", "base", "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)[0]["summary"] == {
        "ok": 1,
        "changed": 0,
        "would-change": 0,
        "failed": 0,
        "skipped": 0,
    }
    r = cli("setup", "gpu-check", "--json", "--var", "cuda_image=none", cwd=project)
    steps = {s["name"]: s for s in json.loads(r.out)[0]["steps"]}
    assert steps["NVIDIA driver"]["output"] == "550.54.14"
    assert steps["CUDA version supported by the driver"]["output"] == "CUDA Version: 12.4"
    assert "GPU 1: NVIDIA GeForce RTX 4090" in steps["GPUs visible to nvidia-smi"]["output"]
    r = cli("setup", "nope", cwd=project)
    assert r.code == 2
    assert "available: " in r.err and "base" in r.err


def steps_by_name(result: dict) -> dict[str, dict]:
    return {s["name"]: s for s in result["steps"]}


def hardening_vars(box, **extra) -> list[str]:
    pairs = {
        "sshd_config": str(box.dir / "sshd_config"),
        "sshd": shutil.which("sshd") or "/usr/sbin/sshd",
        "test_port": str(free_port()),
        "reload": f"kill -HUP $(cat {box.dir}/sshd.pid)",
        # as root, key-only root login keeps the test user in; "no" would lock root out
        "permit_root_login": "prohibit-password" if os.geteuid() == 0 else "no",
        **extra,
    }
    out = []
    for k, v in pairs.items():
        out += ["--var", f"{k}={v}"]
    return out


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the hardening playbook runs sshd -T/-t through sudo; CI runs as root"
)
def test_ssh_hardening_proves_login_then_reloads(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    cfg = fresh_box.dir / "sshd_config"
    r = run("setup", "ssh-hardening", *hardening_vars(fresh_box), "--json", cwd=project)
    assert r.code == 0, r.out + r.err
    (res,) = json.loads(r.out)
    assert res["summary"]["changed"] == 1
    text = cfg.read_text()
    assert text.startswith("# BEGIN remotedl ssh-hardening\nPasswordAuthentication no\n")
    assert list(fresh_box.dir.glob("sshd_config.remotedl-bak.*"))
    # the reloaded sshd still lets us in, and a second run changes nothing
    assert retry_until(lambda: run("status", "--json").code == 0, seconds=10)
    r = run("setup", "ssh-hardening", *hardening_vars(fresh_box), "--json", cwd=project)
    assert json.loads(r.out)[0]["summary"]["changed"] == 0, r.out


@pytest.mark.skipif(
    os.geteuid() != 0, reason="the hardening playbook runs sshd -T/-t through sudo; CI runs as root"
)
def test_ssh_hardening_rolls_back_when_login_would_fail(fresh_box, project, tmp_path):
    run = cli_for(fresh_box, tmp_path / "laptop")
    cfg = fresh_box.dir / "sshd_config"
    before = cfg.read_bytes()
    # A setting that would lock the user out: the second login fails, so nothing is applied.
    r = run(
        "setup",
        "ssh-hardening",
        *hardening_vars(fresh_box, extra="AuthorizedKeysFile /nonexistent/keys"),
        "--json",
        cwd=project,
    )
    assert r.code == 1
    (res,) = json.loads(r.out)
    step = steps_by_name(res)["sshd accepts keys only"]
    assert step["status"] == "failed"
    assert "rolled back" in step["output"]
    assert cfg.read_bytes() == before
    assert not (fresh_box.dir / "sshd_config.remotedl-new").exists()
    assert run("status", "--json").code == 0  # still reachable


def test_doctor_all_ok_and_json(cli, project):
    r = cli("doctor", "--json", cwd=project)
    assert r.code == 0, r.out + r.err
    rep = json.loads(r.out)
    assert rep["ok"] is True
    by = {(c["where"], c["name"]): c for c in rep["checks"]}
    assert by[("box", "reachable")]["status"] == "ok"
    assert by[("box", "tools")]["status"] == "ok"
    assert by[("box", "NVIDIA driver")]["detail"] == "driver 550.54.14"
    assert by[("box", "CUDA")]["detail"] == "the driver supports CUDA 12.4"
    assert "RTX 4090" in by[("box", "GPUs")]["detail"]


def test_doctor_finds_loose_key_and_unreachable_box(box, project, tmp_path):
    from remotedl.cli import main
    from tests.conftest import make_env

    key = tmp_path / "loose_key"
    shutil.copy(box.dir / "id_ed25519", key)
    key.chmod(0o644)
    with socket_closed_port() as port:
        cfg = tmp_path / "cfg"
        cfg.write_text(
            f"Host gpubox\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {key}\n"
            f"  UserKnownHostsFile {box.dir}/known_hosts\n"
        )
        e = make_env(tmp_path / "laptop", cwd=project)
        code = main(["--host", "gpubox", "--ssh-config", str(cfg), "doctor", "--json"], e)
    assert code == 1
    rep = json.loads(e.stdout.getvalue())
    by = {(c["where"], c["name"]): c for c in rep["checks"]}
    assert by[("laptop", "key")]["status"] == "fail"
    assert f"chmod 600 {key}" in by[("laptop", "key")]["fix"]
    assert by[("box", "reachable")]["status"] == "fail"
    assert "connection refused" in by[("box", "reachable")]["detail"]


def test_doctor_text_shows_bracketed_words(box, project, tmp_path):
    from remotedl.cli import main
    from tests.conftest import make_env

    with socket_closed_port() as port:  # an unreachable box: the laptop checks still run
        cfg = tmp_path / "cfg"
        cfg.write_text(f"Host gpubox\n  HostName 127.0.0.1\n  Port {port}\n")
        e = make_env(tmp_path / "laptop", cwd=project)
        code = main(["--host", "gpubox", "--ssh-config", str(cfg), "doctor"], e)
    out = e.stdout.getvalue()
    assert code == 1
    assert "dynamic DNS: no [dns] configuration" in out
    assert "no  configuration" not in out
    assert out.splitlines()[-1].endswith(" failed")


class socket_closed_port:
    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        return self.port

    def __exit__(self, *a: object) -> None:
        pass
