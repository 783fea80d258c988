"""Playbook variables are data: the templating of step scripts, run by real local shells.

Fast tests with no box: each script is what a step would send, run here by sh, dash and bash
(the shells a box's /bin/sh may be) with its values as positional parameters, exactly as the
channel delivers them. A value is expanded once and never evaluated, wherever it stands.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from remotedl import playbooks as pb
from remotedl.errors import ConfigError

SHELLS = [s for s in ("sh", "dash", "bash", "busybox") if shutil.which(s)]

# Values that shells like to run, split, glob or unescape.
HOSTILE = [
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "5m $(touch PWNED)",
    "x\n$(touch PWNED)\nEOF\ntouch PWNED",
    "'",
    '"',
    "a b  c",
    "*",
    "[ab]",
    "~",
    "$HOME ${HOME}",
    "\\",
    "a\\nb",
    "%s %%",
    "-n",
    "--",
    "",
    "é データ 🎉",
    "tab\there",
    "{{ other }}",
]

# (script with {{ v }}, what it must print for a value v)
PLACES = {
    "plain word": ("printf '[%s]' {{ v }}", "[{v}]"),
    "in double quotes": ("printf '%s' \"<{{ v }}>\"", "<{v}>"),
    "assignment": ("x={{ v }}; printf '%s' \"$x\"", "{v}"),
    "command substitution": ("x=$(printf '%s.' {{ v }}); printf '%s' \"$x\"", "{v}."),
    "in quotes in $( )": ('printf \'%s\' "$(printf \'%s.\' {{ v }})"', "{v}."),
    "backquotes": ("x=`printf '%s.' {{ v }}`; printf '%s' \"$x\"", "{v}."),
    "here-document": ("cat <<EOF\nA {{ v }} B\nEOF", "A {v} B\n"),
    "here-document, tabs stripped": ("cat <<-EOF\n\tA {{ v }} B\n\tEOF", "A {v} B\n"),
    "$( ) in a here-document": ("cat <<EOF\n$(printf '%s.' {{ v }})\nEOF", "{v}.\n"),
    "case pattern": ("case {{ v }} in {{ v }}) printf same;; *) printf other;; esac", "same"),
    "${ :- }": ('unset u; printf \'%s\' "${u:-{{ v }}}"', "{v}"),
    "after a comment with a quote": ("# don't\nprintf '%s' {{ v }}", "{v}"),
}


def run(shell: str, code: str, values: list[str], cwd: Path, stdin: bytes | None = None) -> str:
    argv = [shell, "sh"] if shell == "busybox" else [shell]
    argv += ["-c", code, "sh", *values]
    r = subprocess.run(argv, input=stdin, capture_output=True, cwd=cwd, timeout=30)
    assert r.returncode == 0, (shell, code, r.stderr)
    return r.stdout.decode()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("place", sorted(PLACES))
def test_values_are_expanded_once_never_run(shell, place, tmp_path):
    text, expected = PLACES[place]
    script = pb.template(text, "test")
    assert script.names == ("v",)
    for value in HOSTILE:  # one holds an "EOF" line: it cannot end a here-document
        got = run(shell, script.code(), script.values({"v": value}, "test"), tmp_path)
        assert got == expected.format(v=value), (shell, place, value, got)
        assert not (tmp_path / "PWNED").exists(), (shell, place, value)


def test_eval_is_the_explicit_way_to_run_a_variable(tmp_path):
    script = pb.template("eval {{ cmd }}", "test")
    assert run("sh", script.code(), script.values({"cmd": "printf '%s' ran"}, "test"), tmp_path) == "ran"


def test_several_variables_and_ten_or_more(tmp_path):
    names = [f"v{i}" for i in range(12)]
    text = "printf '%s|' " + " ".join("{{ " + n + " }}" for n in reversed(names)) + " {{ v0 }}"
    script = pb.template(text, "test")
    assert script.names == tuple(reversed(names))  # each once, in the order of first use
    values = {n: f"value {n} $(touch PWNED)" for n in names}
    out = run("sh", script.code(), script.values(values, "test"), tmp_path)
    assert out == "".join(f"{values[n]}|" for n in reversed(names)) + f"{values['v0']}|"
    assert not (tmp_path / "PWNED").exists()


def test_positional_parameters_are_cleared_and_lines_kept(tmp_path):
    script = pb.template('printf "%s" "$#"\nprintf " %s" {{ v }}\nprintf " %s" "$LINENO"', "test")
    assert run("bash", script.code(), ["x"], tmp_path) == "0 x 3"


def test_shown_script_runs_the_same(tmp_path):
    """What a "run it there as root" message shows can be pasted into a shell as it is."""
    text, expected = PLACES["here-document"]
    script = pb.template(text, "test")
    for value in HOSTILE:
        shown = script.shown({"v": value})
        assert run("sh", shown, [], tmp_path) == expected.format(v=value)
    assert not (tmp_path / "PWNED").exists()


def test_root_reader_takes_script_and_values_from_stdin(tmp_path):
    """The as-root path: sudo's sh reads the script and values from stdin (`_READ`)."""
    text, expected = PLACES["plain word"]
    script = pb.template(text, "test")
    for value in HOSTILE:
        payload = pb.pack(script.code(), script.values({"v": value}, "test"))
        assert run("sh", pb._READ, [], tmp_path, stdin=payload) == expected.format(v=value)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    ("text", "why", "line"),
    [
        ("echo '{{ v }}'", "inside single quotes", 1),
        ("set -e\necho 'a' \"b\" 'c {{ v }}'", "inside single quotes", 2),
        ("cat <<'EOF'\nx\n{{ v }}\nEOF", "quoted delimiter (EOF)", 3),
        ('cat <<"EOF"\n{{ v }}\nEOF', "quoted delimiter (EOF)", 2),
        ("cat <<\\EOF\n{{ v }}\nEOF", "quoted delimiter (EOF)", 2),
        ("echo $(( {{ v }} + 1 ))", "$(( ))", 1),
    ],
)
def test_references_the_shell_would_not_expand_are_errors(text, why, line):
    with pytest.raises(ConfigError) as e:
        pb.template(text, "book.yaml", 10)
    assert why in str(e.value)
    assert f"book.yaml:{10 + line - 1}: {{{{ v }}}}" in str(e.value)


