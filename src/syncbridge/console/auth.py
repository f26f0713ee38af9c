"""Who may use the console and what each may do: users, roles, signed session cookies.

A session is a cookie signed with the console's key (itsdangerous), HttpOnly, SameSite=Strict,
Secure when the listener is reached over https. It holds the user name, the session's CSRF
token and a tag of the password hash it was opened with, and is signed again on every request:
``console.idle_timeout`` seconds without one and it is refused. The role is read from the
configuration on every request, so a reload that removes a user or changes a role applies at
once, and a changed password ends the sessions opened with the old one.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from ..errors import AuthError, ConfigError
from .passwords import hash_password, verify_password

if TYPE_CHECKING:
    from ..config import PracticeConfig

__all__ = ["COOKIE", "MAX_SESSION_SECONDS", "Action", "Role", "Sessions", "User", "authenticate", "may", "session_key"]

COOKIE = "syncbridge_console"
#: however active, a session ends after this long (a cookie copied off a shared machine expires)
MAX_SESSION_SECONDS = 12 * 3600
#: a hash checked when the user name is unknown, so a wrong name takes as long as a wrong password
_DECOY = hash_password(secrets.token_urlsafe(16))


class Role(StrEnum):
    VIEWER = "viewer"
    FRONT_DESK = "front_desk"
    ADMIN = "admin"


class Action(StrEnum):
    """Everything the console can change, each with the least role allowed to do it."""

    CANCEL = "cancel"
    NOSHOW = "noshow"
    CLOSE_WORK = "close_work"
    CONFIRM_HELD = "confirm_held"
    RETRY = "retry"
    BULK = "bulk"


_RANK = {Role.VIEWER: 0, Role.FRONT_DESK: 1, Role.ADMIN: 2}
_LEAST: dict[Action, Role] = {
    Action.CANCEL: Role.FRONT_DESK,
    Action.NOSHOW: Role.FRONT_DESK,
    Action.CLOSE_WORK: Role.FRONT_DESK,
    Action.CONFIRM_HELD: Role.ADMIN,
    Action.RETRY: Role.ADMIN,
    Action.BULK: Role.ADMIN,
}


def may(role: Role | str, action: Action) -> bool:
    """Whether ``role`` may do ``action``; roles are ordered viewer < front_desk < admin."""
    return _RANK[Role(role)] >= _RANK[_LEAST[action]]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: Role
    #: the session's CSRF token, for the hidden field of every form
    csrf: str

    def may(self, action: Action) -> bool:
        return may(self.role, action)


def session_key(config: PracticeConfig) -> bytes:
    """The key session cookies are signed with: ``console.session_key``, or one derived from
    ``store.secret_key`` (never that key itself, so a cookie reveals nothing about the vault's)."""
    console = config.console
    if console.session_key is not None:
        return console.session_key.reveal().encode()
    if config.store.secret_key is not None:
        return hmac.new(config.store.secret_key.reveal().encode(), b"syncbridge console sessions", hashlib.sha256).digest()
    raise ConfigError("console.session_key", "the console needs a key to sign its session cookies: set console.session_key or store.secret_key")


def _hash_of(config: PracticeConfig, name: str) -> str | None:
    user = config.console.users.get(name)
    if user is None:
        return None
    try:
        return user.password_hash.reveal()
    except AuthError:
        return None  # its secret is missing: nobody logs in as this user (the log says why at login)


def authenticate(config: PracticeConfig, name: str, password: str) -> bool:
    """Whether ``name`` is a configured user and ``password`` is theirs; as slow either way."""
    stored = _hash_of(config, name)
    if stored is None:
        verify_password(password, _DECOY)
        return False
    return verify_password(password, stored)


class Sessions:
    """Opening, reading and renewing signed session cookies for one configuration."""

    def __init__(self, config: PracticeConfig, *, now: float | None = None) -> None:
        self.config = config
        self._key = session_key(config)
        self._serializer = URLSafeTimedSerializer(self._key, salt="syncbridge-console-session")
        self._now = now

    def _clock(self) -> float:
        return time.time() if self._now is None else self._now

    def _tag(self, name: str) -> str | None:
        stored = _hash_of(self.config, name)
        if stored is None:
            return None
        return hmac.new(self._key, stored.encode(), hashlib.sha256).hexdigest()[:24]

    def open(self, name: str) -> str:
        """A new session for ``name`` (after the password was checked): the cookie value."""
        data = {"u": name, "c": secrets.token_urlsafe(32), "t": self._tag(name), "i": int(self._clock())}
        return self._serializer.dumps(data)

    def renew(self, cookie: str) -> str | None:
        """The same session signed again now (the idle timeout starts over), or None when it is no longer valid."""
        data = self._data(cookie)
        return self._serializer.dumps(data) if data is not None else None

    def _data(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie:
            return None
        try:
            data = self._serializer.loads(cookie, max_age=self.config.console.idle_timeout)
        except BadSignature:  # also an expired one (SignatureExpired is a BadSignature)
            return None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("u", "c", "t")):
            return None
        if not isinstance(data.get("i"), int) or self._clock() - data["i"] > MAX_SESSION_SECONDS:
            return None
        tag = self._tag(data["u"])
        if tag is None or not hmac.compare_digest(tag, data["t"]):
            return None  # user removed, or the password changed since
        return data

    def user(self, cookie: str | None) -> User | None:
        data = self._data(cookie)
        if data is None:
            return None
        configured = self.config.console.users.get(data["u"])
        if configured is None:
            return None
        return User(data["u"], Role(configured.role), data["c"])

    @property
    def secure(self) -> bool:
        url = self.config.http.public_url
        return bool(url and url.lower().startswith("https://"))

    def cookie_header(self, value: str | None) -> str:
        """A Set-Cookie value: the session, or (``None``) one that removes it."""
        attrs = "Path=/console; HttpOnly; SameSite=Strict" + ("; Secure" if self.secure else "")
        if value is None:
            return f"{COOKIE}=; Max-Age=0; {attrs}"
        return f"{COOKIE}={value}; Max-Age={int(self.config.console.idle_timeout)}; {attrs}"

