"""Experiment trackers per job (issue 28): W&B and MLflow write into the job's own directory.

A job started with ``trackers`` gets, unless its ``--env`` sets them, ``WANDB_DIR`` (the job's
directory: W&B writes ``wandb/`` in it), a fresh ``WANDB_RUN_ID`` (a reused one would resume an
earlier run), ``WANDB_NAME`` (the job's name) and ``MLFLOW_TRACKING_URI`` (a file store,
``mlruns/`` in the job's directory; MLflow 3 also wants ``MLFLOW_ALLOW_FILE_STORE``). The paths
are absolute, so a script that changes directory still writes there. The job's directory is
``<remote_dir>/.remotedl/jobs/<id>``: its own checkout, or, for a job that runs in the work tree
itself (``isolate = false``), a directory of its own there, so two jobs never share a run
store. What the box's environment sets wins too: the runner applies these where unset.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from remotedl.agent.checkout import ensure_excludes
from remotedl.agent.store import JOB_DIRS
from remotedl.schema import StartRequest

KEYS = ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_NAME", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")


def job_dir(rdir: str, job_id: int) -> str:
    return str(Path(rdir).joinpath(*JOB_DIRS, str(job_id)))


def planned(req: StartRequest, rdir: str, job_id: int, name: str, *, isolate: bool) -> dict[str, Any]:
    """The record's ``trackers_dir`` and ``trackers`` of a new job (nothing without ``trackers``
    in the request). A job in the work tree gets its directory made here."""
    if not req.trackers:
        return {}
    given = set(req.env.keys())
    where = job_dir(rdir, job_id)
    values = {
        "WANDB_DIR": where,
        "WANDB_RUN_ID": secrets.token_hex(4),
        "WANDB_NAME": name,
        "MLFLOW_TRACKING_URI": os.path.join(where, "mlruns"),
    }
    if "MLFLOW_TRACKING_URI" not in given:
        values["MLFLOW_ALLOW_FILE_STORE"] = "true"  # a file store: plain files that come home whole
    if not isolate:  # an isolated job's checkout is made there later (it must not exist yet)
        ensure_excludes(rdir)  # never the project's files: a push never sees them
        os.makedirs(where, mode=0o755, exist_ok=True)
    return {"trackers_dir": where, "trackers": {k: v for k, v in values.items() if k not in given}}


def apply(rec: dict[str, Any], env: dict[str, str]) -> dict[str, str]:
    """Add the job's tracker variables to ``env`` where it has none (the user's, or the box's
    environment's, win); returns those it added."""
    added = {}
    for k, v in (rec.get("trackers") or {}).items():
        if k not in env:
            env[k] = added[k] = str(v)
    return added
