"""A listing of every record (``remotedl jobs --all``) from a cache of the ended ones' text.

A sweep leaves thousands of records that never change once their job ended. Reading, parsing and
checking each of them on every listing cost most of the agent's time; ``list-cache`` keeps, per
ended record, the JSON text it checked, with the file's inode, size and modification time: a
record whose file is the same is spliced into the answer as that text, one ``stat`` instead of a
read and a check. A record saved since (``save`` replaces the file: a new inode), a new one, and
every active one is read and checked as before; a damaged one is never cached, so it is warned
about every time. The cache is only an accelerator: unreadable, it is rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any

from remotedl.agent.store import Context, _parse_record, jobs_dir, record_ids, state_dir
from remotedl.schema import ACTIVE

CACHE = "list-cache"  # under the state dir: "ID INODE SIZE MTIME_NS\tTEXT" a line


@dataclass
class Spliced:
    """A list for the answer whose items are JSON text already (cached records) or data."""

    items: list[str | dict[str, Any]]

    def records(self) -> list[dict[str, Any]]:
        """The items that are data (the active records, to refresh before answering)."""
        return [x for x in self.items if isinstance(x, dict)]

    def text(self) -> str:
        return "[" + ", ".join(x if isinstance(x, str) else json.dumps(x) for x in self.items) + "]"


def answer_text(answer: dict[str, Any]) -> str:
    """``json.dumps(answer)`` where values may be ``Spliced``: their text goes in as it is."""
    spliced = {k: v for k, v in answer.items() if isinstance(v, Spliced)}
    if not spliced:
        return json.dumps(answer)
    plain = json.dumps({k: v for k, v in answer.items() if k not in spliced})
    parts = [f"{json.dumps(k)}: {v.text()}" for k, v in spliced.items()]
    return plain[:-1] + (", " if plain != "{}" else "") + ", ".join(parts) + "}"


def _load() -> dict[int, tuple[str, str]]:
    """id -> (its file's "INODE SIZE MTIME_NS", its checked JSON text)."""
    try:
        with open(state_dir() / CACHE, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    cached: dict[int, tuple[str, str]] = {}
    for line in lines:
        head, sep, text = line.partition("\t")
        job_id, _, key = head.partition(" ")
        if sep and job_id.isdigit() and text:
            cached[int(job_id)] = (key, text)
    return cached


def _save(cached: dict[int, tuple[str, str]]) -> None:
    path = state_dir() / CACHE
    tmp = path.with_name(f"{CACHE}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(f"{i} {key}\t{text}\n" for i, (key, text) in sorted(cached.items()))
        os.replace(tmp, path)
    except OSError:  # a full disk: the next listing reads the records again
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def listing(ctx: Context) -> Spliced:
    """Every readable record by id: the ended ones whose files did not change since they were
    cached as their text, the others read and checked (damaged ones skipped with a warning)."""
    where = str(jobs_dir())
    cached = _load()
    kept: dict[int, tuple[str, str]] = {}
    items: list[str | dict[str, Any]] = []
    changed = False
    for job_id in record_ids():
        path = os.path.join(where, f"{job_id}.json")
        try:
            st = os.stat(path)
        except OSError:
            continue  # removed meanwhile
        key = f"{st.st_ino} {st.st_size} {st.st_mtime_ns}"
        hit = cached.get(job_id)
        if hit is not None and hit[0] == key:
            kept[job_id] = hit
            items.append(hit[1])
            continue
        try:
            with open(path) as f:
                raw = f.read()
        except OSError:
            continue
        rec = _parse_record(raw, path, job_id, ctx)
        if rec is None:
            continue
        items.append(rec)
        if rec.get("status") not in ACTIVE:
            kept[job_id] = (key, json.dumps(rec))
            changed = True
    if changed or len(kept) != len(cached):
        _save(kept)
    return Spliced(items)
