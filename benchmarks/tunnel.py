"""Bytes through `remotedl tunnel` vs plain `ssh -L`, side by side on the sandbox box (issue 5).

Target: remotedl's throughput at least 0.9x of ssh -L. A source on the box's side sends
SIZE MB per connection; each round reads it through both tunnels, alternating.
Usage: python benchmarks/tunnel.py [ROUNDS] [SIZE_MB]
"""

from __future__ import annotations

import subprocess
import sys
import time

from _box import BenchBox
from _install import installed_remotedl
from _streams import drain as drain_port
from _streams import start_source
from _timing import report

from remotedl.waiting import free_port, retry_until

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
size_mb = int(sys.argv[2]) if len(sys.argv) > 2 else 256


def drain(port: int) -> float:
    return drain_port(port, size_mb)


box = BenchBox()
srv = start_source(size_mb)
remote = srv.server_address[1]
p_plain = p_ours = None
try:
    plain_port, ours_port = free_port(), free_port()
    p_plain = subprocess.Popen(
        ["ssh", "-F", box.ssh_config, "-N", "-L", f"{plain_port}:127.0.0.1:{remote}", box.alias]
    )
    env = {**box.environ, "REMOTEDL_HOST": box.alias}
    p_ours = subprocess.Popen(
        [*installed_remotedl(), "tunnel", f"{ours_port}:{remote}"],
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
