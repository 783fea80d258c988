"""Job events against the real sshd box: notifications sent from the box to local stand-ins
(tests/notifyfakes.py), stall detection with the stand-in nvidia-smi, outputs home at the end,
a desktop notification on the laptop, TensorBoard over several jobs' directories."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotedl import sandbox
from remotedl.notify import mask_url
from tests import notifyfakes
from tests.conftest import Box, _start, cli_for, make_env, retry_until
from tests.test_secrets import watch_argv

SECRET_ENV = "s3cr3t-env-value-42"
URL_SECRETS = notifyfakes.URL_SECRETS


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[notifyfakes.Services]:
    s = notifyfakes.start_services(tmp_path_factory.mktemp("notify-ca"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def ebox(tmp_path_factory: pytest.TempPathFactory, services: notifyfakes.Services) -> Iterator[Box]:
    """A box whose sessions reach Slack and Discord as a box behind a proxy does: through the
    stand-ins' HTTPS proxy, trusting the test CA (https_proxy, SSL_CERT_FILE)."""
    base = tmp_path_factory.mktemp("events-box")
    b = _start(base, "events", gpus=2, extra_env=services.env)
    yield b
    try:
        sandbox.down(make_env(base), name="events")
    except Exception as e:  # a finalizer never raises
        print(f"sandbox down failed: {e}")


@pytest.fixture
def proj(ebox: Box, project: Path, tmp_path: Path):
    """(run, project): the CLI against the events box, and a local project."""
    run = cli_for(ebox, tmp_path / "laptop")
    return run, project


def configure(project: Path, tmp_path: Path, urls: list[str], extra: str = "") -> None:
    (project / "remotedl.toml").write_text(
        f'remote_dir = "~/event-tests/{tmp_path.name}"\nnotify = {json.dumps(urls)}\n{extra}'
    )


def script(project: Path, name: str, body: str) -> None:
    path = project / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def hooks_for(services: notifyfakes.Services, job_id: int) -> list[dict]:
    return [
        h.json() for h in services.recorder.of("json") if h.json().get("remotedl", {}).get("job") == job_id
    ]


def wait_hook(services, job_id: int, event: str, seconds: float = 40) -> dict:
    found = retry_until(
        lambda: [p for p in hooks_for(services, job_id) if p["remotedl"]["event"] == event], seconds=seconds
    )
    assert found, f"no {event} notification for job {job_id}: {hooks_for(services, job_id)}"
    return found[0]


def show(run, project: Path, job_id: int) -> dict:
    r = run("show", str(job_id), "--json", cwd=project)
    assert r.code == 0, r.err
    return json.loads(r.out)


def when(value, condition):
    return value if condition(value) else None


def job_id_of(r) -> int:
    assert r.code == 0, r.err
    return int(r.out.strip().splitlines()[-1])


# ------------------------------------------------------------------ notifications


