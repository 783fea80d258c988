"""Helpers every CLI file may use: the bottom of ``remotedl.cli``. It imports no other command
module (only ``app``), so the command modules import downwards and never in a circle (checked by
tests/test_cli_layers.py). Terminal-safe text, sizes and durations, the log writers, the agent
client of a command's host, job routing on a fleet, the environment sync's status line."""

from __future__ import annotations

import codecs
import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.env import Environment
from remotedl.errors import ExitCode, RemotedlError
from remotedl.words import printable

if TYPE_CHECKING:
    from rich.text import Text

    from remotedl.agent.client import AgentClient
    from remotedl.envsync import EnvSyncResult
    from remotedl.fleet import HostResult
    from remotedl.jobs import EnvSpec, JobRecord
    from remotedl.run import RunProgress


# A multi-node run's name (`remotedl logs run-3`): `show`, `logs` and `kill` tell it from a job's
# here, without importing the multi-node module (and ``remotedl.run``) for every job.
RUN_PREFIX = "run-"


def is_run_ref(ref: str | None) -> bool:
    return bool(ref) and str(ref).startswith(RUN_PREFIX)


def import_meanwhile(*modules: str) -> None:
    """Import ``modules`` in a thread while this one waits for the box (its ssh holds no GIL):
    a text view's rich (~30 ms of imports) then costs nothing on top of the round trip. Not a
    daemon thread: an early exit waits for it, never stopping an import half done. A module that
    fails to import here fails again, with its error, where the command imports it."""
    import sys

    missing = [m for m in modules if m not in sys.modules]
    if not missing:
        return
    import importlib
    import logging
    import threading

    def load() -> None:
        for name in missing:
            try:
                importlib.import_module(name)
            except Exception:  # said where the command itself imports it
                return

    logging.getLogger("remotedl").debug("importing %s while the box answers", ", ".join(missing))
    threading.Thread(target=load, name="remotedl-import", daemon=False).start()


def safe(text: str) -> str:
    """Box text for the terminal: control characters (escape sequences) shown escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return str(n)


def seconds_text(seconds: float | None) -> str:
    """``1d 2h``, ``3h 4m``, ``5m 6s``. Below zero (a job whose start, by the box's clock, lies
    ahead of this machine's: the box's clock is ahead) no length can be told: ``?``, as kubectl
    says ``<invalid>``, never ``-1d 22h``; less than a second below is rounding: ``0m 0s``."""
    if seconds is None or seconds <= -1:
        return "?"
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s"


def remote_dir(app: App) -> str:
    return str(app.flag("remote_dir") or app.settings.remote_dir)


def warner(env: Environment) -> Callable[[str], None]:
    def warn(text: str) -> None:
        env.stderr.write(f"remotedl: warning: {safe(text)}\n")

    return warn


def log_writer(env: Environment) -> tuple[Callable[[bytes], None], Callable[[], None]]:
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


def json_lines_writer(env: Environment) -> tuple[Callable[[bytes], None], Callable[[], None]]:
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


def adopt_request(app: App) -> dict[str, str] | None:
    """The agent's ``adopt`` field where this command works in the default remote_dir."""
    return None if app.flag("remote_dir") else app.settings.adopt_request()


def agent_client(app: App) -> AgentClient:
    from remotedl.agent.client import AgentClient

    return AgentClient(app.spec(), python=str(app.settings.get("python")), adopt=adopt_request(app))


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


@contextlib.contextmanager
def installer_status(app: App, text: str) -> Iterator[Callable[[str], None]]:
    """A one-line spinner on a terminal that shows the latest installer line; nothing otherwise."""
    if app.json or not getattr(app.env.stderr, "isatty", lambda: False)():
        yield lambda line: None
        return
    from rich.markup import escape

    with app.err_console.status(escape(text)) as status:
        yield lambda line: status.update(escape(f"{text}: {safe(line)[:100]}"))


def status_progress(app: App) -> RunProgress:
    """A run's progress on stderr without a log or bars: notes, warnings, the installer's
    status line while the environment syncs and its last lines when that fails."""
    from remotedl.run import RunProgress

    warn = warner(app.env)

    class Shown(RunProgress):
        def note(self, text: str) -> None:
            app.env.stderr.write(f"remotedl: {safe(text)}\n")

        def warn(self, text: str) -> None:
            warn(text)

        @contextlib.contextmanager
        def env_sync(self, text: str) -> Iterator[Callable[[str], None]]:
            with installer_status(app, text) as say:
                yield say

        def env_sync_failed(self, output: Sequence[str]) -> None:
            for line in output:
                app.env.stderr.write(f"  | {safe(line)}\n")

    return Shown()


def sync_environment(
    app: App, client: AgentClient, rdir: str, spec: EnvSpec, *, force: bool = False
) -> EnvSyncResult:
    """Sync the project's environment on the box, showing progress; on failure the
    installer's last lines go to stderr before the error."""
    from remotedl.run import sync_environment as sync_env

    return sync_env(client, rdir, spec, status_progress(app), force=force)


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


def cell_text(value: str) -> Text:
    """Box text as a table cell: escaped control characters, no rich markup."""
    from rich.text import Text

    return Text(printable(value, newlines=False))


def error_line(r: HostResult[Any]) -> str:
    assert r.error is not None
    hint = f" ({r.error.hint})" if r.error.hint else ""
    return f"{r.host}: {r.error.message}{hint}"


def report_failures(app: App, failed: Sequence[HostResult[Any]]) -> None:
    for r in failed:
        app.err_console.print(cell_text(error_line(r)), style="red")
