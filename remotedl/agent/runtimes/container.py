"""A job in a container image: the tmux runtime's runner, whose child is ``docker run`` (or
``podman run``) of the job's image instead of the job's shell.

Why a tmux job underneath: the job keeps everything a box job has (its record and id, the log
the runner copies, follow, attach to the runner's session, the queue and GPU claims, stall
detection, notifications); only its command runs inside a container. What differs:

- the runner pulls a missing image first (its output to the log) and records the image's digest;
- exactly the job's GPUs enter the container (the NVIDIA runtime's ``--gpus '"device=1,3"'``,
  CDI's ``--device nvidia.com/gpu=N``, or the device nodes themselves), and
  ``CUDA_VISIBLE_DEVICES`` counts from 0 inside, as a Slurm job's does;
- ``--env`` values go through a 0600 env file (never argv), removed once the container runs;
- the container is ``--rm``, ``--init`` (signals reach the job's whole process group inside:
  docker's tini told so by its environment, Podman's init given a second time with ``-g``), runs
  as the box user's uid:gid, and has the project's work tree (the checkout, data, shared) at
  the same paths;
- ``kill`` signals the container through the engine (SIGINT, SIGTERM, SIGKILL), never only the
  ``docker run`` client (a killed client leaves its container running);
- the job is alive while its runner, its client or its container is: a container that
  vanished with nothing else left makes the job ``lost``, as for any box job. Processes left
  behind inside do not outlive the main one: the container stops with it.

The engine is the request's ``engine`` (``docker`` or ``podman``) or the first of them found.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from remotedl.agent.runtimes.base import Killed, StartPlan
from remotedl.agent.runtimes.tmux import TmuxRuntime, job_alive, runner_alive, signal_job
from remotedl.agent.store import AgentError, Context, box_lock, jobs_dir, kill_marker, load, save
from remotedl.schema import ACTIVE

ENGINES = ("docker", "podman")
GPU_MODES = ("nvidia", "cdi", "devices", "none")
LABEL = "remotedl.job"  # value: the job's id and mark, "ID:MARK"
# The device nodes every NVIDIA GPU job needs besides its /dev/nvidiaN (where present).
NVIDIA_CONTROL = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")
ENGINE_TIMEOUT = 60.0
PODMAN_INIT = "/run/podman-init"  # where ``podman run --init`` puts its init (catatonit, tini)


def container_name(rec: dict[str, Any]) -> str:
    """``remotedl-ID-MARK``: the job's id, and its mark so that a reused id never meets an old
    container."""
    return f"remotedl-{rec['id']}-{str(rec.get('mark') or '')[:8]}".rstrip("-")


def find_engine(wanted: str | None) -> str:
    """The engine's program: the one asked for, else docker, else podman, on the box's PATH.
    With both installed and none asked for, docker only when it answers this user (a box with
    Podman for its users and a Docker engine they may not reach is common)."""
    if wanted and wanted not in ENGINES:
        raise AgentError(f"container = {wanted!r}: give one of {', '.join(ENGINES)}", "usage")
    found = [p for p in (shutil.which(str(name)) for name in ([wanted] if wanted else ENGINES)) if p]
    if len(found) == 2 and not _answers(found[0]):
        return found[1]
    if found:
        return found[0]
    what = wanted or "docker or podman"
    raise AgentError(
        f"{what} is not installed on the box: a job with an image needs a container engine",
        "usage",
        hint="`remotedl setup docker` installs one; `--no-image` runs the job on the box itself",
    )


DOCKER_SOCKET = "/var/run/docker.sock"


def _answers(engine: str) -> bool:
    """Whether docker can reach its daemon as this user, told without starting it (a job's start
    waits on this): DOCKER_HOST or a docker context set means the user pointed it somewhere;
    else the default socket must be there and open to the user (the docker group)."""
    if os.environ.get("DOCKER_HOST") or os.path.isdir(os.path.expanduser("~/.docker/contexts")):
        return True
    return os.path.exists(DOCKER_SOCKET) and os.access(DOCKER_SOCKET, os.R_OK | os.W_OK)


def engine_run(engine: str, *args: str, timeout: float = ENGINE_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """The engine's CLI, argv only. An engine that does not answer is an OSError."""
    try:
        return subprocess.run(
            [engine, *args], capture_output=True, text=True, check=False, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise OSError(f"{os.path.basename(engine)} {args[0]} did not answer within {timeout:g} s") from e


def is_podman(engine: str) -> bool:
    return os.path.basename(engine).startswith("podman")


def env_file_path(job_id: int) -> Path:
    return jobs_dir() / f"{job_id}.container-env"


def write_env_file(job_id: int, values: dict[str, str]) -> tuple[Path, list[str]]:
    """The values an env file can hold (one ``KEY=VALUE`` line each), in a 0600 file; the
    names of the rest (a value with a line break), which the client passes by name (``-e
    KEY``: the value comes from its own environment, never argv)."""
    path = env_file_path(job_id)
    by_name = [k for k, v in values.items() if "\n" in v or "\r" in v or "\0" in v]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for k, v in values.items():
            if k not in by_name:
                f.write(f"{k}={v}\n")
    return path, by_name


def remove_env_file(job_id: int) -> None:
    with contextlib.suppress(OSError):
        env_file_path(job_id).unlink()


def gpu_args(rec: dict[str, Any], mode: str, podman: bool) -> list[str]:
    """The engine's words that put exactly the job's GPUs in its container."""
    gpus = [int(g) for g in rec.get("gpus") or []]
    if not gpus or mode == "none":
        return []
    if mode == "nvidia" and not podman:
        # The value is CSV to docker: quoted, so that "device=1,3" stays one field.
        return ["--gpus", '"device=' + ",".join(map(str, gpus)) + '"']
    if mode in ("nvidia", "cdi"):  # Podman's GPUs are CDI devices
        words = [w for g in gpus for w in ("--device", f"nvidia.com/gpu={g}")]
        # As NVIDIA documents for Podman: on an SELinux box a labelled container may not open
        # the devices CDI gives it (no effect where SELinux is off).
        return ["--security-opt", "label=disable", *words] if podman else words
    # The device nodes themselves (no toolkit: the image brings the driver's user-space
    # libraries), each at its /dev path inside. REMOTEDL_DEVICE_DIR: where the box keeps them.
    where = os.environ.get("REMOTEDL_DEVICE_DIR") or "/dev"
    devices = [(os.path.join(where, f"nvidia{g}"), f"/dev/nvidia{g}") for g in gpus]
    for d in NVIDIA_CONTROL:
        src = os.path.join(where, os.path.basename(d))
        if os.path.exists(src):
            devices.append((src, d))
    for src, _ in devices[: len(gpus)]:
        if not os.path.exists(src):
            raise AgentError(f"no device {src} on the box for the job's GPU", "usage")
    return [w for src, dst in devices for w in ("--device", f"{src}:{dst}")]


def mounts(rec: dict[str, Any]) -> list[str]:
    """The project's work tree at the same path (the job's checkout, its data and shared links
    are in it), and the places its data links lead to outside it."""
    rdir = str(rec.get("remote_dir") or rec["cwd"])
    paths = [rdir]
    for rel in rec.get("links") or []:
        target = os.path.realpath(os.path.join(rdir, rel))
        if not (target + "/").startswith(os.path.realpath(rdir) + "/") and os.path.exists(target):
            paths.append(target)
    out: list[str] = []
    for p in dict.fromkeys(paths):
        if ":" in p or "," in p:
            raise AgentError(f"cannot mount {p} into a container: its path has a ':' or ','", "usage")
        out += ["-v", f"{p}:{p}"]
    return out


def run_argv(
    engine: str, rec: dict[str, Any], inner: list[str], env_file: Path, by_name: list[str]
) -> list[str]:
    """``docker run`` of the job: its name, labels, user, GPUs, mounts, environment, then the
    user's ``container_args``, the image and the job's shell."""
    podman = is_podman(engine)
    user = ["-u", f"{os.getuid()}:{os.getgid()}"]
    if podman and os.getuid() != 0:
        user = ["--userns=keep-id", *user]  # rootless: the user's own ids inside, not subuids
    if podman:
        # Podman's --init (catatonit) passes a signal to its child only: a second one, with -g,
        # passes it on to the job's whole process group, as docker's tini does with
        # TINI_KILL_PROCESS_GROUP. The engine mounts its init at /run/podman-init.
        inner = [PODMAN_INIT, "-g", "--", *inner]
    return [
        engine, "run", "--rm", "--init", "--pull=never",
        "--name", container_name(rec),
        "--label", f"{LABEL}={rec['id']}:{rec.get('mark') or ''}",
        "--label", f"remotedl.name={rec.get('name') or ''}",
        *user,
        *gpu_args(rec, str(rec.get("container_gpus") or "nvidia"), podman),
        *mounts(rec),
        "-w", str(rec.get("workdir") or rec["cwd"]),
        "--env-file", str(env_file),
        *[w for k in by_name for w in ("-e", k)],
        *[str(a) for a in rec.get("container_args") or []],
        str(rec["image"]),
        *inner,
    ]  # fmt: skip


def container_env(rec: dict[str, Any], values: dict[str, str]) -> dict[str, str]:
    """The job's environment inside: its --env values and remotedl's own variables (never the
    box's PATH, HOME...: the image's own apply). GPUs count from 0 inside."""
    env = dict(values)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["REMOTEDL_JOB_ID"] = str(rec["id"])
    env["REMOTEDL_JOB_DIR"] = str(rec["cwd"])
    env["REMOTEDL_REMOTE_DIR"] = str(rec.get("remote_dir") or rec["cwd"])
    env["REMOTEDL_IMAGE"] = str(rec["image"])
    env["TINI_KILL_PROCESS_GROUP"] = "1"  # --init passes a kill's signals to the whole group
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    gpus = rec.get("gpus") or []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(gpus)))
    elif rec.get("want", {}).get("gpus") == "none":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def image_digest(engine: str, image: str) -> str | None:
    """The image's digest as its registry knows it (``name@sha256:...``), else its local id
    (an image built or imported on the box has no registry digest); None: no such image."""
    r = engine_run(engine, "image", "inspect", "--format", "{{json .RepoDigests}} {{.Id}}", image)
    if r.returncode != 0:
        return None
    import json

    digests_text, _, image_id = r.stdout.strip().partition(" ")
    with contextlib.suppress(ValueError):
        digests = json.loads(digests_text) or []
        base = image.rsplit("@", 1)[0]
        base = base if "/" in base.rsplit(":", 1)[-1] else base.rsplit(":", 1)[0]
        for d in digests:
            if short_name(str(d).split("@")[0]) == short_name(base):
                return str(d)
        if digests:
            return str(digests[0])
    if image_id and ":" not in image_id:  # podman's ids are the bare hex
        image_id = f"sha256:{image_id}"
    return image_id or None


