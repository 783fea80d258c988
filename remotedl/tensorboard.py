"""Find or start TensorBoard on the box, for ``remotedl tensorboard``.

A TensorBoard already serving the directory (TensorBoard's own record of running servers,
``pid-*.info`` under ``.tensorboard-info`` in remotedl's private TMPDIR on the box, or in
``$TMPDIR``/``/tmp``, the one its notebook magic reads) is reused when the record is the box
user's own file, for a live process of the box user, and the server has a secret path prefix;
otherwise the project's TensorBoard (its ``.venv``, else PATH) starts in a tmux session on the
box, bound to 127.0.0.1, on the first free port from 6006. tmux gets the command as separate
words: no login shell parses the directory names. Several directories at once (one per job)
are one TensorBoard with ``--logdir_spec name:dir,...``, each run named by its job.

TensorBoard has no token, and every user of the box can reach its 127.0.0.1 port. So remotedl
serves it under a random path prefix (``--path_prefix /SECRET``; anything else answers 404)
that only the box user can know: made on the box, kept in a 0600 flag file under
``~/.remotedl`` and given to TensorBoard as ``--flagfile`` (never in its argv, which ``ps``
shows to all), recorded in its 0600 info record, and put in the tunnelled URL. A Unix socket
would be tighter but TensorBoard cannot serve one, and a proxy in front would be one more
server to keep alive; the prefix needs neither.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from remotedl.errors import RemoteError, UsageError
from remotedl.images import PICK_ENGINE
from remotedl.jupyter import ImageSpec
from remotedl.ssh import Box, HostSpec
from remotedl.ssh.channel import EXPAND_HOME

SESSION_PREFIX = "remotedl-tb-"

# "$1": remote_dir, then the directories to resolve. Each is printed as an absolute path
# (physical when it exists), then every live TensorBoard's info record.
_FIND = (
    EXPAND_HOME
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || { echo "@@nodir"; exit 0; }
shift
T=""
for c in ./.venv/bin/tensorboard ./venv/bin/tensorboard "$(command -v tensorboard 2>/dev/null)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then T=$c; break; fi
done
[ -n "$T" ] && echo "@@tensorboard $T"
echo "@@pwd $(pwd -P)"
for d in "$@"; do
  case $d in
    /*) p=$d ;;
    "~"|"~/"*) p=$(expand_home "$d") ;;
    *) p=$(pwd -P)/$d ;;
  esac
  if [ -d "$p" ]; then p=$(cd -- "$p" && pwd -P); echo "@@exists $p"; fi
  echo "@@logdir $p"
done
# Only the box user's own records of the box user's own live processes: another user can write
# records in the shared /tmp/.tensorboard-info (TensorBoard makes it 0777).
uid=$(id -u)
for f in "$HOME/.remotedl/tensorboard/.tensorboard-info"/pid-*.info \
         "${TMPDIR:-/tmp}"/.tensorboard-info/pid-*.info; do
  [ -f "$f" ] && [ ! -L "$f" ] && [ -O "$f" ] || continue
  pid=${f##*/pid-}; pid=${pid%.info}
  case $pid in ''|*[!0-9]*) continue;; esac
  if [ -d /proc/self ]; then
    [ -d "/proc/$pid" ] && [ -O "/proc/$pid" ] || continue
    # A record left by a killed TensorBoard names a pid the kernel may have handed out again.
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q tensorboard || continue
  else
    [ "$(ps -o uid= -p "$pid" 2>/dev/null | tr -d ' ')" = "$uid" ] || continue
    ps -o command= -p "$pid" 2>/dev/null | grep -q tensorboard || continue
  fi
  printf '@@info %s ' "$pid"; tr -d '\n' < "$f"; echo
done
"""
)

# With $s the session: its log and its 0600 flag file holding a new secret path prefix, and no
# older session of that name. Both starts below use it.
_SESSION_FLAGS = r"""log="$HOME/.remotedl/$s.log"
flags="$HOME/.remotedl/$s.flags"
secret=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
[ ${#secret} = 32 ] || { echo "@@nosecret"; exit 0; }
rm -f -- "$flags"
printf -- '--path_prefix=/%s\n' "$secret" > "$flags"
tmux kill-session -t "=$s" 2>/dev/null
"""

