"""``remotedl init``: a first box, from an address (and a password once) to a working host.

``plan_init`` finds what is already done and what is not, changing nothing (it reads the ssh
config, resolves the alias through ``ssh -G`` as it will be, and asks the box for its host key
the way ``remotedl trust`` does); the plan is a list of ``Step``s, each saying what it will do and
which need the user's consent. ``apply_init`` carries out the steps the user agreed to, in order,
reporting each through a callback: the ``Host`` block in the ssh config, a key (``ssh-keygen``),
the host key in known_hosts (the ``trust`` path, only the key the user was shown), the key on the
box (``ssh-copy-id`` with the password once, or the line to paste there), ``remotedl.toml``, and
``doctor``. Run twice, the second plan has nothing to do.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from remotedl import proc
from remotedl.config import PROJECT_FILE, Project
from remotedl.doctor import DoctorReport
from remotedl.env import Environment, passwd_home
from remotedl.errors import ConfigError, HostKeyError, RemotedlError, UsageError
from remotedl.init.login import install_key, probe_login, ssh_env
from remotedl.init.project import DataDir, edit_project_text, find_data_dirs, host_is, toml_value, write_file
from remotedl.ssh.configfile import HostLine, config_value, find_host_lines, home_relative, with_block
from remotedl.ssh.resolve import DEFAULT_IDENTITIES, HostSpec, expand_user_path, resolve_host
from remotedl.words import plural

StepKind = Literal["ssh-config", "key", "host-key", "install-key", "project-config", "doctor"]
# todo: will change something; done: nothing to do; check: looked at when applied; blocked: cannot go on
StepState = Literal["todo", "done", "check", "blocked"]
Outcome = Literal["changed", "unchanged", "skipped", "manual", "failed", "ok"]
HostKeyState = Literal["already-known", "unknown", "changed"]
Login = Literal["ok", "password", "paste", "unknown"]  # unknown: looked at when applied


class AliasTaken(UsageError):
    """The alias names another box in the ssh config already (init never edits a block)."""


@dataclass(frozen=True)
class InitRequest:
    """What the user asked for (flags or answers); None where init is to find or default it."""

    alias: str
    hostname: str | None = None
    user: str | None = None
    port: int | None = None
    identity: str | None = None  # private key path; made when missing
    jump: str | None = None  # ProxyJump
    remote_dir: str | None = None
    data: tuple[str, ...] | None = None  # None: offer what is found
    passphrase: bool = True  # a new key gets a passphrase (typed at the terminal)


@dataclass
class Step:
    kind: StepKind
    state: StepState
    summary: str
    detail: str = ""  # what the user should see before agreeing: the block, the fingerprint, lines
    ask: str | None = None  # the consent question; None: needs none


@dataclass
class InitPlan:
    alias: str
    ssh_config: Path
    config_text: str | None  # the ssh config's new text; None: unchanged
    block: str | None  # the Host block added
    existing: list[HostLine]  # Host lines already naming the alias
    spec: HostSpec  # the alias as ssh will resolve it (with the block)
    key: str  # private key path
    key_exists: bool
    passphrase: bool
    host_key_name: str | None = None  # as known_hosts records it
    host_key_type: str | None = None
    fingerprint: str | None = None
    host_key_state: HostKeyState | None = None
    host_key_error: RemotedlError | None = None
    login: Login = "unknown"
    project: Project | None = None
    project_file: Path | None = None
    project_text: str | None = None  # new text of remotedl.toml; None: unchanged
    project_manual: str = ""  # lines to add by hand: for a pyproject.toml, or set otherwise there
    data_found: list[DataDir] = field(default_factory=list)
    data: tuple[str, ...] = ()
    steps: list[Step] = field(default_factory=list)

    def choose_passphrase(self, passphrase: bool) -> None:
        """Whether the key to be made gets a passphrase (asked once the plan knows one is made)."""
        self.passphrase = passphrase
        if not self.key_exists:
            self.step("key").summary = _keygen_summary(self.key, passphrase)

    def step(self, kind: StepKind) -> Step:
        return next(s for s in self.steps if s.kind == kind)

    @property
    def questions(self) -> list[Step]:
        return [s for s in self.steps if s.ask and s.state == "todo"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "ssh_config": str(self.ssh_config),
            "key": self.key,
            "host_key": {
                "type": self.host_key_type,
                "fingerprint": self.fingerprint,
                "state": self.host_key_state,
            },
            "project_file": str(self.project_file) if self.project_file else None,
            "data": list(self.data),
            "data_found": [asdict(d) for d in self.data_found],
            "steps": [asdict(s) for s in self.steps],
        }


@dataclass
class StepResult:
    kind: StepKind
    outcome: Outcome
    message: str
    detail: str = ""  # a line to paste on the box, lines to add by hand


@dataclass
class InitResult:
    alias: str
    steps: list[StepResult] = field(default_factory=list)
    doctor: DoctorReport | None = None
    next_command: str | None = None  # what to run now, when everything worked

    @property
    def complete(self) -> bool:
        return self.next_command is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "complete": self.complete,
            "steps": [asdict(s) for s in self.steps],
            "doctor": self.doctor.to_dict() if self.doctor else None,
            "next_command": self.next_command,
        }


# ------------------------------------------------------------------ planning


def default_ssh_config() -> Path:
    return passwd_home() / ".ssh" / "config"


def _keygen_summary(key: str, passphrase: bool) -> str:
    how = "with a passphrase (typed at the terminal)" if passphrase else "with no passphrase"
    return f"make a key {key} (ssh-keygen -t ed25519, {how})"


def _check_word(what: str, value: str | None) -> None:
    if value is not None and (not value or any(c.isspace() or c in "\"'#\\" for c in value)):
        raise UsageError(f"{what} {value!r} is not valid: no spaces or quotes", hint=f"check {what}")


def _default_key(existing: HostSpec | None) -> tuple[str, bool]:
    """(the key to use, whether it exists): the one the config names, else the first of the
    usual ones that exists, else ~/.ssh/id_ed25519 to be made."""
    if existing is not None and existing.sources.get("identityfile", "default") != "default":
        for k in existing.identity_files:
            if os.path.isfile(k):
                return k, True
        return existing.identity_files[0], False
    ssh_dir = passwd_home() / ".ssh"
    for name in DEFAULT_IDENTITIES:
        if (ssh_dir / name).is_file():
            return str(ssh_dir / name), True
    return str(ssh_dir / "id_ed25519"), False


def host_block(req: InitRequest, key: str) -> str:
    """The commented ``Host`` block for the request."""
    lines = [
        f"# {req.alias}: a GPU box, added by `remotedl init` (ssh {req.alias}; remotedl --host {req.alias})",
        f"Host {req.alias}",
        f"    HostName {config_value(req.hostname or req.alias)}",
        f"    User {config_value(req.user or getpass.getuser())}",
    ]
    if req.port is not None and req.port != 22:
        lines.append(f"    Port {req.port}")
    lines.append(f"    IdentityFile {config_value(home_relative(key))}")
    lines.append("    IdentitiesOnly yes")
    if req.jump:
        lines.append(f"    ProxyJump {config_value(req.jump)}")
    lines += [
        "    # notice a dead link (sleep, a Wi-Fi change) within ~45 s",
        "    ServerAliveInterval 15",
        "    ServerAliveCountMax 3",
    ]
    return "\n".join(lines) + "\n"


def _resolve_text(
    env: Environment, alias: str, text: str, real: Path, tmp: Path
) -> tuple[HostSpec, HostSpec]:
    """``alias`` as ssh resolves it under a config file holding ``text``: (the spec reading a
    private copy in ``tmp``, for probes while planning; the same spec naming ``real``). Relative
    Includes resolve in ~/.ssh for both, as OpenSSH does for a user's config file."""
    path = tmp / "config"
    path.write_text(text)
    spec = resolve_host(env, alias, ssh_config=str(path))
    sources = {k: v.replace(str(path), str(real)) for k, v in spec.sources.items()}
    return spec, replace(spec, ssh_config=real, sources=sources)


