"""Bytes through `remotedl tunnel` vs plain `ssh -L`, side by side on the sandbox box (issue 5).

Target: remotedl's throughput at least 0.9x of ssh -L. A source on the box's side sends
SIZE MB per connection; each round reads it through both tunnels, alternating.
Usage: python benchmarks/tunnel.py [ROUNDS] [SIZE_MB]
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time

from _box import BenchBox
from _timing import report

from remotedl.waiting import free_port, retry_until

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
size_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 256
CHUNK = os.urandom(1 << 20)


class Source(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        for _ in range(size_mb):
            self.request.sendall(CHUNK)


def drain(port: int) -> float:
    t0 = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    assert got == size_mb << 20, got
    return got / (time.perf_counter() - t0) / 1e6


box = BenchBox()
srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Source)
srv.daemon_threads = True
threading.Thread(target=srv.serve_forever, daemon=True).start()
remote = srv.server_address[1]
p_plain = p_ours = None
try:
    plain_port, ours_port = free_port(), free_port()
    p_plain = subprocess.Popen(
        ["ssh", "-F", box.ssh_config, "-N", "-L", f"{plain_port}:127.0.0.1:{remote}", box.alias]
    )
    env = {**box.environ, "REMOTEDL_HOST": box.alias}
    p_ours = subprocess.Popen(
        [sys.executable, "-m", "remotedl", "tunnel", f"{ours_port}:{remote}"],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    from remotedl.tunnel import port_free

    retry_until(lambda: not port_free(plain_port) and not port_free(ours_port), seconds=20)
    time.sleep(0.5)
    drain(plain_port)
    drain(ours_port)
    a, b = [], []
    for _ in range(rounds):
        a.append(drain(ours_port))
        b.append(drain(plain_port))
    report(
        f"tunnel throughput, {size_mb} MB per round (remotedl tunnel vs ssh -L)",
        a,
        b,
        unit="MB/s",
        higher_is_better=True,
        limit=0.9,
    )
finally:
    for p in (p_plain, p_ours):
        if p is not None:
            p.terminate()
            p.wait()
    srv.shutdown()
    box.close()
