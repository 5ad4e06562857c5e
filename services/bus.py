"""The event bus: publish with a key, consume as a group in batches, commit after processing.

One interface, two backends picked by URL (as encode/broadcaster does):

- ``memory://`` — in-process, the default for ``newsmon run``;
- ``kafka://host:port[,host:port…][?partitions=N&publish_timeout_s=S]`` — Apache Kafka (or any
  Kafka-protocol broker) through aiokafka; ``partitions`` for the topics it creates (3),
  ``publish_timeout_s`` for how long a publish may wait for the broker before it fails (15).

Both give the same guarantees: messages are delivered at least once; a consumer that stops without
committing has its uncommitted messages delivered again to the next member of its group.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)


class BusError(RuntimeError):
    """The bus cannot be reached or refused an operation."""


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def coordinates(self) -> str:
        """Where the message sits, for logs: ``topic[partition]@offset``."""
        return f"{self.topic}[{self.partition}]@{self.offset}"


class Consumer(ABC):
    """A member of a consumer group, reading in batches."""

    @abstractmethod
    async def poll(self, max_records: int, timeout: float) -> list[Message]:
        """Wait up to ``timeout`` seconds for messages; return at most ``max_records``."""

    @abstractmethod
    async def commit(self) -> None:
        """Mark everything returned by ``poll`` so far as processed.

        Best effort on Kafka: a commit the broker refuses or does not answer in time is logged
        and given up, and its records come again (consumers are idempotent by event id).
        """

    @abstractmethod
    def lag(self) -> dict[str, int]:
        """Messages on the bus not yet returned by ``poll``, per topic (as far as known)."""


class Bus(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ensure_topics(self, topics: Iterable[str]) -> None:
        """Create the topics that do not exist yet."""

    @abstractmethod
    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish one message; returns once the bus has it."""

    @abstractmethod
    def consumer(self, topics: Iterable[str], group: str) -> AbstractAsyncContextManager[Consumer]:
        """Join ``group`` as a consumer of ``topics``; leaving the context leaves the group."""

    async def ready(self) -> bool:
        """Whether the bus can take work right now (for health checks)."""
        return True


def open_bus(url: str, *, client_id: str = "newsmon") -> Bus:
    """Build the bus named by ``url``; call ``start()`` before use."""
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        return MemoryBus()
    if parts.scheme == "kafka":
        if not parts.netloc:
            raise BusError(f"bus URL {url!r} names no broker (expected kafka://host:port)")
        from newsmon.kafka import PUBLISH_TIMEOUT_S, KafkaBus

        try:
            partitions = int(options.get("partitions", "3"))
            publish_timeout_s = float(options.get("publish_timeout_s", PUBLISH_TIMEOUT_S))
        except ValueError as exc:
            raise BusError(f"bus URL {url!r}: {exc}") from None
        if partitions < 1 or not publish_timeout_s > 0:
            raise BusError(f"bus URL {url!r}: partitions and publish_timeout_s must be positive")
        return KafkaBus(
            parts.netloc,
            client_id=client_id,
            partitions=partitions,
            publish_timeout_s=publish_timeout_s,
        )
    raise BusError(f"unsupported bus URL {url!r}: use memory:// or kafka://host:port")


# The in-process backend -----------------------------------------------------------------------


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
