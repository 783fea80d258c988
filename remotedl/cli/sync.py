"""push (and push --watch), pull."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.basic import _size
from remotedl.cli.progress import LiveProgress, progress_bar
from remotedl.env import Environment
from remotedl.errors import ExitCode
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.snapshot import LeftOut
    from remotedl.sync import PushResult, Transfer
    from remotedl.watch import WatchEvent


def remote_dir(app: App) -> str:
    return str(app.flag("remote_dir") or app.settings.remote_dir)


def left_out_lines(left: Sequence[LeftOut], limit: int) -> list[str]:
    """The one short listing of what the snapshot did not carry, with the fix."""
    if not left:
        return []
    large = [x for x in left if x.reason == "large"]
    envs = [x for x in left if x.reason == "environment"]
    repos = [x for x in left if x.reason == "repository"]
    lines = []

    def names(items: Sequence[LeftOut], sized: bool = False) -> str:
        shown = [f"{x.path} ({_size(x.size)})" if sized else x.path for x in items[:5]]
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return ", ".join(shown) + more

    if large:
        lines.append(
            f"left out  {names(large, True)}: untracked, over max_snapshot_file ({_size(limit)}); "
            "add to .gitignore, or to `data` in remotedl.toml to rsync"
        )
    if envs:
        lines.append(f"left out  {names(envs)}: environment (the box makes its own); add to .gitignore")
    if repos:
        lines.append(f"left out  {names(repos)}: a repository of its own; add as a submodule or to `data`")
    return lines


def _files(t: Transfer) -> str:
    return f"{plural(t.files_transferred, 'file')}, {_size(t.bytes_transferred)}"


def _push_lines(result: PushResult, alias: str, limit: int) -> list[str]:
    lines = []
    if result.commit:
        what = f"snapshot {result.commit[:10]} of uncommitted work on {(result.head or '-')[:10]}"
        what = what if result.snapshot else f"commit {result.commit[:10]}"
        state = "checked out" if result.code_changed else "already there"
        lines.append(f"code  {what} -> {alias}:{result.remote_dir} ({state})")
    for t in result.transfers:
        lines.append(f"data  {t.path}: {_files(t)} sent")
    return lines + left_out_lines(result.left_out, limit)


def _settings(app: App, args: argparse.Namespace) -> tuple[list[str], list[str], int]:
    s = app.settings
    data = [] if args.no_data else list(s.get("data"))
    data += [d for d in args.data if d not in data]
    return data, [*s.get("exclude"), *args.exclude], int(s.get("max_snapshot_file"))


def cmd_push(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import sync

    app = App(args, env)
    s = app.settings
    data, excludes, limit = _settings(app, args)
    spec = app.spec()
    if getattr(args, "watch", False):
        return _watch(app, args, data, excludes, limit)
    with progress_bar(env, not app.json) as progress:
        result = sync.push(
            spec,
            s.project.root,
            remote_dir(app),
            data=data,
            excludes=excludes,
            delete=args.delete,
            force=args.force,
            code=not args.no_code,
            max_snapshot_file=limit,
            progress=progress,
        )
    if app.json:
        app.print_json(result.to_dict())
        return ExitCode.OK
    for line in _push_lines(result, spec.alias, limit):
        app.out(line)
    return ExitCode.OK


def _changed_text(changed: Sequence[str]) -> str:
    if not changed:
        return "first push"
    return _listed(changed, 3)


def _listed(items: Sequence[str], n: int) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _watch(app: App, args: argparse.Namespace, data: list[str], excludes: list[str], limit: int) -> int:
    """push --watch: a line per push (stdout; on a terminal above a status line that says what
    is happening now and what the last push sent), refusals and failures on stderr."""
    import json

    from remotedl import watch
    from remotedl.rsync import Stage

    env = app.env
    spec = app.spec()
    where = f"{spec.alias}:{remote_dir(app)}"
    isatty = bool(getattr(env.stderr, "isatty", lambda: False)()) and not app.json
    last_left: list[str] = []
    live: list[LiveProgress | None] = [None]

    def say(line: str, *, err: bool = False) -> None:
        if live[0] is not None:
            live[0].log(line)  # above the status line, which is redrawn below it
        elif err:
            env.stderr.write(line + "\n")
            env.stderr.flush()
        else:
            app.out(line)
            env.stdout.flush()

    def on_event(ev: WatchEvent) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(ev.at))
        if app.json:
            env.stdout.write(json.dumps(_event_dict(ev)) + "\n")
            env.stdout.flush()
            return
        if ev.kind == "pushed" and ev.result is not None:
            r = ev.result
            sent = []
            if r.code_changed and r.commit:
                sent.append(f"code {r.commit[:10]}")
            for t in r.transfers:
                if t.files_transferred:
                    sent.append(f"{t.path}: {_files(t)}")
            what = "; ".join(sent) or "nothing new"
            say(f"{stamp} pushed ({_changed_text(ev.changed)}) in {ev.seconds:.2f} s: {what}")
            left = left_out_lines(r.left_out, limit)
            if left != last_left:  # listed once, and again only when it changes
                for line in left:
                    say(f"         {line}")
                last_left[:] = left
            status = f"watching -> {where}; last push {stamp}: {what}; Ctrl-C ends"
        else:
            assert ev.error is not None
            word = "refused" if ev.kind == "refused" else "failed"
            say(f"{stamp} push {word} ({_changed_text(ev.changed)}): {ev.error.message}", err=True)
            if ev.error.hint:
                say(f"         hint: {ev.error.hint}", err=True)
            say("         still watching", err=True)
            status = f"watching -> {where}; last push {stamp} {word}; Ctrl-C ends"
        if live[0] is not None:
            live[0](Stage(status))

    if isatty:
        env.stderr.write(f"watching {app.settings.project.root} -> {where}; Ctrl-C ends\n")
    try:
        with progress_bar(env, isatty) as progress:
            live[0] = progress
            summary = watch.watch(
                spec,
                app.settings.project.root,
                remote_dir(app),
                data=data,
                excludes=excludes,
                delete=args.delete,
                force=args.force,
                max_snapshot_file=limit,
                on_event=on_event,
                progress=progress,
                max_pushes=getattr(args, "pushes", None),
            )
    except KeyboardInterrupt:
        env.stderr.write("stopped watching\n")
        return ExitCode.OK
    env.stderr.write(
        f"stopped watching after {plural(summary.pushes, 'push', 'pushes')}"
        + (f", {summary.refused} refused" if summary.refused else "")
        + "\n"
    )
    return ExitCode.OK


def _event_dict(ev: WatchEvent) -> dict[str, object]:
    out: dict[str, object] = {"event": ev.kind, "changed": ev.changed, "at": ev.at, "seconds": ev.seconds}
    if ev.result is not None:
        out["result"] = ev.result.to_dict()
    if ev.error is not None:
        out["error"] = ev.error.message
        out["hint"] = ev.error.hint
    return out


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
    if result.kept:
        shown = _listed(result.kept, 10)
        env.stderr.write(
            f"remotedl: kept {shown} here: tracked, with uncommitted edits, and the box has another version\n"
            "  hint: commit or stash your edits, then pull again to take the box's version\n"
        )
    return ExitCode.OK
