"""The alerts service: turn matches into deliveries, and deliver them with retries.

Matches are recorded as delivery rows before the bus offset is committed, so a crash loses
nothing and a redelivered match inserts nothing new. A dispatcher sends due deliveries
concurrently, each attempt under its own deadline. A subscription has at most a few attempts in
flight, and failing subscriptions share a small lane of their own, so slow or dead endpoints
never hold the slots that healthy ones need.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.utils import parseaddr

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import metrics
from newsmon.alerts import mail, store
from newsmon.alerts.policy import DEAD, Outcome, decide, next_digest_at, webhook_outcome
from newsmon.alerts.routes import build_public_router, build_router
from newsmon.alerts.signing import signature_headers
from newsmon.alerts.ssrf import GuardedTransport, Resolver, UnsafeURL, check_url, system_resolver
from newsmon.alerts.store import Delivery, NewDelivery, delivery_id
from newsmon.alerts.subscriptions import Subscription
from newsmon.bus import Bus, Message
from newsmon.events import (
    ARTICLES_MATCHED,
    Article,
    ArticleMatched,
    EventError,
    Evidence,
    TopicScore,
    utcnow,
)
from newsmon.logs import log_context
from newsmon.settings import Settings

log = logging.getLogger(__name__)
alert_log = logging.getLogger("newsmon.alerts")

GROUP = "alerts"
PAYLOAD_VERSION = 1
USER_AGENT = "newsmon-webhooks/0.1"
# The dispatcher looks for due retries at least this often, even when nothing wakes it.
DISPATCH_IDLE_S = 1.0
# Most alerts in one digest email; more wait for the next one.
DIGEST_MAX_ITEMS = 200
# Most of a response body read (and then ignored): enough to keep the connection reusable.
RESPONSE_READ_BYTES = 64 * 1024


def build_payload(
    subscription_id: str, event: ArticleMatched, score: TopicScore, *, kind: str = "article.matched"
) -> bytes:
    """The JSON body of one alert (Standard Webhooks shape: type, timestamp, data)."""
    article = event.article
    body = {
        "type": kind,
        "version": PAYLOAD_VERSION,
        "timestamp": event.occurred_at.isoformat(),
        "data": {
            "subscription_id": subscription_id,
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
                "fetched_at": event.fetched_at.isoformat(),
            },
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _count(channel: str, status: str, delivered: bool, rows: list[Delivery]) -> None:
    """Metrics of one attempt: its outcome, and for a delivery, the time since the fetch."""
    outcome = "delivered" if delivered else ("dead" if status == DEAD else "retry")
    metrics.DELIVERIES.labels(channel, outcome).inc(len(rows))
    if delivered:
        now = utcnow()
        for row in rows:
            fetched_at = json.loads(row.payload)["data"]["article"].get("fetched_at")
            if fetched_at:
                age = (now - datetime.fromisoformat(fetched_at)).total_seconds()
                metrics.END_TO_END.labels(channel).observe(age)


def test_event() -> tuple[ArticleMatched, TopicScore]:
    """A sample match for ``POST /subscriptions/{id}/test``: real shape, obviously not news."""
    score = TopicScore(
        topic="newsmon-test",
        topic_version=1,
        score=1.0,
        threshold=0.5,
        matched=True,
        evidence=Evidence(
            passage="This is a test alert sent from newsmon.",
            nearest_positive="A test alert.",
            positive_similarity=1.0,
        ),
    )
    article = Article(
        article_id="test_" + uuid.uuid4().hex,
        feed_url="https://newsmon.invalid/test-feed",
        feed_title="newsmon test feed",
        title="newsmon test alert",
        link="https://newsmon.invalid/test-alert",
        summary="Sent on request to check that this subscription receives alerts.",
    )
    return ArticleMatched(article=article, scores=[score], fetched_at=utcnow()), score


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


@dataclass(frozen=True)
class _Flight:
    subscription_id: str
    failing: bool
    delivery_ids: tuple[str, ...]


class AlertsService:
    name = "alerts"

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: AsyncEngine,
        seeds: Sequence[Subscription] = (),
        *,
        client: httpx.AsyncClient | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self.settings = settings
        self.store = store.AlertsStore(engine)
        self.resolver = resolver
        self._bus = bus
        self._seeds = list(seeds)
        self._seeded = False
        self._seed_lock = asyncio.Lock()
        self._client = client or httpx.AsyncClient(
            transport=GuardedTransport(
                resolver=resolver,
                allow_loopback=settings.webhook_allow_loopback,
                limits=httpx.Limits(
                    max_connections=settings.delivery_concurrency,
                    max_keepalive_connections=settings.delivery_concurrency,
                ),
            ),
            follow_redirects=False,
            trust_env=False,
        )
        self._owns_client = client is None
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._wake = asyncio.Event()
        self._in_flight: dict[asyncio.Task[None], _Flight] = {}
        self.router = build_router(self)
        self.public_router = build_public_router(self)

    # lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_seeded()
        await self._bus.ensure_topics([ARTICLES_MATCHED])
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(stop))
                tasks.create_task(self._dispatch(stop))
        finally:
            await self._drain()
            if self._owns_client:
                await self._client.aclose()

    async def ensure_seeded(self) -> None:
        """Load the seeds file's subscriptions into the store, on the store's first start only."""
        async with self._seed_lock:
            if not self._seeded:
                added = await self.store.seed_once(self._seeds)
                if added:
                    log.info("alerts: %d subscription(s) added from the seeds file", added)
                self._seeded = True

    def ready(self) -> bool:
        return self._seeded

    def wake(self) -> None:
        """Tell the dispatcher that deliveries may be due now."""
        self._wake.set()

    async def check_webhook_url(self, url: str) -> None:
        """Raise UnsafeURL unless ``url`` may receive webhooks (registration-time guard)."""
        await check_url(
            url, resolver=self.resolver, allow_loopback=self.settings.webhook_allow_loopback
        )

    # matches -> deliveries -----------------------------------------------------------------

    async def _consume(self, stop: asyncio.Event) -> None:
        async with self._bus.consumer([ARTICLES_MATCHED], GROUP) as consumer:
            while not stop.is_set():
                batch = await consumer.poll(100, timeout=0.5)
                metrics.record_lag(GROUP, consumer.lag())
                if batch:
                    await self.handle_batch(batch)
                    await consumer.commit()

    async def handle_batch(self, messages: list[Message]) -> int:
        """Record a delivery per (subscription, article, topic) the batch asks for."""
        await self.ensure_seeded()
        subscriptions = await self.store.recording_subscriptions()
        rows: list[NewDelivery] = []
        for message in messages:
            try:
                event = ArticleMatched.decode(message.value)
            except EventError as exc:
                log.error("skipping malformed event at %s: %s", message.coordinates, exc)
                continue
            for score in event.matches:
                for sub in subscriptions:
                    if sub.wants(score.topic, score.score):
                        rows.append(self._new_delivery(sub, event, score))
        added = await self.store.add(rows)
        if added:
            self.wake()
        return added

    def _new_delivery(
        self,
        sub: Subscription,
        event: ArticleMatched,
        score: TopicScore,
        kind: str = "article.matched",
    ) -> NewDelivery:
        period = self._digest_period(sub)
        return NewDelivery(
            id=delivery_id(sub.id, event.article.article_id, score.topic),
            subscription_id=sub.id,
            article_id=event.article.article_id,
            topic=score.topic,
            payload=build_payload(sub.id, event, score, kind=kind),
            not_before=next_digest_at(utcnow(), period) if period else None,
        )

    def _digest_period(self, sub: Subscription) -> float | None:
        if sub.mode == "hourly":
            return self.settings.digest_hourly_s
        if sub.mode == "daily":
            return self.settings.digest_daily_s
        return None

    async def send_test(self, sub: Subscription) -> str:
        """Queue a test alert for ``sub`` (sent at once, digest or not); returns its id."""
        event, score = test_event()
        row = self._new_delivery(sub, event, score, kind="subscription.test")
        await self.store.add([dataclasses.replace(row, not_before=None)])
        self.wake()
        return row.id

    # dispatch ------------------------------------------------------------------------------

    async def _dispatch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            await self._fill()
            # Sleep until the next retry falls due. What is due already and was not started
            # waits for room, and a finishing attempt wakes us when there is some.
            timeout = DISPATCH_IDLE_S
            next_due = await self.store.next_due_at()
            if next_due is not None and (ahead := (next_due - utcnow()).total_seconds()) > 0:
                timeout = min(timeout, ahead)
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def _fill(self) -> None:
        """Start due attempts while there is room, within each subscription's share."""
        settings = self.settings
        while True:
            room = settings.delivery_concurrency - len(self._in_flight)
            if room <= 0:
                return
            per_sub = Counter(f.subscription_id for f in self._in_flight.values())
            failing_subs = {f.subscription_id for f in self._in_flight.values() if f.failing}
            failing_room = settings.delivery_failing_lane - len(failing_subs)
            capped = failing_subs | {
                s for s, n in per_sub.items() if n >= settings.delivery_per_subscription
            }
            busy = {d for f in self._in_flight.values() for d in f.delivery_ids}
            due = await self.store.due(
                room,
                exclude=busy,
                exclude_subscriptions=capped,
                healthy_only=failing_room <= 0,
            )
            subs = {
                s.id: s for s in await self.store.subscriptions({d.subscription_id for d in due})
            }
            started = 0
            for delivery in due:
                sub = subs.get(delivery.subscription_id)
                if sub is None or started >= room:
                    continue
                failing = sub.failing_since is not None
                if failing and (sub.id in failing_subs or failing_room <= 0):
                    continue
                if per_sub[sub.id] >= (1 if failing else settings.delivery_per_subscription):
                    continue
                if self._digest_period(sub) is not None:
                    if per_sub[sub.id]:
                        continue
                    rows = await self.store.due_for(sub.id, DIGEST_MAX_ITEMS)
                else:
                    rows = [delivery]
                self._start(sub, rows, failing)
                per_sub[sub.id] += 1
                started += 1
                if failing:
                    failing_subs.add(sub.id)
                    failing_room -= 1
            # One subscription's backlog can fill a whole query; look again past it.
            if started == 0 or len(due) < room:
                return

    def _start(self, sub: Subscription, rows: list[Delivery], failing: bool) -> None:
        # The task copies the context: every line it logs names its delivery.
        with log_context(delivery_id=rows[0].id, subscription=sub.id):
            task = asyncio.create_task(self._attempt(sub, rows), name=f"deliver {rows[0].id}")
        self._in_flight[task] = _Flight(sub.id, failing, tuple(r.id for r in rows))
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        flight = self._in_flight.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None and flight:
            log.error(
                "delivery %s to %s failed to record: %r",
                ",".join(flight.delivery_ids), flight.subscription_id, exc,
            )  # fmt: skip
        self._wake.set()

    async def _drain(self) -> None:
        """Give attempts in flight one attempt's deadline to finish; the rest stay pending."""
        if not self._in_flight:
            return
        _, unfinished = await asyncio.wait(
            list(self._in_flight), timeout=self.settings.webhook_timeout_s
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _attempt(self, sub: Subscription, rows: list[Delivery]) -> None:
        attempted_at = utcnow()
        if sub.channel == "log":
            for row in rows:
                alert_log.info("%s", describe_alert(row.payload))
            outcome = Outcome(error=None)
        elif sub.channel == "email":
            outcome = await self._mail(sub, rows)
        else:
            outcome = await self._post(sub, rows[0])
        delays = (
            self.settings.email_retry_delays_s
            if sub.channel == "email"
            else self.settings.webhook_retry_delays_s
        )
        attempt = max(r.attempts for r in rows) + 1
        decision = decide(
            outcome,
            attempts=attempt,
            delays=delays,
            jitter=self.settings.webhook_retry_jitter,
            rng=self._rng,
            failing_since=sub.failing_since,
            disable_after_s=self.settings.subscription_disable_after_s,
            now=utcnow(),
        )
        _count(sub.channel, decision.status, outcome.error is None, rows)
        where = f"delivery {rows[0].id}" + (f" (+{len(rows) - 1})" if len(rows) > 1 else "")
        target = sub.url or sub.email or sub.channel
        if outcome.error is not None:
            if decision.status == DEAD:
                log.error(
                    "%s to %s (%s) failed for good after %d attempt(s): %s",
                    where, sub.id, target, attempt, outcome.error,
                )  # fmt: skip
            else:
                log.warning(
                    "%s to %s (%s) attempt %d failed: %s; retrying in %.1f s",
                    where, sub.id, target, attempt, outcome.error, decision.retry_in_s or 0,
                )  # fmt: skip
        if decision.disable_reason and sub.disabled_reason is None:
            log.error("subscription %s (%s) disabled: %s", sub.id, target, decision.disable_reason)
        await self.store.finish_attempt(
            [r.id for r in rows],
            sub,
            attempted_at=attempted_at,
            outcome=outcome,
            decision=decision,
        )

    async def _post(self, sub: Subscription, delivery: Delivery) -> Outcome:
        """POST one signed attempt under one total deadline."""
        assert sub.url is not None and sub.secret is not None
        now = utcnow()
        headers = signature_headers(
            sub.secret,
            delivery.id,
            int(now.timestamp()),
            delivery.payload,
            previous=sub.previous_secret_at(now),
        )
        headers["content-type"] = "application/json"
        headers["user-agent"] = USER_AGENT
        timeout = self.settings.webhook_timeout_s
        started = time.monotonic()
        try:
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    "POST", sub.url, content=delivery.payload, headers=headers
                ) as response,
            ):
                read = 0
                async for chunk in response.aiter_raw():
                    read += len(chunk)
                    if read >= RESPONSE_READ_BYTES:
                        break
        except TimeoutError:
            return Outcome(f"no response within {timeout:g} s", latency_s=timeout)
        except UnsafeURL as exc:
            return Outcome(str(exc), latency_s=time.monotonic() - started)
        except httpx.HTTPError as exc:
            detail = str(exc) or "connection closed or reset"
            return Outcome(f"{type(exc).__name__}: {detail}", latency_s=time.monotonic() - started)
        return webhook_outcome(
            response.status_code,
            response.headers.get("retry-after"),
            time.monotonic() - started,
            utcnow(),
        )

    async def _mail(self, sub: Subscription, rows: list[Delivery]) -> Outcome:
        assert sub.email is not None
        settings = self.settings
        alerts = [json.loads(r.payload)["data"] for r in rows]
        digest = self._digest_period(sub) is not None
        message_id = (
            "digest_" + hashlib.sha256("".join(r.id for r in rows).encode()).hexdigest()[:32]
            if digest
            else rows[0].id
        )
        message = mail.render(
            alerts,
            sender=settings.smtp_from,
            recipient=sub.email,
            message_id=message_id,
            unsubscribe_url=(
                f"{settings.public_url.rstrip('/')}/subscriptions/{sub.id}"
                f"/unsubscribe/{sub.unsubscribe_token}"
            ),
            period=sub.mode if digest else None,
        )
        password = settings.smtp_password.get_secret_value() if settings.smtp_password else None
        config = mail.SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=parseaddr(settings.smtp_from)[1],
            starttls=settings.smtp_starttls,
            implicit_tls=settings.smtp_tls,
            username=settings.smtp_username,
            password=password,
            timeout_s=settings.smtp_timeout_s,
        )
        return await mail.send(message, config)
