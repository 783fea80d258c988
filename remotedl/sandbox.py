"""A throwaway box: OpenSSH on 127.0.0.1 as the current user, with a stand-in nvidia-smi.

``remotedl sandbox up`` makes one and registers it as a host (default ``sandbox``): its own
host key and client key, a free port, an ssh config file under the state directory that both
paramiko and OpenSSH read. The box's $HOME, PATH and tmux socket directory are its own
(sshd's SetEnv), so jobs and synced code on it never touch the user's real home.
The test suite's fixtures use this same code.

Boxes as users have them: ``login_shell`` logs in as a system user of the sandbox's own
(``rdl-fish`` ...) whose passwd shell is bash, zsh, fish, dash or tcsh; ``noisy`` gives the box
home start-up files that print to stdout and stderr; ``no_sudo`` logs in as such a plain user
(bash) that sudo refuses. These need root (they create the user); the parts of the box that
user reads and writes (home, bin, gpus.json, authorized_keys, tmux dir) then live in a
directory of their own under /tmp, since the state directory (under root's home) is closed to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from remotedl import proc
from remotedl.env import Environment
from remotedl.errors import RemotedlError, UsageError
from remotedl.ssh import BOXES_DIR
from remotedl.waiting import free_port, pid_runs, port_answers, retry_until
from remotedl.waiting import pid_alive as _alive

STAND_IN_BIN = Path(__file__).parent / "sandbox_bin"

# What the stand-in nvidia-smi reports: two consumer cards, as on a home workstation.
DEFAULT_GPU_MODELS = [
    ("NVIDIA GeForce RTX 3090", 24576, 350, 0),
    ("NVIDIA GeForce RTX 4090", 24564, 450, 30),
    ("NVIDIA RTX A6000", 49140, 300, 0),
    ("NVIDIA A100-SXM4-80GB", 81920, 400, None),
]


LOGIN_SHELLS = ("bash", "zsh", "fish", "dash", "tcsh")

# Every line a noisy box's start-up files print holds this, and names the file it comes from.
NOISE_MARKER = "Welcome to the remotedl sandbox"

# What each login shell reads, in the box home, for a non-interactive `ssh box command`:
# bash (Debian's, built with SSH_SOURCE_BASHRC) ~/.bashrc when started by sshd; zsh ~/.zshenv;
# fish $XDG_CONFIG_HOME/fish/config.fish (~/.config, sshd sets no XDG_CONFIG_HOME); tcsh
# ~/.tcshrc (else ~/.cshrc); dash none (it reads $ENV only when interactive).
STARTUP_FILES: dict[str, str | None] = {
    "bash": ".bashrc",
    "zsh": ".zshenv",
    "fish": ".config/fish/config.fish",
    "tcsh": ".tcshrc",
    "dash": None,
}

_USER_COMMENT = "remotedl sandbox user"


@dataclass
class SandboxInfo:
    name: str
    hostname: str
    port: int
    user: str
    pid: int
    directory: str
    ssh_config: str
    home: str
    gpus: int
    login_shell: str | None = None  # the box user's passwd shell, when it is a user of its own
    noisy: bool = False  # start-up files in the box home print to stdout and stderr
    sudo: bool = True  # False: a plain user whom `sudo -n` refuses ("a password is required")
    tmux_dir: str = ""  # TMUX_TMPDIR on the box

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def sandbox_dir(env: Environment, name: str) -> Path:
    return env.state_dir / BOXES_DIR / name


def fake_gpus(count: int) -> dict[str, object]:
    gpus = []
    for i in range(count):
        name, total, power_limit, fan = DEFAULT_GPU_MODELS[i % len(DEFAULT_GPU_MODELS)]
        gpus.append(
            {
                "index": i,
                "name": name,
                "uuid": "GPU-"
                + hashlib.md5(f"gpu{i}".encode(), usedforsecurity=False).hexdigest()[:8]
                + "-0d75-a3be-480e-a1137c9caee"
                + str(i),
                "bus_id": f"00000000:{(i + 1) * 16:02X}:00.0",
                "memory_used": 1,
                "memory_total": total,
                "utilization": 0,
                "temperature": 30 + i,
                "power_draw": None if fan is None else 20.5 + i,
                "power_limit": power_limit,
                "fan_speed": fan,
            }
        )
    return {"driver_version": "550.54.14", "cuda_version": "12.4", "gpus": gpus, "processes": []}


def _tmux_dir(directory: Path) -> Path:
    # tmux sockets live in a path of at most ~100 bytes: keep it short and unique per sandbox.
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return Path(f"/tmp/remotedl-box-{os.getuid()}-{digest}")


def _user_dir(directory: Path) -> Path:
    # A box of a user of its own: what that user reads and writes, where it can reach it.
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return Path(f"/tmp/remotedl-user-{digest}")


def _tmux_socket(tmux_dir: Path, uid: int) -> Path:
    return tmux_dir / f"tmux-{uid}" / "default"


def _read_info(directory: Path) -> SandboxInfo | None:
    try:
        return SandboxInfo(**json.loads((directory / "sandbox.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running(env: Environment) -> list[SandboxInfo]:
    """Every sandbox box of this state directory that is up."""
    root = env.state_dir / BOXES_DIR
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [info for info in (status(env, n) for n in names) if info is not None]


def status(env: Environment, name: str = "sandbox") -> SandboxInfo | None:
    info = _read_info(sandbox_dir(env, name))
    if info is None or not _sshd_alive(info):
        return None
    return info


def _sshd_alive(info: SandboxInfo) -> bool:
    """The box's sshd runs: the pid is that sshd's (its command line names the box's
    sshd_config), not a program the kernel gave the pid of an sshd that died unseen (a reboot)."""
    return pid_runs(info.pid, str(Path(info.directory) / "sshd_config").encode())


def _path_without_nvidia(path: str, shadow_root: Path) -> str:
    """PATH with nvidia-smi hidden: a directory holding it is replaced by a shadow directory
    linking everything else, so a GPU host can play a box without an NVIDIA driver."""
    out = []
    for i, d in enumerate(path.split(":")):
        if d and os.path.exists(os.path.join(d, "nvidia-smi")):
            shadow = shadow_root / f"path{i}"
            shadow.mkdir(parents=True, exist_ok=True)
            for entry in os.listdir(d):
                if entry != "nvidia-smi" and not (shadow / entry).exists():
                    (shadow / entry).symlink_to(os.path.join(d, entry))
            out.append(str(shadow))
        else:
            out.append(d)
    return ":".join(out)


def _users_lock_path() -> Path:
    base = Path("/run/lock") if Path("/run/lock").is_dir() else Path(tempfile.gettempdir())
    return base / "remotedl-sandbox-users.lock"


@contextlib.contextmanager
def _users_lock() -> Iterator[None]:
    """One sandbox at a time checks and creates its user, so parallel test runs do not race."""
    fd = os.open(_users_lock_path(), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _system_tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None
    )
    if found is None:
        raise RemotedlError(f"{name} is not installed on this machine", hint="install the passwd package")
    return found


def ensure_user(shell: str) -> pwd.struct_passwd:
    """The system user ``rdl-SHELL`` (created once, idempotently): passwd shell ``shell``, a
    home of its own, not in sudoers, a password field that sshd (without PAM) accepts as not
    locked and that no password matches."""
    shell_path = shutil.which(shell)
    if shell_path is None:
        raise UsageError(
            f"{shell} is not installed on this machine", hint=f"install it: `sudo apt-get install {shell}`"
        )
    user = f"rdl-{shell}"
    with _users_lock():
        try:
            found = pwd.getpwnam(user)
        except KeyError:
            proc.run(
                [
                    _system_tool("useradd"),
                    "--create-home",
                    "--user-group",
                    "--shell",
                    shell_path,
                    "--comment",
                    _USER_COMMENT,
                    "--password",
                    "*",  # "!" would mean locked: sshd without PAM refuses locked accounts
                    user,
                ]
            )
            return pwd.getpwnam(user)
        if _USER_COMMENT not in found.pw_gecos:
            raise UsageError(
                f"a user {user} exists on this machine and is not a remotedl sandbox user",
                hint="remove or rename that user, or leave out --shell/--no-sudo",
            )
        # Ours: make sure it is still as a sandbox needs it (cheap, and idempotent).
        proc.run([_system_tool("usermod"), "--shell", shell_path, "--password", "*", user])
        return pwd.getpwnam(user)


def _noise(file: str) -> str:
    """Start-up file lines that print to stdout and stderr, as users' files do (a greeting, and a
    terminal title escape with no newline), in syntax every one of the shells reads."""
    line = f"{NOISE_MARKER} (~/{file})"
    # csh has no >&2: /dev/stderr does for it what >&2 does for the others.
    to_stderr = "> /dev/stderr" if file in (".tcshrc", ".cshrc", ".login") else ">&2"
    return f"echo '{line}'\necho '{line} on stderr' {to_stderr}\nprintf '\\033]0;sandbox\\007'\n"


def _write_noise(home: Path) -> None:
    # Every shell's files, whatever the login shell: users keep a .bashrc under zsh too, and a
    # `bash -c` or login shell started on the box must not leak noise either.
    for file in (*[f for f in STARTUP_FILES.values() if f], ".profile", ".zprofile", ".login"):
        path = home / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# a noisy start-up file: remotedl must cope\n{_noise(file)}")


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in (*dirs, *files):
            os.chown(os.path.join(root, n), uid, gid, follow_symlinks=False)


# The variables the box sets itself; extra_env may not replace them.
_BOX_ENV = ("HOME", "PATH", "TMUX_TMPDIR", "LANG")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _set_env_words(extra_env: Mapping[str, str]) -> str:
    """``extra_env`` as words of sshd's SetEnv line, each one double-quoted."""
    words = []
    for key, value in extra_env.items():
        if not _ENV_NAME.fullmatch(key) or key in _BOX_ENV:
            raise UsageError(f"sandbox environment variable '{key}' is not allowed")
        # Kept out rather than escaped: OpenSSH versions differ in escapes inside sshd_config quotes.
        if any(c in value for c in '"\\') or not value.isprintable():
            raise UsageError(f"sandbox environment variable '{key}': no quotes or control characters")
        words.append(f'"{key}={value}"')
    return "".join(f" {w}" for w in words)


