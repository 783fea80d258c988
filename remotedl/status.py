"""``remotedl status``: what the box is and has, gathered in one SSH exec."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from remotedl import gpus as gpumod
from remotedl.schema import JobRecord, job_holders
from remotedl.ssh.channel import EXPAND_HOME, Box, mark_sections
from remotedl.typecheck import SchemaError

TOOLS = ("git", "rsync", "tmux", "python3", "nvidia-smi")

# One POSIX sh script; sections start with "@@name" so one exec answers everything.
# "$1": remote_dir. The nvidia-smi queries are remotedl's own constants, not values; the GPU
# query also asks for the driver version (its last field): each nvidia-smi call costs tens of
# milliseconds on a real box (more without persistence mode), so two calls, not three.
_SCRIPT = (
    EXPAND_HOME
    + r"""
echo @@hostname; hostname 2>/dev/null || uname -n
echo @@os; ( . /etc/os-release 2>/dev/null && echo "$PRETTY_NAME" ) || uname -s; uname -rm
echo @@uptime; cat /proc/uptime 2>/dev/null; cat /proc/loadavg 2>/dev/null; nproc 2>/dev/null
echo @@tools; for t in TOOLS; do printf '%s %s\n' "$t" "$(command -v "$t" 2>/dev/null)"; done
echo @@disk; d=$(expand_home "$1"); while [ ! -e "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d" | tail -n 1
# The two nvidia-smi queries at once (each can take a second where persistence mode is off):
# the processes' into a file of our own, read after the GPUs' (one at a time without mktemp).
_rdl_t=$(mktemp 2>/dev/null) || _rdl_t=
[ -z "$_rdl_t" ] || { QUERY_APPS >"$_rdl_t" 2>/dev/null & }
echo @@gpus; QUERY_GPUS 2>&1; echo "@@gpus_rc $?"
[ -z "$_rdl_t" ] || wait  # here: a pipeline's parts are subshells, which cannot wait for it
apps() { if [ -n "$_rdl_t" ]; then cat "$_rdl_t"; rm -f "$_rdl_t"; else QUERY_APPS 2>/dev/null; fi; }
echo @@apps; apps | while IFS= read -r line; do
  pid=$(printf '%s' "$line" | cut -d, -f2 | tr -d ' ')
  printf '%s\t%s\n' "$line" "$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')"; done
# The records of remotedl jobs that hold GPUs now (the agent writes them, one JSON each).
echo @@jobs; cd "$HOME/.remotedl/jobs" 2>/dev/null &&
  grep -l -E '"status": "(running|starting)"' -- *.json 2>/dev/null | while IFS= read -r f; do
    tr -d '\n' < "$f"; echo; done
echo @@end
"""
)


@dataclass
class Disk:
    path: str
    total_bytes: int
    free_bytes: int


@dataclass
class BoxStatus:
    host: str
    reachable: bool
    hostname: str = ""
    os: str = ""
    kernel: str = ""
    uptime_seconds: float | None = None
    load: list[float] = field(default_factory=list)
    cpus: int | None = None
    tools: dict[str, str | None] = field(default_factory=dict)
    disk: Disk | None = None
    remote_dir: str = ""
    nvidia: bool = False
    nvidia_error: str | None = None
    driver_version: str | None = None
    gpus: list[gpumod.Gpu] = field(default_factory=list)
    held_by: dict[int, str] = field(default_factory=dict)  # GPU index -> remotedl job holding it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def status_script() -> str:
    return (
        _SCRIPT.replace("TOOLS", " ".join(TOOLS))
        .replace("QUERY_GPUS", shlex.join(QUERY_GPUS_AND_DRIVER))
        .replace("QUERY_APPS", shlex.join(gpumod.QUERY_APPS))
    )


QUERY_GPUS_AND_DRIVER = [
    gpumod.QUERY_GPUS[0],
    gpumod.QUERY_GPUS[1] + ",driver_version",
    *gpumod.QUERY_GPUS[2:],
]


def split_driver(s: dict[str, list[str]]) -> str | None:
    """Take the driver version (the last field) off the lines of the ``gpus`` section that
    ``QUERY_GPUS_AND_DRIVER`` printed, leaving what ``QUERY_GPUS`` prints."""
    if (s.get("gpus_rc") or ["127"])[0] != "0":
        return None  # an error message, not rows
    driver = None
    rows = []
    for line in s.get("gpus", []):
        row, sep, version = line.rpartition(", ")
        if sep:
            driver = driver or version.strip() or None
            line = row
        rows.append(line)
    s["gpus"] = rows
    return driver


def _sections(text: str) -> dict[str, list[str]]:
    return mark_sections(text)


def parse_status(host: str, remote_dir: str, text: str) -> BoxStatus:
    s = _sections(text)
    st = BoxStatus(host=host, reachable=True, remote_dir=remote_dir)
    st.hostname = (s.get("hostname") or [""])[0]
    os_lines = s.get("os", [])
    st.os = os_lines[0] if os_lines else ""
    st.kernel = os_lines[1] if len(os_lines) > 1 else ""
    up = s.get("uptime", [])
    if len(up) >= 1 and up[0].split():
        st.uptime_seconds = float(up[0].split()[0])
    if len(up) >= 2:
        st.load = [float(x) for x in up[1].split()[:3]]
    if len(up) >= 3 and up[2].strip().isdigit():
        st.cpus = int(up[2])
    for line in s.get("tools", []):
        name, _, where = line.partition(" ")
        st.tools[name] = where.strip() or None
    disk = s.get("disk", [])
    if disk:
        parts = disk[0].split()
        if len(parts) >= 6:
            st.disk = Disk(parts[5], int(parts[1]) * 1024, int(parts[3]) * 1024)
    st.nvidia = bool(st.tools.get("nvidia-smi"))
    driver = split_driver(s)
    st.gpus, st.nvidia_error = gpu_facts(s, st.nvidia)
    if st.nvidia and (s.get("gpus_rc") or ["127"])[0] == "0":
        st.driver_version = driver
        st.held_by = job_holders(records(s.get("jobs", [])))
    return st


def gpu_facts(s: dict[str, list[str]], nvidia: bool) -> tuple[list[gpumod.Gpu], str | None]:
    """(GPUs with their compute processes, why there are none) from the ``gpus``, ``gpus_rc``
    and ``apps`` sections the status script (and ``top``'s sampler) print."""
    gpu_out = "\n".join(s.get("gpus", []))
    rc = (s.get("gpus_rc") or ["127"])[0]
    if not nvidia:
        return [], "no NVIDIA driver: nvidia-smi is not on the box's PATH"
    if rc != "0":
        return [], "nvidia-smi failed: " + (gpu_out.strip().splitlines() or ["?"])[0]
    found: list[gpumod.Gpu] = []
    try:
        found = gpumod.parse_gpus(gpu_out)
        procs = []
        for line in s.get("apps", []):
            csv, _, user = line.partition("\t")
            for p in gpumod.parse_apps(csv):
                p.user = user or None
                procs.append(p)
        gpumod.attach_processes(found, procs)
    except gpumod.NvidiaSmiError as e:
        return found, str(e)
    return found, None


HolderKind = Literal["job", "process", "free"]


def holder(held_by: dict[int, str], gpu: gpumod.Gpu) -> tuple[HolderKind, str]:
    """Who holds a GPU, in words: a remotedl job ("job 3 (train.py)"), else a foreign compute
    process with its user ("process 4242 (python3, user bob)"), else free."""
    job = held_by.get(gpu.index)
    if job:
        return "job", job
    if gpu.processes:
        p = gpu.processes[0]
        more = f" and {len(gpu.processes) - 1} more" if len(gpu.processes) > 1 else ""
        return "process", f"process {p.pid} ({p.name.rsplit('/', 1)[-1]}, user {p.user or '?'}){more}"
    return "free", "free"


def box_status(box: Box, remote_dir: str) -> BoxStatus:
    """Reach the box and report on it. Connection errors propagate as ``ConnectError``."""
    result = box.run(status_script(), remote_dir, check=False, inline=True)  # no secret in it
    return parse_status(box.spec.alias, remote_dir, result.stdout)


def records(lines: list[str]) -> list[JobRecord]:
    """The job records the status script sent; one that does not parse is not a holder."""
    import json

    out = []
    for line in lines:
        try:
            out.append(JobRecord.from_dict(json.loads(line)))
        except (ValueError, SchemaError):
            continue
    return out
