"""remotedl dns against a real BIND (RFC 2136) and local servers speaking the providers' protocols.

Record data uses public addresses as values only; no traffic goes to them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import dnsfakes
from tests.conftest import make_env

IP1, IP2, IP3 = "81.2.69.160", "81.2.69.161", "81.2.69.162"
IP6 = "2a00:1450:4001:81b::200e"
NAME = "gpubox.example.test"

pytestmark = pytest.mark.skipif(not os.path.exists(dnsfakes.NAMED), reason="BIND (named) is not installed")


@pytest.fixture(scope="module")
def bind(tmp_path_factory):
    b = dnsfakes.start_bind(tmp_path_factory.mktemp("bind"))
    yield b
    b.stop()


@pytest.fixture
def echo():
    answers = {"a": IP1, "b": IP1, "c": IP1, "v6a": IP6, "v6b": IP6}
    fake = dnsfakes.ip_echo(answers)
    fake.answers = answers  # type: ignore[attr-defined]
    yield fake
    fake.stop()


@pytest.fixture
def name(request) -> str:
    # a record name of the test's own, so tests share the zone without meeting
    return f"t{abs(hash(request.node.name)) % 10**8}.example.test"


def toml(table: dict) -> str:
    lines = ["[dns]"]
    for k, v in table.items():
        lines.append(f"{k} = {json.dumps(v)}")
    return "\n".join(lines) + "\n"


def dns_cli(tmp_path: Path, table: dict, *argv: str, env: dict | None = None, where: str = "user"):
    """``remotedl dns ...`` with ``table`` as [dns] in the user config (where a user keeps the
    DNS of their box and its secrets) or, ``where="project"``, in the project's remotedl.toml."""
    from remotedl.cli import main

    proj = tmp_path / "proj"
    proj.mkdir(parents=True, exist_ok=True)
    user = tmp_path / "laptop" / "config" / "remotedl" / "config.toml"
    user.parent.mkdir(parents=True, exist_ok=True)
    (proj / "remotedl.toml").write_text(toml(table) if where == "project" else "")
    user.write_text(toml(table) if where == "user" else "")
    e = make_env(tmp_path / "laptop", cwd=proj, **(env or {}))
    code = main(["dns", *argv], e)
    return code, e.stdout.getvalue(), e.stderr.getvalue()


def rfc2136(bind, echo, name, **over) -> dict:
    table = {
        "name": name,
        "provider": "rfc2136",
        "zone": "example.test",
        "server": bind.server,
        "tsig_key_file": str(bind.key_file),
        "ttl": 60,
        "ip_sources": [f"{echo.url}/a", f"{echo.url}/b", f"{echo.url}/c"],
    }
    table.update(over)
    return table


def test_first_update_then_nothing_sent_when_right(bind, echo, name, tmp_path):
    code, out, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "update")
    assert code == 0, err
    assert bind.lookup(name) == [IP1]
    assert f"-> {IP1}" in out
    serial = bind.serial()
    code, out, _ = dns_cli(tmp_path, rfc2136(bind, echo, name), "update")
    assert code == 0
    assert "nothing sent" in out
    assert bind.serial() == serial  # no update reached the zone
    code, out, _ = dns_cli(tmp_path, rfc2136(bind, echo, name), "check")
    assert code == 0
    assert "matches" in out


def test_dry_run_sends_nothing(bind, echo, name, tmp_path):
    serial = bind.serial()
    code, out, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "update", "--dry-run")
    assert code == 0, err
    assert "would change nothing -> " + IP1 in out
    assert bind.lookup(name) == []
    assert bind.serial() == serial


def test_no_majority_updates_nothing_and_names_each_answer(bind, echo, name, tmp_path):
    echo.answers.update(a=IP1, b=IP2, c=IP3)
    serial = bind.serial()
    code, _, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "update")
    assert code == 1
    assert "disagree" in err
    for ip in (IP1, IP2, IP3):
        assert ip in err
    assert bind.serial() == serial


def test_majority_wins_and_bad_answers_are_rejected(bind, echo, name, tmp_path):
    echo.answers.update(a=IP2, b=IP2, c="10.1.2.3")
    code, _out, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "update", "--json")
    assert code == 0, err
    assert bind.lookup(name) == [IP2]
    echo.answers.update(a="10.1.2.3", b="127.0.0.1", c="<html>")
    code, _, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "update")
    assert code == 1
    assert "not a public unicast address" in err
    assert "not an IP address" in err


