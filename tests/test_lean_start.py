"""The laptop's own cost of a short command (issue 24): what it imports, parses and renders
before its first ssh and after the answer. Checked by module *names*, never by times: a command
that has no use for rich's tables, the cloud providers, the multi-node runs, difflib or a TOML
parser does not import them, so a module-level import added somewhere cannot bring the cost
back unnoticed."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from remotedl.cli import build_parser, main
from remotedl.cli.app import App, plain_line
from remotedl.env import Environment
from tests.conftest import make_env

# Runs main() with argv[2:] and writes its exit code and every module loaded to argv[1]
# (after main returns: the fetch of outputs after a command counts too).
PROBE = (
    "import json, sys\n"
    "from remotedl.cli import main\n"
    "code = main(sys.argv[2:])\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'code': code, 'modules': sorted(sys.modules)}, f)\n"
)

# Never needed by a short command on a plain box (no cloud, one host, no TOML file here).
NEVER = {
    "difflib",  # a usage error's "did you mean"
    "uuid",  # a new project's random identity
    "tomllib",  # no remotedl.toml, pyproject.toml or user config here
    "concurrent.futures",  # several hosts at once
    "remotedl.cloud",  # a cloud VM's state and price
    "remotedl.cli.multinode",  # a multi-node run's name starts with run-
    "remotedl.multinode",
    "remotedl.run",
    "remotedl.notify",
}
RICH = {"rich", "rich.console", "rich.table", "rich.text"}
TABLE = {"rich.table", "rich.console"}


def probe(argv: list[str], env: dict[str, str], cwd: Path, tmp_path: Path) -> tuple[int, set[str]]:
    out = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", PROBE, str(out), *argv], env=env, cwd=cwd,
                   capture_output=True, timeout=120, check=False)  # fmt: skip
    found = json.loads(out.read_text())
    return found["code"], set(found["modules"])


def test_short_commands_import_only_what_they_use(cli, box, project, tmp_path):
    r = cli("run", "--detach", "--json", "--cpu", "--", "sh", "-c", "echo done", cwd=project)
    assert r.code == 0, r.err
    job = str(json.loads(r.out)["id"])
    env = {
        **os.environ,
        "REMOTEDL_HOST": box.name,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    env.pop("PYTHONPATH", None)
    # The project's settings are looked for up to the file system's root: a pyproject.toml above
    # the test's directory is parsed, rightly.
    above = [project, *project.parents]
    never = NEVER - ({"tomllib"} if any((d / "pyproject.toml").is_file() for d in above) else set())
    # (argv, modules it must not import): --json and one-line answers need no rich console.
    cases = [
        (["jobs", "--json"], never | RICH),
        (["show", job, "--json"], never | RICH),
        (["logs", job], never | RICH),
        (["show", job], never | {"rich.console", "rich.text", "rich.table"}),
        (["kill", job], never | {"rich.console", "rich.table"}),
        (["status", "--json"], never | RICH),
        (["jobs"], never),  # the table: rich, and nothing else
    ]
    for argv, forbidden in cases:
        code, modules = probe(argv, env, project, tmp_path)
        assert code in (0, 1), (argv, code)  # kill of an ended job: 1, said in one line
        assert not forbidden & modules, (argv, sorted(forbidden & modules))
    _, modules = probe(["jobs"], env, project, tmp_path)
    assert modules >= TABLE  # the probe sees rich where it is used


def test_the_text_views_rich_is_imported_while_the_box_answers(cli, box, project, tmp_path):
    """`jobs` and `status` as text import their rich (~30 ms) in a thread started before the
    request, not after the answer: ``--debug`` says so, before the request goes out."""
    r = cli("run", "--detach", "--json", "--cpu", "true", cwd=project)
    assert r.code == 0, r.err
    env = {
        **os.environ,
        "REMOTEDL_HOST": box.name,
        "REMOTEDL_SSH_CONFIG": box.info.ssh_config,
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    for command in ("jobs", "status"):
        out = subprocess.run([sys.executable, "-m", "remotedl", "--debug", command], env=env, cwd=project,
                             capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        lines = out.stderr.splitlines()
        started = [i for i, line in enumerate(lines) if "rich.table" in line and "box answers" in line]
        assert started, out.stderr
        asked = [i for i, line in enumerate(lines) if "agent request" in line or "remote " in line]
        assert asked and started[0] < asked[0], out.stderr
        assert ("command" if command == "jobs" else "reachable") in out.stdout  # the view came


def test_the_parser_for_one_command_reads_argv_as_the_whole_parser():
    """``build_parser(argv)`` gives only the named command its arguments; what it parses is
    what the whole parser parses."""
    for argv in (
        ["jobs", "--json"],
        ["--json", "jobs", "--all"],
        ["-H", "a,b", "logs", "-f", "3"],
        ["--host", "box", "show", "7", "--json"],
        ["run", "--detach", "--cpu", "--", "python", "train.py", "--lr", "1"],
        ["--connect-timeout", "3", "kill", "4", "--grace", "2"],
        ["status"],
    ):
        ours, whole = build_parser(argv), build_parser()
        assert ours.parse_known_args(argv) == whole.parse_known_args(argv), argv
        named = next(a for a in ours._subparsers._group_actions if a.dest == "subcommand")  # type: ignore[union-attr]
        others = [p for name, p in named.choices.items() if name not in argv]
        assert others and all(len(p._actions) == 0 for p in others), argv


def test_an_abbreviated_option_that_takes_a_command_name_still_parses(tmp_path):
    """`--ho jobs config`: argparse reads `--ho` as --host with the value `jobs`; the command is
    `config`, which the parser built for `jobs` has by name only: main parses again in full."""
    env = make_env(tmp_path)
    assert main(["--ho", "jobs", "config", "--json"], env) == 0, env.stderr.getvalue()  # type: ignore[attr-defined]
    shown = json.loads(env.stdout.getvalue())  # type: ignore[attr-defined]
    assert shown["settings"]["host"]["value"] == "jobs"


LINES = [
    "",
    "job 3 (train) running on gpu1, GPUs 0,1",
    "  started     12-07 19:36:28",
    "a :thumbs_up: and :smile-text: and :smile-emoji: and :no_such_code: and ::",
    "a line far longer than any terminal " * 12,
    "wide 漢字 and é and combining é",
    "[bold]not markup[/bold] [link=x]y[/link]",
]


@pytest.mark.parametrize("tty", [False, True])
def test_plain_lines_are_what_the_console_prints(tty):
    """``App.out`` writes a plain line itself: byte for byte what rich's console prints."""

    class Out(io.StringIO):
        def isatty(self) -> bool:
            return tty

    for text in [*LINES, "tab\there", "bell\x07 and cr\r"]:
        ours = Out()
        app = App(build_parser().parse_args(["status"]), Environment(environ={}, stdout=ours))
        app.out(text)
        assert "console" not in app.__dict__ or plain_line(text) is None
        theirs = Out()
        Console(file=theirs, highlight=False, emoji=False, soft_wrap=True, width=None if tty else 200,
                _environ={}).print(text, markup=False)  # fmt: skip
        assert ours.getvalue() == theirs.getvalue(), text
    assert plain_line("tab\there") is None
    assert plain_line("12:30") == "12:30"
    assert plain_line("echo :thumbs_up:") == "echo :thumbs_up:"  # no emoji made of a user's text


