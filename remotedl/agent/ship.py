"""Laptop side: build the agent zip and call it on the box in one exec."""

from __future__ import annotations

import hashlib
import io
import json
import shlex
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl.errors import RemotedlError, RemoteError, UsageError
from remotedl.ssh import HostSpec, openssh_failure, run_openssh

AGENT_DIR = "$HOME/.remotedl/agent"
MISSING = 97  # the exit status that means "this agent version is not on the box yet"


@dataclass(frozen=True)
class Agent:
    files: tuple[tuple[str, Path], ...]  # (name inside the agent, source file)
    digest: str

    @property
    def name(self) -> str:
        return self.digest

    def zip_bytes(self) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for arc, path in self.files:
                info = zipfile.ZipInfo(arc, (2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, path.read_bytes())
        return buf.getvalue()


_CACHE: Agent | None = None


def build_agent() -> Agent:
    """The agent's files and a digest of their contents, which names its version on the box.
    Hashing, not zipping: the zip is only built when the box lacks this version."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    import importlib.util

    pkg = Path(__file__).resolve().parent.parent
    files: list[tuple[str, Path]] = [
        ("__main__.py", pkg / "agent" / "__main__.py"),
        ("remotedl/__init__.py", pkg / "agent" / "__init__.py"),
        ("remotedl/gpus.py", pkg / "gpus.py"),
        ("remotedl/waiting.py", pkg / "waiting.py"),
        ("remotedl/agent/__init__.py", pkg / "agent" / "__init__.py"),
        ("remotedl/agent/box.py", pkg / "agent" / "box.py"),
    ]
    spec = importlib.util.find_spec("libtmux")  # found, not imported
    if spec is None or spec.origin is None:
        raise RemotedlError("libtmux is not installed here; reinstall remotedl")
    tmux_root = Path(spec.origin).parent
    for path in sorted(tmux_root.rglob("*.py")):
        if "__pycache__" not in path.parts:
            files.append((f"libtmux/{path.relative_to(tmux_root).as_posix()}", path))
    digest = hashlib.sha256()
    for arc, path in files:
        digest.update(arc.encode() + b"\0" + path.read_bytes() + b"\0")
    _CACHE = Agent(tuple(files), digest.hexdigest()[:16])
    return _CACHE


def _agent_script(agent: Agent, python: str, request: dict[str, Any]) -> str:
    # -E -s -S: no PYTHONPATH, user site or site-packages: the agent brings what it needs and
    # starts fast.
    py = shlex.quote(python)
    return (
        f'd="{AGENT_DIR}/{agent.name}"; [ -f "$d/__main__.py" ] || exit {MISSING}; '
        f"command -v {py} >/dev/null 2>&1 || exit 127; "
        f'exec {py} -E -s -S "$d" {shlex.quote(json.dumps(request))}'
    )


def upload_agent(spec: HostSpec, agent: Agent, python: str = "python3") -> None:
    """Unpack this agent version into ~/.remotedl/agent/<digest>/ and byte-compile it once."""
    from remotedl import proc
    from remotedl.ssh import openssh_argv

    py = shlex.quote(python)
    unpack = (
        "import io, sys, zipfile, compileall; "
        "zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read())).extractall(sys.argv[1]); "
        "compileall.compile_dir(sys.argv[1], quiet=1)"
    )
    script = (
        f'umask 077; mkdir -p "{AGENT_DIR}" && t="{AGENT_DIR}/.new.$$" && '
        f"command -v {py} >/dev/null 2>&1 || exit 127; "
        f'{py} -c {shlex.quote(unpack)} "$t" && d="{AGENT_DIR}/{agent.name}" && '
        # Atomic: a complete directory appears, or another upload of the same version won.
        f'{{ mv -T "$t" "$d" 2>/dev/null || {{ rm -rf "$t"; [ -f "$d/__main__.py" ]; }}; }}'
    )
    result = proc.run(openssh_argv(spec, script), input=agent.zip_bytes(), text=False, check=False)
    if result.returncode == 255:
        err: bytes | str = result.stderr or b""
        raise openssh_failure(spec, err.decode(errors="replace") if isinstance(err, bytes) else err)
    if result.returncode == 127:
        raise RemoteError(
            f"{python} is not installed on {spec.alias}: the box side of remotedl needs it",
            hint='install python3 there, or set `python = "/path/to/python3"` in remotedl.toml',
        )
    if result.returncode != 0:
        err_text = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else ""
        last = (err_text.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RemoteError(f"could not install the remotedl agent on {spec.alias}: {last}")


def agent_command(spec: HostSpec, python: str, request: dict[str, Any]) -> str:
    """The remote script for a request (exit 97 if this agent version is not on the box)."""
    return _agent_script(build_agent(), python, request)


def _raise_for(answer: dict[str, Any], spec: HostSpec) -> None:
    kind = answer.get("kind")
    message = str(answer.get("error") or "the agent failed")
    hint = answer.get("hint")
    if kind == "usage":
        raise UsageError(message, hint)
    raise RemotedlError(message, hint)


def call(spec: HostSpec, request: dict[str, Any], *, python: str = "python3") -> dict[str, Any]:
    """One request to the agent, one exec (two plus an upload the first time)."""
    agent = build_agent()
    for attempt in range(2):
        result = run_openssh(spec, _agent_script(agent, python, request), check=False)
        if result.exit_code == MISSING and attempt == 0:
            upload_agent(spec, agent, python)
            continue
        if result.exit_code == 127 and not result.stdout:
            raise RemoteError(
                f"{python} is not installed on {spec.alias}: the box side of remotedl needs it",
                hint='install python3 there, or set `python = "/path/to/python3"` in remotedl.toml',
            )
        try:
            answer = dict(json.loads(result.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            err = result.stderr.strip().splitlines()
            raise RemoteError(
                f"the remotedl agent on {spec.alias} failed: {err[-1] if err else result.exit_code}"
            ) from None
        if not answer.get("ok"):
            _raise_for(answer, spec)
        return answer
    raise RemoteError(f"could not install the remotedl agent on {spec.alias}")
