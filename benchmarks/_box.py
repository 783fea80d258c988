"""A sandbox box for benchmarks, in a state directory of its own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
        import subprocess

        subprocess.run([*argv, "true"], check=True, capture_output=True)  # the master is up
        return argv

    def close(self) -> None:
        sandbox.down(self.env, name="bench")