def test_the_box_sends_the_end_to_every_service_with_nothing_secret(proj, services, ebox, tmp_path):
    run, project = proj
    urls = services.urls()
    configure(project, tmp_path, list(urls.values()))
    script(project, "train.sh", 'for i in 1 2 3; do echo "epoch $i loss 0.$i"; done\necho "key=$API_KEY"\n')
    # Detached: the laptop is not there when the job ends; the box tells. No process on either
    # side ever has a URL's secret (or the --env value) in its arguments.
    with watch_argv(*URL_SECRETS, SECRET_ENV) as seen:
        r = run("run", "--detach", "-e", f"API_KEY={SECRET_ENV}", "train.sh", "--gpu", "1", cwd=project)
        job = job_id_of(r)
        payload = wait_hook(services, job, "succeeded")
        assert retry_until(lambda: len(show(run, project, job)["notifications"]) == 5, seconds=30)
    assert seen == []
    title = f"remotedl: job {job} (train.sh) succeeded on events"
    assert payload["title"] == title
    assert payload["type"] == "success"
    fields = payload["remotedl"]
    assert (fields["host"], fields["gpus"], fields["exit_code"], fields["status"]) == (
        "events",
        [1],
        0,
        "succeeded",
    )
    assert fields["duration"] is not None
    assert "epoch 3 loss 0.3" in payload["message"]
    assert "GPU 1" in payload["message"]
    assert "exit status: 0" in payload["message"]
    # The job printed its --env value: the notification shows **** instead.
    assert "key=****" in payload["message"]
    # Every other service got it too (Slack and Discord through the box's proxy).
    assert retry_until(
        lambda: all(_got(services, s, title) for s in ("ntfy", "slack", "discord", "email")), seconds=30
    )
    everything = json.dumps([h.body.decode("utf-8", "replace") for h in services.recorder.hits])
    everything += json.dumps(services.mails)
    assert SECRET_ENV not in everything
    for secret in ("slacksecrettoken123", "discordsecrettoken456", "hookpass789", "mailpass321"):
        assert secret not in json.dumps(payload)
    # show lists what was sent, URLs masked, and nothing secret anywhere in the record.
    rec = retry_until(
        lambda: when(show(run, project, job), lambda x: len(x["notifications"]) == 5), seconds=30
    )
    assert rec, show(run, project, job)
    assert all(n["ok"] and n["event"] == "succeeded" for n in rec["notifications"])
    assert "slack://T0TEST/B0TEST/****" in rec["notify"]
    dumped = json.dumps(rec)
    for secret in (*URL_SECRETS, SECRET_ENV):
        assert secret not in dumped
    text = run("show", str(job), cwd=project)
    assert "notified    succeeded -> slack://T0TEST/B0TEST/**** at" in text.out
    for secret in URL_SECRETS:
        assert secret not in text.out + text.err
    # The URLs left the box with the job: no file of the box's state holds them any more.
    state = ebox.home / ".remotedl"
    leftovers = [p for p in state.rglob("*") if p.is_file() and b"slacksecrettoken123" in p.read_bytes()]
    assert leftovers == []


def _got(services, service: str, title: str) -> bool:
    if service == "email":
        return any(f"Subject: {title}" in m["data"] for m in services.mails)
    return any(title in h.body.decode("utf-8", "replace") for h in services.recorder.of(service))


def test_failure_kill_and_start_after_the_queue(proj, services, tmp_path):
    run, project = proj
    configure(project, tmp_path, [services.urls()["json"]])
    script(project, "fail.sh", 'echo "about to fail"\nexit 3\n')
    script(project, "spin.sh", "echo spinning\nwhile :; do sleep 0.2; done\n")
    r = run("run", "fail.sh", "--gpu", "0", cwd=project)
    assert r.code == 3, r.err
    failed = max(j["id"] for j in json.loads(run("jobs", "--all", "--json", cwd=project).out))
    payload = wait_hook(services, failed, "failed")
    assert payload["title"].endswith("failed (exit 3) on events")
    assert payload["type"] == "failure"
    assert payload["remotedl"]["exit_code"] == 3
    assert "about to fail" in payload["message"]
    # A holds GPU 0; B waits for it in the queue, and says so when it starts.
    first = job_id_of(run("run", "--detach", "--name", "holder", "spin.sh", "--gpu", "0", cwd=project))
    second = job_id_of(
        run("run", "--detach", "--queue", "--name", "waiter", "spin.sh", "--gpu", "0", cwd=project)
    )
    assert show(run, project, second)["status"] == "queued"
    assert run("kill", str(first), "--grace", "2", cwd=project).code == 0
    killed = wait_hook(services, first, "killed")
    assert killed["title"] == f"remotedl: job {first} (holder) was killed on events"
    started = wait_hook(services, second, "started")
    assert "started after waiting in the queue" in started["title"]
    assert "in the queue" in started["message"]
    assert started["remotedl"]["gpus"] == [0]
    # Killed while still queued: no runner tells, the agent does.
    third = job_id_of(
        run("run", "--detach", "--queue", "--name", "never", "spin.sh", "--gpu", "0", cwd=project)
    )
    assert show(run, project, third)["status"] == "queued"
    assert run("kill", str(third), cwd=project).code == 0
    assert run("kill", str(second), "--grace", "2", cwd=project).code == 0
    assert wait_hook(services, third, "killed")["remotedl"]["status"] == "killed"
    assert wait_hook(services, second, "killed")
    # One notification per event, however many parts of the box saw the end: once each record
    # says its end was sent and no process holds a claim to send it, no other send can come.
    def all_sent() -> bool:
        recs = [show(run, project, job) for job in (first, second, third)]
        return all("ended" in r["events_sent"] and not r["event_claims"] for r in recs)

    assert retry_until(all_sent, seconds=40)
    for job in (first, second, third):
        events = [p["remotedl"]["event"] for p in hooks_for(services, job)]
        assert events.count("killed") == 1, events