# "$1" remote_dir, "$2" tensorboard, "$3" session, "$4" port or "", then TensorBoard's own
# arguments (--logdir DIR or --logdir_spec SPEC). The words reach tmux, then sh -c with a
# constant script, then TensorBoard, each as its own argument. The path prefix is made here,
# on the box, into a 0600 flag file: it is in no argv on either side.
_START = (
    EXPAND_HOME
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
umask 077
mkdir -p "$HOME/.remotedl/tensorboard"
tb=$2 s=$3 port=$4
shift 4
"""
    + _SESSION_FLAGS
    + r"""
tmux new-session -d -s "$s" -c "$(pwd)" /bin/sh -c 'umask 077; log=$1; shift; exec "$@" > "$log" 2>&1' sh \
  "$log" env "TMPDIR=$HOME/.remotedl/tensorboard" "$tb" "--flagfile=$flags" --host 127.0.0.1 \
  ${port:+--port} ${port:+"$port"} "$@"
"""
)

# The same in a container of an image (``tensorboard --image``): the tmux session runs the
# engine's client (`docker run`, its output the log), the container is named after the session
# and shares the host's network (127.0.0.1) and process ids (its record's pid is the host's, so
# the look above finds it as it finds any), runs as the box user, and has the work tree, the
# records' directory and the flag file at the same paths. "$1" remote_dir, "$2" engine (or ""),
# "$3" image, "$4" session, "$5" port or "", "$6" how many of the rest are the engine's
# (mounts, container_args), then those, then TensorBoard's own arguments.
_START_IMAGE = (
    EXPAND_HOME
    + PICK_ENGINE
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
E=$2
[ -n "$E" ] || E=$(pick_engine)
if [ -z "$E" ] || ! command -v "$E" >/dev/null 2>&1; then echo "@@noengine ${2:-docker or podman}"; exit 0; fi
umask 077
mkdir -p "$HOME/.remotedl/tensorboard"
img=$3 s=$4 port=$5 m=$6
shift 6
"""
    + _SESSION_FLAGS
    + r"""
"$E" rm -f "$s" >/dev/null 2>&1
here=$(pwd -P) records="$HOME/.remotedl/tensorboard"
total=$# i=0
for a do  # the image and TensorBoard's command between the engine's words and TensorBoard's
  [ "$i" = "$m" ] && set -- "$@" "$img" tensorboard "--flagfile=$flags" --host 127.0.0.1 \
    ${port:+--port} ${port:+"$port"}
  set -- "$@" "$a"; i=$((i + 1))
done
shift "$total"
keep= init=--init
# Podman: rootless, the user's own ids inside, not subordinate ones; and no --init, which it
# refuses in the host's PID namespace (TensorBoard is a process of the host's there).
case $E in *podman*) init=; [ "$(id -u)" = 0 ] || keep=--userns=keep-id;; esac
tmux new-session -d -s "$s" -c "$here" /bin/sh -c 'umask 077; log=$1; shift; exec "$@" > "$log" 2>&1' sh \
  "$log" "$E" run --rm ${init:+"$init"} --pull=missing --name "$s" --network host --pid host \
  ${keep:+"$keep"} -u "$(id -u):$(id -g)" \
  -v "$here:$here" -v "$records:$records" -v "$flags:$flags:ro" -w "$here" \
  -e "TMPDIR=$records" -e HOME=/tmp "$@"
"""
)

_LOG = 'tail -n 5 "$HOME/.remotedl/$1.log" 2>/dev/null'


