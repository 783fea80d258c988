"""A Slurm login node driven from the laptop through ``Box.run(script, *values)``: submit,
states, scancel, a job's log followed with byte-offset resume, ``srun`` into a job, Jupyter as a
batch job, the cluster's status and the checks ``doctor`` runs. The scripts are constants; every
value (paths, the command, option words) arrives as "$1"..., never spliced into code. What Slurm
takes and prints is in ``remotedl.slurm``.
"""

from __future__ import annotations

import re
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from remotedl.errors import RemoteError
from remotedl.slurm import (
    _QUEUED,
    _RUNNING,
    BATCH_SCRIPT,
    JUPYTER_COMMAND,
    MODULE_INIT,
    SACCT_FIELDS,
    SINFO_FORMAT,
    SQUEUE_FORMAT,
    BatchJob,
    ClusterStatus,
    JobRef,
    SlurmJob,
    SlurmSettings,
    Submitted,
    batch_params,
    decode_values,
    env_file,
    job_from_scontrol,
    parse_partitions,
    parse_sbatch,
    parse_scontrol,
    parse_sinfo_nodes,
    parse_squeue,
    parse_states,
    sbatch_options,
    sbatch_reason,
    submit_error,
)
from remotedl.ssh.channel import EXPAND_HOME, Box, mark_sections
from remotedl.ssh.openssh import login_shell_safe, ssh_argv
from remotedl.ssh.resolve import HostSpec
from remotedl.waiting import retry_until

# "$1" control dir, "$2" job dir, "$3" log, "$4" params, "$5" env data, "$6" 1 to run the batch
# script with bash (env_setup, modules); then sbatch's option words.
_SUBMIT = (
    EXPAND_HOME
    + r"""
_ctl=$(expand_home "$1") _wd=$(expand_home "$2") _log=$(expand_home "$3") _params=$4 _envdata=$5 _bash=$6
shift 6
umask 077
command -v sbatch >/dev/null 2>&1 || { echo "@@error sbatch is not on the login node's PATH"; exit 0; }
[ -d "$_wd" ] || { echo "@@error the job's directory $_wd does not exist on the login node"; exit 0; }
mkdir -p "$_ctl" "$(dirname "$_log")" || { echo "@@error cannot make $_ctl"; exit 0; }
rm -f "$_ctl/env" "$_ctl/exit" "$_ctl/started" "$_ctl/slurm_id" "$_ctl/jupyter" "$_log"
if [ "$_bash" = 1 ] && [ -x /bin/bash ]; then echo '#!/bin/bash'; else echo '#!/bin/sh'; fi > "$_ctl/batch.sh"
cat >> "$_ctl/batch.sh" <<'RDL_BATCH_SCRIPT_END'
"""
    + BATCH_SCRIPT
    + r"""RDL_BATCH_SCRIPT_END
chmod 700 "$_ctl/batch.sh"
printf '%s' "$_params" > "$_ctl/params"
[ -z "$_envdata" ] || printf '%s' "$_envdata" > "$_ctl/env"
_pattern=$(printf '%s' "$_log" | sed 's/%/%%/g')  # sbatch reads % in --output as a pattern
_out=$(sbatch --parsable --chdir="$_wd" --output="$_pattern" --open-mode=append \
  "$@" "$_ctl/batch.sh" "$_ctl" 2>"$_ctl/sbatch.err")
_rc=$?
sed 's/^/@@stderr /' "$_ctl/sbatch.err"
if [ "$_rc" -ne 0 ]; then rm -f "$_ctl/env"; echo "@@rc $_rc"; exit 0; fi
printf '@@job %s\n' "$_out"
printf '%s\n' "$_out" > "$_ctl/slurm_id"
printf '@@control %s\n' "$_ctl"
"""
)


def submit(box: Box, job: BatchJob, settings: SlurmSettings) -> Submitted:
    """Write the job's control files and submit it with sbatch; one exec."""
    opts = sbatch_options(job, settings)
    params = batch_params(job, settings.modules)
    use_bash = "1" if (job.env_setup or settings.modules) else "0"
    r = box.run(
        _SUBMIT,
        job.control_dir,
        job.workdir,
        job.log,
        params.decode("utf-8", "surrogateescape"),
        env_file(job.env).decode("utf-8", "surrogateescape"),
        use_bash,
        *opts,
    )
    sections = mark_sections(r.stdout)
    stderr = sections.get("stderr", [])
    if "error" in sections:
        raise RemoteError(sections["error"][0], hint="check remote_dir and push first")
    if "rc" in sections or "job" not in sections:
        raise submit_error(stderr or r.stderr.splitlines())
    slurm_id, cluster = parse_sbatch(sections["job"][0])
    control = (sections.get("control") or [job.control_dir])[0]
    return Submitted(slurm_id, cluster, control, opts, [x for x in stderr if x.strip()])


