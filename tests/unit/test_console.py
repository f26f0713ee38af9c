"""The console's access rules: password hashes, sessions, CSRF and roles, through starlette's TestClient."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from starlette.testclient import TestClient

from syncbridge.cli import main
from syncbridge.config import parse_config
from syncbridge.console.auth import Action, Role, Sessions, may
from syncbridge.console.passwords import hash_password, verify_password, well_formed
from syncbridge.errors import ConfigError
from syncbridge.http import build_app
from syncbridge.runtime import Daemon
from tests.unit.test_outage import Flaky, _book

PASSWORDS = {"vera": "viewer-password-1", "fran": "front-desk-password-2", "ada": "admin-password-3"}
ROLES = {"vera": "viewer", "fran": "front_desk", "ada": "admin"}


def _conf(tmp_path: Path, **http: Any) -> dict[str, Any]:
    return {
        "practice": {"name": "Lakeside Therapy"},
        "store": {"path": str(tmp_path / "s.db")},
        "clinicians": {"dr_a": {"display_name": "Dr. A", "accounts": {"cal": {}}}},
        "connectors": {"cal": {"type": "tests.unit.test_outage:Flaky"}},
        "http": {"token": {"env": "SB_TEST_TOKEN"}} | http,
        "console": {
            "enabled": True,
            "session_key": {"env": "SB_TEST_SESSION_KEY"},
            "idle_timeout": 600,
            "users": {name: {"role": role, "password_hash": {"env": f"SB_TEST_HASH_{name.upper()}"}} for name, role in ROLES.items()},
        },
    }


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SB_TEST_TOKEN", "the-status-token")
    monkeypatch.setenv("SB_TEST_SESSION_KEY", "a-session-key-for-tests-only-0123456789")
    for name, password in PASSWORDS.items():
        monkeypatch.setenv(f"SB_TEST_HASH_{name.upper()}", hash_password(password, n=2**10))


@pytest.fixture
def daemon(tmp_path: Path, env: None) -> Iterator[Daemon]:
    import asyncio

    Flaky.down, Flaky.script, Flaky.attempts, Flaky.applied = False, [], 0, []
    d = Daemon(None, parse_config(yaml.safe_dump(_conf(tmp_path))))
    try:
        yield d
    finally:
        asyncio.run(d.close())


def _client(daemon: Daemon) -> TestClient:
    return TestClient(build_app(daemon), client=("127.0.0.1", 50000), follow_redirects=False)


def _login(daemon: Daemon, name: str) -> TestClient:
    client = _client(daemon)
    r = client.post("/console/login", data={"username": name, "password": PASSWORDS[name]})
    assert r.status_code == 303, r.text
    return client


def _csrf(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, "the page has no form with a CSRF field"
    return found.group(1)


def _audit(daemon: Daemon, kind: str) -> list[dict[str, Any]]:
    return daemon.store.audit_entries(kind=kind, limit=50)


# --- password hashes ------------------------------------------------------------------------


def test_a_password_hash_checks_the_password_and_nothing_else() -> None:
    """The hash line names its own parameters and salt; only the same password matches it."""
    line = hash_password("correct horse battery", n=2**10)
    assert line.startswith("scrypt$1024$8$1$") and well_formed(line)
    assert verify_password("correct horse battery", line)
    assert not verify_password("correct horse batterY", line)
    assert not verify_password("", line)
    assert hash_password("correct horse battery", n=2**10) != line  # a fresh salt each time


@pytest.mark.parametrize("line", ["", "plain-text-password", "bcrypt$1$2$3$4$5", "scrypt$1000$8$1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                                  "scrypt$4194304$8$1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA", "scrypt$1024$8$1$!!$!!"])
def test_a_malformed_or_too_costly_hash_matches_nothing(line: str) -> None:
    """A line that is not a usable scrypt hash (or would cost the server gigabytes) lets nobody in."""
    assert not well_formed(line)
    assert not verify_password("anything", line)


def test_syncbridge_passwd_prints_a_hash_of_the_password_on_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`syncbridge passwd` reads the password from stdin when it is not a terminal and prints only the hash on stdout."""
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["passwd", "fran"]) == 0
    out, err = capsys.readouterr()
    line = out.strip()
    assert verify_password("a long enough password", line) and "password" not in line
    assert "console.users.fran.password_hash" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["passwd"]) == 1


