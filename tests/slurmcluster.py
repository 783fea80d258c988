"""A real Slurm cluster for tests: Debian's slurm-wlm (slurmctld + slurmd) and munge.

Everything it makes lives in one fresh directory under the temp dir: slurm.conf, gres.conf,
the state and spool directories, logs, the munge key and socket, and the fake GPUs (character
devices made with mknod, which gres.conf's ``File=`` requires). Ports are free ones picked at
start. Nothing is read from or written to /etc, /run or /var, so several clusters (and a real
Slurm install) can live on one machine. A client reaches this cluster only with
``SLURM_CONF`` pointing at its slurm.conf (the fixture's sandbox box sets it in every session).

The daemons run in the foreground as children of the test process; ``stop_cluster`` cancels
every job, ends the daemons, then any process still carrying this cluster's ``SLURM_CONF``
(slurmstepd and job processes are reparented away from slurmd), and removes the directory.
It never raises.

Several nodes (``nodes=2``): one slurmd per node, each started as its NodeName (``slurmd -N``)
with its own port, spool directory, pid file and log, and its own loopback address
(127.0.0.1, 127.0.0.2, ...: Slurm reaches node i at its ``NodeAddr``). Debian's slurmd is not
built with --enable-multiple-slurmd, and needs not be: the node names are distinct and so are
the addresses the controller reaches them at.

No accounting daemon: ``AccountingStorageType=accounting_storage/none`` (plain ``sacct`` says
"Slurm accounting storage is disabled" and exits 1), plus ``JobCompType=jobcomp/filetxt`` so
``sacct -c`` reads finished jobs from the completion file. See tests/slurm/NOTES.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from remotedl import proc
from remotedl.waiting import free_port, port_answers, retry_until

# Harmless character devices to stand in for /dev/nvidiaN: null, zero, full, random, urandom.
# Distinct minors so that no two fake GPUs are the same device.
_FAKE_GPU_DEVICES = ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9))

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun", "sacct")
DEBIAN_PACKAGES = "slurmctld slurmd slurm-client munge"


class SlurmUnavailable(Exception):
    """Slurm cannot run on this machine; the message says why (the fixture skips with it)."""


class SlurmStartError(Exception):
    """A daemon did not come up; the message carries the tail of its log."""


@dataclass
class SlurmCluster:
    """One running cluster: one controller, one node (or ``nodes``), ``gpus`` fake GPUs as gres
    per node."""

    directory: Path
    conf: Path  # slurm.conf: clients need SLURM_CONF=<this>
    gres_conf: Path
    node: str  # the NodeName, as `squeue -o %N` and SLURMD_NODENAME report it
    node_addr: str  # where slurmd listens, and where a job's listening sockets are reached
    partition: str
    ctld_port: int
    slurmd_port: int
    munge_socket: Path
    gpu_devices: tuple[Path, ...]
    jobcomp: Path  # jobcomp/filetxt's file, read by `sacct -c`
    log_dir: Path
    startup_seconds: float = 0.0
    # every node as (NodeName, NodeAddr, slurmd's port); the first is ``node``
    nodes: list[tuple[str, str, int]] = field(default_factory=list)
    processes: dict[str, subprocess.Popen[str]] = field(default_factory=dict, repr=False)

    @property
    def env(self) -> dict[str, str]:
        """What a client's environment needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    @property
    def gpus(self) -> int:
        return len(self.gpu_devices)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client here (not through the box): for start-up checks and clean-up."""
        return proc.run(argv, env={**os.environ, **self.env}, check=check, timeout=30)

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.out")):  # each daemon's stderr: its log and early errors
            try:
                text = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)


def _program(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def check_available() -> dict[str, str]:
    """Where each needed program is; ``SlurmUnavailable`` if this machine cannot run a cluster."""
    if os.geteuid() != 0:
        raise SlurmUnavailable(
            "needs root: slurmd starts each job as the user who submitted it, and mknod (fake GPU "
            "devices) needs CAP_MKNOD"
        )
    found = {name: _program(name) for name in (*DAEMONS, *CLIENTS)}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        raise SlurmUnavailable(
            f"Slurm is not installed ({', '.join(missing)} missing): apt-get install {DEBIAN_PACKAGES}"
        )
    return {name: path for name, path in found.items() if path is not None}


def _make_gpu_devices(dev_dir: Path, count: int) -> tuple[Path, ...]:
    dev_dir.mkdir()
    devices = []
    for i in range(count):
        major, minor = _FAKE_GPU_DEVICES[i % len(_FAKE_GPU_DEVICES)]
        path = dev_dir / f"nvidia{i}"
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        except PermissionError as e:
            raise SlurmUnavailable(f"cannot make fake GPU character devices (mknod: {e})") from e
        devices.append(path)
    return tuple(devices)


def _memory_mib() -> int:
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1024 * 1024))


def slurm_conf(c: SlurmCluster, *, cpus: int, memory_mib: int, min_job_age: int) -> str:
    d = c.directory
    gres = f" Gres=gpu:{c.gpus}" if c.gpus else ""
    several = len(c.nodes) > 1
    node_line = "\n".join(
        f"NodeName={name} NodeHostname={name if not several else 'localhost'} NodeAddr={addr}"
        + (f" Port={port}" if several else "")
        + f" CPUs={cpus} RealMemory={memory_mib}{gres} State=UNKNOWN"
        for name, addr, port in c.nodes
    )
    # one slurmd per node: each its own spool, pid file and log (%n: the node's name)
    per_node = "-%n" if several else ""
    return f"""# remotedl test cluster: one controller, one node, all on 127.0.0.1; see tests/slurmcluster.py
