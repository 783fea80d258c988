"""A run as a plan: ``RunPlan`` says what ``remotedl run`` does (built once from the settings
and the flags, before anything reaches a box), and ``run(plan, client, progress)`` does it on one
host: push (or verify ``remote_dir``), start (syncing the environment and trying again when the
box says its requirements changed), keep the job's commit, register its outputs in this clone's
ledger, follow the log to the end, bring its outputs home, pull and show a desktop notification.

The library never prints or exits: what the user sees goes through ``RunProgress``, whose
methods the CLI overrides, and the outcome comes back as a ``RunResult``. Fleet placement builds
one plan per member (each host has its own settings) and calls ``run`` for the box it picked.
The container and multi-node issues add their fields (``image``, ``nodes``) to ``RunPlan``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from remotedl.errors import ConfigError, Interrupted, RemotedlError, UsageError

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.config import Settings
    from remotedl.desktop import DesktopResult
    from remotedl.envsync import EnvSyncResult
    from remotedl.jobs import EnvSpec, PullSource
    from remotedl.outputs import Arrival
    from remotedl.rsync import ProgressFn
    from remotedl.schema import JobRecord
    from remotedl.slurm import SlurmSettings
    from remotedl.sync import PullResult, PushResult

# Which GPUs a job asks for: "auto" (the agent picks free ones; ``count`` of them), "none" (the
# CPU only), or the indices the user named; Slurm hosts ask for a count and Slurm picks.
GpuChoice = Literal["auto", "none"] | list[int]


@dataclass(frozen=True)
class RunPlan:
    """Everything a ``remotedl run`` decided before it reaches the box. Field names are plain on
    purpose: the container, multi-node and fleet code read and extend them."""

    # --- the job
    command: str  # the shell line the job runs (``jobs.build_command``: argv quoted, a script run by python)
    argv: tuple[str, ...]  # the command as the user typed it
    script: str | None  # the project file the command runs, if it runs one (checked to exist when pushing)
    name: str  # the job's name (--name, else the script's or program's file name)
    gpus: GpuChoice = "auto"  # which GPUs (see GpuChoice); --cpu / --gpus 0 give "none"
    count: int | None = None  # how many GPUs with "auto" (--gpus N); None: the agent's default (one)
    env: dict[str, str] = field(default_factory=dict)  # job environment: `env` setting, then --env K=V
    # --- how the command treats it
    queue: bool = False  # wait on the box for GPUs instead of failing when none is free
    force: bool = False  # take GPUs that other processes use
    detach: bool = False  # start and return; otherwise follow the log to the job's end
    pull: tuple[str, ...] = ()  # paths brought home when the followed job ends (pull_on_end + --pull)
    notify: tuple[str, ...] = ()  # notification URLs the box calls when the job ends (checked)
    notify_desktop: bool = False  # a desktop notification here when the followed job ends
    stall_after: float | None = None  # seconds without log output before the job counts as stalled
    # --- the settings that matter
    host: str = ""  # the host's alias, as the user names it
    ref_host: bool = False  # name the job HOST:ID (a host picked from several)
    project_root: Path = Path(".")  # the project on this laptop
    remote_dir: str = ""  # the project's directory on the box
    push: bool = True  # push code and data first (--no-push: use the box's tree, verified as this project's)
    isolate: bool = True  # the job runs in its own checkout of the pushed commit, not in the work tree
    data: tuple[str, ...] = ()  # data paths pushed with rsync (settings' `data` + --data)
    excludes: tuple[str, ...] = ()  # rsync excludes (`exclude`)
    shared: tuple[str, ...] = ()  # work-tree paths every job's checkout links to (`shared`)
    dir_mode: str = "700"  # the mode of a remote_dir the push creates (`remote_dir_mode`)
    max_snapshot_file: int = 0  # the snapshot's size limit for an untracked file (for the left-out notes)
    environment: EnvSpec | None = None  # how the box syncs the project's environment (env sync settings)
    slurm: SlurmSettings | None = None  # the host's Slurm settings with --time/--partition/...; None: a box
    # --- outputs home (issue 28)
    outputs: tuple[str, ...] = ()  # the job's outputs (`outputs` + --output, the trackers' dirs)
    trackers: bool = False  # the box points the trackers (W&B, MLflow) into the job's directory
    project_id: str | None = None  # the project's identity (its root commit): any clone knows its jobs
    outputs_base: Path = Path(".")  # where outputs come home to (`outputs_dir`, under the project)
    # --- room for the next runtimes (their own issues fill these in)
    image: str | None = None  # a container image to run the job in (`image`, --image; --no-image: None)
    container: dict[str, Any] | None = None  # with an image: engine, gpus (container_gpus), args
    nodes: int = 1  # how many nodes the job spans

    @property
    def follow(self) -> bool:
        """The command follows the job's log to its end (and then pulls and notifies)."""
        return not self.detach

    def ref(self, job_id: int) -> str:
        """How the user names a job of this plan's host: ``HOST:ID`` or the id."""
        return f"{self.host}:{job_id}" if self.ref_host and self.host else str(job_id)


