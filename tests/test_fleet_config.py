"""Fleet settings: host lists, named fleets, [hosts.NAME] tables, their precedence and the trust
boundary. Pure configuration: no box needed (the ssh config is a file in the test's directory)."""

from __future__ import annotations

import json
from pathlib import Path

from remotedl.config import load_settings
from tests.conftest import make_env
from tests.test_cli import run_main


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def settings(tmp_path: Path, cwd: Path, flags: dict[str, object] | None = None, **environ: str):
    return load_settings(make_env(tmp_path, cwd=cwd, **environ), flags)


def test_host_lists_fleets_and_their_precedence(tmp_path):
    proj = tmp_path / "proj"
    write(
        tmp_path / "config" / "remotedl" / "config.toml",
        '[fleets]\nlab = ["gpu1", "gpu2"]\nall = ["@lab", "cloud"]\n',
    )
    write(proj / "remotedl.toml", 'hosts = ["gpu1", "home"]\n')
    assert settings(tmp_path, proj).host_names() == ["gpu1", "home"]
    # --host beats hosts = [...] of the project; fleets expand, in order, each host once
    assert settings(tmp_path, proj, {"host": "@lab,home,gpu1"}).host_names() == ["gpu1", "gpu2", "home"]
    assert settings(tmp_path, proj, {"host": "@all"}).host_names() == ["gpu1", "gpu2", "cloud"]
    assert settings(tmp_path, proj, REMOTEDL_HOST="a,b").host_names() == ["a", "b"]
    # one host is one host
    assert settings(tmp_path, proj, {"host": "gpu2"}).host_names() == ["gpu2"]

    code, _, err = run_main(tmp_path, "config", "--host", "@nope", cwd=proj)
    assert code == 3
    assert "no fleet called 'nope' (known: @all, @lab)" in err
    write(proj / "remotedl.toml", 'host = "a"\nhosts = ["b"]\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "both 'host' and 'hosts' are set" in err
    write(tmp_path / "config" / "remotedl" / "config.toml", '[fleets]\nloop = ["@loop"]\n')
    code, _, err = run_main(tmp_path, "config", "--host", "@loop", cwd=proj)
    assert code == 3
    assert "fleet 'loop' includes itself" in err


def test_per_host_settings_sit_between_project_and_environment(tmp_path):
    proj = tmp_path / "proj"
    write(
        tmp_path / "config" / "remotedl" / "config.toml",
        '[hosts.gpu1]\nremote_dir = "/user/gpu1"\npython = "/opt/py/bin/python3"\n',
    )
    write(
        proj / "remotedl.toml",
        """host = ["gpu1", "gpu2"]   # a list in `host`: beside [hosts.NAME] tables
remote_dir = "~/proj"
env = { A = "1", B = "2" }

[hosts.gpu1]
remote_dir = "/scratch/gpu1"
env = { B = "gpu1" }

[hosts.cluster]
scheduler = "slurm"
partition = "gpu"
time = 60
modules = ["cuda/12.4"]
sbatch_args = ["--exclusive"]
""",
    )
    s = settings(tmp_path, proj)
    assert s.host_names() == ["gpu1", "gpu2"]
    g1, g2 = s.for_host("gpu1"), s.for_host("gpu2")
    # [hosts.gpu1] of the project beats the project's top level and the user's [hosts.gpu1]
    assert g1.remote_dir == "/scratch/gpu1"
    assert g1.source("remote_dir") == f"project config {proj / 'remotedl.toml'} [hosts.gpu1]"
    # keys the project's table does not set come from the user's table
    assert g1.get("python") == "/opt/py/bin/python3"
    assert "user config" in g1.source("python")
    # env adds to the general env
    assert g1.get("env") == {"A": "1", "B": "gpu1"}
    assert g2.remote_dir == "~/proj"
    assert g2.get("env") == {"A": "1", "B": "2"}
    assert g1.get("host") == "gpu1"
    assert g1.host_names() == ["gpu1"]
    # the environment and flags beat [hosts.NAME]
    s = settings(tmp_path, proj, REMOTEDL_REMOTE_DIR="/from/env")
    assert s.for_host("gpu1").remote_dir == "/from/env"
    assert s.for_host("gpu1").source("remote_dir") == "environment REMOTEDL_REMOTE_DIR"
    # Slurm hosts' settings are accepted and typed
    c = settings(tmp_path, proj).for_host("cluster")
    assert (c.get("scheduler"), c.get("partition"), c.get("time")) == ("slurm", "gpu", "60")
    assert c.get("modules") == ["cuda/12.4"]
    assert c.get("sbatch_args") == ["--exclusive"]
    assert g2.get("scheduler") == "box"


def test_host_tables_are_checked(tmp_path):
    proj = tmp_path / "proj"
    write(proj / "remotedl.toml", '[hosts.gpu1]\nremote_dri = "/x"\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "[hosts.gpu1]: unknown setting 'remote_dri'" in err
    assert "remote_dir" in err  # the hint lists what a host table may set
    write(proj / "remotedl.toml", '[hosts.gpu1]\nhost = "other"\n')
    assert "unknown setting 'host'" in run_main(tmp_path, "config", cwd=proj)[2]
    write(proj / "remotedl.toml", '[hosts.gpu1]\nconnect_timeout = "soon"\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "[hosts.gpu1]: 'connect_timeout' must be a number" in err
    write(proj / "remotedl.toml", '[hosts.gpu1]\nscheduler = "pbs"\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "'scheduler' must be one of box, slurm" in err
    write(proj / "remotedl.toml", 'hosts = { gpu1 = "x" }\n')
    code, _, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "hosts.gpu1 must be a table of settings" in err


def test_project_host_tables_cannot_name_an_ssh_config_until_allowed(tmp_path):
    proj = tmp_path / "proj"
    evil = write(proj / "evil_ssh_config", "Host *\n    ProxyCommand touch /tmp/pwned\n")
    write(
        proj / "remotedl.toml",
        'host = "gpu1"\n[hosts.gpu1]\nssh_config = "evil_ssh_config"\nremote_dir = "/r"\n',
    )
    code, _, err = run_main(tmp_path, "status", cwd=proj)
    assert code == 3
    assert "hosts.gpu1.ssh_config" in err
    assert "remotedl allow" in err
    # not applied meanwhile: the rest of the table is
    s = settings(tmp_path, proj)
    assert s.needs_allow == ["hosts.gpu1.ssh_config"]
    assert "ssh_config" not in s.host_tables["gpu1"]
    assert s.for_host("gpu1").remote_dir == "/r"
    assert run_main(tmp_path, "allow", cwd=proj)[0] == 0
    s = settings(tmp_path, proj)
    assert s.needs_allow == []
    assert s.for_host("gpu1").get("ssh_config") == str(evil)  # relative to the file naming it
    # the user's own config may name one
    write(tmp_path / "config" / "remotedl" / "config.toml", f'[hosts.gpu2]\nssh_config = "{evil}"\n')
    assert settings(tmp_path, proj).for_host("gpu2").get("ssh_config") == str(evil)


def test_config_shows_each_host(tmp_path):
    proj = tmp_path / "proj"
    ssh_config = write(
        tmp_path / "ssh_config",
        "Host gpu1\n    HostName 10.0.0.1\n    Port 2201\nHost gpu2\n    HostName 10.0.0.2\n",
    )
    write(
        proj / "remotedl.toml",
        'host = ["gpu1", "gpu2"]\nremote_dir = "~/p"\n'
        '[hosts.gpu2]\nremote_dir = "/data/p"\npython = "python3.11"\n',
    )
    code, out, err = run_main(tmp_path, "config", "--json", "--ssh-config", str(ssh_config), cwd=proj)
    assert code == 0, err
    data = json.loads(out)
    assert data["host_names"] == ["gpu1", "gpu2"]
    h1, h2 = data["hosts"]["gpu1"], data["hosts"]["gpu2"]
    assert h1["host"]["hostname"]["value"] == "10.0.0.1"
    assert h1["host"]["port"]["value"] == 2201
    assert h1["remote_dir"] == "~/p"
    assert h2["remote_dir"] == "/data/p"
    assert h2["settings"]["python"] == {
        "value": "python3.11",
        "source": f"project config {proj / 'remotedl.toml'} [hosts.gpu2]",
    }
    code, out, err = run_main(tmp_path, "config", "--ssh-config", str(ssh_config), cwd=proj)
    assert code == 0, err
    assert "host gpu1" in out
    assert "host gpu2" in out
    assert "python3.11" in out
    assert "10.0.0.2" in out
    # one host: its table applies, and the output is as before
    code, out, err = run_main(
        tmp_path, "config", "--json", "--host", "gpu2", "--ssh-config", str(ssh_config), cwd=proj
    )
    data = json.loads(out)
    assert data["remote_dir"] == "/data/p"
    assert data["host"]["alias"] == {"value": "gpu2", "source": "flag --host"}
    assert "hosts" not in data


def test_single_host_commands_refuse_a_fleet(tmp_path):
    for argv in (["trust"], ["tunnel", "8888"], ["doctor"]):
        code, _, err = run_main(tmp_path, *argv, "--host", "a,b")
        assert code == 2, (argv, err)
        assert f"`remotedl {argv[0]}` works on one host; 2 are given (a, b)" in err
