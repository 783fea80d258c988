"""Notifications: Apprise's URL syntax, sent with the standard library.

Standard library only: this module ships inside the agent and runs on the box (python >= 3.10),
where jobs end while the laptop sleeps. The laptop uses it too, to check URLs before a job
starts and to mask them wherever they are shown.

Services (Apprise's URL forms, so a list moves to Apprise unchanged):

- ntfy: ``ntfy://TOPIC`` (ntfy.sh), ``ntfy://[USER:PASS@|TOKEN@]HOST[:PORT]/TOPIC``,
  ``ntfys://...`` (HTTPS), ``https://ntfy.sh/TOPIC``; ``?priority=``, ``?tags=``, ``?token=``.
- Slack incoming webhooks: ``slack://[BOTNAME@]TA/TB/TC[/#CHANNEL]`` or
  ``https://hooks.slack.com/services/TA/TB/TC``.
- Discord webhooks: ``discord://[BOTNAME@]ID/TOKEN`` or ``https://discord.com/api/webhooks/ID/TOKEN``.
- A JSON webhook: ``json://[USER:PASS@]HOST[:PORT][/PATH]`` (``jsons://`` for HTTPS),
  ``?+Header=value`` adds a header. The body is Apprise's (version, title, message, type) plus
  a ``remotedl`` object with the job's fields.
- E-mail over SMTP: ``mailto://USER:PASS@HOST[:PORT][/TO...]?to=&from=&smtp=&name=``,
  ``mailtos://`` for TLS (``?mode=ssl`` or ``starttls``, the default).

Any other scheme goes to the ``apprise`` command when the box has one on PATH (100+ more
services), with the URL in its environment, never in its arguments.

Why not ship Apprise itself: see benchmarks/NOTES-notify.md (its dependency closure, built from the
laptop's environment, does not run on every box python; size and start-up figures there).

Secrets (passwords, tokens, webhook paths, topics, header values) are never printed:
``mask_url`` is what ``config``, ``show``, errors and logs use, and every error text from a send
is scrubbed of the URL's secret parts before anyone sees it.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

# smtplib, ssl, urllib.request and email are imported where a send needs them: parsing and
# masking (the laptop, the agent's requests) stay cheap to import.

SEND_TIMEOUT = 15.0  # seconds per endpoint; sends run in parallel
MAX_BODY = 1800  # characters of text: Discord takes 2000, ntfy 4096 bytes
MASK = "****"

# Mail providers whose SMTP host differs from the address's domain (as Apprise's templates).
MAIL_PROVIDERS = {
    "gmail.com": "smtp.gmail.com",
    "googlemail.com": "smtp.gmail.com",
    "outlook.com": "smtp-mail.outlook.com",
    "hotmail.com": "smtp-mail.outlook.com",
    "live.com": "smtp-mail.outlook.com",
    "yahoo.com": "smtp.mail.yahoo.com",
    "fastmail.com": "smtp.fastmail.com",
}
SLACK_HOOKS = "https://hooks.slack.com/services"
DISCORD_HOOKS = "https://discord.com/api/webhooks"
NTFY_CLOUD = "https://ntfy.sh"
NTFY_TOPIC = re.compile(r"[-_A-Za-z0-9]{1,64}")


class NotifyURLError(ValueError):
    """A notification URL remotedl cannot use. The message never holds the URL's secrets."""


class SendError(Exception):
    """A notification that could not be sent (message scrubbed of secrets)."""


@dataclass(frozen=True)
class Target:
    """One parsed notification URL."""

    service: str  # ntfy, slack, discord, json, email, apprise
    url: str  # as the user wrote it: holds secrets
    endpoint: str = ""  # the http(s) URL posted to, or the SMTP host
    port: int | None = None
    auth: tuple[str, str] | None = None  # HTTP basic or SMTP login
    headers: tuple[tuple[str, str], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    masked: str = ""  # the URL with its secrets replaced by ****
    secrets: tuple[str, ...] = ()  # substrings never shown

    def scrub(self, text: str) -> str:
        """``text`` with every secret of this URL replaced by ****."""
        for s in sorted(self.secrets, key=len, reverse=True):
            if len(s) >= 3:
                text = text.replace(s, MASK)
                quoted = quote(s, safe="")
                if quoted != s:
                    text = text.replace(quoted, MASK)
        return text


@dataclass
class Event:
    """What a notification says: a title, text, and the job's fields for JSON consumers."""

    kind: str  # succeeded, failed, killed, lost, started, stalled, test
    title: str
    text: str
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> str:  # Apprise's notification types
        if self.kind == "succeeded":
            return "success"
        if self.kind in ("failed", "lost", "killed", "preempted"):
            return "failure"
        if self.kind == "stalled":
            return "warning"
        return "info"


@dataclass
class Outcome:
    url: str  # masked
    ok: bool
    error: str | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "error": self.error, "at": self.at}


