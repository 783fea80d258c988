"""push, pull."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.basic import _size
from remotedl.cli.progress import progress_bar
from remotedl.env import Environment
from remotedl.errors import ExitCode
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.jobs import PullSource
    from remotedl.sync import PullResult


def remote_dir(app: App) -> str:
    return str(app.flag("remote_dir") or app.settings.remote_dir)


def cmd_push(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import sync

    app = App(args, env)
    s = app.settings
    data = [] if args.no_data else list(s.get("data"))
    data += [d for d in args.data if d not in data]
    spec = app.spec()
    client = None
    if not args.no_code and not s.get("isolate"):
        from remotedl.cli.jobs import _client, warn_push_changes_running

        # Jobs run in the work tree itself (isolate = false): say which ones this push changes.
        client = _client(app)
        warn_push_changes_running(app, client, remote_dir(app))
    with progress_bar(env, not app.json) as progress:
        result = sync.push(
            spec,
            s.project.root,
            remote_dir(app),
            data=data,
            excludes=[*s.get("exclude"), *args.exclude],
            delete=args.delete,
            force=args.force,
            code=not args.no_code,
            progress=progress,
        )
    synced = None
    if getattr(args, "env", False):
        from remotedl import jobs
        from remotedl.cli.jobs import _client, sync_environment

        client = client or _client(app)
        synced = sync_environment(app, client, result.remote_dir, jobs.EnvSpec.from_settings(s))
    if app.json:
        app.print_json({**result.to_dict(), **({"environment": synced.to_dict()} if synced else {})})
        return ExitCode.OK
    if result.commit:
        what = f"snapshot {result.commit[:10]} of uncommitted work on {(result.head or '-')[:10]}"
        what = what if result.snapshot else f"commit {result.commit[:10]}"
        state = "checked out" if result.code_changed else "already there"
        app.out(f"code  {what} -> {spec.alias}:{result.remote_dir} ({state})")
    for t in result.transfers:
        app.out(f"data  {t.path}: {plural(t.files_transferred, 'file')}, {_size(t.bytes_transferred)} sent")
    if synced is not None:
        state = "synced" if synced.synced else ("up to date" if synced.needed else "nothing to sync")
        app.out(f"env   {synced.kind or 'no requirements'} -> {synced.target or '-'} ({state})")
    return ExitCode.OK


def pull_sources(
    app: App,
    client: AgentClient,
    rdir: str,
    paths: list[str],
    *,
    job: str | None = None,
    tree: bool = False,
    excludes: list[str] | None = None,
) -> list[tuple[PullSource, PullResult]]:
    """Pull each path from where it lives on the box (this project's latest job that has it,
    ``job``'s directory, or the work tree with ``tree``), as ``pull`` does: newer local files
    are kept, nothing is deleted."""
    from remotedl import jobs, sync

    s = app.settings
    spec = client.spec
    sources = jobs.locate(client, rdir, paths, job=job, tree=tree)
    results = []
    with progress_bar(app.env, not app.json) as progress:
        for src in sources:
            skip = [*s.get("exclude"), *(excludes or [])]
            if src.job is not None and not src.shared:
                # A job's checkout: its git link and its links to the shared data stay on the box.
                skip += [".git", *(f"/{link}" for link in src.links)]
            result = sync.pull(
                spec,
                s.project.root,
                rdir,
                [src.path],
                excludes=skip,
                progress=progress,
                source_dir=src.dir,
            )
            results.append((src, result))
    return results


def pulled_lines(results: list[tuple[PullSource, PullResult]]) -> list[str]:
    from remotedl.cli.jobs import safe

    lines = []
    for src, r in results:
        if src.job is None:
            origin = "the work tree"
        elif src.shared:
            origin = f"the work tree (shared by job {src.job}, {safe(src.name or '?')})"
        else:
            origin = f"job {src.job} ({safe(src.name or '?')})"
        for t in r.transfers:
            lines.append(
                f"{t.path}: {plural(t.files_transferred, 'file')}, {_size(t.bytes_transferred)} received "
                f"from {origin}"
            )
    return lines


def cmd_pull(args: argparse.Namespace, env: Environment) -> int:
    """Each path from this project's latest job that has it (``--job``: that job's directory;
    ``--tree``: the shared work tree); data and shared paths live in the work tree."""
    from remotedl.cli.jobs import _client

    app = App(args, env)
    s = app.settings
    client = _client(app)
    results = pull_sources(
        app, client, remote_dir(app), args.paths, job=args.job, tree=args.tree, excludes=args.exclude
    )
    if app.json:
        app.print_json(
            {
                "local_dir": str(s.project.root),
                "transfers": [
                    {**t.__dict__, "job": src.job, "source_dir": src.dir}
                    for src, r in results
                    for t in r.transfers
                ],
            }
        )
        return ExitCode.OK
    for line in pulled_lines(results):
        app.out(line)
    return ExitCode.OK