# "$@": triples (Slurm id, control dir, log). Per job: what scontrol knows, else sacct, and what
# the job wrote itself.
_STATE_FN = (
    EXPAND_HOME
    + r"""
rdl_state() {
  _id=$1 _ctl=$(expand_home "$2") _log=$(expand_home "$3")
  printf '@@job %s\n' "$_id"
  _sc=$(scontrol --oneliner --details show job "$_id" 2>&1)
  _rc=$?
  if [ "$_rc" -eq 0 ] && [ -n "$_sc" ]; then
    printf '%s\n' "$_sc" | sed 's/^/@@scontrol /'
  elif [ "$_rc" -ne 0 ] && ! printf '%s' "$_sc" | grep -q 'Invalid job id'; then
    printf '@@unreachable %s\n' "$(printf '%s\n' "$_sc" | tail -n 1)"
  else
    sacct --noheader --parsable2 --allocations --jobs="$_id" --format=SACCT_FIELDS 2>/dev/null |
      sed 's/^/@@sacct /'
    if [ -n "$_log" ] && [ -f "$_log" ] && tail -c 4096 "$_log" | grep -q 'DUE TO TIME LIMIT'; then
      echo '@@timelimit'
    fi
  fi
  [ -f "$_ctl/started" ] && printf '@@started %s\n' "$(cat "$_ctl/started")"
  [ -f "$_ctl/exit" ] && printf '@@exit %s\n' "$(cat "$_ctl/exit")"
  echo '@@done'
}
""".replace("SACCT_FIELDS", ",".join(SACCT_FIELDS))
)

_QUERY = (
    _STATE_FN
    + r"""
command -v scontrol >/dev/null 2>&1 || { echo "@@error scontrol is not on the login node's PATH"; exit 0; }
while [ "$#" -ge 3 ]; do rdl_state "$1" "$2" "$3"; shift 3; done
"""
)

# "$1" Slurm id, "$2" control dir, "$3" log.
_CANCEL = (
    _STATE_FN
    + r"""
command -v scancel >/dev/null 2>&1 || { echo "@@error scancel is not on the login node's PATH"; exit 0; }
scancel "$1" 2>&1 | sed 's/^/@@stderr /'
rm -f "$(expand_home "$2")/env"
rdl_state "$1" "$2" "$3"
"""
)


def query(box: Box, jobs: Sequence[JobRef]) -> dict[str, SlurmJob]:
    """The state of each job (by Slurm id), one exec for all."""
    if not jobs:
        return {}
    values = [v for j in jobs for v in (j.slurm_id, j.control_dir, j.log)]
    r = box.run(_QUERY, *values)
    marks = mark_sections(r.stdout)
    if "error" in marks and "job" not in marks:
        raise RemoteError(marks["error"][0], hint="is this host a Slurm login node? check `remotedl doctor`")
    return parse_states(r.stdout)


def cancel(box: Box, job: JobRef, *, wait: float = 30.0) -> SlurmJob:
    """scancel the job (and remove its env file), then wait until Slurm says it ended (a
    cancelled running job passes through COMPLETING for up to KillWait seconds)."""
    r = box.run(_CANCEL, job.slurm_id, job.control_dir, job.log)
    marks = mark_sections(r.stdout)
    if "error" in marks and "job" not in marks:
        raise RemoteError(marks["error"][0])
    state = parse_states(r.stdout).get(job.slurm_id) or SlurmJob(job.slurm_id, "UNKNOWN", source="none")
    if state.ended:
        return state

    def ended() -> SlurmJob | None:
        now = query(box, [job]).get(job.slurm_id)
        return now if now is not None and now.ended else None

    return retry_until(ended, seconds=wait, interval=0.2) or query(box, [job]).get(job.slurm_id, state)


