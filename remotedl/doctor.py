"""``remotedl doctor``: check the whole chain, from the laptop's ssh config to the GPUs a
framework sees on the box, and say how to fix each failure."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.activate import ACTIVATE
from remotedl.config import Settings
from remotedl.env import Environment
from remotedl.errors import RemotedlError
from remotedl.images import PICK_ENGINE
from remotedl.ssh import HostSpec
from remotedl.ssh.channel import EXPAND_HOME, parse_marks
from remotedl.words import plural


@dataclass
class Check:
    where: str  # "laptop" or "box"
    name: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    host: str
    checks: list[Check] = field(default_factory=list)

    def add(self, where: str, name: str, status: str, detail: str, fix: str = "") -> Check:
        c = Check(where, name, status, detail, fix)
        self.checks.append(c)
        return c

    def count(self, status: str) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.count("fail") == 0}


_PROBE = """
import json, importlib.util
out = {}
if importlib.util.find_spec("torch"):
    try:
        import torch
        out["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda,
                        "available": torch.cuda.is_available(), "count": torch.cuda.device_count()}
    except Exception as e:
        out["torch"] = {"error": str(e)[:200]}
if importlib.util.find_spec("tensorflow"):
    try:
        import tensorflow as tf
        out["tensorflow"] = {"version": tf.__version__, "count": len(tf.config.list_physical_devices("GPU"))}
    except Exception as e:
        out["tensorflow"] = {"error": str(e)[:200]}
print("@@frameworks " + json.dumps(out))
"""

# The environment jobs use (remotedl.activate.ACTIVATE: the project's .venv, a conda
# environment, env_setup), then the probe with its python. "$1": remote_dir, "$2": conda,
# "$3": env_setup, "$4": the python probe.
_IN_JOB_ENV = (
    "_rdl_jd= _rdl_rd=$1 _rdl_conda=$2 _rdl_setup=$3 _rdl_probe=$4\n"
    + ACTIVATE
    + r"""
_rdl_activate >/dev/null 2>&1 || echo "@@activation failed"
PY=$(command -v python 2>/dev/null || command -v python3 2>/dev/null)
echo "@@python ${PY:-none}"
[ -n "$VIRTUAL_ENV" ] && echo "@@venv $VIRTUAL_ENV"
[ -n "$CONDA_DEFAULT_ENV" ] && echo "@@conda $CONDA_DEFAULT_ENV"
[ -n "$PY" ] && "$PY" -c "$_rdl_probe"
"""
)

# "$1": remote_dir, "$2": the python probe, "$3": conda, "$4": env_setup, "$5": _IN_JOB_ENV.
# env_setup lines run in bash where there is one, as jobs run them.
_FRAMEWORKS = (
    EXPAND_HOME
    + r"""
