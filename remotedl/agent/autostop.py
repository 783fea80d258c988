"""Autostop, decided on the box: stop the cloud VM this box is once it has been idle long enough.

Standard library only (it runs under the box's python3 with the agent). No laptop is involved:
``watch`` (the agent's own request, started detached by ``set``) ticks once a minute; each
``tick`` looks at the box:

- remotedl jobs: a running or queued record counts, except a job stalled (``stalled.since``) for at
  least the idle time: it is named in the notification instead;
- unless ``wait = "jobs"``: interactive SSH sessions (a process on a pty with ``sshd`` among its
  ancestors), GPU compute processes (``nvidia-smi --query-compute-apps``), and busy Jupyter kernels
  (each running Jupyter server's ``/api/kernels``, found from its runtime file).

Idle for ``idle_seconds``: one notification (the job ``notify`` URLs) says when and why, then a
grace period in which any activity cancels; then ``pre_stop`` runs (with a time limit) and the VM
stops. AWS and GCE stop on an OS shutdown (``sudo -n shutdown -h now``, or ``systemctl poweroff``
where a polkit rule of the ``autostop`` playbook allows it); an Azure VM with a managed identity
deallocates itself through Resource Manager, else it powers off and the next laptop to look
deallocates it (``remotedl.cli.cloud``).

The settings and the state live in ``~/.remotedl/autostop.json`` (0600: notification URLs are
secrets); times are seconds since the epoch, and every function takes ``now`` so tests move the clock.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.agent.store import AUTOSTOP_FILE as FILE
from remotedl.schema import AutostopRequest
from remotedl.waiting import pid_runs

TICK_SECONDS = 60.0
GRACE_SECONDS = 300.0
PRE_STOP_TIMEOUT = 600.0
IMDS = "169.254.169.254"
ARM = "https://management.azure.com"
ACTIVE_JOB = ("queued", "starting", "running")


@dataclass
class Config:
    """What the laptop set (``remotedl autostop``, ``up``)."""

    idle_seconds: float | None = None  # None: autostop is off
    wait: str = "all"  # "all" or "jobs"
    grace_seconds: float = GRACE_SECONDS
    pre_stop: str | None = None
    pre_stop_timeout: float = PRE_STOP_TIMEOUT
    notify: list[str] = field(default_factory=list)
    host: str = ""
    cloud: str = ""  # aws, gcp, azure
    # Azure: the VM's ids and whether it has a managed identity allowed to deallocate it.
    azure: dict[str, str] = field(default_factory=dict)
    managed_identity: bool = False
    # A spot/preemptible VM: the watcher also watches the cloud's notice that it takes it back.
    spot: bool = False
    preempt_signal: str = "TERM"


@dataclass
class State:
    config: Config = field(default_factory=Config)
    last_active: float = 0.0
    last_activity: list[str] = field(default_factory=list)
    pending_since: float | None = None  # when the notice went out; None: nothing pending
    stopped_at: float | None = None
    stop_result: str = ""
    watcher_pid: int | None = None
    preempted_at: float | None = None
    preempt_notice: str = ""


def load(directory: Path) -> State:
    try:
        data = json.loads((directory / FILE).read_text())
    except (OSError, ValueError):
        return State()
    config = Config(
        **{k: v for k, v in (data.get("config") or {}).items() if k in Config.__dataclass_fields__}
    )
    fields = {k: v for k, v in data.items() if k in State.__dataclass_fields__ and k != "config"}
    return State(config=config, **fields)


def save(directory: Path, state: State) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f)
    tmp.replace(directory / FILE)


# ------------------------------------------------------------------ what counts as activity


def _proc_stat(pid: str, proc: Path) -> tuple[int, int, str] | None:
    """(ppid, tty_nr, comm) of a process, from /proc/PID/stat."""
    try:
        raw = (proc / pid / "stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    rest = raw[raw.rindex(")") + 2 :].split()
    return int(rest[1]), int(rest[4]), comm


def ssh_sessions(proc: Path = Path("/proc"), exclude: set[int] | None = None) -> list[str]:
    """Interactive SSH sessions: processes on a pty whose ancestors include sshd (one entry per
    pty). ``exclude``: pids (and their descendants) that are ours."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in os.listdir(proc):
        if entry.isdigit():
            st = _proc_stat(entry, proc)
            if st is not None:
                table[int(entry)] = st
    found: dict[int, str] = {}
    for pid, (_, tty, comm) in table.items():
        major = (tty >> 8) & 0xFFF
        if tty == 0 or not 136 <= major <= 143 or tty in found:  # Unix98 ptys: /dev/pts/N
            continue
        seen, cur, via_sshd = set(), pid, False
        while cur in table and cur not in seen and cur > 1:
            if exclude and cur in exclude:
                via_sshd = False
                break
            seen.add(cur)
            if table[cur][2].startswith("sshd"):
                via_sshd = True
            cur = table[cur][0]
        if via_sshd:
            minor = (tty & 0xFF) | ((tty >> 12) & 0xFFF00)
            found[tty] = f"ssh session on pts/{(major - 136) * 256 + minor} ({comm})"
    return sorted(found.values())


