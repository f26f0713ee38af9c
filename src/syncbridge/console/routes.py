"""The console's routes on the daemon's one listener, under ``/console``.

Every page needs a session (log in with a configured user's password); every POST must carry
the session's CSRF token and come from a role allowed to act. A refused POST answers 403 and
is written to the audit with the user's name and what was tried. With ``console.enabled``
false (the default) every console path answers 404.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import AuthError, ConfigError, SyncbridgeError
from ..model import iso, utcnow
from . import csrf
from .actions import ActionRefused, cancel_session, close_work, confirm_held, record_refusal, retry_dead
from .auth import COOKIE, Action, Sessions, User, authenticate
from .forms import Form, FormTooLarge, read_form
from .layout import e, notice, page
from .views import appointment_page, parse_day, sessions_page, status_page, worklist_page

if TYPE_CHECKING:
    from ..runtime import Daemon

__all__ = ["console_routes"]

log = structlog.get_logger("syncbridge.console")

#: failed logins per user name within ``_LOCK_WINDOW`` seconds before that name is refused for a while
_MAX_FAILURES, _LOCK_WINDOW = 5, 300.0
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}
_DONE = {
    "cancelled": "Cancelled. The systems below fill in as each applies it.",
    "noshow": "Marked as a no-show. The systems below fill in as each applies it.",
    "closed": "Worklist item closed.",
    "confirmed": "Held cancellations confirmed; the next pull applies them.",
    "retried": "The write was queued again and is sent now.",
}

Handler = Callable[[Request, User, Form], Awaitable[Response]]


class _Console:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.failures: dict[str, deque[float]] = defaultdict(deque)

    # --- sessions and responses ----------------------------------------------------------

    def sessions(self) -> Sessions | None:
        """The session keeper for the configuration in force; None when the console is off."""
        if not self.daemon.config.console.enabled:
            return None
        try:
            return Sessions(self.daemon.config)
        except (ConfigError, AuthError) as err:
            log.error("console_unavailable", problem=str(err))
            return None

    def render(self, request: Request, sessions: Sessions, user: User | None, title: str, body: str, *,
               current: str = "", status: int = 200, refresh: int | None = None) -> HTMLResponse:
        html = page(title, body, practice=self.daemon.config.practice.name, user=user, current=current, refresh=refresh)
        response = HTMLResponse(html, status, headers=_HEADERS)
        if user is not None:
            renewed = sessions.renew(request.cookies.get(COOKIE, ""))
            if renewed is not None:  # the idle timeout starts over with every request
                response.headers.append("set-cookie", sessions.cookie_header(renewed))
        return response

    def to_login(self, request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?next={quote(path)}", 303, headers=_HEADERS)

    def page_route(self, title: str, current: str, build: Callable[[Request, User], str | Response], refresh: int | None = None
                   ) -> Callable[[Request], Awaitable[Response]]:
        """A GET page for any logged-in user."""

        async def handle(request: Request) -> Response:
            sessions = self.sessions()
            if sessions is None:
                return PlainTextResponse("not found", 404)
            user = sessions.user(request.cookies.get(COOKIE))
            if user is None:
                return self.to_login(request)
            built = build(request, user)
            if isinstance(built, Response):
                return built
            done = _DONE.get(request.query_params.get("done", ""))
            return self.render(request, sessions, user, title, (notice(done) if done else "") + built, current=current, refresh=refresh)

        return handle

    def post_route(self, action: Action | None, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A POST: a session, its CSRF token and a role allowed ``action``, or 403 (audited)."""

        async def handle(request: Request) -> Response:
            sessions = self.sessions()
            if sessions is None:
                return PlainTextResponse("not found", 404)
            try:
                form = await read_form(request)
            except FormTooLarge:
                return PlainTextResponse("form too large", 413)
            user = sessions.user(request.cookies.get(COOKIE))
            tried = f"POST {request.url.path}"
            if user is None:
                log.warning("console_refused", user=None, tried=tried, why="no session")
                return PlainTextResponse("refused: log in first", 403, headers=_HEADERS)
            if not csrf.check(user, form.get(csrf.FIELD)):
                record_refusal(self.daemon.store, user.name, tried, "no or wrong CSRF token")
                return PlainTextResponse("refused: the form is not one this session was given (reload the page)", 403, headers=_HEADERS)
            if action is not None and not user.may(action):
                record_refusal(self.daemon.store, user.name, tried, f"role {user.role.value} may not {action.value}")
                return PlainTextResponse(f"refused: a {user.role.value.replace('_', ' ')} may not do this", 403, headers=_HEADERS)
            try:
                return await handler(request, user, form)
            except ActionRefused as err:
                return self.render(request, sessions, user, "Not done", notice(str(err), "error") + '<p><a href="/console/sessions">Back</a></p>', status=409)
            except SyncbridgeError as err:
                log.warning("console_action_failed", user=user.name, tried=tried, kind=err.kind)
                return self.render(request, sessions, user, "Not done", notice(f"not done: {err}", "error"), status=409)

        return handle

    # --- login -------------------------------------------------------------------------------

    def _login_form(self, next_path: str, error: str | None = None) -> str:
        return (
            (notice(error, "error") if error else "")
            + '<form class="action" method="post" action="/console/login">'
            f'<input type="hidden" name="next" value="{e(next_path)}">'
            '<label for="l-user">User name</label><input type="text" id="l-user" name="username" autocomplete="username" required autofocus>'
            '<label for="l-pass">Password</label><input type="password" id="l-pass" name="password" autocomplete="current-password" required>'
            '<button type="submit">Log in</button></form>'
        )

    async def login_get(self, request: Request) -> Response:
        sessions = self.sessions()
        if sessions is None:
            return PlainTextResponse("not found", 404)
        next_path = _local_path(request.query_params.get("next"))
        return self.render(request, sessions, None, "Log in", self._login_form(next_path))

    async def login_post(self, request: Request) -> Response:
        sessions = self.sessions()
        if sessions is None:
            return PlainTextResponse("not found", 404)
        origin = request.headers.get("origin")
        public = urlsplit(self.daemon.config.http.public_url or "").netloc
        if origin and origin != "null" and urlsplit(origin).netloc not in (request.headers.get("host"), public):
            log.warning("console_refused", user=None, tried="POST /console/login", why="cross-site login form")
            return PlainTextResponse("refused: cross-site login", 403, headers=_HEADERS)
        try:
            form = await read_form(request)
        except FormTooLarge:
            return PlainTextResponse("form too large", 413)
        name, password = (form.get("username") or "").strip(), form.get("password") or ""
        next_path = _local_path(form.get("next"))
        recent = self.failures[name]
        now = time.monotonic()
        while recent and now - recent[0] > _LOCK_WINDOW:
            recent.popleft()
        if len(recent) >= _MAX_FAILURES:
            log.warning("console_login_throttled", user=name if name in self.daemon.config.console.users else None)
            return self.render(request, sessions, None, "Log in", self._login_form(next_path, "Too many failed attempts: wait a few minutes."), status=429)
        if not authenticate(self.daemon.config, name, password):
            recent.append(now)
            known = name in self.daemon.config.console.users
            log.warning("console_login_failed", user=name if known else None)
            return self.render(request, sessions, None, "Log in", self._login_form(next_path, "Wrong user name or password."), status=401)
        self.failures.pop(name, None)
        with self.daemon.store.tx() as tx:
            tx.audit.add(iso(utcnow()), "console_login", "console", None, {"user": name})
        log.info("console_login", user=name)
        response = RedirectResponse(next_path, 303, headers=_HEADERS)
        response.headers.append("set-cookie", sessions.cookie_header(sessions.open(name)))
        return response

    async def logout(self, request: Request, user: User, form: Form) -> Response:
        sessions = self.sessions()
        response = RedirectResponse("/console/login", 303, headers=_HEADERS)
        if sessions is not None:
            response.headers.append("set-cookie", sessions.cookie_header(None))
        log.info("console_logout", user=user.name)
        return response

    # --- pages ---------------------------------------------------------------------------------

    def sessions_view(self, request: Request, user: User) -> str:
        day = parse_day(request.query_params.get("date"), self.daemon.config.practice.timezone)
        return sessions_page(self.daemon, day, request.query_params.get("clinician") or None)

    def appointment_view(self, request: Request, user: User) -> str | Response:
        appt = self.daemon.store.appointment(request.path_params["appointment"])
        if appt is None:
            return PlainTextResponse("no such appointment", 404, headers=_HEADERS)
        return appointment_page(self.daemon, appt, user)

    # --- actions -------------------------------------------------------------------------------

    async def cancel(self, request: Request, user: User, form: Form) -> Response:
        appt = request.path_params["appointment"]
        cancel_session(self.daemon, user.name, appt, by=form.get("by") or "client", reason=form.text("reason"), waive=form.flag("waive"))
        return RedirectResponse(f"/console/appointments/{quote(appt)}?done=cancelled", 303, headers=_HEADERS)

    async def noshow(self, request: Request, user: User, form: Form) -> Response:
        appt = request.path_params["appointment"]
        cancel_session(self.daemon, user.name, appt, by="client", reason=form.text("reason"), waive=form.flag("waive"), noshow=True)
        return RedirectResponse(f"/console/appointments/{quote(appt)}?done=noshow", 303, headers=_HEADERS)

    async def close(self, request: Request, user: User, form: Form) -> Response:
        note = form.text("note")
        if note is None:
            raise ActionRefused("say in a note what was done before closing the item")
        close_work(self.daemon.store, user.name, int(request.path_params["item"]), note)
        return RedirectResponse("/console/worklist?done=closed", 303, headers=_HEADERS)

    async def confirm(self, request: Request, user: User, form: Form) -> Response:
        confirm_held(self.daemon, user.name, int(request.path_params["item"]))
        return RedirectResponse("/console/worklist?done=confirmed", 303, headers=_HEADERS)

    async def retry(self, request: Request, user: User, form: Form) -> Response:
        retry_dead(self.daemon, user.name, form.get("connector") or "", form.get("appointment") or "")
        return RedirectResponse("/console/worklist?done=retried", 303, headers=_HEADERS)


