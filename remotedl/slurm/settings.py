"""Settings of a Slurm host and the option words sbatch gets from them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from remotedl.errors import ConfigError, UsageError

GpuOption = Literal["gres", "gpus"]

# Words sbatch gets from remotedl itself; a setting or flag naming them would break the job's
# directory, log or id.
_OWN_OPTIONS = {
    "--output": "remotedl writes the job's output to its log (remotedl logs JOB)",
    "-o": "remotedl writes the job's output to its log (remotedl logs JOB)",
    "--error": "stderr goes to the job's log with stdout",
    "-e": "stderr goes to the job's log with stdout",
    "--chdir": "the job runs in its own code directory",
    "-D": "the job runs in its own code directory",
    "--job-name": "use --name",
    "-J": "use --name",
    "--open-mode": "the log is appended to so that logs -f can resume",
    "--parsable": "remotedl reads sbatch's answer itself",
    "--wrap": "remotedl writes the batch script",
    "--array": "one remotedl job is one Slurm job",
    "-a": "one remotedl job is one Slurm job",
    "--test-only": "use remotedl doctor to test a submission",
    "--input": "a batch job has no input",
    "-i": "a batch job has no input",
}

_TIME = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$"
)
_NAME = re.compile(r"[^A-Za-z0-9._+-]")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_time(value: str, where: str = "--time") -> str:
    """A Slurm time limit as sbatch takes it (minutes, M:S, H:M:S, D-H, D-H:M, D-H:M:S)."""
    text = value.strip()
    if text.upper() in ("UNLIMITED", "INFINITE") or _TIME.match(text):
        return text
    raise UsageError(
        f"{where} {value!r} is not a Slurm time limit",
        hint="write minutes (90), HH:MM:SS (1:30:00) or D-HH:MM:SS (2-00:00:00)",
    )


def check_sbatch_args(args: Iterable[str], where: str = "sbatch_args") -> tuple[str, ...]:
    """Extra sbatch option words, each one word (``--mem=32G``, ``-c8``). A word that is not an
    option would be taken by sbatch as the batch script; options remotedl sets itself are refused."""
    out = []
    for a in args:
        if not isinstance(a, str) or not a.startswith("-") or a in ("-", "--"):
            raise ConfigError(
                f"{where}: {a!r} is not an sbatch option",
                hint='give each option as one word with its value: ["--mem=32G", "--cpus-per-task=8"]',
            )
        if "\n" in a or "\0" in a:
            raise ConfigError(f"{where}: {a!r} holds a newline")
        name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
        reason = _OWN_OPTIONS.get(name)
        if reason:
            raise ConfigError(f"{where}: remotedl sets {name} itself ({reason})")
        out.append(a)
    return tuple(out)


def _opt_str(settings: Mapping[str, Any], key: str) -> str | None:
    value = settings.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or "\n" in value:
        raise ConfigError(f"{key} must be one line of text, not {value!r}")
    return value


def _str_list(settings: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = settings.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key} must be a list of strings, e.g. {key} = ["..."]')
    return tuple(value)


@dataclass(frozen=True)
class SlurmSettings:
    """A Slurm host's settings (``[hosts.NAME]`` with ``scheduler = "slurm"``)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # the default time limit of a job
    constraint: str | None = None
    sbatch_args: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    gpu_option: GpuOption = "gres"  # --gres=gpu:N works on every GPU cluster; --gpus=N needs cons_tres
    nodes: int | None = None  # `run --nodes N`: one run across N nodes (srun per node); None: one job

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> SlurmSettings:
        """From settings as a mapping (a host's table, or the merged settings); checked."""
        modules = _str_list(settings, "modules")
        for m in modules:
            if not m.strip() or "\n" in m:
                raise ConfigError(f"modules: {m!r} is not a module name")
        time = _opt_str(settings, "time")
        given = settings.get("gpu_option") or "gres"
        option: GpuOption
        if given == "gres":
            option = "gres"
        elif given == "gpus":
            option = "gpus"
        else:
            raise ConfigError(f'gpu_option must be "gres" or "gpus", not {given!r}')
        nodes = settings.get("nodes")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise UsageError(f"--nodes {nodes!r}: give a number of nodes, 1 or more")
        sbatch_args = check_sbatch_args(_str_list(settings, "sbatch_args"))
        if nodes is not None:
            check_node_args(sbatch_args)
        return cls(
            partition=_opt_str(settings, "partition"),
            account=_opt_str(settings, "account"),
            qos=_opt_str(settings, "qos"),
            time=check_time(time, "time") if time else None,
            constraint=_opt_str(settings, "constraint"),
            sbatch_args=sbatch_args,
            modules=modules,
            gpu_option=option,
            nodes=nodes,
        )

    def with_flags(
        self,
        *,
        time: str | None = None,
        partition: str | None = None,
        sbatch_args: Sequence[str] = (),
        nodes: int | None = None,
    ) -> SlurmSettings:
        """Flags win over settings (``--time``, ``--partition``, ``--sbatch-arg``, added last;
        ``--nodes``)."""
        if nodes is not None and nodes < 1:
            raise UsageError(f"--nodes {nodes}: give a number of nodes, 1 or more")
        out = replace(
            self,
            time=check_time(time) if time else self.time,
            partition=partition or self.partition,
            sbatch_args=self.sbatch_args + check_sbatch_args(sbatch_args, "--sbatch-arg"),
            nodes=nodes if nodes is not None else self.nodes,
        )
        if out.nodes is not None:
            check_node_args(out.sbatch_args)
        return out


