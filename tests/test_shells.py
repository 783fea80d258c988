"""Boxes as users have them: login shells bash, zsh, fish, dash and tcsh, start-up files that
print to stdout and stderr, a user without sudo.

Everything remotedl sends (commands, arguments, env values, requests) must reach the box
exactly, and everything it brings back (logs, records, JSON answers) must be exactly what the
box holds, with no start-up noise in it. git and rsync cannot work over a channel that a
start-up file writes into: there remotedl must say so once, naming the file to fix.

The first tests check the boxes themselves with plain ssh, so a failure further down is
remotedl's, not the test rig's.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shlex
import socket
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl.cli import main
from remotedl.env import Environment
from remotedl.errors import UsageError
from remotedl.sandbox import NOISE_MARKER
from tests.conftest import Box, make_env, process_gone, process_start, retry_until, tmux_dir

# What a start-up error must name, per login shell (tcsh reads ~/.tcshrc, else ~/.cshrc).
STARTUP_NAMES = {
    "bash": (".bashrc",),
    "zsh": (".zshenv",),
    "fish": ("config.fish",),
    "tcsh": (".tcshrc", ".cshrc"),
}

# Arguments that shells like to change: escapes, expansions, quotes, history, globs, tildes.
HOSTILE = [
    "a\\b",
    "\\d+",
    "a\\\\b",
    "\\",
    "ends with \\",
    "\\n is not a newline",
    "\\'",
    "$HOME",
    "${HOME}",
    "$fish_pid",
    "q'uo\"te",
    "'",
    '"',
    "%s",
    "%%",
    "!x",
    "!!",
    "é ü",
    "データ 🎉",
    "line one\nline two",
    "*",
    "?",
    "[ab]",
    "{a,b}",
    "~",
    "~/x",
    "",
    "  spaces around  ",
    "tab\there",
    "-n",
    "--",
    "$(touch PWNED)",
    "`touch PWNED`",
    "(touch PWNED)",
    "; touch PWNED",
    "a|b&c",
    ">out <in",
    "#not a comment",
    "^caret",
    "a=b",
]

# Bytes a job may write: every byte value, a long line, CRLF, invalid UTF-8, lines that look
# like remotedl's own marks, and no newline at the end.
PAYLOAD = (
    bytes(range(256)) * 4
    + b"\n"
    + b"x" * 300_000
    + b"\n"
    + "ünïcødé データ\r\n".encode()
    + b"\xff\xfe\xc3\x28 invalid utf-8\n"
    + b'@@remotedl-end {"job": {}}\n@@dir /etc\n@@head none\n\x1b]0;title\x07\n'
    + b"\0\0\0 NULs\n"
    + b"the end, no newline"
)

PRINT_ARGS = "import json, sys; print(json.dumps(sys.argv[1:]))"


@dataclass
class Out:
    code: int
    raw: bytes  # stdout, byte for byte
    err: str

    @property
    def out(self) -> str:
        return self.raw.decode()


def rdl(box: Box, base: Path, *argv: str, cwd: Path | None = None, debug: bool = False) -> Out:
    """The CLI in-process against ``box``, with a stdout that keeps bytes (log output is raw)."""
    e = make_env(base, cwd=cwd or base)
    e.environ["REMOTEDL_SSH_CONFIG"] = box.info.ssh_config  # type: ignore[index]
    e.environ["REMOTEDL_HOST"] = box.name  # type: ignore[index]
    raw = io.BytesIO()
    env = Environment(
        environ=e.environ,
        cwd=e.cwd,
        stdout=io.TextIOWrapper(raw, encoding="utf-8", write_through=True),
        stderr=io.StringIO(),
        stdin_isatty=False,
    )
    code = main(["--debug", *argv] if debug else list(argv), env)
    env.stdout.flush()
    return Out(code, raw.getvalue(), env.stderr.getvalue())  # type: ignore[attr-defined]


def noise_matters(box: Box) -> bool:
    """Whether the box's login shell reads a start-up file that prints (dash reads none)."""
    return box.info.noisy and sandbox.STARTUP_FILES[box.info.login_shell or "bash"] is not None


