"""push (and push --watch), pull."""

from __future__ import annotations

import argparse
import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.common import (
    agent_client,
    cell_text,
    remote_dir,
    report_failures,
    route,
    safe,
    size_text,
    sync_environment,
    warn_push_changes_running,
)
from remotedl.cli.progress import LiveProgress, progress_bar
from remotedl.env import Environment
from remotedl.errors import ExitCode
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.jobs import PullSource
    from remotedl.snapshot import LeftOut
    from remotedl.sync import PullResult, PushResult, Transfer
    from remotedl.watch import WatchEvent


def left_out_lines(left: Sequence[LeftOut], limit: int) -> list[str]:
    """The one short listing of what the snapshot did not carry, with the fix."""
    if not left:
        return []
    large = [x for x in left if x.reason == "large"]
    envs = [x for x in left if x.reason == "environment"]
    repos = [x for x in left if x.reason == "repository"]
    subs = [x for x in left if x.reason == "submodule"]
    edited = [x for x in left if x.reason == "submodule-edits"]
    pointers = [x for x in left if x.reason == "lfs-pointer"]
    pulled = [x for x in left if x.reason == "pulled"]
    lines = []

    def names(items: Sequence[LeftOut], sized: bool = False) -> str:
        shown = [f"{x.path} ({size_text(x.size)})" if sized else x.path for x in items[:5]]
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        return ", ".join(shown) + more

    if large:
        lines.append(
            f"left out  {names(large, True)}: untracked, over max_snapshot_file ({size_text(limit)}); "
            "add to .gitignore, or to `data` in remotedl.toml to rsync"
        )
    if envs:
        lines.append(f"left out  {names(envs)}: environment (the box makes its own); add to .gitignore")
    if repos:
        lines.append(f"left out  {names(repos)}: a repository of its own; add as a submodule or to `data`")
    if subs:
        init = " ".join(shlex.quote(x.path.rstrip("/")) for x in subs)
        lines.append(
            f"left out  {names(subs)}: submodule not initialised here (the box gets an empty "
            f"directory); run `git submodule update --init --recursive {init}`"
        )
    if edited:
        lines.append(
            f"note      {names(edited)}: submodule with uncommitted changes: they go along, as the "
            "project's own do (commit them in the submodule to keep them)"
        )
    if pointers:
        lines.append(
            f"lfs       {names(pointers)}: only a Git LFS pointer here, and so on the box; "
            "fetch the content with `git lfs pull`, then push"
        )
    if pulled:
        lines.append(f"left out  {names(pulled)}: brought by pull (outputs, not code); `git add` to push it")
    return lines


def missing_data_lines(missing: Sequence[str], root: object) -> list[str]:
    """The warning for data paths this clone does not have: the code went, they did not."""
    if not missing:
        return []
    return [
        f"warning: data path {_listed(list(missing), 5)} does not exist in {root}: not sent "
        "(the box's copy, if any, is left as it is); the code was pushed"
    ]


def _files(t: Transfer) -> str:
    return f"{plural(t.files_transferred, 'file')}, {size_text(t.bytes_transferred)}"


def made_line(alias: str, remote_dir: str, mode: str) -> str:
    """What push says when it made remote_dir: who can read it there."""
    bits = int(mode, 8)
    if bits & 0o007:
        who = "every user of the box can read it"
    elif bits & 0o070:
        who = "you and your group can read it"
    else:
        who = "only you can read it (remote_dir_mode opens it to a group)"
    return f"made  {alias}:{remote_dir} mode {mode}: {who}"


def _push_lines(result: PushResult, alias: str, limit: int, root: Path) -> list[str]:
    from remotedl.snapshot import snapshot_holds, snapshot_words

    lines = []
    if result.commit and result.snapshot:
        held = snapshot_holds(root, result.head, result.commit) if result.head else []
        what = f"snapshot {result.commit[:10]} {snapshot_words(held)} on {(result.head or '-')[:10]}"
    elif result.commit:
        what = f"commit {result.commit[:10]}"
    if result.commit:
        state = "checked out" if result.code_changed else "already there"
        lines.append(f"code  {what} -> {alias}:{result.remote_dir} ({state})")
    if result.created_mode:
        lines.append(made_line(alias, result.remote_dir, result.created_mode))
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
    if app.is_fleet:
        return push_fleet(app, args)
    s = app.settings
    data, excludes, limit = _settings(app, args)
    spec = app.spec()
    if getattr(args, "watch", False):
        return _watch(app, args, data, excludes, limit)
    client = None
    if not args.no_code and not s.get("isolate"):
        # Jobs run in the work tree itself (isolate = false): say which ones this push changes.
        client = agent_client(app)
        warn_push_changes_running(app, client, remote_dir(app), data)
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
            dir_mode=str(s.get("remote_dir_mode")),
        )
    for line in missing_data_lines(result.missing, s.project.root):
        env.stderr.write(f"remotedl: {line}\n")
    synced = None
    if getattr(args, "env", False):
        from remotedl import jobs

        client = client or agent_client(app)
        synced = sync_environment(app, client, result.remote_dir, jobs.EnvSpec.from_settings(s))
    if app.json:
        app.print_json({**result.to_dict(), **({"environment": synced.to_dict()} if synced else {})})
        return ExitCode.OK
    for line in _push_lines(result, spec.alias, limit, app.settings.project.root):
        app.out(line)
    if synced is not None:
        state = "synced" if synced.synced else ("up to date" if synced.needed else "nothing to sync")
        app.out(f"env   {synced.kind or 'no requirements'} -> {synced.target or '-'} ({state})")
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
            left = missing_data_lines(r.missing, app.settings.project.root)
            left += left_out_lines(r.left_out, limit)
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
                dir_mode=str(app.settings.get("remote_dir_mode")),
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

    lines = []
    for src, r in results:
        if src.job is None:
            origin = "the work tree"
        elif src.shared:
            origin = f"the work tree (shared by job {src.job}, {safe(src.name or '?')})"
        else:
            origin = f"job {src.job} ({safe(src.name or '?')})"
        kept = [*r.kept, *r.kept_tracked, *r.kept_newer]
        for t in r.transfers:
            mine = [k for k in kept if t.path in (".", k) or k.startswith(t.path + "/")]
            why = " (up to date here)" if not t.files_transferred and not mine else ""
            lines.append(
                f"{t.path}: {plural(t.files_transferred, 'file')}, {size_text(t.bytes_transferred)} received "
                f"from {origin}{why}"
            )
        if r.replaced:
            lines.append(f"replaced {_listed(r.replaced, 10)} here: the box's copy is newer")
        for name in r.replaced_tracked:
            lines.append(
                f"replaced {name} here (tracked): named in the pull; `git restore {name}` brings back the "
                "committed version"
            )
    return lines


