"""The alerts HTTP API: ``/subscriptions`` for subscribers' settings, ``/deliveries`` for operators.

A webhook's secret is returned once, when it is made (creation, rotation), and never again.
Invalid input is answered 422 with field-level messages, in FastAPI's usual shape.
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from newsmon.alerts.policy import STATUSES
from newsmon.alerts.signing import new_secret
from newsmon.alerts.ssrf import UnsafeURL
from newsmon.alerts.store import Attempt, Delivery, DeliveryFilter
from newsmon.alerts.subscriptions import (
    Subscription,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
    SubscriptionUpdate,
    channel_problems,
    new_subscription_id,
)
from newsmon.events import utcnow

if TYPE_CHECKING:
    from newsmon.alerts.service import AlertsService


class TimeRange(BaseModel):
    since: datetime = Field(description="from this time (inclusive)")
    until: datetime | None = Field(None, description="to this time (exclusive); default now")


class Queued(BaseModel):
    delivery_id: str


class Requeued(BaseModel):
    requeued: int


class DeliveryPublic(BaseModel):
    id: str
    subscription_id: str
    article_id: str
    topic: str
    status: str
    attempts: int = Field(description="attempts in the current round (a retry starts a new one)")
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, d: Delivery) -> DeliveryPublic:
        return cls(
            id=d.id,
            subscription_id=d.subscription_id,
            article_id=d.article_id,
            topic=d.topic,
            status=d.status,
            attempts=d.attempts,
            last_error=d.last_error,
            next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
            created_at=d.created_at,
            updated_at=d.updated_at,
        )


class AttemptPublic(BaseModel):
    attempted_at: datetime
    status_code: int | None = Field(description="HTTP status or SMTP reply code; null: none")
    latency_ms: float
    error: str | None = Field(description="null when the attempt succeeded")

    @classmethod
    def of(cls, a: Attempt) -> AttemptPublic:
        return cls(
            attempted_at=a.attempted_at,
            status_code=a.status_code,
            latency_ms=a.latency_ms,
            error=a.error,
        )


class DeliveryDetail(DeliveryPublic):
    payload: dict[str, Any]
    attempt_log: list[AttemptPublic]


def unprocessable(problems: list[tuple[str, str]], where: str = "body") -> RequestValidationError:
    """A 422 in FastAPI's shape, for checks a schema cannot make (cross-field, DNS)."""
    return RequestValidationError(
        [{"type": "value_error", "loc": (where, f), "msg": m, "input": None} for f, m in problems]
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def build_router(service: AlertsService) -> APIRouter:
    # The seeds file is loaded when the service starts; a request that arrives first waits.
    router = APIRouter(dependencies=[Depends(service.ensure_seeded)])
    store = service.store
    settings = service.settings

    async def found(sub_id: str) -> Subscription:
        sub = await store.subscription(sub_id)
        if sub is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no subscription {sub_id!r}")
        return sub

    async def check_url(url: str | None) -> None:
        if url is not None:
            try:
                await service.check_webhook_url(url)
            except UnsafeURL as exc:
                raise unprocessable([("url", str(exc))]) from exc

    @router.post(
        "/subscriptions",
        status_code=status.HTTP_201_CREATED,
        tags=["subscriptions"],
        response_model=SubscriptionCreated,
    )
    async def create_subscription(body: SubscriptionCreate) -> SubscriptionCreated:
        """Subscribe a webhook, an email address or the log; a webhook's secret is shown once."""
        problems = channel_problems(body.channel, body.url, body.email, body.mode)
        if problems:
            raise unprocessable(problems)
        await check_url(body.url)
        sub = Subscription(
            id=body.id or new_subscription_id(),
            channel=body.channel,
            url=body.url,
            email=body.email,
            topics=tuple(body.topics),
            min_score=body.min_score,
            mode=body.mode,
            secret=new_secret() if body.channel == "webhook" else None,
        )
        if not await store.create_subscription(sub):
            raise HTTPException(status.HTTP_409_CONFLICT, f"subscription {sub.id!r} exists")
        return SubscriptionCreated(**SubscriptionPublic.of(sub).model_dump(), secret=sub.secret)

    @router.get("/subscriptions", tags=["subscriptions"])
    async def list_subscriptions() -> list[SubscriptionPublic]:
        return [SubscriptionPublic.of(s) for s in await store.subscriptions()]

    @router.get("/subscriptions/{sub_id}", tags=["subscriptions"])
    async def get_subscription(sub_id: str) -> SubscriptionPublic:
        """One subscription, with why it is paused or disabled if it is."""
        return SubscriptionPublic.of(await found(sub_id))

    @router.patch("/subscriptions/{sub_id}", tags=["subscriptions"])
    async def update_subscription(sub_id: str, body: SubscriptionUpdate) -> SubscriptionPublic:
        """Change the topics, minimum score, mode or address."""
        sub = await found(sub_id)
        changes = body.model_dump(exclude_unset=True)
        merged = {**sub.model_dump(), **changes}
        problems = channel_problems(sub.channel, merged["url"], merged["email"], merged["mode"])
        if any(v is None for k, v in changes.items() if k in ("topics", "min_score", "mode")):
            problems.append(("body", "topics, min_score and mode cannot be null"))
        if problems:
            raise unprocessable(problems)
        await check_url(changes.get("url"))
        updated = await store.update_subscription(sub_id, **changes)
        if updated is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no subscription {sub_id!r}")
        return SubscriptionPublic.of(updated)

    @router.delete(
        "/subscriptions/{sub_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["subscriptions"]
    )
    async def delete_subscription(sub_id: str) -> Response:
        """Delete a subscription; its delivery history stays for GET /deliveries."""
        if not await store.delete_subscription(sub_id):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no subscription {sub_id!r}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/subscriptions/{sub_id}/pause", tags=["subscriptions"])
    async def pause(sub_id: str) -> SubscriptionPublic:
        """Stop alerting: nothing new is recorded until resumed; pending deliveries wait."""
        await found(sub_id)
        sub = await store.update_subscription(
            sub_id, paused=True, paused_reason="paused through the API"
        )
        assert sub is not None
        return SubscriptionPublic.of(sub)

    @router.post("/subscriptions/{sub_id}/resume", tags=["subscriptions"])
    async def resume(sub_id: str) -> SubscriptionPublic:
        """Undo a pause, an unsubscribe or a disable; held deliveries go out now."""
        await found(sub_id)
        sub = await store.update_subscription(
            sub_id,
            paused=False,
            paused_reason=None,
            disabled_reason=None,
            disabled_at=None,
            failing_since=None,
        )
        assert sub is not None
        service.wake()
        return SubscriptionPublic.of(sub)

    @router.post("/subscriptions/{sub_id}/rotate-secret", tags=["subscriptions"])
    async def rotate_secret(sub_id: str) -> SubscriptionCreated:
        """A new webhook secret, shown once; the old one also signs during the overlap."""
        sub = await found(sub_id)
        if sub.channel != "webhook":
            raise HTTPException(status.HTTP_409_CONFLICT, "only webhooks have secrets")
        secret = new_secret()
        rotated = await store.update_subscription(
            sub_id,
            secret=secret,
            previous_secret=sub.secret,
            previous_secret_expires_at=utcnow()
            + timedelta(seconds=settings.webhook_secret_overlap_s),
        )
        assert rotated is not None
        return SubscriptionCreated(**SubscriptionPublic.of(rotated).model_dump(), secret=secret)

    @router.post(
        "/subscriptions/{sub_id}/test", status_code=status.HTTP_202_ACCEPTED, tags=["subscriptions"]
    )
    async def send_test(sub_id: str) -> Queued:
        """Queue a signed test alert (type ``subscription.test``) to this subscription now."""
        sub = await found(sub_id)
        return Queued(delivery_id=await service.send_test(sub))

    @router.post("/subscriptions/{sub_id}/replay", tags=["deliveries"])
    async def replay(sub_id: str, body: TimeRange) -> Requeued:
        """Send again every delivery of this subscription created in the time range."""
        await found(sub_id)
        since, until = _utc(body.since), _utc(body.until) or utcnow()
        assert since is not None
        if until <= since:
            raise unprocessable([("until", "must be later than since")])
        count = await store.requeue(DeliveryFilter(sub_id, None, since, until))
        service.wake()
        return Requeued(requeued=count)

    @router.get("/deliveries", tags=["deliveries"])
    async def list_deliveries(
        subscription_id: str | None = None,
        status_: Annotated[
            str | None, Query(alias="status", pattern="^(" + "|".join(STATUSES) + ")$")
        ] = None,
        since: Annotated[datetime | None, Query(description="created at or after")] = None,
        until: Annotated[datetime | None, Query(description="created before")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> list[DeliveryPublic]:
        """Deliveries, newest first, filtered by subscription, status and creation time."""
        where = DeliveryFilter(subscription_id, status_, _utc(since), _utc(until))
        return [DeliveryPublic.of(d) for d in await store.deliveries(where, limit, offset)]

    @router.get("/deliveries/{delivery_id}", tags=["deliveries"])
    async def get_delivery(delivery_id: str) -> DeliveryDetail:
        """One delivery with its payload and every attempt (status, latency, error)."""
        delivery = await store.get(delivery_id)
        if delivery is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no delivery {delivery_id!r}")
        return DeliveryDetail(
            **DeliveryPublic.of(delivery).model_dump(),
            payload=json.loads(delivery.payload),
            attempt_log=[AttemptPublic.of(a) for a in await store.attempts(delivery_id)],
        )

    @router.post(
        "/deliveries/{delivery_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        tags=["deliveries"],
    )
    async def retry(delivery_id: str) -> DeliveryPublic:
        """Send a delivery again now (a dead one, or any other), with a fresh schedule."""
        if not await store.requeue(DeliveryFilter(), ids=[delivery_id]):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no delivery {delivery_id!r}")
        service.wake()
        delivery = await store.get(delivery_id)
        assert delivery is not None
        return DeliveryPublic.of(delivery)

    return router


def build_public_router(service: AlertsService) -> APIRouter:
    """Routes a recipient reaches from an email, without an API key: the unsubscribe link.

    The unguessable token in the path is the credential.
    """
    public = APIRouter(dependencies=[Depends(service.ensure_seeded)])
    store = service.store

    @public.get(
        "/subscriptions/{sub_id}/unsubscribe/{token}",
        response_class=HTMLResponse,
        tags=["subscriptions"],
    )
    async def unsubscribe_page(sub_id: str, token: str) -> HTMLResponse:
        """The page behind an email's unsubscribe link: a button, so link scanners change
        nothing."""
        await _by_token(sub_id, token)
        return HTMLResponse(
            "<!doctype html><html><body><form method='post'>"
            "<p>Stop receiving these newsmon alerts?</p>"
            "<button type='submit'>Unsubscribe</button></form></body></html>"
        )

    @public.post("/subscriptions/{sub_id}/unsubscribe/{token}", tags=["subscriptions"])
    async def unsubscribe(sub_id: str, token: str) -> HTMLResponse:
        """One-click unsubscribe (RFC 8058): pauses the subscription."""
        await _by_token(sub_id, token)
        await store.update_subscription(
            sub_id, paused=True, paused_reason="unsubscribed by the recipient"
        )
        return HTMLResponse("<!doctype html><html><body><p>Unsubscribed.</p></body></html>")

    async def _by_token(sub_id: str, token: str) -> Subscription:
        sub = await store.subscription(sub_id)
        # Bytes: compare_digest refuses str with non-ASCII characters, and a link may carry any.
        if sub is None or not hmac.compare_digest(sub.unsubscribe_token.encode(), token.encode()):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown unsubscribe link")
        return sub

    return public
