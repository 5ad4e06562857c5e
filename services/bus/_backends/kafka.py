"""The Kafka backend of the bus, through aiokafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from newsmon.bus._base import Bus, BusError, Consumer, Message

log = logging.getLogger(__name__)

# How long a publish may wait for the broker before it fails, rather than hanging (the default of
# the bus URL's ``publish_timeout_s`` option).
PUBLISH_TIMEOUT_S = 15.0
# The longest a fetch waits at the broker for records. A broker that does not answer a waiting
# fetch as soon as a record arrives (Tansu) holds it for up to this long: at aiokafka's 500 ms a
# record waited 87 ms (median) to 250 ms for its consumer on Tansu, at 100 ms 20 to 55 ms. Kafka
# itself answers at once; for it this only means an idle consumer asks ten times a second.
FETCH_MAX_WAIT_MS = 100


class KafkaBus(Bus):
    def __init__(
        self,
        bootstrap_servers: str,
        *,
        client_id: str,
        partitions: int = 3,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        self._bootstrap = bootstrap_servers
        self._client_id = client_id
        self._partitions = partitions
        self._publish_timeout_s = publish_timeout_s
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            acks="all",
            # Tansu does not implement InitProducerId; consumers are idempotent by event id instead.
            enable_idempotence=False,
            linger_ms=5,
            request_timeout_ms=int(self._publish_timeout_s * 1000),
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise BusError(f"cannot reach Kafka at {self._bootstrap}: {exc}") from exc
        self._producer = producer

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def ensure_topics(self, topics: Iterable[str]) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=self._bootstrap, client_id=self._client_id)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [t for t in topics if t not in existing]
            if missing:
                new = [NewTopic(t, self._partitions, replication_factor=1) for t in missing]
                with contextlib.suppress(TopicAlreadyExistsError):  # another process was first
                    await admin.create_topics(new)
                log.info("created topics %s on %s", missing, self._bootstrap)
        except KafkaError as exc:
            raise BusError(f"cannot create topics on {self._bootstrap}: {exc}") from exc
        finally:
            await admin.close()

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if self._producer is None:
            raise BusError("bus not started")
        try:
            async with asyncio.timeout(self._publish_timeout_s):
                await self._producer.send_and_wait(
                    topic,
                    value,
                    key=key.encode() if key is not None else None,
                    headers=[(k, v.encode()) for k, v in (headers or {}).items()],
                )
        except (KafkaError, TimeoutError) as exc:
            raise BusError(f"publish to {topic} on {self._bootstrap} failed: {exc!r}") from exc

    @asynccontextmanager
    async def consumer(self, topics: Iterable[str], group: str) -> AsyncIterator[Consumer]:
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self._bootstrap,
            client_id=self._client_id,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            # Short timeouts: a dead member's partitions move to the others within seconds.
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=10_000,
        )
        try:
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise BusError(f"cannot join group {group!r} on {self._bootstrap}: {exc}") from exc
        try:
            yield KafkaConsumer(consumer, self._publish_timeout_s)
        finally:
            await consumer.stop()

    async def ready(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(2):
                await producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError):
            return False
        return True


class KafkaConsumer(Consumer):
    def __init__(self, consumer: AIOKafkaConsumer, commit_timeout_s: float) -> None:
        self._consumer = consumer
        self._commit_timeout_s = commit_timeout_s
        self._next: dict[TopicPartition, int] = {}  # offset after the last record returned

    async def poll(self, max_records: int, timeout: float) -> list[Message]:
        batches = await self._consumer.getmany(
            timeout_ms=int(timeout * 1000), max_records=max_records
        )
        for tp, records in batches.items():
            if records:
                self._next[tp] = records[-1].offset + 1
        return [
            Message(
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                key=record.key.decode(errors="replace") if record.key is not None else None,
                value=record.value if record.value is not None else b"",
                headers={k: v.decode(errors="replace") for k, v in record.headers},
            )
            for records in batches.values()
            for record in records
        ]

    async def commit(self) -> None:
        # aiokafka retries a failing commit without end (against a broker that restarted
        # empty it answers UnknownTopicOrPartition for ever), which would stall this member
        # and keep it from rejoining. A commit that fails or times out is given up: the
        # records come again to whichever member owns the partition next, and consumers are
        # idempotent by event id.
        try:
            async with asyncio.timeout(self._commit_timeout_s):
                await self._consumer.commit()
        except (KafkaError, TimeoutError) as exc:
            log.warning(
                "commit of %s failed, its records will be delivered again: %r",
                ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in self._next.items()),
                exc,
            )

    def lag(self) -> dict[str, int]:
        # Partitions this member has not read from yet have no known position: left out.
        totals: dict[str, int] = {}
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is not None and tp in self._next:
                totals[tp.topic] = totals.get(tp.topic, 0) + max(0, highwater - self._next[tp])
        return totals
