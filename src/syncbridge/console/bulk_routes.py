"""Routes of the bulk operation pages (admins): preview, confirm, progress."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ..errors import SyncbridgeError
from ..model import parse_iso
from ..operations import StaleSelection, progress, start
from .auth import Action, User
from .bulk import BadForm, form_page, preview_from, preview_page, progress_page
from .forms import Form

if TYPE_CHECKING:
    from .routes import _Console

__all__ = ["bulk_routes"]


def bulk_routes(c: _Console) -> list[BaseRoute]:
    daemon = c.daemon

    def form_view(request: Request, user: User) -> str | Response:
        if not user.may(Action.BULK):
            return PlainTextResponse("only an admin may run bulk operations", 403)
        return form_page(daemon, user)

    async def preview_post(request: Request, user: User, form: Form) -> Response:
        sessions = c.sessions()
        assert sessions is not None  # post_route checked it
        try:
            shown = preview_from(daemon, form)
        except (BadForm, SyncbridgeError) as err:
            return c.render(request, sessions, user, "Bulk operations", form_page(daemon, user, form, str(err)), current="bulk", status=400)
        return c.render(request, sessions, user, "Preview", preview_page(daemon, user, form, shown), current="bulk")

    async def confirm_post(request: Request, user: User, form: Form) -> Response:
        sessions = c.sessions()
        assert sessions is not None
        try:
            at = parse_iso(form.get("at") or "")
        except ValueError:
            return c.render(request, sessions, user, "Bulk operations", form_page(daemon, user, form, "preview first"), current="bulk", status=400)
        try:
            shown = preview_from(daemon, form, at=at)
        except (BadForm, SyncbridgeError) as err:
            return c.render(request, sessions, user, "Bulk operations", form_page(daemon, user, form, str(err)), current="bulk", status=400)
        if shown.token != form.get("token"):
            fresh = preview_from(daemon, form)
            stale = "The sessions changed since that preview: here is the selection as it is now. Check it, then confirm again."
            return c.render(request, sessions, user, "Preview", preview_page(daemon, user, form, fresh, stale), current="bulk", status=409)
        try:
            op_id = start(daemon.engine, shown, user=user.name)
        except StaleSelection as err:
            fresh = preview_from(daemon, form)
            return c.render(request, sessions, user, "Preview", preview_page(daemon, user, form, fresh, str(err)), current="bulk", status=409)
        daemon.poke.set()
        return RedirectResponse(f"/console/operations/{op_id}", 303)

    def progress_view(request: Request, user: User) -> str | Response:
        p = progress(daemon.store, daemon.connectors, request.path_params["operation"])
        if p is None:
            return PlainTextResponse("no such operation", 404)
        return progress_page(daemon, p)

    async def progress_get(request: Request) -> Response:
        p = progress(daemon.store, daemon.connectors, request.path_params["operation"])
        handler = c.page_route("Bulk operation", "bulk", progress_view, refresh=None if p is None or p.done else 2)
        return await handler(request)

    return [
        Route("/console/bulk", c.page_route("Bulk operations", "bulk", form_view)),
        Route("/console/bulk/preview", c.post_route(Action.BULK, preview_post), methods=["POST"]),
        Route("/console/bulk/confirm", c.post_route(Action.BULK, confirm_post), methods=["POST"]),
        Route("/console/operations/{operation}", progress_get),
    ]
