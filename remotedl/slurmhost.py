"""A Slurm login node seen from the laptop: the cluster's status, the checks ``doctor`` runs,
``srun`` into a job's allocation, and Jupyter as a batch job tunnelled to through the login node.
Remote calls go through ``Box.run(script, *values)``: the scripts are constants and every value
arrives as "$1"..., never spliced into code. Jobs themselves (submit, states, scancel, logs) are
the agent's, on the login node (``remotedl.agent.runtimes.slurm`` with ``remotedl.slurm``).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from remotedl.errors import RemoteError
from remotedl.schema import JobRecord
from remotedl.slurm import (
    JUPYTER_COMMAND,
    MODULE_INIT,
    SINFO_FORMAT,
    SQUEUE_FORMAT,
    BatchJob,
    ClusterStatus,
    SlurmSettings,
    decode_values,
    parse_partitions,
    parse_sinfo_nodes,
    parse_squeue,
    sbatch_options,
    sbatch_reason,
)
from remotedl.ssh.channel import EXPAND_HOME, Box, mark_sections
from remotedl.waiting import retry_until

if TYPE_CHECKING:
    from remotedl.agent.client import AgentClient
    from remotedl.jobs import EnvSpec


# "$1" control dir, "$2" log: where Jupyter listens, whether it answers yet, its token.
_JUPYTER_LOOK = (
    EXPAND_HOME
    + r"""
_ctl=$(expand_home "$1") _log=$(expand_home "$2")
[ -f "$_ctl/jupyter" ] && printf '@@jupyter %s\n' "$(cat "$_ctl/jupyter")"
[ -f "$_ctl/jupyter" ] && [ -f "$_log" ] && grep -q 'is running at' "$_log" && echo '@@ready'
[ -f "$_ctl/env" ] && { echo '@@env'; od -An -v -tx1 "$_ctl/env"; }
[ -f "$_log" ] && { echo '@@log'; tail -n 5 "$_log"; }
echo '@@end'
"""
)

JUPYTER_NAME = "jupyter"


@dataclass
class SlurmJupyter:
    """A Jupyter server running as a Slurm job (a remotedl job named ``jupyter``)."""

    job_id: int
    slurm_id: str
    node: str  # the node's name, from Slurm (the tunnel's target, resolved by the login node)
    address: str  # the address Jupyter listens on, on the node
    port: int
    token: str
    lab: bool
    started: bool  # True when this call submitted it

    def url(self, local_port: int) -> str:
        return f"http://127.0.0.1:{local_port}/{'lab' if self.lab else ''}?token={self.token}"

    @property
    def where(self) -> str:
        return f"node {self.node} as Slurm job {self.slurm_id} (remotedl job {self.job_id})"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("token")  # a secret: only in the URL the user asked for
        return out


def _token_from_env(hex_lines: Sequence[str]) -> str | None:
    """JUPYTER_TOKEN from the job's env file, as ``od -An -tx1`` printed it."""
    try:
        values = decode_values(bytes.fromhex("".join("".join(hex_lines).split())))
    except ValueError:
        return None
    return dict(zip(values[::2], values[1::2], strict=False)).get("JUPYTER_TOKEN")


def _look(box: Box, rec: JobRecord) -> dict[str, list[str]]:
    return mark_sections(box.run(_JUPYTER_LOOK, rec.control_dir or "", rec.log).stdout)


def _serving(look: Mapping[str, list[str]], rec: JobRecord, started: bool) -> SlurmJupyter | None:
    if rec.status != "running" or "ready" not in look or not look.get("jupyter") or not rec.slurm_id:
        return None
    parts = look["jupyter"][0].split()
    token = _token_from_env(look.get("env", []))
    if len(parts) < 4 or not parts[1].isdigit() or token is None:
        return None
    return SlurmJupyter(
        job_id=rec.id,
        slurm_id=rec.slurm_id,
        node=rec.node or parts[3],
        address=parts[0],
        port=int(parts[1]),
        token=token,
        lab=parts[2] == "lab",
        started=started,
    )