def short_name(name: str) -> str:
    """An image's name as a user writes it: Podman's full names (``docker.io/library/x``,
    ``localhost/x`` for an image made on the box) and Docker's short ones compare equal."""
    for prefix in ("docker.io/library/", "docker.io/", "localhost/"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def running_containers(engine: str) -> set[str] | None:
    """The names of remotedl's running containers (None: the engine did not answer)."""
    try:
        r = engine_run(engine, "ps", "--filter", f"label={LABEL}", "--format", "{{.Names}}", timeout=20)
    except OSError:
        return None
    return set(r.stdout.split()) if r.returncode == 0 else None


class ContainerRuntime(TmuxRuntime):
    kind = "container"

    def create(self, ctx: Context, plan: StartPlan, active: list[dict[str, Any]]) -> dict[str, Any]:
        req = plan.req
        spec = dict(req.container or {})
        engine = find_engine(spec.get("engine"))
        mode = str(spec.get("gpus") or "nvidia")
        if mode not in GPU_MODES:
            raise AgentError(f"container_gpus = {mode!r}: give one of {', '.join(GPU_MODES)}", "usage")
        args = spec.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise AgentError("container_args must be a list of words", "usage")
        image = str(req.image or "")
        if not image or image.startswith("-") or any(c.isspace() or not c.isprintable() for c in image):
            raise AgentError(f"{image!r} is not an image name", "usage")
        rec = super().create(ctx, plan, active)
        rec.update(
            image=image,
            image_digest=None,
            engine=engine,
            container=container_name(rec),
            container_gpus=mode,
            container_args=list(args),
            # An image is the environment (no sync of the box's); setup_cmd runs in it first.
            setup_cmd=str(plan.spec.get("setup_cmd") or "") or None,
        )
        save(rec)
        return rec

    def launch(self, ctx: Context, rec: dict[str, Any], plan: StartPlan) -> dict[str, Any]:
        """As a box job's, and the image looked up meanwhile: its digest goes into the record
        while the runner starts (a Python of its own: tens of milliseconds), so the runner
        finds it there instead of asking the engine on the job's way to its start. A queued
        job's runner looks itself once the job's turn comes (the image may change until then);
        one that finds no digest (no such image yet: it pulls) too."""
        lookup = None
        if rec["status"] == "starting":
            args = (int(rec["id"]), str(rec["engine"]), str(rec["image"]))
            lookup = threading.Thread(target=record_digest, args=args, daemon=True)
            lookup.start()
        try:
            return super().launch(ctx, rec, plan)
        finally:
            if lookup is not None:
                lookup.join(10)  # an engine that hangs held up the runner already

    def gone(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Gone as a box job is (runner, client), unless its container still runs."""
        maybe = super().gone(records)
        if not maybe:
            return []
        running: dict[str, set[str] | None] = {}
        out = []
        for r in maybe:
            engine = str(r.get("engine") or "")
            if engine not in running:
                running[engine] = running_containers(engine) if engine else set()
            names = running[engine]
            if names is not None and r.get("container") in names:
                continue
            out.append(r)
        return out

    def kill(self, ctx: Context, rec: dict[str, Any], grace: float) -> Killed:
        """Not started yet: as a box job. Running: SIGINT, SIGTERM, SIGKILL to its container
        through the engine (``grace`` seconds apart), until it is gone; its runner records the
        end, with the container's exit status."""
        fresh = load(int(rec["id"]))
        if fresh["status"] in ("queued", "starting") and not fresh.get("pgid"):
            return super().kill(ctx, fresh, grace)
        if fresh["status"] not in ACTIVE:
            return fresh, []
        job_id = int(rec["id"])
        kill_marker(job_id).touch()
        engine = str(fresh.get("engine") or "")
        name = str(fresh.get("container") or "")
        steps: list[str] = []

        def up() -> bool:
            names = running_containers(engine)
            return (names is None or name in names) or job_alive(fresh)

        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            sent = False
            with contextlib.suppress(OSError):
                sent = engine_run(engine, "kill", "--signal", signal.Signals(sig).name, name).returncode == 0
            if not sent and sig == signal.SIGKILL:
                sent = signal_job(fresh, sig)  # no container (yet): its client
            if not sent and not up():
                break
            steps.append(signal.Signals(sig).name)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and up():
                time.sleep(0.1)
            if not up():
                break
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and runner_alive(fresh) and load(job_id)["status"] in ACTIVE:
            time.sleep(0.05)
        return None, steps


def record_digest(job_id: int, engine: str, image: str) -> str | None:
    """The image's digest (None: no such image, or the engine did not answer), in the job's
    record when found (``show`` prints it next to the commit)."""
    digest = None
    with contextlib.suppress(OSError):
        digest = image_digest(engine, image)
    if digest:
        with box_lock():
            rec = load(job_id)
            rec["image_digest"] = digest
            save(rec)
    return digest
