"""What a newcomer trying remotedl as its README says ran into, each kept fixed."""

from __future__ import annotations

import pytest

from remotedl.config import _coerce
from remotedl.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "bad"),
    [("data", [1]), ("exclude", ["*.tmp", 2]), ("pull_on_end", [["x"]]), ("jupyter_port", True)],
)
def test_config_values_of_the_wrong_kind_are_config_errors(key, bad):
    # `data = [1]` in remotedl.toml was taken as it was and crashed push with a TypeError
    # ("internal error"); `jupyter_port = true` was taken as a port.
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        _coerce(key, bad, "project config remotedl.toml")
