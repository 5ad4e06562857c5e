"""The durable embedded backend of the bus: a log in newsmon's own database.

One table holds every message, in the order of an ever-growing id (the offset); another holds
each group's committed position per topic. A publish returns once its row is committed, so what
ingest published survives a crash as surely as what it marked seen; a consumer that stops
without committing gets its messages again, from the database, after a restart.

Publishes are written in batches by one writer task (one transaction for everything waiting),
so a burst costs a few commits, not one per message. Writers take turns (SQLite's own lock; on
PostgreSQL a transaction-level advisory lock), so ids become visible in id order and a reader
never skips an id committed late. Consumers in this process are woken by the writer; those in
other processes sharing the database look every ``poll_interval_s``.

Each group has one member at a time per process, as on the memory backend. Messages older than
``retention_s`` are deleted once every group that committed within that time is past them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from newsmon.bus._base import Bus, BusError, Consumer, Message
from newsmon.db import UTCDateTime, database_ready, insert_ignoring_duplicates
from newsmon.events import utcnow

log = logging.getLogger(__name__)

metadata = MetaData()

# SQLite gives autoincrement only to INTEGER PRIMARY KEY; elsewhere offsets are 64-bit.
_Offset = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "bus_messages",
    metadata,
    Column("id", _Offset, primary_key=True, autoincrement=True),
    Column("topic", String(200), nullable=False),
    Column("key", Text),
    Column("value", LargeBinary, nullable=False),
    Column("headers", Text, nullable=False),  # JSON object of str → str
    Column("created_at", UTCDateTime(), nullable=False),
    Index("ix_bus_messages_topic_id", "topic", "id"),
)

offsets = Table(
    "bus_offsets",
    metadata,
    Column("group_id", String(200), primary_key=True),
    Column("topic", String(200), primary_key=True),
    Column("position", _Offset, nullable=False),  # the id of the last message processed
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Any constant: the key of the advisory lock PostgreSQL writers of the log take in turn.
_WRITE_LOCK = 0x6E65_7773_6275_73  # "newsbus"
# Most messages written in one transaction.
_WRITE_BATCH = 1000
PRUNE_EVERY_S = 600.0


@dataclass
class _Pending:
    row: dict[str, object]
    done: asyncio.Future[None]


class DatabaseBus(Bus):
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        poll_interval_s: float = 0.2,
        retention_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self._engine = engine
        self._poll_interval_s = poll_interval_s
        self._retention_s = retention_s
        self._queue: list[_Pending] = []
        self._queued = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._written = asyncio.Condition()
        self._generation = 0
        self._members: set[str] = set()
        self._pruned_at = time.monotonic()

    async def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop(), name="bus writer")

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        # What was accepted is written before the bus closes: a publish that returned is kept.
        while self._queue:
            await self._write(self._take())
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        return None  # a topic is a column value: it exists once something is published to it

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if self._writer is None:
            raise BusError("bus not started")
        row: dict[str, object] = {
            "topic": topic,
            "key": key,
            "value": bytes(value),
            "headers": json.dumps(dict(headers or {}), ensure_ascii=False),
        }
        pending = _Pending(row, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._queued.set()
        await asyncio.shield(pending.done)  # a cancelled publisher does not unwrite the row

    def _take(self) -> list[_Pending]:
        batch, self._queue = self._queue[:_WRITE_BATCH], self._queue[_WRITE_BATCH:]
        if not self._queue:
            self._queued.clear()
        return batch

    async def _write_loop(self) -> None:
        while True:
            await self._queued.wait()
            await self._write(self._take())
            if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                await self._prune()

    async def _write(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        now = utcnow()
        try:
            async with self._engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    await conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _WRITE_LOCK})
                await conn.execute(insert(messages), [{**p.row, "created_at": now} for p in batch])
        except (SQLAlchemyError, OSError) as exc:
            error = BusError(f"bus: writing {len(batch)} message(s) to the database failed: {exc}")
            for pending in batch:
                if not pending.done.done():
                    pending.done.set_exception(error)
            return
        for pending in batch:
            if not pending.done.done():
                pending.done.set_result(None)
        async with self._written:
            self._generation += 1
            self._written.notify_all()

    async def _prune(self) -> None:
        """Delete messages older than the retention that every recently active group passed."""
        self._pruned_at = time.monotonic()
        horizon = utcnow() - timedelta(seconds=self._retention_s)
        try:
            async with self._engine.begin() as conn:
                await conn.execute(delete(offsets).where(offsets.c.updated_at < horizon))
                floors = (
                    select(offsets.c.topic, func.min(offsets.c.position).label("floor"))
                    .group_by(offsets.c.topic)
                    .subquery()
                )
                removed = await conn.execute(
                    delete(messages).where(
                        messages.c.created_at < horizon,
                        messages.c.id
                        <= select(floors.c.floor)
                        .where(floors.c.topic == messages.c.topic)
                        .scalar_subquery(),
                    )
                )
            if removed.rowcount:
                log.info("bus: pruned %d message(s) older than the retention", removed.rowcount)
        except SQLAlchemyError as exc:
            log.warning("bus: pruning failed (tried again later): %s", exc)

    async def _wait_for_writes(self, seen: int, timeout: float) -> None:
        """Until the writer commits something after ``seen``, or ``timeout``."""
        async with self._written:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._written.wait_for(lambda: self._generation != seen), timeout
                )

    @asynccontextmanager
    async def consumer(self, topics: Iterable[str], group: str) -> AsyncIterator[Consumer]:
        if group in self._members:
            raise BusError(f"database bus: group {group!r} already has a consumer")
        topics = list(dict.fromkeys(topics))
        try:
            async with self._engine.connect() as conn:
                rows = await conn.execute(
                    select(offsets.c.topic, offsets.c.position).where(
                        offsets.c.group_id == group, offsets.c.topic.in_(topics)
                    )
                )
                committed = {row.topic: int(row.position) for row in rows}
        except SQLAlchemyError as exc:
            raise BusError(f"database bus: cannot join group {group!r}: {exc}") from exc
        self._members.add(group)
        try:
            yield DatabaseConsumer(self, topics, group, committed)
        finally:
            self._members.discard(group)

    async def ready(self) -> bool:
        return self._writer is not None and await database_ready(self._engine)


class DatabaseConsumer(Consumer):
    def __init__(
        self, bus: DatabaseBus, topics: list[str], group: str, committed: dict[str, int]
    ) -> None:
        self._bus = bus
        self._group = group
        # Start where the group last committed: what was fetched but not committed comes again.
        self._position = {t: committed.get(t, 0) for t in topics}
        self._committed = dict(self._position)
        self._lag: dict[str, int] = {}

    def _unread(self) -> ColumnElement[bool]:
        return or_(
            *(and_(messages.c.topic == t, messages.c.id > p) for t, p in self._position.items())
        )

    async def _read(self, max_records: int) -> list[Message]:
        query = select(messages).where(self._unread()).order_by(messages.c.id).limit(max_records)
        try:
            async with self._bus._engine.connect() as conn:
                rows = (await conn.execute(query)).mappings().all()
                if rows:
                    for row in rows:
                        self._position[row["topic"]] = int(row["id"])
                counts = await conn.execute(
                    select(messages.c.topic, func.count())
                    .where(self._unread())
                    .group_by(messages.c.topic)
                )
                self._lag = {t: 0 for t in self._position} | {t: int(n) for t, n in counts}
        except SQLAlchemyError as exc:
            raise BusError(
                f"database bus: reading for group {self._group!r} failed: {exc}"
            ) from exc
        return [
            Message(
                topic=row["topic"],
                partition=0,
                offset=int(row["id"]),
                key=row["key"],
                value=bytes(row["value"]),
                headers=json.loads(row["headers"]),
            )
            for row in rows
        ]

    async def poll(self, max_records: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        while True:
            seen = self._bus._generation
            batch = await self._read(max_records)
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            await self._bus._wait_for_writes(seen, min(remaining, self._bus._poll_interval_s))

    async def commit(self) -> None:
        changed = {t: p for t, p in self._position.items() if p != self._committed.get(t)}
        if not changed:
            return
        now = utcnow()
        engine = self._bus._engine
        try:
            async with engine.begin() as conn:
                for topic, position in changed.items():
                    result = await conn.execute(
                        update(offsets)
                        .where(offsets.c.group_id == self._group, offsets.c.topic == topic)
                        .values(position=position, updated_at=now)
                    )
                    if not result.rowcount:
                        await conn.execute(
                            insert_ignoring_duplicates(engine, offsets),
                            [{"group_id": self._group, "topic": topic, "position": position,
                              "updated_at": now}],
                        )  # fmt: skip
        except SQLAlchemyError as exc:
            # Best effort, as on Kafka: the records come again, and consumers are idempotent.
            log.warning(
                "database bus: commit of %s for group %r failed, its records will come again: %s",
                changed, self._group, exc,
            )  # fmt: skip
            return
        self._committed.update(changed)

    def lag(self) -> dict[str, int]:
        return dict(self._lag)
