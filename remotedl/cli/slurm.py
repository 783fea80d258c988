"""What the commands do differently on a Slurm login node (``scheduler = "slurm"``): the run's
GPUs and sbatch flags, state notes while a job waits, the cluster's status (Jupyter on a node:
cli/tunnel.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remotedl.cli.common import safe
from remotedl.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from remotedl.cli.app import App
    from remotedl.schema import JobRecord
    from remotedl.slurm import SlurmSettings

SLURM_FLAGS = ("time", "partition", "sbatch_arg")


def settings_for(app: App, args: argparse.Namespace | None = None) -> SlurmSettings | None:
    """The host's Slurm settings with the command's --time/--partition/--sbatch-arg, or None
    for a host that is not a Slurm login node (where those flags are refused)."""
    s = host_settings(app.settings)
    given = [f for f in SLURM_FLAGS if args is not None and getattr(args, f, None)]
    if s is None:
        if given:
            flags = ", ".join("--" + f.replace("_", "-") for f in given)
            raise UsageError(
                f"{flags}: for Slurm hosts only, and {app.spec().alias} is not one",
                hint='a Slurm login node has scheduler = "slurm" in its [hosts.NAME] table',
            )
        return None
    if args is None:
        return s
    return s.with_flags(
        time=getattr(args, "time", None),
        partition=getattr(args, "partition", None),
        sbatch_args=getattr(args, "sbatch_arg", None) or (),
        nodes=getattr(args, "nodes", None),
    )


def is_slurm_host(app: App) -> bool:
    """One host, and a Slurm login node: `run --nodes N` there is one batch job on N nodes."""
    return len(app.hosts) == 1 and host_settings(app.settings) is not None


def check_node_flags(args: argparse.Namespace) -> None:
    """`run --nodes N` on a Slurm host: the flags that make no sense across nodes."""
    if args.nodes < 1:
        raise UsageError(f"--nodes {args.nodes}: give a number of nodes, 1 or more")
    if args.gpu:
        raise UsageError("--gpu names GPUs of one box", hint="with --nodes give the GPUs per node: --gpus N")
    if not args.command:
        raise UsageError("give a command to run, e.g. `remotedl run --nodes 2 -- torchrun ... train.py`")


def check_node(rec: JobRecord, rank: int) -> None:
    """`logs JOB --node R`: the job spans nodes (`run --nodes N` on a Slurm host) and R is one."""
    nodes = rec.want.get("nodes") if rec.scheduler == "slurm" else None
    if not isinstance(nodes, int):
        raise UsageError(
            f"--node R picks a node of a multi-node run; job {rec.id} is not one",
            hint="give a run (logs RUN --node R), or a job started with `run --nodes N` on a Slurm host",
        )
    if not 0 <= rank < nodes:
        raise UsageError(f"--node {rank}: job {rec.id} runs on nodes 0 to {nodes - 1}")


def node_lines(
    write: Callable[[bytes], None], flush: Callable[[], None], rank: int
) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """`logs JOB --node R` of a multi-node Slurm job: only node R's lines (srun's ``--label``
    puts ``R: `` before each), without their label."""
    label = f"{rank}: ".encode()
    pending = bytearray()

    def emit(lines: list[bytes]) -> None:
        kept = b"".join(x[len(label) :] for x in lines if x.startswith(label))
        if kept:
            write(kept)

    def w(b: bytes) -> None:
        pending.extend(b)
        end = pending.rfind(b"\n")
        if end >= 0:
            emit([x + b"\n" for x in bytes(pending[:end]).split(b"\n")])
            del pending[: end + 1]

    def done() -> None:
        if pending:
            emit([bytes(pending)])
            pending.clear()
        flush()

    return w, done


def host_settings(settings: Any) -> SlurmSettings | None:
    """The host's Slurm settings, or None; remotedl.slurm is imported only for a Slurm host."""
    try:
        if settings.get("scheduler") != "slurm":
            return None
    except KeyError:
        return None
    from remotedl.slurm import host_settings as of_host

    return of_host(settings)


def request(s: SlurmSettings) -> dict[str, Any]:
    from remotedl.slurm import settings_request

    return settings_request(s)


