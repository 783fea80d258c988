"""nvidia-smi queries, their parsing, and the choice of free GPUs.

Standard library only: this module also runs on the box inside the agent.
Numbering follows nvidia-smi (PCI bus order); jobs get ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
so that CUDA agrees with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

GPU_FIELDS = "index,name,uuid,pci.bus_id,memory.used,memory.total,utilization.gpu"
APP_FIELDS = "gpu_uuid,pid,process_name,used_memory"
QUERY_GPUS = ["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader,nounits"]
QUERY_APPS = ["nvidia-smi", f"--query-compute-apps={APP_FIELDS}", "--format=csv,noheader,nounits"]
QUERY_DRIVER = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]

NOT_AVAILABLE = ("[N/A]", "[Not Supported]", "N/A", "[Unknown Error]", "[Insufficient Permissions]")


class NvidiaSmiError(ValueError):
    """nvidia-smi printed something this parser does not understand."""


@dataclass
class GpuProcess:
    gpu_uuid: str
    pid: int
    name: str
    used_memory_mib: int | None
    user: str | None = None


@dataclass
class Gpu:
    index: int
    name: str
    uuid: str
    bus_id: str
    memory_used_mib: int | None
    memory_total_mib: int | None
    utilization_pct: int | None
    processes: list[GpuProcess] = field(default_factory=list)


def _num(text: str) -> int | None:
    text = text.strip()
    if text in NOT_AVAILABLE:
        return None
    try:
        return int(float(text))
    except ValueError as e:
        raise NvidiaSmiError(f"unexpected number {text!r} from nvidia-smi") from e


def _rows(output: str, width: int) -> list[list[str]]:
    rows = []
    for line in output.splitlines():
        if not line.strip():
            continue
        cells = [c.strip() for c in line.split(", ")]
        if len(cells) != width:
            # A process name may contain ", ": keep the outer fields, join the middle.
            if len(cells) > width and width == 4:
                cells = [cells[0], cells[1], ", ".join(cells[2:-1]), cells[-1]]
            else:
                raise NvidiaSmiError(f"unexpected nvidia-smi line: {line!r}")
        rows.append(cells)
    return rows


def parse_gpus(output: str) -> list[Gpu]:
    """Parse ``QUERY_GPUS`` output."""
    gpus = []
    for index, name, uuid, bus, used, total, util in _rows(output, 7):
        idx = _num(index)
        if idx is None:
            raise NvidiaSmiError(f"GPU without index in {output!r}")
        gpus.append(Gpu(idx, name, uuid, bus, _num(used), _num(total), _num(util)))
    return gpus


def parse_apps(output: str) -> list[GpuProcess]:
    """Parse ``QUERY_APPS`` output."""
    procs = []
    for uuid, pid, name, used in _rows(output, 4):
        the_pid = _num(pid)
        if the_pid is None:
            continue
        procs.append(GpuProcess(uuid, the_pid, name, _num(used)))
    return procs


def attach_processes(gpus: Sequence[Gpu], procs: Iterable[GpuProcess]) -> None:
    by_uuid = {g.uuid: g for g in gpus}
    for p in procs:
        if p.gpu_uuid in by_uuid:
            by_uuid[p.gpu_uuid].processes.append(p)


def parse_gpu_spec(spec: str) -> list[int] | None:
    """``"0"``, ``"0,2"`` -> indices; ``"auto"`` -> None. Raises ValueError on nonsense."""
    spec = spec.strip()
    if spec == "auto":
        return None
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"'{spec}' is not a GPU list: use e.g. 0, 0,2 or auto")
        if int(part) not in out:
            out.append(int(part))
    return out


def pick_free_gpus(
    gpus: Sequence[Gpu], held: Iterable[int], count: int, *, own_pids: Iterable[int] = ()
) -> list[int] | None:
    """``count`` GPUs not held by a job and running no foreign compute process, least used
    memory first; None if there are not that many."""
    held_set = set(held)
    own = set(own_pids)
    free = [g for g in gpus if g.index not in held_set and not [p for p in g.processes if p.pid not in own]]
    free.sort(key=lambda g: (g.memory_used_mib or 0, g.index))
    if len(free) < count:
        return None
    return sorted(g.index for g in free[:count])
