"""Public IP detection: several sources asked in parallel; the majority wins."""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import socket
import ssl
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from remotedl import __version__
from remotedl.errors import RemotedlError

USER_AGENT = f"remotedl/{__version__} (dynamic DNS)"


@dataclass
class Detection:
    family: int  # 4 or 6
    address: str | None
    answers: dict[str, str] = field(default_factory=dict)  # source -> address or "error: ..."


def http_failure(e: BaseException, url: str) -> str:
    """Why a request to ``url`` failed, in a few words: "connection refused", "cannot resolve
    host name 'x'", "timed out", never urllib3's nested repr (nor the URL: it may hold a token)."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is c for c in chain):
            continue
        chain.append(x)
        todo += [getattr(x, "reason", None), x.__cause__, x.__context__]
        todo += [a for a in x.args if isinstance(a, BaseException)]
    names = {type(x).__name__ for x in chain}
    host = urlsplit(url).hostname or url
    if any(isinstance(x, socket.gaierror) for x in chain) or "NameResolutionError" in names:
        return f"cannot resolve host name '{host}'"
    if names & {"Timeout", "ConnectTimeout", "ReadTimeout", "TimeoutError", "TimeoutExpired"}:
        return "timed out"
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"HTTP {response.status_code}"
    if "SSLError" in names:
        ssl_errors = [x for x in chain if isinstance(x, ssl.SSLError)]
        reason = getattr(ssl_errors[-1], "reason", None) if ssl_errors else None
        return f"TLS failed{': ' + str(reason).replace('_', ' ').lower() if reason else ''}"
    for x in reversed(chain):  # the innermost OS error says it best
        errno_ = getattr(x, "errno", None)
        if isinstance(x, OSError) and isinstance(errno_, int) and errno_ > 0:
            return os.strerror(errno_).lower()
    last = chain[-1]
    return (str(last).splitlines() or [type(last).__name__])[0][:100]


def _failure(e: Exception, source: str) -> str:
    if isinstance(e, ValueError) and not isinstance(e, OSError):
        return str(e)[:120]  # our own words: "not an IP address: ...", "exit 3"
    if isinstance(e, subprocess.TimeoutExpired):
        return "timed out"
    if source.startswith(("iface:", "cmd:")):
        return f"{type(e).__name__}: {e}"[:120]
    return http_failure(e, source)


def _from_source(source: str, family: int, timeout: float) -> str:
    if source.startswith("iface:"):
        out = subprocess.run(
            ["ip", "-j", f"-{family}", "addr", "show", "dev", source[6:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise ValueError(out.stderr.strip() or "no such interface")
        infos = [
            a for i in json.loads(out.stdout) for a in i.get("addr_info", []) if a.get("scope") == "global"
        ]
        if not infos:
            raise ValueError("no global address on that interface")
        return str(infos[0]["local"])
    if source.startswith("cmd:"):
        out = subprocess.run(
            shlex.split(source[4:]), capture_output=True, text=True, timeout=timeout, check=False
        )
        if out.returncode != 0:
            raise ValueError(f"exit {out.returncode}")
        return out.stdout.strip().split()[0] if out.stdout.strip() else ""
    import requests

    r = requests.get(source, timeout=timeout, headers={"User-Agent": USER_AGENT})
    r.raise_for_status()
    text = r.text.strip()
    if text.startswith("{"):
        data = json.loads(text)
        text = str(data.get("ip") or data.get("address") or "")
    return text.split()[0] if text else ""


def _validate(text: str, family: int, allow_private: bool) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text[:40]!r}") from None
    if addr.version != family:
        raise ValueError(f"{addr} is not IPv{family}")
    if not allow_private and not addr.is_global:
        raise ValueError(f"{addr} is not a public unicast address")
    if addr.is_multicast or addr.is_unspecified:
        raise ValueError(f"{addr} is not a unicast address")
    return str(addr)


def detect(
    sources: list[str], family: int, *, timeout: float = 5.0, allow_private: bool = False
) -> Detection:
    """Ask every source at once; the address named by more than half of those that answered
    wins. With no majority, nothing is decided and the error names what each source said."""
    if not sources:
        raise RemotedlError(f"no IPv{family} sources configured", hint="set ip_sources in [dns]")

    def ask(source: str) -> tuple[str, str | None, str]:
        try:
            return source, _validate(_from_source(source, family, timeout), family, allow_private), ""
        except Exception as e:
            return source, None, _failure(e, source)

    with ThreadPoolExecutor(max_workers=len(sources)) as pool:
        results = list(pool.map(ask, sources))
    det = Detection(family, None, {s: (a if a else f"error: {err}") for s, a, err in results})
    good = [a for _, a, _ in results if a]
    if not good:
        raise RemotedlError(
            f"no IPv{family} source answered: " + "; ".join(f"{s}: {v}" for s, v in det.answers.items()),
            hint="check the network, or the ip_sources in [dns]",
        )
    winner, votes = Counter(good).most_common(1)[0]
    if votes * 2 <= len(good):
        raise RemotedlError(
            f"IPv{family} sources disagree, nothing updated: "
            + "; ".join(f"{s}: {v}" for s, v in det.answers.items()),
            hint="a source may be behind another route or broken; adjust ip_sources",
        )
    det.address = winner
    return det
