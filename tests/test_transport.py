"""The one transport and its trust boundary: private control sockets, both pipes drained,
project files that cannot run local code unless allowed, hostile answers from a box."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from remotedl import proc
from remotedl.errors import ConfigError
from remotedl.ssh.openssh import check_private_dir
from remotedl.waiting import retry_until
from tests.conftest import cli_for, make_env


def test_private_dir_check_refuses_foreign_open_or_symlinked(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir(mode=0o700)
    check_private_dir(ours, "test")  # fine
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o755)
    with pytest.raises(ConfigError, match="open to others"):
        check_private_dir(open_dir, "test")
    link = tmp_path / "link"
    link.symlink_to(ours)
    with pytest.raises(ConfigError, match="not a directory"):
        check_private_dir(link, "test")
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534"):
            check_private_dir(foreign, "test")


def test_communicate_drains_both_pipes_and_bounds_stdout(tmp_path):
    # 300 KB on stderr while stdout is also busy: reading one pipe to its end first deadlocks
    # once the other fills its 64 KiB buffer.
    script = "import sys\nfor i in range(3000):\n    sys.stderr.write('w' * 100 + '\\n')\n    print(i)\n"
    done = proc.communicate([sys.executable, "-c", script], timeout=60)
    assert done.returncode == 0
    assert done.stdout.decode().split() == [str(i) for i in range(3000)]
    assert len(done.stderr) == 3000 * 101
    big = proc.communicate(
        [sys.executable, "-c", "import sys; sys.stdout.write('x' * 50_000_000)"],
        max_stdout=1 << 20,
        timeout=60,
    )
    assert big.truncated and len(big.stdout) <= (1 << 20) + (1 << 20)


def _project_with(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "cloned"
    p.mkdir()
    (p / "remotedl.toml").write_text(body)
    return p


def test_project_ssh_config_runs_nothing_until_allowed(tmp_path):
    from remotedl.cli import main

    marker = tmp_path / "ran"
    proj = _project_with(tmp_path, 'host = "gpubox"\nssh_config = "tools/ssh.cfg"\n')
    (proj / "tools").mkdir()
    (proj / "tools" / "ssh.cfg").write_text(f'Match exec "touch {marker}"\n  HostName 127.0.0.1\n')
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["status"], e) == 3
    assert "ssh_config" in e.stderr.getvalue() and "remotedl allow" in e.stderr.getvalue()
    assert not marker.exists()
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["allow"], e) == 0, e.stderr.getvalue()
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["config", "--json"], e) == 0, e.stderr.getvalue()
    # Allowed: the relative path resolved against the file that names it.
    value = json.loads(e.stdout.getvalue())["settings"]["ssh_config"]["value"]
    assert value == str(proj / "tools" / "ssh.cfg")
    assert marker.exists()  # what the user allowed runs
    marker.unlink()
    # Any change to the file needs a new approval.
    (proj / "remotedl.toml").write_text('host = "other"\nssh_config = "tools/ssh.cfg"\n')
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["status"], e) == 3
    assert not marker.exists()


def test_config_shows_a_project_before_allow_and_runs_nothing(tmp_path):
    """A newcomer may look at a cloned project's settings before trusting it: `config` shows
    them, names each one that needs `allow`, and runs nothing (no ssh -G of its ssh config)."""
    from remotedl.cli import main

    marker = tmp_path / "ran"
    proj = _project_with(tmp_path, 'host = "gpubox"\nremote_dir = "/r"\nssh_config = "tools/ssh.cfg"\n')
    (proj / "tools").mkdir()
    (proj / "tools" / "ssh.cfg").write_text(f'Match exec "touch {marker}"\n  HostName 127.0.0.1\n')
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["config"], e) == 0, e.stderr.getvalue()
    out = e.stdout.getvalue()
    assert "needs allow: ssh_config" in out and "can run commands on this machine" in out, out
    assert "gpubox" in out and "/r" in out
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["config", "--json"], e) == 0, e.stderr.getvalue()
    data = json.loads(e.stdout.getvalue())
    assert list(data["needs_allow"]) == ["ssh_config"]
    assert data["settings"]["ssh_config"]["value"] is None  # not applied
    assert not marker.exists()


def test_project_cmd_ip_source_needs_allow(tmp_path):
    from remotedl.cli import main

    marker = tmp_path / "ran"
    proj = _project_with(
        tmp_path,
        f'[dns]\nname = "a.example.com"\nprovider = "duckdns"\nip_sources = ["cmd:touch {marker}"]\n',
    )
    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["dns", "check"], e) == 3
    assert "cmd:" in e.stderr.getvalue()
    assert not marker.exists()


def test_user_config_may_name_ssh_config_relative_to_itself(tmp_path):
    from remotedl.cli import main

    e = make_env(tmp_path / "laptop", cwd=tmp_path)
    cfg_dir = tmp_path / "laptop" / "config" / "remotedl"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.toml").write_text('ssh_config = "boxes.cfg"\n')
    (cfg_dir / "boxes.cfg").write_text("Host gpubox\n  HostName 127.0.0.1\n")
    assert main(["config", "--json"], e) == 0, e.stderr.getvalue()
    value = json.loads(e.stdout.getvalue())["settings"]["ssh_config"]["value"]
    assert value == str(cfg_dir / "boxes.cfg")


def test_closed_stdin_and_stdout_do_not_crash(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s")}
    out = subprocess.run(
        f"{sys.executable} -m remotedl --host nowhere.invalid trust <&-",
        shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert "Traceback" not in out.stderr
    assert "internal error" not in out.stderr
    out = subprocess.run(
        f"{sys.executable} -m remotedl config >&-",
        shell=True, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------ hostile boxes

FAKE_PYTHON = """#!/bin/sh
# A box python that installs the agent like the real one but answers like a hostile box.
case "$1" in -c) exec python3 "$@";; esac
case "$MODE" in
  junk) echo 'this is not json';;
  types) echo '{"ok": true, "jobs": [{"id": "1", "name": 3, "command": [], "cwd": 0, "status": "x"}]}';;
  deep) python3 -c 'print("[" * 100000 + "]" * 100000)';;
  huge) python3 -c 'import sys; sys.stdout.write("{\\"ok\\": true, \\"p\\": \\"" + "x" * 300000000)';;
  escape) echo '{"ok": false, "error": "boom \\u001b]0;pwned\\u0007 \\u001b[31mred"}';;
