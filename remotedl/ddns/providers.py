"""What DNS serves for the name, and how to change it, per provider.

Secrets are read when a provider is made and kept in memory only; no message, log line or
repr carries them (URLs with tokens are never logged either).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any

from remotedl.ddns.detect import USER_AGENT, http_failure
from remotedl.ddns.settings import DnsSettings, provider_secret
from remotedl.errors import ConfigError, RemotedlError

RDTYPE = {4: "A", 6: "AAAA"}
DYNDNS2_FATAL = {
    "badauth": "the user name or password is wrong",
    "!donator": "the request used a feature the account does not have",
    "notfqdn": "the host name is not a fully qualified domain name",
    "nohost": "the host name does not exist in this account",
    "numhost": "too many hosts in one request",
    "abuse": "the host name is blocked for abuse",
    "badagent": "the client was refused (bad user agent or HTTP method)",
    "badsys": "the system parameter is not valid",
}
DYNDNS2_RETRY_LATER = {"dnserr": "the provider's DNS had an error", "911": "the provider is having problems"}


class ProviderError(RemotedlError):
    """An answer from the provider. ``fatal``: do not try again until the config changes;
    ``retry_after``: seconds to wait before the next attempt."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        fatal: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.fatal = fatal
        self.retry_after = retry_after


def _hostport(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, default_port


def _ip_of(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None)[0][4][0])
    except socket.gaierror as e:
        raise RemotedlError(f"cannot resolve DNS server '{host}'") from e


def query_served(name: str, family: int, server: str, port: int, timeout: float) -> list[str]:
    """The addresses ``server`` itself answers for ``name`` (asked directly: no cache)."""
    import dns.flags
    import dns.message
    import dns.query
    import dns.rcode
    import dns.rdatatype

    q = dns.message.make_query(name, RDTYPE[family])
    q.flags &= ~dns.flags.RD
    try:
        r = dns.query.udp(q, server, port=port, timeout=timeout)
        if r.flags & dns.flags.TC:
            r = dns.query.tcp(q, server, port=port, timeout=timeout)
    except dns.exception.Timeout as e:
        raise RemotedlError(f"no answer from DNS server {server}:{port} within {timeout:g} s") from e
    except OSError as e:
        raise RemotedlError(f"cannot ask DNS server {server}:{port}: {e}") from e
    if r.rcode() == dns.rcode.NXDOMAIN:
        return []
    if r.rcode() != dns.rcode.NOERROR:
        raise RemotedlError(f"DNS server {server}:{port} answered {dns.rcode.to_text(r.rcode())} for {name}")
    want = dns.rdatatype.from_text(RDTYPE[family])
    return sorted(str(rd) for rrset in r.answer if rrset.rdtype == want for rd in rrset)


def authoritative_served(s: DnsSettings, family: int) -> list[str]:
    """Ask the zone's own server: ``check_server`` if set, else the first NS of the zone."""
    if s.check_server:
        host, port = _hostport(s.check_server, 53)
        return query_served(s.name, family, _ip_of(host), port, s.timeout)
    import dns.resolver

    zone = s.zone or ".".join(s.name.split(".")[-2:])
    try:
        ns = str(dns.resolver.resolve(zone, "NS", lifetime=s.timeout)[0].target).rstrip(".")
    except Exception as e:
        raise RemotedlError(
            f"cannot find the name servers of {zone}: {e}",
            hint="set check_server in [dns] to the zone's authoritative server",
        ) from e
    return query_served(s.name, family, _ip_of(ns), 53, s.timeout)


class Provider:
    def __init__(self, s: DnsSettings, env: Mapping[str, str]) -> None:
        self.s = s

    def served(self, family: int) -> list[str]:
        return authoritative_served(self.s, family)

    def update(self, family: int, address: str) -> None:
        raise NotImplementedError


# ------------------------------------------------------------------ RFC 2136


def parse_tsig_key_file(text: str) -> tuple[str, str, str]:
    """(name, algorithm, secret) from a BIND key file (``key "n" { algorithm a; secret "s"; };``)."""
    m = re.search(r'key\s+"?([^"\s{]+)"?\s*\{(.*?)\}\s*;', text, re.S)
    if not m:
        raise ConfigError(
            'the TSIG key file is not in BIND\'s format (key "name" { algorithm ...; secret "..."; };)'
        )
    body = m.group(2)
    alg = re.search(r"algorithm\s+\"?([\w.-]+)\"?\s*;", body)
    sec = re.search(r'secret\s+"([^"]+)"\s*;', body)
    if not alg or not sec:
        raise ConfigError("the TSIG key file lacks an algorithm or a secret")
    return m.group(1), alg.group(1), sec.group(1)


