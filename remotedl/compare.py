"""Jobs side by side: what differed (commit, arguments, environment) and how they ended (final
metrics), read from the outputs that came home; a scalar across jobs as a chart.

Metrics come from, in this order (a later source does not replace a name an earlier one gave):
``metrics.json`` (a number per name, or a list whose last value counts; nested objects are
flattened with dots), TensorBoard event files (each scalar tag's last value; needs the
``tensorboard`` package) and MLflow file stores (``mlruns/*/*/metrics/NAME``, last line).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl import proc
from remotedl.errors import RemotedlError
from remotedl.schema import JobRecord

MAX_METRICS = 12  # columns: the names most jobs share come first
Point = tuple[float, float]  # (step, value)


@dataclass
class JobRow:
    ref: str
    name: str
    status: str
    commit: str | None
    snapshot: bool
    command: str
    env: dict[str, str]  # values where known here (the ledger), else keys with ""
    metrics: dict[str, float]
    dest: Path
    commit_here: bool = False  # this repository has the commit (diffs can be told)


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "notes": self.notes}


def _files(dest: Path, pattern: str, limit: int = 2000) -> Iterator[Path]:
    if not dest.is_dir():
        return
    n = 0
    for dirpath, dirnames, filenames in os.walk(dest):
        dirnames.sort()
        dirnames[:] = [d for d in dirnames if not d.startswith(".remotedl-partial")]
        for name in sorted(filenames):
            if Path(name).match(pattern):
                yield Path(dirpath) / name
                n += 1
                if n >= limit:
                    return


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, Mapping):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], data


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float) and math.isfinite(v):
        return float(v)
    return None


def json_metrics(dest: Path) -> dict[str, list[float]]:
    """Every ``metrics.json`` under ``dest`` (the shallowest first): name -> values."""
    found = sorted(_files(dest, "metrics.json"), key=lambda p: (len(p.parts), str(p)))
    out: dict[str, list[float]] = {}
    for path in found:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name, value in _flatten(data):
            if not name or name in out:
                continue
            values = value if isinstance(value, list) else [value]
            nums = [n for n in map(_number, values) if n is not None]
            if nums:
                out[name] = nums
    return out


def tensorboard_scalars(dest: Path) -> dict[str, list[Point]]:
    """Scalars of every TensorBoard event file under ``dest``: tag -> (step, value) in order.
    Empty when the tensorboard package is not installed."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        return {}
    out: dict[str, list[Point]] = {}
    for path in _files(dest, "events.out.tfevents.*"):
        with contextlib.suppress(Exception):  # a file cut mid-record: what was read counts
            for event in EventFileLoader(str(path)).Load():
                for v in event.summary.value:
                    value: float | None = None
                    if v.HasField("simple_value"):
                        value = float(v.simple_value)
                    elif v.HasField("tensor") and v.tensor.float_val:
                        value = float(v.tensor.float_val[0])
                    elif v.HasField("tensor") and v.tensor.double_val:
                        value = float(v.tensor.double_val[0])
                    if value is not None and math.isfinite(value):
                        out.setdefault(v.tag, []).append((float(event.step), value))
    return out


def mlflow_metrics(dest: Path) -> dict[str, list[Point]]:
    """MLflow file-store metrics under ``dest`` (``mlruns/<exp>/<run>/metrics/NAME``: lines of
    ``timestamp value step``)."""
    out: dict[str, list[Point]] = {}
    root = dest / "mlruns"
    if not root.is_dir():
        return out
    for metrics_dir in sorted(root.glob("*/*/metrics")):
        for path in sorted(p for p in metrics_dir.rglob("*") if p.is_file()):
            name = path.relative_to(metrics_dir).as_posix()
            with contextlib.suppress(OSError, ValueError):
                for line in path.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 2:
                        step = float(parts[2]) if len(parts) > 2 else float(len(out.get(name, [])))
                        out.setdefault(name, []).append((step, float(parts[1])))
    return out


def metrics(dest: Path) -> dict[str, float]:
    """Final metrics: each name's last value."""
    out = {k: v[-1] for k, v in json_metrics(dest).items()}
    for source in (tensorboard_scalars(dest), mlflow_metrics(dest)):
        for k, pts in source.items():
            if k not in out and pts:
                out[k] = max(pts, key=lambda p: p[0])[1] if pts else math.nan
    return out


def series(dest: Path, name: str) -> list[Point]:
    """The values of ``name`` over steps: TensorBoard, then MLflow, then metrics.json's list."""
    for source in (tensorboard_scalars(dest), mlflow_metrics(dest)):
        if source.get(name):
            return sorted(source[name])
    values = json_metrics(dest).get(name) or []
    return [(float(i), v) for i, v in enumerate(values)] if len(values) > 1 else []


def job_row(ref: str, rec: JobRecord, dest: Path, env: Mapping[str, str], commit_here: bool) -> JobRow:
    from remotedl.outputs import TRACKER_KEYS

    known = {k: env[k] for k in rec.env_keys if k in env}
    # the trackers' variables remotedl set are the same for every job: no difference to show
    shown = {k: known.get(k, "") for k in rec.env_keys if k in known or k not in TRACKER_KEYS}
    return JobRow(
        ref, rec.name, rec.state, rec.git_commit, rec.snapshot, rec.command, shown, metrics(dest), dest,
        commit_here,
    )  # fmt: skip


