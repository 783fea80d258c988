"""Multi-node runs against real boxes: two sandbox sshd boxes on loopback, a rendezvous program
that proves the variables (rank 0 listens on MASTER_ADDR:MASTER_PORT, the others connect and
exchange their ranks), a failing rank that ends the run, kill of every node, and a GPU claim
that fails on one node releasing the other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from remotedl import jobs, multinode
from remotedl.errors import ExitCode, GpusBusy
from remotedl.fleet import Fleet
from tests.conftest import LaptopBoxes, laptop_boxes, make_env, retry_until
from tests.multinode_programs import FAILING, RENDEZVOUS

NAMES = ("n1", "n2")
# n1 is the master: its peers reach it at 127.0.0.2 (node_addr), not at ssh's 127.0.0.1
MASTER_ADDR = "127.0.0.2"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaptopBoxes]:
    base = tmp_path_factory.mktemp("nodes")
    config = base / "config" / "remotedl" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[hosts.n1]\nnode_addr = "{MASTER_ADDR}"\n')
    with laptop_boxes(base, dict.fromkeys(NAMES, 2)) as boxes:
        yield boxes


@pytest.fixture
def proj(project: Path, tmp_path: Path) -> Path:
    (project / "remotedl.toml").write_text(f'remote_dir = "~/nodes-tests/{tmp_path.name}"\n')
    (project / "rendezvous.py").write_text(RENDEZVOUS)
    (project / "failing.py").write_text(FAILING)
    (project / "hold.py").write_text("import time\ntime.sleep(300)\n")
    subprocess.run(["git", "-C", str(project), "add", "."], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-q", "-m", "nodes"], check=True)
    return project


def _envs(out: str) -> dict[str, dict[str, str]]:
    found = {}
    for line in out.splitlines():
        if "] env " in line:
            node = line.split("]", 1)[0].lstrip("[")
            found[node] = json.loads(line.split("] env ", 1)[1])
    return found


def test_a_two_node_run_meets_at_the_master(nodes, proj):
    argv = ["--nodes", "2", "--gpus", "1", "--host", nodes.names, "--", "python3", "rendezvous.py"]
    r = nodes.run("run", *argv, cwd=proj)
    assert r.code == 0, r.out + r.err
    # each node's lines come with its node; both met through the master's port
    assert "[node 0 n1] rank 0 met ranks [0, 1]" in r.out
    assert "[node 1 n2] rank 1 met ranks [0, 1]" in r.out
    envs = _envs(r.out)
    e0, e1 = envs["node 0 n1"], envs["node 1 n2"]
    assert e0["MASTER_ADDR"] == e1["MASTER_ADDR"] == e0["REMOTEDL_MASTER_ADDR"] == MASTER_ADDR
    assert e0["MASTER_PORT"] == e1["MASTER_PORT"] and e0["MASTER_PORT"].isdigit()
    # outside the master's ephemeral range: no connection it opens meanwhile can take the port
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not low <= int(e0["MASTER_PORT"]) <= high, e0["MASTER_PORT"]
    assert (e0["NODE_RANK"], e1["NODE_RANK"], e0["NNODES"], e0["WORLD_SIZE"]) == ("0", "1", "2", "2")
    assert e0["REMOTEDL_NODE_ADDRS"] == f"{MASTER_ADDR},127.0.0.1"
    assert e0["REMOTEDL_RUN_ID"] == e1["REMOTEDL_RUN_ID"]
    assert f"hostfile {MASTER_ADDR} slots=1;127.0.0.1 slots=1;" in r.out
    run_id = e0["REMOTEDL_RUN_ID"]
    assert f"master n1 at {MASTER_ADDR}:{e0['MASTER_PORT']}" in r.err
    assert f"run {run_id} succeeded" in r.err
    # the same commit ran on both, in each one's own checkout
    recs = {}
    for name in NAMES:
        got = nodes.run("jobs", "--json", "--host", name, cwd=proj)
        recs[name] = [j for j in json.loads(got.out) if run_id in j["name"]]
    assert len(recs["n1"]) == len(recs["n2"]) == 1
    assert recs["n1"][0]["git_commit"] == recs["n2"][0]["git_commit"]
    assert recs["n1"][0]["gpus"] == recs["n2"][0]["gpus"] == [0]
    # `jobs` on the fleet: the run is one row, with each node's job id
    table = nodes.run("jobs", "--host", nodes.names, cwd=proj)
    rows = [line for line in table.out.splitlines() if run_id in line]
    assert len(rows) == 1, table.out
    j1, j2 = recs["n1"][0]["id"], recs["n2"][0]["id"]
    assert rows[0].split()[:2] == ["n1,n2", run_id] and f"(2 nodes: n1:{j1}, n2:{j2})" in rows[0]
    assert "succeeded" in rows[0]
    listed = json.loads(nodes.run("jobs", "--json", "--host", nodes.names, cwd=proj).out)
    (run,) = [x for x in listed["runs"] if x["run"] == run_id]
    assert (run["state"], run["exit_code"]) == ("succeeded", 0)
    assert [n["ref"] for n in run["nodes"]] == [f"n1:{j1}", f"n2:{j2}"]
    # the run is kept here: its logs again, merged
    again = nodes.run("logs", run_id, cwd=proj)
    assert again.code == 0, again.err
    assert "[node 1 n2] rank 1 met ranks [0, 1]" in again.out
    lines = [json.loads(x) for x in nodes.run("logs", "--json", run_id, cwd=proj).out.splitlines()]
    assert {"node": 1, "host": "n2", "text": "rank 1 met ranks [0, 1]\n"} in lines
    one = nodes.run("logs", run_id, "--node", "1", cwd=proj)
    assert one.code == 0, one.err
    assert "rank 1 met ranks [0, 1]" in one.out and "rank 0" not in one.out and "[node" not in one.out
    bad = nodes.run("logs", run_id, "--node", "2", cwd=proj)
    assert bad.code == ExitCode.USAGE and "has nodes 0 to 1" in bad.err


def test_a_failing_rank_ends_the_other_node(nodes, proj):
    argv = ["--nodes", "2", "--fail-grace", "1", "--host", nodes.names, "--", "python3", "failing.py"]
    r = nodes.run("run", *argv, cwd=proj)
    assert r.code == 3, r.out + r.err
    assert "[node 0 n1] rank 0 up" in r.out
    assert "node 1 (n2:" in r.err and "ended (exit 3): ending node 0" in r.err
    assert "failed (node 1 exit 3)" in r.err
    run = multinode.load_run(make_env(nodes.base).state_dir, None)
    assert run is not None
    assert [(n.host, n.status) for n in run.nodes] == [("n1", "killed"), ("n2", "failed")]
    shown = nodes.run("show", run.run_id, cwd=proj)
    assert shown.code == 0, shown.err
    assert f"run {run.run_id} (python3): failed (node 1 exit 3)" in shown.out
    assert f"node 0      n1:{run.nodes[0].job_id}: killed" in shown.out


def test_kill_ends_every_node(nodes, proj):
    r = nodes.run(
        "run", "--nodes", "2", "--detach", "--host", nodes.names, "--", "python3", "hold.py", cwd=proj
    )
    assert r.code == 0, r.err
    run_id = r.out.strip()
    assert run_id.startswith("run-") and "start skew" in r.err
    k = nodes.run("kill", "--grace", "1", run_id, cwd=proj)
    assert k.code == 0, k.err
    for name in NAMES:
        assert f"{name}:" in k.out and "killed" in k.out
    run = multinode.load_run(make_env(nodes.base).state_dir, run_id)
    assert run is not None
    for job in run.nodes:
        got = nodes.run("show", "--json", str(job.job_id), "--host", job.host, cwd=proj)
        assert json.loads(got.out).get("status") == "killed", got.out + got.err


def test_a_claim_that_fails_on_one_node_releases_the_others(nodes, proj):
    env = make_env(nodes.base, cwd=proj)
    from remotedl.config import load_settings

    fleet = Fleet(env, load_settings(env, {"host": nodes.names}), list(NAMES))
    rdir = f"~/nodes-tests/{proj.parent.name}"
    for name in NAMES:
        nodes.gpu_state(name)
    assert nodes.run("push", "--host", nodes.names, cwd=proj).code == 0
    # both of n2's GPUs are held by another job
    held = nodes.run("run", "--detach", "--json", "--gpus", "2", "--host", "n2", "hold.py", cwd=proj)
    assert held.code == 0, held.err
    holder = json.loads(held.out)["id"]
    try:
        plan = [multinode.Node(0, "n1", "127.0.0.1"), multinode.Node(1, "n2", "127.0.0.1")]

        def start_one(node: multinode.Node) -> jobs.JobRecord:
            return jobs.start(fleet.member(node.host).client(), command="python3 hold.py", remote_dir=rdir,
                              gpus="auto", count=2)  # fmt: skip

        def stop_one(job: multinode.NodeJob) -> None:
            jobs.kill(fleet.member(job.host).client(), str(job.job_id), grace=1)

        with pytest.raises(GpusBusy) as e:
            multinode.start_all(plan, start_one, stop_one)
        assert "node 1 (n2)" in e.value.message
        # n1's job was started and ended again: its GPUs are free for the next run
        n1 = [r for r in jobs.list_jobs(fleet.member("n1").client()) if r.command == "python3 hold.py"]
        assert n1 and all(r.status == "killed" for r in n1)
        assert retry_until(
            lambda: not any(r.active for r in jobs.list_jobs(fleet.member("n1").client())), seconds=30
        )
    finally:
        nodes.run("kill", "--grace", "1", str(holder), "--host", "n2", cwd=proj)


def test_a_run_sends_one_notification_not_one_per_node(nodes, proj):
    # Every node's job notified on its end: a two-node run sent two "succeeded" messages.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    hits: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"json://127.0.0.1:{server.server_address[1]}/hook"
        argv = [
            "--nodes",
            "2",
            "--gpus",
            "1",
            "--host",
            nodes.names,
            "--notify",
            url,
            "--",
            "python3",
            "rendezvous.py",
        ]
        r = nodes.run("run", *argv, cwd=proj)
        assert r.code == 0, r.out + r.err
        run = multinode.load_run(make_env(nodes.base).state_dir, None)
        assert run is not None

        def record(job: multinode.NodeJob) -> dict:
            got = nodes.run("show", "--json", str(job.job_id), "--host", job.host, cwd=proj)
            return json.loads(got.out)

        master, other = run.nodes

        # the master's job notifies for the run (its end sent, as its record says); the others
        # carry no URL, so nothing else can go out
        def sent() -> list[str]:
            return [n["event"] for n in record(master)["notifications"]]

        assert retry_until(lambda: "succeeded" in sent(), seconds=60), sent()
        assert record(other)["notify"] == [] and record(other)["notifications"] == []
        assert len(hits) == 1, hits
        assert f"{run.run_id} node 0" in hits[0]["title"] and "succeeded" in hits[0]["title"]
    finally:
        server.shutdown()
        server.server_close()


def test_nodes_needs_enough_hosts_and_no_gpu_indices(nodes, proj):
    r = nodes.run("run", "--nodes", "3", "--host", nodes.names, "rendezvous.py", cwd=proj)
    assert r.code == ExitCode.USAGE and "--nodes 3 needs 3 hosts; given: n1, n2" in r.err
    r = nodes.run("run", "--nodes", "2", "--gpu", "0", "--host", nodes.names, "rendezvous.py", cwd=proj)
    assert r.code == ExitCode.USAGE and "--gpus N" in r.err
    r = nodes.run("run", "--nodes", "2", "--gpus", "3", "--host", nodes.names, "rendezvous.py", cwd=proj)
    assert r.code == ExitCode.USAGE and "more than any box of the fleet has" in r.err
    r = nodes.run("run", "--nodes", "2", "--image", "x:1", "--host", nodes.names, "rendezvous.py", cwd=proj)
    assert r.code == ExitCode.USAGE and "container image (x:1, on n1) is not supported yet" in r.err
    # an image in the settings of a host other than the first counts too (its node ran in it)
    settings = proj / "remotedl.toml"
    settings.write_text(settings.read_text() + '\n[hosts.n2]\nimage = "y:2"\n')
    r = nodes.run("run", "--nodes", "2", "--host", nodes.names, "rendezvous.py", cwd=proj)
    assert r.code == ExitCode.USAGE and "(y:2, on n2) is not supported yet" in r.err, r.err


def test_plan_env_and_hostfile():
    plan = multinode.NodePlan(
        "run-x",
        [multinode.Node(0, "a", "10.0.0.5"), multinode.Node(1, "b", "10.0.0.6")],
        29500,
        gpus_per_node=4,
    )
    e = plan.env(1, "/h/hostfile")
    assert e["MASTER_ADDR"] == "10.0.0.5" and e["MASTER_PORT"] == "29500"
    assert (e["NODE_RANK"], e["NNODES"], e["WORLD_SIZE"], e["REMOTEDL_GPUS_PER_NODE"]) == ("1", "2", "8", "4")
    assert e["REMOTEDL_HOSTFILE"] == "/h/hostfile"
    # what torchrun reads for --nnodes, --node-rank, --master-addr, --master-port, --nproc-per-node
    assert (e["PET_NNODES"], e["PET_NODE_RANK"], e["PET_NPROC_PER_NODE"]) == ("2", "1", "4")
    assert (e["PET_MASTER_ADDR"], e["PET_MASTER_PORT"]) == ("10.0.0.5", "29500")
    assert plan.hostfile() == "10.0.0.5 slots=4\n10.0.0.6 slots=4\n"
    assert os.environ.get("MASTER_ADDR") != "10.0.0.5"  # nothing set here, only in the plan


def test_doctor_nodes_checks_each_node_reaches_the_master(nodes, proj, tmp_path):
    r = nodes.run("doctor", "--nodes", "--host", nodes.names, cwd=proj)
    assert r.code == 0, r.out + r.err
    assert f"OK    nodes  n2 -> n1: reaches n1 at {MASTER_ADDR}:" in r.out
    # an address the master does not have (the laptop's name for a box behind NAT, say): said,
    # and no peer tries it (nothing leaves this machine)
    config = nodes.base / "config" / "remotedl" / "config.toml"
    kept = config.read_text()
    config.write_text('[hosts.n1]\nnode_addr = "10.255.255.1"\n')
    try:
        r = nodes.run("doctor", "--nodes", "--json", "--host", nodes.names, cwd=proj)
    finally:
        config.write_text(kept)
    assert r.code == 1, r.out + r.err
    found = json.loads(r.out)
    assert found["ok"] is False
    (only,) = found["nodes"]
    assert only["host"] == "n2" and only["port"] is None
    assert "n1 cannot listen on 10.255.255.1" in only["detail"]


# ------------------------------------------------------------------ boxes in network namespaces


@dataclass
class Fabric:
    """A bridge on this machine and one network namespace per box, joined to it by a veth pair:
    each box's sshd (and so its jobs) lives in its namespace with an address of its own that
    only these namespaces and this machine share."""

    bridge: str
    prefix: str  # "10.231.N."
    spaces: list[str]

    def address(self, i: int) -> str:
        return f"{self.prefix}{i + 2}"

    def ip(self, *argv: str) -> None:
        subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture(scope="module")
def fabric() -> Iterator[Fabric]:
    if os.getuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = os.getpid() % 100000
    f = Fabric(f"rdl{tag}br", f"10.231.{tag % 250}.", [])
    f.ip("link", "add", f.bridge, "type", "bridge")
    try:
        f.ip("addr", "add", f"{f.prefix}1/24", "dev", f.bridge)
        f.ip("link", "set", f.bridge, "up")
        for i in range(len(NAMES)):
            ns, outer, inner = f"rdl{tag}n{i}", f"rdl{tag}v{i}", f"rdl{tag}w{i}"
            f.ip("netns", "add", ns)
            f.spaces.append(ns)
            f.ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            f.ip("link", "set", inner, "netns", ns)
            f.ip("link", "set", outer, "master", f.bridge)
            f.ip("link", "set", outer, "up")
            # one name in every namespace, as a cluster's NIC (GLOO_SOCKET_IFNAME=rdlnet)
            f.ip("-n", ns, "link", "set", inner, "name", "rdlnet")
            f.ip("-n", ns, "addr", "add", f"{f.address(i)}/24", "dev", "rdlnet")
            f.ip("-n", ns, "link", "set", "rdlnet", "up")
            f.ip("-n", ns, "link", "set", "lo", "up")
        yield f
    finally:
        for ns in f.spaces:
            subprocess.run(["ip", "netns", "del", ns], check=False)  # its veth end goes with it
        subprocess.run(["ip", "link", "del", f.bridge], check=False)


@pytest.fixture(scope="module")
def ns_nodes(fabric: Fabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaptopBoxes]:
    options = {n: {"address": fabric.address(i), "netns": fabric.spaces[i]} for i, n in enumerate(NAMES)}
    with laptop_boxes(tmp_path_factory.mktemp("nsnodes"), dict.fromkeys(NAMES, 2), options) as boxes:
        yield boxes


def test_a_run_across_network_namespaces_meets_at_the_masters_own_address(ns_nodes, fabric, proj):
    # no node_addr: the master is the address ssh reaches n1 at, which n2 reaches too
    argv = ["--nodes", "2", "--host", ns_nodes.names, "--", "python3", "rendezvous.py"]
    r = ns_nodes.run("run", *argv, cwd=proj)
    assert r.code == 0, r.out + r.err
    assert "[node 0 n1] rank 0 met ranks [0, 1]" in r.out
    assert "[node 1 n2] rank 1 met ranks [0, 1]" in r.out
    envs = _envs(r.out)
    master = fabric.address(0)
    assert envs["node 0 n1"]["MASTER_ADDR"] == envs["node 1 n2"]["MASTER_ADDR"] == master
    assert envs["node 1 n2"]["REMOTEDL_NODE_ADDRS"] == f"{master},{fabric.address(1)}"
    # rank 0 bound MASTER_ADDR, an address only n1's namespace has: the job ran there
    assert ns_nodes.boxes["n2"].info.hostname == fabric.address(1)


def test_a_wrong_master_address_fails_across_namespaces(ns_nodes, fabric, proj):
    # node_addr names n2's address for n1: n1 cannot listen there, and doctor says so
    config = ns_nodes.base / "config" / "remotedl" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[hosts.n1]\nnode_addr = "{fabric.address(1)}"\n')
    try:
        r = ns_nodes.run("doctor", "--nodes", "--host", ns_nodes.names, cwd=proj)
        assert r.code == 1, r.out + r.err
        assert f"n1 cannot listen on {fabric.address(1)}" in r.out
    finally:
        config.unlink()
    r = ns_nodes.run("doctor", "--nodes", "--host", ns_nodes.names, cwd=proj)
    assert r.code == 0, r.out + r.err
    assert f"OK    nodes  n2 -> n1: reaches n1 at {fabric.address(0)}:" in r.out


def test_a_failing_rank_across_namespaces_ends_the_other_node(ns_nodes, proj):
    argv = ["--nodes", "2", "--fail-grace", "1", "--host", ns_nodes.names, "--", "python3", "failing.py"]
    r = ns_nodes.run("run", *argv, cwd=proj)
    assert r.code == 3, r.out + r.err
    assert "failed (node 1 exit 3)" in r.err


def test_the_first_host_named_is_the_master_whatever_its_load():
    from tests.test_fleet import sample

    # n2's GPU is the less used one, yet `--host n1,n2` makes n1 node 0
    picked = multinode.choose([sample("n1", [9000]), sample("n2", [10])], 2, count=1, cpu=False)
    assert [c.host for c in picked] == ["n1", "n2"]
    # three boxes, two nodes: the two with free GPUs, in the order given
    three = [sample("a", [10]), sample("b", [10], held={0: "1"}), sample("c", [5])]
    assert [c.host for c in multinode.choose(three, 2, count=1, cpu=False)] == ["a", "c"]
    with pytest.raises(GpusBusy):
        multinode.choose(three, 3, count=1, cpu=False)


DDP = """
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
t = torch.tensor([r + 1.0])
dist.all_reduce(t)
print(f"rank {r} of {w} on node {os.environ['NODE_RANK']}: all_reduce sum {t.item()}", flush=True)
dist.destroy_process_group()
"""


def test_real_torchrun_with_gloo_across_namespaces(ns_nodes, proj):
    """torch's own rendezvous and gloo on CPU, 2 processes on each of 2 boxes, torchrun given no
    rendezvous flags (it reads PET_*). torch is big: REMOTEDL_TEST_TORCH_BIN names a bin
    directory with torchrun (e.g. a venv with `pip install torch`), else torchrun on PATH."""
    where = os.environ.get("REMOTEDL_TEST_TORCH_BIN")
    torchrun = shutil.which("torchrun", path=where) if where else shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torch is not installed here (REMOTEDL_TEST_TORCH_BIN: a bin directory with torchrun)")
    (proj / "ddp.py").write_text(DDP)
    subprocess.run(["git", "-C", str(proj), "add", "ddp.py"], check=True)
    subprocess.run(["git", "-C", str(proj), "commit", "-q", "-m", "ddp"], check=True)
    argv = ["--nodes", "2", "--cpu", "--env", "GLOO_SOCKET_IFNAME=rdlnet", "--host", ns_nodes.names]
    r = ns_nodes.run("run", *argv, "--", torchrun, "--nproc-per-node", "2", "ddp.py", cwd=proj)
    assert r.code == 0, r.out[-3000:] + r.err
    for rank, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert f"rank {rank} of 4 on node {node}: all_reduce sum 10.0" in r.out