def find_or_start_jupyter(
    client: AgentClient,
    *,
    remote_dir: str,
    settings: Mapping[str, Any],
    gpus: int = 1,
    environment: EnvSpec | None = None,
    timeout: float = 600.0,
    on_progress: Callable[[str], None] | None = None,
) -> SlurmJupyter:
    """This project's Jupyter job when it serves; else a new one (a remotedl job named
    ``jupyter`` in ``remote_dir``, ``gpus`` GPUs, the host's Slurm ``settings``; the token
    reaches it through the job's 0600 env file). Waits while Slurm queues it, saying why, until
    Jupyter answers on its node; a job that never comes up is cancelled."""
    from remotedl import jobs

    say = on_progress or (lambda text: None)
    box = client.box
    for rec in reversed(jobs.list_jobs(client)):
        mine = (
            rec.name == JUPYTER_NAME and rec.scheduler == "slurm" and _same_dir(rec.project_dir, remote_dir)
        )
        if mine and rec.status == "running":
            found = _serving(_look(box, rec), rec, started=False)
            if found is not None:
                return found
    token = secrets.token_hex(24)
    rec = jobs.start(
        client,
        command=JUPYTER_COMMAND,
        remote_dir=remote_dir,
        name=JUPYTER_NAME,
        count=gpus or None,
        gpus="none" if gpus == 0 else None,
        env={"JUPYTER_TOKEN": token},
        isolate=False,
        environment=environment,
        env_check=False,
        slurm=settings,
    )
    said = ""

    def up() -> SlurmJupyter | None:
        nonlocal said
        now = jobs.get_job(client, str(rec.id))
        if now.state != said:
            said = now.state
            say(f"Jupyter job {now.id} (Slurm job {now.slurm_id}): {said}")
        if now.ended:
            tail = " ".join(_look(box, now).get("log", [])[-2:]).strip()
            raise RemoteError(
                f"the Jupyter job {now.id} ended: {now.state}" + (f": {tail}" if tail else ""),
                hint=f"its output: `remotedl logs {now.id}`",
            )
        return _serving(_look(box, now), now, started=True) if now.status == "running" else None

    try:
        server = retry_until(up, seconds=timeout, interval=1.0)
    except BaseException:
        _cancel_quietly(client, rec.id)
        raise
    if server is None:
        _cancel_quietly(client, rec.id)
        raise RemoteError(
            f"Jupyter did not come up within {timeout:g} s (job {rec.id}: {said}); cancelled it",
            hint="`remotedl status` shows the queue; ask for fewer GPUs with --gpus",
        )
    return server


def _same_dir(absolute: str, given: str) -> bool:
    """Whether the agent's absolute project dir is the ``remote_dir`` setting (``~/...``)."""
    if given.startswith("~/"):
        return absolute.endswith(given[1:].rstrip("/"))
    return absolute.rstrip("/") == given.rstrip("/")


def _cancel_quietly(client: AgentClient, job_id: int) -> None:
    from remotedl import jobs
    from remotedl.errors import RemotedlError

    try:
        jobs.kill(client, str(job_id))
    except RemotedlError:
        pass  # it ended by itself meanwhile


def stop_jupyter(client: AgentClient, server: SlurmJupyter) -> JobRecord:
    """Cancel the Jupyter job (Ctrl-C of the command that started it)."""
    from remotedl import jobs

    return jobs.kill(client, str(server.job_id))


_STATUS = r"""
command -v sinfo >/dev/null 2>&1 || { echo "@@error sinfo is not on the login node's PATH"; exit 0; }
echo @@user; id -un
echo @@version; sinfo --version 2>&1 | head -n 1
echo @@partitions; scontrol --oneliner show partition 2>&1
echo @@nodes; sinfo --noheader --Node -O 'SINFO_FORMAT' 2>&1
echo @@jobs; squeue --noheader --user="$(id -un)" -O 'SQUEUE_FORMAT' 2>&1
echo @@end
""".replace("SINFO_FORMAT", SINFO_FORMAT).replace("SQUEUE_FORMAT", SQUEUE_FORMAT)


