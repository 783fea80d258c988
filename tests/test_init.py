"""`remotedl init`: a first box from an address, against real sshd boxes: a key-only box (the
sandbox: the key is pasted there by hand), and a box that lets a user of its own in with a
password (ssh-copy-id, driven through SSH_ASKPASS). The laptop side is a temporary ssh config
and key; OpenSSH's own home (~/.ssh of the passwd entry) is never written."""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotedl import proc
from remotedl.cli import main
from remotedl.env import passwd_home
from remotedl.ssh.configfile import find_host_lines, with_block
from remotedl.waiting import free_port, port_answers, retry_until
from tests.conftest import Box, CliResult, have, make_env
from tests.test_bastion import Lab, lab  # noqa: F401 (lab: the fixture, a box behind a jump host)
from tests.test_bastion import _config as _bastion_config

EXISTING = """# my own settings
Host other
    HostName 10.0.0.1
    User someone   # a comment kept as it is

Host *
    UserKnownHostsFile {known_hosts}
    ServerAliveInterval 99
"""


@dataclass
class Laptop:
    base: Path
    config: Path
    known_hosts: Path
    key: Path

    def run(self, *argv: str, cwd: Path, **extra: str) -> CliResult:
        env = make_env(self.base, cwd=cwd, **extra)
        code = main(["--ssh-config", str(self.config), *argv], env)
        return CliResult(code, env.stdout.getvalue(), env.stderr.getvalue())  # type: ignore[attr-defined]


@pytest.fixture
def laptop(tmp_path: Path) -> Laptop:
    base = tmp_path / "laptop"
    (base / "home").mkdir(parents=True)
    known = base / "known_hosts"
    config = base / "ssh_config"
    config.write_text(EXISTING.format(known_hosts=known))
    return Laptop(base, config, known, base / "keys" / "id_box")


def _root_ssh_files() -> dict[str, bytes]:
    ssh = passwd_home() / ".ssh"
    return {p.name: p.read_bytes() for p in ssh.iterdir() if p.is_file()} if ssh.is_dir() else {}


def _init_argv(alias: str, laptop: Laptop, *, port: int, user: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "init", alias, "--hostname", "127.0.0.1", "--port", str(port), "--user", user,
        "--identity", str(laptop.key), "--no-passphrase", *extra,
    ]  # fmt: skip


