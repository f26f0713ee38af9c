"""The practice manager's console: server-rendered pages on the daemon's listener, for named users
with roles (viewer, front_desk, admin). See README, "The console"."""

from __future__ import annotations

from .routes import console_routes

__all__ = ["console_routes"]
