"""Deliveries in the database: one row per (subscription, article, topic), and every attempt.

A delivery's id is derived from (subscription, article, topic), so a redelivered match never
alerts twice. The next attempt's time is stored with the delivery, so a restart resumes the
schedule where it stopped.

The dispatcher reads due work with its subscriptions in one query (:meth:`DeliveryStore.due`),
claims what it starts (:meth:`DeliveryStore.claim`, :meth:`DeliveryStore.due_for`) and records
finished attempts many at a time (:meth:`DeliveryStore.record`): one transaction, a few
statements, whatever the number of attempts in it. A claim is a lease: the claimed deliveries'
next attempt moves past the attempt's longest duration, in the statement that checks they are
still due, so of processes sharing the database one sends each; the outcome sets the real next
attempt, and a process that dies before it leaves a lease that ends (the delivery goes again).

The fan-out (:meth:`DeliveryStore.add_alerts`) decides in the transaction that records the
alerts which of them a story already covers (a claim per (subscription, topic, story), unique in
the database, so racing processes alert once) and which wait for quiet hours or a budget (the
budget's row is locked while it is counted). Held alerts are released together, once: the
process that sends them first claims them likewise (:meth:`DeliveryStore.release_held`). What
quiet hours or a budget may hold is decided again as it is claimed, at the time it goes
(:meth:`DeliveryStore.claim_scheduled`): a backlog, or a retry, never goes in quiet hours or
over the budget.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import Update, and_, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from newsmon.alerts.policy import (
    HELD,
    PENDING,
    SENDABLE,
    SUPPRESSED,
    Decision,
    Outcome,
)
from newsmon.alerts.schedule import Budget, at_send, budget_period, budget_used, release
from newsmon.alerts.subscription_store import subscription_from_row
from newsmon.alerts.subscriptions import Subscription
from newsmon.alerts.tables import attempts, budgets, deliveries, story_claims, subscriptions
from newsmon.db import insert_ignoring_duplicates
from newsmon.events import utcnow

Clock = Callable[[], datetime]
# A story claim lasts while its story may still grow: it expires once the subscription has had
# no article of the story for this long, classify's own retention of stories (it deletes a story
# 120 days after its last article), so the claims table does not grow forever.
STORY_CLAIM_DAYS = 120
# Keys per statement where a batch's keys are listed (PostgreSQL takes 32,767 parameters).
_CHUNK = 2_000


def delivery_id(subscription_id: str, article_id: str, topic: str) -> str:
    """The stable message id of one alert; also its ``webhook-id`` on every attempt."""
    digest = hashlib.sha256(f"{subscription_id}\x00{article_id}\x00{topic}".encode()).hexdigest()
    return "msg_" + digest[:32]


@dataclass(frozen=True)
class NewDelivery:
    id: str
    subscription_id: str
    article_id: str
    topic: str
    payload: bytes
    not_before: datetime | None = field(default=None, kw_only=True)  # digests wait
    story_id: str | None = field(default=None, kw_only=True)
    held_reason: str | None = field(default=None, kw_only=True)  # why a digest waits longer


@dataclass(frozen=True)
class NewAlert:
    """A delivery the fan-out asks for, with what decides whether and when it goes: the
    subscription's settings, the score, and the story claims that let it alert (none: it
    alerts whatever the story)."""

    delivery: NewDelivery
    subscription: Subscription
    score: float
    claims: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delivery:
    id: str
    subscription_id: str
    article_id: str
    topic: str
    payload: bytes
    status: str
    attempts: int
    last_error: str | None
    next_attempt_at: datetime
    created_at: datetime
    updated_at: datetime
    story_id: str | None = None
    held_reason: str | None = None
    # Held alerts only, when released: the story's articles by then (this subscription's).
    story_articles_now: int | None = None

    @cached_property
    def document(self) -> Any:
        """The payload, decoded once (for whoever needs more than its bytes)."""
        return json.loads(self.payload)


@dataclass(frozen=True)
class Due:
    """A due delivery and its subscription, as one query reads them."""

    delivery: Delivery
    subscription: Subscription


@dataclass(frozen=True)
class FinishedAttempt:
    """One attempt (of a delivery, or of a digest's deliveries) and what it means for them."""

    delivery_ids: tuple[str, ...]
    subscription_id: str
    attempted_at: datetime
    outcome: Outcome
    decision: Decision
    decided_at: datetime  # a retry waits from here


@dataclass(frozen=True)
class Attempt:
    attempted_at: datetime
    status_code: int | None
    latency_ms: float
    error: str | None


@dataclass(frozen=True)
class DeliveryFilter:
    subscription_id: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    story_id: str | None = None


class DeliveryStore:
    def __init__(self, engine: AsyncEngine, clock: Clock = utcnow) -> None:
        self._engine = engine
        self._clock = clock
        # Subscriptions read with due work, by their stored values: validated once each.
        self._subscriptions: dict[tuple[Any, ...], Subscription] = {}

    async def add(self, rows: list[NewDelivery]) -> int:
        """Record new deliveries as pending; rows whose id exists are ignored. Returns how many."""
        if not rows:
            return 0
        now = self._clock()
        values = [
            {
                "id": r.id,
                "subscription_id": r.subscription_id,
                "article_id": r.article_id,
                "topic": r.topic,
                "status": PENDING,
                "attempts": 0,
                "next_attempt_at": r.not_before or now,
                "payload": r.payload,
                "last_error": None,
                "created_at": now,
                "updated_at": now,
                "story_id": r.story_id,
                "held_reason": r.held_reason,
            }
            for r in rows
        ]
        ids = [r.id for r in rows]
        async with self._engine.begin() as conn:
            existing = {
                row[0]
                for row in await conn.execute(
                    select(deliveries.c.id).where(deliveries.c.id.in_(ids))
                )
            }
            await conn.execute(insert_ignoring_duplicates(self._engine, deliveries), values)
        return len(set(ids) - existing)

    async def due(
        self,
        limit: int,
        *,
        exclude: Collection[str] = (),
        exclude_subscriptions: Collection[str] = (),
        healthy_only: bool = False,
    ) -> list[Due]:
        """Pending deliveries whose next attempt is due, oldest first, for active subscriptions,
        each with its subscription (one query).

        Deliveries of paused or disabled subscriptions wait; ``healthy_only`` leaves out
        subscriptions that are failing.
        """
        conditions = [
            deliveries.c.status.in_(SENDABLE),
            deliveries.c.next_attempt_at <= self._clock(),
            subscriptions.c.paused.is_(False),
            subscriptions.c.disabled_reason.is_(None),
        ]
        if exclude:
            conditions.append(deliveries.c.id.not_in(exclude))
        if exclude_subscriptions:
            conditions.append(deliveries.c.subscription_id.not_in(exclude_subscriptions))
        if healthy_only:
            conditions.append(subscriptions.c.failing_since.is_(None))
        query = (
            select(*deliveries.c, *_SUBSCRIPTION_COLUMNS)
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .where(and_(*conditions))
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [Due(_delivery(r._mapping), self._subscription(r[_SUB_FROM:])) for r in rows]

    def _subscription(self, values: Sequence[Any]) -> Subscription:
        """The subscription of a joined row; one object per distinct stored state, reused."""
        key = tuple(values)
        sub = self._subscriptions.get(key)
        if sub is None:
            if len(self._subscriptions) >= _SUBSCRIPTIONS_KEPT:
                self._subscriptions.clear()
            row = dict(zip(_SUBSCRIPTION_NAMES, values, strict=True))
            sub = self._subscriptions[key] = subscription_from_row(row)
        return sub

    async def next_due_at(self) -> datetime | None:
        """When the earliest pending delivery of an active subscription falls due."""
        query = (
            select(func.min(deliveries.c.next_attempt_at))
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .where(
                deliveries.c.status.in_(SENDABLE),
                subscriptions.c.paused.is_(False),
                subscriptions.c.disabled_reason.is_(None),
            )
        )
        async with self._engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar()
        return value

    async def claim(self, ids: Collection[str], lease_s: float) -> set[str]:
        """Take the deliveries ``ids`` for one attempt each: those still due (no other process
        took them since they were read) are out of every dispatcher's reach for ``lease_s``,
        until the attempt's outcome sets their next time. Returns the ids this process won."""
        if not ids:
            return set()
        now = self._clock()
        due = [
            deliveries.c.id.in_(sorted(ids)),
            deliveries.c.status.in_(SENDABLE),
            deliveries.c.next_attempt_at <= now,
        ]
        async with self._engine.begin() as conn:
            taken = await conn.execute(_lease(due, now, lease_s).returning(deliveries.c.id))
            return {row[0] for row in taken}

    async def due_for(
        self, sub_id: str, limit: int, lease_s: float, *, exclude: Collection[str] = ()
    ) -> list[Delivery]:
        """Take one subscription's oldest ``limit`` due deliveries (a digest's contents) for
        one attempt, as :meth:`claim` does; oldest first."""
        now = self._clock()
        due = [
            deliveries.c.subscription_id == sub_id,
            # Held too: alerts held before the subscription became a digest join it.
            deliveries.c.status.in_(SENDABLE),
            deliveries.c.next_attempt_at <= now,
        ]
        if exclude:
            due.append(deliveries.c.id.not_in(exclude))
        order = (deliveries.c.created_at, deliveries.c.id)
        query = _lease(due, now, lease_s, order, limit).returning(*deliveries.c)
        async with self._engine.begin() as conn:
            taken = [_delivery(r) for r in (await conn.execute(query)).mappings()]
        return sorted(taken, key=lambda d: (d.created_at, d.id))

    async def finish_attempt(
        self,
        delivery_ids: list[str],
        sub: Subscription,
        *,
        attempted_at: datetime,
        outcome: Outcome,
        decision: Decision,
    ) -> None:
        """Record one attempt; :meth:`record` records many at once."""
        await self.record(
            [
                FinishedAttempt(
                    tuple(delivery_ids), sub.id, attempted_at, outcome, decision, self._clock()
                )
            ]
        )

    async def record(self, finished: Sequence[FinishedAttempt]) -> None:
        """Record attempts and their consequences in one transaction: every attempt in the log,
        the deliveries' new status and next attempt, and the subscriptions' failure state.

        ``finished`` is in the order the attempts ended: a subscription's last one says
        whether it is failing now.
        """
        if not finished:
            return
        now = self._clock()
        log: list[dict[str, Any]] = []
        retried: list[dict[str, Any]] = []
        ended: list[dict[str, Any]] = []
        for f in finished:
            outcome, decision = f.outcome, f.decision
            latency_ms = round(outcome.latency_s * 1000, 3)
            retry_at = (
                f.decided_at + timedelta(seconds=decision.retry_in_s)
                if decision.retry_in_s is not None
                else None
            )
            for d in f.delivery_ids:
                log.append(
                    {
                        "delivery_id": d,
                        "attempted_at": f.attempted_at,
                        "status_code": outcome.status_code,
                        "latency_ms": latency_ms,
                        "error": outcome.error,
                    }
                )
                values = {"b_id": d, "b_status": decision.status, "b_error": outcome.error}
                if retry_at is None:
                    ended.append(values)
                else:
                    retried.append({**values, "b_next": retry_at})
        recovered, failing, failing_again, disabled = _health(finished)
        async with self._engine.begin() as conn:
            await conn.execute(insert(attempts), log)
            if retried:
                await conn.execute(_RETRY.values(updated_at=now), retried)
            if ended:
                await conn.execute(_END.values(updated_at=now), ended)
            row = subscriptions.c
            if recovered:
                await conn.execute(
                    update(subscriptions)
                    .where(row.id.in_(recovered), row.failing_since.is_not(None))
                    .values(failing_since=None)
                )
            if failing:  # a run of failures begins, unless one is under way
                await conn.execute(
                    update(subscriptions)
                    .where(row.id == bindparam("b_id"), row.failing_since.is_(None))
                    .values(failing_since=bindparam("b_since")),
                    failing,
                )
            if failing_again:  # failed after a success in this very batch
                await conn.execute(
                    update(subscriptions)
                    .where(row.id == bindparam("b_id"))
                    .values(failing_since=bindparam("b_since")),
                    failing_again,
                )
            if disabled:
                await conn.execute(
                    update(subscriptions)
                    .where(row.id == bindparam("b_id"), row.disabled_reason.is_(None))
                    .values(disabled_reason=bindparam("b_reason"), disabled_at=now, updated_at=now),
                    disabled,
                )

    async def get(self, delivery_id: str) -> Delivery | None:
        async with self._engine.connect() as conn:
            row = (
                (await conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)))
                .mappings()
                .first()
            )
        return _delivery(row) if row else None

    async def attempts(self, delivery_id: str) -> list[Attempt]:
        query = (
            select(attempts)
            .where(attempts.c.delivery_id == delivery_id)
            .order_by(attempts.c.attempted_at, attempts.c.id)
        )
        async with self._engine.connect() as conn:
            return [
                Attempt(r["attempted_at"], r["status_code"], r["latency_ms"], r["error"])
                for r in (await conn.execute(query)).mappings()
            ]

    async def deliveries(self, where: DeliveryFilter, limit: int, offset: int) -> list[Delivery]:
        """Deliveries matching ``where``, newest first."""
        query = (
            select(deliveries)
            .where(*_conditions(where))
            .order_by(deliveries.c.created_at.desc(), deliveries.c.id)
            .limit(limit)
            .offset(offset)
        )
        async with self._engine.connect() as conn:
            return [_delivery(r) for r in (await conn.execute(query)).mappings()]

    async def requeue(self, where: DeliveryFilter, ids: Collection[str] | None = None) -> int:
        """Send deliveries again now, with a fresh retry schedule: those named in ``ids``
        whatever their status, else the sent ones (not those still held, nor a story's
        suppressed articles)."""
        conditions = _conditions(where)
        if ids is not None:
            conditions.append(deliveries.c.id.in_(ids))
        elif where.status is None:
            conditions.append(deliveries.c.status.not_in((HELD, SUPPRESSED)))
        now = self._clock()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(*conditions)
                .values(status=PENDING, attempts=0, next_attempt_at=now, updated_at=now)
            )
        return int(result.rowcount)

    async def add_alerts(self, alerts: Sequence[NewAlert]) -> int:
        """Record what a batch of matches asks for, in one transaction; returns how many new
        alerts it made (a story's suppressed articles and rows that exist are not counted).

        An alert with claims alerts only if it holds one of them (the first to ask for a claim
        gets it, across processes: the table's primary key decides); the others are recorded
        as suppressed. An instant alert with quiet hours or a budget is held when they say so
        (:func:`newsmon.alerts.schedule.release`), and spends its budget when it goes at once.
        A row that exists (the bus redelivered its match) changes nothing, budget included.
        """
        if not alerts:
            return 0
        now = self._clock()
        asked: dict[tuple[str, str, str, str], str] = {}
        for a in alerts:
            for claim in a.claims:
                key = (a.subscription.id, a.delivery.topic, a.delivery.story_id or "", claim)
                asked.setdefault(key, a.delivery.id)
        budget_of = {
            a.subscription.id: b for a in alerts if (b := a.subscription.budget) is not None
        }
        budgeted = sorted(budget_of)
        ids = sorted({a.delivery.id for a in alerts})
        engine = self._engine
        async with engine.begin() as conn:
            # Writes first, in key order: on SQLite the transaction takes the write lock at
            # once, and on PostgreSQL racing transactions take row locks in one order.
            if asked:
                rows = [
                    {"subscription_id": s, "topic": t, "story_id": st, "claim": c,
                     "delivery_id": d, "created_at": now}
                    for (s, t, st, c), d in sorted(asked.items())
                ]  # fmt: skip
                await conn.execute(insert_ignoring_duplicates(engine, story_claims), rows)
            counts = await _lock_budgets(conn, engine, budgeted)
            existing = await _existing(conn, ids)
            holders = await _holders(conn, asked) if asked else {}
            used = {s: budget_used(b, now, *counts.get(s, (None, 0))) for s, b in budget_of.items()}
            values: list[dict[str, Any]] = []
            made = 0
            for a in alerts:
                d, sub = a.delivery, a.subscription
                if d.id in existing:
                    continue
                existing.add(d.id)  # the same delivery twice in one batch: the first counts
                status, at, reason = PENDING, d.not_before or now, d.held_reason
                if a.claims and not any(
                    holders.get((sub.id, d.topic, d.story_id or "", c)) == d.id for c in a.claims
                ):
                    status, at, reason = SUPPRESSED, now, None
                elif sub.mode == "instant" and (sub.budget or sub.quiet_hours):
                    when = release(
                        quiet=sub.quiet_hours,
                        budget=sub.budget,
                        now=now,
                        score=a.score,
                        used=used.get(sub.id, 0),
                    )
                    if when.spends_budget:
                        used[sub.id] += 1
                    if when.at is not None:
                        status, at, reason = HELD, when.at, when.reason
                made += status != SUPPRESSED
                values.append(
                    {
                        "id": d.id, "subscription_id": d.subscription_id,
                        "article_id": d.article_id, "topic": d.topic, "status": status,
                        "attempts": 0, "next_attempt_at": at, "payload": d.payload,
                        "last_error": None, "created_at": now, "updated_at": now,
                        "story_id": d.story_id, "held_reason": reason,
                    }
                )  # fmt: skip
            await _spend(conn, {s: (budget_of[s], used[s]) for s in budgeted}, now)
            # In the batch's order, which is the order they are sent in (a batch redelivered
            # to a second process comes in the same order: the rows lock in one order).
            if values:
                await conn.execute(insert_ignoring_duplicates(engine, deliveries), values)
        return made

    async def claim_scheduled(self, due: Sequence[Due], lease_s: float) -> set[str]:
        """Take due alerts of instant subscriptions with quiet hours or a budget for one attempt
        each, as :meth:`claim` does, deciding again, as they are about to go, whether they may
        (:func:`newsmon.alerts.schedule.at_send`): an alert due in quiet hours, or over its
        budget, is held instead (it joins the summary of the period it waits for), and a retry
        due in quiet hours waits for their end. Returns the ids this process won.

        The budget counts an alert once, when it goes at once: at recording, in the period it
        was recorded in (:meth:`add_alerts`); a first attempt due in a later period (recorded
        while the subscription was disabled, or while no dispatcher ran) counts in the period
        it goes in, and one over that period's budget is held. Retries never count. The
        budget's row is locked while it is counted, and each alert is taken or held by a
        statement that checks it is still due, so processes sharing the database decide each
        alert once and share one count.
        """
        if not due:
            return set()
        now = self._clock()
        budget_of = {d.subscription.id: b for d in due if (b := d.subscription.budget) is not None}
        budgeted = sorted(budget_of)
        won: set[str] = set()
        engine = self._engine
        async with engine.begin() as conn:
            counts = await _lock_budgets(conn, engine, budgeted)
            used = {s: budget_used(b, now, *counts.get(s, (None, 0))) for s, b in budget_of.items()}
            spent: dict[str, tuple[Budget, int]] = {}
            for item in due:
                d, sub = item.delivery, item.subscription
                budget = budget_of.get(sub.id)
                if budget is not None and d.attempts == 0 and _counted(budget, d, now):
                    budget = None  # counted at recording, in this very period
                when = at_send(
                    quiet=sub.quiet_hours,
                    budget=budget,
                    now=now,
                    score=_score(d),
                    used=used.get(sub.id, 0),
                    retry=d.attempts > 0,
                )
                still_due = _skipping_locked(
                    deliveries.c.id == d.id,
                    deliveries.c.status == PENDING,
                    deliveries.c.held_reason.is_(None),
                    deliveries.c.next_attempt_at <= now,
                )
                if when.at is None:
                    lease = now + timedelta(seconds=lease_s)
                    taken = await conn.execute(
                        still_due.values(next_attempt_at=lease, updated_at=now)
                    )
                    if taken.rowcount:
                        won.add(d.id)
                        if when.spends_budget and budget is not None:
                            used[sub.id] += 1
                            spent[sub.id] = (budget, used[sub.id])
                elif when.reason is None:  # a retry waits for the quiet hours' end
                    await conn.execute(still_due.values(next_attempt_at=when.at, updated_at=now))
                else:
                    await conn.execute(
                        still_due.values(
                            status=HELD, held_reason=when.reason, next_attempt_at=when.at,
                            updated_at=now,
                        )
                    )  # fmt: skip
            await _spend(conn, spent, now)
        return won

    async def postpone_held(self, sub_id: str, due_at: datetime, to: datetime) -> int:
        """Move the held alerts of ``sub_id`` due at ``due_at`` (a summary, or its retry) to
        ``to``, together; those another process took meanwhile stay as they are."""
        now = self._clock()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                _skipping_locked(
                    deliveries.c.subscription_id == sub_id,
                    deliveries.c.held_reason.is_not(None),
                    deliveries.c.status.in_(SENDABLE),
                    deliveries.c.next_attempt_at == due_at,
                ).values(next_attempt_at=to, updated_at=now)
            )
        return int(result.rowcount)

    async def expire_story_claims(self) -> int:
        """Delete the story claims of stories the subscription had no article of (alert or
        suppressed) for :data:`STORY_CLAIM_DAYS`; returns how many."""
        cutoff = self._clock() - timedelta(days=STORY_CLAIM_DAYS)
        c = story_claims.c
        recent = (
            select(deliveries.c.id)
            .where(
                deliveries.c.story_id == c.story_id,
                deliveries.c.subscription_id == c.subscription_id,
                deliveries.c.created_at >= cutoff,
            )
            .exists()
        )
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(story_claims).where(c.created_at < cutoff, ~recent))
        return int(result.rowcount)

    async def release_held(
        self,
        sub_id: str,
        due_at: datetime,
        lease_s: float,
        limit: int,
        *,
        exclude: Collection[str] = (),
    ) -> list[Delivery]:
        """Take the oldest ``limit`` held alerts of ``sub_id`` due at ``due_at`` (released
        together, or retried together) for one attempt: they become pending, out of every
        dispatcher's reach for ``lease_s`` (the attempt's outcome sets their next time).
        Another process that took them first leaves none to take. Oldest first."""
        now = self._clock()
        held = [
            deliveries.c.subscription_id == sub_id,
            deliveries.c.held_reason.is_not(None),
            deliveries.c.status.in_(SENDABLE),
            deliveries.c.next_attempt_at == due_at,
        ]
        if exclude:
            held.append(deliveries.c.id.not_in(exclude))
        order = (deliveries.c.created_at, deliveries.c.id)
        query = _lease(held, now, lease_s, order, limit, status=PENDING).returning(*deliveries.c)
        async with self._engine.begin() as conn:
            taken = [_delivery(r) for r in (await conn.execute(query)).mappings()]
        return sorted(taken, key=lambda d: (d.created_at, d.id))

    async def story_counts(self, sub_id: str, story_ids: Collection[str]) -> dict[str, int]:
        """The article count each story has reached among ``sub_id``'s deliveries (its alerts
        and its suppressed articles), from their payloads."""
        counts: dict[str, int] = {}
        stories = sorted(story_ids)
        async with self._engine.connect() as conn:
            for i in range(0, len(stories), _CHUNK):
                query = select(deliveries.c.story_id, deliveries.c.payload).where(
                    deliveries.c.subscription_id == sub_id,
                    deliveries.c.story_id.in_(stories[i : i + _CHUNK]),
                )
                for story_id, payload in await conn.execute(query):
                    story = json.loads(payload)["data"].get("story") or {}
                    count = story.get("article_count") or 0
                    counts[story_id] = max(counts.get(story_id, 0), count)
        return counts

    async def count(self, status: str) -> int:
        query = select(func.count()).select_from(deliveries).where(deliveries.c.status == status)
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


