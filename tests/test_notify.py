"""Notifications: Apprise's URL syntax parsed and masked; sends to local stand-ins of ntfy,
Slack, Discord, a JSON webhook and an SMTP server (tests/notifyfakes.py), all on 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from remotedl import notify
from remotedl.agent.client import build_agent
from remotedl.waiting import free_port
from tests import notifyfakes

SECRETS = notifyfakes.URL_SECRETS


@pytest.fixture
def services(tmp_path, monkeypatch):
    s = notifyfakes.start_services(tmp_path / "ca")
    for k, v in s.env.items():
        monkeypatch.setenv(k, v)
    yield s
    s.stop()


def event() -> notify.Event:
    rec = {
        "id": 7,
        "name": "train",
        "command": "python train.py --lr 0.1",
        "gpus": [0, 1],
        "status": "failed",
        "exit_code": 3,
        "created": 1000.0,
        "started": 1000.0,
        "ended": 1000.0 + 3725,
    }
    return notify.job_event(rec, "failed", "gpubox", tail="epoch 3 loss 0.25\nTraceback: boom")


# ------------------------------------------------------------------ parsing and masking


@pytest.mark.parametrize(
    ("url", "service", "masked"),
    [
        ("ntfy://mytopicname", "ntfy", "ntfy://my****"),
        ("ntfy://ntfy.example.com/alerts-xyz", "ntfy", "ntfy://ntfy.example.com/al****"),
        (
            "ntfys://bob:hunter22@ntfy.example.com:8443/jobs",
            "ntfy",
            "ntfys://bob:****@ntfy.example.com:8443/****",
        ),
        ("ntfy://tk_abcdefgh123@ntfy.example.com/jobsjobs", "ntfy", "ntfy://****@ntfy.example.com/jo****"),
        ("https://ntfy.sh/my-secret-topic", "ntfy", "ntfy://my****"),
        ("slack://T1234/B5678/XXXXsecretXXXX", "slack", "slack://T1234/B5678/****"),
        ("slack://bot@T1234/B5678/XXXXsecretXXXX/#general", "slack", "slack://bot@T1234/B5678/****/#general"),
        ("https://hooks.slack.com/services/T1234/B5678/XXXXsecretXXXX", "slack", "slack://T1234/B5678/****"),
        ("discord://112233/tokensecretvalue", "discord", "discord://112233/****"),
        ("https://discord.com/api/webhooks/112233/tokensecretvalue", "discord", "discord://112233/****"),
        ("json://hooks.example.com/path/secretpath", "json", "json://hooks.example.com/****/se****"),
        (
            "jsons://u:pw123456@hooks.example.com:8443/x?+X-Token=abcdef123",
            "json",
            "jsons://u:****@hooks.example.com:8443/****?+X-Token=****",
        ),
        (
            "mailto://me:pw987654@example.com?to=you@example.org",
            "email",
            "mailto://me:****@example.com?to=you@example.org",
        ),
        ("mailtos://me:pw987654@gmail.com", "email", "mailtos://me:****@gmail.com"),
        ("tgram://bottoken123/chatid456", "apprise", "tgram://****"),
    ],
)
def test_parse_and_mask(url, service, masked):
    t = notify.parse(url)
    assert t.service == service
    assert t.masked == masked
    assert notify.mask_url(url) == masked


def test_parse_details():
    t = notify.parse("ntfy://ntfy.example.com/alerts?priority=high&tags=gpu")
    assert t.endpoint == "http://ntfy.example.com"
    assert t.options["topics"] == ["alerts"]
    t = notify.parse("ntfy://tk_abcdefgh123@ntfy.example.com/jobs")
    assert ("Authorization", "Bearer tk_abcdefgh123") in t.headers
    assert notify.parse("ntfy://topic").endpoint == "https://ntfy.sh"
    t = notify.parse("https://hooks.slack.com/services/T1/B2/C3")
    assert t.endpoint == "https://hooks.slack.com/services/T1/B2/C3"
    t = notify.parse("discord://bot@1/2")
    assert t.endpoint == "https://discord.com/api/webhooks/1/2"
    assert t.options["botname"] == "bot"
    t = notify.parse("json://h:81/p?+X-A=1&x=2")
    assert t.endpoint == "http://h:81/p?x=2"
    assert t.headers == (("X-A", "1"),)
    t = notify.parse("mailtos://me:pw@gmail.com")
    assert (t.endpoint, t.port, t.options["mode"], t.options["to"]) == (
        "smtp.gmail.com",
        587,
        "starttls",
        ["me@gmail.com"],
    )
    t = notify.parse("mailto://u:p@mail.example.com:2525/a@x.org?to=b@x.org&from=box@x.org&mode=ssl")
    assert (t.port, t.options["to"], t.options["from"], t.options["mode"]) == (
        2525,
        ["a@x.org", "b@x.org"],
        "box@x.org",
        "ssl",
    )


@pytest.mark.parametrize(
    "url",
    [
        "slack://onlyone/two",
        "discord://justid",
        "ntfy://host.example.com/",
        "json://",
        "nonsense",
        "https://example.com/x",
    ],
)
def test_bad_urls_are_refused_without_secrets(url):
    with pytest.raises(notify.NotifyURLError) as e:
        notify.parse(url)
    for piece in ("onlyone", "justid"):
        assert piece not in str(e.value)


def test_mask_never_raises_and_hides_everything_it_cannot_parse():
    assert notify.mask_url("slack://secretsecret") == "slack://****"
    assert notify.mask_url("not a url with secret") == "****"


def test_job_event_says_what_was_promised():
    ev = event()
    assert ev.title == "remotedl: job 7 (train) failed (exit 3) on gpubox"
    assert "GPUs 0,1" in ev.text
    assert "duration: 1 h 2 min" in ev.text
    assert "exit status: 3" in ev.text
    assert "Traceback: boom" in ev.text
    assert ev.fields["exit_code"] == 3
    assert ev.fields["gpus"] == [0, 1]


def test_log_tail_is_bounded_and_hides_env_values(tmp_path):
    log = tmp_path / "log"
    lines = "".join(f"line {i}\n" for i in range(1000))
    log.write_text(lines + "token is s3cr3t-value\n\x1b[31mred\x1b[0m\n")
    tail = notify.log_tail(str(log), lines=5, hide=("s3cr3t-value",))
    assert tail.splitlines() == ["line 997", "line 998", "line 999", "token is ****", "red"]
    assert len(notify.log_tail(str(log), lines=1000, limit=300)) == 300


# ------------------------------------------------------------------ sending to the stand-ins


def test_every_service_receives_the_notification(services):
    urls = services.urls()
    outcomes = notify.send_all(list(urls.values()), event())
    assert [o.ok for o in outcomes] == [True] * 5, [o.error for o in outcomes]
    r = services.recorder
    (ntfy,) = r.of("ntfy")
    body = ntfy.json()
    assert body["topic"] == "rdl-topic-secret"
    assert body["title"] == "remotedl: job 7 (train) failed (exit 3) on gpubox"
    assert "Traceback: boom" in body["message"]
    (slack,) = r.of("slack")
    assert slack.path == "/services/T0TEST/B0TEST/slacksecrettoken123"
    assert "failed (exit 3)" in slack.json()["text"]
    (discord,) = r.of("discord")
    assert discord.path == "/api/webhooks/1234567/discordsecrettoken456"
    assert discord.json()["allowed_mentions"] == {"parse": []}
    (hook,) = r.of("json")
    assert hook.path == "/hook/abc123secret"
    assert hook.headers["Authorization"] == notifyfakes.basic("hookuser", "hookpass789")
    payload = hook.json()
    assert payload["type"] == "failure"
    assert payload["remotedl"]["exit_code"] == 3
    assert payload["remotedl"]["host"] == "gpubox"
    (mail,) = services.mails
    assert mail["login"] == "mailuser"
    assert mail["to"] == ["me@example.invalid"]
    assert "Subject: remotedl: job 7 (train) failed (exit 3) on gpubox" in mail["data"]
    # Slack and Discord went through the proxy, over TLS that the client verified.
    assert any(x.startswith("CONNECT hooks.slack.com:443") for x in services.proxy.requests)
    assert any(x.startswith("CONNECT discord.com:443") for x in services.proxy.requests)


def test_outcomes_and_errors_never_show_secrets(services):
    services.webhook.status = 500
    services.ntfy.auth = "Bearer tk_right"
    urls = services.urls()
    urls["email"] = urls["email"].replace("mailpass321", "wrongpass321")
    dead = free_port()
    urls["dead"] = f"json://u:deadpass000@127.0.0.1:{dead}/deadsecretpath"
    outcomes = notify.send_all(list(urls.values()), event())
    by = dict(zip(urls, outcomes, strict=True))
    assert by["slack"].ok and by["discord"].ok
    assert not by["json"].ok and "HTTP 500" in (by["json"].error or "")
    assert not by["ntfy"].ok and "HTTP 403" in (by["ntfy"].error or "")
    assert not by["email"].ok and "refused the login" in (by["email"].error or "")
    assert not by["dead"].ok and "refused" in (by["dead"].error or "").lower()
    shown = json.dumps([o.to_dict() for o in outcomes])
    for s in (*SECRETS, "wrongpass321", "deadpass000", "deadsecretpath"):
        assert s not in shown


def test_untrusted_certificate_is_a_failure_not_a_send(services, monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("SSL_CERT_DIR", str(services.ca.directory / "empty"))
    o = notify.send(services.urls()["slack"], event())
    assert not o.ok
    assert "certificate" in (o.error or "")
    assert services.recorder.of("slack") == []


def test_mail_over_starttls(tmp_path, monkeypatch):
    s = notifyfakes.start_services(tmp_path / "ca", smtp_tls=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(s.ca.ca_file))
    try:
        url = s.urls()["email"].replace("mailto://", "mailtos://")
        o = notify.send(url, event())
        assert o.ok, o.error
        (mail,) = s.mails
        assert mail["tls"] is True
        # Without TLS the stand-in refuses the login (it demands STARTTLS first).
        o = notify.send(s.urls()["email"], event())
        assert not o.ok
        assert "mailpass321" not in (o.error or "")
    finally:
        s.stop()


def test_unknown_scheme_without_apprise_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    o = notify.send("tgram://bottoken123/chatid456", event())
    assert not o.ok
    assert "apprise" in (o.error or "")
    assert "bottoken123" not in json.dumps(o.to_dict())


def test_sender_runs_from_the_agent_bundle_with_the_standard_library_only(services, tmp_path):
    """The box runs the notify package from the agent (python3 -E -s -S: no site-packages)."""
    target = tmp_path / "agent"
    zipfile.ZipFile(io.BytesIO(build_agent().zip_bytes())).extractall(target)
    code = (
        "import json, sys; from remotedl import notify; "
        "ev = notify.Event('succeeded', 'title', 'text'); "
        "print(json.dumps([o.to_dict() for o in notify.send_all(sys.argv[1:], ev)])); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('requests', 'urllib3', 'apprise')))"
    )
    env = {**os.environ, **services.env}
    r = subprocess.run(
        [sys.executable, "-E", "-s", "-S", "-c", code, *services.urls().values()],
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [o["ok"] for o in json.loads(lines[0])] == [True] * 5, lines[0]
    assert lines[1] == "[]"
    assert Path(target, "remotedl", "notify", "__init__.py").is_file()


def test_config_shows_notify_urls_masked(tmp_path):
    from tests.test_cli import run_main

    proj = tmp_path / "proj"
    proj.mkdir()
    (tmp_path / "config" / "remotedl").mkdir(parents=True)
    (tmp_path / "config" / "remotedl" / "config.toml").write_text(
        'notify = ["slack://T1/B2/slacksecrettoken123", "mailto://me:mailpass321@example.com"]\n'
    )
    code, out, err = run_main(tmp_path, "config", "--json", cwd=proj)
    assert code == 0, err
    value = json.loads(out)["settings"]["notify"]
    assert value == {
        "value": ["slack://T1/B2/****", "mailto://me:****@example.com"],
        "source": value["source"],
    }
    assert "user config" in value["source"]
    code, out, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 0, err
    assert "slack://T1/B2/****" in out
    for text in (out, err):
        assert "slacksecrettoken123" not in text and "mailpass321" not in text
    # A mistyped value is refused without being shown.
    (proj / "remotedl.toml").write_text('notify = "ntfy://u:pw-secret-99@host/topic"\n')
    code, out, err = run_main(tmp_path, "config", cwd=proj)
    assert code == 3
    assert "'notify' must be a list of strings" in err
    assert "pw-secret-99" not in err + out
