"""Find or start Jupyter on the box, for ``remotedl tunnel --jupyter`` / ``remotedl jupyter``.

A server already running for the project (``jupyter server list --json`` in the project's
environment) is reused; otherwise JupyterLab (or a plain jupyter_server when JupyterLab is
not installed) starts in a tmux session on the box, bound to 127.0.0.1, with a random token
passed through the environment (never on a command line that ``ps`` shows).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from remotedl.errors import RemoteError
from remotedl.images import PICK_ENGINE
from remotedl.ssh import Box, HostSpec
from remotedl.ssh.channel import EXPAND_HOME, parse_marks

COLAB_ORIGIN = "https://colab.research.google.com"
SESSION = "remotedl-jupyter"

# "$1": remote_dir.
_FIND = (
    EXPAND_HOME
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
J=""
for c in ./.venv/bin/jupyter ./venv/bin/jupyter "$(command -v jupyter 2>/dev/null)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then J=$c; break; fi
done
if [ -z "$J" ]; then echo "@@none"; exit 0; fi
echo "@@jupyter $J"
echo "@@pwd $(pwd -P)"
"$J" lab --version >/dev/null 2>&1 && echo "@@lab"
tmux has-session -t "=$SESSION" 2>/dev/null && echo "@@session"
# Jupyter lists a server while a process has its pid: one killed hard (SIGHUP, OOM, a reboot)
# left its runtime file, and once the kernel hands that pid to another program it would be
# found running. Where /proc tells, a server whose pid is no Jupyter is left out.
"$J" server list --json 2>/dev/null | while IFS= read -r line; do
  pid=$(printf '%s\n' "$line" | sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p')
  if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q jupyter || continue
  fi
  printf '%s\n' "$line"
done
"""
)

# "$1" remote_dir, "$2" jupyter, "$3" lab|server, "$4" port, "$5" port retries, "$6" colab
# origin or "", "$7" the token. The token reaches Jupyter through a 0600 file read inside the
# session, so it is in no process's arguments: not ssh's, not sh's, not tmux's.
_START = (
    EXPAND_HOME
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
umask 077
mkdir -p "$HOME/.remotedl"
tok="$HOME/.remotedl/jupyter.token.$$"
printf %s "$7" > "$tok"
tmux kill-session -t "=$SESSION" 2>/dev/null
# Jupyter refuses root without --allow-root; a root box (cloud VMs, containers) is common.
[ "$(id -u)" = 0 ] && root=--allow-root || root=--ServerApp.allow_root=False
extra=--ServerApp.allow_credentials=False
[ -n "$6" ] && extra=--ServerApp.allow_origin=$6
# Several words after the session options: tmux runs them directly, no login shell between.
tmux new-session -d -s "$SESSION" -c "$(pwd)" /bin/sh -c '
  JUPYTER_TOKEN=$(cat "$1") && rm -f "$1" && export JUPYTER_TOKEN || exit 1
  shift
  exec "$@" > "$HOME/.remotedl/jupyter.log" 2>&1' sh "$tok" "$2" "$3" --no-browser \
  --ServerApp.ip=127.0.0.1 "--ServerApp.port=$4" "--ServerApp.port_retries=$5" \
  --ServerApp.root_dir=. "$root" "$extra" ${6:+--ServerApp.allow_credentials=True} \
  || { rm -f "$tok"; exit 1; }
"""
)


# Jupyter in a container image (``jupyter --image``): one container per box user, named after
# the user's uid, on the host's network bound to 127.0.0.1 only, the work tree at the same path.
# The engine: "$2" or the first of docker, podman. The same prelude for the look and the start.
_ENGINE = (
    EXPAND_HOME
    + PICK_ENGINE
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
E=$2
[ -n "$E" ] || E=$(pick_engine)
if [ -z "$E" ] || ! command -v "$E" >/dev/null 2>&1; then echo "@@noengine ${2:-docker or podman}"; exit 0; fi
name="remotedl-jupyter-$(id -u)"
echo "@@pwd $(pwd -P)"
"""
)

