"""Notification URLs: Apprise's syntax parsed into a ``Target``, and masked wherever shown.

Standard library only (ships inside the agent). Parsing and masking stay cheap to import: the
laptop checks URLs before a job starts and masks them in ``config``, ``show``, errors and logs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

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