@dataclass
class TensorBoardServer:
    port: int
    serves: str  # the directory, or the --logdir_spec, it serves
    pid: int
    started: bool  # True when remotedl started it now
    path_prefix: str = ""
    runs: tuple[tuple[str, str], ...] = ()  # (name, directory) when it serves several

    label: ClassVar[str] = "TensorBoard"

    def url(self, local_port: int) -> str:
        return f"http://127.0.0.1:{local_port}{self.path_prefix.rstrip('/')}/"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reached_at(self, local_port: int, timeout: float = 3.0) -> bool:
        """Whether 127.0.0.1:``local_port`` here already is this server: its own process
        listens there (the box is this machine, as a sandbox box is), or a TensorBoard there
        serves the same directory (a tunnel to it is up). Then no tunnel is needed."""
        from remotedl.tunnel import listeners, local_json

        if self.pid and self.pid in listeners(local_port):
            return True
        prefix = self.path_prefix.rstrip("/")
        env = local_json(f"http://127.0.0.1:{local_port}{prefix}/data/environment", timeout)
        return isinstance(env, dict) and env.get("data_location") == self.serves


def serves_tensorboard(local_port: int, timeout: float = 3.0) -> bool:
    """Whether 127.0.0.1:``local_port`` here is a TensorBoard (it may be the box's own). One
    that remotedl started answers only under its secret prefix, so its listening process's
    command line tells too."""
    from pathlib import Path

    from remotedl.tunnel import listeners, local_json

    for pid in listeners(local_port):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(w.rsplit(b"/", 1)[-1] == b"tensorboard" for w in words):
            return True
    env = local_json(f"http://127.0.0.1:{local_port}/data/environment", timeout)
    return isinstance(env, dict) and "data_location" in env


@dataclass
class _Look:
    tensorboard: str | None
    pwd: str
    logdirs: list[str]
    exists: set[str]
    infos: list[dict[str, Any]]
    nodir: bool = False


def _find(box: Box, remote_dir: str, dirs: Sequence[str]) -> _Look:
    out = box.run(_FIND, remote_dir, *dirs, check=False).stdout
    look = _Look(None, "", [], set(), [])
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        if key == "@@nodir":
            look.nodir = True
        elif key == "@@tensorboard":
            look.tensorboard = value
        elif key == "@@pwd":
            look.pwd = value
        elif key == "@@logdir":
            look.logdirs.append(value)
        elif key == "@@exists":
            look.exists.add(value)
        elif key == "@@info":
            pid, _, text = value.partition(" ")
            try:
                info = json.loads(text)
            except ValueError:
                continue
            # The record names the process whose file it is (the file's own pid, checked there).
            if isinstance(info, dict) and isinstance(info.get("port"), int) and str(info.get("pid")) == pid:
                look.infos.append(info)
    return look


def _served(info: dict[str, Any]) -> str:
    """What a running TensorBoard serves: its --logdir made absolute against the directory it
    started in, or its --logdir_spec as given."""
    logdir = str(info.get("logdir") or "")
    wd, arguments = "", []
    try:
        key = json.loads(base64.b64decode(str(info.get("cache_key", ""))))
        wd = str(key.get("working_directory") or "")
        arguments = [str(a) for a in key.get("arguments") or []]
    except (ValueError, TypeError, AttributeError):
        pass
    if any(a == "--logdir_spec" or a.startswith("--logdir_spec=") for a in arguments):
        return logdir
    if logdir.startswith("/"):
        return posixpath.normpath(logdir)
    return posixpath.normpath(posixpath.join(wd, logdir)) if logdir and wd else logdir


def _private(info: dict[str, Any]) -> bool:
    """Served under a secret path prefix (as remotedl starts it): a long random first part."""
    prefix = str(info.get("path_prefix") or "").strip("/")
    return len(prefix) >= 32 and "/" not in prefix


def logdir_spec(runs: Sequence[tuple[str, str]]) -> str:
    """TensorBoard's ``--logdir_spec``: name:dir,... (names and dirs may hold neither , nor :)."""
    for name, d in runs:
        if any(c in name for c in ",:") or "," in d:
            raise UsageError(
                f"TensorBoard cannot take the run '{name}' at {d}: a name holds , or :, or a path holds ,"
            )
    return ",".join(f"{name}:{d}" for name, d in runs)


