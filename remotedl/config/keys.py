"""The settings there are: each key's type, default and environment variable, the words some
take, and how a value read from a file or the environment is checked and coerced."""

from __future__ import annotations

import re
from typing import Any

from remotedl.errors import ConfigError

# key: (type, default, env var). Tables ([dns], ...) are validated by their own modules.
SCALARS: dict[str, tuple[type, Any, str | None]] = {
    "host": (str, None, "REMOTEDL_HOST"),
    "ssh_config": (str, None, "REMOTEDL_SSH_CONFIG"),
    "remote_dir": (str, None, "REMOTEDL_REMOTE_DIR"),
    # the mode push makes remote_dir with: private; "0750" or "2770" opens it to the group
    "remote_dir_mode": (str, "0700", "REMOTEDL_REMOTE_DIR_MODE"),
    "connect_timeout": (float, 10.0, "REMOTEDL_CONNECT_TIMEOUT"),
    "data": (list, [], None),
    "exclude": (list, [], None),
    # bytes: untracked files larger than this stay out of push's code snapshot (listed, not sent)
    "max_snapshot_file": (int, 5 << 20, "REMOTEDL_MAX_SNAPSHOT_FILE"),
    "python": (str, "python3", "REMOTEDL_PYTHON"),
    "env": (dict, {}, None),
    "jupyter_port": (int, 8888, None),
    # jobs: each runs in its own checkout (isolate), in the project's environment on the box
    "isolate": (bool, True, "REMOTEDL_ISOLATE"),
    "shared": (list, [], None),
    "conda": (str, None, None),
    "env_setup": (str, None, None),
    "setup_cmd": (str, None, None),
    # job events: notifications sent from the box, stall detection, outputs home, TensorBoard
    "notify": (list, [], None),
    "notify_desktop": (bool, False, "REMOTEDL_NOTIFY_DESKTOP"),
    "stall_after": (str, "15m", "REMOTEDL_STALL_AFTER"),
    "pull_on_end": (list, [], None),
    # outputs home: what a job writes that belongs here, fetched when it ends (remotedl.outputs)
    "outputs": (list, [], None),
    "outputs_dir": (str, None, "REMOTEDL_OUTPUTS_DIR"),
    "trackers": (bool, True, "REMOTEDL_TRACKERS"),  # WANDB_*/MLFLOW_* per job
    "wandb_sync": (bool, False, "REMOTEDL_WANDB_SYNC"),  # `wandb sync` offline runs that came home
    "tensorboard_logdir": (str, None, None),
    "tensorboard_port": (int, 6006, None),
    # Several hosts at once (a fleet); `host = "a,b"` and `--host a,b,@lab` say the same.
    "hosts": (list, [], None),
    # multi-node runs: the address the other nodes reach this box at (default: ssh's HostName)
    "node_addr": (str, None, None),
    # Slurm hosts: a host whose scheduler is "slurm" is the login node of a Slurm cluster;
    # the rest are sbatch's defaults for jobs there (usually in [hosts.NAME] tables).
    "scheduler": (str, "box", None),
    "partition": (str, None, None),
    "account": (str, None, None),
    "qos": (str, None, None),
    "time": (str, None, None),
    "constraint": (str, None, None),
    "sbatch_args": (list, [], None),
    "modules": (list, [], None),
    # Jobs in a container image: the image (`--image`, `--no-image`), the engine on the box
    # (docker or podman; default: the one found), how the job's GPUs enter the container, and
    # more words for `docker run` (shm size, extra mounts).
    "image": (str, None, "REMOTEDL_IMAGE"),
    "container": (str, None, None),
    "container_gpus": (str, "nvidia", None),
    "container_args": (list, [], None),
    "jupyter_image": (str, None, None),  # `remotedl jupyter` in a container of this image
    "tensorboard_image": (str, None, None),  # `remotedl tensorboard` in a container of this image
    # Cloud VMs (usually in [hosts.NAME] tables): which cloud, what identifies the VM there,
    # its price, the address ssh goes to, starting it when needed and stopping it when idle.
    "cloud": (str, None, None),
    "region": (str, None, None),
    "instance_id": (str, None, None),
    "project": (str, None, None),
    "zone": (str, None, None),
    "instance": (str, None, None),
    "subscription": (str, None, None),
    "resource_group": (str, None, None),
    "vm": (str, None, None),
    "price_per_hour": (float, None, None),
    "address": (str, "public", None),
    "auto_start": (bool, False, "REMOTEDL_AUTO_START"),
    "autostop": (str, None, "REMOTEDL_AUTOSTOP"),
    "autostop_wait": (str, "all", None),
    "pre_stop": (str, None, None),
    # Azure: the autostop playbook gave the VM a managed identity that may deallocate it
    "managed_identity": (bool, False, None),
    # what running jobs get when the cloud takes a spot VM back (they may save a checkpoint)
    "preempt_signal": (str, "TERM", None),
}


