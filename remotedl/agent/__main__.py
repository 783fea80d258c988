import json
import sys

if sys.version_info < (3, 10):  # the agent's code uses 3.10's typing (X | Y at run time)
    major, minor = sys.version_info[:2]
    print(
        json.dumps(
            {
                "ok": False,
                "kind": "usage",
                "error": f"the box's python is {major}.{minor}; remotedl's box side needs 3.10 or newer",
                "hint": "install a newer python3 there and set python = PATH in remotedl.toml",
            }
        )
    )
    sys.exit(3)

if len(sys.argv) == 4 and sys.argv[1] == "--serve":  # the resident agent (its socket, its python)
    from remotedl.agent.resident import serve

    sys.exit(serve(sys.argv[2], sys.argv[3]))

from remotedl.agent.ops import main

sys.exit(main(sys.argv[1:]))