def gpu_processes(environ: Mapping[str, str]) -> list[str]:
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-compute-apps=pid,process_name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env=dict(environ),
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    lines = [x.strip() for x in out.stdout.splitlines() if x.strip()] if out.returncode == 0 else []
    return [f"GPU process {x}" for x in lines if "no running" not in x.lower()]


def runtime_dirs(environ: Mapping[str, str]) -> list[Path]:
    """Where Jupyter servers write their ``jpserver-*.json`` (Jupyter's own order on Linux)."""
    home = Path(environ.get("HOME") or Path.home())
    dirs = []
    if environ.get("JUPYTER_RUNTIME_DIR"):
        dirs.append(Path(environ["JUPYTER_RUNTIME_DIR"]))
    if environ.get("JUPYTER_DATA_DIR"):
        dirs.append(Path(environ["JUPYTER_DATA_DIR"]) / "runtime")
    dirs.append(Path(environ.get("XDG_DATA_HOME") or home / ".local/share") / "jupyter" / "runtime")
    return dirs


def busy_kernels(environ: Mapping[str, str]) -> list[str]:
    """Busy kernels of the Jupyter servers running on this box (found by their runtime files;
    each asked at its own loopback URL with its own token)."""
    found = []
    files = sorted({f for d in runtime_dirs(environ) for f in d.glob("jpserver-*.json")})
    for runtime in files:
        try:
            info = json.loads(runtime.read_text())
            url = str(info["url"]).rstrip("/") + "/api/kernels"
            if not url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
                continue
            auth = {"Authorization": f"token {info.get('token', '')}"}
            request = urllib.request.Request(url, headers=auth)  # noqa: S310 - checked: loopback http
            with urllib.request.urlopen(request, timeout=5) as r:  # noqa: S310 - a loopback http URL
                kernels = json.loads(r.read())
        except (OSError, ValueError, KeyError):
            continue
        found += [
            f"busy Jupyter kernel {k.get('id', '?')}" for k in kernels if k.get("execution_state") == "busy"
        ]
    return found


def job_activity(
    records: list[dict[str, Any]], idle_seconds: float, now: float
) -> tuple[list[str], list[str]]:
    """(what keeps the box busy, jobs stalled long enough not to)."""
    active, stalled = [], []
    for r in records:
        if r.get("status") not in ACTIVE_JOB:
            continue
        since = (r.get("stalled") or {}).get("since") if r.get("status") == "running" else None
        name = f"job {r.get('id')}" + (f" ({r['name']})" if r.get("name") else "")
        if since is not None and now - float(since) >= idle_seconds:
            stalled.append(f"{name}, stalled since {time.strftime('%H:%M', time.localtime(float(since)))}")
        else:
            active.append(f"{name} {r.get('status')}")
    return active, stalled


def live_jobs() -> list[dict[str, Any]]:
    """The box's active jobs, each runtime asked whether it still lives (a job whose processes
    are gone is lost, not activity)."""
    from remotedl.agent import state, store

    ctx = store.Context()
    return state.refresh(ctx, store.active_records(ctx))


@dataclass
class Look:
    activity: list[str]
    stalled: list[str]


def look(
    config: Config,
    now: float,
    environ: Mapping[str, str],
    jobs: Callable[[], list[dict[str, Any]]] = live_jobs,
) -> Look:
    active, stalled = job_activity(jobs(), config.idle_seconds or 0, now)
    if config.wait != "jobs":
        active += ssh_sessions()
        active += gpu_processes(environ)
        active += busy_kernels(environ)
    return Look(active, stalled)


# ------------------------------------------------------------------ the decision


