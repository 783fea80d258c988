"""status, config, trust, sandbox."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.cli.common import import_meanwhile, seconds_text, size_text
from remotedl.env import Environment
from remotedl.errors import ExitCode, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.ssh import HostSpec


def cmd_status(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.ssh import Box
    from remotedl.status import box_status
    from remotedl.words import printable

    app = App(args, env)
    if app.is_fleet:
        from remotedl.cli import fleet

        return fleet.status(app)
    from remotedl.cli import slurm as slurmcli

    if slurmcli.settings_for(app) is not None:
        return slurmcli.status(app)
    from remotedl.cli import cloud

    stopped = cloud.status_of(app)  # a cloud VM: its state and cost; all there is when not running
    if stopped is not None:
        return stopped
    spec = app.spec()
    if not app.json:
        import_meanwhile("rich.table", "rich.text", "rich.console")  # the view's, while the box answers
    # A look (no login start-up file's effect wanted): the box's resident agent may answer.
    with Box(spec, resident=True, python=str(app.settings.get("python"))) as box:
        st = box_status(box, app.settings.remote_dir)
    if app.json:
        data = st.to_dict()
        cloud.add_status_json(app, data)
        app.print_json(data)
        return ExitCode.OK
    from rich.table import Table  # the text view only: --json goes without rich
    from rich.text import Text

    c = app.console
    load = " ".join(f"{x:.2f}" for x in st.load)
    c.print(f"[bold]{spec.alias}[/bold] ({spec.user}@{spec.hostname}:{spec.port}): reachable")
    c.print(printable(f"  host    {st.hostname}, {st.os}, {st.kernel}", newlines=False), markup=False)
    cpus = plural(st.cpus, "CPU") if st.cpus else "? CPUs"
    c.print(f"  uptime  {seconds_text(st.uptime_seconds)}, load {load}, {cpus}", markup=False)
    if st.disk:
        c.print(
            f"  disk    {size_text(st.disk.free_bytes)} free of {size_text(st.disk.total_bytes)} "
            f"at {st.disk.path} (for {st.remote_dir})",
            markup=False,
        )
    tools = ", ".join(f"{t} {'ok' if w else 'MISSING'}" for t, w in st.tools.items() if t != "nvidia-smi")
    c.print(f"  tools   {tools}", markup=False)
    if st.nvidia_error:
        c.print(f"  GPUs    none: {st.nvidia_error}", markup=False)
        return ExitCode.OK
    c.print(f"  driver  {st.driver_version or '?'}", markup=False)
    table = Table(box=None, pad_edge=False)
    for col in ("GPU", "name", "memory used / total", "util", "held by", "processes"):
        table.add_column(col)
    for g in st.gpus:
        procs = ", ".join(
            f"{p.pid} {p.user or '?'} {p.name.rsplit('/', 1)[-1]} {size_text((p.used_memory_mib or 0) << 20)}"
            for p in g.processes
        )
        mem = f"{size_text((g.memory_used_mib or 0) << 20)} / {size_text((g.memory_total_mib or 0) << 20)}"
        util = "[N/A]" if g.utilization_pct is None else f"{g.utilization_pct}%"
        holder = st.held_by.get(g.index) or ("process" if g.processes else "free")
        cells = (str(g.index), g.name, mem, util, holder, procs or "-")
        table.add_row(*(Text(printable(x, newlines=False)) for x in cells))  # box text: no markup
    c.print(table)
    return ExitCode.OK


def _spec_rows(spec: HostSpec, host_source: str) -> dict[str, tuple[object, str]]:
    src = spec.sources
    why_config = src.get("ssh_config", "~/.ssh/config")
    return {
        "alias": (spec.alias, host_source),
        "hostname": (spec.hostname, src.get("hostname", "default")),
        "user": (spec.user, src.get("user", "default")),
        "port": (spec.port, src.get("port", "default")),
        "identity_files": (list(spec.identity_files), src.get("identityfile", "default")),
        "known_hosts_files": (list(spec.known_hosts_files), src.get("userknownhostsfile", "default")),
        "strict_host_key_checking": (
            spec.strict_host_key_checking,
            src.get("stricthostkeychecking", "default"),
        ),
        "connect_timeout": (spec.connect_timeout, src.get("connecttimeout", "default")),
        "proxy_jump": (
            spec.proxy_jump,
            src.get("proxyjump", "ssh config" if spec.proxy_jump else "default"),
        ),
        # unset: OpenSSH sends none; remotedl's tunnels and followers keep their own keepalives
        "server_alive_interval": (spec.server_alive_interval, src.get("serveraliveinterval", "default")),
        "ssh_config": (
            (str(spec.ssh_config), why_config)
            if spec.ssh_config
            else (None, f"{why_config} does not exist: OpenSSH's defaults")
        ),
    }


def _shown(value: object) -> str:
    """A value as `config` shows it: unset is said so (not Python's ``None``)."""
    if value is None:
        return "(unset)"
    return repr(value) if not isinstance(value, str) else value


def cmd_config(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.config import shown_value
    from remotedl.fleet import Member

    app = App(args, env)
    s = app.settings
    names = app.hosts
    rows: list[tuple[str, str, str]] = [
        ("project", str(s.project.root), "found from the working directory"),
        (
            "project config",
            str(s.project.config_file or "(none)"),
            "at the project root"
            if s.project.config_file
            else "no remotedl.toml or [tool.remotedl] in pyproject.toml at the project root",
        ),
    ]
    for key, setting in s.values.items():
        rows.append((key, _shown(shown_value(key, setting.value)), setting.source))
    if not s.values["remote_dir"].value:
        how = "the project's id (its first commit)" if s.project.identity else "the project folder's name"
        rows.append(("remote_dir (effective)", s.remote_dir, f"default: ~/remotedl/ + {how}"))
    for name, table in s.tables.items():
        rows.append((f"[{name}]", ", ".join(sorted(table.value)), table.source))
    for name in sorted(s.host_tables):
        where = sorted({x.source for x in s.host_tables[name].values()})
        rows.append((f"[hosts.{name}]", ", ".join(sorted(s.host_tables[name])), "; ".join(where)))
    # Shown before `remotedl allow` too: what the project file sets that is not used until then.
    pending = {key: s.allow_reasons.get(key, "needs allow") for key in s.needs_allow}
    for key, why in pending.items():
        rows.append((f"needs allow: {key}", why, "not used until you run `remotedl allow`"))
    host: dict[str, tuple[object, str]] = {}
    members: list[tuple[str, Member | None, str | None]] = []  # (name, member, error)
    if pending:
        # The host is resolved (ssh -G reads the ssh config) only once the project file is allowed.
        if names:
            rows.append(("host (resolved)", "(not yet)", "after `remotedl allow`"))
    elif len(names) == 1:
        host = _spec_rows(app.spec(), s.source("host"))
    elif names:
        resolved = app.fleet().map(lambda m: m)
        members = [(r.host, r.value, r.error.message if r.error else None) for r in resolved.results]
    if app.json:
        data: dict[str, Any] = {
            "settings": {
                k: {"value": shown_value(k, v.value), "source": v.source} for k, v in s.values.items()
            },
            "remote_dir": s.remote_dir,
            "project": str(s.project.root),
            "project_config": str(s.project.config_file) if s.project.config_file else None,
            "tables": {k: {"keys": sorted(v.value), "source": v.source} for k, v in s.tables.items()},
            "host": {k: {"value": v[0], "source": v[1]} for k, v in host.items()},
            "host_names": names,
            "needs_allow": pending,
        }
        if members:
            data["hosts"] = {
                name: {
                    "settings": {
                        k: {"value": shown_value(k, v.value), "source": v.source}
                        for k, v in app.host_settings(name).values.items()
                    },
                    "remote_dir": app.host_settings(name).remote_dir,
                    "host": {
                        k: {"value": v[0], "source": v[1]}
                        for k, v in (_spec_rows(m.spec, s.hosts_source()) if m else {}).items()
                    },
                    "error": error,
                }
                for name, m, error in members
            }
        app.print_json(data)
        return ExitCode.OK
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=None, pad_edge=False)
    grid.add_column("setting")
    grid.add_column("value")
    grid.add_column("from")
    for k, v, src_ in rows:
        grid.add_row(Text(k), Text(str(v)), Text(src_))  # values like "[tool.remotedl]": no markup
    for k, (hv, hsrc) in host.items():
        grid.add_row(Text("host." + k), Text(_shown(hv)), Text(hsrc))
    if names and len(names) > 1:
        grid.add_row(Text("hosts (effective)"), Text(", ".join(names)), Text(""))
    app.console.print(grid)
    for name, m, error in members:
        # Each host: what differs from the settings above, then how it is reached.
        mine = app.host_settings(name)
        own = Table(box=None, pad_edge=False, title=f"host {name}", title_justify="left")
        own.add_column("setting")
        own.add_column("value")
        own.add_column("from")
        for key, setting in mine.values.items():
            if key != "host" and setting != s.values[key]:
                own.add_row(Text(key), Text(_shown(shown_value(key, setting.value))), Text(setting.source))
        if not mine.values["remote_dir"].value:
            own.add_row(Text("remote_dir (effective)"), Text(mine.remote_dir), Text("default"))
        if m is not None:
            for k, (hv, hsrc) in _spec_rows(m.spec, s.hosts_source()).items():
                own.add_row(Text("host." + k), Text(_shown(hv)), Text(hsrc))
        else:
            own.add_row(Text("error"), Text(str(error)), Text(""))
        app.console.print()
        app.console.print(own)
    return ExitCode.OK


def cmd_allow(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.config import allow, allow_files

    app = App(args, env)
    settings = app.base_settings
    project = settings.project
    if not args.revoke and not allow_files(env, project):
        raise UsageError(
            "this project has nothing to allow: no remotedl.toml (or [tool.remotedl]) and no "
            "playbook that needs it"
        )
    files = allow(env, project, revoke=args.revoke)
    where = project.config_file or project.root
    reasons = dict(settings.allow_reasons)
    if app.json:
        app.print_json(
            {
                "file": str(where),
                "allowed": not args.revoke,
                "local_exec": [k for k, why in reasons.items() if why.startswith("can run")],
                "needs_allow": reasons,
                "covers": [str(f) for f in files or []],
            }
        )
    elif args.revoke:
        app.out(f"{where}: approval removed" if files is not None else f"{where}: was not allowed")
    else:
        what = "; ".join(f"{k} ({why})" for k, why in reasons.items())
        app.out(f"{where}: allowed as it is now" + (f"; it sets {what}" if what else ""))
        app.out("covers: " + ", ".join(str(f) for f in files or []))
        app.out("any change to one of these files needs `remotedl allow` again")
    return ExitCode.OK


def cmd_trust(args: argparse.Namespace, env: Environment) -> int:
    from remotedl.ssh.hostkeys import fetch_host_key, trust_host, trust_state

    app = App(args, env)
    spec = app.spec(args.alias)
    if not args.yes:
        name, key = fetch_host_key(spec)
        if trust_state(spec, name, key) == "already-known":
            app.out(f"{spec.alias}: host key {key.key_type} {key.fingerprint} is already trusted")
            return ExitCode.OK
        if not env.stdin_isatty:
            raise UsageError(
                f"{spec.display} offers host key {key.key_type} {key.fingerprint}",
                hint="compare it with the box's (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` "
                "there), then run again with --yes",
            )
        env.stderr.write(f"{spec.display} offers host key {key.key_type} {key.fingerprint}\n")
        env.stderr.write("Trust it and record it in known_hosts? [y/N] ")
        env.stderr.flush()
        if input().strip().lower() not in ("y", "yes"):
            env.stderr.write("not recorded\n")
            return ExitCode.ERROR
    result = trust_host(spec, replace=args.replace)
    if app.json:
        app.print_json(result.__dict__)
    else:
        verb = {"added": "recorded", "replaced": "replaced", "already-known": "already trusted"}
        app.out(
            f"{spec.alias}: host key {result.key_type} {result.fingerprint} "
            f"{verb[result.status]} ({result.known_hosts_file})"
        )
    return ExitCode.OK


def cmd_sandbox(args: argparse.Namespace, env: Environment) -> int:
    from remotedl import sandbox

    app = App(args, env)
    if args.action != "status" and args.name is None:
        args.name = "sandbox"
    if args.action == "up":
        host = args.gpus == "host"
        if not host and not str(args.gpus).isdigit():
            raise UsageError(f"--gpus {args.gpus}: give a number of stand-in GPUs, or host")
        info = sandbox.up(
            env,
            name=args.name,
            gpus=0 if host else int(args.gpus),
            host_gpus=host,
            login_shell=args.shell,
            noisy=args.noisy,
            no_sudo=args.no_sudo,
        )
        if app.json:
            app.print_json(info.to_dict())
        else:
            gpu_text = "this machine's GPUs" if host else plural(info.gpus, "stand-in GPU")
            extra = "".join(
                (
                    f", login shell {info.login_shell}" if info.login_shell else "",
                    ", noisy start-up files" if info.noisy else "",
                    "" if info.sudo else ", no sudo",
                )
            )
            where = f"sshd on 127.0.0.1:{info.port} as {info.user}"
            app.out(f"sandbox '{info.name}' is up: {where}, {gpu_text}{extra}")
            app.out(f"  use it:      remotedl --host {info.name} status")
            app.out(f"  plain ssh:   ssh -F {info.ssh_config} {info.name}")
            named = "" if info.name == "sandbox" else f" --name {info.name}"
            app.out(f"  stop it:     remotedl sandbox down{named}")
        return ExitCode.OK
    if args.action == "down":
        removed = sandbox.down(env, name=args.name)
        if app.json:
            app.print_json({"name": args.name, "removed": removed})
        else:
            app.out(f"sandbox '{args.name}' " + ("stopped and removed" if removed else "was not running"))
        return ExitCode.OK
    if args.name is None:
        boxes = sandbox.running(env)
        if app.json:
            app.print_json([b.to_dict() for b in boxes])
        elif not boxes:
            app.out("no sandbox is running; `remotedl sandbox up` starts one")
        for b in boxes:
            if not app.json:
                app.out(f"sandbox '{b.name}': up on 127.0.0.1:{b.port} as {b.user}")
        return ExitCode.OK if boxes else ExitCode.ERROR
    found = sandbox.status(env, args.name)
    if app.json:
        app.print_json(found.to_dict() if found else None)
    else:
        app.out(f"sandbox '{args.name}': " + (f"up on 127.0.0.1:{found.port}" if found else "not running"))
    return ExitCode.OK if found else ExitCode.ERROR
