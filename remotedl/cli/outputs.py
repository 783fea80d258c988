"""outputs (list, fetch, --watch), compare; the fetch after every command that talked to a box."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotedl.cli.app import App
from remotedl.cli.common import remote_dir, route, safe, size_text
from remotedl.env import Environment
from remotedl.errors import ExitCode, RemotedlError, UsageError
from remotedl.words import plural

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.jobs import JobRecord
    from remotedl.outputs import Arrival, Entry, Ledger
    from remotedl.ssh.resolve import HostSpec


# ------------------------------------------------------------------ at run


def planned(app: App, args: argparse.Namespace) -> list[str]:
    """The outputs a job gets: ``outputs`` in the config plus ``--output`` (the trackers'
    directories too, with ``trackers = true``)."""
    from remotedl.run import output_paths

    return output_paths(app.settings, getattr(args, "output", None) or [])


def project_id(app: App) -> str | None:
    """The project's identity (its root commit), which its jobs' records carry: every clone of
    it knows them by it. None outside a git repository."""
    from remotedl.run import project_identity

    return project_identity(app.settings.project.root)


def came_home(app: App, alias: str, arrival: Arrival) -> None:
    """A followed job's outputs came home (``remotedl.run``): say so; its W&B offline runs."""
    from remotedl import outputs

    for line in arrival_lines(app, arrival):
        app.env.stderr.write(f"remotedl: {line}\n")
    ledger = outputs.Ledger(app.settings.project.root)
    entry = ledger.read().get(f"{alias}:{arrival.job}")
    if entry is not None:
        _wandb(app, ledger, entry)


def fetch_before_removal(app: App, client: AgentClient, ids: list[int]) -> None:
    """Jobs about to be removed (``jobs rm``/``prune``) whose outputs have not come home (started
    from this clone or another): fetched now, before their directories go (one listing says
    which). One that cannot be fetched stops the removal."""
    from remotedl import outputs

    ledger = outputs.Ledger(app.settings.project.root)
    if not ledger.exists() and not app.settings.get("outputs"):
        return
    alias = client.spec.alias
    try:
        due = _ended(app, client.spec, ledger, {}, ask=_remote_dir_of(app, alias), project=project_id(app))
    except RemotedlError as e:
        raise RemotedlError(
            f"the jobs' outputs could not come home before their removal: {e.message}",
            hint="run it again; or `remotedl outputs` first",
        ) from None
    for entry in due:
        if entry.job not in ids:
            continue
        try:
            _fetch_and_say(app, client.spec, ledger, entry, job_ended=True)
        except RemotedlError as e:
            raise RemotedlError(
                f"job {entry.job}'s outputs could not come home before its removal: {e.message}",
                hint=f"run it again; or `remotedl outputs {entry.job}` first",
            ) from None


# ------------------------------------------------------------------ after every command


def after_command(args: argparse.Namespace, env: Environment) -> None:
    """Outputs of jobs that ended, fetched after a command that talked to their box: the jobs
    started from this clone (the ledger) and this project's jobs with outputs started from any
    other. The job records the command's answers carried say which jobs ended (a listing of the
    box's jobs: no request); otherwise one listing per box asks. A project without outputs
    costs a look at its settings. Never fails the command: a fetch that could not finish says
    so and waits for the next one."""
    from remotedl import outputs

    hosts = outputs.SEEN.hosts()
    if not hosts or getattr(args, "subcommand", None) in ("outputs", "compare"):
        return
    try:
        app = App(args, env)
        root = app.settings.project.root
        configured = bool(app.settings.get("outputs"))
    except RemotedlError:
        return
    ledger = outputs.Ledger(root)
    if not ledger.exists() and not configured:
        return
    ident = project_id(app)
    for alias in hosts:
        spec = outputs.SEEN.specs[alias]
        try:
            known = outputs.SEEN.records.get(alias, {})
            asked = None if alias in outputs.SEEN.listed else _remote_dir_of(app, alias)
            for entry in _ended(app, spec, ledger, known, ask=asked, project=ident):
                _fetch_and_say(app, spec, ledger, entry, job_ended=True)
        except RemotedlError as e:
            env.stderr.write(
                f"remotedl: outputs from {alias} not fetched ({e.message}); the next command, or "
                "`remotedl outputs`, fetches them\n"
            )


