"""Argument definitions per command (no heavy imports here: ``--help`` must stay fast)."""

from __future__ import annotations

import argparse


def status(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    pass


def init(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "At a terminal it asks what it needs; in a script give the values as flags and --yes "
        "(--user, --port and --identity are the global ones). Safe to run again: it does only "
        "what is not done yet."
    )
    p.add_argument("alias", nargs="?", metavar="ALIAS", help="the box's name in the ssh config (or --host)")
    p.add_argument("--hostname", metavar="ADDRESS", help="the box's host name or IP address")
    p.add_argument("--jump", metavar="[USER@]HOST[:PORT]", help="a jump host the box is reached through")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
    p.add_argument(
        "--data", action="append", default=[], metavar="PATH", help="a data directory to push (repeatable)"
    )
    p.add_argument("--no-data", action="store_true", help="list no data directories in remotedl.toml")
    p.add_argument(
        "--no-passphrase",
        action="store_true",
        help="a new key gets no passphrase (needed without a terminal)",
    )
    p.add_argument("-y", "--yes", action="store_true", help="agree to every change without asking")
    p.add_argument("--dry-run", action="store_true", help="show every change; change nothing")


def top(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between refreshes (2)")
    p.add_argument("--once", action="store_true", help="print one view and exit (with --json: one snapshot)")


def config(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    pass


def allow(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--revoke", action="store_true", help="forget the approval")


def trust(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("alias", nargs="?", help="host alias (default: the configured host)")
    p.add_argument("-y", "--yes", action="store_true", help="record without asking")
    p.add_argument("--replace", action="store_true", help="replace a changed key (box reinstalled)")


def sandbox(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument(
        "--name", help="host alias to register (default: sandbox; status without it lists every sandbox)"
    )
    p.add_argument(
        "--gpus",
        default="2",
        metavar="N|host",
        help="stand-in GPUs on the box (0: a box without NVIDIA driver; host: this machine's real GPUs)",
    )
    p.add_argument(
        "--shell",
        choices=["bash", "zsh", "fish", "dash", "tcsh"],
        help="log in as a plain user rdl-SHELL with this login shell (needs root; default: you)",
    )
    p.add_argument(
        "--noisy", action="store_true", help="start-up files on the box print (.bashrc, config.fish, ...)"
    )
    p.add_argument(
        "--no-sudo", action="store_true", help="log in as a plain user that may not sudo (needs root)"
    )


def push(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="PATH",
        help="a data path to rsync (repeatable; adds to `data` in remotedl.toml)",
    )
    p.add_argument("--no-data", action="store_true", help="skip the configured data paths")
    p.add_argument("--no-code", action="store_true", help="send data only")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="rsync exclude")
    p.add_argument("--delete", action="store_true", help="delete box files missing here (data paths only)")
    p.add_argument("--force", action="store_true", help="overwrite edits made on the box")
    p.add_argument(
        "--env",
        action="store_true",
        help="then sync the project's environment on the box if its requirements changed",
    )
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
    p.add_argument(
        "--watch", action="store_true", help="keep pushing code and data on every change until Ctrl-C"
    )
    p.add_argument("--pushes", type=int, help=argparse.SUPPRESS)  # watch: stop after N pushes (tests)


def pull(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="paths relative to the project: taken from this project's latest job that has them",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--job", metavar="JOB", help="take the paths from this job's directory")
    src.add_argument("--tree", action="store_true", help="take the paths from the work tree (remote_dir)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="rsync exclude")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def run(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "remotedl's options go before COMMAND: `remotedl run --detach --name x train.py --lr 0.1`. "
        "After COMMAND every word is the command's, except --gpu/--gpus/--cpu and --env KEY=VALUE "
        "(`remotedl run run.sh --gpu 0`); after -- every word is the command's (`remotedl run "
        "train.py -- --gpu 0`)."
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--gpu",
        metavar="LIST",
        help="GPU indices as nvidia-smi numbers them (0 or 0,2), "
        "or auto (default on a GPU box: the least used free GPU)",
    )
    g.add_argument("--gpus", type=int, metavar="N", help="pick N free GPUs")
    g.add_argument("--cpu", action="store_true", help="run with no GPU visible")
    p.add_argument("--queue", action="store_true", help="wait on the box until the GPUs are free")
    im = p.add_mutually_exclusive_group()
    im.add_argument("--image", metavar="IMAGE", help="run the command in this image (docker, podman)")
    im.add_argument("--no-image", action="store_true", help="run on the box itself, whatever `image` says")
    p.add_argument(
        "--nodes",
        type=int,
        metavar="N",
        help="one run across N boxes of the fleet, or N nodes of a Slurm host (--gpus each): "
        "MASTER_ADDR, NODE_RANK, ... set",
    )
    p.add_argument(
        "--fail-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="--nodes: when a node fails, the others get TERM, then KILL after this long",
    )
    p.add_argument(
        "--force", action="store_true", help="use the GPUs even if another job or process has them"
    )
    p.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE", help="job environment")
    p.add_argument("--name", help="job name (default: the script's name)")
    p.add_argument("-d", "--detach", action="store_true", help="return once the job runs; print its id")
    p.add_argument("--no-push", action="store_true", help="run what is on the box already")
    p.add_argument("--data", action="append", default=[], metavar="PATH", help="also push this data path")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
    p.add_argument(
        "--notify",
        action="append",
        default=[],
        metavar="URL",
        help="also notify URL (ntfy://, slack://, discord://, json://, mailto://...) from the box when "
        "the job ends, starts after waiting in the queue, or stalls (adds to `notify` in the config)",
    )
    p.add_argument("--no-notify", action="store_true", help="send no notifications for this job")
    _slurm_flags(p)
    p.add_argument(
        "--pull",
        action="append",
        default=[],
        metavar="PATH",
        help="when the followed job ends, pull PATH from its directory (repeatable; adds to pull_on_end)",
    )
    p.add_argument(
        "--output",
        action="append",
        default=[],
        metavar="PATH",
        help="bring PATH (relative to the job's directory) home when the job ends, into "
        ".remotedl/outputs/HOST-JOB/ (repeatable; adds to `outputs`)",
    )
    p.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="COMMAND [ARGS...]",
        help="a script in the project (run.sh, train.py) or any command line",
    )


def _slurm_flags(p: argparse.ArgumentParser) -> None:
    """sbatch's knobs, for hosts with scheduler = "slurm" (they win over [hosts.NAME])."""
    p.add_argument(
        "--time", metavar="LIMIT", help="Slurm hosts: the job's time limit (90, 1:30:00, 2-00:00:00)"
    )
    p.add_argument("--partition", metavar="NAME", help="Slurm hosts: the partition to submit to")
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="OPTION",
        help="Slurm hosts: one more sbatch option, as one word (--sbatch-arg=--mem=32G); repeatable",
    )


def jobs(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "`remotedl jobs` lists; `jobs show [JOB]` tells what a job ran; `jobs rm ID...` and "
        "`jobs prune [--older-than 7d]` remove ended jobs (record, log, job directory)."
    )
    p.add_argument("action", nargs="?", choices=["show", "rm", "prune"], help="show, rm or prune")
    p.add_argument("ids", nargs="*", metavar="JOB", help="job ids (rm) or one job (show)")
    p.add_argument("-a", "--all", action="store_true", help="every job, not only active and recent ones")
    p.add_argument(
        "--older-than", metavar="AGE", help="prune: only jobs that ended longer ago (7d, 12h, 30m)"
    )
    p.add_argument("-y", "--yes", action="store_true", help="rm/prune: remove without asking")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def images(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = "The image jobs use (`image`) is marked with *; `--json` gives engine and images."


def show(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job id or name (default: this project's latest job)")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def diff(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job id or name (default: this project's latest job)")
    p.add_argument("--stat", action="store_true", help="only which files differ, and how much")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def logs(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        'With --json: JSON Lines, one object per log line with its newline, {"text": ...} or '
        '{"base64": ...} for a line that is not UTF-8.'
    )
    p.add_argument("job", nargs="?", help="job id or name (default: this project's latest job)")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.add_argument("-n", "--lines", type=int, metavar="N", help="only the last N lines")
    p.add_argument("--node", type=int, metavar="R", help="a multi-node RUN: only node R's log")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def kill(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job id or name (default: this project's latest running job)")
    p.add_argument("--grace", type=float, default=10.0, metavar="S", help="seconds between signals")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def attach(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="job id or name (default: this project's latest job)")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def _tunnel_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--background", action="store_true", help="keep it running after this command returns")
    p.add_argument("--open", action="store_true", help="open the Jupyter URL in a browser")
    p.add_argument("--colab", action="store_true", help="start Jupyter ready for Colab's local runtime")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
    p.add_argument("--supervise", action="store_true", help=argparse.SUPPRESS)  # the background child


def tunnel(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("ports", nargs="*", metavar="PORT[:REMOTE_PORT]", help="e.g. 8888, or 8889:8888")
    p.add_argument(
        "--jupyter", action="store_true", help="find or start Jupyter on the box and forward to it"
    )
    p.add_argument("--list", action="store_true", help="list background tunnels")
    p.add_argument("--stop", metavar="PORT|all", help="stop the background tunnel holding PORT")
    _tunnel_common(p)


def jupyter(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("ports", nargs="?", metavar="PORT[:REMOTE_PORT]", help="local port (default 8888)")
    _tunnel_common(p)
    p.add_argument(
        "--gpus", type=int, default=1, metavar="N", help="Slurm hosts: GPUs for the Jupyter job (default 1)"
    )
    p.add_argument("--image", metavar="IMAGE", help="Jupyter in a container of this image (or jupyter_image)")
    _slurm_flags(p)


def tensorboard(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument(
        "logdir",
        nargs="?",
        metavar="LOGDIR",
        help="event files' directory on the box, relative to the work tree (default: runs, "
        "or tensorboard_logdir in remotedl.toml)",
    )
    p.add_argument(
        "--local-port", type=int, metavar="N", help="local port (default 6006, or tensorboard_port)"
    )
    p.add_argument(
        "--jobs",
        nargs="*",
        metavar="JOB",
        help="serve LOGDIR of each job's own directory, one run per job (default: this project's jobs)",
    )
    p.add_argument("--image", metavar="IMAGE", help="TensorBoard in a container of this image")
    p.add_argument(
        "--local",
        action="store_true",
        help="serve the outputs that came home (.remotedl/outputs or outputs_dir) here, without the box",
    )
    p.add_argument("--background", action="store_true", help="keep it running after this command returns")
    p.add_argument("--open", action="store_true", help="open TensorBoard in a browser")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def dns(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["update", "check", "watch"],
        help="update: change the record if it differs; check: compare only; watch: update in a loop",
    )
    p.add_argument("--dry-run", action="store_true", help="say what would change; send nothing")
    p.add_argument("--force", action="store_true", help="send even if DNS is right, or after a fatal answer")
    p.add_argument("--interval", default="5m", help="watch: time between updates (30s, 5m, 1h)")
    p.add_argument("--runs", type=int, help=argparse.SUPPRESS)  # watch: stop after N rounds (tests)


def setup(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("playbooks", nargs="*", metavar="PLAYBOOK", help="names or .yaml paths (default: base)")
    p.add_argument("--check", action="store_true", help="dry run: report what would change, change nothing")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a playbook variable")
    p.add_argument("--list", action="store_true", help="list the available playbooks")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def doctor(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
    p.add_argument(
        "--nodes",
        action="store_true",
        help="multi-node runs: check that every host reaches a port on the first (the master)",
    )


def outputs(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Jobs started with outputs (`outputs = [...]`, `run --output PATH`) bring them home when "
        "they end, at the next remotedl command that talks to their box; this lists them and "
        "fetches what is due. Nothing here is deleted or overwritten if it changed here."
    )
    p.add_argument("job", nargs="?", help="fetch this job's outputs now, running or not (HOST:ID on a fleet)")
    p.add_argument(
        "--output", action="append", default=[], metavar="PATH", help="with JOB: also fetch PATH (repeatable)"
    )
    p.add_argument("-w", "--watch", action="store_true", help="keep fetching while the jobs run")
    p.add_argument(
        "--interval", type=float, default=30.0, metavar="S", help="--watch: seconds between fetches"
    )
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def compare(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", nargs="+", metavar="JOB", help="job ids (HOST:ID on a fleet)")
    p.add_argument("--plot", metavar="NAME", help="chart this scalar (loss) across the jobs")
    p.add_argument("--out", metavar="FILE.png", help="--plot: write a PNG instead of a terminal chart")


def up(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = "The host's [hosts.NAME] table names the VM: see README 'Cloud VMs'."


def stop(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = "Jobs on the VM end with it; its disk stays (and is billed)."
    p.add_argument("--no-wait", action="store_true", help="return once the cloud took the request")


def autostop(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Idle: no running or queued remotedl job, no interactive SSH session, no busy Jupyter "
        "kernel, no GPU process (with --wait jobs: no job). Without a duration it shows the setting."
    )
    p.add_argument(
        "duration",
        nargs="?",
        metavar="DURATION",
        help="idle time, e.g. 30m, 1h (default: the host's autostop)",
    )
    p.add_argument("--off", action="store_true", help="turn autostop off on the box")
    p.add_argument("--wait", choices=["all", "jobs"], help="what counts as activity (default: autostop_wait)")


def cost(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.epilog = (
        "A job pays price_per_hour x its time x its share of the box's GPUs; hosts without a "
        "price are skipped."
    )
    p.add_argument("--since", metavar="AGE", help="only the time after AGE ago, e.g. 7d, 12h")