@dataclass
class Decision:
    action: str  # "off", "active", "idle", "notice", "wait", "stop"
    idle_for: float = 0.0
    stop_at: float | None = None


def decide(state: State, seen: Look, now: float) -> Decision:
    """What to do now, from what the box shows (pure: the state changes are the caller's)."""
    c = state.config
    if c.idle_seconds is None or state.stopped_at is not None:
        return Decision("off")
    if seen.activity:
        return Decision("active")
    idle_for = now - state.last_active
    if state.pending_since is not None:
        stop_at = state.pending_since + c.grace_seconds
        return Decision("stop" if now >= stop_at else "wait", idle_for, stop_at)
    if idle_for >= c.idle_seconds:
        return Decision("notice", idle_for, now + c.grace_seconds)
    return Decision("idle", idle_for, state.last_active + c.idle_seconds + c.grace_seconds)


# ------------------------------------------------------------------ acting on it


def _notify(config: Config, kind: str, title: str, text: str) -> None:
    if not config.notify:
        return
    try:
        from remotedl import notify
    except ImportError:
        return
    event = notify.Event(kind, title, text, {"host": config.host, "cloud": config.cloud})
    for url in config.notify:
        notify.send(url, event)


def run_pre_stop(config: Config, environ: Mapping[str, str]) -> str:
    if not config.pre_stop:
        return ""
    try:
        r = subprocess.run(
            ["/bin/sh", "-c", config.pre_stop],
            capture_output=True,
            text=True,
            timeout=config.pre_stop_timeout,
            check=False,
            env=dict(environ),
        )
    except subprocess.TimeoutExpired:
        return f"pre_stop ran past {config.pre_stop_timeout:g} s and was stopped"
    return "pre_stop ok" if r.returncode == 0 else f"pre_stop exited {r.returncode}"