def _remote_dir_of(app: App, alias: str) -> str:
    """The project's remote_dir on that host (its [hosts.NAME] table may set its own)."""
    try:
        return remote_dir(app.for_host(alias)) if alias in app.hosts else remote_dir(app)
    except RemotedlError:
        return remote_dir(app)


def _ended(
    app: App,
    spec: HostSpec,
    ledger: Ledger,
    known: dict[int, JobRecord],
    *,
    ask: str | None,
    project: str | None,
) -> list[Entry]:
    """The entries whose outputs are due, their jobs having ended: this clone's waiting ones
    (in ``known``, the records at hand, or asked for) and, new in the ledger now, this
    project's jobs with outputs started elsewhere that it has not fetched. ``ask`` (the
    project's remote_dir): the box is asked for its jobs with outputs in one listing; without
    it, only the waiting jobs not in ``known`` are. A job the box no longer has is marked gone."""
    from remotedl import jobs, outputs

    alias = spec.alias
    entries = ledger.read()
    waiting = [e for e in entries.values() if e.status == "waiting" and e.host == alias]
    records = dict(known)
    due, unknown = outputs.due(waiting, records)
    gone: list[Entry] = []
    mark = f"{alias} {ask}"
    listed_upto: dict[str, int] = {}
    if unknown or ask is not None:
        after = ledger.listed_upto(mark) if ask is not None else 0
        client = _client_for(app, spec)
        listed, upto = jobs.jobs_with_outputs(client, ask or "", [e.job for e in unknown], after=after)
        if ask is not None and upto != after:
            listed_upto[mark] = upto
        records.update((r.id, r) for r in listed)
        gone = [e for e in unknown if e.job not in records]
        due += [e for e in unknown if e.job in records and outputs.ended(records[e.job])]
    base = outputs.outputs_root(app.settings.project.root, app.settings.get("outputs_dir"))
    met = [
        outputs.entry_for(r, alias, r.outputs, base)
        for r in records.values()
        if outputs.theirs(r, project) and outputs.ended(r) and f"{alias}:{r.id}" not in entries
    ]
    if gone or met or listed_upto:
        with ledger.edit(listed_upto) as now:
            for e in gone:
                if e.key in now:
                    now[e.key].status = "gone"
            for e in met:
                e.status = "waiting"  # until fetched
                now.setdefault(e.key, e)
    for e in gone:
        app.env.stderr.write(f"remotedl: job {e.job} is gone from {alias}: its outputs cannot come home\n")
    return due + met


def _client_for(app: App, spec: HostSpec) -> AgentClient:
    from remotedl.agent.client import AgentClient

    return AgentClient(spec, python=str(app.settings.get("python")))


def _fetch_and_say(app: App, spec: HostSpec, ledger: Ledger, entry: Entry, *, job_ended: bool) -> Arrival:
    from remotedl import outputs

    arrival = outputs.fetch(spec, entry, job_ended=job_ended, work_tree=app.settings.project.root)
    with ledger.edit() as entries:
        entries[entry.key] = entry
    for line in arrival_lines(app, arrival):
        app.env.stderr.write(f"remotedl: {line}\n")
    if job_ended:
        _wandb(app, ledger, entry)
    return arrival


def _shown(app: App, path: str) -> str:
    """A local path as the user reads it: relative to where they are, when below it."""
    try:
        rel = os.path.relpath(path, app.env.cwd)
    except ValueError:
        return path
    return rel if not rel.startswith("..") else path


