"""What jobs cost on a host that bills by the hour: price x the job's time x its share of the
box's GPUs (a job on 2 of 8 GPUs pays a quarter of the hour), summed per host and project."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from remotedl.schema import JobRecord


@dataclass
class JobCost:
    host: str
    id: int
    name: str
    project: str
    seconds: float
    share: float  # of the box's GPUs
    cost: float


@dataclass
class CostLine:
    host: str
    project: str
    jobs: int = 0
    gpu_hours: float = 0.0
    cost: float = 0.0


@dataclass
class CostReport:
    lines: list[CostLine] = field(default_factory=list)
    jobs: list[JobCost] = field(default_factory=list)
    # Hosts given that have no price: their jobs are not counted.
    unpriced: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(x.cost for x in self.lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lines": [x.__dict__ for x in self.lines],
            "jobs": [j.__dict__ for j in self.jobs],
            "unpriced": self.unpriced,
            "total": self.total,
        }


def job_cost(
    rec: JobRecord,
    price_per_hour: float,
    box_gpus: int,
    *,
    now: float,
    since: float = 0.0,
    names: dict[str, str] | None = None,
) -> JobCost | None:
    """The part of ``rec``'s run after ``since`` that is priced: None when it never started or
    ran only before ``since``. A box without GPUs (or a count unknown) bills a job whole. The
    project is named by ``names`` (work tree's directory name -> the project's name: the default
    tree is named by the project's identity), else by its work tree's directory."""
    if rec.started is None:
        return None
    start = max(rec.started, since)
    end = rec.ended if rec.ended is not None else now
    if end <= start:
        return None
    seconds = end - start
    share = min(1.0, len(rec.gpus) / box_gpus) if box_gpus > 0 else 1.0
    tree = os.path.basename((rec.remote_dir or rec.cwd or "?").rstrip("/")) or "?"
    project = (names or {}).get(tree, tree)
    return JobCost("", rec.id, rec.name, project, seconds, share, price_per_hour * seconds / 3600.0 * share)


def add_host(
    report: CostReport,
    host: str,
    records: list[JobRecord],
    price_per_hour: float,
    box_gpus: int,
    *,
    now: float,
    since: float = 0.0,
    names: dict[str, str] | None = None,
) -> None:
    """Add one host's jobs to ``report``, a line per project."""
    lines: dict[str, CostLine] = {}
    for rec in records:
        jc = job_cost(rec, price_per_hour, box_gpus, now=now, since=since, names=names)
        if jc is None:
            continue
        jc.host = host
        report.jobs.append(jc)
        line = lines.setdefault(jc.project, CostLine(host, jc.project))
        line.jobs += 1
        line.gpu_hours += jc.seconds / 3600.0 * len(rec.gpus)
        line.cost += jc.cost
    report.lines += sorted(lines.values(), key=lambda x: -x.cost)
