"""Subscriptions in the database: create, read, change, delete, and the seeds file's first load."""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from newsmon.alerts.policy import DEAD, SENDABLE
from newsmon.alerts.subscriptions import Subscription
from newsmon.alerts.tables import SEEDED, budgets, deliveries, meta, story_claims, subscriptions
from newsmon.db import insert_ignoring_duplicates
from newsmon.events import utcnow


class SubscriptionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def seed_once(self, seeds: Iterable[Subscription]) -> int:
        """Add the seeds file's subscriptions on the first start only; later starts add none,
        so a subscription deleted through the API stays deleted. Returns how many were added."""
        now = utcnow()
        async with self._engine.begin() as conn:
            if (await conn.execute(select(meta.c.value).where(meta.c.key == SEEDED))).first():
                return 0
            rows = [_subscription_row(s, now) for s in seeds]
            if rows:
                await conn.execute(insert_ignoring_duplicates(self._engine, subscriptions), rows)
            await conn.execute(
                insert_ignoring_duplicates(self._engine, meta),
                [{"key": SEEDED, "value": now.isoformat()}],
            )
        return len(rows)

    async def create_subscription(self, sub: Subscription) -> bool:
        """Store a new subscription; False when its id is taken."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                insert_ignoring_duplicates(self._engine, subscriptions),
                _subscription_row(sub, utcnow()),
            )
        return bool(result.rowcount)

    async def subscription(self, sub_id: str) -> Subscription | None:
        found = await self._subscriptions(subscriptions.c.id == sub_id)
        return found[0] if found else None

    async def subscriptions(self, ids: Collection[str] | None = None) -> list[Subscription]:
        return await self._subscriptions(None if ids is None else subscriptions.c.id.in_(ids))

    async def recording_subscriptions(self) -> list[Subscription]:
        """Subscriptions new matches are recorded for: all but the paused ones."""
        return await self._subscriptions(subscriptions.c.paused.is_(False))

    async def _subscriptions(self, where: Any) -> list[Subscription]:
        query = select(subscriptions).order_by(subscriptions.c.created_at, subscriptions.c.id)
        if where is not None:
            query = query.where(where)
        async with self._engine.connect() as conn:
            return [subscription_from_row(r) for r in (await conn.execute(query)).mappings()]

    async def update_subscription(self, sub_id: str, **values: Any) -> Subscription | None:
        if "topics" in values:
            values["topics"] = json.dumps(list(values["topics"]))
        for name in _JSON_SETTINGS:
            if name in values:
                values[name] = _json_or_none(values[name])
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(subscriptions)
                .where(subscriptions.c.id == sub_id)
                .values(**values, updated_at=utcnow())
            )
        return await self.subscription(sub_id) if result.rowcount else None

    async def delete_subscription(self, sub_id: str) -> bool:
        """Delete a subscription; its pending deliveries end dead, its history stays. Its story
        claims and budget count go with it: a new subscription under the same id starts afresh
        (alerted of no story, nothing of its budget spent)."""
        now = utcnow()
        async with self._engine.begin() as conn:
            result = await conn.execute(delete(subscriptions).where(subscriptions.c.id == sub_id))
            await conn.execute(delete(story_claims).where(story_claims.c.subscription_id == sub_id))
            await conn.execute(delete(budgets).where(budgets.c.subscription_id == sub_id))
            await conn.execute(
                update(deliveries)
                .where(deliveries.c.subscription_id == sub_id, deliveries.c.status.in_(SENDABLE))
                .values(status=DEAD, last_error="subscription deleted", updated_at=now)
            )
        return bool(result.rowcount)


# Settings stored as JSON text (null: not set).
_JSON_SETTINGS = ("budget", "quiet_hours")


def _json_or_none(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.dumps(value, separators=(",", ":"))


def _subscription_row(sub: Subscription, now: datetime) -> dict[str, Any]:
    row = sub.model_dump()
    row["topics"] = json.dumps(list(sub.topics))
    for name in _JSON_SETTINGS:
        row[name] = _json_or_none(row[name])
    row["updated_at"] = now
    return row


def subscription_from_row(row: RowMapping | dict[str, Any]) -> Subscription:
    """A subscription from its stored columns (JSON ones decoded); ``updated_at`` is dropped."""
    values: dict[str, Any] = dict(row)
    values["topics"] = tuple(json.loads(values["topics"]))
    for name in _JSON_SETTINGS:
        if values.get(name) is not None:
            values[name] = json.loads(values[name])
    values.pop("updated_at", None)
    return Subscription.model_validate(values)
