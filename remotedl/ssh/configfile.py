"""Reading and adding to an OpenSSH client config as text, for ``remotedl init``.

OpenSSH takes the first value it obtains for each option, in file order, following ``Include``
where it stands. So a new ``Host ALIAS`` block goes before the first ``Host``/``Match`` line that
could also match ALIAS (a trailing ``Host *`` of defaults then still fills in what the block
leaves out), and every byte of the file around it stays as it was. Which file and line already
define an alias is found by following ``Include`` as OpenSSH does.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from remotedl.env import passwd_home

_KEYWORD = re.compile(r"^\s*([A-Za-z]+)(?:\s*=\s*|\s+)(.*?)\s*$")


@dataclass(frozen=True)
class HostLine:
    """A ``Host`` line naming an alias literally: where it is."""

    file: Path
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file} line {self.line}"


def _words(value: str) -> list[str]:
    try:
        return shlex.split(value, comments=True)
    except ValueError:
        return value.split()


def _pattern_matches(pattern: str, name: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def host_line_matches(patterns: list[str], name: str) -> bool:
    """Whether a ``Host`` line's patterns match ``name`` (a negated match wins, as in ssh)."""
    matched = False
    for p in patterns:
        if p.startswith("!"):
            if _pattern_matches(p[1:], name):
                return False
        elif _pattern_matches(p, name):
            matched = True
    return matched


def find_host_lines(config: Path, alias: str) -> list[HostLine]:
    """The ``Host`` lines naming ``alias`` literally (not by a wildcard), in ``config`` and the
    files it includes (found as OpenSSH finds them: ``remotedl.config.ssh_config_files``)."""
    from remotedl.config import ssh_config_files

    found: list[HostLine] = []
    for path in ssh_config_files(config, passwd_home()):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for n, raw in enumerate(text.splitlines(), 1):
            m = _KEYWORD.match(raw)
            if m and not raw.lstrip().startswith("#") and m.group(1).lower() == "host":
                names = [w for w in _words(m.group(2)) if not w.startswith("!")]
                if any(w.lower() == alias.lower() for w in names):
                    found.append(HostLine(path, n))
    return found


def insertion_offset(text: str, alias: str) -> int:
    """Where in ``text`` a ``Host alias`` block goes: at the start of the first ``Host`` line
    that matches ``alias`` or the first ``Match`` line (either could set its options first),
    else at the end."""
    offset = 0
    for raw in text.splitlines(keepends=True):
        m = _KEYWORD.match(raw)
        if m and not raw.lstrip().startswith("#"):
            key, value = m.group(1).lower(), m.group(2)
            if key == "match" or (key == "host" and host_line_matches(_words(value), alias)):
                return offset
        offset += len(raw)
    return len(text)


def with_block(text: str, alias: str, block: str) -> tuple[str, int]:
    """``text`` with ``block`` added where it takes effect, and the 1-based line it starts at.
    The bytes of ``text`` are kept; a newline is added only where the last line lacked one."""
    at = insertion_offset(text, alias)
    before, after = text[:at], text[at:]
    if before and not before.endswith("\n"):
        before += "\n"
    sep_before = "\n" if before.strip() and not before.endswith("\n\n") else ""
    sep_after = "\n" if after else ""
    new = before + sep_before + block + sep_after + after
    return new, before.count("\n") + (1 if sep_before else 0) + 1


def config_value(value: str) -> str:
    """A value for an ssh config line: as it is, or in double quotes when it holds spaces."""
    if any(c in value for c in '"\n\r\0'):
        raise ValueError(f"{value!r} cannot be written in an ssh config")
    return f'"{value}"' if any(c.isspace() for c in value) or "#" in value else value


def home_relative(path: str) -> str:
    """``~/...`` for a path under the (passwd) home directory, as people write it."""
    home = str(passwd_home())
    return "~" + path[len(home) :] if path == home or path.startswith(home + "/") else path
