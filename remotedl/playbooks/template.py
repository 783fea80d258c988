"""Variables in a step's script: ``{{ name }}`` lexed into a quoted reference to a shell variable
whose value travels as a positional parameter (``template``, ``pack``).

A step's script never holds a value. ``{{ name }}`` becomes a reference to the shell variable
``__v_name``, quoted for where it stands: ``"${__v_name}"`` in plain shell text (one word),
``${__v_name}`` inside double quotes and in the body of a here-document (expanded once, never
evaluated). The values travel as the script's positional parameters and are assigned to those
variables before the script's first line. Where the shell would not expand a reference (inside
single quotes, in a here-document with a quoted delimiter, in arithmetic) the reference is an
error, not a silent change of meaning. ``eval {{ var }}`` runs a command line held in a variable.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remotedl.errors import ConfigError, UsageError

_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


_PREFIX = "__v_"


_BREAKS = set(" \t\n;&|()<>")


@dataclass(frozen=True)
class Script:
    """A step's script with its variables as references, and the names they refer to, in the
    order of their positional parameters."""

    text: str
    names: tuple[str, ...]

    def prelude(self) -> str:
        """Assigns the positional values to the variables; on the script's first line, so the
        shell's line numbers stay the playbook's."""
        sets = "".join(f"{_PREFIX}{n}=${{{i}}}; " for i, n in enumerate(self.names, 1))
        return f"{sets}set --; " if sets else ""

    def code(self) -> str:
        return self.prelude() + self.text

    def values(self, variables: Mapping[str, str], where: str) -> list[str]:
        missing = [n for n in self.names if n not in variables]
        if missing:
            key = missing[0]
            raise ConfigError(f"{where}: variable '{key}' is not set", hint=f"pass --var {key}=VALUE")
        return [variables[n] for n in self.names]

    def shown(self, variables: Mapping[str, str]) -> str:
        """The script as a person can paste it into a shell: assignments, then the text."""
        sets = "".join(f"{_PREFIX}{n}={shlex.quote(variables.get(n, ''))}\n" for n in self.names)
        return sets + self.text.strip()


def _misplaced(name: str, where: str, why: str) -> ConfigError:
    return ConfigError(
        f"{where}: {{{{ {name} }}}} stands {why}",
        hint="put it in plain shell text or in double quotes; see README 'Playbooks' (variables)",
    )


def template(text: str, where: str, first_line: int | None = None) -> Script:
    """``text`` with each ``{{ name }}`` replaced by a reference quoted for its place (a small
    POSIX sh lexer: quotes, ``$( )``, backquotes, comments, here-documents). An error names
    ``where``, or with ``first_line`` (the file's line of the text's first) ``where:LINE``."""

    def at(pos: int) -> str:
        return where if first_line is None else f"{where}:{first_line + text.count(chr(10), 0, pos)}"

    out: list[str] = []
    names: list[str] = []
    # Frames: ("sh", depth) plain shell (the script, or inside $( ) when depth counts its
    # parentheses), ("bq",) backquotes, ("dq",) double quotes, ("ar", depth) $(( )),
    # ("hd", delimiter, strip_tabs, quoted) a here-document's body.
    stack: list[tuple[Any, ...]] = [("top", 0)]
    pending: list[tuple[str, bool, bool]] = []  # here-documents that start after this line
    word_start = True
    line_start = True
    i, n = 0, len(text)

    def ref(name: str, kind: str) -> str:
        if kind == "ar":
            raise _misplaced(name, at(i), "in $(( )), where the shell would evaluate its value as code")
        if name not in names:
            names.append(name)
        return f"${{{_PREFIX}{name}}}" if kind in ("dq", "hd") else f'"${{{_PREFIX}{name}}}"'

    while i < n:
        frame = stack[-1]
        kind = frame[0]
        if kind == "hd" and line_start:
            end = text.find("\n", i)
            line = text[i : n if end < 0 else end]
            if (line.lstrip("\t") if frame[2] else line) == frame[1]:
                out.append(line)
                i += len(line)
                stack.pop()
                line_start = False
                continue
            if frame[3]:  # quoted delimiter: the body is literal text
                m = _VAR.search(line)
                if m:
                    why = f"in a here-document with a quoted delimiter ({frame[1]}): never expanded"
                    raise _misplaced(m.group(1), at(i), why)
                out.append(line + ("\n" if end >= 0 else ""))
                i += len(line) + 1
                continue
        line_start = False
        m = _VAR.match(text, i)
        if m:
            out.append(ref(m.group(1), "sh" if kind == "top" else kind))
            i = m.end()
            word_start = False
            continue
        c = text[i]
        if c == "\\":
            out.append(text[i : i + 2])
            i += 2
            word_start = False
            continue
        if kind in ("top", "sh", "bq", "ar"):
            if c == "'":
                end = text.find("'", i + 1)
                end = n - 1 if end < 0 else end
                literal = text[i : end + 1]
                m = _VAR.search(literal)
                if m:
                    why = "inside single quotes, where it is never expanded"
                    raise _misplaced(m.group(1), at(i + m.start()), why)
                out.append(literal)
                i = end + 1
                word_start = False
                continue
            if c == "#" and word_start and kind != "ar":
                end = text.find("\n", i)
                end = n if end < 0 else end
                out.append(text[i:end])  # a comment: copied as it is
                i = end
                continue
            if text.startswith("$((", i):
                stack.append(("ar", 0))
                out.append("$((")
                i += 3
                word_start = False
                continue
            if text.startswith("$(", i):
                stack.append(("sh", 0))
                out.append("$(")
                i += 2
                word_start = True
                continue
            if c == '"':
                stack.append(("dq",))
            elif c == "`":
                if kind == "bq":
                    stack.pop()
                else:
                    stack.append(("bq",))
            elif c == "(" and kind in ("sh", "ar"):
                stack[-1] = (kind, frame[1] + 1)
            elif c == ")" and kind == "sh":
                if frame[1] == 0:
                    stack.pop()
                else:
                    stack[-1] = ("sh", frame[1] - 1)
            elif c == ")" and kind == "ar":
                if frame[1] == 0 and text.startswith("))", i):
                    stack.pop()
                    out.append("))")
                    i += 2
                    continue
                if frame[1] > 0:
                    stack[-1] = ("ar", frame[1] - 1)
            elif text.startswith("<<", i) and kind != "ar" and not text.startswith("<<<", i):
                j = i + 2
                strip = text.startswith("-", j)
                j += 1 if strip else 0
                while j < n and text[j] in " \t":
                    j += 1
                delim, quoted = [], False
                while j < n and text[j] not in _BREAKS:
                    if text[j] in "'\"":
                        q = text[j]
                        end = text.find(q, j + 1)
                        end = n - 1 if end < 0 else end
                        delim.append(text[j + 1 : end])
                        quoted = True
                        j = end + 1
                    elif text[j] == "\\":
                        delim.append(text[j + 1 : j + 2])
                        quoted = True
                        j += 2
                    else:
                        delim.append(text[j])
                        j += 1
                pending.append(("".join(delim), strip, quoted))
                out.append(text[i:j])
                i = j
                word_start = False
                continue
            elif c == "\n" and pending:
                out.append(c)
                i += 1
                for delim_, strip_, quoted_ in reversed(pending):
                    stack.append(("hd", delim_, strip_, quoted_))
                pending.clear()
                line_start = True
                word_start = True
                continue
            out.append(c)
            i += 1
            word_start = c in _BREAKS
            continue
        # double quotes, or a here-document's body
        if kind == "dq" and c == '"':
            stack.pop()
        elif text.startswith("$((", i):
            stack.append(("ar", 0))
            out.append("$((")
            i += 3
            continue
        elif text.startswith("$(", i):
            stack.append(("sh", 0))
            out.append("$(")
            i += 2
            word_start = True
            continue
        elif c == "`":
            stack.append(("bq",))
        out.append(c)
        i += 1
        line_start = kind == "hd" and c == "\n"
        word_start = False
    return Script("".join(out), tuple(names))


def substitute(text: str, variables: Mapping[str, str], where: str) -> str:
    """Plain text with the values put in (for fields that are not shell, e.g. prove_login)."""

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in variables:
            raise ConfigError(f"{where}: variable '{key}' is not set", hint=f"pass --var {key}=VALUE")
        return variables[key]

    return _VAR.sub(sub, text)


def pack(script: str, values: Sequence[str]) -> bytes:
    """A script and its values as ``_READ`` takes them from stdin: length-prefixed bytes."""
    body = script.encode()
    parts = [f"{len(body)}\n".encode(), body, f"{len(values)}\n".encode()]
    for v in values:
        raw = v.encode("utf-8", "surrogateescape")
        parts += [f"{len(raw)}\n".encode(), raw]
    return b"".join(parts)


def check_vars(values: Mapping[str, str]) -> None:
    for k in values:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UsageError(f"variable name '{k}' is not valid")
