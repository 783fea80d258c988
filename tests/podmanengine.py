"""A real Podman for the container tests, rootful and private to the test: its own storage
(vfs: no kernel overlay) and run root, cgroupfs (no systemd), events to a file, no network of
its own (``netns = "none"``: no bridge, no firewall rules on the machine), all under a
temporary directory and given to the box's sessions by ``CONTAINERS_CONF`` and
``CONTAINERS_STORAGE_CONF`` (as dockerd's socket is by ``DOCKER_HOST``). The test image is the
Docker tests' root file system (tests/dockerengine.py) made with ``podman import``. No registry
is ever reached.

Its containers' rlimits are at most this machine's hard limits: rootful Podman asks for more by
default (nofile 1048576 where the hard limit may be lower; nproc above the 32768 its own conmon
runs with), which a machine without CAP_SYS_RESOURCE (a container, this sandbox) refuses.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.dockerengine import IMAGE, _rootfs_tar, stand_in_devices

DEBIAN_PACKAGES = "podman catatonit busybox-static"


class PodmanUnavailable(Exception):
    pass


@dataclass
class Podman:
    directory: Path
    env: dict[str, str]  # CONTAINERS_CONF, CONTAINERS_STORAGE_CONF
    dev_dir: Path  # the stand-in GPUs' device nodes (nvidia0, nvidia1)

    def podman(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["podman", *args], env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    # The Docker tests' name for the engine's CLI.
    docker = podman


def _ulimits() -> list[str]:
    out = []
    limits = (("nofile", resource.RLIMIT_NOFILE, 1048576), ("nproc", resource.RLIMIT_NPROC, 32768))
    for name, which, most in limits:
        hard = resource.getrlimit(which)[1]
        n = most if hard == resource.RLIM_INFINITY else min(hard, most)
        out.append(f'"{name}={n}:{n}"')
    return out


def start(gpus: int = 2) -> Podman:
    if os.geteuid() != 0:
        raise PodmanUnavailable("needs root: rootful Podman and mknod (the stand-in GPU devices)")
    if shutil.which("podman") is None:
        raise PodmanUnavailable(f"Podman is not installed (apt-get install {DEBIAN_PACKAGES})")
    directory = Path(tempfile.mkdtemp(prefix="rdl-pm-", dir="/tmp"))
    d = str(directory)
    (directory / "containers.conf").write_text(
        "[containers]\n"
        'netns = "none"\n'
        f"default_ulimits = [{', '.join(_ulimits())}]\n"
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        f'events_logfile_path = "{d}/events.log"\n'
        f'tmp_dir = "{d}/tmp"\n'
        f'static_dir = "{d}/root/libpod"\n'
        f'volume_path = "{d}/root/volumes"\n'
        "[network]\n"
        f'network_config_dir = "{d}/net"\n'
    )
    (directory / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{d}/root"\nrunroot = "{d}/run"\n'
    )
    env = {
        "CONTAINERS_CONF": f"{d}/containers.conf",
        "CONTAINERS_STORAGE_CONF": f"{d}/storage.conf",
    }
    engine = Podman(directory, env, directory / "dev")
    try:
        r = subprocess.run(
            ["podman", "import", "-", IMAGE],
            input=_rootfs_tar(),
            env={**os.environ, **env},
            capture_output=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise PodmanUnavailable(f"podman import: {r.stderr.decode(errors='replace').strip()}")
        # Where Podman cannot run containers (no catatonit for --init, a kernel that refuses),
        # say why once, here.
        tried = engine.podman("run", "--rm", "--init", IMAGE, "true", check=False)
        if tried.returncode != 0:
            raise PodmanUnavailable(f"podman run: {tried.stderr.strip()} (apt-get install {DEBIAN_PACKAGES})")
        stand_in_devices(engine.dev_dir, gpus)
    except BaseException:
        stop(engine)
        raise
    return engine


def stop(engine: Podman) -> None:
    """Its containers (and their conmon monitors), what they left mounted, then its directory."""
    if shutil.which("podman"):
        engine.podman("rm", "--force", "--all", "--time", "0", check=False, timeout=120)
    try:
        with open("/proc/mounts") as f:
            points = [line.split()[1] for line in f]
    except OSError:
        points = []
    inside = [p for p in points if p.startswith(f"{engine.directory}/")]
    for point in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    shutil.rmtree(engine.directory, ignore_errors=True)


def rootless(engine: Podman, uid: int, gid: int) -> dict[str, str]:
    """Rootless Podman for the box user ``uid``: its own settings, storage and run directory
    (``XDG_RUNTIME_DIR``) in a directory it owns under the engine's, and the test image imported
    there as that user. What its sessions need in their environment is returned."""
    _give_subids(uid)
    d = engine.directory / f"user-{uid}"
    for sub in ("", "home", "run", "tmp", "storage"):
        (d / sub).mkdir(mode=0o700, exist_ok=True)
        os.chown(d / sub, uid, gid)
    engine.directory.chmod(0o711)
    (d / "containers.conf").write_text(
        '[containers]\nnetns = "none"\n'
        '[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{d}/events.log"\ntmp_dir = "{d}/tmp"\n'
    )
    (d / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\nrootless_storage_path = "{d}/storage"\n')
    for f in ("containers.conf", "storage.conf"):
        (d / f).chmod(0o644)
    env = {
        "CONTAINERS_CONF": f"{d}/containers.conf",
        "CONTAINERS_STORAGE_CONF": f"{d}/storage.conf",
        "XDG_RUNTIME_DIR": f"{d}/run",
    }
    r = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "podman", "import", "-", IMAGE],
        input=_rootfs_tar(),
        env={**os.environ, **env, "HOME": f"{d}/home"},
        capture_output=True,
        timeout=120,
        cwd=d,
    )
    if r.returncode != 0:
        raise PodmanUnavailable(f"rootless podman import: {r.stderr.decode(errors='replace').strip()}")
    return env


def _give_subids(uid: int) -> None:
    """Subordinate uid and gid ranges for the (sandbox's own) user, where useradd gave none: as
    `remotedl setup docker --var engine=podman` gives them on a box, after every range given."""
    import pwd

    name = pwd.getpwuid(uid).pw_name
    for path, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        try:
            lines = Path(path).read_text().splitlines()
        except FileNotFoundError:
            lines = []
        rows = [ln.split(":") for ln in lines if ln.count(":") == 2]
        if any(r[0] in (name, str(uid)) for r in rows):
            continue
        start = max([100000, *(int(r[1]) + int(r[2]) for r in rows if r[1].isdigit() and r[2].isdigit())])
        subprocess.run(["usermod", flag, f"{start}-{start + 65535}", name], check=True, capture_output=True)


def stop_rootless(engine: Podman, uid: int, gid: int, env: dict[str, str]) -> None:
    """The user's containers, and the pause process rootless Podman keeps its user namespace in."""
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    subprocess.run(
        [*as_user, "podman", "rm", "-f", "--all", "-t", "0"],
        env={**os.environ, **env, "HOME": f"{engine.directory}/user-{uid}/home"},
        capture_output=True,
        timeout=120,
        check=False,
    )
    d = engine.directory / f"user-{uid}"
    for pause in (d / "tmp" / "pause.pid", d / "run" / "libpod" / "tmp" / "pause.pid"):
        try:
            pid = int(pause.read_text().strip())
            status = Path(f"/proc/{pid}/status").read_text()
        except (OSError, ValueError):
            continue
        # Still the user's: the file is read while the process it names runs on.
        uids = [ln.split()[1:2] for ln in status.splitlines() if ln.startswith("Uid:")]
        if pid > 1 and uids == [[str(uid)]]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
