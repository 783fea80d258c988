"""Fixtures: a real OpenSSH box on loopback (the sandbox code itself), the CLI run in-process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from remotedl import sandbox
from remotedl.cli import main
from remotedl.env import Environment
from remotedl.sandbox import SandboxInfo
from remotedl.waiting import retry_until
from tests import dockerengine, slurmcluster
from tests.slurmcluster import SlurmCluster

__all__ = ["retry_until"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@dataclass
class Box:
    """A sandbox box plus the environment that knows it."""

    info: SandboxInfo
    env_vars: dict[str, str]

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def home(self) -> Path:
        return Path(self.info.home)

    @property
    def dir(self) -> Path:
        return Path(self.info.directory)

    def sh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell script as the box's user would (box user, HOME, PATH, TMUX_TMPDIR), with
        sh, not the login shell: a helper for setting up and inspecting, not under test."""
        env = {**os.environ, "HOME": self.info.home, "TMUX_TMPDIR": tmux_dir(self)}
        env["PATH"] = f"{Path(self.info.home).parent}/bin:{env['PATH']}"
        as_user: dict[str, Any] = {}
        if self.info.user != pwd.getpwuid(os.getuid()).pw_name:
            account = pwd.getpwnam(self.info.user)
            as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            env.update(USER=account.pw_name, LOGNAME=account.pw_name)
        return subprocess.run(
            ["sh", "-c", script],
            env=env,
            check=check,
            capture_output=True,
            text=True,
            cwd=self.info.home,
            **as_user,
        )


def tmux_dir(box: Box) -> str:
    return box.info.tmux_dir or str(sandbox._tmux_dir(box.dir))


def git(repo: Path, *args: str) -> str:
    """``git -C repo ARGS``: its output, stripped (raises when git fails)."""
    r = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True)
    return r.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    """Commit everything in ``repo``; its new HEAD."""
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def box_path(box: Box, rdir: str, rel: str = "") -> Path:
    """Where ``rdir`` (a ``~/...`` remote_dir) and ``rel`` in it are on the box's disk."""
    return Path(rdir.replace("~", box.info.home, 1)) / rel