def arrival_lines(app: App, a: Arrival) -> list[str]:

    where = _shown(app, a.dest) + "/"
    what = f"{plural(a.files, 'file')}, {size_text(a.bytes)}" if a.files else "nothing new"
    lines = [f"outputs of job {a.job} ({safe(a.name)}) on {a.host}: {what} -> {where}"]
    if a.missing:
        lines.append(f"  not on the box: {', '.join(a.missing)}")
    kept = [*a.kept, *a.kept_newer]
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        lines.append(f"  kept {shown} here: changed here since fetched (the box's copy was not taken)")
    return lines


def _wandb(app: App, ledger: Ledger, entry: Entry) -> None:
    """W&B offline runs that came home: synced from here (``wandb_sync = true``), or the
    command that does it."""
    from remotedl import outputs, proc

    runs = [r for r in outputs.wandb_offline_runs(Path(entry.dest)) if str(r) not in entry.synced]
    if not runs:
        return
    if not app.settings.get("wandb_sync"):
        shown = " ".join(_shown(app, str(r)) for r in runs)
        app.env.stderr.write(f"remotedl: W&B offline run(s) came home; upload with: wandb sync {shown}\n")
        return
    import shutil

    wandb = shutil.which("wandb", path=app.env.environ.get("PATH"))
    if wandb is None:
        app.env.stderr.write(
            "remotedl: wandb_sync = true, but wandb is not installed here (pip install wandb)\n"
        )
        return
    done = proc.run([wandb, "sync", *map(str, runs)], check=False, env=dict(app.env.environ))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        app.env.stderr.write(f"remotedl: wandb sync failed: {last[:300]}\n")
        return
    with ledger.edit() as entries:
        if entry.key in entries:
            entries[entry.key].synced += [str(r) for r in runs]
    app.env.stderr.write(f"remotedl: wandb sync: {plural(len(runs), 'run')} of job {entry.job} uploaded\n")


# ------------------------------------------------------------------ remotedl outputs


def cmd_outputs(args: argparse.Namespace, env: Environment) -> int:
    """List this project's jobs with outputs and fetch those that ended (JOB: that job's outputs
    now, running or not; --watch: keep fetching while they run). One listing per box says
    which ended, the project's jobs started from other clones among them."""
    from remotedl import outputs

    app = App(args, env)
    root = app.settings.project.root
    ledger = outputs.Ledger(root)
    arrivals: list[Arrival] = []
    failed = False
    if args.job:
        entry, rec = _entry_for_job(app, args, ledger)
        if args.watch:
            return _watch(app, ledger, [entry.key], args.interval)
        arrivals.append(
            _fetch_and_say(app, app.spec_for(entry.host), ledger, entry, job_ended=outputs.ended(rec))
        )
    else:
        hosts = list(
            dict.fromkeys([*app.hosts, *(e.host for e in ledger.read().values() if e.status == "waiting")])
        )
        ident = project_id(app)
        for host in hosts:
            try:
                spec = app.spec_for(host)
                due = _ended(app, spec, ledger, {}, ask=_remote_dir_of(app, host), project=ident)
                if args.watch:
                    continue
                for entry in due:
                    arrivals.append(_fetch_and_say(app, spec, ledger, entry, job_ended=True))
            except RemotedlError as e:
                failed = True
                env.stderr.write(f"remotedl: {host}: {e.message}\n")
        if args.watch:
            keys = [e.key for e in ledger.read().values() if e.status == "waiting"]
            return _watch(app, ledger, keys, args.interval)
    entries = list(ledger.read().values())
    if app.json:
        fetched = [a.to_dict() for a in arrivals]
        app.print_json({"jobs": [_entry_json(e) for e in entries], "fetched": fetched})
        return ExitCode.ERROR if failed else ExitCode.OK
    if not entries:
        app.out("no job with outputs yet: set `outputs = [...]` in remotedl.toml or `run --output PATH`")
    for item in sorted(entries, key=lambda x: x.created):
        size = sum(v[0] for v in item.files.values())
        app.out(
            f"{item.host}:{item.job:<5} {item.name[:24]:<24} {item.status:<8} "
            f"{plural(len(item.files), 'file')}, {size_text(size)} -> {_shown(app, item.dest)}/"
        )
    return ExitCode.ERROR if failed else ExitCode.OK


