"""Jobs run in the project's environment on the box (its .venv, a conda environment, an
env_setup line), synced from requirements.txt when it changed, against the real sshd box.
No internet: the package is a wheel built here, installed with --no-index --find-links."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import cli_for


def make_wheel(dest: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> Path:
    """A pure-Python wheel of a package whose VERSION is ``version``, built by hand; ``requires``:
    its Requires-Dist lines (with extras: ``x; extra == "more"``)."""
    dest.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    extras = {r.split("extra ==")[1].strip(" \"'") for r in requires if "extra ==" in r}
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
        + [f"Provides-Extra: {e}\n" for e in sorted(extras)]
        + [f"Requires-Dist: {r}\n" for r in requires]
    )
    files = {
        f"{name}/__init__.py": f'VERSION = "{version}"\n',
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: remotedl-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    whl = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


def requirements(wheels: Path, spec: str) -> str:
    return f"--no-index\n--find-links {wheels}\n{spec}\n"


def job_count(run, cwd: Path) -> int:
    r = run("jobs", "--all", "--json", cwd=cwd)
    assert r.code == 0, r.err
    return len(json.loads(r.out))


SHOW = "import os, sys, rdlpkg\nprint(rdlpkg.VERSION, sys.prefix == os.environ.get('VIRTUAL_ENV'))\n"


def test_requirements_sync_once_per_change_and_failures_fail_the_run(box, project, tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "rdlpkg", "1.0")
    make_wheel(wheels, "rdlpkg", "2.0")
    rdir = f"~/envs/{tmp_path.name}"
    (project / "remotedl.toml").write_text(f'remote_dir = "{rdir}"\n')
    (project / "requirements.txt").write_text(requirements(wheels, "rdlpkg==1.0"))
    (project / "show.py").write_text(SHOW)
    run = cli_for(box, tmp_path / "laptop")

    r = run("run", "--cpu", "show.py", cwd=project)
    assert r.code == 0, r.err
    assert r.out == "1.0 True\n"  # the job imports it, from the project's venv
    assert "requirements.txt changed since the last environment sync" in r.err
    assert "environment synced (requirements.txt -> " in r.err
    r = run("run", "--cpu", "show.py", cwd=project)  # unchanged: no second install
    assert r.code == 0, r.err
    assert r.out == "1.0 True\n"
    assert "environment" not in r.err

    r = run("show", "--json", cwd=project)
    env = json.loads(r.out)["environment"]
    venv = str(box.home / "envs" / tmp_path.name / ".venv")
    assert env["virtual_env"] == venv
    assert env["python"] == f"{venv}/bin/python"
    assert "torch" not in env
    r = run("doctor", "--json", cwd=project)
    checks = {c["name"]: c for c in json.loads(r.out)["checks"]}
    assert checks["environment"]["status"] == "ok"
    assert f"jobs use the venv {venv}" in checks["environment"]["detail"]

    (project / "requirements.txt").write_text(requirements(wheels, "rdlpkg==2.0"))
    r = run("run", "--cpu", "show.py", cwd=project)  # changed: synced again
    assert r.code == 0, r.err
    assert r.out == "2.0 True\n"
    assert "environment synced" in r.err

    before = job_count(run, project)
    (project / "requirements.txt").write_text(requirements(wheels, "nosuchpkg==9"))
    r = run("run", "--cpu", "show.py", cwd=project)
    assert r.code == 1
    # the installer's own words (pip's, or uv's where the box has uv)
    assert "No matching distribution found for nosuchpkg" in r.err or "nosuchpkg was not found" in r.err
    assert "could not be synced" in r.err
    assert job_count(run, project) == before  # the run failed, no job that crashes later

    (project / "requirements.txt").write_text(requirements(wheels, "rdlpkg==1.0"))
    r = run("push", "--env", cwd=project)
    assert r.code == 0, r.err
    assert "env   requirements.txt -> " in r.out and "(synced)" in r.out
    r = run("run", "--cpu", "show.py", cwd=project)
    assert r.code == 0, r.err
    assert r.out == "1.0 True\n"
    assert "environment" not in r.err


LIST = "from importlib.metadata import distributions as d\nprint(*sorted(x.metadata['Name'] for x in d()))\n"


def wheels_with_dependencies(wheels: Path) -> None:
    """rdlapp needs rdlpkg, and rdlextra with its extra 'more'; rdlother stands alone."""
    make_wheel(wheels, "rdlapp", "1.0", ("rdlpkg", 'rdlextra; extra == "more"'))
    for name in ("rdlpkg", "rdlextra", "rdlother"):
        make_wheel(wheels, name, "1.0")


def test_the_venv_matches_requirements_exactly(box, project, tmp_path):
    """A package removed from requirements.txt (or needed only by one removed, or by an extra no
    longer asked for) is uninstalled; what a listed package needs stays."""
    wheels = tmp_path / "wheels"
    wheels_with_dependencies(wheels)
    (project / "remotedl.toml").write_text(f'remote_dir = "~/envs/{tmp_path.name}"\n')
    (project / "list.py").write_text(LIST)
    run = cli_for(box, tmp_path / "laptop")
    (project / "requirements.txt").write_text(requirements(wheels, "rdlapp[more]\nrdlother"))
    r = run("run", "--cpu", "list.py", cwd=project)
    assert r.code == 0, r.err
    assert r.out == "pip rdlapp rdlextra rdlother rdlpkg setuptools\n" or r.out == (
        "pip rdlapp rdlextra rdlother rdlpkg\n"  # a venv without setuptools (python >= 3.12)
    )
    (project / "requirements.txt").write_text(requirements(wheels, "rdlapp"))
    r = run("push", "--env", "--json", cwd=project)
    assert r.code == 0, r.err
    output = json.loads(r.out)["environment"]["output"]
    listed = run("run", "--cpu", "list.py", cwd=project)
    assert listed.code == 0, listed.err
    assert listed.out.replace(" setuptools", "") == "pip rdlapp rdlpkg\n"
    assert "remotedl: pip uninstall (no longer required): rdlextra rdlother" in output


def test_never_installs_into_the_system_interpreter(box, project, tmp_path):
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "rdlpkg", "1.0")
    (project / "remotedl.toml").write_text(f'remote_dir = "~/envs/{tmp_path.name}"\nenv_setup = "true"\n')
    (project / "requirements.txt").write_text(requirements(wheels, "rdlpkg==1.0"))
    run = cli_for(box, tmp_path / "laptop")
    r = run("run", "--cpu", "--", "python3", "-c", "print(1)", cwd=project)
    assert r.code == 1
    assert "is a system interpreter, not a venv or conda environment" in r.err
    assert "remotedl never installs into it" in r.err


def test_env_setup_runs_in_the_jobs_shell(box, project, tmp_path):
    activate = tmp_path / "stand-in-env" / "activate"
    activate.parent.mkdir()
    activate.write_text('MYENV_ACTIVE="$1"; export MYENV_ACTIVE\n')
    line = f"source {activate} myenv"  # bash's `source` with an argument, as users write it
    (project / "remotedl.toml").write_text(f'remote_dir = "~/envs/{tmp_path.name}"\nenv_setup = "{line}"\n')
    run = cli_for(box, tmp_path / "laptop")
    r = run("run", "--cpu", "--", "sh", "-c", 'echo "myenv=$MYENV_ACTIVE"', cwd=project)
    assert r.code == 0, r.err
    assert r.out == "myenv=myenv\n"
    rec = json.loads(run("show", "--json", cwd=project).out)
    assert rec["environment"]["env_setup"] == line
    (project / "remotedl.toml").write_text(f'remote_dir = "~/envs/{tmp_path.name}"\nenv_setup = "false"\n')
    r = run("run", "--cpu", "--", "echo", "never", cwd=project)
    assert r.code == 125
    assert "remotedl: env_setup failed: false" in r.out
    assert "never" not in r.out


CONDA_SH = """\
conda() {
  case $1 in
    activate)
      [ -d "$HOME/miniforge3/envs/$2" ] || {
        echo "EnvironmentNameNotFound: Could not find conda environment: $2" >&2; return 1; }
      CONDA_PREFIX=$HOME/miniforge3/envs/$2; CONDA_DEFAULT_ENV=$2
      PATH=$CONDA_PREFIX/bin:$PATH; PYTHONPATH=$CONDA_PREFIX/site
      export CONDA_PREFIX CONDA_DEFAULT_ENV PATH PYTHONPATH ;;
    *) "$HOME/miniforge3/bin/conda" "$@" ;;
  esac
}
"""


@pytest.fixture
def conda_box(fresh_box):
    """A box with a stand-in conda in ~/miniforge3 (conda.sh, bin/conda) and an environment
    'torch' whose python sees a torch distribution (metadata only)."""
    base = fresh_box.home / "miniforge3"
    (base / "etc" / "profile.d").mkdir(parents=True)
    (base / "etc" / "profile.d" / "conda.sh").write_text(CONDA_SH)
    (base / "bin").mkdir()
    (base / "bin" / "conda").write_text('#!/bin/sh\necho "conda $*" >> "$HOME/conda-calls.txt"\n')
    (base / "bin" / "conda").chmod(0o755)
    env = base / "envs" / "torch"
    (env / "bin").mkdir(parents=True)
    os.symlink(os.path.realpath(sys.executable), env / "bin" / "python")
    dist = env / "site" / "torch-2.3.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch\nVersion: 2.3.1\n")
    return fresh_box


def test_conda_environment_and_environment_yml(conda_box, project, tmp_path):
    (project / "remotedl.toml").write_text('remote_dir = "~/condaproj"\nconda = "torch"\n')
    run = cli_for(conda_box, tmp_path / "laptop")
    show = 'echo "env=$CONDA_DEFAULT_ENV py=$(command -v python)"'
    r = run("run", "--cpu", "--", "sh", "-c", show, cwd=project)
    assert r.code == 0, r.err
    env_py = conda_box.home / "miniforge3" / "envs" / "torch" / "bin" / "python"
    assert r.out == f"env=torch py={env_py}\n"
    env = json.loads(run("show", "--json", cwd=project).out)["environment"]
    assert env["conda"] == env["conda_default_env"] == "torch"
    assert env["python"] == str(env_py)
    assert env["torch"] == "2.3.1"  # read from its metadata, torch is not imported
    r = run("show", cwd=project)
    assert f"{env_py} 3." in r.out and "conda torch" in r.out and "torch 2.3.1" in r.out

    (project / "environment.yml").write_text("name: torch\ndependencies:\n  - python=3.11\n")
    calls = conda_box.home / "conda-calls.txt"
    r = run("run", "--cpu", "--", "true", cwd=project)
    assert r.code == 0, r.err
    assert calls.read_text() == "conda env update -n torch -f environment.yml\n"
    r = run("run", "--cpu", "--", "true", cwd=project)
    assert r.code == 0, r.err
    assert calls.read_text().count("\n") == 1  # unchanged: not again

    (project / "remotedl.toml").write_text('remote_dir = "~/condaproj"\nconda = "nope"\n')
    (project / "environment.yml").unlink()
    r = run("run", "--cpu", "--", "echo", "never", cwd=project)
    assert r.code == 125
    assert "could not activate the conda environment 'nope'" in r.out


def test_uv_is_preferred_where_the_box_has_it(fresh_box, project, tmp_path):
    # uv comes with the test extras (in the venv's bin, which need not be on PATH).
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path(sys.executable).parent))
    if uv is None:
        pytest.skip("uv is not installed here (the test extras install it); pip is tested above")
    os.symlink(uv, fresh_box.home.parent / "bin" / "uv")  # on the box's PATH
    wheels = tmp_path / "wheels"
    wheels_with_dependencies(wheels)
    (project / "remotedl.toml").write_text('remote_dir = "~/uvproj"\n')
    (project / "requirements.txt").write_text(requirements(wheels, "rdlpkg==1.0\nrdlapp[more]\nrdlother"))
    (project / "show.py").write_text(SHOW)
    (project / "list.py").write_text(LIST)
    run = cli_for(fresh_box, tmp_path / "laptop")
    r = run("push", "--env", "--json", cwd=project)
    assert r.code == 0, r.err
    env = json.loads(r.out)["environment"]
    assert env["synced"] is True
    assert "remotedl: uv venv .venv" in env["output"]
    r = run("run", "--cpu", "show.py", cwd=project)
    assert r.code == 0, r.err
    assert r.out == "1.0 True\n"
    assert "environment" not in r.err
    assert run("run", "--cpu", "list.py", cwd=project).out == "rdlapp rdlextra rdlother rdlpkg\n"
    # The environment matches the file: what it no longer needs is uninstalled.
    (project / "requirements.txt").write_text(requirements(wheels, "rdlapp"))
    r = run("run", "--cpu", "list.py", cwd=project)
    assert r.code == 0, r.err
    assert "environment synced" in r.err
    assert r.out == "rdlapp rdlpkg\n"
    assert "remotedl: uv pip install --exact -r requirements.txt" in env["output"]


def test_setup_cmd_replaces_the_built_in_steps(box, project, tmp_path):
    marker = tmp_path / "setup-ran"
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/envs/{tmp_path.name}"\nsetup_cmd = "echo ran >> {marker}"\n'
    )
    (project / "requirements.txt").write_text("nosuchpkg==9\n")  # never installed: setup_cmd decides
    run = cli_for(box, tmp_path / "laptop")
    r = run("run", "--cpu", "--", "true", cwd=project)
    assert r.code == 0, r.err
    assert "environment synced (setup_cmd" in r.err
    assert marker.read_text() == "ran\n"
    r = run("run", "--cpu", "--", "true", cwd=project)
    assert r.code == 0, r.err
    assert marker.read_text() == "ran\n"  # unchanged requirements: not again
    (project / "requirements.txt").write_text("nosuchpkg==10\n")
    assert run("run", "--cpu", "--", "true", cwd=project).code == 0
    assert marker.read_text() == "ran\nran\n"


def test_pip_prune_reads_the_file_as_pip_does(tmp_path):
    """The pip path's removal, in a real venv: -r includes, a wheel named by path, a line whose
    marker does not apply, an extra; what pip, setuptools and wheel need stays."""
    import subprocess

    from remotedl.agent.envsync import PRUNE

    wheels = tmp_path / "wheels"
    wheels_with_dependencies(wheels)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    (tmp_path / "base.txt").write_text(requirements(wheels, "rdlother"))
    (tmp_path / "requirements.txt").write_text(
        f"-r base.txt\n{wheels}/rdlapp-1.0-py3-none-any.whl\nrdlpkg; python_version < '3'\n"
    )
    subprocess.run([*pip, "-r", "requirements.txt"], cwd=tmp_path, check=True)
    subprocess.run([*pip, "rdlextra"], cwd=tmp_path, check=True)  # installed by hand, not required
    r = subprocess.run([py, "-c", PRUNE, "requirements.txt"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "remotedl: pip uninstall (no longer required): rdlextra\n" in r.stdout
    left = subprocess.run([py, "-c", LIST], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert left.replace(" setuptools", "") == "pip rdlapp rdlother rdlpkg\n"  # rdlapp needs rdlpkg