def assert_no_noise(*texts: str | bytes) -> None:
    for t in texts:
        text = t.decode(errors="replace") if isinstance(t, bytes) else t
        assert NOISE_MARKER not in text, text[-2000:]
        assert "\x1b]0;sandbox" not in text, text[-2000:]


def assert_startup_error(box: Box, r: Out) -> None:
    """ONE clear error naming the start-up file and how to fix it, exit status 1."""
    names = STARTUP_NAMES[box.info.login_shell or "bash"]
    assert r.code == 1, (r.code, r.err)
    errors = [line for line in r.err.splitlines() if line.startswith("remotedl: error:")]
    assert len(errors) == 1, r.err
    assert any(n in r.err for n in names), r.err
    assert "start-up" in r.err, r.err
    assert "interactive" in r.err, r.err  # how: print only in interactive shells


def ssh(box: Box, command: str) -> subprocess.CompletedProcess[str]:
    """Plain OpenSSH, as a user would type it: ssh -F <the box's ssh config> <alias> command."""
    return subprocess.run(
        ["ssh", "-F", box.info.ssh_config, box.name, command], capture_output=True, text=True, timeout=30
    )


def put_file(box: Box, rel: str, data: bytes) -> Path:
    """A file in the box home, owned by the box user."""
    path = box.home / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    account = pwd.getpwnam(box.info.user)
    for p in [path, *[q for q in path.parents if q.is_relative_to(box.home)]]:
        os.chown(p, account.pw_uid, account.pw_gid)
    return path


@pytest.fixture
def work(shell_box: Box, project: Path) -> Path:
    """The project, with its work tree on the box (~/work) made, for jobs run with --no-push."""
    shell_box.sh('mkdir -p "$HOME/work"')
    (project / "remotedl.toml").write_text('remote_dir = "~/work"\n')
    return project


def job_list(box: Box, base: Path, proj: Path) -> list[dict]:
    r = rdl(box, base, "jobs", "--all", "--json", cwd=proj)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    return json.loads(r.out)


# ------------------------------------------------------------------ the boxes themselves


def test_box_has_the_login_shell_and_noise_asked_for(shell_box):
    shell = shell_box.info.login_shell
    assert shell is not None
    assert pwd.getpwnam(shell_box.info.user).pw_shell.endswith("/" + shell)
    pid = "$fish_pid" if shell == "fish" else "$$"
    r = ssh(shell_box, f"echo hi; cat /proc/{pid}/comm; echo $HOME; id -un")
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if NOISE_MARKER not in x]
    assert lines[-3:] == [shell, shell_box.info.home, shell_box.info.user], r.stdout
    startup = sandbox.STARTUP_FILES[shell]
    if noise_matters(shell_box):
        assert f"{NOISE_MARKER} (~/{startup})\n" in r.stdout
        assert f"{NOISE_MARKER} (~/{startup}) on stderr\n" in r.stderr
        assert "\x1b]0;sandbox\x07hi\n" in r.stdout  # the title escape has no newline
    else:
        assert r.stdout.startswith("hi\n"), r.stdout
        assert r.stderr == ""
    # The box user is a plain one: sudo is there and refuses it.
    r = ssh(shell_box, "sudo -n true")
    assert r.returncode == 1
    assert "a password is required" in r.stderr


def test_box_user_owns_what_it_needs(shell_box):
    r = ssh(
        shell_box,
        "echo start; touch $HOME/.w && rm $HOME/.w && tmux -L probe new-session -d true "
        "&& nvidia-smi --query-gpu=index --format=csv,noheader && echo $TMUX_TMPDIR",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-3:] == ["0", "1", tmux_dir(shell_box)]


