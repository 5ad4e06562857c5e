"""The dispatcher: start due deliveries fairly, attempt each through its channel, record it.

Attempts run concurrently, up to ``delivery_concurrency``. A subscription has at most
``delivery_per_subscription`` attempts in flight, and failing subscriptions share a lane of
``delivery_failing_lane``, so slow or dead endpoints never hold the slots healthy ones need.
A digest subscription's due deliveries go out together, as one attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from newsmon import metrics
from newsmon.alerts.channels import Channel
from newsmon.alerts.delivery_store import Delivery, DeliveryStore
from newsmon.alerts.payload import TEST_EVENT
from newsmon.alerts.policy import DEAD, decide, digest_period
from newsmon.alerts.subscription_store import SubscriptionStore
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import utcnow
from newsmon.logs import log_context
from newsmon.settings import Settings

log = logging.getLogger(__name__)

# The dispatcher looks for due retries at least this often, even when nothing wakes it.
DISPATCH_IDLE_S = 1.0
# Most alerts in one digest email; more wait for the next one.
DIGEST_MAX_ITEMS = 200


@dataclass(frozen=True)
class _Flight:
    subscription_id: str
    failing: bool
    delivery_ids: tuple[str, ...]


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        deliveries: DeliveryStore,
        subscriptions: SubscriptionStore,
        channels: Mapping[str, Channel],
    ) -> None:
        self._settings = settings
        self._deliveries = deliveries
        self._subscriptions = subscriptions
        self._channels = channels
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._wake = asyncio.Event()
        self._in_flight: dict[asyncio.Task[None], _Flight] = {}

    def wake(self) -> None:
        """Deliveries may be due now."""
        self._wake.set()

    def _digest(self, sub: Subscription) -> bool:
        settings = self._settings
        period = digest_period(
            sub.mode, hourly_s=settings.digest_hourly_s, daily_s=settings.digest_daily_s
        )
        return period is not None

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._fill()
                # Sleep until the next retry falls due. What is due already and was not
                # started waits for room, and a finishing attempt wakes us when there is some.
                timeout = DISPATCH_IDLE_S
                next_due = await self._deliveries.next_due_at()
                if next_due is not None and (ahead := (next_due - utcnow()).total_seconds()) > 0:
                    timeout = min(timeout, ahead)
                waiters = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stop.wait()),
                ]
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
        finally:
            await self._drain()

    async def _fill(self) -> None:
        """Start due attempts while there is room, within each subscription's share."""
        settings = self._settings
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
            due = await self._deliveries.due(
                room,
                exclude=busy,
                exclude_subscriptions=capped,
                healthy_only=failing_room <= 0,
            )
            subs = {
                s.id: s
                for s in await self._subscriptions.subscriptions({d.subscription_id for d in due})
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
                if self._digest(sub):
                    if per_sub[sub.id]:
                        continue
                    rows = await self._deliveries.due_for(sub.id, DIGEST_MAX_ITEMS)
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
            list(self._in_flight), timeout=self._settings.webhook_timeout_s
        )
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _attempt(self, sub: Subscription, rows: list[Delivery]) -> None:
        attempted_at = utcnow()
        channel = self._channels[sub.channel]
        outcome = await channel.send(sub, rows)
        attempt = max(r.attempts for r in rows) + 1
        decision = decide(
            outcome,
            attempts=attempt,
            delays=channel.retry_delays,
            jitter=self._settings.webhook_retry_jitter,
            rng=self._rng,
            failing_since=sub.failing_since,
            disable_after_s=self._settings.subscription_disable_after_s,
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
        await self._deliveries.finish_attempt(
            [r.id for r in rows],
            sub,
            attempted_at=attempted_at,
            outcome=outcome,
            decision=decision,
        )


def _count(channel: str, status: str, delivered: bool, rows: list[Delivery]) -> None:
    """Metrics of one attempt: its outcome, and for a delivery, the time since the fetch.

    Test events an operator asked for are no news: they count nowhere.
    """
    payloads = [json.loads(row.payload) for row in rows]
    news = [p for p in payloads if p["type"] != TEST_EVENT]
    if not news:
        return
    outcome = "delivered" if delivered else ("dead" if status == DEAD else "retry")
    metrics.DELIVERIES.labels(channel, outcome).inc(len(news))
    if delivered:
        now = utcnow()
        for payload in news:
            fetched_at = payload["data"]["article"].get("fetched_at")
            if fetched_at:
                age = (now - datetime.fromisoformat(fetched_at)).total_seconds()
                metrics.END_TO_END.labels(channel).observe(age)