# --- configuration ---------------------------------------------------------------------------


def test_the_console_is_refused_without_a_key_to_sign_sessions(tmp_path: Path, env: None) -> None:
    """console.enabled without console.session_key or store.secret_key is a configuration error naming the key."""
    conf = _conf(tmp_path)
    del conf["console"]["session_key"]
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(conf))
    assert err.value.key == "console" and "session_key" in err.value.problem
    conf["store"]["secret_key"] = {"env": "SB_TEST_SESSION_KEY"}
    assert parse_config(yaml.safe_dump(conf)).console.enabled


def test_console_options_are_strict(tmp_path: Path, env: None) -> None:
    """An unknown role, an inline password or an unknown option is refused with its key."""
    for change, key in (
        (lambda c: c["console"]["users"]["vera"].update(role="owner"), "console.users.vera.role"),
        (lambda c: c["console"]["users"]["vera"].update(password_hash="scrypt$inline"), "console.users.vera.password_hash"),
        (lambda c: c["console"].update(idle_timout=5), "console.idle_timout"),
    ):
        conf = _conf(tmp_path)
        change(conf)
        with pytest.raises(ConfigError) as err:
            parse_config(yaml.safe_dump(conf))
        assert err.value.key == key


def test_roles_are_ordered() -> None:
    """A viewer may do nothing, front desk the single-session actions, an admin everything."""
    assert not any(may(Role.VIEWER, a) for a in Action)
    assert {a for a in Action if may(Role.FRONT_DESK, a)} == {Action.CANCEL, Action.NOSHOW, Action.CLOSE_WORK}
    assert all(may(Role.ADMIN, a) for a in Action)


# --- sessions --------------------------------------------------------------------------------