def cluster_status(box: Box) -> ClusterStatus:
    """Partitions, nodes with their GPUs (total, allocated), and the user's jobs; one exec."""
    r = box.run(_STATUS)
    s = mark_sections(r.stdout)
    if "error" in s:
        raise RemoteError(s["error"][0], hint="is this host a Slurm login node? check `remotedl doctor`")
    nodes = parse_sinfo_nodes("\n".join(s.get("nodes", [])))
    return ClusterStatus(
        host=box.spec.alias,
        user=(s.get("user") or [""])[0].strip(),
        version=(s.get("version") or [""])[0].strip(),
        partitions=parse_partitions("\n".join(s.get("partitions", [])), nodes),
        nodes=nodes,
        jobs=parse_squeue("\n".join(s.get("jobs", []))),
    )


# ------------------------------------------------------------------ doctor

SLURM_COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun", "sacct", "sacctmgr")
NEEDED = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")
ASSOC_FIELDS = ("Account", "Partition", "QOS", "DefaultQOS", "GrpTRES", "MaxTRES", "MaxWall", "MaxJobs",
                "MaxSubmit")  # fmt: skip
QOS_FIELDS = ("Name", "MaxWall", "MaxTRESPU", "MaxJobsPU", "MaxSubmitPU", "MaxTRES")

# "$1" modules (one a line), then the sbatch option words of a one-GPU test submission.
_DOCTOR = (
    MODULE_INIT
    + r"""
_mods=$1; shift
echo @@commands; for t in SLURM_COMMANDS; do printf '%s %s\n' "$t" "$(command -v "$t" 2>/dev/null)"; done
command -v sinfo >/dev/null 2>&1 || { echo @@end; exit 0; }
echo @@version; sinfo --version 2>&1 | head -n 1
echo @@ping; scontrol ping 2>&1; echo "@@ping_rc $?"
echo @@select; scontrol show config 2>/dev/null | grep -E '^(SelectType|GresTypes|AccountingStorageType) '
echo @@nodes; sinfo --noheader --Node -O 'SINFO_FORMAT' 2>&1
echo @@testonly; sbatch --test-only "$@" --wrap true 2>&1; echo "@@testonly_rc $?"
_o=$(sacct --noheader --allocations --starttime=now 2>&1); _rc=$?
echo @@sacct; printf '%s\n' "$_o" | tail -n 2; echo "@@sacct_rc $_rc"
echo @@assoc; sacctmgr --noheader --parsable2 show assoc where user="$(id -un)" format=ASSOC_FIELDS 2>&1
echo "@@assoc_rc $?"
echo @@qos; sacctmgr --noheader --parsable2 show qos format=QOS_FIELDS 2>&1; echo "@@qos_rc $?"
if [ -n "$_mods" ]; then
  echo @@modules
  if _rdl_module_init; then
    while IFS= read -r _m; do
      [ -n "$_m" ] || continue
      if module is-avail "$_m" >/dev/null 2>&1; then echo "ok $_m"; else echo "missing $_m"; fi
    done <<RDL_MODULES
$_mods
RDL_MODULES
  else
    echo "@@nomodule"
  fi
fi
echo @@end
""".replace("SLURM_COMMANDS", " ".join(SLURM_COMMANDS))
    .replace("SINFO_FORMAT", SINFO_FORMAT)
    .replace("ASSOC_FIELDS", ",".join(ASSOC_FIELDS))
    .replace("QOS_FIELDS", ",".join(QOS_FIELDS))
)


@dataclass
class SlurmCheck:
    """One doctor line (the same shape as ``doctor.Check``)."""

    name: str
    status: str  # ok, warn, fail, skip
    detail: str
    fix: str = ""


def doctor_checks(box: Box, settings: SlurmSettings) -> list[SlurmCheck]:
    """Commands present, the controller up, partitions with GPUs, a test submission with the
    host's settings, accounting, the user's account/QOS limits when sacctmgr answers, modules."""
    probe = BatchJob(job_id="doctor", command="true", workdir="", control_dir="", log="", gpus=1)
    opts = [o for o in sbatch_options(probe, settings) if not o.startswith("--job-name=")]
    r = box.run(_DOCTOR, "\n".join(settings.modules), "--job-name=remotedl-doctor", *opts)
    return checks_from(mark_sections(r.stdout), settings)