def test_a_pyproject_without_remotedl_settings_is_parsed_once(tmp_path, monkeypatch):
    """A Python project's pyproject.toml (no [tool.remotedl]) is read once per command's look
    for the project file, not twice."""
    from remotedl.config import model

    (tmp_path / "pyproject.toml").write_text('[tool.black]\nline-length = 100\n[project]\nname = "x"\n')
    (tmp_path / ".git").mkdir()
    read: list[Path] = []
    real = model._read_toml

    def counted(path: Path) -> dict[str, object]:
        read.append(path)
        return real(path)

    monkeypatch.setattr(model, "_read_toml", counted)
    found = model.find_project(tmp_path)
    assert found.root == tmp_path.resolve() and found.config_file is None
    assert read.count((tmp_path / "pyproject.toml").resolve()) == 1


def test_the_kept_identity_is_one_git_call_before_the_request(cli, project):
    """Once the clone keeps its identity, a command asks git for it once, with no check first
    that the project is a git repository (the kept value says so)."""
    r = cli("run", "--detach", "--json", "--cpu", "true", cwd=project)  # keeps the identity
    assert r.code == 0, r.err
    for argv in (["jobs", "--json"], ["run", "--no-push", "--detach", "--cpu", "true"]):
        r = cli("--debug", *argv, cwd=project)
        assert r.code == 0, r.err
        git = [line for line in r.err.splitlines() if "run: git " in line]
        checks = [line for line in git if "rev-parse --git-dir" in line or "--absolute-git-dir" in line]
        assert not checks, git
        assert any("config --local --get remotedl.project" in line for line in git), git
