"""The event bus: publish with a key, consume as a group in batches, commit after processing.

One interface (``_base``), backends picked by URL (as encode/broadcaster does, in ``_backends``):

- ``database://[?poll_interval_s=S&retention_hours=H]`` — a durable log in newsmon's own
  database (SQLite or PostgreSQL), the default of ``newsmon run``: what was published survives
  a crash or a restart; other processes on the same database see new messages within
  ``poll_interval_s`` (0.2), and messages are kept ``retention_hours`` (168) once consumed;
- ``memory://`` — in-process, nothing kept (tests);
- ``kafka://host:port[,host:port…][?partitions=N&publish_timeout_s=S]`` — Apache Kafka (or any
  Kafka-protocol broker) through aiokafka; ``partitions`` for the topics it creates (3),
  ``publish_timeout_s`` for how long a publish may wait for the broker before it fails (15).

All give the same guarantees: messages are delivered at least once; a consumer that stops without
committing has its uncommitted messages delivered again to the next member of its group. Only
the backend a URL names is imported: the embedded default never imports aiokafka.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from newsmon.bus._backends.memory import MemoryBus
from newsmon.bus._base import Bus, BusError, Consumer, Message

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Bus", "BusError", "Consumer", "MemoryBus", "Message", "open_bus"]


def open_bus(url: str, *, client_id: str = "newsmon", engine: AsyncEngine | None = None) -> Bus:
    """Build the bus named by ``url``; call ``start()`` before use.

    ``engine`` is the process's database, where ``database://`` keeps its log.
    """
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        return MemoryBus()
    if parts.scheme == "database":
        if engine is None:
            raise BusError(f"bus URL {url!r} needs the database engine")
        from newsmon.bus._backends.database import DatabaseBus

        try:
            poll_interval_s = float(options.get("poll_interval_s", "0.2"))
            retention_hours = float(options.get("retention_hours", "168"))
        except ValueError as exc:
            raise BusError(f"bus URL {url!r}: {exc}") from None
        if not poll_interval_s > 0 or not retention_hours > 0:
            raise BusError(f"bus URL {url!r}: poll_interval_s and retention_hours must be positive")
        return DatabaseBus(
            engine, poll_interval_s=poll_interval_s, retention_s=retention_hours * 3600
        )
    if parts.scheme == "kafka":
        if not parts.netloc:
            raise BusError(f"bus URL {url!r} names no broker (expected kafka://host:port)")
        from newsmon.bus._backends.kafka import PUBLISH_TIMEOUT_S, KafkaBus

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
    raise BusError(f"unsupported bus URL {url!r}: use database://, memory:// or kafka://host:port")
