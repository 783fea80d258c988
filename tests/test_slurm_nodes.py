"""`run --nodes N` on a Slurm host: one batch job on N nodes of a real two-node test cluster
(two slurmd, nodes rdln1 at 127.0.0.1 and rdln2 at 127.0.0.2; tests/slurmcluster.py), its
batch script starting the command once per node with srun. A rendezvous program proves the
variables (rank 0 listens on MASTER_ADDR:MASTER_PORT, the other connects and they exchange
ranks); a failing node ends the run with its own status; kill ends every node; `logs --node R`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remotedl import sandbox
from remotedl import slurm as slurmmod
from remotedl.cli.slurm import node_lines
from remotedl.errors import ConfigError, ExitCode, UsageError
from remotedl.waiting import retry_until
from tests import slurmcluster
from tests.conftest import CliResult, SlurmBox, cli_for, make_env
from tests.multinode_programs import FAILING, RENDEZVOUS


@pytest.fixture(scope="module")
def login(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmBox]:
    """The login node of a two-node cluster (2 fake GPUs per node)."""
    try:
        cluster = slurmcluster.start_cluster(gpus=2, node="rdln", nodes=2)
    except slurmcluster.SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster: {e}")
    base = tmp_path_factory.mktemp("slurmnodes")
    try:
        env = make_env(base)
        info = sandbox.up(env, name="slurmnodes", gpus=0, extra_env=cluster.env)
    except BaseException:
        slurmcluster.stop_cluster(cluster)
        raise
    yield SlurmBox(info, dict(env.environ), cluster)
    try:
        sandbox.down(make_env(base), name="slurmnodes")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")
    for problem in slurmcluster.stop_cluster(cluster):
        print(f"slurm cluster stop: {problem}")


class Proj:
    def __init__(self, login: SlurmBox, root: Path, laptop: Path) -> None:
        self.root = root
        self.rdir = f"~/slurm-nodes/{uuid.uuid4().hex[:8]}"
        (root / "remotedl.toml").write_text(
            f'remote_dir = "{self.rdir}"\n\n[hosts.{login.name}]\nscheduler = "slurm"\ntime = "10"\n'
        )
        (root / "rendezvous.py").write_text(RENDEZVOUS)
        (root / "failing.py").write_text(FAILING)
        subprocess.run(["git", "-C", str(root), "add", "."], check=True)
        subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", "nodes"], check=True)
        self.cli = cli_for(login, laptop)

    def __call__(self, *argv: str) -> CliResult:
        return self.cli(*argv, cwd=self.root)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self("show", job_id, "--json")
        assert r.code == 0, r.err
        return json.loads(r.out)

    def last(self) -> str:
        """The id of this project's latest job."""
        r = self("jobs", "--all", "--json")
        assert r.code == 0, r.err
        mine = self.rdir.removeprefix("~")
        return str(max(int(j["id"]) for j in json.loads(r.out) if str(j.get("remote_dir")).endswith(mine)))


@pytest.fixture
def proj(login: SlurmBox, project: Path, tmp_path: Path) -> Proj:
    return Proj(login, project, tmp_path / "laptop")


def _envs(out: str) -> dict[str, dict[str, str]]:
    """Each node's variables, by the label srun puts before its lines."""
    found = {}
    for line in out.splitlines():
        label, sep, rest = line.partition(": env ")
        if sep:
            found[label] = json.loads(rest)
    return found


def test_a_two_node_slurm_run_meets_at_the_master(proj, login):
    r = proj("run", "--nodes", "2", "--gpus", "1", "--", "python3", "rendezvous.py")
    assert r.code == 0, r.out + r.err
    # one batch job, the command once per node (srun labels each node's lines)
    assert "0: rank 0 met ranks [0, 1]" in r.out, r.out
    assert "1: rank 1 met ranks [0, 1]" in r.out, r.out
    envs = _envs(r.out)
    first, second = envs["0"], envs["1"]
    assert (first["SLURMD_NODENAME"], second["SLURMD_NODENAME"]) == ("rdln1", "rdln2")
    # the master is the allocation's first node, at its NodeAddr (127.0.0.1); rdln2 is 127.0.0.2
    for rank, e in ((0, first), (1, second)):
        assert e["MASTER_ADDR"] == e["REMOTEDL_MASTER_ADDR"] == e["PET_MASTER_ADDR"] == "127.0.0.1"
        assert e["MASTER_PORT"] == e["REMOTEDL_MASTER_PORT"] == e["PET_MASTER_PORT"] == first["MASTER_PORT"]
        assert e["NODE_RANK"] == e["REMOTEDL_NODE_RANK"] == e["PET_NODE_RANK"] == str(rank)
        assert e["NNODES"] == e["REMOTEDL_NUM_NODES"] == e["PET_NNODES"] == "2"
        assert e["WORLD_SIZE"] == "2"  # 2 nodes x 1 GPU
        assert e["REMOTEDL_GPUS_PER_NODE"] == e["PET_NPROC_PER_NODE"] == "1"
        assert e["REMOTEDL_NODE_ADDRS"] == "127.0.0.1,127.0.0.2"
        assert e["REMOTEDL_RUN_ID"] == first["REMOTEDL_RUN_ID"]
    assert "0: hostfile 127.0.0.1 slots=1;127.0.0.2 slots=1;" in r.out
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not low <= int(first["MASTER_PORT"]) <= high, first["MASTER_PORT"]  # remotedl.ports
    assert f"master 127.0.0.1:{first['MASTER_PORT']}" in r.out  # said when the run starts
    # one job: one row, on both nodes; its record knows it spans 2
    job_id = proj.last()
    rec = proj.job(job_id)
    assert rec["status"] == "succeeded" and rec["node"] == "rdln[1-2]", rec
    assert rec["want"]["nodes"] == 2, rec
    # logs --node R: that node's lines alone, without srun's label
    one = proj("logs", job_id, "--node", "1")
    assert one.code == 0, one.err
    assert "rank 1 met ranks [0, 1]\n" in one.out and "rank 0" not in one.out, one.out
    assert not any(line.startswith(("0: ", "1: ")) for line in one.out.splitlines()), one.out
    followed = proj("logs", "-f", job_id, "--node", "0")  # to the job's end, which it has reached
    assert followed.code == 0, followed.err
    assert "rank 0 met ranks [0, 1]\n" in followed.out and "rank 1" not in followed.out, followed.out
    bad = proj("logs", job_id, "--node", "2")
    assert bad.code == ExitCode.USAGE and f"--node 2: job {job_id} runs on nodes 0 to 1" in bad.err