def wait_for(
    box: Box, job: JobRef, until: Callable[[SlurmJob], bool], *, seconds: float, interval: float = 0.5
) -> SlurmJob | None:
    """Poll the job's state until ``until`` holds (None when ``seconds`` passed first)."""

    def check() -> SlurmJob | None:
        now = query(box, [job]).get(job.slurm_id)
        return now if now is not None and until(now) else None

    return retry_until(check, seconds=seconds, interval=interval)


# ------------------------------------------------------------------ following a job's log

# Active states: the job may still write to its log (COMPLETING: slurmstepd may add a line).
_ACTIVE_STATES = " ".join(sorted(_QUEUED | _RUNNING))

# "$1" Slurm id, "$2" log, "$3" control dir, "$4" byte offset (empty: from "$6" lines before the
# end, or 0), "$5" 1 to follow until the job ends, "$6" lines. Answers in frames on stdout:
# "S OFFSET" first; "D N" then N bytes of the log; "Q LINE" when scontrol's state or reason
# changed; "E" then the job's state lines (as the state script prints them) at its end.
_FOLLOW = (
    _STATE_FN
    + r"""
_id=$1 _log=$(expand_home "$2") _ctl=$(expand_home "$3") _off=$4 _follow=$5 _lines=$6
_size() { if [ -f "$_log" ]; then wc -c < "$_log" | tr -d ' '; else echo 0; fi; }
if [ -z "$_off" ]; then
  _off=0
  if [ -n "$_lines" ] && [ -f "$_log" ]; then
    _s=$(_size); _t=$(tail -n "$_lines" "$_log" | wc -c | tr -d ' '); _off=$((_s - _t))
  fi
fi
printf 'S %s\n' "$_off"
_copy() {
  _s=$(_size)
  if [ "$_s" -gt "$_off" ]; then
    printf 'D %s\n' $((_s - _off))
    tail -c +$((_off + 1)) "$_log" | head -c $((_s - _off))
    _off=$_s
  fi
}
_seen= _st= _next=0 _n=0
while :; do
  if [ "$_n" -ge "$_next" ] || [ -f "$_ctl/exit" ]; then
    _sc=$(scontrol --oneliner show job "$_id" 2>&1)
    case $_sc in
      JobId=*)
        _st=$(printf '%s\n' "$_sc" | sed -n 's/.* JobState=\([A-Z_]*\).*/\1/p' | head -n 1)
        _rs=$(printf '%s\n' "$_sc" | sed -n 's/.* Reason=\([^ ]*\).*/\1/p' | head -n 1)
        if [ "$_st $_rs" != "$_seen" ]; then
          _seen="$_st $_rs"; printf 'Q %s\n' "$(printf '%s\n' "$_sc" | head -n 1)"
        fi;;
      *"Invalid job id"*) _st=GONE;;
      *) _st=;;  # the controller did not answer: keep following
    esac
    _next=$((_n + 10))
  fi
  _copy
  case " ACTIVE_STATES  " in
    *" $_st "*) ;;
    *) [ -z "$_st" ] || break;;
  esac
  [ "$_follow" = 1 ] || break
  sleep 0.2
  _n=$((_n + 1))
done
_copy
echo E
rdl_state "$_id" "$3" "$2"
""".replace("ACTIVE_STATES", _ACTIVE_STATES)
)


@dataclass
class Following:
    """Where a log follower stands: its byte offset and how often it reconnected."""

    offset: int | None = None  # None: not started (``lines`` decides the first offset)
    reconnects: int = 0
    state: SlurmJob | None = None  # the last state seen


class _Frames:
    """Parses the follower's frames as bytes arrive."""

    def __init__(self) -> None:
        self.buf = b""
        self.data_left = 0
        self.ended = False  # after "E": the state lines

    def feed(self, chunk: bytes) -> Iterator[tuple[str, bytes]]:
        self.buf += chunk
        while self.buf:
            if self.data_left:
                piece = self.buf[: self.data_left]
                self.buf = self.buf[len(piece) :]
                self.data_left -= len(piece)
                yield "D", piece
                continue
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > 1 << 20:
                    raise RemoteError("the log follower sent a line it should not have")
                return
            line, self.buf = self.buf[:nl].decode(errors="replace"), self.buf[nl + 1 :]
            kind, _, rest = line.partition(" ")
            if self.ended:
                yield "L", line.encode()
            elif kind == "D" and rest.isdigit():
                self.data_left = int(rest)
            elif kind in ("S", "Q", "E"):
                self.ended = kind == "E"
                yield kind, rest.encode()
            else:
                raise RemoteError(f"the log follower sent {line[:60]!r}")


