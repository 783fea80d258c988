"""The [dns] table, validated, and secrets read from the environment or 0600 files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.errors import ConfigError

PROVIDERS = ("rfc2136", "cloudflare", "dyndns2", "duckdns")
DEFAULT_IP_SOURCES = [
    "https://api.ipify.org",
    "https://ipv4.icanhazip.com",
    "https://ifconfig.me/ip",
    "https://checkip.amazonaws.com",
]
DEFAULT_IP_SOURCES_V6 = ["https://api6.ipify.org", "https://ipv6.icanhazip.com", "https://ifconfig.co/ip"]


@dataclass(frozen=True)
class SecretRoute:
    """Where a provider's secret comes from and where it goes: ``config`` checks these
    against the settings' sources (a project may not send the user's secret to a server it
    names until the user allowed the project file)."""

    destination: str  # the [dns] key naming where the secret is sent (default: the provider's)
    file_key: str  # the [dns] key naming the file it is read from
    env_var: str  # the environment variable that holds it instead
    what: str


SECRET_ROUTES = {
    "rfc2136": SecretRoute("server", "tsig_key_file", "REMOTEDL_DNS_TSIG_SECRET", "TSIG key"),
    "cloudflare": SecretRoute("api_url", "token_file", "REMOTEDL_CLOUDFLARE_TOKEN", "Cloudflare API token"),
    "dyndns2": SecretRoute("server", "password_file", "REMOTEDL_DYNDNS2_PASSWORD", "dyndns2 password"),
    "duckdns": SecretRoute("api_url", "token_file", "REMOTEDL_DUCKDNS_TOKEN", "DuckDNS token"),
}


@dataclass
class DnsSettings:
    name: str
    provider: str
    zone: str = ""
    server: str = ""  # rfc2136: the primary that takes updates; dyndns2: the update server URL
    ttl: int = 60
    ipv4: bool = True
    ipv6: bool = False
    ip_sources: list[str] = field(default_factory=lambda: list(DEFAULT_IP_SOURCES))
    ip_sources_v6: list[str] = field(default_factory=lambda: list(DEFAULT_IP_SOURCES_V6))
    allow_private: bool = False
    timeout: float = 5.0
    # rfc2136
    tsig_key_file: str = ""
    tsig_key_name: str = ""
    tsig_algorithm: str = "hmac-sha256"
    # dyndns2 / duckdns / cloudflare
    username: str = ""
    password_file: str = ""
    token_file: str = ""
    api_url: str = ""
    proxied: bool = False
    check_server: str = ""  # host:port of an authoritative server to compare against

    def fingerprint(self) -> str:
        """Identifies the configuration, so a fatal provider answer blocks only this one."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


_TYPES = {f: type(v) for f, v in asdict(DnsSettings("x", "rfc2136")).items()}


def parse(table: dict[str, Any], origin: str = "[dns]") -> DnsSettings:
    if not table:
        raise ConfigError(
            "no [dns] table in the configuration",
            hint="add one to remotedl.toml or the user config; see README 'Dynamic DNS'",
        )
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown key(s) {', '.join(unknown)}", hint=f"known keys: {', '.join(sorted(_TYPES))}"
        )
    for key in ("name", "provider"):
        if not table.get(key):
            raise ConfigError(f"{origin}: '{key}' is required")
    values: dict[str, Any] = {}
    for key, value in table.items():
        want = _TYPES[key]
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is list and isinstance(value, str):
            value = [value]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise ConfigError(f"{origin}: '{key}' must be {want.__name__}, not {value!r}")
        values[key] = value
    s = DnsSettings(**values)
    if s.provider not in PROVIDERS:
        raise ConfigError(f"{origin}: provider '{s.provider}' is not one of {', '.join(PROVIDERS)}")
    s.name = s.name.rstrip(".")
    if s.provider in ("rfc2136", "cloudflare") and not s.zone:
        # the last two labels: right for gpubox.example.com, set it for deeper zones
        s.zone = ".".join(s.name.split(".")[-2:])
    if s.zone and not (s.name == s.zone or s.name.endswith("." + s.zone)):
        raise ConfigError(f"{origin}: name {s.name} is not inside zone {s.zone}")
    if s.provider == "rfc2136" and not s.server:
        raise ConfigError(f"{origin}: rfc2136 needs 'server', the zone's primary (host:port)")
    if not s.ipv4 and not s.ipv6:
        raise ConfigError(f"{origin}: ipv4 and ipv6 are both off: nothing to update")
    return s


def provider_secret(env: dict[str, str] | Any, s: DnsSettings) -> str:
    """The secret of ``s.provider``, read the way ``SECRET_ROUTES`` says."""
    route = SECRET_ROUTES[s.provider]
    return read_secret(env, route.env_var, str(getattr(s, route.file_key)), route.what)


def read_secret(env: dict[str, str] | Any, var: str, path: str, what: str) -> str:
    """A secret from the environment variable ``var``, else from ``path`` (mode 0600 or stricter).
    The value is never printed or logged, only where it came from."""
    value = env.get(var)
    if value:
        return str(value).strip()
    if not path:
        raise ConfigError(f"no {what}: set {var} or a key file in [dns]")
    p = Path(os.path.expanduser(path))
    try:
        mode = p.stat().st_mode
    except OSError as e:
        raise ConfigError(f"cannot read {what} file {p}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} file {p} is readable by others (mode {stat.S_IMODE(mode):o})",
            hint=f"run `chmod 600 {p}`",
        )
    return p.read_text()
