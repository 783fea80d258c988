from __future__ import annotations

import sys

from remotedl.cli import main

sys.exit(main())