esac
"""


@pytest.mark.parametrize("mode", ["junk", "types", "deep", "huge", "escape"])
def test_hostile_agent_answers_give_one_clear_error(mode, box, tmp_path, project):
    fake = box.home / f"fake-python-{mode}"
    fake.write_text(FAKE_PYTHON.replace('"$MODE"', mode))
    fake.chmod(0o755)
    (project / "remotedl.toml").write_text(f'python = "{fake}"\n')
    run = cli_for(box, tmp_path / "laptop")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run("jobs", "--json", cwd=project)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert r.code == 1, (r.out, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert "\x1b" not in r.err and "\x07" not in r.err  # never raw escapes to the terminal
    line = json.loads(r.out)["error"] if r.out.strip() else r.err
    assert line.strip()
    if mode == "huge":
        assert "MiB" in line
        assert grown_mib < 200  # bounded: not the 300 MB the box sent
    if mode == "escape":
        r = run("jobs", cwd=project)  # text mode: the error goes to a terminal
        assert r.code == 1
        assert "\x1b" not in r.err and "\x07" not in r.err
        assert "boom \\x1b]0;pwned\\x07" in r.err


def test_unwritable_state_dir_says_what_failed(fresh_box, tmp_path, project):
    (fresh_box.home / ".remotedl").write_text("a file where the directory should be\n")
    run = cli_for(fresh_box, tmp_path / "laptop")
    r = run("jobs", cwd=project)
    assert r.code == 1
    assert "could not install the remotedl agent under ~/.remotedl" in r.err
    assert "python3 is not installed" not in r.err


def test_malformed_known_hosts_line_is_skipped_with_a_warning(tmp_path, box):
    kh = tmp_path / "known_hosts"
    kh.write_text("garbage line without key\n[127.0.0.1]:1 ssh-ed25519 !!notbase64!!\n")
    from tests.test_ssh import run_with, write_config

    cfg = write_config(tmp_path / "cfg", box, UserKnownHostsFile=str(kh))
    code, _out, err = run_with(tmp_path, box, cfg, "trust", "--yes")
    assert code == 0, err
    assert "skipping malformed line 1" in err
    assert "Traceback" not in err
    assert "ssh-ed25519" in kh.read_text().splitlines()[-1]


def test_allow_covers_the_ssh_config_and_every_file_it_includes(tmp_path):
    """`allow` vouches for the project file and the ssh config it names with what that
    Includes (globs too): a Match exec added to any of them afterwards runs nothing until the
    user allows again."""
    from remotedl.cli import main

    marker = tmp_path / "ran"
    proj = _project_with(tmp_path, 'host = "gpubox"\nssh_config = "tools/ssh.cfg"\n')
    confd = proj / "tools" / "conf.d"
    confd.mkdir(parents=True)
    cfg = proj / "tools" / "ssh.cfg"
    cfg.write_text(f'Include "{confd}/*.conf"\nHost gpubox\n  HostName 127.0.0.1\n')
    (confd / "a.conf").write_text(f"Include = {proj}/tools/deeper.cfg\nHost other\n  HostName 127.0.0.2\n")
    (proj / "tools" / "deeper.cfg").write_text("Host third\n  HostName 127.0.0.3\n")
    match_exec = f'Match exec "touch {marker}"\n  User someone\n'

    def code() -> int:
        e = make_env(tmp_path / "laptop", cwd=proj)
        return main(["status" if refused else "config"], e)

    refused = False

    e = make_env(tmp_path / "laptop", cwd=proj)
    assert main(["allow"], e) == 0, e.stderr.getvalue()
    shown = e.stdout.getvalue()
    assert str(cfg) in shown and str(confd / "a.conf") in shown and "deeper.cfg" in shown
    assert code() == 0
    for change in (
        lambda: cfg.write_text(match_exec + cfg.read_text()),  # the named file
        lambda: (confd / "b.conf").write_text(match_exec),  # a new file the glob matches
        lambda: (proj / "tools" / "deeper.cfg").write_text(match_exec),  # two Includes down
    ):
        change()
        refused = True
        assert code() == 3  # refused: not run
        assert not marker.exists()
        assert main(["allow"], make_env(tmp_path / "laptop", cwd=proj)) == 0
        refused = False
        assert code() == 0
        assert marker.exists()  # allowed: it runs
        marker.unlink()


def test_a_change_after_allow_is_named_as_one(tmp_path):
    """After `allow`, a changed included file is refused with words that say so and name the
    files to read again: the user did not touch remotedl.toml and must not be told to read it
    alone; a project never allowed keeps the first-time words."""
    from remotedl.cli import main

    proj = _project_with(tmp_path, 'host = "gpubox"\nssh_config = "ssh.cfg"\n')
    (proj / "conf.d").mkdir()
    (proj / "ssh.cfg").write_text(f'Include "{proj}/conf.d/*.conf"\nHost gpubox\n  HostName 127.0.0.1\n')

    def config() -> str:
        e = make_env(tmp_path / "laptop", cwd=proj)
        assert main(["status"], e) == 3
        return e.stderr.getvalue()

    first = config()
    assert "until you allow this version of the file" in first and "changed since" not in first
    assert main(["allow"], make_env(tmp_path / "laptop", cwd=proj)) == 0
    (proj / "conf.d" / "a.conf").write_text('Match exec "true"\n')
    err = config()
    assert "changed since you allowed it (remotedl.toml, ssh.cfg, conf.d/a.conf" in err, err
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err  # one line and its hint


def test_ssh_config_files_follows_include_as_openssh_reads_it(tmp_path):
    from remotedl.config import ssh_config_files

    home = tmp_path / "home"
    (home / ".ssh" / "conf.d").mkdir(parents=True)
    (home / ".ssh" / "conf.d" / "b.conf").write_text("Include loop.cfg\n")  # relative: to ~/.ssh
    (home / ".ssh" / "loop.cfg").write_text(f"include {tmp_path}/top.cfg\n")  # a loop back to the top
    (tmp_path / "with space.cfg").write_text("Host x\n")
    top = tmp_path / "top.cfg"
    top.write_text(
        "# Include /not/this\n"
        "Host gpubox\n"
        "  INCLUDE=conf.d/*.conf\n"  # keywords are case-insensitive; '=' separates too
        f'  Include "{tmp_path}/with space.cfg" ~/missing.cfg\n'
    )
    got = ssh_config_files(top, home)
    assert got == [
        top,
        home / ".ssh" / "conf.d" / "b.conf",
        home / ".ssh" / "loop.cfg",
        tmp_path / "with space.cfg",
        home / "missing.cfg",  # not there yet: making it later changes what runs
    ]


def test_requests_without_secrets_travel_in_the_command_line(
    fresh_box, tmp_path, project, caplog, monkeypatch
):
    """jobs, show, logs and kill go in ssh's command line (no round trip waiting for sshd to open
    stdin, issue 24); a start, which can hold --env values, never does; a box without base64
    gets them on stdin, and says nothing about it. (Sessions, not the resident agent.)"""
    import logging

    monkeypatch.setenv("REMOTEDL_RESIDENT", "0")

    from remotedl.ssh import resolve_host
    from remotedl.ssh.openssh import close_master
    from tests.test_sync import hide_from_box_path

    run = cli_for(fresh_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")

    def sent(*argv: str) -> tuple[str, list[str]]:
        caplog.clear()
        r = run(*argv, cwd=project)
        assert r.code == 0, r.err
        return r.out, [m.getMessage() for m in caplog.records if m.getMessage().startswith("remote ")]

    out, lines = sent(
        "run", "--no-push", "--detach", "--json", "--cpu", "--env", "TOKEN=s3cr3t", "--", "echo", "hi"
    )
    assert lines and not any("inline" in line for line in lines)
    job = str(json.loads(out)["id"])
    for argv in (("jobs",), ("show", job), ("logs", job)):
        _, lines = sent(*argv)
        assert len(lines) == 1 and "inline" in lines[0], (argv, lines)
    hide_from_box_path(fresh_box, "base64")
    # New sessions on the master connection would still see the old PATH: a new one.
    close_master(
        resolve_host(make_env(tmp_path / "laptop"), fresh_box.name, ssh_config=fresh_box.info.ssh_config)
    )
    out, _ = sent("logs", job)
    assert out == "hi\n"
    out, lines = sent("show", job)
    assert job in out
    assert not any("inline" in line for line in lines)  # known now: stdin from the start


def test_a_start_without_secrets_travels_in_the_command_line(
    fresh_box, tmp_path, project, caplog, monkeypatch
):
    """run --no-push without --env values or notification URLs: the start request (with its
    tree check) goes in ssh's command line, one round trip less (issue 24); the job runs.
    (Sessions, not the resident agent.)"""
    import logging

    monkeypatch.setenv("REMOTEDL_RESIDENT", "0")

    run = cli_for(fresh_box, tmp_path / "laptop")
    assert run("push", cwd=project).code == 0
    assert run("jobs", cwd=project).code == 0  # the agent is on the box
    caplog.set_level(logging.DEBUG, logger="remotedl.ssh")
    caplog.clear()
    r = run("run", "--no-push", "--detach", "--json", "--cpu", "--", "echo", "in line", cwd=project)
    assert r.code == 0, r.err
    lines = [m.getMessage() for m in caplog.records if m.getMessage().startswith("remote ")]
    assert len(lines) == 1 and "inline" in lines[0], lines
    job = str(json.loads(r.out)["id"])

    def ended() -> bool:
        return json.loads(run("show", "--json", job, cwd=project).out)["status"] == "succeeded"

    assert retry_until(ended, seconds=20)
    assert run("logs", job, cwd=project).out == "in line\n"