def test_key_only_box_from_nothing_to_a_working_status(fresh_box: Box, laptop: Laptop, project: Path) -> None:
    info = fresh_box.info
    (project / "data").mkdir()
    (project / "data" / "x.csv").write_text("1,2\n")
    before_root = _root_ssh_files()
    argv = _init_argv("gpu", laptop, port=info.port, user=info.user)

    # Without a terminal and without --yes: one usage error naming what needs consent; nothing changed.
    r = laptop.run(*argv, cwd=project)
    assert r.code == 2, r.out + r.err
    assert "needs your consent to" in r.err and "--yes" in r.err
    assert laptop.config.read_text() == EXISTING.format(known_hosts=laptop.known_hosts)
    assert not laptop.key.exists()

    # --yes: the block is added, the key made, the host key recorded; the box takes no password,
    # so init stops with the line to paste there.
    r = laptop.run(*argv, "--yes", cwd=project)
    assert r.code == 4, r.out + r.err
    text = laptop.config.read_text()
    assert text.startswith(EXISTING.format(known_hosts=laptop.known_hosts).split("Host *")[0])
    assert text.endswith("Host *\n" + EXISTING.format(known_hosts=laptop.known_hosts).split("Host *\n")[1])
    assert "Host gpu\n    HostName 127.0.0.1\n" in text
    assert text.index("Host gpu") < text.index("Host *")  # before the defaults, so its values win
    assert laptop.key.is_file() and (laptop.key.parent / "id_box.pub").is_file()
    host_pub = (Path(info.directory) / "host_key.pub").read_text().split()[1]
    assert laptop.known_hosts.exists(), r.out + r.err
    assert host_pub in laptop.known_hosts.read_text()
    assert "takes no password" in r.out
    pub = (laptop.key.parent / "id_box.pub").read_text().split()
    line = next(x.strip() for x in r.out.splitlines() if x.strip().startswith("mkdir -p ~/.ssh"))
    assert f"echo '{pub[0]} {pub[1]}" in line
    assert not (project / "remotedl.toml").exists()

    # The user pastes it on the box (this sshd reads the sandbox's authorized_keys file).
    with (Path(info.directory) / "authorized_keys").open("a") as f:
        f.write(" ".join(pub) + "\n")
    r = laptop.run(*argv, "--yes", cwd=project)
    assert r.code == 0, r.out + r.err
    assert "Next: remotedl run train.py --gpu 0" in r.out
    toml = (project / "remotedl.toml").read_text()
    assert 'host = "gpu"' in toml
    # The default every clone of the project uses (its identity: the first commit), not the
    # folder's name: a second clone under another name reaches the same tree.
    first = subprocess.run(
        ["git", "-C", str(project), "rev-list", "--max-parents=0", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert f'remote_dir = "~/remotedl/{first[:12]}"' in toml
    assert 'data = ["data"]' in toml
    assert "doctor:" in r.out

    # Run again: nothing new, byte for byte.
    snapshot = (
        laptop.config.read_bytes(),
        laptop.known_hosts.read_bytes(),
        (project / "remotedl.toml").read_bytes(),
    )
    r = laptop.run(*argv, cwd=project)  # no --yes needed: nothing to agree to
    assert r.code == 0, r.out + r.err
    assert "\n+ " not in r.out, r.out  # no change planned or made
    assert snapshot == (
        laptop.config.read_bytes(),
        laptop.known_hosts.read_bytes(),
        (project / "remotedl.toml").read_bytes(),
    )

    # The project now works with no flags but the ssh config.
    r = laptop.run("status", cwd=project)
    assert r.code == 0, r.out + r.err
    assert "gpu (" in r.out and "reachable" in r.out
    assert _root_ssh_files() == before_root


def test_a_key_with_a_passphrase_no_agent_holds_is_named(box: Box, laptop: Laptop, project: Path) -> None:
    # remotedl's connections never ask for a passphrase: such a key must be in an agent first.
    laptop.key.parent.mkdir()
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(laptop.key)])
    r = laptop.run(*_init_argv("gpu", laptop, port=box.info.port, user=box.info.user), "--yes", cwd=project)
    assert r.code == 4, r.out + r.err
    assert f"{laptop.key} has a passphrase and no ssh-agent holds it" in r.out
    assert f"ssh-add {laptop.key}" in r.out


def test_without_a_terminal_each_missing_answer_is_one_usage_error(
    box: Box, laptop: Laptop, project: Path
) -> None:
    before = laptop.config.read_bytes()
    r = laptop.run("init", cwd=project)
    assert (r.code, r.err.splitlines()[0]) == (2, "remotedl: error: which box? give it a name"), r.err
    r = laptop.run("init", "gpu", "--yes", cwd=project)
    assert r.code == 2, r.err
    assert "init needs the box's address" in r.err and "--hostname ADDRESS" in r.err
    (project / "remotedl.toml").write_text('host = "cloned"\n')  # a cloned project names its box
    r = laptop.run("init", "--yes", cwd=project)
    assert r.code == 2, r.err
    assert "Host cloned is not in" in r.err
    (project / "remotedl.toml").unlink()
    argv = _init_argv("gpu", laptop, port=box.info.port, user=box.info.user)
    argv.remove("--no-passphrase")
    r = laptop.run(*argv, "--yes", cwd=project)
    assert r.code == 2, r.err
    assert "needs a passphrase typed at a terminal" in r.err and "--no-passphrase" in r.err
    assert "Traceback" not in r.err
    assert laptop.config.read_bytes() == before  # each refused before any change
    assert not laptop.key.exists()
    assert not laptop.known_hosts.exists()


