from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from remotedl import __version__
from remotedl.errors import UsageError
from tests.conftest import make_env


def run_main(tmp_path: Path, *argv: str, cwd: Path | None = None, **env: str):
    from remotedl.cli import main

    e = make_env(tmp_path, cwd=cwd, **env)
    try:
        code = main(list(argv), e)
    except SystemExit as s:
        code = int(s.code or 0)
    return code, e.stdout.getvalue(), e.stderr.getvalue()


def test_version_and_help_via_module():
    out = subprocess.run([sys.executable, "-m", "remotedl", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"remotedl {__version__}"
    out = subprocess.run([sys.executable, "-m", "remotedl", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("status", "config", "trust", "sandbox"):
        assert command in out.stdout


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from remotedl.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ['paramiko', 'fabric', 'requests', 'dns', 'rich', 'libtmux', 'invoke']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_no_command_is_usage_error(tmp_path):
    code, out, _ = run_main(tmp_path)
    assert code == 2
    assert "COMMAND" in out


def test_unknown_command_is_one_line_with_a_suggestion(tmp_path):
    code, out, err = run_main(tmp_path, "stauts")
    assert code == 2
    assert out == ""
    assert err == "remotedl: error: unknown command 'stauts'; did you mean status?\n"
    code, _, err = run_main(tmp_path, "frobnicate")
    assert code == 2
    assert err.splitlines() == [
        "remotedl: error: unknown command 'frobnicate'",
        "  hint: `remotedl --help` lists the commands",
    ]
    code, _, err = run_main(tmp_path, "sandbox", "upp")
    assert code == 2
    assert err == "remotedl: error: action: unknown choice 'upp'; did you mean up?\n"


def test_other_usage_errors_are_one_line_and_a_hint_exit_2(tmp_path):
    # argparse's usage block (8 lines for `run`) came first and buried the line that matters.
    code, out, err = run_main(tmp_path, "logs", "-n", "many")
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "remotedl: error: argument -n/--lines: invalid int value: 'many'",
        "  hint: see `remotedl logs --help`",
    ]
    code, out, err = run_main(tmp_path, "run", "--cpu", "--gpu", "0", "train.py")
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "remotedl: error: argument --gpu: not allowed with argument --cpu",
        "  hint: see `remotedl run --help`",
    ]
    code, _, err = run_main(tmp_path, "status", "--bogus")
    assert code == 2
    assert "remotedl: error: unrecognized arguments: --bogus" in err


def test_a_port_out_of_range_is_a_usage_error_before_any_connection(tmp_path):
    """`--port 99999` is bad input (exit 2, said here), not a connection failure (exit 4 with
    ssh's bare "Bad port"), as `tunnel 99999` already says."""
    for argv in (["--host", "gpubox", "--port", "99999", "status"], ["status", "--port", "0"]):
        code, _, err = run_main(tmp_path, *argv)
        assert code == 2, err
        assert "argument --port: port" in err and "is out of range (1-65535)" in err, err
        assert "Bad port" not in err
    code, _, err = run_main(tmp_path, "status", "--port", "ssh")
    assert code == 2
    assert "argument --port: 'ssh' is not a port number" in err


def test_json_errors_are_one_object_on_stdout(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "remotedl.toml").write_text("connect_timeout = 5\n")
    code, out, err = run_main(tmp_path, "status", "--json", cwd=proj)  # no host: a config error
    assert code == 3
    assert err == ""
    data = json.loads(out)
    assert data == {"error": "no host given", "hint": data["hint"], "exit_code": 3}
    assert "--host" in data["hint"]
    for argv in (["--json", "stauts"], ["status", "--json", "--bogus"], ["--json", "tunnel", "http"]):
        code, out, err = run_main(tmp_path, *argv, cwd=proj)
        assert code == 2, argv
        assert err == "", argv
        data = json.loads(out)
        assert data["exit_code"] == 2
        assert set(data) == {"error", "hint", "exit_code"}
    assert "did you mean status?" in json.loads(run_main(tmp_path, "--json", "stauts")[1])["error"]
    code, out, _ = run_main(tmp_path, "--json")
    assert code == 2
    assert json.loads(out)["error"] == "no command given"
    # --json after `--` (or after run's command word) is not remotedl's: plain text
    code, out, err = run_main(tmp_path, "run", "--no-push", "x.sh", "--json", cwd=proj)
    assert code == 3
    assert out == ""
    assert "remotedl: error: no host given" in err


def run_split(*argv: str) -> tuple[list[str], list[str]]:
    from remotedl.cli import build_parser, split_run_argv

    return split_run_argv(build_parser(), list(argv))


def test_after_the_command_word_only_gpu_options_are_remotedls():
    # the reported case: --port is the script's, not remotedl's ssh port
    assert run_split("run", "train.py", "--gpu", "0", "--port", "29500") == (
        ["run", "--gpu", "0", "--", "train.py", "--port", "29500"],
        ["--gpu 0"],
    )
    words = ["--name", "x", "--data", "d", "-d", "--debug", "--json", "--host", "h"]
    assert run_split("run", "train.py", *words) == (["run", "--", "train.py", *words], [])
    assert run_split("run", "run.sh", "--gpus=2", "a") == (
        ["run", "--gpus=2", "--", "run.sh", "a"],
        ["--gpus=2"],
    )
    assert run_split("run", "run.sh", "x", "--cpu") == (["run", "--cpu", "--", "run.sh", "x"], ["--cpu"])
    # after `--` everything is the command's
    assert run_split("run", "train.py", "--", "--gpu", "0") == (["run", "--", "train.py", "--gpu", "0"], [])
    assert run_split("run", "--", "--gpu", "0") == (["run", "--", "--gpu", "0"], [])


def test_env_after_the_command_word_is_remotedls():
    # a secret given after the script was the script's argument: in `jobs`, the record, notifications
    assert run_split("run", "train.py", "--lr", "1", "--env", "TOKEN=s3cr3t", "-e", "A=1 2") == (
        ["run", "--env", "TOKEN=s3cr3t", "--env", "A=1 2", "--", "train.py", "--lr", "1"],
        ["--env TOKEN", "--env A"],
    )
    assert run_split("run", "t.py", "--env=K=v=w", "-eB=") == (
        ["run", "--env", "K=v=w", "--env", "B=", "--", "t.py"],
        ["--env K", "--env B"],
    )
    # a -e of the command's own (no KEY=VALUE after it) stays the command's, and so does all after --
    assert run_split("run", "sed", "-e", "s/a=b/c/", "f") == (["run", "--", "sed", "-e", "s/a=b/c/", "f"], [])
    assert run_split("run", "bash", "-e", "x.sh") == (["run", "--", "bash", "-e", "x.sh"], [])
    assert run_split("run", "t.py", "--", "--env", "K=V") == (["run", "--", "t.py", "--env", "K=V"], [])
    assert run_split("run", "t.py", "--env") == (["run", "--", "t.py", "--env"], [])


def test_a_taken_env_option_is_said_without_its_value(tmp_path):
    code, _, err = run_main(tmp_path, "run", "--no-push", "train.py", "--env", "TOKEN=s3cr3t", "--lr", "1")
    assert code == 3  # no host: stops at the config error, after parsing
    assert "remotedl: took --env TOKEN for remotedl; to pass it to the script, put it after --" in err
    assert "s3cr3t" not in err
    # a malformed pair before the command word is refused without its value
    code, _, err = run_main(tmp_path, "run", "--no-push", "--env", "MY-TOKEN=s3cr3t", "t.py")
    assert code == 2
    assert "MY-TOKEN=..." in err and "s3cr3t" not in err


def test_options_before_the_command_word_are_remotedls():
    assert run_split("run", "--detach", "--name", "x", "train.py", "--lr", "0.1") == (
        ["run", "--detach", "--name", "x", "--", "train.py", "--lr", "0.1"],
        [],
    )
    # values, --opt=value, attached and combined short options, unique prefixes
    ours = ["-e", "K=V", "--name=n", "-eA=1", "-de", "B=2", "--det"]
    assert run_split("--host", "h", "run", *ours, "t.py")[0] == ["--host", "h", "run", *ours, "--", "t.py"]
    # other commands are left alone
    assert run_split("status", "--port", "22") == (["status", "--port", "22"], [])


def test_gpu_choice_given_twice_is_a_usage_error(tmp_path):
    from remotedl.cli import ArgvError

    with pytest.raises(ArgvError, match=r"given twice: --gpu 0, --gpu 1"):
        run_split("run", "--gpu", "0", "t.py", "--gpu", "1")
    with pytest.raises(ArgvError, match=r"given twice: --gpu 0, --gpu 1$"):  # no --env among them
        run_split("run", "--gpu", "0", "t.py", "--env", "A=1", "--gpu", "1")
    code, _, err = run_main(tmp_path, "run", "t.py", "--cpu", "--gpus", "2")
    assert code == 2
    assert "the GPU choice is given twice" in err


def test_a_taken_gpu_option_is_said_in_one_line(tmp_path):
    # no host: the run stops at the config error, after parsing
    code, _, err = run_main(tmp_path, "run", "--no-push", "train.py", "--gpu", "0", "--lr", "1")
    assert code == 3
    took = [line for line in err.splitlines() if "took" in line]
    assert took == ["remotedl: took --gpu 0 for remotedl; to pass it to the script, put it after --"]
    _, _, err = run_main(tmp_path, "run", "--no-push", "train.py", "--", "--gpu", "0")
    assert "took" not in err


def test_build_command_takes_an_existing_file_as_the_script(tmp_path):
    from remotedl.jobs import build_command

    odd = tmp_path / "it's x.sh"
    odd.write_text("echo hi\n")
    assert build_command(["./it's x.sh"], tmp_path) == ("bash './it'\"'\"'s x.sh'", "it's x.sh")
    assert build_command(["it's x.sh", "a b"], tmp_path) == ("bash 'it'\"'\"'s x.sh' 'a b'", "it's x.sh")
    odd.chmod(0o755)
    assert build_command(["it's x.sh"], tmp_path) == ("'./it'\"'\"'s x.sh'", "it's x.sh")
    plain = tmp_path / "train"  # no suffix: still the project's script, not a command on the box
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o755)
    assert build_command(["train", "--lr", "1"], tmp_path) == ("./train --lr 1", "train")
    # a word that names no file: a shell line as typed, or a command on the box
    assert build_command(["echo $HOME; ls"], tmp_path) == ("echo $HOME; ls", None)
    assert build_command(["ls", "-l"], tmp_path) == ("ls -l", None)
    with pytest.raises(UsageError, match="no such script"):
        build_command(["nope.sh"], tmp_path)


def test_plural():
    from remotedl.words import plural

    assert [plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert plural(1, "process", "processes") == "1 process"
    assert plural(3, "process", "processes") == "3 processes"


def test_no_host_is_config_error(tmp_path):
    code, _, err = run_main(tmp_path, "status")
    assert code == 3
    assert "no host given" in err
    assert "Traceback" not in err


def test_config_precedence(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (tmp_path / "config" / "remotedl").mkdir(parents=True)
    (tmp_path / "config" / "remotedl" / "config.toml").write_text(
        'host = "from-user"\nremote_dir = "~/user-dir"\ndata = ["d1"]\n'
    )
    (proj / "remotedl.toml").write_text('host = "from-project"\n')
    code, out, err = run_main(tmp_path, "config", "--json", cwd=proj)
    assert code == 0, err
    data = json.loads(out)
    assert data["settings"]["host"]["value"] == "from-project"
    assert "project config" in data["settings"]["host"]["source"]
    assert data["settings"]["remote_dir"]["value"] == "~/user-dir"
    assert "user config" in data["settings"]["remote_dir"]["source"]
    assert data["settings"]["connect_timeout"]["source"] == "default"
    assert data["host"]["alias"]["value"] == "from-project"
    # the host is not in any ssh config: its name is the host name, port and user are defaults
    assert data["host"]["hostname"]["value"] == "from-project"
    assert data["host"]["port"]["value"] == 22

    code, out, _ = run_main(tmp_path, "config", "--json", cwd=proj, REMOTEDL_HOST="from-env")
    assert json.loads(out)["settings"]["host"]["value"] == "from-env"
    code, out, _ = run_main(
        tmp_path, "config", "--json", "--host", "from-flag", cwd=proj, REMOTEDL_HOST="from-env"
    )
    assert json.loads(out)["settings"]["host"] == {"value": "from-flag", "source": "flag --host"}


def test_pyproject_tool_table(tmp_path):
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "pyproject.toml").write_text('[project]\nname="x"\n[tool.remotedl]\nhost = "pp"\n')
    code, out, _ = run_main(tmp_path, "config", "--json", cwd=proj / "sub")
    assert code == 0
    data = json.loads(out)
    assert data["settings"]["host"]["value"] == "pp"
    assert data["project"] == str(proj)
    assert data["remote_dir"] == "~/remotedl/proj"


def test_malformed_toml_is_config_error(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "remotedl.toml").write_text('host = "unterminated\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "malformed TOML" in err
    assert str(proj / "remotedl.toml") in err
    assert "Traceback" not in err


def test_unknown_and_mistyped_settings(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "remotedl.toml").write_text('hots = "x"\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "unknown setting 'hots'" in err
    (proj / "remotedl.toml").write_text("data = 3\n")
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "'data' must be a list of strings" in err


def test_missing_ssh_config_file(tmp_path):
    code, _, err = run_main(tmp_path, "config", "--host", "x", "--ssh-config", str(tmp_path / "nope"))
    assert code == 3
    assert "does not exist" in err


def test_config_text_keeps_bracketed_words(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "remotedl.toml").write_text('[dns]\nname = "a.example.test"\n')
    code, out, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 0, err
    assert "[dns]" in out  # not taken for rich markup and dropped


def test_config_says_unset_values_and_where_each_came_from(tmp_path):
    """`config` printed Python's `None` and rows with an empty "from"."""
    proj = tmp_path / "proj"
    proj.mkdir()
    code, out, err = run_main(tmp_path, "config", "--host", "somebox", cwd=proj, COLUMNS="300")
    assert code == 0, err
    assert not re.search(r"\bNone\b", out), out
    assert re.search(r"^conda +\(unset\) +default *$", out, re.M), out
    assert re.search(r"^project config +\(none\) +no remotedl\.toml", out, re.M), out
    assert re.search(r"^host\.ssh_config +\(unset\) +~/\.ssh/config does not exist", out, re.M), out
    code, out, _ = run_main(tmp_path, "config", "--json", "--host", "somebox", cwd=proj)
    data = json.loads(out)
    assert data["settings"]["conda"] == {"value": None, "source": "default"}  # JSON keeps null
    empty = [k for k, v in [*data["settings"].items(), *data["host"].items()] if not v["source"]]
    assert empty == []


def test_a_job_started_ahead_of_this_clock_has_no_negative_duration():
    """A box whose clock is ahead: the job's start lies in this machine's future, and `jobs`
    showed a duration of `-1d 22h`."""
    import time

    from remotedl.cli.common import seconds_text as _duration
    from remotedl.cli.jobs import _duration_text
    from remotedl.schema import JobRecord

    assert _duration(-2 * 3600) == "?"
    assert _duration(-1) == "?"
    assert _duration(-0.4) == "0m 0s"  # rounding, not a clock ahead
    assert _duration(0) == "0m 0s"
    assert _duration(65) == "1m 5s"
    assert _duration(2 * 86400 + 3 * 3600) == "2d 3h"
    assert _duration(None) == "?"
    ahead = time.time() + 2 * 3600 + 30
    rec = JobRecord(id=1, name="x", command="x", cwd="/", status="running", started=ahead)
    text = _duration_text(rec)
    assert text.startswith("? (it started 2h 0m ahead of this machine's clock"), text
    ended = JobRecord(id=2, name="x", command="x", cwd="/", status="succeeded", started=100.0, ended=160.0)
    assert _duration_text(ended) == "1m 0s"
    assert _duration_text(JobRecord(id=3, name="x", command="x", cwd="/", status="queued")) == "-"


def test_json_output_is_compact_for_programs_and_indented_at_a_terminal(tmp_path):
    """``--json`` piped is one compact line (json's C encoder: `jobs --all --json` of 5,000
    records spent a quarter second indenting); a person at a terminal gets it indented."""
    import argparse
    import io

    from remotedl.cli.app import App

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    data = {"jobs": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    piped = make_env(tmp_path)
    App(argparse.Namespace(), piped).print_json(data)
    assert piped.stdout.getvalue() == json.dumps(data) + "\n"
    at_terminal = make_env(tmp_path)
    at_terminal.stdout = Terminal()
    App(argparse.Namespace(), at_terminal).print_json(data)
    assert at_terminal.stdout.getvalue() == json.dumps(data, indent=2) + "\n"
