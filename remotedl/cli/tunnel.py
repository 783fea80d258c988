"""tunnel, jupyter."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remotedl.cli.app import App
from remotedl.cli.basic import _size
from remotedl.cli.sync import remote_dir
from remotedl.env import Environment
from remotedl.errors import ExitCode, RemotedlError, UsageError
from remotedl.waiting import pid_alive as _alive
from remotedl.words import plural


def _tunnels_dir(env: Environment) -> Path:
    d = env.state_dir / "tunnels"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def _records(env: Environment) -> list[dict[str, Any]]:
    out = []
    for path in sorted(_tunnels_dir(env).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(rec["pid"])):
            rec["file"] = str(path)
            out.append(rec)
        else:
            path.unlink(missing_ok=True)  # a tunnel that died: forget it
    return out


def cmd_jupyter(args: argparse.Namespace, env: Environment) -> int:
    args.jupyter = True
    args.as_jupyter = True
    args.list = False
    args.stop = None
    args.ports = [args.ports] if args.ports else []
    return cmd_tunnel(args, env)


def cmd_tunnel(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import tunnel as tun

    app = App(args, env)
    if args.list:
        recs = _records(env)
        if app.json:
            app.print_json(recs)
        elif not recs:
            app.out("no background tunnels")
        for r in recs:
            if not app.json:
                app.out(
                    f"{' '.join(r['forwards'])}  host {r['host']}  pid {r['pid']}  {r.get('status', '?')}"
                    + (f"  {r['url']}" if r.get("url") else "")
                )
        return ExitCode.OK
    if args.stop:
        return _stop(app, args.stop)
    forwards = [tun.Forward.parse(p) for p in args.ports]
    if not forwards and not args.jupyter:
        raise UsageError("name a port to forward, e.g. `remotedl tunnel 8888` or `remotedl tunnel 8889:8888`")
    spec = app.spec()
    if not args.supervise:
        port = int(app.settings.get("jupyter_port"))
        tun.check_local_ports(forwards or [tun.Forward(port, port)], _instead(args, forwards))
    server = None
    if args.jupyter:
        from remotedl import jupyter

        local = forwards[0].local if forwards else int(app.settings.get("jupyter_port"))
        wanted_remote = forwards[0].remote if forwards and ":" in args.ports[0] else None
        server = jupyter.find_or_start(spec, remote_dir(app), remote_port=wanted_remote, colab=args.colab)
        forwards = [tun.Forward(local, server.port), *forwards[1:]]
    if args.background and not args.supervise:
        return _start_background(app, args, forwards, server)
    return _foreground(app, spec, forwards, server, supervise=args.supervise)


def _instead(args: argparse.Namespace, forwards: list[Any]) -> Callable[[Any, int], str]:
    """The same command with a busy local port replaced by a free one."""
    jupyter_word = bool(getattr(args, "as_jupyter", False))

    def suggest(busy: Any, free: int) -> str:
        ports = []
        for i, (f, text) in enumerate(zip(forwards, args.ports, strict=True)):
            if f.local != busy.local:
                ports.append(text)
            elif args.jupyter and i == 0 and ":" not in text:
                ports.append(str(free))  # the box side is Jupyter's own port, found later
            else:
                ports.append(f"{free}:{f.remote}")
        if not forwards:  # Jupyter on the default port
            ports = [str(free)]
        if jupyter_word:
            return f"remotedl jupyter {' '.join(ports)}"
        return f"remotedl tunnel {' '.join(ports)}" + (" --jupyter" if args.jupyter else "")

    return suggest


def _announce(app: App, forwards: list[Any], server: Any) -> str | None:
    url = server.url(forwards[0].local) if server is not None else None
    for f in forwards:
        app.env.stderr.write(f"remotedl: forwarding {f}\n")
    if url:
        state = "started" if server.started else "found running"
        app.env.stderr.write(f"remotedl: Jupyter {state} on the box (port {server.port})\n")
        app.out(url)
    return url


def _foreground(app: App, spec: Any, forwards: list[Any], server: Any, *, supervise: bool) -> int:
    from remotedl import tunnel as tun

    record_path = _tunnels_dir(app.env) / f"{'-'.join(str(f.local) for f in forwards)}.json"
    record: dict[str, Any] = {
        "pid": os.getpid(),
        "host": spec.alias,
        "forwards": [f"{f.local}:{f.remote}" for f in forwards],
        "status": "starting",
        "url": server.url(forwards[0].local) if server is not None else None,
        "started": time.time(),
    }

    def save() -> None:
        if supervise:
            tmp = record_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(record_path)

    save()
    live = not supervise and getattr(app.env.stderr, "isatty", lambda: False)()

    def on_event(ev: tun.TunnelEvent) -> None:
        record["status"] = ev.kind if ev.kind != "refused" else record["status"]
        record["last_event"] = ev.message
        save()
        if not live:
            app.env.stderr.write(f"remotedl: {ev.message}\n")
            app.env.stderr.flush()

    t = tun.Tunnel(spec, forwards, on_event=on_event)
    stop_now = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop_now
        stop_now = True
        t.stop()

    old = signal.signal(signal.SIGTERM, on_term)
    thread = tun.start_in_thread(t)
    try:
        if not t.wait_connected(float(spec.connect_timeout) + 10):
            t.stop()
            thread.join(5)
            tun.raise_if_failed(t)
        if not supervise:
            url = _announce(app, forwards, server)
            if url and app.flag("open"):
                import webbrowser

                webbrowser.open(url)
        if live:
            _status_line(app, t, thread)
        else:
            while thread.is_alive() and not stop_now:
                thread.join(0.5)
        if t.fatal is not None:
            raise t.fatal
    except KeyboardInterrupt:
        app.env.stderr.write("\nremotedl: tunnel closed\n")
        return ExitCode.OK
    finally:
        t.stop()
        signal.signal(signal.SIGTERM, old)
        if supervise:
            record_path.unlink(missing_ok=True)
    return ExitCode.OK


def _status_line(app: App, t: Any, thread: Any) -> None:
    from rich.live import Live

    from remotedl.tunnel import TunnelEvent

    events: list[TunnelEvent] = []
    prev = t.on_event

    def collect(ev: TunnelEvent) -> None:
        events.append(ev)
        prev(ev)

    t.on_event = collect
    started = time.time()
    with Live(console=app.err_console, refresh_per_second=2, transient=True) as live:
        while thread.is_alive():
            state = "connected" if t.connected.is_set() else "reconnecting"
            moved = t.bytes_moved()
            note = events[-1].message if events and events[-1].kind == "refused" else ""
            live.update(
                f"[bold]{state}[/bold] to {t.spec.alias} · up {int(time.time() - started)} s · "
                f"{plural(t.connections, 'connection')} · ~{_size(moved) if moved is not None else '?'} moved"
                f"{' · ' + note if note else ''} · Ctrl-C to close"
            )
            thread.join(0.5)


def _start_background(app: App, args: argparse.Namespace, forwards: list[Any], server: Any) -> int:
    argv = [sys.executable, "-m", "remotedl"]
    for name in ("host", "ssh_config", "user", "port", "identity", "connect_timeout"):
        value = getattr(args, name, None)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += ["tunnel", "--supervise", *[f"{f.local}:{f.remote}" for f in forwards]]
    log = _tunnels_dir(app.env) / f"{'-'.join(str(f.local) for f in forwards)}.log"
    env = {**app.env.environ}
    with open(log, "ab") as out:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=str(app.env.cwd),
            env=env,
            start_new_session=True,
        )
    record_path = _tunnels_dir(app.env) / f"{'-'.join(str(f.local) for f in forwards)}.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if p.poll() is not None:
            text = log.read_text(errors="replace").strip().splitlines()
            errs = [line for line in text if "error" in line] or text[-1:]
            raise RemotedlError(f"the background tunnel did not start: {errs[-1] if errs else 'no output'}")
        with contextlib.suppress(OSError, ValueError):
            if json.loads(record_path.read_text()).get("status") == "connected":
                break
        time.sleep(0.05)
    else:
        p.terminate()
        raise RemotedlError("the background tunnel did not connect within 30 s", hint=f"see {log}")
    url = _announce(app, forwards, server)
    if server is not None and url:
        rec = json.loads(record_path.read_text())
        rec["url"] = url
        record_path.write_text(json.dumps(rec))
        if args.open:
            import webbrowser

            webbrowser.open(url)
    app.env.stderr.write(
        f"remotedl: running in the background (pid {p.pid}); "
        f"`remotedl tunnel --stop {forwards[0].local}` ends it\n"
    )
    return ExitCode.OK


def _stop(app: App, which: str) -> int:
    recs = _records(app.env)
    targets = (
        recs if which == "all" else [r for r in recs if any(f.split(":")[0] == which for f in r["forwards"])]
    )
    if not targets:
        raise UsageError(
            f"no background tunnel holds port {which}", hint="`remotedl tunnel --list` shows them"
        )
    for r in targets:
        os.kill(int(r["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while _alive(int(r["pid"])) and time.monotonic() < deadline:
            time.sleep(0.05)
        Path(r["file"]).unlink(missing_ok=True)
        app.out(f"stopped tunnel {' '.join(r['forwards'])} to {r['host']}")
    return ExitCode.OK
