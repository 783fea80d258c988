"""Playbooks: YAML lists of named steps that make a box so, run over SSH (fabric).

A step::

    - name: tmux is installed          # required, unique in the playbook
      when: command -v apt-get         # optional: shell; the step is skipped unless it exits 0
      check: command -v tmux           # optional: shell; exit 0 means "already so": nothing to do
      run: apt-get install -y tmux     # optional: shell; makes it so (not run with --check)
      sudo: true                       # optional: check/run/commit/rollback through `sudo -n`
      report: true                     # optional: show the check's output (facts, versions)
      prove_login: "{{ test_port }}"   # optional: after run, log in again on this box port
      commit: ...                      #   ... with the same key and host key; then commit,
      rollback: ...                    #   ... or, if that login fails, rollback and fail

A step with ``run`` is ``changed`` when its check failed and run made the check pass (re-checked),
``ok`` when the check passed, ``skipped`` when ``when`` failed, ``failed`` otherwise; a failed
step stops the playbook. A step with only ``check`` is a test: ok or failed. Variables
(``{{ name }}``) come from the playbook's ``vars``, then ``[playbook_vars]`` in the project
config, then ``--var NAME=VALUE``; each value is shell-quoted where it is put.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.errors import ConfigError, UsageError
from remotedl.ssh import Box

STEP_KEYS = {"name", "when", "check", "run", "sudo", "report", "prove_login", "commit", "rollback"}
TOP_KEYS = {"name", "description", "vars", "steps"}
_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


@dataclass
class Step:
    name: str
    line: int
    when: str | None = None
    check: str | None = None
    run: str | None = None
    sudo: bool = False
    report: bool = False
    prove_login: str | None = None
    commit: str | None = None
    rollback: str | None = None


@dataclass
class Playbook:
    name: str
    path: Path
    description: str
    vars: dict[str, str]
    steps: list[Step]


@dataclass
class StepResult:
    name: str
    status: str  # ok, changed, would-change, failed, skipped
    output: str = ""
    seconds: float = 0.0


@dataclass
class PlaybookResult:
    playbook: str
    steps: list[StepResult] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.steps if s.status == status)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "summary": {k: self.count(k) for k in ("ok", "changed", "would-change", "failed", "skipped")},
        }


# ------------------------------------------------------------------ loading


def _err(path: Path, node: Any, message: str) -> ConfigError:
    line = node.start_mark.line + 1 if node is not None else 1
    return ConfigError(f"{path}:{line}: {message}", hint="see README 'Playbooks' for the format")


def _scalar(path: Path, node: Any, what: str) -> str:
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise _err(path, node, f"{what} must be a string")
    return str(node.value)


def _bool(path: Path, node: Any, what: str) -> bool:
    value = _scalar(path, node, what).lower()
    if value not in ("true", "false", "yes", "no"):
        raise _err(path, node, f"{what} must be true or false")
    return value in ("true", "yes")


def load(path: Path) -> Playbook:
    """Parse and validate a playbook; every error names the file and line."""
    import yaml

    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"cannot read playbook {path}: {e.strerror}") from e
    if not isinstance(root, yaml.MappingNode):
        raise _err(path, root, "a playbook is a mapping with 'steps'")
    top = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _) in top.items():
        if key not in TOP_KEYS:
            raise _err(path, knode, f"unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})")
    if "steps" not in top:
        raise _err(path, root, "no 'steps'")
    variables: dict[str, str] = {}
    if "vars" in top:
        vnode = top["vars"][1]
        if not isinstance(vnode, yaml.MappingNode):
            raise _err(path, vnode, "'vars' must be a mapping")
        for k, v in vnode.value:
            variables[str(k.value)] = _scalar(path, v, f"var {k.value}")
    snode = top["steps"][1]
    if not isinstance(snode, yaml.SequenceNode) or not snode.value:
        raise _err(path, snode, "'steps' must be a non-empty list")
    steps: list[Step] = []
    names: set[str] = set()
    for item in snode.value:
        if not isinstance(item, yaml.MappingNode):
            raise _err(path, item, "each step is a mapping with at least 'name'")
        fields = {k.value: (k, v) for k, v in item.value}
        for key, (knode, _) in fields.items():
            if key not in STEP_KEYS:
                raise _err(
                    path, knode, f"unknown key '{key}' in a step (known: {', '.join(sorted(STEP_KEYS))})"
                )
        if "name" not in fields:
            raise _err(path, item, "a step needs a 'name'")
        step = Step(_scalar(path, fields["name"][1], "name"), item.start_mark.line + 1)
        if step.name in names:
            raise _err(path, fields["name"][1], f"two steps are called '{step.name}'")
        names.add(step.name)
        for key in ("when", "check", "run", "prove_login", "commit", "rollback"):
            if key in fields:
                setattr(step, key, _scalar(path, fields[key][1], key))
        for key in ("sudo", "report"):
            if key in fields:
                setattr(step, key, _bool(path, fields[key][1], key))
        if step.check is None and step.run is None:
            raise _err(path, item, f"step '{step.name}' has neither 'check' nor 'run'")
        if step.prove_login and not (step.run and step.commit and step.rollback):
            raise _err(path, item, f"step '{step.name}': prove_login needs run, commit and rollback")
        steps.append(step)
    name = _scalar(path, top["name"][1], "name") if "name" in top else path.stem
    desc = _scalar(path, top["description"][1], "description") if "description" in top else ""
    return Playbook(name, path, desc, variables, steps)


def shipped_dir() -> Path:
    """The playbooks that come with remotedl (installed package, or the source tree)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "playbooks", here.parent / "playbooks"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    return here / "playbooks"


