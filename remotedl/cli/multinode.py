"""`remotedl run --nodes N`: one run across N boxes of a fleet; `logs -f RUN`, `kill RUN`."""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable

from remotedl.cli.app import App
from remotedl.errors import ExitCode, Interrupted, JobFailed, RemotedlError, UsageError
from remotedl.multinode import Node, NodeJob, NodePlan, Run
from remotedl.run import RunPlan
from remotedl.words import plural, printable


def run_nodes(
    app: App, args: argparse.Namespace, plan_for: Callable[[App, argparse.Namespace], RunPlan]
) -> int:
    """Place the run on ``--nodes`` boxes with the GPUs free, push the same commit to each,
    start one job per node at once with the rendezvous variables, and follow them as one run.
    Each node's job is the ``RunPlan`` that host's settings give (``nodes`` set, the node's
    variables in its ``env``). ``plan_for`` is ``run``'s own plan builder (handed down, so this
    module does not import the one that dispatches to it)."""
    import dataclasses

    from remotedl import jobs, multinode, sync
    from remotedl.cli.common import status_progress
    from remotedl.errors import ConnectError
    from remotedl.fleet import fleet_samples, run_on_hosts
    from remotedl.run import start_job

    env = app.env
    if args.nodes < 2:
        raise UsageError(f"--nodes {args.nodes}: a multi-node run has 2 nodes or more")
    if not args.command:
        raise UsageError("give a command to run, e.g. `remotedl run --nodes 2 -- torchrun ... train.py`")
    if args.gpu:
        raise UsageError("--gpu names GPUs of one box", hint="with --nodes give the GPUs per node: --gpus N")
    if args.queue:
        raise UsageError("--queue: a multi-node run starts every node at once, never from a box's queue")
    if args.gpus is not None and args.gpus < 0:
        raise UsageError(f"--gpus {args.gpus}: give a number of GPUs per node (0 runs on the CPU)")
    if len(app.hosts) < args.nodes:
        raise UsageError(
            f"--nodes {args.nodes} needs {args.nodes} hosts; given: {', '.join(app.hosts) or 'none'}",
            hint="name them with --host a,b, or `hosts = [...]` in remotedl.toml",
        )
    fleet = app.fleet()
    for name in app.hosts:
        if fleet.member(name).scheduler == "slurm":
            raise UsageError(
                f"{name} is a Slurm host: a multi-node run is on its nodes or on boxes, not both",
                hint=f"--host {name} alone runs on N nodes of its cluster (sbatch --nodes N)",
            )
    first = plan_for(app.for_host(app.hosts[0]), args)  # the command and flags checked here, once
    for name in app.hosts:  # any of them may be placed; each host's settings may name an image
        imaged = first if name == app.hosts[0] else plan_for(app.for_host(name), args)
        if imaged.image:  # the nodes' rendezvous needs the host's network, which job containers lack
            raise UsageError(
                f"--nodes in a container image ({imaged.image}, on {name}) is not supported yet",
                hint="give --no-image to run the nodes on the boxes themselves",
            )
    root = first.project_root
    sampled = fleet_samples(fleet)
    for r in sampled.failed:
        env.stderr.write(f"remotedl: {r.host} is left out: {printable(str(r.error), newlines=False)}\n")
    live = [sample for _, sample in sampled.values()]
    if not live:
        raise ConnectError(f"no box of the fleet answered ({', '.join(app.hosts)})")
    cpu = bool(args.cpu or args.gpus == 0)
    picked = multinode.choose(live, args.nodes, count=args.gpus or None, cpu=cpu)
    cpu = cpu or not picked[0].gpus
    per_node = None if cpu else (args.gpus or 1)
    members = [fleet.member(c.host) for c in picked]
    nodes = [Node(i, m.name, multinode.peer_address(m)) for i, m in enumerate(members)]
    plan = NodePlan(multinode.new_run_id(), nodes, 0, gpus_per_node=per_node)  # its port: after the push
    master = plan.master
    for c in picked:
        env.stderr.write(f"remotedl: node {picked.index(c)} on {c.host}: {c.why}\n")
    name = first.name

    def node_plan(node: Node, hostfile_path: str) -> RunPlan:
        p = plan_for(app.for_host(node.host), args)
        return dataclasses.replace(
            p,
            name=multinode.job_name(name, plan.run_id, node.rank),
            gpus="none" if cpu else "auto",
            count=per_node,
            env={**p.env, "REMOTEDL_HOSTFILE": hostfile_path},  # the run's variables: at the start
            queue=False,
            detach=True,
            ref_host=True,
            nodes=len(nodes),
        )

    # 1. every node gets the hostfile and the same code, all at once
    hostfile = plan.hostfile()

    def prepare(host: str) -> tuple[RunPlan, str | None, bool, str | None]:
        m = fleet.member(host)
        node = next(n for n in nodes if n.host == host)
        p = node_plan(node, multinode.write_hostfile(m.box(), plan.run_id, hostfile))
        if not p.push:  # the box's tree, verified as this project's
            return (
                dataclasses.replace(p, remote_dir=sync.verify_remote_dir(m.spec, root, p.remote_dir)),
                None,
                False,
                None,
            )
        pushed = sync.push(
            m.spec, root, p.remote_dir, data=list(p.data), excludes=list(p.excludes),
            dir_mode=p.dir_mode, max_snapshot_file=p.max_snapshot_file,
        )  # fmt: skip
        p = dataclasses.replace(p, remote_dir=pushed.remote_dir)
        return p, pushed.commit, pushed.snapshot, pushed.head

    prepared = run_on_hosts([n.host for n in nodes], prepare)
    if prepared.failed:
        bad = prepared.failed[0]
        assert bad.error is not None
        bad.error.message = f"{bad.host}: {bad.error.message}"
        raise bad.error
    ready = dict(prepared.values())
    commits = {host: v[1] for host, v in ready.items()}
    if len(set(commits.values())) > 1:
        shown = ", ".join(f"{h} {(c or '?')[:12]}" for h, c in commits.items())
        raise RemotedlError(f"the nodes did not get the same commit ({shown})", hint="run again")

    # 2. the master's port, picked now (the push may have taken minutes: a port picked before
    # it had that long to be taken); then one job per node, started at once; all or nothing
    port = multinode.free_port(members[0].box(), members[0].python)
    plan = dataclasses.replace(plan, master_port=port)
    env.stderr.write(
        f"remotedl: run {plan.run_id}: {plural(len(nodes), 'node')}, master {master.host} at "
        f"{master.addr}:{port} (the rendezvous: open on {master.host} while the run lasts)\n"
    )

    def start_one(node: Node) -> jobs.JobRecord:
        p, commit, snapshot, head = ready[node.host]
        client = fleet.member(node.host).client()
        # The run's variables, with the port picked just now; one notification per run: the
        # master's job alone carries the notify URLs.
        p = dataclasses.replace(
            p,
            env={**p.env, **plan.env(node.rank, p.env["REMOTEDL_HOSTFILE"])},
            notify=p.notify if node.rank == 0 else (),
        )
        progress = status_progress(app.for_host(node.host))
        # Each node's job as any job: its commit kept, its outputs come home.
        return start_job(
            p, client, progress, remote_dir=p.remote_dir, commit=commit, snapshot=snapshot, head=head,
            alias=node.host,
        ).record  # fmt: skip

    def stop(job: NodeJob, grace: float) -> None:
        jobs.kill(fleet.member(job.host).client(), str(job.job_id), grace=grace)

    try:
        started, skew = multinode.start_all(nodes, start_one, lambda j: stop(j, 1.0))
    except KeyboardInterrupt:
        # A start request may have reached a box: its job then runs, and only this says so.
        raise Interrupted(
            f"interrupted while starting run {plan.run_id}: some nodes' jobs may be running",
            hint=f"`remotedl jobs --host {','.join(n.host for n in nodes)}` lists them (named "
            f"[{plan.run_id} node R]); `remotedl kill HOST:ID` stops one",
        ) from None
    run = Run(
        plan.run_id, name, first.command, master.addr, port, nodes=started, skew=skew, started=time.time()
    )
    multinode.save_run(env.state_dir, run)
    refs = ", ".join(f"node {j.rank} {j.ref}" for j in started)
    if app.json and args.detach:
        app.print_json(run.to_dict())
        return ExitCode.OK
    if args.detach:
        app.out(run.run_id)
        env.stderr.write(
            f"run {run.run_id} started ({refs}; start skew {skew:.2f} s); "
            f"`remotedl logs -f {run.run_id}` follows it, `remotedl kill {run.run_id}` ends every node\n"
        )
        return ExitCode.OK
    env.stderr.write(
        f"remotedl: run {run.run_id} started ({refs}; start skew {skew:.2f} s); Ctrl-C detaches\n"
    )
    return follow_run(app, run, grace=args.fail_grace)


