"""dns update / check / watch."""

from __future__ import annotations

import argparse
import time

from remotedl.cli.app import App
from remotedl.env import Environment
from remotedl.errors import ExitCode, RemotedlError


def _line(app: App, report: object) -> None:
    from remotedl.ddns.update import DnsReport

    assert isinstance(report, DnsReport)
    for f in report.families:
        served = ", ".join(f.served) or "nothing"
        verb = {
            "unchanged": f"already {f.detected}: nothing sent",
            "updated": f"{served} -> {f.detected} (now serving {', '.join(f.served_after) or 'nothing'})",
            "would-update": f"would change {served} -> {f.detected} (dry run: nothing sent)",
        }.get(f.action, f.action)
        app.out(f"{report.name} {f.record}: {verb}")


def cmd_dns(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.ddns import settings as dset
    from remotedl.ddns import update as dupd

    app = App(args, env)
    s = dset.parse(
        app.settings.table("dns"),
        f"[dns] ({app.settings.tables['dns'].source})" if "dns" in app.settings.tables else "[dns]",
    )
    if args.action == "check":
        report = dupd.check(s, env.environ)
        error = None
        if not report.in_sync:
            bad = [f for f in report.families if f.action != "unchanged"]
            error = RemotedlError(
                "; ".join(
                    f"{f.record} record is {', '.join(f.served) or 'missing'} but the public "
                    f"address is {f.detected}"
                    for f in bad
                ),
                hint="run `remotedl dns update`",
            )
        if app.json:
            # One object on stdout: the report, and when they differ the error fields as well.
            failed: dict[str, object] = {}
            if error:
                failed = {"error": error.message, "hint": error.hint, "exit_code": int(error.exit_code)}
            app.print_json({**report.to_dict(), **failed})
            return int(error.exit_code) if error else ExitCode.OK
        for f in report.families:
            served = ", ".join(f.served) or "nothing"
            state = "matches" if f.action == "unchanged" else "DIFFERS"
            app.out(f"{report.name} {f.record}: public address {f.detected}, DNS serves {served}: {state}")
        if error:
            raise error
        return ExitCode.OK
    if args.action == "update":
        report = dupd.update(s, env.environ, env.state_dir, dry_run=args.dry_run, force=args.force)
        if app.json:
            app.print_json(report.to_dict())
        else:
            _line(app, report)
        return ExitCode.OK

    interval = dupd.parse_interval(args.interval)

    def show(report: object, err: RemotedlError | None) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if err is not None:
            env.stderr.write(f"{stamp} remotedl: error: {err.message}\n")
            env.stderr.flush()
        else:
            env.stdout.write(f"{stamp} ")
            _line(app, report)
        env.stdout.flush()

    dupd.watch(s, env.environ, env.state_dir, interval=interval, report=show, runs=args.runs)
    return ExitCode.OK
