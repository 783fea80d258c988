"""run, jobs (rm, prune, show), logs, kill, attach, show, diff."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.basic import _duration, _size
from remotedl.cli.progress import progress_bar
from remotedl.cli.sync import left_out_lines, made_line, missing_data_lines, remote_dir
from remotedl.env import Environment
from remotedl.errors import ExitCode, Interrupted, JobFailed, RemotedlError, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from rich.text import Text

    from remotedl.agent.client import AgentClient
    from remotedl.envsync import EnvSyncResult
    from remotedl.jobs import EnvSpec, JobRecord

# The table's colour per status (the words themselves are the same in --json).
STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "killed": "yellow",
    "lost": "magenta",
    "preempted": "magenta",
    "queued": "cyan",
    "starting": "cyan",
    "running": "bold blue",
    "stalled": "bold yellow",
}


def safe(text: str) -> str:
    """Box text for the terminal: control characters (escape sequences) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


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


def _json_lines_writer(env: Environment) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """Log bytes as JSON Lines (``logs --json``): one object per log line, ``{"text": LINE}``
    with the line's own newline, or ``{"base64": ...}`` for a line that is not UTF-8; joined in
    order they are the log byte for byte. A last line without a newline comes at the end."""
    import base64

    pending = bytearray()

    def emit(line: bytes) -> None:
        try:
            obj = {"text": line.decode("utf-8")}
        except UnicodeDecodeError:
            obj = {"base64": base64.b64encode(line).decode("ascii")}
        env.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def write(b: bytes) -> None:
        pending.extend(b)
        end = pending.rfind(b"\n")
        if end < 0:
            return
        for line in bytes(pending[: end + 1]).splitlines(keepends=True):
            emit(line)
        del pending[: end + 1]
        env.stdout.flush()

    def flush() -> None:
        if pending:
            emit(bytes(pending))
            pending.clear()
        env.stdout.flush()

    return write, flush


def warner(env: Environment) -> Callable[[str], None]:
    def warn(text: str) -> None:
        env.stderr.write(f"remotedl: warning: {safe(text)}\n")

    return warn


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            shown = f"{key}=..." if sep else pair  # the value may be a secret: never said
            raise UsageError(f"--env {shown!r}: use KEY=VALUE, KEY a name of letters, digits and _")
        out[key] = value
    return out


def _client(app: App) -> AgentClient:
    from remotedl.agent.client import AgentClient

    return AgentClient(app.spec(), python=str(app.settings.get("python")), adopt=adopt_request(app))


def adopt_request(app: App) -> dict[str, str] | None:
    """The agent's ``adopt`` field where this command works in the default remote_dir."""
    return None if app.flag("remote_dir") else app.settings.adopt_request()


def route(app: App, job: str | None, *, active: bool = False) -> tuple[App, str | None]:
    """Which host a job reference means: ``HOST:ID`` names its host; on a fleet, no id means
    this project's latest job on any of its hosts (``active``: the latest running or queued
    one, as for kill and attach); on one host, the reference as typed."""
    if not (app.is_fleet and not job):
        return app.route_job(job)
    from remotedl import jobs
    from remotedl.fleet import Member

    def latest(m: Member) -> JobRecord | None:
        client = m.client()
        rec = jobs.get_job(client, None, project=str(app.flag("remote_dir") or m.remote_dir))
        if rec.active or not active:
            return rec
        # the latest is over: this project's latest running or queued job, if any
        mine = [r for r in jobs.list_jobs(client) if r.active and r.remote_dir == rec.remote_dir]
        return max(mine, key=lambda r: r.id) if mine else None

    found = app.fleet().map(latest)
    recs = [(host, rec) for host, rec in found.values() if rec is not None]
    if not recs:
        for r in found.failed:  # out of reach (a host without this project's jobs is no news)
            if r.error is not None and r.error.exit_code != ExitCode.ERROR:
                app.env.stderr.write(f"remotedl: {r.host}: {safe(str(r.error))}\n")
        what = "running job" if active else "job"
        raise RemotedlError(
            f"no {what} of this project on {', '.join(app.hosts)}",
            hint="`remotedl jobs` lists the jobs of every host as HOST:ID",
        )
    host, rec = max(recs, key=lambda hr: (hr[1].created or 0.0, hr[1].id))
    return app.for_host(host), str(rec.id)


