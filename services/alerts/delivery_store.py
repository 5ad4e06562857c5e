"""Deliveries in the database: one row per (subscription, article, topic), and every attempt.

A delivery's id is derived from (subscription, article, topic), so a redelivered match never
alerts twice. The next attempt's time is stored with the delivery, so a restart resumes the
schedule where it stopped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from newsmon.alerts.policy import PENDING, Decision, Outcome
from newsmon.alerts.subscriptions import Subscription
from newsmon.alerts.tables import attempts, deliveries, subscriptions
from newsmon.db import insert_ignoring_duplicates
from newsmon.events import utcnow


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


class DeliveryStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def add(self, rows: list[NewDelivery]) -> int:
        """Record new deliveries as pending; rows whose id exists are ignored. Returns how many."""
        if not rows:
            return 0
        now = utcnow()
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
    ) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first, for active subscriptions.

        Deliveries of paused or disabled subscriptions wait; ``healthy_only`` leaves out
        subscriptions that are failing.
        """
        conditions = [
            deliveries.c.status == PENDING,
            deliveries.c.next_attempt_at <= utcnow(),
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
            select(deliveries)
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .where(and_(*conditions))
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [_delivery(r) for r in (await conn.execute(query)).mappings()]

    async def next_due_at(self) -> datetime | None:
        """When the earliest pending delivery of an active subscription falls due."""
        query = (
            select(func.min(deliveries.c.next_attempt_at))
            .join(subscriptions, subscriptions.c.id == deliveries.c.subscription_id)
            .where(
                deliveries.c.status == PENDING,
                subscriptions.c.paused.is_(False),
                subscriptions.c.disabled_reason.is_(None),
            )
        )
        async with self._engine.connect() as conn:
            value: datetime | None = (await conn.execute(query)).scalar()
        return value

    async def due_for(self, sub_id: str, limit: int) -> list[Delivery]:
        """One subscription's due deliveries (a digest's contents), oldest first."""
        query = (
            select(deliveries)
            .where(
                deliveries.c.subscription_id == sub_id,
                deliveries.c.status == PENDING,
                deliveries.c.next_attempt_at <= utcnow(),
            )
            .order_by(deliveries.c.created_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [_delivery(r) for r in (await conn.execute(query)).mappings()]

    async def finish_attempt(
        self,
        delivery_ids: list[str],
        sub: Subscription,
        *,
        attempted_at: datetime,
        outcome: Outcome,
        decision: Decision,
    ) -> None:
        """Record one attempt (of a delivery, or of a digest's deliveries) and its consequences:
        the deliveries' new status and next attempt, and the subscription's failure state."""
        now = utcnow()
        values: dict[str, Any] = {
            "status": decision.status,
            "attempts": deliveries.c.attempts + 1,
            "last_error": outcome.error,
            "updated_at": now,
        }
        if decision.retry_in_s is not None:
            values["next_attempt_at"] = now + timedelta(seconds=decision.retry_in_s)
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(attempts),
                [
                    {
                        "delivery_id": d,
                        "attempted_at": attempted_at,
                        "status_code": outcome.status_code,
                        "latency_ms": round(outcome.latency_s * 1000, 3),
                        "error": outcome.error,
                    }
                    for d in delivery_ids
                ],
            )
            await conn.execute(
                update(deliveries).where(deliveries.c.id.in_(delivery_ids)).values(values)
            )
            await self._note_health(conn, sub, attempted_at, outcome, decision)

    async def _note_health(
        self,
        conn: AsyncConnection,
        sub: Subscription,
        attempted_at: datetime,
        outcome: Outcome,
        decision: Decision,
    ) -> None:
        row = subscriptions.c
        if outcome.ok:
            await conn.execute(
                update(subscriptions)
                .where(row.id == sub.id, row.failing_since.is_not(None))
                .values(failing_since=None)
            )
            return
        await conn.execute(
            update(subscriptions)
            .where(row.id == sub.id, row.failing_since.is_(None))
            .values(failing_since=attempted_at)
        )
        if decision.disable_reason:
            await conn.execute(
                update(subscriptions)
                .where(row.id == sub.id, row.disabled_reason.is_(None))
                .values(
                    disabled_reason=decision.disable_reason,
                    disabled_at=utcnow(),
                    updated_at=utcnow(),
                )
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
        """Send deliveries again now, whatever their status, with a fresh retry schedule."""
        conditions = _conditions(where)
        if ids is not None:
            conditions.append(deliveries.c.id.in_(ids))
        now = utcnow()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(deliveries)
                .where(*conditions)
                .values(status=PENDING, attempts=0, next_attempt_at=now, updated_at=now)
            )
        return int(result.rowcount)

    async def count(self, status: str) -> int:
        query = select(func.count()).select_from(deliveries).where(deliveries.c.status == status)
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


def _conditions(where: DeliveryFilter) -> list[Any]:
    conditions: list[Any] = []
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
    )
