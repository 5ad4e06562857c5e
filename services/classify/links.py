"""Feedback from the links in alerts, without an API key: the signed token is the credential.

``GET /feedback/{token}?label=relevant|not_relevant`` answers a page with a confirm button and
records nothing, because mail scanners and link previews fetch every link they see.
``POST /feedback/{token}`` (form or JSON field ``label``) records the label for the token's
article, topic and subscription, and answers with a way to undo it:
``POST /feedback/{token}/undo`` with the ``label_id`` and the ``proof`` that came with it, so
only the link that recorded a label can undo it. Browsers get pages; a client that asks for
JSON (``Accept: application/json``, or a JSON body) gets JSON.

A bad token is refused before any database work: 400 malformed, 403 forged, 410 expired. Each
refusal also spends a token of a small bucket per client address (as failed API keys spend
one of theirs), so a flood of bad links soon meets 429s.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
from collections.abc import Awaitable, Mapping
from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.access import RateLimiter
from newsmon.classify.schemas import Label
from newsmon.classify.service import (
    ArticleNotFound,
    ClassifyService,
    LabelNotFound,
    TopicNotFound,
)
from newsmon.classify.store import TopicConflict
from newsmon.feedback_links import (
    LABELS,
    BadSignature,
    Claim,
    ExpiredToken,
    FeedbackTokenError,
    MalformedToken,
    check_undo_proof,
    feedback_secret,
    feedback_url,
    undo_proof,
    verify_token,
)
from newsmon.settings import Settings

# The pages hold a token: not cached, not sent on as a referrer, not framed (a framed confirm
# button could be clicked by a trick), and they load nothing from anywhere.
_PRIVATE = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
}
_TOKEN_STATUS: dict[type[FeedbackTokenError], int] = {
    MalformedToken: status.HTTP_400_BAD_REQUEST,
    BadSignature: status.HTTP_403_FORBIDDEN,
    ExpiredToken: status.HTTP_410_GONE,
}
_WORDS = {"relevant": "relevant (more like this)", "not_relevant": "not relevant"}
_FORM_FIELDS_MAX = 8
_UNPROCESSABLE = status.HTTP_422_UNPROCESSABLE_CONTENT


def _body(**properties: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI request body of a form-or-JSON POST with these string fields."""
    schema = {"type": "object", "properties": properties, "required": list(properties)}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {"schema": schema},
                "application/json": {"schema": schema},
            },
        }
    }


class _Refused(Exception):
    """An answer other than success: its status, a message, and for a 422 the field."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.field = field
        self.headers = dict(headers or {})

    def response(self, as_json: bool) -> Response:
        headers = {**_PRIVATE, **self.headers}
        if not as_json:
            body = f"<p>{html.escape(self.message)}</p>"
            return HTMLResponse(_page("newsmon feedback", body), self.status_code, headers)
        detail: object = self.message
        if self.field is not None:
            # FastAPI's field-level shape, as every other 422 of the API.
            detail = [{"type": "value_error", "loc": self.field.split("."), "msg": self.message}]
        return JSONResponse({"detail": detail}, self.status_code, headers)


class _Secret:
    """The feedback secret, read once (from the settings or the database) and kept."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._engine = engine
        self._value: bytes | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> bytes:
        if self._value is None:
            async with self._lock:
                if self._value is None:
                    self._value = await feedback_secret(self._settings, self._engine)
        return self._value