def _follow(
    app: App,
    client: AgentClient,
    job_id: int,
    ref: str | None = None,
    on_end: Callable[[JobRecord], None] | None = None,
) -> int:
    """Follow a job's log to its end; ``ref`` is how the user names it (``HOST:ID`` on a fleet);
    ``on_end`` (pull outputs, desktop notification) runs before the job's exit status is passed on."""
    from remotedl import jobs

    spec = client.spec
    shown = ref or str(job_id)
    # --json (`logs -f`, a followed `run`): the log as JSON Lines, never raw bytes
    write, flush = _json_lines_writer(app.env) if app.json else _writer(app.env)

    def reconnecting(n: int) -> None:
        app.env.stderr.write(f"remotedl: connection lost, reconnecting (attempt {n})...\n")

    from remotedl.cli.slurm import state_notes

    try:
        rec = jobs.stream_logs(
            client,
            str(job_id),
            write,
            follow=True,
            on_reconnect=reconnecting,
            warn=warner(app.env),
            on_state=state_notes(app, shown),
        )
    except KeyboardInterrupt:
        flush()
        app.env.stderr.write(
            f"\nremotedl: detached; job {job_id} keeps running on {spec.alias}.\n"
            f"  follow again: remotedl logs -f {shown}    attach: remotedl attach {shown}    "
            f"stop: remotedl kill {shown}\n"
        )
        return ExitCode.INTERRUPTED
    flush()
    if on_end is not None:
        on_end(rec)
    if rec.status == "killed":
        app.env.stderr.write(f"remotedl: job {rec.id} was killed\n")
    code = rec.exit_code if rec.exit_code is not None else 1
    if rec.status == "lost":
        why = safe(rec.error or "its processes vanished")
        app.env.stderr.write(f"remotedl: job {rec.id} was lost ({why})\n")
    if code != 0:
        raise JobFailed(f"job {rec.id} exited with {code}", code)
    return ExitCode.OK


@contextlib.contextmanager
def _status_line(app: App, text: str) -> Iterator[Callable[[str], None]]:
    """A one-line spinner on a terminal that shows the latest installer line; nothing otherwise."""
    if app.json or not getattr(app.env.stderr, "isatty", lambda: False)():
        yield lambda line: None
        return
    from rich.markup import escape

    with app.err_console.status(escape(text)) as status:
        yield lambda line: status.update(escape(f"{text}: {safe(line)[:100]}"))


def sync_environment(
    app: App, client: AgentClient, rdir: str, spec: EnvSpec, *, force: bool = False
) -> EnvSyncResult:
    """Sync the project's environment on the box, showing progress; on failure the
    installer's last lines go to stderr before the error."""
    from remotedl import envsync

    env = app.env
    try:
        with _status_line(app, f"syncing the environment on {client.spec.alias}") as progress:
            result = envsync.sync(client, rdir, spec, force=force, progress=progress)
    except envsync.EnvSyncFailed as e:
        for line in e.output:
            env.stderr.write(f"  | {safe(line)}\n")
        raise
    if result.synced:
        env.stderr.write(
            f"remotedl: environment synced ({result.kind} -> {safe(result.target or '?')}) "
            f"in {result.seconds:.1f} s\n"
        )
    return result


def warn_push_changes_running(app: App, client: AgentClient, rdir: str, data: Sequence[str]) -> None:
    """With ``isolate = false`` jobs run in the work tree itself: say which ones a push (of
    these ``data`` paths) is about to change, before it goes ahead."""
    from remotedl import jobs

    root = app.settings.project.root
    limit = int(app.settings.get("max_snapshot_file"))
    for rec in jobs.push_conflicts(client, root, rdir, data=data, max_snapshot_file=limit):
        app.env.stderr.write(
            f"remotedl: warning: this push changes the files of running job {rec.id} "
            f"({safe(rec.name)}) in {safe(rec.cwd)} (isolate = false); going ahead\n"
        )


def cmd_run(args: argparse.Namespace, env: Environment) -> int:
    app = App(args, env)
    if app.is_fleet:
        from remotedl.cli.fleet import run_placed
        from remotedl.cli.slurm import refuse_in_fleet

        refuse_in_fleet(app)
        return run_placed(app, args)
    return run_on(app, args)


