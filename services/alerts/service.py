"""The alerts service: turn matches into deliveries, and what the API asks of subscriptions.

Matches are recorded as delivery rows before the bus offset is committed, so a crash loses
nothing and a redelivered match inserts nothing new. A subscription that hears once per story
claims each (topic, story) it is alerted of, and each development of it; a later article of
the story is recorded as suppressed. Quiet hours and budgets hold alerts, as rows that wait
for their release time (``schedule``). The dispatcher (``dispatcher``) sends what is due
through the channels (``webhook``, ``mail``, ``channels``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon import metrics
from newsmon.alerts.channels import Channel, LogChannel
from newsmon.alerts.delivery_store import (
    Clock,
    DeliveryFilter,
    DeliveryStore,
    NewAlert,
    NewDelivery,
    delivery_id,
)
from newsmon.alerts.dispatcher import Dispatcher
from newsmon.alerts.mail import EmailChannel
from newsmon.alerts.payload import MATCHED_EVENT, TEST_EVENT, build_payload, story_of, test_event
from newsmon.alerts.policy import digest_period, next_digest_at
from newsmon.alerts.schedule import digest_release
from newsmon.alerts.schemas import AttemptPublic, DeliveryDetail, DeliveryPublic
from newsmon.alerts.signing import new_secret
from newsmon.alerts.subscription_store import SubscriptionStore
from newsmon.alerts.subscriptions import (
    Subscription,
    SubscriptionCreate,
    SubscriptionCreated,
    SubscriptionPublic,
    SubscriptionUpdate,
    channel_problems,
    new_subscription_id,
)
from newsmon.alerts.webhook import WebhookChannel
from newsmon.bus import Bus, Message
from newsmon.events import (
    ARTICLES_MATCHED,
    ArticleMatched,
    EventError,
    StoryRef,
    TopicScore,
    as_utc,
    utcnow,
)
from newsmon.feedback_links import claim_for, feedback_links, feedback_secret
from newsmon.settings import Settings
from newsmon.ssrf import Resolver, UnsafeURL, check_url, system_resolver

log = logging.getLogger(__name__)

GROUP = "alerts"
# What a read-only key sees instead of a payload's feedback links.
REDACTED = "redacted"
# How often old story claims are looked for (delivery_store.STORY_CLAIM_DAYS).
EXPIRE_EVERY_S = 3600.0


class NotFound(LookupError):
    """No subscription or delivery has this id."""


class Invalid(ValueError):
    """A request the schema let through but the service refuses: ``(field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems


class Conflict(ValueError):
    """The request contradicts the state (an id taken, a secret for a channel without one)."""


# The slugs of the topics that exist, for checking subscriptions: classify owns topics, and the
# runner, which sees both services, says where to look them up.
TopicCatalogue = Callable[[], Awaitable[Collection[str]]]


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
        topics: TopicCatalogue | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.settings = settings
        self._topics = topics
        # What "now" is for quiet hours, budgets and due work (tests move it by hand).
        self._clock = clock
        self.subscriptions = SubscriptionStore(engine)
        self.deliveries = DeliveryStore(engine, clock)
        self._engine = engine
        self._feedback_secret: bytes | None = None  # read by ensure_seeded
        self._resolver = resolver
        self._bus = bus
        self._seeds = list(seeds)
        self._seeded = False
        self._seed_lock = asyncio.Lock()
        self._claims_expired_at: float | None = None  # time.monotonic()
        self._channels: dict[str, Channel] = {
            "webhook": WebhookChannel(settings, resolver, client),
            "email": EmailChannel(settings),
            "log": LogChannel(),
        }
        self._dispatcher = Dispatcher(settings, self.deliveries, self._channels, clock)

    # lifecycle -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_seeded()
        await self._bus.ensure_topics([ARTICLES_MATCHED])
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._consume(stop))
                tasks.create_task(self._dispatcher.run(stop))
        finally:
            for channel in self._channels.values():
                await channel.close()

    async def ensure_seeded(self) -> None:
        """Load the seeds file's subscriptions into the store, on the store's first start only,
        and the secret that signs the alerts' feedback links."""
        async with self._seed_lock:
            if not self._seeded:
                added = await self.subscriptions.seed_once(self._seeds)
                if added:
                    log.info("%d subscription(s) added from the seeds file", added)
                self._feedback_secret = await feedback_secret(self.settings, self._engine)
                self._seeded = True

    def ready(self) -> bool:
        return self._seeded

    def wake(self) -> None:
        """Tell the dispatcher that deliveries may be due now."""
        self._dispatcher.wake()

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
        """Record a delivery per (subscription, article, topic) the batch asks for; returns
        how many are alerts (sent or held), not a story's suppressed articles."""
        await self.ensure_seeded()
        subscriptions = await self.subscriptions.recording_subscriptions()
        rows: list[NewAlert] = []
        for message in messages:
            try:
                event = ArticleMatched.decode(message.value)
            except EventError as exc:
                log.error("skipping malformed event at %s: %s", message.coordinates, exc)
                continue
            story = story_of(event)
            claims = story_claims(story, event.article.article_id)
            for score in event.matches:
                for sub in subscriptions:
                    if sub.wants(score.topic, score.score):
                        row = self._new_delivery(sub, event, story, score)
                        grouped = claims if sub.grouping == "story" else ()
                        rows.append(NewAlert(row, sub, score.score, grouped))
        added = await self.deliveries.add_alerts(rows)
        if added:
            self.wake()
        await self._expire_story_claims()
        return added

    async def _expire_story_claims(self) -> None:
        """Once an hour at most, forget the claims of stories long over (``STORY_CLAIM_DAYS``)."""
        now = time.monotonic()
        if self._claims_expired_at is not None and now - self._claims_expired_at < EXPIRE_EVERY_S:
            return
        self._claims_expired_at = now
        try:
            if expired := await self.deliveries.expire_story_claims():
                log.info("%d story claim(s) expired", expired)
        except Exception as exc:  # housekeeping: the next hour tries again
            log.warning("story claims not expired: %r", exc)

    def _new_delivery(
        self,
        sub: Subscription,
        event: ArticleMatched,
        story: StoryRef,
        score: TopicScore,
        kind: str = MATCHED_EVENT,
    ) -> NewDelivery:
        settings = self.settings
        period = digest_period(
            sub.mode, hourly_s=settings.digest_hourly_s, daily_s=settings.digest_daily_s
        )
        article_id = event.article.article_id
        claim = claim_for(
            article_id,
            score.topic,
            sub.id,
            lifetime_days=settings.feedback_link_days,
            now=self._clock(),
        )
        assert self._feedback_secret is not None, "ensure_seeded comes first"
        feedback = feedback_links(claim, self._feedback_secret, settings.public_url)
        not_before, held_reason = None, None
        if period:  # a digest: at the end of its period, or of the quiet hours it falls in
            when = digest_release(
                sub.quiet_hours, next_digest_at(self._clock(), period), score.score
            )
            not_before, held_reason = when.at, when.reason
        return NewDelivery(
            id=delivery_id(sub.id, article_id, score.topic),
            subscription_id=sub.id,
            article_id=article_id,
            topic=score.topic,
            payload=build_payload(sub.id, event, score, feedback=feedback, kind=kind),
            not_before=not_before,
            story_id=story.story_id,
            held_reason=held_reason,
        )

    # subscriptions: what the API asks -------------------------------------------------------

    async def _found(self, sub_id: str) -> Subscription:
        await self.ensure_seeded()
        sub = await self.subscriptions.subscription(sub_id)
        if sub is None:
            raise NotFound(f"no subscription {sub_id!r}")
        return sub

    async def _check_url(self, url: str | None) -> None:
        """Refuse a webhook URL the SSRF guard refuses (registration-time check)."""
        if url is None:
            return
        try:
            await check_url(
                url, resolver=self._resolver, allow_loopback=self.settings.webhook_allow_loopback
            )
        except UnsafeURL as exc:
            raise Invalid([("url", str(exc))]) from exc

    async def _check_topics(self, topics: Sequence[str] | None) -> None:
        if not topics or self._topics is None:
            return
        known = set(await self._topics())
        unknown = [t for t in topics if t not in known]
        if unknown:
            listed = ", ".join(sorted(known)) or "none yet"
            raise Invalid(
                [("topics", f"unknown topic(s) {', '.join(unknown)}; the topics are: {listed}")]
            )

    async def list_subscriptions(self) -> list[SubscriptionPublic]:
        await self.ensure_seeded()
        return [_public(s) for s in await self.subscriptions.subscriptions()]

    async def subscription(self, sub_id: str) -> SubscriptionPublic:
        return _public(await self._found(sub_id))

    async def create_subscription(self, body: SubscriptionCreate) -> SubscriptionCreated:
        """Subscribe a webhook, an email address or the log; a webhook's secret is shown once."""
        await self.ensure_seeded()
        problems = channel_problems(body.channel, body.url, body.email, body.mode, body.budget)
        if problems:
            raise Invalid(problems)
        await self._check_topics(body.topics)
        await self._check_url(body.url)
        sub = Subscription(
            id=body.id or new_subscription_id(),
            channel=body.channel,
            url=body.url,
            email=body.email,
            topics=tuple(body.topics),
            min_score=body.min_score,
            mode=body.mode,
            grouping=body.grouping,
            budget=body.budget,
            quiet_hours=body.quiet_hours,
            secret=new_secret() if body.channel == "webhook" else None,
        )
        if not await self.subscriptions.create_subscription(sub):
            raise Conflict(f"subscription {sub.id!r} exists")
        return SubscriptionCreated(**_public(sub).model_dump(), secret=sub.secret)

    async def update_subscription(
        self, sub_id: str, body: SubscriptionUpdate
    ) -> SubscriptionPublic:
        """Change the topics, minimum score, mode, address, grouping, budget or quiet hours
        (null removes a budget or quiet hours)."""
        sub = await self._found(sub_id)
        changes = body.model_dump(exclude_unset=True)
        merged = {**sub.model_dump(), **changes}
        problems = channel_problems(
            sub.channel, merged["url"], merged["email"], merged["mode"], merged["budget"]
        )
        required = ("topics", "min_score", "mode", "grouping")
        if any(v is None for k, v in changes.items() if k in required):
            problems.append(("body", "topics, min_score, mode and grouping cannot be null"))
        if problems:
            raise Invalid(problems)
        await self._check_topics(changes.get("topics"))
        await self._check_url(changes.get("url"))
        return await self._update(sub_id, **changes)

    async def _update(self, sub_id: str, **changes: object) -> SubscriptionPublic:
        updated = await self.subscriptions.update_subscription(sub_id, **changes)
        if updated is None:
            raise NotFound(f"no subscription {sub_id!r}")
        return _public(updated)

    async def delete_subscription(self, sub_id: str) -> None:
        """Delete a subscription; pending deliveries end dead, its history stays."""
        await self.ensure_seeded()
        if not await self.subscriptions.delete_subscription(sub_id):
            raise NotFound(f"no subscription {sub_id!r}")

    async def pause_subscription(self, sub_id: str) -> SubscriptionPublic:
        """Stop alerting: nothing new is recorded until resumed; pending deliveries wait."""
        await self._found(sub_id)
        return await self._update(sub_id, paused=True, paused_reason="paused through the API")

    async def resume_subscription(self, sub_id: str) -> SubscriptionPublic:
        """Undo a pause, an unsubscribe or a disable; held deliveries go out now."""
        await self._found(sub_id)
        resumed = await self._update(
            sub_id,
            paused=False,
            paused_reason=None,
            disabled_reason=None,
            disabled_at=None,
            failing_since=None,
        )
        self.wake()
        return resumed

    async def rotate_secret(self, sub_id: str) -> SubscriptionCreated:
        """A new webhook secret, shown once; the old one also signs during the overlap."""
        sub = await self._found(sub_id)
        if sub.channel != "webhook":
            raise Conflict("only webhooks have secrets")
        secret = new_secret()
        rotated = await self._update(
            sub_id,
            secret=secret,
            previous_secret=sub.secret,
            previous_secret_expires_at=utcnow()
            + timedelta(seconds=self.settings.webhook_secret_overlap_s),
        )
        return SubscriptionCreated(**rotated.model_dump(), secret=secret)

    async def send_test(self, sub_id: str) -> str:
        """Queue a test alert for ``sub_id`` (sent at once, digest or not); returns its id."""
        sub = await self._found(sub_id)
        event, score = test_event()
        row = self._new_delivery(sub, event, story_of(event), score, kind=TEST_EVENT)
        await self.deliveries.add([dataclasses.replace(row, not_before=None, held_reason=None)])
        self.wake()
        return row.id

    async def replay(self, sub_id: str, since: datetime, until: datetime | None) -> int:
        """Send again every delivery of ``sub_id`` created in [since, until)."""
        await self._found(sub_id)
        since, until = as_utc(since), as_utc(until) if until else utcnow()
        if until <= since:
            raise Invalid([("until", "must be later than since")])
        count = await self.deliveries.requeue(DeliveryFilter(sub_id, None, since, until))
        self.wake()
        return count

    async def unsubscribe_link(self, sub_id: str, token: str) -> Subscription:
        """The subscription an email's unsubscribe link names; NotFound unless the token fits."""
        await self.ensure_seeded()
        sub = await self.subscriptions.subscription(sub_id)
        # Bytes: compare_digest refuses str with non-ASCII characters, and a link may carry any.
        if sub is None or not hmac.compare_digest(sub.unsubscribe_token.encode(), token.encode()):
            raise NotFound("unknown unsubscribe link")
        return sub

    async def unsubscribe(self, sub_id: str, token: str) -> None:
        """One-click unsubscribe (RFC 8058): pauses the subscription."""
        await self.unsubscribe_link(sub_id, token)
        await self._update(sub_id, paused=True, paused_reason="unsubscribed by the recipient")

    # deliveries: what the API asks ---------------------------------------------------------

    async def list_deliveries(
        self, where: DeliveryFilter, limit: int, offset: int
    ) -> list[DeliveryPublic]:
        """Deliveries, newest first."""
        return [
            DeliveryPublic.model_validate(d, from_attributes=True)
            for d in await self.deliveries.deliveries(where, limit, offset)
        ]

    async def delivery(self, delivery_id: str, *, redact: bool = False) -> DeliveryDetail:
        """One delivery with its payload and every attempt; ``redact``: without the payload's
        feedback links (posting one labels a topic, a write a read-only key may not make)."""
        delivery = await self.deliveries.get(delivery_id)
        if delivery is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        payload = json.loads(delivery.payload)
        return DeliveryDetail(
            **DeliveryPublic.model_validate(delivery, from_attributes=True).model_dump(),
            payload=without_feedback(payload) if redact else payload,
            attempt_log=[
                AttemptPublic.model_validate(a, from_attributes=True)
                for a in await self.deliveries.attempts(delivery_id)
            ],
        )

    async def retry(self, delivery_id: str) -> DeliveryPublic:
        """Send a delivery again now (a dead one, or any other), with a fresh schedule."""
        if not await self.deliveries.requeue(DeliveryFilter(), ids=[delivery_id]):
            raise NotFound(f"no delivery {delivery_id!r}")
        self.wake()
        delivery = await self.deliveries.get(delivery_id)
        if delivery is None:
            raise NotFound(f"no delivery {delivery_id!r}")
        return DeliveryPublic.model_validate(delivery, from_attributes=True)


