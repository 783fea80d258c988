"""`remotedl --help` start-up vs importing the libraries it is built on.

Target (issue 2): median of `remotedl --help` at most 0.6x the median of
`python -c "import fabric, paramiko, rich, requests, dns.resolver, libtmux"`.
remotedl runs as installed (a regular install of this tree, benchmarks/_install.py): the dev venv's
editable install adds an import hook at start-up that users do not have.
Usage: python benchmarks/startup.py [ROUNDS]
"""

from __future__ import annotations

import sys

from _install import installed_remotedl
from _timing import report, side_by_side, time_argv

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
ours_argv = [*installed_remotedl(), "--help"]  # as installed: see _install.py
plain_argv = [sys.executable, "-c", "import fabric, paramiko, rich, requests, dns.resolver, libtmux"]
for argv in (ours_argv, plain_argv):  # warm the page cache
    time_argv(argv)
ours, plain = side_by_side(lambda: time_argv(ours_argv), lambda: time_argv(plain_argv), rounds)
report("startup (remotedl --help vs import of the stack)", ours, plain, limit=0.6)