def _conflicts(spec: HostSpec, req: InitRequest) -> list[str]:
    named = spec.sources.get("identityfile", "default") != "default"
    key = expand_user_path(req.identity) if req.identity else None
    wanted = {
        "HostName": (req.hostname, spec.hostname),
        "User": (req.user, spec.user),
        "Port": (None if req.port is None else str(req.port), str(spec.port)),
        "ProxyJump": (req.jump, spec.proxy_jump),
        "IdentityFile": (
            key if named else None,
            key if key in spec.identity_files else spec.identity_files[0],
        ),
    }
    return [
        f"{k} {have or 'none'} (not {want})" for k, (want, have) in wanted.items() if want and want != have
    ]


def plan_init(
    env: Environment, req: InitRequest, *, ssh_config: Path | None = None, project: Project | None = None
) -> InitPlan:
    """What ``apply_init`` would do for ``req``; changes nothing (it may connect to the box to
    learn its host key and whether the key logs in already)."""
    from remotedl.config import find_project

    _check_word("the alias", req.alias)
    if req.alias.startswith("-") or any(c in req.alias for c in "*?!,@"):
        raise UsageError(
            f"'{req.alias}' cannot be a host alias", hint="use letters, digits, '.', '-' and '_'"
        )
    _check_word("--hostname", req.hostname)
    _check_word("--user", req.user)
    _check_word("--jump", req.jump)
    if req.port is not None and not 0 < req.port < 65536:
        raise UsageError(f"--port {req.port} is not a port number")
    if req.remote_dir is not None:
        from remotedl.sync import normalize_remote_dir

        normalize_remote_dir(req.remote_dir)  # refused here, before any change, as push would
    config = ssh_config or default_ssh_config()
    with tempfile.TemporaryDirectory(prefix="remotedl-init-") as tmp:
        return _plan(env, req, config, project or find_project(env.cwd), Path(tmp))