def test_dry_run_changes_nothing_and_shows_every_change(
    fresh_box: Box, laptop: Laptop, project: Path
) -> None:
    info = fresh_box.info
    before = laptop.config.read_bytes()
    r = laptop.run(
        *_init_argv("gpu", laptop, port=info.port, user=info.user, extra=("--dry-run",)), cwd=project
    )
    assert r.code == 0, r.out + r.err
    assert laptop.config.read_bytes() == before
    assert not laptop.key.exists()
    assert not laptop.known_hosts.exists()
    assert not (project / "remotedl.toml").exists()
    fingerprint = proc.run(["ssh-keygen", "-lf", str(Path(info.directory) / "host_key.pub")]).stdout.split()[
        1
    ]
    assert fingerprint in r.out
    assert "Host gpu" in r.out and f"Port {info.port}" in r.out
    assert "make a key" in r.out and "remotedl.toml" in r.out
    assert "dry run: nothing changed" in r.out
    home = laptop.base / "home"  # $HOME: no project there, no remotedl.toml written
    r = laptop.run(*_init_argv("gpu", laptop, port=info.port, user=info.user, extra=("--dry-run",)), cwd=home)
    assert "is no project: no remotedl.toml written" in r.out, r.out
    r = laptop.run(
        *_init_argv("gpu", laptop, port=info.port, user=info.user, extra=("--dry-run", "--json")), cwd=project
    )
    assert r.code == 0, r.err
    plan = json.loads(r.out)
    assert plan["host_key"]["fingerprint"] == fingerprint
    assert [(s["kind"], s["state"]) for s in plan["steps"]] == [
        ("ssh-config", "todo"),
        ("key", "todo"),
        ("host-key", "todo"),
        ("install-key", "check"),
        ("project-config", "todo"),
        ("doctor", "check"),
    ]
    assert laptop.config.read_bytes() == before


def test_an_existing_block_is_reused_or_refused_never_changed(
    box: Box, laptop: Laptop, project: Path
) -> None:
    # The session box's own config block, included from the user's config: found through Include.
    laptop.config.write_text(f"Include {box.info.ssh_config}\n" + laptop.config.read_text())
    before = laptop.config.read_bytes()
    r = laptop.run("init", box.name, "--hostname", "10.9.9.9", "--yes", cwd=project)
    assert r.code == 2, r.out + r.err
    assert "already in the ssh config" in r.err and "HostName 127.0.0.1 (not 10.9.9.9)" in r.err
    r = laptop.run("init", box.name, "--identity", str(laptop.key), "--yes", cwd=project)
    assert r.code == 2, r.out + r.err
    assert f"IdentityFile {box.dir / 'id_ed25519'} (not {laptop.key})" in r.err
    r = laptop.run("init", box.name, "--yes", "--no-data", cwd=project)
    assert r.code == 0, r.out + r.err
    assert f"Host {box.name} is in the ssh config ({box.info.ssh_config} line 2): kept" in r.out
    assert "host key" in r.out and "already trusted" in r.out
    assert laptop.config.read_bytes() == before


def test_the_block_goes_where_ssh_reads_it_first() -> None:
    text = "User global\n\nHost a\n  HostName a.example\nMatch host b\n  User b\nHost *\n  Port 2\n"
    new, line = with_block(text, "gpu", "Host gpu\n    HostName 1.2.3.4\n")
    # a blank line around it, the bytes before and after kept
    assert new == text.replace("Match host b", "\nHost gpu\n    HostName 1.2.3.4\n\nMatch host b")
    assert line == 6
    new, line = with_block("Host a\n  User x", "gpu", "Host gpu\n")  # no newline at the end
    assert new == "Host a\n  User x\n\nHost gpu\n"
    assert line == 4
    new, line = with_block("", "gpu", "Host gpu\n")
    assert (new, line) == ("Host gpu\n", 1)
    # a wildcard that matches comes after; one that does not, before
    new, _ = with_block("Host gp?\n  Port 3\nHost x*\n  Port 4\n", "gpu", "Host gpu\n")
    assert new.startswith("Host gpu\n\nHost gp?")


