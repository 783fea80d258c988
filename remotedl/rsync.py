"""rsync for data: argv, progress, failures.

Files are whole or absent under their names: rsync writes each file aside and renames it into
place; a cut transfer keeps its partial data in ``.remotedl-partial/`` (never under the real name,
where a job would read it as complete) and the next run resumes from it, sending only what is
missing. With ``--delay-updates`` the files of one transfer take their names together at its end.

Progress: ``--info=progress2`` reports bytes of the files sent so far against the size of the
whole data set (files already up to date included), so its percentage ends below 100 when only
some files change. The bar wants the bytes *this* transfer sends: when a transfer runs longer
than ``TOTAL_AFTER`` seconds, a dry run beside it (``-n --stats``, the same file list and quick
check, no data) tells the total; short transfers never pay for it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from remotedl import proc
from remotedl.errors import ConnectError, RemotedlError, RemoteError
from remotedl.ssh.openssh import openssh_failure, ssh_command_string
from remotedl.ssh.resolve import HostSpec

PARTIAL_DIR = ".remotedl-partial"
TOTAL_AFTER = 0.5  # seconds: a transfer still running then gets its total from a dry run


@dataclass
class Progress:
    """One progress report from a transfer: ``bytes_done`` of the files it sends, of ``total``
    (None until known); ``percent`` as rsync counts it (of the whole data set)."""

    label: str
    bytes_done: int
    percent: int
    rate: str
    total: int | None = None
    done: bool = False


@dataclass
class Stage:
    """What a push or pull is doing now, for a status line ("snapshot: listing untracked files")."""

    text: str


ProgressFn = Callable[[Progress | Stage], None]


@dataclass
class Transfer:
    path: str
    files_transferred: int
    bytes_transferred: int  # the size of the files sent
    literal_bytes: int = 0  # what actually crossed (rsync's delta sends only what differs)


_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s+(\S+/s)")
_STATS_FILES = re.compile(r"Number of regular files transferred: ([\d,]+)")
_STATS_BYTES = re.compile(r"Total transferred file size: ([\d,]+)")
_CUT = re.compile(r"Broken pipe|connection unexpectedly closed|Connection reset|timeout in data send")
_STATS_LITERAL = re.compile(r"Literal data: ([\d,]+)")


def parse_progress(line: str) -> tuple[int, int, str] | None:
    """(bytes, percent, rate) from one ``--info=progress2`` frame."""
    m = _PROGRESS.match(line)
    if not m:
        return None
    return int(m.group(1).replace(",", "")), int(m.group(2)), m.group(3)


def parse_stats(text: str) -> tuple[int, int]:
    """(regular files transferred, their total size) from ``--stats`` output."""
    files = _STATS_FILES.search(text)
    size = _STATS_BYTES.search(text)
    return (
        int(files.group(1).replace(",", "")) if files else 0,
        int(size.group(1).replace(",", "")) if size else 0,
    )


def rsync_argv(
    spec: HostSpec,
    sources: Sequence[str],
    dest: str,
    *,
    delete: bool = False,
    excludes: Sequence[str] = (),
    update: bool = False,
    exclude_from_stdin: bool = False,
    itemize: bool = False,
    checksum: bool = False,
) -> list[str]:
    argv = [
        "rsync",
        "-a",
        "--relative",  # keep each path's place relative to the project root (the "./" anchor)
        # A cut file's data waits in PARTIAL_DIR (never under its name) and resumes from there;
        # rsync excludes that directory from the transfer itself.
        f"--partial-dir={PARTIAL_DIR}",
        "--delay-updates",
        protect_args_flag(),  # names never reach a shell
        "--info=progress2",
        "--no-inc-recursive",  # the whole file list first: a total known up front
        "--stats",
        "-e",
        ssh_command_string(spec),
    ]
    if delete:
        argv.append("--delete")
    if update:
        argv.append("--update")  # never overwrite a newer file on the receiving side
    if checksum:
        argv.append("--checksum")  # by content, not size and time: a file the same here is left alone
    for pattern in excludes:
        argv += ["--exclude", pattern]
    if exclude_from_stdin:
        argv += ["--from0", "--exclude-from=-"]
    if itemize:
        # A line per file written (ITEM_MARK, rsync's change string, the name) and one per file
        # --update left alone ("NAME is newer"): pull says what it replaced and what it kept.
        argv += [f"--out-format={ITEM_MARK} %i %n", "--info=skip1"]
    return [*argv, "--", *sources, dest]


ITEM_MARK = "@@rdl-item"


@dataclass
class Items:
    """What one itemized transfer did, by name (relative to the destination)."""

    written: list[str]  # files and symlinks created or replaced
    replaced: list[str]  # of those, the ones that existed before
    newer_here: list[str]  # left alone by --update: the receiving side's copy is newer


def _unescape(name: str) -> str:
    """A name as rsync prints it (non-printable bytes as backslash-hash and three octal digits)."""
    if "\\#" not in name:
        return name
    raw = name.encode("utf-8", "surrogateescape")
    out = re.sub(rb"\\#([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw)
    return out.decode("utf-8", "surrogateescape")


def parse_items(lines: Sequence[str]) -> Items:
    items = Items([], [], [])
    for line in lines:
        if line.startswith(ITEM_MARK + " "):
            code, _, name = line[len(ITEM_MARK) + 1 :].partition(" ")
            if len(code) >= 2 and code[0] in ">c" and code[1] in "fL" and name:
                items.written.append(_unescape(name))
                if "+" not in code[2:]:
                    items.replaced.append(_unescape(name))
        elif line.endswith(" is newer"):
            items.newer_here.append(_unescape(line[: -len(" is newer")]))
    return items


_RSYNC_NEW: bool | None = None


def protect_args_flag() -> str:
    return "--secluded-args" if _rsync_new() else "--protect-args"


def _rsync_new() -> bool:
    global _RSYNC_NEW
    if _RSYNC_NEW is None:
        out = proc.run(["rsync", "--version"], check=False).stdout
        m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out)
        _RSYNC_NEW = bool(m) and tuple(int(x) for x in m.groups()) >= (3, 2, 4)  # type: ignore[union-attr]
    return _RSYNC_NEW


def literal(name: str) -> str:
    """An rsync filter pattern matching exactly ``name``: rsync reads ``*?[`` as wildcards, and
    a backslash escapes only where a wildcard is present."""
    if any(c in name for c in "*?["):
        return re.sub(r"([*?\[\\])", r"\\\1", name)
    return name


# What each login shell says when rsync is not on the box's PATH: bash, dash, zsh, fish, tcsh.
_NOT_FOUND = re.compile(
    r"\brsync: (?:command )?not found|command not found: rsync\b|Unknown command:? '?rsync\b"
    r"|\brsync: Command not found",
)


def rsync_failure(alias: str, label: str, code: int, err: str) -> RemotedlError:
    """The error for an rsync that exited ``code`` (not an ssh failure), from its stderr."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    detail = lines[0] if lines else f"exit status {code}"
    if code == 127 or "remote command not found" in err or _NOT_FOUND.search(err):
        # The box's shell could not find rsync ("bash: line 1: rsync: command not found";
        # rsync itself says "remote command not found (code 127)", or, when the pipe closed
        # before it saw the shell's exit, "error in rsync protocol data stream (code 12)").
        return RemoteError(
            f"rsync is not installed on {alias}",
            hint="install it there (`sudo apt-get install rsync`), or run `remotedl setup base`",
        )
    if "protocol version mismatch" in err or "is your shell clean" in err:
        return RemoteError(
            f"rsync of {label} failed: the box's shell prints text that breaks rsync's protocol",
            hint="make the start-up files of the box's shell (~/.bashrc, ...) print nothing "
            "when not interactive (test: `ssh BOX true` must print nothing)",
        )
    if code == 23 and "No such file or directory" in err:
        return RemotedlError(f"{label}: no such file: {detail}")
    if "No space left on device" in err:
        return RemoteError(
            f"rsync of {label} failed: no space left on the receiving side",
            hint="free some space and run it again: what was sent is kept aside and resumes",
        )
    return RemotedlError(f"rsync of {label} failed ({code}): {detail}")


class _Total:
    """The dry run that learns how many bytes a long transfer sends."""

    def __init__(self, argv: list[str], stdin: bytes | None) -> None:
        self.value: int | None = None
        self._argv = [argv[0], "-n", *[a for a in argv[1:] if not a.startswith("--info=")]]
        self._stdin = stdin
        self._process: object = None
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        if self._cancel.wait(TOTAL_AFTER):
            return
        import subprocess

        p = proc.popen(
            self._argv,
            stdin=subprocess.PIPE if self._stdin is not None else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=False,
        )
        self._process = p
        if self._cancel.is_set():
            p.kill()
        try:
            out, _ = p.communicate(self._stdin)
        except Exception:  # the total is a nicety: a failed dry run leaves it unknown
            p.kill()
            return
        if p.returncode == 0 and not self._cancel.is_set():
            self.value = parse_stats(out.decode(errors="replace"))[1]

    def stop(self) -> None:
        self._cancel.set()
        p = self._process
        if p is not None:
            p.kill()  # type: ignore[attr-defined]
        self._thread.join(5)


def run_rsync(
    spec: HostSpec,
    argv: list[str],
    label: str,
    progress: ProgressFn | None,
    *,
    stdin: bytes | None = None,
    lines: list[str] | None = None,
) -> Transfer:
    """Run one rsync, reporting progress; the errors it can meet mapped to one line each.
    ``lines``: gets the lines rsync printed (an itemized transfer's, see ``parse_items``)."""
    tail = b""
    collected = bytearray()
    total = _Total(argv, stdin) if progress is not None else None
    last = [0, 0, ""]

    def on_stdout(chunk: bytes) -> None:
        nonlocal tail
        collected.extend(chunk)
        tail += chunk
        parts = re.split(rb"[\r\n]", tail)
        tail = parts.pop()
        for raw in parts:
            got = parse_progress(raw.decode(errors="replace"))
            if got and progress is not None:
                last[:] = got
                known = total.value if total is not None else None
                progress(Progress(label, got[0], got[1], got[2], known))

    if total is not None:
        total.start()
    try:
        done = proc.communicate(argv, on_stdout=on_stdout, input=stdin)
    finally:
        if total is not None:
            total.stop()
    err = done.stderr.decode(errors="replace")
    code = done.returncode
    text = collected.decode(errors="replace")
    if code == 255 or (code == 12 and "connection unexpectedly closed" in err and "ssh" in err.lower()):
        raise openssh_failure(spec, err)
    known = "not found" in err or "protocol version mismatch" in err  # a missing rsync, a noisy shell
    if code in (10, 12, 20, 35) and _CUT.search(err) and not known:
        # The connection went away mid-transfer (rsync saw the pipe to ssh break).
        raise ConnectError(
            f"the connection to {spec.alias} was lost during the rsync of {label}",
            hint="run it again: what was sent is kept aside on the receiving side and the transfer resumes",
        )
    if code != 0:
        raise rsync_failure(spec.alias, label, code, err)
    if lines is not None:
        lines.extend(x for x in re.split(r"[\r\n]", text) if x)
    files, size = parse_stats(text)
    literal_match = _STATS_LITERAL.search(text)
    literal_bytes = int(literal_match.group(1).replace(",", "")) if literal_match else 0
    if progress is not None:
        progress(Progress(label, size, 100, str(last[2]), size, done=True))
    return Transfer(label, files, size, literal_bytes)
