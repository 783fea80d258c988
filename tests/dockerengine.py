"""A real Docker engine for the container tests: Debian's ``dockerd`` started on its own unix
socket, data root and exec root under a temporary directory (``--storage-driver=vfs
--iptables=false --bridge=none``: no kernel overlay, no firewall, no network of its own), and a
test image made locally with ``docker import`` from a root file system of a static busybox and
a stand-in ``nvidia-smi``. No registry is ever reached.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import stat
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remotedl.waiting import retry_until

IMAGE = "rdl-test:1"
DEBIAN_PACKAGES = "docker.io busybox-static"
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "echo", "id", "sleep", "env", "test", "[", "printf", "sed", "grep", "touch",
    "mkdir", "rm", "stat", "tr", "wc", "true", "false", "head", "tail", "basename", "dirname",
)  # fmt: skip

# The stand-in nvidia-smi inside the test image: the GPUs are the /dev/nvidiaN nodes it sees.
NVIDIA_SMI = """#!/bin/sh
n=0
for d in /dev/nvidia[0-9]*; do
  [ -e "$d" ] || continue
  echo "GPU $n: Stand-in GPU (${d#/dev/})"
  n=$((n + 1))
done
[ "$n" -gt 0 ] || { echo "No devices were found"; exit 6; }
"""


class DockerUnavailable(Exception):
    pass


@dataclass
class Engine:
    directory: Path
    host: str  # DOCKER_HOST: unix://.../docker.sock
    pid: int
    dev_dir: Path  # the stand-in GPUs' device nodes (nvidia0, nvidia1)

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DOCKER_HOST": self.host}
        r = subprocess.run(["docker", *args], env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r


def _rootfs_tar() -> bytes:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise DockerUnavailable("busybox is not installed (apt-get install busybox-static)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))

        for d in ("bin", "usr", "usr/bin", "etc", "dev", "proc", "sys"):
            add_dir(d)
        add_dir("tmp", 0o1777)
        add_file("bin/busybox", Path(busybox).read_bytes())
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        add_file("usr/bin/nvidia-smi", NVIDIA_SMI.encode())
        # As on merged-/usr systems: a Python mounted from the host (the Jupyter test) finds
        # its loader and libraries.
        for link, target in (("lib", "usr/lib"), ("lib64", "usr/lib64")):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        add_file("etc/rdl-test-image", b"the test image\n", 0o644)  # tells it from the host
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    return buf.getvalue()


def stand_in_devices(dev_dir: Path, gpus: int) -> None:
    """The stand-in GPUs' device nodes (``nvidia0``.., ``nvidiactl``) in a new ``dev_dir``."""
    dev_dir.mkdir()
    for i in range(gpus):  # /dev/null's and /dev/zero's numbers: harmless to open
        major, minor = ((1, 3), (1, 5))[i % 2]
        os.mknod(dev_dir / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    os.mknod(dev_dir / "nvidiactl", 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def start(gpus: int = 2) -> Engine:
    if os.geteuid() != 0:
        raise DockerUnavailable("needs root: dockerd and mknod (the stand-in GPU devices)")
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/sbin")
    if dockerd is None or shutil.which("docker") is None:
        raise DockerUnavailable(f"Docker is not installed (apt-get install {DEBIAN_PACKAGES})")
    # Short: a unix socket's path has at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="rdl-dk-", dir="/tmp"))
    sock = directory / "docker.sock"
    log = open(directory / "dockerd.log", "wb")  # noqa: SIM115 - the daemon's, while it runs
    proc = subprocess.Popen(
        [
            dockerd, "--storage-driver=vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
            "--data-root", str(directory / "data"), "--exec-root", str(directory / "exec"),
            "--pidfile", str(directory / "dockerd.pid"), "--host", f"unix://{sock}",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    log.close()
    engine = Engine(directory, f"unix://{sock}", proc.pid, directory / "dev")

    def answers() -> bool:
        if proc.poll() is not None:
            return True
        return engine.docker("version", check=False, timeout=10).returncode == 0

    retry_until(answers, seconds=60, interval=0.2)
    if proc.poll() is not None or engine.docker("version", check=False).returncode != 0:
        text = (directory / "dockerd.log").read_text(errors="replace")[-2000:]
        stop(engine)
        raise DockerUnavailable(f"dockerd did not start: {text}")
    try:
        r = subprocess.run(
            ["docker", "import", "-", IMAGE],
            input=_rootfs_tar(),
            env={**os.environ, "DOCKER_HOST": engine.host},
            capture_output=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise DockerUnavailable(f"docker import: {r.stderr.decode(errors='replace').strip()}")
        stand_in_devices(engine.dev_dir, gpus)
    except BaseException:
        stop(engine)
        raise
    return engine


def stop(engine: Engine) -> None:
    """The daemon (its containers with it), then its directory."""
    subprocess.run(
        ["docker", "rm", "-f", *engine.docker("ps", "-aq", check=False).stdout.split()],
        env={**os.environ, "DOCKER_HOST": engine.host},
        capture_output=True,
        check=False,
    )
    try:
        os.kill(engine.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass

    def gone() -> bool:
        try:
            os.kill(engine.pid, 0)
        except ProcessLookupError:
            return True
        return bool(os.waitpid(engine.pid, os.WNOHANG)[0])  # our child: reaped once it exits

    retry_until(gone, seconds=30)
    # What the daemon left mounted under its directory (its netns/default nsfs mount), deepest
    # first; then the directory.
    try:
        with open("/proc/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        points = []
    inside = [p for p in points if p.startswith(f"{engine.directory}/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(engine.directory, ignore_errors=True)