def up(
    env: Environment,
    *,
    name: str = "sandbox",
    gpus: int = 2,
    host_gpus: bool = False,
    login_shell: str | None = None,
    noisy: bool = False,
    no_sudo: bool = False,
    extra_env: Mapping[str, str] | None = None,
    address: str = "127.0.0.1",
    netns: str | None = None,
) -> SandboxInfo:
    """Start (or find running) the sandbox box called ``name``: ``gpus`` stand-in GPUs, or
    none (no driver at all), or with ``host_gpus`` this machine's real nvidia-smi.

    ``login_shell`` (bash, zsh, fish, dash, tcsh): log in as the system user ``rdl-SHELL``
    whose passwd shell that is; None: as the current user. ``noisy``: the box home's start-up
    files (.bashrc, .zshenv, config.fish, .tcshrc, ...) print to stdout and stderr.
    ``no_sudo``: a box user that may not sudo (``rdl-bash`` unless ``login_shell`` says
    otherwise); a ``login_shell`` user never may. A user of its own needs root.
    ``extra_env`` is set in every session on the box (e.g. ``SLURM_CONF`` for a test cluster);
    a box already running keeps the environment it was started with. ``netns`` starts its sshd
    (and so every session and job) in that network namespace (made by the caller, e.g. the
    multi-node tests), listening on ``address`` there instead of 127.0.0.1."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"sandbox name '{name}' may only hold letters, digits, - and _")
    if login_shell is not None and login_shell not in LOGIN_SHELLS:
        raise UsageError(f"login shell '{login_shell}' is not one of {', '.join(LOGIN_SHELLS)}")
    set_env_extra = _set_env_words(extra_env or {})
    own_user = login_shell is not None or no_sudo
    running = status(env, name)
    if running is not None:
        wanted = (login_shell or ("bash" if no_sudo else None), noisy, not own_user)
        if (running.login_shell, running.noisy, running.sudo) != wanted:
            raise UsageError(
                f"sandbox '{name}' is already up, with other login shell, noise or sudo settings",
                hint=f"stop it first: `remotedl sandbox down --name {name}`",
            )
        return running
    if own_user and os.getuid() != 0:
        raise UsageError(
            "a sandbox with --shell or --no-sudo needs root: it logs in as a system user of its "
            f"own (rdl-{login_shell or 'bash'}), which only root can create",
            hint="run it as root (CI does), or leave out --shell and --no-sudo",
        )
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        raise RemotedlError(
            "sshd is not installed on this machine",
            hint="install it: `sudo apt-get install openssh-server` (it need not run as a service)",
        )
    account = ensure_user(login_shell or "bash") if own_user else None
    directory = sandbox_dir(env, name)
    user_dir = _user_dir(directory)
    if directory.exists():
        shutil.rmtree(directory)  # a stale sandbox whose sshd is gone: ours to remove
    if user_dir.is_dir() and not user_dir.is_symlink():
        shutil.rmtree(user_dir)
    directory.mkdir(parents=True, mode=0o700)
    if account is not None:
        # Root's, readable by all (it holds no secret); home and tmux dir the box user's own.
        user_dir.mkdir(mode=0o755)
        user_dir.chmod(0o755)  # whatever the umask
        box_root, tmux_dir = user_dir, user_dir / "tmux"
    else:
        box_root, tmux_dir = directory, _tmux_dir(directory)
    home, bin_dir = box_root / "home", box_root / "bin"
    home.mkdir(mode=0o700)
    bin_dir.mkdir(mode=0o755)
    tmux_dir.mkdir(mode=0o700, exist_ok=True)

    for role, key in (("host", "host_key"), ("client", "id_ed25519")):
        proc.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"remotedl-{name}-{role}",
                "-f",
                directory / key,
            ]
        )
    # sshd reads authorized_keys as the user logging in: it must be where that user can read it.
    authorized_keys = box_root / "authorized_keys"
    shutil.copy(directory / "id_ed25519.pub", authorized_keys)
    authorized_keys.chmod(0o644)
    if gpus > 0 and not host_gpus:
        (bin_dir / "nvidia-smi").write_text(_stand_in_nvidia_smi())
        (bin_dir / "nvidia-smi").chmod(0o755)
        (box_root / "gpus.json").write_text(json.dumps(fake_gpus(gpus), indent=2))
        (box_root / "gpus.json").chmod(0o644)
    if noisy:
        _write_noise(home)
    if account is not None:
        _chown_tree(home, account.pw_uid, account.pw_gid)
        os.chown(tmux_dir, account.pw_uid, account.pw_gid)

    user = account.pw_name if account is not None else getpass.getuser()
    port = free_port()
    inherited = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    if not host_gpus:
        inherited = _path_without_nvidia(inherited, box_root / "shadow")
    path = f"{bin_dir}:{inherited}"
    (directory / "sshd_config").write_text(
        f"""# remotedl sandbox '{name}': a throwaway box on loopback
