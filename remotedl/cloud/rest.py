"""JSON over HTTPS with a bearer token: the one way the GCE and Azure providers call their APIs."""

from __future__ import annotations

from typing import Any

from remotedl.cloud.base import CloudAuthError, CloudError

TIMEOUT = 30.0


def call(
    method: str,
    url: str,
    token: str,
    *,
    what: str,
    login_hint: str,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One API call; its JSON answer ({} for an empty one). The token is never logged or shown."""
    import requests

    try:
        r = requests.request(
            method,
            url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            json=body,
            timeout=TIMEOUT,
        )
    except requests.RequestException as e:
        raise CloudError(f"{what}: cannot reach the cloud's API: {type(e).__name__}") from e
    try:
        data = r.json() if r.content else {}
    except ValueError:
        data = {}
    if r.status_code in (401, 403):
        raise CloudAuthError(
            f"{what}: the cloud refused the credentials ({r.status_code}: {_message(data) or r.reason})",
            hint=login_hint,
        )
    if r.status_code == 404:
        raise CloudError(
            f"{what}: not found ({_message(data) or r.reason})",
            hint="check the VM's settings (`remotedl config`)",
        )
    if r.status_code >= 400:
        raise CloudError(f"{what}: {r.status_code} {_message(data) or r.reason}")
    return data if isinstance(data, dict) else {}


def _message(data: Any) -> str:
    """The error text of a Google ({"error": {"message"}}) or Azure ({"error": {"code", "message"}})
    answer."""
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        return " ".join(str(err[k]) for k in ("code", "message") if err.get(k))
    return ""