def _prefixed_writers(
    app: App, run: Run
) -> tuple[Callable[[NodeJob], Callable[[bytes], None]], Callable[[], None]]:
    """One writer per node that puts ``[node R HOST] `` before each of its lines (``--json``:
    one object per line, ``{"node": R, "host": ..., "text": ...}``); lines of different nodes
    never mix. The flush writes what is left of each node's last line."""
    import json

    from remotedl.cli.common import log_writer

    raw, flush = log_writer(app.env)
    lock = threading.Lock()
    pending: dict[int, bytearray] = {}

    def emit(job: NodeJob, lines: list[bytes]) -> None:
        """Whole lines of one node, each with its newline."""
        if not app.json:
            prefix = f"[node {job.rank} {job.host}] ".encode()
            raw(b"".join(prefix + line for line in lines))
            return
        for line in lines:
            obj = {"node": job.rank, "host": job.host, "text": line.decode("utf-8", errors="replace")}
            app.env.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        app.env.stdout.flush()

    def for_node(job: NodeJob) -> Callable[[bytes], None]:
        buf = pending.setdefault(job.rank, bytearray())

        def w(b: bytes) -> None:
            buf.extend(b)
            end = buf.rfind(b"\n")
            if end < 0:
                return
            # lines end at newlines only: a progress bar's \r stays inside its line
            lines = [line + b"\n" for line in bytes(buf[:end]).split(b"\n")]
            del buf[: end + 1]
            with lock:
                emit(job, lines)

        return w

    def flush_all() -> None:
        with lock:
            for rank, buf in pending.items():
                if buf:
                    emit(run.nodes[rank], [bytes(buf) + b"\n"])
                    buf.clear()
            flush()

    return for_node, flush_all


