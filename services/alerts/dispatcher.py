"""The dispatcher: start due deliveries fairly, attempt each through its channel, record it.

Attempts run concurrently, up to ``delivery_concurrency``. A subscription has at most
``delivery_per_subscription`` attempts in flight, and failing subscriptions share a lane of
``delivery_failing_lane``, so slow or dead endpoints never hold the slots healthy ones need.
An endpoint not yet known to fail is slow once an attempt to it goes unanswered for
``SLOW_AFTER_S``: from then until that attempt ends, its subscription is in the failing lane
(nothing more starts for it) and its attempts leave the healthy ones' slots; open exchanges of
every kind together stay within twice ``delivery_concurrency``.
A digest subscription's due deliveries go out together, as one attempt; so do the alerts that
quiet hours or a budget held until one time (one summary webhook or digest email). Whatever
starts is claimed in the store first, for a lease longer than the attempt may last, so that no
other process sends it too; an instant alert with quiet hours or a budget is decided again as
it is claimed, and held summaries due in quiet hours (a retry, downtime) wait for their end.

Finished attempts are recorded in batches (:class:`_Recorder`): whatever finished while the
last write ran goes into the next transaction. An attempt's slot is free once its exchange
ends, but its deliveries stay out of every query for due work until its outcome is written, so
no delivery is ever started twice at once; at most as many outcomes as there are slots wait to
be written. A crash before the write leaves the delivery pending under its lease: it is sent
again once the lease ends, under the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from newsmon import metrics
from newsmon.alerts.channels import Channel
from newsmon.alerts.delivery_store import Clock, Delivery, DeliveryStore, Due, FinishedAttempt
from newsmon.alerts.payload import TEST_EVENT
from newsmon.alerts.policy import DEAD, decide, digest_period
from newsmon.alerts.schedule import quiet_until
from newsmon.alerts.subscriptions import Subscription
from newsmon.events import utcnow
from newsmon.logs import log_context
from newsmon.settings import Settings

log = logging.getLogger(__name__)

# The dispatcher looks for due retries at least this often, even when nothing wakes it.
DISPATCH_IDLE_S = 1.0
# Finished attempts wake the dispatcher a batch at a time; it looks for due work at most this
# often, so that one query fills the slots that many of them freed.
FILL_PAUSE_S = 0.005
# An attempt unanswered this long makes its subscription slow: it joins the failing lane.
SLOW_AFTER_S = 0.5
# Most alerts in one digest email; more wait for the next one.
DIGEST_MAX_ITEMS = 200
# Deliveries claimed for an attempt stay out of every dispatcher's reach this much longer than
# the attempt may last (its channel's total deadline): time for its outcome to be written (in a
# batch, once more after RECORD_RETRY_S if that fails; on stopping, RECORD_LAST_S), for a busy
# event loop, and for the clocks of hosts to disagree. Longer would only delay what a dead
# process left unsent; shorter risks a second send while the first one's outcome is written.
LEASE_MARGIN_S = 15.0
# A batch of attempts that failed to record is tried once more after this pause; then its
# deliveries are left pending, to be sent again (same webhook-id).
RECORD_RETRY_S = 1.0
# On stopping, the last outcomes get what is left of the attempts' deadline to be written, and
# at least this long.
RECORD_LAST_S = 2.0


@dataclass(eq=False)
class _Flight:
    """An attempt from its start until its outcome is written."""

    subscription_id: str
    failing: bool
    delivery_ids: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    recording: bool = field(default=False)  # done talking; its outcome awaits the recorder
    retry_at: datetime | None = field(default=None)


class _Recorder:
    """Writes finished attempts in batches: all that finished while the last write ran, in
    one transaction. ``recorded`` is told of each batch once it is written (or given up on)."""

    def __init__(self, store: DeliveryStore, recorded: Callable[[list[_Flight]], None]) -> None:
        self._store = store
        self._recorded = recorded
        self._flights: list[_Flight] = []
        self._attempts: list[FinishedAttempt] = []
        self._ready = asyncio.Event()
        self._closing = False
        self._writing = 0  # attempts in the write under way
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="record attempts")

    def add(self, flight: _Flight, attempt: FinishedAttempt) -> None:
        flight.recording = True
        self._flights.append(flight)
        self._attempts.append(attempt)
        self._ready.set()

    async def close(self, timeout: float) -> None:
        """Write what is left, for ``timeout`` seconds at most, then stop. What is not written
        by then stays pending, to be sent again (under the same ids) after a restart."""
        self._closing = True
        self._ready.set()
        task = self._task
        if task is None:
            return
        try:
            done, _ = await asyncio.wait([task], timeout=timeout)
        finally:
            if not task.done():  # timed out, or we are cancelled ourselves
                task.cancel()
        if not done:
            log.warning(
                "%d finished attempt(s) not recorded within %g s of stopping: left pending",
                len(self._attempts) + self._writing, timeout,
            )  # fmt: skip
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self._attempts:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            await asyncio.sleep(0)  # attempts ending in this same turn of the loop join in
            flights, attempts = self._flights, self._attempts
            self._flights, self._attempts = [], []
            self._writing = len(attempts)
            await self._write(attempts)
            self._writing = 0
            self._recorded(flights)

    async def _write(self, attempts: list[FinishedAttempt]) -> None:
        for last_try in (False, True):
            try:
                await self._store.record(attempts)
                return
            except Exception as exc:
                ids = [d for a in attempts for d in a.delivery_ids]
                shown = ",".join(ids[:5]) + (f" (+{len(ids) - 5})" if len(ids) > 5 else "")
                if last_try:
                    log.error(
                        "%d attempt(s) failed to record, left pending to be sent again: %s: %r",
                        len(attempts), shown, exc,
                    )  # fmt: skip
                    return
                log.warning("%d attempt(s) failed to record, trying again: %r", len(attempts), exc)
                await asyncio.sleep(RECORD_RETRY_S)


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        deliveries: DeliveryStore,
        channels: Mapping[str, Channel],
        clock: Clock = utcnow,
    ) -> None:
        self._settings = settings
        self._clock = clock
        # A claim's lease, by channel: the longest an attempt through it takes, and the margin.
        self._leases = {
            "webhook": settings.webhook_timeout_s + LEASE_MARGIN_S,
            "email": settings.smtp_timeout_s + LEASE_MARGIN_S,
        }
        self._lease_any = max(self._leases.values())
        self._deliveries = deliveries
        self._channels = channels
        self._rng = random.Random()  # noqa: S311  (jitter, not secrets)
        self._wake = asyncio.Event()
        self._flights: set[_Flight] = set()  # started and not yet recorded
        self._recording = 0  # of those, the ones whose outcome awaits the recorder
        self._tasks: dict[asyncio.Task[None], _Flight] = {}
        self._recorder = _Recorder(deliveries, self._recorded)
        self._next_retry: datetime | None = None  # the earliest retry this process recorded

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
        self._recorder.start()
        try:
            while not stop.is_set():
                self._wake.clear()
                looked = time.monotonic()
                exhausted = await self._fill()
                timeout = await self._idle_timeout(exhausted)
                waiters = [
                    asyncio.ensure_future(self._wake.wait()),
                    asyncio.ensure_future(stop.wait()),
                ]
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                pause = looked + FILL_PAUSE_S - time.monotonic()
                if pause > 0 and not stop.is_set():
                    await asyncio.sleep(pause)
        finally:
            await self._drain()

    async def _idle_timeout(self, exhausted: bool) -> float:
        """How long to sleep unless woken: until the next retry falls due, at most a while.

        What is due already and was not started waits for room, and a recorded attempt wakes
        us when there is some. While attempts are in flight their deliveries' next time is
        their lease's end, so the store's earliest due time says nothing: the retries recorded
        here say when.
        """
        timeout = DISPATCH_IDLE_S
        if not exhausted:  # waiting for room: an attempt turning slow makes some
            clock = time.monotonic()
            turning = [
                f.started + SLOW_AFTER_S - clock
                for f in self._flights
                if not f.recording and not f.failing and f.started + SLOW_AFTER_S > clock
            ]
            if turning:
                timeout = min(timeout, min(turning))
        now = self._clock()
        if self._next_retry is not None:
            if (ahead := (self._next_retry - now).total_seconds()) > 0:
                timeout = min(timeout, ahead)
            else:
                self._next_retry = None
        if exhausted and not self._flights:
            next_due = await self._deliveries.next_due_at()
            if next_due is not None and (ahead := (next_due - now).total_seconds()) > 0:
                timeout = min(timeout, ahead)
        return timeout

    async def _fill(self) -> bool:
        """Start due attempts while there is room, within each subscription's share.

        True when every due delivery was seen (none waits beyond the last query's limit).
        """
        settings = self._settings
        concurrency = settings.delivery_concurrency
        while True:
            # Slots are for attempts still talking to healthy endpoints. Those to failing or
            # slow ones are the failing lane's; outcomes waiting to be written, and all open
            # exchanges together, have bounds of their own.
            talking = [f for f in self._flights if not f.recording]
            slow_after = time.monotonic() - SLOW_AFTER_S
            failing_subs = {
                f.subscription_id for f in talking if f.failing or f.started < slow_after
            }
            healthy = sum(1 for f in talking if f.subscription_id not in failing_subs)
            room = min(
                concurrency - healthy,
                2 * concurrency - len(talking),
                concurrency - self._recording,
            )
            if room <= 0:
                return False
            per_sub = Counter(f.subscription_id for f in talking)
            failing_room = settings.delivery_failing_lane - len(failing_subs)
            capped = failing_subs | {
                s for s, n in per_sub.items() if n >= settings.delivery_per_subscription
            }
            busy = {d for f in self._flights for d in f.delivery_ids}
            due = await self._deliveries.due(
                room,
                exclude=busy,
                exclude_subscriptions=capped,
                healthy_only=failing_room <= 0,
            )
            started = 0
            # Claimed together after the loop, one statement per lease; those that quiet hours
            # or a budget may hold are decided again as they are claimed.
            plain: dict[float, list[tuple[Subscription, Delivery, bool]]] = {}
            scheduled: dict[float, list[tuple[Subscription, Delivery, bool]]] = {}
            moved = 0  # held alerts due in quiet hours (retries, downtime): moved to their end
            postponed: set[tuple[str, datetime]] = set()  # (subscription, due at): moved this pass
            for item in due:
                delivery, sub = item.delivery, item.subscription
                if started >= room or delivery.id in busy:
                    continue
                failing = sub.failing_since is not None
                if failing and (sub.id in failing_subs or failing_room <= 0):
                    continue
                if per_sub[sub.id] >= (1 if failing else settings.delivery_per_subscription):
                    continue
                if self._digest(sub):
                    if per_sub[sub.id]:
                        continue
                    rows = await self._deliveries.due_for(
                        sub.id, DIGEST_MAX_ITEMS, self._lease_s(sub), exclude=busy
                    )
                    if not rows:  # another process took them
                        continue
                elif delivery.held_reason is not None:  # with those held until the same time
                    held_at = (sub.id, delivery.next_attempt_at)
                    if held_at in postponed:  # moved with the first of them this pass
                        continue
                    quiet_end = _quiet_end(sub, self._clock())
                    if quiet_end is not None:
                        await self._deliveries.postpone_held(
                            sub.id, delivery.next_attempt_at, quiet_end
                        )
                        postponed.add(held_at)
                        moved += 1
                        continue
                    rows = await self._deliveries.release_held(
                        sub.id,
                        delivery.next_attempt_at,
                        self._lease_s(sub),
                        DIGEST_MAX_ITEMS,
                        exclude=busy,
                    )
                    if not rows:  # another process took them
                        continue
                    rows = await self._with_story_counts(sub.id, rows)
                else:  # started after the loop, once claimed with the others
                    queue = scheduled if _scheduled(sub, delivery) else plain
                    queue.setdefault(self._lease_s(sub), []).append((sub, delivery, failing))
                    rows = []
                if rows:
                    self._start(sub, rows, failing)
                    busy.update(r.id for r in rows)
                per_sub[sub.id] += 1
                started += 1
                if failing:
                    failing_subs.add(sub.id)
                    failing_room -= 1
            lost = 0  # taken by another process since the query: not ours to send
            for lease_s, chosen in plain.items():
                won = await self._deliveries.claim([d.id for _, d, _ in chosen], lease_s)
                for sub, delivery, failing in chosen:
                    if delivery.id in won:
                        self._start(sub, [delivery], failing)
                lost += len(chosen) - len(won)
            for lease_s, chosen in scheduled.items():
                won = await self._deliveries.claim_scheduled(
                    [Due(d, sub) for sub, d, _ in chosen], lease_s
                )
                for sub, delivery, failing in chosen:
                    if delivery.id in won:
                        self._start(sub, [delivery], failing)
                lost += len(chosen) - len(won)  # another process's, or held or moved now
            started -= lost
            # One subscription's backlog can fill a whole query; look again past it (and past
            # what others took: no longer due).
            if len(due) < room:
                return True
            if started == 0 and not lost and not moved:
                return False

    def _lease_s(self, sub: Subscription) -> float:
        return self._leases.get(sub.channel, self._lease_any)

    async def _with_story_counts(self, sub_id: str, rows: list[Delivery]) -> list[Delivery]:
        """Held alerts with how far their stories have grown while they waited."""
        try:
            counts = await self._deliveries.story_counts(
                sub_id, {r.story_id for r in rows if r.story_id}
            )
        except Exception as exc:  # the counts are a courtesy: the alerts go without them
            log.warning("story counts of %s not read: %r", sub_id, exc)
            return rows
        return [
            dataclasses.replace(r, story_articles_now=counts.get(r.story_id)) if r.story_id else r
            for r in rows
        ]

    def _start(self, sub: Subscription, rows: list[Delivery], failing: bool) -> None:
        flight = _Flight(sub.id, failing, tuple(r.id for r in rows))
        self._flights.add(flight)
        # The task copies the context: every line it logs names its delivery.
        with log_context(delivery_id=rows[0].id, subscription=sub.id):
            task = asyncio.create_task(
                self._attempt(flight, sub, rows), name=f"deliver {rows[0].id}"
            )
        self._tasks[task] = flight
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """An attempt's task ended: its slot is free."""
        flight = self._tasks.pop(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error(
                "delivery %s to %s failed: %r",
                ",".join(flight.delivery_ids), flight.subscription_id, exc,
            )  # fmt: skip
        if not flight.recording:  # no outcome: the deliveries stay pending as they were
            self._flights.discard(flight)
        self._wake.set()

    def _recorded(self, flights: list[_Flight]) -> None:
        for flight in flights:
            self._flights.discard(flight)
            self._recording -= 1
            if flight.retry_at is not None and (
                self._next_retry is None or flight.retry_at < self._next_retry
            ):
                self._next_retry = flight.retry_at
        self._wake.set()

    async def _drain(self) -> None:
        """Give attempts in flight one attempt's deadline to finish, and record them; the rest
        stay pending."""
        deadline = time.monotonic() + self._settings.webhook_timeout_s
        if self._tasks:
            _, unfinished = await asyncio.wait(
                list(self._tasks), timeout=self._settings.webhook_timeout_s
            )
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self._recorder.close(max(deadline - time.monotonic(), RECORD_LAST_S))

    async def _attempt(self, flight: _Flight, sub: Subscription, rows: list[Delivery]) -> None:
        attempted_at = self._clock()
        channel = self._channels[sub.channel]
        outcome = await channel.send(sub, rows)
        attempt = max(r.attempts for r in rows) + 1
        decided_at = self._clock()
        decision = decide(
            outcome,
            attempts=attempt,
            delays=channel.retry_delays,
            jitter=self._settings.webhook_retry_jitter,
            rng=self._rng,
            failing_since=sub.failing_since,
            disable_after_s=self._settings.subscription_disable_after_s,
            now=decided_at,
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
        if decision.retry_in_s is not None:
            flight.retry_at = decided_at + timedelta(seconds=decision.retry_in_s)
        self._recording += 1
        self._recorder.add(
            flight,
            FinishedAttempt(
                flight.delivery_ids, sub.id, attempted_at, outcome, decision, decided_at
            ),
        )


def _scheduled(sub: Subscription, delivery: Delivery) -> bool:
    """Whether quiet hours or a budget may hold this instant delivery as it goes (a test event
    goes at once)."""
    return bool(sub.quiet_hours or sub.budget) and delivery.document["type"] != TEST_EVENT


def _quiet_end(sub: Subscription, now: datetime) -> datetime | None:
    """When the quiet hours ``now`` falls in end, for a subscription that has them."""
    return quiet_until(sub.quiet_hours, now) if sub.quiet_hours is not None else None


def _count(channel: str, status: str, delivered: bool, rows: list[Delivery]) -> None:
    """Metrics of one attempt: its outcome, and for a delivery, the time since the fetch.

    Test events an operator asked for are no news: they count nowhere.
    """
    news = [row.document for row in rows if row.document["type"] != TEST_EVENT]
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
