"""Reaching a box: resolution (``resolve``), OpenSSH command lines and the shared connection
(``openssh``), the framed script channel (``channel``) and host keys (``hostkeys``).

OpenSSH carries everything: commands, git, rsync, tunnels, ``attach``, ``trust``. It reaches
the box exactly as the user's ``ssh`` does (all ProxyJump hops, ProxyCommand, HostKeyAlias,
Match, Include), shares one master connection per host across calls, and moves bulk data many
times faster than paramiko. fabric (on paramiko) remains for what needs an SSH client inside
the process: the second login of ``ssh-hardening``'s proof, which must read the candidate
server's banner and check its host key itself (see ``remotedl.playbooks``).
"""

from __future__ import annotations

from remotedl.ssh.channel import Box, RemoteResult, open_box, parse_marks
from remotedl.ssh.openssh import close_master, openssh_failure, ssh_argv, ssh_command_string
from remotedl.ssh.resolve import BOXES_DIR, HostSpec, resolve_host

__all__ = [
    "BOXES_DIR",
    "Box",
    "HostSpec",
    "RemoteResult",
    "close_master",
    "open_box",
    "openssh_failure",
    "parse_marks",
    "resolve_host",
    "ssh_argv",
    "ssh_command_string",
]
