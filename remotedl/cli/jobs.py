"""run, jobs (rm, prune, show), logs, kill, attach, show, diff."""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.common import (
    agent_client,
    cell_text,
    import_meanwhile,
    is_run_ref,
    json_lines_writer,
    log_writer,
    remote_dir,
    report_failures,
    route,
    safe,
    seconds_text,
    size_text,
    warner,
)
from remotedl.env import Environment
from remotedl.errors import ExitCode, JobFailed, RemotedlError, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from rich.text import Text

    from remotedl.agent.client import AgentClient
    from remotedl.jobs import JobRecord
    from remotedl.multinode import RunRow

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


def _follow(
    app: App,
    client: AgentClient,
    job_id: int,
    ref: str | None = None,
    on_end: Callable[[JobRecord], None] | None = None,
    *,
    node: int | None = None,
) -> int:
    """Follow a job's log to its end; ``ref`` is how the user names it (``HOST:ID`` on a fleet);
    ``on_end`` (pull outputs, desktop notification) runs before the job's exit status is passed on;
    ``node``: only that node's lines of a multi-node Slurm job."""
    from remotedl import jobs
    from remotedl.cli.slurm import node_lines

    spec = client.spec
    shown = ref or str(job_id)
    # --json (`logs -f`, a followed `run`): the log as JSON Lines, never raw bytes
    write, flush = json_lines_writer(app.env) if app.json else log_writer(app.env)
    if node is not None:
        write, flush = node_lines(write, flush, node)

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


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%m-%d %H:%M:%S")


