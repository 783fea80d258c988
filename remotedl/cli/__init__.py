"""The ``remotedl`` command: parse, dispatch to a handler, map errors to exit codes.

Kept free of heavy imports (paramiko, fabric, requests, dnspython, rich) so that
``remotedl --help`` and ``--version`` start fast; handlers import what they need.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from remotedl import __version__
from remotedl.cli import app, parsers
from remotedl.env import Environment
from remotedl.errors import ExitCode, JobFailed, RemotedlError, UsageError

if TYPE_CHECKING:
    from remotedl.fleet import Member
    from remotedl.ssh import HostSpec

Handler = Callable[[argparse.Namespace, Environment], int]


def _vm_ready(command: app.App, member: Member) -> HostSpec:
    """Cloud VMs: every command reaches one through ``cloud.ready`` (auto_start, or its state),
    imported only when a host is a VM."""
    from remotedl.cli import cloud

    return cloud.ready(command, member)


# Set when this package is imported, which any import of ``remotedl.cli.app`` does first: an
# ``App`` a library caller builds reaches a VM as ``main``'s does (app.py, at the bottom,
# imports no command module).
app.vm_ready = _vm_ready


@dataclass(frozen=True)
class Command:
    """One command: where its handler is (a function importing its module only when the command
    runs, so ``--help`` stays fast), its arguments, and its one-line help."""

    handlers: Callable[[], dict[str, Handler]]
    arguments: Callable[[argparse.ArgumentParser, argparse.ArgumentParser], None]
    help: str


# The command modules, each imported only by the command that needs it.
def _init() -> dict[str, Handler]:
    from remotedl.cli import init

    return {
        "init": init.cmd_init,
    }


def _basic() -> dict[str, Handler]:
    from remotedl.cli import basic

    return {
        "status": basic.cmd_status,
        "config": basic.cmd_config,
        "allow": basic.cmd_allow,
        "trust": basic.cmd_trust,
        "sandbox": basic.cmd_sandbox,
    }


def _fleet() -> dict[str, Handler]:
    from remotedl.cli import fleet

    return {
        "top": fleet.cmd_top,
    }


def _sync() -> dict[str, Handler]:
    from remotedl.cli import sync

    return {
        "push": sync.cmd_push,
        "pull": sync.cmd_pull,
    }


def _run() -> dict[str, Handler]:
    from remotedl.cli import run

    return {
        "run": run.cmd_run,
    }


def _jobs() -> dict[str, Handler]:
    from remotedl.cli import jobs

    return {
        "jobs": jobs.cmd_jobs,
        "logs": jobs.cmd_logs,
        "kill": jobs.cmd_kill,
        "attach": jobs.cmd_attach,
        "show": jobs.cmd_show,
        "diff": jobs.cmd_diff,
        "images": jobs.cmd_images,
    }


def _outputs() -> dict[str, Handler]:
    from remotedl.cli import outputs

    return {
        "outputs": outputs.cmd_outputs,
        "compare": outputs.cmd_compare,
    }


def _cloud() -> dict[str, Handler]:
    from remotedl.cli import cloud

    return {
        "up": cloud.cmd_up,
        "stop": cloud.cmd_stop,
        "autostop": cloud.cmd_autostop,
        "cost": cloud.cmd_cost,
    }


def _tunnel() -> dict[str, Handler]:
    from remotedl.cli import tunnel

    return {
        "tunnel": tunnel.cmd_tunnel,
        "jupyter": tunnel.cmd_jupyter,
        "tensorboard": tunnel.cmd_tensorboard,
    }


def _dns() -> dict[str, Handler]:
    from remotedl.cli import dns

    return {
        "dns": dns.cmd_dns,
    }


def _setup() -> dict[str, Handler]:
    from remotedl.cli import setup

    return {
        "setup": setup.cmd_setup,
        "doctor": setup.cmd_doctor,
    }


# command -> its handler's module, its arguments, its one-line help: the explicit dispatch table.
COMMANDS: dict[str, Command] = {
    "init": Command(
        _init, parsers.init, "set up a new box: ssh config, key, host key, remotedl.toml, doctor (asks first)"
    ),
    "status": Command(
        _basic, parsers.status, "is the box reachable; OS, load, disk, tools, GPUs and their processes"
    ),
    "top": Command(_fleet, parsers.top, "live view of the GPUs and running jobs of every box (q quits)"),
    "config": Command(_basic, parsers.config, "show the resolved settings and where each came from"),
    "allow": Command(
        _basic, parsers.allow, "trust this version of a cloned project's risky settings and playbooks"
    ),
    "trust": Command(_basic, parsers.trust, "show a box's host key fingerprint and record it in known_hosts"),
    "sandbox": Command(_basic, parsers.sandbox, "start or stop a throwaway local box to try remotedl on"),
    "push": Command(
        _sync, parsers.push, "send code (git) and data (rsync) to the box; nothing there is deleted"
    ),
    "pull": Command(
        _sync, parsers.pull, "bring paths from the box home with rsync; never overwrites newer files"
    ),
    "run": Command(
        _run, parsers.run, "push, then run a command in tmux on the box on chosen GPUs; follow its log"
    ),
    "jobs": Command(
        _jobs,
        parsers.jobs,
        "list jobs on the box (the box's records: any laptop sees the same); rm, prune, show",
    ),
    "logs": Command(
        _jobs, parsers.logs, "print or follow (-f) a job's log; resumes after a dropped connection"
    ),
    "kill": Command(_jobs, parsers.kill, "stop a job: SIGINT, then SIGTERM, then SIGKILL"),
    "attach": Command(_jobs, parsers.attach, "attach to a job's tmux session (interactive)"),
    "show": Command(
        _jobs,
        parsers.show,
        "what a job ran: host, GPUs, command, commit, environment, times, exit, directory",
    ),
    "diff": Command(_jobs, parsers.diff, "a job's code against the local work tree (git diff)"),
    "images": Command(
        _jobs, parsers.images, "the container images on the box (docker or podman), the one jobs use marked"
    ),
    "outputs": Command(
        _outputs, parsers.outputs, "list jobs' outputs and bring home those of jobs that ended; --watch"
    ),
    "compare": Command(
        _outputs, parsers.compare, "jobs side by side: code, arguments, env, final metrics; --plot NAME"
    ),
    "tunnel": Command(
        _tunnel, parsers.tunnel, "forward 127.0.0.1 ports to the box through ssh -L; reconnects by itself"
    ),
    "jupyter": Command(
        _tunnel, parsers.jupyter, "find or start Jupyter on the box and tunnel to it (= tunnel --jupyter)"
    ),
    "tensorboard": Command(
        _tunnel, parsers.tensorboard, "find or start TensorBoard over a directory on the box and tunnel to it"
    ),
    "dns": Command(_dns, parsers.dns, "keep the box's DNS name on its public IP: update, check, watch"),
    "setup": Command(
        _setup,
        parsers.setup,
        "run playbooks on the box (base, ssh-hardening, jupyter, ddns, gpu-check, autostop, docker)",
    ),
    "doctor": Command(
        _setup, parsers.doctor, "check the whole chain, laptop to GPUs, and say how to fix what fails"
    ),
    "up": Command(_cloud, parsers.up, "start a host's cloud VM (AWS, GCE, Azure) and wait until SSH answers"),
    "stop": Command(_cloud, parsers.stop, "stop a host's cloud VM so its billing stops (Azure: deallocate)"),
    "autostop": Command(
        _cloud,
        parsers.autostop,
        "stop a cloud VM once it has been idle this long (decided on the box); --off",
    ),
    "cost": Command(
        _cloud, parsers.cost, "what jobs cost per host and project (price_per_hour x time x share of GPUs)"
    ),
}


def handler(name: str) -> Handler:
    """The function that runs command ``name``."""
    return COMMANDS[name].handlers()[name]


class ArgvError(UsageError):
    """A command line argparse cannot take: one line and a hint naming the command's --help
    (no usage block: it buried the one line that says what is wrong)."""


class UnknownChoice(ArgvError):
    """An unknown command or choice, said with the closest one."""


class _Formatter(argparse.HelpFormatter):
    """argparse's own, its width found as ``shutil.get_terminal_size`` finds it but without
    importing shutil (with bz2 and lzma, ~2.5 ms a start): argparse makes a formatter for each
    argument it is given, so every command paid for it."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


