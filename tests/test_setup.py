"""Playbooks and doctor against the real sshd box."""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import threading
from pathlib import Path

import pytest

from remotedl.waiting import free_port
from tests.conftest import Box, cli_for, retry_until


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


def test_project_playbook_that_shadows_a_shipped_one_or_runs_as_root_needs_allow(cli, box, project, tmp_path):
    """A cloned project's playbooks/base.yaml would run instead of the shipped base (as root
    for sudo steps): it runs only once the user allowed it, and the output says whose it is."""
    from remotedl import playbooks as pb

    marker = box.home / f"shadow-{tmp_path.name}"
    steps = f"steps:\n  - name: the project's base\n    check: test -e {marker}\n    run: touch {marker}\n"
    book = write_book(project, "base", steps)
    r = cli("setup", "base", cwd=project)
    assert r.code == 3, r.out + r.err
    assert f"playbook {book} is the project's and it replaces the shipped playbook 'base'" in r.err
    assert "remotedl allow" in r.err and len(r.err.strip().splitlines()) == 2  # the line and its hint
    assert not marker.exists()
    r = cli("allow", cwd=project)
    assert r.code == 0, r.err
    assert str(book) in r.out
    r = cli("setup", "base", cwd=project)
    assert r.code == 0, r.out + r.err
    assert f"playbook base (the project: {book})" in r.out
    assert marker.exists()
    # Changed after allow: refused again.
    book.write_text(book.read_text().replace("touch", "touch -c"))
    assert cli("setup", "base", "--check", cwd=project).code == 3
    # Root steps in a playbook of its own name need allow too.
    rooty = write_book(project, "rooty", "steps:\n  - name: as root\n    sudo: true\n    check: 'true'\n")
    r = cli("setup", "rooty", cwd=project)
    assert r.code == 3 and "runs steps as root (sudo: true)" in r.err, r.err
    assert cli("allow", cwd=project).code == 0
    assert cli("setup", "rooty", cwd=project).code == 0
    assert pb.risky_project_playbooks(project) == [book, rooty]
    # The shipped one, and a project playbook that needs nothing, say whose they are as well.
    shipped = pb.load(pb.shipped_dir() / "gpu-check.yaml")
    assert pb.origin(shipped, project) == pb.Origin("shipped", "")
    write_book(project, "marker", MARKER_BOOK)
    assert pb.origin(pb.load(project / "playbooks" / "marker.yaml"), project) == pb.Origin("project", "")


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


# ------------------------------------------------------------------ variables are data

HEREDOC_BOOK = """
steps:
  - name: the note holds the greeting, written through a here-document
    check: |
      f="$HOME/setup-tests/note.txt"
      [ "$(cat "$f" 2>/dev/null)" = "greeting: {{ greeting }}." ]
    run: |
      mkdir -p "$HOME/setup-tests"
      cat > "$HOME/setup-tests/note.txt" <<NOTE
      greeting: {{ greeting }}.
      NOTE
"""


def test_hostile_variables_in_a_here_document_stay_text(cli, box, project, tmp_path):
    """The `ddns` bug's shape: a value in an unquoted here-document was spliced as a quoted
    word, and the shell ran its `$( )` (the quotes are text in a here-document)."""
    write_book(project, "note", HEREDOC_BOOK)
    note = box.home / "setup-tests" / "note.txt"
    note.unlink(missing_ok=True)
    evil = f"5m $(touch {tmp_path}/PWNED) `touch {tmp_path}/PWNED` ' \" \\ $HOME"
    r = cli("setup", "note", "--var", f"greeting={evil}", "--json", cwd=project)
    assert r.code == 0, r.out + r.err
    assert json.loads(r.out)[0]["summary"]["changed"] == 1
    assert note.read_text() == f"greeting: {evil}.\n"
    assert not (tmp_path / "PWNED").exists()


STAND_IN_SYSTEMCTL = """#!/bin/sh
# A stand-in for systemd's systemctl: a user manager that is there, and a unit that is
# active once its file exists.
case "$*" in
  *is-active*) [ -f "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user/remotedl-dns.service" ] ;;
  *) exit 0 ;;
esac
"""


