"""The programs a multi-node test runs on every node (on fleet boxes and on Slurm nodes).

RENDEZVOUS proves the variables: rank 0 listens on MASTER_ADDR:MASTER_PORT (only that address:
a wrong MASTER_ADDR fails), the others connect and they exchange their ranks; every node prints
the variables it got as one JSON line. FAILING: rank 1 exits 3, the others wait as a rank on a
collective that never comes would."""

RENDEZVOUS = r"""
import json, os, socket, sys, time

rank, n = int(os.environ["NODE_RANK"]), int(os.environ["NNODES"])
addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
assert os.environ["REMOTEDL_NODE_RANK"] == str(rank) and os.environ["REMOTEDL_NUM_NODES"] == str(n)
names = ("REMOTEDL_", "MASTER_", "NODE_RANK", "NNODES", "WORLD_SIZE", "PET_", "SLURMD_NODENAME")
print("env", json.dumps({k: v for k, v in os.environ.items() if k.startswith(names)}), flush=True)
print("hostfile", open(os.environ["REMOTEDL_HOSTFILE"]).read().replace("\n", ";"), flush=True)
if rank == 0:
    s = socket.socket()
    s.bind((addr, port))  # the master's address and port, as torchrun's store binds them
    s.listen()
    s.settimeout(60)
    peers = []
    for _ in range(n - 1):
        c, _ = s.accept()
        peers.append((int(c.recv(16).decode()), c))
    ranks = sorted([0] + [r for r, _ in peers])
    for _, c in peers:
        c.sendall(",".join(map(str, ranks)).encode())
        c.close()
else:
    deadline = time.time() + 60
    while True:
        try:
            c = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    c.sendall(str(rank).encode())
    ranks = [int(x) for x in c.recv(64).decode().split(",")]
print(f"rank {rank} met ranks {ranks}", flush=True)
"""

FAILING = r"""
import os, sys, time
rank = int(os.environ["NODE_RANK"])
print(f"rank {rank} up", flush=True)
if rank == 1:
    time.sleep(0.5)
    sys.exit(3)
time.sleep(300)  # a rank waiting on a collective that never comes
"""
