"""The bus interface every backend implements: messages, consumers, the bus itself, its error."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field


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