def kept_lines(results: list[tuple[PullSource, PullResult]]) -> list[str]:
    """What pull left alone here, and why (stderr)."""
    edited = [k for _, r in results for k in r.kept]
    tracked = [k for _, r in results for k in r.kept_tracked]
    newer = [k for _, r in results for k in r.kept_newer]
    out = []
    if edited:
        out.append(
            f"kept {_listed(edited, 10)} here: tracked, with uncommitted edits, and the box has another "
            "version\n  hint: commit or stash your edits, then pull again to take the box's version"
        )
    if tracked:
        out.append(
            f"kept {_listed(tracked, 10)} here: tracked files (the box has another version); pull writes a "
            "tracked file only when it is named\n  hint: to take the box's version, name the file: "
            f"remotedl pull [--job ID] {tracked[0]}"
        )
    if newer:
        out.append(f"kept {_listed(newer, 10)} here: newer than the box's copy")
    return out


def cmd_pull(args: argparse.Namespace, env: Environment) -> int:
    """Each path from this project's latest job that has it (``--job``: that job's directory;
    ``--tree``: the shared work tree); data and shared paths live in the work tree."""

    app = App(args, env)
    if args.job:
        app, args.job = app.route_job(args.job)  # --job HOST:ID names the host
    elif app.is_fleet:
        app, _ = route(app, None)  # the host of this project's latest job; there, as on one host
    s = app.settings
    client = agent_client(app)
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
                "kept": [k for _, r in results for k in r.kept],
                **{
                    key: [k for _, r in results for k in getattr(r, key)]
                    for key in ("kept_tracked", "kept_newer", "replaced", "replaced_tracked")
                },
            }
        )
        return ExitCode.OK
    for line in pulled_lines(results):
        app.out(line)
    for line in kept_lines(results):
        env.stderr.write(f"remotedl: {line}\n")
    return ExitCode.OK


def push_fleet(app: App, args: argparse.Namespace) -> int:
    """`remotedl push` to several hosts at once, with a progress line per host."""
    from remotedl import sync
    from remotedl.cli.progress import fleet_progress
    from remotedl.cli.sync import missing_data_lines
    from remotedl.fleet import Member

    fleet = app.fleet()

    with fleet_progress(app.env, fleet.hosts, enabled=not app.json) as bars:

        def one(m: Member) -> PushResult:
            s = m.settings
            data = [] if args.no_data else list(s.get("data"))
            data += [d for d in args.data if d not in data]
            return sync.push(
                m.spec,
                s.project.root,
                str(args.remote_dir or m.remote_dir),
                data=data,
                excludes=[*s.get("exclude"), *args.exclude],
                delete=args.delete,
                force=args.force,
                code=not args.no_code,
                max_snapshot_file=int(s.get("max_snapshot_file")),
                progress=bars.progress(m.name),
                dir_mode=str(s.get("remote_dir_mode")),
            )

        result = fleet.map(one, on_result=lambda r: bars.done(r.host, r.ok))
    missing = next((pushed.missing for _, pushed in result.values() if pushed.missing), [])
    for line in missing_data_lines(missing, app.settings.project.root):  # the same on every host
        app.env.stderr.write(f"remotedl: {line}\n")
    if app.json:
        app.print_json(
            {
                "hosts": [
                    {"host": r.host, "ok": r.ok, "result": r.value.to_dict() if r.value else None}
                    | ({"error": r.error_dict()} if r.error else {})
                    for r in result.results
                ]
            }
        )
        return result.exit_code
    for host, pushed in result.values():
        parts = []
        if pushed.commit:
            what = f"snapshot {pushed.commit[:10]}" if pushed.snapshot else f"commit {pushed.commit[:10]}"
            state = "checked out" if pushed.code_changed else "already there"
            parts.append(f"code {what} -> {pushed.remote_dir} ({state})")
        parts += [
            f"data {t.path}: {plural(t.files_transferred, 'file')}, {size_text(t.bytes_transferred)} sent"
            for t in pushed.transfers
        ]
        app.console.print(cell_text(f"{host}: " + "; ".join(parts or ["nothing to send"])))
    report_failures(app, result.failed)
    return result.exit_code


# ------------------------------------------------------------------ top
