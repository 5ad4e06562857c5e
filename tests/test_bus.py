"""The bus contract, run against both backends: the in-process bus and a real Kafka broker."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from newsmon.bus import Bus, BusError, MemoryBus, Message, open_bus
from tests.conftest import Broker


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        instance: Bus = MemoryBus()
    else:
        broker: Broker = request.getfixturevalue("kafka")
        instance = open_bus(broker.url + "?partitions=2")
    await instance.start()
    await instance.ensure_topics(["contract"])
    yield instance
    await instance.close()


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
    from tests.conftest import free_port

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
