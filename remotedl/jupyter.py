"""Find or start Jupyter on the box, for ``remotedl tunnel --jupyter`` / ``remotedl jupyter``.

A server already running for the project (``jupyter server list --json`` in the project's
environment) is reused; otherwise JupyterLab (or a plain jupyter_server when JupyterLab is
not installed) starts in a tmux session on the box, bound to 127.0.0.1, with a random token
passed through the environment (never on a command line that ``ps`` shows).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from remotedl.errors import RemoteError
from remotedl.ssh import Box, HostSpec
from remotedl.ssh.channel import EXPAND_HOME

COLAB_ORIGIN = "https://colab.research.google.com"
SESSION = "remotedl-jupyter"

# "$1": remote_dir.
_FIND = EXPAND_HOME + r"""
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
"$J" server list --json 2>/dev/null
"""

# "$1" remote_dir, "$2" jupyter, "$3" lab|server, "$4" port, "$5" port retries, "$6" colab
# origin or "", "$7" the token. The token reaches Jupyter through a 0600 file read inside the
# session, so it is in no process's arguments: not ssh's, not sh's, not tmux's.
_START = EXPAND_HOME + r"""
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


def find_or_start(
    spec: HostSpec,
    remote_dir: str,
    *,
    remote_port: int | None = None,
    colab: bool = False,
    timeout: float = 60.0,
    on_progress: Callable[[str], None] | None = None,
) -> JupyterServer:
    say = on_progress or (lambda text: None)
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
