"""The key on the box, for ``remotedl init``: does it log in already, can ssh ask for the
password here (a terminal, or SSH_ASKPASS), ``ssh-copy-id`` once, or the one line to paste on the
box when it takes no password. Every probe is OpenSSH with the host's resolution, BatchMode."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from remotedl import proc
from remotedl.env import Environment
from remotedl.errors import RemotedlError
from remotedl.ssh.resolve import HostSpec


@dataclass(frozen=True)
class KeyOnBox:
    """What became of putting the key on the box."""

    outcome: Literal["unchanged", "changed", "manual", "failed"]
    message: str
    detail: str = ""  # the line to paste there, or what to run here

    @property
    def logs_in(self) -> bool:
        return self.outcome in ("unchanged", "changed")


def probe_login(
    env: Environment, spec: HostSpec, key: str
) -> tuple[Literal["ok", "password", "paste"], list[str]]:
    """("ok" | "password" | "paste", the methods the box offers) for logging in with ``key``."""
    from remotedl.ssh.openssh import config_options, openssh_failure

    argv = ["ssh", *config_options(spec)]
    argv += [
        "-i", key,
        "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes",
        "-o", "PreferredAuthentications=publickey",
        "-o", f"StrictHostKeyChecking={spec.strict_host_key_checking}",
        "-o", "ControlPath=none",
        "-o", "ControlMaster=no",
        "-o", f"ConnectTimeout={max(1, int(spec.connect_timeout))}",
        "-T", "--", spec.alias, "true",
    ]  # fmt: skip
    r = proc.run(argv, check=False, timeout=spec.connect_timeout * 3 + 10, env=ssh_env(env))
    if r.returncode == 0:
        return "ok", []
    m = re.search(r"Permission denied \(([^)]*)\)", r.stderr or "")
    if m is None:
        raise openssh_failure(spec, r.stderr or "")
    methods = m.group(1).split(",")
    return ("password" if {"password", "keyboard-interactive"} & set(methods) else "paste"), methods


def ssh_env(env: Environment) -> dict[str, str]:
    return dict(env.environ)


def can_type_password(env: Environment, terminal: bool) -> bool:
    """Whether ssh can ask for a password here: at a terminal, or through SSH_ASKPASS."""
    e = env.environ
    return terminal or bool(
        e.get("SSH_ASKPASS") and (e.get("SSH_ASKPASS_REQUIRE") == "force" or e.get("DISPLAY"))
    )


def paste_line(public_key: str) -> str:
    """One line that installs ``public_key`` on the box, in any login shell."""
    words = public_key.split()
    safe = [w for w in words[2:] if re.fullmatch(r"[A-Za-z0-9@._:+=/-]+", w)]
    key = " ".join(words[:2] + safe[:1])
    return (
        "mkdir -p ~/.ssh && chmod 700 ~/.ssh && "
        f"echo '{key}' >> ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys"
    )


def public_key(key: str) -> str:
    pub = Path(key + ".pub")
    if pub.is_file():
        return pub.read_text().strip()
    r = proc.run(["ssh-keygen", "-y", "-f", key], check=False)
    if r.returncode != 0:
        raise RemotedlError(
            f"cannot read the public half of {key}", hint=f"run `ssh-keygen -y -f {key} > {key}.pub`"
        )
    pub.write_text(r.stdout)
    return r.stdout.strip()


def locked_away(env: Environment, key: str) -> bool:
    """Whether ``key`` has a passphrase that no running ssh-agent has taken already (so no
    login with it can work without a terminal: remotedl's connections never ask)."""
    if proc.run(["ssh-keygen", "-y", "-P", "", "-f", key], check=False, env=ssh_env(env)).returncode == 0:
        return False
    if not env.environ.get("SSH_AUTH_SOCK"):
        return True
    mine = proc.run(["ssh-keygen", "-l", "-f", key + ".pub"], check=False).stdout.split()
    held = proc.run(["ssh-add", "-l"], check=False, env=ssh_env(env)).stdout
    return len(mine) < 2 or mine[1] not in held


def install_key(
    env: Environment,
    spec: HostSpec,
    key: str,
    terminal: bool,
) -> KeyOnBox:
    """Make the box let the user in with ``key``: already so, ssh-copy-id with the password,
    or the line to paste there."""
    if locked_away(env, key):
        return KeyOnBox(
            "manual",
            f"{key} has a passphrase and no ssh-agent holds it; remotedl logs in without asking for "
            f"it: add it to an agent, then run `remotedl init {spec.alias}` again",
            f'eval "$(ssh-agent)"  # where no agent runs\nssh-add {key}',
        )
    state, methods = probe_login(env, spec, key)
    if state == "ok":
        return KeyOnBox("unchanged", f"the box lets {spec.user} in with {key}", "")
    line = paste_line(public_key(key))
    if state == "paste" or not can_type_password(env, terminal):
        why = (
            f"the box takes no password ({', '.join(methods)})"
            if state == "paste"
            else "the box asks for a password and there is no terminal to type it (nor SSH_ASKPASS)"
        )
        return KeyOnBox(
            "manual",
            f"{why}: paste this line in a shell on the box as {spec.user}, "
            f"then run `remotedl init {spec.alias}` again",
            line,
        )
    Path(env.home, ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)  # ssh-copy-id's scratch space
    argv = ["ssh-copy-id", "-f", "-i", key + ".pub"]
    if spec.ssh_config is not None:
        argv += ["-F", str(spec.ssh_config)]
    argv += [
        "-o", f"StrictHostKeyChecking={spec.strict_host_key_checking}",
        "-o", "PreferredAuthentications=keyboard-interactive,password",
        "-o", "ControlPath=none",
        "-o", f"ConnectTimeout={max(1, int(spec.connect_timeout))}",
        spec.alias,
    ]  # fmt: skip
    try:
        r = proc.run(
            argv,
            check=False,
            env=ssh_env(env),
            timeout=None if terminal else 120,
            input="" if not terminal else None,
        )
    except subprocess.TimeoutExpired:
        return KeyOnBox("failed", "ssh-copy-id did not finish in 120 s", line)
    if r.returncode != 0:
        err = [
            x
            for x in (r.stderr or "").splitlines()
            if x.strip() and not x.startswith("/usr/bin/ssh-copy-id: INFO")
        ]
        return KeyOnBox(
            "failed",
            f"ssh-copy-id could not put the key on the box: {err[-1] if err else f'exit {r.returncode}'}",
            line,
        )
    if probe_login(env, spec, key)[0] != "ok":
        return KeyOnBox(
            "failed",
            "the key was copied to the box but it still does not let the user in with it",
            line,
        )
    return KeyOnBox(
        "changed",
        f"put {key}.pub on the box (ssh-copy-id): {spec.user} logs in with the key",
        "",
    )
