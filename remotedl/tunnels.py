"""Background tunnels: their registry and their supervisor process.

A background tunnel is ``remotedl tunnel --supervise`` running detached; its record under
``$XDG_STATE_HOME/remotedl/tunnels/`` (0600: a Jupyter URL carries its token) says what it
forwards, to which host, its state and URL. The starter writes the record first; the
supervisor only merges its own fields (pid, status, last event) into it, so nothing the
starter recorded (the URL) is lost when the tunnel reconnects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl import proc
from remotedl.errors import RemotedlError, UsageError
from remotedl.waiting import pid_runs


@dataclass
class TunnelRecord:
    host: str
    forwards: list[str]
    status: str = "starting"
    pid: int | None = None
    url: str | None = None
    started: float = field(default_factory=time.time)
    last_event: str | None = None
    reconnects: int = 0
    file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def supervisor_alive(pid: int | None) -> bool:
    """The process ``pid`` is a background tunnel's supervisor (`remotedl tunnel --supervise`):
    stopping a tunnel whose supervisor died unseen must never signal the program that has its
    pid now."""
    return pid_runs(pid, b"\0--supervise\0")


class TunnelRegistry:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "tunnels"

    def _ensure(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.dir

    def path(self, forwards: Sequence[str]) -> Path:
        return self._ensure() / ("-".join(f.split(":")[0] for f in forwards) + ".json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self._ensure() / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def create(self, record: TunnelRecord) -> Path:
        path = self.path(record.forwards)
        with self._locked():
            self._write(path, {k: v for k, v in record.to_dict().items() if k != "file"})
        return path

    def update(self, path: Path, **fields: Any) -> None:
        """Merge ``fields`` into the record; everything else in it stays as it is."""
        with self._locked():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data.update(fields)
            self._write(path, data)

    @staticmethod
    def _write(path: Path, data: Mapping[str, Any]) -> None:
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        tmp.replace(path)

    def read(self, path: Path) -> TunnelRecord | None:
        try:
            data = json.loads(path.read_text())
            rec = TunnelRecord(**{k: v for k, v in data.items() if k in TunnelRecord.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return None
        rec.file = str(path)
        return rec

    def live(self) -> list[TunnelRecord]:
        """The running background tunnels; records of dead ones are removed."""
        out = []
        for path in sorted(self._ensure().glob("*.json")):
            rec = self.read(path)
            if rec is not None and supervisor_alive(rec.pid):
                out.append(rec)
            elif rec is None or rec.status != "starting" or time.time() - rec.started > 60:
                path.unlink(missing_ok=True)  # a tunnel that died: forget it
        return out

    def stop(self, which: str) -> list[TunnelRecord]:
        """End the background tunnels holding local port ``which`` (or ``all``)."""
        recs = self.live()
        targets = (
            recs if which == "all" else [r for r in recs if any(f.split(":")[0] == which for f in r.forwards)]
        )
        if not targets:
            raise UsageError(
                f"no background tunnel holds port {which}", hint="`remotedl tunnel --list` shows them"
            )
        for r in targets:
            assert r.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while supervisor_alive(r.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            Path(r.file).unlink(missing_ok=True)
        return targets

    def spawn(
        self,
        record: TunnelRecord,
        argv: Sequence[str],
        *,
        cwd: Path,
        environ: Mapping[str, str],
        timeout: float = 30.0,
    ) -> TunnelRecord:
        """Record the tunnel, start its supervisor detached, and wait until it is connected."""
        path = self.create(record)
        log = path.with_suffix(".log")
        with open(log, "ab") as out:
            p = proc.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out.fileno(),
                stderr=out.fileno(),
                cwd=cwd,
                env=environ,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if p.poll() is not None:
                path.unlink(missing_ok=True)
                text = log.read_text(errors="replace").strip().splitlines()
                errs = [line for line in text if "error" in line] or text[-1:]
                raise RemotedlError(
                    f"the background tunnel did not start: {errs[-1] if errs else 'no output'}"
                )
            rec = self.read(path)
            if rec is not None and rec.status == "connected":
                return rec
            time.sleep(0.05)
        p.terminate()
        path.unlink(missing_ok=True)
        raise RemotedlError(f"the background tunnel did not connect within {timeout:g} s", hint=f"see {log}")