ClusterName=remotedl
# 'localhost' is the one controller name slurmctld accepts whatever this machine's hostname is.
SlurmctldHost=localhost({c.node_addr})
SlurmctldPort={c.ctld_port}
SlurmdPort={c.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.munge_socket}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool{per_node}
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd{per_node}.pid
SlurmctldLogFile={c.log_dir}/slurmctld.log
SlurmdLogFile={c.log_dir}/slurmd{per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
# Debian's /etc/slurm/plugstack.conf would otherwise be read.
PlugStackConfig={d}/plugstack.conf
# No cgroups or systemd needed: processes tracked through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: plain sacct reports accounting disabled; `sacct -c` reads the completion file.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={c.jobcomp}
SchedulerType=sched/backfill
# Start batch jobs at the next scheduling pass (about a second) instead of up to 3 s later.
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# scancel and time limits: SIGTERM, then SIGKILL this many seconds later (default 30).
KillWait=2
InactiveLimit=0
# How long a finished job stays visible to squeue/scontrol (seconds).
MinJobAge={min_job_age}
MailProg=/bin/true
# The node is declared with more CPUs than this machine may have, so that the GPUs,
# not the cores, are what jobs wait for.
SlurmdParameters=config_overrides
{node_line}
PartitionName={c.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(
    *,
    gpus: int = 2,
    node: str = "localhost",
    nodes: int = 1,
    partition: str = "debug",
    cpus: int = 8,
    min_job_age: int = 300,
    seconds: float = 30.0,
) -> SlurmCluster:
    """Start munged, slurmctld and slurmd; return once the node is idle.

    ``node`` must resolve to 127.0.0.1 from the login side (it is what Slurm reports as a job's
    node, and where a tunnel to a job's port goes): ``localhost`` does everywhere. With
    ``nodes`` > 1 the nodes are ``{node}1`` ... at 127.0.0.1, 127.0.0.2 ... (names that resolve
    nowhere: a job that needs a node's address asks Slurm for its NodeAddr).
    Raises ``SlurmUnavailable`` where Slurm cannot run here, ``SlurmStartError`` where it should
    have but did not (then nothing is left running).
    """
    programs = check_available()
    began = time.monotonic()
    # A short path of our own: unix sockets (munge, slurmd's per-step sockets) have ~100 bytes.
    directory = Path(tempfile.mkdtemp(prefix="remotedl-slurm-"))
    # munged insists that every directory above its socket is searchable by all.
    directory.chmod(0o755)
    log_dir = directory / "log"
    cluster = SlurmCluster(
        directory=directory,
        conf=directory / "slurm.conf",
        gres_conf=directory / "gres.conf",
        node=node,
        node_addr="127.0.0.1",
        partition=partition,
        ctld_port=free_port(),
        slurmd_port=free_port(),
        munge_socket=directory / "munge" / "munge.socket",
        gpu_devices=(),
        jobcomp=log_dir / "jobcomp.txt",
        log_dir=log_dir,
    )
    if nodes > 1:
        cluster.node = f"{node}1"
        cluster.nodes = [(f"{node}{i + 1}", f"127.0.0.{i + 1}", free_port()) for i in range(nodes)]
        cluster.slurmd_port = cluster.nodes[0][2]
    else:
        cluster.nodes = [(node, cluster.node_addr, cluster.slurmd_port)]
    try:
        _start(cluster, programs, gpus=gpus, cpus=cpus, min_job_age=min_job_age, seconds=seconds)
    except BaseException:
        stop_cluster(cluster)
        raise
    cluster.startup_seconds = time.monotonic() - began
    return cluster


def _start(
    c: SlurmCluster, programs: dict[str, str], *, gpus: int, cpus: int, min_job_age: int, seconds: float
) -> None:
    d = c.directory
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir(mode=0o755)
    if len(c.nodes) > 1:
        for name, _, _ in c.nodes:
            (d / f"spool-{name}").mkdir(mode=0o755)
    c.gpu_devices = _make_gpu_devices(d / "dev", gpus)
    (d / "plugstack.conf").write_text("")
    munge_dir = c.munge_socket.parent
    munge_dir.mkdir(mode=0o755)
    key = munge_dir / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(128))
    c.conf.write_text(slurm_conf(c, cpus=cpus, memory_mib=_memory_mib(), min_job_age=min_job_age))
    if gpus:
        c.gres_conf.write_text(
            "".join(f"NodeName={name} Name=gpu File={d}/dev/nvidia[0-{gpus - 1}]\n" for name, _, _ in c.nodes)
        )
    else:
        c.gres_conf.write_text("")

    env = {**os.environ, **c.env}
    _spawn(
        c,
        "munged",
        [
            programs["munged"],
            "--foreground",
            f"--socket={c.munge_socket}",
            f"--key-file={key}",
            f"--log-file={c.log_dir}/munged.log",
            f"--pid-file={munge_dir}/munged.pid",
            f"--seed-file={munge_dir}/munged.seed",
        ],
        env,
    )
    _wait(c, "munged's socket", c.munge_socket.exists, seconds)
    # Both at once: slurmd keeps trying to register until the controller answers.
    _spawn(c, "slurmctld", [programs["slurmctld"], "-D", "-f", str(c.conf)], env)
    for name, _, _ in c.nodes:
        slurmd = "slurmd" if len(c.nodes) == 1 else f"slurmd-{name}"
        _spawn(c, slurmd, [programs["slurmd"], "-D", "-f", str(c.conf), "-N", name], env)
    _wait(c, "slurmctld's port", lambda: port_answers(c.node_addr, c.ctld_port), seconds)

    names = ",".join(name for name, _, _ in c.nodes)

    def node_idle() -> bool:
        r = c.run("sinfo", "--noheader", "--Node", f"--nodes={names}", "--format=%T", check=False)
        return r.returncode == 0 and r.stdout.split() == ["idle"] * len(c.nodes)

    _wait(c, f"node {names} to be idle", node_idle, seconds)


def _spawn(c: SlurmCluster, name: str, argv: list[str], env: dict[str, str]) -> None:
    with open(c.log_dir / f"{name}.out", "w") as out:
        c.processes[name] = proc.popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait(c: SlurmCluster, what: str, ready: Callable[[], object], seconds: float) -> None:
    def check() -> bool:
        for name, p in c.processes.items():
            if p.poll() is not None:
                raise SlurmStartError(f"{name} exited with status {p.returncode}\n{c.log_tail()}")
        return bool(ready())

    if not retry_until(check, seconds=seconds, interval=0.05):
        raise SlurmStartError(f"timed out waiting for {what}\n{c.log_tail()}")


def _processes_with_env(marker: bytes) -> list[int]:
    """Pids whose environment holds ``marker`` (e.g. b"SLURM_CONF=/tmp/.../slurm.conf")."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def stop_cluster(c: SlurmCluster) -> list[str]:
    """Cancel every job, stop the daemons, remove the directory. Never raises: what went wrong
    comes back as lines for the caller to print."""
    problems: list[str] = []
    ctld = c.processes.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        try:
            c.run("scancel", f"--partition={c.partition}", check=False)

            def none_running() -> bool:
                states = "--states=RUNNING,COMPLETING,SUSPENDED"
                r = c.run("squeue", "--noheader", states, "--format=%i", check=False)
                return r.returncode == 0 and not r.stdout.strip()

            if not retry_until(none_running, seconds=15, interval=0.1):
                problems.append("jobs still running after scancel")
        except Exception as e:
            problems.append(f"scancel failed: {e}")
    slurmds = [name for name in c.processes if name.startswith("slurmd")]
    for name in (*slurmds, "slurmctld", "munged"):
        p = c.processes.get(name)
        if p is None:
            continue
        try:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} ignored SIGTERM; killed")
                    p.kill()
                    p.wait(timeout=10)
        except Exception as e:
            problems.append(f"stopping {name} failed: {e}")
    # slurmstepd and job processes are not our children; they carry the cluster's SLURM_CONF.
    try:
        for pid in _processes_with_env(f"SLURM_CONF={c.conf}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
                problems.append(f"killed leftover process {pid}")
            except ProcessLookupError:
                pass
    except Exception as e:
        problems.append(f"looking for leftover processes failed: {e}")
    shutil.rmtree(c.directory, ignore_errors=True)
    return problems
