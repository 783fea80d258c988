"""A throwaway box: OpenSSH on 127.0.0.1 as the current user, with a stand-in nvidia-smi.

``remotedl sandbox up`` makes one and registers it as a host (default ``sandbox``): its own
host key and client key, a free port, an ssh config file under the state directory that both
paramiko and OpenSSH read. The box's $HOME, PATH and tmux socket directory are its own
(sshd's SetEnv), so jobs and synced code on it never touch the user's real home.
The test suite's fixtures use this same code.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

from remotedl import proc
from remotedl.env import Environment
from remotedl.errors import RemotedlError, UsageError
from remotedl.ssh import BOXES_DIR
from remotedl.waiting import free_port, port_answers, retry_until
from remotedl.waiting import pid_alive as _alive

STAND_IN_BIN = Path(__file__).parent / "sandbox_bin"

# What the stand-in nvidia-smi reports: two consumer cards, as on a home workstation.
DEFAULT_GPU_MODELS = [
    ("NVIDIA GeForce RTX 3090", 24576, 350, 0),
    ("NVIDIA GeForce RTX 4090", 24564, 450, 30),
    ("NVIDIA RTX A6000", 49140, 300, 0),
    ("NVIDIA A100-SXM4-80GB", 81920, 400, None),
]


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


def _read_info(directory: Path) -> SandboxInfo | None:
    try:
        return SandboxInfo(**json.loads((directory / "sandbox.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def status(env: Environment, name: str = "sandbox") -> SandboxInfo | None:
    info = _read_info(sandbox_dir(env, name))
    if info is None or not _alive(info.pid):
        return None
    return info


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


def up(env: Environment, *, name: str = "sandbox", gpus: int = 2, host_gpus: bool = False) -> SandboxInfo:
    """Start (or find running) the sandbox box called ``name``: ``gpus`` stand-in GPUs, or
    none (no driver at all), or with ``host_gpus`` this machine's real nvidia-smi."""
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"sandbox name '{name}' may only hold letters, digits, - and _")
    running = status(env, name)
    if running is not None:
        return running
    sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
    if sshd is None:
        raise RemotedlError(
            "sshd is not installed on this machine",
            hint="install it: `sudo apt-get install openssh-server` (it need not run as a service)",
        )
    directory = sandbox_dir(env, name)
    if directory.exists():
        shutil.rmtree(directory)  # a stale sandbox whose sshd is gone: ours to remove
    directory.mkdir(parents=True, mode=0o700)
    home, bin_dir, tmux_dir = directory / "home", directory / "bin", _tmux_dir(directory)
    home.mkdir(mode=0o700)
    bin_dir.mkdir()
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
    shutil.copy(directory / "id_ed25519.pub", directory / "authorized_keys")
    if gpus > 0 and not host_gpus:
        shutil.copy(STAND_IN_BIN / "nvidia-smi", bin_dir / "nvidia-smi")
        (bin_dir / "nvidia-smi").chmod(0o755)
        (directory / "gpus.json").write_text(json.dumps(fake_gpus(gpus), indent=2))

    user = getpass.getuser()
    port = free_port()
    inherited = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    if not host_gpus:
        inherited = _path_without_nvidia(inherited, directory / "shadow")
    path = f"{bin_dir}:{inherited}"
    (directory / "sshd_config").write_text(
        f"""# remotedl sandbox '{name}': a throwaway box on loopback
Port {port}
ListenAddress 127.0.0.1
HostKey {directory}/host_key
PidFile {directory}/sshd.pid
AuthorizedKeysFile {directory}/authorized_keys
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
SetEnv HOME={home} PATH={path} TMUX_TMPDIR={tmux_dir} LANG=C.UTF-8
Subsystem sftp internal-sftp
"""
    )
    if os.getuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    result = proc.run([sshd, "-f", directory / "sshd_config", "-E", directory / "sshd.log"], check=False)
    if result.returncode != 0:
        raise RemotedlError(f"sshd did not start: {(result.stderr or '').strip()}")
    if not retry_until(lambda: port_answers("127.0.0.1", port), seconds=10):
        raise RemotedlError(f"sshd did not start listening on 127.0.0.1:{port}; see {directory}/sshd.log")
    pid = int(retry_until(lambda: _read_pid(directory), seconds=5) or 0)

    host_pub = (directory / "host_key.pub").read_text().split()
    (directory / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (directory / "ssh_config").write_text(
        f"""# remotedl sandbox '{name}'. To use it with plain ssh: ssh -F {directory}/ssh_config {name}
Host {name}
    HostName 127.0.0.1
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
        name, "127.0.0.1", port, user, pid, str(directory), str(directory / "ssh_config"), str(home), gpus
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
    tmux_dir = _tmux_dir(directory)
    if shutil.which("tmux"):
        proc.run(["tmux", "kill-server"], env={**os.environ, "TMUX_TMPDIR": str(tmux_dir)}, check=False)
    if info is not None and _alive(info.pid):
        os.kill(info.pid, signal.SIGTERM)
        retry_until(lambda: not _alive(info.pid), seconds=5)
    shutil.rmtree(directory, ignore_errors=True)
    shutil.rmtree(tmux_dir, ignore_errors=True)
    return True
