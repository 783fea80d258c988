"""up, stop: a host that is a cloud VM; and what every other command does when its VM is not
running (``ready``) and what ``status`` says of one (``status_of``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.env import Environment
from remotedl.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.cloud import CloudHost, UpResult, VMStatus
    from remotedl.cloud.autostop import AutostopStatus
    from remotedl.cloud.cost import JobCost
    from remotedl.fleet import Member
    from remotedl.schema import JobRecord
    from remotedl.ssh import HostSpec

# Commands that start a stopped VM when the host has auto_start = true.
AUTO_START = ("run", "push", "jupyter")
# Commands that work on a VM in any state (they say the state, or change it).
ANY_STATE = ("up", "stop", "status", "config", "trust", "allow")


def _member(app: App, name: str) -> Member:
    from remotedl.fleet import Fleet

    return Fleet(app.env, app.base_settings, [name], app.reach(), app.resolved).member(name)


def _warn(app: App, text: str) -> None:
    from remotedl.words import printable

    app.env.stderr.write(f"remotedl: {printable(text, newlines=False)}\n")
    app.env.stderr.flush()


def _deallocate_if_billed(app: App, member: Member) -> None:
    """An Azure VM powered off from inside (autostop without a managed identity, `shutdown`)
    goes on billing until it is deallocated: any contact from a laptop does that, and says so."""
    from remotedl.cloud import stop_vm

    cloud = member.cloud
    if cloud is None or not cloud.status.billed_while_stopped:
        return
    _warn(
        app,
        f"{member.name}: {cloud.vm.name} was powered off from inside but not deallocated, "
        "so it was billed meanwhile; deallocating it now",
    )
    stop_vm(cloud, wait=False)


def ready(app: App, member: Member) -> HostSpec:
    """The spec to reach a cloud VM with, for the command being run: as resolved when the VM
    runs; started first (auto_start) for run/push/jupyter; else a clear error."""
    from remotedl.cloud import VMNotRunning

    cloud = member.cloud
    assert cloud is not None
    command = str(app.flag("subcommand"))
    if cloud.error is not None and command not in ("config", "allow"):
        raise cloud.error
    if command in ANY_STATE or cloud.status.running:
        return member.spec
    if command != "up":
        _deallocate_if_billed(app, member)
    state = cloud.status.state
    if cloud.vm.auto_start and command in AUTO_START and state in ("stopped", "starting", "stopping"):
        _warn(app, f"{member.name}: {cloud.vm.name} is {state}; starting it (auto_start)")
        result = _start(app, member, quiet_stdout=True)
        assert result.spec is not None
        return result.spec
    hint = f"start it with `remotedl up {member.name}`"
    if command in AUTO_START:
        hint += f", or set auto_start = true in [hosts.{member.name}]"
    raise VMNotRunning(
        f"{member.name} is a cloud VM and it is {_state_words(cloud.status)} ({cloud.vm.name})", hint=hint
    )


def _state_words(st: VMStatus) -> str:
    if st.billed_while_stopped:
        return "stopped but not deallocated (still billed)"
    return st.state


def _ssh_answers(spec: HostSpec, last: list[str]) -> bool:
    """Whether SSH lets us in at ``spec`` now. Not yet (refused, timed out, reset while sshd
    starts, or a login refused while the VM's agent still installs the keys): False, and why
    in ``last``. A host key other than the one trusted will not mend by waiting: raised."""
    import subprocess

    from remotedl import proc
    from remotedl.errors import HostKeyError
    from remotedl.ssh import openssh_failure, ssh_argv

    argv = ssh_argv(spec, "exit 0", multiplex=False)
    try:
        r = proc.run(argv, check=False, timeout=spec.connect_timeout + 20)
    except subprocess.TimeoutExpired:
        last[:] = [f"ssh to {spec.hostname}:{spec.port} hung"]
        return False
    if r.returncode == 0:
        return True
    failure = openssh_failure(spec, r.stderr or "")
    if isinstance(failure, HostKeyError):
        raise failure
    last[:] = [failure.message]
    return False


def _start(app: App, member: Member, *, quiet_stdout: bool = False) -> UpResult:
    from remotedl import cloud as cloudlib

    cloud = member.cloud
    assert cloud is not None
    base = member.spec
    last: list[str] = []  # SSH's last word while waiting

    def reach(st: VMStatus) -> HostSpec | None:
        address = st.address(cloud.vm.address) if cloud.vm.address != "ssh" else None
        spec = (
            cloudlib.with_address(base, address, f"cloud ({cloud.vm.name}, {cloud.vm.address} IP)")
            if address
            else base
        )
        return spec if _ssh_answers(spec, last) else None

    def progress(what: str, st: VMStatus) -> None:
        if app.json and not quiet_stdout:
            return
        words = {
            "stopping": f"is stopping; waiting for that to end first ({st.detail})",
            "requested": "start requested",
            "running": "running"
            + (f" at {st.address(cloud.vm.address)}" if st.address(cloud.vm.address) else ""),
            "ssh": "SSH answers",
        }[what]
        _warn(app, f"{member.name}: {words}") if quiet_stdout else app.out(f"{member.name}: {words}")

    try:
        result = cloudlib.up(cloud, reach, progress=progress)
    except cloudlib.VMNotRunning as e:
        if last:
            e.message = f"{e.message}; last: {last[0]}"
        raise
    if result.spec is not None:
        from remotedl.fleet import Member as FleetMember

        # Later calls of this command reach the VM at its new address.
        app.resolved[member.name] = FleetMember(member.name, member.settings, result.spec, cloud)
    # Its watcher went with its last shutdown: arm autostop again, whatever started the VM
    # (up, or auto_start), so that a VM started for a job stops when it is idle again.
    if member.settings.get("autostop") or result.status.spot:
        off = not member.settings.get("autostop")
        result.autostop = _apply_autostop(app, member.name, None, None, off=off)
    else:
        from remotedl.cloud.autostop import resume_autostop

        result.autostop = resume_autostop(_client(app, member.name))
    return result


def _cloud_members(app: App) -> list[Member]:
    if not app.hosts:
        app.host_alias()  # raises the usual "no host given"
    members = []
    for name in app.hosts:
        m = _member(app, name)
        if m.cloud is not None and m.cloud.error is not None:
            raise m.cloud.error
        if m.cloud is None:
            raise UsageError(
                f"{name} is not a cloud VM",
                hint=f'name its VM in [hosts.{name}]: cloud = "aws", region = "...", instance_id = "..." '
                "(see README 'Cloud VMs')",
            )
        members.append(m)
    return members


def cmd_up(args: argparse.Namespace, env: Environment) -> int:
    app = App(args, env)
    out: list[dict[str, Any]] = []
    for member in _cloud_members(app):
        assert member.cloud is not None
        result = _start(app, member)
        autostop = result.autostop
        if app.json:
            out.append(
                {
                    "host": member.name,
                    "vm": member.cloud.vm.name,
                    "already_running": result.already_running,
                    "seconds": round(result.seconds, 1),
                    **result.status.to_dict(),
                }
            )
            continue
        if result.already_running:
            app.out(f"{member.name}: {member.cloud.vm.name} was running already")
        else:
            app.out(f"{member.name}: {member.cloud.vm.name} is up in {result.seconds:.0f} s")
        if autostop is not None:
            app.out(f"{member.name}: autostop {_autostop_words(autostop)}")
    if app.json:
        app.print_json(out if len(out) != 1 else out[0])
    return ExitCode.OK


def cmd_stop(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.cloud import stop_vm

    app = App(args, env)
    out: list[dict[str, Any]] = []
    for member in _cloud_members(app):
        cloud = member.cloud
        assert cloud is not None
        result = stop_vm(cloud, wait=not app.flag("no_wait"))
        if app.json:
            out.append(
                {
                    "host": member.name,
                    "vm": cloud.vm.name,
                    "seconds": round(result.seconds, 1),
                    "ran_seconds": result.uptime_seconds,
                    "cost": result.cost,
                    **result.status.to_dict(),
                }
            )
            continue
        if result.was.state == "stopped" and not result.was.billed_while_stopped:
            app.out(f"{member.name}: {cloud.vm.name} was stopped already")
            continue
        ran = f" after {_duration(result.uptime_seconds)}" if result.uptime_seconds is not None else ""
        cost = f", about {_money(result.cost)}" if result.cost is not None else ""
        how = "deallocated" if cloud.vm.cloud == "azure" else "stopped"
        done = how if result.status.state == "stopped" else f"{how} (requested: {result.status.detail})"
        app.out(f"{member.name}: {cloud.vm.name} {done}{ran}{cost}")
    if app.json:
        app.print_json(out if len(out) != 1 else out[0])
    return ExitCode.OK


def _duration(seconds: float | None) -> str:
    from remotedl.cli.common import seconds_text as duration

    return duration(seconds)


def _money(amount: float | None) -> str:
    return "?" if amount is None else f"${amount:,.2f}"


def status_words(cloud: CloudHost) -> str:
    """``AWS i-0abc (eu-west-1): running for 2h 3m, $4.90 so far ($2.45/h)``."""
    st = cloud.status
    words = f"{cloud.vm.name}: {_state_words(st)}"
    if st.detail and st.detail.rsplit("/", 1)[-1].lower() != st.state:
        words += f" ({st.detail})"
    if st.uptime_seconds is not None:
        words += f" for {_duration(st.uptime_seconds)}"
    if st.cost_so_far is not None:
        words += f", {_money(st.cost_so_far)} so far"
    if st.price_per_hour is not None:
        words += f" ({_money(st.price_per_hour)}/h)"
    if st.spot:
        words += ", spot"
    return words


def status_of(app: App) -> int | None:
    """``status`` of a host that is a cloud VM: its state, uptime and cost; when it does not
    run, that is all (exit 0: a stopped VM is no connection error); None when the host is no
    cloud VM or its VM runs (the box's own status follows)."""
    if app.is_fleet or not app.hosts:
        return None
    member = _member(app, app.hosts[0])
    cloud = member.cloud
    if cloud is None:
        return None
    if cloud.error is not None:
        raise cloud.error
    _deallocate_if_billed(app, member)
    if cloud.status.running:
        if not app.json:
            app.out(f"{member.name}: {status_words(cloud)}")
            st = _show_autostop(app, member.name)
            if st is not None:
                app.out(f"{member.name}: autostop {_autostop_words(st)}")
        return None
    if app.json:
        app.print_json({"host": member.name, "reachable": False, "cloud": _cloud_json(cloud)})
        return ExitCode.OK
    app.out(f"{member.name}: {status_words(cloud)}")
    if cloud.status.state == "stopped":
        app.out(f"  start it with `remotedl up {member.name}`")
    return ExitCode.OK


def _cloud_json(cloud: CloudHost) -> dict[str, Any]:
    return {"cloud": cloud.vm.cloud, "vm": cloud.vm.name, **cloud.status.to_dict()}


def add_status_json(app: App, data: dict[str, Any]) -> None:
    """The VM's state beside the box's in ``status --json``."""
    member = app.resolved.get(app.hosts[0]) if app.hosts else None
    if member is not None and member.cloud is not None:
        data["cloud"] = _cloud_json(member.cloud)


def _client(app: App, name: str) -> AgentClient:
    from remotedl.agent.client import AgentClient

    member = _member(app, name)
    return AgentClient(app.spec_for(name), python=str(member.settings.get("python")))


def _apply_autostop(
    app: App, name: str, duration: str | None, wait: str | None, *, off: bool = False
) -> AutostopStatus:
    """Send the host's autostop (or ``duration``) to its box; the box's answer."""
    from remotedl.cloud.autostop import box_config, set_autostop
    from remotedl.jobs import parse_duration

    member = _member(app, name)
    assert member.cloud is not None
    idle = None if off else parse_duration(duration or member.settings.get("autostop"), "autostop")
    if idle is None and not off:
        raise UsageError(
            f"no autostop time for {name}",
            hint=f'give one (`remotedl autostop 30m`) or set autostop = "30m" in [hosts.{name}]',
        )
    # A spot VM's watcher also watches for the cloud taking it back, autostop or not.
    config = box_config(member.cloud.vm, member.settings, idle, spot=member.cloud.status.spot)
    if wait:
        config["wait"] = wait
    return set_autostop(_client(app, name), config)


def _show_autostop(app: App, name: str) -> AutostopStatus | None:
    from remotedl.cloud.autostop import show_autostop
    from remotedl.errors import RemotedlError

    try:
        return show_autostop(_client(app, name))
    except RemotedlError:
        return None  # status goes on without it; the box's own status says what is wrong


def _autostop_words(st: AutostopStatus) -> str:
    import time

    if st.idle_seconds is None:
        return "off"
    what = "without jobs" if st.wait == "jobs" else "idle"
    words = f"after {_short(st.idle_seconds)} {what}"
    if st.stopped_at:
        return words + f"; the box stopped itself ({st.stop_result})"
    if st.pending and st.stop_at is not None:
        when = time.strftime("%H:%M", time.localtime(st.stop_at))
        return words + f"; stopping at {when} unless something runs"
    if st.last_activity and (st.idle_for or 0) < 60:
        return words + f"; busy ({st.last_activity[0]})"
    if st.stop_at is not None:
        when = time.strftime("%H:%M", time.localtime(st.stop_at))
        words += f"; idle for {_duration(st.idle_for)}, stops at {when} at the earliest"
    return words


def cmd_autostop(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.cloud.autostop import show_autostop

    app = App(args, env)
    out = []
    for member in _cloud_members(app):
        if args.duration is None and not args.off and not args.wait:
            st = show_autostop(_client(app, member.name))
        else:
            st = _apply_autostop(app, member.name, args.duration, args.wait, off=args.off)
        if app.json:
            out.append({"host": member.name, **st.to_dict()})
        else:
            app.out(f"{member.name}: autostop {_autostop_words(st)}")
    if app.json:
        app.print_json(out if len(out) != 1 else out[0])
    return ExitCode.OK


def _short(seconds: float) -> str:
    """A duration as one would set it: ``30m``, ``1h``, ``1h30m``, ``90s``."""
    s = int(seconds)
    if s % 60:
        return f"{s}s"
    h, m = divmod(s // 60, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m or not h else "")


def cmd_cost(args: argparse.Namespace, env: Environment) -> int:
    """Jobs' cost per host and project, from the boxes' records (price x time x GPU share)."""
    import os
    import time

    from remotedl.cloud.cost import CostReport, add_host
    from remotedl.jobs import list_jobs, parse_age
    from remotedl.schema import GpusRequest

    app = App(args, env)
    if not app.hosts:
        app.host_alias()  # the usual "no host given"
    now = time.time()
    since = now - parse_age(args.since) if args.since else 0.0
    report = CostReport()
    for name in app.hosts:
        member = _member(app, name)
        price = member.settings.get("price_per_hour")
        if price is None:
            report.unpriced.append(name)
            continue
        client = _client(app, name)
        records = list_jobs(client, all_jobs=True)
        found = client.call(GpusRequest().to_dict()).get("gpus")
        # This project's work tree is named by the project's identity: show its name.
        tree = os.path.basename(member.settings.remote_dir.rstrip("/"))
        add_host(
            report,
            name,
            records,
            float(price),
            len(found) if isinstance(found, list) else 0,
            now=now,
            since=since,
            names={tree: app.base_settings.project.name},
        )
    if app.json:
        app.print_json(report.to_dict())
        return ExitCode.OK
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("host", "project", "jobs", "GPU hours", "cost"):
        table.add_column(col, justify="right" if col in ("jobs", "GPU hours", "cost") else "left")
    for line in report.lines:
        table.add_row(line.host, line.project, str(line.jobs), f"{line.gpu_hours:.1f}", _money(line.cost))
    if report.lines:
        app.console.print(table)
        app.out(f"total {_money(report.total)}" + (f" since {args.since} ago" if args.since else ""))
    else:
        app.out("no priced jobs" + (f" in the last {args.since}" if args.since else ""))
    for name in report.unpriced:
        app.out(f"{name}: no price_per_hour set, not counted")
    return ExitCode.OK


def job_cost_of(app: App, client: AgentClient, rec: JobRecord) -> JobCost | None:
    """``show``'s cost of a job: price x its time x its share of the box's GPUs; None without
    a ``price_per_hour``."""
    import time

    price = app.settings.get("price_per_hour") if app.hosts else None
    if price is None or rec.started is None:
        return None  # the cloud package (~8 ms to import) is not needed
    from remotedl.cloud.cost import job_cost
    from remotedl.schema import GpusRequest

    found = client.call(GpusRequest().to_dict()).get("gpus")
    return job_cost(rec, float(price), len(found) if isinstance(found, list) else 0, now=time.time())
