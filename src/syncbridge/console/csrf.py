"""Cross-site request forgery: every form carries the session's token, every POST must return it.

The token lives in the signed session cookie (which a script on another site can neither read
nor forge) and in a hidden field of each form the console renders; a POST whose field does not
match is refused. SameSite=Strict on the cookie is the second line, not the only one.
"""

from __future__ import annotations

import hmac
from html import escape

from .auth import User

__all__ = ["FIELD", "check", "hidden"]

FIELD = "csrf"


def check(user: User, given: str | None) -> bool:
    """Whether a form's hidden field carries this session's token."""
    return bool(given) and hmac.compare_digest(user.csrf.encode(), (given or "").encode())


def hidden(user: User) -> str:
    """The hidden field for a form of this session."""
    return f'<input type="hidden" name="{FIELD}" value="{escape(user.csrf)}">'
