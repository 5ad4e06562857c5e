"""Several alerts processes on one database (the distributed deployment): each takes due
deliveries by a claim, so every delivery goes out once; a claim whose process died ends with its
lease, and the delivery goes again (same webhook-id). A real loopback receiver, SQLite and
PostgreSQL, a clock the test moves by hand."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from newsmon.alerts.delivery_store import DeliveryFilter, DeliveryStore, NewDelivery, delivery_id
from newsmon.alerts.dispatcher import LEASE_MARGIN_S
from newsmon.alerts.service import AlertsService
from newsmon.alerts.subscriptions import Subscription
from newsmon.bus import MemoryBus
from newsmon.db import open_engine
from newsmon.settings import Settings
from tests.helpers import SECRET, Clock, Receiver, in_story, matched, message, serve_receiver, until

SUBS = 4
ARTICLES = 10


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


@pytest.fixture
async def other(engine: Any) -> AsyncIterator[Any]:
    """A second engine on the same database: another process's connections."""
    eng = open_engine(engine.url.render_as_string(hide_password=False))
    yield eng
    await eng.dispose()


def hooks(receiver: Receiver) -> list[Subscription]:
    return [
        Subscription(id=f"s{i}", channel="webhook", url=receiver.url(), secret=SECRET)
        for i in range(SUBS)
    ]


def articles() -> list[Any]:
    return [
        message(in_story(matched(f"a{i}", {"fentanyl": 0.8}), f"story-a{i}", 1), i)
        for i in range(ARTICLES)
    ]


def expected() -> set[str]:
    return {delivery_id(f"s{s}", f"a{a}", "fentanyl") for s in range(SUBS) for a in range(ARTICLES)}


def config() -> Settings:
    """Every delivery in flight at once: both processes look while none has an outcome yet.
    (Built in the test, where the environment lets webhooks go to loopback receivers.)"""
    return Settings(
        webhook_retry_delays_s=[0.2], webhook_timeout_s=2, delivery_per_subscription=ARTICLES
    )


async def delivered_once(service: AlertsService) -> None:
    rows = await service.deliveries.deliveries(DeliveryFilter(), 1000, 0)
    assert {d.id for d in rows} == expected()
    assert {(d.status, d.attempts) for d in rows} == {("delivered", 1)}


async def test_two_processes_deliver_each_due_delivery_once(
    engine: Any, other: Any, receiver: Receiver
) -> None:
    """Both dispatchers start on the same due deliveries at the same moment, and look again
    and again while the slow receiver holds every attempt open."""
    receiver.mode = "slow"  # 0.5 s an answer
    services = [
        AlertsService(config(), MemoryBus(), eng, hooks(receiver)) for eng in (engine, other)
    ]
    await services[0].ensure_seeded()
    assert await services[0].handle_batch(articles()) == SUBS * ARTICLES
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]
    try:
        for _ in range(5):
            for s in services:
                s.wake()
            await asyncio.sleep(0.1)
        await until(lambda: len(receiver.hits) >= SUBS * ARTICLES)
        await asyncio.sleep(0.8)  # anything sent twice has arrived by now
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
    sent = Counter(h.headers["webhook-id"] for h in receiver.hits)
    assert set(sent) == expected()
    assert [i for i, n in sent.items() if n != 1] == []
    await delivered_once(services[0])


async def test_a_claim_whose_process_died_goes_again_after_its_lease(
    engine: Any, other: Any, receiver: Receiver
) -> None:
    """A process claims the due deliveries as its dispatcher does, then dies before sending
    or recording: the survivor leaves them alone for the lease, then sends each, once."""
    clock = Clock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC))
    settings = config()
    lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S  # a webhook's, as the dispatcher's
    survivor = AlertsService(settings, MemoryBus(), engine, hooks(receiver), clock=clock)
    await survivor.ensure_seeded()
    assert await survivor.handle_batch(articles()) == SUBS * ARTICLES
    dead = DeliveryStore(other, clock)
    assert await dead.claim(expected(), lease_s) == expected()
    ends = clock.now + timedelta(seconds=lease_s)
    # Out of every dispatcher's reach until the lease ends, and no longer.
    assert await survivor.deliveries.next_due_at() == ends
    assert await survivor.deliveries.claim(expected(), lease_s) == set()
    stop = asyncio.Event()
    task = asyncio.create_task(survivor.run(stop))
    try:
        for now in (clock.now, ends - timedelta(seconds=1)):
            clock.now = now
            survivor.wake()
            await asyncio.sleep(0.3)
            assert receiver.hits == []
        clock.now = ends
        survivor.wake()
        await until(lambda: len(receiver.hits) >= SUBS * ARTICLES)
        for _ in range(3):  # later looks find nothing more to send
            clock.now += timedelta(seconds=lease_s)
            survivor.wake()
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    sent = Counter(h.headers["webhook-id"] for h in receiver.hits)
    assert set(sent) == expected()
    assert [i for i, n in sent.items() if n != 1] == []
    await delivered_once(survivor)


async def test_racing_claims_and_digest_takes_share_out_the_due_deliveries(
    engine: Any, other: Any
) -> None:
    """The store's takes, at the same moment from two processes: each delivery goes to one of
    them, whether claimed by id or taken as a digest's contents."""
    clock = Clock(datetime(2026, 5, 1, 10, 0, tzinfo=UTC))
    stores = [DeliveryStore(eng, clock) for eng in (engine, other)]
    rows = [
        NewDelivery(delivery_id(sub, f"a{i}", "t"), sub, f"a{i}", "t", b"{}")
        for sub in ("plain", "digest")
        for i in range(50)
    ]
    assert await stores[0].add(rows) == 100
    plain = {r.id for r in rows if r.subscription_id == "plain"}
    for _ in range(2):  # the second round after the first one's leases end
        won = await asyncio.gather(*(s.claim(plain, 90) for s in stores))
        assert won[0].isdisjoint(won[1]) and won[0] | won[1] == plain
        taken = await asyncio.gather(*(s.due_for("digest", 30, 90) for s in stores))
        ids = [{d.id for d in t} for t in taken]
        assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) >= 30
        rest = {d.id for d in await stores[1].due_for("digest", 100, 90)}
        assert rest.isdisjoint(ids[0] | ids[1]) and len(ids[0] | ids[1] | rest) == 50
        assert await stores[0].due_for("digest", 100, 90) == []
        assert await stores[1].claim(plain, 90) == set()
        clock.now += timedelta(seconds=90)