def test_unreachable_endpoint_is_recorded_and_the_job_unaffected(proj, services, tmp_path):
    run, project = proj
    from remotedl.waiting import free_port

    dead = f"json://u:deadpass000@127.0.0.1:{free_port()}/deadsecretpath"
    configure(project, tmp_path, [dead, services.urls()["json"]])
    services.webhook.status = 500
    try:
        script(project, "ok.sh", "echo fine\n")
        r = run("run", "ok.sh", "--cpu", cwd=project)
        assert r.code == 0, r.err
        assert "fine" in r.out
        job = max(j["id"] for j in json.loads(run("jobs", "--all", "--json", cwd=project).out))
        rec = retry_until(
            lambda: when(show(run, project, job), lambda x: len(x["notifications"]) == 2), seconds=40
        )
        assert rec, show(run, project, job)
    finally:
        services.webhook.status = None
    assert rec["status"] == "succeeded" and rec["exit_code"] == 0
    by_url = {n["url"]: n for n in rec["notifications"]}
    refused = by_url[mask_url(dead)]
    assert mask_url(dead).startswith("json://u:****@127.0.0.1:")
    assert not refused["ok"] and "refused" in refused["error"].lower()
    answered = next(n for n in rec["notifications"] if n is not refused)
    assert not answered["ok"] and "HTTP 500" in answered["error"]
    text = run("show", str(job), cwd=project).out
    assert "NOT SENT: Connection refused" in text
    assert "deadpass000" not in text + json.dumps(rec) and "deadsecretpath" not in text + json.dumps(rec)


def test_a_bad_url_fails_the_run_before_anything_starts(proj, services, tmp_path):
    run, project = proj
    configure(project, tmp_path, ["slack://only-one-token-here"])
    script(project, "ok.sh", "echo fine\n")
    r = run("run", "ok.sh", "--cpu", cwd=project)
    assert r.code == 3
    assert "needs the webhook's three tokens" in r.err
    assert "only-one-token-here" not in r.err
    r = run("run", "--notify", "discord://12345", "--no-push", "ok.sh", "--cpu", cwd=project)
    assert r.code in (2, 3)
    configure(project, tmp_path, [])
    r = run("run", "--notify", "discord://12345", "ok.sh", "--cpu", cwd=project)
    assert r.code == 2
    assert "--notify" in r.err and "12345" not in r.err
    # --no-notify: the config's URLs are not used (nor checked) for this run.
    configure(project, tmp_path, ["slack://only-one-token-here"])
    assert run("run", "--no-notify", "ok.sh", "--cpu", cwd=project).code == 0


def test_lost_job_is_told_by_the_agent(proj, services, tmp_path):
    run, project = proj
    configure(project, tmp_path, [services.urls()["json"]])
    script(project, "spin.sh", "echo spinning\nwhile :; do sleep 0.2; done\n")
    job = job_id_of(run("run", "--detach", "spin.sh", "--cpu", cwd=project))
    rec = retry_until(lambda: when(show(run, project, job), lambda x: x.get("pgid")), seconds=20)
    assert rec
    # The box loses the job (as on an OOM kill of everything, or a crash of its tmux server).
    os.kill(rec["runner_pid"], signal.SIGKILL)
    os.killpg(rec["pgid"], signal.SIGKILL)
    assert retry_until(lambda: show(run, project, job)["status"] == "lost", seconds=20)
    payload = wait_hook(services, job, "lost")
    assert payload["title"] == f"remotedl: job {job} (spin.sh) was lost on events"
    assert payload["remotedl"]["log_tail"] == ""  # no runner: no log lines (it cannot hide --env values)


