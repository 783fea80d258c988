"""The port a multi-node run's master listens on (its rendezvous: torchrun's store, DeepSpeed's
launcher), picked on the master itself.

Standard library only: it ships inside the agent (a Slurm batch script runs ``PICK_PORT`` on the
allocation's first node) and the laptop runs it on a fleet's master box over ssh.

A port can't be held for another program: the job binds it seconds later. What can be chosen
is a port nothing on the master gets by chance meanwhile: one outside the kernel's ephemeral
range (``ip_local_port_range``), which ``bind(0)`` and every outgoing connection draw from,
so only a program that binds that very port by its number can take it first. A port inside
the range (what ``bind(0)`` answers) could go to any connection the master opens in between.
"""

from __future__ import annotations

# A Python program (no single quote in it: the Slurm batch script quotes it so) that prints a
# port free on every address of this machine now, outside the ephemeral range where one is
# free there (else the kernel's pick), from 10000 up (below: where services tend to live).
PICK_PORT = """import random, socket
try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low, high = map(int, f.read().split())
except (OSError, ValueError):
    low, high = 32768, 60999
pool = [p for p in range(10000, 65536) if not low <= p <= high]
random.shuffle(pool)
for port in pool[:200] + [0]:
    s = socket.socket()
    try:
        s.bind(("", port))
    except OSError:
        s.close()
        continue
    print(s.getsockname()[1])
    s.close()
    break
"""
