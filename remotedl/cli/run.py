"""run: parse the flags into a ``RunPlan``, call ``remotedl.run.run`` (on a fleet, on the box
placement picks), and render what it says and what it did."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.cli.common import (
    agent_client,
    installer_status,
    json_lines_writer,
    log_writer,
    remote_dir,
    safe,
    warner,
)
from remotedl.cli.progress import progress_bar
from remotedl.cli.sync import kept_lines, left_out_lines, made_line, missing_data_lines, pulled_lines
from remotedl.env import Environment
from remotedl.errors import ExitCode, JobFailed, UsageError
from remotedl.run import RunPlan, RunProgress, RunResult, build_plan
from remotedl.words import printable

if TYPE_CHECKING:
    from remotedl.rsync import ProgressFn
    from remotedl.schema import JobRecord
    from remotedl.sync import PushResult


def cmd_run(args: argparse.Namespace, env: Environment) -> int:
    app = App(args, env)
    if args.nodes is not None:  # one run across several boxes (remotedl.multinode)
        from remotedl.cli import slurm as slurmcli
        from remotedl.cli.multinode import run_nodes

        if slurmcli.is_slurm_host(app):  # one batch job on N nodes (--nodes goes to sbatch)
            slurmcli.check_node_flags(args)
            return run_on(app, args)
        return run_nodes(app, args, plan_for)
    if app.is_fleet:
        from remotedl.cli.slurm import refuse_in_fleet

        refuse_in_fleet(app)
        return run_placed(app, args)
    return run_on(app, args)


def plan_for(app: App, args: argparse.Namespace, *, queue: bool | None = None) -> RunPlan:
    """The run's plan on the one host of ``app`` (a fleet member: narrowed with ``for_host``,
    ``queue`` as placement says)."""
    from remotedl.cli import slurm as slurmcli

    if not args.command:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: give a number of GPUs (0 runs on the CPU)")
    return build_plan(
        app.settings,
        args.command,
        host=app.hosts[0] if app.hosts else "",  # no host: the error comes when connecting
        remote_dir=remote_dir(app),
        gpu=args.gpu,
        gpus=args.gpus,
        cpu=bool(args.cpu),
        env=args.env,
        name=args.name,
        queue=bool(args.queue if queue is None else queue),
        force=bool(args.force),
        detach=bool(args.detach),
        pull=args.pull,
        data=args.data,
        push=not args.no_push,
        notify=[str(u) for u in app.flag("notify") or []],
        no_notify=bool(app.flag("no_notify")),
        slurm=slurmcli.settings_for(app, args),
        ref_host=app.narrowed,
        outputs=list(getattr(args, "output", None) or []),
        image=getattr(args, "image", None),
        no_image=bool(getattr(args, "no_image", False)),
    )


class RunOutput(RunProgress):
    """``run``'s progress on this terminal: notes and warnings on stderr, bars for the push and
    the pull, the log on stdout (JSON Lines with --json)."""

    def __init__(self, app: App, plan: RunPlan, alias: str) -> None:
        self.app = app
        self.plan = plan
        self.alias = alias  # the host as its spec names it (ssh config alias)
        self.write, self.flush = json_lines_writer(app.env) if app.json else log_writer(app.env)
        self.on_state: Callable[[dict[str, Any]], None] = lambda change: None
        self.warner = warner(app.env)

    def warn(self, text: str) -> None:
        self.warner(text)

    def note(self, text: str) -> None:
        self.app.env.stderr.write(f"remotedl: {safe(text)}\n")

    @contextlib.contextmanager
    def transfer(self, what: str) -> Iterator[ProgressFn | None]:
        with progress_bar(self.app.env, not self.app.json) as bar:
            yield bar

    @contextlib.contextmanager
    def env_sync(self, text: str) -> Iterator[Callable[[str], None]]:
        with installer_status(self.app, text) as say:
            yield say

    def env_sync_failed(self, output: Sequence[str]) -> None:
        for line in output:
            self.app.env.stderr.write(f"  | {safe(line)}\n")

    def pushed(self, result: PushResult) -> None:
        env, plan = self.app.env, self.plan
        if result.created_mode:
            env.stderr.write(f"remotedl: {made_line(self.alias, result.remote_dir, result.created_mode)}\n")
        # As push says it: a job that reads a file the snapshot left out fails on the box otherwise.
        for line in missing_data_lines(result.missing, plan.project_root) + left_out_lines(
            result.left_out, plan.max_snapshot_file
        ):
            env.stderr.write(f"remotedl: {safe(line)}\n")

    def following(self, record: JobRecord) -> None:
        from remotedl.cli import slurm as slurmcli

        alias = self.alias
        ref = self.plan.ref(record.id)
        # What the box says of the job's state as it goes (why a Slurm job waits, a box job's
        # main process that exited with processes left), as `logs -f` says it.
        self.on_state = slurmcli.state_notes(self.app, ref)
        if record.scheduler == "slurm":
            self.app.env.stderr.write(f"remotedl: {slurmcli.submitted(record, alias)}; Ctrl-C detaches\n")
            return
        self.app.env.stderr.write(
            f"remotedl: job {record.id} ({safe(record.name)}) {record.state} on {alias}, "
            f"{gpu_text(record)}; Ctrl-C detaches\n"
        )

    def log(self, data: bytes) -> None:
        self.write(data)

    def log_flush(self) -> None:
        self.flush()

    def reconnecting(self, attempt: int) -> None:
        self.app.env.stderr.write(f"remotedl: connection lost, reconnecting (attempt {attempt})...\n")

    def state(self, change: Mapping[str, Any]) -> None:
        self.on_state(dict(change))


def gpu_text(rec: JobRecord) -> str:
    """``GPU 0``, ``GPUs 0,1``, ``no GPU`` or ``waiting for GPUs``."""
    if rec.status == "queued":
        return "waiting for GPUs"
    if not rec.gpus:
        return "no GPU"
    return f"{'GPU' if len(rec.gpus) == 1 else 'GPUs'} {','.join(map(str, rec.gpus))}"


def run_on(app: App, args: argparse.Namespace, *, queue: bool | None = None) -> int:
    """``run`` on the one host of ``app`` (on a fleet: the host placement chose, with ``queue``
    as placement says; its jobs are named ``HOST:ID``). A claim another laptop won first raises
    ``GpusBusy`` before anything is printed."""
    from remotedl.run import run

    plan = plan_for(app, args, queue=queue)
    client = agent_client(app)
    out = RunOutput(app, plan, client.spec.alias)
    result = run(plan, client, out, environ=app.env.environ)
    return render(app, result, out)


def render(app: App, result: RunResult, out: RunOutput) -> int:
    """What the run did, after it: the detached job's line (or JSON), a followed job's end."""
    from remotedl.cli import slurm as slurmcli

    env, rec, plan = app.env, result.record, result.plan
    alias = out.alias
    ref = result.ref
    if plan.detach:
        if app.json:
            app.print_json({**rec.to_dict(), "alias": alias} if app.narrowed else rec.to_dict())
        elif rec.scheduler == "slurm":
            app.out(ref)
            env.stderr.write(f"{slurmcli.submitted(rec, alias)}; `remotedl logs -f {ref}` to follow\n")
        else:
            app.out(ref)
            where = f"in {rec.workdir}" if rec.workdir else f"in the work tree {rec.cwd}"
            env.stderr.write(
                f"job {rec.id} ({safe(rec.name)}) {rec.state} on {alias}, {gpu_text(rec)}, {safe(where)}; "
                f"`remotedl logs -f {ref}` to follow\n"
            )
        return ExitCode.OK
    if result.interrupted:
        env.stderr.write(
            f"\nremotedl: detached; job {rec.id} keeps running on {alias}.\n"
            f"  follow again: remotedl logs -f {ref}    attach: remotedl attach {ref}    "
            f"stop: remotedl kill {ref}\n"
        )
        return ExitCode.INTERRUPTED
    ended = result.ended
    assert ended is not None  # followed to its end
    if result.outputs_error is not None:
        env.stderr.write(
            f"remotedl: outputs of job {ended.id} not fetched ({result.outputs_error}); "
            "`remotedl outputs` resumes\n"
        )
    elif result.outputs is not None:
        from remotedl.cli.outputs import came_home

        came_home(app, alias, result.outputs)
    if result.pull_error is not None:
        env.stderr.write(
            f"remotedl: could not pull {', '.join(plan.pull)} from job {ended.id}: {result.pull_error}\n"
        )
    else:
        for line in pulled_lines(result.pulled):
            env.stderr.write(f"remotedl: pulled {line}\n")
        for line in kept_lines(result.pulled):
            env.stderr.write(f"remotedl: {line}\n")
    shown = result.desktop
    if shown is not None and not shown.shown and shown.tool:
        env.stderr.write(f"remotedl: no desktop notification ({shown.tool}: {safe(shown.error or '?')})\n")
    if result.pull_error is not None and ended.status == "succeeded":
        raise result.pull_error
    if ended.status == "killed":
        env.stderr.write(f"remotedl: job {ended.id} was killed\n")
    code = ended.exit_code if ended.exit_code is not None else 1
    if ended.status == "lost":
        why = safe(ended.error or "its processes vanished")
        env.stderr.write(f"remotedl: job {ended.id} was lost ({why})\n")
    if code != 0:
        raise JobFailed(f"job {ended.id} exited with {code}", code)
    return ExitCode.OK


def run_placed(app: App, args: argparse.Namespace) -> int:
    """`remotedl run` on a fleet: sample every box at once, pick the box and GPUs by the boxes'
    own rules (``fleet.place``), push there and start the job. The box's agent picks and claims
    the GPUs again under its lock; if another laptop won them meanwhile, the next box is tried.
    With ``--queue`` and nothing free, the job waits on the box with the shortest queue."""
    from remotedl import jobs
    from remotedl.errors import ConnectError, GpusBusy
    from remotedl.fleet import fleet_samples, place
    from remotedl.run import command_argv, gpu_choice

    env = app.env
    argv = command_argv(args.command or [])
    jobs.build_command(argv, app.base_settings.project.root, must_exist=not args.no_push)
    gpu_choice(gpu=None, gpus=args.gpus, cpu=False)  # --gpus N checked
    if args.gpu and isinstance(gpu_choice(gpu=args.gpu, gpus=None, cpu=False)[0], list):
        raise UsageError(
            f"--gpu {args.gpu} names GPUs of one box, and {len(app.hosts)} hosts are given",
            hint="on a fleet use --gpu auto or --gpus N; or pick the box with --host NAME",
        )
    sampled = fleet_samples(app.fleet())
    for r in sampled.failed:
        env.stderr.write(f"remotedl: {r.host} is left out: {printable(str(r.error), newlines=False)}\n")
    live = [sample for _, sample in sampled.values()]
    if not live:
        raise ConnectError(
            f"no box of the fleet answered ({', '.join(app.hosts)})", hint="`remotedl status` shows why"
        )
    cpu = bool(args.cpu or args.gpus == 0)
    candidates = place(live, count=args.gpus or None, queue=args.queue, cpu=cpu)
    busy: list[str] = []
    for c in candidates:
        env.stderr.write(f"remotedl: placing the job on {c.host}: {c.why}\n")
        try:
            return run_on(app.for_host(c.host), args, queue=c.queue)
        except GpusBusy as e:  # another laptop's claim won the box's lock first
            busy.append(f"{c.host}: {e.message}")
            env.stderr.write(
                f"remotedl: {c.host} has no free GPU any more ({printable(e.message)}); next box\n"
            )
    raise GpusBusy(
        "the free GPUs were taken while this job was being placed: " + "; ".join(busy),
        hint="run again, or wait for GPUs with --queue",
    )