# The subscription's columns in a due query, after the delivery's, under names of their own.
_SUBSCRIPTION_NAMES = [c.name for c in subscriptions.c]
_SUBSCRIPTION_COLUMNS = [c.label(f"sub_{c.name}") for c in subscriptions.c]
_SUB_FROM = len(deliveries.c)
_SUBSCRIPTIONS_KEPT = 10_000


def _lease(
    where: Sequence[Any],
    now: datetime,
    lease_s: float,
    order: Sequence[Any] = (),
    limit: int | None = None,
    **values: Any,
) -> Update:
    """The statement that takes the deliveries ``where`` selects (the first ``limit`` by
    ``order``) for ``lease_s``: their next attempt moves to the lease's end. The conditions are
    checked again on each row as the update finds it, after any other transaction that took
    it has committed, so one process wins each row; PostgreSQL skips rows another transaction
    holds (no waiting on another process's claim, no deadlock between two)."""
    chosen = (
        select(deliveries.c.id)
        .where(*where)
        .order_by(*order)
        .limit(limit)
        .with_for_update(skip_locked=True)  # SQLite: nothing (one writer at a time)
    )
    return (
        update(deliveries)
        .where(deliveries.c.id.in_(chosen), *where)
        .values(next_attempt_at=now + timedelta(seconds=lease_s), updated_at=now, **values)
    )


