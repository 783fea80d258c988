"""Hosts that are cloud VMs (issue 26): status of a stopped VM, up, stop, auto_start, the address
from the cloud's API, Azure deallocation; AWS on a real moto_server, GCE and Azure on local
servers speaking their REST calls, the VM's SSH side a real sandbox box."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remotedl.cli import main
from remotedl.cloud.base import VMStatus, cloud_vm, parse_time
from remotedl.errors import ConfigError
from remotedl.waiting import retry_until
from tests.cloudfakes import FakeCloud, Moto, start_moto
from tests.conftest import Box, CliResult, kill_if_same, make_env, process_gone, process_start

STALE = "127.0.0.9"  # the address the ssh config still names: nothing listens there


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    m = start_moto(Path(sys.executable).parent)
    yield m
    m.stop()


@pytest.fixture
def gce() -> Iterator[FakeCloud]:
    fake = FakeCloud("gcp").start()
    yield fake
    fake.stop_server()


@pytest.fixture
def azure() -> Iterator[FakeCloud]:
    fake = FakeCloud("azure").start()
    yield fake
    fake.stop_server()


def stale_ssh_config(box: Box, base: Path, *, key: str | None = None) -> Path:
    """The box's ssh config as a user has it for a VM: the HostName it had before a restart
    (nothing answers there now), its host key known under that name."""
    base.mkdir(parents=True, exist_ok=True)
    text = Path(box.info.ssh_config).read_text()
    known = base / "known_hosts"
    port = box.info.port
    line = (box.dir / "known_hosts").read_text().split()
    known.write_text(f"[{STALE}]:{port} {line[1]} {key or line[2]}\n")
    text = text.replace("HostName 127.0.0.1", f"HostName {STALE}")
    text = re.sub(r"UserKnownHostsFile \S+", f"UserKnownHostsFile {known}", text)
    path = base / "ssh_config"
    path.write_text(text)
    return path


def project_with(project: Path, host: str, table: dict[str, object]) -> Path:
    lines = [f"[hosts.{host}]"] + [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    (project / "remotedl.toml").write_text(f'host = "{host}"\n' + "\n".join(lines) + "\n")
    subprocess.run(["git", "-C", str(project), "add", "remotedl.toml"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "toml"], check=True)
    return project


def laptop(box: Box, tmp_path: Path, project: Path, extra: dict[str, str]) -> Callable[..., CliResult]:
    config = stale_ssh_config(box, tmp_path / "sshcfg")

    def run(*argv: str) -> CliResult:
        e = make_env(tmp_path / "laptop", cwd=project, REMOTEDL_SSH_CONFIG=str(config), **extra)
        code = main(list(argv), e)
        return CliResult(code, e.stdout.getvalue(), e.stderr.getvalue())  # type: ignore[attr-defined]

    return run


def autostop_watchers(box: Box) -> list[int]:
    """The box's autostop watchers now running: its agent's detached `autostop watch`."""
    agent = f"{box.info.home}/.remotedl/agent/".encode()
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        watching = b'"op": "autostop"' in cmd and b'"action": "watch"' in cmd
        if agent in cmd and watching and not process_gone(int(entry)):
            found.append(int(entry))
    return found


def aws_laptop(box: Box, moto: Moto, project: Path, tmp_path: Path, iid: str, **settings: object):
    """``laptop`` for a project whose host is the box as moto's AWS VM ``iid`` (reached at its
    private address), with these more settings."""
    table = {"cloud": "aws", "region": "us-east-1", "instance_id": iid, "address": "private", **settings}
    return laptop(box, tmp_path, project_with(project, box.name, table), moto.environ())


def test_aws_stopped_vm_status_up_and_stop(box: Box, moto: Moto, project: Path, tmp_path: Path) -> None:
    iid = moto.instance()
    run = aws_laptop(box, moto, project, tmp_path, iid, price_per_hour=2.45)

    r = run("status")
    assert r.code == 0, r.err
    assert f"AWS {iid} (us-east-1): stopped" in r.out
    assert f"remotedl up {box.name}" in r.out

    r = run("jobs")  # a command that needs the box: says so, names the fix
    assert r.code == 4
    assert "is a cloud VM and it is stopped" in r.err
    assert f"remotedl up {box.name}" in r.err
    assert moto.state(iid) == "stopped"

    r = run("up")
    assert r.code == 0, r.err
    assert "start requested" in r.out and "running at 127.0.0.1" in r.out and "SSH answers" in r.out
    assert moto.state(iid) == "running"

    # Reached at the cloud's address, not the ssh config's stale one; the key checked as before.
    r = run("status")
    assert r.code == 0, r.err
    assert f"AWS {iid} (us-east-1): running for" in r.out
    assert "so far ($2.45/h)" in r.out
    assert "reachable" in r.out
    r = run("status", "--json")
    data = json.loads(r.out)
    assert data["cloud"]["state"] == "running" and data["cloud"]["private_ip"] == "127.0.0.1"
    assert data["cloud"]["cost_so_far"] > 0

    r = run("stop")
    assert r.code == 0, r.err
    assert f"AWS {iid} (us-east-1) stopped after" in r.out and "about $" in r.out
    assert moto.state(iid) == "stopped"
    r = run("stop")
    assert "was stopped already" in r.out


def test_gce_auto_start_on_push(box: Box, gce: FakeCloud, project: Path, tmp_path: Path) -> None:
    run = laptop(
        box,
        tmp_path,
        project_with(project, box.name, {**gce.settings(), "auto_start": True}),
        gce.environ(tmp_path),
    )

    r = run("push")
    assert r.code == 0, r.err
    assert "is stopped; starting it (auto_start)" in r.err
    assert gce.ops("start", "stop") == ["start"]
    assert gce.power == "running"
    # every API call carried the token the credentials gave
    assert {c.authorization for c in gce.calls if c.path != "/token"} == {f"Bearer {gce.token}"}

    r = run("status")
    assert "GCE gpu-1 (proj-1/europe-west4-a): running for" in r.out

    r = run("stop")
    assert r.code == 0, r.err
    assert gce.ops("start", "stop") == ["start", "stop"]
    assert gce.power == "stopped"


def test_gce_without_auto_start_run_names_the_fix(
    box: Box, gce: FakeCloud, project: Path, tmp_path: Path
) -> None:
    run = laptop(box, tmp_path, project_with(project, box.name, gce.settings()), gce.environ(tmp_path))
    r = run("run", "true")
    assert r.code == 4
    assert f"`remotedl up {box.name}`, or set auto_start = true in [hosts.{box.name}]" in r.err
    assert gce.ops("start") == []


def test_azure_up_public_ip_and_deallocate(box: Box, azure: FakeCloud, project: Path, tmp_path: Path) -> None:
    run = laptop(
        box,
        tmp_path,
        project_with(project, box.name, {**azure.settings(), "price_per_hour": 1.0}),
        azure.environ(tmp_path),
    )
    r = run("up")
    assert r.code == 0, r.err
    assert "running at 127.0.0.1" in r.out and "SSH answers" in r.out
    r = run("status")
    assert r.code == 0, r.err
    assert "Azure VM gpu-1 (ml): running" in r.out and "reachable" in r.out

    r = run("stop")
    assert r.code == 0, r.err
    assert "deallocated" in r.out
    assert azure.ops("start", "deallocate") == ["start", "deallocate"]
    assert azure.power == "stopped"


def test_azure_powered_off_from_inside_is_deallocated_at_next_contact(
    box: Box, azure: FakeCloud, project: Path, tmp_path: Path
) -> None:
    azure.power = "stopped-billed"  # `shutdown` on the box: Azure goes on billing
    run = laptop(box, tmp_path, project_with(project, box.name, azure.settings()), azure.environ(tmp_path))
    r = run("status")
    assert r.code == 0, r.err
    assert "was powered off from inside but not deallocated, so it was billed meanwhile" in r.err
    assert azure.ops("deallocate") == ["deallocate"]


def test_azure_bad_token_says_az_login(box: Box, azure: FakeCloud, project: Path, tmp_path: Path) -> None:
    environ = azure.environ(tmp_path)
    azure.token = "another"  # the CLI's token is no longer accepted
    run = laptop(box, tmp_path, project_with(project, box.name, azure.settings()), environ)
    r = run("status")
    assert r.code == 4
    assert "refused the credentials" in r.err and "az login" in r.err
    assert "another" not in r.err
    r = run("config")  # the settings are still shown: no cloud call is needed for them
    assert r.code == 0, r.err
    assert "resource_group" in r.out and "ml" in r.out


def test_another_host_key_at_the_new_address_is_refused(
    box: Box, gce: FakeCloud, project: Path, tmp_path: Path
) -> None:
    gce.power = "running"
    other = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    assert other.returncode == 0
    wrong = (tmp_path / "k.pub").read_text().split()[1]
    config = stale_ssh_config(box, tmp_path / "sshcfg2", key=wrong)
    project_with(project, box.name, gce.settings())
    e = make_env(tmp_path / "laptop", cwd=project, REMOTEDL_SSH_CONFIG=str(config), **gce.environ(tmp_path))
    code = main(["status"], e)
    assert code == 4
    assert "CHANGED" in e.stderr.getvalue()  # type: ignore[attr-defined]

    # `up` says so at once instead of waiting for SSH until its time runs out
    gce.power = "stopped"
    e = make_env(tmp_path / "laptop", cwd=project, REMOTEDL_SSH_CONFIG=str(config), **gce.environ(tmp_path))
    assert main(["up"], e) == 4
    assert "CHANGED" in e.stderr.getvalue()  # type: ignore[attr-defined]


def test_cloud_settings_missing_ids_is_a_config_error() -> None:
    values = {"cloud": "gcp", "project": "p"}
    with pytest.raises(ConfigError, match="zone, instance are not set"):
        cloud_vm("gpu1", values.get)


def test_cost_and_times() -> None:
    start = parse_time("2026-01-01T08:00:00.1234567+00:00")
    assert start == dt.datetime(2026, 1, 1, 8, 0, 0, 123456, tzinfo=dt.timezone.utc)
    assert parse_time("2026-01-01T00:00:00.000-08:00") == dt.datetime(2026, 1, 1, 8, tzinfo=dt.timezone.utc)
    st = VMStatus(
        "running",
        "running",
        started_at=start,
        price_per_hour=2.0,
        now=dt.datetime(2026, 1, 1, 9, 30, 0, 123456, tzinfo=dt.timezone.utc),
    )
    assert st.uptime_seconds == 5400
    assert st.cost_so_far == pytest.approx(3.0)
    assert VMStatus("stopped", "stopped", price_per_hour=2.0).cost_so_far is None


def test_up_sends_autostop_to_the_box_and_status_shows_it(
    box: Box, moto: Moto, project: Path, tmp_path: Path
) -> None:
    iid = moto.instance()
    run = aws_laptop(box, moto, project, tmp_path, iid, autostop="30m")
    try:
        r = run("up")
        assert r.code == 0, r.err
        assert f"{box.name}: autostop after 30m idle" in r.out
        state = json.loads(
            retry_until(lambda: box.sh("cat ~/.remotedl/autostop.json", check=False).stdout, seconds=10)
            or "{}"
        )
        assert state["config"]["idle_seconds"] == 1800 and state["config"]["cloud"] == "aws"
        # the watcher runs on the box, detached from any ssh session
        watcher = retry_until(
            lambda: json.loads(box.sh("cat ~/.remotedl/autostop.json").stdout).get("watcher_pid"), seconds=20
        )
        assert watcher and not process_gone(watcher)

        r = run("status")
        assert r.code == 0, r.err
        assert f"{box.name}: autostop after 30m idle" in r.out

        # A real job on the box keeps it up: the watcher's look (through the agent's store and
        # the job's runtime) names it.
        r = run("run", "--detach", "--name", "longjob", "sleep", "300")
        assert r.code == 0, r.err
        run("autostop", "30m")  # a new watcher looks at once

        def busy() -> list[str]:
            shown = json.loads(run("autostop", "--json").out)
            return [a for a in shown["last_activity"] if "(longjob) running" in a]

        assert retry_until(busy, seconds=30)
        assert run("kill", "longjob").code == 0

        r = run("autostop", "2h", "--wait", "jobs")
        assert r.code == 0, r.err
        assert "autostop after 2h without jobs" in r.out
        r = run("autostop", "--off")
        assert r.code == 0, r.err
        assert "autostop off" in r.out
        r = run("autostop", "--json")
        assert json.loads(r.out)["idle_seconds"] is None
    finally:
        run("autostop", "--off")
        # Every watcher this test started (each `autostop` started one; a replaced one ends only
        # at its next tick, a minute on), not just the first and the last.
        for pid in autostop_watchers(box):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        box.sh("rm -f ~/.remotedl/autostop.json", check=False)


def test_cost_sums_jobs_by_gpu_share(box: Box, moto: Moto, project: Path, tmp_path: Path) -> None:
    """Two jobs on the 2-GPU sandbox box: one on one GPU, one on both; price 3.6/h."""
    iid = moto.instance()
    moto.ec2().start_instances(InstanceIds=[iid])
    run = aws_laptop(box, moto, project, tmp_path, iid, price_per_hour=3.6)
    assert run("run", "--gpu", "0", "--name", "one", "true").code == 0
    assert run("run", "--gpus", "2", "--name", "both", "true").code == 0
    r = run("cost", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    mine = {j["name"]: j for j in data["jobs"] if j["project"] == "proj" and j["name"] in ("one", "both")}
    assert mine["one"]["share"] == 0.5 and mine["both"]["share"] == 1.0
    for j in mine.values():
        assert j["cost"] == pytest.approx(3.6 * j["seconds"] / 3600 * j["share"])
    r = run("show", "one")
    assert r.code == 0, r.err
    assert re.search(r"cost\s+\$\d+\.\d\d \(50% of the box's GPUs\)", r.out), r.out
    assert json.loads(run("show", "both", "--json").out)["cost"] == pytest.approx(
        mine["both"]["cost"], abs=0.01
    )
    r = run("top", "--once")  # the VM's running cost beside its GPUs
    assert r.code == 0, r.err
    assert re.search(
        rf"{box.name}: AWS {iid} \(us-east-1\): running for .*, \$[\d.,]+ so far \(\$3\.60/h\)", r.out
    ), r.out
    r = run("cost", "--since", "1d")
    assert r.code == 0, r.err
    assert "proj" in r.out and "total $" in r.out


def test_job_cost_counts_only_the_time_since() -> None:
    from remotedl.cloud.cost import job_cost
    from remotedl.schema import JobRecord

    rec = JobRecord(
        id=1,
        name="a",
        command="x",
        cwd="/w/proj",
        status="succeeded",
        gpus=[0, 1],
        started=1000.0,
        ended=8200.0,
    )
    full = job_cost(rec, 2.0, 8, now=9000.0)
    assert full is not None and full.share == 0.25 and full.cost == pytest.approx(2.0 * 2 * 0.25)
    part = job_cost(rec, 2.0, 8, now=9000.0, since=4600.0)
    assert part is not None and part.seconds == 3600 and part.cost == pytest.approx(0.5)
    assert job_cost(rec, 2.0, 8, now=9000.0, since=8300.0) is None


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from remotedl.cloud import MissingExtra, provider_for

    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    vm = cloud_vm("gpu1", {"cloud": "aws", "region": "eu-west-1", "instance_id": "i-1"}.get)
    assert vm is not None
    with pytest.raises(MissingExtra) as e:
        provider_for(vm, {}).status()
    assert e.value.hint == "pip install 'remotedl[aws]'"
    assert e.value.exit_code == 3


def test_autostop_set_live_is_armed_again_after_a_restart(
    box: Box, moto: Moto, project: Path, tmp_path: Path
) -> None:
    iid = moto.instance()
    run = aws_laptop(box, moto, project, tmp_path, iid, auto_start=True)

    def watcher() -> int | None:
        text = box.sh("cat ~/.remotedl/autostop.json", check=False).stdout or "{}"
        pid = json.loads(text).get("watcher_pid")
        return pid if pid and not process_gone(pid) else None

    # Each watcher by its pid and start: a finalizer's kill never reaches a process that got a
    # dead watcher's pid since.
    pids: dict[int, int | None] = {}

    def seen(pid: int | None) -> int | None:
        if pid:
            pids.setdefault(pid, process_start(pid))
        return pid

    try:
        assert run("up").code == 0
        r = run("autostop", "45m")
        assert r.code == 0, r.err
        assert seen(retry_until(watcher, seconds=20))
        assert run("stop").code == 0
        # The VM's shutdown ends its watcher; a start by auto_start (push) arms it again.
        for pid, started in pids.items():
            kill_if_same(pid, started)
        r = run("push")
        assert r.code == 0, r.err
        assert "starting it (auto_start)" in r.err
        new = seen(retry_until(lambda: (p := watcher()) not in pids and p, seconds=20))
        assert new
        r = run("autostop")
        assert "autostop after 45m idle" in r.out
    finally:
        run("autostop", "--off")
        seen(watcher())
        for pid, started in pids.items():
            kill_if_same(pid, started)
        box.sh("rm -f ~/.remotedl/autostop.json", check=False)


def test_a_fleet_says_which_vm_is_stopped(box: Box, gce: FakeCloud, project: Path, tmp_path: Path) -> None:
    config = stale_ssh_config(box, tmp_path / "sshcfg")
    text = config.read_text()
    # a second alias for the same box: a VM whose cloud says it is stopped
    config.write_text(text + text.replace(f"Host {box.name}", "Host gpuvm2", 1).split("\n", 1)[1])
    (project / "remotedl.toml").write_text(
        f'host = ["{box.name}", "gpuvm2"]\n[hosts.{box.name}]\naddress = "ssh"\n'
        "[hosts.gpuvm2]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in gce.settings().items()) + "\n"
    )
    e = make_env(tmp_path / "laptop", cwd=project, REMOTEDL_SSH_CONFIG=str(config), **gce.environ(tmp_path))
    main(["status"], e)
    err = e.stderr.getvalue()  # type: ignore[attr-defined]
    assert "gpuvm2: gpuvm2 is a cloud VM and it is stopped (GCE gpu-1 (proj-1/europe-west4-a))" in err
    assert "remotedl up gpuvm2" in err


# An App built by a library caller (never through main), in a fresh interpreter: nothing that an
# earlier main() in this process set can stand in for what the import of remotedl.cli.app does.
LIBRARY_CALLER = """
import argparse, io, json, sys
from pathlib import Path
from remotedl.cli.app import App
from remotedl.env import Environment
given = json.loads(sys.argv[1])
env = Environment(environ=given["environ"], cwd=Path(given["cwd"]), stdout=io.StringIO(),
                  stderr=io.StringIO(), stdin_isatty=False)
spec = App(argparse.Namespace(subcommand="push"), env).spec()
print(json.dumps({"hostname": spec.hostname, "err": env.stderr.getvalue()}))
"""


def test_an_app_built_outside_main_starts_its_vm_too(
    box: Box, gce: FakeCloud, project: Path, tmp_path: Path
) -> None:
    project_with(project, box.name, {**gce.settings(), "auto_start": True})
    config = stale_ssh_config(box, tmp_path / "sshcfg")
    env = make_env(tmp_path / "laptop", cwd=project, REMOTEDL_SSH_CONFIG=str(config), **gce.environ(tmp_path))
    given = json.dumps({"environ": dict(env.environ), "cwd": str(project)})
    r = subprocess.run(
        [sys.executable, "-c", LIBRARY_CALLER, given], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert "is stopped; starting it (auto_start)" in got["err"]
    assert gce.ops("start", "stop") == ["start"] and gce.power == "running"
    assert got["hostname"] == "127.0.0.1"  # the address the cloud gave, not the stale one