def _azure_deallocate(config: Config, environ: Mapping[str, str]) -> str:
    """Deallocate this VM with its managed identity (IMDS token, then Resource Manager)."""
    imds = environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or f"http://{IMDS}"
    arm = (environ.get("AZURE_RESOURCE_MANAGER_ENDPOINT") or ARM).rstrip("/")
    token_url = (
        f"{imds.rstrip('/')}/metadata/identity/oauth2/token?api-version=2018-02-01"
        f"&resource={urllib.parse.quote(ARM + '/', safe='')}"
    )
    req = urllib.request.Request(token_url, headers={"Metadata": "true"})  # noqa: S310 - IMDS
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 - the metadata service's address
        token = json.loads(r.read())["access_token"]
    ids = config.azure
    path = (
        f"/subscriptions/{ids['subscription']}/resourceGroups/{ids['resource_group']}"
        f"/providers/Microsoft.Compute/virtualMachines/{ids['vm']}/deallocate?api-version=2024-07-01"
    )
    auth = {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(arm + path, method="POST", data=b"", headers=auth)  # noqa: S310 - ARM
    with urllib.request.urlopen(req, timeout=30) as r:  # noqa: S310 - Resource Manager
        return f"Azure deallocate requested ({r.status})"


def power_off(environ: Mapping[str, str]) -> str:
    """Shut the OS down: AWS and GCE stop the VM (and its compute billing) with it. The commands
    are looked up on ``environ``'s PATH only."""
    path = environ.get("PATH", "")
    tries: list[list[str]] = []
    if os.geteuid() != 0 and shutil.which("sudo", path=path):
        tries.append(["sudo", "-n", "shutdown", "-h", "now"])
    tries += [["systemctl", "poweroff"], ["shutdown", "-h", "now"], ["poweroff"]]
    last = "no shutdown command found"
    for argv in tries:
        exe = shutil.which(argv[0], path=path)
        if exe is None:
            continue
        r = subprocess.run(
            [exe, *argv[1:]], capture_output=True, text=True, timeout=60, check=False, env=dict(environ)
        )
        if r.returncode == 0:
            return " ".join(argv)
        last = f"{' '.join(argv)}: {(r.stderr or '').strip().splitlines()[-1:] or r.returncode}"
    raise OSError(f"could not power off: {last} (run the autostop playbook: `remotedl setup autostop`)")


def stop_vm(config: Config, environ: Mapping[str, str]) -> str:
    if config.cloud == "azure" and config.managed_identity and config.azure:
        try:
            return _azure_deallocate(config, environ)
        except (OSError, ValueError, KeyError) as e:
            # Powered off, it goes on billing until a laptop deallocates it: say so.
            return f"Azure deallocate failed ({type(e).__name__}); " + power_off(environ)
    return power_off(environ)


def tick(
    directory: Path,
    now: float,
    environ: Mapping[str, str],
    *,
    jobs: Callable[[], list[dict[str, Any]]] = live_jobs,
) -> Decision:
    """Look at the box once and act: note activity, send the notice, cancel it, or stop."""
    state = load(directory)
    if state.config.idle_seconds is None:
        return Decision("off")
    seen = look(state.config, now, environ, jobs)
    d = decide(state, seen, now)
    c = state.config
    if d.action == "active":
        if state.pending_since is not None:
            _notify(
                c, "autostop", f"{c.host}: autostop cancelled", f"activity: {'; '.join(seen.activity[:3])}"
            )
        state.pending_since = None
        state.last_active = now
        state.last_activity = seen.activity[:10]
    elif d.action == "notice":
        state.pending_since = now
        when = time.strftime("%H:%M", time.localtime(now + c.grace_seconds))
        why = f"idle for {int(d.idle_for // 60)} min (no jobs, sessions, GPU processes or busy kernels)"
        if c.wait == "jobs":
            why = f"no remotedl job for {int(d.idle_for // 60)} min"
        if seen.stalled:
            why += "; not counted: " + "; ".join(seen.stalled)
        _notify(
            c,
            "autostop",
            f"{c.host}: stopping the VM at {when}",
            f"{why}. Any activity before then cancels it.",
        )
    elif d.action == "stop":
        outcome = run_pre_stop(c, environ)
        state.stopped_at = now
        try:
            state.stop_result = "; ".join(x for x in (outcome, stop_vm(c, environ)) if x)
        except OSError as e:
            state.stop_result = "; ".join(x for x in (outcome, str(e)) if x)
            state.stopped_at = None
            state.pending_since = None
            state.last_active = now  # try again after another idle period, not every minute
            _notify(c, "autostop", f"{c.host}: autostop could not stop the VM", str(e))
        save(directory, state)
        return d
    save(directory, state)
    return d


def configure(directory: Path, config: Config, now: float) -> State:
    """Set (or turn off) autostop; the idle time counts from now."""
    state = load(directory)
    state.config = config
    state.last_active = now
    state.pending_since = None
    state.stopped_at = None
    save(directory, state)
    return state


# ------------------------------------------------------------------ spot VMs taken back

PREEMPT_POLL = 5.0  # GCE gives 30 s of notice, AWS 2 minutes


def _get(url: str, headers: dict[str, str], method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers, method=method)  # noqa: S310 - metadata service
    try:
        with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310 - metadata service
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), b""


def preemption_notice(config: Config, environ: Mapping[str, str]) -> str | None:
    """The cloud's notice that it takes this spot VM back, from its metadata service (the
    address each cloud's own SDK lets an environment variable change); None when there is none
    or the service cannot be asked."""
    try:
        if config.cloud == "aws":
            base = (environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or f"http://{IMDS}").rstrip("/")
            code, token = _get(
                f"{base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"}, "PUT"
            )
            headers = {"X-aws-ec2-metadata-token": token.decode()} if code == 200 else {}
            code, body = _get(f"{base}/latest/meta-data/spot/instance-action", headers)
            if code == 200 and body:
                action = json.loads(body)
                return f"AWS spot {action.get('action', 'interruption')} at {action.get('time', '?')}"
        elif config.cloud == "gcp":
            host = environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
            code, body = _get(
                f"http://{host}/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"}
            )
            if code == 200 and body.strip().upper() == b"TRUE":
                return "GCE preempted the VM"
        elif config.cloud == "azure":
            base = (environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or f"http://{IMDS}").rstrip("/")
            url = f"{base}/metadata/scheduledevents?api-version=2020-07-01"
            code, body = _get(url, {"Metadata": "true"})
            if code == 200:
                for event in json.loads(body).get("Events") or []:
                    if event.get("EventType") == "Preempt":
                        return f"Azure Preempt event, not before {event.get('NotBefore') or '?'}"
    except (OSError, ValueError):
        return None
    return None


