import json
import sys

if sys.version_info < (3, 10):  # libtmux, shipped with the agent, needs 3.10
    print(
        json.dumps(
            {
                "ok": False,
                "kind": "usage",
                "error": "the box's python is %d.%d; remotedl's box side needs Python 3.10 or newer"
                % sys.version_info[:2],
                "hint": 'install a newer python3 there and set python = "/path/to/python3.x" in remotedl.toml',
            }
        )
    )
    sys.exit(3)

from remotedl.agent.box import main  # noqa: E402 - after the version gate

sys.exit(main(sys.argv[1:]))
