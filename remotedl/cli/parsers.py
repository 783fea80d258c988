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
