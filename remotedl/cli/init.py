"""init: a first box in one command (asks at a terminal; flags and --yes for scripts)."""

from __future__ import annotations

import argparse
import getpass
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from remotedl.cli.app import App
from remotedl.env import Environment
from remotedl.errors import ExitCode, UsageError
from remotedl.words import printable

if TYPE_CHECKING:
    from remotedl.init import InitPlan

_MARK = {"todo": "+", "done": "=", "check": "?", "blocked": "!"}


def _ask(env: Environment, question: str, default: str = "") -> str:
    shown = f" [{default}]" if default else ""
    env.stderr.write(f"{question}{shown}: ")
    env.stderr.flush()
    try:
        answer = input().strip()
    except EOFError:
        raise UsageError("no answer (stdin closed)", hint="pass the values as flags and --yes") from None
    return answer or default


def _yes(env: Environment, question: str, *, default: bool) -> bool:
    env.stderr.write(f"{question} {'[Y/n]' if default else '[y/N]'} ")
    env.stderr.flush()
    try:
        answer = input().strip().lower()
    except EOFError:
        return False
    return default if not answer else answer in ("y", "yes")


def cmd_init(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import init
    from remotedl.config import find_project
    from remotedl.init.project import find_data_dirs
    from remotedl.ssh.configfile import find_host_lines
    from remotedl.ssh.resolve import registered_box_config

    app = App(args, env)
    prompt = env.stdin_isatty and not args.yes
    # A cloned project's remotedl.toml (or REMOTEDL_HOST) may name its box already: set that one up.
    named = app.base_settings.get("host")
    alias = args.alias or app.flag("host") or (named if named and not any(c in named for c in ",@") else None)
    if not alias and prompt:
        alias = _ask(env, "A short name for the box (ssh and remotedl will call it that)", "gpubox")
    if not alias:
        raise UsageError(
            "which box? give it a name", hint="remotedl init ALIAS --hostname ADDRESS (or --host ALIAS)"
        )
    # The config the alias is read from everywhere else: the one named, a sandbox's own, ~/.ssh/config.
    config = app.base_settings.get("ssh_config")
    ssh_config = Path(config) if config else registered_box_config(env, alias) or init.default_ssh_config()
    hostname, user, port, jump = args.hostname, app.flag("user"), app.flag("port"), args.jump
    if prompt and not find_host_lines(ssh_config, alias):
        hostname = hostname or _ask(env, "The box's address (host name or IP)")
        user = user or _ask(env, "Your user name on the box", getpass.getuser())
        if port is None:
            answer = _ask(env, "Its SSH port", "22")
            if not answer.isdigit():
                raise UsageError(f"port {answer!r} is not a number")
            port = int(answer)
        if jump is None:
            jump = _ask(env, "A jump host it is reached through (ProxyJump; empty: none)") or None
    project = find_project(env.cwd)
    data: tuple[str, ...] | None = tuple(args.data) if args.data else None
    if args.no_data:
        data = ()
    elif data is None and prompt:
        found = find_data_dirs(project.root)
        if found:
            listed = ", ".join(f"{d.path}/ ({d.why})" for d in found)
            data = tuple(d.path for d in found) if _yes(env, f"Push {listed} as data?", default=True) else ()
    req = init.InitRequest(
        alias=alias,
        hostname=hostname,
        user=user,
        port=port,
        identity=app.flag("identity"),
        jump=jump,
        remote_dir=args.remote_dir,
        data=data,
        passphrase=not args.no_passphrase,
    )
    while True:
        try:
            plan = init.plan_init(env, req, ssh_config=ssh_config, project=project)
            break
        except init.AliasTaken as e:
            if not prompt:
                raise
            env.stderr.write(f"{e.message}\n")
            other = _ask(env, "Another name for this box (empty: stop)")
            if not other:
                raise
            req = replace(req, alias=other)
            alias = other
    if not plan.key_exists and prompt and req.passphrase:
        plan.choose_passphrase(_yes(env, f"Protect the new key {plan.key} with a passphrase?", default=True))
    if app.json and args.dry_run:
        app.print_json(plan.to_dict())
        return ExitCode.OK
    if not app.json and (args.dry_run or any(st.state != "done" for st in plan.steps if st.kind != "doctor")):
        _show_plan(app, plan)
    if args.dry_run:
        app.out("dry run: nothing changed")
        return ExitCode.OK
    if plan.host_key_error is not None:
        raise plan.host_key_error  # the box cannot be reached safely: change nothing, ask nothing
    approved: set[init.StepKind] = set()
    questions = plan.questions
    if args.yes:
        approved = {s.kind for s in questions}
    elif questions and not env.stdin_isatty:
        raise UsageError(
            "init needs your consent to: " + "; ".join(s.summary for s in questions),
            hint="run it at a terminal to be asked, or pass --yes to agree (--dry-run shows every change)",
        )
    else:
        for s in questions:
            assert s.ask is not None
            if _yes(env, s.ask, default=s.kind != "host-key"):
                approved.add(s.kind)
    if not plan.key_exists and plan.passphrase and not env.stdin_isatty:
        raise UsageError(
            f"a new key {plan.key} needs a passphrase typed at a terminal",
            hint="run init at a terminal, or pass --no-passphrase for a key without one",
        )

    def show(r: init.StepResult) -> None:
        if app.json:
            return
        mark = {"changed": "+", "unchanged": "=", "ok": "=", "skipped": "-", "manual": "!", "failed": "x"}
        # Doctor's details hold the box's own words: shown, never interpreted by the terminal.
        app.out(f"{mark[r.outcome]} {printable(r.message, newlines=False)}")
        for line in r.detail.splitlines():
            app.out(f"    {printable(line, newlines=False)}")

    if not app.json and any(st.state != "done" for st in plan.steps if st.kind != "doctor"):
        app.out("")
    result = init.apply_init(env, plan, approved=approved, on_step=show, terminal=env.stdin_isatty)
    if app.json:
        app.print_json(result.to_dict())
    elif result.next_command:
        app.out(f"\n{alias} is ready. Next: {result.next_command}")
    elif result.doctor is not None:
        app.out(
            f"\n{alias} is set up, but doctor found problems: fix them, then `remotedl --host {alias} doctor`"
        )
    outcomes = {r.outcome for r in result.steps}
    if result.complete:
        return ExitCode.OK
    if "manual" in outcomes and result.steps[-1].kind == "install-key":
        return ExitCode.CONNECTION  # the box does not let us in yet
    return ExitCode.ERROR


def _show_plan(app: App, plan: InitPlan) -> None:
    app.out(f"remotedl init {plan.alias}: {plan.spec.user}@{plan.spec.hostname}:{plan.spec.port}")
    for s in plan.steps:
        app.out(f"{_MARK[s.state]} {s.summary}")
        for line in s.detail.splitlines():
            app.out(f"    {line}")
