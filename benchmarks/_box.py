"""A sandbox box for benchmarks, in a state directory of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from _install import installed_remotedl

from remotedl import sandbox
from remotedl.env import Environment


class BenchBox:
    def __init__(self, gpus: int = 2) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="remotedl-bench-"))
        env = {
            **os.environ,
            "XDG_STATE_HOME": str(self.base / "state"),
            "XDG_CONFIG_HOME": str(self.base / "config"),
        }
        # The box's python as on a real box (/usr/bin/python3), not this machine's pyenv shim
        # on PATH, which costs ~90 ms per start and would be counted against the agent.
        if os.path.exists("/usr/bin/python3"):
            env["REMOTEDL_PYTHON"] = "/usr/bin/python3"
        # remotedl's own modules byte-compiled as an installed copy has them (pip compiles at
        # install; uv writes the cache on first use): with PYTHONDONTWRITEBYTECODE set (as in
        # some shells and CI) every command would compile ~30 modules from source, ~150 ms
        # that no user pays. The cache goes beside the box, not into the source tree.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.base / "pycache")
        self.environ = env
        self.env = Environment(environ=env, cwd=self.base)
        self.info = sandbox.up(self.env, name="bench", gpus=gpus)
        self.ssh_config = self.info.ssh_config
        self.alias = self.info.name
        self.home = Path(self.info.home)

    def plain_ssh(self, *, warm: bool) -> list[str]:
        """``ssh`` to the box as a user would type it: cold (a fresh handshake every time) or
        warm (a multiplexed master kept up, the same ControlPersist remotedl uses). Ratios are
        reported against both: remotedl reuses its master, so only the warm one is fair."""
        if not warm:
            return ["ssh", "-F", self.ssh_config, "-o", "ControlPath=none", self.alias]
        control = self.base / "plain-%C"
        argv = ["ssh", "-F", self.ssh_config, "-o", "ControlMaster=auto",
                "-o", f"ControlPath={control}", "-o", "ControlPersist=60", self.alias]  # fmt: skip

        subprocess.run([*argv, "true"], check=True, capture_output=True)  # the master is up
        return argv

    def close(self) -> None:
        sandbox.down(self.env, name="bench")


@dataclass
class ProjectOnBox:
    """A committed project pushed to a sandbox box, its agent installed and its master
    connection up: ``remotedl`` runs the CLI in ``proj`` with ``run_env``; ``cold`` and ``warm``
    are plain ``ssh BOX`` command lines (a fresh handshake each time, a kept master)."""

    info: sandbox.SandboxInfo
    proj: Path
    run_env: dict[str, str]
    remotedl: list[str]
    cold: list[str]
    warm: list[str]


@contextlib.contextmanager
def project_on_box(
    prefix: str,
    name: str,
    *,
    files: dict[str, str],
    settings: Callable[[str], str],
    extra_env: dict[str, str],
    warm_up: list[str],
) -> Iterator[ProjectOnBox]:
    """A sandbox box ``name`` (its sshd's environment gets ``extra_env``: a test dockerd's
    socket, a test cluster's Slurm) in a state directory of its own, a project holding
    ``files`` and ``remotedl.toml`` = ``settings(box alias)``, pushed, and the first
    ``remotedl warm_up`` run (the agent on the box, the master up) before anything is timed."""
    base = Path(tempfile.mkdtemp(prefix=f"remotedl-bench-{prefix}-"))
    environ = {**os.environ, "XDG_STATE_HOME": str(base / "state"), "XDG_CONFIG_HOME": str(base / "config")}
    env = Environment(environ=environ, cwd=base)
    info = sandbox.up(env, name=name, gpus=0, extra_env=extra_env)
    try:
        proj = base / "proj"
        proj.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main", str(proj)], check=True)
        for path, text in files.items():
            (proj / path).write_text(text)
        (proj / "remotedl.toml").write_text(settings(info.name))
        subprocess.run(["git", "-C", str(proj), "add", "."], check=True)
        who = ["-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
        subprocess.run(["git", "-C", str(proj), *who, "commit", "-qm", "init"], check=True)
        remotedl = installed_remotedl()
        run_env = {**environ, "PYTHONUNBUFFERED": "1"}
        subprocess.run([*remotedl, "push"], cwd=proj, env=run_env, check=True, capture_output=True)
        subprocess.run([*remotedl, *warm_up], cwd=proj, env=run_env, check=True, capture_output=True)
        cold = ["ssh", "-F", info.ssh_config, "-o", "ControlPath=none", info.name]
        control = base / "plain-%C"
        warm = ["ssh", "-F", info.ssh_config, "-o", "ControlMaster=auto", "-o", f"ControlPath={control}",
                "-o", "ControlPersist=60", info.name]  # fmt: skip
        subprocess.run([*warm, "true"], check=True, capture_output=True)
        yield ProjectOnBox(info, proj, run_env, remotedl, cold, warm)
    finally:
        sandbox.down(env, name=name)