def run_on(app: App, args: argparse.Namespace, *, queue: bool | None = None) -> int:
    """``run`` on the one host of ``app`` (on a fleet: the host placement chose, narrowed with
    ``App.for_host``, with ``queue`` as placement says; its jobs are named ``HOST:ID``). A claim
    another laptop won first raises ``GpusBusy`` before anything is printed."""
    from remotedl import gpus as gpumod
    from remotedl import jobs, sync
    from remotedl.cli import slurm as slurmcli

    env = app.env
    s = app.settings
    if not args.command:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    command_argv = args.command[1:] if args.command[0] == "--" else args.command
    root = s.project.root
    command, script = jobs.build_command(command_argv, root, must_exist=not args.no_push)
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: give a number of GPUs (0 runs on the CPU)")
    # A Slurm login node: Slurm picks the GPUs (a count, never indices) and queues the job.
    slurm = slurmcli.settings_for(app, args)
    count = (slurmcli.gpu_count(args) or None) if slurm is not None else (args.gpus or None)
    gpus: str | list[int] | None = None
    if args.cpu or args.gpus == 0:
        gpus = "none"
    elif args.gpu and slurm is None:
        try:
            parsed = gpumod.parse_gpu_spec(args.gpu)
        except ValueError as e:
            raise UsageError(str(e)) from e
        gpus = "auto" if parsed is None else parsed
    job_env = {**s.get("env"), **_env_pairs(args.env)}
    notify_urls = _notify_urls(app)
    stall_after = jobs.parse_duration(s.get("stall_after"))
    pulls = [*s.get("pull_on_end"), *[p for p in args.pull if p not in s.get("pull_on_end")]]
    if args.pull and args.detach:
        raise UsageError(
            "--pull brings outputs home when the followed job ends; a detached job is not followed",
            hint="drop --detach, or later: remotedl pull --job ID PATH",
        )
    client = _client(app)
    spec = client.spec
    warn = warner(env)
    isolate = bool(s.get("isolate"))
    data = [*s.get("data"), *[d for d in args.data if d not in s.get("data")]]
    env_spec = jobs.EnvSpec.from_settings(s)
    commit: str | None = None
    head: str | None = None
    snapshot = False
    rdir = remote_dir(app)
    if not args.no_push:
        if not isolate:
            warn_push_changes_running(app, client, rdir, data)
        with progress_bar(env, not app.json) as progress:
            pushed = sync.push(
                spec, root, rdir, data=data, excludes=s.get("exclude"), progress=progress,
                dir_mode=str(s.get("remote_dir_mode")), max_snapshot_file=int(s.get("max_snapshot_file")),
            )  # fmt: skip
        if pushed.created_mode:
            env.stderr.write(f"remotedl: {made_line(spec.alias, pushed.remote_dir, pushed.created_mode)}\n")
        commit, head, snapshot, rdir = pushed.commit, pushed.head, pushed.snapshot, pushed.remote_dir
        # As push says it: a job that reads a file the snapshot left out fails on the box otherwise.
        for line in missing_data_lines(pushed.missing, root) + left_out_lines(
            pushed.left_out, int(s.get("max_snapshot_file"))
        ):
            env.stderr.write(f"remotedl: {safe(line)}\n")
    else:
        # Never another project's tree: checked in the start's own request where it can be.
        client.before = sync.verify_in_band(spec, root, rdir)
        rdir = sync.verify_remote_dir(spec, root, rdir) if client.before is None else rdir
    name = args.name or (script.rsplit("/", 1)[-1] if script else command_argv[0].rsplit("/", 1)[-1])
    # Outputs come home when the job ends; trackers write into its own directory (set on the box).
    from remotedl.cli import outputs as outputs_cli

    output_paths = outputs_cli.planned(app, args)
    started: JobRecord | None = None
    for attempt in range(3):
        try:
            rec = started = jobs.start(
                client,
                command=command,
                remote_dir=rdir,
                script=script,
                gpus=gpus,
                count=count,
                env=job_env,
                name=name,
                queue=args.queue if queue is None else queue,
                force=args.force,
                git_commit=commit,
                snapshot=snapshot,
                git_head=head if snapshot else None,
                snapshot_files=jobs.snapshot_files(root, head, commit) if snapshot else [],
                isolate=isolate,
                data=data,
                shared=s.get("shared"),
                environment=env_spec,
                env_check=attempt < 2,
                notify=notify_urls,
                host_alias=spec.alias,
                stall_after=stall_after,
                warn=warn,
                slurm=slurmcli.request(slurm) if slurm is not None else None,
                outputs=output_paths,
                trackers=bool(output_paths and s.get("trackers")),
                project_id=outputs_cli.project_id(app) if output_paths else None,
            )
            rdir = rec.remote_dir or rdir  # the tree's physical path, as the box found it
            # In the same try: from here the job runs, and an interrupt names it.
            jobs.keep_commit(root, spec.alias, rec)
            outputs_cli.register(app, rec, spec.alias, output_paths, env=job_env)
            break
        except KeyboardInterrupt:
            if started is not None:
                shown = app.job_ref(started.id)
                raise Interrupted(
                    f"interrupted: job {shown} ({safe(started.name)}) was started on {spec.alias} "
                    "and keeps running",
                    hint=f"`remotedl logs -f {shown}` follows it; `remotedl kill {shown}` stops it",
                ) from None
            # The request may have reached the box: the job then runs, and only this says so.
            on = f" --host {spec.alias}" if app.narrowed else ""
            raise Interrupted(
                f"interrupted while starting the job on {spec.alias}: it may be running there",
                hint=f"`remotedl{on} jobs` lists it; `remotedl{on} kill` stops this project's latest job",
            ) from None
        except jobs.EnvOutOfDate as e:
            files = ", ".join(str(f) for f in e.plan.get("files") or []) or str(e.plan.get("kind"))
            env.stderr.write(
                f"remotedl: {safe(files)} changed since the last environment sync on {spec.alias}: "
                f"syncing {safe(str(e.plan.get('target') or ''))}\n"
            )
            sync_environment(app, client, rdir, env_spec)
    ref = app.job_ref(rec.id)
    if app.json and args.detach:
        app.print_json({**rec.to_dict(), "alias": spec.alias} if app.narrowed else rec.to_dict())
        return ExitCode.OK
    if rec.scheduler == "slurm":
        said = slurmcli.submitted(rec, spec.alias)
        if args.detach:
            app.out(ref)
            env.stderr.write(f"{said}; `remotedl logs -f {ref}` to follow\n")
            return ExitCode.OK
        env.stderr.write(f"remotedl: {said}; Ctrl-C detaches\n")
        return _follow(
            app, client, rec.id, ref, on_end=lambda ended: _at_end(app, client, rdir, ended, pulls)
        )
    gpus_word = "GPU" if len(rec.gpus) == 1 else "GPUs"
    gpu_text = f"{gpus_word} {','.join(map(str, rec.gpus))}" if rec.gpus else "no GPU"
    if rec.status == "queued":
        gpu_text = "waiting for GPUs"
    where = f"in {rec.workdir}" if rec.workdir else f"in the work tree {rec.cwd}"
    if args.detach:
        app.out(ref)
        env.stderr.write(
            f"job {rec.id} ({safe(rec.name)}) {rec.state} on {spec.alias}, {gpu_text}, {safe(where)}; "
            f"`remotedl logs -f {ref}` to follow\n"
        )
        return ExitCode.OK
    env.stderr.write(
        f"remotedl: job {rec.id} ({safe(rec.name)}) {rec.state} on {spec.alias}, {gpu_text}; "
        "Ctrl-C detaches\n"
    )
    return _follow(app, client, rec.id, ref, on_end=lambda ended: _at_end(app, client, rdir, ended, pulls))


