"""Boxes reachable only through a bastion, as on a lab network: a network namespace of the
test's own holds the box (sshd on the namespace's loopback) and a jump host (on a veth
address); the laptop reaches the box only by ProxyJump. Needs root (ip netns); CI is root."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl.cli import main
from remotedl.sandbox import SandboxInfo
from remotedl.waiting import retry_until
from tests.conftest import make_env, process_gone, process_start

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip"),
    reason="needs root and iproute2 for a network namespace of the test's own",
)


@dataclass
class Lab:
    ns: str
    jump_addr: str
    box: SandboxInfo  # in the namespace, on its loopback only
    jump: SandboxInfo  # in the namespace, on the veth address
    outer: SandboxInfo  # an ordinary box on the laptop's loopback (a first hop)
    base: Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _restart_in_ns(info: SandboxInfo, ns: str, listen: str | None = None) -> None:
    """Move a sandbox's sshd into the namespace (optionally on another address)."""
    d = Path(info.directory)
    started = process_start(info.pid)
    os.kill(info.pid, signal.SIGTERM)
    assert retry_until(lambda: process_gone(info.pid, started), seconds=30)
    cfg = d / "sshd_config"
    if listen:
        cfg.write_text(cfg.read_text().replace("ListenAddress 127.0.0.1", f"ListenAddress {listen}"))
    (d / "sshd.pid").unlink(missing_ok=True)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    subprocess.run(["ip", "netns", "exec", ns, sshd, "-f", cfg, "-E", d / "sshd.log"], check=True)

    def written() -> int | None:  # sshd writes its pid file once it listens: never read half of it
        try:
            return int((d / "sshd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    pid = retry_until(written, seconds=30)
    assert pid
    info.pid = pid
    (d / "sandbox.json").write_text(json.dumps(info.to_dict()))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("lab")
    ns = "rdl" + secrets.token_hex(4)
    n = int(secrets.token_hex(1), 16)
    host_if, ns_if = f"{ns}a", f"{ns}b"
    outer_addr, jump_addr = f"10.213.{n}.1", f"10.213.{n}.2"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", f"{outer_addr}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{jump_addr}/30", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        env = make_env(base)
        box = sandbox.up(env, name="inner", gpus=1)
        jump = sandbox.up(env, name="jump", gpus=0)
        outer = sandbox.up(env, name="outer", gpus=0)
        _restart_in_ns(box, ns)
        _restart_in_ns(jump, ns, listen=jump_addr)
        yield Lab(ns, jump_addr, box, jump, outer, base)
    finally:
        for name in ("inner", "jump", "outer"):
            try:
                sandbox.down(make_env(base), name=name)
            except Exception as e:  # a finalizer never raises
                print(f"sandbox down {name}: {e}")
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _host(alias: str, info: SandboxInfo, *, hostname: str = "127.0.0.1", known: str | None = None,
          jump: str | None = None) -> str:  # fmt: skip
    d = Path(info.directory)
    lines = [
        f"Host {alias}",
        f"    HostName {hostname}",
        f"    Port {info.port}",
        f"    User {info.user}",
        f"    IdentityFile {d / 'id_ed25519'}",
        "    IdentitiesOnly yes",
        f"    UserKnownHostsFile {known or d / 'known_hosts'}",
        "    StrictHostKeyChecking yes",
    ]
    if jump:
        lines.append(f"    ProxyJump {jump}")
    return "\n".join(lines) + "\n"


def _config(
    lab: Lab, tmp_path: Path, *, box_known: Path | None = None, jump_known: Path | None = None
) -> Path:
    kh = Path(lab.jump.directory) / "known_hosts"
    # The jump's key is recorded under the address the laptop uses for it.
    jump_kh = jump_known or tmp_path / "jump_known_hosts"
    if jump_known is None:
        key = kh.read_text().split(maxsplit=1)[1]
        jump_kh.write_text(f"[{lab.jump_addr}]:{lab.jump.port} {key}")
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        _host("outer", lab.outer)
        + _host("jump", lab.jump, hostname=lab.jump_addr, known=str(jump_kh))
        + _host("deadjump", lab.outer, hostname="127.0.0.1").replace(f"Port {lab.outer.port}", "Port 1")
        + _host("gpubox", lab.box, known=str(box_known) if box_known else None, jump="jump")
        + _host("gpubox2", lab.box, jump="outer,jump")
        + _host("gpubox-dead", lab.box, jump="deadjump,jump")
    )
    return cfg


def _run(tmp_path: Path, cfg: Path, *argv: str) -> tuple[int, str, str]:
    e = make_env(tmp_path / "laptop", cwd=tmp_path)
    code = main(["--ssh-config", str(cfg), *argv], e)
    return code, e.stdout.getvalue(), e.stderr.getvalue()  # type: ignore[attr-defined]


def test_box_is_reachable_only_through_the_jump(lab, tmp_path):
    cfg = _config(lab, tmp_path)
    direct = subprocess.run(
        ["ssh", "-F", str(cfg), "-o", "ProxyJump=none", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
         "gpubox", "true"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert direct.returncode == 255
    code, out, err = _run(tmp_path, cfg, "--host", "gpubox", "status", "--json")
    assert code == 0, err
    st = json.loads(out)
    assert len(st["gpus"]) == 1  # the inner box, not the jump (no GPUs) nor the outer one


def test_chain_of_two_jumps(lab, tmp_path):
    cfg = _config(lab, tmp_path)
    code, out, err = _run(tmp_path, cfg, "--host", "gpubox2", "status", "--json")
    assert code == 0, err
    assert len(json.loads(out)["gpus"]) == 1


def test_a_dead_first_hop_fails_as_ssh_does(lab, tmp_path):
    cfg = _config(lab, tmp_path)
    plain = subprocess.run(["ssh", "-F", str(cfg), "-o", "BatchMode=yes", "gpubox-dead", "true"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
    assert plain.returncode == 255
    code, _, err = _run(tmp_path, cfg, "--host", "gpubox-dead", "status")
    assert code == 4
    assert "Traceback" not in err


def test_trust_reaches_the_box_through_the_bastion(lab, tmp_path):
    known = tmp_path / "box_known_hosts"
    known.write_text("")
    cfg = _config(lab, tmp_path, box_known=known)
    code, _, err = _run(tmp_path, cfg, "--host", "gpubox", "status")
    assert code == 4
    assert "not known" in err and "remotedl trust gpubox" in err
    box_fp = subprocess.run(["ssh-keygen", "-lf", f"{lab.box.directory}/host_key.pub"],
                            capture_output=True, text=True, check=True).stdout.split()[1]  # fmt: skip
    assert box_fp in err  # the fingerprint of the box behind the jump, not the jump's
    code, out, err = _run(tmp_path, cfg, "--host", "gpubox", "trust", "--yes")
    assert code == 0, err
    assert box_fp in out
    assert f"[127.0.0.1]:{lab.box.port} ssh-ed25519" in known.read_text()
    code, _, err = _run(tmp_path, cfg, "--host", "gpubox", "status")
    assert code == 0, err


def test_trust_names_an_untrusted_jump_host(lab, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("")
    cfg = _config(lab, tmp_path, jump_known=empty)
    code, _, err = _run(tmp_path, cfg, "--host", "gpubox", "trust", "--yes")
    assert code == 4
    assert "jump host" in err
    assert empty.read_text() == ""


def test_proxycommand_and_hostkeyalias_work_as_in_ssh(lab, tmp_path):
    """A box reached by a ProxyCommand (ssh -W through the jump) and known under a
    HostKeyAlias: trust records the key under the alias, and status then works."""
    cfg = _config(lab, tmp_path)
    known = tmp_path / "alias_known_hosts"
    known.write_text("")
    d = Path(lab.box.directory)
    cfg.write_text(
        cfg.read_text()
        + "Host viaproxy\n"
        + "    HostName 127.0.0.1\n"
        + f"    Port {lab.box.port}\n"
        + f"    User {lab.box.user}\n"
        + f"    IdentityFile {d / 'id_ed25519'}\n"
        + "    IdentitiesOnly yes\n"
        + f"    UserKnownHostsFile {known}\n"
        + "    StrictHostKeyChecking yes\n"
        + "    HostKeyAlias inner-box\n"
        + f"    ProxyCommand ssh -F {cfg} -W %h:%p jump\n"
    )
    code, _, err = _run(tmp_path, cfg, "--host", "viaproxy", "status")
    assert code == 4
    assert "not known" in err
    code, out, err = _run(tmp_path, cfg, "--host", "viaproxy", "trust", "--yes")
    assert code == 0, err
    assert known.read_text().startswith("inner-box ssh-ed25519 ")
    code, out, err = _run(tmp_path, cfg, "--host", "viaproxy", "status", "--json")
    assert code == 0, err
    assert len(json.loads(out)["gpus"]) == 1
