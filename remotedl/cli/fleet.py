"""Fleet views: status of several boxes as one GPU table, `top`, and push to several boxes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.cli.common import cell_text, report_failures, seconds_text, size_text
from remotedl.env import Environment
from remotedl.errors import ExitCode, UsageError
from remotedl.words import plural, printable

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from remotedl.cloud import CloudHost
    from remotedl.fleet import FleetResult
    from remotedl.gpus import Gpu
    from remotedl.status import BoxStatus
    from remotedl.top import BoxSample


def _mem(used: int | None, total: int | None) -> str:
    return f"{size_text((used or 0) << 20)} / {size_text((total or 0) << 20)}"


def gpu_row(host: str, st_held_by: dict[int, str], g: Gpu) -> dict[str, Any]:
    from remotedl.status import holder

    kind, words = holder(st_held_by, g)
    return {
        "host": host,
        "index": g.index,
        "name": g.name,
        "memory_used_mib": g.memory_used_mib,
        "memory_total_mib": g.memory_total_mib,
        "utilization_pct": g.utilization_pct,
        "holder": kind,
        "held_by": None if kind == "free" else words,
        "processes": [
            {"pid": p.pid, "name": p.name, "user": p.user, "used_memory_mib": p.used_memory_mib}
            for p in g.processes
        ],
    }


# ------------------------------------------------------------------ status


def status(app: App) -> int:
    """`remotedl status` on several hosts: one table of every GPU of every box, a line per box
    without GPUs or out of reach."""
    from rich.table import Table

    from remotedl.fleet import fleet_status

    result: FleetResult[BoxStatus] = fleet_status(app.fleet())
    rows = [gpu_row(host, st.held_by, g) for host, st in result.values() for g in st.gpus]
    if app.json:
        app.print_json(
            {
                "hosts": [
                    {"host": r.host, "ok": r.ok, "status": r.value.to_dict() if r.value else None}
                    | ({"error": r.error_dict()} if r.error else {})
                    for r in result.results
                ],
                "gpus": rows,
            }
        )
        return result.exit_code
    c = app.console
    free = sum(1 for row in rows if row["holder"] == "free")
    c.print(
        f"{plural(len(result.ok), 'box', 'boxes')} of {len(result.results)} reachable, "
        f"{plural(len(rows), 'GPU')} ({free} free)",
        markup=False,
    )
    if rows:
        table = Table(box=None, pad_edge=False)
        for col in ("host", "GPU", "name", "memory used / total", "util", "held by"):
            table.add_column(col, no_wrap=col != "held by")
        for row in rows:
            util = "[N/A]" if row["utilization_pct"] is None else f"{row['utilization_pct']}%"
            table.add_row(
                *map(
                    cell_text,
                    (
                        row["host"],
                        str(row["index"]),
                        row["name"],
                        _mem(row["memory_used_mib"], row["memory_total_mib"]),
                        util,
                        row["held_by"] or "free",
                    ),
                )
            )
        c.print(table)
    for host, st in result.values():
        if st.nvidia_error:
            c.print(cell_text(f"{host}: no GPUs: {st.nvidia_error}"))
    report_failures(app, result.failed)
    return result.exit_code


# ------------------------------------------------------------------ push


def _bar(done: float, total: float, width: int = 12) -> Text:
    """A bar as one line of text (cheaper to lay out than rich's ProgressBar, which matters at
    one refresh of every GPU every two seconds)."""
    from rich.text import Text

    share = min(max(done / total, 0.0), 1.0) if total else 0.0
    style = "red" if share >= 0.9 else "yellow" if share >= 0.6 else "green"
    filled = round(share * width)
    bar = Text("━" * filled, style=style)
    bar.append("━" * (width - filled), style="grey23")
    return bar


_HOLDER_STYLE = {"job": "cyan", "process": "magenta", "free": "green"}


def render_top(
    samples: list[BoxSample],
    interval: float,
    *,
    footer: bool = True,
    clouds: dict[str, CloudHost] | None = None,
) -> RenderableType:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from remotedl.status import holder

    now = time.time()
    gpus = [(s, g) for s in samples for g in s.gpus]
    free = sum(1 for s, g in gpus if not s.held_by.get(g.index) and not g.processes)
    running = [(s.host, j) for s in samples for j in s.jobs if j.status in ("running", "starting")]
    queued = [(s.host, j) for s in samples for j in s.jobs if j.status == "queued"]
    live = sum(1 for s in samples if s.state == "live")
    head = Text(
        f"remotedl top: {live}/{plural(len(samples), 'box', 'boxes')} live, "
        f"{plural(len(gpus), 'GPU')} ({free} free), {len(running)} running, {len(queued)} queued",
        style="bold",
    )
    parts: list[RenderableType] = [head]
    table = Table(box=None, pad_edge=False, expand=False)
    for col in ("host", "GPU", "name", "util", "", "memory", "", "held by"):
        table.add_column(col, no_wrap=True)
    for s, g in gpus:
        util = g.utilization_pct
        used, total = g.memory_used_mib or 0, g.memory_total_mib or 0
        kind, words = holder(s.held_by, g)
        table.add_row(
            cell_text(s.host),
            Text(str(g.index)),
            cell_text(g.name),
            _bar(util or 0, 100),
            Text("N/A" if util is None else f"{util:>3}%"),
            _bar(used, total),
            Text(_mem(used, total)),
            Text(printable(words, newlines=False), style=_HOLDER_STYLE[kind]),
        )
    if gpus:
        parts.append(table)
    jobs = Table(box=None, pad_edge=False)
    for col in ("host", "job", "name", "status", "GPUs", "for", "command"):
        jobs.add_column(col, no_wrap=col != "command", overflow="ellipsis")
    for host, j in [*running, *queued]:
        since = j.started or j.created
        jobs.add_row(
            cell_text(host),
            Text(str(j.id)),
            cell_text(j.name),
            Text(j.status, style="cyan" if j.status == "running" else "yellow"),
            Text(",".join(map(str, j.gpus)) or "-"),
            Text(seconds_text(now - since) if since else "-"),
            cell_text(j.command),
        )
    if running or queued:
        parts += [Text(""), jobs]
    notes: list[RenderableType] = []
    for s in samples:
        if s.state == "live" and s.nvidia_error:
            notes.append(cell_text(f"{s.host}: no GPUs: {s.nvidia_error}"))
        elif s.state == "connecting":
            notes.append(Text(f"{s.host}: connecting...", style="yellow"))
        elif s.state in ("reconnecting", "down"):
            word = "down" if s.state == "down" else f"reconnecting (attempt {s.attempts})"
            age = f"; last sample {seconds_text(now - s.sampled)} ago" if s.sampled else ""
            notes.append(Text(printable(f"{s.host}: {word}: {s.error}{age}", newlines=False), style="red"))
    for host, cloud in (clouds or {}).items():
        if cloud.status.running:  # a cloud VM: its running cost, now
            from remotedl.cli.cloud import status_words

            at_now = dataclasses.replace(cloud.status, now=dt.datetime.now(dt.timezone.utc))
            notes.append(cell_text(f"{host}: {status_words(dataclasses.replace(cloud, status=at_now))}"))
    if notes:
        parts += [Text(""), *notes]
    if footer:
        parts += [Text(""), Text(f"every {interval:g} s; q or Ctrl-C quits", style="dim")]
    return Group(*parts)


def _snapshot_dict(samples: list[BoxSample], interval: float) -> dict[str, Any]:
    return {"time": time.time(), "interval": interval, "boxes": [s.to_dict() for s in samples]}


def _snapshot_code(samples: list[BoxSample]) -> int:
    return int(ExitCode.OK) if all(s.state == "live" for s in samples) else int(ExitCode.CONNECTION)


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    """Keys arrive one by one, unechoed; Ctrl-C still interrupts. Restored on the way out."""
    import termios
    import tty

    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def cmd_top(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.top import Watch, targets_for

    app = App(args, env)
    interval = float(args.interval)
    if not interval > 0:
        raise UsageError(f"--interval {args.interval}: give seconds between refreshes, e.g. 2")
    fleet = app.fleet()
    first_wait = float(app.base_settings.get("connect_timeout")) + 10
    targets = targets_for(fleet)
    clouds = {name: m.cloud for name, m in app.resolved.items() if m.cloud is not None}
    if args.once or (app.json and not env.stdin_isatty):
        with Watch(targets, interval) as watch:
            watch.wait_first(first_wait)
            if args.once:
                samples = watch.snapshot()
                if app.json:
                    app.print_json(_snapshot_dict(samples, interval))
                else:
                    app.console.print(render_top(samples, interval, footer=False, clouds=clouds))
                return _snapshot_code(samples)
            return _json_stream(app, watch, interval)
    if app.json:
        with Watch(targets, interval) as watch:
            watch.wait_first(first_wait)
            return _json_stream(app, watch, interval)
    if not (env.stdin_isatty and env.stdout_isatty):
        raise UsageError(
            "top needs a terminal",
            hint="`remotedl top --once` prints one view; `--json` one line per refresh",
        )
    return _live(app, targets, interval, clouds)


def _json_stream(app: App, watch: Any, interval: float) -> int:
    import json

    try:
        while True:
            app.env.stdout.write(json.dumps(_snapshot_dict(watch.snapshot(), interval), default=str) + "\n")
            app.env.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return int(ExitCode.OK)


def _live(app: App, targets: Any, interval: float, clouds: dict[str, CloudHost] | None = None) -> int:
    import select

    from rich.live import Live

    from remotedl.top import Watch

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    closed = False

    def wake() -> None:
        if not closed:
            with contextlib.suppress(OSError):
                os.write(wake_w, b".")

    fd = sys.stdin.fileno()
    watch = Watch(targets, interval, on_change=wake)
    try:
        with (
            watch,
            _cbreak(fd),
            Live(console=app.console, screen=True, auto_refresh=False, transient=True) as live,
        ):
            next_tick = 0.0
            while True:
                now = time.monotonic()
                if now >= next_tick:
                    live.update(render_top(watch.snapshot(), interval, clouds=clouds), refresh=True)
                    next_tick = now + interval
                ready, _, _ = select.select([fd, wake_r], [], [], max(0.0, next_tick - time.monotonic()))
                if wake_r in ready:
                    os.read(wake_r, 4096)
                    next_tick = 0.0  # a box changed state: show it now
                if fd in ready:
                    keys = os.read(fd, 64)
                    if not keys or b"q" in keys.lower():
                        break
                    if b"\x0c" in keys:  # Ctrl-L: redraw
                        next_tick = 0.0
    except KeyboardInterrupt:
        pass
    finally:
        closed = True  # the watchers are stopped (`with watch`); none writes to a closed pipe
        os.close(wake_r)
        os.close(wake_w)
    return int(ExitCode.OK)


# ------------------------------------------------------------------ run, jobs
