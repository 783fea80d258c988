"""The job runtime interface (``Runtime``) and what a start hands a runtime (``StartPlan``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl.agent.store import Context
from remotedl.schema import StartRequest


@dataclass
class StartPlan:
    """What a start request settled before its runtime takes it (``ops.op_start``)."""

    req: StartRequest
    rdir: str  # the project's work tree on the box, resolved
    isolate: bool  # in a checkout of its own (False: in rdir itself)
    commit: str | None
    data: list[str]
    shared: list[str]
    spec: dict[str, Any]  # the environment: conda, env_setup


# What a kill did: the job's record when it is final already (None: look again), the signals
# sent, in words.
Killed = tuple[dict[str, Any] | None, list[str]]


class LogFollow:
    """How a follower of a job's log looks at the job: ``due`` says when to read its record
    again, ``note`` what to tell the follower (None: nothing new)."""

    def __init__(self, rec: dict[str, Any]) -> None:
        self.rec = rec

    def due(self, idle: float, since_look: float) -> bool:
        return idle >= 0.5 or idle == 0.0

    def note(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        return None


class Runtime:
    kind = ""

    def check(self) -> None:
        """Raise an AgentError when the box cannot hold this runtime's jobs."""

    def create(self, ctx: Context, plan: StartPlan, active: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def launch(self, ctx: Context, rec: dict[str, Any], plan: StartPlan) -> dict[str, Any]:
        raise NotImplementedError

    def refresh(self, ctx: Context, records: list[dict[str, Any]]) -> None:
        """Record what the runtime says of its active jobs among ``records`` (in place)."""

    def gone(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The active ones of ``records`` (this runtime's) that nothing keeps alive any more."""
        raise NotImplementedError

    def kill(self, ctx: Context, rec: dict[str, Any], grace: float) -> Killed:
        """End the active job."""
        raise NotImplementedError

    def follow(self, rec: dict[str, Any]) -> LogFollow:
        return LogFollow(rec)

    def attach(self, rec: dict[str, Any]) -> str:
        """The shell command on the box that opens a terminal in the job (the laptop runs it
        through ssh with a terminal: ``jobs.attach_argv``)."""
        raise NotImplementedError

    def own_dirs(self, rec: dict[str, Any]) -> list[Path]:
        """Directories of the job's runtime, removed with the job (``jobs rm``)."""
        return []
