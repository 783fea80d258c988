"""The project side of ``remotedl init``: which directories are data, and ``remotedl.toml``
edited by adding only the settings it lacks (every byte of it kept, nothing replaced)."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotedl import proc

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

# Directories that are data a job reads, when the project has them.
DATA_NAMES = ("data", "datasets", "dataset")
# Never data: environments, caches, tools' state, and what jobs write (results come home by pull).
NOT_DATA = {
    ".git", ".venv", "venv", "env", ".env", "node_modules", "__pycache__", ".mypy_cache",
    ".pytest_cache", ".ruff_cache", ".tox", ".nox", ".idea", ".vscode", "build", "dist",
    ".remotedl-partial", "wandb", "runs", "outputs", "output", "checkpoints", "mlruns",
    "lightning_logs", "logs", ".ipynb_checkpoints", ".cache",
}  # fmt: skip
# An untracked directory at least this big is offered as data (and left out of code snapshots).
LARGE_DIR = 100 << 20


@dataclass(frozen=True)
class DataDir:
    path: str  # relative to the project root
    why: str  # "named data/", "untracked, 2.3 GiB"


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def find_data_dirs(root: Path) -> list[DataDir]:
    """Directories of the project that look like data a job reads: data/, datasets/, and large
    directories git does not track (environments and outputs are never offered)."""
    tracked: set[str] = set()
    if (root / ".git").exists():
        r = proc.run(["git", "-C", str(root), "ls-files", "-z"], check=False)
        tracked = {p.split("/", 1)[0] for p in r.stdout.split("\0") if p}
    found: list[DataDir] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if name in NOT_DATA or name.startswith(".") or not entry.is_dir():
            continue
        if name in DATA_NAMES:
            # Only files git tracks (nanoGPT's data/*/prepare.py): code, not data.
            if name not in tracked or _has_untracked(root, name):
                found.append(DataDir(name, f"a {name}/ directory"))
        elif name not in tracked:
            size = _size_at_least(entry, LARGE_DIR)
            if size >= LARGE_DIR:
                found.append(DataDir(name, f"untracked, over {LARGE_DIR >> 20} MiB"))
    return found


def _has_untracked(root: Path, name: str) -> bool:
    """Whether ``name`` (partly tracked) holds a file git does not track, ignored ones included
    (data/*/train.bin beside a tracked prepare.py); a wholly untracked directory is one entry."""
    argv = ["git", "-C", str(root), "ls-files", "-z", "--others", "--directory", "--no-empty-directory"]
    r = proc.run([*argv, "--", name], check=False)
    return bool(r.stdout.strip("\0"))


def _size_at_least(path: Path, limit: int, max_files: int = 50000) -> int:
    """The size of the files under ``path``, counted until ``limit`` is reached."""
    total = seen = 0
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = [d for d in dirs if d not in NOT_DATA]
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                continue
            seen += 1
            if total >= limit or seen >= max_files:
                return total
    return total


_TABLE = re.compile(r"^\s*\[")


def edit_project_text(text: str, wanted: Mapping[str, Any]) -> tuple[str, list[str], list[str]]:
    """(new text, keys added, keys set already to something else) for top-level ``wanted``
    settings: a missing key goes before the first table; one already there is left alone."""
    data = tomllib.loads(text) if text.strip() else {}
    added = [k for k in wanted if k not in data]
    differ = [k for k in wanted if k in data and data[k] != wanted[k]]
    if not added:
        return text, [], differ
    lines = text.splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if _TABLE.match(ln)), len(lines))
    if at == len(lines) and lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    new = [f"{k} = {toml_value(wanted[k])}\n" for k in added]
    if at < len(lines):
        new.append("\n")
    return "".join(lines[:at] + new + lines[at:]), added, differ


def write_file(path: Path, text: str, *, new_mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` atomically (a whole file or none). An existing file keeps its
    mode, and a symlink (a dotfiles checkout) stays one: its target is written."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = real.stat().st_mode & 0o777 if real.exists() else new_mode
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", dir=real.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, real)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def host_is(path: Path, alias: str) -> bool:
    """Whether the project file ``path`` sets ``host`` to ``alias``."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if path.name == "pyproject.toml":
        data = data.get("tool", {}).get("remotedl", {})
    return bool(data.get("host") == alias)