def follow_log(
    box: Box,
    job: JobRef,
    write: Callable[[bytes], None],
    *,
    follow: bool = True,
    lines: int | None = None,
    state: Following | None = None,
    on_state: Callable[[SlurmJob], None] | None = None,
    on_reconnect: Callable[[int], None] | None = None,
    reconnect_for: float = 300.0,
) -> SlurmJob:
    """Copy the job's log from the login node to ``write``; following, until the job ends.
    While it waits in the queue ``on_state`` hears each state (PENDING with its reason), and
    each change after. A dropped connection is re-made and the log resumes at the byte offset
    reached: no byte lost, none repeated. Returns the job's state at its end."""
    from remotedl.ssh.channel import NoFrame
    from remotedl.ssh.openssh import openssh_failure

    st = state or Following()
    down_since: float | None = None
    while True:
        p = box.start(
            _FOLLOW,
            job.slurm_id,
            job.log,
            job.control_dir,
            "" if st.offset is None else str(st.offset),
            "1" if follow else "0",
            str(lines) if lines is not None and st.offset is None else "",
        )
        frames = _Frames()
        ended: list[str] | None = None
        framed = True
        try:
            while True:
                try:
                    chunk = p.read()
                except NoFrame:
                    framed = False
                    break
                if not chunk:
                    break
                for kind, data in frames.feed(chunk):
                    if kind == "L" and ended is not None:
                        ended.append(data.decode(errors="replace"))
                    elif kind == "D":
                        write(data)
                        st.offset = (st.offset or 0) + len(data)
                    elif kind == "S" and st.offset is None:
                        st.offset = int(data)
                    elif kind == "Q":
                        seen = job_from_scontrol(parse_scontrol(data.decode(errors="replace")))
                        st.state = seen
                        if on_state is not None:
                            on_state(seen)
                    elif kind == "E":
                        ended = []
        except BaseException:
            p.kill()
            raise
        code = p.wait()
        if ended is not None:
            tail = frames.buf.decode(errors="replace").splitlines()
            final = parse_states("\n".join([*ended, *tail])).get(job.slurm_id)
            st.state = final or st.state or SlurmJob(job.slurm_id, "UNKNOWN", source="none")
            return st.state
        err = p.stderr_text()
        if (code == 255 or not framed) and follow:
            now = _time.monotonic()
            down_since = down_since or now
            if now - down_since > reconnect_for:
                raise openssh_failure(box.spec, err)
            st.reconnects += 1
            if on_reconnect is not None:
                on_reconnect(st.reconnects)
            _time.sleep(min(0.2 * 2 ** min(st.reconnects, 5), 5.0))
            continue
        if code == 255 or not framed:
            raise openssh_failure(box.spec, err)
        last = (p.stderr_lines or [f"exit {code}"])[-1]
        raise RemoteError(f"reading the log of Slurm job {job.slurm_id} failed: {last}")


def attach_argv(spec: HostSpec, slurm_id: str) -> list[str]:
    """ssh with a terminal to the login node, then ``srun --overlap --pty`` into the job's
    allocation: an interactive shell on its node, with its GPUs (``exit`` ends the shell, not
    the job)."""
    if not re.fullmatch(r"\d+", slurm_id):
        raise RemoteError(f"{slurm_id!r} is not a Slurm job id")
    script = f'exec srun --jobid={slurm_id} --overlap --pty "${{SHELL:-/bin/sh}}"'
    return ssh_argv(spec, login_shell_safe(script), tty=True, batch=False)


# "$1" control dir, "$2" log: what a look at a Jupyter job needs besides its Slurm state.
_JUPYTER_LOOK = (
    EXPAND_HOME
    + r"""
_ctl=$(expand_home "$1") _log=$(expand_home "$2")
[ -f "$_ctl/slurm_id" ] && printf '@@slurm_id %s\n' "$(cat "$_ctl/slurm_id")"
[ -f "$_ctl/jupyter" ] && printf '@@jupyter %s\n' "$(cat "$_ctl/jupyter")"
[ -f "$_ctl/jupyter" ] && [ -f "$_log" ] && grep -q 'is running at' "$_log" && echo '@@ready'
[ -f "$_ctl/env" ] && { echo '@@env'; od -An -v -tx1 "$_ctl/env"; }
[ -f "$_log" ] && { echo '@@log'; tail -n 5 "$_log"; }
echo '@@end'
"""
)


