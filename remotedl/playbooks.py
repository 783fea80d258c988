"""Playbooks: YAML lists of named steps that make a box so, run over SSH (the channel).

A step::

    - name: tmux is installed          # required, unique in the playbook
      when: command -v apt-get         # optional: shell; the step is skipped unless it exits 0
      check: command -v tmux           # optional: shell; exit 0 means "already so": nothing to do
      run: apt-get install -y tmux     # optional: shell; makes it so (not run with --check)
      sudo: true                       # optional: check/run/commit/rollback through `sudo -n`
      report: true                     # optional: show the check's output (facts, versions)
      prove_login: "{{ test_port }}"   # optional: after run, log in again on this box port
      commit: ...                      #   ... with the same key and host key, to a server whose
      rollback: ...                    #   ... Banner shows "remotedl-proof {{ login_nonce }}";
                                       #   then commit, or (also if run failed) rollback and fail

A step with ``run`` is ``changed`` when its check failed and run made the check pass (re-checked),
``ok`` when the check passed, ``skipped`` when ``when`` failed, ``failed`` otherwise; a failed
step stops the playbook. A step with only ``check`` is a test: ok or failed. Variables
(``{{ name }}``) come from the playbook's ``vars``, then ``[playbook_vars]`` in the project
config, then ``--var NAME=VALUE``. They are data: a script gets them as shell variables from
its positional parameters, and ``{{ name }}`` is a quoted reference to one (``template``).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from remotedl.errors import ConfigError, RemoteError, UsageError
from remotedl.ssh import Box
from remotedl.ssh.channel import EXPAND_HOME

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
    # A step that needs root where the user may not sudo: the commands to run there as root,
    # whole, as they can be pasted (``output`` says why).
    as_root: str = ""


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
                vnode = fields[key][1]
                setattr(step, key, _scalar(path, vnode, key))
                if key != "prove_login":  # shell: every {{ name }} must stand where it expands
                    block = 1 if getattr(vnode, "style", None) in ("|", ">") else 0
                    template(getattr(step, key), str(path), vnode.start_mark.line + 1 + block)
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


@dataclass(frozen=True)
class Origin:
    """Whose playbook a file is, and why running it needs ``remotedl allow`` ("" when not)."""

    whose: str  # "project", "shipped" or "yours" (a file outside the project the user named)
    needs_allow: str


def origin(book: Playbook, project_root: Path) -> Origin:
    """A project's playbook is the project author's code run on the box as the user: one that
    takes the name of a shipped playbook (``setup base`` would run it instead) or runs steps as
    root needs the user's ``allow``."""
    path = book.path.resolve()
    if path.parent == shipped_dir().resolve():
        return Origin("shipped", "")
    if not path.is_relative_to(project_root.resolve()):
        return Origin("yours", "")
    why = []
    if any((shipped_dir() / f"{path.stem}{ext}").is_file() for ext in (".yaml", ".yml")):
        why.append(f"it replaces the shipped playbook '{path.stem}'")
    if any(step.sudo for step in book.steps):
        why.append("it runs steps as root (sudo: true)")
    return Origin("project", " and ".join(why))


def risky_project_playbooks(project_root: Path) -> list[Path]:
    """The project's playbooks (``playbooks/``) that need ``allow``, sorted; one that does not
    parse runs nothing and is left out."""
    d = project_root / "playbooks"
    out = []
    for path in sorted(d.glob("*.y*ml")) if d.is_dir() else []:
        try:
            book = load(path)
        except ConfigError:
            continue
        if origin(book, project_root).needs_allow:
            out.append(path)
    return out


# ------------------------------------------------------------------ variables
#
# A step's script never holds a value. ``{{ name }}`` becomes a reference to the shell variable
# ``__v_name``, quoted for where it stands: ``"${__v_name}"`` in plain shell text (one word),
# ``${__v_name}`` inside double quotes and in the body of a here-document (expanded once, never
# evaluated). The values travel as the script's positional parameters and are assigned to those
# variables before the script's first line. Where the shell would not expand a reference (inside
# single quotes, in a here-document with a quoted delimiter, in arithmetic) the reference is an
# error, not a silent change of meaning. ``eval {{ var }}`` runs a command line held in a variable.

_PREFIX = "__v_"
_BREAKS = set(" \t\n;&|()<>")