def without_feedback(payload: Any) -> Any:
    """A delivery's payload without its signed feedback links: ``data.feedback`` (an alert's,
    a test event's) and each summarised alert's (``data.alerts[].feedback``), shown as
    ``"redacted"``."""
    if not isinstance(payload, dict) or not isinstance(data := payload.get("data"), dict):
        return payload
    data = dict(data)
    if "feedback" in data:
        data["feedback"] = REDACTED
    if isinstance(alerts := data.get("alerts"), list):
        data["alerts"] = [
            {**a, "feedback": REDACTED} if isinstance(a, dict) and "feedback" in a else a
            for a in alerts
        ]
    return {**payload, "data": data}


def story_claims(story: StoryRef, article_id: str) -> tuple[str, ...]:
    """What an article may claim for a subscription that hears once per story: the story's
    first alert, and for an update the alert of that development (two articles that report
    the same new facts alert once; an update that names none is a development of its own).
    An update also takes the first alert where no earlier article of the story reached the
    subscription."""
    if not story.update:
        return ("story",)
    facts = "\x00".join(sorted(story.new)) if story.new else "article\x00" + article_id
    return ("story", "update:" + hashlib.sha256(facts.encode()).hexdigest()[:32])


def _public(sub: Subscription) -> SubscriptionPublic:
    return SubscriptionPublic.model_validate(sub, from_attributes=True)