def _notify_urls(app: App) -> list[str]:
    """The job's notification URLs (config ``notify`` + ``--notify``), each checked here, so a
    typo fails the run now rather than a notification hours later."""
    from remotedl import notify
    from remotedl.errors import ConfigError

    if app.flag("no_notify"):
        return []
    s = app.settings
    configured = [str(u) for u in s.get("notify")]
    for url in configured:
        try:
            notify.parse(url)
        except notify.NotifyURLError as e:
            raise ConfigError(
                f"{s.source('notify')}: notify: {e}", hint="fix the URL in the config"
            ) from None
    given = [str(u) for u in app.flag("notify") or []]
    for url in given:
        try:
            notify.parse(url)
        except notify.NotifyURLError as e:
            raise UsageError(f"--notify: {e}") from None
    return [*configured, *[u for u in given if u not in configured]]


def _at_end(app: App, client: AgentClient, rdir: str, rec: JobRecord, pulls: list[str]) -> None:
    """When the followed job ended: its outputs home (outputs, --pull / pull_on_end), then a desktop
    notification (notify_desktop = true). A failed pull is an error once the job succeeded."""
    from remotedl.cli.sync import kept_lines, pull_sources, pulled_lines
    from remotedl.errors import RemotedlError

    env = app.env
    failure: RemotedlError | None = None
    from remotedl.cli.outputs import fetch_ended

    try:
        fetch_ended(app, client, rec)
    except RemotedlError as e:
        env.stderr.write(f"remotedl: outputs of job {rec.id} not fetched ({e}); `remotedl outputs` resumes\n")
    if pulls:
        try:
            results = pull_sources(app, client, rdir, pulls, job=str(rec.id))
        except RemotedlError as e:
            failure = e
            env.stderr.write(f"remotedl: could not pull {', '.join(pulls)} from job {rec.id}: {e}\n")
        else:
            for line in pulled_lines(results):
                env.stderr.write(f"remotedl: pulled {line}\n")
            for line in kept_lines(results):
                env.stderr.write(f"remotedl: {line}\n")
    if app.settings.get("notify_desktop"):
        from remotedl import notify
        from remotedl.desktop import notify_desktop

        ev = notify.job_event(rec.to_dict(), rec.status, client.spec.alias)
        shown = notify_desktop(ev.title, ev.text, env.environ)
        if not shown.shown and shown.tool:
            env.stderr.write(
                f"remotedl: no desktop notification ({shown.tool}: {safe(shown.error or '?')})\n"
            )
    if failure is not None and rec.status == "succeeded":
        raise failure


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def cmd_jobs(args: argparse.Namespace, env: Environment) -> int:
    from rich.table import Table
    from rich.text import Text

    from remotedl import jobs

    if args.action == "show":
        return _show(*route(App(args, env), args.ids[0] if args.ids else None))
    if args.action in ("rm", "prune"):
        return _remove(args, env)
    if args.ids:
        raise UsageError(f"unexpected {' '.join(args.ids)}", hint="`remotedl jobs rm ID...` removes jobs")
    app = App(args, env)
    if app.is_fleet:
        from remotedl.cli.fleet import jobs_table

        return jobs_table(app, args)
    records = jobs.list_jobs(_client(app), all_jobs=args.all, warn=warner(env))
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
        table.add_row(Text(str(r.id)), *job_cells(r))
    app.console.print(table)
    return ExitCode.OK


