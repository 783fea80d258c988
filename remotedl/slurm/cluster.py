"""The cluster as sinfo and scontrol describe it: nodes and partitions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.slurm.states import SlurmJob, gres_count, parse_scontrol


@dataclass
class SlurmNode:
    name: str
    partitions: list[str]
    state: str  # idle, mixed, allocated, drained, down...
    gpus: int  # GPUs as gres
    gpus_used: int
    gres: str = ""
    cpus_alloc: int | None = None
    cpus_total: int | None = None
    memory_mib: int | None = None


@dataclass
class SlurmPartition:
    name: str
    default: bool = False
    state: str = ""
    max_time: str = ""
    default_time: str = ""
    nodes: int = 0
    gpus: int = 0
    gpus_used: int = 0


@dataclass
class ClusterStatus:
    host: str
    user: str = ""
    version: str = ""
    partitions: list[SlurmPartition] = field(default_factory=list)
    nodes: list[SlurmNode] = field(default_factory=list)
    jobs: list[SlurmJob] = field(default_factory=list)  # the user's jobs, as squeue lists them

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def gpus_used(self) -> int:
        return sum(n.gpus_used for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["jobs"] = [j.to_dict() for j in self.jobs]
        out["gpus"], out["gpus_used"] = self.gpus, self.gpus_used
        return out


SINFO_FIELDS = ("NodeList", "Partition", "StateLong", "Gres", "GresUsed", "CPUsState", "Memory")
SINFO_FORMAT = ",".join(f"{f}:|" for f in SINFO_FIELDS)


def parse_sinfo_nodes(text: str) -> list[SlurmNode]:
    """``sinfo --noheader --Node -O SINFO_FORMAT``: a line per node and partition, merged per node."""
    nodes: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.rstrip("|").split("|")]
        if len(parts) < len(SINFO_FIELDS) or not parts[0]:
            continue
        f = dict(zip(SINFO_FIELDS, parts, strict=False))
        part = f["Partition"].rstrip("*")
        node = nodes.get(f["NodeList"])
        if node is None:
            alloc, total = _cpus(f["CPUsState"])
            node = nodes[f["NodeList"]] = SlurmNode(
                name=f["NodeList"],
                partitions=[],
                state=f["StateLong"],
                gpus=gres_count(f["Gres"]),
                gpus_used=gres_count(f["GresUsed"]),
                gres=f["Gres"] if f["Gres"] != "(null)" else "",
                cpus_alloc=alloc,
                cpus_total=total,
                memory_mib=int(f["Memory"]) if f["Memory"].isdigit() else None,
            )
        if part and part not in node.partitions:
            node.partitions.append(part)
    return list(nodes.values())


def _cpus(text: str) -> tuple[int | None, int | None]:
    parts = text.split("/")  # allocated/idle/other/total
    if len(parts) == 4 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[3])
    return None, None


def parse_partitions(text: str, nodes: Sequence[SlurmNode] = ()) -> list[SlurmPartition]:
    """``scontrol --oneliner show partition`` lines; GPU totals from the nodes (sinfo)."""
    out = []
    for line in text.splitlines():
        f = parse_scontrol(line)
        name = f.get("PartitionName")
        if not name:
            continue
        members = [n for n in nodes if name in n.partitions]
        out.append(
            SlurmPartition(
                name=name,
                default=f.get("Default") == "YES",
                state=f.get("State", ""),
                max_time=f.get("MaxTime", ""),
                default_time=f.get("DefaultTime", ""),
                nodes=int(f["TotalNodes"]) if f.get("TotalNodes", "").isdigit() else len(members),
                gpus=sum(n.gpus for n in members),
                gpus_used=sum(n.gpus_used for n in members),
            )
        )
    return out