def _local_path(value: str | None) -> str:
    """Where to go after logging in: a console path of this site, never another site."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/sessions"


def console_routes(daemon: Daemon) -> list[BaseRoute]:
    c = _Console(daemon)
    routes: list[BaseRoute] = [
        Route("/console", lambda r: RedirectResponse("/console/sessions", 303)),
        Route("/console/", lambda r: RedirectResponse("/console/sessions", 303)),
        Route("/console/login", c.login_get, methods=["GET"]),
        Route("/console/login", c.login_post, methods=["POST"]),
        Route("/console/logout", c.post_route(None, c.logout), methods=["POST"]),
        Route("/console/sessions", c.page_route("Sessions", "sessions", c.sessions_view)),
        Route("/console/appointments/{appointment}", c.page_route("Session", "sessions", c.appointment_view)),
        Route("/console/appointments/{appointment}/cancel", c.post_route(Action.CANCEL, c.cancel), methods=["POST"]),
        Route("/console/appointments/{appointment}/noshow", c.post_route(Action.NOSHOW, c.noshow), methods=["POST"]),
        Route("/console/worklist", c.page_route("Worklist", "worklist", lambda r, u: worklist_page(daemon, u))),
        Route("/console/worklist/{item:int}/close", c.post_route(Action.CLOSE_WORK, c.close), methods=["POST"]),
        Route("/console/worklist/{item:int}/confirm", c.post_route(Action.CONFIRM_HELD, c.confirm), methods=["POST"]),
        Route("/console/retry", c.post_route(Action.RETRY, c.retry), methods=["POST"]),
        Route("/console/status", c.page_route("Status", "status", lambda r, u: f'<div class="scroll">{status_page(daemon)}</div>')),
    ]
    try:
        from .bulk_routes import bulk_routes
    except ImportError as err:  # syncbridge.operations not in this build
        log.info("console_bulk_unavailable", problem=str(err))
    else:
        routes += bulk_routes(c)
    return routes