def build_public_router(service: ClassifyService) -> APIRouter:
    """The feedback pages an alert's links lead to (mounted without the API-key guard)."""
    settings = service.settings
    secret = _Secret(settings, service.engine)
    # Every request already spends a token of the API's bucket for its address; a refusal
    # spends one of this one too, a tenth the size: nobody who holds a link needs to be refused
    # often, and a flood of made-up ones is cut short.
    failures = RateLimiter(settings.api_rate_per_minute / 10, max(1, settings.api_rate_burst // 10))
    router = APIRouter(tags=["feedback"])

    def refused(request: Request, refusal: _Refused) -> _Refused:
        """``refusal``, or a 429 once this address has been refused too often."""
        address = request.client.host if request.client else "?"
        wait = failures.acquire(f"feedback-failed:{address}")
        if wait > 0:
            return _Refused(
                status.HTTP_429_TOO_MANY_REQUESTS,
                "too many refused feedback links from this address: try again later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        return refusal

    async def verified(request: Request, token: str) -> Claim:
        try:
            return verify_token(token, await secret.get())
        except FeedbackTokenError as exc:
            raise refused(request, _Refused(_TOKEN_STATUS[type(exc)], str(exc))) from exc

    @router.get("/feedback/{token}", response_class=HTMLResponse)
    async def feedback_page(request: Request, token: str, label: str | None = None) -> Response:
        """The page an alert's feedback link opens: a button that confirms the label. Records
        nothing (link scanners and previews fetch GETs)."""
        try:
            claim = await verified(request, token)
            chosen = None if label is None else _label(label, "query.label")
        except _Refused as refusal:
            return refusal.response(_wants_json(request))
        return HTMLResponse(_confirm_page(claim, chosen), headers=_PRIVATE)

    @router.post(
        "/feedback/{token}",
        response_class=HTMLResponse,
        openapi_extra=_body(label={"type": "string", "enum": list(LABELS)}),
    )
    async def record_feedback(request: Request, token: str) -> Response:
        """Record the label (``relevant`` or ``not_relevant``) for the token's article, topic
        and subscription; answers what was recorded and how to undo it."""
        as_json = _wants_json(request)
        try:
            claim = await verified(request, token)
            fields = await _fields(request)
            chosen = _label(fields.get("label"), "body.label")
            label = await _recorded(
                service.add_label(
                    claim.topic,
                    claim.article_id,
                    chosen == "relevant",
                    source="link",
                    actor=f"subscription {claim.subscription_id}",
                    subscription_id=claim.subscription_id,
                )
            )
        except _Refused as refusal:
            return refusal.response(as_json)
        proof = undo_proof(token, label.id, await secret.get())
        undo_url = feedback_url(settings.public_url, token) + "/undo"
        if as_json:
            undo = {"url": undo_url, "label_id": label.id, "proof": proof}
            return JSONResponse(
                {"label": label.model_dump(mode="json"), "undo": undo}, headers=_PRIVATE
            )
        return HTMLResponse(_recorded_page(label, token, proof), headers=_PRIVATE)

    @router.post(
        "/feedback/{token}/undo",
        response_class=HTMLResponse,
        openapi_extra=_body(label_id={"type": "string"}, proof={"type": "string"}),
    )
    async def undo_feedback(request: Request, token: str) -> Response:
        """Undo the label this link recorded (``label_id`` and ``proof`` from that answer)."""
        as_json = _wants_json(request)
        try:
            claim = await verified(request, token)
            fields = await _fields(request)
            label_id, proof = _text(fields, "label_id"), _text(fields, "proof")
            if not check_undo_proof(token, label_id, proof, await secret.get()):
                forbidden = _Refused(
                    status.HTTP_403_FORBIDDEN, "that label was not recorded through this link"
                )
                raise refused(request, forbidden)
            label = await _recorded(
                service.undo_label(
                    label_id, actor=f"subscription {claim.subscription_id}", topic=claim.topic
                )
            )
        except _Refused as refusal:
            return refusal.response(as_json)
        if as_json:
            return JSONResponse({"label": label.model_dump(mode="json")}, headers=_PRIVATE)
        return HTMLResponse(_undone_page(label), headers=_PRIVATE)

    return router


async def _recorded(call: Awaitable[Label]) -> Label:
    """The service's answer, or its refusal as a 404 (topic, article or label gone) or 409."""
    try:
        return await call
    except (TopicNotFound, ArticleNotFound, LabelNotFound) as exc:
        raise _Refused(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except TopicConflict as exc:
        raise _Refused(status.HTTP_409_CONFLICT, f"{exc}: try again") from exc


def _label(value: object, field: str) -> str:
    if not isinstance(value, str) or value not in LABELS:
        raise _Refused(_UNPROCESSABLE, "label must be relevant or not_relevant", field=field)
    return value


def _text(fields: Mapping[str, object], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value:
        raise _Refused(_UNPROCESSABLE, f"{name} is required", field=f"body.{name}")
    return value


def _wants_json(request: Request) -> bool:
    """Whether to answer in JSON: the client asks for it, or sends JSON and does not ask for
    HTML."""
    accept = request.headers.get("accept", "")
    if "text/html" in accept:
        return False
    return "application/json" in accept or _media(request) == "application/json"


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


async def _fields(request: Request) -> dict[str, object]:
    """The body's fields: a form or a JSON object."""
    media = _media(request)
    raw = await request.body()
    if media == "application/json":
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise _Refused(_UNPROCESSABLE, "the body is not JSON", field="body") from exc
        if not isinstance(data, dict):
            raise _Refused(_UNPROCESSABLE, "the body must be a JSON object", field="body")
        return data
    if media in ("", "application/x-www-form-urlencoded"):
        try:
            pairs = parse_qsl(raw.decode(), max_num_fields=_FORM_FIELDS_MAX)
        except (UnicodeDecodeError, ValueError) as exc:
            raise _Refused(_UNPROCESSABLE, "the body is not a form", field="body") from exc
        return dict(pairs)
    raise _Refused(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        "send a form (application/x-www-form-urlencoded) or JSON",
    )


# Pages --------------------------------------------------------------------------------------


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title></head><body>{body}</body></html>"
    )


def _confirm_page(claim: Claim, chosen: str | None) -> str:
    e = html.escape
    about = f"article <code>{e(claim.article_id)}</code> for the topic <b>{e(claim.topic)}</b>"
    buttons = "".join(
        # No action: the form posts back to this page's own URL, whatever its prefix.
        f'<form method="post"><input type="hidden" name="label" value="{label}">'
        f'<button type="submit">Confirm: {e(_WORDS[label])}</button></form>'
        for label in ([chosen] if chosen else LABELS)
    )
    return _page(
        "newsmon feedback",
        f"<h1>Feedback on an alert</h1><p>Tell newsmon whether {about} was what you wanted."
        f" The topic learns from it.</p>{buttons}",
    )


def _recorded_page(label: Label, token: str, proof: str) -> str:
    e = html.escape
    title = e(label.title) or e(label.article_id)
    return _page(
        "newsmon feedback recorded",
        f"<h1>Thank you</h1><p>Recorded: “{title}” is "
        f"<b>{e(_WORDS['relevant' if label.relevant else 'not_relevant'])}</b> for the topic "
        f"<b>{e(label.topic)}</b> (label <code>{e(label.id)}</code>, "
        f"{e(label.created_at.isoformat(timespec='seconds'))}).</p>"
        # Relative to this page, /feedback/{token}: the undo route beside it.
        f'<form method="post" action="{e(token)}/undo">'
        f'<input type="hidden" name="label_id" value="{e(label.id)}">'
        f'<input type="hidden" name="proof" value="{e(proof)}">'
        '<button type="submit">Undo</button></form>',
    )


def _undone_page(label: Label) -> str:
    e = html.escape
    title = e(label.title) or e(label.article_id)
    return _page(
        "newsmon feedback undone",
        f"<h1>Undone</h1><p>The label on “{title}” for the topic <b>{e(label.topic)}</b> "
        "no longer counts.</p>",
    )
