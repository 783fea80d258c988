"""Sending a notification: one sender per service, all standard library, sends in parallel.

smtplib, ssl, urllib.request and email are imported where a send needs them, so that importing
the package (the laptop, the agent's requests) stays cheap.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from remotedl.notify.text import Event
from remotedl.notify.urls import NotifyURLError, Target, mask_url, parse

SEND_TIMEOUT = 15.0  # seconds per endpoint; sends run in parallel
MAX_BODY = 1800  # characters of text: Discord takes 2000, ntfy 4096 bytes


class SendError(Exception):
    """A notification that could not be sent (message scrubbed of secrets)."""


@dataclass
class Outcome:
    url: str  # masked
    ok: bool
    error: str | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "error": self.error, "at": self.at}


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
