"""The event bus: publish with a key, consume as a group in batches, commit after processing.

One interface (``_base``), backends picked by URL (as encode/broadcaster does, in ``_backends``):

- ``memory://`` — in-process, nothing kept;
- ``kafka://host:port[,host:port…][?partitions=N&publish_timeout_s=S]`` — Apache Kafka (or any
  Kafka-protocol broker) through aiokafka; ``partitions`` for the topics it creates (3),
  ``publish_timeout_s`` for how long a publish may wait for the broker before it fails (15).

All give the same guarantees: messages are delivered at least once; a consumer that stops without
committing has its uncommitted messages delivered again to the next member of its group. Only
the backend a URL names is imported: the embedded default never imports aiokafka.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from newsmon.bus._backends.memory import MemoryBus
from newsmon.bus._base import Bus, BusError, Consumer, Message

__all__ = ["Bus", "BusError", "Consumer", "MemoryBus", "Message", "open_bus"]


def open_bus(url: str, *, client_id: str = "newsmon") -> Bus:
    """Build the bus named by ``url``; call ``start()`` before use."""
    parts = urlsplit(url)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "memory":
        return MemoryBus()
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
    raise BusError(f"unsupported bus URL {url!r}: use memory:// or kafka://host:port")
