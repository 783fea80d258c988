"""A real BIND for RFC 2136, and local HTTP servers speaking the providers' documented protocols.

The dyndns2 and DuckDNS fakes apply accepted updates to the BIND zone (with dnspython), so
remotedl's comparison against the authoritative server sees what a real provider would serve.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import dns.message
import dns.query
import dns.rdatatype
import dns.tsigkeyring
import dns.update

from remotedl.waiting import free_port, port_answers, retry_until

ZONE = "example.test"
DUCK_ZONE = "duckdns.org"  # served by the local BIND only, for the DuckDNS fake
NAMED = shutil.which("named") or "/usr/sbin/named"


@dataclass
class Bind:
    port: int
    directory: Path
    key_file: Path
    secret: str
    proc: subprocess.Popen[bytes]
    keyname: str = "ddns-key"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serial(self) -> int:
        r = dns.query.udp(dns.message.make_query(ZONE, "SOA"), "127.0.0.1", port=self.port, timeout=3)
        return int(r.answer[0][0].serial)

    def lookup(self, name: str, rdtype: str = "A") -> list[str]:
        r = dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=self.port, timeout=3)
        want = dns.rdatatype.from_text(rdtype)
        return sorted(str(rd) for rrset in r.answer if rrset.rdtype == want for rd in rrset)

    def set(self, name: str, rdtype: str, address: str | None, ttl: int = 60) -> None:
        """Change the zone behind remotedl's back (or as a fake provider does)."""
        ring = dns.tsigkeyring.from_text({self.keyname: ("hmac-sha256", self.secret)})
        zone = DUCK_ZONE if name.endswith("." + DUCK_ZONE) else ZONE
        u = dns.update.UpdateMessage(
            zone, keyring=ring, keyname=dns.name.from_text(self.keyname), keyalgorithm="hmac-sha256"
        )
        rel = dns.name.from_text(name).relativize(dns.name.from_text(zone))
        if address is None:
            u.delete(rel, rdtype)
        else:
            u.replace(rel, ttl, rdtype, address)
        r = dns.query.tcp(u, "127.0.0.1", port=self.port, timeout=3)
        assert r.rcode() == 0, r

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_bind(directory: Path) -> Bind:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    secret = base64.b64encode(os.urandom(32)).decode()
    key_file = directory / "ddns.key"
    key_file.write_text(f'key "ddns-key" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n')
    key_file.chmod(0o600)
    (directory / "named.conf").write_text(f"""
options {{
    directory "{directory}";
    pid-file "{directory}/named.pid";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
include "{key_file}";
zone "{ZONE}" {{
    type primary;
    file "{directory}/{ZONE}.db";
    allow-update {{ key "ddns-key"; }};
}};
zone "{DUCK_ZONE}" {{
    type primary;
    file "{directory}/{DUCK_ZONE}.db";
    allow-update {{ key "ddns-key"; }};
}};
""")
    for zone in (ZONE, DUCK_ZONE):
        (directory / f"{zone}.db").write_text(f"""$TTL 300
@ IN SOA ns.{zone}. admin.{zone}. 1 3600 600 86400 60
@ IN NS ns.{zone}.
ns IN A 127.0.0.1
""")
    log = open(directory / "named.log", "wb")  # noqa: SIM115 - lives as long as named
    p = subprocess.Popen(
        [NAMED, "-g", "-c", str(directory / "named.conf")], stdout=log, stderr=subprocess.STDOUT
    )
    if not retry_until(lambda: port_answers("127.0.0.1", port), seconds=15):
        p.kill()
        raise RuntimeError("named did not start: " + (directory / "named.log").read_text()[-2000:])
    b = Bind(port, directory, key_file, secret, p)
    retry_until(lambda: _soa_ok(b), seconds=10)
    return b


def _soa_ok(b: Bind) -> bool:
    try:
        return b.serial() >= 1
    except Exception:
        return False