def _entry_json(e: Entry) -> dict[str, Any]:
    d = e.to_dict()
    d["files"] = len(e.files)
    d["bytes"] = sum(v[0] for v in e.files.values())
    return d


def _by_host(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    out: dict[str, list[Entry]] = {}
    for e in entries:
        out.setdefault(e.host, []).append(e)
    return out


def _entry_for_job(app: App, args: argparse.Namespace, ledger: Ledger) -> tuple[Entry, JobRecord]:
    """The ledger's entry of JOB; a job not started from here (another clone, or before outputs
    were configured) gets one with the configured outputs (and ``--output``)."""
    from remotedl import jobs, outputs

    app, ref = route(app, args.job)
    client = _client_for(app, app.spec())
    rec = jobs.get_job(client, ref, project=None if ref else remote_dir(app))
    alias = client.spec.alias
    known = ledger.read().get(f"{alias}:{rec.id}")
    extra = [outputs.check_output_path(p) for p in args.output]
    if known is not None and not extra:
        return known, rec
    paths = [*rec.outputs, *planned(app, args)]
    if not paths:
        raise UsageError(
            f"job {rec.id} has no outputs to fetch",
            hint="name them: `remotedl outputs JOB --output PATH`, or set `outputs = [...]` in remotedl.toml",
        )
    base = outputs.outputs_root(app.settings.project.root, app.settings.get("outputs_dir"))
    entry = known or outputs.entry_for(rec, alias, paths, base)
    entry.paths = list(dict.fromkeys([*entry.paths, *paths]))
    entry.status = "waiting"
    outputs.register(ledger, entry)
    return entry, rec


def _watch(app: App, ledger: Ledger, keys: list[str], interval: float) -> int:
    """Fetch the entries' outputs every ``interval`` seconds while their jobs run, once more
    when each ends; returns when all ended (Ctrl-C ends it sooner). Each round asks each box
    about its jobs in one listing."""
    from remotedl import jobs, outputs

    env = app.env
    if not keys:
        app.out("no running job with outputs to watch")
        return ExitCode.OK
    env.stderr.write(f"watching the outputs of {plural(len(keys), 'job')}; Ctrl-C ends\n")
    try:
        while keys:
            entries = ledger.read()
            keys = [k for k in keys if k in entries]
            for host, group in _by_host([entries[k] for k in keys]).items():
                spec = app.spec_for(host)
                try:
                    listed, _ = jobs.jobs_with_outputs(_client_for(app, spec), "", [e.job for e in group])
                    records = {r.id: r for r in listed}
                    for entry in group:
                        rec = records.get(entry.job)
                        if rec is None:  # gone from the box
                            keys.remove(entry.key)
                            continue
                        ended = outputs.ended(rec)
                        _fetch_and_say(app, spec, ledger, entry, job_ended=ended)
                        if ended:
                            keys.remove(entry.key)
                except RemotedlError as e:
                    env.stderr.write(f"remotedl: {host}: {e.message}; still watching\n")
            if keys:
                time.sleep(interval)
    except KeyboardInterrupt:
        env.stderr.write("stopped watching\n")
    return ExitCode.OK


# ------------------------------------------------------------------ remotedl compare


def cmd_compare(args: argparse.Namespace, env: Environment) -> int:
    from rich.table import Table
    from rich.text import Text

    from remotedl import compare, jobs, outputs

    app = App(args, env)
    if len(args.jobs) < 1:
        raise UsageError("name the jobs to compare: `remotedl compare 3 4 5`")
    root = app.settings.project.root
    ledger = outputs.Ledger(root)
    base = outputs.outputs_root(root, app.settings.get("outputs_dir"))
    rows: list[compare.JobRow] = []
    for ref in args.jobs:
        one, job = app.route_job(ref)
        spec = one.spec()
        client = _client_for(one, spec)
        rec = jobs.get_job(client, job)
        entry = ledger.read().get(f"{spec.alias}:{rec.id}")
        if entry is not None and entry.status == "waiting" and outputs.ended(rec):
            _fetch_and_say(one, spec, ledger, entry, job_ended=True)
        dest = Path(entry.dest) if entry is not None else outputs.job_dest(base, spec.alias, rec.id)
        if not dest.is_dir():
            env.stderr.write(
                f"remotedl: job {rec.id}: no outputs here; `remotedl outputs {ref} --output PATH` "
                "fetches them\n"
            )
        commit_ok = bool(rec.git_commit) and jobs.keep_commit(root, spec.alias, rec) is not None
        shown = one.job_ref(rec.id) if one.narrowed else str(rec.id)
        rows.append(compare.job_row(shown, rec, dest, entry.env if entry else {}, commit_ok))
    table = compare.build(root, rows)
    if args.plot:
        series = {r.ref: compare.series(r.dest, args.plot) for r in rows}
        if not any(series.values()):
            raise RemotedlError(
                f"no values of {args.plot!r} in the jobs' outputs",
                hint="metrics.json (a list per name) or TensorBoard event files under the outputs",
            )
        if args.out:
            compare.plot_png(series, args.plot, Path(args.out))
            env.stderr.write(f"remotedl: wrote {args.out}\n")
        else:
            env.stdout.write(compare.plot_text(series, args.plot) + "\n")
    if app.json:
        app.print_json(table.to_dict())
        return ExitCode.OK
    t = Table(box=None, pad_edge=False)
    for col in table.columns:
        t.add_column(col, no_wrap=True)
    for row in table.rows:
        t.add_row(*[Text(safe(str(c))) for c in row])
    app.console.print(t)
    for line in table.notes:
        app.out(safe(line))
    return ExitCode.OK


# ------------------------------------------------------------------ tensorboard --local


def tensorboard_local(app: App, args: argparse.Namespace) -> int:
    """``remotedl tensorboard --local``: TensorBoard here over the outputs that came home
    (127.0.0.1), without the box; ``--background`` leaves it running and prints its pid."""
    import subprocess
    import sys

    from remotedl import outputs, proc
    from remotedl.waiting import free_port, pid_alive, port_answers, retry_until

    base = outputs.outputs_root(app.settings.project.root, app.settings.get("outputs_dir"))
    if not base.is_dir() or not any(base.iterdir()):
        raise RemotedlError(
            f"no outputs have come home yet ({_shown(app, str(base))} is empty)",
            hint='set `outputs = ["runs/"]` in remotedl.toml (or `run --output runs/`); '
            "they arrive when jobs end",
        )
    port = args.local_port or int(app.settings.get("tensorboard_port"))
    if port_answers("127.0.0.1", port):
        port = free_port()
    argv = outputs.local_tensorboard_argv(base, port)
    if not (argv[0] == sys.executable or os.access(argv[0], os.X_OK)):
        raise RemotedlError("TensorBoard is not installed here", hint="pip install tensorboard")
    ledger = outputs.Ledger(app.settings.project.root)
    ledger.dir.mkdir(mode=0o700, exist_ok=True)
    log = ledger.dir / "tensorboard.log"
    with open(log, "ab") as out:
        fd = out.fileno()
        p = proc.popen(argv, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True)
    if not retry_until(lambda: port_answers("127.0.0.1", port) or not pid_alive(p.pid), seconds=60) or (
        not pid_alive(p.pid)
    ):
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise RemotedlError(f"TensorBoard did not start: {(tail or ['?'])[0][:300]}")
    url = f"http://127.0.0.1:{port}/"
    if app.json:
        app.print_json({"url": url, "pid": p.pid, "logdir": str(base)})
    else:
        app.env.stderr.write(f"remotedl: TensorBoard over {_shown(app, str(base))} (the outputs here)\n")
        app.out(url)
    if args.background:
        if not app.json:
            app.env.stderr.write(f"remotedl: running as pid {p.pid}; `kill {p.pid}` stops it\n")
        return ExitCode.OK
    try:
        p.wait()
    except KeyboardInterrupt:
        p.terminate()
        p.wait()
    return ExitCode.OK