def follow_run(app: App, run: Run, *, grace: float = 10.0) -> int:
    """Follow every node's log (merged, each line with its node) to the run's end; the first
    node that fails has the others ended (TERM, then KILL after ``grace``)."""
    from remotedl import jobs, multinode
    from remotedl.cli.common import warner

    env = app.env
    fleet = app.fleet()
    for_node, flush = _prefixed_writers(app, run)

    def follow_one(job: NodeJob) -> jobs.JobRecord:
        return jobs.stream_logs(
            fleet.member(job.host).client(), str(job.job_id), for_node(job), follow=True, warn=warner(env)
        )

    def stop(job: NodeJob) -> None:
        jobs.kill(fleet.member(job.host).client(), str(job.job_id), grace=grace)

    def failed(job: NodeJob) -> None:
        flush()
        why = f"exit {job.exit_code}" if job.exit_code is not None else (job.error or job.status)
        others = [j for j in run.nodes if j is not job and j.status in ("running", "starting", "queued")]
        if others:
            env.stderr.write(
                f"remotedl: node {job.rank} ({job.ref}) ended ({printable(why, newlines=False)}): ending "
                f"{', '.join(f'node {j.rank}' for j in others)} (TERM, KILL after {grace:g} s)\n"
            )

    try:
        multinode.supervise(run, follow_one, stop, on_failure=failed)
    except KeyboardInterrupt:
        flush()
        env.stderr.write(
            f"\nremotedl: detached; run {run.run_id} keeps running on "
            f"{', '.join(j.host for j in run.nodes)}.\n"
            f"  follow again: remotedl logs -f {run.run_id}    stop: remotedl kill {run.run_id}\n"
        )
        return ExitCode.INTERRUPTED
    flush()
    multinode.save_run(env.state_dir, run)
    if app.json:
        app.print_json(run.to_dict())
    code = run.exit_code
    env.stderr.write(f"remotedl: run {run.run_id} {run.state}\n")
    if code != 0:
        raise JobFailed(f"run {run.run_id} {run.state}", code)
    return ExitCode.OK


def _load(app: App, ref: str | None) -> tuple[App, Run]:
    from remotedl import multinode

    run = multinode.load_run(app.env.state_dir, ref)
    if run is None:
        raise UsageError(
            f"no run {ref} on this machine" if ref else "no multi-node run on this machine",
            hint="runs started here with `remotedl run --nodes N` are kept under "
            + str(multinode.runs_dir(app.env.state_dir)),
        )
    hosts = [j.host for j in run.nodes]
    app.args.host = ",".join(hosts)
    return App(app.args, app.env), run


def node_ref(app: App, ref: str, rank: int) -> str:
    """``HOST:ID`` of node ``rank``'s job of run ``ref``: `logs RUN --node R` is that job's log."""
    _, run = _load(app, ref)
    if not 0 <= rank < len(run.nodes):
        raise UsageError(f"--node {rank}: run {run.run_id} has nodes 0 to {len(run.nodes) - 1}")
    return run.nodes[rank].ref