@dataclass(frozen=True)
class Script:
    """A step's script with its variables as references, and the names they refer to, in the
    order of their positional parameters."""

    text: str
    names: tuple[str, ...]

    def prelude(self) -> str:
        """Assigns the positional values to the variables; on the script's first line, so the
        shell's line numbers stay the playbook's."""
        sets = "".join(f"{_PREFIX}{n}=${{{i}}}; " for i, n in enumerate(self.names, 1))
        return f"{sets}set --; " if sets else ""

    def code(self) -> str:
        return self.prelude() + self.text

    def values(self, variables: Mapping[str, str], where: str) -> list[str]:
        missing = [n for n in self.names if n not in variables]
        if missing:
            key = missing[0]
            raise ConfigError(f"{where}: variable '{key}' is not set", hint=f"pass --var {key}=VALUE")
        return [variables[n] for n in self.names]

    def shown(self, variables: Mapping[str, str]) -> str:
        """The script as a person can paste it into a shell: assignments, then the text."""
        sets = "".join(f"{_PREFIX}{n}={shlex.quote(variables.get(n, ''))}\n" for n in self.names)
        return sets + self.text.strip()


def _misplaced(name: str, where: str, why: str) -> ConfigError:
    return ConfigError(
        f"{where}: {{{{ {name} }}}} stands {why}",
        hint="put it in plain shell text or in double quotes; see README 'Playbooks' (variables)",
    )


def template(text: str, where: str, first_line: int | None = None) -> Script:
    """``text`` with each ``{{ name }}`` replaced by a reference quoted for its place (a small
    POSIX sh lexer: quotes, ``$( )``, backquotes, comments, here-documents). An error names
    ``where``, or with ``first_line`` (the file's line of the text's first) ``where:LINE``."""

    def at(pos: int) -> str:
        return where if first_line is None else f"{where}:{first_line + text.count(chr(10), 0, pos)}"

    out: list[str] = []
    names: list[str] = []
    # Frames: ("sh", depth) plain shell (the script, or inside $( ) when depth counts its
    # parentheses), ("bq",) backquotes, ("dq",) double quotes, ("ar", depth) $(( )),
    # ("hd", delimiter, strip_tabs, quoted) a here-document's body.
    stack: list[tuple[Any, ...]] = [("top", 0)]
    pending: list[tuple[str, bool, bool]] = []  # here-documents that start after this line
    word_start = True
    line_start = True
    i, n = 0, len(text)

    def ref(name: str, kind: str) -> str:
        if kind == "ar":
            raise _misplaced(name, at(i), "in $(( )), where the shell would evaluate its value as code")
        if name not in names:
            names.append(name)
        return f"${{{_PREFIX}{name}}}" if kind in ("dq", "hd") else f'"${{{_PREFIX}{name}}}"'

    while i < n:
        frame = stack[-1]
        kind = frame[0]
        if kind == "hd" and line_start:
            end = text.find("\n", i)
            line = text[i : n if end < 0 else end]
            if (line.lstrip("\t") if frame[2] else line) == frame[1]:
                out.append(line)
                i += len(line)
                stack.pop()
                line_start = False
                continue
            if frame[3]:  # quoted delimiter: the body is literal text
                m = _VAR.search(line)
                if m:
                    why = f"in a here-document with a quoted delimiter ({frame[1]}): never expanded"
                    raise _misplaced(m.group(1), at(i), why)
                out.append(line + ("\n" if end >= 0 else ""))
                i += len(line) + 1
                continue
        line_start = False
        m = _VAR.match(text, i)
        if m:
            out.append(ref(m.group(1), "sh" if kind == "top" else kind))
            i = m.end()
            word_start = False
            continue
        c = text[i]
        if c == "\\":
            out.append(text[i : i + 2])
            i += 2
            word_start = False
            continue
        if kind in ("top", "sh", "bq", "ar"):
            if c == "'":
                end = text.find("'", i + 1)
                end = n - 1 if end < 0 else end
                literal = text[i : end + 1]
                m = _VAR.search(literal)
                if m:
                    why = "inside single quotes, where it is never expanded"
                    raise _misplaced(m.group(1), at(i + m.start()), why)
                out.append(literal)
                i = end + 1
                word_start = False
                continue
            if c == "#" and word_start and kind != "ar":
                end = text.find("\n", i)
                end = n if end < 0 else end
                out.append(text[i:end])  # a comment: copied as it is
                i = end
                continue
            if text.startswith("$((", i):
                stack.append(("ar", 0))
                out.append("$((")
                i += 3
                word_start = False
                continue
            if text.startswith("$(", i):
                stack.append(("sh", 0))
                out.append("$(")
                i += 2
                word_start = True
                continue
            if c == '"':
                stack.append(("dq",))
            elif c == "`":
                if kind == "bq":
                    stack.pop()
                else:
                    stack.append(("bq",))
            elif c == "(" and kind in ("sh", "ar"):
                stack[-1] = (kind, frame[1] + 1)
            elif c == ")" and kind == "sh":
                if frame[1] == 0:
                    stack.pop()
                else:
                    stack[-1] = ("sh", frame[1] - 1)
            elif c == ")" and kind == "ar":
                if frame[1] == 0 and text.startswith("))", i):
                    stack.pop()
                    out.append("))")
                    i += 2
                    continue
                if frame[1] > 0:
                    stack[-1] = ("ar", frame[1] - 1)
            elif text.startswith("<<", i) and kind != "ar" and not text.startswith("<<<", i):
                j = i + 2
                strip = text.startswith("-", j)
                j += 1 if strip else 0
                while j < n and text[j] in " \t":
                    j += 1
                delim, quoted = [], False
                while j < n and text[j] not in _BREAKS:
                    if text[j] in "'\"":
                        q = text[j]
                        end = text.find(q, j + 1)
                        end = n - 1 if end < 0 else end
                        delim.append(text[j + 1 : end])
                        quoted = True
                        j = end + 1
                    elif text[j] == "\\":
                        delim.append(text[j + 1 : j + 2])
                        quoted = True
                        j += 2
                    else:
                        delim.append(text[j])
                        j += 1
                pending.append(("".join(delim), strip, quoted))
                out.append(text[i:j])
                i = j
                word_start = False
                continue
            elif c == "\n" and pending:
                out.append(c)
                i += 1
                for delim_, strip_, quoted_ in reversed(pending):
                    stack.append(("hd", delim_, strip_, quoted_))
                pending.clear()
                line_start = True
                word_start = True
                continue
            out.append(c)
            i += 1
            word_start = c in _BREAKS
            continue
        # double quotes, or a here-document's body
        if kind == "dq" and c == '"':
            stack.pop()
        elif text.startswith("$((", i):
            stack.append(("ar", 0))
            out.append("$((")
            i += 3
            continue
        elif text.startswith("$(", i):
            stack.append(("sh", 0))
            out.append("$(")
            i += 2
            word_start = True
            continue
        elif c == "`":
            stack.append(("bq",))
        out.append(c)
        i += 1
        line_start = kind == "hd" and c == "\n"
        word_start = False
    return Script("".join(out), tuple(names))