def test_a_failing_node_ends_the_slurm_run_with_its_status(proj):
    r = proj("run", "--nodes", "2", "--gpus", "0", "--", "python3", "failing.py")
    # node 1 exits 3; srun ends node 0 (which would wait 300 s); the run is node 1's status
    assert r.code == 3, r.out + r.err
    assert "remotedl: node 1 (rdln2) exited with status 3 first" in r.out, r.out
    job_id = proj.last()
    rec = proj.job(job_id)
    assert (rec["status"], rec["exit_code"]) == ("failed", 3), rec


def test_kill_ends_every_node_of_a_slurm_run(proj, login):
    mark = uuid.uuid4().hex
    r = proj("run", "--detach", "--nodes", "2", "--gpus", "0", "--", f"echo {mark} $NODE_RANK; sleep 300")
    assert r.code == 0, r.err
    job_id = r.out.strip().rsplit(":", 1)[-1]
    assert retry_until(lambda: proj.job(job_id)["slurm_state"] == "RUNNING", seconds=60, interval=0.3)

    def holding() -> list[int]:  # this run's processes on either node (their argv holds the mark)
        pids = []
        for p in Path("/proc").iterdir():
            try:
                if p.name.isdigit() and mark.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                continue
        return pids

    # both nodes run it: each printed its line
    assert retry_until(
        lambda: {"0: " + mark + " 0", "1: " + mark + " 1"} <= set(proj("logs", job_id).out.splitlines()),
        seconds=30,
        interval=0.3,
    ), proj("logs", job_id).out
    assert holding()
    k = proj("kill", job_id)
    assert k.code == 0, k.err
    rec = proj.job(job_id)
    assert rec["status"] == "killed", rec
    assert retry_until(lambda: not holding(), seconds=30, interval=0.2), holding()


def test_real_torchrun_with_gloo_across_slurm_nodes(proj):
    """torch's own rendezvous and gloo on CPU, 2 processes on each of the 2 Slurm nodes,
    torchrun given no rendezvous flags (it reads PET_*). REMOTEDL_TEST_TORCH_BIN names a bin
    directory with torchrun (a venv with `pip install torch`), else torchrun on PATH."""
    from tests.test_multinode import DDP

    where = os.environ.get("REMOTEDL_TEST_TORCH_BIN")
    torchrun = shutil.which("torchrun", path=where) if where else shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torch is not installed here (REMOTEDL_TEST_TORCH_BIN: a bin directory with torchrun)")
    (proj.root / "ddp.py").write_text(DDP)
    subprocess.run(["git", "-C", str(proj.root), "add", "ddp.py"], check=True)
    subprocess.run(["git", "-C", str(proj.root), "commit", "-q", "-m", "ddp"], check=True)
    r = proj("run", "--nodes", "2", "--gpus", "0", "--", torchrun, "--nproc-per-node", "2", "ddp.py")
    assert r.code == 0, r.out[-3000:] + r.err
    for rank, node in ((0, 0), (1, 0), (2, 1), (3, 1)):
        assert f"{node}: rank {rank} of 4 on node {node}: all_reduce sum 10.0" in r.out, r.out[-3000:]