def _plan(env: Environment, req: InitRequest, config: Path, project: Project, tmp: Path) -> InitPlan:
    text = config.read_text() if config.is_file() else None
    existing = find_host_lines(config, req.alias)
    steps: list[Step] = []
    block: str | None = None
    new_text: str | None = None
    if existing:
        spec = probe = resolve_host(env, req.alias, ssh_config=str(config))
        bad = _conflicts(spec, req)
        if bad:
            raise AliasTaken(
                f"Host {req.alias} is already in the ssh config ({existing[0]}) and says {', '.join(bad)}",
                hint="pick another alias for this box, or edit that block (init never changes one)",
            )
        key, key_exists = (expand_user_path(req.identity), False) if req.identity else _default_key(spec)
        key_exists = os.path.isfile(key)
        steps.append(
            Step(
                "ssh-config", "done", f"Host {req.alias} is in the ssh config ({existing[0]}): kept as it is"
            )
        )
    else:
        if not req.hostname:
            raise UsageError(
                f"Host {req.alias} is not in {config}: init needs the box's address",
                hint=f"pass --hostname ADDRESS (and --user, --port, --jump as needed), or run "
                f"`remotedl init {req.alias}` at a terminal to be asked",
            )
        key, key_exists = (expand_user_path(req.identity), False) if req.identity else _default_key(None)
        key_exists = os.path.isfile(key)
        block = host_block(req, key)
        new_text, line = with_block(text or "", req.alias, block)
        probe, spec = _resolve_text(env, req.alias, new_text, config, tmp)
        bad = _conflicts(spec, replace(req, user=req.user or getpass.getuser()))
        if bad:
            raise ConfigError(
                f"with a Host {req.alias} block added, ssh would still resolve {', '.join(bad)}: "
                f"an earlier line of {config} (or a file it includes) sets it first",
                hint="ssh takes the first value it reads: move that setting under a Host line, "
                "then run init again",
            )
        where = f"{config} (line {line})" if text is not None else f"{config} (a new file, mode 0600)"
        steps.append(
            Step(
                "ssh-config",
                "todo",
                f"add Host {req.alias} to {where}",
                block,
                f"Add this block to {config}?",
            )
        )
    plan = InitPlan(req.alias, config, new_text, block, existing, spec, key, key_exists, req.passphrase)
    plan.steps = steps
    if key_exists:
        steps.append(Step("key", "done", f"key {key} exists: used as it is"))
    else:
        steps.append(Step("key", "todo", _keygen_summary(key, req.passphrase)))
    _plan_host_key(plan, probe)
    _plan_login(env, plan)
    _plan_project(plan, req, project, env)
    steps.append(Step("doctor", "check", "run `remotedl doctor`: the whole chain, laptop to GPUs"))
    return plan


