"""Local stand-ins for notification services, all on 127.0.0.1.

- ntfy: JSON publishing at the server's root (https://docs.ntfy.sh/publish/#publish-as-json),
  with Bearer-token or basic access control when a test sets one.
- Slack incoming webhooks (POST /services/TA/TB/TC, answers ``ok``) and Discord webhooks
  (POST /api/webhooks/ID/TOKEN, answers 204): their hosts are fixed (hooks.slack.com,
  discord.com), so they are reached as a box behind a proxy reaches them: through an HTTPS
  proxy (``CONNECT``) that ends TLS with a certificate from a test CA and hands the bytes to
  the stand-in. Nothing is forwarded anywhere else: an unknown host gets 502.
- A generic JSON webhook that records what it gets.
- SMTP: aiosmtpd with a login and, for ``mailtos://``, STARTTLS with the test CA's certificate.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import select
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Hit:
    """One request a stand-in received."""

    service: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Recorder:
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)

    def of(self, service: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.service == service]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n)
        hit = Hit(self.server.service, self.command, self.path, dict(self.headers.items()), body)
        self.server.recorder.add(hit)
        self.server.respond(self, hit)

    do_PUT = do_POST


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, service: str, recorder: Recorder) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.service = service
        self.recorder = recorder
        self.auth: str | None = None  # an Authorization header value the server demands
        self.status: int | None = None  # answer every request with this status

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def respond(self, h: _Handler, hit: Hit) -> None:
        if self.status:
            h._answer(self.status, b"stand-in says no")
            return
        if self.auth and hit.headers.get("Authorization") != self.auth:
            h._answer(403, b'{"code":40301,"http":403,"error":"forbidden"}', "application/json")
            return
        getattr(self, f"_{self.service}")(h, hit)

    def _ntfy(self, h: _Handler, hit: Hit) -> None:
        try:
            msg = hit.json()
        except ValueError:
            h._answer(400, b'{"code":40024,"error":"invalid request: body must be message JSON"}')
            return
        if h.path != "/" or not isinstance(msg, dict) or not msg.get("topic"):
            h._answer(400, b'{"code":40009,"error":"invalid request: topic invalid"}')
            return
        answer = {"id": "x1", "time": int(time.time()), "event": "message", **msg}
        h._answer(200, json.dumps(answer).encode(), "application/json")

    def _slack(self, h: _Handler, hit: Hit) -> None:
        parts = [p for p in h.path.split("/") if p]
        if len(parts) != 4 or parts[0] != "services":
            h._answer(404, b"no_service")
            return
        try:
            msg = hit.json()
        except ValueError:
            h._answer(400, b"invalid_payload")
            return
        if not (msg.get("text") or msg.get("blocks") or msg.get("attachments")):
            h._answer(400, b"no_text")
            return
        h._answer(200, b"ok")

    def _discord(self, h: _Handler, hit: Hit) -> None:
        parts = [p for p in h.path.split("?")[0].split("/") if p]
        if len(parts) != 4 or parts[:2] != ["api", "webhooks"]:
            h._answer(404, b'{"message": "404: Not Found", "code": 0}', "application/json")
            return
        msg = hit.json()
        if not msg.get("content") and not msg.get("embeds"):
            h._answer(400, b'{"message": "Cannot send an empty message", "code": 50006}', "application/json")
            return
        if len(msg.get("content", "")) > 2000:
            h._answer(400, b'{"content": ["Must be 2000 or fewer in length."]}', "application/json")
            return
        h._answer(204)

    def _json(self, h: _Handler, hit: Hit) -> None:
        h._answer(200, b'{"ok": true}', "application/json")


@dataclass
class TestCA:
    """A certificate authority of the test's own; SSL_CERT_FILE=ca_file makes clients trust it."""

    directory: Path
    key: Any
    cert: Any

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context with a certificate for ``host`` signed by this CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        safe = host.replace(":", "_")
        cert_file, key_file = self.directory / f"{safe}.pem", self.directory / f"{safe}.key"
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_file, key_file)
        return ctx


def make_ca(directory: Path) -> TestCA:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remotedl test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    ca = TestCA(directory, key, cert)
    ca.ca_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return ca


