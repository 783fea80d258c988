"""remotedl as a user has it: a regular (non-editable) install in a virtual environment.

The development venv has remotedl installed *editable*: its ``.pth`` file imports setuptools'
``__editable___remotedl_*_finder`` at every interpreter start (it imports pathlib, fnmatch,
importlib.util...: ~15 ms measured), a cost that ``pip install remotedl``, ``pipx install`` or
``uv tool install`` never pay. Timing ``python -m remotedl`` from that venv would count it
against remotedl. So a benchmark times the ``remotedl`` script of a virtual environment made
once per benchmark run, holding this source tree as a wheel installs it: the package in
site-packages (playbooks/ as remotedl/playbooks/shipped, as pyproject.toml maps it), byte-compiled
as pip does, and the console script pip writes for ``[project.scripts]``. (Not pip itself: a wheel
build needs a setuptools newer than the venv's, or the network.) Its dependencies (rich,
paramiko, ...) are the development venv's own, put on its path by a ``.pth`` line: the same
versions, and no editable finder (a ``.pth`` file is read in a site directory only, not in a
directory a ``.pth`` line adds).

``PYTHONPATH=DIR`` in the environment of a command (rtt.py's ``--against DIR``) makes that
script run the remotedl in DIR instead, under the same conditions.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

SOURCE = Path(__file__).resolve().parent.parent


@cache
def installed_remotedl() -> list[str]:
    """argv of the ``remotedl`` command of a fresh non-editable install of this tree (made on
    the first call, removed at exit)."""
    base = Path(tempfile.mkdtemp(prefix="remotedl-bench-install-"))
    atexit.register(shutil.rmtree, base, True)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "remotedl-bench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(SOURCE / "remotedl", Path(site) / "remotedl", ignore=ignore)
    shutil.copytree(SOURCE / "playbooks", Path(site) / "remotedl" / "playbooks" / "shipped", ignore=ignore)
    subprocess.run([str(python), "-m", "compileall", "-q", str(Path(site) / "remotedl")], check=True)
    exe = venv / "bin" / "remotedl"
    exe.write_text(SCRIPT.format(python=python))
    exe.chmod(0o755)
    return [str(exe)]


# The console script pip (and uv) write for ``remotedl = "remotedl.cli:entry"``.
SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
try:
    from remotedl.cli import entry
except ImportError:  # an older tree (rtt.py --against), whose command was remotedl.cli:main
    from remotedl.cli import main as entry
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(entry())
"""
