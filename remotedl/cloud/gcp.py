"""Google Compute Engine through its REST API (instances.get / start / stop).

Credentials are Google's application default credentials, found as Google's own libraries find
them: ``GOOGLE_APPLICATION_CREDENTIALS``, else ``gcloud auth application-default login``'s file
(``$CLOUDSDK_CONFIG`` or ``~/.config/gcloud``/application_default_credentials.json), a user's
refresh token or a service account key; else ``gcloud auth print-access-token``. The API's
address is gcloud's ``CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE`` where that is set.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remotedl.cloud import rest
from remotedl.cloud.base import CloudAuthError, CloudVM, Provider, VMState, VMStatus, parse_time

API = "https://compute.googleapis.com/compute/v1/"
TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - an address, not a secret
SCOPE = "https://www.googleapis.com/auth/compute"
LOGIN = "run `gcloud auth application-default login` (or set GOOGLE_APPLICATION_CREDENTIALS)"
STATES: dict[str, VMState] = {
    "PROVISIONING": "starting",
    "STAGING": "starting",
    "RUNNING": "running",
    "STOPPING": "stopping",
    "SUSPENDING": "stopping",
    "REPAIRING": "starting",
    "STOPPED": "stopped",
    "SUSPENDED": "stopped",
    "TERMINATED": "stopped",  # GCE's word for a stopped instance
}


def adc_file(environ: Mapping[str, str]) -> Path | None:
    explicit = environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return Path(explicit)
    config = environ.get("CLOUDSDK_CONFIG") or str(Path(environ.get("HOME", "~")) / ".config" / "gcloud")
    path = Path(config).expanduser() / "application_default_credentials.json"
    return path if path.is_file() else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _service_account_assertion(info: dict[str, Any], token_uri: str) -> str:
    """A signed JWT (RS256) for the OAuth 2.0 JWT bearer grant, as Google's libraries make it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": info.get("private_key_id", "")}
    claims = {"iss": info["client_email"], "scope": SCOPE, "aud": token_uri, "iat": now, "exp": now + 3600}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CloudAuthError("the service account key is not an RSA key", hint=LOGIN)
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def access_token(environ: Mapping[str, str]) -> str:
    """An OAuth access token for the Compute API, from application default credentials."""
    import requests

    path = adc_file(environ)
    if path is not None:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CloudAuthError(f"cannot read Google credentials {path}: {e}", hint=LOGIN) from e
        kind = info.get("type")
        token_uri = str(info.get("token_uri") or TOKEN_URI)
        if kind == "authorized_user":
            form = {
                "grant_type": "refresh_token",
                "client_id": info.get("client_id", ""),
                "client_secret": info.get("client_secret", ""),
                "refresh_token": info.get("refresh_token", ""),
            }
        elif kind == "service_account":
            form = {
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion": _service_account_assertion(info, token_uri),
            }
        else:
            raise CloudAuthError(
                f"Google credentials {path} are of a kind remotedl cannot use ({kind})", hint=LOGIN
            )
        try:
            r = requests.post(token_uri, data=form, timeout=rest.TIMEOUT)
        except requests.RequestException as e:
            raise CloudAuthError(
                f"cannot reach Google's token service: {type(e).__name__}", hint=LOGIN
            ) from e
        token = r.json().get("access_token") if r.ok else None
        if not token:
            raise CloudAuthError(f"Google refused the credentials in {path} ({r.status_code})", hint=LOGIN)
        return str(token)
    gcloud = shutil.which("gcloud", path=environ.get("PATH"))
    if gcloud:
        from remotedl import proc

        out = proc.run([gcloud, "auth", "print-access-token"], check=False, env=environ, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    raise CloudAuthError("no Google credentials found", hint=LOGIN)


class GcpProvider(Provider):
    def __init__(self, vm: CloudVM, environ: Mapping[str, str]) -> None:
        super().__init__(vm)
        self.environ = environ
        self._token: str | None = None

    def _url(self, suffix: str = "") -> str:
        base = self.environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE") or API
        ids = self.vm.ids
        return (
            f"{base.rstrip('/')}/projects/{ids['project']}/zones/{ids['zone']}/instances/{ids['instance']}"
            + suffix
        )

    def _call(self, method: str, suffix: str, what: str) -> dict[str, Any]:
        if self._token is None:
            self._token = access_token(self.environ)
        return rest.call(
            method, self._url(suffix), self._token, what=f"GCE {what} of {self.vm.name}", login_hint=LOGIN
        )

    def status(self) -> VMStatus:
        inst = self._call("GET", "", "instances.get")
        word = str(inst.get("status", "unknown"))
        state = STATES.get(word, "unknown")
        nic = (inst.get("networkInterfaces") or [{}])[0]
        access = (nic.get("accessConfigs") or [{}])[0]
        scheduling = inst.get("scheduling") or {}
        return VMStatus(
            state=state,
            detail=word,
            public_ip=access.get("natIP"),
            private_ip=nic.get("networkIP"),
            started_at=parse_time(inst.get("lastStartTimestamp"))
            if state in ("running", "stopping")
            else None,
            spot=bool(scheduling.get("preemptible")) or scheduling.get("provisioningModel") == "SPOT",
            price_per_hour=self.vm.price_per_hour,
        )

    def start(self) -> None:
        self._call("POST", "/start", "instances.start")

    def stop(self) -> None:
        self._call("POST", "/stop", "instances.stop")