def env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``--env KEY=VALUE`` pairs as a dict; a value is never shown (it may be a secret)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            shown = f"{key}=..." if sep else pair  # the value may be a secret: never said
            raise UsageError(f"--env {shown!r}: use KEY=VALUE, KEY a name of letters, digits and _")
        out[key] = value
    return out


def command_argv(words: Sequence[str]) -> list[str]:
    """The command's words as given after ``run`` (a leading ``--`` dropped); refused when empty."""
    if not words:
        raise UsageError("give a command to run, e.g. `remotedl run train.py --lr 0.1`")
    return list(words[1:] if words[0] == "--" else words)


def gpu_choice(
    *, gpu: str | None, gpus: int | None, cpu: bool, slurm: bool = False
) -> tuple[GpuChoice, int | None]:
    """The GPU flags as (choice, count): ``--cpu``/``--gpus 0`` run on the CPU, ``--gpu 0,2`` names
    GPUs (``auto``: the agent picks), ``--gpus N`` asks for N. On a Slurm host Slurm picks the
    devices: a count (one unless --gpus says), and --gpu with indices is refused."""
    from remotedl import gpus as gpumod

    if gpus is not None and gpus < 0:
        raise UsageError(f"--gpus {gpus}: give a number of GPUs (0 runs on the CPU)")
    off = cpu or gpus == 0
    if slurm:
        if not off and gpu and gpu.strip().lower() != "auto":
            raise UsageError(
                f"--gpu {gpu} picks GPUs by their index, but on a Slurm cluster Slurm chooses the "
                "devices: the job sees the ones it got as CUDA_VISIBLE_DEVICES starting at 0",
                hint="ask for a number of GPUs with --gpus N",
            )
        return ("none" if off else "auto"), (None if off else int(gpus or 1))
    if off:
        return "none", None
    if gpu:
        try:
            parsed = gpumod.parse_gpu_spec(gpu)
        except ValueError as e:
            raise UsageError(str(e)) from e
        return ("auto" if parsed is None else parsed), gpus or None
    return "auto", gpus or None


def notify_urls(settings: Settings, given: Sequence[str], *, off: bool = False) -> list[str]:
    """The job's notification URLs (config ``notify`` + ``--notify``), each checked here, so a
    typo fails the run now rather than a notification hours later."""
    if off:
        return []
    configured = [str(u) for u in settings.get("notify")]
    if not configured and not given:
        return []  # nothing to check: the notify package (~3 ms) stays unimported
    from remotedl import notify

    for url in configured:
        try:
            notify.parse(url)
        except notify.NotifyURLError as e:
            raise ConfigError(
                f"{settings.source('notify')}: notify: {e}", hint="fix the URL in the config"
            ) from None
    for url in given:
        try:
            notify.parse(url)
        except notify.NotifyURLError as e:
            raise UsageError(f"--notify: {e}") from None
    return [*configured, *[str(u) for u in given if u not in configured]]


def output_paths(settings: Settings, given: Sequence[str]) -> list[str]:
    """The outputs of a job about to start: ``outputs`` in the config plus ``--output``; with
    any, the trackers' directories too (``trackers = true``). Each checked (a relative path)."""
    from remotedl import outputs

    paths = [outputs.check_output_path(str(p)) for p in [*settings.get("outputs"), *given]]
    if paths and settings.get("trackers"):
        paths += [t for t in outputs.TRACKER_OUTPUTS if t not in paths]
    return list(dict.fromkeys(paths))


