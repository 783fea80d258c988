"""The project's environment on the box: what makes it, whether it is in sync, installing it,
and the job's shell (activation and the environment probe).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from remotedl.activate import ACTIVATE
from remotedl.agent.checkout import ensure_excludes
from remotedl.agent.store import ENV_FILES, AgentError, Context
from remotedl.schema import EnvsyncRequest, encode_mark

# What the job's environment is: its interpreter and, without importing it, torch's version.
PROBE = """\
import json, os, sys
info = {"python": sys.executable, "python_version": "%d.%d.%d" % sys.version_info[:3]}
for k in ("VIRTUAL_ENV", "CONDA_DEFAULT_ENV", "CONDA_PREFIX"):
    if os.environ.get(k):
        info[k.lower()] = os.environ[k]
try:
    from importlib.metadata import version
    info["torch"] = version("torch")
except Exception:
    pass
print(json.dumps(info))
"""


# The job's shell: "$1" the command line, "$2" the job's directory (or empty), "$3" remote_dir,
# "$4" the conda environment, "$5" env_setup, "$6" a nonce for the environment line, "$7" the
# probe. The environment line goes to the runner, which takes it out of the log.
WRAPPER = (
    "_rdl_c=$1 _rdl_jd=$2 _rdl_rd=$3 _rdl_conda=$4 _rdl_setup=$5 _rdl_nonce=$6 _rdl_probe=$7\nshift 7\n"
    + ACTIVATE
    + r"""
_rdl_activate || exit 125
_rdl_py=$(command -v python 2>/dev/null || command -v python3 2>/dev/null)
_rdl_info=
[ -n "$_rdl_py" ] && _rdl_info=$("$_rdl_py" -c "$_rdl_probe" 2>/dev/null)
[ -n "$_rdl_info" ] || _rdl_info='{}'
printf '@@remotedl-env:%s %s\n' "$_rdl_nonce" "$_rdl_info"
unset _rdl_jd _rdl_rd _rdl_conda _rdl_setup _rdl_nonce _rdl_probe _rdl_py _rdl_info _rdl_v _rdl_b _rdl_cb
eval "$_rdl_c"
"""
)


def shell_for(setup: str | None) -> str:
    """``env_setup`` lines are often bash (``source ...``): bash runs them where there is one."""
    return "bash" if setup and shutil.which("bash") else "sh"


def _pyproject_deps(text: str) -> list[str] | None:
    """[project].dependencies of a pyproject.toml, or None when it declares none."""
    try:
        import tomllib

        data = tomllib.loads(text)
        deps = data.get("project", {}).get("dependencies")
        return [str(d) for d in deps] if isinstance(deps, list) and deps else None
    except ImportError:  # python 3.10: read the one array we need
        m = re.search(r"^\[project\][^\[]*?^dependencies\s*=\s*\[(.*?)\]", text, re.M | re.S)
        if not m:
            return None
        deps = re.findall(r"""["']([^"']+)["']""", m.group(1))
        return deps or None
    except ValueError:
        return None


def env_plan(rdir: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """What makes the project's environment, and a hash of it; None: nothing to sync."""
    files: dict[str, bytes] = {}
    for name in ENV_FILES:
        with contextlib.suppress(OSError):
            files[name] = (Path(rdir) / name).read_bytes()
    pyproject = files.get("pyproject.toml")
    if pyproject is not None and _pyproject_deps(pyproject.decode(errors="replace")) is None:
        files.pop("pyproject.toml")
        files.pop("uv.lock", None)
    if "pyproject.toml" not in files:
        files.pop("uv.lock", None)
    setup_cmd = spec.get("setup_cmd")
    if setup_cmd:
        kind, used = "setup_cmd", sorted(files)
    elif "environment.yml" in files:
        kind, used = "environment.yml", ["environment.yml"]
    elif "uv.lock" in files:
        kind, used = "uv.lock", ["pyproject.toml", "uv.lock"]
    elif "requirements.txt" in files:
        kind, used = "requirements.txt", ["requirements.txt"]
    elif "pyproject.toml" in files:
        kind, used = "pyproject.toml", ["pyproject.toml"]
    else:
        return None
    conda = spec.get("conda") or None
    if kind == "environment.yml" and not conda:
        m = re.search(rb"^name:\s*(\S+)", files["environment.yml"], re.M)
        conda = m.group(1).decode() if m else None
    h = hashlib.sha256()
    for part in (kind, setup_cmd, conda, spec.get("env_setup"), sys.executable):
        h.update(str(part or "").encode() + b"\0")
    for name in used:
        h.update(name.encode() + b"\0" + files[name] + b"\0")
    if conda or spec.get("env_setup"):
        target = f"conda environment {conda}" if conda else "the environment env_setup activates"
    else:
        target = os.path.join(rdir, ".venv")
    return {"kind": kind, "files": used, "hash": h.hexdigest()[:20], "conda": conda, "target": target}


