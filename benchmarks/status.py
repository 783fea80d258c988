"""`remotedl status` vs the same facts over plain ssh, side by side (issue 16: status over the
shared connection). The plain command runs remotedl's own status script, so both gather the
same facts; it is measured cold (fresh handshake) and warm (multiplexed master).
Usage: python benchmarks/status.py [ROUNDS]
"""

from __future__ import annotations

import subprocess
import sys

from _box import BenchBox
from _install import installed_remotedl
from _timing import report, side_by_side, time_argv

from remotedl.ssh.channel import BOOTSTRAP, encode_request
from remotedl.status import status_script

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 9
box = BenchBox()
try:
    env = {**box.environ, "REMOTEDL_HOST": box.alias}
    ours = [*installed_remotedl(), "status", "--json"]
    subprocess.run(ours, env=env, check=True, capture_output=True)  # warm up our master
    _, payload = encode_request(status_script(), ["~"])
    for warm in (False, True):
        plain = [*box.plain_ssh(warm=warm), BOOTSTRAP]
        a, b = side_by_side(
            lambda: time_argv(ours, env=env), lambda p=plain: time_argv(p, input=payload), rounds
        )
        report(f"status ({'warm' if warm else 'cold'} plain ssh)", a, b)
finally:
    box.close()