# Settings whose value must be one of a few words.
CHOICES: dict[str, tuple[str, ...]] = {
    "scheduler": ("box", "slurm"),
    "container": ("docker", "podman"),
    "container_gpus": ("nvidia", "cdi", "devices", "none"),
    "cloud": ("aws", "gcp", "azure"),
    # public: the VM's public IP from the cloud's API; private: its private one (VPN, same
    # network); ssh: the ssh config's HostName as it is (a DNS name kept by `remotedl dns`)
    "address": ("public", "private", "ssh"),
    "autostop_wait": ("all", "jobs"),
}


# String settings that also take a whole number (Slurm's --time in minutes).
STR_OR_INT = {"time"}


# What a [hosts.NAME] table may not set: which hosts there are.
NOT_PER_HOST = {"host", "hosts"}


TABLES = {"dns", "playbook_vars", "fleets"}


# Settings whose value is a path, resolved against the directory of the file that names it.
PATHS = {"ssh_config"}


DNS_PATHS = ("tsig_key_file", "token_file", "password_file")


# Settings naming directories of the project (data sent by rsync, outputs all jobs share).
PROJECT_PATHS = ("data", "shared")


# Settings whose values hold secrets (notification URLs carry tokens and passwords).
SECRET_VALUES = {"notify"}


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(key: str, value: Any, origin: str) -> Any:
    value = _coerce_type(key, value, origin)
    if key == "remote_dir_mode":
        return _dir_mode(value, origin)
    choices = CHOICES.get(key)
    if choices is not None and value is not None and value not in choices:
        raise ConfigError(
            f"{origin}: '{key}' must be one of {', '.join(choices)}, not {value!r}",
            hint="fix the value; `remotedl config` shows what each setting resolves to",
        )
    return value


def _coerce_type(key: str, value: Any, origin: str) -> Any:
    kind = SCALARS[key][0]
    if key in STR_OR_INT and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == "host" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # host = ["a", "b"]: beside [hosts.NAME] tables, where hosts = [...] cannot be
    if kind is bool and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return int(value)
        except ValueError:
            pass
    elif kind is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    elif kind is dict and isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    elif kind in (str, bool) and isinstance(value, kind):
        # Not for lists (a list of numbers is no list of strings) nor numbers (true is no port).
        return value
    shown = "a value that may hold secrets" if key in SECRET_VALUES else repr(value)
    raise ConfigError(
        f"{origin}: '{key}' must be {_type_name(kind)}, not {shown}",
        hint="fix the value; `remotedl config` shows what each setting resolves to",
    )


def _dir_mode(value: str, origin: str) -> str:
    """An octal directory mode the owner can use and no one else may write to."""
    text = value.strip()
    if not re.fullmatch(r"[0-7]{3,4}", text) or int(text, 8) & 0o700 != 0o700 or int(text, 8) & 0o002:
        raise ConfigError(
            f"{origin}: 'remote_dir_mode' must be an octal mode that gives you rwx and nobody "
            f"else write, not {value!r}",
            hint='e.g. "0700" (yours alone), "0750" (your group reads), "2770" (a team works in it)',
        )
    return text if len(text) == 4 else "0" + text


def _type_name(kind: type) -> str:
    return {
        bool: "true or false",
        str: "a string",
        float: "a number",
        int: "an integer",
        list: "a list of strings",
        dict: "a table",
    }[kind]


def shown_value(key: str, value: Any) -> Any:
    """A setting's value as ``config`` shows it: notification URLs masked."""
    if key == "notify" and isinstance(value, list):
        from remotedl.notify import mask_url

        return [mask_url(str(u)) for u in value]
    return value
