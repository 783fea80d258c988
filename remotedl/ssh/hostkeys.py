"""Host keys: reading known_hosts as OpenSSH does, fingerprints, and ``remotedl trust``.

Unknown keys are refused by every connection (OpenSSH with ``StrictHostKeyChecking yes``, or
``accept-new`` when the user's config says so); changed keys are refused always. ``trust``
learns a box's key by letting OpenSSH itself connect with an empty, private known_hosts file,
so it reaches the box exactly as ``ssh`` does: every ProxyJump hop (each checked against the
user's own known_hosts), ProxyCommand, Port and HostKeyAlias.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remotedl.errors import ConnectError, HostKeyError
from remotedl.ssh.openssh import config_options, openssh_failure
from remotedl.ssh.resolve import HostSpec

log = logging.getLogger("remotedl.ssh")


@dataclass(frozen=True)
class HostKey:
    key_type: str
    blob: str  # base64, as in known_hosts

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self, name: str) -> str:
        return f"{name} {self.key_type} {self.blob}\n"


def _name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("|1|"):  # hashed (HashKnownHosts yes): |1|salt|hmac-sha1(name)
        try:
            _, _, salt, digest = pattern.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
        except (ValueError, binascii.Error):
            return False
    positive = False
    for p in pattern.split(","):
        negated = p.startswith("!")
        # OpenSSH patterns know only * and ?; brackets are literal ("[host]:port").
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in p.lstrip("!"))
        if re.fullmatch(regex, name, re.IGNORECASE):
            if negated:
                return False
            positive = True
    return positive


def known_keys(spec: HostSpec, name: str | None = None) -> list[HostKey]:
    """The keys recorded for the box in its known_hosts files. A malformed line is skipped
    with a warning naming it, as OpenSSH skips it."""
    wanted = name or spec.known_hosts_name
    found: list[HostKey] = []
    for path in spec.known_hosts_files:
        try:
            text = Path(path).read_text(errors="replace")
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warning("cannot read known_hosts file %s: %s", path, e.strerror)
            continue
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if fields[0].startswith("@"):  # @cert-authority / @revoked: not plain host keys
                continue
            if len(fields) < 3:
                log.warning("skipping malformed line %d of %s", n, path)
                continue
            try:
                base64.b64decode(fields[2], validate=True)
            except (binascii.Error, ValueError):
                log.warning("skipping malformed line %d of %s (bad key data)", n, path)
                continue
            if _name_matches(wanted, fields[0]):
                found.append(HostKey(fields[1], fields[2]))
    return found


def fetch_host_key(spec: HostSpec) -> tuple[str, HostKey]:
    """(the name ssh records it under, the key the box offers), learned by OpenSSH itself.
    Where a key is already recorded, the same key type is asked for, so a changed key is
    seen as changed rather than as another type."""
    from remotedl import proc

    held = known_keys(spec)
    with tempfile.TemporaryDirectory(prefix="remotedl-trust-") as tmp:
        kh = Path(tmp) / "known_hosts"
        argv = ["ssh", *config_options(spec)]
        # Options on the command line win over the config; ProxyJump hops do not inherit them,
        # so each hop is checked against the user's own known_hosts.
        argv += [
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={kh}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "HashKnownHosts=no",
            "-o", "UpdateHostKeys=no",
            "-o", "BatchMode=yes",
            "-o", "PreferredAuthentications=none",
            "-o", "ControlPath=none",
            "-o", "ControlMaster=no",
            "-o", f"ConnectTimeout={max(1, int(spec.connect_timeout))}",
        ]  # fmt: skip
        if held:
            types = list(dict.fromkeys(k.key_type for k in held))
            argv += ["-o", "HostKeyAlgorithms=" + ",".join(types)]
        argv += ["-T", "--", spec.alias, "true"]
        result = proc.run(argv, check=False, timeout=spec.connect_timeout * 3 + 10)
        lines = [x.split() for x in kh.read_text().splitlines()] if kh.exists() else []
    lines = [x for x in lines if len(x) >= 3]
    if not lines:
        err = openssh_failure(spec, result.stderr)
        if isinstance(err, HostKeyError):
            raise err  # a jump host that is not trusted yet
        raise ConnectError(err.message, err.hint)
    name, key_type, blob = lines[0][:3]
    return name, HostKey(key_type, blob)


@dataclass(frozen=True)
class TrustResult:
    alias: str
    known_hosts_name: str
    key_type: str
    fingerprint: str
    known_hosts_file: str
    status: str  # "added", "already-known", "replaced"


def trust_state(spec: HostSpec, name: str, key: HostKey) -> str:
    """'already-known', 'unknown' or 'changed' for the offered key."""
    held = known_keys(spec, name)
    if any(k == key for k in held):
        return "already-known"
    return "changed" if held else "unknown"


def trust_host(spec: HostSpec, *, replace: bool = False, expect: str | None = None) -> TrustResult:
    """Record the box's current host key in known_hosts. A changed key needs ``replace``.
    ``expect``: the fingerprint the user was shown and agreed to; another key is refused."""
    from remotedl import proc

    name, key = fetch_host_key(spec)
    if expect is not None and key.fingerprint != expect:
        raise HostKeyError(
            f"{spec.display} now offers host key {key.key_type} {key.fingerprint}, not the {expect} "
            "you agreed to: nothing recorded",
            hint="someone may be intercepting the connection; compare the fingerprint on the box",
            fingerprint=key.fingerprint,
        )
    path = spec.known_hosts_files[0]
    state = trust_state(spec, name, key)
    if state == "already-known":
        return TrustResult(spec.alias, name, key.key_type, key.fingerprint, path, "already-known")
    if state == "changed":
        if not replace:
            raise HostKeyError(
                f"host key of {spec.display} differs from the one recorded in {path} "
                f"(now {key.key_type} {key.fingerprint})",
                hint="if the box was reinstalled, run `remotedl trust "
                f"{spec.alias} --replace`; otherwise someone may be intercepting the connection",
                fingerprint=key.fingerprint,
            )
        for kh in spec.known_hosts_files:
            if os.path.isfile(kh):
                proc.run(["ssh-keygen", "-R", name, "-f", kh], check=False)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with target.open("a") as f:
        f.write(key.line(name))
    status = "replaced" if state == "changed" else "added"
    return TrustResult(spec.alias, name, key.key_type, key.fingerprint, path, status)
