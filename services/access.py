"""Who may use the operator API: bearer API keys with a role, the console's session cookies
made from them, and a rate limit per key.

Plain logic only; ``api.py`` turns the decisions into HTTP responses.

A console session is a signed, stateless cookie: base64url of ``[key name, expiry, nonce]`` as
JSON, a dot, and an HMAC-SHA256 tag under a key derived from that API key's own secret. Nothing
is stored: every process with the same keys accepts the same sessions, and removing or changing
a key ends its sessions. The CSRF token is another HMAC of the session's nonce; the page sends it
in ``X-CSRF-Token`` with every request that is not a plain read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["read", "admin"]
# Methods a read-only key may use; everything else changes state and needs an admin key.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ApiKey(BaseModel):
    """One operator credential. ``key`` is sent as ``Authorization: Bearer <key>``."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=64)
    key: str = Field(min_length=24, repr=False, description="at least 24 characters")
    role: Role = "read"


@dataclass(frozen=True)
class Decision:
    status: int  # 200 allowed, 401 who are you, 403 not allowed
    key: ApiKey | None = None
    reason: str = ""


def authorize(
    keys: list[ApiKey], authorization: str | None, method: str, *, changes: bool | None = None
) -> Decision:
    """Decide a request from its ``Authorization`` header and method.

    ``changes`` overrides what the method says: a POST that only computes (a score, a
    preview) changes nothing, and a read key may send it.
    """
    if not authorization:
        return Decision(401, reason="missing bearer API key")
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return Decision(401, reason="expected 'Authorization: Bearer <key>'")
    presented = presented.strip()
    # Compare with every key, in constant time, so timing reveals neither key nor position.
    matched = [k for k in keys if hmac.compare_digest(k.key.encode(), presented.encode())]
    if not matched:
        return Decision(401, reason="unknown API key")
    key = matched[0]
    writes = method.upper() not in READ_METHODS if changes is None else changes
    if writes and key.role != "admin":
        return Decision(403, key, f"key {key.name!r} is read-only")
    return Decision(200, key)


SESSION_COOKIE = "newsmon_session"
CSRF_HEADER = "x-csrf-token"
_SESSION_DOMAIN = b"newsmon console session v1\x00"
_CSRF_DOMAIN = b"newsmon console csrf v1\x00"
_MAX_SESSION_CHARS = 512


@dataclass(frozen=True)
class Session:
    """A console session: whose key it stands for, until when, and its CSRF token."""

    key: ApiKey
    expires_at: float  # Unix seconds
    csrf: str


def _session_key(key: ApiKey) -> bytes:
    # Derived, so that a cookie's tag says nothing usable about the API key itself.
    return hmac.new(key.key.encode(), _SESSION_DOMAIN, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _csrf(key: ApiKey, nonce: str) -> str:
    return _b64(hmac.new(_session_key(key), _CSRF_DOMAIN + nonce.encode(), hashlib.sha256).digest())


def _sign(key: ApiKey, body: str) -> str:
    """A session cookie's tag: made by ``make_session``, checked by ``check_session``."""
    return _b64(hmac.new(_session_key(key), body.encode(), hashlib.sha256).digest())


def make_session(
    key: ApiKey, lifetime_s: float, *, now: float | None = None
) -> tuple[str, Session]:
    """A new session for ``key``: the cookie's value, and the session it stands for."""
    expires = int((time.time() if now is None else now) + lifetime_s)
    nonce = secrets.token_urlsafe(16)
    body = _b64(json.dumps([key.name, expires, nonce], separators=(",", ":")).encode())
    return f"{body}.{_sign(key, body)}", Session(key, float(expires), _csrf(key, nonce))


@dataclass(frozen=True)
class SessionCheck:
    status: int  # 200 a valid session, 401 not one (forged, expired, of a removed key)
    session: Session | None = None
    reason: str = ""


def check_session(keys: list[ApiKey], cookie: str, *, now: float | None = None) -> SessionCheck:
    """The session a cookie carries, if one of ``keys`` signed it and it has not expired."""
    refused = SessionCheck(401, reason="not a valid console session: log in again")
    body, dot, tag = cookie.partition(".")
    if not dot or len(cookie) > _MAX_SESSION_CHARS:
        return refused
    try:
        name, expires, nonce = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, TypeError, binascii.Error):
        return refused
    if not (isinstance(name, str) and isinstance(expires, int) and isinstance(nonce, str)):
        return refused
    key = next((k for k in keys if k.name == name), None)
    if key is None:
        return refused
    if not hmac.compare_digest(_sign(key, body).encode(), tag.encode("utf-8", "replace")):
        return refused
    if (time.time() if now is None else now) >= expires:
        return SessionCheck(401, reason="console session expired: log in again")
    return SessionCheck(200, Session(key, float(expires), _csrf(key, nonce)))


def authorize_session(
    session: Session, csrf: str | None, method: str, *, changes: bool | None = None
) -> Decision:
    """Decide a request made with a session cookie: as its key would be, and every request
    that is not a plain read must carry the session's CSRF token (a page on another site can
    make the browser send the cookie, but cannot read the token)."""
    if method.upper() not in READ_METHODS and not (
        csrf and hmac.compare_digest(csrf.encode("utf-8", "replace"), session.csrf.encode())
    ):
        return Decision(403, session.key, "missing or wrong CSRF token (X-CSRF-Token)")
    writes = method.upper() not in READ_METHODS if changes is None else changes
    if writes and session.key.role != "admin":
        return Decision(403, session.key, f"key {session.key.name!r} is read-only")
    return Decision(200, session.key)


@dataclass
class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts up to ``burst``."""

    per_minute: float
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def acquire(self, who: str, now: float | None = None) -> float:
        """Take a token for ``who``; returns 0 if allowed, else the seconds until one is free."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        tokens, last = self._buckets.get(who, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[who] = (tokens - 1.0, now)
            return 0.0
        self._buckets[who] = (tokens, now)
        return (1.0 - tokens) / rate


def cross_site_write(
    method: str, fetch_site: str | None, origin: str | None, host: str | None
) -> str | None:
    """Why a state-changing request is refused as another site's, or None.

    Where no key is asked for (the open API on loopback, the links in alerts), a page on any
    site the operator visits could make the browser send a write that needs no body (disable a
    topic, pause a feed). Browsers say where a request comes from: ``Sec-Fetch-Site``, and
    ``Origin`` on every cross-origin write; curl and other clients send neither, and are let be.
    """
    if method.upper() in READ_METHODS:
        return None
    if fetch_site in ("cross-site", "same-site"):
        return f"refused: a {fetch_site} request from a browser"
    if origin is not None and (
        origin == "null" or urlsplit(origin).netloc.lower() != (host or "").lower()
    ):
        return f"refused: a request from another origin ({origin[:100]})"
    return None


def loopback_host(host: str | None) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address.

    The open API listens on loopback only, yet a page on another site can rename itself to
    127.0.0.1 (DNS rebinding) and have the browser talk to it as that site, same-origin; the
    browser still sends the site's name as ``Host``.
    """
    if not host:
        return False
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:
        return False
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