def cmd_jobs(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    if args.action == "show":
        return _show(*route(App(args, env), args.ids[0] if args.ids else None))
    if args.action in ("rm", "prune"):
        return _remove(args, env)
    if args.ids:
        raise UsageError(f"unexpected {' '.join(args.ids)}", hint="`remotedl jobs rm ID...` removes jobs")
    app = App(args, env)
    if app.is_fleet:
        return jobs_table(app, args)
    if app.json:
        app.print_json(jobs.list_job_dicts(agent_client(app), all_jobs=args.all, warn=warner(env)))
        return ExitCode.OK
    client = agent_client(app)
    import_meanwhile("rich.table", "rich.text", "rich.console")  # the table's, while the box answers
    records = jobs.list_jobs(client, all_jobs=args.all, warn=warner(env))
    if not records:
        app.out("no jobs on the box yet; start one with `remotedl run COMMAND`")
        return ExitCode.OK
    from rich.table import Table  # the table only: --json goes without rich
    from rich.text import Text

    # Names and commands come from the box as typed: plain text, never rich markup.
    labels = project_labels([("", r.remote_dir) for r in records])
    table = Table(box=None, pad_edge=False)
    for col in job_columns(("id",), labels):
        table.add_column(col, no_wrap=col != "command")
    for r in records:
        table.add_row(Text(str(r.id)), *job_cells(r, labels.get(("", r.remote_dir))))
    app.console.print(table)
    return ExitCode.OK


def project_labels(where: list[tuple[str, str | None]]) -> dict[tuple[str, str | None], str]:
    """Short names for the projects of a jobs table's rows, each ``(host, remote_dir)``: the
    work tree's own directory name, with as many parent directories as tell apart two trees of
    one host with the same name ("-" for a record without one). Empty when the rows are all of
    one project (the table then has no project column)."""
    from pathlib import PurePosixPath

    dirs: dict[str, set[str]] = {}
    for host, d in where:
        if d:
            dirs.setdefault(host, set()).add(d)
    labels: dict[tuple[str, str | None], str] = {(host, None): "-" for host, d in where if not d}
    for host, same_host in dirs.items():
        parts = {d: PurePosixPath(d).parts for d in same_host}
        for d, p in parts.items():
            n = 1
            while n < len(p) and any(o != d and q[-n:] == p[-n:] for o, q in parts.items()):
                n += 1
            labels[(host, d)] = str(PurePosixPath(*p[-n:]))
    return labels if len(set(labels.values())) > 1 else {}


def job_columns(first: tuple[str, ...], labels: dict[tuple[str, str | None], str]) -> list[str]:
    """A jobs table's columns: ``first`` (id, or host and job), the job's, and "project" before
    the command where the jobs are of more than one project."""
    cols = [*first, "name", "status", "GPUs", "exit", "started", "duration", "command"]
    return [*cols[:-1], "project", cols[-1]] if labels else cols


def job_cells(r: JobRecord, project: str | None = None) -> list[Text]:
    """A job's row in a jobs table after its id: name, status, GPUs, exit, started, duration,
    the ``project`` if given (``project_labels``), command. Names and commands come from the box
    as typed: plain text, never rich markup."""
    from rich.text import Text

    look = "stalled" if r.status == "running" and r.stalled else r.status
    return [
        Text(safe(r.name)),
        Text(r.state, style=STATUS_STYLE.get(look, "")),
        Text(",".join(map(str, r.gpus)) or "-"),
        Text("-" if r.exit_code is None else str(r.exit_code)),
        Text(_when(r.started)),
        Text(seconds_text(r.duration) if r.started else "-"),
        *([Text(safe(project))] if project else []),
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
    client = agent_client(app)
    rdir = remote_dir(app)

    def go(dry_run: bool) -> jobs.Removal:
        if args.action == "rm":
            return jobs.remove(client, ids, dry_run=dry_run)
        return jobs.prune(client, rdir, older_than=older, dry_run=dry_run)

    plan = go(True)
    if not plan.removed and plan.refused and not app.json:
        # Nothing to do but refusals (`jobs rm 999`): one error, as every other error reads.
        raise RemotedlError(
            "; ".join(safe(why) for why in plan.refused),
            hint=f"`remotedl jobs --all` lists the jobs on {client.spec.alias}",
        )
    for why in plan.refused:
        env.stderr.write(f"remotedl: error: {safe(why)}\n")
    if not plan.removed:
        if app.json:
            app.print_json(plan.to_dict())
        else:
            app.out("nothing to remove")
        return ExitCode.ERROR if plan.refused else ExitCode.OK
    ids_text = ", ".join(str(r.id) for r in plan.removed)
    what = f"{plural(len(plan.removed), 'job')} ({ids_text}), {size_text(plan.bytes)}"
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
            app.out(f"removed job {r.id} ({safe(r.name or '?')}, {r.status}): {size_text(r.bytes)}")
        app.out(f"freed {size_text(done.bytes)} on {client.spec.alias}")
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
    from remotedl.snapshot import snapshot_holds, snapshot_words

    client = agent_client(app)
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
            held = snapshot_holds(root, rec.git_head, rec.git_commit) if rec.git_head else []
            changed = f"; changed: {files or '?'}{more}" if "uncommitted work" in held or not held else ""
            commit += f" (snapshot {snapshot_words(held)}{on}{changed})"
        rows.append(("commit", commit))
        rows.append(("ref", ref or "(not in this repository)"))
    else:
        rows.append(("commit", "none (not a git work tree)"))
    if rec.image:
        ran = rec.image_digest or "(digest not known yet)"
        engine = rec.engine.rsplit("/", 1)[-1] if rec.engine else "?"
        rows.append(("image", f"{rec.image} ({ran}), {engine} container {rec.container or '?'}"))
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
        ("stall watch", f"after {seconds_text(rec.stall_after)}" if rec.stall_after else "off"),
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
        return f"? (it started {seconds_text(-took)} ahead of this machine's clock: the box's clock is ahead)"
    return seconds_text(took)


def cmd_show(args: argparse.Namespace, env: Environment) -> int:
    if is_run_ref(args.job):  # a multi-node run: the run and each node's job
        from remotedl.cli import multinode

        return multinode.show_run(App(args, env), args.job)
    return _show(*route(App(args, env), args.job))


def cmd_diff(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job)
    client = agent_client(app)
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

    if is_run_ref(args.job):  # a multi-node run: every node's log, or --node R's
        from remotedl.cli import multinode

        if args.node is None:
            return multinode.logs_run(App(args, env), args.job, follow=args.follow)
        args.job = multinode.node_ref(App(args, env), args.job, args.node)
        args.node = None
    app, args.job = route(App(args, env), args.job)
    client = agent_client(app)
    project = None if args.job else remote_dir(app)
    if args.node is not None:  # a multi-node Slurm job: one node's lines (srun labels them)
        from remotedl.cli.slurm import check_node

        rec = jobs.get_job(client, args.job, project=project, warn=warner(env))
        check_node(rec, args.node)
        args.job, project = str(rec.id), None
    if args.follow:
        rec = jobs.get_job(client, args.job, project=project, warn=warner(env))
        if args.lines is None:
            return _follow(app, client, rec.id, app.job_ref(rec.id), node=args.node)
        args.job, project = str(rec.id), None
    write, flush = json_lines_writer(env) if app.json else log_writer(env)
    if args.node is not None:
        from remotedl.cli.slurm import node_lines

        write, flush = node_lines(write, flush, args.node)
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

    if is_run_ref(args.job):  # a multi-node run: every node
        from remotedl.cli import multinode

        return multinode.kill_run(App(args, env), args.job, grace=args.grace)
    app, args.job = route(App(args, env), args.job, active=True)
    project = None if args.job else remote_dir(app)
    rec = jobs.kill(agent_client(app), args.job, grace=args.grace, project=project, warn=warner(env))
    if app.json:
        app.print_json(rec.to_dict())
    else:
        app.out(f"job {app.job_ref(rec.id)} ({safe(rec.name)}): {rec.state}")
    return ExitCode.OK


def cmd_attach(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import jobs

    app, args.job = route(App(args, env), args.job, active=True)
    client = agent_client(app)
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


def run_cells(run: RunRow, project: str | None = None) -> list[Text]:
    """A multi-node run's row: its hosts, its id, and per node its job and GPUs (``project``:
    its first node's, as ``job_cells`` takes it)."""
    from rich.text import Text

    first = run.nodes[0][2]
    cells = job_cells(first, project)
    look = "failed" if run.state.startswith("failed") else run.state
    cells[1] = Text(run.state, style=STATUS_STYLE.get(look, ""))
    cells[2] = Text(" ".join(f"{h}:{','.join(map(str, r.gpus)) or '-'}" for _, h, r in run.nodes))
    cells[3] = Text("-" if run.exit_code is None else str(run.exit_code))
    cells[0] = Text(f"{safe(run.name)} ({len(run.nodes)} nodes: "
                    + ", ".join(f"{h}:{r.id}" for _, h, r in run.nodes) + ")")  # fmt: skip
    return [cell_text(",".join(h for _, h, _ in run.nodes)), Text(run.run_id), *cells]


def jobs_table(app: App, args: argparse.Namespace) -> int:
    """`remotedl jobs` on a fleet: every host's jobs in one table, ids as HOST:ID."""
    from rich.table import Table
    from rich.text import Text

    from remotedl import jobs
    from remotedl.cli.jobs import job_cells
    from remotedl.fleet import Member

    def listed(m: Member) -> list[JobRecord]:
        return jobs.list_jobs(m.client(), all_jobs=args.all)

    from remotedl.multinode import group_runs

    result = app.fleet().map(listed)
    rows = [(host, r) for host, recs in result.values() for r in recs]
    runs, singles = group_runs(rows)  # a multi-node run is one row, its nodes' ids kept
    if app.json:
        app.print_json(
            {
                "jobs": [{**r.to_dict(), "alias": host, "ref": f"{host}:{r.id}"} for host, r in rows],
                "runs": [{"run": x.run_id, "name": x.name, "state": x.state, "exit_code": x.exit_code,
                          "nodes": [{"rank": k, "host": h, "ref": f"{h}:{r.id}", "status": r.status}
                                    for k, h, r in x.nodes]} for x in runs],
                "hosts": [{"host": x.host, "ok": x.ok} | ({"error": x.error_dict()} if x.error else {})
                          for x in result.results],
            }
        )  # fmt: skip
        return result.exit_code
    if not rows and not result.failed:
        app.out(f"no jobs on {', '.join(app.hosts)} yet; start one with `remotedl run COMMAND`")
    if rows:
        labels = project_labels([(host, r.remote_dir) for host, r in rows])
        table = Table(box=None, pad_edge=False)
        for col in job_columns(("host", "job"), labels):
            table.add_column(col, no_wrap=col != "command")
        for host, r in singles:
            cells = job_cells(r, labels.get((host, r.remote_dir)))
            table.add_row(cell_text(host), Text(f"{host}:{r.id}"), *cells)
        for run in runs:
            _, host, first = run.nodes[0]
            table.add_row(*run_cells(run, labels.get((host, first.remote_dir))))
        app.console.print(table)
    report_failures(app, result.failed)
    return result.exit_code


def cmd_images(args: argparse.Namespace, env: Environment) -> int:
    """The container images on the box (its engine's), the one jobs use marked."""
    from remotedl.images import list_images, same_image
    from remotedl.ssh import open_box

    app = App(args, env)
    spec = app.spec()
    with open_box(spec) as box:
        found = list_images(box, app.settings.get("container"))
    if app.json:
        app.print_json(found.to_dict())
        return ExitCode.OK
    wanted = str(app.settings.get("image") or "")
    engine = found.engine.rsplit("/", 1)[-1]
    if not found.images:
        app.out(f"no images in {engine} on {spec.alias}")
        return ExitCode.OK
    width = max(len(i.name) for i in found.images)
    for i in found.images:
        mark = "*" if wanted and same_image(wanted, i.name) else " "
        app.out(safe(f"{mark} {i.name:<{width}}  {i.id:<19}  {i.size:>8}  {i.created}"))
    if wanted and not any(same_image(wanted, i.name) for i in found.images):
        env.stderr.write(f"remotedl: {safe(wanted)} (image) is not on {spec.alias}: the first run pulls it\n")
    return ExitCode.OK
