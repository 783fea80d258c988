from __future__ import annotations

from remotedl.cli import entry

entry()