def _plan_host_key(plan: InitPlan, probe: HostSpec) -> None:
    from remotedl.ssh.hostkeys import fetch_host_key, trust_state

    try:
        name, key = fetch_host_key(probe)
    except RemotedlError as e:
        plan.host_key_error = e
        plan.steps.append(
            Step("host-key", "blocked", f"cannot learn the box's host key: {e.message}", e.hint or "")
        )
        return
    plan.host_key_name, plan.host_key_type, plan.fingerprint = name, key.key_type, key.fingerprint
    state = trust_state(plan.spec, name, key)
    plan.host_key_state = (
        "already-known" if state == "already-known" else "changed" if state == "changed" else "unknown"
    )
    shown = f"{key.key_type} {key.fingerprint}"
    if plan.host_key_state == "already-known":
        plan.steps.append(Step("host-key", "done", f"host key {shown} is already trusted"))
    elif plan.host_key_state == "changed":
        plan.host_key_error = HostKeyError(
            f"host key of {plan.spec.display} differs from the one recorded (now {shown})",
            hint=f"if the box was reinstalled, run `remotedl trust {plan.alias} --replace`; "
            "otherwise someone may be intercepting the connection",
            fingerprint=key.fingerprint,
        )
        plan.steps.append(
            Step("host-key", "blocked", plan.host_key_error.message, plan.host_key_error.hint or "")
        )
    else:
        where = plan.spec.known_hosts_files[0]
        plan.steps.append(
            Step(
                "host-key",
                "todo",
                f"record the host key {shown} in {where}",
                f"{plan.spec.display} offers host key {shown}\n"
                "compare it with the box's: `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there",
                "Trust this host key and record it in known_hosts?",
            )
        )


def _plan_login(env: Environment, plan: InitPlan) -> None:
    if plan.key_exists and plan.host_key_state == "already-known" and plan.config_text is None:
        try:
            plan.login = probe_login(env, plan.spec, plan.key)[0]
        except RemotedlError:
            plan.login = "unknown"
    if plan.login == "ok":
        plan.steps.append(Step("install-key", "done", f"the box lets {plan.spec.user} in with {plan.key}"))
    else:
        plan.steps.append(
            Step(
                "install-key",
                "check",
                f"put the public key on the box if it does not let {plan.spec.user} in with it yet "
                "(ssh-copy-id with the password once, or a line to paste there)",
            )
        )


# ------------------------------------------------------------------ remotedl.toml


