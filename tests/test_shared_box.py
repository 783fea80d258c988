"""Other users of a shared box and of the laptop: the project's tree on the box is private
unless the user opens it, and nobody else can take remotedl's control directory."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tests.conftest import cli_for


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_push_makes_remote_dir_private_and_says_so(box, project, tmp_path):
    run = cli_for(box, tmp_path / "laptop")
    parent = Path(box.info.home) / f"modes-{tmp_path.name}"
    r = run("push", "--remote-dir", f"~/modes-{tmp_path.name}/proj", cwd=project)
    assert r.code == 0, r.err
    tree = parent / "proj"
    assert mode_of(tree) == 0o700  # umask 022 would have made it 0755: everyone reads the code
    assert f"{tree} mode 0700: only you can read it" in r.out
    # The next push finds it: nothing made, nothing said.
    r = run("push", "--remote-dir", f"~/modes-{tmp_path.name}/proj", cwd=project)
    assert r.code == 0 and "mode 0" not in r.out, r.out
    # A team's directory: the setting opens it to the group (setgid keeps the group on new files).
    (project / "remotedl.toml").write_text('remote_dir_mode = "2770"\n')
    r = run("push", "--remote-dir", f"~/modes-{tmp_path.name}/team", "--json", cwd=project)
    assert r.code == 0, r.err
    assert json.loads(r.out)["created_mode"] == "2770"
    assert stat.S_IMODE((parent / "team").stat().st_mode) == 0o2770
    # A directory the user made stays as they made it.
    own = parent / "own"
    own.mkdir(mode=0o755)
    own.chmod(0o755)
    r = run("push", "--remote-dir", f"~/modes-{tmp_path.name}/own", cwd=project)
    assert r.code == 0, r.err
    assert mode_of(own) == 0o755 and "mode 0" not in r.out


@pytest.mark.parametrize("bad", ["0777", "0600", "rwx", "07000"])
def test_a_remote_dir_mode_others_may_write_or_you_cannot_use_is_refused(box, project, tmp_path, bad):
    run = cli_for(box, tmp_path / "laptop")
    (project / "remotedl.toml").write_text(f'remote_dir_mode = "{bad}"\n')
    r = run("push", cwd=project)
    assert r.code == 3, r.out + r.err
    assert "remote_dir_mode" in r.err and len(r.err.strip().splitlines()) == 2


def test_a_control_dir_another_user_made_in_tmp_blocks_nothing(
    box, project, tmp_path, other_user, monkeypatch
):
    """Another user can make /tmp/remotedl-UID before us; the runtime directory and the home
    are the user's alone, so remotedl's sockets go there (the /tmp one stays refused)."""
    import os
    import shutil
    import tempfile

    from remotedl.errors import ConfigError
    from remotedl.ssh.openssh import pick_control_dir

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    planted = tmp / f"remotedl-{os.getuid()}"
    planted.mkdir(mode=0o700)
    os.chown(planted, other_user.uid, other_user.gid)
    with pytest.raises(ConfigError, match=f"owned by uid {other_user.uid}"):
        pick_control_dir({}, tmp)  # /tmp alone: refused, as before
    short = Path(tempfile.mkdtemp(prefix="rdl", dir="/tmp"))  # as short as /run/user/UID
    try:
        runtime = short / "run"
        runtime.mkdir(mode=0o700)
        assert pick_control_dir({"XDG_RUNTIME_DIR": str(runtime)}, tmp) == runtime / "remotedl"
        assert mode_of(runtime / "remotedl") == 0o700
        # A runtime directory that is not the user's: passed over, for the home.
        theirs = short / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, other_user.uid, other_user.gid)
        home = short / "h"
        home.mkdir()
        got = pick_control_dir({"XDG_RUNTIME_DIR": str(theirs), "HOME": str(home)}, tmp)
        assert got == home / ".cache" / "remotedl" and mode_of(got) == 0o700
        assert not (theirs / "remotedl").exists()
        # A home so deep that a socket path there passes OpenSSH's limit: not used.
        deep = short / ("d" * 60)
        with pytest.raises(ConfigError):
            pick_control_dir({"HOME": str(deep)}, tmp)
        assert not deep.exists()
        # A real connection: its master socket is in the runtime directory.
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        run = cli_for(box, tmp_path / "laptop")
        r = run("push", "--remote-dir", f"~/ctl-{tmp_path.name}", cwd=project)
        assert r.code == 0, r.err
        assert any(p.is_socket() for p in (runtime / "remotedl").iterdir())
    finally:
        shutil.rmtree(short, ignore_errors=True)