cd -- "$(expand_home "$1")" 2>/dev/null || cd "$HOME"
echo "@@cuda $(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n 1 | cut -d' ' -f3)"
sh_=sh
[ -n "$4" ] && command -v bash >/dev/null 2>&1 && sh_=bash
"$sh_" -c "$5" remotedl-doctor "$(pwd)" "$3" "$4" "$2"
"""
)


def _laptop(report: DoctorReport, env: Environment, spec: HostSpec, settings: Settings) -> None:
    src = spec.sources
    if src.get("ssh_config", "").startswith("registered box"):
        report.add("laptop", "ssh config", "ok", f"{spec.alias} is a registered box ({spec.ssh_config})")
    elif all(src.get(k) == "default" for k in ("hostname", "user", "port")):
        report.add(
            "laptop",
            "ssh config",
            "warn",
            f"no Host entry for '{spec.alias}' in {spec.ssh_config or '~/.ssh/config'}",
            f"`remotedl init {spec.alias}` adds one (asking first), or see sshconfig.example",
        )
    else:
        via = f" via {spec.proxy_jump}" if spec.proxy_jump else ""
        report.add(
            "laptop", "ssh config", "ok", f"{spec.alias} -> {spec.user}@{spec.hostname}:{spec.port}{via}"
        )
    keys = [k for k in spec.identity_files if os.path.isfile(k)]
    loose = [k for k in keys if os.stat(k).st_mode & (stat.S_IRWXG | stat.S_IRWXO)]
    if loose:
        report.add(
            "laptop",
            "key",
            "fail",
            f"{', '.join(loose)} can be read by others: ssh will refuse it",
            f"chmod 600 {' '.join(loose)}",
        )
    elif keys:
        report.add("laptop", "key", "ok", ", ".join(keys))
    agent_keys = 0
    if env.environ.get("SSH_AUTH_SOCK"):
        r = subprocess.run(
            ["ssh-add", "-l"], capture_output=True, text=True, env=dict(env.environ), check=False
        )
        agent_keys = len(r.stdout.splitlines()) if r.returncode == 0 else 0
        if agent_keys:
            report.add("laptop", "ssh agent", "ok", f"{plural(agent_keys, 'key')} loaded")
        else:
            report.add("laptop", "ssh agent", "warn", "running, with no keys", "ssh-add ~/.ssh/YOUR_KEY")
    else:
        report.add(
            "laptop", "ssh agent", "skip", "no agent (SSH_AUTH_SOCK unset); key files are used directly"
        )
    if not keys and not agent_keys:
        report.add(
            "laptop",
            "key",
            "fail",
            "no private key file found and no agent keys",
            "ssh-keygen -t ed25519, then ssh-copy-id the public key to the box",
        )
    try:
        infos = socket.getaddrinfo(spec.hostname, spec.port, proto=socket.IPPROTO_TCP)
        addrs = sorted({str(a[4][0]) for a in infos})
        report.add("laptop", "host name", "ok", f"{spec.hostname} resolves to {', '.join(addrs)}")
    except socket.gaierror:
        report.add(
            "laptop",
            "host name",
            "fail",
            f"{spec.hostname} does not resolve",
            "check HostName in the ssh config, or the dynamic DNS (`remotedl dns check`)",
        )
    _dns(report, env, settings)


def _dns(report: DoctorReport, env: Environment, settings: Settings) -> None:
    if not settings.table("dns"):
        report.add("laptop", "dynamic DNS", "skip", "no [dns] configuration")
        return
    from remotedl.ddns import settings as dset
    from remotedl.ddns import update as dupd

    try:
        rep = dupd.check(dset.parse(settings.table("dns")), env.environ)
    except RemotedlError as e:
        report.add("laptop", "dynamic DNS", "warn", e.message, e.hint or "")
        return
    bad = [f for f in rep.families if f.action != "unchanged"]
    if bad:
        detail = "; ".join(
            f"{f.record} serves {', '.join(f.served) or 'nothing'}, public IP is {f.detected}" for f in bad
        )
        report.add("laptop", "dynamic DNS", "fail", detail, "remotedl dns update (on the box)")
    else:
        report.add("laptop", "dynamic DNS", "ok", f"{rep.name} serves the public address")


# Jobs in an image: "$1" the engine asked for (or ""), "$2" the image, "$3" how GPUs enter a
# container (container_gpus), "$4" 1 where the box has GPUs. The engine's own words for each.
_CONTAINERS = PICK_ENGINE + r"""
E=$1
[ -n "$E" ] || E=$(pick_engine)
if [ -z "$E" ] || ! command -v "$E" >/dev/null 2>&1; then
  echo "@@engine none ${1:-docker or podman}"; exit 0
fi
echo "@@engine $E"
case $E in *podman*) q='{{.Host.OCIRuntime.Name}}';; *) q='{{json .Runtimes}}';; esac
if ! out=$("$E" info --format "$q" 2>&1); then
  echo "@@unreachable $(printf '%s\n' "$out" | tail -n 1)"; exit 0