def test_ddns_interval_is_data(fresh_box, project, tmp_path):
    """`--var 'interval=5m $(touch X)'` created X on the box: now it is refused as an interval,
    and a good one reaches the unit file as it is."""
    run = cli_for(fresh_box, tmp_path / "laptop")
    home = fresh_box.home
    fake = home / ".remotedl" / "venv" / "bin" / "remotedl"  # remotedl is "installed" there
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho remotedl 0\n")
    fake.chmod(0o755)
    (home / ".config" / "remotedl").mkdir(parents=True)
    (home / ".config" / "remotedl" / "config.toml").write_text("[dns]\n")
    systemctl = home.parent / "bin" / "systemctl"  # the box's own bin dir, first on its PATH
    systemctl.write_text(STAND_IN_SYSTEMCTL)
    systemctl.chmod(0o755)
    unit = home / ".config" / "systemd" / "user" / "remotedl-dns.service"

    r = run("setup", "ddns", "--var", f"interval=5m $(touch {tmp_path}/PWNED)", "--json", cwd=project)
    assert r.code == 1, r.out + r.err
    step = steps_by_name(json.loads(r.out)[0])["systemd runs remotedl dns watch"]
    assert step["status"] == "failed"
    assert "interval must look like 30s, 5m or 1h" in step["output"]
    assert not (tmp_path / "PWNED").exists()
    assert not unit.exists()

    r = run("setup", "ddns", "--var", "interval=7m", "--json", cwd=project)
    assert r.code == 0, r.out + r.err
    assert steps_by_name(json.loads(r.out)[0])["systemd runs remotedl dns watch"]["status"] == "changed"
    assert f"ExecStart={home}/.remotedl/venv/bin/remotedl dns watch --interval 7m\n" in unit.read_text()


# ------------------------------------------------------------------ playbook facts, progress


def box_for(b) -> Box:
    from remotedl.ssh import Box as SshBox
    from remotedl.ssh.resolve import resolve_host
    from tests.conftest import make_env

    spec = resolve_host(make_env(b.dir / "laptop-lib"), b.name, ssh_config=b.info.ssh_config)
    return SshBox(spec)


def test_box_facts_in_one_exec(box):
    from remotedl import playbooks as pb

    b = box_for(box)
    home = str(box.home)
    for configured, absolute in [
        ("~/remotedl/my proj", f"{home}/remotedl/my proj"),
        ("~", home),
        ("work/x", f"{home}/work/x"),
        ("/srv/data dir", "/srv/data dir"),
    ]:
        facts = pb.box_facts(b, configured, "proj")
        assert facts == pb.BoxFacts(home=home, user=box.info.user, remote_dir=absolute, project="proj")
    assert facts.variables() == {
        "home": home,
        "user": box.info.user,
        "remote_dir": "/srv/data dir",
        "project": "proj",
    }


def test_library_reports_each_step_start_then_end(box, project):
    from remotedl import playbooks as pb

    path = write_book(
        project,
        "three",
        "steps:\n  - name: one\n    check: 'true'\n  - name: two\n    when: 'false'\n    run: 'true'\n"
        "  - name: three\n    check: 'true'\n",
    )
    events: list[tuple[str, str]] = []
    result = pb.run_playbook(
        box_for(box),
        pb.load(path),
        {},
        on_begin=lambda e: events.append(("begin", f"{e.step} {e.index}/{e.total}")),
        on_step=lambda r: events.append(("end", r.name)),
    )
    assert [s.status for s in result.steps] == ["ok", "skipped", "ok"]
    assert events == [
        ("begin", "one 1/3"),
        ("end", "one"),
        ("begin", "two 2/3"),
        ("end", "two"),
        ("begin", "three 3/3"),
        ("end", "three"),
    ]


class TerminalText(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


WAITING_BOOK = """
steps:
  - name: a step that waits for its go
    check: test -e {{ go }}.done
    run: |
      touch {{ go }}.running
      i=0
      while [ ! -e {{ go }} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
      mv {{ go }} {{ go }}.done
"""


def setup_in_thread(box, project: Path, base: Path, *argv: str, stderr: io.StringIO):
    from remotedl.cli import main
    from tests.conftest import make_env

    e = make_env(base, cwd=project)
    e.environ["REMOTEDL_SSH_CONFIG"] = box.info.ssh_config  # type: ignore[index]
    e.environ["REMOTEDL_HOST"] = box.name  # type: ignore[index]
    e.stderr = stderr
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(main(["setup", *argv], e)), daemon=True)
    t.start()
    return t, codes, e


