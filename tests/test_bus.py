"""The bus contract, run against both backends: the in-process bus and a real Kafka broker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from newsmon.bus import Bus, BusError, MemoryBus, Message, open_bus
from newsmon.db import open_engine
from newsmon.migrate import migrate, target_metadata
from tests.helpers import Broker


async def database_engine(request: pytest.FixtureRequest, kind: str) -> Any:
    """A migrated database for the database bus: a fresh SQLite file, or PostgreSQL emptied."""
    if kind == "sqlite":
        tmp_path: Path = request.getfixturevalue("tmp_path")
        engine = open_engine(f"sqlite+aiosqlite:///{tmp_path / 'bus.db'}")
    else:
        engine = open_engine(request.getfixturevalue("postgres_url"))
        async with engine.begin() as conn:
            await conn.execute(
                text("DROP TABLE IF EXISTS bus_messages, bus_offsets, alembic_version CASCADE")
            )
            for metadata in target_metadata():
                await conn.run_sync(metadata.drop_all)
    await migrate(engine)
    return engine


@pytest.fixture(
    params=[
        "memory",
        "database-sqlite",
        pytest.param("database-postgres", marks=pytest.mark.postgres),
        pytest.param("kafka", marks=pytest.mark.kafka),
    ]
)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    engine = None
    if request.param == "memory":
        instance: Bus = MemoryBus()
    elif request.param.startswith("database"):
        engine = await database_engine(request, request.param.removeprefix("database-"))
        instance = open_bus("database://?poll_interval_s=0.05", engine=engine)
    else:
        broker: Broker = request.getfixturevalue("kafka")
        instance = open_bus(broker.url + "?partitions=2")
    await instance.start()
    await instance.ensure_topics(["contract"])
    yield instance
    await instance.close()
    if engine is not None:
        await engine.dispose()


async def drain(
    bus: Bus, group: str, want: int, *, commit: bool, timeout: float = 30
) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    async with bus.consumer(["contract"], group) as consumer:
        while len(got) < want and time.monotonic() < deadline:
            got += await consumer.poll(10, timeout=0.5)
        if commit:
            await consumer.commit()
    return got


async def test_publish_then_consume_keeps_key_headers_and_order_per_key(bus: Bus) -> None:
    for i in range(6):
        await bus.publish("contract", f"v{i}".encode(), key=f"k{i % 2}", headers={"type": "t"})
    got = await drain(bus, "g1", 6, commit=True)
    assert sorted(m.value for m in got) == [f"v{i}".encode() for i in range(6)]
    assert all(m.headers == {"type": "t"} and m.topic == "contract" for m in got)
    for key in ("k0", "k1"):  # one key, one partition: its order is kept
        values = [m.value for m in got if m.key == key]
        assert values == sorted(values)
    assert all(m.coordinates == f"contract[{m.partition}]@{m.offset}" for m in got)


async def test_uncommitted_messages_come_again_committed_ones_do_not(bus: Bus) -> None:
    for i in range(3):
        await bus.publish("contract", f"m{i}".encode(), key=str(i))
    first = await drain(bus, "g2", 3, commit=False)
    assert len(first) == 3
    again = await drain(bus, "g2", 3, commit=True)  # at-least-once: not committed, so redelivered
    assert sorted(m.value for m in again) == sorted(m.value for m in first)
    await bus.publish("contract", b"later", key="x")
    after = await drain(bus, "g2", 1, commit=True)
    assert [m.value for m in after] == [b"later"]


async def test_groups_are_independent(bus: Bus) -> None:
    await bus.publish("contract", b"one", key="k")
    assert [m.value for m in await drain(bus, "ga", 1, commit=True)] == [b"one"]
    assert [m.value for m in await drain(bus, "gb", 1, commit=True)] == [b"one"]


async def test_poll_returns_empty_after_timeout_when_nothing_arrives() -> None:
    bus = MemoryBus()
    async with bus.consumer(["quiet"], "g") as consumer:
        started = time.monotonic()
        assert await consumer.poll(10, timeout=0.2) == []
        assert 0.15 < time.monotonic() - started < 2


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_the_database_bus_keeps_what_it_accepted_across_a_restart(
    request: pytest.FixtureRequest, kind: str
) -> None:
    engine = await database_engine(request, kind)
    try:
        first = open_bus("database://", engine=engine)
        await first.start()
        for i in range(5):
            await first.publish("durable", f"d{i}".encode(), key="k", headers={"n": str(i)})
        async with first.consumer(["durable"], "g") as consumer:
            assert len(await consumer.poll(2, timeout=1)) == 2
            await consumer.commit()  # d0, d1 processed
            assert len(await consumer.poll(10, timeout=1)) == 3  # fetched, never committed
        await first.close()  # as a process that stops (or dies) here

        second = open_bus("database://", engine=engine)
        await second.start()
        async with second.consumer(["durable"], "g") as consumer:
            again = await consumer.poll(10, timeout=1)
            assert [m.value for m in again] == [b"d2", b"d3", b"d4"]
            assert [m.headers["n"] for m in again] == ["2", "3", "4"]
        await second.close()
    finally:
        await engine.dispose()


async def test_the_database_bus_is_shared_by_processes_on_one_database(
    request: pytest.FixtureRequest,
) -> None:
    engine = await database_engine(request, "sqlite")
    other = open_engine(str(engine.url))  # another process: its own engine, no shared wake-up
    publisher = open_bus("database://", engine=engine)
    reader = open_bus("database://?poll_interval_s=0.05", engine=other)
    try:
        await publisher.start()
        await reader.start()
        async with reader.consumer(["shared"], "g") as consumer:
            assert await consumer.poll(10, timeout=0.1) == []
            started = time.monotonic()
            await publisher.publish("shared", b"hello", key="k")
            got = await consumer.poll(10, timeout=5)
            assert [m.value for m in got] == [b"hello"]
            assert time.monotonic() - started < 2  # seen on its next look, not at the timeout
    finally:
        await publisher.close()
        await reader.close()
        await engine.dispose()
        await other.dispose()


async def test_a_database_bus_that_was_not_started_refuses_to_publish(
    request: pytest.FixtureRequest,
) -> None:
    engine = await database_engine(request, "sqlite")
    try:
        with pytest.raises(BusError, match="not started"):
            await open_bus("database://", engine=engine).publish("t", b"x")
        with pytest.raises(BusError, match="needs the database"):
            open_bus("database://")
        with pytest.raises(BusError, match="must be positive"):
            open_bus("database://?poll_interval_s=0", engine=engine)
    finally:
        await engine.dispose()


async def test_memory_group_takes_one_member_at_a_time() -> None:
    bus = MemoryBus()
    async with bus.consumer(["t"], "g"):
        with pytest.raises(BusError, match="already has a consumer"):
            async with bus.consumer(["t"], "g"):
                pass


def test_unknown_bus_url_is_refused_with_the_url() -> None:
    with pytest.raises(BusError, match="redis://x"):
        open_bus("redis://x")
    with pytest.raises(BusError, match="names no broker"):
        open_bus("kafka://")


@pytest.mark.kafka
async def test_kafka_publish_to_a_dead_broker_fails_within_bounded_time() -> None:
    from tests.helpers import free_port

    bus = open_bus(f"kafka://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(BusError, match="cannot reach Kafka"):
        await bus.start()
    assert time.monotonic() - started < 60


async def test_lag_counts_what_is_published_but_not_yet_returned(bus: Bus) -> None:
    for i in range(3):  # one key, one partition; separate sends keep Tansu's end offsets exact
        await bus.publish("contract", f"l{i}".encode(), key="same")
    got: list[Message] = []
    deadline = time.monotonic() + 30
    async with bus.consumer(["contract"], "lag") as consumer:
        while not got and time.monotonic() < deadline:
            got = await consumer.poll(1, timeout=0.5)
        assert len(got) == 1
        assert consumer.lag() == {"contract": 2}
        while len(got) < 3 and time.monotonic() < deadline:
            got += await consumer.poll(10, timeout=0.5)
        assert consumer.lag() == {"contract": 0}
