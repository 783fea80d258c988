"""The ``remotedl`` command: parse, dispatch to a handler, map errors to exit codes.

Kept free of heavy imports (paramiko, fabric, requests, dnspython, rich) so that
``remotedl --help`` and ``--version`` start fast; handlers import what they need.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from remotedl import __version__
from remotedl.env import Environment
from remotedl.errors import ExitCode, JobFailed, RemotedlError

# command -> (module under remotedl.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "status": ("basic", "is the box reachable; OS, load, disk, tools, GPUs and their processes"),
    "config": ("basic", "show the resolved settings and where each came from"),
    "trust": ("basic", "show a box's host key fingerprint and record it in known_hosts"),
    "sandbox": ("basic", "start or stop a throwaway local box to try remotedl on"),
    "push": ("sync", "send code (git) and data (rsync) to the box; nothing there is deleted"),
    "pull": ("sync", "bring paths from the box home with rsync; never overwrites newer files"),
    "run": ("jobs", "push, then run a command in tmux on the box on chosen GPUs; follow its log"),
    "jobs": ("jobs", "list jobs on the box (the box's records: any laptop sees the same)"),
    "logs": ("jobs", "print or follow (-f) a job's log; resumes after a dropped connection"),
    "kill": ("jobs", "stop a job: SIGINT, then SIGTERM, then SIGKILL"),
    "attach": ("jobs", "attach to a job's tmux session (interactive)"),
    "tunnel": ("tunnel", "forward 127.0.0.1 ports to the box through ssh -L; reconnects by itself"),
    "jupyter": ("tunnel", "find or start Jupyter on the box and tunnel to it (= tunnel --jupyter)"),
    "dns": ("dns", "keep the box's DNS name on its public IP: update, check, watch"),
    "setup": ("setup", "run playbooks on the box (base, ssh-hardening, jupyter, ddns, gpu-check)"),
    "doctor": ("setup", "check the whole chain, laptop to GPUs, and say how to fix what fails"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"remotedl: error: {message}\n")
        raise SystemExit(ExitCode.USAGE)


def _global_options() -> _Parser:
    # Accepted before and after the command name (`remotedl --json status`, `remotedl status --json`).
    p = _Parser(add_help=False)
    d = argparse.SUPPRESS
    g = p.add_argument_group("global options")
    g.add_argument("-H", "--host", default=d, help="ssh config alias of the box (or REMOTEDL_HOST)")
    g.add_argument(
        "--ssh-config", default=d, metavar="FILE", help="ssh config file to use for every connection"
    )
    g.add_argument("--user", default=d, help="login user (overrides the ssh config)")
    g.add_argument("--port", type=int, default=d, help="ssh port (overrides the ssh config)")
    g.add_argument("-i", "--identity", default=d, metavar="KEY", help="private key (tried first)")
    g.add_argument("--connect-timeout", type=float, default=d, metavar="S", help="seconds (default 10)")
    g.add_argument("--json", action="store_true", default=d, help="machine-readable output")
    g.add_argument("--debug", action="store_true", default=d, help="log every command run; tracebacks")
    return p


def build_parser() -> argparse.ArgumentParser:
    from remotedl.cli import parsers

    common = _global_options()
    parser = _Parser(
        prog="remotedl",
        description="Drive a remote GPU box from a laptop: push code and data, run jobs on "
        "chosen GPUs, follow logs, tunnel Jupyter, keep its DNS name current.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"remotedl {__version__}")
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        getattr(parsers, name.replace("-", "_"))(cmd, common)
    return parser


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


def split_run_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`remotedl run train.py --gpu 0 --lr 0.1`: remotedl's own options are taken wherever they
    stand before a `--`; every other word belongs to the command, in order. After `--`,
    everything is the command's (`remotedl run train.py -- --name x`)."""
    at = _subcommand_index(parser, argv)
    if at is None or argv[at] != "run":
        return argv
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subparsers[0].choices["run"]
    flags: dict[str, bool] = {}  # option -> takes a value
    for action in sub._actions:
        for opt in action.option_strings:
            flags[opt] = action.nargs != 0 and not isinstance(
                action, argparse._StoreTrueAction | argparse._HelpAction
            )
    ours: list[str] = []
    command: list[str] = []
    rest = argv[at + 1 :]
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok == "--":
            command += rest[i + 1 :]
            break
        name = tok.split("=", 1)[0]
        if tok.startswith("-") and name in flags:
            ours.append(tok)
            if flags[name] and "=" not in tok and i + 1 < len(rest):
                ours.append(rest[i + 1])
                i += 1
        else:
            command.append(tok)
        i += 1
    return [*argv[: at + 1], *ours, "--", *command] if command else [*argv[: at + 1], *ours]


def main(argv: Sequence[str] | None = None, env: Environment | None = None) -> int:
    env = env or Environment()
    parser = build_parser()
    args = parser.parse_args(split_run_argv(parser, list(sys.argv[1:] if argv is None else argv)))
    if not args.subcommand:
        parser.print_help(env.stdout)
        return ExitCode.USAGE
    debug = bool(getattr(args, "debug", False))
    _setup_logging(env, debug)
    module_name, _ = COMMANDS[args.subcommand]
    try:
        module = importlib.import_module(f"remotedl.cli.{module_name}")
        handler = getattr(module, "cmd_" + args.subcommand.replace("-", "_"))
        return int(handler(args, env))
    except JobFailed as e:
        return e.code
    except RemotedlError as e:
        logging.getLogger("remotedl").debug("error", exc_info=True)
        env.stderr.write(f"remotedl: error: {e.message}\n")
        if e.hint:
            env.stderr.write(f"  hint: {e.hint}\n")
        return int(e.exit_code)
    except KeyboardInterrupt:
        env.stderr.write("remotedl: interrupted\n")
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        return ExitCode.OK
    except Exception as e:
        if debug:
            raise
        env.stderr.write(
            f"remotedl: internal error: {type(e).__name__}: {e}\n"
            "  hint: run again with --debug for the traceback, and report it\n"
        )
        return ExitCode.ERROR


def _setup_logging(env: Environment, debug: bool) -> None:
    logger = logging.getLogger("remotedl")
    logger.handlers.clear()
    handler = logging.StreamHandler(env.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
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