def set_utilization(box: Box, index: int, pct: int) -> None:
    path = box.dir / "gpus.json"
    state = json.loads(path.read_text())
    for g in state["gpus"]:
        if g["index"] == index:
            g["utilization"] = pct
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def test_stall_when_the_gpu_idles_cleared_by_activity(proj, services, ebox, tmp_path):
    run, project = proj
    configure(project, tmp_path, [services.urls()["json"]], 'stall_after = "2s"\n')
    script(project, "busy_log.sh", "while :; do echo step; sleep 0.2; done\n")  # talks, never computes
    set_utilization(ebox, 0, 0)
    job = job_id_of(run("run", "--detach", "busy_log.sh", "--gpu", "0", cwd=project))
    try:
        rec = retry_until(lambda: when(show(run, project, job), lambda x: x["stalled"]), seconds=30)
        assert rec, show(run, project, job)
        assert rec["status"] == "running" and rec["state"] == "stalled"
        # (the job's log also may have paused 2 s on a loaded machine: then both reasons are said)
        reasons = rec["stalled"]["reason"].split("; ")
        assert "no activity on GPU 0 for 2 s" in reasons, reasons
        payload = wait_hook(services, job, "stalled")
        assert payload["title"] == f"remotedl: job {job} (busy_log.sh) stalled on events"
        assert "stalled: " + rec["stalled"]["reason"] in payload["message"]
        listed = next(j for j in json.loads(run("jobs", "--json", cwd=project).out) if j["id"] == job)
        assert listed["status"] == "running" and listed["stalled"]["reason"]
        table = run("jobs", cwd=project).out
        assert any(line.split()[:3] == [str(job), "busy_log.sh", "stalled"] for line in table.splitlines())
        text = run("show", str(job), cwd=project).out
        assert "stalled since" in text and "(still running)" in text
        # The GPU works again: the mark goes, the job never stopped.
        set_utilization(ebox, 0, 63)
        assert retry_until(lambda: show(run, project, job)["stalled"] is None, seconds=30)
        rec = show(run, project, job)
        assert rec["state"] == "running" and rec["stalls"] == 1
        stalls = [p for p in hooks_for(services, job) if p["remotedl"]["event"] == "stalled"]
        assert len(stalls) == 1
    finally:
        set_utilization(ebox, 0, 0)
        run("kill", str(job), "--grace", "1", cwd=project)


def test_stall_when_the_log_goes_quiet_on_a_cpu_job(proj, services, ebox, tmp_path):
    run, project = proj
    configure(project, tmp_path, [services.urls()["json"]], 'stall_after = "2s"\n')
    # Says one thing, then nothing, until the test drops a file in its directory.
    script(project, "quiet.sh", "echo started\nwhile :; do [ -f talk ] && echo tick; sleep 0.2; done\n")
    job = job_id_of(run("run", "--detach", "quiet.sh", "--cpu", cwd=project))
    try:
        rec = retry_until(lambda: when(show(run, project, job), lambda x: x["stalled"]), seconds=30)
        assert rec, show(run, project, job)
        assert rec["stalled"]["reason"] == "no new log output for 2 s"
        assert rec["gpus"] == []
        assert wait_hook(services, job, "stalled")
        (Path(rec["workdir"]) / "talk").write_text("")
        assert retry_until(lambda: show(run, project, job)["stalled"] is None, seconds=30)
        assert show(run, project, job)["status"] == "running"
    finally:
        run("kill", str(job), "--grace", "1", cwd=project)
    # stall_after = "off": no watch at all.
    configure(project, tmp_path, [], 'stall_after = "off"\n')
    job = job_id_of(run("run", "--detach", "quiet.sh", "--cpu", cwd=project))
    try:
        assert show(run, project, job)["stall_after"] is None
        assert "stall watch off" in " ".join(run("show", str(job), cwd=project).out.split())
    finally:
        run("kill", str(job), "--grace", "1", cwd=project)


