"""Starting a job: the command line a script or module becomes, the environment spec, and
``start`` (one agent call); how a job record and the agent's warnings are read."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from remotedl.agent.client import AgentClient
from remotedl.errors import RemotedlError, RemoteError, UsageError
from remotedl.schema import JobRecord, StartRequest
from remotedl.ssh.resolve import HostSpec
from remotedl.typecheck import SchemaError

SCRIPT_SUFFIXES = (".sh", ".bash", ".py")


def _record(data: Any, spec: HostSpec) -> JobRecord:
    try:
        return JobRecord.from_dict(data)
    except SchemaError as e:
        raise RemoteError(f"the remotedl agent on {spec.alias} sent a bad job record ({e})") from None


def build_command(
    argv: Sequence[str], project_root: Path | None, *, must_exist: bool = True
) -> tuple[str, str | None]:
    """(shell command line, script path relative to the work tree or None).

    A first word that names a file in the project is that script, whatever its name holds
    (spaces, quotes). Else one word with spaces or shell syntax is a command line as typed;
    otherwise the words are quoted one by one, so arguments arrive exactly as given. A script in
    the project is run as ./script when executable, else through python3 or bash by its suffix.
    A script that is not here is an error when ``must_exist`` (we are about to push), else the
    box must have it."""
    if not argv:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    first, rest = argv[0], list(argv[1:])
    local = project_root / first if project_root is not None and not os.path.isabs(first) else None
    in_project = local is not None and local.is_file()
    if not in_project and len(argv) == 1 and any(c in first for c in " \t;|&$<>()`'\"*?"):
        return first, None
    if not in_project and (
        not (first.endswith(SCRIPT_SUFFIXES) or first.startswith("./")) or os.path.isabs(first)
    ):
        return shlex.join([first, *rest]), None
    script = os.path.normpath(first)
    if local is not None and in_project:
        if os.access(local, os.X_OK):
            first = first if "/" in first else "./" + first
        else:
            rest = [first, *rest]
            first = "python3" if first.endswith(".py") else "bash"
    elif must_exist:
        raise UsageError(
            f"no such script: {local or first}", hint="check the name; scripts run from the project root"
        )
    else:
        first = first if "/" in first else "./" + first
    return shlex.join([first, *rest]), script


Warn = Callable[[str], None]


def _warnings(answer: Mapping[str, Any], warn: Warn | None) -> None:
    """Pass the agent's warnings (damaged records it skipped, ...) on; box text, bounded."""
    found = answer.get("warnings")
    if warn is None or not isinstance(found, list):
        return
    for w in found[:20]:
        if isinstance(w, str):
            warn(w[:500])


@dataclass
class EnvSpec:
    """How the box makes and enters the project's environment (remotedl.toml)."""

    conda: str | None = None  # a conda environment by name
    env_setup: str | None = None  # a shell line run before the job, in its shell
    setup_cmd: str | None = None  # replaces the built-in environment sync

    @classmethod
    def from_settings(cls, settings: Any) -> EnvSpec:
        return cls(
            conda=settings.get("conda") or None,
            env_setup=settings.get("env_setup") or None,
            setup_cmd=settings.get("setup_cmd") or None,
        )

    def to_request(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v}


class EnvOutOfDate(RemotedlError):
    """The project's requirements changed since the box's environment was last synced: sync
    (``envsync.sync``), then start again."""

    def __init__(self, plan: dict[str, Any]) -> None:
        super().__init__(f"the environment on the box is out of date ({plan.get('kind')})")
        self.plan = plan


def start(
    client: AgentClient,
    *,
    command: str,
    remote_dir: str,
    script: str | None = None,
    gpus: str | list[int] | None = None,
    count: int | None = None,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    queue: bool = False,
    force: bool = False,
    git_commit: str | None = None,
    snapshot: bool = False,
    git_head: str | None = None,
    snapshot_files: Sequence[str] = (),
    isolate: bool = True,
    data: Sequence[str] = (),
    shared: Sequence[str] = (),
    environment: EnvSpec | None = None,
    env_check: bool = True,
    notify: Sequence[str] = (),
    host_alias: str | None = None,
    stall_after: float | None = None,
    warn: Warn | None = None,
    slurm: Mapping[str, Any] | None = None,
    image: str | None = None,
    container: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    trackers: bool = False,
    project_id: str | None = None,
) -> JobRecord:
    """Start a job; it runs in its own checkout of ``git_commit`` (``None``: the box tree's
    HEAD) under ``remote_dir`` unless ``isolate`` is off. Answers once the job's runner
    recorded itself on the box. Raises ``EnvOutOfDate`` (nothing started) when ``env_check``
    finds the project's requirements changed since the environment was synced.

    ``slurm`` (the host's Slurm settings: partition, account, qos, time, constraint,
    sbatch_args, modules) makes the box a Slurm login node: the job is submitted with sbatch
    (``count`` GPUs, Slurm picks them) and the record carries its Slurm id.

    ``image`` runs the command in that container image on the box (``container``: the engine,
    ``gpus``, the way its GPUs enter the container, and ``args`` for ``docker run``)."""
    request = StartRequest(
        command=command,
        remote_dir=remote_dir,
        script=script,
        gpus=gpus if gpus is not None else "auto",
        count=count,
        env=dict(env or {}),
        name=name,
        queue=queue,
        force=force,
        git_commit=git_commit,
        git_head=git_head,
        snapshot=snapshot,
        snapshot_files=list(snapshot_files),
        isolate=isolate,
        data=list(data),
        shared=list(shared),
        environment=dict((environment or EnvSpec()).to_request()),
        env_check=env_check,
        # Sent from the box at the job's events; URLs travel on stdin like --env values.
        notify=list(notify),
        host_alias=host_alias,
        stall_after=stall_after,
        scheduler="slurm" if slurm is not None else None,
        slurm=dict(slurm) if slurm is not None else None,
        image=image,
        container=dict(container) if container is not None else None,
        # In the record: any laptop of the project brings them home; the box sets the trackers'.
        outputs=list(outputs),
        trackers=trackers,
        project_id=project_id,
    )
    answer = client.call(request.to_dict())
    _warnings(answer, warn)
    plan = answer.get("envsync")
    if isinstance(plan, dict):
        raise EnvOutOfDate(plan)
    return _record(answer.get("job"), client.spec)