def _plan_project(plan: InitPlan, req: InitRequest, project: Project, env: Environment) -> None:
    plan.project = project
    root = project.root
    if project.config_file is None and root in {Path(root.anchor), passwd_home(), env.home.resolve()}:
        # Not in a project (the home directory, /): no remotedl.toml there, and no data scan.
        summary = f"{root} is no project: no remotedl.toml written (run init again in a project's directory)"
        plan.steps.append(Step("project-config", "done", summary))
        return
    plan.data_found = find_data_dirs(root)
    plan.data = tuple(req.data) if req.data is not None else tuple(d.path for d in plan.data_found)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", root.name).strip("-.") or "project"
    # The default push would use (named after the project's identity, so every clone of it
    # shares the box's tree), written down where the user sees it.
    from remotedl.snapshot import known_identity
    from remotedl.treeid import default_remote_dir

    default = default_remote_dir(known_identity(root), name)
    wanted: dict[str, Any] = {"host": plan.alias, "remote_dir": req.remote_dir or default}
    if plan.data:
        wanted["data"] = list(plan.data)
    path = project.config_file or root / PROJECT_FILE
    plan.project_file = path
    if path.name == "pyproject.toml":
        plan.project_manual = "".join(f"{k} = {toml_value(v)}\n" for k, v in wanted.items())
        plan.steps.append(
            Step(
                "project-config",
                "check",
                f"{path} holds [tool.remotedl]: init does not edit it",
                plan.project_manual,
            )
        )
        return
    text = path.read_text() if path.is_file() else None
    header = "# remotedl settings for this project (see the README's Configuration section)\n"
    new, added, differ = edit_project_text(text if text is not None else header, wanted)
    if differ:
        plan.project_manual = "".join(f"{k} = {toml_value(wanted[k])}\n" for k in differ)
    if not added:
        kept = f"; it sets {', '.join(differ)} otherwise, kept" if differ else ""
        plan.steps.append(Step("project-config", "done", f"{path} is set up{kept}", plan.project_manual))
        return
    plan.project_text = new
    lines = "".join(f"{k} = {toml_value(wanted[k])}\n" for k in added)
    verb = f"add to {path}" if text is not None else f"write {path}"
    found = "".join(
        f"  ({d.path}: {d.why}; pushed with `remotedl push`)\n"
        for d in plan.data_found
        if d.path in plan.data
    )
    plan.steps.append(
        Step(
            "project-config",
            "todo",
            f"{verb}: {', '.join(added)}",
            lines + found,
            f"Write these settings to {path}?",
        )
    )


# ------------------------------------------------------------------ applying


