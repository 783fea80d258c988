"""run, jobs, logs, kill, attach."""

from __future__ import annotations

import argparse
import codecs
import datetime
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.basic import _duration
from remotedl.cli.progress import progress_bar
from remotedl.cli.sync import remote_dir
from remotedl.env import Environment
from remotedl.errors import ExitCode, JobFailed, UsageError

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient


def _writer(env: Environment) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """Write log bytes to stdout: raw where stdout has a buffer, else decoded (tests)."""
    buffer = getattr(env.stdout, "buffer", None)
    if buffer is not None:

        def write_raw(b: bytes) -> None:
            buffer.write(b)
            buffer.flush()

        return write_raw, buffer.flush
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write_text(b: bytes) -> None:
        env.stdout.write(decoder.decode(b))
        env.stdout.flush()

    def flush_text() -> None:
        env.stdout.write(decoder.decode(b"", final=True))

    return write_text, flush_text


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--env {pair!r}: use KEY=VALUE")
        out[key] = value
    return out


def _client(app: App) -> AgentClient:
    from remotedl.agent.client import AgentClient

    return AgentClient(app.spec(), python=str(app.settings.get("python")))


def _follow(app: App, client: AgentClient, job_id: int) -> int:
    from remotedl import jobs

    spec = client.spec
    write, flush = _writer(app.env)

    def reconnecting(n: int) -> None:
        app.env.stderr.write(f"remotedl: connection lost, reconnecting (attempt {n})...\n")

    try:
        rec = jobs.stream_logs(client, str(job_id), write, follow=True, on_reconnect=reconnecting)
    except KeyboardInterrupt:
        flush()
        app.env.stderr.write(
            f"\nremotedl: detached; job {job_id} keeps running on {spec.alias}.\n"
            f"  follow again: remotedl logs -f {job_id}    attach: remotedl attach {job_id}    "
            f"stop: remotedl kill {job_id}\n"
        )
        return ExitCode.INTERRUPTED
    flush()
    if rec.status == "killed":
        app.env.stderr.write(f"remotedl: job {rec.id} was killed\n")
    code = rec.exit_code if rec.exit_code is not None else 1
    if rec.status == "lost":
        app.env.stderr.write(f"remotedl: job {rec.id} was lost (its tmux session vanished)\n")
    if code != 0:
        raise JobFailed(f"job {rec.id} exited with {code}", code)
    return ExitCode.OK


def cmd_run(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import gpus as gpumod
    from remotedl import jobs, sync

    app = App(args, env)
    s = app.settings
    if not args.command:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    command_argv = args.command[1:] if args.command[0] == "--" else args.command
    root = s.project.root
    command, script = jobs.build_command(command_argv, root, must_exist=not args.no_push)
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: give a number of GPUs (0 runs on the CPU)")
    gpus: str | list[int] | None = None
    if args.cpu or args.gpus == 0:
        gpus = "none"
    elif args.gpu:
        try:
            parsed = gpumod.parse_gpu_spec(args.gpu)
        except ValueError as e:
            raise UsageError(str(e)) from e
        gpus = "auto" if parsed is None else parsed
    job_env = {**s.get("env"), **_env_pairs(args.env)}
    client = _client(app)
    spec = client.spec
    commit, snapshot, cwd = None, False, remote_dir(app)
    if not args.no_push:
        data = [*s.get("data"), *[d for d in args.data if d not in s.get("data")]]
        with progress_bar(env, not app.json) as progress:
            pushed = sync.push(spec, root, cwd, data=data, excludes=s.get("exclude"), progress=progress)
        commit, snapshot, cwd = pushed.commit, pushed.snapshot, pushed.remote_dir
    name = args.name or (script.rsplit("/", 1)[-1] if script else command_argv[0].rsplit("/", 1)[-1])
    rec = jobs.start(
        client,
        command=command,
        cwd=cwd,
        script=script,
        gpus=gpus,
        count=args.gpus if args.gpus else None,
        env=job_env,
        name=name,
        queue=args.queue,
        force=args.force,
        git_commit=commit,
        snapshot=snapshot,
    )
    if app.json and args.detach:
        app.print_json(rec.to_dict())
        return ExitCode.OK
    gpus_word = "GPU" if len(rec.gpus) == 1 else "GPUs"
    gpu_text = f"{gpus_word} {','.join(map(str, rec.gpus))}" if rec.gpus else "no GPU"
    if rec.status == "queued":
        gpu_text = "waiting for GPUs"
    if args.detach:
        app.out(str(rec.id))
        env.stderr.write(
            f"job {rec.id} ({rec.name}) {rec.status} on {spec.alias}, {gpu_text}; "
            f"`remotedl logs -f {rec.id}` to follow\n"
        )
        return ExitCode.OK
    env.stderr.write(
        f"remotedl: job {rec.id} ({rec.name}) {rec.status} on {spec.alias}, {gpu_text}; Ctrl-C detaches\n"
    )
    return _follow(app, client, rec.id)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def cmd_jobs(args: argparse.Namespace, env: Environment) -> int:
    from rich.table import Table
    from rich.text import Text

    from remotedl import jobs

    app = App(args, env)
    records = jobs.list_jobs(_client(app), all_jobs=args.all)
    if app.json:
        app.print_json([r.to_dict() for r in records])
        return ExitCode.OK
    if not records:
        app.out("no jobs on the box yet; start one with `remotedl run COMMAND`")
        return ExitCode.OK
    # Names and commands come from the box as typed: plain text, never rich markup.
    table = Table(box=None, pad_edge=False)
    for col in ("id", "name", "status", "GPUs", "exit", "started", "duration", "command"):
        table.add_column(col, no_wrap=col != "command")
    for r in records:
        table.add_row(
            *map(
                Text,
                (
                    str(r.id),
                    r.name,
                    r.status,
                    ",".join(map(str, r.gpus)) or "-",
                    "-" if r.exit_code is None else str(r.exit_code),
                    _when(r.started),
                    _duration(r.duration) if r.started else "-",
                    r.command,
                ),
            )
        )
    app.console.print(table)
    return ExitCode.OK


def cmd_logs(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app = App(args, env)
    client = _client(app)
    if args.follow:
        rec = jobs.get_job(client, args.job)
        if args.lines is None:
            return _follow(app, client, rec.id)
    write, flush = _writer(env)
    try:
        jobs.stream_logs(client, args.job, write, follow=args.follow, lines=args.lines)
    finally:
        flush()
    return ExitCode.OK


def cmd_kill(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app = App(args, env)
    rec = jobs.kill(_client(app), args.job, grace=args.grace)
    if app.json:
        app.print_json(rec.to_dict())
    else:
        app.out(f"job {rec.id} ({rec.name}): {rec.status}")
    return ExitCode.OK


def cmd_attach(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app = App(args, env)
    client = _client(app)
    spec = client.spec
    rec = jobs.get_job(client, args.job)
    if rec.status not in ("running", "queued"):
        raise UsageError(
            f"job {rec.id} is {rec.status}: nothing to attach to",
            hint=f"read its log with `remotedl logs {rec.id}`",
        )
    if not env.stdin_isatty:
        raise UsageError("attach needs a terminal", hint=f"use `remotedl logs -f {rec.id}` in scripts")
    env.stderr.write(f"attaching to job {rec.id}; detach with Ctrl-b d (the job keeps running)\n")
    return subprocess.call(jobs.attach_argv(spec, rec), stdin=sys.stdin, stdout=sys.stdout)
