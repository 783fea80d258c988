"""Hosts that are cloud VMs: their state, address and price, start and stop (issue 26).

One ``Provider`` per cloud (``aws`` through boto3, ``gcp`` and ``azure`` through their REST
APIs); callers pick it once, with the host (``CloudHost``), and never ask which cloud again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from remotedl.cloud.base import (
    CLOUD_NAMES,
    CLOUDS,
    CloudAuthError,
    CloudError,
    CloudVM,
    MissingExtra,
    Provider,
    VMNotRunning,
    VMState,
    VMStatus,
    cloud_vm,
    provider_for,
)
from remotedl.errors import RemotedlError

if TYPE_CHECKING:
    from remotedl.ssh import HostSpec

__all__ = [
    "CLOUDS",
    "CLOUD_NAMES",
    "CloudAuthError",
    "CloudError",
    "CloudHost",
    "CloudVM",
    "MissingExtra",
    "Provider",
    "StopResult",
    "UpResult",
    "VMNotRunning",
    "VMState",
    "VMStatus",
    "cloud_host",
    "cloud_vm",
    "provider_for",
    "stop_vm",
    "up",
    "with_address",
]

# How often the state and SSH are polled while a VM starts or stops, and for how long.
POLL_SECONDS = 2.0
START_TIMEOUT = 600.0


@dataclass
class CloudHost:
    """A host that is a cloud VM: what names it, its provider, and its state when resolved."""

    vm: CloudVM
    provider: Provider
    status: VMStatus
    # Why the cloud could not be asked (credentials, a missing SDK): raised by the commands
    # that need the VM, while `config` still shows the settings.
    error: RemotedlError | None = None

    def refresh(self) -> VMStatus:
        self.status = self.provider.status()
        return self.status

    @property
    def address(self) -> str | None:
        """The address ssh goes to, from the cloud (None: the ssh config's HostName)."""
        return self.status.address(self.vm.address) if self.status.running else None


def cloud_host(host: str, get: Callable[[str], Any], environ: Mapping[str, str]) -> CloudHost | None:
    """The host as a cloud VM with its current state (one API call or three), or None when its
    settings name no cloud."""
    vm = cloud_vm(host, get)
    if vm is None:
        return None
    provider = provider_for(vm, environ)
    try:
        return CloudHost(vm, provider, provider.status())
    except RemotedlError as e:
        return CloudHost(vm, provider, VMStatus("unknown", e.message), e)


def with_address(spec: HostSpec, address: str, why: str) -> HostSpec:
    """``spec`` reaching ``address`` (the VM's IP now), its host key still checked under the
    name the user trusted it as (a ``HostKeyAlias``): a new IP after a restart needs no new
    ``trust``, a different key at it is refused as ever."""
    if address == spec.hostname:
        return spec
    sources = {**spec.sources, "hostname": why}
    if spec.host_key_alias is None:
        sources["hostkeyalias"] = f"{why} (the host key stays the one known as {spec.known_hosts_name})"
    return dataclasses.replace(
        spec,
        hostname=address,
        host_key_alias=spec.host_key_alias or spec.known_hosts_name,
        sources=sources,
    )


@dataclass
class UpResult:
    status: VMStatus
    seconds: float
    already_running: bool
    spec: HostSpec | None = None
    autostop: Any = None  # what the box said of its autostop once it ran (remotedl.cloud.autostop)


def up(
    cloud: CloudHost,
    reach: Callable[[VMStatus], HostSpec | None],
    *,
    progress: Callable[[str, VMStatus], None] = lambda _w, _s: None,
    timeout: float = START_TIMEOUT,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> UpResult:
    """Start the VM (unless it runs) and wait until SSH answers. ``reach(status)`` tries SSH at
    the address ``status`` gives and returns the spec that worked (None: not yet).
    ``progress`` hears "stopping" (waiting for a stop to end first), "requested", "running" and
    "ssh"."""
    began = clock()
    deadline = began + timeout
    st = cloud.refresh()
    if st.state == "terminated":
        raise CloudError(
            f"{cloud.vm.name} is terminated ({st.detail}): it cannot be started",
            hint="make a new VM and put its id in the host's settings",
        )
    already = st.running
    if st.state == "stopping":
        progress("stopping", st)
        st = _wait(
            cloud,
            lambda s: s.state != "stopping",
            deadline,
            poll=poll,
            clock=clock,
            what="to finish stopping",
        )
    if not st.running:
        if st.state != "starting":
            cloud.provider.start()
        progress("requested", st)
        st = _wait(cloud, lambda s: s.running, deadline, poll=poll, clock=clock, what="to run")
    progress("running", st)
    spec = reach(st)
    while spec is None:
        if clock() >= deadline:
            raise VMNotRunning(
                f"{cloud.vm.name} runs but SSH did not answer within {timeout:g} s",
                hint="is sshd starting on it, and does its security group / firewall let SSH in?",
            )
        time.sleep(poll)
        st = cloud.refresh()  # the address may only now be assigned
        spec = reach(st)
    progress("ssh", st)
    return UpResult(st, clock() - began, already, spec)


def _wait(
    cloud: CloudHost,
    done: Callable[[VMStatus], bool],
    deadline: float,
    *,
    poll: float,
    clock: Callable[[], float],
    what: str,
) -> VMStatus:
    while True:
        st = cloud.refresh()
        if done(st):
            return st
        if st.state == "terminated":
            raise CloudError(f"{cloud.vm.name} was terminated ({st.detail})")
        if clock() >= deadline:
            raise CloudError(
                f"{cloud.vm.name} did not get {what} in time (it is {st.detail})",
                hint="check it in the cloud's console",
            )
        time.sleep(poll)


@dataclass
class StopResult:
    status: VMStatus
    was: VMStatus
    seconds: float
    # The time it ran and what that cost, as known before it stopped.
    uptime_seconds: float | None
    cost: float | None


def stop_vm(
    cloud: CloudHost,
    *,
    wait: bool = True,
    timeout: float = START_TIMEOUT,
    poll: float = POLL_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> StopResult:
    """Stop the VM so that its compute billing stops (Azure: deallocate, also a VM that was
    powered off from inside); with ``wait``, until the cloud says it is stopped."""
    began = clock()
    was = cloud.refresh()
    if was.state == "terminated":
        raise CloudError(f"{cloud.vm.name} is terminated ({was.detail})")
    if was.state != "stopped" or was.billed_while_stopped:
        cloud.provider.stop()
    st = was
    if wait:
        st = _wait(
            cloud,
            lambda s: s.state == "stopped" and not s.billed_while_stopped,
            began + timeout,
            poll=poll,
            clock=clock,
            what="to stop",
        )
    return StopResult(st, was, clock() - began, was.uptime_seconds, was.cost_so_far)