def project_identity(root: Path) -> str | None:
    """The project's identity (its root commit), which its jobs' records carry: every clone of
    it knows them by it. None outside a git repository."""
    from remotedl import snapshot

    try:
        return snapshot.project_identity(root) or None
    except (RemotedlError, OSError):
        return None


def image_of(
    settings: Settings, given: str | None, *, off: bool = False, slurm: bool = False
) -> tuple[str | None, dict[str, Any] | None]:
    """The container image the job runs in (``--image``, else ``image``; ``--no-image``: none),
    and the container settings that go with it (the engine, how GPUs enter, more words)."""
    image = None if off else (given or settings.get("image"))
    if not image:
        return None, None
    if slurm:
        raise UsageError(
            f"--image {image}: a Slurm host runs jobs with sbatch, not in a container image",
            hint="give --no-image, or drop `image` from this host's settings",
        )
    if image.startswith("-") or any(c.isspace() for c in image):
        raise UsageError(
            f"--image {image!r} is not an image name", hint="e.g. --image nvcr.io/nvidia/pytorch:24.10-py3"
        )
    container = {
        "engine": settings.get("container"),
        "gpus": settings.get("container_gpus"),
        "args": list(settings.get("container_args")),
    }
    return image, container


def build_plan(
    settings: Settings,
    words: Sequence[str],
    *,
    host: str,
    remote_dir: str,
    gpu: str | None = None,
    gpus: int | None = None,
    cpu: bool = False,
    env: Sequence[str] = (),
    name: str | None = None,
    queue: bool = False,
    force: bool = False,
    detach: bool = False,
    pull: Sequence[str] = (),
    data: Sequence[str] = (),
    push: bool = True,
    notify: Sequence[str] = (),
    no_notify: bool = False,
    slurm: SlurmSettings | None = None,
    ref_host: bool = False,
    outputs: Sequence[str] = (),
    image: str | None = None,
    no_image: bool = False,
) -> RunPlan:
    """A ``RunPlan`` from one host's settings and the run's flags (the CLI's words, typed).
    Raises ``UsageError``/``ConfigError`` for what is wrong, before anything reaches the box."""
    from remotedl import jobs
    from remotedl.outputs import outputs_root

    argv = command_argv(words)
    root = settings.project.root
    command, script = jobs.build_command(argv, root, must_exist=push)
    choice, count = gpu_choice(gpu=gpu, gpus=gpus, cpu=cpu, slurm=slurm is not None)
    job_env = {**settings.get("env"), **env_pairs(env)}
    urls = notify_urls(settings, notify, off=no_notify)
    stall_after = jobs.parse_duration(settings.get("stall_after"))
    on_end = list(settings.get("pull_on_end"))
    pulls = [*on_end, *[p for p in pull if p not in on_end]]
    if pull and detach:
        raise UsageError(
            "--pull brings outputs home when the followed job ends; a detached job is not followed",
            hint="drop --detach, or later: remotedl pull --job ID PATH",
        )
    base_data = list(settings.get("data"))
    paths = output_paths(settings, outputs)
    image_name, container = image_of(settings, image, off=no_image, slurm=slurm is not None)
    return RunPlan(
        command=command,
        argv=tuple(argv),
        script=script,
        name=name or (script.rsplit("/", 1)[-1] if script else argv[0].rsplit("/", 1)[-1]),
        gpus=choice,
        count=count,
        env=job_env,
        queue=queue,
        force=force,
        detach=detach,
        pull=tuple(pulls),
        notify=tuple(urls),
        notify_desktop=bool(settings.get("notify_desktop")),
        stall_after=stall_after,
        host=host,
        ref_host=ref_host,
        project_root=root,
        remote_dir=remote_dir,
        push=push,
        isolate=bool(settings.get("isolate")),
        data=(*base_data, *[d for d in data if d not in base_data]),
        excludes=tuple(settings.get("exclude")),
        shared=tuple(settings.get("shared")),
        dir_mode=str(settings.get("remote_dir_mode")),
        max_snapshot_file=int(settings.get("max_snapshot_file")),
        environment=jobs.EnvSpec.from_settings(settings),
        slurm=slurm,
        outputs=tuple(paths),
        trackers=bool(paths and settings.get("trackers")),
        project_id=project_identity(root) if paths else None,
        outputs_base=outputs_root(root, settings.get("outputs_dir")),
        image=image_name,
        container=container,
    )