# What a multi-node run sets itself (the batch script starts one task per node with srun).
_NODE_OPTIONS = ("--nodes", "-N", "--ntasks", "-n", "--ntasks-per-node", "--gpus", "-G")


def check_node_args(args: Sequence[str]) -> None:
    """With ``--nodes``: sbatch options that would change the node count or the task layout
    the batch script's srun relies on are refused."""
    for a in args:
        name = a.split("=", 1)[0] if a.startswith("--") else a[:2]
        if name in _NODE_OPTIONS:
            raise UsageError(
                f"{a}: with --nodes, remotedl sets the nodes and tasks itself (one task per node)",
                hint="give the node count with --nodes N and the GPUs per node with --gpus G",
            )


SETTING_KEYS = ("partition", "account", "qos", "time", "constraint", "sbatch_args", "modules")


def host_settings(settings: Any) -> SlurmSettings | None:
    """The host's Slurm settings when it is a Slurm login node (``scheduler = "slurm"``), else
    None; checked here, so a bad value is a config error before anything reaches the host."""

    def get(key: str) -> Any:
        try:
            return settings.get(key)
        except KeyError:  # a setting this version does not know
            return None

    if get("scheduler") != "slurm":
        return None
    return SlurmSettings.from_settings({k: get(k) for k in SETTING_KEYS})


def settings_request(s: SlurmSettings) -> dict[str, Any]:
    """What the agent's start request carries (it checks them again on the login node)."""
    return {
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "time": s.time,
        "constraint": s.constraint,
        "sbatch_args": list(s.sbatch_args),
        "modules": list(s.modules),
        "gpu_option": s.gpu_option,
        "nodes": s.nodes,
    }


@dataclass(frozen=True)
class BatchJob:
    """One job to submit. Paths are on the login node (a leading ``~`` is its user's home) and
    on the filesystem it shares with the nodes."""

    job_id: str  # remotedl's id: REMOTEDL_JOB_ID and part of the Slurm job name
    command: str  # a shell command line, run in ``workdir``
    workdir: str  # the job's own code (--chdir)
    control_dir: str  # batch.sh, params, env, started, exit
    log: str  # stdout and stderr, appended (--output)
    remote_dir: str = ""  # the project's tree: its .venv serves when workdir has none
    name: str | None = None
    gpus: int = 1
    env: Mapping[str, str] = field(default_factory=dict)
    conda: str | None = None  # a conda environment to activate
    env_setup: str | None = None  # a shell line run before the command (in bash where there is one)
    nodes: int | None = None  # a multi-node run: N nodes, the command once per node (srun); None: one job


def job_name(job: BatchJob) -> str:
    """The Slurm job name: ``rdl-ID`` or ``rdl-ID-NAME``, in characters every tool prints as is."""
    base = f"rdl-{job.job_id}"
    if job.name and job.name != job.job_id:
        base += "-" + _NAME.sub("_", job.name)
    return base[:100]


def sbatch_options(job: BatchJob, settings: SlurmSettings) -> list[str]:
    """The option words remotedl gives sbatch besides --chdir, --output, --open-mode and
    --parsable (the submit script adds those after expanding ``~``)."""
    if job.gpus < 0:
        raise UsageError(f"--gpus {job.gpus}: a job cannot ask for fewer than 0 GPUs")
    opts = [f"--job-name={job_name(job)}"]
    if job.nodes is not None:
        if job.nodes < 1:
            raise UsageError(f"--nodes {job.nodes}: give a number of nodes, 1 or more")
        opts += [f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    if job.gpus:
        # --gres is per node; --gpus counts the whole job's, so a multi-node run says per node
        if settings.gpu_option == "gres":
            opts.append(f"--gres=gpu:{job.gpus}")
        else:
            opts.append(f"--gpus-per-node={job.gpus}" if job.nodes is not None else f"--gpus={job.gpus}")
    for flag, value in (
        ("--time", settings.time),
        ("--partition", settings.partition),
        ("--account", settings.account),
        ("--qos", settings.qos),
        ("--constraint", settings.constraint),
    ):
        if value:
            opts.append(f"{flag}={value}")
    opts.extend(settings.sbatch_args)
    return opts