def test_include_globs_are_followed(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-lab").write_text("Host lab gpu\n  HostName x\n")
    main_cfg = tmp_path / "config"
    main_cfg.write_text(f"Include {tmp_path}/conf.d/*\nHost gpu*\n  User y\n")
    assert [(h.file.name, h.line) for h in find_host_lines(main_cfg, "gpu")] == [("10-lab", 1)]
    assert find_host_lines(main_cfg, "gpu2") == []


def test_remotedl_toml_gets_only_what_it_lacks() -> None:
    from remotedl.init.project import edit_project_text

    text = 'host = "old"  # mine\n\n[dns]\nprovider = "x"\n'
    new, added, differ = edit_project_text(
        text, {"host": "gpu", "remote_dir": "~/remotedl/p", "data": ["data"]}
    )
    assert (
        new
        == 'host = "old"  # mine\n\nremote_dir = "~/remotedl/p"\ndata = ["data"]\n\n[dns]\nprovider = "x"\n'
    )
    assert (added, differ) == (["remote_dir", "data"], ["host"])
    assert edit_project_text(new, {"host": "old", "data": ["data"]}) == (new, [], [])


def test_a_symlinked_config_stays_a_symlink(tmp_path: Path) -> None:
    from remotedl.init.project import write_file

    (tmp_path / "dotfiles").mkdir()
    target = tmp_path / "dotfiles" / "ssh_config"
    target.write_text("Host a\n")
    target.chmod(0o640)
    link = tmp_path / "config"
    link.symlink_to(target)
    write_file(link, "Host a\n\nHost b\n", new_mode=0o600)
    assert link.is_symlink()
    assert target.read_text() == "Host a\n\nHost b\n"
    assert target.stat().st_mode & 0o777 == 0o640
    write_file(tmp_path / "new" / "config", "Host c\n", new_mode=0o600)
    assert (tmp_path / "new" / "config").stat().st_mode & 0o777 == 0o600


def test_data_directories_found(tmp_path: Path) -> None:
    from remotedl.init.project import LARGE_DIR, find_data_dirs

    for d in ("data", "datasets", "src", ".venv", "checkpoints", "images"):
        (tmp_path / d).mkdir()
    with (tmp_path / "images" / "all.tar").open("wb") as f:
        f.truncate(LARGE_DIR + 1)  # large and untracked
    with (tmp_path / "checkpoints" / "last.pt").open("wb") as f:
        f.truncate(LARGE_DIR + 1)  # large, but what jobs write
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    assert [d.path for d in find_data_dirs(tmp_path)] == ["data", "datasets", "images"]


def test_a_data_directory_of_tracked_code_only_is_not_offered(project: Path) -> None:
    """nanoGPT's data/ holds only tracked prepare.py scripts until they run: that is code. Once
    a script wrote its (ignored) train.bin there, data/ is offered."""
    from remotedl.init.project import find_data_dirs

    prepare = project / "data" / "shakespeare_char" / "prepare.py"
    prepare.parent.mkdir(parents=True)
    prepare.write_text("print('download and tokenize')\n")
    (project / ".gitignore").write_text("*.bin\n")
    subprocess.run(["git", "-C", str(project), "add", "."], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "prepare"], check=True)
    assert [d.path for d in find_data_dirs(project)] == []
    (prepare.parent / "train.bin").write_bytes(b"\0" * 100)
    assert [d.path for d in find_data_dirs(project)] == ["data"]


# ------------------------------------------------------------------ a box with password login

PW_USER = "rdl-initpw"
_PW_COMMENT = "remotedl init test user"