def find(name: str, project_root: Path) -> Path:
    """A playbook by file path, or by name: the project's playbooks/ first, then remotedl's."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and (project_root / p).is_file():
        return project_root / p
    if p.is_absolute() and p.is_file():
        return p
    for d in (project_root / "playbooks", shipped_dir()):
        for ext in (".yaml", ".yml"):
            if (d / f"{name}{ext}").is_file():
                return d / f"{name}{ext}"
    known = sorted(
        {q.stem for d in (project_root / "playbooks", shipped_dir()) if d.is_dir() for q in d.glob("*.y*ml")}
    )
    raise UsageError(f"no playbook '{name}'", hint=f"available: {', '.join(known) or 'none'}")


def render(text: str, variables: Mapping[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in variables:
            raise ConfigError(f"{where}: variable '{key}' is not set", hint=f"pass --var {key}=VALUE")
        return shlex.quote(variables[key])

    return _VAR.sub(sub, text)


# ------------------------------------------------------------------ running


Prove = Callable[[int], str | None]  # port -> None if a login worked, else why not


# "$1": the step's script. root needs no sudo; anyone else must have it without a password (-n).
_AS_ROOT = 'if [ "$(id -u)" = 0 ]; then exec sh -c "$1"; else exec sudo -n sh -c "$1"; fi'
_CAN_ROOT = '[ "$(id -u)" = 0 ] && echo root || { sudo -n true 2>/dev/null && echo sudo || echo none; }'


def run_playbook(
    box: Box,
    book: Playbook,
    variables: Mapping[str, str],
    *,
    check_only: bool = False,
    prove: Prove | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> PlaybookResult:
    import time

    values = {**book.vars, **variables}
    result = PlaybookResult(book.name)
    can_root: list[str] = []  # "root", "sudo" or "none", asked once, when first needed

    def root_way() -> str:
        if not can_root:
            can_root.append(box.run(_CAN_ROOT, check=False).stdout.strip() or "none")
        return can_root[0]

    def sh(script: str | None, step: Step, key: str, *, as_root: bool = False) -> tuple[int, str]:
        assert script is not None
        text = render(script, values, f"{book.path}:{step.line} ({key})")
        r = box.run(_AS_ROOT, text, check=False) if as_root else box.run(text, check=False)
        out = (r.stdout + r.stderr).strip()
        if as_root and r.exit_code != 0 and "a password is required" in r.stderr:
            out += "\n(sudo needs a password on the box: allow these commands with NOPASSWD, or run as root)"
        return r.exit_code, out

    def check(step: Step) -> tuple[int, str]:
        # Looking needs no root: a check runs as the user. Only where it fails, a step that
        # changes things as root checks again as root (some facts only root can read).
        code, out = sh(step.check, step, "check")
        if code != 0 and step.sudo and root_way() == "sudo":
            code, out = sh(step.check, step, "check", as_root=True)
        return code, out

    def needs_root(step: Step) -> str | None:
        if not step.sudo or root_way() != "none":
            return None
        text = render(step.run or "", values, f"{book.path}:{step.line} (run)")
        return (
            f"this step needs root, and {box.spec.user} may not use sudo without a password on "
            f"{box.spec.alias}; run it there as root:\n{text.strip()}"
        )

    for step in book.steps:
        t0 = time.perf_counter()

        def done(status: str, output: str = "", *, _step: Step = step, _t0: float = t0) -> StepResult:
            res = StepResult(_step.name, status, output, time.perf_counter() - _t0)
            result.steps.append(res)
            if on_step is not None:
                on_step(res)
            return res

        if step.when is not None and sh(step.when, step, "when")[0] != 0:
            done("skipped")
            continue
        if step.check is not None:
            code, out = check(step)
            if code == 0:
                done("ok", out if step.report else "")
                continue
            if step.run is None:
                done("failed", out)
                break
        if check_only:
            done("would-change")
            continue
        why_not = needs_root(step)
        if why_not is not None:
            done("failed", why_not)
            break
        code, out = sh(step.run, step, "run", as_root=step.sudo)
        if code != 0:
            done("failed", out)
            break
        if step.prove_login:
            port = int(render(step.prove_login, values, f"{book.path}:{step.line}").strip("'"))
            why = prove(port) if prove is not None else "no way to test a login"
            if why is not None:
                rb_code, rb_out = sh(step.rollback, step, "rollback", as_root=step.sudo)
                done(
                    "failed",
                    f"a second login with the new settings failed ({why}); rolled back"
                    + ("" if rb_code == 0 else f"; ROLLBACK FAILED: {rb_out}"),
                )
                break
            code, out2 = sh(step.commit, step, "commit", as_root=step.sudo)
            if code != 0:
                done("failed", out2)
                break
            out = "\n".join(x for x in (out, out2) if x)
        if step.check is not None:
            code, again = check(step)
            if code != 0:
                done("failed", f"ran, but the check still fails: {again or out}")
                break
        done("changed", out if step.report else "")
    return result


class _ProcSocket:
    """A socket-like end of ``ssh -W host:port`` (through the master connection), for
    paramiko: reads time out the way paramiko's transport expects of a socket."""

    def __init__(self, argv: list[str]) -> None:
        import subprocess

        from remotedl import proc

        self.process = proc.popen(argv, stdin=subprocess.PIPE, stderr=subprocess.DEVNULL, text=False)
        self.timeout: float | None = None
        self._closed = False  # paramiko reads this name, as on its own ProxyCommand

    @property
    def closed(self) -> bool:
        return self._closed

    def send(self, data: bytes) -> int:
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()
        return len(data)

    def recv(self, size: int) -> bytes:
        import os
        import select

        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], self.timeout)
        if not ready:
            raise TimeoutError()
        return os.read(fd, size)

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.process.kill()
            self.process.wait()