# "$1" remote_dir, "$2" engine. The running container's work tree, then its servers.
_FIND_IMAGE = (
    _ENGINE
    + r"""
# Podman's ps has the labels as a map, docker's has a Label function.
case $E in *podman*) f='{{index .Labels "remotedl.jupyter"}}';; *) f='{{.Label "remotedl.jupyter"}}';; esac
here=$("$E" ps --filter "name=^$name\$" --format "$f" 2>/dev/null)
[ -n "$here" ] || exit 0
echo "@@running $here"
"$E" exec "$name" jupyter lab --version >/dev/null 2>&1 && echo "@@lab"
"$E" exec "$name" jupyter server list --json 2>/dev/null
"""
)

# "$1" remote_dir, "$2" engine, "$3" image, "$4" port, "$5" port retries, "$6" colab origin or
# "", "$7" container_gpus, then container_args. The token comes on stdin into a 0600 env file
# the engine reads (removed once the container runs): in no process's arguments.
_START_IMAGE = (
    _ENGINE
    + r"""
img=$3 port=$4 retries=$5 origin=$6 gpus=$7
shift 7
umask 077
mkdir -p "$HOME/.remotedl"
envf="$HOME/.remotedl/jupyter.env.$$"
IFS= read -r token
printf 'JUPYTER_TOKEN=%s\n' "$token" > "$envf"
"$E" rm -f "$name" >/dev/null 2>&1
here=$(pwd -P)
# Every GPU of the box, as `docker run --gpus all` gives them, where the box has any.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  case $gpus:$E in
    none:*) ;;
    devices:*)
      for d in "${REMOTEDL_DEVICE_DIR:-/dev}"/nvidia*; do
        [ -e "$d" ] && set -- --device "$d:/dev/${d##*/}" "$@"
      done;;
    cdi:*|*:*podman*) set -- --device nvidia.com/gpu=all "$@"
      case $E in *podman*) set -- --security-opt label=disable "$@";; esac;;
    *) set -- --gpus all "$@";;
  esac
fi
# Rootless Podman: the user's own ids inside, not subordinate ones.
case $E in *podman*) [ "$(id -u)" = 0 ] || set -- --userns=keep-id "$@";; esac
extra=--ServerApp.allow_credentials=False
[ -n "$origin" ] && extra=--ServerApp.allow_origin=$origin
if out=$("$E" run -d --rm --init --pull=missing --name "$name" --label "remotedl.jupyter=$here" \
    --network host -u "$(id -u):$(id -g)" -v "$here:$here" -w "$here" --env-file "$envf" \
    -e HOME=/tmp -e JUPYTER_RUNTIME_DIR=/tmp/.jupyter-runtime "$@" "$img" \
    sh -c 'if jupyter lab --version >/dev/null 2>&1; then a=lab; else a=server; fi; exec jupyter "$a" "$@"' \
    sh --no-browser --ServerApp.ip=127.0.0.1 "--ServerApp.port=$port" "--ServerApp.port_retries=$retries" \
    --ServerApp.root_dir=. --ServerApp.allow_root=True "$extra" \
    ${origin:+--ServerApp.allow_credentials=True} 2>&1)
then
  echo "@@started"
else
  echo "@@failed $(printf '%s\n' "$out" | tail -n 1)"
fi
rm -f "$envf"
"""
)


@dataclass
class JupyterServer:
    port: int
    token: str
    root_dir: str
    base_url: str
    lab: bool
    started: bool  # True when remotedl started it now
    pid: int | None = None  # on the box, as `jupyter server list` says it

    def url(self, local_port: int) -> str:
        path = "lab" if self.lab else ""
        return f"http://127.0.0.1:{local_port}{self.base_url}{path}?token={self.token}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reached_at(self, local_port: int, timeout: float = 3.0) -> bool:
        """Whether 127.0.0.1:``local_port`` here already is this server: when the box is this
        machine (a sandbox box binds the same loopback) or a tunnel to it is up. Then no tunnel
        is needed (one would collide with it). It is this server when its own process listens
        there, or when what answers checks tokens and takes this server's."""
        status = f"http://127.0.0.1:{local_port}{self.base_url}api/status?token="
        if not _answers(status + self.token, "started", timeout):
            return False
        from remotedl.tunnel import listeners

        if self.pid is not None and self.pid in listeners(local_port):
            return True
        # A server without a token takes any: only one that refuses a wrong token tells.
        return bool(self.token) and not _answers(status + secrets.token_hex(16), "started", timeout)


