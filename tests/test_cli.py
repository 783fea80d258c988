from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from remotedl import __version__
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


def test_unknown_command_is_usage_error(tmp_path, capsys):
    code, _, _ = run_main(tmp_path, "frobnicate")
    assert code == 2
    assert "invalid choice" in capsys.readouterr().err


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
