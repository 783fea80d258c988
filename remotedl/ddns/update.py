"""``remotedl dns update / check / watch``: detect, compare, change only what differs."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.ddns import detect as det
from remotedl.ddns import providers
from remotedl.ddns.settings import DnsSettings
from remotedl.errors import RemotedlError


@dataclass
class FamilyReport:
    family: int
    record: str
    detected: str | None
    served: list[str]
    action: str  # "unchanged", "updated", "would-update", "skipped"
    served_after: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class DnsReport:
    name: str
    provider: str
    families: list[FamilyReport] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return all(
            f.detected is not None and (f.served_after or f.served) == [f.detected] for f in self.families
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "in_sync": self.in_sync}


class State:
    """Backoff and the last result. Never the source of truth about what DNS serves."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def state_path(state_dir: Path, s: DnsSettings) -> Path:
    return state_dir / "dns" / f"{s.name}.json"


def _families(s: DnsSettings) -> list[int]:
    return [f for f, on in ((4, s.ipv4), (6, s.ipv6)) if on]


def detect_all(s: DnsSettings) -> dict[int, det.Detection]:
    out = {}
    for fam in _families(s):
        sources = s.ip_sources if fam == 4 else s.ip_sources_v6
        out[fam] = det.detect(sources, fam, timeout=s.timeout, allow_private=s.allow_private)
    return out


def check(s: DnsSettings, env: Mapping[str, str]) -> DnsReport:
    provider = providers.make(s, env)
    report = DnsReport(s.name, s.provider)
    for fam, d in detect_all(s).items():
        served = provider.served(fam)
        action = "unchanged" if served == [d.address] else "would-update"
        report.families.append(FamilyReport(fam, providers.RDTYPE[fam], d.address, served, action))
    return report


def update(
    s: DnsSettings, env: Mapping[str, str], state_dir: Path, *, dry_run: bool = False, force: bool = False
) -> DnsReport:
    state = State(state_path(state_dir, s))
    fatal = state.data.get("fatal")
    if fatal and fatal.get("config") == s.fingerprint() and not force:
        raise RemotedlError(
            f"not sending: the last answer from {s.provider} was '{fatal['code']}' ({fatal['message']})",
            hint="fix the [dns] configuration (any change re-enables updates), or pass --force",
        )
    until = float(state.data.get("backoff_until") or 0)
    if until > time.time() and not force and not dry_run:
        raise RemotedlError(
            f"backing off until {time.strftime('%H:%M:%S', time.localtime(until))} after "
            f"'{state.data.get('backoff_reason')}' from {s.provider}",
            hint="wait, or pass --force",
        )
    provider = providers.make(s, env)
    report = DnsReport(s.name, s.provider)
    try:
        for fam, d in detect_all(s).items():
            assert d.address is not None
            served = provider.served(fam)
            rec = providers.RDTYPE[fam]
            if served == [d.address] and not force:
                report.families.append(FamilyReport(fam, rec, d.address, served, "unchanged"))
                continue
            if dry_run:
                report.families.append(FamilyReport(fam, rec, d.address, served, "would-update"))
                continue
            provider.update(fam, d.address)
            after = provider.served(fam)
            report.families.append(FamilyReport(fam, rec, d.address, served, "updated", after))
    except providers.ProviderError as e:
        if e.fatal:
            state.data["fatal"] = {
                "code": e.fatal,
                "message": e.message,
                "config": s.fingerprint(),
                "at": time.time(),
            }
        if e.retry_after:
            state.data["backoff_until"] = time.time() + e.retry_after
            state.data["backoff_reason"] = e.message.split(":")[0]
        state.save()
        raise
    if not dry_run:
        state.data.pop("fatal", None)
        state.data.pop("backoff_until", None)
        state.data["last"] = {"at": time.time(), **report.to_dict()}
        state.save()
    return report


def parse_interval(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except (ValueError, IndexError):
        raise RemotedlError(f"interval '{text}': use e.g. 30s, 5m or 1h") from None


def watch(
    s: DnsSettings,
    env: Mapping[str, str],
    state_dir: Path,
    *,
    interval: float,
    report: Callable[[DnsReport | None, RemotedlError | None], None],
    runs: int | None = None,
) -> None:
    """Update in a loop, with ±10% jitter so many boxes do not ask sources in lockstep."""
    done = 0
    while runs is None or done < runs:
        try:
            report(update(s, env, state_dir), None)
        except providers.ProviderError as e:
            report(None, e)
            if e.fatal:
                raise
        except RemotedlError as e:
            report(None, e)
        done += 1
        if runs is not None and done >= runs:
            break
        time.sleep(interval * random.uniform(0.9, 1.1))
