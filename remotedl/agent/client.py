"""Laptop side of the box agent: build it, install it when its version is missing, call it.

The agent is remotedl's own code (standard library only) that runs on the box under the box's python3,
unpacked once per version under ``~/.remotedl/agent/<digest>/``. A request is one JSON object
sent on stdin through the framed channel (never in argv: it can hold ``--env`` values); the
answer is one JSON object on stdout, type-checked here before anything uses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl.agent.resident import HERE
from remotedl.errors import GpusBusy, RemotedlError, RemoteError, UsageError
from remotedl.outputs import SEEN
from remotedl.schema import AGENT_CANNOT_INSTALL, AGENT_MISSING, AGENT_NO_PYTHON, decode_answer
from remotedl.ssh.channel import Box, FramedProcess
from remotedl.ssh.resolve import HostSpec
from remotedl.typecheck import SchemaError

log = logging.getLogger("remotedl.agent")


@dataclass(frozen=True)
class Agent:
    files: tuple[tuple[str, Path], ...]  # (name inside the agent, source file)
    digest: str

    def zip_bytes(self) -> bytes:
        import zipfile  # only when the box lacks this version

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for arc, path in self.files:
                info = zipfile.ZipInfo(arc, (2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, path.read_bytes())
        return buf.getvalue()


_CACHE: Agent | None = None

# The modules of remotedl that run on the box (standard library only), besides the agent
# package itself (every module under agent/, its subpackages included, but this client) and
# the packages in AGENT_PACKAGES (all their modules).
AGENT_MODULES = (
    "gpus.py",
    "activate.py",
    "waiting.py",
    "schema.py",
    "typecheck.py",
    "errors.py",
    "notify/__init__.py",
    "notify/urls.py",
    "notify/senders.py",
    "notify/text.py",
    "treeid.py",
    "ports.py",
)
AGENT_PACKAGES = ("agent", "slurm")
LAPTOP_ONLY = ("agent/client.py", "agent/__main__.py")


def agent_package_modules(pkg: Path) -> list[str]:
    """The modules of the agent package and of AGENT_PACKAGES as paths under ``remotedl/``,
    subpackages included, in a stable order (the digest depends on it)."""
    found = sorted(p.relative_to(pkg).as_posix() for d in AGENT_PACKAGES for p in (pkg / d).rglob("*.py"))
    return [m for m in found if m not in LAPTOP_ONLY]


def build_agent() -> Agent:
    """The agent's files and a digest of their contents, which names its version on the box.
    Hashing, not zipping: the zip is only built when the box lacks this version."""
    global _CACHE
    if _CACHE is not None:
        return _CACHE
    pkg = Path(__file__).resolve().parent.parent
    files: list[tuple[str, Path]] = [
        ("__main__.py", pkg / "agent" / "__main__.py"),
        ("remotedl/__init__.py", pkg / "agent" / "__init__.py"),
        *[(f"remotedl/{m}", pkg / m) for m in (*AGENT_MODULES, *agent_package_modules(pkg))],
    ]
    digest = hashlib.sha256()
    for arc, path in files:
        digest.update(arc.encode() + b"\0" + path.read_bytes() + b"\0")
    _CACHE = Agent(tuple(files), digest.hexdigest()[:16])
    return _CACHE


# "$1" is the box's python. -E -s -S: no PYTHONPATH, user site or site-packages: the agent
# brings what it needs and starts fast.
# Under the box's resident agent (``remotedl.agent.resident``: it sets ``_rdl_here`` to its
# python), the agent answers in a process forked from it: exit {here} says so.
_CALL = """\
d="$HOME/.remotedl/agent/{digest}"
[ -f "$d/__main__.py" ] || exit {missing}
[ "${{_rdl_here-}}" = "$1" ] && exit {here}
command -v "$1" >/dev/null 2>&1 || exit {nopython}
exec "$1" -E -s -S "$d"
"""

_UNPACK = (
    "import io, sys, zipfile, compileall; "
    "zipfile.ZipFile(io.BytesIO(sys.stdin.buffer.read())).extractall(sys.argv[1]); "
    "compileall.compile_dir(sys.argv[1], quiet=1)"
)

# Atomic: a complete directory appears under its digest, or another upload of it won.
_INSTALL = """\
umask 077
command -v "$1" >/dev/null 2>&1 || exit {nopython}
a="$HOME/.remotedl/agent"
mkdir -p "$a" || exit {cannot}
t="$a/.new.$$"
"$1" -c '{unpack}' "$t" || {{ rm -rf "$t"; exit {cannot}; }}
d="$a/{digest}"
mv -T "$t" "$d" 2>/dev/null || {{ rm -rf "$t"; [ -f "$d/__main__.py" ]; }}
"""


# A check that rides in the same request as the agent call (``Before``): the check's script runs
# first, in a subshell ("$@": its values); its output comes back ahead of the agent's answer after
# a line "@@then TOKEN"; the gate (sh, seeing the output in "$out" and the check's values in
# "$@") ends the request there ("exit 0") unless the agent call should follow.
_BEFORE = """\
_rdl_before() {{
{before}
}}
py=$1; tok=$2; shift 2
out=$(_rdl_before "$@") || exit $?
printf '%s\\n@@then %s\\n' "$out" "$tok"
{gate}
set -- "$py"
"""


@dataclass
class Before:
    """A check made in the same request as the next agent call (one round trip for both).
    ``then`` gets the check's output when the agent did not answer in that request (the gate
    stopped it, or the agent must be installed first): it raises what the check found, or
    gives the request fields for a call of its own."""

    script: str
    args: tuple[str, ...]
    gate: str
    then: Callable[[str], dict[str, Any]]


# The operations whose requests hold no secret (no --env values, no notification URLs): they
# travel in the command line, one round trip less (``remotedl.ssh.channel.INLINE_MAX``).
INLINE_OPS = frozenset({"list", "get", "kill", "logs", "intree"})


def holds_no_secret(request: dict[str, Any]) -> bool:
    """Whether a request may travel in the command line: an op of ``INLINE_OPS``, or a start
    without --env values or notification URLs (the command, GPUs, paths and settings it holds
    are in the box's process list anyway once the job runs)."""
    op = request.get("op")
    if op in INLINE_OPS:
        return True
    return op == "start" and not request.get("env") and not request.get("notify")


class AgentClient:
    """Calls the agent on one box: one exec per request over the shared connection, plus an
    upload the first time a box sees this agent version."""

    def __init__(
        self,
        spec: HostSpec,
        python: str = "python3",
        box: Box | None = None,
        adopt: dict[str, str] | None = None,
    ) -> None:
        self.spec = spec
        self.python = python
        self.box = box or Box(spec, resident=True, python=python)
        self.agent = build_agent()
        # With the default remote_dir: sent with every request, so the box keeps a tree this
        # project has under the older, folder-named default (remotedl.treeid).
        self.adopt = adopt
        self.before: Before | None = None  # rides with the next call (see ``Before``)

    def _no_python(self) -> RemoteError:
        return RemoteError(
            f"{self.python} is not installed on {self.spec.alias}: the box side of remotedl needs it",
            hint='install python3 (3.10 or newer) there, or set `python = "/path/to/python3"` '
            "in remotedl.toml",
        )

    def upload(self) -> None:
        """Unpack this agent version into ~/.remotedl/agent/<digest>/, byte-compiled."""
        script = _INSTALL.format(
            nopython=AGENT_NO_PYTHON, cannot=AGENT_CANNOT_INSTALL, unpack=_UNPACK, digest=self.agent.digest
        )
        r = self.box.run(script, self.python, stdin=self.agent.zip_bytes(), check=False)
        if r.exit_code == AGENT_NO_PYTHON:
            raise self._no_python()
        if r.exit_code != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.exit_code}"])[-1]
            raise RemoteError(
                f"could not install the remotedl agent under ~/.remotedl on {self.spec.alias}: {last}",
                hint=f"make ~/.remotedl on the box writable by {self.spec.user}; check its free disk space",
            )

    def _script(self) -> str:
        return _CALL.format(
            digest=self.agent.digest, missing=AGENT_MISSING, nopython=AGENT_NO_PYTHON, here=HERE
        )

    def _body(self, request: dict[str, Any]) -> bytes:
        if self.adopt is not None and request.get("adopt") is None:
            request = {**request, "adopt": self.adopt}
        # Only the operation is logged: a request can hold secrets (--env values).
        log.debug("agent request: op=%s keys=%s", request.get("op"), sorted(request))
        return json.dumps(request).encode()

    def _call_before(self, before: Before, request: dict[str, Any]) -> dict[str, Any]:
        """The check and the call in one request; when the agent did not answer there, what
        ``before.then`` says, then the call alone."""
        import secrets

        token = secrets.token_hex(8)
        script = _BEFORE.format(before=before.script, gate=before.gate) + self._script()
        r = self.box.run(
            script, self.python, token, *before.args, stdin=self._body(request), check=False,
            inline=holds_no_secret(request),
        )  # fmt: skip
        marker = f"\n@@then {token}\n".encode()
        head, sep, rest = r.stdout_bytes.partition(marker)
        if not sep:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.exit_code}"])[-1]
            raise RemoteError(f"command on {self.spec.alias} failed: {last}")
        if rest.strip() or r.exit_code not in (0, AGENT_MISSING, AGENT_NO_PYTHON):
            # The agent ran: its answer, whatever its exit status (never a second call: a
            # start may have happened).
            answer = self._decode(rest, r.stderr)
            if not answer["ok"]:
                raise error_from(answer)
            return answer
        fields = before.then(head.decode(errors="replace"))
        return self.call({**request, **fields})

    def _decode(self, stdout: bytes, stderr: str) -> dict[str, Any]:
        try:
            return decode_answer(stdout)
        except SchemaError as e:
            err = [x for x in stderr.strip().splitlines() if x.strip()]
            detail = f"; it said: {err[-1][:200]}" if err else ""
            raise RemoteError(
                f"the remotedl agent on {self.spec.alias} gave a bad answer ({e}){detail}",
                hint=f"is {self.python} on the box a working Python 3.10+? `remotedl doctor` checks",
            ) from None

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request, one answer (an error answer raises). A ``before`` set on the client
        rides with it."""
        before, self.before = self.before, None
        if before is not None:
            return self._call_before(before, request)
        body = self._body(request)
        inline = holds_no_secret(request)
        for attempt in range(2):
            r = self.box.run(self._script(), self.python, stdin=body, check=False, inline=inline)
            if r.exit_code == AGENT_MISSING and attempt == 0:
                self.upload()
                continue
            if r.exit_code == AGENT_NO_PYTHON and not r.stdout:
                raise self._no_python()
            answer = self._decode(r.stdout_bytes, r.stderr)
            if not answer["ok"]:
                raise error_from(answer)
            # The job records it carries tell which jobs ended: outputs come home without asking again.
            SEEN.note(self.spec, answer, request.get("op"))
            return answer
        raise RemoteError(f"could not install the remotedl agent on {self.spec.alias}")

    def stream(self, request: dict[str, Any], on_line: Callable[[str], None] | None = None) -> FramedProcess:
        """Start a streaming request (logs); the caller reads and waits. An exit status of
        ``AGENT_MISSING`` means: ``upload()`` and start again. ``on_line`` hears each line the
        agent writes to stderr as it comes."""
        inline = holds_no_secret(request)
        return self.box.start(
            self._script(), self.python, stdin=self._body(request), on_line=on_line, inline=inline
        )


def error_from(answer: dict[str, Any]) -> RemotedlError:
    message = str(answer.get("error") or "the agent failed")[:2000]
    hint = answer.get("hint")
    hint = str(hint)[:2000] if hint else None
    if answer.get("kind") == "usage":
        return UsageError(message, hint)
    if answer.get("kind") == "busy":
        return GpusBusy(message, hint)
    return RemotedlError(message, hint)