def test_run_nodes_on_slurm_refuses_what_cannot_span_nodes(proj, login):
    r = proj("run", "--nodes", "2", "--gpu", "0", "--", "true")
    assert r.code == ExitCode.USAGE and "--gpu names GPUs of one box" in r.err, r.err
    r = proj("run", "--nodes", "0", "--", "true")
    assert r.code == ExitCode.USAGE and "--nodes 0: give a number of nodes, 1 or more" in r.err, r.err
    r = proj("run", "--nodes", "2", "--sbatch-arg=--ntasks=4", "--", "true")
    assert r.code == ExitCode.USAGE and "--ntasks=4: with --nodes, remotedl sets the nodes" in r.err, r.err
    # --node R of a job that is not a multi-node run
    r = proj("run", "--detach", "--gpus", "0", "--", "true")
    assert r.code == 0, r.err
    one = proj.last()
    r = proj("logs", one, "--node", "0")
    assert r.code == ExitCode.USAGE, r.err
    assert f"--node R picks a node of a multi-node run; job {one} is not one" in r.err, r.err
    # a Slurm host among boxes: its nodes or the boxes, not both
    r = proj("run", "--nodes", "2", "--host", f"{login.name},other", "--", "true")
    assert r.code == ExitCode.USAGE, r.err
    assert f"{login.name} is a Slurm host: a multi-node run is on its nodes or on boxes" in r.err, r.err


# ------------------------------------------------------------------ no cluster needed


def test_sbatch_options_for_a_multi_node_run():
    job = slurmmod.BatchJob("7", "true", "/w", "/c", "/l", gpus=4, nodes=2)
    gres = slurmmod.sbatch_options(job, slurmmod.SlurmSettings())
    assert gres[1:] == ["--nodes=2", "--ntasks-per-node=1", "--gres=gpu:4"]
    # --gpus counts a whole job's GPUs: per node, it is --gpus-per-node
    gpus = slurmmod.sbatch_options(job, slurmmod.SlurmSettings(gpu_option="gpus"))
    assert gpus[1:] == ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4"]
    one = slurmmod.BatchJob("7", "true", "/w", "/c", "/l", gpus=4)
    assert "--nodes=2" not in slurmmod.sbatch_options(one, slurmmod.SlurmSettings())
    assert slurmmod.decode_values(slurmmod.batch_params(job))[-1] == "2"
    assert slurmmod.decode_values(slurmmod.batch_params(one))[-1] == ""


def test_nodes_travel_in_the_settings_and_are_checked_again():
    s = slurmmod.SlurmSettings().with_flags(nodes=3)
    req = slurmmod.settings_request(s)
    assert slurmmod.SlurmSettings.from_settings(req).nodes == 3
    with pytest.raises(UsageError):
        slurmmod.SlurmSettings.from_settings({**req, "nodes": 0})
    with pytest.raises(UsageError, match="with --nodes"):
        slurmmod.SlurmSettings(sbatch_args=("-N2",)).with_flags(nodes=2)
    with pytest.raises(ConfigError):  # remotedl's own options stay refused as before
        s.with_flags(sbatch_args=["--output=x"])


def test_node_lines_keeps_one_nodes_lines_across_writes():
    got: list[bytes] = []
    write, flush = node_lines(got.append, lambda: None, 1)
    for piece in (b"0: a\n1: b", b"b\n1", b"0: no\n1: c\nsrun: error\n1: tail"):
        write(piece)
    flush()
    # "1" then "0: no" is the line "10: no": node 10's, not node 1's
    assert b"".join(got) == b"bb\nc\ntail"


def test_the_port_is_free_and_outside_the_ephemeral_range():
    # bind(0) answered a port of the ephemeral range, which any outgoing connection of the
    # master could take before the rendezvous binds it
    from remotedl.ports import PICK_PORT

    assert "'" not in PICK_PORT  # the batch script quotes it in single quotes
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(5):
        out = subprocess.run(["python3", "-c", PICK_PORT], capture_output=True, text=True, check=True).stdout
        port = int(out)
        assert 10000 <= port <= 65535 and not low <= port <= high, port


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # node 0, ended by srun (143), recorded its end in the same second as node 1's failure
        ({"0": "143 100 n1", "1": "3 100 n2"}, (3, "node 1 (n2) exited with status 3 first")),
        ({"0": "2 101 n1", "1": "3 100 n2"}, (3, "node 1 (n2) exited with status 3 first")),  # earliest
        ({"0": "143 100 n1", "1": "143 100 n2"}, (143, "node 0 (n1) exited with status 143 first")),
        ({}, (143, "")),  # none recorded (both killed): srun's status stands
    ],
)
def test_the_run_takes_the_status_of_the_node_that_failed_first(tmp_path, files, expected):
    for rank, line in files.items():
        (tmp_path / f"node-{rank}.exit").write_text(line + "\n")
    script = slurmmod.NODES_ENV + '_rdl_ctl=$1; _rdl_s=143; _rdl_first_failed; echo "status $_rdl_s"'
    r = subprocess.run(["sh", "-c", script, "sh", str(tmp_path)], capture_output=True, text=True, check=True)
    assert r.stdout == f"status {expected[0]}\n"
    assert expected[1] in r.stderr and (expected[1] or r.stderr == "")


def test_the_batch_script_parses_as_sh_and_bash():
    for shell in ("sh", "bash"):
        r = subprocess.run([shell, "-n"], input=slurmmod.BATCH_SCRIPT, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr
