"""The box's GPUs: who holds each, and which a job gets (or waits for, first in first out)."""

from __future__ import annotations

import pwd
import subprocess
from typing import Any

from remotedl import gpus as gpumod
from remotedl.agent.store import AgentError


def _user_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return pwd.getpwuid(int(line.split()[1])).pw_name
    except (OSError, KeyError, ValueError):
        return None
    return None


def query_gpus() -> list[gpumod.Gpu] | None:
    """The box's GPUs with their compute processes; None when there is no NVIDIA driver."""
    try:
        out = subprocess.run(gpumod.QUERY_GPUS, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    if out.returncode != 0:
        raise AgentError("nvidia-smi failed: " + (out.stdout + out.stderr).strip().splitlines()[0])
    found = gpumod.parse_gpus(out.stdout)
    apps = subprocess.run(gpumod.QUERY_APPS, capture_output=True, text=True, check=False)
    procs = gpumod.parse_apps(apps.stdout) if apps.returncode == 0 else []
    for p in procs:
        p.user = _user_of(p.pid)
    gpumod.attach_processes(found, procs)
    return found


def holders(gpus: list[gpumod.Gpu], records: list[dict[str, Any]]) -> dict[int, str]:
    """GPU index -> who holds it, in words. A starting job holds its GPUs already; a running
    job holds them while its process group lives, even without its tmux session."""
    held: dict[int, str] = {}
    for r in records:
        if r["status"] in ("starting", "running"):
            for g in r.get("gpus") or []:
                held[g] = f"job {r['id']} ({r.get('name')})"
    for g in gpus:
        if g.index not in held and g.processes:
            p = g.processes[0]
            mem = f", {p.used_memory_mib} MiB" if p.used_memory_mib is not None else ""
            held[g.index] = f"process {p.pid} ({p.name.rsplit('/', 1)[-1]}, user {p.user or '?'}{mem})"
    return held


def _gpus_text(n: int, word: str = "GPU") -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def choose_gpus(req: dict[str, Any], records: list[dict[str, Any]]) -> list[int] | None:
    """GPUs for the job, or None when it must wait (``queue``). Raises when it cannot run."""
    if req.get("gpus") == "none":
        return []
    return place(req, query_gpus(), records)


def place(
    req: dict[str, Any], gpus: list[gpumod.Gpu] | None, records: list[dict[str, Any]]
) -> list[int] | None:
    """The choice itself, from the box's GPUs (None: no driver) and the jobs there are."""
    wanted = req.get("gpus")  # list of indices, "auto", or "none"
    count = int(req.get("count") or 1)
    if wanted == "none":
        return []
    if gpus is None:
        if wanted in (None, "auto") and not req.get("count"):
            return []  # a CPU box: the job runs on the CPU
        raise AgentError(
            "this box has no NVIDIA GPU (nvidia-smi is not on its PATH)",
            "usage",
            hint="run without --gpu/--gpus to use the CPU",
        )
    indices = [g.index for g in gpus]
    held = holders(gpus, records)
    # What can never be: a usage error now, never a wait (``queue`` would wait forever).
    names = ", ".join(f"{g.index} ({g.name})" for g in gpus) or "none"
    if isinstance(wanted, list):
        missing = [i for i in wanted if i not in indices]
        if missing:
            raise AgentError(
                f"GPU {', '.join(map(str, missing))} does not exist on this box; "
                f"it has {_gpus_text(len(gpus))}: {names}",
                "usage",
                hint="pick from those with --gpu",
            )
        busy = {i: held[i] for i in wanted if i in held}
        if busy and not req.get("force"):
            if req.get("queue"):
                return None
            who = "; ".join(f"GPU {i} is used by {w}" for i, w in busy.items())
            raise AgentError(
                who,
                "busy",
                hint="pick another with --gpu, wait with --queue, or share it anyway with --force",
            )
        return list(wanted)
    if not gpus and not req.get("count"):
        return []
    if count > len(gpus):
        raise AgentError(
            f"--gpus {count} asks for more GPUs than this box has: it has {_gpus_text(len(gpus))}: {names}",
            "usage",
            hint=f"ask for at most {len(gpus)}" if gpus else "run with --cpu",
        )
    picked = gpumod.pick_free_gpus(gpus, held, count)
    if picked is None:
        if req.get("queue"):
            return None
        who = "; ".join(f"GPU {i}: {w}" for i, w in sorted(held.items()))
        raise AgentError(
            f"no {_gpus_text(count, 'free GPU')} on this box ({who})",
            "busy",
            hint="wait for them with --queue, or choose one with --gpu N --force",
        )
    return picked


def _candidates(want: dict[str, Any]) -> set[int] | None:
    """The GPUs a queued job could take: a set, or None for any."""
    g = want.get("gpus")
    if isinstance(g, list):
        return {int(x) for x in g}
    return set() if g == "none" else None


def blocked_by_earlier(rec: dict[str, Any], records: list[dict[str, Any]]) -> bool:
    """First in, first out: an earlier queued job that wants any of the same GPUs goes first."""
    mine = _candidates(rec.get("want") or {})
    for r in records:
        if r["status"] != "queued" or int(r["id"]) >= int(rec["id"]):
            continue
        theirs = _candidates(r.get("want") or {})
        if mine is None or theirs is None or mine & theirs:
            return True
    return False