def logs_run(app: App, ref: str, *, follow: bool, grace: float = 10.0) -> int:
    """`logs [-f] RUN`: every node's log, each line with its node; following, as `run` does."""
    from remotedl import jobs

    app, run = _load(app, ref)
    if follow:
        return follow_run(app, run, grace=grace)
    fleet = app.fleet()
    for_node, flush = _prefixed_writers(app, run)
    for job in run.nodes:
        jobs.stream_logs(fleet.member(job.host).client(), str(job.job_id), for_node(job))
    flush()
    return ExitCode.OK


def kill_run(app: App, ref: str, *, grace: float) -> int:
    """`kill RUN`: every node's job, at once; a node whose job has ended already is said so."""
    from remotedl import jobs, multinode
    from remotedl.fleet import run_on_hosts

    app, run = _load(app, ref)
    fleet = app.fleet()
    by_host = {j.host: j for j in run.nodes}

    def one(host: str) -> jobs.JobRecord:
        return jobs.kill(fleet.member(host).client(), str(by_host[host].job_id), grace=grace)

    result = run_on_hosts(list(by_host), one)
    for r in result.results:
        job = by_host[r.host]
        if r.value is not None:
            job.status, job.exit_code = r.value.status, r.value.exit_code
            app.out(f"node {job.rank} {job.ref}: {r.value.state}")
        else:
            app.env.stderr.write(
                f"remotedl: node {job.rank} {job.ref}: {printable(str(r.error), newlines=False)}\n"
            )
    multinode.save_run(app.env.state_dir, run)
    if all(not r.ok for r in result.results):
        raise RemotedlError(f"run {run.run_id}: no node's job was running")
    return ExitCode.OK


def doctor_nodes(app: App) -> int:
    """`doctor --nodes`: whether every host reaches the first one's rendezvous address and a
    port there, as a multi-node run needs; exit 1 when one does not."""
    from remotedl import multinode

    if len(app.hosts) < 2:
        raise UsageError(
            "doctor --nodes checks hosts against each other: name two or more",
            hint="--host a,b (the first is the master), or `hosts = [...]`",
        )
    fleet = app.fleet()
    members = [fleet.member(h) for h in app.hosts]
    found = multinode.check_nodes(members)
    if app.json:
        from dataclasses import asdict

        app.print_json({"nodes": [asdict(x) for x in found], "ok": all(x.ok for x in found)})
    else:
        for x in found:
            mark = "OK   " if x.ok else "FAIL "
            app.out(f"{mark} nodes  {x.host} -> {x.master}: {printable(x.detail, newlines=False)}")
            if not x.ok:
                app.out(
                    f"              fix: set node_addr in [hosts.{x.master}] to the address its peers "
                    f"reach it at, and let {x.master}'s firewall accept {x.host} on high ports"
                )
    return ExitCode.OK if all(x.ok for x in found) else ExitCode.ERROR


def show_run(app: App, ref: str) -> int:
    """`show RUN`: the run (its master, start skew) and each node's job as its box has it now."""
    from remotedl import jobs, multinode
    from remotedl.fleet import run_on_hosts

    app, run = _load(app, ref)
    fleet = app.fleet()
    by_host = {j.host: j for j in run.nodes}
    found = run_on_hosts(
        list(by_host), lambda h: jobs.get_job(fleet.member(h).client(), str(by_host[h].job_id))
    )
    for r in found.results:
        if r.value is not None:
            job = by_host[r.host]
            job.status, job.exit_code = r.value.status, r.value.exit_code
            if job.status != "succeeded" and job.status not in ("running", "starting", "queued"):
                run.failed_rank = job.rank if run.failed_rank is None else run.failed_rank
    multinode.save_run(app.env.state_dir, run)
    if app.json:
        app.print_json(
            {
                **run.to_dict(),
                "jobs": [{**r.value.to_dict(), "alias": r.host} for r in found.results if r.value],
            }
        )
        return found.exit_code
    app.out(f"run {run.run_id} ({printable(run.name, newlines=False)}): {run.state}")
    app.out(f"  master      {run.master_addr}:{run.master_port}")
    app.out(f"  command     {printable(run.command, newlines=False)}")
    app.out(f"  start skew  {run.skew:.2f} s")
    for r in found.results:
        job = by_host[r.host]
        if r.value is not None:
            gpus = f"GPUs {','.join(map(str, r.value.gpus))}" if r.value.gpus else "no GPU"
            app.out(f"  node {job.rank}      {job.ref}: {r.value.state}, {gpus}")
        else:
            app.out(f"  node {job.rank}      {job.ref}: {printable(str(r.error), newlines=False)}")
    return found.exit_code
