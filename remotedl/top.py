"""``remotedl top``: the fleet's GPUs and jobs, live, from one long-lived stream per box.

Each box runs one framed POSIX sh script (``Box.start``) for as long as ``top`` watches: every
interval it samples nvidia-smi (GPUs, compute processes with their users), the active job
records under ``~/.remotedl/jobs`` and the load average, and writes one sample, a block of
``@@section`` lines that ends with ``@@sample-end N``. No new SSH login per refresh: the
stream rides the host's master connection and stays open. When a stream drops (the box
rebooted, the link went down), its thread starts it again with a growing pause and the box
shows as reconnecting meanwhile.

Library only: ``Watch`` gives snapshots (``BoxSample``); the CLI renders them.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from remotedl import gpus as gpumod
from remotedl.errors import RemotedlError, RemoteError
from remotedl.schema import JobRecord, job_holders
from remotedl.ssh.channel import Box, NoFrame, mark_sections
from remotedl.status import gpu_facts, records

if TYPE_CHECKING:
    from remotedl.fleet import Fleet

log = logging.getLogger("remotedl.top")

# "$1": seconds between samples; "$2": "once" for one sample (run placement). Sections as in
# `status`; the job records of active jobs (the agent writes them, one JSON each). A write to a
# laptop that left ends the script (SIGPIPE).
_SCRIPT = r"""
n=0
nv=no; command -v nvidia-smi >/dev/null 2>&1 && nv=yes
while :; do
  n=$((n + 1))
  echo "@@sample $n"
  echo "@@nvidia $nv"
  echo @@load; cat /proc/loadavg 2>/dev/null
  if [ "$nv" = yes ]; then
    echo @@gpus; QUERY_GPUS 2>&1; echo "@@gpus_rc $?"
    echo @@apps; QUERY_APPS 2>/dev/null | while IFS= read -r line; do
      pid=$(printf '%s' "$line" | cut -d, -f2 | tr -d ' ')
      printf '%s\t%s\n' "$line" "$(ps -o user= -p "$pid" 2>/dev/null | tr -d ' ')"; done
  fi
  echo @@jobs
  if cd "$HOME/.remotedl/jobs" 2>/dev/null; then
    grep -l -E '"status": "(running|starting|queued)"' -- *.json 2>/dev/null | while IFS= read -r f; do
      tr -d '\n' < "$f"; echo; done
    cd /
  fi
  echo "@@sample-end $n" || exit 0
  [ "$2" = once ] && exit 0
  sleep "$1" 2>/dev/null || sleep 1
done
"""

State = Literal["connecting", "live", "reconnecting", "down"]

MAX_BACKOFF = 10.0
MAX_SAMPLE = 8 << 20  # a box that sends more than this without ending a sample is not our script


def sampler_script() -> str:
    return _SCRIPT.replace("QUERY_GPUS", shlex.join(gpumod.QUERY_GPUS)).replace(
        "QUERY_APPS", shlex.join(gpumod.QUERY_APPS)
    )


@dataclass
class BoxSample:
    """What ``top`` knows about one box now."""

    host: str
    state: State = "connecting"
    sampled: float | None = None  # time.time() when the last sample arrived
    samples: int = 0
    gpus: list[gpumod.Gpu] = field(default_factory=list)
    nvidia_error: str | None = None
    held_by: dict[int, str] = field(default_factory=dict)
    jobs: list[JobRecord] = field(default_factory=list)  # active: running, starting, queued
    load: list[float] = field(default_factory=list)
    error: str | None = None  # why the stream is down now (the last failure)
    attempts: int = 0  # reconnect attempts since the last sample

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_sample(host: str, text: str) -> BoxSample:
    """One sample block (the lines between ``@@sample N`` and ``@@sample-end N``)."""
    s = mark_sections(text)
    nvidia = (s.get("nvidia") or ["no"])[0] == "yes"
    gpus, error = gpu_facts(s, nvidia)
    jobs = records(s.get("jobs", []))
    load: list[float] = []
    for line in s.get("load", [])[:1]:
        try:
            load = [float(x) for x in line.split()[:3]]
        except ValueError:
            load = []
    return BoxSample(
        host,
        state="live",
        sampled=time.time(),
        gpus=gpus,
        nvidia_error=error,
        held_by=job_holders(jobs),
        jobs=sorted(jobs, key=lambda r: r.id),
        load=load,
    )


class SampleReader:
    """Splits a stream's bytes into sample blocks."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[str] = []

    def feed(self, data: bytes) -> list[str]:
        """The complete samples ``data`` ends (as text), oldest first."""
        self._buf += data
        done: list[str] = []
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith("@@sample-end"):
                done.append("\n".join(self._lines))
                self._lines = []
            elif line.startswith("@@sample "):
                self._lines = []
            else:
                self._lines.append(line)
        if len(self._buf) + sum(len(x) for x in self._lines) > MAX_SAMPLE:
            raise RemotedlError("the box sent an endless sample: not remotedl's sampler")
        return done