@dataclass
class _Look:
    """One look at the box: the jupyter command, the work tree, whether JupyterLab is there,
    the servers running, and whether our tmux session is alive."""

    jupyter: str | None
    pwd: str
    lab: bool
    servers: list[dict[str, Any]]
    session: bool


def _pid(info: dict[str, Any]) -> int | None:
    try:
        return int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return None


def _answers(url: str, key: str, timeout: float) -> bool:
    """Whether ``url`` (on 127.0.0.1) answers 200 with a JSON object holding ``key``."""
    from remotedl.tunnel import local_json

    answer = local_json(url, timeout)
    return isinstance(answer, dict) and key in answer


def serves_jupyter(local_port: int, timeout: float = 3.0) -> bool:
    """Whether 127.0.0.1:``local_port`` here is a Jupyter server (its ``/api`` answers its
    version without a token): then it may be the box's own, on a box that is this machine."""
    return _answers(f"http://127.0.0.1:{local_port}/api", "version", timeout)


def _session(script: str) -> str:
    return f"SESSION={SESSION}\n{script}"


def _find(box: Box, remote_dir: str) -> _Look:
    out = box.run(_session(_FIND), remote_dir, check=False).stdout
    look = _Look(None, "", False, [], False)
    for line in out.splitlines():
        if line.startswith("@@jupyter "):
            look.jupyter = line.split(" ", 1)[1]
        elif line.startswith("@@pwd "):
            look.pwd = line.split(" ", 1)[1]
        elif line == "@@lab":
            look.lab = True
        elif line == "@@session":
            look.session = True
        elif line.startswith("{"):
            try:
                look.servers.append(json.loads(line))
            except ValueError:
                continue
    return look


@dataclass
class ImageSpec:
    """Jupyter in a container image: the image, the engine (None: found), how GPUs enter it
    (``container_gpus``) and more words for ``docker run`` (``container_args``)."""

    image: str
    engine: str | None = None
    gpus: str = "nvidia"
    args: list[str] | None = None


def _server(s: dict[str, Any], pwd: str, lab: bool, started: bool, token: str | None = None) -> JupyterServer:
    return JupyterServer(
        int(s["port"]),
        token if token is not None else str(s.get("token", "")),
        str(s.get("root_dir", pwd)),
        str(s.get("base_url", "/")),
        lab,
        started=started,
        pid=_pid(s),
    )


def _look_image(
    box: Box, remote_dir: str, image: ImageSpec
) -> tuple[str, str | None, list[dict[str, Any]], bool]:
    """(the work tree, the running container's work tree or None, its servers, JupyterLab)."""
    out = box.run(_FIND_IMAGE, remote_dir, image.engine or "", check=False).stdout
    marks = parse_marks(out)
    if "noengine" in marks:
        raise RemoteError(
            f"{marks['noengine'].strip()} is not installed on {box.spec.alias}: "
            "Jupyter in an image needs one",
            hint="`remotedl setup docker` installs one; or drop --image",
        )
    servers = []
    for line in out.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                servers.append(json.loads(line))
    running = marks.get("running")
    return marks.get("pwd", "").strip(), running.strip() if running else None, servers, "lab" in marks


