import sys

from remotedl.agent.box import main

sys.exit(main(sys.argv[1:]))