class RunProgress:
    """What ``run`` tells the user, as callbacks; this base says nothing (the CLI's subclass
    renders each). Every method may be left as is."""

    def note(self, text: str) -> None:
        """A line of news (a created directory, a file the snapshot left out, an environment sync)."""

    def warn(self, text: str) -> None:
        """A warning from the box or about the push."""

    @contextlib.contextmanager
    def transfer(self, what: str) -> Iterator[ProgressFn | None]:
        """Around a push (``what`` = "push") or a pull ("pull"): the rsync progress callback."""
        yield None

    @contextlib.contextmanager
    def env_sync(self, text: str) -> Iterator[Callable[[str], None]]:
        """Around an environment sync: gets each line the installer prints."""
        yield lambda line: None

    def env_sync_failed(self, output: Sequence[str]) -> None:
        """The installer's last lines, before its error is raised."""

    def pushed(self, result: PushResult) -> None:
        """The push is done (its notes: a created directory, what the snapshot left out)."""

    def following(self, record: JobRecord) -> None:
        """The job started and its log is about to be followed (the Ctrl-C-detaches line)."""

    def log(self, data: bytes) -> None:
        """Bytes of the followed job's log, as they come."""

    def log_flush(self) -> None:
        """The log ended (or the user detached): write out what is pending."""

    def reconnecting(self, attempt: int) -> None:
        """The connection was lost while following; ``attempt`` is the try number."""

    def state(self, change: Mapping[str, Any]) -> None:
        """A scheduler state change while following (a Slurm job waiting, then starting)."""


@dataclass
class RunResult:
    """What ``run`` did. ``record`` is the job as started; ``ended`` is its record at its end
    when the command followed it (None if detached, or if the user detached with Ctrl-C:
    ``interrupted``)."""

    plan: RunPlan
    record: JobRecord
    remote_dir: str  # where the project lives on the box (as the push resolved it)
    pushed: PushResult | None = None
    env_synced: list[EnvSyncResult] = field(default_factory=list)
    ended: JobRecord | None = None
    interrupted: bool = False  # Ctrl-C while following: the job keeps running
    pulled: list[tuple[PullSource, PullResult]] = field(default_factory=list)
    pull_error: RemotedlError | None = None  # the pull at the end failed (an error once the job succeeded)
    outputs: Arrival | None = None  # the followed job's outputs, home at its end (its ledger entry's)
    outputs_error: RemotedlError | None = None  # they could not come home (`remotedl outputs` resumes)
    desktop: DesktopResult | None = None  # the desktop notification's outcome, if one was asked for

    @property
    def ref(self) -> str:
        return self.plan.ref(self.record.id)


def pull_outputs(
    client: AgentClient,
    project_root: Path,
    remote_dir: str,
    paths: Sequence[str],
    *,
    excludes: Sequence[str] = (),
    job: str | None = None,
    tree: bool = False,
    progress: ProgressFn | None = None,
) -> list[tuple[PullSource, PullResult]]:
    """Pull each path from where it lives on the box (this project's latest job that has it,
    ``job``'s directory, or the work tree with ``tree``), as ``pull`` does: newer local files
    are kept, nothing is deleted."""
    from remotedl import jobs, sync

    results = []
    for src in jobs.locate(client, remote_dir, list(paths), job=job, tree=tree):
        skip = list(excludes)
        if src.job is not None and not src.shared:
            # A job's checkout: its git link and its links to the shared data stay on the box.
            skip += [".git", *(f"/{link}" for link in src.links)]
        result = sync.pull(
            client.spec, project_root, remote_dir, [src.path],
            excludes=skip, progress=progress, source_dir=src.dir,
        )  # fmt: skip
        results.append((src, result))
    return results


def sync_environment(
    client: AgentClient, remote_dir: str, spec: EnvSpec, progress: RunProgress, *, force: bool = False
) -> EnvSyncResult:
    """Sync the project's environment on the box; on failure the installer's last lines go to
    ``progress`` before the error is raised."""
    from remotedl import envsync

    try:
        with progress.env_sync(f"syncing the environment on {client.spec.alias}") as lines:
            result = envsync.sync(client, remote_dir, spec, force=force, progress=lines)
    except envsync.EnvSyncFailed as e:
        progress.env_sync_failed(e.output)
        raise
    if result.synced:
        progress.note(
            f"environment synced ({result.kind} -> {result.target or '?'}) in {result.seconds:.1f} s"
        )
    return result