def find_or_start(
    spec: HostSpec,
    remote_dir: str,
    logdir: str | None = None,
    *,
    runs: Sequence[tuple[str, str]] = (),
    remote_port: int | None = None,
    timeout: float = 90.0,
    on_progress: Callable[[str], None] | None = None,
    image: ImageSpec | None = None,
) -> TensorBoardServer:
    """A TensorBoard serving ``logdir`` (relative to the work tree ``remote_dir``), or, with
    ``runs`` [(name, directory)], one serving each directory as a run of that name; with
    ``image``, in a container of that image."""
    say = on_progress or (lambda text: None)
    say(f"looking for TensorBoard on {spec.alias}")
    box = Box(spec)
    dirs = [d for _, d in runs] if runs else [logdir or "runs"]
    look = _find(box, remote_dir, dirs)
    if look.tensorboard is None and image is None:
        raise RemoteError(
            f"TensorBoard is not installed on {spec.alias} "
            "(no tensorboard in the project's .venv or on PATH)",
            hint="install it in the project's environment there, e.g. `pip install tensorboard`, "
            "or add tensorboard to its requirements",
        )
    if runs:
        resolved = [(n, d) for (n, _), d in zip(runs, look.logdirs, strict=True) if d in look.exists]
        if not resolved:
            raise RemoteError(
                f"none of the jobs has the directory on {spec.alias}: "
                + ", ".join(d for _, d in runs[:3])
                + (" ..." if len(runs) > 3 else ""),
                hint="is LOGDIR where the jobs write their event files (e.g. runs)?",
            )
        serves = logdir_spec(resolved)
        args = ["--logdir_spec", serves]
    else:
        serves = look.logdirs[0]
        resolved = []
        args = ["--logdir", serves]
    for info in look.infos:
        if not _private(info):
            continue  # started without a secret prefix: any user of the box could read it
        if _served(info) == serves and (remote_port is None or info["port"] == remote_port):
            return TensorBoardServer(
                int(info["port"]),
                serves,
                int(info.get("pid") or 0),
                started=False,
                path_prefix=str(info.get("path_prefix") or ""),
                runs=tuple(resolved),
            )
    session = SESSION_PREFIX + hashlib.sha256(serves.encode()).hexdigest()[:10]
    port = str(remote_port) if remote_port else ""
    t0 = time.time()
    if image is not None:
        # The directories it serves outside the work tree, at the same paths, read-only.
        served = [d for _, d in resolved] if runs else [serves]
        outside = [d for d in served if not (d + "/").startswith(look.pwd.rstrip("/") + "/")]
        words = [w for d in outside for w in ("-v", f"{d}:{d}:ro")] + list(image.args or [])
        out = box.run(
            _START_IMAGE, remote_dir, image.engine or "", image.image, session, port, str(len(words)),
            *words, *args,
        ).stdout  # fmt: skip
        if "@@noengine" in out:
            raise RemoteError(
                f"no container engine on {spec.alias}: TensorBoard in an image needs one",
                hint="`remotedl setup docker` installs one; or drop --image",
            )
    else:
        out = box.run(_START, remote_dir, str(look.tensorboard), session, port, *args).stdout
    if "@@nosecret" in out:
        raise RemoteError(f"cannot make a secret on {spec.alias}: /dev/urandom or od did not answer")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        say(f"starting TensorBoard on {spec.alias}")
        look = _find(box, remote_dir, dirs)
        for info in look.infos:
            fresh = float(info.get("start_time") or 0) >= int(t0) - 5
            if _private(info) and _served(info) == serves and fresh:
                return TensorBoardServer(
                    int(info["port"]),
                    serves,
                    int(info.get("pid") or 0),
                    started=True,
                    path_prefix=str(info.get("path_prefix") or ""),
                    runs=tuple(resolved),
                )
        alive = box.run('tmux has-session -t "=$1" 2>/dev/null && echo yes', session, check=False)
        if "yes" not in alive.stdout:
            break
        time.sleep(0.5)
    log = box.run(_LOG, session, check=False).stdout.strip()
    raise RemoteError(
        f"TensorBoard did not start on {spec.alias}: " + (log.splitlines()[-1] if log else "no log"),
        hint=f"see ~/.remotedl/{session}.log on the box",
    )
