"""Azure virtual machines through the Resource Manager REST API.

``start``, ``deallocate`` (a VM merely powered off goes on billing: remotedl always
deallocates) and the VM with its instance view (``$expand=instanceView``); the public IP from its
network interface. The token is the Azure CLI's (``az account get-access-token``, after ``az
login``); the API's address is ``AZURE_RESOURCE_MANAGER_ENDPOINT`` where a sovereign cloud or
Azure Stack needs another than management.azure.com.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import Any

from remotedl.cloud import rest
from remotedl.cloud.base import CloudAuthError, CloudVM, Provider, VMState, VMStatus, parse_time

API = "https://management.azure.com"
RESOURCE = "https://management.azure.com/"
COMPUTE_VERSION = "2024-07-01"
NETWORK_VERSION = "2024-05-01"
LOGIN = "run `az login` (the Azure CLI's token is what remotedl uses)"
STATES: dict[str, VMState] = {
    "PowerState/starting": "starting",
    "PowerState/running": "running",
    "PowerState/stopping": "stopping",
    "PowerState/deallocating": "stopping",
    "PowerState/stopped": "stopped",
    "PowerState/deallocated": "stopped",
}


def access_token(environ: Mapping[str, str]) -> str:
    """The Azure CLI's access token for Resource Manager."""
    from remotedl import proc

    az = shutil.which("az", path=environ.get("PATH"))
    if az is None:
        raise CloudAuthError(
            "the Azure CLI (az) is not installed, and remotedl uses its login",
            hint="install it (https://aka.ms/azure-cli), then run `az login`",
        )
    out = proc.run(
        [az, "account", "get-access-token", "--resource", RESOURCE, "--output", "json"],
        check=False,
        env=environ,
        timeout=60,
    )
    try:
        token = json.loads(out.stdout).get("accessToken") if out.returncode == 0 else None
    except ValueError:
        token = None
    if not token:
        raise CloudAuthError("the Azure CLI has no token (not logged in?)", hint=LOGIN)
    return str(token)


class AzureProvider(Provider):
    def __init__(self, vm: CloudVM, environ: Mapping[str, str]) -> None:
        super().__init__(vm)
        self.environ = environ
        self._token: str | None = None

    @property
    def base(self) -> str:
        return (self.environ.get("AZURE_RESOURCE_MANAGER_ENDPOINT") or API).rstrip("/")

    def _vm_path(self) -> str:
        ids = self.vm.ids
        return (
            f"/subscriptions/{ids['subscription']}/resourceGroups/{ids['resource_group']}"
            f"/providers/Microsoft.Compute/virtualMachines/{ids['vm']}"
        )

    def _call(self, method: str, path: str, version: str, what: str, extra: str = "") -> dict[str, Any]:
        if self._token is None:
            self._token = access_token(self.environ)
        url = f"{self.base}{path}?api-version={version}{extra}"
        return rest.call(method, url, self._token, what=f"Azure {what} of {self.vm.name}", login_hint=LOGIN)

    def status(self) -> VMStatus:
        model = self._call(
            "GET", self._vm_path(), COMPUTE_VERSION, "virtualMachines.get", "&$expand=instanceView"
        )
        props = model.get("properties") or {}
        statuses = (props.get("instanceView") or {}).get("statuses") or []
        codes = [str(s.get("code", "")) for s in statuses]
        power = next((c for c in codes if c.startswith("PowerState/")), "PowerState/unknown")
        state = STATES.get(power, "unknown")
        # The last operation's end: for a running VM, when its start finished.
        provisioned: dict[str, Any] = next(
            (s for s in statuses if str(s.get("code", "")).startswith("ProvisioningState/")), {}
        )
        public_ip = private_ip = None
        if state == "running":
            public_ip, private_ip = self._addresses(props)
        return VMStatus(
            state=state,
            detail=power,
            public_ip=public_ip,
            private_ip=private_ip,
            started_at=parse_time(provisioned.get("time")) if state in ("running", "stopping") else None,
            spot=props.get("priority") == "Spot",
            billed_while_stopped=power == "PowerState/stopped",
            price_per_hour=self.vm.price_per_hour,
        )

    def _addresses(self, props: dict[str, Any]) -> tuple[str | None, str | None]:
        nics = (props.get("networkProfile") or {}).get("networkInterfaces") or []
        if not nics:
            return None, None
        primary = next((n for n in nics if (n.get("properties") or {}).get("primary")), nics[0])
        nic = self._call("GET", str(primary["id"]), NETWORK_VERSION, "networkInterfaces.get")
        configs = (nic.get("properties") or {}).get("ipConfigurations") or [{}]
        config = configs[0].get("properties") or {}
        private_ip = config.get("privateIPAddress")
        public_ref = config.get("publicIPAddress") or {}
        public_ip = None
        if public_ref.get("id"):
            pip = self._call("GET", str(public_ref["id"]), NETWORK_VERSION, "publicIPAddresses.get")
            public_ip = (pip.get("properties") or {}).get("ipAddress")
        return public_ip, private_ip

    def start(self) -> None:
        self._call("POST", self._vm_path() + "/start", COMPUTE_VERSION, "virtualMachines.start")

    def stop(self) -> None:
        self._call("POST", self._vm_path() + "/deallocate", COMPUTE_VERSION, "virtualMachines.deallocate")