def _stamp_path(rdir: str) -> Path:
    return Path(rdir) / ".remotedl" / "env.json"


def env_in_sync(rdir: str, plan: dict[str, Any], spec: dict[str, Any]) -> bool:
    try:
        stamp = json.loads(_stamp_path(rdir).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stamp, dict) or stamp.get("hash") != plan["hash"]:
        return False
    if plan["conda"] or spec.get("env_setup") or plan["kind"] == "setup_cmd":
        return True
    return os.access(os.path.join(rdir, ".venv", "bin", "python"), os.X_OK)


# Run by the project venv's python after pip installed requirements file "$1": uninstall what
# that file no longer needs. pip has no sync of its own; its parser (the one pip-tools uses) reads
# the file as pip does (-r includes, markers, -e and paths), and the installed packages' metadata
# gives what they need in turn, offline. pip, setuptools and wheel (the venv's own) and what they
# need stay.
PRUNE = """\
import contextlib, json, os, subprocess, sys
from importlib.metadata import distributions

def needed(path, installed):
    from pip._internal.network.session import PipSession
    from pip._internal.req.constructors import install_req_from_parsed_requirement
    from pip._internal.req.req_file import parse_requirements
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name as canon

    def by_url(url):
        for key, d in installed.items():
            with contextlib.suppress(ValueError):
                if json.loads(d.read_text("direct_url.json") or "{}").get("url") == url:
                    return key
    todo = [(seed, frozenset()) for seed in ("pip", "setuptools", "wheel")]  # the venv's own
    for parsed in parse_requirements(path, session=PipSession()):
        req = install_req_from_parsed_requirement(parsed)
        if req.constraint or not req.match_markers():
            continue
        name = canon(req.name) if req.name else req.link and by_url(req.link.url_without_fragment)
        if not name:
            raise ValueError(f"cannot tell what {req} installs")
        todo.append((name, frozenset(req.extras)))
    keep, seen = set(), set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) not in seen:
            seen.add((name, extras))
            keep.add(name)
            for line in (installed[name].requires or []) if name in installed else []:
                r = Requirement(line)
                if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras or {""}):
                    todo.append((canon(r.name), frozenset(r.extras)))
    return keep

try:
    from pip._vendor.packaging.utils import canonicalize_name as canon
    prefix = os.path.realpath(sys.prefix) + os.sep
    installed = {
        canon(d.metadata["Name"]): d for d in distributions()
        if d.metadata["Name"] and os.path.realpath(str(d.locate_file(""))).startswith(prefix)
    }
    keep = needed(sys.argv[1], installed)
except Exception as e:  # the install stands; only the removal is skipped
    print(f"remotedl: warning: cannot tell what {sys.argv[1]} needs ({e}): nothing uninstalled")
    sys.exit(0)
extra = sorted(d.metadata["Name"] for key, d in installed.items() if key not in keep)
if extra:
    print("remotedl: pip uninstall (no longer required):", " ".join(extra), flush=True)
    cmd = [sys.executable, "-m", "pip", "uninstall", "--disable-pip-version-check", "-y", *extra]
    sys.exit(subprocess.call(cmd))
"""

