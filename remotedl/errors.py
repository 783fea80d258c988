"""The one error hierarchy of remotedl and the exit codes it maps to.

Every error a user can cause or meet carries one sentence saying what happened and,
where there is one, a hint saying what to do. The CLI prints both on one line each
and exits with ``exit_code``; no traceback unless ``--debug``.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    CONNECTION = 4  # unreachable, refused, auth failure, unknown or changed host key
    INTERRUPTED = 130


class RemotedlError(Exception):
    """Base class: ``message`` says what happened, ``hint`` what to do about it."""

    exit_code: ExitCode = ExitCode.ERROR

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(RemotedlError):
    exit_code = ExitCode.USAGE


class ConfigError(RemotedlError):
    exit_code = ExitCode.CONFIG


class ConnectError(RemotedlError):
    """The box could not be reached or would not let us in."""

    exit_code = ExitCode.CONNECTION


class HostKeyError(ConnectError):
    """The box's host key is unknown or differs from the recorded one."""

    def __init__(self, message: str, hint: str | None = None, *, fingerprint: str | None = None) -> None:
        super().__init__(message, hint)
        self.fingerprint = fingerprint


class RemoteError(RemotedlError):
    """Something on the box failed: a command, a missing tool, a missing file."""


class GpusBusy(RemotedlError):
    """The GPUs a job asks for are held (by a job, a foreign process, or another laptop's claim
    that won the box's lock first); on a fleet, the next box is tried."""


class JobFailed(RemotedlError):
    """A job the command waited for ended non-zero; its exit code is passed through."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Interrupted(RemotedlError):
    exit_code = ExitCode.INTERRUPTED