Port {port}
ListenAddress {address}
HostKey {directory}/host_key
PidFile {directory}/sshd.pid
AuthorizedKeysFile {authorized_keys}
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# The key files live in the state directory, not ~/.ssh: sshd's home-directory checks do not apply.
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
MaxSessions 50
MaxStartups 50:30:100
ClientAliveInterval 15
SetEnv HOME={home} PATH={path} TMUX_TMPDIR={tmux_dir} LANG=C.UTF-8{set_env_extra}
Subsystem sftp internal-sftp
"""
    )
    if os.getuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    in_ns = ["ip", "netns", "exec", netns] if netns else []
    argv: list[str | Path] = [*in_ns, sshd, "-f", directory / "sshd_config", "-E", directory / "sshd.log"]
    result = proc.run(argv, check=False)
    if result.returncode != 0:
        raise RemotedlError(f"sshd did not start: {(result.stderr or '').strip()}")
    if not retry_until(lambda: port_answers(address, port), seconds=10):
        raise RemotedlError(f"sshd did not start listening on {address}:{port}; see {directory}/sshd.log")
    pid = int(retry_until(lambda: _read_pid(directory), seconds=5) or 0)

    host_pub = (directory / "host_key.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[{address}]:{port} {host_pub[0]} {host_pub[1]}\n")
    (directory / "ssh_config").write_text(
        f"""# remotedl sandbox '{name}'. To use it with plain ssh: ssh -F {directory}/ssh_config {name}