# ------------------------------------------------------------------ HTTP fakes


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class FakeHTTP:
    """One local HTTP server; ``routes`` maps a path prefix to a handler."""

    routes: dict[str, Callable[[Request], tuple[int, str, str]]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeHTTP:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _do(self) -> None:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw and "json" in (self.headers.get("Content-Type") or "") else raw
                req = Request(self.command, parsed.path, parse_qs(parsed.query), dict(self.headers), body)
                fake.requests.append(req)
                for prefix, fn in sorted(fake.routes.items(), key=lambda kv: -len(kv[0])):
                    if parsed.path.startswith(prefix):
                        code, ctype, text = fn(req)
                        break
                else:
                    code, ctype, text = 404, "text/plain", "not found"
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _do

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


def ip_echo(answers: dict[str, str]) -> FakeHTTP:
    """GET /NAME answers answers[NAME] as plain text, like ipify or icanhazip."""
    fake = FakeHTTP()
    fake.routes["/"] = lambda r: (200, "text/plain", answers.get(r.path.strip("/"), "") + "\n")
    return fake.start()


class Cloudflare:
    """The parts of Cloudflare API v4 that DNS updates use, per its documentation."""

    def __init__(self, token: str, zone: str) -> None:
        self.token = token
        self.zone = zone
        self.zone_id = uuid.uuid4().hex
        self.records: dict[str, dict[str, Any]] = {}
        self.http = FakeHTTP()
        self.http.routes["/client/v4/zones"] = self.handle
        self.http.start()

    @property
    def api(self) -> str:
        return self.http.url + "/client/v4"

    def writes(self) -> list[Request]:
        return [r for r in self.http.requests if r.method in ("POST", "PUT", "PATCH", "DELETE")]

    def _ok(self, result: Any) -> tuple[int, str, str]:
        return (
            200,
            "application/json",
            json.dumps({"success": True, "errors": [], "messages": [], "result": result}),
        )

    def handle(self, r: Request) -> tuple[int, str, str]:
        if r.headers.get("Authorization") != f"Bearer {self.token}":
            return (
                403,
                "application/json",
                json.dumps(
                    {
                        "success": False,
                        "errors": [{"code": 9109, "message": "Invalid access token"}],
                        "result": None,
                    }
                ),
            )
        parts = r.path.split("/")[4:]  # after /client/v4/zones
        if not parts or parts == [""]:
            name = r.query.get("name", [""])[0]
            return self._ok([{"id": self.zone_id, "name": self.zone}] if name == self.zone else [])
        if parts[0] != self.zone_id or parts[1] != "dns_records":
            return (
                404,
                "application/json",
                json.dumps({"success": False, "errors": [{"message": "no route"}]}),
            )
        if r.method == "GET":
            rtype, name = r.query.get("type", [None])[0], r.query.get("name", [None])[0]
            return self._ok(
                [
                    x
                    for x in self.records.values()
                    if (rtype is None or x["type"] == rtype) and (name is None or x["name"] == name)
                ]
            )
        if r.method == "POST":
            rid = uuid.uuid4().hex
            self.records[rid] = {"id": rid, "ttl": 1, "proxied": False, **r.body}
            return self._ok(self.records[rid])
        rid = parts[2]
        if r.method == "PUT":
            self.records[rid] = {"id": rid, **r.body}
            return self._ok(self.records[rid])
        if r.method == "DELETE":
            self.records.pop(rid, None)
            return self._ok({"id": rid})
        return 405, "application/json", "{}"


class Dyndns2:
    """A dyndns2 server (/nic/update, basic auth). ``answer`` scripts the reply; 'good' applies
    the change to the BIND zone."""

    def __init__(self, bind: Bind, user: str, password: str) -> None:
        self.bind = bind
        self.user, self.password = user, password
        self.answer: str | None = None
        self.http = FakeHTTP()
        self.http.routes["/nic/update"] = self.handle
        self.http.start()

    def handle(self, r: Request) -> tuple[int, str, str]:
        expected = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if r.headers.get("Authorization") != expected:
            return 401, "text/plain", "badauth"
        if self.answer is not None:
            return 200, "text/plain", self.answer
        host, ip = r.query["hostname"][0], r.query["myip"][0]
        rtype = "AAAA" if ":" in ip else "A"
        if self.bind.lookup(host, rtype) == [ip]:
            return 200, "text/plain", f"nochg {ip}"
        self.bind.set(host, rtype, ip)
        return 200, "text/plain", f"good {ip}"


class DuckDns:
    """www.duckdns.org/update: domains, token, ip / ipv6, verbose."""

    def __init__(self, bind: Bind, token: str) -> None:
        self.bind = bind
        self.token = token
        self.http = FakeHTTP()
        self.http.routes["/update"] = self.handle
        self.http.start()

    def handle(self, r: Request) -> tuple[int, str, str]:
        q = {k: v[0] for k, v in r.query.items()}
        if q.get("token") != self.token or not q.get("domains"):
            return 200, "text/plain", "KO"
        name = f"{q['domains']}.{DUCK_ZONE}"
        changed = False
        for key, rtype in (("ip", "A"), ("ipv6", "AAAA")):
            if q.get(key) and self.bind.lookup(name, rtype) != [q[key]]:
                self.bind.set(name, rtype, q[key])
                changed = True
        if q.get("verbose") == "true":
            return (
                200,
                "text/plain",
                f"OK\n{q.get('ip', '')}\n{q.get('ipv6', '')}\n{'UPDATED' if changed else 'NOCHANGE'}",
            )
        return 200, "text/plain", "OK"