def test_command_sources(bind, echo, name, tmp_path):
    table = rfc2136(bind, echo, name, ip_sources=[f"cmd:echo {IP3}", f"cmd:printf {IP3}", f"{echo.url}/a"])
    code, _, err = dns_cli(tmp_path, table, "update", where="project")
    assert code == 3  # a project file's cmd: sources run nothing until the user allowed the file
    assert "remotedl allow" in err
    assert bind.lookup(name) != [IP3]
    from remotedl.cli import main

    assert main(["allow"], make_env(tmp_path / "laptop", cwd=tmp_path / "proj")) == 0
    code, _, err = dns_cli(tmp_path, table, "update", where="project")
    assert code == 0, err
    assert bind.lookup(name) == [IP3]  # two of three sources agree


def test_record_changed_behind_our_back_is_fixed(bind, echo, name, tmp_path):
    assert dns_cli(tmp_path, rfc2136(bind, echo, name), "update")[0] == 0
    bind.set(name, "A", IP3)  # someone else changed it
    code, out, err = dns_cli(tmp_path, rfc2136(bind, echo, name), "check")
    assert code == 1
    assert IP3 in err and IP1 in err
    code, out, _ = dns_cli(tmp_path, rfc2136(bind, echo, name), "update")
    assert code == 0
    assert f"{IP3} -> {IP1}" in out
    assert bind.lookup(name) == [IP1]


def test_ipv6_aaaa_is_separate(bind, echo, name, tmp_path):
    table = rfc2136(bind, echo, name, ipv6=True, ip_sources_v6=[f"{echo.url}/v6a", f"{echo.url}/v6b"])
    code, out, err = dns_cli(tmp_path, table, "update", "--json")
    assert code == 0, err
    assert bind.lookup(name, "AAAA") == [IP6]
    assert bind.lookup(name, "A") == [IP1]
    rep = json.loads(out)
    assert {f["record"] for f in rep["families"]} == {"A", "AAAA"}


def test_wrong_key_secret_and_name(bind, echo, name, tmp_path):
    bad = tmp_path / "bad.key"
    import base64

    wrong = base64.b64encode(os.urandom(32)).decode()
    bad.write_text(f'key "ddns-key" {{ algorithm hmac-sha256; secret "{wrong}"; }};\n')
    bad.chmod(0o600)
    code, out, err = dns_cli(tmp_path, rfc2136(bind, echo, name, tsig_key_file=str(bad)), "update", "--debug")
    assert code == 1
    assert "BADSIG" in err or "signature" in err
    assert wrong not in out + err  # never printed, not even with --debug
    bad.write_text(f'key "other-key" {{ algorithm hmac-sha256; secret "{bind.secret}"; }};\n')
    code, out, err = dns_cli(tmp_path / "2", rfc2136(bind, echo, name, tsig_key_file=str(bad)), "update")
    assert code == 1
    assert "BADKEY" in err or "does not know the TSIG key" in err
    assert bind.secret not in out + err
    assert bind.lookup(name) == []