# ------------------------------------------------------------------ parsing and masking


def _mask_piece(text: str) -> str:
    """A secret shown as its first two characters and ****, so a user can tell two apart."""
    return (text[:2] + MASK) if len(text) > 6 else MASK


def _split(url: str) -> Any:
    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise NotifyURLError(f"'{_scheme_only(url)}' is not a valid URL") from None
    return parts


def _scheme_only(url: str) -> str:
    scheme = url.split("://", 1)[0] if "://" in url else ""
    return f"{scheme}://{MASK}" if scheme.isalnum() else MASK


def _segments(path: str) -> list[str]:
    return [unquote(p) for p in path.split("/") if p]


def _query(parts: Any) -> dict[str, str]:
    # Apprise's "+Header=value": a leading "+" is the key's own, not an encoded space.
    pairs = [("%2B" + p[1:]) if p.startswith("+") else p for p in parts.query.split("&")]
    return dict(parse_qsl("&".join(pairs), keep_blank_values=True))


def _hostport(parts: Any) -> str:
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port}" if parts.port else host


def _masked_query(q: dict[str, str], keep: tuple[str, ...]) -> str:
    if not q:
        return ""
    shown = [f"{k}={v if k in keep else MASK}" for k, v in q.items()]
    return "?" + "&".join(shown)