@pytest.mark.parametrize("mode", ["terminal", "json", "piped"])
def test_a_long_step_shows_a_status_line_on_a_terminal_only(box, project, tmp_path, mode):
    write_book(project, "waiting", WAITING_BOOK)
    go = box.home / f"setup-go-{mode}"
    running = Path(f"{go}.running")
    for p in (go, running, Path(f"{go}.done")):
        p.unlink(missing_ok=True)
    stderr: io.StringIO = io.StringIO() if mode == "piped" else TerminalText()
    argv = ["waiting", "--var", f"go={go}", *(["--json"] if mode == "json" else [])]
    t, codes, e = setup_in_thread(box, project, tmp_path / "laptop", *argv, stderr=stderr)
    assert retry_until(running.exists, seconds=30)  # the step runs: it waits for `go`
    if mode == "terminal":
        # The terminal shows the step and the time so far.
        assert retry_until(lambda: "a step that waits for its go" in stderr.getvalue(), seconds=30)
        assert "0:00:0" in stderr.getvalue()
    else:
        assert stderr.getvalue() == ""
    go.touch()
    t.join(60)
    assert codes == [0], e.stdout.getvalue() + stderr.getvalue()
    out = e.stdout.getvalue()
    if mode == "json":
        assert json.loads(out)[0]["summary"]["changed"] == 1
    else:  # the result line, once: the status line never reaches stdout
        assert "changed      a step that waits for its go\n" in out
        assert out.count("waits for its go") == 1, out
    if mode != "terminal":
        assert stderr.getvalue() == ""


# ------------------------------------------------------------------ ssh-hardening never locks anyone out

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the hardening playbook runs sshd -T/-t through sudo; CI runs as root"
)


def test_ssh_hardening_proof_must_reach_the_test_server(fresh_box):
    """A login that reaches some other server (here the box's own sshd, same host key, same
    key accepted) is not a proof: the server must show this run's nonce."""
    from remotedl import playbooks as pb

    prove = pb.login_prover(box_for(fresh_box))
    why = prove(fresh_box.info.port, "f00d" * 8)
    assert why is not None
    assert "not the test server" in why


@needs_root
def test_ssh_hardening_rolls_back_when_the_test_port_is_taken(fresh_box, project, tmp_path):
    """A second sshd of the old configuration listens on the test port. The test sshd cannot
    bind there (and sshd exits 0 all the same): the step fails, says why, and nothing changes."""
    import subprocess

    run = cli_for(fresh_box, tmp_path / "laptop")
    cfg = fresh_box.dir / "sshd_config"
    before = cfg.read_bytes()
    port = free_port()
    occupier_pid = tmp_path / "occupier.pid"
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    subprocess.run(
        [sshd, "-f", str(cfg), "-o", f"ListenAddress=127.0.0.1:{port}", "-o", f"PidFile={occupier_pid}",
         "-E", str(tmp_path / "occupier.log")],
        check=True,
    )  # fmt: skip
    assert retry_until(lambda: occupier_pid.exists() and occupier_pid.read_text().strip(), seconds=10)
    pid = int(occupier_pid.read_text())
    leftovers = set(Path("/tmp").glob("remotedl-sshd-test.*"))
    try:
        hvars = hardening_vars(fresh_box, test_port=str(port))
        r = run("setup", "ssh-hardening", *hvars, "--json", cwd=project)
        assert r.code == 1, r.out + r.err
        step = steps_by_name(json.loads(r.out)[0])["sshd accepts keys only"]
        assert step["status"] == "failed"
        assert f"the test sshd did not start on 127.0.0.1:{port}" in step["output"]
        assert "Address already in use" in step["output"]
        assert "--var test_port=PORT" in step["output"]
        assert "rolled back" in step["output"]
        assert cfg.read_bytes() == before
        assert not (fresh_box.dir / "sshd_config.remotedl-new").exists()
        assert not (fresh_box.dir / "sshd_config.remotedl-test").exists()
        assert set(Path("/tmp").glob("remotedl-sshd-test.*")) == leftovers  # its private dir is gone
        assert Path(f"/proc/{pid}").exists()  # the other server was not touched
        assert run("status", "--json").code == 0
    finally:
        os.kill(pid, 15)


@needs_root
def test_ssh_hardening_kills_no_process_named_in_a_fixed_tmp_file(fresh_box, project, tmp_path):
    """The old playbook killed whatever pid /tmp/remotedl-sshd-test.pid held (any box user can
    write it first). Its test server now lives in a private directory."""
    import subprocess

    planted = Path("/tmp/remotedl-sshd-test.pid")
    if planted.exists():
        pytest.skip(f"{planted} exists on this machine: not ours to replace")
    victim = subprocess.Popen(["sleep", "300"])
    planted.write_text(f"{victim.pid}\n")
    try:
        run = cli_for(fresh_box, tmp_path / "laptop")
        r = run("setup", "ssh-hardening", *hardening_vars(fresh_box), "--json", cwd=project)
        assert r.code == 0, r.out + r.err
        assert victim.poll() is None  # still running
        assert planted.read_text() == f"{victim.pid}\n"  # never written either
        assert not (fresh_box.dir / "sshd_config.remotedl-test").exists()
    finally:
        planted.unlink(missing_ok=True)
        victim.kill()
        victim.wait()