def preempt(
    directory: Path,
    notice: str,
    now: float,
    environ: Mapping[str, str],
    jobs: Callable[[], list[dict[str, Any]]] = live_jobs,
) -> list[str]:
    """The VM is being taken back: each running job gets ``preempt_signal`` (it may save a
    checkpoint) and is recorded as preempted when it ends, ``pre_stop`` runs, one notification
    says so. Once per notice. Returns the jobs signalled."""
    import signal

    from remotedl.agent.runtimes.tmux import signal_job
    from remotedl.agent.store import kind_of, preempt_marker

    state = load(directory)
    if state.preempted_at is not None:
        return []
    state.preempted_at, state.preempt_notice = now, notice
    save(directory, state)
    c = state.config
    sig = getattr(signal, "SIG" + c.preempt_signal.upper().removeprefix("SIG"), signal.SIGTERM)
    told = []
    for r in jobs():
        if r.get("status") not in ACTIVE_JOB:
            continue
        preempt_marker(int(r["id"])).touch()
        if kind_of(r) == "box" and r.get("status") == "running" and signal_job(r, sig):
            told.append(f"job {r['id']}" + (f" ({r['name']})" if r.get("name") else ""))
    outcome = run_pre_stop(c, environ)
    jobs_words = f"{', '.join(told)} got SIG{sig.name.removeprefix('SIG')}" if told else "no job was running"
    _notify(
        c,
        "preempted",
        f"{c.host}: the cloud is taking the VM back",
        f"{notice}; {jobs_words}. {outcome}".strip(),
    )
    return told


def watch(directory: Path, environ: Mapping[str, str], interval: float = TICK_SECONDS) -> int:
    """Tick until autostop is turned off or the VM is stopping (the detached watcher); on a
    spot VM, look for the cloud's notice every few seconds meanwhile."""
    state = load(directory)
    state.watcher_pid = os.getpid()
    save(directory, state)
    next_tick = 0.0
    while True:
        now = time.time()
        state = load(directory)
        if state.watcher_pid != os.getpid():
            return 0
        if state.config.spot and state.preempted_at is None:
            notice = preemption_notice(state.config, environ)
            if notice:
                preempt(directory, notice, now, environ)
        if now >= next_tick:
            d = tick(directory, now, environ)
            next_tick = now + interval
            if d.action == "stop" or (d.action == "off" and not state.config.spot):
                return 0
        time.sleep(PREEMPT_POLL if state.config.spot else interval)


def ensure_watcher(directory: Path) -> None:
    """Start the watcher where autostop (or a spot watch) is on and none runs: after a reboot
    that no remotedl command made (the cloud's console, a crash), any request brings it back."""
    if not (directory / FILE).exists():
        return
    state = load(directory)
    c = state.config
    if (c.idle_seconds is None and not c.spot) or state.stopped_at is not None:
        return
    # Not a zombie (it ended; nothing may reap it), nor a program that got its pid since.
    if pid_runs(state.watcher_pid, b'"op": "autostop"', b'"action": "watch"'):
        return
    from remotedl.agent import events

    state.last_active = time.time()  # a request came: someone uses the box
    save(directory, state)
    events.detached({"op": "autostop", "action": "watch"})


def _shown(state: State) -> dict[str, Any]:
    shown = asdict(state)
    shown["config"]["notify"] = len(state.config.notify)  # secrets stay on the box
    shown["now"] = time.time()
    return shown


def op_autostop(ctx: Any, req: AutostopRequest) -> dict[str, Any]:
    """``set`` the settings (and start the watcher when on), ``show`` them, or ``watch``."""
    from remotedl.agent import events, store

    directory = store.state_dir()
    action = req.action
    if action == "watch":
        watch(directory, os.environ)
        return {}
    if action == "preempt":  # what the watcher does on the cloud's notice; also to try a job's handling
        told = preempt(directory, req.notice or "preemption asked for", time.time(), os.environ)
        return {"signalled": told, "autostop": _shown(load(directory))}
    if action in ("set", "resume"):
        known = Config.__dataclass_fields__
        if action == "set":
            config = Config(**{k: v for k, v in (req.config or {}).items() if k in known})
        else:  # the VM started again: its watcher went with the last shutdown
            config = load(directory).config
        state = configure(directory, config, time.time())
        if config.idle_seconds is not None or config.spot:
            # A new watcher; one that runs already sees it and leaves at its next look.
            events.detached({"op": "autostop", "action": "watch"})
        return {"autostop": _shown(state)}
    return {"autostop": _shown(load(directory))}