def login_prover(box: Box) -> Prove:
    """Prove that a fresh login works on ``port`` of the box: a second SSH login (paramiko, in
    this process), carried by ``ssh -W`` over the open connection to 127.0.0.1:port, with the
    same user and key, and the box's recorded host key required."""

    def prove(port: int) -> str | None:
        import base64

        import paramiko

        from remotedl.ssh.hostkeys import known_keys
        from remotedl.ssh.openssh import openssh_options

        spec = box.spec
        sock = _ProcSocket(["ssh", *openssh_options(spec), "-W", f"127.0.0.1:{port}", "--", spec.alias])
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        lookup = spec.hostname if spec.port == 22 else f"[{spec.hostname}]:{spec.port}"
        for k in known_keys(spec):
            try:
                key = paramiko.PKey.from_type_string(k.key_type, base64.b64decode(k.blob))
            except Exception:  # noqa: S112 - a key type paramiko lacks: try the others
                continue
            client.get_host_keys().add(lookup, k.key_type, key)
        key_files = [p for p in spec.identity_files if Path(p).is_file()]
        try:
            client.connect(
                spec.hostname,
                port=spec.port,
                username=spec.user,
                key_filename=key_files,  # type: ignore[arg-type]  # paramiko takes a list too
                look_for_keys=False,
                allow_agent=not spec.identities_only,
                sock=sock,  # type: ignore[arg-type]  # socket-like, as paramiko's ProxyCommand
                timeout=spec.connect_timeout,
                banner_timeout=spec.connect_timeout,
                auth_timeout=spec.connect_timeout,
            )
            _, stdout, _ = client.exec_command("echo remotedl-login-ok", timeout=spec.connect_timeout)
            if stdout.read().strip() != b"remotedl-login-ok":
                return "the login did not run a command"
            return None
        except paramiko.BadHostKeyException:
            return "the server on that port offered another host key"
        except paramiko.AuthenticationException:
            return "the key was refused"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            client.close()
            sock.close()

    return prove


def check_vars(values: Mapping[str, str]) -> None:
    for k in values:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UsageError(f"variable name '{k}' is not valid")
