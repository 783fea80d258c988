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
class AgentZip:
    data: bytes
    digest: str

    @property
    def name(self) -> str:
        return f"{self.digest}.pyz"


_CACHE: AgentZip | None = None


def _add_tree(z: zipfile.ZipFile, root: Path, arc_prefix: str) -> None:
    for path in sorted(root.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        info = zipfile.ZipInfo(f"{arc_prefix}/{path.relative_to(root).as_posix()}", (2020, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, path.read_bytes())


def build_agent() -> AgentZip:
    """The agent as a zipapp: same bytes for the same code, so its hash names its version."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    import libtmux

    pkg = Path(__file__).resolve().parent.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:

        def add(arc: str, data: bytes) -> None:
            info = zipfile.ZipInfo(arc, (2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)

        add("__main__.py", (pkg / "agent" / "__main__.py").read_bytes())
        add("remotedl/__init__.py", b"")
        add("remotedl/gpus.py", (pkg / "gpus.py").read_bytes())
        add("remotedl/agent/__init__.py", (pkg / "agent" / "__init__.py").read_bytes())
        add("remotedl/agent/box.py", (pkg / "agent" / "box.py").read_bytes())
        _add_tree(z, Path(libtmux.__file__).resolve().parent, "libtmux")
    data = buf.getvalue()
    _CACHE = AgentZip(data, hashlib.sha256(data).hexdigest()[:16])
    return _CACHE


def _agent_script(agent: AgentZip, python: str, request: dict[str, Any]) -> str:
    path = f"{AGENT_DIR}/{agent.name}"
    return (
        f'f="{path}"; [ -f "$f" ] || exit {MISSING}; '
        f"command -v {shlex.quote(python)} >/dev/null 2>&1 || exit 127; "
        f'exec {shlex.quote(python)} "$f" {shlex.quote(json.dumps(request))}'
    )


def upload_agent(spec: HostSpec, agent: AgentZip) -> None:
    from remotedl import proc
    from remotedl.ssh import openssh_argv

    script = (
        f'mkdir -p "{AGENT_DIR}" && chmod 700 "$HOME/.remotedl" && '
        f'cat > "{AGENT_DIR}/.upload.$$" && mv "{AGENT_DIR}/.upload.$$" "{AGENT_DIR}/{agent.name}"'
    )
    result = proc.run(openssh_argv(spec, script), input=agent.data, text=False, check=False)
    if result.returncode == 255:
        err: bytes | str = result.stderr or b""
        raise openssh_failure(spec, err.decode(errors="replace") if isinstance(err, bytes) else err)
    if result.returncode != 0:
        raise RemoteError(f"could not install the remotedl agent on {spec.alias}")


def agent_command(spec: HostSpec, python: str, request: dict[str, Any]) -> str:
    """The remote script for a request (the agent must be on the box: see ``ensure_agent``)."""
    return _agent_script(build_agent(), python, request)


def ensure_agent(spec: HostSpec, python: str = "python3") -> None:
    agent = build_agent()
    check = run_openssh(spec, f'[ -f "{AGENT_DIR}/{agent.name}" ] || exit {MISSING}', check=False)
    if check.exit_code == MISSING:
        upload_agent(spec, agent)


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
            upload_agent(spec, agent)
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