def job_cells(r: JobRecord) -> list[Text]:
    """A job's row in a jobs table after its id: name, status, GPUs, exit, started, duration,
    command. Names and commands come from the box as typed: plain text, never rich markup."""
    from rich.text import Text

    look = "stalled" if r.status == "running" and r.stalled else r.status
    return [
        Text(safe(r.name)),
        Text(r.state, style=STATUS_STYLE.get(look, "")),
        Text(",".join(map(str, r.gpus)) or "-"),
        Text("-" if r.exit_code is None else str(r.exit_code)),
        Text(_when(r.started)),
        Text(_duration(r.duration) if r.started else "-"),
        Text(safe(r.command)),
    ]


def _job_ids(words: list[str]) -> list[int]:
    ids = []
    for w in words:
        if not w.isdigit():
            raise UsageError(f"jobs rm {w}: give job ids (numbers)", hint="`remotedl jobs --all` lists them")
        ids.append(int(w))
    return ids


def _remove(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app = App(args, env)
    if args.action == "rm":
        if not args.ids:
            raise UsageError("name the jobs to remove: `remotedl jobs rm ID...`")
        routed = [app.route_job(w) for w in args.ids]  # HOST:ID, all of one host
        hosts = {a.hosts[0] if a.hosts else "" for a, _ in routed}
        if len(hosts) > 1:
            raise UsageError("jobs rm works on one host at a time", hint="give the ids of one host")
        app = routed[0][0]
        ids = _job_ids([ref or "" for _, ref in routed])
    elif args.ids:
        raise UsageError("jobs prune takes no ids", hint="use --older-than AGE, or `jobs rm ID...`")
    older = jobs.parse_age(args.older_than) if args.older_than else 0.0
    client = _client(app)
    rdir = remote_dir(app)

    def go(dry_run: bool) -> jobs.Removal:
        if args.action == "rm":
            return jobs.remove(client, ids, dry_run=dry_run)
        return jobs.prune(client, rdir, older_than=older, dry_run=dry_run)

    plan = go(True)
    for why in plan.refused:
        env.stderr.write(f"remotedl: {safe(why)}\n")
    if not plan.removed:
        if app.json:
            app.print_json(plan.to_dict())
        else:
            app.out("nothing to remove")
        return ExitCode.ERROR if plan.refused else ExitCode.OK
    ids_text = ", ".join(str(r.id) for r in plan.removed)
    what = f"{plural(len(plan.removed), 'job')} ({ids_text}), {_size(plan.bytes)}"
    if not args.yes:
        if not env.stdin_isatty:
            raise UsageError(f"this would remove {what}", hint="run again with --yes to remove them")
        env.stderr.write(f"remove {what} on {client.spec.alias}? [y/N] ")
        env.stderr.flush()
        if input().strip().lower() not in ("y", "yes"):
            env.stderr.write("nothing removed\n")
            return ExitCode.ERROR
    from remotedl.cli.outputs import fetch_before_removal

    fetch_before_removal(app, client, [r.id for r in plan.removed])  # their outputs go first
    done = go(False)
    if app.json:
        app.print_json(done.to_dict())
    else:
        for r in done.removed:
            app.out(f"removed job {r.id} ({safe(r.name or '?')}, {r.status}): {_size(r.bytes)}")
        app.out(f"freed {_size(done.bytes)} on {client.spec.alias}")
    return ExitCode.ERROR if done.refused else ExitCode.OK


def _environment_text(rec: JobRecord) -> str:
    e = rec.environment
    if not e:
        return "-" if rec.ended else "(being probed)"
    parts = [str(e.get("python") or "no python found")]
    if e.get("python_version"):
        parts[0] += f" {e['python_version']}"
    if e.get("conda_default_env") or e.get("conda"):
        parts.append(f"conda {e.get('conda_default_env') or e.get('conda')}")
    elif e.get("virtual_env"):
        parts.append(f"venv {e['virtual_env']}")
    if e.get("env_setup"):
        parts.append(f"env_setup {e['env_setup']!r}")
    parts.append(f"torch {e['torch']}" if e.get("torch") else "no torch")
    return ", ".join(parts)


def _show(app: App, job: str | None) -> int:
    from remotedl import jobs

    client = _client(app)
    spec = client.spec
    rec = jobs.get_job(client, job, project=None if job else remote_dir(app), warn=warner(app.env))
    ref = None
    root = app.settings.project.root
    if rec.git_commit:
        ref = jobs.keep_commit(root, spec.alias, rec)
    from remotedl.cli.cloud import job_cost_of

    cost = job_cost_of(app, client, rec)  # None: the host has no price_per_hour
    if app.json:
        shown = {**rec.to_dict(), "alias": spec.alias, "ref": ref, "state": rec.state}
        app.print_json({**shown, **({"cost": cost.cost} if cost else {})})
        return ExitCode.OK
    status = rec.state + (f" ({rec.error})" if rec.error and rec.status != "failed" else "")
    if rec.stalled and rec.status == "running":
        status += f" since {_when(rec.stalled.get('since'))}: {rec.stalled.get('reason')} (still running)"
    rows: list[tuple[str, str]] = [
        ("status", status),
        ("host", f"{spec.alias} ({rec.host})" if rec.host else spec.alias),
        ("GPUs", ",".join(map(str, rec.gpus)) or "none (CPU)"),
        ("command", rec.command),
    ]
    if rec.scheduler == "slurm":
        on = f" on {rec.node}" if rec.node else ""
        rows.insert(2, ("Slurm job", f"{rec.slurm_id or '(being submitted)'}{on}, {rec.control_dir or '?'}"))
    if rec.git_commit:
        commit = rec.git_commit[:12]
        if rec.snapshot:
            on = f" on top of {rec.git_head[:12]}" if rec.git_head else ""
            files = ", ".join(rec.snapshot_files[:20])
            more = f" and {len(rec.snapshot_files) - 20} more" if len(rec.snapshot_files) > 20 else ""
            commit += f" (snapshot of uncommitted work{on}; changed: {files or '?'}{more})"
        rows.append(("commit", commit))
        rows.append(("ref", ref or "(not in this repository)"))
    else:
        rows.append(("commit", "none (not a git work tree)"))
    rows += [
        ("env keys", ", ".join(rec.env_keys) or "-"),
        ("environment", _environment_text(rec)),
        ("created", _when(rec.created)),
        ("started", _when(rec.started)),
        ("ended", _when(rec.ended)),
        ("duration", _duration_text(rec)),
        *([("cost", f"${cost.cost:,.2f} ({cost.share:.0%} of the box's GPUs)")] if cost else []),
        ("exit", "-" if rec.exit_code is None else str(rec.exit_code)),
        ("dir", f"{rec.workdir} (its own checkout)" if rec.workdir else f"{rec.cwd} (the work tree)"),
        ("log", rec.log),
        ("stall watch", f"after {_duration(rec.stall_after)}" if rec.stall_after else "off"),
        ("notify", ", ".join(rec.notify) or "-"),  # masked on the box already
    ]
    for n in rec.notifications:
        state = "sent" if n.get("ok") else f"NOT SENT: {n.get('error')}"
        rows.append(("notified", f"{n.get('event')} -> {n.get('url')} at {_when(n.get('at'))}: {state}"))
    app.out(f"job {rec.id} ({safe(rec.name)})")
    for key, value in rows:
        app.out(f"  {key:<12}{safe(value)}")
    return ExitCode.OK


def _duration_text(rec: JobRecord) -> str:
    """The job's duration; a start ahead of this machine's clock says the clocks differ."""
    if not rec.started:
        return "-"
    took = rec.duration
    if took is not None and took <= -1:
        return f"? (it started {_duration(-took)} ahead of this machine's clock: the box's clock is ahead)"
    return _duration(took)


def cmd_show(args: argparse.Namespace, env: Environment) -> int:
    return _show(*route(App(args, env), args.job))


def cmd_diff(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job)
    client = _client(app)
    rec = jobs.get_job(client, args.job, project=None if args.job else remote_dir(app), warn=warner(env))
    root = app.settings.project.root
    s = app.settings
    text = jobs.diff(
        root, client.box, rec, stat=args.stat, color=env.stdout_isatty,
        data=list(s.get("data")), max_snapshot_file=int(s.get("max_snapshot_file")),
    )  # fmt: skip
    env.stdout.write(text)
    if not text:
        env.stderr.write(f"remotedl: no difference: the work tree has job {rec.id}'s code\n")
    return ExitCode.OK


def cmd_logs(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job)
    client = _client(app)
    project = None if args.job else remote_dir(app)
    if args.follow:
        rec = jobs.get_job(client, args.job, project=project, warn=warner(env))
        if args.lines is None:
            return _follow(app, client, rec.id, app.job_ref(rec.id))
        args.job, project = str(rec.id), None
    write, flush = _json_lines_writer(env) if app.json else _writer(env)
    out_fd = None
    if not app.json and getattr(env.stdout, "buffer", None) is not None:  # bytes may go to its fd
        try:
            out_fd = env.stdout.fileno()
        except (OSError, ValueError):
            out_fd = None
    from remotedl.cli.slurm import state_notes

    try:
        jobs.stream_logs(
            client,
            args.job,
            write,
            follow=args.follow,
            lines=args.lines,
            project=project,
            warn=warner(env),
            out_fd=out_fd,
            on_state=state_notes(app, str(args.job)) if args.follow else None,
        )
    finally:
        flush()
    return ExitCode.OK


def cmd_kill(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job, active=True)
    project = None if args.job else remote_dir(app)
    rec = jobs.kill(_client(app), args.job, grace=args.grace, project=project, warn=warner(env))
    if app.json:
        app.print_json(rec.to_dict())
    else:
        app.out(f"job {app.job_ref(rec.id)} ({safe(rec.name)}): {rec.state}")
    return ExitCode.OK


def cmd_attach(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job, active=True)
    client = _client(app)
    spec = client.spec
    project = None if args.job else remote_dir(app)
    rec = jobs.get_job(client, args.job, project=project, warn=warner(env))
    if rec.status not in ("running", "queued", "starting"):
        raise UsageError(
            f"job {rec.id} is {rec.state}: nothing to attach to",
            hint=f"read its log with `remotedl logs {rec.id}`",
        )
    if not env.stdin_isatty:
        raise UsageError("attach needs a terminal", hint=f"use `remotedl logs -f {rec.id}` in scripts")
    argv = jobs.attach_argv(spec, rec)
    if rec.scheduler == "slurm":
        env.stderr.write(
            f"a shell in job {rec.id}'s allocation (Slurm job {rec.slurm_id} on {safe(rec.node or '?')}); "
            "`exit` leaves it, the job keeps running\n"
        )
    else:
        env.stderr.write(f"attaching to job {rec.id}; detach with Ctrl-b d (the job keeps running)\n")
    return subprocess.call(argv, stdin=sys.stdin, stdout=sys.stdout)