def apply_init(
    env: Environment,
    plan: InitPlan,
    *,
    approved: set[StepKind],
    on_step: Callable[[StepResult], None] = lambda r: None,
    terminal: bool = False,
) -> InitResult:
    """Carry out ``plan``: the steps in ``approved`` that need consent, and the rest. Stops at
    the first step the next ones depend on that did not work; ``terminal``: ssh-keygen and ssh
    may ask the user for a passphrase or password there."""
    result = InitResult(plan.alias)

    def report(kind: StepKind, outcome: Outcome, message: str, detail: str = "") -> None:
        r = StepResult(kind, outcome, message, detail)
        result.steps.append(r)
        on_step(r)

    def declined(step: Step) -> bool:
        return step.ask is not None and step.state == "todo" and step.kind not in approved

    # ssh config
    step = plan.step("ssh-config")
    if step.state == "done":
        report("ssh-config", "unchanged", step.summary)
    elif declined(step):
        report("ssh-config", "skipped", f"Host {plan.alias} not added: nothing more done")
        return result
    else:
        assert plan.config_text is not None
        current = plan.ssh_config.read_text() if plan.ssh_config.is_file() else ""
        if find_host_lines(plan.ssh_config, plan.alias):
            report(
                "ssh-config", "unchanged", f"Host {plan.alias} appeared in {plan.ssh_config} meanwhile: kept"
            )
        else:
            new, _ = with_block(current, plan.alias, plan.block or "")
            write_file(plan.ssh_config, new, new_mode=0o600)
            report("ssh-config", "changed", f"added Host {plan.alias} to {plan.ssh_config}")
    spec = resolve_host(env, plan.alias, ssh_config=str(plan.ssh_config))

    # key
    key = plan.key
    if not os.path.isfile(key):
        if plan.passphrase and not terminal:
            raise UsageError(
                f"a new key {key} needs a passphrase typed at a terminal",
                hint="run init at a terminal, or pass --no-passphrase for a key without one",
            )
        Path(key).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        comment = f"{getpass.getuser()}@{socket.gethostname()} remotedl {plan.alias}"
        argv = ["ssh-keygen", "-q", "-t", "ed25519", "-f", key, "-C", comment]
        if not plan.passphrase:
            argv += ["-N", ""]
        r = proc.run(argv, check=False, capture=not terminal, env=ssh_env(env))
        if r.returncode != 0 or not os.path.isfile(key):
            report("key", "failed", f"ssh-keygen could not make {key}", (r.stderr or "").strip())
            return result
        report("key", "changed", f"made the key {key}" + (" (with a passphrase)" if plan.passphrase else ""))
        if plan.passphrase and env.environ.get("SSH_AUTH_SOCK"):
            proc.run(["ssh-add", key], check=False, capture=not terminal, env=ssh_env(env))
    else:
        report("key", "unchanged", f"key {key} exists")

    # host key
    step = plan.step("host-key")
    if step.state == "blocked":
        assert plan.host_key_error is not None
        report("host-key", "failed", plan.host_key_error.message, plan.host_key_error.hint or "")
        raise plan.host_key_error
    if step.state == "done":
        report("host-key", "unchanged", step.summary)
    elif declined(step):
        report(
            "host-key",
            "skipped",
            "host key not recorded: the box cannot be reached safely, nothing more done",
        )
        return result
    else:
        from remotedl.ssh.hostkeys import trust_host

        t = trust_host(spec, expect=plan.fingerprint)
        report(
            "host-key", "changed", f"recorded host key {t.key_type} {t.fingerprint} in {t.known_hosts_file}"
        )

    # key on the box
    on_box = install_key(env, spec, key, terminal)
    report("install-key", on_box.outcome, on_box.message, on_box.detail)
    if not on_box.logs_in:
        return result

    # remotedl.toml
    step = plan.step("project-config")
    if step.state == "done":
        report("project-config", "unchanged", step.summary, plan.project_manual)
    elif step.state == "check" or declined(step):
        why = "add these lines by hand" if step.state == "check" else "not written"
        report(
            "project-config",
            "manual" if step.state == "check" else "skipped",
            f"{plan.project_file}: {why}",
            plan.project_manual,
        )
    else:
        assert plan.project_file is not None
        assert plan.project_text is not None
        write_file(plan.project_file, plan.project_text)
        report("project-config", "changed", f"wrote {step.summary.split(': ', 1)[-1]} to {plan.project_file}")

    # doctor
    result.doctor = _doctor(env, plan)
    doc = result.doctor
    said = "\n".join(
        f"{c.status}: {c.name}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else "")
        for c in doc.checks
        if c.status in ("fail", "warn")
    )
    counts = f"{plural(doc.count('ok'), 'check')} ok, {plural(doc.count('warn'), 'warning')}"
    if doc.count("fail"):
        report("doctor", "failed", f"doctor: {plural(doc.count('fail'), 'check')} failed, {counts}", said)
    else:
        report("doctor", "ok", f"doctor: {counts}", said)
        host = (
            ""
            if plan.project_file is not None and host_is(plan.project_file, plan.alias)
            else f"--host {plan.alias} "
        )
        result.next_command = f"remotedl {host}run train.py --gpu 0"
    return result


def _doctor(env: Environment, plan: InitPlan) -> DoctorReport:
    from remotedl import doctor
    from remotedl.config import load_settings

    flags: dict[str, Any] = {"host": plan.alias}
    if plan.ssh_config != default_ssh_config():
        flags["ssh_config"] = str(plan.ssh_config)
    try:
        settings = load_settings(env, flags).for_host(plan.alias)
    except RemotedlError as e:
        report = DoctorReport(plan.alias)
        report.add("laptop", "settings", "fail", e.message, e.hint or "")
        return report
    return doctor.run_checks(
        env,
        settings,
        plan.alias,
        spec_factory=lambda: resolve_host(
            env,
            plan.alias,
            ssh_config=str(plan.ssh_config),
            connect_timeout=float(settings.get("connect_timeout")),
        ),
        remote_dir=settings.remote_dir,
    )