@dataclass
class PasswordBox:
    port: int
    user: str
    password_file: Path
    host_key: Path


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # not written yet
        return None


@pytest.fixture(params=["bash", "fish", "zsh"])
def password_box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PasswordBox]:
    """A real sshd on 127.0.0.1 that lets a user of its own in with a password (and, once
    installed, a key in ~/.ssh/authorized_keys as usual), whose login shell is bash, fish or
    zsh. Needs root: it makes that user."""
    shell = shutil.which(request.param)
    if shell is None:
        pytest.skip(f"{request.param} is not installed here (.ci/run installs it)")
    if os.getuid() != 0 or not (have("useradd") or os.path.exists("/usr/sbin/useradd")):
        pytest.skip("needs root (useradd, chpasswd): a user of its own that logs in with a password")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    try:
        found = pwd.getpwnam(PW_USER)
        assert _PW_COMMENT in found.pw_gecos, f"{PW_USER} exists and is not this test's user"
    except KeyError:
        proc.run(["useradd", "--create-home", "--comment", _PW_COMMENT, PW_USER])
        found = pwd.getpwnam(PW_USER)
    proc.run(["usermod", "--shell", shell, PW_USER])
    # Never a leading "-": typed at the terminal through tmux's send-keys, which would take it
    # for an option (token_urlsafe starts with one 1 time in 64: a second password prompt).
    password = "pw" + secrets.token_urlsafe(12)
    proc.run(["chpasswd"], input=f"{PW_USER}:{password}\n")
    shutil.rmtree(Path(found.pw_dir) / ".ssh", ignore_errors=True)  # no key installed yet
    d = tmp_path / "pwbox"
    d.mkdir()
    pw_file = d / "password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    proc.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")])
    port = free_port()
    (d / "sshd_config").write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AllowUsers {PW_USER}