@needs_root
def test_ssh_hardening_names_password_only_accounts(fresh_box, project, tmp_path):
    """Accounts with a password and no authorized_keys could not log in after hardening: the
    playbook names them (and not the ones that have keys), also with --check."""
    import secrets
    import subprocess

    tag = secrets.token_hex(3)
    password_only, with_keys = f"rdlpw{tag}", f"rdlkey{tag}"
    made: list[str] = []
    try:
        for name in (password_only, with_keys):
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], check=True, capture_output=True)
            made.append(name)
            subprocess.run(["chpasswd"], input=f"{name}:pw-{secrets.token_hex(8)}\n", text=True, check=True)
        home = Path(pwd.getpwnam(with_keys).pw_dir)
        (home / ".ssh").mkdir(mode=0o700)
        key = (fresh_box.dir / "id_ed25519.pub").read_text()
        (home / ".ssh" / "other_keys").write_text(f"# a comment\n\n{key}")
        # The sandbox's sshd reads one shared key file: a copy reads the users' own, as sshd does.
        cfg = fresh_box.dir / "sshd_config"
        copy = tmp_path / "sshd_config"
        copy.write_text(
            "".join(
                "AuthorizedKeysFile .ssh/authorized_keys %h/.ssh/other_keys\n"
                if line.startswith("AuthorizedKeysFile")
                else line
                for line in cfg.read_text().splitlines(keepends=True)
            )
        )
        run = cli_for(fresh_box, tmp_path / "laptop")
        written = copy.read_text()
        hvars = hardening_vars(fresh_box, sshd_config=str(copy))
        r = run("setup", "ssh-hardening", "--check", *hvars, cwd=project)
        assert r.code == 0, r.out + r.err
        warning = r.out[r.out.index("accounts that log in with a password only") :]
        warning = warning[: warning.index("would change")]
        assert "WARNING" in warning and "no authorized_keys" in warning
        assert password_only in warning
        assert with_keys not in warning
        assert copy.read_text() == written  # --check changed nothing
    finally:
        for name in made:
            subprocess.run(["userdel", "-r", name], capture_output=True)


# ------------------------------------------------------------------ a box user without sudo


def test_a_root_step_without_sudo_says_what_to_run_as_root(plain_box, project, tmp_path):
    """The check runs as the user and fails; the change needs root, which this user cannot
    get: the step fails, naming the commands to run there as root, and they work as shown."""
    import subprocess

    root_only = Path(plain_box.home).parent / f"root-only-{tmp_path.name}"
    root_only.mkdir(mode=0o755)  # root's: the box user may look, not write
    write_book(
        project,
        "rootonly",
        """
steps:
  - name: the marker root writes
    sudo: true
    check: test -e {{ dir }}/marker
    run: |
      printf '%s\\n' {{ note }} > {{ dir }}/marker
""",
    )
    run = cli_for(plain_box, tmp_path / "laptop")
    assert run("allow", cwd=project).code == 0  # the project's root step: the user read it
    note = "it's $(not run) here"
    try:
        argv = ("setup", "rootonly", "--var", f"dir={root_only}", "--var", f"note={note}", "--json")
        r = run(*argv, cwd=project)
        assert r.code == 1, r.out + r.err
        (step,) = json.loads(r.out)[0]["steps"]
        assert step["status"] == "failed"
        assert f"{plain_box.info.user} may not use sudo without a password" in step["output"]
        assert step["output"].endswith("run it there as root:")
        shown = step["as_root"]
        assert shown, step
        assert "> \"${__v_dir}\"/marker" in shown
        assert "password is required" not in step["output"]
        assert not (root_only / "marker").exists()
        # As shown, the commands do it (here we are root), and then the step is ok.
        subprocess.run(["sh", "-c", shown], check=True)
        assert (root_only / "marker").read_text() == note + "\n"
        r = run(*argv, cwd=project)
        assert r.code == 0, r.out + r.err
        assert json.loads(r.out)[0]["steps"][0]["status"] == "ok"
    finally:
        shutil.rmtree(root_only)