def test_sandbox_cli_shell_box_up_and_down_kills_only_its_own_tmux(tmp_path):
    if os.getuid() != 0:
        pytest.skip("needs root: a box with another login shell logs in as a system user of its own")
    base = tmp_path / "laptop"
    infos = {}
    for name, flag in (("a", "--noisy"), ("b", "--no-sudo")):
        e = make_env(base)
        code = main(["sandbox", "up", "--name", f"cli-{name}", "--shell", "fish", flag, "--json"], e)
        assert code == 0, e.stderr.getvalue()  # type: ignore[attr-defined]
        infos[name] = sandbox.SandboxInfo(**json.loads(e.stdout.getvalue()))  # type: ignore[attr-defined]
    a, b = infos["a"], infos["b"]
    try:
        assert a.user == b.user == "rdl-fish"
        assert a.login_shell == "fish" and a.noisy and not a.sudo
        assert b.login_shell == "fish" and not b.noisy and not b.sudo
        boxes = {k: Box(v, {}) for k, v in infos.items()}
        for box in boxes.values():
            r = ssh(box, "tmux new-session -d sleep 300")
            assert r.returncode == 0, r.stderr
        sockets = {
            k: Path(v.tmux_dir) / f"tmux-{pwd.getpwnam(v.user).pw_uid}" / "default" for k, v in infos.items()
        }

        def server_pid(k: str) -> int | None:
            r = subprocess.run(
                ["tmux", "-S", str(sockets[k]), "display-message", "-p", "#{pid}"],
                capture_output=True,
                text=True,
            )
            return int(r.stdout) if r.returncode == 0 else None

        pid_a, pid_b = server_pid("a"), server_pid("b")
        assert pid_a and pid_b and pid_a != pid_b
        start_a, start_b, sshd_a = process_start(pid_a), process_start(pid_b), process_start(a.pid)
        e = make_env(base)
        assert main(["sandbox", "down", "--name", "cli-a"], e) == 0
        assert retry_until(lambda: process_gone(pid_a, start_a), seconds=30)
        assert not Path(a.directory).exists()
        assert not Path(a.home).parent.exists()
        assert process_gone(a.pid, sshd_a)
        assert server_pid("b") == pid_b  # the same user's other box keeps its tmux server
        assert not process_gone(pid_b, start_b)
    finally:
        for name in infos:
            sandbox.down(make_env(base), name=f"cli-{name}")
    assert retry_until(lambda: process_gone(pid_b, start_b), seconds=30)
    assert not Path(b.home).parent.exists()


def test_shell_box_needs_root(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox.os, "getuid", lambda: 1000)
    env = make_env(tmp_path)
    for options in ({"login_shell": "fish"}, {"no_sudo": True}):
        with pytest.raises(UsageError) as caught:
            sandbox.up(env, name="needs-root", **options)
        assert "needs root" in caught.value.message
        assert not sandbox.sandbox_dir(env, "needs-root").exists()
    with pytest.raises(UsageError, match="not one of"):
        sandbox.up(env, name="bad-shell", login_shell="csh")


# ------------------------------------------------------------------ byte-exact round trips