PasswordAuthentication yes
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
UsePAM no
PermitRootLogin no
Subsystem sftp internal-sftp
"""
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc.run([sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")])
    assert retry_until(lambda: port_answers("127.0.0.1", port), seconds=10)
    pid = int(retry_until(lambda: _pid(d / "sshd.pid"), seconds=30) or 0)
    try:
        yield PasswordBox(port, PW_USER, pw_file, d / "host_key.pub")
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except Exception as e:  # a finalizer never raises
            print(f"sshd stop: {e}")


def test_password_box_gets_the_key_with_ssh_copy_id(
    password_box: PasswordBox, laptop: Laptop, project: Path
) -> None:
    if not have("ssh-copy-id"):
        pytest.skip("ssh-copy-id is not installed (openssh-client)")
    askpass = laptop.base / "askpass"
    askpass.write_text(f"#!/bin/sh\ncat {password_box.password_file}\n")
    askpass.chmod(0o700)
    argv = _init_argv("pwbox", laptop, port=password_box.port, user=password_box.user, extra=("--yes",))
    # No terminal and no SSH_ASKPASS: the password cannot be typed; the line to paste instead.
    r = laptop.run(*argv, cwd=project)
    assert r.code == 4, r.out + r.err
    assert "no terminal to type it" in r.out and "mkdir -p ~/.ssh" in r.out
    r = laptop.run(*argv, cwd=project, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
    assert r.code == 0, r.out + r.err
    assert "(ssh-copy-id)" in r.out
    home = Path(pwd.getpwnam(password_box.user).pw_dir)
    assert (laptop.key.parent / "id_box.pub").read_text().split()[1] in (
        home / ".ssh" / "authorized_keys"
    ).read_text()
    # key login now: no password anywhere
    ok = subprocess.run(
        ["ssh", "-F", str(laptop.config), "-o", "BatchMode=yes", "pwbox", "echo", "in"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert ok.stdout.strip() == "in", ok.stderr
    r = laptop.run(*argv, cwd=project)
    assert r.code == 0, r.out + r.err
    assert "lets rdl-initpw in with" in r.out


def test_a_host_key_other_than_the_one_shown_is_not_recorded(fresh_box: Box, laptop: Laptop) -> None:
    # What the user agreed to is the fingerprint shown; a box answering with another key
    # between the question and the recording (a man in the middle) is refused.
    from remotedl.errors import HostKeyError
    from remotedl.ssh import resolve_host
    from remotedl.ssh.hostkeys import trust_host

    laptop.config.write_text(
        f"Host gpu\n  HostName 127.0.0.1\n  Port {fresh_box.info.port}\n" + laptop.config.read_text()
    )
    spec = resolve_host(make_env(laptop.base), "gpu", ssh_config=str(laptop.config))
    with pytest.raises(HostKeyError, match="not the SHA256:shown-to-the-user you agreed to"):
        trust_host(spec, expect="SHA256:shown-to-the-user")
    assert not laptop.known_hosts.exists()


# ------------------------------------------------------------------ at a real terminal


def test_at_a_terminal_it_asks_and_records_the_host_key_only_with_consent(
    fresh_box: Box, tmp_path: Path, project: Path
) -> None:
    from tests.terminal import terminal

    info = fresh_box.info
    config = tmp_path / "new" / "ssh_config"  # a file that does not exist yet
    config.parent.mkdir()
    key = tmp_path / "keys" / "id_box"
    before_root = _root_ssh_files()
    env = dict(make_env(tmp_path / "laptop").environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "exit"
    cmd = (
        f"{sys.executable} -m remotedl --ssh-config {config} init gpu --hostname 127.0.0.1 "
        f"--port {info.port} --user {info.user} --identity {key} --no-passphrase; echo $? > {out}; sleep 60"
    )
    env_cwd = f"cd {project} && {cmd}"
    with terminal(env_cwd, tmp_path / "tmux", env=env, width=160, height=50) as term:
        assert retry_until(lambda: "jump host" in term.screen(), seconds=30), term.screen()
        term.type("", enter=True)
        assert retry_until(lambda: "Add this block" in term.screen(), seconds=30), term.screen()
        term.type("y", enter=True)
        assert retry_until(lambda: "Trust this host key" in term.screen(), seconds=10), term.screen()
        term.type("n", enter=True)
        assert retry_until(lambda: "Write these settings" in term.screen(), seconds=10), term.screen()
        term.type("n", enter=True)
        assert retry_until(lambda: out.exists() and out.read_text().strip(), seconds=60), term.screen()
        screen = term.screen()
    assert out.read_text().strip() == "1", screen
    assert "host key not recorded" in screen
    assert config.is_file() and (config.stat().st_mode & 0o777) == 0o600
    assert config.read_text().startswith("# gpu: a GPU box")
    assert key.is_file()
    assert not (project / "remotedl.toml").exists()
    assert _root_ssh_files() == before_root  # no host key in OpenSSH's own known_hosts


def test_at_a_terminal_a_taken_alias_gets_another_name(box: Box, laptop: Laptop, project: Path) -> None:
    from tests.terminal import terminal

    laptop.config.write_text(f"Include {box.info.ssh_config}\n" + laptop.config.read_text())
    before = laptop.config.read_bytes()
    env = dict(make_env(laptop.base).environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = laptop.base / "exit"
    cmd = (
        f"cd {project} && {sys.executable} -m remotedl --ssh-config {laptop.config} init {box.name} "
        f"--hostname 127.0.0.1 --port 1 --identity {laptop.key}; echo $? > {out}; sleep 60"
    )
    with terminal(cmd, laptop.base / "tmux", env=env, width=160, height=50) as term:
        assert retry_until(lambda: "Another name for this box" in term.screen(), seconds=30), term.screen()
        assert "already in the ssh config" in term.screen()
        term.type("gpu2", enter=True)
        assert retry_until(lambda: "passphrase?" in term.screen(), seconds=30), term.screen()
        term.type("n", enter=True)
        assert retry_until(lambda: out.exists() and out.read_text().strip(), seconds=30), term.screen()
        screen = term.screen()
    # The plan for gpu2 is shown; port 1 answers nothing, so nothing is asked nor changed.
    assert "Host gpu2" in screen
    assert "connection refused by 127.0.0.1:1" in screen
    assert out.read_text().strip() == "4", screen
    assert laptop.config.read_bytes() == before
    assert not laptop.key.exists()


# ------------------------------------------------------------------ through a bastion

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"),
    reason="needs root and iproute2 for a network namespace of the test's own",
)


@needs_netns
def test_a_box_behind_a_jump_host(lab: Lab, tmp_path: Path, project: Path) -> None:  # noqa: F811 (the fixture)
    # The box listens only inside a network namespace; the laptop reaches it through `jump`
    # (already in the ssh config): init records the inner box's host key through the jump.
    cfg = _bastion_config(lab, tmp_path)
    known = tmp_path / "known_hosts"
    cfg.write_text(cfg.read_text() + f"\nHost *\n    UserKnownHostsFile {known}\n")
    laptop = Laptop(tmp_path / "laptop", cfg, known, tmp_path / "keys" / "id_box")
    (laptop.base / "home").mkdir(parents=True)
    argv = [*_init_argv("labgpu", laptop, port=lab.box.port, user=lab.box.user), "--jump", "jump", "--yes"]
    r = laptop.run(*argv, cwd=project)
    assert r.code == 4, r.out + r.err  # a key-only box: the line to paste
    assert "    ProxyJump jump\n" in cfg.read_text()
    assert f"[127.0.0.1]:{lab.box.port} ssh-ed25519" in known.read_text()
    box_pub = (Path(lab.box.directory) / "host_key.pub").read_text().split()[1]
    assert box_pub in known.read_text()  # the box's key, not the jump's
    with (Path(lab.box.directory) / "authorized_keys").open("a") as f:
        f.write((laptop.key.parent / "id_box.pub").read_text())
    r = laptop.run(*argv, cwd=project)
    assert r.code == 0, r.out + r.err
    r = laptop.run("status", "--json", cwd=project)
    assert r.code == 0, r.err
    assert len(json.loads(r.out)["gpus"]) == 1  # the inner box's one GPU


@pytest.mark.parametrize("password_box", ["bash"], indirect=True)
def test_at_a_terminal_the_password_is_typed_once(
    password_box: PasswordBox, laptop: Laptop, project: Path
) -> None:
    # The newcomer's path: an address and a password, typed at ssh's own prompt (no askpass).
    from tests.terminal import terminal

    if not have("ssh-copy-id"):
        pytest.skip("ssh-copy-id is not installed (openssh-client)")
    env = dict(make_env(laptop.base).environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = laptop.base / "exit"
    cmd = (
        f"cd {project} && {sys.executable} -m remotedl --ssh-config {laptop.config} init pwbox "
        f"--hostname 127.0.0.1 --port {password_box.port} --user {password_box.user} "
        f"--identity {laptop.key} --no-passphrase; echo $? > {out}; sleep 60"
    )
    with terminal(cmd, laptop.base / "tmux", env=env, width=160, height=60) as term:
        for prompt, answer in (
            ("jump host", ""),
            ("Add this block", "y"),
            ("Trust this host key", "y"),
            ("Write these settings", "y"),
            ("password:", password_box.password_file.read_text().strip()),
        ):
            assert retry_until(lambda p=prompt: p in term.screen(), seconds=60), term.screen()
            term.type(answer, enter=True)
        assert retry_until(lambda: out.exists() and out.read_text().strip(), seconds=60), term.screen()
        screen = term.screen()
    assert out.read_text().strip() == "0", screen
    assert "(ssh-copy-id)" in screen
    assert "pwbox is ready. Next: remotedl run train.py --gpu 0" in screen
