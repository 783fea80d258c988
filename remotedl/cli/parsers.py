"""Argument definitions per command (no heavy imports here: ``--help`` must stay fast)."""

from __future__ import annotations

import argparse


def status(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    pass


def config(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    pass


def trust(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("alias", nargs="?", help="host alias (default: the configured host)")
    p.add_argument("-y", "--yes", action="store_true", help="record without asking")
    p.add_argument("--replace", action="store_true", help="replace a changed key (box reinstalled)")


def sandbox(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--name", default="sandbox", help="host alias to register (default: sandbox)")
    p.add_argument("--gpus", type=int, default=2, help="stand-in GPUs on the box (0: none)")


def push(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", default=[], metavar="PATH",
                   help="a data path to rsync (repeatable; adds to `data` in remotedl.toml)")  # fmt: skip
    p.add_argument("--no-data", action="store_true", help="skip the configured data paths")
    p.add_argument("--no-code", action="store_true", help="send data only")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="rsync exclude")
    p.add_argument("--delete", action="store_true", help="delete box files missing here (data paths only)")
    p.add_argument("--force", action="store_true", help="overwrite edits made on the box")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")


def pull(p: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="paths relative to the remote directory")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN", help="rsync exclude")
    p.add_argument("--remote-dir", metavar="DIR", help="work tree on the box (default ~/remotedl/PROJECT)")