def refuse_in_fleet(app: App) -> None:
    """Placement across a fleet is for boxes: Slurm places a cluster's jobs itself."""
    clusters = [h for h in app.hosts if host_settings(app.host_settings(h)) is not None]
    if clusters:
        raise UsageError(
            f"{', '.join(clusters)}: a Slurm host is not placed among a fleet's boxes (Slurm places"
            " its own jobs)",
            hint=f"run on it alone: --host {clusters[0]}",
        )


def gpu_count(args: argparse.Namespace) -> int:
    """How many GPUs a run asks Slurm for: --gpus N, none with --cpu, else one. Slurm chooses
    which: --gpu with indices is refused."""
    if args.cpu or args.gpus == 0:
        return 0
    if args.gpu and args.gpu.strip().lower() != "auto":
        raise UsageError(
            f"--gpu {args.gpu} picks GPUs by their index, but on a Slurm cluster Slurm chooses the "
            "devices: the job sees the ones it got as CUDA_VISIBLE_DEVICES starting at 0",
            hint="ask for a number of GPUs with --gpus N",
        )
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: give a number of GPUs (0 runs on the CPU)")
    return int(args.gpus or 1)


def submitted(rec: JobRecord, alias: str) -> str:
    """``job 3 (train) submitted to Slurm on CLUSTER as job 1234: PENDING``."""

    return f"job {rec.id} ({safe(rec.name)}) submitted to Slurm on {alias} as job {rec.slurm_id}: {rec.state}"


def state_notes(app: App, job_word: str) -> Callable[[dict[str, Any]], None]:
    """Lines for stderr as a followed Slurm job's state changes: why it waits, where it runs."""

    said: list[str] = []

    def note(n: dict[str, Any]) -> None:
        words = str(n.get("state") or "")
        if not words or (said and said[-1] == words):
            return
        said.append(words)
        if n.get("status") == "queued":
            app.env.stderr.write(f"remotedl: job {job_word} waits in Slurm's queue: {safe(words)}\n")
        elif n.get("status") == "running":
            app.env.stderr.write(f"remotedl: job {job_word} is {safe(words)}\n")
        app.env.stderr.flush()

    return note


def status(app: App) -> int:
    """``remotedl status`` on a Slurm login node: partitions, nodes, GPUs, the user's jobs."""
    from rich.table import Table
    from rich.text import Text

    from remotedl.slurmhost import cluster_status
    from remotedl.ssh import open_box
    from remotedl.words import printable

    spec = app.spec()
    with open_box(spec) as box:
        st = cluster_status(box)
    if app.json:
        app.print_json({"host": spec.alias, "scheduler": "slurm", **st.to_dict()})
        return ExitCode.OK
    c = app.console

    def cells(*values: object) -> list[Text]:
        return [Text(printable(str(v), newlines=False)) for v in values]  # cluster text: no markup

    c.print(
        f"[bold]{spec.alias}[/bold] ({spec.user}@{spec.hostname}:{spec.port}): Slurm login node, "
        f"{printable(st.version, newlines=False)}, GPUs {st.gpus_used} used of {st.gpus}",
        highlight=False,
    )
    parts = Table(box=None, pad_edge=False, title_justify="left")
    for col in ("partition", "state", "nodes", "GPUs used / total", "time limit"):
        parts.add_column(col)
    for p in st.partitions:
        parts.add_row(*cells(p.name + ("*" if p.default else ""), p.state, p.nodes,
                             f"{p.gpus_used} / {p.gpus}", p.max_time))  # fmt: skip
    c.print(parts)
    nodes = Table(box=None, pad_edge=False)
    for col in ("node", "partitions", "state", "GPUs used / total", "CPUs used / total"):
        nodes.add_column(col)
    for n in st.nodes:
        cpus = f"{n.cpus_alloc} / {n.cpus_total}" if n.cpus_total is not None else "?"
        nodes.add_row(*cells(n.name, ",".join(n.partitions), n.state, f"{n.gpus_used} / {n.gpus}", cpus))
    c.print(nodes)
    if not st.jobs:
        c.print(f"no jobs of {printable(st.user, newlines=False)} in the queue", markup=False)
        return ExitCode.OK
    jobs = Table(box=None, pad_edge=False)
    for col in ("Slurm job", "name", "state", "GPUs", "time", "limit", "partition"):
        jobs.add_column(col)
    for j in st.jobs:
        jobs.add_row(*cells(j.job_id, j.name, j.describe(), j.gpus or "-", j.elapsed or "-",
                            j.time_limit or "-", j.partition))  # fmt: skip
    c.print(jobs)
    return ExitCode.OK