def checks_from(s: Mapping[str, list[str]], settings: SlurmSettings) -> list[SlurmCheck]:
    """The doctor lines from the doctor script's sections (pure: unit-tested)."""
    out: list[SlurmCheck] = []
    where: dict[str, str] = {}
    for line in s.get("commands", []):
        name, _, path = line.partition(" ")
        where[name] = path.strip()
    missing = [c for c in NEEDED if not where.get(c)]
    if missing:
        out.append(
            SlurmCheck(
                "slurm commands",
                "fail",
                f"{', '.join(missing)} not on the login node's PATH",
                "is this host a Slurm login node? (a module may provide them: set modules, or PATH in "
                "the login shell's start-up files)",
            )
        )
        return out
    extra = [c for c in ("srun", "sacct", "sacctmgr") if not where.get(c)]
    detail = "sbatch, squeue, scancel, sinfo, scontrol" + (f"; no {', '.join(extra)}" if extra else "")
    fix = "attach needs srun" if "srun" in extra else ""
    out.append(SlurmCheck("slurm commands", "warn" if "srun" in extra else "ok", detail, fix))

    version = (s.get("version") or [""])[0].strip()
    m = re.search(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < (22, 5):
        out.append(SlurmCheck("slurm version", "warn", f"{version}: remotedl is tested with 22.05 and newer"))
    elif version:
        out.append(SlurmCheck("slurm version", "ok", version))

    ping = "\n".join(s.get("ping", [])).strip()
    ping_rc = (s.get("ping_rc") or ["1"])[0].strip()
    if ping_rc == "0" and "UP" in ping:
        out.append(SlurmCheck("slurm controller", "ok", ping.splitlines()[0]))
    else:
        out.append(
            SlurmCheck(
                "slurm controller",
                "fail",
                (ping.splitlines() or ["no answer"])[-1],
                "slurmctld does not answer: ask the cluster's admins",
            )
        )

    nodes = parse_sinfo_nodes("\n".join(s.get("nodes", [])))
    with_gpus: dict[str, int] = {}
    for n in nodes:
        for p in n.partitions:
            with_gpus[p] = with_gpus.get(p, 0) + n.gpus
    gpu_parts = {p: g for p, g in with_gpus.items() if g}
    if gpu_parts:
        text = ", ".join(f"{p} ({g} GPUs)" for p, g in sorted(gpu_parts.items()))
        out.append(SlurmCheck("GPU partitions", "ok", text))
    else:
        out.append(
            SlurmCheck(
                "GPU partitions",
                "warn",
                "no partition has GPUs as gres (gpu)",
                "jobs asking for GPUs will be refused; run with --gpus 0, or ask the admins",
            )
        )
    if settings.partition:
        if settings.partition not in with_gpus:
            known = ", ".join(sorted(with_gpus)) or "none"
            out.append(
                SlurmCheck(
                    "partition",
                    "fail",
                    f"partition {settings.partition!r} does not exist (partitions: {known})",
                    "fix partition in [hosts.NAME]",
                )
            )
        elif not with_gpus[settings.partition]:
            out.append(
                SlurmCheck("partition", "warn", f"partition {settings.partition!r} has no GPUs as gres")
            )
        else:
            out.append(
                SlurmCheck("partition", "ok", f"{settings.partition}: {with_gpus[settings.partition]} GPUs")
            )

    test = [x for x in s.get("testonly", []) if x.strip()]
    test_rc = (s.get("testonly_rc") or ["1"])[0].strip()
    last = re.sub(r"^sbatch: ", "", test[-1].strip()) if test else ""
    if test_rc == "0":
        out.append(SlurmCheck("test submission", "ok", f"a 1-GPU job would be accepted: {last}"))
    else:
        out.append(
            SlurmCheck(
                "test submission",
                "fail",
                f"sbatch --test-only refused a 1-GPU job with this host's settings: {sbatch_reason(test)}",
                "check partition, account, qos, time and sbatch_args in [hosts.NAME]",
            )
        )

    sacct_rc = (s.get("sacct_rc") or ["1"])[0].strip()
    sacct_text = " ".join(s.get("sacct", [])).strip()
    if sacct_rc == "0" and "disabled" not in sacct_text:
        out.append(SlurmCheck("accounting", "ok", "sacct answers: finished jobs' states come from it"))
    else:
        out.append(
            SlurmCheck(
                "accounting",
                "skip",
                "sacct does not answer (no accounting database): a finished job's state comes from "
                "what its batch script recorded",
            )
        )

    assoc_rc = (s.get("assoc_rc") or ["1"])[0].strip()
    if assoc_rc != "0":
        out.append(SlurmCheck("account limits", "skip", "sacctmgr does not answer (no accounting database)"))
    else:
        out.extend(_assoc_checks(s.get("assoc", []), s.get("qos", []), settings))

    if "modules" in s or "nomodule" in s:
        if "nomodule" in s:
            out.append(
                SlurmCheck(
                    "modules",
                    "fail",
                    "modules are set for this host but it has no module command "
                    "(Lmod or Environment Modules)",
                    "remove modules from [hosts.NAME]",
                )
            )
        else:
            lines = s.get("modules", [])
            gone = [x.split(" ", 1)[1] for x in lines if x.startswith("missing ")]
            if gone:
                out.append(
                    SlurmCheck(
                        "modules",
                        "fail",
                        f"not available: {', '.join(gone)}",
                        "`module avail` on the login node lists them",
                    )
                )
            else:
                out.append(SlurmCheck("modules", "ok", ", ".join(settings.modules)))
    return out


def _rows(lines: Iterable[str], fields: Sequence[str]) -> list[dict[str, str]]:
    rows = []
    for line in lines:
        parts = line.split("|")
        if len(parts) == len(fields):
            rows.append(dict(zip(fields, parts, strict=True)))
    return rows


def _assoc_checks(assoc: Sequence[str], qos: Sequence[str], settings: SlurmSettings) -> list[SlurmCheck]:
    rows = _rows(assoc, ASSOC_FIELDS)
    out: list[SlurmCheck] = []
    if not rows:
        return [SlurmCheck("account", "warn", "sacctmgr lists no association for this user",
                           "ask the admins for an account on the cluster")]  # fmt: skip
    accounts = sorted({r["Account"] for r in rows if r["Account"]})
    if settings.account and settings.account not in accounts:
        out.append(
            SlurmCheck(
                "account",
                "fail",
                f"account {settings.account!r} is not yours (yours: {', '.join(accounts) or 'none'})",
                "fix account in [hosts.NAME]",
            )
        )
    else:
        out.append(SlurmCheck("account", "ok", ", ".join(accounts)))
    allowed = sorted({q for r in rows for q in r["QOS"].split(",") if q})
    if settings.qos and allowed and settings.qos not in allowed:
        out.append(
            SlurmCheck(
                "qos",
                "fail",
                f"QOS {settings.qos!r} is not allowed for you (allowed: {', '.join(allowed)})",
                "fix qos in [hosts.NAME]",
            )
        )
    limits = []
    for r in rows:
        got = [f"{k} {r[k]}" for k in ("GrpTRES", "MaxTRES", "MaxWall", "MaxJobs", "MaxSubmit") if r[k]]
        if got:
            limits.append(f"{r['Account']}{'/' + r['Partition'] if r['Partition'] else ''}: {', '.join(got)}")
    wanted_qos = {settings.qos} if settings.qos else set(allowed)
    for q in _rows(qos, QOS_FIELDS):
        if q["Name"] in wanted_qos:
            got = [f"{k} {q[k]}" for k in QOS_FIELDS[1:] if q[k]]
            if got:
                limits.append(f"QOS {q['Name']}: {', '.join(got)}")
    out.append(SlurmCheck("limits", "ok", "; ".join(limits) if limits else "no limits set"))
    return out