def substitute(text: str, variables: Mapping[str, str], where: str) -> str:
    """Plain text with the values put in (for fields that are not shell, e.g. prove_login)."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in variables:
            raise ConfigError(f"{where}: variable '{key}' is not set", hint=f"pass --var {key}=VALUE")
        return variables[key]

    return _VAR.sub(sub, text)


def pack(script: str, values: Sequence[str]) -> bytes:
    """A script and its values as ``_READ`` takes them from stdin: length-prefixed bytes."""
    body = script.encode()
    parts = [f"{len(body)}\n".encode(), body, f"{len(values)}\n".encode()]
    for v in values:
        raw = v.encode("utf-8", "surrogateescape")
        parts += [f"{len(raw)}\n".encode(), raw]
    return b"".join(parts)


# ------------------------------------------------------------------ running


Prove = Callable[[int, str], str | None]  # (port, nonce) -> None if a login proved it, else why not

# "$1": _READ. root needs no sudo; anyone else must have it without a password (-n).
_AS_ROOT = 'if [ "$(id -u)" = 0 ]; then exec sh -c "$1"; else exec sudo -n sh -c "$1"; fi'
_CAN_ROOT = '[ "$(id -u)" = 0 ] && echo root || { sudo -n true 2>/dev/null && echo sudo || echo none; }'
# Runs, as root, a script and its values read from stdin (``pack``): neither is ever in argv.
_READ = r"""read -r _n; _s=$(dd bs=1 count="$_n" 2>/dev/null; echo .); _s=${_s%.}
read -r _c; set --
while [ "$#" -lt "$_c" ]; do
  read -r _l; _v=$(dd bs=1 count="$_l" 2>/dev/null; echo .); set -- "$@" "${_v%.}"
