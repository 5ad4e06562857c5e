"""The in-process backend of the bus: one partition per topic, offsets per group, in memory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

from newsmon.bus._base import Bus, BusError, Consumer, Message


class _Group:
    def __init__(self) -> None:
        self.committed: dict[str, int] = {}
        self.member: MemoryConsumer | None = None


class MemoryBus(Bus):
    """An in-process bus: one partition per topic, offsets per group, nothing kept on disk."""

    def __init__(self) -> None:
        self._logs: dict[str, list[Message]] = {}
        self._groups: dict[str, _Group] = {}
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        for topic in topics:
            self._logs.setdefault(topic, [])

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        log_ = self._logs.setdefault(topic, [])
        log_.append(Message(topic, 0, len(log_), key, bytes(value), dict(headers or {})))
        async with self._changed:
            self._changed.notify_all()

    @asynccontextmanager
    async def consumer(self, topics: Iterable[str], group: str) -> AsyncIterator[Consumer]:
        state = self._groups.setdefault(group, _Group())
        if state.member is not None:
            raise BusError(f"memory bus: group {group!r} already has a consumer")
        member = MemoryConsumer(self, list(topics), state)
        state.member = member
        try:
            yield member
        finally:
            state.member = None

    def _available(self, topic: str, position: int) -> list[Message]:
        return self._logs.get(topic, [])[position:]


class MemoryConsumer(Consumer):
    def __init__(self, bus: MemoryBus, topics: list[str], group: _Group) -> None:
        self._bus = bus
        self._topics = topics
        self._group = group
        # Start where the group last committed: what was fetched but not committed comes again.
        self._position = {t: group.committed.get(t, 0) for t in topics}

    def _take(self, max_records: int) -> list[Message]:
        batch: list[Message] = []
        for topic in self._topics:
            room = max_records - len(batch)
            if room <= 0:
                break
            taken = self._bus._available(topic, self._position[topic])[:room]
            self._position[topic] += len(taken)
            batch.extend(taken)
        return batch

    async def poll(self, max_records: int, timeout: float) -> list[Message]:
        deadline = time.monotonic() + timeout
        async with self._bus._changed:
            while True:
                batch = self._take(max_records)
                remaining = deadline - time.monotonic()
                if batch or remaining <= 0:
                    return batch
                try:
                    await asyncio.wait_for(self._bus._changed.wait(), remaining)
                except TimeoutError:
                    return self._take(max_records)

    async def commit(self) -> None:
        self._group.committed.update(self._position)

    def lag(self) -> dict[str, int]:
        return {t: len(self._bus._logs.get(t, [])) - p for t, p in self._position.items()}