def test_literal_places_without_references_are_left_alone():
    text = "cat <<'EOF'\n$HOME '\"\nEOF\necho '$x' # {{ in a comment }}\necho $((1 << 2))"
    script = pb.template(text, "test")
    assert script.text == text
    assert script.names == ()
    assert script.code() == text  # nothing to assign


def test_missing_variable_names_it():
    with pytest.raises(ConfigError) as e:
        pb.template("echo {{ nope }}", "x").values({}, "book.yaml:3 (run)")
    assert "book.yaml:3 (run): variable 'nope' is not set" in str(e.value)
    assert "--var nope=VALUE" in (e.value.hint or "")


def test_shipped_playbooks_load(tmp_path):
    """Every shipped script's references stand where they expand (load checks them all)."""
    books = sorted(pb.shipped_dir().glob("*.yaml"))
    assert len(books) >= 5
    for path in books:
        pb.load(path)


def test_a_misplaced_reference_fails_at_load_with_its_line(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("steps:\n  - name: a\n    run: |\n      set -e\n      echo '{{ x }}'\n")
    with pytest.raises(ConfigError) as e:
        pb.load(path)
    assert f"{path}:5: {{{{ x }}}} stands inside single quotes" in str(e.value)


@pytest.mark.skipif(shutil.which("sudo") is None, reason="sudo is not installed here")
def test_root_reader_through_sudo(tmp_path):
    """The way a box user with sudo runs a step as root: `sudo -n sh -c _READ`, the script and
    its values on stdin (Debian's sudoers has `use_pty`: stdin must still arrive)."""
    if subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("this user may not sudo without a password here")
    script = pb.template("printf '%s|' {{ v }} \"$(id -u)\"", "test")
    value = "x $(touch PWNED) 'y"
    payload = pb.pack(script.code(), script.values({"v": value}, "test"))
    r = subprocess.run(
        ["sudo", "-n", "sh", "-c", pb._READ], input=payload, capture_output=True, cwd=tmp_path, timeout=30
    )
    assert r.stdout.decode() == f"{value}|0|", r.stderr
    assert not (tmp_path / "PWNED").exists()
