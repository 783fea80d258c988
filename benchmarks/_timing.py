"""Shared helpers for the benchmark scripts: run things side by side, report medians."""

from __future__ import annotations

import statistics
import subprocess
import time
from collections.abc import Callable, Sequence


def time_call(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_argv(argv: Sequence[str], **kw: object) -> float:
    return time_call(lambda: subprocess.run(argv, check=True, capture_output=True, **kw))  # type: ignore[call-overload]


def side_by_side(
    ours: Callable[[], float], plain: Callable[[], float], rounds: int
) -> tuple[list[float], list[float]]:
    """Alternate the two so drift in machine load hits both alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(ours())
        b.append(plain())
    return a, b


def report(
    name: str,
    ours: list[float],
    plain: list[float],
    *,
    unit: str = "s",
    higher_is_better: bool = False,
    limit: float | None = None,
    names: tuple[str, str] = ("remotedl", "plain"),
) -> float:
    mo, mp = statistics.median(ours), statistics.median(plain)
    ratio = mo / mp if mp else float("inf")
    verdict = ""
    if limit is not None:
        ok = ratio >= limit if higher_is_better else ratio <= limit
        verdict = f"  [{'OK' if ok else 'OVER'} {'>=' if higher_is_better else '<='} {limit}]"
    print(
        f"{name}: {names[0]} median {mo:.4f} {unit}, {names[1]} median {mp:.4f} {unit}, "
        f"ratio {ratio:.3f}{verdict}  (n={len(ours)})"
    )
    return ratio
