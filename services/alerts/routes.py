"""The alerts HTTP API: ``/subscriptions`` for subscribers' settings, ``/deliveries`` for operators.

Routes translate HTTP to calls on the service and its errors back to HTTP. A webhook's secret
is returned once, when it is made (creation, rotation), and never again. Invalid input is
answered 422 with field-level messages, in FastAPI's usual shape.
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import datetime
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from fastapi.responses import HTMLResponse

from newsmon.alerts.delivery_store import DeliveryFilter
from newsmon.alerts.policy import STATUSES
from newsmon.alerts.schemas import DeliveryDetail, DeliveryPublic, Queued, Requeued, TimeRange
from newsmon.alerts.service import AlertsService, Conflict, Invalid, NotFound
from newsmon.alerts.subscriptions import (
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
    SubscriptionUpdate,
)
from newsmon.api import unprocessable

T = TypeVar("T")


async def _answer(call: Awaitable[T]) -> T:
    """The service's errors as HTTP: 404, 409, or a field-level 422."""
    try:
        return await call
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except Conflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except Invalid as exc:
        raise unprocessable(exc.problems) from exc


def build_router(service: AlertsService) -> APIRouter:
    # The seeds file is loaded when the service starts; a request that arrives first waits.
    router = APIRouter(dependencies=[Depends(service.ensure_seeded)])

    @router.post(
        "/subscriptions",
        status_code=status.HTTP_201_CREATED,
        tags=["subscriptions"],
        response_model=SubscriptionCreated,
    )
    async def create_subscription(body: SubscriptionCreate) -> SubscriptionCreated:
        """Subscribe a webhook, an email address or the log; a webhook's secret is shown once."""
        return await _answer(service.create_subscription(body))

    @router.get("/subscriptions", tags=["subscriptions"])
    async def list_subscriptions() -> list[SubscriptionPublic]:
        return await service.list_subscriptions()

    @router.get("/subscriptions/{sub_id}", tags=["subscriptions"])
    async def get_subscription(sub_id: str) -> SubscriptionPublic:
        """One subscription, with why it is paused or disabled if it is."""
        return await _answer(service.subscription(sub_id))

    @router.patch("/subscriptions/{sub_id}", tags=["subscriptions"])
    async def update_subscription(sub_id: str, body: SubscriptionUpdate) -> SubscriptionPublic:
        """Change the topics, minimum score, mode, address, grouping, budget or quiet hours."""
        return await _answer(service.update_subscription(sub_id, body))

    @router.delete(
        "/subscriptions/{sub_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["subscriptions"]
    )
    async def delete_subscription(sub_id: str) -> Response:
        """Delete a subscription; its delivery history stays for GET /deliveries."""
        await _answer(service.delete_subscription(sub_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/subscriptions/{sub_id}/pause", tags=["subscriptions"])
    async def pause(sub_id: str) -> SubscriptionPublic:
        """Stop alerting: nothing new is recorded until resumed; pending deliveries wait."""
        return await _answer(service.pause_subscription(sub_id))

    @router.post("/subscriptions/{sub_id}/resume", tags=["subscriptions"])
    async def resume(sub_id: str) -> SubscriptionPublic:
        """Undo a pause, an unsubscribe or a disable; held deliveries go out now."""
        return await _answer(service.resume_subscription(sub_id))

    @router.post("/subscriptions/{sub_id}/rotate-secret", tags=["subscriptions"])
    async def rotate_secret(sub_id: str) -> SubscriptionCreated:
        """A new webhook secret, shown once; the old one also signs during the overlap."""
        return await _answer(service.rotate_secret(sub_id))

    @router.post(
        "/subscriptions/{sub_id}/test", status_code=status.HTTP_202_ACCEPTED, tags=["subscriptions"]
    )
    async def send_test(sub_id: str) -> Queued:
        """Queue a signed test alert (type ``subscription.test``) to this subscription now."""
        return Queued(delivery_id=await _answer(service.send_test(sub_id)))

    @router.post("/subscriptions/{sub_id}/replay", tags=["deliveries"])
    async def replay(sub_id: str, body: TimeRange) -> Requeued:
        """Send again every delivery of this subscription created in the time range."""
        return Requeued(requeued=await _answer(service.replay(sub_id, body.since, body.until)))

    @router.get("/deliveries", tags=["deliveries"])
    async def list_deliveries(
        subscription_id: str | None = None,
        status_: Annotated[
            str | None, Query(alias="status", pattern="^(" + "|".join(STATUSES) + ")$")
        ] = None,
        since: Annotated[datetime | None, Query(description="created at or after")] = None,
        until: Annotated[datetime | None, Query(description="created before")] = None,
        story_id: Annotated[str | None, Query(description="the story's articles")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    ) -> list[DeliveryPublic]:
        """Deliveries, newest first, filtered by subscription, status, creation time and story
        (a story's alert and its suppressed articles)."""
        where = DeliveryFilter(subscription_id, status_, since, until, story_id)
        return await service.list_deliveries(where, limit, offset)

    @router.get("/deliveries/{delivery_id}", tags=["deliveries"])
    async def get_delivery(delivery_id: str, request: Request) -> DeliveryDetail:
        """One delivery with its payload and every attempt (status, latency, error). A
        read-only key sees the payload without its feedback links (``"redacted"``): posting
        one labels a topic."""
        # The API guard says the key's role; none without API keys (the open loopback API,
        # where every request may write).
        redact = getattr(request.state, "role", "admin") != "admin"
        return await _answer(service.delivery(delivery_id, redact=redact))

    @router.post(
        "/deliveries/{delivery_id}/retry",
        status_code=status.HTTP_202_ACCEPTED,
        tags=["deliveries"],
    )
    async def retry(delivery_id: str) -> DeliveryPublic:
        """Send a delivery again now (a dead one, or any other), with a fresh schedule."""
        return await _answer(service.retry(delivery_id))

    return router


def build_public_router(service: AlertsService) -> APIRouter:
    """Routes a recipient reaches from an email, without an API key: the unsubscribe link.

    The unguessable token in the path is the credential.
    """
    public = APIRouter(dependencies=[Depends(service.ensure_seeded)])

    @public.get(
        "/subscriptions/{sub_id}/unsubscribe/{token}",
        response_class=HTMLResponse,
        tags=["subscriptions"],
    )
    async def unsubscribe_page(sub_id: str, token: str) -> HTMLResponse:
        """The page behind an email's unsubscribe link: a button, so link scanners change
        nothing."""
        await _answer(service.unsubscribe_link(sub_id, token))
        return HTMLResponse(
            "<!doctype html><html><body><form method='post'>"
            "<p>Stop receiving these newsmon alerts?</p>"
            "<button type='submit'>Unsubscribe</button></form></body></html>"
        )

    @public.post("/subscriptions/{sub_id}/unsubscribe/{token}", tags=["subscriptions"])
    async def unsubscribe(sub_id: str, token: str) -> HTMLResponse:
        """One-click unsubscribe (RFC 8058): pauses the subscription."""
        await _answer(service.unsubscribe(sub_id, token))
        return HTMLResponse("<!doctype html><html><body><p>Unsubscribed.</p></body></html>")

    return public