Host {name}
    HostName {address}
    Port {port}
    User {user}
    IdentityFile {directory}/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile {directory}/known_hosts
    StrictHostKeyChecking yes
    ServerAliveInterval 15
"""
    )
    info = SandboxInfo(
        name,
        address,
        port,
        user,
        pid,
        str(directory),
        str(directory / "ssh_config"),
        str(home),
        gpus,
        login_shell=(login_shell or "bash") if account is not None else None,
        noisy=noisy,
        sudo=account is None,
        tmux_dir=str(tmux_dir),
    )
    (directory / "sandbox.json").write_text(json.dumps(info.to_dict(), indent=2))
    return info


def _read_pid(directory: Path) -> int | None:
    try:
        return int((directory / "sshd.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def down(env: Environment, *, name: str = "sandbox") -> bool:
    """Stop the sandbox and remove everything it made. False if there was none."""
    directory = sandbox_dir(env, name)
    info = _read_info(directory)
    if info is None and not directory.exists():
        return False
    if (directory / "ssh_config").exists():
        from remotedl.ssh import close_master, resolve_host

        close_master(resolve_host(env, name, ssh_config=str(directory / "ssh_config")))
    tmux_dir, user_dir = _tmux_dir(directory), _user_dir(directory)
    if info is not None:
        _end_jobs(Path(info.home))
        _end_residents(Path(info.home))
    if shutil.which("tmux"):
        # This box's tmux server only (its own socket), never anything else of that user's.
        proc.run(["tmux", "kill-server"], env={**os.environ, "TMUX_TMPDIR": str(tmux_dir)}, check=False)
        if info is not None and info.login_shell is not None:
            with contextlib.suppress(KeyError):
                socket = _tmux_socket(user_dir / "tmux", pwd.getpwnam(info.user).pw_uid)
                if socket.exists():  # root may talk to any user's tmux server
                    proc.run(["tmux", "-S", socket, "kill-server"], check=False)
    if info is not None and _sshd_alive(info):
        os.kill(info.pid, signal.SIGTERM)
        retry_until(lambda: not _alive(info.pid), seconds=5)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(tmux_dir, ignore_errors=True)
    if user_dir.is_dir() and not user_dir.is_symlink():
        shutil.rmtree(user_dir, ignore_errors=True)
    return True


def _end_jobs(home: Path) -> None:
    """Ends the jobs still running on the box (a job outlives its tmux server, and its runner
    would write its record into the removed home): the job's process group and its runner,
    by the pids in the box's records, each checked to be that box's (its environment names the
    box home as HOME), then waits until they are gone."""
    records = home / ".remotedl" / "jobs"
    targets: list[tuple[int, bool]] = []  # (pid, a process group)
    for path in records.glob("*.json") if records.is_dir() else ():
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or rec.get("status") not in ("queued", "starting", "running"):
            continue
        for key, group in (("pgid", True), ("runner_pid", False)):
            pid = rec.get(key)
            if isinstance(pid, int) and pid > 1 and _home_of(pid) == str(home):
                targets.append((pid, group))
    for pid, group in targets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    retry_until(lambda: not any(_alive(pid) for pid, _ in targets), seconds=5)


def _stand_in_nvidia_smi() -> str:
    """The stand-in, run by the system's python3 where there is one: ``env python3`` may find a
    version manager's shim first (pyenv's costs ~80 ms a call), which no real nvidia-smi does,
    and ``status`` calls it twice."""
    text = (STAND_IN_BIN / "nvidia-smi").read_text()
    if os.access("/usr/bin/python3", os.X_OK) and text.startswith("#!/usr/bin/env python3\n"):
        text = "#!/usr/bin/python3\n" + text.split("\n", 1)[1]
    return text


def resident_pids(home: Path) -> list[int]:
    """The box's resident agents (``remotedl.agent.resident``): processes started from this
    box's agent directory with ``--serve`` (each request's fork too)."""
    agents = os.fsencode(str(home / ".remotedl" / "agent")) + b"/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--serve" in argv and any(a.startswith(agents) for a in argv):
            found.append(int(entry.name))
    return found


def _end_residents(home: Path) -> None:
    """Ends the box's resident agents (each would end by itself once its agent directory is
    gone, seconds later)."""
    found = resident_pids(home)
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    retry_until(lambda: not any(_alive(pid) for pid in found), seconds=5)


def _home_of(pid: int) -> str | None:
    """HOME in a process's environment (None when it cannot be read)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"HOME="):
            return entry[5:].decode(errors="replace")
    return None
