"""Alerts' state: one row per delivery, keyed so that a redelivered match never alerts twice."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from services.db import insert_ignoring_duplicates
from services.events import utcnow

metadata = MetaData()

deliveries = Table(
    "alerts_deliveries",
    metadata,
    # Derived from (subscription, article, topic): the same match can only ever insert one row.
    Column("id", String(40), primary_key=True),
    Column("subscription_id", String(64), nullable=False),
    Column("article_id", String(64), nullable=False),
    Column("topic", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_alerts_deliveries_due", "status", "next_attempt_at"),
)

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"


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


@dataclass(frozen=True)
class Delivery(NewDelivery):
    status: str
    attempts: int
    last_error: str | None


class AlertsStore:
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
                "next_attempt_at": now,
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

    async def due(self, limit: int, exclude: set[str]) -> list[Delivery]:
        """Pending deliveries whose next attempt is due, oldest first."""
        query = (
            select(deliveries)
            .where(deliveries.c.status == PENDING, deliveries.c.next_attempt_at <= utcnow())
            .order_by(deliveries.c.next_attempt_at)
            .limit(limit + len(exclude))
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).mappings().all()
        found = [_delivery(r) for r in rows if r["id"] not in exclude]
        return found[:limit]

    async def next_due_at(self) -> datetime | None:
        query = select(deliveries.c.next_attempt_at).where(deliveries.c.status == PENDING)
        async with self._engine.connect() as conn:
            value = (
                await conn.execute(query.order_by(deliveries.c.next_attempt_at).limit(1))
            ).scalar()
        return value

    async def record_attempt(
        self, delivery_id: str, *, status: str, error: str | None, retry_in: float | None
    ) -> None:
        now = utcnow()
        values: dict[str, object] = {
            "status": status,
            "attempts": deliveries.c.attempts + 1,
            "last_error": error,
            "updated_at": now,
        }
        if retry_in is not None:
            values["next_attempt_at"] = now + timedelta(seconds=retry_in)
        async with self._engine.begin() as conn:
            await conn.execute(
                update(deliveries).where(deliveries.c.id == delivery_id).values(values)
            )

    async def get(self, delivery_id: str) -> Delivery | None:
        async with self._engine.connect() as conn:
            row = (
                (await conn.execute(select(deliveries).where(deliveries.c.id == delivery_id)))
                .mappings()
                .first()
            )
        return _delivery(row) if row else None


def _delivery(row: object) -> Delivery:
    r = dict(row)  # type: ignore[call-overload]
    return Delivery(
        id=r["id"],
        subscription_id=r["subscription_id"],
        article_id=r["article_id"],
        topic=r["topic"],
        status=r["status"],
        attempts=r["attempts"],
        payload=r["payload"],
        last_error=r["last_error"],
    )
