"""push, pull."""

from __future__ import annotations

import argparse

from remotedl.cli.app import App
from remotedl.cli.basic import _size
from remotedl.cli.progress import progress_bar
from remotedl.env import Environment
from remotedl.errors import ExitCode
from remotedl.words import plural


def remote_dir(app: App) -> str:
    return str(app.flag("remote_dir") or app.settings.remote_dir)


def cmd_push(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import sync

    app = App(args, env)
    if app.is_fleet:
        from remotedl.cli import fleet

        return fleet.push(app, args)
    s = app.settings
    data = [] if args.no_data else list(s.get("data"))
    data += [d for d in args.data if d not in data]
    spec = app.spec()
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
    if app.json:
        app.print_json(result.to_dict())
        return ExitCode.OK
    if result.commit:
        what = f"snapshot {result.commit[:10]} of uncommitted work on {(result.head or '-')[:10]}"
        what = what if result.snapshot else f"commit {result.commit[:10]}"
        state = "checked out" if result.code_changed else "already there"
        app.out(f"code  {what} -> {spec.alias}:{result.remote_dir} ({state})")
    for t in result.transfers:
        app.out(f"data  {t.path}: {plural(t.files_transferred, 'file')}, {_size(t.bytes_transferred)} sent")
    return ExitCode.OK


def cmd_pull(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import sync

    app = App(args, env)
    s = app.settings
    spec = app.spec()
    with progress_bar(env, not app.json) as progress:
        result = sync.pull(
            spec,
            s.project.root,
            remote_dir(app),
            args.paths,
            excludes=[*s.get("exclude"), *args.exclude],
            progress=progress,
        )
    if app.json:
        app.print_json(result.to_dict())
        return ExitCode.OK
    for t in result.transfers:
        app.out(f"{t.path}: {plural(t.files_transferred, 'file')}, {_size(t.bytes_transferred)} received")
    return ExitCode.OK
