"""A real AWS EC2 API (moto_server) and local HTTP servers speaking the documented GCE and Azure
REST calls, for hosts that are cloud VMs.

GCE: ``instances.get`` / ``start`` / ``stop`` under ``/compute/v1/projects/P/zones/Z/instances/I``
and the OAuth token endpoint an application default credentials file names. Azure:
``virtualMachines`` get (``$expand=instanceView``) / ``start`` / ``deallocate``, the network
interface and public IP resources, each with its ``api-version``. Both check the bearer token.
A started VM answers "starting" once, then "running"; a stopped one "stopping" once.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from remotedl.waiting import free_port, port_answers, retry_until


@dataclass
class Moto:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        """What a user of this AWS API has in the environment (boto3 reads the same names)."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def ec2(self, region: str = "us-east-1") -> Any:
        import boto3

        return boto3.client(
            "ec2",
            region_name=region,
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def instance(self, region: str = "us-east-1", *, spot: bool = False) -> str:
        """A new instance whose private IP is 127.0.0.1 (a VPC on 127.0.0.0/24), stopped."""
        ec2 = self.ec2(region)
        vpc = ec2.create_vpc(CidrBlock="127.0.0.0/24")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="127.0.0.0/24")["Subnet"]["SubnetId"]
        extra: dict[str, Any] = {}
        if spot:
            extra["InstanceMarketOptions"] = {"MarketType": "spot"}
        r = ec2.run_instances(
            ImageId="ami-12c6146b",
            MinCount=1,
            MaxCount=1,
            SubnetId=subnet,
            PrivateIpAddress="127.0.0.1",
            InstanceType="g5.xlarge",
            **extra,
        )
        iid = str(r["Instances"][0]["InstanceId"])
        ec2.stop_instances(InstanceIds=[iid])
        return iid

    def state(self, iid: str, region: str = "us-east-1") -> str:
        d = self.ec2(region).describe_instances(InstanceIds=[iid])
        return str(d["Reservations"][0]["Instances"][0]["State"]["Name"])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_moto(venv_bin: Path) -> Moto:
    port = free_port()
    proc = subprocess.Popen(
        [str(venv_bin / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if not retry_until(lambda: port_answers("127.0.0.1", port), seconds=60):
        proc.kill()
        raise RuntimeError("moto_server did not start")
    return Moto(port, proc)


class RawText(str):
    """An answer sent as plain text, not JSON."""


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str


@dataclass
class FakeCloud:
    """One VM on a fake GCE or Azure API."""

    kind: str  # "gcp" or "azure"
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    power: str = "stopped"  # running, starting, stopping, stopped; Azure also "stopped-billed"
    public_ip: str = "127.0.0.1"
    private_ip: str = "10.0.0.4"
    started_at: str = "2026-01-01T00:00:00.000-08:00"
    calls: list[Call] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    refresh_token: str = field(default_factory=lambda: secrets.token_hex(8))
    # The VM's metadata service (as seen from the VM): the cloud takes this spot VM back.
    preempted: bool = False
    imds_token: str = field(default_factory=lambda: secrets.token_hex(8))
    # Ids of the VM
    project: str = "proj-1"
    zone: str = "europe-west4-a"
    instance: str = "gpu-1"
    subscription: str = "00000000-0000-0000-0000-000000000001"
    resource_group: str = "ml"
    vm: str = "gpu-1"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def ops(self, *names: str) -> list[str]:
        """The state-changing calls made (``start``, ``stop``, ``deallocate``)."""
        return [
            c.path.rsplit("/", 1)[-1]
            for c in self.calls
            if c.method == "POST" and c.path.rsplit("/", 1)[-1] in names
        ]

    # ------------------------------------------------------------------ GCE
    def _gce_path(self) -> str:
        return f"/compute/v1/projects/{self.project}/zones/{self.zone}/instances/{self.instance}"

    def _gce_instance(self) -> dict[str, Any]:
        word = {"running": "RUNNING", "starting": "STAGING", "stopping": "STOPPING", "stopped": "TERMINATED"}
        inst: dict[str, Any] = {
            "kind": "compute#instance",
            "name": self.instance,
            "status": word[self.power],
            "networkInterfaces": [
                {"networkIP": self.private_ip, "accessConfigs": [{"type": "ONE_TO_ONE_NAT"}]}
            ],
            "scheduling": {"preemptible": False},
        }
        if self.power == "running":
            inst["networkInterfaces"][0]["accessConfigs"][0]["natIP"] = self.public_ip
            inst["lastStartTimestamp"] = self.started_at
        return inst

    # ------------------------------------------------------------------ Azure
    def _az_vm_path(self) -> str:
        return (
            f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
            f"/providers/Microsoft.Compute/virtualMachines/{self.vm}"
        )

    def _az_nic(self) -> str:
        return f"{self._az_group()}/providers/Microsoft.Network/networkInterfaces/{self.vm}-nic"

    def _az_pip(self) -> str:
        return f"{self._az_group()}/providers/Microsoft.Network/publicIPAddresses/{self.vm}-ip"

    def _az_group(self) -> str:
        return f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"

    def _az_model(self) -> dict[str, Any]:
        power = {
            "running": "PowerState/running",
            "starting": "PowerState/starting",
            "stopping": "PowerState/deallocating",
            "stopped": "PowerState/deallocated",
            "stopped-billed": "PowerState/stopped",
        }[self.power]
        return {
            "name": self.vm,
            "id": self._az_vm_path(),
            "properties": {
                "priority": "Regular",
                "networkProfile": {
                    "networkInterfaces": [{"id": self._az_nic(), "properties": {"primary": True}}]
                },
                "instanceView": {
                    "statuses": [
                        {"code": "ProvisioningState/succeeded", "time": "2026-01-01T08:00:00.1234567+00:00"},
                        {"code": power},
                    ]
                },
            },
        }

    # ------------------------------------------------------------------ serving
    def _answer(
        self, method: str, path: str, query: dict[str, list[str]], form: dict[str, list[str]]
    ) -> tuple[int, Any]:
        if self.kind == "gcp" and path == "/token":
            if form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [
                self.refresh_token
            ]:
                return 200, {"access_token": self.token, "expires_in": 3599, "token_type": "Bearer"}
            return 400, {"error": "invalid_grant"}
        if self.kind == "gcp":
            base = self._gce_path()
            if method == "GET" and path == base:
                inst = self._gce_instance()
                self._advance()
                return 200, inst
            if method == "POST" and path in (base + "/start", base + "/stop"):
                self.power = "starting" if path.endswith("/start") else "stopping"
                return 200, {
                    "kind": "compute#operation",
                    "status": "RUNNING",
                    "operationType": path.rsplit("/", 1)[-1],
                }
            return 404, {"error": {"code": 404, "message": f"The resource '{path}' was not found"}}
        if not query.get("api-version"):
            return 400, {
                "error": {"code": "MissingApiVersionParameter", "message": "api-version is required"}
            }
        base = self._az_vm_path()
        if method == "GET" and path == base:
            model = self._az_model()
            self._advance()
            return 200, model
        if method == "POST" and path in (base + "/start", base + "/deallocate"):
            self.power = "starting" if path.endswith("/start") else "stopping"
            return 202, None
        if method == "GET" and path == self._az_nic():
            config = {"privateIPAddress": self.private_ip, "publicIPAddress": {"id": self._az_pip()}}
            return 200, {"properties": {"ipConfigurations": [{"properties": config}]}}
        if method == "GET" and path == self._az_pip():
            return 200, {"properties": {"ipAddress": self.public_ip}}
        return 404, {"error": {"code": "ResourceNotFound", "message": f"{path} was not found"}}

    def _metadata(self, method: str, path: str, headers: Any) -> tuple[int, Any] | None:
        """The metadata services' preemption notices: EC2 IMDSv2 (a token first), GCE's
        ``instance/preempted``, Azure's scheduled events; None for any other path."""
        if path == "/latest/api/token" and method == "PUT":
            ok = headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            return (200, RawText(self.imds_token)) if ok else (400, None)
        if path == "/latest/meta-data/spot/instance-action":
            if headers.get("X-aws-ec2-metadata-token") != self.imds_token:
                return 401, None
            return (
                (200, {"action": "terminate", "time": "2026-12-07T15:00:00Z"})
                if self.preempted
                else (404, None)
            )
        if path == "/computeMetadata/v1/instance/preempted":
            if headers.get("Metadata-Flavor") != "Google":
                return 403, None
            return 200, RawText("TRUE" if self.preempted else "FALSE")
        if path == "/metadata/scheduledevents":
            if headers.get("Metadata") != "true":
                return 400, None
            events = [{"EventId": "e1", "EventType": "Preempt", "NotBefore": "Mon, 07 Dec 2026 15:00:00 GMT"}]
            return 200, {"DocumentIncarnation": 1, "Events": events if self.preempted else []}
        return None

    def _advance(self) -> None:
        # What the cloud does between two looks: a start finishes, a stop too.
        if self.power == "starting":
            self.power = "running"
        elif self.power == "stopping":
            self.power = "stopped"

    def start(self) -> FakeCloud:
        fake = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def _do(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                form = parse_qs(body) if "urlencoded" in (self.headers.get("Content-Type") or "") else {}
                auth = self.headers.get("Authorization") or ""
                with lock:
                    fake.calls.append(Call(self.command, url.path, parse_qs(url.query), auth))
                    meta = fake._metadata(self.command, url.path, self.headers)
                    if meta is not None:
                        code, data = meta
                    elif url.path == "/metadata/identity/oauth2/token":  # Azure IMDS, on the VM
                        ok = self.headers.get("Metadata") == "true" and "resource" in url.query
                        code, data = (200, {"access_token": fake.token}) if ok else (400, {"error": "bad"})
                    elif url.path != "/token" and auth != f"Bearer {fake.token}":
                        code, data = (
                            401,
                            {"error": {"code": "Unauthorized", "message": "bad or missing token"}},
                        )
                    else:
                        code, data = fake._answer(self.command, url.path, parse_qs(url.query), form)
                if isinstance(data, RawText):
                    raw = str(data).encode()
                else:
                    raw = b"" if data is None else json.dumps(data).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = _do

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # ------------------------------------------------------------------ what a user has
    def environ(self, base: Path) -> dict[str, str]:
        """The credentials and endpoint a user of this cloud has: an application default
        credentials file (GCE), or an `az` on PATH that hands out a token (Azure)."""
        if self.kind == "gcp":
            adc = base / "adc.json"
            adc.write_text(
                json.dumps(
                    {
                        "type": "authorized_user",
                        "client_id": "cid.apps.googleusercontent.com",
                        "client_secret": "csecret",
                        "refresh_token": self.refresh_token,
                        "token_uri": f"{self.url}/token",
                    }
                )
            )
            adc.chmod(0o600)
            return {
                "GOOGLE_APPLICATION_CREDENTIALS": str(adc),
                "CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE": f"{self.url}/compute/v1/",
            }
        bindir = base / "azbin"
        bindir.mkdir(exist_ok=True)
        az = bindir / "az"
        az.write_text(
            "#!/bin/sh\n"
            '[ "$1 $2" = "account get-access-token" ] || { echo "az stand-in: $*" >&2; exit 2; }\n'
            f'printf \'%s\\n\' \'{{"accessToken": "{self.token}", "tokenType": "Bearer"}}\'\n'
        )
        az.chmod(0o755)
        return {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "AZURE_RESOURCE_MANAGER_ENDPOINT": self.url,
        }

    def settings(self) -> dict[str, str]:
        if self.kind == "gcp":
            return {"cloud": "gcp", "project": self.project, "zone": self.zone, "instance": self.instance}
        return {
            "cloud": "azure",
            "subscription": self.subscription,
            "resource_group": self.resource_group,
            "vm": self.vm,
        }