fi
echo "@@runtimes $out"
# An NVIDIA CDI spec (nvidia-ctk cdi generate) where CDI looks for one: Podman's GPUs.
for f in /etc/cdi/* /var/run/cdi/*; do
  grep -qs 'nvidia.com/gpu' "$f" && { echo "@@cdi $f"; break; }
done
root=$("$E" info --format '{{.DockerRootDir}}' 2>/dev/null) ||
  root=$("$E" info --format '{{.Store.GraphRoot}}' 2>/dev/null)
[ -n "$root" ] && echo "@@images_free $(df -Pk "$root" 2>/dev/null | awk 'NR==2 {print $4}') $root"
"$E" image inspect --format '{{.Id}}' "$2" >/dev/null 2>&1 || { echo "@@image missing"; exit 0; }
echo "@@image present"
[ "$4" = 1 ] && [ "$3" != none ] || exit 0
img=$2 mode=$3
set --
case $mode in
  devices)
    d=${REMOTEDL_DEVICE_DIR:-/dev}
    set -- --device "$d/nvidia0:/dev/nvidia0"
    for n in nvidiactl nvidia-uvm nvidia-uvm-tools nvidia-modeset; do
      [ -e "$d/$n" ] && set -- "$@" --device "$d/$n:/dev/$n"
    done;;
  cdi) set -- --device nvidia.com/gpu=0;;
  *) case $E in *podman*) set -- --device nvidia.com/gpu=0;; *) set -- --gpus device=0;; esac;;
esac
case $mode:$E in cdi:*podman*|nvidia:*podman*) set -- --security-opt label=disable "$@";; esac
if out=$("$E" run --rm --init --pull=never "$@" "$img" nvidia-smi -L 2>&1); then
  echo "@@gpu_container ok $(printf '%s\n' "$out" | head -n 1)"
else
  echo "@@gpu_container fail $(printf '%s\n' "$out" | tail -n 1)"
fi
"""


def _containers(report: DoctorReport, marks: dict[str, str], settings: Settings) -> None:
    """Jobs in an image: the engine, reachable by the user, its GPU runtime, the image, the
    disk its images are on, and a one-line GPU container (``nvidia-smi -L`` inside)."""
    image = str(settings.get("image"))
    engine = marks.get("engine", "").strip()
    if not engine or engine.startswith("none"):
        what = engine[5:] if engine.startswith("none ") else "docker or podman"
        fix = "remotedl setup docker (or --var engine=podman)"
        report.add("box", "container engine", "fail", f"{what} is not installed (image = {image})", fix)
        return
    name = engine.rsplit("/", 1)[-1]
    if "unreachable" in marks:
        why = marks["unreachable"].strip()
        denied = "permission denied" in why.lower()
        if name.startswith("podman"):
            fix = (
                "run `podman info` on the box: rootless Podman needs the uidmap package and the "
                "user's /etc/subuid and /etc/subgid ranges (`remotedl setup docker --var engine=podman`)"
            )
        else:
            fix = ("add the box user to the docker group (`sudo usermod -aG docker $USER`, then log in again)"
                   if denied else f"start the engine (`sudo systemctl start {name}`)")  # fmt: skip
        report.add("box", "container engine", "fail", f"{name} does not answer the box user: {why}", fix)
        return
    runtimes = marks.get("runtimes", "").strip()
    report.add("box", "container engine", "ok", f"{name} answers the box user")
    mode = str(settings.get("container_gpus"))
    if mode == "nvidia" and name == "docker":
        has = '"nvidia"' in runtimes
        report.add("box", "GPU runtime", "ok" if has else "warn",
                   "docker has the NVIDIA runtime" if has else "docker has no NVIDIA runtime: --gpus fails",
                   "" if has else "install nvidia-container-toolkit and run `nvidia-ctk runtime configure`, "
                   'or set container_gpus = "cdi" / "devices"')  # fmt: skip
    elif mode == "cdi" or (mode == "nvidia" and name.startswith("podman")):
        spec = marks.get("cdi", "").strip()
        report.add("box", "GPU runtime", "ok" if spec else "warn",
                   f"an NVIDIA CDI spec is at {spec}" if spec
                   else "no NVIDIA CDI spec in /etc/cdi or /var/run/cdi: --device nvidia.com/gpu=N fails",
                   "" if spec else "install the NVIDIA container toolkit and run "
                   "`sudo nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`, "
                   'or set container_gpus = "devices"')  # fmt: skip
    free = marks.get("images_free", "").split(None, 1)
    if len(free) == 2 and free[0].isdigit():
        gib = int(free[0]) / 2**20
        report.add("box", "image disk", "warn" if gib < 20 else "ok", f"{gib:.1f} GiB free at {free[1]}",
                   "GPU images take 10-20 GiB each: free some space" if gib < 20 else "")  # fmt: skip
    if marks.get("image", "").strip() != "present":
        report.add("box", "image", "warn", f"{image} is not on the box", "the first `remotedl run` pulls it")
        return
    report.add("box", "image", "ok", f"{image} is on the box")
    gpu = marks.get("gpu_container", "").strip()
    if gpu:
        ok, _, said = gpu.partition(" ")
        report.add("box", "GPU container", "ok" if ok == "ok" else "fail",
                   f"nvidia-smi -L in {image}: {said}",
                   "" if ok == "ok" else "check container_gpus and the NVIDIA container toolkit")  # fmt: skip


def _environment(report: DoctorReport, marks: dict[str, str], settings: Settings) -> None:
    """The environment jobs will run in: the same resolution as the jobs' own."""
    py = marks.get("python", "none").strip()
    if "activation failed" in marks:
        what = f"conda environment {settings.get('conda')}" if settings.get("conda") else "env_setup"
        report.add(
            "box",
            "environment",
            "fail",
            f"the {what} cannot be activated on the box",
            "check `conda`/`env_setup` in remotedl.toml (a job would exit 125)",
        )
    elif py == "none":
        report.add("box", "environment", "fail", "jobs find no python", "install python3, or make a .venv")
    elif marks.get("conda"):
        report.add("box", "environment", "ok", f"jobs use conda environment {marks['conda'].strip()} ({py})")
    elif marks.get("venv"):
        report.add("box", "environment", "ok", f"jobs use the venv {marks['venv'].strip()} ({py})")
    else:
        # The project may name its environment already (it was not pushed here yet): then say
        # how to make it, not to add the file it has.
        named = [f for f in ENV_FILES if (settings.project.root / f).is_file()]
        fix = (
            f"`remotedl push --env` makes it from {named[0]} (so does the next `remotedl run`)"
            if named
            else "add requirements.txt and run: the first run makes .venv"
        )
        report.add(
            "box",
            "environment",
            "warn" if not settings.get("env_setup") else "ok",
            f"jobs use {py}" + (" (after env_setup)" if settings.get("env_setup") else ", no project venv"),
            "" if settings.get("env_setup") else fix,
        )


# The files a project's environment is made from (see envsync), in the order named.
ENV_FILES = ("requirements.txt", "pyproject.toml", "environment.yml")


def run_checks(
    env: Environment, settings: Settings, alias: str, *, spec_factory: Callable[[], HostSpec], remote_dir: str
) -> DoctorReport:
    from remotedl.shells import noise_advice
    from remotedl.ssh import open_box
    from remotedl.status import box_status

    report = DoctorReport(alias)
    try:
        spec = spec_factory()
    except RemotedlError as e:
        report.add("laptop", "ssh config", "fail", e.message, e.hint or "")
        return report
    _laptop(report, env, spec, settings)
    from remotedl import slurmhost
    from remotedl.slurm import host_settings

    try:
        slurm = host_settings(settings)
    except RemotedlError as e:
        report.add("laptop", "slurm settings", "fail", e.message, e.hint or "")
        return report
    slurm_checks: list[slurmhost.SlurmCheck] = []
    try:
        with open_box(spec) as box:
            box.run("true")  # connect now, to report reachability on its own
            report.add(
                "box", "reachable", "ok", f"logged in as {spec.user}; the host key matches known_hosts"
            )
            if box.noise:
                where, fix = noise_advice(box.login_shell)
                first = box.noise.splitlines()[0][:60]
                report.add(
                    "box",
                    "shell start-up",
                    "fail",
                    f"the {box.login_shell or 'login'} shell's start-up files print ({first!r}) for "
                    "non-interactive logins: git and rsync (push, pull) cannot work",
                    f"make {where} quiet unless interactive: {fix}",
                )
            elif box.stderr_noise:
                # Only on stderr: git and rsync read their protocol from stdout alone.
                first = box.stderr_noise.splitlines()[0][:60]
                said = (
                    f"{box.login_shell or 'login'} shell's start-up files print only on stderr "
                    f"({first!r}): git and rsync work"
                )
                report.add("box", "shell start-up", "ok", said)
            else:
                quiet = f"{box.login_shell or 'login'} shell prints nothing"
                report.add("box", "shell start-up", "ok", quiet)
            st = box_status(box, remote_dir)
            conda = str(settings.get("conda") or "")
            setup = str(settings.get("env_setup") or "")
            fw_out = box.run(_FRAMEWORKS, remote_dir, _PROBE, conda, setup, _IN_JOB_ENV, check=False).stdout
            if slurm is not None:
                slurm_checks = slurmhost.doctor_checks(box, slurm)
            containers = None
            if settings.get("image") and slurm is None:
                containers = box.run(
                    _CONTAINERS, str(settings.get("container") or ""), str(settings.get("image")),
                    str(settings.get("container_gpus")), "1" if st.gpus else "0", check=False,
                ).stdout  # fmt: skip
    except RemotedlError as e:
        name = "host key" if "host key" in e.message else "reachable"
        report.add("box", name, "fail", e.message, e.hint or "")
        return report
    tools = ("git", "rsync", "python3") if slurm is not None else ("git", "rsync", "tmux", "python3")
    missing = [t for t in tools if not st.tools.get(t)]
    if missing:
        report.add("box", "tools", "fail", f"missing: {', '.join(missing)}", "remotedl setup base")
    else:
        report.add("box", "tools", "ok", ", ".join(tools))
    if containers is not None:
        _containers(report, parse_marks(containers), settings)
    else:
        _environment(report, parse_marks(fw_out), settings)
    if st.disk:
        gib = st.disk.free_bytes / 2**30
        low = gib < 5
        report.add(
            "box",
            "disk",
            "warn" if low else "ok",
            f"{gib:.1f} GiB free at {st.disk.path}",
            "free some space: checkpoints and datasets fill disks" if low else "",
        )
    if slurm is not None:
        for c in slurm_checks:
            report.add("slurm", c.name, c.status, c.detail, c.fix)
        report.add(
            "box",
            "GPUs",
            "skip",
            "a Slurm login node: the GPUs are on the compute nodes (`remotedl status` lists them)",
        )
        return report
    if st.nvidia_error:
        report.add(
            "box",
            "NVIDIA driver",
            "warn",
            st.nvidia_error,
            "install the NVIDIA driver (and reboot) if this box has a GPU; jobs run on the CPU meanwhile",
        )
        return report
    report.add("box", "NVIDIA driver", "ok", f"driver {st.driver_version}")
    if st.gpus:
        report.add("box", "GPUs", "ok", ", ".join(f"{g.index}: {g.name}" for g in st.gpus))
    else:
        report.add("box", "GPUs", "fail", "nvidia-smi lists none", "check `nvidia-smi` and dmesg on the box")
    marks = {k: v.strip() for k, v in parse_marks(fw_out).items()}
    cuda = marks.get("cuda", "")
    report.add(
        "box", "CUDA", "ok" if cuda else "warn", f"the driver supports CUDA {cuda}" if cuda else "unknown"
    )
    try:
        fws = json.loads(marks.get("frameworks") or "{}")
    except ValueError:
        fws = {}
    py = marks.get("python", "python3")
    if not fws:
        report.add("box", "frameworks", "skip", f"neither torch nor tensorflow in {py}")
    for name, info in fws.items():
        if "error" in info:
            report.add("box", name, "fail", f"import failed: {info['error']}", f"reinstall {name} for {py}")
            continue
        seen = int(info.get("count") or 0)
        if seen == 0:
            report.add(
                "box",
                name,
                "fail",
                f"{name} {info.get('version')} sees no GPU ({py})",
                f"a CPU-only build? install {name}'s CUDA build (the driver supports CUDA {cuda or '?'})",
            )
        else:
            report.add("box", name, "ok", f"{name} {info.get('version')} sees {plural(seen, 'GPU')} ({py})")
    return report