def test_pages_need_a_login_and_a_wrong_password_is_refused(daemon: Daemon) -> None:
    """Without a session every page leads to the login; a wrong password or unknown user gets no cookie."""
    client = _client(daemon)
    r = client.get("/console/sessions")
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
    for name, password in (("fran", "wrong-password"), ("nobody", "whatever-it-is")):
        r = client.post("/console/login", data={"username": name, "password": password})
        assert r.status_code == 401 and "set-cookie" not in r.headers
    r = client.post("/console/login", data={"username": "fran", "password": PASSWORDS["fran"], "next": "https://elsewhere.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/console/sessions"  # never sent to another site
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie and "Secure" not in cookie
    assert client.get("/console/sessions").status_code == 200
    assert _audit(daemon, "console_login")[0]["detail"] == {"user": "fran"}


def test_a_login_form_posted_from_another_site_is_refused(daemon: Daemon) -> None:
    """The login form is only taken from this site's own pages (a login CSRF)."""
    client = _client(daemon)
    form = {"username": "fran", "password": PASSWORDS["fran"]}
    assert client.post("/console/login", data=form, headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/console/login", data=form, headers={"Origin": "http://testserver"}).status_code == 303


def test_the_cookie_is_secure_when_the_listener_is_reached_over_https(tmp_path: Path, env: None) -> None:
    cfg = parse_config(yaml.safe_dump(_conf(tmp_path, public_url="https://sync.example.org")))
    sessions = Sessions(cfg)
    assert "; Secure" in sessions.cookie_header(sessions.open("fran"))


def test_too_many_failed_logins_lock_the_name_for_a_while(daemon: Daemon) -> None:
    client = _client(daemon)
    for _ in range(5):
        assert client.post("/console/login", data={"username": "ada", "password": "not-it-at-all"}).status_code == 401
    assert client.post("/console/login", data={"username": "ada", "password": PASSWORDS["ada"]}).status_code == 429


def test_a_session_ends_when_idle_removed_or_its_password_changes(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle past console.idle_timeout, a user removed from the config, or a new password: the cookie no longer opens pages."""
    sessions = Sessions(daemon.config)
    cookie = sessions.open("fran")
    assert sessions.user(cookie) is not None and sessions.user(cookie + "x") is None
    later = time.time() + 601
    with monkeypatch.context() as m:
        m.setattr(time, "time", lambda: later)
        assert sessions.user(cookie) is None
    assert sessions.user(cookie) is not None
    removed = daemon.config.model_copy(deep=True)
    del removed.console.users["fran"]
    assert Sessions(removed).user(cookie) is None
    monkeypatch.setenv("SB_TEST_HASH_FRAN", hash_password("a brand new password", n=2**10))
    assert Sessions(daemon.config).user(cookie) is None


def test_logging_out_clears_the_cookie(daemon: Daemon) -> None:
    client = _login(daemon, "vera")
    token = _csrf(client, "/console/sessions")
    r = client.post("/console/logout", data={"csrf": token})
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    assert client.get("/console/sessions").status_code == 303


# --- CSRF and roles --------------------------------------------------------------------------


def test_a_viewer_sees_no_actions_and_a_viewers_post_is_refused_and_audited(daemon: Daemon) -> None:
    appt = _book(daemon.engine)
    client = _login(daemon, "vera")
    page = client.get(f"/console/appointments/{appt}")
    assert page.status_code == 200 and "Cancel session" not in page.text and "Mark no-show" not in page.text
    assert "Close item" not in client.get("/console/worklist").text
    token = _csrf(client, "/console/sessions")  # the logout form's
    r = client.post(f"/console/appointments/{appt}/cancel", data={"csrf": token, "by": "client"})
    assert r.status_code == 403
    assert daemon.store.appointment(appt).fields["status"] == "booked"
    refused = _audit(daemon, "console_refused")
    assert refused[0]["detail"]["user"] == "vera" and "may not cancel" in refused[0]["detail"]["why"]
    assert refused[0]["detail"]["tried"] == f"POST /console/appointments/{appt}/cancel"


@pytest.mark.parametrize("token", [None, "", "forged-token"])
def test_a_post_without_the_sessions_csrf_token_is_refused_and_audited(daemon: Daemon, token: str | None) -> None:
    appt = _book(daemon.engine)
    client = _login(daemon, "fran")
    data = {"by": "client"} | ({"csrf": token} if token is not None else {})
    r = client.post(f"/console/appointments/{appt}/cancel", data=data)
    assert r.status_code == 403
    assert daemon.store.appointment(appt).fields["status"] == "booked"
    assert _audit(daemon, "console_refused")[0]["detail"] == {
        "user": "fran", "tried": f"POST /console/appointments/{appt}/cancel", "why": "no or wrong CSRF token"}


def test_a_post_without_a_session_is_refused(daemon: Daemon) -> None:
    appt = _book(daemon.engine)
    assert _client(daemon).post(f"/console/appointments/{appt}/cancel", data={"csrf": "x"}).status_code == 403
    assert daemon.store.appointment(appt).fields["status"] == "booked"


def test_front_desk_cancels_a_session_through_the_engine_with_its_name_in_the_audit(daemon: Daemon) -> None:
    appt = _book(daemon.engine)
    client = _login(daemon, "fran")
    token = _csrf(client, f"/console/appointments/{appt}")
    r = client.post(f"/console/appointments/{appt}/cancel", data={"csrf": token, "by": "clinician", "reason": "illness", "waive": "1"})
    assert r.status_code == 303 and r.headers["location"] == f"/console/appointments/{appt}?done=cancelled"
    stored = daemon.store.appointment(appt)
    record = stored.fields["cancellation"]
    assert stored.fields["status"] == "cancelled" and stored.updated_via == "console"
    assert record["by"] == "clinician" and record["via"] == "console" and record["reason"] == "illness"
    done = _audit(daemon, "cancelled")[0]  # the change's own entry names who made it
    assert done["appointment_id"] == appt and done["detail"]["user"] == "fran" and done["detail"]["version"] == stored.version
    assert daemon.store.outbox_due(float("inf"), 10)  # the calendar's write is queued
    page = client.get(r.headers["location"]).text
    assert "Cancelled in" in page and "Cancel session" not in page
    again = client.post(f"/console/appointments/{appt}/cancel", data={"csrf": token, "by": "client"})
    assert again.status_code == 409 and "already cancelled" in again.text


def test_front_desk_may_close_worklist_items_but_not_retry_or_confirm(daemon: Daemon) -> None:
    appt = _book(daemon.engine)
    with daemon.store.tx() as tx:
        tx.open_work("dead:cal:" + appt, "dead_letter", "could not update", "2027-01-01T00:00:00Z", "cal", appt)
        tx.open_work("guard:cal", "mass_cancel_guard", "held a pull", "2027-01-01T00:00:00Z", "cal")
    items = {w.kind: w.id for w in daemon.store.worklist()}
    fran = _login(daemon, "fran")
    token = _csrf(fran, "/console/worklist")
    page = fran.get("/console/worklist").text
    assert "Close item" in page and "Retry now" not in page and "Confirm held" not in page
    assert fran.post("/console/retry", data={"csrf": token, "connector": "cal", "appointment": appt}).status_code == 403
    assert fran.post(f"/console/worklist/{items['mass_cancel_guard']}/confirm", data={"csrf": token}).status_code == 403
    assert fran.post(f"/console/worklist/{items['dead_letter']}/close", data={"csrf": token, "note": ""}).status_code == 409
    r = fran.post(f"/console/worklist/{items['dead_letter']}/close", data={"csrf": token, "note": "fixed the calendar share"})
    assert r.status_code == 303
    closed = _audit(daemon, "worklist_close")[0]["detail"]
    assert closed["user"] == "fran" and closed["note"] == "fixed the calendar share"
    assert [w.kind for w in daemon.store.worklist()] == ["mass_cancel_guard"]

    ada = _login(daemon, "ada")
    token = _csrf(ada, "/console/worklist")
    assert "Confirm held" in ada.get("/console/worklist").text
    assert ada.post(f"/console/worklist/{items['mass_cancel_guard']}/confirm", data={"csrf": token}).status_code == 303
    assert daemon.store.worklist() == [] and _audit(daemon, "worklist_confirm")[0]["detail"]["user"] == "ada"
    assert ada.post("/console/retry", data={"csrf": token, "connector": "cal", "appointment": appt}).status_code == 303
    assert _audit(daemon, "console_retry")[0]["detail"]["user"] == "ada"


def test_the_token_keeps_the_status_page_and_metrics_while_browsers_go_to_the_console(daemon: Daemon) -> None:
    client = _client(daemon)
    assert client.get("/metrics", headers={"Authorization": "Bearer the-status-token"}).status_code == 200
    assert client.get("/", headers={"Authorization": "Bearer the-status-token"}).status_code == 200
    assert client.get("/", auth=("admin", "wrong")).status_code == 401
    r = client.get("/")
    assert r.status_code == 303 and r.headers["location"] == "/console/"


def test_pages_carry_no_client_names_and_security_headers(daemon: Daemon) -> None:
    appt = _book(daemon.engine, client_key="ck-123")
    client = _login(daemon, "vera")
    for path in ("/console/sessions?date=2027-01-05", f"/console/appointments/{appt}", "/console/worklist", "/console/status"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"] and r.headers["cache-control"] == "no-store"
        assert '<meta name="viewport"' in r.text and "<script" not in r.text
    sessions = client.get("/console/sessions?date=2027-01-05").text
    assert "ck-123" in sessions and "Dr. A" in sessions and "cal: pending write" in sessions


def test_the_console_is_off_unless_enabled(tmp_path: Path, env: None) -> None:
    import asyncio

    conf = _conf(tmp_path)
    conf["console"]["enabled"] = False
    d = Daemon(None, parse_config(yaml.safe_dump(conf)))
    try:
        client = _client(d)
        assert client.get("/console/login").status_code == 404
        assert client.get("/").status_code == 401  # no redirect: the token prompt as before
    finally:
        asyncio.run(d.close())


# --- bulk operations ---------------------------------------------------------------------------


def _book_days(daemon: Daemon, n: int) -> list[str]:
    from datetime import UTC, datetime, timedelta

    from syncbridge.model import empty_snapshot, iso

    first = datetime(2027, 1, 5, 15, tzinfo=UTC)
    ids = []
    for i in range(n):
        start = first + timedelta(hours=i)
        snap = empty_snapshot() | {"clinician": "dr_a", "start": iso(start), "end": iso(start + timedelta(minutes=50)),
                                   "timezone": "America/New_York", "client_key": f"ck-{i}", "service_code": "90834"}
        daemon.engine.change(f"sb-bulk-{i}", snap, via="ehr")
        ids.append(f"sb-bulk-{i}")
    return ids


SELECTION = {"clinician": "dr_a", "start": "2027-01-05", "end": "2027-01-05", "action": "cancel", "by": "clinician", "reason": "sick"}


def test_an_admin_previews_then_confirms_a_bulk_cancel(daemon: Daemon) -> None:
    """The preview lists every session and changes nothing; the confirmation cancels exactly those, as one audited operation."""
    ids = _book_days(daemon, 3)
    ada = _login(daemon, "ada")
    token = _csrf(ada, "/console/bulk")
    shown = ada.post("/console/bulk/preview", data=SELECTION | {"csrf": token})
    assert shown.status_code == 200 and "3 sessions would change" in shown.text and "ck-2" in shown.text
    assert all(daemon.store.appointment(i).fields["status"] == "booked" for i in ids)
    fields = dict(re.findall(r'<input type="hidden" name="(token|at)" value="([^"]+)"', shown.text))
    r = ada.post("/console/bulk/confirm", data=SELECTION | fields | {"csrf": token})
    assert r.status_code == 303 and r.headers["location"].startswith("/console/operations/op-")
    assert all(daemon.store.appointment(i).fields["status"] == "cancelled" for i in ids)
    op = r.headers["location"].rsplit("/", 1)[1]
    assert _audit(daemon, "bulk_operation")[0]["detail"]["by_user"] == "ada"
    progress = ada.get(r.headers["location"])
    assert progress.status_code == 200 and "3 of 3 sessions changed" in progress.text and op in progress.text


def test_a_bulk_confirmation_is_refused_when_the_sessions_changed_since_the_preview(daemon: Daemon) -> None:
    ids = _book_days(daemon, 2)
    ada = _login(daemon, "ada")
    token = _csrf(ada, "/console/bulk")
    shown = ada.post("/console/bulk/preview", data=SELECTION | {"csrf": token})
    fields = dict(re.findall(r'<input type="hidden" name="(token|at)" value="([^"]+)"', shown.text))
    _book_days(daemon, 3)  # a third session appears, the others get a new version
    r = ada.post("/console/bulk/confirm", data=SELECTION | fields | {"csrf": token})
    assert r.status_code == 409 and "changed since that preview" in r.text and "3 sessions would change" in r.text
    assert all(daemon.store.appointment(i).fields["status"] == "booked" for i in ids)


def test_only_an_admin_may_preview_or_confirm_bulk_operations(daemon: Daemon) -> None:
    _book_days(daemon, 1)
    fran = _login(daemon, "fran")
    assert "Bulk operations" not in fran.get("/console/sessions").text
    assert fran.get("/console/bulk").status_code == 403
    token = _csrf(fran, "/console/sessions")
    assert fran.post("/console/bulk/preview", data=SELECTION | {"csrf": token}).status_code == 403
    assert _audit(daemon, "console_refused")[0]["detail"]["why"] == "role front_desk may not bulk"


def test_a_worklist_item_links_to_the_record_in_the_systems_own_screens(tmp_path: Path, env: None) -> None:
    """With item_url set, the worklist and the receipt open the session where the item must be handled."""
    import asyncio

    from syncbridge.outbox import Outbox

    conf = _conf(tmp_path)
    conf["connectors"]["cal"]["item_url"] = "https://calendar.example.org/events/{external_id}"
    Flaky.down, Flaky.script, Flaky.attempts, Flaky.applied = False, [], 0, []
    d = Daemon(None, parse_config(yaml.safe_dump(conf)))
    try:
        appt = _book(d.engine)
        asyncio.run(Outbox(d.engine).drain())
        link = d.store.link("cal", appt)
        assert link is not None and link.external_id
        with d.store.tx() as tx:
            tx.open_work(f"attention:cal:{appt}", "needs_attention", "check this one", "2027-01-01T00:00:00Z", "cal", appt)
        fran = _login(d, "fran")
        expected = f'href="https://calendar.example.org/events/{link.external_id}"'
        assert expected in fran.get("/console/worklist").text
        assert expected in fran.get(f"/console/appointments/{appt}").text
    finally:
        asyncio.run(d.close())


@pytest.mark.parametrize("url", ["calendar.example.org/{external_id}", "https://ehr.example.org/appointments", "https://x.example/{id}/{external_id}"])
def test_an_item_url_without_its_placeholder_is_refused(tmp_path: Path, env: None, url: str) -> None:
    conf = _conf(tmp_path)
    conf["connectors"]["cal"]["item_url"] = url
    with pytest.raises(ConfigError, match="item_url"):
        parse_config(yaml.safe_dump(conf))
