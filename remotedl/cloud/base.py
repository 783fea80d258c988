"""What remotedl knows of a host that is a cloud VM: which one, how to reach its cloud, its state.

A host is a cloud VM when its settings say ``cloud = "aws" | "gcp" | "azure"`` (usually in its
``[hosts.NAME]`` table) with what identifies the VM. That is decided once, when the host is
resolved (``remotedl.fleet.resolve_member``); every command then knows whether it talks to a VM
that may be stopped, and which address the cloud gives it.

Credentials are found the way each cloud's own tools find them (AWS profiles and environment,
Google application default credentials, ``az login``) and never stored by remotedl.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from remotedl.errors import ConfigError, ConnectError, RemotedlError

CLOUDS = ("aws", "gcp", "azure")
# What identifies a VM on each cloud (settings of the host).
IDENTIFIERS: dict[str, tuple[str, ...]] = {
    "aws": ("region", "instance_id"),
    "gcp": ("project", "zone", "instance"),
    "azure": ("subscription", "resource_group", "vm"),
}
CLOUD_NAMES = {"aws": "AWS", "gcp": "GCE", "azure": "Azure"}

# The states remotedl tells apart; each cloud's own word is kept beside it (``VMStatus.detail``).
VMState = Literal["running", "starting", "stopping", "stopped", "terminated", "unknown"]


class CloudError(RemotedlError):
    """The cloud's API refused or failed a call (credentials, permissions, a missing VM)."""


class CloudAuthError(CloudError):
    """No usable credentials for the cloud: its own login command is the fix."""

    exit_code = ConnectError.exit_code


class MissingExtra(ConfigError):
    """The cloud's SDK is an optional extra that is not installed."""


class VMNotRunning(ConnectError):
    """A command needs the box and its VM is not running."""


@dataclass(frozen=True)
class CloudVM:
    """One VM as the settings name it."""

    host: str
    cloud: str  # "aws", "gcp" or "azure"
    ids: dict[str, str]
    price_per_hour: float | None = None
    # Which address ssh goes to: the cloud's public IP, its private one, or the ssh config's.
    address: str = "public"
    auto_start: bool = False

    @property
    def name(self) -> str:
        """How a person names it: ``AWS i-0abc (eu-west-1)``."""
        ids = self.ids
        if self.cloud == "aws":
            return f"AWS {ids['instance_id']} ({ids['region']})"
        if self.cloud == "gcp":
            return f"GCE {ids['instance']} ({ids['project']}/{ids['zone']})"
        return f"Azure VM {ids['vm']} ({ids['resource_group']})"


@dataclass
class VMStatus:
    """The VM as its cloud sees it now."""

    state: VMState
    detail: str  # the cloud's own word: "pending", "TERMINATED", "PowerState/deallocated", ...
    public_ip: str | None = None
    private_ip: str | None = None
    started_at: dt.datetime | None = None  # when it last started (None when unknown or stopped)
    spot: bool = False
    # Azure only: stopped from inside, so still billed until deallocated.
    billed_while_stopped: bool = False
    price_per_hour: float | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def uptime_seconds(self) -> float | None:
        if self.state not in ("running", "stopping") or self.started_at is None:
            return None
        return max(0.0, (self.now - self.started_at).total_seconds())

    @property
    def cost_so_far(self) -> float | None:
        """Price x time since it started, where both are known."""
        up = self.uptime_seconds
        if up is None or self.price_per_hour is None:
            return None
        return self.price_per_hour * up / 3600.0

    def address(self, which: str) -> str | None:
        if which == "public":
            return self.public_ip
        if which == "private":
            return self.private_ip
        return None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["started_at"] = self.started_at.isoformat() if self.started_at else None
        d.pop("now")
        d["uptime_seconds"] = self.uptime_seconds
        d["cost_so_far"] = self.cost_so_far
        return d


class Provider(abc.ABC):
    """One cloud's API for one VM: its state and address, start, stop."""

    def __init__(self, vm: CloudVM) -> None:
        self.vm = vm

    @abc.abstractmethod
    def status(self) -> VMStatus:
        """The VM's state and addresses now (one or a few API calls)."""

    @abc.abstractmethod
    def start(self) -> None:
        """Ask the cloud to start the VM (returns once the request is accepted)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask the cloud to stop the VM so that compute billing stops (Azure: deallocate)."""


def cloud_vm(host: str, get: Callable[[str], Any]) -> CloudVM | None:
    """The VM a host's settings name (``get`` reads a setting), or None for a plain box."""
    cloud = get("cloud")
    if not cloud:
        return None
    if cloud not in CLOUDS:
        raise ConfigError(f"[hosts.{host}] cloud must be one of {', '.join(CLOUDS)}, not {cloud!r}")
    ids: dict[str, str] = {}
    missing = []
    for key in IDENTIFIERS[cloud]:
        value = get(key)
        if value:
            ids[key] = str(value)
        else:
            missing.append(key)
    if missing:
        example = {
            "aws": 'region = "eu-west-1", instance_id = "i-0123456789abcdef0"',
            "gcp": 'project = "my-project", zone = "europe-west4-a", instance = "gpu-1"',
            "azure": 'subscription = "0000-...", resource_group = "ml", vm = "gpu-1"',
        }[cloud]
        raise ConfigError(
            f"host {host} is a {CLOUD_NAMES[cloud]} VM but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set",
            hint=f"set them in [hosts.{host}]: {example}",
        )
    price = get("price_per_hour")
    return CloudVM(
        host=host,
        cloud=str(cloud),
        ids=ids,
        price_per_hour=float(price) if price is not None else None,
        address=str(get("address") or "public"),
        auto_start=bool(get("auto_start")),
    )


def provider_for(vm: CloudVM, environ: Mapping[str, str]) -> Provider:
    """The provider of ``vm``'s cloud, with credentials found as that cloud's tools find them."""
    if vm.cloud == "aws":
        from remotedl.cloud.aws import AwsProvider

        return AwsProvider(vm, environ)
    if vm.cloud == "gcp":
        from remotedl.cloud.gcp import GcpProvider

        return GcpProvider(vm, environ)
    from remotedl.cloud.azure import AzureProvider

    return AzureProvider(vm, environ)


def parse_time(text: str | None) -> dt.datetime | None:
    """An RFC 3339 time as the clouds write it (``2026-12-07T14:00:00.123-08:00``, ``...Z``,
    Azure's seven fractional digits)."""
    if not text:
        return None
    t = text.strip().replace("Z", "+00:00")
    head, sep, tail = t.partition(".")
    if sep:  # fractional seconds: at most 6 digits for fromisoformat on 3.10
        digits = ""
        rest = tail
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        t = f"{head}.{(digits + '000000')[:6]}{rest}"
    try:
        when = dt.datetime.fromisoformat(t)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)
