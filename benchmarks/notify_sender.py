"""The box's notification sender: remotedl's notify package (standard library) vs Apprise, side by side.

Each round starts a fresh ``python3 -E -s -S`` (as the agent runs on the box) that imports the
sender and sends one notification to five local stand-ins (ntfy, Slack and Discord through an
HTTPS proxy, a JSON webhook, SMTP), and reports the process's wall time; then the same with
Apprise imported from an unpacked, pure-Python copy of its dependency closure.

Usage: python benchmarks/notify_sender.py APPRISE_DIR [ROUNDS]

APPRISE_DIR: a directory holding apprise and its dependencies as the box would get them, e.g.
    pip download apprise -d wheels && for w in wheels/*.whl; do unzip -qo $w -d APPRISE_DIR; done
    find APPRISE_DIR -name '*.so' -delete   # the box may be another CPU: pure Python only
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from _timing import report, side_by_side, time_call

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remotedl.agent.client import build_agent
from tests import notifyfakes

apprise_dir = Path(sys.argv[1]).resolve()
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 10
python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

OURS = """
import json, sys
from remotedl import notify
urls = json.loads(sys.argv[1])
out = notify.send_all(urls, notify.Event("succeeded", "remotedl: job 1 succeeded", "text"))
assert all(o.ok for o in out), [o.error for o in out]
"""

APPRISE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import apprise, logging
logging.basicConfig(level=logging.WARNING)
urls = json.loads(sys.argv[1])
a = apprise.Apprise()
for u in urls:
    assert a.add(u), u
assert a.notify(title="remotedl: job 1 succeeded", body="text")
"""

with tempfile.TemporaryDirectory() as tmp:
    services = notifyfakes.start_services(Path(tmp) / "ca")
    agent = Path(tmp) / "agent"
    zipfile.ZipFile(io.BytesIO(build_agent().zip_bytes())).extractall(agent)
    subprocess.run([python, "-m", "compileall", "-q", str(agent)], check=True, capture_output=True)
    u = services.urls()
    # Apprise's own forms of the same endpoints (its slack:// and discord:// go to the real hosts,
    # reached here through the proxy as the stdlib sender reaches them).
    urls = list(u.values())
    apprise_urls = [
        u["ntfy"],
        "slack://T0TEST/B0TEST/slacksecrettoken123",
        u["discord"],
        u["json"],
        u["email"],
    ]
    env = {**os.environ, **services.env, "REQUESTS_CA_BUNDLE": str(services.ca.ca_file)}

    def ours() -> float:
        return time_call(
            lambda: subprocess.run(
                [python, "-E", "-s", "-S", "-c", OURS, json.dumps(urls)], cwd=agent, env=env, check=True
            )
        )

    def theirs() -> float:
        return time_call(
            lambda: subprocess.run(
                [python, "-E", "-s", "-S", "-c", APPRISE, json.dumps(apprise_urls), str(apprise_dir)],
                env=env,
                check=True,
            )
        )

    ours()
    theirs()
    a, b = side_by_side(ours, theirs, rounds)
    report("notify 5 services (fresh process)", a, b, names=("notify.py", "apprise"))
    import statistics

    bare_argv = [python, "-E", "-s", "-S", "-c", "pass"]
    bare = [time_call(lambda: subprocess.run(bare_argv, check=True)) for _ in a]
    print(f"bare interpreter start (python3 -E -s -S -c pass): median {statistics.median(bare):.4f} s")
    notify_dir = Path(__file__).parent.parent / "remotedl" / "notify"
    sizes = {
        "agent zip (with the notify package)": len(build_agent().zip_bytes()),
        "notify package": sum(f.stat().st_size for f in notify_dir.glob("*.py")),
    }
    for k, v in sizes.items():
        print(f"{k}: {v / 1024:.0f} KiB")
    services.stop()