class Rfc2136(Provider):
    def __init__(self, s: DnsSettings, env: Mapping[str, str]) -> None:
        super().__init__(s, env)
        import dns.tsigkeyring

        host, self.port = _hostport(s.server, 53)
        self.server = _ip_of(host)
        if env.get("REMOTEDL_DNS_TSIG_SECRET"):
            name = s.tsig_key_name or "remotedl"
            alg, secret = s.tsig_algorithm, str(env["REMOTEDL_DNS_TSIG_SECRET"]).strip()
        else:
            text = provider_secret(env, s)
            name, alg, secret = parse_tsig_key_file(text)
        try:
            self.keyring = dns.tsigkeyring.from_text({name: (alg, secret)})
        except Exception:
            raise ConfigError(
                "the TSIG key could not be read (algorithm or base64 secret is wrong)"
            ) from None
        self.keyname = name
        self.algorithm = alg

    def served(self, family: int) -> list[str]:
        # The primary itself, not a resolver or a cache: it is what the update changes.
        return query_served(self.s.name, family, self.server, self.port, self.s.timeout)

    def update(self, family: int, address: str) -> None:
        import dns.name
        import dns.query
        import dns.rcode
        import dns.tsig
        import dns.update

        zone = dns.name.from_text(self.s.zone)
        rel = dns.name.from_text(self.s.name).relativize(zone)
        upd = dns.update.UpdateMessage(
            zone, keyring=self.keyring, keyname=dns.name.from_text(self.keyname), keyalgorithm=self.algorithm
        )
        upd.replace(rel, self.s.ttl, RDTYPE[family], address)
        where = f"{self.s.server}"
        try:
            r = dns.query.tcp(upd, self.server, port=self.port, timeout=self.s.timeout)
        except dns.tsig.PeerBadKey as e:
            raise ProviderError(
                f"{where} does not know the TSIG key '{self.keyname}' (BADKEY)",
                hint="check the key name in the key file against the server's",
                fatal="BADKEY",
            ) from e
        except dns.tsig.PeerBadSignature as e:
            raise ProviderError(
                f"{where} rejected the TSIG signature (BADSIG): the secret is wrong",
                hint="check the secret against the server's key",
                fatal="BADSIG",
            ) from e
        except dns.tsig.PeerBadTime as e:
            raise ProviderError(
                f"{where} rejected the TSIG time (BADTIME): this clock is off", hint="sync the clock (NTP)"
            ) from e
        except dns.exception.Timeout as e:
            raise ProviderError(f"no answer from {where} within {self.s.timeout:g} s") from e
        except Exception as e:
            if "tsig" in type(e).__module__ or "TSIG" in str(e):
                raise ProviderError(f"{where}: TSIG error: {e}", fatal="TSIG") from e
            raise ProviderError(f"update sent to {where} failed: {e}") from e
        rcode = r.rcode()
        if rcode == dns.rcode.NOERROR:
            return
        text = dns.rcode.to_text(rcode)
        why = {
            "REFUSED": (
                "the server refused the update",
                "allow the key to update the zone (allow-update / update-policy)",
            ),
            "NOTAUTH": (
                "the server is not authoritative for the zone, or the key is not accepted",
                f'check zone = "{self.s.zone}" and the TSIG key',
            ),
            "NXRRSET": ("a prerequisite failed (NXRRSET)", None),
            "YXDOMAIN": ("a prerequisite failed (YXDOMAIN)", None),
            "NOTZONE": (f"{self.s.name} is not in zone {self.s.zone} (NOTZONE)", "fix name or zone in [dns]"),
            "SERVFAIL": ("the server failed (SERVFAIL)", "see the server's log"),
        }.get(text, (f"the server answered {text}", None))
        raise ProviderError(
            f"{where}: {why[0]}",
            hint=why[1],
            fatal=text if text in ("REFUSED", "NOTAUTH", "NOTZONE") else None,
        )


# ------------------------------------------------------------------ Cloudflare API v4