@dataclass
class SlurmJupyter:
    """A Jupyter server running as a Slurm job."""

    slurm_id: str
    node: str  # the node's name, from Slurm (the tunnel's target, resolved by the login node)
    address: str  # the address Jupyter listens on, on the node
    port: int
    token: str
    lab: bool
    control_dir: str
    log: str
    started: bool  # True when this call submitted it

    def url(self, local_port: int) -> str:
        return f"http://127.0.0.1:{local_port}/{'lab' if self.lab else ''}?token={self.token}"

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


def look_jupyter(box: Box, control_dir: str, log: str) -> tuple[dict[str, list[str]], SlurmJob | None]:
    """What the control directory of a Jupyter job says, and its Slurm state (two execs only
    when a job id is there)."""
    marks = mark_sections(box.run(_JUPYTER_LOOK, control_dir, log).stdout)
    slurm_id = (marks.get("slurm_id") or [""])[0].strip()
    if not slurm_id:
        return marks, None
    return marks, query(box, [JobRef(slurm_id, control_dir, log)]).get(slurm_id)


def _running_jupyter(
    marks: Mapping[str, list[str]], state: SlurmJob | None, control_dir: str, log: str, started: bool
) -> SlurmJupyter | None:
    if state is None or state.state != "RUNNING" or "ready" not in marks or not marks.get("jupyter"):
        return None
    parts = marks["jupyter"][0].split()
    token = _token_from_env(marks.get("env", []))
    if len(parts) < 4 or not parts[1].isdigit() or token is None:
        return None
    return SlurmJupyter(
        slurm_id=state.job_id,
        node=state.nodes or parts[3],
        address=parts[0],
        port=int(parts[1]),
        token=token,
        lab=parts[2] == "lab",
        control_dir=control_dir,
        log=log,
        started=started,
    )


def find_or_start_jupyter(
    box: Box,
    *,
    workdir: str,
    control_dir: str,
    log: str,
    settings: SlurmSettings,
    remote_dir: str = "",
    gpus: int = 1,
    conda: str | None = None,
    env_setup: str | None = None,
    timeout: float = 600.0,
    on_progress: Callable[[str], None] | None = None,
) -> SlurmJupyter:
    """Reuse the project's Jupyter job when it runs; else submit one (``gpus`` GPUs, the host's
    settings), wait while it is PENDING (saying why) until Jupyter answers on its node."""
    import secrets

    say = on_progress or (lambda text: None)
    marks, state = look_jupyter(box, control_dir, log)
    found = _running_jupyter(marks, state, control_dir, log, started=False)
    if found is not None:
        return found
    if state is not None and not state.ended:
        cancel(box, JobRef(state.job_id, control_dir, log))  # a leftover that never came up
    token = secrets.token_hex(24)
    job = BatchJob(
        job_id="jupyter",
        name="jupyter",
        command=JUPYTER_COMMAND,
        workdir=workdir,
        control_dir=control_dir,
        log=log,
        remote_dir=remote_dir,
        gpus=gpus,
        env={"JUPYTER_TOKEN": token},
        conda=conda,
        env_setup=env_setup,
    )
    sub = submit(box, job, settings)
    ref = JobRef(sub.slurm_id, sub.control_dir, log)
    said = ""

    def up() -> SlurmJupyter | None:
        nonlocal said
        look, now = look_jupyter(box, control_dir, log)
        if now is not None and now.ended:
            tail = " ".join(look.get("log", [])[-2:]).strip()
            raise RemoteError(
                f"the Jupyter job {sub.slurm_id} ended: {now.describe()}" + (f": {tail}" if tail else ""),
                hint=f"its output is in {log} on the login node",
            )
        words = now.describe() if now is not None else "submitted"
        if words != said:
            said = words
            say(f"Jupyter job {sub.slurm_id}: {words}")
        return _running_jupyter(look, now, control_dir, log, started=True)

    try:
        server = retry_until(up, seconds=timeout, interval=1.0)
    except BaseException:
        cancel(box, ref)
        raise
    if server is None:
        cancel(box, ref)
        raise RemoteError(
            f"Jupyter did not come up within {timeout:g} s (job {sub.slurm_id}: {said}); cancelled it",
            hint="see `remotedl status` for the queue, or ask for fewer GPUs",
        )
    return server


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