def test_pull_brings_the_checkpoint_home_and_keeps_newer_local_files(proj, tmp_path):
    run, project = proj
    configure(project, tmp_path, [], 'pull_on_end = ["metrics.json"]\n')
    (project / ".gitignore").write_text("checkpoints/\nmetrics.json\n")
    script(
        project,
        "train.sh",
        "mkdir -p checkpoints\necho weights-v1 > checkpoints/model.pt\necho box > checkpoints/notes.txt\n"
        "echo '{\"acc\": 0.9}' > metrics.json\necho trained\n",
    )
    import subprocess

    subprocess.run(["git", "-C", str(project), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "train"], check=True)
    # A note edited here after the job wrote its own: newer, so it stays.
    (project / "checkpoints").mkdir()
    local_note = project / "checkpoints" / "notes.txt"
    local_note.write_text("mine\n")
    later = time.time() + 3600
    os.utime(local_note, (later, later))
    r = run("run", "--pull", "checkpoints", "train.sh", "--cpu", cwd=project)
    assert r.code == 0, r.err
    assert (project / "checkpoints" / "model.pt").read_text() == "weights-v1\n"
    assert local_note.read_text() == "mine\n"
    assert json.loads((project / "metrics.json").read_text()) == {"acc": 0.9}
    assert "pulled checkpoints" in r.err and "from job" in r.err
    # A path the job never wrote: the job succeeded, the pull did not; the command says so.
    r = run("run", "--pull", "nope", "train.sh", "--cpu", cwd=project)
    assert r.code == 1
    assert "could not pull" in r.err
    # --detach cannot pull at the end (nothing follows it); pull_on_end just does not apply.
    r = run("run", "--detach", "--pull", "checkpoints", "train.sh", "--cpu", cwd=project)
    assert r.code == 2
    assert run("run", "--detach", "train.sh", "--cpu", cwd=project).code == 0