def _skipping_locked(*where: Any) -> Update:
    """An update of the deliveries ``where`` selects, checked again on each row, that skips
    rows another transaction holds on PostgreSQL (their claim wins; no waiting, no deadlock
    between processes deciding the same rows in another order)."""
    chosen = select(deliveries.c.id).where(*where).with_for_update(skip_locked=True)
    return update(deliveries).where(deliveries.c.id.in_(chosen), *where)


# A finished attempt's consequence for one delivery, for many deliveries at once (executemany).
_SET_OUTCOME = update(deliveries).where(deliveries.c.id == bindparam("b_id"))
_OUTCOME = {
    "status": bindparam("b_status"),
    "attempts": deliveries.c.attempts + 1,
    "last_error": bindparam("b_error"),
}
_RETRY = _SET_OUTCOME.values(**_OUTCOME, next_attempt_at=bindparam("b_next"))
_END = _SET_OUTCOME.values(**_OUTCOME)


def _health(
    finished: Sequence[FinishedAttempt],
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """What a batch of attempts, in the order they ended, does to their subscriptions: those
    that recovered (last attempt succeeded); those whose run of failures begins with the
    batch's first failure unless one is under way; those that failed after succeeding in the
    batch (their run begins at the first failure after the last success); and the disabled.
    """
    last_ok: dict[str, int] = {}
    for i, f in enumerate(finished):
        if f.outcome.ok:
            last_ok[f.subscription_id] = i
    since: dict[str, datetime] = {}
    reasons: dict[str, str] = {}
    for i, f in enumerate(finished):
        sub = f.subscription_id
        if not f.outcome.ok:
            if i > last_ok.get(sub, -1):
                since.setdefault(sub, f.attempted_at)
            if f.decision.disable_reason:
                reasons.setdefault(sub, f.decision.disable_reason)
    recovered = [s for s in last_ok if s not in since]
    failing = [{"b_id": s, "b_since": t} for s, t in since.items() if s not in last_ok]
    again = [{"b_id": s, "b_since": t} for s, t in since.items() if s in last_ok]
    disabled = [{"b_id": s, "b_reason": r} for s, r in reasons.items()]
    return recovered, failing, again, disabled


def _counted(budget: Budget, d: Delivery, now: datetime) -> bool:
    """Whether a pending first attempt already counts in ``now``'s budget period: it was
    recorded in it (and went at once, which is what spent the budget then)."""
    return budget_period(budget, d.created_at)[0] == budget_period(budget, now)[0]


def _score(d: Delivery) -> float:
    score = d.document.get("data", {}).get("score")
    return float(score) if isinstance(score, int | float) else 0.0


async def _lock_budgets(
    conn: AsyncConnection, engine: AsyncEngine, subs: Sequence[str]
) -> dict[str, tuple[datetime | None, int]]:
    """The budget rows of ``subs`` (made where missing), locked until the transaction ends:
    (period start, alerts used in it). A write first: on SQLite it takes the write lock."""
    counts: dict[str, tuple[datetime | None, int]] = {}
    if not subs:
        return counts
    await conn.execute(
        insert_ignoring_duplicates(engine, budgets),
        [{"subscription_id": s, "period_start": None, "used": 0} for s in subs],
    )
    locked = (
        select(budgets)
        .where(budgets.c.subscription_id.in_(subs))
        .order_by(budgets.c.subscription_id)
        .with_for_update()
    )
    for r in await conn.execute(locked):
        counts[r.subscription_id] = (r.period_start, r.used)
    return counts


async def _spend(conn: AsyncConnection, used: dict[str, tuple[Budget, int]], now: datetime) -> None:
    """Store each budget's count in ``now``'s period."""
    if not used:
        return
    await conn.execute(
        update(budgets)
        .where(budgets.c.subscription_id == bindparam("b_id"))
        .values(period_start=bindparam("b_start"), used=bindparam("b_used")),
        [
            {"b_id": s, "b_start": budget_period(b, now)[0], "b_used": n}
            for s, (b, n) in sorted(used.items())
        ],
    )


async def _existing(conn: AsyncConnection, ids: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(ids), _CHUNK):
        query = select(deliveries.c.id).where(deliveries.c.id.in_(ids[i : i + _CHUNK]))
        found.update(row[0] for row in await conn.execute(query))
    return found


async def _holders(
    conn: AsyncConnection, asked: dict[tuple[str, str, str, str], str]
) -> dict[tuple[str, str, str, str], str]:
    """Who holds each claim asked for (this transaction's or an earlier one's delivery)."""
    stories = sorted({k[2] for k in asked})
    subs = sorted({k[0] for k in asked})
    held: dict[tuple[str, str, str, str], str] = {}
    c = story_claims.c
    for i in range(0, len(stories), _CHUNK):
        for j in range(0, len(subs), _CHUNK):
            query = select(c.subscription_id, c.topic, c.story_id, c.claim, c.delivery_id).where(
                c.story_id.in_(stories[i : i + _CHUNK]), c.subscription_id.in_(subs[j : j + _CHUNK])
            )
            for r in await conn.execute(query):
                key = (r.subscription_id, r.topic, r.story_id, r.claim)
                if key in asked:
                    held[key] = r.delivery_id
    return held


def _conditions(where: DeliveryFilter) -> list[Any]:
    conditions: list[Any] = []
    if where.story_id is not None:
        conditions.append(deliveries.c.story_id == where.story_id)
    if where.subscription_id is not None:
        conditions.append(deliveries.c.subscription_id == where.subscription_id)
    if where.status is not None:
        conditions.append(deliveries.c.status == where.status)
    if where.since is not None:
        conditions.append(deliveries.c.created_at >= where.since)
    if where.until is not None:
        conditions.append(deliveries.c.created_at < where.until)
    return conditions


def _delivery(r: RowMapping) -> Delivery:
    return Delivery(
        id=r["id"],
        subscription_id=r["subscription_id"],
        article_id=r["article_id"],
        topic=r["topic"],
        payload=r["payload"],
        status=r["status"],
        attempts=r["attempts"],
        last_error=r["last_error"],
        next_attempt_at=r["next_attempt_at"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
        story_id=r["story_id"],
        held_reason=r["held_reason"],
    )