def process_start(pid: int) -> int | None:
    """When the process ``pid`` started (clock ticks after boot: /proc/PID/stat's field 22), or
    None where there is no such process. A pid and its start name one process over time: the
    kernel hands pids out again (pid_max may be 32768), so a pid alone does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def process_gone(pid: int, started: int | None = None) -> bool:
    """Whether the process ``pid`` (the one that started at ``started``: ``process_start``,
    taken while it ran) has ended: no such pid, a zombie (ended, its parent has not reaped it:
    an orphan's init may never), or the pid now another process's."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] in ("Z", "X") or (started is not None and int(fields[19]) != started)


def kill_if_same(pid: int, started: int | None, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to the process ``pid`` if it is still the one that started at ``started``
    (a finalizer's kill never reaches a process that got the pid since)."""
    if started is not None and not process_gone(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def end_process(p: subprocess.Popen[Any], grace: float = 10) -> None:
    """TERM, and KILL if it is still there after ``grace`` seconds (an ssh with a forwarded
    connection still open can outlast a TERM under load); reaped either way."""
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=30)


def make_env(base: Path, cwd: Path | None = None, **extra: str) -> Environment:
    environ = {
        "PATH": os.environ["PATH"],
        "HOME": str(base / "home"),
        "XDG_CONFIG_HOME": str(base / "config"),
        "XDG_STATE_HOME": str(base / "state"),
        "LANG": "C.UTF-8",
        **extra,
    }
    (base / "home").mkdir(parents=True, exist_ok=True)
    return Environment(
        environ=environ,
        cwd=cwd or base,
        stdout=io.StringIO(),
        stderr=io.StringIO(),
        stdin_isatty=False,
    )


@dataclass
class LaptopBoxes:
    """Sandbox boxes registered in one laptop state directory: `--host a,b` finds each one's
    own ssh config there, as `remotedl sandbox up` makes it for a user."""

    base: Path
    boxes: dict[str, Box]
    gpus: dict[str, int]  # each box's count of stand-in GPUs

    @property
    def names(self) -> str:
        return ",".join(self.boxes)

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **make_env(self.base).environ, **extra}

    def run(self, *argv: str, cwd: Path | None = None, **extra: str) -> CliResult:
        e = make_env(self.base, cwd=cwd or self.base, **extra)
        code = main(list(argv), e)
        return CliResult(code, e.stdout.getvalue(), e.stderr.getvalue())  # type: ignore[attr-defined]

    def gpu_state(self, name: str, **changes: object) -> None:
        """Reset a box's stand-in GPUs, then apply ``changes`` (e.g. processes=[...])."""
        state = sandbox.fake_gpus(self.gpus[name])
        state.update(changes)
        (self.boxes[name].dir / "gpus.json").write_text(json.dumps(state))


@contextlib.contextmanager
def laptop_boxes(
    base: Path, gpus: dict[str, int], options: Mapping[str, Mapping[str, Any]] | None = None
) -> Iterator[LaptopBoxes]:
    """A box per name of ``gpus`` (with that many stand-in GPUs; ``options``: more of
    ``sandbox.up``'s keywords per name), all known to the laptop state in ``base``; every one
    that came up goes down at the end."""
    env = make_env(base)
    boxes: dict[str, Box] = {}
    try:
        for name, count in gpus.items():
            info = sandbox.up(env, name=name, gpus=count, **(options or {}).get(name, {}))
            boxes[name] = Box(info, dict(env.environ))
        yield LaptopBoxes(base, boxes, dict(gpus))
    finally:
        for name in boxes:
            try:
                sandbox.down(make_env(base), name=name)
            except Exception as e:  # a finalizer never raises
                print(f"sandbox down failed: {e}")


@pytest.fixture(scope="session")
def box_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("boxes")


def _start(base: Path, name: str, gpus: int, **options: Any) -> Box:
    env = make_env(base)
    info = sandbox.up(env, name=name, gpus=gpus, **options)
    return Box(info, dict(env.environ))


@pytest.fixture(scope="session")
def box(box_base: Path) -> Iterator[Box]:
    """One sandbox box for the session: real sshd, tmux, rsync, git, stand-in nvidia-smi."""
    b = _start(box_base, "testbox", gpus=2)
    yield b
    try:
        sandbox.down(make_env(box_base), name="testbox")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")


@pytest.fixture
def fresh_box(tmp_path: Path) -> Iterator[Box]:
    """A box of the test's own, for tests that change its sshd, keys or GPUs."""
    base = tmp_path / "fresh"
    b = _start(base, "fresh", gpus=2)
    yield b
    try:
        sandbox.down(make_env(base), name="fresh")
    except Exception as e:
        print(f"sandbox down failed: {e}")


# Boxes as users have them: (login shell, noisy start-up files). Every shell noisy where it has
# a start-up file that a non-interactive `ssh box cmd` reads (dash has none); quiet for the
# shells whose quoting differs from sh's (fish, tcsh) and for dash, so a failure says whether
# the quoting or the noise broke it. bash quiet is the session `box` (as root), zsh quiet
# quotes as sh does.
SHELL_BOXES = [
    ("bash", True),
    ("zsh", True),
    ("fish", True),
    ("tcsh", True),
    ("fish", False),
    ("tcsh", False),
    ("dash", True),
]


def _needs_root_for_users() -> None:
    if os.getuid() != 0:
        pytest.skip(
            "needs root: a box with another login shell or without sudo logs in as a system user "
            "of its own (rdl-SHELL), which only root can create"
        )


@pytest.fixture(
    scope="session",
    params=SHELL_BOXES,
    ids=[f"{shell}-{'noisy' if noisy else 'quiet'}" for shell, noisy in SHELL_BOXES],
)
def shell_box(request: pytest.FixtureRequest, box_base: Path) -> Iterator[Box]:
    """A box whose user logs in with another login shell (rdl-SHELL, no sudo), with or without
    start-up files that print to stdout and stderr."""
    shell, noisy = request.param
    _needs_root_for_users()
    if not have(shell):
        pytest.skip(f"{shell} is not installed here (`apt-get install {shell}`; .ci/run installs it)")
    name = f"sh-{shell}-{'noisy' if noisy else 'quiet'}"
    b = _start(box_base, name, gpus=2, login_shell=shell, noisy=noisy)
    yield b
    try:
        sandbox.down(make_env(box_base), name=name)
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")


@pytest.fixture(scope="session")
def plain_box(box_base: Path) -> Iterator[Box]:
    """A box whose user may not sudo (rdl-bash): sudo is there, the user is not in sudoers."""
    _needs_root_for_users()
    if not have("sudo"):
        pytest.skip("sudo is not installed here: a user without sudo rights means nothing without it")
    b = _start(box_base, "plain", gpus=2, no_sudo=True)
    yield b
    try:
        sandbox.down(make_env(box_base), name="plain")
    except Exception as e:
        print(f"sandbox down failed: {e}")


@dataclass
class SlurmBox(Box):
    """A sandbox box that is the login node of a real single-node Slurm cluster: every ssh
    session on it has SLURM_CONF, so sbatch, squeue, srun... there reach ``cluster``."""

    cluster: SlurmCluster

    def ssh_argv(self, *remote: str, options: Sequence[str] = ()) -> list[str]:
        """OpenSSH to the box through its real sshd (remote words go to the box's login shell)."""
        return ["ssh", "-F", self.info.ssh_config, "-o", "BatchMode=yes", *options, self.name, *remote]

    def ssh(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell script on the login node over ssh; the script travels on stdin."""
        argv = self.ssh_argv("sh", "-s")
        r = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"exit {r.returncode} from:\n{script}\nout: {r.stdout}\nerr: {r.stderr}")
        return r


@pytest.fixture(scope="session")
def slurm_box(box_base: Path) -> Iterator[SlurmBox]:
    """The login node of a real Slurm cluster (slurmctld, slurmd, munge; 2 fake GPUs as gres),
    started once per session on free ports in a directory of its own; skipped where Slurm
    cannot run (not root, packages missing)."""
    try:
        cluster = slurmcluster.start_cluster(gpus=2)
    except slurmcluster.SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    base = box_base / "slurm"
    try:
        env = make_env(base)
        # Its notification watcher looks every second here (every 30 s on a real login node).
        watch = {"REMOTEDL_SLURM_WATCH_INTERVAL": "1"}
        info = sandbox.up(env, name="slurmbox", gpus=0, extra_env={**cluster.env, **watch})
    except BaseException:
        slurmcluster.stop_cluster(cluster)
        raise
    yield SlurmBox(info, dict(env.environ), cluster)
    try:
        sandbox.down(make_env(base), name="slurmbox")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")
    for problem in slurmcluster.stop_cluster(cluster):
        print(f"slurm cluster stop: {problem}")


@dataclass
class DockerBox(Box):
    """A sandbox box whose user reaches a real Docker engine (its own dockerd, ``DOCKER_HOST``
    in every ssh session), with the test image and stand-in GPU device nodes."""

    engine: dockerengine.Engine


@pytest.fixture(scope="session")
def docker_box(box_base: Path) -> Iterator[DockerBox]:
    """A box with 2 stand-in GPUs and a real dockerd (started once per session); skipped where
    dockerd cannot run (not root, docker.io missing)."""
    try:
        engine = dockerengine.start(gpus=2)
    except dockerengine.DockerUnavailable as e:
        pytest.skip(f"no Docker engine: {e}")
    base = box_base / "docker"
    try:
        env = make_env(base)
        extra = {"DOCKER_HOST": engine.host, "REMOTEDL_DEVICE_DIR": str(engine.dev_dir)}
        info = sandbox.up(env, name="dockerbox", gpus=2, extra_env=extra)
    except BaseException:
        dockerengine.stop(engine)
        raise
    yield DockerBox(info, dict(env.environ), engine)
    try:
        sandbox.down(make_env(base), name="dockerbox")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")
    dockerengine.stop(engine)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An empty local project directory (a git repository with one commit)."""
    p = tmp_path / "proj"
    p.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main", str(p)], check=True)
    subprocess.run(["git", "-C", str(p), "config", "user.email", "t@example.invalid"], check=True)
    subprocess.run(["git", "-C", str(p), "config", "user.name", "Test"], check=True)
    (p / "README").write_text("hello\n")
    subprocess.run(["git", "-C", str(p), "add", "."], check=True)
    subprocess.run(["git", "-C", str(p), "commit", "-q", "-m", "init"], check=True)
    return p


@pytest.fixture
def cli(box: Box, tmp_path: Path) -> Callable[..., CliResult]:
    """Run the CLI in-process against the session box, from ``cwd`` (default: tmp_path)."""

    def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
        e = make_env(tmp_path / "laptop", cwd=cwd or tmp_path, **(env or {}))
        # The laptop knows the session box through its registered ssh config.
        e.environ["REMOTEDL_SSH_CONFIG"] = box.info.ssh_config  # type: ignore[index]
        e.environ.setdefault("REMOTEDL_HOST", box.name)  # type: ignore[attr-defined]
        code = main(list(argv), e)
        return CliResult(code, e.stdout.getvalue(), e.stderr.getvalue())  # type: ignore[attr-defined]

    return run


def cli_for(b: Box, base: Path) -> Callable[..., CliResult]:
    def run(*argv: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> CliResult:
        e = make_env(base, cwd=cwd or base, **(env or {}))
        e.environ["REMOTEDL_SSH_CONFIG"] = b.info.ssh_config  # type: ignore[index]
        e.environ.setdefault("REMOTEDL_HOST", b.name)  # type: ignore[attr-defined]
        code = main(list(argv), e)
        return CliResult(code, e.stdout.getvalue(), e.stderr.getvalue())  # type: ignore[attr-defined]

    return run


def have(program: str) -> bool:
    return shutil.which(program) is not None


@dataclass
class OtherUser:
    """A second Unix user of the box machine: what another user of a shared box can do."""

    name: str
    uid: int
    gid: int

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(argv), capture_output=True, text=True, timeout=60, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(argv), **kw)


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """``rdl-other``, made once (useradd; CI runs as root) and kept, like the sandbox users."""
    if os.getuid() != 0 or not have("useradd") or not have("setpriv"):
        pytest.skip("needs root, useradd and setpriv to act as a second user of the box")
    name = "rdl-other"
    try:
        found = pwd.getpwnam(name)
    except KeyError:
        # Two test runs at once: one of them makes it, both find it.
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "-s", "/bin/sh", name],
            capture_output=True,
            check=False,
        )
        found = pwd.getpwnam(name)
    return OtherUser(name, found.pw_uid, found.pw_gid)
