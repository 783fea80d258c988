"""Why tunnels use OpenSSH: bytes through fabric's `Connection.forward_local` (paramiko,
1 KiB chunks) and through a paramiko direct-tcpip pump of our own with 1 MiB reads, each vs
`ssh -L`, side by side on the sandbox box. The README quotes these.
Usage: python benchmarks/paramiko_forward.py [ROUNDS] [SIZE_MB]
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
from pathlib import Path

import paramiko
from _box import BenchBox
from _streams import drain as drain_port
from _streams import start_source
from _timing import report

from remotedl.waiting import free_port, retry_until

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
size_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 128


def drain(port: int) -> float:
    return drain_port(port, size_mb)


def paramiko_forward(transport: paramiko.Transport, local: int, remote: int) -> None:
    """A local listener that pumps each connection through a direct-tcpip channel."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", local))
    lsock.listen(5)

    def pump(client: socket.socket) -> None:
        chan = transport.open_channel("direct-tcpip", ("127.0.0.1", remote), client.getpeername())
        while True:
            r, _, _ = select.select([client, chan], [], [])
            if chan in r:
                data = chan.recv(1 << 20)
                if not data:
                    break
                client.sendall(data)
            if client in r:
                data = client.recv(1 << 20)
                if not data:
                    break
                chan.sendall(data)
        chan.close()
        client.close()

    def accept() -> None:
        while True:
            c, _ = lsock.accept()
            threading.Thread(target=pump, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


box = BenchBox()
srv = start_source(size_mb)
remote = srv.server_address[1]
p_plain = None
try:
    plain_port, pm_port = free_port(), free_port()
    forward = f"{plain_port}:127.0.0.1:{remote}"
    p_plain = subprocess.Popen(["ssh", "-F", box.ssh_config, "-N", "-L", forward, box.alias])
    client = paramiko.SSHClient()
    client.load_host_keys(str(Path(box.info.directory) / "known_hosts"))
    key = str(Path(box.info.directory) / "id_ed25519")
    client.connect("127.0.0.1", port=box.info.port, username=box.info.user, key_filename=key,
                   look_for_keys=False)  # fmt: skip
    transport = client.get_transport()
    assert transport is not None
    paramiko_forward(transport, pm_port, remote)
    from remotedl.tunnel import port_free

    retry_until(lambda: not port_free(plain_port), seconds=20)
    drain(plain_port)
    drain(pm_port)
    a, b = [], []
    for _ in range(rounds):
        a.append(drain(pm_port))
        b.append(drain(plain_port))
    report(f"paramiko direct-tcpip pump (1 MiB reads) vs ssh -L, {size_mb} MB per round", a, b,
           unit="MB/s", higher_is_better=True, names=("paramiko", "ssh -L"))  # fmt: skip
    client.close()
    from fabric import Connection

    fab_port = free_port()
    conn = Connection("127.0.0.1", user=box.info.user, port=box.info.port,
                      connect_kwargs={"key_filename": str(Path(box.info.directory) / "id_ed25519"),
                                      "look_for_keys": False})  # fmt: skip
    conn.client.load_host_keys(str(Path(box.info.directory) / "known_hosts"))
    with conn.forward_local(fab_port, remote_port=remote):
        retry_until(lambda: not port_free(fab_port), seconds=20)
        a, b = [], []
        for _ in range(rounds):
            a.append(drain(fab_port))
            b.append(drain(plain_port))
    report(f"fabric forward_local vs ssh -L, {size_mb} MB per round", a, b, unit="MB/s",
           higher_is_better=True, names=("fabric", "ssh -L"))  # fmt: skip
    conn.close()
finally:
    if p_plain is not None:
        p_plain.terminate()
        p_plain.wait()
    srv.shutdown()
    box.close()
