"""setup, doctor."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.cli.common import remote_dir
from remotedl.cli.statusline import StatusLine
from remotedl.env import Environment
from remotedl.errors import ConfigError, ExitCode, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl import playbooks as pb

MARK = {
    "ok": "ok",
    "changed": "changed",
    "would-change": "would change",
    "failed": "FAILED",
    "skipped": "skipped",
}


class StepStatus:
    """While a step runs, one status line: the step and the time it has taken so far."""

    def __init__(self, env: Environment, *, enabled: bool) -> None:
        self.line = StatusLine(env, enabled=enabled)

    def begin(self, event: pb.StepEvent) -> None:
        where = f"{event.index}/{event.total}" if event.total > 1 else ""
        self.line.begin(f"{event.step} ({where})" if where else event.step)

    def end(self) -> None:
        self.line.end()

    def __enter__(self) -> StepStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def cmd_setup(args: argparse.Namespace, env: Environment) -> int:
    from rich.markup import escape

    from remotedl import playbooks as pb
    from remotedl.ssh import open_box

    app = App(args, env)
    root = app.settings.project.root
    if args.list:
        seen = {}
        for d in (root / "playbooks", pb.shipped_dir()):
            for f in sorted(d.glob("*.y*ml")) if d.is_dir() else []:
                if f.stem not in seen:
                    seen[f.stem] = pb.load(f)
        if app.json:
            app.print_json(
                [{"name": n, "path": str(b.path), "description": b.description} for n, b in seen.items()]
            )
        for n, b in seen.items():
            if not app.json:
                app.out(f"{n:<15} {b.description.strip()}  ({b.path})")
        return ExitCode.OK
    books = [pb.load(pb.find(name, root)) for name in (args.playbooks or ["base"])]
    origins = [pb.origin(book, root) for book in books]
    _require_allowed_playbooks(app, books, origins)
    variables = {str(k): str(v) for k, v in app.settings.table("playbook_vars").items()}
    for pair in args.var:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--var {pair!r}: use NAME=VALUE")
        variables[key] = value
    pb.check_vars(variables)
    spec = app.spec()
    results = []
    with open_box(spec) as box, StepStatus(env, enabled=not app.json) as status:
        facts = pb.box_facts(box, remote_dir(app), app.settings.project.name)
        for book in books:
            if not app.json:
                whose = pb.origin(book, root).whose
                app.console.print(
                    f"[bold]playbook {escape(book.name)}[/bold] "
                    f"({'the project' if whose == 'project' else whose}: {escape(str(book.path))})"
                    + (" (check: nothing changes)" if args.check else ""),
                    highlight=False,
                )

            def show(r: pb.StepResult) -> None:
                status.end()
                if app.json:
                    return
                style = {"failed": "red", "changed": "yellow", "would-change": "yellow"}.get(r.status, "")
                mark = f"[{style}]{MARK[r.status]:<12}[/{style}]" if style else f"{MARK[r.status]:<12}"
                app.console.print(f"  {mark} {escape(r.name)}", highlight=False)
                if r.output:
                    for line in r.output.splitlines()[-20:]:
                        app.console.print(f"               {line}", markup=False, highlight=False)
                # Whole: cut, the commands lose their variables and can no longer be pasted.
                for line in r.as_root.splitlines():
                    app.console.print(f"               {line}", markup=False, highlight=False)

            result = pb.run_playbook(
                box,
                book,
                {**facts.variables(), **variables},
                check_only=args.check,
                prove=pb.login_prover(box),
                on_step=show,
                on_begin=status.begin,
            )
            results.append(result)
            if not app.json:
                app.out(
                    f"  {result.count('ok')} ok, {result.count('changed')} changed, "
                    f"{result.count('would-change')} would change, {result.count('failed')} failed, "
                    f"{result.count('skipped')} skipped"
                )
            if result.failed:
                break
    if app.json:
        app.print_json([r.to_dict() for r in results])
    return ExitCode.ERROR if any(r.failed for r in results) else ExitCode.OK


def _require_allowed_playbooks(app: App, books: list[pb.Playbook], origins: list[pb.Origin]) -> None:
    """A project's playbook that replaces a shipped one or runs steps as root runs only as the
    user allowed it (``remotedl allow`` covers the project's playbooks/)."""
    from remotedl.config import allow_files, is_allowed

    project = app.settings.project
    for book, where in zip(books, origins, strict=True):
        if not where.needs_allow:
            continue
        if book.path not in allow_files(app.env, project):
            raise ConfigError(
                f"playbook {book.path} is the project's and {where.needs_allow}; "
                "remotedl runs such a playbook only from the project's playbooks/ once allowed",
                hint="move it to playbooks/, read it, then run `remotedl allow`",
            )
        if not is_allowed(app.env, project):
            raise ConfigError(
                f"playbook {book.path} is the project's and {where.needs_allow}; "
                "remotedl does not run it until you allow this version of the project's files",
                hint="read it, then run `remotedl allow`",
            )


def cmd_doctor(args: argparse.Namespace, env: Environment) -> int:
    from rich.markup import escape

    from remotedl import doctor

    app = App(args, env)
    if args.nodes:
        from remotedl.cli.multinode import doctor_nodes

        return doctor_nodes(app)
    report = doctor.run_checks(
        app.env, app.settings, app.host_alias(), spec_factory=app.spec, remote_dir=remote_dir(app)
    )
    if app.json:
        app.print_json(report.to_dict())
    else:
        for c in report.checks:
            style = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}[c.status]
            # Details hold text like "no [dns] configuration" and remote output: never markup.
            app.console.print(
                f"[{style}]{c.status.upper():<5}[/{style}] {c.where:<6} {escape(c.name)}: {escape(c.detail)}",
                highlight=False,
            )
            if c.fix and c.status in ("warn", "fail"):
                app.console.print(f"              fix: {c.fix}", markup=False, highlight=False)
        warnings = plural(report.count("warn"), "warning")
        app.out(f"{report.count('ok')} ok, {warnings}, {report.count('fail')} failed")
    return ExitCode.ERROR if report.count("fail") else ExitCode.OK
