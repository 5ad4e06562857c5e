"""The console's routes: the page (``/console``), its assets, and its session.

``POST /console/session`` exchanges an API key for a session cookie (HttpOnly, SameSite=Strict,
Secure over https) and answers the session's CSRF token; the API guard (``newsmon.api``)
accepts the cookie in place of the bearer key, with the token on every request that is not a
plain read. With no API keys configured (open, on loopback) the console needs no login.
Every answer here carries a Content-Security-Policy that admits scripts and styles from this
origin only.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.resources import files
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from newsmon.access import SESSION_COOKIE, Session, authorize, check_session, make_session
from newsmon.settings import Settings

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_STATIC = files("newsmon.console") / "static"


def _asset(name: str) -> tuple[bytes, str]:
    suffix = name[name.rfind(".") :]
    return (_STATIC / name).read_bytes(), _TYPES[suffix]


# Read once: a handful of small files, and no path from a request ever reaches the disk.
ASSETS = {
    name: _asset(name)
    for name in ("console.js", "console.css", "favicon.svg")
    if (_STATIC / name).is_file()
}
# The page, read once as the assets are; served at /console only, not among /static's names.
PAGE = _asset("index.html")


class Login(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=512, description="an API key from NEWSMON_API_KEYS")


class SessionPublic(BaseModel):
    """Who the console acts as: ``open`` (no API keys configured: anyone on this machine may
    do anything), or a key's name and role with the token to send as ``X-CSRF-Token``."""

    mode: Literal["open", "keys"]
    authenticated: bool
    name: str | None = None
    role: Literal["read", "admin"] | None = None
    csrf: str | None = None
    expires_at: datetime | None = None


def _public(session: Session) -> SessionPublic:
    return SessionPublic(
        mode="keys",
        authenticated=True,
        name=session.key.name,
        role=session.key.role,
        csrf=session.csrf,
        expires_at=datetime.fromtimestamp(session.expires_at, UTC),
    )


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/console", tags=["console"])
    keys = settings.api_keys
    lifetime_s = settings.console_session_hours * 3600

    @router.get("", include_in_schema=False)
    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        """The console's one page; what it shows is drawn by its script."""
        body, media_type = PAGE
        return Response(
            body, media_type=media_type, headers={**_HEADERS, "Cache-Control": "no-cache"}
        )

    @router.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            raise HTTPException(404, "no such console asset")
        body, media_type = ASSETS[name]
        return Response(
            body, media_type=media_type, headers={**_HEADERS, "Cache-Control": "no-cache"}
        )

    @router.get("/session")
    async def current(request: Request, response: Response) -> SessionPublic:
        """The console's session: open mode, logged out, or a key's name, role and CSRF token."""
        response.headers.update(_HEADERS)
        response.headers["Cache-Control"] = "no-store"
        if not keys:
            return SessionPublic(mode="open", authenticated=True, role="admin")
        cookie = request.cookies.get(SESSION_COOKIE)
        checked = check_session(keys, cookie) if cookie else None
        if checked is None or checked.session is None:
            return SessionPublic(mode="keys", authenticated=False)
        return _public(checked.session)

    @router.post("/session")
    async def login(login: Login, request: Request, response: Response) -> SessionPublic:
        """Log in with an API key: a session cookie for it, and the session's CSRF token.
        The key itself is neither kept nor answered."""
        response.headers.update(_HEADERS)
        response.headers["Cache-Control"] = "no-store"
        if not keys:
            return SessionPublic(mode="open", authenticated=True, role="admin")
        decision = authorize(keys, f"Bearer {login.key.strip()}", "GET")
        if decision.key is None:
            raise HTTPException(401, "unknown API key")
        value, session = make_session(decision.key, lifetime_s)
        response.set_cookie(
            SESSION_COOKIE,
            value,
            max_age=int(lifetime_s),
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return _public(session)

    @router.delete("/session", status_code=204)
    async def logout(request: Request) -> Response:
        """Log out: the cookie is dropped (it is stateless; a copy of it would last until it
        expires, ``NEWSMON_CONSOLE_SESSION_HOURS`` after the login)."""
        response = Response(status_code=204, headers=_HEADERS)
        response.delete_cookie(
            SESSION_COOKIE,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    return router
