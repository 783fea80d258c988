"""remotedl: drive a remote GPU box from a laptop."""

from __future__ import annotations

__version__ = "0.1.0"