class Cloudflare(Provider):
    def __init__(self, s: DnsSettings, env: Mapping[str, str]) -> None:
        super().__init__(s, env)
        self.base = (s.api_url or "https://api.cloudflare.com/client/v4").rstrip("/")
        self._token = provider_secret(env, s).strip()
        self._zone_id: str | None = None

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        import requests

        headers = {"Authorization": f"Bearer {self._token}", "User-Agent": USER_AGENT}
        try:
            r = requests.request(method, self.base + path, headers=headers, timeout=self.s.timeout, **kw)
        except requests.RequestException as e:
            raise ProviderError(f"Cloudflare API unreachable: {http_failure(e, self.base)}") from None
        try:
            data = r.json()
        except ValueError:
            raise ProviderError(f"Cloudflare API answered HTTP {r.status_code} without JSON") from None
        if r.status_code in (401, 403):
            raise ProviderError(
                "Cloudflare refused the API token",
                hint="the token needs Zone.DNS edit on the zone",
                fatal=f"HTTP {r.status_code}",
            )
        if not data.get("success", False):
            errs = "; ".join(str(e.get("message")) for e in data.get("errors", [])) or f"HTTP {r.status_code}"
            raise ProviderError(f"Cloudflare API error: {errs}")
        return data["result"]

    def zone_id(self) -> str:
        if self._zone_id is None:
            zones = self._call("GET", "/zones", params={"name": self.s.zone})
            if not zones:
                raise ProviderError(f"Cloudflare has no zone {self.s.zone} for this token", fatal="nozone")
            self._zone_id = str(zones[0]["id"])
        return self._zone_id

    def _records(self, family: int) -> list[dict[str, Any]]:
        return list(
            self._call(
                "GET",
                f"/zones/{self.zone_id()}/dns_records",
                params={"type": RDTYPE[family], "name": self.s.name},
            )
        )

    def served(self, family: int) -> list[str]:
        return sorted(str(r["content"]) for r in self._records(family))

    def update(self, family: int, address: str) -> None:
        records = self._records(family)
        if records:
            rec = records[0]
            # keep its TTL; proxied off (SSH cannot pass Cloudflare's HTTP proxy) unless configured
            body = {
                "type": RDTYPE[family],
                "name": self.s.name,
                "content": address,
                "ttl": rec.get("ttl", self.s.ttl),
                "proxied": self.s.proxied,
            }
            self._call("PUT", f"/zones/{self.zone_id()}/dns_records/{rec['id']}", json=body)
            for extra in records[1:]:  # one address per family: the name must not point elsewhere too
                self._call("DELETE", f"/zones/{self.zone_id()}/dns_records/{extra['id']}")
        else:
            body = {
                "type": RDTYPE[family],
                "name": self.s.name,
                "content": address,
                "ttl": self.s.ttl,
                "proxied": self.s.proxied,
            }
            self._call("POST", f"/zones/{self.zone_id()}/dns_records", json=body)


# ------------------------------------------------------------------ dyndns2 (No-IP, Dynu, DynDNS, ...)


class Dyndns2(Provider):
    def __init__(self, s: DnsSettings, env: Mapping[str, str]) -> None:
        super().__init__(s, env)
        if not s.username:
            raise ConfigError("dyndns2 needs 'username' in [dns]")
        self._password = provider_secret(env, s).strip()
        self.url = (s.server or "https://members.dyndns.org").rstrip("/")
        if "://" not in self.url:
            self.url = "https://" + self.url
        if not self.url.endswith("/nic/update"):
            self.url += "/nic/update"

    def update(self, family: int, address: str) -> None:
        import requests

        try:
            r = requests.get(
                self.url,
                params={"hostname": self.s.name, "myip": address},
                auth=(self.s.username, self._password),
                headers={"User-Agent": USER_AGENT},
                timeout=self.s.timeout,
            )
        except requests.RequestException as e:
            raise ProviderError(
                f"dyndns2 server unreachable: {http_failure(e, self.url)}", retry_after=300
            ) from None
        text = r.text.strip()
        code = text.split()[0] if text else f"HTTP {r.status_code}"
        if code in ("good", "nochg"):
            return
        if r.status_code == 401 and code not in DYNDNS2_FATAL:
            code = "badauth"
        if code in DYNDNS2_FATAL:
            raise ProviderError(
                f"dyndns2 server answered '{code}': {DYNDNS2_FATAL[code]}",
                hint="fix the [dns] configuration; remotedl will not send again until it changes",
                fatal=code,
            )
        if code in DYNDNS2_RETRY_LATER:
            raise ProviderError(
                f"dyndns2 server answered '{code}': {DYNDNS2_RETRY_LATER[code]}; backing off for 30 minutes",
                retry_after=1800,
            )
        raise ProviderError(f"dyndns2 server gave an unknown answer: {text[:60]!r}", retry_after=300)


# ------------------------------------------------------------------ DuckDNS


class DuckDns(Provider):
    def __init__(self, s: DnsSettings, env: Mapping[str, str]) -> None:
        super().__init__(s, env)
        self._token = provider_secret(env, s).strip()
        self.url = s.api_url or "https://www.duckdns.org/update"
        self.domain = s.name.removesuffix(".duckdns.org")

    def update(self, family: int, address: str) -> None:
        import requests

        params = {
            "domains": self.domain,
            "token": self._token,
            "verbose": "true",
            "ip" if family == 4 else "ipv6": address,
        }
        try:
            r = requests.get(
                self.url, params=params, headers={"User-Agent": USER_AGENT}, timeout=self.s.timeout
            )
        except requests.RequestException as e:
            why = http_failure(e, self.url)
            raise ProviderError(f"DuckDNS unreachable: {why}", retry_after=300) from None
        lines = r.text.strip().splitlines()
        if not lines or lines[0] != "OK":
            raise ProviderError(
                "DuckDNS answered KO: the token or the domain is wrong",
                hint="check the token and name in [dns]",
                fatal="KO",
            )


PROVIDERS: dict[str, type[Provider]] = {
    "rfc2136": Rfc2136,
    "cloudflare": Cloudflare,
    "dyndns2": Dyndns2,
    "duckdns": DuckDns,
}


def make(s: DnsSettings, env: Mapping[str, str]) -> Provider:
    return PROVIDERS[s.provider](s, env)