class _ProxyHandler(socketserver.BaseRequestHandler):
    server: _Proxy

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(30)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _ = [*line.split(" "), "", ""][:3]
        host = target.rsplit(":", 1)[0].lower()
        self.server.requests.append(line)
        backend = self.server.routes.get(host)
        if method != "CONNECT" or backend is None:
            conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            tls = self.server.contexts[host].wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with tls, socket.create_connection(("127.0.0.1", backend), timeout=30) as up:
            _pump(tls, up)


def _pump(a: Any, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    socks = [a, b]
    while True:
        pending = a.pending() if isinstance(a, ssl.SSLSocket) else 0
        ready = socks if pending else select.select(socks, [], [], 30)[0]
        if not ready:
            return
        for s in ready:
            try:
                data = s.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                return
            if not data:
                return
            (b if s is a else a).sendall(data)


class _Proxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ca: TestCA) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.routes: dict[str, int] = {}
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.requests: list[str] = []
        self.ca = ca

    def route(self, host: str, port: int) -> None:
        self.contexts[host] = self.ca.server_context(host)
        self.routes[host] = port


@dataclass
class Services:
    """Every stand-in, and the environment a sender needs to reach them (proxy, CA)."""

    recorder: Recorder
    ntfy: _Server
    slack: _Server
    discord: _Server
    webhook: _Server
    proxy: _Proxy
    ca: TestCA
    smtp: Any = None
    smtp_port: int = 0
    mails: list[dict[str, Any]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach Slack and Discord here: the proxy, the CA."""
        proxy = f"http://127.0.0.1:{self.proxy.server_address[1]}"
        return {"https_proxy": proxy, "HTTPS_PROXY": proxy, "SSL_CERT_FILE": str(self.ca.ca_file)}

    def urls(self) -> dict[str, str]:
        return {
            "ntfy": f"ntfy://127.0.0.1:{self.ntfy.port}/rdl-topic-secret",
            "slack": "https://hooks.slack.com/services/T0TEST/B0TEST/slacksecrettoken123",
            "discord": "discord://1234567/discordsecrettoken456",
            "json": f"json://hookuser:hookpass789@127.0.0.1:{self.webhook.port}/hook/abc123secret",
            "email": (
                f"mailto://mailuser:mailpass321@127.0.0.1:{self.smtp_port}"
                "?to=me@example.invalid&from=box@example.invalid"
            ),
        }

    def stop(self) -> None:
        for s in (self.ntfy, self.slack, self.discord, self.webhook, self.proxy):
            s.shutdown()
            s.server_close()
        if self.smtp is not None:
            self.smtp.stop()


MAIL_LOGIN = ("mailuser", "mailpass321")
# The secret parts of Services.urls(): none may be printed, logged or put in an argv.
URL_SECRETS = (
    "rdl-topic-secret",
    "slacksecrettoken123",
    "discordsecrettoken456",
    "hookpass789",
    "abc123secret",
    "mailpass321",
)


def start_services(directory: Path, *, smtp_tls: bool = False) -> Services:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    rec = Recorder()
    servers = {name: _Server(name, rec) for name in ("ntfy", "slack", "discord", "json")}
    for s in servers.values():
        threading.Thread(target=s.serve_forever, daemon=True).start()
    ca = make_ca(directory)
    proxy = _Proxy(ca)
    proxy.route("hooks.slack.com", servers["slack"].port)
    proxy.route("discord.com", servers["discord"].port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    services = Services(
        rec, servers["ntfy"], servers["slack"], servers["discord"], servers["json"], proxy, ca
    )

    class Mailbox:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            services.mails.append(
                {
                    "from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "data": envelope.content.decode("utf-8", "replace"),
                    "login": session.auth_data.login.decode() if session.auth_data else None,
                    "tls": session.ssl is not None,
                }
            )
            rec.add(Hit("email", "DATA", "", {}, envelope.content))
            return "250 OK"

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == MAIL_LOGIN
        return AuthResult(success=ok, handled=False, auth_data=data if ok else None)

    tls_context = ca.server_context("127.0.0.1") if smtp_tls else None
    port = _free_port()
    controller = Controller(
        Mailbox(),
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticate,
        auth_require_tls=smtp_tls,
        require_starttls=smtp_tls,
        tls_context=tls_context,
    )
    controller.start()
    services.smtp, services.smtp_port = controller, port
    return services


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