def _columns() -> int:
    with contextlib.suppress(KeyError, ValueError):
        if (columns := int(os.environ["COLUMNS"])) > 0:
            return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # Raised, not printed: main() renders it once, as text or (--json) as JSON.
        raise ArgvError(message, hint=f"see `{self.prog} --help`")

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's "invalid choice: 'stauts' (choose from 'status', 'config', ...)" becomes one
        # line that names the closest choice.
        choices = action.choices
        if choices is None or value in choices:
            return
        import difflib

        names = [str(c) for c in choices]
        close = difflib.get_close_matches(str(value), names, n=1)
        if isinstance(action, argparse._SubParsersAction):
            if close:
                raise UnknownChoice(f"unknown command '{value}'; did you mean {close[0]}?")
            raise UnknownChoice(f"unknown command '{value}'", hint="`remotedl --help` lists the commands")
        what = "/".join(action.option_strings) or str(action.metavar or action.dest)
        if close:
            raise UnknownChoice(f"{what}: unknown choice '{value}'; did you mean {close[0]}?")
        raise UnknownChoice(f"{what}: unknown choice '{value}' (choose from {', '.join(names)})")


def _port(text: str) -> int:
    """--port: a TCP port, checked here (ssh would say only "Bad port", as a connection error)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1-65535)")
    return port


def _global_options() -> _Parser:
    # Accepted before and after the command name (`remotedl --json status`, `remotedl status --json`).
    p = _Parser(add_help=False)
    d = argparse.SUPPRESS
    g = p.add_argument_group("global options")
    g.add_argument(
        "-H",
        "--host",
        default=d,
        metavar="HOST[,HOST...]",
        help="ssh config alias of the box; several as a,b,c or @FLEET (or REMOTEDL_HOST)",
    )
    g.add_argument(
        "--ssh-config", default=d, metavar="FILE", help="ssh config file to use for every connection"
    )
    g.add_argument("--user", default=d, help="login user (overrides the ssh config)")
    g.add_argument("--port", type=_port, default=d, help="ssh port (overrides the ssh config)")
    g.add_argument("-i", "--identity", default=d, metavar="KEY", help="private key (tried first)")
    g.add_argument("--connect-timeout", type=float, default=d, metavar="S", help="seconds (default 10)")
    g.add_argument("--json", action="store_true", default=d, help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=d, help="log every command run; tracebacks")
    return p


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, the parser for it: only the command it names gets its
    arguments (the others are there by name and help, which is all ``remotedl --help`` and a
    misspelled command show). Building every command's arguments cost ~15 ms a start, which
    every short command paid for the one it runs. ``main`` checks that the command argparse
    found is the one named here and parses again with the whole parser if not."""
    common = _global_options()
    parser = _Parser(
        prog="remotedl",
        description="Drive a remote GPU box from a laptop: push code and data, run jobs on "
        "chosen GPUs, follow logs, tunnel Jupyter, keep its DNS name current.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"remotedl {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    named = _command_named(parser, argv)
    for name, command in COMMANDS.items():
        if named is None or name == named:
            cmd = sub.add_parser(name, help=command.help, description=command.help, parents=[common])
            command.arguments(cmd, common)
        else:
            sub.add_parser(name, help=command.help, add_help=False)
    return parser


def _command_named(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> str | None:
    """The command ``argv`` names (its first word after the global options), if it is one."""
    if argv is None:
        return None
    words = list(argv)
    at = _subcommand_index(parser, words)
    return words[at] if at is not None and words[at] in COMMANDS else None


def _subcommand_index(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    takes_value = {
        o
        for a in parser._actions
        if a.nargs is None and not isinstance(a, argparse._StoreTrueAction | argparse._VersionAction)
        for o in a.option_strings
    }
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return None
        if not tok.startswith("-"):
            return i
        i += 2 if tok in takes_value else 1
    return None


# After the command word only these stay remotedl's (`remotedl run run.sh --gpu 0`); every other
# word there is the command's. Option -> takes a value.
GPU_OPTIONS: dict[str, bool] = {"--gpu": True, "--gpus": True, "--cpu": False}


def _option_words(tok: str, rest: list[str], i: int, flags: dict[str, bool]) -> int:
    """How many words the option ``tok`` at ``rest[i]`` spans (1, or 2 with a separate value),
    as argparse reads it: exact names, unique ``--prefix``es, ``--opt=value``, ``-eKEY=V``, ``-de V``."""
    if tok.startswith("--"):
        key, eq, _ = tok.partition("=")
        names = [key] if key in flags else [f for f in flags if f.startswith(key) and f.startswith("--")]
        takes = len(names) == 1 and flags[names[0]] and not eq
    else:
        takes = False
        for j, c in enumerate(tok[1:], start=1):  # -d, -de, -eKEY=V
            if flags.get("-" + c):
                takes = j == len(tok) - 1  # a value attached after the letter, or the next word
                break
    return 2 if takes and i + 1 < len(rest) else 1


_ENV_PAIR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _env_pair_at(rest: list[str], i: int) -> tuple[str | None, int]:
    """``(KEY=VALUE, words it took)`` when ``rest[i]`` is remotedl's ``--env`` after the command
    word: ``--env K=V``, ``--env=K=V``, ``-e K=V`` or ``-eK=V`` with a KEY=VALUE, else
    ``(None, 1)``: a ``-e`` of the command's own (``sed -e s/a/b/``, ``bash -e x.sh``) stays its."""
    tok = rest[i]
    if tok in ("--env", "-e"):
        value, n = (rest[i + 1], 2) if i + 1 < len(rest) else (None, 1)
    elif tok.startswith("--env="):
        value, n = tok[len("--env=") :], 1
    elif tok.startswith("-e") and not tok.startswith("--"):
        value, n = tok[2:], 1
    else:
        return None, 1
    if value is None or not _ENV_PAIR.match(value):
        return None, 1
    return value, n


def split_run_argv(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """``(argv for argparse, remotedl's options taken after the command word, as said to the user)``.

    `remotedl run --detach --name x train.py --lr 0.1 --port 29500`: remotedl's options go before
    the command word; after it, everything is the command's, in order, except remotedl's GPU choice
    (`--gpu`, `--gpus`, `--cpu`), so that `remotedl run run.sh --gpu 0` keeps working, and the
    job's environment (`--env KEY=VALUE`, `-e KEY=VALUE`): a secret given there would otherwise be
    the script's argument, in `jobs`, the record and notifications. After `--` everything is the
    command's (`remotedl run train.py -- --gpu 0`)."""
    at = _subcommand_index(parser, argv)
    if at is None or argv[at] != "run":
        return argv, []
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subparsers[0].choices["run"]
    flags: dict[str, bool] = {}  # option -> takes a value
    for action in sub._actions:
        for opt in action.option_strings:
            flags[opt] = action.nargs != 0 and not isinstance(
                action, argparse._StoreTrueAction | argparse._HelpAction
            )
    head = argv[: at + 1]
    rest = argv[at + 1 :]
    ours: list[str] = []
    chosen_before: list[str] = []  # GPU options before the command word
    i = 0
    while i < len(rest) and rest[i] != "--" and rest[i].startswith("-") and rest[i] != "-":
        n = _option_words(rest[i], rest, i, flags)
        if rest[i].partition("=")[0] in GPU_OPTIONS:
            chosen_before.append(" ".join(rest[i : i + n]))
        ours += rest[i : i + n]
        i += n
    if i < len(rest) and rest[i] == "--":
        return [*head, *ours, *rest[i:]], []
    command: list[str] = []
    taken: list[str] = []
    gpu_taken: list[str] = []
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            command += rest[i + 1 :]
            break
        key, eq, _ = tok.partition("=")
        if key in GPU_OPTIONS:
            n = 2 if GPU_OPTIONS[key] and not eq and i + 1 < len(rest) else 1
            ours += rest[i : i + n]
            taken.append(" ".join(rest[i : i + n]))
            gpu_taken.append(taken[-1])
            i += n
            continue
        pair, n = _env_pair_at(rest, i)
        if pair is not None:
            ours += ["--env", pair]
            taken.append(f"--env {pair.partition('=')[0]}")  # the value may be a secret: never said
            i += n
            continue
        command.append(tok)
        i += 1
    if gpu_taken and len(gpu_taken) + len(chosen_before) > 1:
        raise ArgvError(
            f"the GPU choice is given twice: {', '.join([*chosen_before, *gpu_taken])}",
            hint="give remotedl one of --gpu/--gpus/--cpu; to pass one to the script, put it after --",
        )
    return ([*head, *ours, "--", *command] if command else [*head, *ours]), taken


def _wants_json(argv: list[str]) -> bool:
    """--json among remotedl's own words (before a `--`: the command's words are not ours)."""
    words = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in words


def _fail(env: Environment, as_json: bool, message: str, hint: str | None, code: int) -> int:
    """The one rendering of a failure: two lines on stderr, or with --json one JSON object on
    stdout (the stream a script already parses), with the same exit code either way."""
    if as_json:
        env.stdout.write(json.dumps({"error": message, "hint": hint, "exit_code": int(code)}) + "\n")
        env.stdout.flush()
        return int(code)
    from remotedl.words import printable

    env.stderr.write(f"remotedl: error: {printable(message)}\n")
    if hint:
        env.stderr.write(f"  hint: {printable(hint)}\n")
    return int(code)


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> NoReturn:
    """Words no parser took. argparse says so with the top-level usage and `remotedl --help`,
    which show none of the command's options: say it as the command's parser, naming the
    closest of its options (`run --detatch`: did you mean --detach?)."""
    command = parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and args.subcommand in action.choices:
            command = action.choices[args.subcommand]
    message = f"unrecognized arguments: {' '.join(extra)}"
    if extra[0].startswith("-"):
        import difflib

        options = [o for a in command._actions for o in a.option_strings]
        close = difflib.get_close_matches(extra[0].partition("=")[0], options, n=1, cutoff=0.75)
        if close:
            message += f"; did you mean {close[0]}?"
    command.error(message)


def entry() -> NoReturn:
    """The ``remotedl`` command (pyproject's ``[project.scripts]``, ``python -m remotedl``):
    ``main``, then an end without the interpreter's teardown, which frees one by one all the
    objects of every module imported, only for the process to drop them at once (~20 ms after a
    short command's last line, as long as its whole request to the box). Only when nothing is
    left to finish: the output flushed, the exit handlers run (logging's, temporary files'), no
    thread left but daemons; else the usual exit."""
    import atexit
    import threading

    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(t.is_alive() and not t.daemon for t in others):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):  # None where the command was started without it
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            sys.exit(code)  # as Python ends it: a closed or broken stdout said so
    os._exit(code)


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(words)
    as_json = _wants_json(words)
    try:
        words, taken = split_run_argv(parser, words)
        as_json = _wants_json(words)
        args, extra = parser.parse_known_args(words)
        if args.subcommand is not None and args.subcommand != _command_named(parser, words):
            # An abbreviated global option took the command's name as its value (`--ho jobs
            # logs 3`): the command argparse found was built by name only; all of them now.
            parser = build_parser()
            args, extra = parser.parse_known_args(words)
        if extra:
            _unrecognized(parser, args, extra)
    except ArgvError as e:
        return _fail(env, as_json, e.message, e.hint, e.exit_code)
    for option in taken:  # at most one: a second is refused by split_run_argv
        env.stderr.write(f"remotedl: took {option} for remotedl; to pass it to the script, put it after --\n")
    if not args.subcommand:
        if as_json:
            return _fail(env, True, "no command given", "`remotedl --help` lists them", ExitCode.USAGE)
        parser.print_help(env.stdout)
        return ExitCode.USAGE
    debug = bool(getattr(args, "debug", False))
    _setup_logging(env, debug)
    try:
        _seen_clear()
        code = int(handler(args.subcommand)(args, env))
        outputs_after_command(args, env)  # outputs of jobs that ended, from boxes it talked to
        return code
    except JobFailed as e:
        outputs_after_command(args, env)
        # The job's own output said why; its exit code is passed through.
        return _fail(env, True, e.message, None, e.code) if as_json else e.code
    except RemotedlError as e:
        logging.getLogger("remotedl").debug("error", exc_info=True)
        return _fail(env, as_json, e.message, e.hint, e.exit_code)
    except KeyboardInterrupt:
        if as_json:
            return _fail(env, True, "interrupted", None, ExitCode.INTERRUPTED)
        env.stderr.write("remotedl: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as e:
        if debug:
            raise
        return _fail(
            env,
            as_json,
            f"internal error: {type(e).__name__}: {e}",
            "run again with --debug for the traceback, and report it",
            ExitCode.ERROR,
        )


def _seen_clear() -> None:
    from remotedl.outputs import SEEN

    SEEN.clear()


def outputs_after_command(args: argparse.Namespace, env: Environment) -> None:
    """The one hook every command passes: outputs of jobs that ended come home from the boxes
    the command talked to (remotedl.cli.outputs). It never changes the command's outcome."""
    from remotedl.cli.outputs import after_command

    try:
        after_command(args, env)
    except KeyboardInterrupt:
        env.stderr.write("remotedl: interrupted while fetching outputs; `remotedl outputs` resumes\n")
    except Exception as e:
        logging.getLogger("remotedl").debug("outputs", exc_info=True)
        env.stderr.write(f"remotedl: warning: outputs not fetched ({type(e).__name__}: {e})\n")


def _setup_logging(env: Environment, debug: bool) -> None:
    logger = logging.getLogger("remotedl")
    logger.handlers.clear()
    handler = logging.StreamHandler(env.stderr)
    # Milliseconds since the process started, so --debug shows where a command's time goes.
    handler.setFormatter(logging.Formatter("%(relativeCreated)6.0f ms %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    # Never let a library log secrets (URLs with tokens, auth headers), not even with --debug:
    # requests and urllib3 log full URLs, so they stay silent always.
    for noisy in ("urllib3", "requests", "paramiko", "invoke", "fabric", "libtmux"):
        lib = logging.getLogger(noisy)
        lib.setLevel(logging.INFO if debug and noisy in ("paramiko", "fabric") else logging.CRITICAL)
        # Their errors reach the user through our one-line messages, not Python's last resort.
        lib.handlers = [handler] if debug and noisy in ("paramiko", "fabric") else [logging.NullHandler()]
        lib.propagate = False
