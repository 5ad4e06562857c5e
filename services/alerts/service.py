"""The alerts service: turn matches into deliveries, and deliver them with retries.

Matches are recorded as delivery rows before the bus offset is committed, so a crash loses
nothing and a redelivered match inserts nothing new. A dispatcher sends due deliveries
concurrently; each attempt has its own deadline, so one slow endpoint never holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from datetime import UTC, datetime

import httpx
from fastapi import APIRouter
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from services.alerts import store
from services.alerts.signing import signature_headers
from services.alerts.store import DEAD, DELIVERED, PENDING, Delivery, NewDelivery, delivery_id
from services.alerts.subscriptions import Subscription
from services.bus import Bus, Message
from services.events import ARTICLES_MATCHED, ArticleMatched, EventError, TopicScore
from services.settings import Settings

log = logging.getLogger(__name__)
alert_log = logging.getLogger("newsmon.alerts")

GROUP = "alerts"
PAYLOAD_VERSION = 1
# The dispatcher looks for due retries at least this often, even when nothing wakes it.
DISPATCH_IDLE_S = 1.0


def build_payload(subscription: Subscription, event: ArticleMatched, score: TopicScore) -> bytes:
    """The JSON body of one alert (Standard Webhooks shape: type, timestamp, data)."""
    article = event.article
    body = {
        "type": "article.matched",
        "version": PAYLOAD_VERSION,
        "timestamp": event.occurred_at.isoformat(),
        "data": {
            "subscription_id": subscription.id,
            "topic": score.topic,
            "topic_version": score.topic_version,
            "score": score.score,
            "threshold": score.threshold,
            "evidence": score.evidence.model_dump(mode="json"),
            "article": {
                "id": article.article_id,
                "title": article.title,
                "link": article.link,
                "summary": article.summary,
                "published": article.published.isoformat() if article.published else None,
                "feed": {"url": article.feed_url, "title": article.feed_title},
            },
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def describe_alert(payload: bytes) -> str:
    """A readable, multi-line rendering of an alert, for the log channel."""
    data = json.loads(payload)["data"]
    article, evidence = data["article"], data["evidence"]
    lines = [
        f"ALERT [{data['topic']}] score {data['score']:.3f} (threshold {data['threshold']:.2f}): "
        f"{article['title']}",
        f"    link:    {article['link'] or '-'}",
        f"    feed:    {article['feed']['title'] or article['feed']['url']}",
        f"    because: “{_clip(evidence['passage'], 220)}”",
        f"    nearest example ({evidence['positive_similarity']:.3f}): "
        f"“{_clip(evidence['nearest_positive'], 160)}”",
    ]
    if evidence.get("nearest_negative"):
        lines.append(
            f"    nearest counter-example ({evidence['negative_similarity']:.3f}): "
            f"“{_clip(evidence['nearest_negative'], 160)}”"
        )
    return "\n".join(lines)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class AlertsService:
    name = "alerts"
    metadata: MetaData = store.metadata

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: AsyncEngine,
        subscriptions: list[Subscription],
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._store = store.AlertsStore(engine)
        self._subscriptions = {s.id: s for s in subscriptions}
        self._client = client or httpx.AsyncClient(follow_redirects=False, trust_env=False)
        self._owns_client = client is None
        self._wake = asyncio.Event()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self.router = APIRouter(tags=["subscriptions"])

    async def run(self, stop: asyncio.Event) -> None:
        await self._bus.ensure_topics([ARTICLES_MATCHED])
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(stop))
                tasks.create_task(self._dispatch(stop))
        finally:
            await self._drain()
            if self._owns_client:
                await self._client.aclose()

    async def _consume(self, stop: asyncio.Event) -> None:
        async with self._bus.consumer([ARTICLES_MATCHED], GROUP) as consumer:
            while not stop.is_set():
                batch = await consumer.poll(100, timeout=0.5)
                if batch:
                    await self.handle_batch(batch)
                    await consumer.commit()

    async def handle_batch(self, messages: list[Message]) -> int:
        """Record a delivery per (subscription, article, topic) the batch asks for."""
        rows: list[NewDelivery] = []
        for message in messages:
            try:
                event = ArticleMatched.decode(message.value)
            except EventError as exc:
                log.error("skipping malformed event at %s: %s", message.coordinates, exc)
                continue
            for score in event.matches:
                for sub in self._subscriptions.values():
                    if sub.wants(score.topic, score.score):
                        rows.append(
                            NewDelivery(
                                id=delivery_id(sub.id, event.article.article_id, score.topic),
                                subscription_id=sub.id,
                                article_id=event.article.article_id,
                                topic=score.topic,
                                payload=build_payload(sub, event, score),
                            )
                        )
        added = await self._store.add(rows)
        if added:
            self._wake.set()
        return added

    async def _dispatch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            room = self._settings.delivery_concurrency - len(self._in_flight)
            if room > 0:
                for delivery in await self._store.due(room, exclude=set(self._in_flight)):
                    task = asyncio.create_task(self._attempt(delivery), name=delivery.id)
                    self._in_flight[delivery.id] = task
                    task.add_done_callback(self._forget)
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(
                waiters, timeout=DISPATCH_IDLE_S, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in waiters:
                waiter.cancel()

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task.get_name(), None)

    async def _drain(self) -> None:
        """Give attempts in flight one attempt's deadline to finish; the rest stay pending."""
        if not self._in_flight:
            return
        _, unfinished = await asyncio.wait(
            list(self._in_flight.values()), timeout=self._settings.webhook_timeout_s
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _attempt(self, delivery: Delivery) -> None:
        sub = self._subscriptions.get(delivery.subscription_id)
        if sub is None:
            await self._store.record_attempt(
                delivery.id, status=DEAD, error="subscription no longer exists", retry_in=None
            )
            return
        if sub.channel == "log":
            alert_log.info("%s", describe_alert(delivery.payload))
            await self._store.record_attempt(
                delivery.id, status=DELIVERED, error=None, retry_in=None
            )
            return
        error = await self._post(sub, delivery)
        if error is None:
            await self._store.record_attempt(
                delivery.id, status=DELIVERED, error=None, retry_in=None
            )
            return
        delays = self._settings.webhook_retry_delays_s
        attempt = delivery.attempts + 1
        if attempt > len(delays):
            log.error(
                "delivery %s to %s (%s) failed for good after %d attempts: %s",
                delivery.id, sub.id, sub.url, attempt, error,
            )  # fmt: skip
            await self._store.record_attempt(delivery.id, status=DEAD, error=error, retry_in=None)
            return
        wait = delays[attempt - 1] * random.uniform(0.8, 1.2)  # noqa: S311
        log.warning(
            "delivery %s to %s (%s) attempt %d failed: %s; retrying in %.1f s",
            delivery.id, sub.id, sub.url, attempt, error, wait,
        )  # fmt: skip
        await self._store.record_attempt(delivery.id, status=PENDING, error=error, retry_in=wait)

    async def _post(self, sub: Subscription, delivery: Delivery) -> str | None:
        """POST one signed attempt; returns None on success, else why it failed."""
        assert sub.url is not None and sub.secret is not None
        timestamp = int(datetime.now(UTC).timestamp())
        headers = signature_headers(sub.secret, delivery.id, timestamp, delivery.payload)
        headers["content-type"] = "application/json"
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._settings.webhook_timeout_s):
                response = await self._client.post(
                    sub.url, content=delivery.payload, headers=headers
                )
        except TimeoutError:
            return f"no response within {self._settings.webhook_timeout_s:g} s"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        log.debug(
            "delivery %s: HTTP %d in %.3f s",
            delivery.id,
            response.status_code,
            time.monotonic() - started,
        )
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"
