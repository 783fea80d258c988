"""The project's environment on the box: make it match the project's requirements.

When the project has ``requirements.txt``, ``pyproject.toml`` (with ``uv.lock``) or
``environment.yml``, the box's environment for it (``<remote_dir>/.venv``, or the configured
conda environment, or the one ``env_setup`` activates) is synced before a job starts, only when
those files changed since the last sync (the agent keys it by their hash). ``uv`` is used when
the box has it, else ``python -m venv`` and that venv's pip; never the system interpreter's pip.
``setup_cmd`` replaces the built-in steps. The installer's output streams back as progress, and
a failure is an error carrying the installer's last lines.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.agent.client import AgentClient, error_from
from remotedl.errors import RemoteError
from remotedl.jobs import EnvSpec, _marks
from remotedl.schema import AGENT_MISSING, EnvsyncRequest
from remotedl.ssh.channel import NoFrame
from remotedl.ssh.openssh import openssh_failure

TAIL_LINES = 40


@dataclass
class EnvSyncResult:
    needed: bool  # the project has requirements (or a setup_cmd)
    synced: bool  # something was installed just now (False: already in sync)
    kind: str | None = None  # requirements.txt, pyproject.toml, uv.lock, environment.yml, setup_cmd
    target: str | None = None  # the environment: a .venv path or a conda environment
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)  # the installer's last lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnvSyncFailed(RemoteError):
    """The installer failed; ``output`` holds its last lines."""

    def __init__(self, message: str, output: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.output = output


def sync(
    client: AgentClient,
    remote_dir: str,
    spec: EnvSpec,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> EnvSyncResult:
    """Sync the environment of the project at ``remote_dir`` on the box if its requirements
    changed (``force``: anyway). ``progress`` gets each line the installer prints."""
    t0 = time.perf_counter()
    request = EnvsyncRequest(remote_dir=remote_dir, env=dict(spec.to_request()), force=force).to_dict()
    for attempt in range(2):
        tail: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        p = client.stream(request)
        try:
            while True:
                try:
                    chunk = p.read()
                except NoFrame:
                    break
                if not chunk:
                    break
                pending += decoder.decode(chunk)
                *lines, pending = pending.replace("\r", "\n").split("\n")
                for line in lines:
                    if line.strip():
                        tail = [*tail[-(TAIL_LINES - 1) :], line]
                        if progress is not None:
                            progress(line)
        except BaseException:
            p.kill()
            raise
        if pending.strip():
            tail = [*tail[-(TAIL_LINES - 1) :], pending]
        code = p.wait()  # joins the stderr reader: every mark is in
        marks = _marks(p.stderr_lines)
        if "error" in marks:
            raise error_from(marks["error"])
        end = marks.get("end")
        if end is None:
            if code == AGENT_MISSING and attempt == 0:
                client.upload()
                continue
            if code == 255:
                raise openssh_failure(client.spec, p.stderr_text())
            raise RemoteError(
                f"the environment sync on {client.spec.alias} ended without a result (exit {code})"
            )
        plan = end.get("plan") if isinstance(end.get("plan"), dict) else {}
        kind = plan.get("kind") if isinstance(plan.get("kind"), str) else None
        target = plan.get("target") if isinstance(plan.get("target"), str) else None
        if not end.get("ok"):
            raise EnvSyncFailed(
                f"the environment on {client.spec.alias} could not be synced: "
                f"{str(end.get('error') or 'the installer failed')[:300]}",
                tail,
                hint=f"fix {kind or 'the requirements'} (the installer's output is above), "
                "or set setup_cmd in remotedl.toml",
            )
        return EnvSyncResult(
            needed=bool(end.get("needed")),
            synced=bool(end.get("synced")),
            kind=kind,
            target=target,
            seconds=time.perf_counter() - t0,
            output=tail,
        )
    raise RemoteError(f"could not install the remotedl agent on {client.spec.alias}")
