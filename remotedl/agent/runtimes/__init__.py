"""Job runtimes: what holds a job's processes. One interface, chosen once per record.

A record's kind (``store.kind_of``: ``box``, ``container`` or ``slurm``) picks its runtime (``of``); a start
request's ``scheduler`` picks the runtime that makes the record (``for_request``). The ops and
the liveness look (``state.refresh``) ask the runtime and never which kind of job they hold:

- ``create``: the new job's record, saved under the box lock (placement: a box job's GPUs);
- ``launch``: its processes (a tmux session with a runner; an sbatch submission);
- ``refresh`` and ``gone``: the runtime's own word on its active jobs (Slurm's state), and
  which of them nothing keeps alive any more;
- ``kill``, ``follow`` (how often a follower of the log looks, and what it tells), ``attach``
  (the command on the box that opens a terminal in the job), ``own_dirs`` (removed with it).

Runtimes import the store, the checkouts and the GPU choice, never the ops, the state or the
events: a look that finds news puts it in the request's ``Context``; the op sends it.
A job in a container image (``container``) is a tmux job whose runner runs ``docker run``
(``runtimes/container.py``); jobs spanning several nodes plug in here as further runtimes.
"""

from __future__ import annotations

from typing import Any

from remotedl.agent.runtimes.base import Killed, LogFollow, Runtime, StartPlan
from remotedl.agent.runtimes.container import ContainerRuntime
from remotedl.agent.runtimes.slurm import SlurmRuntime
from remotedl.agent.runtimes.tmux import TmuxRuntime
from remotedl.agent.store import kind_of
from remotedl.schema import StartRequest

__all__ = ["RUNTIMES", "Killed", "LogFollow", "Runtime", "StartPlan", "for_request", "of"]

RUNTIMES: dict[str, Runtime] = {
    "box": TmuxRuntime(),
    "slurm": SlurmRuntime(),
    "container": ContainerRuntime(),
}


def of(rec: dict[str, Any]) -> Runtime:
    """The runtime that holds the job of ``rec``."""
    return RUNTIMES[kind_of(rec)]


def for_request(req: StartRequest) -> Runtime:
    """The runtime a start request asks for (``scheduler``, ``image``; the box's tmux by
    default)."""
    if req.scheduler == "slurm":
        return RUNTIMES["slurm"]
    return RUNTIMES["container" if req.image else "box"]