def test_desktop_notification_at_the_end_of_a_followed_job(proj, tmp_path):
    run, project = proj
    configure(project, tmp_path, [], "notify_desktop = true\n")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    seen = tmp_path / "desktop.txt"
    (fake / "notify-send").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {seen}\n')
    (fake / "notify-send").chmod(0o755)
    script(project, "ok.sh", "echo fine\nexit 4\n")
    r = run("run", "ok.sh", "--cpu", cwd=project, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.code == 4
    words = seen.read_text().splitlines()
    assert words[:2] == ["--app-name=remotedl", "--"]
    assert words[2].startswith("remotedl: job ") and words[2].endswith("(ok.sh) failed (exit 4) on events")
    assert "exit status: 4" in "\n".join(words[3:])
    # Without the setting, nothing is shown.
    configure(project, tmp_path, [])
    seen.unlink()
    r = run("run", "ok.sh", "--cpu", cwd=project, env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.code == 4
    assert not seen.exists()


def test_desktop_argv_without_notify_send_uses_osascript(tmp_path):
    from remotedl.desktop import desktop_argv

    (tmp_path / "osascript").write_text("#!/bin/sh\n")
    (tmp_path / "osascript").chmod(0o755)
    argv = desktop_argv("t 'x\"", "body $(y)", {"PATH": str(tmp_path)})
    assert argv is not None
    assert argv[0] == str(tmp_path / "osascript")
    assert argv[-2:] == ["t 'x\"", "body $(y)"]  # data, never code
    assert desktop_argv("t", "b", {"PATH": str(tmp_path / "none")}) is None


def test_tensorboard_over_the_jobs_directories(proj, ebox, tmp_path):
    from tests.test_tensorboard import get_json, stop_tensorboards, tensorboard_in_box_venv, write_scalars

    run, project = proj
    configure(project, tmp_path, [])
    for name, values in (("a", [1.0, 0.5]), ("b", [2.0, 1.5, 1.0])):
        write_scalars(project / "tb_src" / name, "loss", values)
    script(project, "train.sh", 'mkdir -p runs && cp -r "tb_src/$1" runs/\n')
    import subprocess

    subprocess.run(["git", "-C", str(project), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(project), "commit", "-qm", "events"], check=True)
    assert run("run", "--name", "lr-a", "train.sh", "a", "--cpu", cwd=project).code == 0
    assert run("run", "--name", "lr-b", "train.sh", "b", "--cpu", cwd=project).code == 0
    script(project, "nothing.sh", "echo no event files\n")
    assert run("run", "nothing.sh", "--cpu", cwd=project).code == 0  # has no runs/: left out
    ids = sorted(j["id"] for j in json.loads(run("jobs", "--all", "--json", cwd=project).out))
    a, b = ids[-3], ids[-2]
    tensorboard_in_box_venv(ebox, f"~/event-tests/{tmp_path.name}")
    from remotedl.waiting import free_port

    local = free_port()
    try:
        r = run("tensorboard", "--jobs", "--local-port", str(local), "--background", cwd=project)
        assert r.code == 0, r.err
        assert f"run {a}-lr-a:" in r.err and f"run {b}-lr-b:" in r.err
        assert f"{a}-lr-a:" in r.err.split("serving", 1)[1]  # one TensorBoard, --logdir_spec
        url = r.out.strip().splitlines()[-1]  # with TensorBoard's secret path prefix
        runs = get_json(url + "data/runs")
        assert sorted(runs) == [f"{a}-lr-a/a", f"{b}-lr-b/b"]
        points = get_json(url + f"data/plugin/scalars/scalars?run={b}-lr-b/b&tag=loss")
        assert [p[2] for p in points] == [2.0, 1.5, 1.0]
        # Naming jobs picks them; the same set again finds the running server.
        local2 = free_port()
        r = run("tensorboard", "--jobs", str(a), "--local-port", str(local2), "--background", cwd=project)
        assert r.code == 0, r.err
        assert get_json(r.out.strip().splitlines()[-1] + "data/runs") == [f"{a}-lr-a/a"]
        local3 = free_port()
        r = run("tensorboard", "--jobs", "--local-port", str(local3), "--background", cwd=project)
        assert "TensorBoard found running" in r.err
    finally:
        run("tunnel", "--stop", "all")
        stop_tensorboards(ebox)


def test_one_nvidia_smi_query_per_interval_for_all_jobs(tmp_path, monkeypatch):
    """Every job's stall watch reads the box's one shared sample while it is fresh."""
    from remotedl.agent import events

    calls = tmp_path / "calls"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "nvidia-smi").write_text(
        f"#!/bin/sh\necho call >> {calls}\n"
        "echo '0, NVIDIA H100 80GB HBM3, GPU-a, 00000000:18:00.0, 10, 81559, 37'\n"
        "echo '1, NVIDIA H100 80GB HBM3, GPU-b, 00000000:2A:00.0, 10, 81559, [N/A]'\n"
    )
    (bindir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("REMOTEDL_BOX_STATE", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    assert events.gpu_utilization(60) == {0: 37, 1: None}
    assert events.gpu_utilization(60) == {0: 37, 1: None}  # another job, same interval
    assert calls.read_text().count("call") == 1
    assert events.gpu_utilization(0) == {0: 37, 1: None}  # too old for this one: queried again
    assert calls.read_text().count("call") == 2


def test_stall_after_words():
    from remotedl.errors import ConfigError
    from remotedl.jobs import parse_duration

    assert parse_duration("15m") == 900
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_duration("2") == 2
    assert parse_duration(30) == 30
    for off in ("off", "0", "false", None):
        assert parse_duration(off) is None
    with pytest.raises(ConfigError):
        parse_duration("soon")
