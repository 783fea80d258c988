"""Running a playbook on a box: each step's when/check/run/commit/rollback through the channel
(as root where a step says ``sudo``), its result, and the built-in variables read from the box."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from remotedl.errors import RemoteError
from remotedl.playbooks.book import Playbook, Step
from remotedl.playbooks.template import Script, pack, substitute, template
from remotedl.ssh import Box
from remotedl.ssh.channel import EXPAND_HOME


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