# "$1" kind, "$2" remote_dir, "$3" conda env, "$4" env_setup, "$5" the base python, "$6" setup_cmd,
# "$7" a requirements file made from pyproject.toml (pip without uv), "$8" PRUNE. Never the
# system pip. The project's .venv is made to match the file exactly (uv pip install --exact, or
# pip install and PRUNE); a conda or env_setup environment, shared and made by other means, only
# gets what the file adds.
INSTALL = (
    "_rdl_kind=$1 _rdl_rd=$2 _rdl_conda=$3 _rdl_setup=$4 _rdl_base=$5 _rdl_cmd=$6 _rdl_req=$7\n"
    "_rdl_prune=$8 _rdl_jd=\n"
    + ACTIVATE
    + r"""
cd "$_rdl_rd" || exit 1
say() { printf 'remotedl: %s\n' "$*"; }
if [ "$_rdl_kind" = setup_cmd ]; then
  _rdl_activate || exit 1
  say "setup_cmd: $_rdl_cmd"
  eval "$_rdl_cmd"
  exit $?
fi
if [ "$_rdl_kind" = environment.yml ]; then
  _rdl_find_conda || exit 1
  say "conda env update -n $_rdl_conda -f environment.yml"
  "$_rdl_cb/bin/conda" env update -n "$_rdl_conda" -f environment.yml
  exit $?
fi
if [ -n "$_rdl_conda$_rdl_setup" ]; then
  _rdl_activate || exit 1
  py=$(command -v python 2>/dev/null || command -v python3 2>/dev/null)
  "$py" -c 'import os, sys
sys.exit(sys.prefix == sys.base_prefix and not os.path.isdir(os.path.join(sys.prefix, "conda-meta")))' || {
    echo "remotedl: $py is a system interpreter, not a venv or conda environment:" \
      "remotedl never installs into it (set setup_cmd, or let env_setup activate a venv)" >&2
    exit 1; }
else
  py=$_rdl_rd/.venv/bin/python
  if [ ! -x "$py" ]; then
    if command -v uv >/dev/null 2>&1; then
      say "uv venv .venv"
      uv venv --python "$_rdl_base" "$_rdl_rd/.venv" || exit $?
    else
      say "$_rdl_base -m venv .venv"
      "$_rdl_base" -m venv "$_rdl_rd/.venv" || exit $?
    fi
  fi
fi
_rdl_exact=
[ -n "$_rdl_conda$_rdl_setup" ] || _rdl_exact=1
if command -v uv >/dev/null 2>&1; then
  case $_rdl_kind in
    uv.lock)
      say "uv sync --frozen --no-install-project"
      UV_PROJECT_ENVIRONMENT=$("$py" -c 'import sys; print(sys.prefix)') \
        uv sync --frozen --no-install-project ;;
    *)
      # --exact (uv 0.5 and later): resolved as an install (what is there and fits stays), then
      # what the file no longer needs is uninstalled.
      if [ -n "$_rdl_exact" ] && uv pip install --help 2>/dev/null | grep -q -e --exact; then
        say "uv pip install --exact -r $_rdl_kind"
        uv pip install --exact --python "$py" -r "$_rdl_kind"
      else
        [ -z "$_rdl_exact" ] ||
          say "warning: $(uv --version) has no pip install --exact: packages no longer required stay"
        say "uv pip install -r $_rdl_kind"
        uv pip install --python "$py" -r "$_rdl_kind"
      fi ;;
  esac
else
  case $_rdl_kind in
    requirements.txt) _rdl_req=requirements.txt ;;
  esac
  say "pip install -r $_rdl_req"
  "$py" -m pip install --disable-pip-version-check --no-input -r "$_rdl_req" || exit $?
  [ -z "$_rdl_exact" ] || "$py" -c "$_rdl_prune" "$_rdl_req"
fi
"""
)


@contextlib.contextmanager
def _project_lock(rdir: str) -> Iterator[None]:
    d = Path(rdir) / ".remotedl"
    d.mkdir(exist_ok=True)
    with open(d / "env.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def work_tree(raw: str) -> str:
    """The project's work tree on the box (``remote_dir`` as the laptop sent it), resolved."""
    rdir = os.path.expanduser(raw)
    if not raw or not os.path.isdir(rdir):
        raise AgentError(
            f"the work tree {rdir or '(none)'} does not exist on the box",
            "usage",
            hint="push first (drop --no-push)",
        )
    return os.path.realpath(rdir)


def op_envsync(ctx: Context, req: EnvsyncRequest) -> None:
    """Make the project's environment match its requirements (when they changed since the
    last sync). The installer's output streams on stdout; the result is one line on stderr."""
    rdir = work_tree(req.remote_dir)
    spec = dict(req.env)
    out = sys.stdout.buffer
    sys.stderr.write(encode_mark("start", {}))
    sys.stderr.flush()
    plan = env_plan(rdir, spec)
    result: dict[str, Any] = {"ok": True, "needed": plan is not None, "synced": False, "plan": plan}
    if plan is not None:
        ensure_excludes(rdir)
        with _project_lock(rdir):
            if req.force or not env_in_sync(rdir, plan, spec):
                req_file = ""
                if plan["kind"] in ("pyproject.toml", "uv.lock") and not shutil.which("uv"):
                    deps = _pyproject_deps((Path(rdir) / "pyproject.toml").read_text()) or []
                    req_path = Path(rdir) / ".remotedl" / "pyproject-requirements.txt"
                    req_path.write_text("".join(d + "\n" for d in deps))
                    req_file = str(req_path)
                argv = [
                    shell_for(spec.get("env_setup")),
                    "-c",
                    INSTALL,
                    "remotedl-env",
                    plan["kind"],
                    rdir,
                    plan["conda"] or "",
                    spec.get("env_setup") or "",
                    sys.executable,
                    spec.get("setup_cmd") or "",
                    req_file,
                    PRUNE,
                ]
                child = subprocess.Popen(
                    argv, cwd=rdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
                assert child.stdout is not None
                while chunk := os.read(child.stdout.fileno(), 65536):
                    out.write(chunk)
                    out.flush()
                code = child.wait()
                if code != 0:
                    error = f"installing the environment ({plan['kind']}) failed, exit {code}"
                    result.update(ok=False, error=error)
                else:
                    _stamp_path(rdir).write_text(json.dumps({"hash": plan["hash"], "when": time.time()}))
                    result["synced"] = True
    out.flush()
    sys.stderr.write(encode_mark("end", {**result, "warnings": ctx.warnings}))
    sys.stderr.flush()
