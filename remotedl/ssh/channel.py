"""The one way remotedl runs code on a box: a script on stdin, values as positional parameters,
output framed so that the login shell's start-up noise never reaches the caller.

The command line ssh hands to the box's login shell is a constant (``BOOTSTRAP``) that bash,
zsh, fish, dash and tcsh all parse the same way. It starts ``/bin/sh``, which reads the script
and then each value from stdin, length-prefixed, so no value is ever spliced into code or seen
by a shell parser, a process list or an argv limit. The script's first act is to print a
marker with a fresh nonce on stdout and stderr; whatever came before it is start-up noise
(``echo Welcome`` in ``~/.bashrc``) and is dropped, remembered only to explain why git or
rsync cannot work on such a box. Whatever comes after it is the script's own output, byte for
byte. Anything the script needs beyond its values (a zip, a request) follows on stdin.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from remotedl import proc
from remotedl.errors import ConnectError, RemoteError
from remotedl.ssh import resident
from remotedl.ssh.openssh import connection_dropped, looks_like_ssh_failure, openssh_failure, ssh_argv
from remotedl.ssh.resolve import HostSpec

log = logging.getLogger("remotedl.ssh")


def _digest() -> str:
    """The agent version this laptop ships (its resident agent's socket is named after it)."""
    from remotedl.agent.client import build_agent

    return build_agent().digest


# Parsed identically by every login shell: single quotes hold no ', \, ! or newline.
BOOTSTRAP = "exec /bin/sh -c 'read -r n; eval \"$(dd bs=1 count=$n 2>/dev/null)\"'"

# Reads the values into "$@", then frames the output. A value without a newline comes as one
# line "=VALUE" that `read` takes whole (it stops at the newline; no process started); any other
# as its length in bytes, then the bytes, which dd reads exactly. ${SHELL##*/} tells the caller
# which start-up files ran.
_PROLOGUE = """\
read -r _rdl_c; set --
while [ "$#" -lt "$_rdl_c" ]; do
  IFS= read -r _rdl_l
  case $_rdl_l in
  =*) set -- "$@" "${{_rdl_l#=}}" ;;
  *) _rdl_v=$(dd bs=1 count="$_rdl_l" 2>/dev/null; echo .); set -- "$@" "${{_rdl_v%.}}" ;;
  esac
done
unset _rdl_c _rdl_l _rdl_v
printf '\\n@@rdl:%s %s\\n' {nonce} "${{SHELL##*/}}"; printf '\\n@@rdl:%s\\n' {nonce} >&2
"""

MAX_ANSWER = 64 << 20  # what a box may send back to a buffered call

# A request that holds no secret (a job list, a log, status) can travel in the command line
# instead of on stdin: sshd opens a session's input window only once the command started, so
# bytes on stdin reach the box one round trip later. The same framed bytes, base64 (safe inside
# single quotes in every login shell), are decoded on the box and fed to the same bootstrap as
# its stdin: scripts, values and what follows them arrive exactly as before. Not for secrets:
# the command line is visible to the box's other users while it runs.
INLINE_MAX = 48 << 10
_INLINE = 'printf %s "$1" | base64 -d | { read -r n; eval "$(dd bs=1 count=$n 2>/dev/null)"; }'


def inline_command(payload: bytes) -> str:
    import base64

    return f"exec /bin/sh -c '{_INLINE}' sh '{base64.b64encode(payload).decode()}'"


def no_base64(stderr: str) -> bool:
    """Whether an inline request failed because the box has no base64."""
    low = stderr.lower()
    return "base64" in low and ("not found" in low or "unknown command" in low or "invalid option" in low)


@dataclass(frozen=True)
class RemoteResult:
    command: str
    stdout: str
    stderr: str
    exit_code: int
    noise: str = ""  # what the login shell's start-up files printed before the script ran
    stdout_bytes: bytes = b""


def encode_request(script: str, args: Sequence[str], stdin: bytes = b"") -> tuple[str, bytes]:
    """(nonce, bytes for ssh's stdin): the framed script, its values, then ``stdin``."""
    nonce = os.urandom(8).hex()  # as secrets.token_hex(8), without importing random
    body = (_PROLOGUE.format(nonce=nonce) + script).encode()
    parts = [f"{len(body)}\n".encode(), body, f"{len(args)}\n".encode()]
    for a in args:
        if "\0" in a:
            raise ValueError("a value sent to the box cannot hold a NUL byte")
        raw = a.encode("utf-8", "surrogateescape")
        # A dd per value cost ~5 ms each on the box (a start request has 15 values).
        parts += [b"=" + raw + b"\n"] if b"\n" not in raw else [f"{len(raw)}\n".encode(), raw]
    return nonce, b"".join(parts) + stdin


class NoFrame(Exception):
    """The script never started: ssh failed, or the login shell could not start /bin/sh."""


def split_frame(data: bytes, nonce: str, *, with_shell: bool = False) -> tuple[bytes, bytes, str] | None:
    """(noise before the marker, output after it, login shell name) or None if no marker."""
    tag = f"@@rdl:{nonce}".encode()
    at = data.find(tag)
    if at < 0:
        return None
    end = data.find(b"\n", at)
    if end < 0:
        return None
    shell = data[at + len(tag) : end].decode(errors="replace").strip() if with_shell else ""
    noise = data[:at]
    if noise.endswith(b"\n"):
        noise = noise[:-1]  # the newline our marker starts with
    return noise, data[end + 1 :], shell


def box_key(spec: HostSpec) -> tuple[str, str, int, str, str]:
    """A box as this process reached it (the same alias may name another box under another
    ssh config)."""
    return (spec.alias, spec.hostname, spec.port, spec.user, str(spec.ssh_config))


def _contacted(spec: HostSpec) -> None:
    """This command talked to the box: jobs of it that ended may have outputs to bring home
    (remotedl.outputs, after the command)."""
    from remotedl.outputs import SEEN

    SEEN.contact(spec)


class Box:
    """A box reached through OpenSSH. Every call shares the host's master connection."""

    def __init__(self, spec: HostSpec, *, resident: bool = False, python: str = "python3") -> None:
        self.spec = spec
        # Whether requests may go to the box's resident agent (``remotedl.ssh.resident``), and
        # the python it runs under. Off for scripts that must see a fresh login (playbooks,
        # doctor's look at the start-up files).
        self.resident = resident
        self.python = python
        # What the login shell's start-up files printed before the last script ran: on stdout
        # (``noise``: it breaks git's and rsync's protocols, which use that stream) and on
        # stderr (``stderr_noise``: harmless to them, as `ssh box git-receive-pack` shows).
        self.noise = ""
        self.stderr_noise = ""
        self.login_shell = ""

    def argv(self, payload: bytes | None = None) -> list[str]:
        """ssh's argv: the bootstrap that reads the request on stdin, or with ``payload`` the
        request itself in the command line (``inline_command``)."""
        return ssh_argv(self.spec, BOOTSTRAP if payload is None else inline_command(payload))

    def _inline(self, wanted: bool, payload: bytes) -> bool:
        return wanted and len(payload) <= INLINE_MAX and not Box.no_base64.get(box_key(self.spec), False)

    # Boxes found without base64 (by where they are: an alias may name another box later in
    # the same process): their requests go on stdin.
    no_base64: dict[tuple[str, str, int, str, str], bool] = {}

    def run(
        self,
        script: str,
        *args: str,
        stdin: bytes | str | None = None,
        check: bool = True,
        timeout: float | None = None,
        max_output: int = MAX_ANSWER,
        inline: bool = False,
    ) -> RemoteResult:
        """Run a POSIX sh script on the box with ``args`` as "$1"..., and wait for it.
        ``inline``: the request holds no secret and may travel in the command line (one round
        trip less; see ``INLINE_MAX``)."""
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        nonce, payload = encode_request(script, args, data)
        first = script.strip().splitlines()[0] if script.strip() else ""
        local = self._resident_socket()
        done: proc.Completed | None = None
        failed_before = False
        if local is not None and local.exists():
            log.debug("remote %s (resident): %s ...", self.spec.alias, first[:80])
            try:
                done = self._run_resident(local, payload, len(data), timeout, max_output)
                resident.answered(local)
                inline = False
            except resident.Unavailable as e:
                log.debug("no resident agent answered: a session")
                failed_before = e.greeted_by_nobody
        spawn = done is None and local is not None and not resident.is_off(local)
        if done is None:
            if spawn:
                nonce, payload = encode_request(
                    resident.spawn_script(_digest()) + script, (self.python, *args), data
                )
            inline = self._inline(inline, payload)
            log.debug("remote %s: %s ... (%d lines, %d values%s)", self.spec.alias, first[:80],
                      script.count("\n") + 1, len(args), ", inline" if inline else "")  # fmt: skip
            try:
                if inline:
                    done = proc.communicate(
                        self.argv(payload), input=b"", timeout=timeout, max_stdout=max_output
                    )
                else:
                    done = proc.communicate(
                        self.argv(), input=payload, timeout=timeout, max_stdout=max_output
                    )
            except subprocess.TimeoutExpired:
                raise RemoteError(f"a command on {self.spec.alias} took longer than {timeout:g} s") from None
        out = split_frame(done.stdout, nonce, with_shell=True)
        if out is None and inline and no_base64(done.stderr.decode(errors="replace")):
            Box.no_base64[box_key(self.spec)] = True
            return self.run(script, *args, stdin=data, check=check, timeout=timeout, max_output=max_output)
        err = split_frame(done.stderr, nonce)
        stderr_text = (err[1] if err else done.stderr).decode(errors="replace")
        if spawn and local is not None and out is not None:
            stderr_text = resident.after_session(self.spec, local, stderr_text, failed_before=failed_before)
        if out is None:
            raise self._no_frame(done.returncode, done.stderr.decode(errors="replace"))
        noise, body, shell = out
        self.login_shell = shell
        _contacted(self.spec)
        self.noise = noise.decode(errors="replace").strip()
        self.stderr_noise = (err[0] if err else b"").decode(errors="replace").strip()
        if done.truncated:
            raise RemoteError(
                f"{self.spec.alias} sent more than {max_output >> 20} MiB in answer to one request: refused",
                hint="the box's remotedl agent or python3 may be broken or replaced",
            )
        if done.returncode == 255 and connection_dropped(stderr_text):
            raise ConnectError(
                f"the connection to {self.spec.display} was lost while a command ran: "
                f"{stderr_text.strip().splitlines()[-1]}",
                hint="run it again; if it keeps happening, check the link and ServerAliveInterval",
            )
        result = RemoteResult(
            script,
            body.decode(errors="replace"),
            stderr_text,
            done.returncode,
            "\n".join(n for n in (self.noise, self.stderr_noise) if n),
            body,
        )
        if check and result.exit_code != 0:
            last = (result.stderr.strip().splitlines() or [f"exit status {result.exit_code}"])[-1]
            raise RemoteError(f"command on {self.spec.alias} failed: {last}")
        return result

    def _resident_socket(self) -> Path | None:
        """The local end of the forward to this box's resident agent, when requests may use it."""
        if not self.resident or not resident.enabled(self.spec):
            return None
        return resident.local_path(self.spec, _digest())

    def _run_resident(
        self, local: Path, payload: bytes, tail_len: int, timeout: float | None, max_output: int
    ) -> proc.Completed:
        """The request over the socket (``resident.Unavailable``: nothing was sent)."""
        link = resident.Link(local)
        link.open(payload, tail_len)
        out = bytearray()
        err = bytearray()
        code = 255
        truncated = False
        try:
            for kind, chunk in link.frames(timeout):
                if kind == b"o":
                    out += chunk
                    if len(out) > max_output:
                        truncated = True
                        break
                elif kind == b"e":
                    err += chunk
                    if len(err) > 1 << 20:
                        del err[: len(err) - (1 << 20)]
                elif kind == b"x":
                    code = int(chunk or b"255")
        except TimeoutError:
            raise RemoteError(f"a command on {self.spec.alias} took longer than {timeout:g} s") from None
        except (OSError, ConnectionError):
            err += f"\nConnection to {self.spec.alias} closed by remote host.\n".encode()
            code = 255
        finally:
            link.close()
        return proc.Completed(code, bytes(out), bytes(err), truncated)

    def _no_frame(self, code: int, stderr: str) -> Exception:
        if code == 255 or looks_like_ssh_failure(stderr):
            return with_fingerprint(self.spec, openssh_failure(self.spec, stderr))
        last = (stderr.strip().splitlines() or [f"exit status {code}"])[-1]
        return ConnectError(
            f"{self.spec.alias}: the login shell did not start /bin/sh: {last}",
            hint="log in with `ssh` and check the account's shell and start-up files",
        )

    def start(
        self,
        script: str,
        *args: str,
        stdin: bytes = b"",
        on_line: Callable[[str], None] | None = None,
        inline: bool = False,
    ) -> FramedProcess:
        """Start a script whose output is read as it comes (logs, streams); ``on_line`` hears
        each line the script writes to stderr as it comes (from another thread). ``inline``: as
        for ``run`` (a box without base64 then fails to start it: ``NoFrame``)."""
        nonce, payload = encode_request(script, args, stdin)
        local = self._resident_socket()
        if local is not None and local.exists():
            link = resident.Link(local)
            try:
                link.open(payload, len(stdin))
            except resident.Unavailable:
                pass
            else:
                log.debug(
                    "remote %s (streaming, resident): %s",
                    self.spec.alias,
                    script.strip().splitlines()[0][:80],
                )
                sp = resident.SocketProcess(link, self.spec)
                return FramedProcess(self, sp, nonce, b"", on_line)  # type: ignore[arg-type]
        inline = self._inline(inline, payload)
        log.debug("remote %s (streaming%s): %s", self.spec.alias, ", inline" if inline else "",
                  script.strip().splitlines()[0][:80])  # fmt: skip
        if inline:
            p = proc.popen(self.argv(payload), stdin=subprocess.PIPE, text=False)
            return FramedProcess(self, p, nonce, b"", on_line, inline=True)
        p = proc.popen(self.argv(), stdin=subprocess.PIPE, text=False)
        return FramedProcess(self, p, nonce, payload, on_line)

    def close(self) -> None:
        """Nothing to close: the master connection persists for the next call."""

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FramedProcess:
    """A running framed script: ``read`` gives its stdout after the marker; stderr lines after
    the marker are collected by a thread (``stderr_lines``), ``on_line`` sees each one."""

    def __init__(
        self,
        box: Box,
        p: subprocess.Popen[bytes],
        nonce: str,
        payload: bytes,
        on_line: Callable[[str], None] | None = None,
        *,
        inline: bool = False,
    ) -> None:
        self.box = box
        self.inline = inline
        self.on_line = on_line
        self.process = p
        self.nonce = nonce
        self.stderr_lines: list[str] = []
        self.raw_stderr: list[str] = []
        self._buf = b""
        self._framed = False
        self._no_splice = False
        self._err_framed = threading.Event()
        self._writer = threading.Thread(target=self._feed, args=(payload,), daemon=True)
        self._writer.start()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _feed(self, payload: bytes) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(payload)
        except OSError:
            pass
        finally:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def _drain(self) -> None:
        assert self.process.stderr is not None
        tag = f"@@rdl:{self.nonce}"
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.raw_stderr.append(line)
            if not self._err_framed.is_set():
                if line == tag:
                    self._err_framed.set()
                continue
            self.stderr_lines.append(line)
            if self.on_line is not None:
                try:
                    self.on_line(line)
                except Exception:  # a listener's failure must not stop the draining
                    log.debug("on_line failed", exc_info=True)

    def read(self, n: int = 1 << 20) -> bytes:
        """The next chunk of the script's stdout; b"" at its end. Raises ``NoFrame`` when the
        output ended before the script started."""
        import os

        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        if not self._framed:
            while True:
                chunk = os.read(fd, n)
                if not chunk:
                    raise NoFrame(self._buf.decode(errors="replace"))
                self._buf += chunk
                got = split_frame(self._buf, self.nonce, with_shell=True)
                if got is not None:
                    noise, rest, shell = got
                    self.box.noise = noise.decode(errors="replace").strip()
                    self.box.login_shell = shell
                    self._framed = True
                    self._buf = b""
                    if rest:
                        return rest
                    break
                if len(self._buf) > MAX_ANSWER:
                    raise NoFrame("no frame marker in the first 64 MiB")
        return os.read(fd, n)

    def copy_to(self, fd: int, n: int = 1 << 20) -> int:
        """Move up to ``n`` bytes of the script's output (after the frame) straight to ``fd``
        in the kernel (splice: no copy through Python); 0 at its end. Falls back to a copy
        where the file descriptor cannot take a splice (a terminal)."""
        import os

        assert self._framed, "read() the first chunk before copy_to()"
        assert self.process.stdout is not None
        src = self.process.stdout.fileno()
        splice = getattr(os, "splice", None)
        if splice is not None and not self._no_splice:
            try:
                return int(splice(src, fd, n))
            except OSError:
                self._no_splice = True
        chunk = os.read(src, n)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        return len(chunk)

    def wait(self) -> int:
        code = self.process.wait()
        self._reader.join(5)
        return code

    def kill(self) -> None:
        self.process.kill()

    def stderr_text(self) -> str:
        return "\n".join(self.raw_stderr)


def with_fingerprint(spec: HostSpec, err: ConnectError) -> ConnectError:
    """An unknown or changed host key error, with the fingerprint the box offers now, so the
    user can compare it with the box's before trusting it."""
    from remotedl.errors import HostKeyError
    from remotedl.ssh.hostkeys import fetch_host_key

    if not isinstance(err, HostKeyError) or err.fingerprint or "jump host" in err.message:
        return err
    try:
        _, key = fetch_host_key(spec)
    except Exception:  # the error at hand says enough; the fingerprint is a bonus
        return err
    message = f"{err.message} ({key.key_type} {key.fingerprint})"
    return HostKeyError(message, err.hint, fingerprint=key.fingerprint)


@contextmanager
def open_box(spec: HostSpec) -> Iterator[Box]:
    box = Box(spec)
    try:
        yield box
    finally:
        box.close()


# ------------------------------------------------------------------ answers


_MARK = re.compile(r"^@@([a-z_][a-z0-9_-]*)(?: (.*))?$")


def parse_marks(text: str) -> dict[str, str]:
    """The ``@@key value`` lines of a script's answer (the first of each key wins); the one
    parser for every script that answers that way."""
    marks: dict[str, str] = {}
    for line in text.splitlines():
        m = _MARK.match(line)
        if m and m.group(1) not in marks:
            marks[m.group(1)] = m.group(2) or ""
    return marks


def mark_sections(text: str) -> dict[str, list[str]]:
    """``@@name`` section headers and the lines under each (``status`` answers this way)."""
    out: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = _MARK.match(line)
        if m and m.group(2) is None:
            current = m.group(1)
            out[current] = []
        elif m:
            out.setdefault(m.group(1), []).append(m.group(2) or "")
        elif current is not None:
            out[current].append(line)
    return out


# A shell function scripts use on path values: a leading ~ means the box user's home.
EXPAND_HOME = (
    'expand_home() { case $1 in "~") printf %s "$HOME";; '
    '"~/"*) printf %s "$HOME/${1#"~/"}";; *) printf %s "$1";; esac; }\n'
)