def _common_prefix(words: Sequence[Sequence[str]]) -> int:
    n = 0
    while all(len(w) > n for w in words) and len({w[n] for w in words}) == 1:
        n += 1
    return n


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == int(v) and abs(v) < 1e12:
        return str(int(v))
    return f"{v:.4g}"


def shortstat(root: Path, a: str, b: str) -> str | None:
    r = proc.run(["git", "-C", str(root), "diff", "--shortstat", a, b, "--"], check=False)
    if r.returncode != 0:
        return None
    return r.stdout.strip() or "no difference in files"


def build(root: Path, rows: Sequence[JobRow]) -> Table:
    """The comparison table: a column per thing that differs, then the final metrics."""
    import shlex

    if not rows:
        raise RemotedlError("no jobs to compare")
    words = []
    for r in rows:
        try:
            words.append(shlex.split(r.command))
        except ValueError:
            words.append(r.command.split())
    cut = _common_prefix(words)
    while cut > 0 and words[0][cut - 1].startswith("-"):
        cut -= 1  # "--lr 0.1", not "0.1": the option goes with its value
    keys = sorted({k for r in rows for k in r.env})
    differing = [k for k in keys if len({r.env.get(k, "<unset>") for r in rows}) > 1 or len(rows) == 1]
    names: dict[str, int] = {}
    for r in rows:
        for k in r.metrics:
            names[k] = names.get(k, 0) + 1
    metric_cols = sorted(names, key=lambda k: (-names[k], k))[:MAX_METRICS]
    metric_cols.sort()
    columns = ["job", "name", "status", "commit", "args", "env", *metric_cols]
    table = Table(columns, [])
    first = rows[0]
    for r in rows:
        args = shlex.join(words[rows.index(r)][cut:]) or "-"
        env = " ".join(f"{k}={r.env[k]}" if r.env.get(k) else k for k in differing if k in r.env) or "-"
        commit = (r.commit or "-")[:10] + ("+" if r.snapshot else "")
        table.rows.append(
            [r.ref, r.name, r.status, commit, args, env, *[_fmt(r.metrics.get(m)) for m in metric_cols]]
        )
        table.jobs.append(
            {
                "job": r.ref, "name": r.name, "status": r.status, "commit": r.commit,
                "snapshot": r.snapshot, "command": r.command, "args": args, "env": r.env,
                "metrics": r.metrics, "outputs": str(r.dest),
            }
        )  # fmt: skip
    if any(r.snapshot for r in rows):
        table.notes.append("commit+: a snapshot of uncommitted work")
    for r in rows[1:]:
        if r.commit and first.commit and r.commit != first.commit:
            stat = shortstat(root, first.commit, r.commit) if r.commit_here and first.commit_here else None
            said = stat or "(a commit this repository does not have)"
            table.notes.append(f"code {first.ref} -> {r.ref}: {said}; `remotedl diff` shows it")
            table.jobs[rows.index(r)]["code_change"] = stat
    if not any(r.metrics for r in rows):
        table.notes.append(
            "no metrics: none of these jobs' outputs (metrics.json, TensorBoard, MLflow) are here"
        )
    return table


# ------------------------------------------------------------------ plots


MARKS = "*o+x#@%&"


def plot_text(data: Mapping[str, Sequence[Point]], name: str, width: int = 72, height: int = 18) -> str:
    """A terminal chart of ``name`` per job: a mark per job at each (step, value), y labels on
    the left, the steps below, a legend. Plain text (no dependency, any terminal, pipes)."""
    series = {job: list(points) for job, points in data.items() if points}
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    if not xs:
        return f"{name}: no values"
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    grid = [[" "] * width for _ in range(height)]
    for i, points in enumerate(series.values()):
        mark = MARKS[i % len(MARKS)]
        for x, y in points:
            col = 0 if x1 == x0 else round((x - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((y - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = mark
    labels = [_fmt(y1 - (y1 - y0) * r / (height - 1)) for r in range(height)]
    pad = max(len(label) for label in labels)
    lines = [name]
    for r, cells in enumerate(grid):
        label = labels[r] if r in (0, height // 2, height - 1) else ""
        lines.append(f"{label:>{pad}} |{''.join(cells).rstrip()}")
    lines.append(" " * pad + " +" + "-" * width)
    right = _fmt(x1)
    lines.append(" " * (pad + 2) + _fmt(x0) + " " * max(1, width - len(_fmt(x0)) - len(right)) + right)
    lines.append(" " * (pad + 2) + "step;  " + "  ".join(
        f"{MARKS[i % len(MARKS)]} {job}" for i, job in enumerate(series)
    ))  # fmt: skip
    return "\n".join(lines)


def plot_png(data: Mapping[str, Sequence[Point]], name: str, out: Path) -> None:
    """A PNG chart of ``name`` per job (matplotlib, no display needed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RemotedlError("a PNG chart needs matplotlib", hint="pip install 'remotedl[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for job, points in data.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], label=str(job))
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(out, format="png")
        except OSError as e:
            raise RemotedlError(f"could not write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def as_dict(row: JobRow) -> dict[str, Any]:
    d = asdict(row)
    d["dest"] = str(row.dest)
    return d
