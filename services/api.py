"""The HTTP API: one FastAPI app holding the routes of the services that run in this process.

Health probes are open; every service route needs a bearer API key when keys are configured
(read-only keys may only read), is rate-limited per key (or per client address when the API runs
open on loopback), and request bodies are capped.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from newsmon import metrics
from newsmon.access import (
    CSRF_HEADER,
    SESSION_COOKIE,
    ApiKey,
    RateLimiter,
    authorize,
    authorize_session,
    check_session,
    cross_site_write,
    loopback_host,
)
from newsmon.settings import Settings


def build_app(
    routers: Sequence[APIRouter],
    readiness: Callable[[], Awaitable[dict[str, bool]]],
    settings: Settings,
    public_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The app: ``routers`` behind the API-key guard, ``public_routers`` (links people follow
    from an email, authorised by a token in the URL) behind the rate limit alone."""
    app = FastAPI(
        title="newsmon",
        summary="News monitoring: feeds in, topic matches out, as signed webhooks.",
        version="0.1.0",
        # Served from the package below: FastAPI's own pages load their scripts from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes)
    _offline_docs(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        """Prometheus metrics of the services in this process."""
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/readyz", tags=["health"])
    async def readyz(response: Response) -> dict[str, object]:
        """Whether the bus, the database and each service in this process can take work."""
        checks = await readiness()
        ready = all(checks.values())
        if not ready:
            response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return {"ready": ready, "checks": checks}

    limiter = RateLimiter(settings.api_rate_per_minute, settings.api_rate_burst)
    guard = Depends(_guard(settings.api_keys, limiter, open_api=not settings.api_keys))
    for router in routers:
        app.include_router(router, dependencies=[guard])
    open_guard = Depends(_guard([], limiter))
    for router in public_routers:
        app.include_router(router, dependencies=[open_guard])
    return app


# Swagger UI, as the fastapi-offline package ships it: nothing of /docs comes from another
# host, so the page works on a machine without internet. (No ReDoc: its page fetches its own
# logo from cdn.redoc.ly whatever it is given.)
DOCS_ASSETS = Path(str(files("fastapi_offline") / "static"))
_DOCS_STATIC = "/docs/assets"


def _offline_docs(app: FastAPI) -> None:
    app.mount(_DOCS_STATIC, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")
    favicon = f"{_DOCS_STATIC}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="newsmon API",
            swagger_js_url=f"{_DOCS_STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOCS_STATIC}/swagger-ui.css",
            swagger_favicon_url=favicon,
            # The validator badge would send the schema's URL to validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )


def unprocessable(
    problems: Iterable[tuple[str, str]], where: str = "body", kind: str = "value_error"
) -> RequestValidationError:
    """A 422 in FastAPI's field-level shape, for checks a schema cannot make (the store, DNS,
    several fields together): ``problems`` are ``(field, message)`` pairs."""
    return RequestValidationError(
        [{"type": kind, "loc": (where, f), "msg": m, "input": None} for f, m in problems]
    )


def unprocessable_model(exc: ValidationError, where: str = "body") -> RequestValidationError:
    """A 422 for a model validated by hand (a draft merged into a stored topic)."""
    return RequestValidationError(
        [{**e, "loc": (where, *e["loc"])} for e in exc.errors(include_url=False)]
    )


# ``openapi_extra`` of a route that is not a GET but changes nothing (scoring, previews): a
# read key may call it, and the OpenAPI document says so.
READ_ONLY_KEY = "x-newsmon-read-only"
READ_ONLY: dict[str, Any] = {READ_ONLY_KEY: True}


def _guard(
    keys: list[ApiKey], limiter: RateLimiter, *, open_api: bool = False
) -> Callable[[Request], Awaitable[None]]:
    """``open_api``: the operator API without keys (on loopback), which answers a browser only
    under a loopback name (the public links, reached by their public host, are not it)."""

    def limit(who: str) -> None:
        wait = limiter.acquire(who)
        if wait > 0:
            raise HTTPException(
                429, "rate limit exceeded", headers={"Retry-After": str(math.ceil(wait))}
            )

    async def check(request: Request) -> None:
        address = request.client.host if request.client else "?"
        if keys:
            extra = getattr(request.scope.get("route"), "openapi_extra", None) or {}
            changes = False if extra.get(READ_ONLY_KEY) else None
            cookie = request.cookies.get(SESSION_COOKIE)
            if cookie and not request.headers.get("authorization"):
                # The console: a session cookie stands for its key, with a CSRF token.
                checked = check_session(keys, cookie)
                if checked.session is None:
                    limit(f"failed:{address}")
                    raise HTTPException(401, checked.reason)
                decision = authorize_session(
                    checked.session, request.headers.get(CSRF_HEADER), request.method,
                    changes=changes,
                )  # fmt: skip
            else:
                decision = authorize(
                    keys, request.headers.get("authorization"), request.method, changes=changes
                )
            if decision.status == 401:
                # Guessing keys costs tokens too: failures are limited per client address.
                limit(f"failed:{address}")
                raise HTTPException(401, decision.reason, headers={"WWW-Authenticate": "Bearer"})
            if decision.status == 403:
                raise HTTPException(403, decision.reason)
            who = f"key:{decision.key.name}" if decision.key else "?"
            # Who did it, for what the request records (a label names its author).
            request.state.actor = f"key {decision.key.name}" if decision.key else "?"
            request.state.role = decision.key.role if decision.key else "read"
        else:
            refused = cross_site_write(
                request.method,
                request.headers.get("sec-fetch-site"),
                request.headers.get("origin"),
                request.headers.get("host"),
            )
            host = request.headers.get("host")
            if open_api and "sec-fetch-site" in request.headers and not loopback_host(host):
                # A browser that calls this machine by another site's name: DNS rebinding.
                refused = f"refused: a browser request for host {host!r}; use 127.0.0.1"
            if refused:
                raise HTTPException(403, refused)
            who = f"addr:{address}"
            request.state.actor = f"client {address} (no API keys configured)"
        limit(who)

    return check


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether declared or streamed.

    A body without a Content-Length is read (up to the cap) before the app sees it: the
    framework turns errors raised while it reads a body into 400s, so the cap is enforced here.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit():
            if int(declared) > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await _too_large(send, self.max_bytes)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send, max_bytes: int) -> None:
    body = f'{{"detail":"request body exceeds {max_bytes} bytes"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
