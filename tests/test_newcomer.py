"""What a newcomer trying remotedl as its README says ran into, each kept fixed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from remotedl import proc
from remotedl.config import _coerce
from remotedl.errors import ConfigError
from remotedl.waiting import retry_until
from tests.conftest import CliResult, cli_for


@pytest.mark.parametrize(
    ("key", "bad"),
    [("data", [1]), ("exclude", ["*.tmp", 2]), ("pull_on_end", [["x"]]), ("jupyter_port", True)],
)
def test_config_values_of_the_wrong_kind_are_config_errors(key, bad):
    # `data = [1]` in remotedl.toml was taken as it was and crashed push with a TypeError
    # ("internal error"); `jupyter_port = true` was taken as a port.
    with pytest.raises(ConfigError, match=f"'{key}' must be"):
        _coerce(key, bad, "project config remotedl.toml")


def test_outside_git_run_names_commands_that_work(cli, tmp_path):
    # `remotedl run train.py` outside a repository said "or use --no-code", which `run` does
    # not take (argparse's usage error followed); `git init` alone is enough.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "train.py").write_text("print('hi from a plain directory')\n")
    r = cli("run", "train.py", cwd=plain)
    assert r.code == 2, r.out + r.err
    assert "not in a git repository" in r.err
    assert "`remotedl push --no-code`" in r.err
    assert "use --no-code" not in r.err
    proc.run(["git", "init", "-q", str(plain)], check=True)
    r = cli("run", "--cpu", "--remote-dir", f"~/newcomer/{tmp_path.name}", "train.py", cwd=plain)
    assert r.code == 0, r.out + r.err
    assert "hi from a plain directory" in r.out


def test_host_id_as_printed_works_where_the_project_names_another_host(cli, box, project, tmp_path):
    # `remotedl --host a,b run ...` prints "`remotedl logs -f b:3` to follow"; typed as shown in
    # a project whose config names host a, it asked a for a job called 'b:3'. A job's name may
    # hold a colon: HOST:NAME takes the host before the first one, and a plain name still works.
    where = {"REMOTEDL_HOST": "gpubox-not-this-one"}  # the project's host; never contacted here
    rdir = f"~/newcomer/{tmp_path.name}"
    r = cli(
        "run", "--host", box.name, "--detach", "--cpu", "--name", "lr:0.1", "--remote-dir", rdir,
        "--", "sh", "-c", "echo routed to the right box",
        cwd=project, env=where,
    )  # fmt: skip
    assert r.code == 0, r.out + r.err
    job_id = r.out.strip()
    on_box = ["--host", box.name]
    refs = ([f"{box.name}:{job_id}"], [*on_box, f"{box.name}:lr:0.1"], [*on_box, "lr:0.1"])

    def logs(argv: list[str]) -> CliResult:
        return cli("logs", *argv, cwd=project, env=where)

    for argv in refs:
        got = retry_until(lambda a=argv: "routed to the right box" in (x := logs(a)).out and x, seconds=20)
        assert got, logs(argv)


def test_a_long_root_step_without_sudo_shows_all_it_says_to_run(plain_box, project, tmp_path):
    # `remotedl setup ssh-hardening` as a user who may not sudo printed only the last 20 lines
    # of the commands to run as root: not why, and not the variables they use.
    import subprocess

    root_only = Path(plain_box.home).parent / f"root-only-{tmp_path.name}"
    root_only.mkdir(mode=0o755)  # root's: the box user may look, not write
    filler = "".join(f"      : step {i} of a long script\n" for i in range(30))
    (project / "playbooks").mkdir()
    (project / "playbooks" / "longroot.yaml").write_text(
        "steps:\n  - name: the marker root writes\n    sudo: true\n    check: test -e {{ dir }}/marker\n"
        f"    run: |\n      printf '%s\\n' {{{{ note }}}} > {{{{ dir }}}}/marker\n{filler}"
    )
    run = cli_for(plain_box, tmp_path / "laptop")
    assert run("allow", cwd=project).code == 0  # the project's root step: the user read it
    try:
        # --check says already that the change would need root this user cannot get.
        r = run("setup", "longroot", "--check", "--json", "--var", f"dir={root_only}", "--var", "note=x",
                cwd=project)  # fmt: skip
        (res,) = json.loads(r.out)
        assert res["steps"][0]["status"] == "would-change"
        assert f"needs root, and {plain_box.info.user} may not use sudo" in res["steps"][0]["output"]
        r = run("setup", "longroot", "--var", f"dir={root_only}", "--var", "note=it's here", cwd=project)
        assert r.code == 1, r.out + r.err
        assert f"{plain_box.info.user} may not use sudo without a password" in r.out
        shown = r.out.partition("run it there as root:\n")[2].rpartition("\n  0 ok,")[0]
        assert "__v_dir=" in shown and "__v_note=" in shown and ": step 29 of" in shown, r.out
        # As shown (here we are root), the commands do it.
        pasted = "\n".join(line.removeprefix(" " * 15) for line in shown.splitlines())
        subprocess.run(["sh", "-c", pasted], check=True)
        assert (root_only / "marker").read_text() == "it's here\n"
    finally:
        shutil.rmtree(root_only)


def test_rich_reads_the_given_environment_not_the_process(monkeypatch):
    # The README's test command failed test_status_line_only_on_a_terminal where the runner's
    # TERM was dumb (an editor's shell, some CI): rich read os.environ, not the Environment.
    import io

    from remotedl.cli.statusline import status_line
    from remotedl.env import Environment

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("TERM", "dumb")
    term = {"TERM": "xterm-256color"}
    loud = Environment(environ=term, stdout=io.StringIO(), stderr=Tty(), stdin_isatty=False)
    with status_line(loud) as say:
        say("starting Jupyter")
    assert "starting Jupyter" in loud.stderr.getvalue()


def test_an_unknown_option_is_told_by_its_command(tmp_path):
    # `remotedl run --detatch train.py` showed remotedl's top-level usage and `remotedl --help`,
    # which list none of run's options.
    from remotedl.cli import main
    from tests.conftest import make_env

    env = make_env(tmp_path)
    assert main(["run", "--detatch", "train.py"], env) == 2
    err = env.stderr.getvalue()  # type: ignore[attr-defined]
    assert "usage:" not in err  # one line and a hint, no usage block
    assert "unrecognized arguments: --detatch; did you mean --detach?" in err
    assert "see `remotedl run --help`" in err
    env = make_env(tmp_path)
    assert main(["--json", "jobs", "--bogus"], env) == 2
    assert json.loads(env.stdout.getvalue()) == {  # type: ignore[attr-defined]
        "error": "unrecognized arguments: --bogus",
        "hint": "see `remotedl jobs --help`",
        "exit_code": 2,
    }


def test_ctrl_c_while_a_job_starts_says_it_may_be_running(cli, project, tmp_path):
    # Ctrl-C while `run`'s start request was on its way: the box started the job, and the
    # laptop said only "remotedl: interrupted". The box's python here is a stand-in that runs
    # the agent, and once the start is answered on the box interrupts this laptop (this process)
    # before the answer travels back.
    import os
    import signal

    wrapper = tmp_path / "python-then-ctrl-c"
    wrapper.write_text(
        "#!/bin/sh\n"
        '[ "$1" = -c ] && exec python3 "$@"  # the agent upload: a zip on stdin\n'
        "body=$(cat)\n"
        'case $body in *\'"op": "start"\'*) ;; *) printf %s "$body" | exec python3 "$@" ;; esac\n'
        f'answer=$(printf %s "$body" | python3 "$@"); kill -INT {os.getpid()}; sleep 20\n'
        'printf %s "$answer"\n'
    )
    wrapper.chmod(0o755)
    where = f'remote_dir = "~/newcomer/{tmp_path.name}"\n'
    (project / "remotedl.toml").write_text(f'python = "{wrapper}"\n{where}')
    name = f"ctrl-c-{tmp_path.name}"
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in `remotedl` itself
    try:
        r = cli("run", "--cpu", "--name", name, "--", "true", cwd=project)
    finally:
        signal.signal(signal.SIGINT, old)
    assert r.code == 130, r.out + r.err
    assert "interrupted while starting the job" in r.err and "it may be running there" in r.err, r.err
    assert "`remotedl jobs` lists it" in r.err
    (project / "remotedl.toml").write_text(where)
    listed = cli("jobs", "--all", cwd=project)
    assert name in listed.out, listed.out + listed.err  # it did start


def test_run_lists_what_its_push_left_out(cli, project, tmp_path):
    # `remotedl push` lists the files its snapshot left out, with the fix; `run` pushed the
    # same way and said nothing, so a job reading such a file failed on the box without a clue.
    (project / "ckpt.pt").write_bytes(b"\0" * (6 << 20))
    rdir = f"~/newcomer/{tmp_path.name}"
    r = cli("run", "--detach", "--cpu", "--remote-dir", rdir, "--", "true", cwd=project)
    assert r.code == 0, r.out + r.err
    assert "left out  ckpt.pt (6.0 MiB): untracked, over max_snapshot_file" in r.err, r.err


def test_doctor_says_how_to_make_the_venv_the_project_names(cli, project, tmp_path):
    # A project with requirements.txt, not pushed to this box yet: doctor said "add
    # requirements.txt and run".
    (project / "requirements.txt").write_text("# nothing yet\n")
    r = cli("doctor", "--remote-dir", f"~/newcomer/{tmp_path.name}", cwd=project)
    assert "no project venv" in r.out, r.out + r.err
    assert "`remotedl push --env` makes it from requirements.txt" in r.out, r.out
    assert "add requirements.txt" not in r.out


def test_a_login_proving_step_without_sudo_is_not_handed_over_to_paste(plain_box, project, tmp_path):
    # ssh-hardening as a user who may not sudo printed its run script "to run as root": pasted,
    # that starts a test sshd that only remotedl's login proof and commit finish, and changes
    # nothing. It says to run the playbook as a user who may.
    run = cli_for(plain_box, tmp_path / "laptop")
    unhardened = f"sshd_config={tmp_path}/none/sshd_config"  # whatever this machine's own holds
    r = run("setup", "ssh-hardening", "--var", unhardened, "--json", cwd=project)
    assert r.code == 1, r.out + r.err
    step = next(s for s in json.loads(r.out)[0]["steps"] if s["status"] == "failed")
    assert step["name"] == "sshd accepts keys only"
    assert "it proves a new login before it commits" in step["output"], step
    assert "`remotedl setup ssh-hardening` as a user who may" in step["output"]
    assert step["as_root"] == ""


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ('data = ["data", "../elsewhere"]', "data path '../elsewhere' is outside the project"),
        ('shared = ["."]', "shared path '.' is the project itself"),
        ('data = ["/"]', "data path '/' is outside the project"),
    ],
)
def test_project_paths_outside_the_project_are_config_errors(cli, project, setting, words):
    # `data = ["../x"]` in remotedl.toml failed push as a usage error (exit 2) blaming no file;
    # `shared = ["../x"]` was dropped by the box without a word.
    (project / "remotedl.toml").write_text(setting + "\n")
    for argv in (["config"], ["push"]):
        r = cli(*argv, cwd=project)
        assert r.code == 3, r.out + r.err
        assert words in r.err and "remotedl.toml" in r.err, r.err
        assert "Traceback" not in r.err
    # Inside the project, spelled any way, is fine; the --data flag stays a usage error (exit 2).
    (project / "remotedl.toml").write_text(f'data = ["./data/../data", "{project}/inputs"]\n')
    assert cli("config", cwd=project).code == 0
    r = cli("push", "--data", "../elsewhere", cwd=project)
    assert r.code == 2, r.out + r.err
    assert "outside the project" in r.err
