"""The laptop side of autostop: hand the box its settings and start its watcher, or read them.

The decision and the stop happen on the box (``remotedl.agent.autostop``), so a laptop that
sleeps or leaves changes nothing. The settings go on stdin (notification URLs are secrets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from remotedl.errors import RemoteError
from remotedl.schema import AGENT_MISSING, AGENT_NO_PYTHON

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.cloud.base import CloudVM
    from remotedl.config import Settings

# "$1": the box's python, "$2": the agent's digest, "$3": set/show; the watcher starts detached
# (its own session, no terminal, every descriptor closed) after a "set" that turned it on.
_SCRIPT = """\
d="$HOME/.remotedl/agent/$2"
[ -f "$d/__main__.py" ] || exit {missing}
command -v "$1" >/dev/null 2>&1 || exit {nopython}
py="$1"
code='import sys; sys.path.insert(0, sys.argv.pop(1)); from remotedl.agent.autostop import main; \\
sys.exit(main(sys.argv[1:]))'
"$py" -E -s -S -c "$code" "$d" "$3" || exit $?
if [ "$3" = set ] && [ "$4" = on ]; then
  (setsid "$py" -E -s -S -c "$code" "$d" watch </dev/null >/dev/null 2>&1 &)
fi
"""


@dataclass
class AutostopStatus:
    """What the box says of its autostop."""

    idle_seconds: float | None
    wait: str
    idle_for: float | None  # seconds since the last activity (None: off)
    stop_at: float | None  # the earliest time (box clock, epoch) the VM stops
    pending: bool  # the notice went out: it stops at stop_at unless something happens
    last_activity: list[str]
    stopped_at: float | None
    stop_result: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def box_config(vm: CloudVM, settings: Settings, idle_seconds: float | None) -> dict[str, Any]:
    """The box's autostop settings from the host's settings."""
    ids = vm.ids if vm.cloud == "azure" else {}
    return {
        "idle_seconds": idle_seconds,
        "wait": str(settings.get("autostop_wait") or "all"),
        "pre_stop": settings.get("pre_stop"),
        "notify": list(settings.get("notify") or []),
        "host": vm.host,
        "cloud": vm.cloud,
        "azure": dict(ids),
        "managed_identity": bool(settings.get("managed_identity")),
    }


def _call(client: AgentClient, what: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    script = _SCRIPT.format(missing=AGENT_MISSING, nopython=AGENT_NO_PYTHON)
    on = "on" if body and body.get("idle_seconds") else "off"
    stdin = json.dumps(body).encode() if body is not None else b""
    for attempt in range(2):
        r = client.box.run(script, client.python, client.agent.digest, what, on, stdin=stdin, check=False)
        if r.exit_code == AGENT_MISSING and attempt == 0:
            client.upload()
            continue
        if r.exit_code == AGENT_NO_PYTHON:
            raise client._no_python()
        if r.exit_code != 0:
            last = (r.stderr.strip().splitlines() or [f"exit status {r.exit_code}"])[-1]
            raise RemoteError(f"autostop on {client.spec.alias} failed: {last}")
        break
    try:
        data = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise RemoteError(f"autostop on {client.spec.alias} answered something unreadable") from e
    return data if isinstance(data, dict) else {}


def _status(data: dict[str, Any]) -> AutostopStatus:
    config = data.get("config") or {}
    idle = config.get("idle_seconds")
    now = float(data.get("now") or 0)
    last = float(data.get("last_active") or now)
    pending = data.get("pending_since")
    grace = float(config.get("grace_seconds") or 0)
    stop_at = None
    if idle is not None and not data.get("stopped_at"):
        stop_at = float(pending) + grace if pending is not None else last + float(idle) + grace
    return AutostopStatus(
        idle_seconds=float(idle) if idle is not None else None,
        wait=str(config.get("wait") or "all"),
        idle_for=max(0.0, now - last) if idle is not None else None,
        stop_at=stop_at,
        pending=pending is not None,
        last_activity=list(data.get("last_activity") or []),
        stopped_at=data.get("stopped_at"),
        stop_result=str(data.get("stop_result") or ""),
    )


def set_autostop(client: AgentClient, config: dict[str, Any]) -> AutostopStatus:
    """Turn autostop on (``idle_seconds``) or off (None) on the box; the idle time counts from now."""
    return _status(_call(client, "set", config))


def show_autostop(client: AgentClient) -> AutostopStatus:
    return _status(_call(client, "show"))
