"""tunnel, jupyter (on a Slurm cluster: Jupyter as a batch job on a node), tensorboard."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.cli.common import agent_client, remote_dir, size_text, warner
from remotedl.env import Environment
from remotedl.errors import ExitCode, UsageError
from remotedl.tunnels import TunnelRecord, TunnelRegistry
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.slurm import SlurmSettings


def _image_spec(app: App, name: str | None) -> Any:
    """Jupyter's or TensorBoard's container image (``--image``, ``jupyter_image``,
    ``tensorboard_image``) with the container settings, or None: on the box itself."""
    if not name:
        return None
    from remotedl.jupyter import ImageSpec

    if name.startswith("-") or any(c.isspace() for c in name):
        raise UsageError(f"--image {name!r} is not an image name")
    s = app.settings
    return ImageSpec(name, s.get("container"), str(s.get("container_gpus")), list(s.get("container_args")))


def cmd_jupyter(args: argparse.Namespace, env: Environment) -> int:
    args.jupyter = True
    args.as_jupyter = True
    args.list = False
    args.stop = None
    args.ports = [args.ports] if args.ports else []
    return cmd_tunnel(args, env)


def cmd_tensorboard(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import tensorboard
    from remotedl import tunnel as tun
    from remotedl.cli.statusline import status_line

    app = App(args, env)
    if getattr(args, "local", False):  # the outputs that came home, served here: no box
        from remotedl.cli.outputs import tensorboard_local

        return tensorboard_local(app, args)
    spec = app.spec()
    local = args.local_port or int(app.settings.get("tensorboard_port"))
    logdir = args.logdir or app.settings.get("tensorboard_logdir") or "runs"

    def instead(busy: Any, free: int) -> str:
        return f"remotedl tensorboard {args.logdir + ' ' if args.logdir else ''}--local-port {free}"

    if tun.port_free(local) or not tensorboard.serves_tensorboard(local):
        tun.check_local_ports([tun.Forward(local, local)], instead)
    runs = _job_runs(app, logdir) if args.jobs is not None else []
    with status_line(env, not app.json) as say:
        image = _image_spec(app, getattr(args, "image", None) or app.settings.get("tensorboard_image"))
        server = tensorboard.find_or_start(
            spec, remote_dir(app), logdir, runs=runs, on_progress=say, image=image
        )
    for name, directory in server.runs:
        env.stderr.write(f"remotedl: run {name}: {directory}\n")
    forwards = [tun.Forward(local, server.port)]
    if not tun.port_free(local):  # the box is this machine, or the port was taken meanwhile
        if server.reached_at(local):
            return _reached_without_tunnel(app, local, server)
        tun.check_local_ports(forwards, instead)
    if args.background:
        return _start_background(app, args, forwards, server)
    return _foreground(app, spec, forwards, server, supervise=False)


def _job_runs(app: App, logdir: str) -> list[tuple[str, str]]:
    """(run name, LOGDIR in the job's own directory) per job: those named by --jobs, else this
    project's jobs."""
    import posixpath

    from remotedl import jobs

    client = agent_client(app)
    warn = warner(app.env)
    wanted = list(app.args.jobs or [])
    if wanted:
        records = [jobs.get_job(client, ref, warn=warn) for ref in wanted]
    else:
        latest = jobs.get_job(client, None, project=remote_dir(app), warn=warn)
        records = [
            r for r in jobs.list_jobs(client, all_jobs=True, warn=warn) if r.project_dir == latest.project_dir
        ]
    runs = []
    for r in records:
        base = r.workdir or r.cwd
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{r.id}-{r.name}")
        runs.append((name, logdir if posixpath.isabs(logdir) else posixpath.join(base, logdir)))
    return runs


def cmd_tunnel(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import tunnel as tun

    app = App(args, env)
    registry = TunnelRegistry(env.state_dir)
    if args.list:
        recs = registry.live()
        if app.json:
            app.print_json([r.to_dict() for r in recs])
        elif not recs:
            app.out("no background tunnels")
        for r in recs:
            if not app.json:
                app.out(
                    f"{' '.join(r.forwards)}  host {r.host}  pid {r.pid}  {r.status}"
                    + (f"  {r.url}" if r.url else "")
                )
        return ExitCode.OK
    if args.stop:
        for r in registry.stop(args.stop):
            app.out(f"stopped tunnel {' '.join(r.forwards)} to {r.host}")
        return ExitCode.OK
    if args.jupyter:
        from remotedl.cli import slurm as slurmcli

        slurm = slurmcli.settings_for(app, args)
        if slurm is not None:
            return slurm_jupyter(app, args, slurm)
    forwards = [tun.Forward.parse(p) for p in args.ports]
    if not forwards and not args.jupyter:
        raise UsageError("name a port to forward, e.g. `remotedl tunnel 8888` or `remotedl tunnel 8889:8888`")
    spec = app.spec()
    if not args.supervise:
        port = int(app.settings.get("jupyter_port"))
        checked = forwards or [tun.Forward(port, port)]
        if args.jupyter and _maybe_the_boxs_jupyter(checked):
            checked = checked[1:]  # looked at again once the box's server is known
        tun.check_local_ports(checked, _instead(args, forwards))
    server = None
    if args.jupyter:
        from remotedl import jupyter

        local = forwards[0].local if forwards else int(app.settings.get("jupyter_port"))
        wanted_remote = forwards[0].remote if forwards and ":" in args.ports[0] else None
        from remotedl.cli.statusline import status_line

        image = _image_spec(app, getattr(args, "image", None) or app.settings.get("jupyter_image"))
        with status_line(env, not app.json) as say:
            server = jupyter.find_or_start(
                spec,
                remote_dir(app),
                remote_port=wanted_remote,
                colab=args.colab,
                on_progress=say,
                image=image,
            )
        forwards = [tun.Forward(local, server.port), *forwards[1:]]
        if not args.supervise and not tun.port_free(local):
            if len(forwards) == 1 and server.reached_at(local):
                return _reached_without_tunnel(app, local, server)
            tun.check_local_ports(forwards[:1], _instead(args, forwards))
    if args.background and not args.supervise:
        return _start_background(app, args, forwards, server)
    return _foreground(app, spec, forwards, server, supervise=args.supervise)


def _maybe_the_boxs_jupyter(forwards: list[Any]) -> bool:
    """The Jupyter forward's local port is taken by a Jupyter server: on a box that is this
    machine (a sandbox on 127.0.0.1) or through a tunnel already up, that may be the very
    server the box serves, and then it is used as it is rather than refused."""
    from remotedl import jupyter
    from remotedl import tunnel as tun

    return not tun.port_free(forwards[0].local) and jupyter.serves_jupyter(forwards[0].local)


def _reached_without_tunnel(app: App, local: int, server: Any) -> int:
    """The box's server already answers on this machine's 127.0.0.1:LOCAL (the box is this
    machine, or a tunnel to it is up): a second listener there would collide, and none is needed."""
    state = "started" if server.started else "found running"
    label = getattr(server, "label", "Jupyter")
    app.env.stderr.write(
        f"remotedl: {label} {state} on {app.spec().alias} (port {server.port}); "
        f"127.0.0.1:{local} here already reaches it (the box is this machine, or a tunnel to it "
        "is up): no tunnel needed\n"
    )
    url = str(server.url(local))
    app.out(url)
    if app.flag("open"):
        import webbrowser

        webbrowser.open(url)
    return ExitCode.OK


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
        label = getattr(server, "label", "Jupyter")
        serves = f", serving {server.serves}" if getattr(server, "serves", None) else ""
        where = getattr(server, "where", "the box")
        app.env.stderr.write(f"remotedl: {label} {state} on {where} (port {server.port}{serves})\n")
        app.out(url)
    return url


def _foreground(app: App, spec: Any, forwards: list[Any], server: Any, *, supervise: bool) -> int:
    from remotedl import tunnel as tun

    registry = TunnelRegistry(app.env.state_dir)
    record_path = registry.path([f"{f.local}:{f.remote}" for f in forwards])
    if supervise:
        # The starter wrote the record (with the URL); this process adds what only it knows.
        registry.update(record_path, pid=os.getpid(), status="starting")
    live = not supervise and getattr(app.env.stderr, "isatty", lambda: False)()

    def on_event(ev: tun.TunnelEvent) -> None:
        if supervise:
            fields: dict[str, Any] = {"last_event": ev.message}
            if ev.kind != "refused":
                fields["status"] = ev.kind
            if ev.kind == "reconnecting":
                fields["reconnects"] = t.reconnects
            registry.update(record_path, **fields)
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
            installer_status(app, t, thread)
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


def installer_status(app: App, t: Any, thread: Any) -> None:
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
                f"{plural(t.connections, 'connection')} · ~{size_text(moved)} moved"
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
    # The URL (with its token) goes into the 0600 record, never into the supervisor's argv.
    record = TunnelRecord(
        host=app.spec().alias,
        forwards=[f"{f.local}:{f.remote}" for f in forwards],
        url=server.url(forwards[0].local) if server is not None else None,
    )
    rec = TunnelRegistry(app.env.state_dir).spawn(record, argv, cwd=app.env.cwd, environ=app.env.environ)
    url = _announce(app, forwards, server)
    if url and args.open:
        import webbrowser

        webbrowser.open(url)
    app.env.stderr.write(
        f"remotedl: running in the background (pid {rec.pid}); "
        f"`remotedl tunnel --stop {forwards[0].local}` ends it\n"
    )
    return ExitCode.OK


def slurm_jupyter(app: App, args: argparse.Namespace, slurm: SlurmSettings) -> int:
    """Jupyter as a batch job on a GPU node, tunnelled to through the login node; Ctrl-C ends
    the tunnel and cancels the job when this command started it."""
    from remotedl import jobs
    from remotedl import tunnel as tun
    from remotedl.cli.statusline import status_line
    from remotedl.slurm import settings_request
    from remotedl.slurmhost import find_or_start_jupyter, stop_jupyter

    if args.background or args.colab:
        which = "--background" if args.background else "--colab"
        raise UsageError(
            f"{which} is not for Jupyter on a Slurm cluster: its job lives only as long as the tunnel",
            hint="run `remotedl jupyter` in a terminal of its own; Ctrl-C ends both",
        )
    gpus = getattr(args, "gpus", None)
    gpus = 1 if gpus is None else gpus
    if gpus < 0:
        raise UsageError(f"--gpus {gpus}: give a number of GPUs (0 runs it on the CPU)")
    texts = [args.ports] if isinstance(args.ports, str) else list(args.ports or [])
    if texts and ":" in texts[0]:
        raise UsageError(
            f"{texts[0]}: on a Slurm cluster the node's port is chosen when the job starts",
            hint="give the local port alone, e.g. `remotedl jupyter 8888`",
        )
    local = int(texts[0]) if texts else int(app.settings.get("jupyter_port"))
    tun.check_local_ports([tun.Forward(local, local)], lambda busy, free: f"remotedl jupyter {free}")
    from remotedl.agent.client import AgentClient

    spec = app.spec()
    client = AgentClient(spec, python=str(app.settings.get("python")))
    with status_line(app.env, not app.json) as say:
        server = find_or_start_jupyter(
            client,
            remote_dir=remote_dir(app),
            settings=settings_request(slurm),
            gpus=gpus,
            environment=jobs.EnvSpec.from_settings(app.settings),
            on_progress=say,
        )
    try:
        return _foreground(app, spec, [tun.Forward(local, server.port, server.node)], server, supervise=False)
    finally:
        if server.started:
            rec = stop_jupyter(client, server)
            app.env.stderr.write(f"remotedl: cancelled the Jupyter job {server.job_id}: {rec.state}\n")
