"""The laptop side of autostop: hand the box its settings and start its watcher, or read them.

The decision and the stop happen on the box (``remotedl.agent.autostop``), so a laptop that
sleeps or leaves changes nothing. The settings go in the agent's request, on stdin
(notification URLs are secrets); the box starts its watcher itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from remotedl.errors import RemoteError

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.cloud.base import CloudVM
    from remotedl.config import Settings


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


def box_config(
    vm: CloudVM, settings: Settings, idle_seconds: float | None, *, spot: bool = False
) -> dict[str, Any]:
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
        "spot": spot,
        "preempt_signal": str(settings.get("preempt_signal") or "TERM"),
    }


def _call(
    client: AgentClient, action: Literal["set", "show", "resume"], config: dict[str, Any] | None = None
) -> dict[str, Any]:
    from remotedl.schema import AutostopRequest

    answer = client.call(AutostopRequest(action=action, config=config).to_dict())
    data = answer.get("autostop")
    if not isinstance(data, dict):
        raise RemoteError(f"autostop on {client.spec.alias} answered something unreadable")
    return data


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


def resume_autostop(client: AgentClient) -> AutostopStatus:
    """After a start: the box's own autostop (one set live with ``remotedl autostop``) armed
    again, its watcher started; nothing when it had none."""
    return _status(_call(client, "resume"))