@dataclass(frozen=True)
class Target:
    """A box to watch: its name and how to reach it, or why it cannot be reached at all."""

    host: str
    box: Box | None = None
    error: str | None = None  # resolution failed (a bad ssh config): nothing to retry


class Watch:
    """One thread and one stream per box; ``snapshot()`` gives every box's latest sample.

    ``on_change`` is called (from a watcher thread) when a box changes state or sends its
    first sample, so a view can refresh at once rather than at its next tick."""

    def __init__(
        self,
        targets: Sequence[Target],
        interval: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.interval = interval
        self.on_change = on_change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._procs: dict[str, Any] = {}
        self._samples: dict[str, BoxSample] = {}
        self._order = [t.host for t in targets]
        self._targets = list(targets)
        self._threads: list[threading.Thread] = []
        self._first = threading.Condition(self._lock)
        for t in targets:
            sample = BoxSample(t.host)
            if t.box is None:
                sample.state, sample.error = "down", t.error or "cannot be reached"
            self._samples[t.host] = sample

    def start(self) -> Watch:
        for t in self._targets:
            if t.box is not None:
                th = threading.Thread(target=self._watch, args=(t.host, t.box), daemon=True)
                th.start()
                self._threads.append(th)
        return self

    def snapshot(self) -> list[BoxSample]:
        with self._lock:
            return [self._samples[h] for h in self._order]

    def wait_first(self, timeout: float) -> bool:
        """Wait until every box has sent a sample or failed once; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._first:
            while not all(s.samples or s.state in ("reconnecting", "down") for s in self._samples.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._first.wait(left)
        return True

    def stop(self) -> None:
        """End every stream (their ssh processes) and their threads."""
        self._stop.set()
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            try:
                p.kill()
            except OSError:
                pass
        for th in self._threads:
            th.join(5)

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- per box

    def _set(self, host: str, sample: BoxSample, *, notify: bool) -> None:
        with self._first:
            self._samples[host] = sample
            self._first.notify_all()
        if notify and self.on_change is not None:
            self.on_change()

    def _failed(self, host: str, error: str) -> None:
        with self._lock:
            old = self._samples[host]
        new = dataclasses.replace(old, state="reconnecting", error=error, attempts=old.attempts + 1)
        self._set(host, new, notify=True)

    def _watch(self, host: str, box: Box) -> None:
        script = sampler_script()
        delay = 0.5
        while not self._stop.is_set():
            error = self._stream(host, box, script)
            if self._stop.is_set():
                return
            got_samples = self._samples[host].state == "live"
            if got_samples:
                delay = 0.5
            self._failed(host, error)
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _stream(self, host: str, box: Box, script: str) -> str:
        """Read one stream until it ends; why it ended."""
        from remotedl.ssh.openssh import openssh_failure

        try:
            p = box.start(script, f"{self.interval:g}")
        except OSError as e:
            return f"cannot start ssh: {e}"
        with self._lock:
            self._procs[host] = p
        if self._stop.is_set():
            p.kill()
        reader = SampleReader()
        ended = "the stream ended"
        framed = True
        try:
            while True:
                chunk = p.read()
                if not chunk:
                    break
                for text in reader.feed(chunk):
                    with self._lock:
                        old = self._samples[host]
                    sample = parse_sample(host, text)
                    sample.samples = old.samples + 1
                    self._set(host, sample, notify=old.state != "live")
        except NoFrame:
            framed = False
        except RemotedlError as e:
            ended = e.message
        finally:
            p.kill()
            code = p.wait()
            with self._lock:
                self._procs.pop(host, None)
        last = [x for x in p.stderr_lines if x.strip()][-1:]
        if not framed:  # ssh never reached the box (or its shell did not start /bin/sh)
            err = p.stderr_text()
            ended = openssh_failure(box.spec, err).message if err.strip() else "ssh ended"
        elif code == 255:
            ended = "the connection was lost" + (f": {last[0]}" if last else "")
        elif last and ended == "the stream ended":
            ended = f"the stream ended: {last[0]}"
        log.debug("top stream of %s ended: %s", host, ended)
        return ended


def sample_once(host: str, box: Box) -> BoxSample:
    """One sample of a box (one exec): its GPUs, their holders, its active jobs and load."""
    result = box.run(sampler_script(), "0", "once", check=False)
    samples = SampleReader().feed(result.stdout_bytes)
    if not samples:
        last = (result.stderr.strip().splitlines() or [f"exit status {result.exit_code}"])[-1]
        raise RemoteError(f"could not read the GPUs and jobs of {host}: {last}")
    sample = parse_sample(host, samples[-1])
    sample.samples = 1
    return sample


def targets_for(fleet: Fleet) -> list[Target]:
    """Resolve every host of a fleet at once; one that does not resolve is a ``Target`` with
    its error."""
    resolved = fleet.map(lambda m: m.box())
    return [
        Target(r.host, box=r.value) if r.ok else Target(r.host, error=str(r.error)) for r in resolved.results
    ]