def test_run_arguments_and_command_round_trip(shell_box, work, tmp_path):
    base = tmp_path / "laptop"
    argv = ["python3", "-c", PRINT_ARGS, *HOSTILE]
    name = "my job 'x' \\ é $HOME"
    r = rdl(shell_box, base, "run", "--no-push", "--cpu", "--name", name, "--", *argv, cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert json.loads(r.out) == HOSTILE
    assert r.raw == (json.dumps(HOSTILE) + "\n").encode()
    rec = job_list(shell_box, base, work)[-1]
    assert rec["name"] == name
    assert rec["command"] == shlex.join(argv)
    r = rdl(shell_box, base, "logs", str(rec["id"]), cwd=work)
    assert r.code == 0, r.err
    assert r.raw == (json.dumps(HOSTILE) + "\n").encode()
    for where in (work, shell_box.home, shell_box.home / "work"):
        assert not (where / "PWNED").exists()


def test_one_word_command_line_round_trips(shell_box, work, tmp_path):
    # One word with shell syntax is a command line as typed: sh on the box runs it, not the
    # login shell.
    line = "printf '[%s]\\n' \"a\\\\b\" '$HOME' \"$((6*7))\" 'é' && echo \"${HOME:+set}\""
    r = rdl(shell_box, tmp_path / "laptop", "run", "--no-push", "--cpu", line, cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert r.out == "[a\\b]\n[$HOME]\n[42]\n[é]\nset\n"


def test_env_values_round_trip(shell_box, work, tmp_path):
    values = {f"V{i}": v for i, v in enumerate(HOSTILE)}
    prog = "import json, os, sys; print(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
    env_args = [a for k, v in values.items() for a in ("--env", f"{k}={v}")]
    r = rdl(
        shell_box,
        tmp_path / "laptop",
        "run",
        "--no-push",
        "--cpu",
        *env_args,
        "--",
        "python3",
        "-c",
        prog,
        *values,
        cwd=work,
    )
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert json.loads(r.out) == values


def test_job_output_bytes_round_trip(shell_box, work, tmp_path):
    base = tmp_path / "laptop"
    put_file(shell_box, "work/payload.bin", PAYLOAD)
    r = rdl(shell_box, base, "run", "--no-push", "--cpu", "--", "cat", "payload.bin", cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.err)
    assert r.raw == PAYLOAD  # followed live
    job_id = str(job_list(shell_box, base, work)[-1]["id"])
    r = rdl(shell_box, base, "logs", job_id, cwd=work)
    assert r.code == 0, r.err
    assert r.raw == PAYLOAD  # read back whole
    r = rdl(shell_box, base, "logs", job_id, "-n", "3", cwd=work)
    assert r.code == 0, r.err
    assert r.raw == b"\n".join(PAYLOAD.split(b"\n")[-3:])
    r = rdl(shell_box, base, "logs", "-f", job_id, cwd=work)  # an ended job: all of it, then return
    assert r.code == 0, r.err
    assert r.raw == PAYLOAD


def test_status_jobs_kill_answers_are_clean(shell_box, work, tmp_path):
    base = tmp_path / "laptop"
    r = rdl(shell_box, base, "status", "--json", cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    st = json.loads(r.out)
    assert st["hostname"] == socket.gethostname()
    assert all(st["tools"][t] for t in ("git", "rsync", "tmux", "python3")), st["tools"]
    assert [g["index"] for g in st["gpus"]] == [0, 1]
    r = rdl(shell_box, base, "status", cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert f"host    {socket.gethostname()}," in r.out

    loop = ["sh", "-c", 'i=0; while :; do i=$((i+1)); echo "tick $i"; sleep 0.1; done']
    r = rdl(shell_box, base, "run", "--no-push", "--detach", "--gpu", "1", "--", *loop, cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    job_id = r.out.strip()
    assert r.out == job_id + "\n" and job_id.isdigit(), r.out
    (rec,) = [j for j in job_list(shell_box, base, work) if str(j["id"]) == job_id]
    assert rec["status"] == "running"
    assert rec["gpus"] == [1]
    assert rec["command"] == shlex.join(loop)
    assert rec["log"] == str(shell_box.home / ".remotedl" / "logs" / f"{job_id}.log")
    assert retry_until(lambda: b"tick 3\n" in rdl(shell_box, base, "logs", job_id, cwd=work).raw, seconds=15)
    r = rdl(shell_box, base, "jobs", cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert job_id in r.out
    r = rdl(shell_box, base, "kill", job_id, "--json", cwd=work)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert json.loads(r.out)["status"] == "killed"
    log = rdl(shell_box, base, "logs", job_id, cwd=work).raw
    assert log.startswith(b"tick 1\ntick 2\ntick 3\n")
    assert_no_noise(log)
    assert (shell_box.home / ".remotedl" / "logs" / f"{job_id}.log").read_bytes() == log


# ------------------------------------------------------------------ git and rsync

HOSTILE_NAMES = [
    "with space.txt",
    "quote'single.txt",
    'quote"double.txt',
    "$(touch PWNED).txt",
    "back`tick`.txt",
    "semi;colon.txt",
    "back\\slash.txt",
    "ünïcødé データ.txt",
    "-dash-first.txt",
    "star*.txt",
    "~tilde.txt",
]


def test_push_and_pull_hostile_names(shell_box, project, tmp_path):
    base = tmp_path / "laptop"
    rdir = f"~/sync/{tmp_path.name}"
    for n in HOSTILE_NAMES:
        (project / n).write_text(n)
    data = project / "d a t a;$(touch PWNED)"
    data.mkdir()
    for n in HOSTILE_NAMES:
        (data / n).write_bytes(PAYLOAD[:1000] + n.encode())
    (project / ".gitignore").write_text("d a t a*\n")
    r = rdl(shell_box, base, "push", "--remote-dir", rdir, "--data", data.name, cwd=project)
    if noise_matters(shell_box):
        assert_startup_error(shell_box, r)
        r = rdl(shell_box, base, "push", "--no-code", "--remote-dir", rdir, "--data", data.name, cwd=project)
        assert_startup_error(shell_box, r)  # rsync alone: the same one error
        put_file(shell_box, f"sync/{tmp_path.name}/result.txt", b"made on the box\n")
        r = rdl(shell_box, base, "pull", "--remote-dir", rdir, "result.txt", cwd=project)
        assert_startup_error(shell_box, r)
        assert not (project / "result.txt").exists()
        return
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    remote = shell_box.home / "sync" / tmp_path.name
    for n in HOSTILE_NAMES:
        assert (remote / n).read_text() == n
        assert (remote / data.name / n).read_bytes() == PAYLOAD[:1000] + n.encode()
    for where in (project, remote, shell_box.home, tmp_path):
        assert not (where / "PWNED").exists()
    # Back home: a result written on the box, with a hostile name.
    put_file(shell_box, f"sync/{tmp_path.name}/out dir/{HOSTILE_NAMES[3]}", PAYLOAD)
    r = rdl(shell_box, base, "pull", "--remote-dir", rdir, f"out dir/{HOSTILE_NAMES[3]}", cwd=project)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert (project / "out dir" / HOSTILE_NAMES[3]).read_bytes() == PAYLOAD


def test_run_script_pushes_and_passes_arguments(shell_box, project, tmp_path):
    base = tmp_path / "laptop"
    (project / "remotedl.toml").write_text(f'remote_dir = "~/runs/{tmp_path.name}"\n')
    (project / "show.py").write_text(PRINT_ARGS + "\n")
    before = job_list(shell_box, base, project)
    r = rdl(shell_box, base, "run", "--cpu", "show.py", "--", *HOSTILE, cwd=project)
    if noise_matters(shell_box):
        assert_startup_error(shell_box, r)
        assert job_list(shell_box, base, project) == before  # nothing started
        return
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    assert json.loads(r.out) == HOSTILE


# ------------------------------------------------------------------ doctor, secrets, sudo


def test_doctor_names_a_noisy_startup_file(shell_box, project, tmp_path):
    r = rdl(shell_box, tmp_path / "laptop", "doctor", "--json", cwd=project)
    report = json.loads(r.out)
    about = [c for c in report["checks"] if "start-up" in c["detail"] + " " + c["fix"]]
    # Other checks hold no noise (the start-up check may well quote what the file prints).
    assert_no_noise(json.dumps([c for c in report["checks"] if c not in about]), r.err)
    if noise_matters(shell_box):
        names = STARTUP_NAMES[shell_box.info.login_shell or "bash"]
        failing = [c for c in about if c["status"] == "fail"]
        assert failing, report["checks"]
        for check in failing:
            text = check["detail"] + " " + check["fix"]
            assert any(n in text for n in names), check
            assert "interactive" in text, check
        assert r.code == 1
    else:
        assert about == []
        failed = [c for c in report["checks"] if c["status"] == "fail"]
        assert failed == [], failed
        assert report["ok"] is True
        assert r.code == 0, r.err


def test_startup_files_that_print_only_on_stderr_leave_push_pull_and_doctor_working(
    fresh_box, project, tmp_path
):
    """The hint for a noisy start-up file says to quiet what prints unless interactive; a user
    who keeps a message on stderr (`echo ... >&2`, a title escape) has done enough: git and
    rsync read their protocols from stdout only, so push, pull and doctor work there."""
    bashrc = fresh_box.home / ".bashrc"
    bashrc.write_text(f"echo '{NOISE_MARKER} (~/.bashrc) on stderr' >&2\nprintf '\\033]0;sandbox\\007' >&2\n")
    assert ssh(fresh_box, "true").stdout == ""  # what `ssh gpubox true` must print: nothing
    assert NOISE_MARKER in ssh(fresh_box, "true").stderr  # and the file does print, on stderr
    base = tmp_path / "laptop"
    rdir = f"~/quiet-stdout/{tmp_path.name}"
    (project / "data").mkdir()
    (project / "data" / "x.bin").write_bytes(PAYLOAD)
    (project / ".gitignore").write_text("data/\n")
    r = rdl(fresh_box, base, "push", "--remote-dir", rdir, "--data", "data", cwd=project)
    assert r.code == 0, r.err
    assert_no_noise(r.raw, r.err)
    remote = fresh_box.home / "quiet-stdout" / tmp_path.name
    assert (remote / "README").read_text() == "hello\n"
    assert (remote / "data" / "x.bin").read_bytes() == PAYLOAD
    put_file(fresh_box, f"quiet-stdout/{tmp_path.name}/result.txt", b"made on the box\n")
    r = rdl(fresh_box, base, "pull", "--remote-dir", rdir, "result.txt", cwd=project)
    assert r.code == 0, r.err
    assert (project / "result.txt").read_bytes() == b"made on the box\n"
    r = rdl(fresh_box, base, "doctor", "--json", "--remote-dir", rdir, cwd=project)
    startup = [c for c in json.loads(r.out)["checks"] if c["name"] == "shell start-up"]
    assert [c["status"] for c in startup] == ["ok"], startup
    assert "only on stderr" in startup[0]["detail"], startup


def test_env_value_never_in_error_output(shell_box, work, tmp_path):
    base = tmp_path / "laptop"
    marker = uuid.uuid4().hex
    secret = f"tok-{marker}-'\"\\$x!`"
    cases = [
        (
            "run",
            "--no-push",
            "--cpu",
            "--remote-dir",
            "~/no such dir",
            "--env",
            f"TOKEN={secret}",
            "--",
            "true",
        ),
        ("run", "--no-push", "--gpu", "7", "--env", f"TOKEN={secret}", "--", "true"),
        ("run", "--no-push", "--cpu", "--env", f"TOKEN={secret}", "--", "sh", "-c", "exit 3"),
        ("run", "--no-push", "--cpu", "--env", f"TOKEN={secret}", "--", "no-such-program-here"),
    ]
    for argv in cases:
        for debug in (False, True):
            r = rdl(shell_box, base, *argv, cwd=work, debug=debug)
            assert r.code != 0, (argv, r.out)
            assert marker not in r.err, (argv, debug, r.err)
            assert marker not in r.out, (argv, debug, r.out)


def test_setup_checks_without_sudo(plain_box, project, tmp_path):
    base = tmp_path / "laptop"
    r = ssh(plain_box, "sudo -n true")
    assert r.returncode == 1
    assert "a password is required" in r.stderr  # the rig: this user may not sudo
    r = rdl(plain_box, base, "setup", "base", "--check", "--json", cwd=project)
    assert r.code == 0, (r.out, r.err)
    (res,) = json.loads(r.out)
    # git, rsync, tmux and python3 are here: the check passes as the plain user, no sudo needed.
    assert [s["status"] for s in res["steps"]] == ["ok"], res
    assert "password" not in r.out


def test_follow_resumes_exactly_across_a_cut(shell_box, work, tmp_path):
    """Start-up noise is not log: after a dropped connection the follower resumes at the byte
    it reached, so every log byte arrives exactly once (noise would shift the offset)."""
    import threading

    from remotedl import jobs
    from remotedl.agent.client import AgentClient
    from remotedl.ssh import resolve_host
    from tests.test_jobs import _kill_sessions

    base = tmp_path / "laptop"
    put_file(
        shell_box,
        "work/count.sh",
        b'i=0; while [ $i -lt 60 ]; do i=$((i+1)); echo "line $i"; sleep 0.05; done\n',
    )
    r = rdl(shell_box, base, "run", "--detach", "--no-push", "--cpu", "--", "sh", "count.sh", cwd=work)
    assert r.code == 0, r.err
    job_id = r.out.strip()
    spec = resolve_host(make_env(base), shell_box.name, ssh_config=shell_box.info.ssh_config)
    got = bytearray()
    reconnects: list[int] = []
    result = {}

    def follow() -> None:
        result["rec"] = jobs.stream_logs(
            AgentClient(spec), job_id, got.extend, follow=True, on_reconnect=reconnects.append
        )

    t = threading.Thread(target=follow)
    t.start()
    assert retry_until(lambda: b"line 5\n" in got, seconds=15)
    assert _kill_sessions(shell_box) >= 1
    t.join(60)
    assert not t.is_alive()
    assert got.decode() == "".join(f"line {i}\n" for i in range(1, 61))
    assert reconnects, (result, len(got))