def run(
    plan: RunPlan,
    client: AgentClient,
    progress: RunProgress | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> RunResult:
    """Do ``plan`` on the host ``client`` talks to (``environ``: this laptop's environment, for
    the desktop notification). A claim another laptop won first raises
    ``GpusBusy`` before anything started; Ctrl-C while starting raises ``Interrupted`` that says
    whether the job runs; Ctrl-C while following comes back as ``interrupted``."""
    from remotedl import jobs, sync

    progress = progress or RunProgress()
    spec = client.spec
    root = plan.project_root
    commit: str | None = None
    head: str | None = None
    snapshot = False
    rdir = plan.remote_dir
    pushed: PushResult | None = None
    if plan.push:
        if not plan.isolate:
            # Jobs run in the work tree itself: say which ones this push changes, then go ahead.
            conflicts = jobs.push_conflicts(
                client, root, rdir, data=plan.data, max_snapshot_file=plan.max_snapshot_file
            )
            for other in conflicts:
                progress.warn(
                    f"this push changes the files of running job {other.id} ({other.name}) in {other.cwd} "
                    "(isolate = false); going ahead"
                )
        with progress.transfer("push") as bar:
            pushed = sync.push(
                spec, root, rdir, data=plan.data, excludes=plan.excludes, progress=bar,
                dir_mode=plan.dir_mode, max_snapshot_file=plan.max_snapshot_file,
            )  # fmt: skip
        progress.pushed(pushed)
        commit, head, snapshot, rdir = pushed.commit, pushed.head, pushed.snapshot, pushed.remote_dir
    else:
        # Never another project's tree: checked in the start's own request where it can be.
        client.before = sync.verify_in_band(spec, root, rdir)
        rdir = sync.verify_remote_dir(spec, root, rdir) if client.before is None else rdir
    began = start_job(plan, client, progress, remote_dir=rdir, commit=commit, snapshot=snapshot, head=head)
    rec, rdir = began.record, began.remote_dir
    result = RunResult(plan, rec, rdir, pushed=pushed, env_synced=began.env_synced)
    if plan.detach:
        return result
    progress.following(rec)
    try:
        ended = jobs.stream_logs(
            client,
            str(rec.id),
            progress.log,
            follow=True,
            on_reconnect=progress.reconnecting,
            warn=progress.warn,
            on_state=progress.state,
        )
    except KeyboardInterrupt:
        progress.log_flush()
        result.interrupted = True
        return result
    progress.log_flush()
    result.ended = ended
    _at_end(result, client, progress, environ)
    return result


@dataclass
class Started:
    """A job ``start_job`` started: its record, the project's tree as the box found it, and
    the environment syncs it took to get there."""

    record: JobRecord
    remote_dir: str  # the tree's physical path, as the box found it
    env_synced: list[EnvSyncResult] = field(default_factory=list)


def start_job(
    plan: RunPlan,
    client: AgentClient,
    progress: RunProgress,
    *,
    remote_dir: str,
    commit: str | None,
    snapshot: bool,
    head: str | None,
    alias: str | None = None,
) -> Started:
    """Start ``plan``'s job in ``remote_dir`` (the pushed ``commit``; ``snapshot`` with its
    ``head`` when the push carried uncommitted work), keep its commit and register its outputs
    in this clone's ledger under ``alias`` (the host's name; default: the client's alias).
    When the box says the project's requirements changed since its environment was synced,
    the environment is synced and the start tried again; the third try starts without the
    check. Ctrl-C raises ``Interrupted`` that says whether the job runs."""
    from remotedl import jobs

    root = plan.project_root
    alias = alias or client.spec.alias
    synced: list[EnvSyncResult] = []
    started: JobRecord | None = None
    for attempt in range(3):
        try:
            rec = started = jobs.start(
                client,
                command=plan.command,
                remote_dir=remote_dir,
                script=plan.script,
                gpus=plan.gpus,
                count=plan.count,
                env=plan.env,
                name=plan.name,
                queue=plan.queue,
                force=plan.force,
                git_commit=commit,
                snapshot=snapshot,
                git_head=head if snapshot else None,
                snapshot_files=jobs.snapshot_files(root, head, commit) if snapshot else [],
                isolate=plan.isolate,
                data=plan.data,
                shared=plan.shared,
                environment=plan.environment,
                env_check=attempt < 2 and plan.image is None,  # an image is the environment
                notify=plan.notify,
                host_alias=alias,
                stall_after=plan.stall_after,
                warn=progress.warn,
                slurm=_slurm_request(plan.slurm),
                outputs=plan.outputs,
                trackers=plan.trackers,
                project_id=plan.project_id,
                image=plan.image,
                container=plan.container,
            )
            # In the same try: from here the job runs, and an interrupt names it.
            jobs.keep_commit(root, alias, rec)
            register_outputs(plan, rec, alias)
            return Started(rec, rec.remote_dir or remote_dir, synced)
        except KeyboardInterrupt:
            raise _interrupted_starting(plan, alias, started) from None
        except jobs.EnvOutOfDate as e:
            files = ", ".join(str(f) for f in e.plan.get("files") or []) or str(e.plan.get("kind"))
            progress.note(
                f"{files} changed since the last environment sync on {alias}: "
                f"syncing {e.plan.get('target') or ''}"
            )
            assert plan.environment is not None  # EnvOutOfDate comes only from an environment check
            synced.append(sync_environment(client, remote_dir, plan.environment, progress))
    raise AssertionError("the third try starts without the environment check")  # pragma: no cover


def register_outputs(plan: RunPlan, rec: JobRecord, alias: str) -> None:
    """The started job in this clone's ledger, waiting: its outputs come home when it ends."""
    from remotedl import outputs

    if not plan.outputs:
        return
    entry = outputs.entry_for(rec, alias, plan.outputs, plan.outputs_base, env=plan.env)
    entry.status = "waiting"
    outputs.register(outputs.Ledger(plan.project_root), entry)


def fetch_outputs(plan: RunPlan, client: AgentClient, rec: JobRecord) -> Arrival | None:
    """A followed job ended: its outputs home at once, when this clone's ledger waits for them
    (None: it does not). The ledger keeps what came."""
    from remotedl import outputs

    ledger = outputs.Ledger(plan.project_root)
    entry = ledger.read().get(f"{client.spec.alias}:{rec.id}")
    if entry is None or entry.status != "waiting":
        return None
    arrival = outputs.fetch(client.spec, entry, job_ended=True, work_tree=plan.project_root)
    with ledger.edit() as entries:
        entries[entry.key] = entry
    return arrival


def _slurm_request(s: SlurmSettings | None) -> dict[str, Any] | None:
    if s is None:
        return None
    from remotedl.slurm import settings_request

    return dict(settings_request(s))


def _interrupted_starting(plan: RunPlan, alias: str, started: JobRecord | None) -> Interrupted:
    """Ctrl-C while starting: whether the job runs, and how to find it."""
    if started is not None:
        shown = plan.ref(started.id)
        return Interrupted(
            f"interrupted: job {shown} ({started.name}) was started on {alias} and keeps running",
            hint=f"`remotedl logs -f {shown}` follows it; `remotedl kill {shown}` stops it",
        )
    # The request may have reached the box: the job then runs, and only this says so.
    on = f" --host {alias}" if plan.ref_host else ""
    return Interrupted(
        f"interrupted while starting the job on {alias}: it may be running there",
        hint=f"`remotedl{on} jobs` lists it; `remotedl{on} kill` stops this project's latest job",
    )


def _at_end(
    result: RunResult, client: AgentClient, progress: RunProgress, environ: Mapping[str, str] | None
) -> None:
    """When the followed job ended: its outputs home (``outputs``, then ``pull``), then a
    desktop notification."""
    plan, rec = result.plan, result.ended
    assert rec is not None
    try:
        result.outputs = fetch_outputs(plan, client, rec)
    except RemotedlError as e:
        result.outputs_error = e
    if plan.pull:
        try:
            with progress.transfer("pull") as bar:
                result.pulled = pull_outputs(
                    client, plan.project_root, result.remote_dir, plan.pull,
                    excludes=plan.excludes, job=str(rec.id), progress=bar,
                )  # fmt: skip
        except RemotedlError as e:
            result.pull_error = e
    if plan.notify_desktop:
        from remotedl import notify
        from remotedl.desktop import notify_desktop

        ev = notify.job_event(rec.to_dict(), rec.status, client.spec.alias)
        result.desktop = notify_desktop(ev.title, ev.text, environ)