done
unset _n _c _l _v
eval "$_s"
"""


@dataclass(frozen=True)
class StepEvent:
    """A step has started (``run_playbook``'s ``on_begin``): what a status line shows."""

    playbook: str
    step: str
    index: int  # 1-based
    total: int


def run_playbook(
    box: Box,
    book: Playbook,
    variables: Mapping[str, str],
    *,
    check_only: bool = False,
    prove: Prove | None = None,
    on_step: Callable[[StepResult], None] | None = None,
    on_begin: Callable[[StepEvent], None] | None = None,
) -> PlaybookResult:
    """Run ``book``'s steps in order on ``box``; ``on_begin`` hears when each step starts,
    ``on_step`` when it ended (with its result)."""
    import secrets
    import time

    values = {**book.vars, **variables}
    result = PlaybookResult(book.name)
    can_root: list[str] = []  # "root", "sudo" or "none", asked once, when first needed

    def root_way() -> str:
        if not can_root:
            can_root.append(box.run(_CAN_ROOT, check=False).stdout.strip() or "none")
        return can_root[0]

    def script(step: Step, key: str) -> tuple[Script, str]:
        where = f"{book.path}:{step.line} ({key})"
        return template(getattr(step, key) or "", where), where

    def sh(step: Step, key: str, step_values: Mapping[str, str], *, as_root: bool = False) -> tuple[int, str]:
        s, where = script(step, key)
        args = s.values(step_values, where)
        if as_root:
            r = box.run(_AS_ROOT, _READ, stdin=pack(s.code(), args), check=False)
        else:
            r = box.run(s.code(), *args, check=False)
        out = (r.stdout + r.stderr).strip()
        if as_root and r.exit_code != 0 and "a password is required" in r.stderr:
            out += "\n(sudo needs a password on the box: allow these commands with NOPASSWD, or run as root)"
        return r.exit_code, out

    for index, step in enumerate(book.steps, 1):
        if on_begin is not None:
            on_begin(StepEvent(book.name, step.name, index, len(book.steps)))
        t0 = time.perf_counter()
        # A step that proves a login tells its run script a fresh nonce to show in the test
        # server's Banner: the login then knows it reached that server, not another.
        step_values = {**values, "login_nonce": secrets.token_hex(16)} if step.prove_login else values

        def done(
            status: str, output: str = "", *, as_root: str = "", _step: Step = step, _t0: float = t0
        ) -> StepResult:
            res = StepResult(_step.name, status, output, time.perf_counter() - _t0, as_root)
            result.steps.append(res)
            if on_step is not None:
                on_step(res)
            return res

        def check(_step: Step = step, _values: Mapping[str, str] = step_values) -> tuple[int, str]:
            # Looking needs no root: a check runs as the user. Only where it fails, a step that
            # changes things as root checks again as root (some facts only root can read).
            code, out = sh(_step, "check", _values)
            if code != 0 and _step.sudo and root_way() == "sudo":
                code, out = sh(_step, "check", _values, as_root=True)
            return code, out

        def rollback(why: str, _step: Step = step, _values: Mapping[str, str] = step_values) -> str:
            code, out = sh(_step, "rollback", _values, as_root=_step.sudo)
            return "\n".join(x for x in (why, out, "rolled back" if code == 0 else "ROLLBACK FAILED") if x)

        if step.when is not None and sh(step, "when", step_values)[0] != 0:
            done("skipped")
            continue
        if step.check is not None:
            code, out = check()
            if code == 0:
                done("ok", out if step.report else "")
                continue
            if step.run is None:
                done("failed", out)
                break
        if check_only:
            blocked = step.sudo and root_way() == "none"
            done("would-change", f"needs root, and {box.spec.user} may not use sudo here" if blocked else "")
            continue
        if step.sudo and root_way() == "none":
            if step.prove_login:
                # Its run starts a test server that only remotedl's login proof and commit (or
                # rollback) finish: pasted by hand, it would leave that server running, change nothing.
                done(
                    "failed",
                    f"this step needs root, and {box.spec.user} may not use sudo without a password on "
                    f"{box.spec.alias}; it proves a new login before it commits, which cannot be done "
                    f"by hand: run `remotedl setup {book.name}` as a user who may (or as root: --user root)",
                )
                break
            s, _ = script(step, "run")
            done(
                "failed",
                f"this step needs root, and {box.spec.user} may not use sudo without a password on "
                f"{box.spec.alias}; run it there as root:",
                as_root=s.shown(step_values),
            )
            break
        code, out = sh(step, "run", step_values, as_root=step.sudo)
        if code != 0:
            # A step that proves a login may have started things (a test server): undo them.
            done("failed", rollback(out) if step.prove_login else out)
            break
        if step.prove_login:
            where = f"{book.path}:{step.line} (prove_login)"
            port_text = substitute(step.prove_login, step_values, where).strip()
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                done("failed", rollback(f"{where}: {port_text!r} is not a port number"))
                break
            why: str | None = "no way to test a login"
            if prove is not None:
                why = prove(int(port_text), step_values["login_nonce"])
            if why is not None:
                done("failed", rollback(f"a second login with the new settings failed ({why})"))
                break
            code, out2 = sh(step, "commit", step_values, as_root=step.sudo)
            if code != 0:
                done("failed", out2)
                break
            out = "\n".join(x for x in (out, out2) if x)
        if step.check is not None:
            code, again = check()
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
    """Prove that a fresh login works on ``port`` of the box: a second SSH login (fabric over
    paramiko, in this process), carried by ``ssh -W`` over the open connection to 127.0.0.1:port, with the
    same user and key, and the box's recorded host key required. The server there must show
    ``remotedl-proof NONCE`` in its Banner: only the test server the step started knows it,
    so a login that reached another server (the old sshd, on a port the test server could
    not take) proves nothing and fails."""

    def prove(port: int, nonce: str) -> str | None:
        import base64

        import paramiko
        from fabric import Config, Connection

        from remotedl.ssh.hostkeys import known_keys
        from remotedl.ssh.openssh import openssh_options

        spec = box.spec
        sock = _ProcSocket(["ssh", *openssh_options(spec), "-W", f"127.0.0.1:{port}", "--", spec.alias])
        key_files = [p for p in spec.identity_files if Path(p).is_file()]
        # fabric's Connection over our socket: no ssh config of its own (ours is resolved),
        # and its silent AutoAddPolicy replaced: only the box's recorded key is accepted.
        conn = Connection(
            host=spec.hostname,
            user=spec.user,
            port=spec.port,
            config=Config(ssh_config=paramiko.SSHConfig()),
            connect_timeout=spec.connect_timeout,
            connect_kwargs={
                "key_filename": key_files,
                "look_for_keys": False,
                "allow_agent": not spec.identities_only,
                "sock": sock,
                "banner_timeout": spec.connect_timeout,
                "auth_timeout": spec.connect_timeout,
            },
        )
        client: paramiko.SSHClient = conn.client
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        lookup = spec.hostname if spec.port == 22 else f"[{spec.hostname}]:{spec.port}"
        for k in known_keys(spec):
            try:
                key = paramiko.PKey.from_type_string(k.key_type, base64.b64decode(k.blob))
            except Exception:  # noqa: S112 - a key type paramiko lacks: try the others
                continue
            client.get_host_keys().add(lookup, k.key_type, key)
        try:
            conn.open()
            transport = client.get_transport()
            banner = (transport.get_banner() if transport is not None else None) or b""
            if f"remotedl-proof {nonce}".encode() not in banner:
                return (
                    f"the server on 127.0.0.1:{port} is not the test server this step started: "
                    "its banner lacks this run's nonce"
                )
            r = conn.run(
                "echo remotedl-login-ok", hide=True, warn=True, in_stream=False, timeout=spec.connect_timeout
            )
            if r.stdout.strip() != "remotedl-login-ok":
                return "the login did not run a command"
            return None
        except paramiko.BadHostKeyException:
            return "the server on that port offered another host key"
        except paramiko.AuthenticationException:
            return "the key was refused"
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        finally:
            conn.close()
            sock.close()

    return prove


def check_vars(values: Mapping[str, str]) -> None:
    for k in values:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UsageError(f"variable name '{k}' is not valid")


@dataclass(frozen=True)
class BoxFacts:
    """What every playbook may use as a built-in variable."""

    home: str
    user: str
    remote_dir: str  # absolute
    project: str

    def variables(self) -> dict[str, str]:
        return asdict(self)


# "$1": remote_dir as configured ("~/x", "/abs" or relative to the home). NUL-separated
# answers: a path may hold any other byte.
_FACTS = (
    EXPAND_HOME
    + r"""
d=$(expand_home "$1")
case $d in /*) ;; *) d="$HOME/$d" ;; esac
printf '%s\0%s\0%s\0' "$HOME" "$(id -un)" "$d"
"""
)


def box_facts(box: Box, remote_dir: str, project: str) -> BoxFacts:
    """The built-in playbook variables, from the box in one exec."""
    parts = box.run(_FACTS, remote_dir).stdout.split("\0")
    if len(parts) < 4:
        raise RemoteError(f"{box.spec.alias} did not say its home directory and user")
    return BoxFacts(home=parts[0], user=parts[1], remote_dir=parts[2], project=project)