def test_key_file_must_be_private(bind, echo, name, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_text(bind.key_file.read_text())
    loose.chmod(0o644)
    code, _, err = dns_cli(tmp_path, rfc2136(bind, echo, name, tsig_key_file=str(loose)), "update")
    assert code == 3
    assert "chmod 600" in err
    assert bind.secret not in err


def test_secret_from_environment(bind, echo, name, tmp_path):
    table = rfc2136(bind, echo, name, tsig_key_name="ddns-key")
    del table["tsig_key_file"]
    code, out, err = dns_cli(tmp_path, table, "update", env={"REMOTEDL_DNS_TSIG_SECRET": bind.secret})
    assert code == 0, err
    assert bind.lookup(name) == [IP1]
    assert bind.secret not in out + err


def test_refused_update_is_explained(bind, echo, tmp_path):
    # A name outside the zone the key may update: the server answers NOTZONE / REFUSED.
    table = rfc2136(bind, echo, "box.elsewhere.test", zone="elsewhere.test")
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 1
    assert "NOTAUTH" in err or "REFUSED" in err or "refused" in err or "not authoritative" in err


def test_watch_loops_and_follows_changes(bind, echo, name, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (tmp_path / "cfg" / "remotedl").mkdir(parents=True)
    (tmp_path / "cfg" / "remotedl" / "config.toml").write_text(toml(rfc2136(bind, echo, name)))
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    out = subprocess.run(
        [sys.executable, "-m", "remotedl", "dns", "watch", "--interval", "0.2s", "--runs", "3"],
        cwd=proj,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    assert f"-> {IP1}" in lines[0]
    assert "nothing sent" in lines[1] and "nothing sent" in lines[2]


# ------------------------------------------------------------------ Cloudflare


def cf_table(cf, echo, name, token_file) -> dict:
    return {
        "name": name,
        "provider": "cloudflare",
        "zone": "example.test",
        "api_url": cf.api,
        "token_file": str(token_file),
        "ttl": 120,
        "ip_sources": [f"{echo.url}/a", f"{echo.url}/b"],
    }


def test_cloudflare_create_update_keep_ttl_not_proxied(echo, tmp_path):
    token = "cf-" + os.urandom(8).hex()
    cf = dnsfakes.Cloudflare(token, "example.test")
    tf = tmp_path / "cf.token"
    tf.write_text(token + "\n")
    tf.chmod(0o600)
    try:
        table = cf_table(cf, echo, NAME, tf)
        code, out, err = dns_cli(tmp_path, table, "update", "--debug")
        assert code == 0, err
        (rec,) = cf.records.values()
        assert rec["content"] == IP1
        assert rec["proxied"] is False
        assert rec["ttl"] == 120
        assert token not in out + err
        writes = len(cf.writes())
        assert dns_cli(tmp_path, table, "update")[0] == 0
        assert len(cf.writes()) == writes  # nothing sent when right
        rec["ttl"] = 300  # set by the user in the dashboard: kept
        echo.answers.update(a=IP2, b=IP2)
        code, out, err = dns_cli(tmp_path, table, "update")
        assert code == 0, err
        (rec,) = cf.records.values()
        assert rec["content"] == IP2
        assert rec["ttl"] == 300
        # A bad token: a clear error, and the token is not printed.
        tf.write_text("wrong-token")
        code, out, err = dns_cli(tmp_path / "x", table, "update")
        assert code == 1
        assert "refused the API token" in err
        assert "wrong-token" not in err
    finally:
        cf.http.stop()


# ------------------------------------------------------------------ dyndns2


@pytest.fixture
def dyn(bind):
    fake = dnsfakes.Dyndns2(bind, "alice", "pw-" + os.urandom(6).hex())
    yield fake
    fake.http.stop()


def dyn_table(dyn, bind, echo, name, pw_file) -> dict:
    return {
        "name": name,
        "provider": "dyndns2",
        "server": dyn.http.url,
        "username": "alice",
        "password_file": str(pw_file),
        "check_server": bind.server,
        "ip_sources": [f"{echo.url}/a", f"{echo.url}/b"],
    }


def pw(tmp_path, dyn) -> Path:
    f = tmp_path / "dyn.pw"
    f.write_text(dyn.password)
    f.chmod(0o600)
    return f


def test_dyndns2_good_then_nothing_sent(dyn, bind, echo, name, tmp_path):
    table = dyn_table(dyn, bind, echo, name, pw(tmp_path, dyn))
    code, _out, err = dns_cli(tmp_path, table, "update")
    assert code == 0, err
    assert bind.lookup(name) == [IP1]
    sent = [r for r in dyn.http.requests if r.path == "/nic/update"]
    assert len(sent) == 1
    assert sent[0].headers["User-Agent"].startswith("remotedl/")
    assert sent[0].query["hostname"] == [name] and sent[0].query["myip"] == [IP1]
    assert dns_cli(tmp_path, table, "update")[0] == 0
    assert len([r for r in dyn.http.requests if r.path == "/nic/update"]) == 1


@pytest.mark.parametrize(
    "code_word", ["badauth", "!donator", "notfqdn", "nohost", "numhost", "abuse", "badagent"]
)
def test_dyndns2_fatal_answers_stop_until_config_changes(dyn, bind, echo, name, tmp_path, code_word):
    dyn.answer = code_word
    table = dyn_table(dyn, bind, echo, name, pw(tmp_path, dyn))
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 1
    assert f"'{code_word}'" in err
    before = len(dyn.http.requests)
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 1
    assert "not sending" in err
    assert len(dyn.http.requests) == before  # nothing was sent
    dyn.answer = None
    table["ttl"] = 61  # any change of the configuration re-enables updates
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 0, err
    assert bind.lookup(name) == [IP1]


@pytest.mark.parametrize("code_word", ["911", "dnserr"])
def test_dyndns2_server_trouble_backs_off_30_minutes(dyn, bind, echo, name, tmp_path, code_word):
    dyn.answer = code_word
    table = dyn_table(dyn, bind, echo, name, pw(tmp_path, dyn))
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 1
    assert "30 minutes" in err
    before = len(dyn.http.requests)
    code, _, err = dns_cli(tmp_path, table, "update")
    assert code == 1
    assert "backing off until" in err
    assert len(dyn.http.requests) == before
    state = json.loads(next((tmp_path / "laptop" / "state").rglob("*.json")).read_text())
    import time

    assert state["backoff_until"] - time.time() > 29 * 60


def test_dyndns2_wrong_password_is_badauth(dyn, bind, echo, name, tmp_path):
    f = tmp_path / "wrong.pw"
    f.write_text("not-the-password")
    f.chmod(0o600)
    code, out, err = dns_cli(tmp_path, dyn_table(dyn, bind, echo, name, f), "update", "--debug")
    assert code == 1
    assert "badauth" in err
    assert "not-the-password" not in out + err


# ------------------------------------------------------------------ DuckDNS


def test_duckdns_ok_and_ko(bind, echo, tmp_path):
    token = "duck-" + os.urandom(8).hex()
    duck = dnsfakes.DuckDns(bind, token)
    try:
        table = {
            "name": "gpubox.duckdns.org",
            "provider": "duckdns",
            "api_url": duck.http.url + "/update",
            "check_server": bind.server,
            "ip_sources": [f"{echo.url}/a", f"{echo.url}/b"],
        }
        code, out, err = dns_cli(tmp_path, table, "update", "--debug", env={"REMOTEDL_DUCKDNS_TOKEN": token})
        assert code == 0, err
        assert bind.lookup("gpubox.duckdns.org") == [IP1]
        (req,) = [r for r in duck.http.requests if r.path == "/update"]
        assert req.query["verbose"] == ["true"]
        assert req.query["domains"] == ["gpubox"]
        assert token not in out + err
        code, _, err = dns_cli(
            tmp_path / "2",
            {**table, "name": "other.duckdns.org"},
            "update",
            env={"REMOTEDL_DUCKDNS_TOKEN": "wrong"},
        )
        assert code == 1
        assert "KO" in err
        assert "wrong" not in err.replace("is wrong", "")
    finally:
        duck.http.stop()


def test_missing_dns_table_and_bad_provider(tmp_path):
    from remotedl.cli import main

    e = make_env(tmp_path, cwd=tmp_path)
    assert main(["dns", "check"], e) == 3
    assert "no [dns] table" in e.stderr.getvalue()
    code, _, err = dns_cli(tmp_path, {"name": NAME, "provider": "route53"}, "check")
    assert code == 3
    assert "not one of" in err


# ------------------------------------------------------------------ network trouble


def test_unreachable_sources_and_provider_say_why_in_one_line(echo, tmp_path):
    from remotedl.waiting import free_port

    closed = free_port()  # nothing listens there
    table = {
        "name": NAME,
        "provider": "cloudflare",
        "zone": "example.test",
        "api_url": f"http://127.0.0.1:{closed}/client/v4",
        "ip_sources": [f"http://127.0.0.1:{closed}/ip"],
    }
    env = {"REMOTEDL_CLOUDFLARE_TOKEN": "tok-" + os.urandom(6).hex()}
    code, _, err = dns_cli(tmp_path, table, "check", env=env)
    assert code == 1
    assert err.splitlines()[0] == (
        f"remotedl: error: no IPv4 source answered: http://127.0.0.1:{closed}/ip: error: connection refused"
    )
    assert len(err.splitlines()) == 2  # the error and its hint
    for dump in ("urllib3", "HTTPConnectionPool", "Max retries", "NewConnectionError", "object at"):
        assert dump not in err
    table["ip_sources"] = [f"{echo.url}/a"]  # the address is found; the provider is not reached
    code, out, err = dns_cli(tmp_path, table, "check", "--json", env=env)
    assert code == 1
    assert err == ""
    assert json.loads(out)["error"] == "Cloudflare API unreachable: connection refused"


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"),
    reason="needs root for a private network namespace (no DNS server reachable)",
)
def test_unresolvable_source_name_without_network(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    table = {"name": NAME, "provider": "duckdns", "ip_sources": ["https://ipecho.example.invalid/"]}
    (proj / "remotedl.toml").write_text(toml(table))
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "s")}
    env["REMOTEDL_DUCKDNS_TOKEN"] = "tok"
    argv = ["unshare", "-n", sys.executable, "-m", "remotedl", "dns", "check"]
    out = subprocess.run(argv, cwd=proj, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines()[0] == (
        "remotedl: error: no IPv4 source answered: https://ipecho.example.invalid/: "
        "error: cannot resolve host name 'ipecho.example.invalid'"
    )
    assert "urllib3" not in out.stderr


# ------------------------------------------------------------------ a cloned project and the user's secrets


def _laptop_key(tmp_path: Path, text: str) -> Path:
    """A secret of the laptop's, outside the project (a private key, say)."""
    key = tmp_path / "laptop" / "home" / ".ssh" / "id_ed25519"
    key.parent.mkdir(parents=True, exist_ok=True)
    key.write_text(text)
    key.chmod(0o600)
    return key


def _allow(tmp_path: Path, **env: str) -> str:
    from remotedl.cli import main

    e = make_env(tmp_path / "laptop", cwd=tmp_path / "proj", **env)
    assert main(["allow"], e) == 0, e.stderr.getvalue()
    return e.stdout.getvalue()


def test_project_file_cannot_read_a_laptop_file_outside_it_until_allowed(dyn, bind, echo, name, tmp_path):
    # A cloned project names the user's private key as the dyndns2 password, and its own server.
    key = _laptop_key(tmp_path, dyn.password)  # what arrives, if anything does, is the "key"
    table = dyn_table(dyn, bind, echo, name, key)
    code, out, err = dns_cli(tmp_path, table, "update", where="project")
    assert code == 3, out + err
    assert "dns.password_file" in err and "outside the project" in err and "remotedl allow" in err
    assert dyn.password not in out + err
    assert dyn.http.requests == []  # nothing reached the project's server, secret or not
    assert bind.lookup(name) == []
    # The user read the file and allowed it: now it is theirs to use.
    assert "dns.password_file" in _allow(tmp_path)
    code, out, err = dns_cli(tmp_path, table, "update", where="project")
    assert code == 0, err
    assert bind.lookup(name) == [IP1]
    # Any change to the file needs allow again.
    code, _, err = dns_cli(tmp_path, {**table, "ttl": 61}, "update", where="project")
    assert code == 3 and "dns.password_file" in err


def test_project_server_gets_no_secret_of_the_user_until_allowed(dyn, bind, echo, name, tmp_path):
    """The user config holds the secret (a file it names, or the environment); the project
    names the server: nothing is sent there until the user allowed the project file."""
    from remotedl.cli import main

    key = _laptop_key(tmp_path, dyn.password)
    proj = tmp_path / "proj"
    proj.mkdir()
    project_table = {k: v for k, v in dyn_table(dyn, bind, echo, name, key).items() if k != "password_file"}
    (proj / "remotedl.toml").write_text(toml(project_table))
    user = tmp_path / "laptop" / "config" / "remotedl" / "config.toml"
    user.parent.mkdir(parents=True)
    user.write_text(toml({"name": "home.example.test", "provider": "dyndns2", "password_file": str(key)}))

    def update(**env: str) -> tuple[int, str]:
        e = make_env(tmp_path / "laptop", cwd=proj, **env)
        code = main(["dns", "update"], e)
        return code, e.stdout.getvalue() + e.stderr.getvalue()

    code, out = update()
    assert code == 3, out
    assert "dns.server" in out and f"sends your dyndns2 password from {key}" in out
    assert dyn.password not in out
    user.write_text("")  # from the environment instead: the same
    code, out = update(REMOTEDL_DYNDNS2_PASSWORD=dyn.password)
    assert code == 3, out
    assert "REMOTEDL_DYNDNS2_PASSWORD" in out and dyn.password not in out
    assert dyn.http.requests == []
    _allow(tmp_path, REMOTEDL_DYNDNS2_PASSWORD=dyn.password)
    code, out = update(REMOTEDL_DYNDNS2_PASSWORD=dyn.password)
    assert code == 0, out
    assert bind.lookup(name) == [IP1]
    sent = [r for r in dyn.http.requests if r.path == "/nic/update"]
    assert len(sent) == 1


def test_project_with_its_own_secret_or_the_users_server_needs_no_allow(dyn, bind, echo, name, tmp_path):
    # The project's own password file (inside it) to its own server: its secret, its business.
    proj = tmp_path / "proj"
    proj.mkdir()
    own = proj / "dyn.pw"
    own.write_text(dyn.password)
    own.chmod(0o600)
    code, _, err = dns_cli(tmp_path, dyn_table(dyn, bind, echo, name, "dyn.pw"), "update", where="project")
    assert code == 0, err
    assert bind.lookup(name) == [IP1]