def parse(url: str) -> Target:
    """Parse one notification URL (Apprise's syntax); raises NotifyURLError."""
    if not isinstance(url, str) or "://" not in url:
        raise NotifyURLError(
            f"'{_scheme_only(str(url))}' is not a notification URL (e.g. ntfy://TOPIC, "
            "slack://TA/TB/TC, discord://ID/TOKEN, json://HOST/PATH, mailto://USER:PASS@HOST)"
        )
    parts = _split(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme in ("http", "https"):
        if host == "hooks.slack.com":
            segs = _segments(parts.path)
            if segs[:1] == ["services"]:
                return _slack(url, None, segs[1:], _query(parts))
        if host in ("discord.com", "discordapp.com", "canary.discord.com", "ptb.discord.com"):
            segs = _segments(parts.path)
            if segs[:2] == ["api", "webhooks"]:
                return _discord(url, None, segs[2:], _query(parts))
        if host == "ntfy.sh":
            return _ntfy(url, parts, cloud=True, topics=_segments(parts.path))
        raise NotifyURLError(
            f"{scheme}://{_hostport(parts)} is not a service remotedl knows by its web address",
        )
    if scheme in ("ntfy", "ntfys"):
        return _ntfy(url, parts)
    if scheme == "slack":
        segs = ([unquote(parts.netloc.rsplit("@", 1)[-1])] if parts.netloc else []) + _segments(parts.path)
        # slack://TA/TB/TC/#channel: "#" starts the URL's fragment
        segs += [s if s.startswith(("#", "@")) else "#" + s for s in _segments(parts.fragment)]
        bot = unquote(parts.username) if "@" in parts.netloc and parts.username else None
        return _slack(url, bot, segs, _query(parts))
    if scheme == "discord":
        segs = ([unquote(parts.netloc.rsplit("@", 1)[-1])] if parts.netloc else []) + _segments(parts.path)
        bot = unquote(parts.username) if "@" in parts.netloc and parts.username else None
        return _discord(url, bot, segs, _query(parts))
    if scheme in ("json", "jsons"):
        return _json(url, parts)
    if scheme in ("mailto", "mailtos"):
        return _mail(url, parts)
    if not scheme.isalnum():
        raise NotifyURLError(f"'{_scheme_only(url)}' is not a notification URL")
    # Another of Apprise's services: the box's own `apprise` command sends it, when it has one.
    return Target("apprise", url, masked=f"{scheme}://{MASK}", secrets=_all_pieces(parts))


def _all_pieces(parts: Any) -> tuple[str, ...]:
    pieces = [parts.netloc, parts.path.strip("/"), parts.query]
    pieces += [p for p in parts.path.split("/") if p]
    pieces += [v for _, v in parse_qsl(parts.query)]
    if parts.password:
        pieces.append(parts.password)
    if parts.username:
        pieces.append(parts.username)
    return tuple(unquote(p) for p in pieces if p)


def _ntfy(url: str, parts: Any, *, cloud: bool = False, topics: list[str] | None = None) -> Target:
    q = _query(parts)
    host = _hostport(parts)
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if topics is None:
        topics = _segments(parts.path)
        if not topics:  # ntfy://TOPIC: the public ntfy.sh
            cloud = True
            topics = [unquote(parts.hostname or "")] if parts.hostname else []
            host = "ntfy.sh"
    topics += [t for t in q.get("to", "").replace(" ", ",").split(",") if t]
    if not topics or not all(NTFY_TOPIC.fullmatch(t) for t in topics):
        raise NotifyURLError(
            "an ntfy URL needs a topic (letters, digits, - and _): ntfy://TOPIC or ntfy://HOST/TOPIC"
        )
    secure = cloud or parts.scheme.lower() in ("ntfys", "https")
    endpoint = NTFY_CLOUD if cloud else f"{'https' if secure else 'http'}://{host}"
    headers: list[tuple[str, str]] = []
    auth = None
    token = q.get("token") or (user if user and not password and user.startswith("tk_") else None)
    if q.get("auth") == "token" and not token:
        token = password or user
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    elif user:
        auth = (user, password or "")
    secrets = list(topics) + [s for s in (password, token) if s]
    if token and user == token:
        shown_user = MASK + "@"
    elif user:
        shown_user = f"{user}:{MASK}@" if password else f"{user}@"
    else:
        shown_user = ""
    shown = "ntfy://" if cloud else f"{parts.scheme.lower()}://{shown_user}{host}/"
    shown += "/".join(_mask_piece(t) for t in topics)
    shown += _masked_query(q, ("priority", "tags", "mode", "auth"))
    return Target(
        "ntfy",
        url,
        endpoint,
        auth=auth,
        headers=tuple(headers),
        options={"topics": topics, "priority": q.get("priority"), "tags": q.get("tags")},
        masked=shown,
        secrets=tuple(secrets),
    )


def _slack(url: str, bot: str | None, segs: list[str], q: dict[str, str]) -> Target:
    tokens = [s for s in segs if not s.startswith(("#", "@"))][:3]
    channels = [s for s in segs if s.startswith(("#", "@"))]
    channels += [c for c in q.get("to", "").split(",") if c]
    if len(tokens) != 3 or not all(tokens):
        raise NotifyURLError(
            "a Slack URL needs the webhook's three tokens: slack://TA/TB/TC "
            "or https://hooks.slack.com/services/TA/TB/TC"
        )
    endpoint = f"{SLACK_HOOKS}/{'/'.join(quote(t, safe='') for t in tokens)}"
    shown = "slack://" + (f"{bot}@" if bot else "") + f"{tokens[0]}/{tokens[1]}/{MASK}"
    shown += "".join(f"/{c}" for c in channels)
    return Target(
        "slack",
        url,
        endpoint,
        options={"botname": bot or q.get("botname"), "channels": channels},
        masked=shown,
        secrets=(tokens[2], "/".join(tokens)),
    )


def _discord(url: str, bot: str | None, segs: list[str], q: dict[str, str]) -> Target:
    if len(segs) < 2 or not segs[0] or not segs[1]:
        raise NotifyURLError(
            "a Discord URL needs the webhook's id and token: discord://ID/TOKEN "
            "or https://discord.com/api/webhooks/ID/TOKEN"
        )
    wid, token = segs[0], segs[1]
    endpoint = f"{DISCORD_HOOKS}/{quote(wid, safe='')}/{quote(token, safe='')}"
    shown = "discord://" + (f"{bot}@" if bot else "") + f"{wid}/{MASK}"
    return Target(
        "discord",
        url,
        endpoint,
        options={"botname": bot or q.get("botname")},
        masked=shown,
        secrets=(token,),
    )


def _json(url: str, parts: Any) -> Target:
    if not parts.hostname:
        raise NotifyURLError("a JSON webhook URL needs a host: json://HOST[:PORT]/PATH")
    q = _query(parts)
    headers = tuple((k[1:], v) for k, v in q.items() if k.startswith("+") and len(k) > 1)
    params = {k: v for k, v in q.items() if not k.startswith(("+", "-", ":"))}
    path = parts.path or "/"
    http = "https" if parts.scheme.lower() == "jsons" else "http"
    endpoint = f"{http}://{_hostport(parts)}{path}"
    if params:
        endpoint += "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    auth = (user, password or "") if user else None
    segs = [s for s in parts.path.split("/") if s]
    shown = f"{parts.scheme.lower()}://"
    if user:
        shown += f"{user}:{MASK}@" if password else f"{MASK}@"
    shown += _hostport(parts) + "".join("/" + _mask_piece(unquote(s)) for s in segs)
    shown += _masked_query(q, ())
    secrets = [unquote(s) for s in segs] + [v for _, v in headers] + list(params.values())
    secrets += [s for s in (password,) if s]
    if user and not password:
        secrets.append(user)
    return Target(
        "json",
        url,
        endpoint,
        auth=auth,
        headers=headers,
        masked=shown,
        secrets=tuple(s for s in secrets if s),
    )


def _mail(url: str, parts: Any) -> Target:
    if not parts.hostname:
        raise NotifyURLError("an e-mail URL needs a host: mailto://USER:PASS@example.com?to=ME@example.com")
    q = _query(parts)
    secure = parts.scheme.lower() == "mailtos"
    mode = (q.get("mode") or ("starttls" if secure else "plain")).lower()
    if mode not in ("ssl", "starttls", "plain", "insecure"):
        raise NotifyURLError(f"mode={mode} in an e-mail URL: use ssl, starttls or plain")
    mode = "plain" if mode == "insecure" else mode
    domain = parts.hostname
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    login = unquote(q["user"]) if q.get("user") else user
    if login and "@" not in login and domain and not q.get("user"):
        address = f"{login}@{domain}"
    else:
        address = login or f"remotedl@{domain}"
    smtp = q.get("smtp") or MAIL_PROVIDERS.get(domain.lower(), domain)
    if smtp != domain and not q.get("smtp") and mode == "plain":
        mode = "starttls"  # the big providers take mail only over TLS
    to = [unquote(s) for s in parts.path.split("/") if s]
    to += [t.strip() for t in q.get("to", "").replace(";", ",").split(",") if t.strip()]
    if not to:
        to = [address]
    sender = q.get("from") or address
    port = parts.port or {"ssl": 465, "starttls": 587, "plain": 25}[mode]
    shown = f"{parts.scheme.lower()}://"
    if user:
        shown += f"{user}:{MASK}@" if password else f"{user}@"
    shown += _hostport(parts)
    shown += _masked_query(q, ("to", "from", "smtp", "mode", "name", "user"))
    return Target(
        "email",
        url,
        smtp,
        port=port,
        auth=(login, password) if login and password else None,
        options={"to": to, "from": sender, "name": q.get("name") or "remotedl", "mode": mode},
        masked=shown,
        secrets=tuple(s for s in (password,) if s),
    )


def mask_url(url: str) -> str:
    """The URL as it may be shown: scheme, host and names kept; passwords, tokens, topics and
    webhook paths replaced by ****. Never raises."""
    try:
        return parse(url).masked
    except NotifyURLError:
        return _scheme_only(str(url))


def check_urls(urls: list[str]) -> list[Target]:
    """Parse every URL; the first bad one raises (masked)."""
    return [parse(u) for u in urls]


# ------------------------------------------------------------------ sending


def _post_json(target: Target, payload: dict[str, Any], timeout: float, url: str | None = None) -> None:
    import urllib.error
    import urllib.request

    body = json.dumps(payload).encode()
    req = urllib.request.Request(url or target.endpoint, data=body, method="POST")  # noqa: S310 - http(s) built above
    req.add_header("Content-Type", "application/json")
    req.add_header("User-Agent", "remotedl")
    for k, v in target.headers:
        req.add_header(k, v)
    if target.auth:
        import base64

        token = base64.b64encode(f"{target.auth[0]}:{target.auth[1]}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        # An opener per send: it reads the proxy settings (https_proxy...) of this moment.
        with urllib.request.build_opener().open(req, timeout=timeout) as resp:
            resp.read(65536)
    except urllib.error.HTTPError as e:
        detail = ""
        try:
            detail = e.read(300).decode("utf-8", "replace").strip().splitlines()[0][:160]
        except (OSError, IndexError):
            pass
        raise SendError(f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")) from None
    except urllib.error.URLError as e:
        raise SendError(_reason(e.reason)) from None
    except (OSError, ValueError) as e:
        raise SendError(_reason(e)) from None


def _reason(e: Any) -> str:
    import socket
    import ssl

    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({e.verify_message})"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _bounded(text: str, limit: int = MAX_BODY) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _send_ntfy(t: Target, ev: Event, timeout: float) -> None:
    tags = [x for x in (t.options.get("tags") or "").split(",") if x]
    tags.append({"success": "white_check_mark", "failure": "x", "warning": "warning"}.get(ev.level, "bell"))
    for topic in t.options["topics"]:
        payload: dict[str, Any] = {
            "topic": topic,
            "title": ev.title,
            "message": _bounded(ev.text),
            "tags": tags,
        }
        prio = t.options.get("priority")
        if prio:
            levels = {"min": 1, "low": 2, "default": 3, "high": 4, "max": 5, "urgent": 5}
            payload["priority"] = int(prio) if str(prio).isdigit() else levels.get(str(prio).lower(), 3)
        _post_json(t, payload, timeout)


def _send_slack(t: Target, ev: Event, timeout: float) -> None:
    payload: dict[str, Any] = {"text": f"*{ev.title}*\n{_bounded(ev.text)}", "mrkdwn": True}
    if t.options.get("botname"):
        payload["username"] = t.options["botname"]
    for channel in t.options.get("channels") or [None]:
        if channel:
            payload["channel"] = channel
        _post_json(t, payload, timeout)


def _send_discord(t: Target, ev: Event, timeout: float) -> None:
    payload: dict[str, Any] = {
        "content": _bounded(f"**{ev.title}**\n{ev.text}", 2000),
        "allowed_mentions": {"parse": []},  # a log line saying @everyone pings nobody
    }
    if t.options.get("botname"):
        payload["username"] = t.options["botname"]
    _post_json(t, payload, timeout)


def _send_json(t: Target, ev: Event, timeout: float) -> None:
    payload = {
        "version": "1.0",
        "title": ev.title,
        "message": _bounded(ev.text),
        "attachments": [],
        "type": ev.level,
        "remotedl": {"event": ev.kind, **ev.fields},
    }
    _post_json(t, payload, timeout)


def _send_mail(t: Target, ev: Event, timeout: float) -> None:
    import smtplib
    import ssl
    from email.message import EmailMessage
    from email.utils import formatdate, make_msgid

    msg = EmailMessage()
    msg["Subject"] = ev.title
    msg["From"] = f"{t.options['name']} <{t.options['from']}>"
    msg["To"] = ", ".join(t.options["to"])
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain=t.options["from"].rsplit("@", 1)[-1] or None)
    msg.set_content(ev.text)
    mode = t.options["mode"]
    try:
        if mode == "ssl":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(
                t.endpoint, t.port or 465, timeout=timeout, context=ssl.create_default_context()
            )
        else:
            smtp = smtplib.SMTP(t.endpoint, t.port or 25, timeout=timeout)
        with smtp:
            smtp.ehlo()
            if mode == "starttls":
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if t.auth:
                smtp.login(t.auth[0], t.auth[1])
            smtp.send_message(msg)
    except smtplib.SMTPAuthenticationError as e:
        raise SendError(f"the mail server refused the login ({e.smtp_code})") from None
    except smtplib.SMTPNotSupportedError as e:
        raise SendError(f"the mail server does not support that: {e}") from None
    except smtplib.SMTPResponseException as e:
        text = (
            e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        )
        raise SendError(f"the mail server answered {e.smtp_code} {text[:160]}") from None
    except smtplib.SMTPException as e:
        raise SendError(f"SMTP: {e}") from None
    except (OSError, ValueError) as e:
        raise SendError(_reason(e)) from None


def _send_apprise(t: Target, ev: Event, timeout: float) -> None:
    import shutil
    import subprocess

    exe = shutil.which("apprise")
    if not exe:
        raise SendError(
            "this service needs the `apprise` command on the box (pipx install apprise); "
            "remotedl itself sends ntfy, Slack, Discord, JSON webhooks and e-mail"
        )
    # The URL travels in the environment (APPRISE_URLS), never in argv where ps shows it.
    env = {**os.environ, "APPRISE_URLS": t.url}
    try:
        r = subprocess.run(
            [exe, "-t", ev.title, "-n", ev.level],
            input=ev.text.encode(),
            env=env,
            capture_output=True,
            timeout=timeout + 30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SendError("apprise timed out") from None
    except OSError as e:
        raise SendError(f"apprise: {_reason(e)}") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).decode("utf-8", "replace").strip().splitlines()
        raise SendError("apprise failed" + (f": {lines[-1][:200]}" if lines else f" (exit {r.returncode})"))


SENDERS = {
    "ntfy": _send_ntfy,
    "slack": _send_slack,
    "discord": _send_discord,
    "json": _send_json,
    "email": _send_mail,
    "apprise": _send_apprise,
}


def send(url: str, event: Event, timeout: float = SEND_TIMEOUT) -> Outcome:
    """Send one notification; never raises (the outcome says what went wrong, masked)."""
    try:
        target = parse(url)
    except NotifyURLError as e:
        return Outcome(mask_url(url), False, str(e))
    try:
        SENDERS[target.service](target, event, timeout)
    except SendError as e:
        return Outcome(target.masked, False, target.scrub(str(e)))
    except Exception as e:  # a notification never breaks its caller (the job's runner)
        return Outcome(target.masked, False, target.scrub(f"{type(e).__name__}: {e}"))
    return Outcome(target.masked, True)


def send_all(urls: list[str], event: Event, timeout: float = SEND_TIMEOUT) -> list[Outcome]:
    """Send to every URL at once; one outcome per URL, in order."""
    results: list[Outcome | None] = [None] * len(urls)

    def one(i: int, url: str) -> None:
        results[i] = send(url, event, timeout)

    threads = [threading.Thread(target=one, args=(i, u), daemon=True) for i, u in enumerate(urls)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout + 45)
    return [r or Outcome(mask_url(u), False, "timed out") for r, u in zip(results, urls, strict=True)]


# ------------------------------------------------------------------ what a job's notification says

LOG_LINES = 15


def duration_words(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def log_tail(path: str, lines: int = LOG_LINES, limit: int = 1200, hide: tuple[str, ...] = ()) -> str:
    """The last lines of a log, bounded, with ``hide`` (the job's env values) replaced by ****."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "\n")
    # Strip terminal escapes (colours, progress bars) that notifications would show raw.
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07", "", text)
    kept = [x.rstrip() for x in text.splitlines() if x.strip()][-lines:]
    out = "\n".join(kept)
    for value in sorted(hide, key=len, reverse=True):
        if len(value) >= 4:
            out = out.replace(value, MASK)
    if len(out) > limit:
        out = "…" + out[-(limit - 1) :]
    return out


def job_event(rec: dict[str, Any], kind: str, host: str, *, tail: str = "", note: str | None = None) -> Event:
    """The notification for a job: name, host, GPUs, duration, exit status, last log lines."""
    name = rec.get("name") or str(rec.get("id"))
    gpus = rec.get("gpus") or []
    gpu_words = ("GPU " if len(gpus) == 1 else "GPUs ") + ",".join(map(str, gpus)) if gpus else "CPU"
    code = rec.get("exit_code")
    started, ended = rec.get("started"), rec.get("ended")
    now = time.time()
    if kind in ("succeeded", "failed", "killed", "lost", "preempted"):
        dur = (ended or now) - started if started else None
    else:
        dur = now - started if started else None
    what = {
        "succeeded": "succeeded",
        "failed": f"failed (exit {code})" if code is not None else "failed",
        "killed": "was killed",
        "lost": "was lost",
        "preempted": "was preempted (the cloud took the spot VM back)",
        "started": "started after waiting in the queue",
        "stalled": "stalled",
        "test": "test notification",
    }.get(kind, kind)
    title = f"remotedl: job {rec.get('id')} ({name}) {what} on {host}"
    lines = [
        f"job {rec.get('id')} ({name}) on {host}, {gpu_words}",
        f"command: {str(rec.get('command', ''))[:200]}",
    ]
    if kind in ("succeeded", "failed", "killed", "lost", "preempted"):
        lines.append(f"duration: {duration_words(dur)}")
        lines.append(f"exit status: {code if code is not None else '-'}")
    elif kind == "started":
        waited = (started or now) - (rec.get("created") or started or now)
        lines.append(f"waited {duration_words(waited)} in the queue")
    else:
        lines.append(f"running for {duration_words(dur)}")
    if note:
        lines.append(note)
    if rec.get("error"):
        lines.append(f"error: {str(rec['error'])[:300]}")
    if tail:
        lines += ["", "last lines of the log:", tail]
    fields = {
        "job": rec.get("id"),
        "name": name,
        "host": host,
        "gpus": gpus,
        "status": rec.get("status"),
        "exit_code": code,
        "duration": round(dur, 1) if dur is not None else None,
        "command": str(rec.get("command", ""))[:200],
        "commit": rec.get("git_commit"),
        "log_tail": tail,
    }
    if note:
        fields["note"] = note
    return Event(kind, title, "\n".join(lines), fields)