def _find_or_start_in_image(
    box: Box,
    remote_dir: str,
    image: ImageSpec,
    *,
    remote_port: int | None,
    colab: bool,
    timeout: float,
    say: Callable[[str], None],
) -> JupyterServer:
    pwd, running, servers, lab = _look_image(box, remote_dir, image)
    if running is not None and not colab:
        for s in servers:
            if remote_port is None or int(s.get("port", 0)) == remote_port:
                return _server(s, pwd, lab, started=False)
    token = secrets.token_hex(24)
    port = remote_port or 8888
    retries = "0" if colab or remote_port else "50"
    origin = COLAB_ORIGIN if colab else ""
    say(f"starting Jupyter in {image.image} on {box.spec.alias}, port {port}")
    args = [remote_dir, image.engine or "", image.image, str(port), retries, origin, image.gpus]
    out = box.run(_START_IMAGE, *args, *(image.args or []), check=False, stdin=token + "\n").stdout
    marks = parse_marks(out)
    if "started" not in marks:
        why = (marks.get("failed") or "").strip() or (out.strip().splitlines() or ["no answer"])[-1]
        raise RemoteError(
            f"Jupyter could not start in {image.image} on {box.spec.alias}: {why}",
            hint="is Jupyter installed in the image (`jupyter lab` or `jupyter server`)?",
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pwd, running, servers, lab = _look_image(box, remote_dir, image)
        for s in servers:
            if s.get("token") == token:
                return _server(s, pwd, lab, started=True, token=token)
        if running is None:
            break  # the container ended: its log says why
        time.sleep(0.5)
    raise RemoteError(
        f"Jupyter did not start in {image.image} on {box.spec.alias}",
        hint=f"`{(image.engine or 'docker').rsplit('/', 1)[-1]} logs remotedl-jupyter-UID` on the box "
        "while it runs; is Jupyter installed in the image?",
    )


def find_or_start(
    spec: HostSpec,
    remote_dir: str,
    *,
    remote_port: int | None = None,
    colab: bool = False,
    timeout: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
    image: ImageSpec | None = None,
) -> JupyterServer:
    say = on_progress or (lambda text: None)
    if image is not None:
        say(f"looking for Jupyter in {image.image} on {spec.alias}")
        return _find_or_start_in_image(
            Box(spec), remote_dir, image, remote_port=remote_port, colab=colab, timeout=timeout, say=say
        )
    say(f"looking for Jupyter on {spec.alias}")
    box = Box(spec)
    look = _find(box, remote_dir)
    jupyter, pwd, lab, servers = look.jupyter, look.pwd, look.lab, look.servers
    if jupyter is None:
        raise RemoteError(
            f"Jupyter is not installed on {spec.alias} (no jupyter in the project's .venv or on PATH)",
            hint="install it there, e.g. `python3 -m pip install jupyterlab` in the project's "
            "environment, or run `remotedl setup jupyter`",
        )
    if not colab:
        ours = [s for s in servers if s.get("root_dir", s.get("notebook_dir")) == pwd] or servers
        if remote_port is not None:
            ours = [s for s in ours if int(s.get("port", 0)) == remote_port]
        for s in ours:
            return JupyterServer(
                int(s["port"]),
                str(s.get("token", "")),
                str(s.get("root_dir", pwd)),
                str(s.get("base_url", "/")),
                lab,
                started=False,
                pid=_pid(s),
            )
    token = secrets.token_hex(24)
    port = remote_port or 8888
    retries = "0" if colab or remote_port else "50"
    # Colab's "connect to a local runtime": its origin allowed, and exactly this port.
    origin = COLAB_ORIGIN if colab else ""
    app = "lab" if lab else "server"
    box.run(_session(_START), remote_dir, jupyter, app, str(port), retries, origin, token)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        say(f"starting Jupyter{'Lab' if lab else ' server'} on {spec.alias}, port {port}")
        look = _find(box, remote_dir)
        for s in look.servers:
            if s.get("token") == token:
                return JupyterServer(
                    int(s["port"]),
                    token,
                    str(s.get("root_dir", pwd)),
                    str(s.get("base_url", "/")),
                    lab,
                    started=True,
                    pid=_pid(s),
                )
        time.sleep(0.5)
    log = box.run('tail -n 5 "$HOME/.remotedl/jupyter.log" 2>/dev/null', check=False).stdout.strip()
    raise RemoteError(
        f"Jupyter did not start on {spec.alias}: " + (log.splitlines()[-1] if log else "no log"),
        hint="see ~/.remotedl/jupyter.log on the box",
    )
