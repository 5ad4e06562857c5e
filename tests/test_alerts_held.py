"""Budgets and quiet hours through the running service, with a clock the test moves by hand:
held alerts go out together, as one signed ``alerts.summary`` webhook, once, whatever restarts
or other processes there are meanwhile. A real loopback receiver, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from newsmon.alerts.delivery_store import DeliveryFilter, delivery_id
from newsmon.alerts.payload import summary_id
from newsmon.alerts.schedule import Budget, QuietHours
from newsmon.alerts.service import AlertsService
from newsmon.alerts.signing import verify
from newsmon.alerts.subscriptions import Subscription
from newsmon.bus import MemoryBus
from newsmon.db import open_engine
from newsmon.settings import Settings
from tests.helpers import (
    SECRET,
    Clock,
    Receiver,
    alerts,
    in_story,
    matched,
    message,
    serve_receiver,
    until,
)

HOURLY = Budget(max_alerts=2, per="hour")
NIGHTS = QuietHours(start="22:00", end="07:00", timezone="Europe/Berlin", breaks_through=0.95)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


def hook(receiver: Receiver, **kw: Any) -> Subscription:
    return Subscription(id="s1", channel="webhook", url=receiver.url(), secret=SECRET, **kw)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def article(article_id: str, score: float = 0.8) -> Any:
    return message(in_story(matched(article_id, {"fentanyl": score}), f"story-{article_id}", 1))


def bodies(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(h.body) for h in receiver.hits]


async def held(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = (await api.get("/deliveries?status=held")).json()
    return listed


async def at(clock: Clock, service: AlertsService, now: datetime) -> None:
    """Move the clock and let the dispatcher look."""
    clock.now = now
    service.wake()
    await asyncio.sleep(0.3)


async def test_alerts_over_the_budget_go_in_one_summary_when_the_hour_ends(
    engine: Any, receiver: Receiver
) -> None:
    clock = Clock(utc(2026, 5, 1, 10, 5))
    async with alerts(engine, [hook(receiver, budget=HOURLY)], clock=clock) as (service, api):
        assert await service.handle_batch([article(f"a{i}") for i in range(5)]) == 5
        await until(lambda: len(receiver.hits) == 2)
        waiting = await held(api)
        assert sorted(d["article_id"] for d in waiting) == ["a2", "a3", "a4"]
        assert {(d["held_reason"], d["next_attempt_at"]) for d in waiting} == {
            ("budget", "2026-05-01T11:00:00Z")
        }
        await at(clock, service, utc(2026, 5, 1, 10, 59, 59))
        assert len(receiver.hits) == 2
        await at(clock, service, utc(2026, 5, 1, 11, 0))
        await until(lambda: len(receiver.hits) == 3)
        # The new hour has a new budget: the next alert goes at once.
        await at(clock, service, utc(2026, 5, 1, 11, 5))
        await service.handle_batch([article("a5")])
        await until(lambda: len(receiver.hits) == 4)
        await asyncio.sleep(0.3)
        assert await held(api) == []
    kinds = [b["type"] for b in bodies(receiver)]
    assert kinds == ["article.matched", "article.matched", "alerts.summary", "article.matched"]
    summary = bodies(receiver)[2]["data"]
    assert summary["held_for"] == ["budget"] and summary["count"] == 3
    assert [a["article"]["id"] for a in summary["alerts"]] == ["a2", "a3", "a4"]
    assert all(a["story"]["article_count"] == 1 and a["feedback"] for a in summary["alerts"])
    ids = [delivery_id("s1", f"a{i}", "fentanyl") for i in (2, 3, 4)]
    assert [a["delivery_id"] for a in summary["alerts"]] == ids
    hit = receiver.hits[2]
    assert hit.headers["webhook-id"] == summary_id(ids)
    assert verify(SECRET, hit.headers, hit.body, now=int(time.time()))


async def test_a_restart_mid_period_sends_the_held_summary_exactly_once(
    engine: Any, receiver: Receiver
) -> None:
    """The budget's count and the held alerts are in the database: a new instance on it holds
    what the old one would have held, and the summary goes once."""
    sub = hook(receiver, budget=HOURLY)
    clock = Clock(utc(2026, 5, 1, 10, 5))
    async with alerts(engine, [sub], clock=clock) as (service, _):
        await service.handle_batch([article(f"a{i}") for i in range(3)])
        await until(lambda: len(receiver.hits) == 2)
    clock.now = utc(2026, 5, 1, 10, 30)
    async with alerts(engine, [sub], clock=clock) as (service, api):
        assert await service.handle_batch([article("a3"), article("a4")]) == 2
        await asyncio.sleep(0.3)
        assert len(receiver.hits) == 2  # the budget was spent before the restart
        assert len(await held(api)) == 3
        # The bus redelivers what the old instance recorded: nothing changes.
        assert await service.handle_batch([article("a0"), article("a2")]) == 0
        await at(clock, service, utc(2026, 5, 1, 11, 0, 1))
        await until(lambda: len(receiver.hits) == 3)
    clock.now = utc(2026, 5, 1, 11, 10)
    async with alerts(engine, [sub], clock=clock) as (service, api):
        await at(clock, service, utc(2026, 5, 1, 12, 30))
        assert await held(api) == []
    assert len(receiver.hits) == 3
    summary = bodies(receiver)[2]
    assert summary["type"] == "alerts.summary"
    assert [a["article"]["id"] for a in summary["data"]["alerts"]] == ["a2", "a3", "a4"]


async def test_quiet_hours_hold_until_the_local_morning_across_the_spring_forward_night(
    engine: Any, receiver: Receiver
) -> None:
    """Berlin, 2026-03-29: the clocks skip 02:00-03:00. Alerts from 23:30 CET wait for 07:00
    CEST (05:00 UTC), across a restart; one that breaks through goes at once."""
    sub = hook(receiver, quiet_hours=NIGHTS)
    clock = Clock(utc(2026, 3, 28, 22, 30))  # 23:30 CET
    async with alerts(engine, [sub], clock=clock) as (service, api):
        assert await service.handle_batch([article("a1"), article("urgent", 0.97)]) == 2
        await until(lambda: len(receiver.hits) == 1)
        assert bodies(receiver)[0]["data"]["article"]["id"] == "urgent"
        assert [(d["held_reason"], d["next_attempt_at"]) for d in await held(api)] == [
            ("quiet_hours", "2026-03-29T05:00:00Z")
        ]
    clock.now = utc(2026, 3, 29, 1, 30)  # 03:30 CEST: after the jump, still quiet
    async with alerts(engine, [sub], clock=clock) as (service, api):
        await service.handle_batch([article("a2")])
        later = in_story(matched("a1-rewrite"), "story-a1", 4)  # a1's story grows meanwhile
        assert await service.handle_batch([message(later)]) == 0
        await at(clock, service, utc(2026, 3, 29, 4, 59, 59))  # 06:59:59 CEST
        assert len(receiver.hits) == 1 and len(await held(api)) == 2
        await at(clock, service, utc(2026, 3, 29, 5, 0))
        await until(lambda: len(receiver.hits) == 2)
        await at(clock, service, utc(2026, 3, 29, 6, 0))
    assert len(receiver.hits) == 2
    summary = bodies(receiver)[1]["data"]
    assert summary["held_for"] == ["quiet_hours"]
    assert [a["article"]["id"] for a in summary["alerts"]] == ["a1", "a2"]
    grown, same = (a["story"] for a in summary["alerts"])
    assert (grown["article_count"], grown["article_count_now"]) == (1, 4)
    assert "article_count_now" not in same


async def test_quiet_hours_end_at_the_local_morning_of_the_fall_back_night(
    engine: Any, receiver: Receiver
) -> None:
    """Berlin, 2026-10-25: 02:00-03:00 comes twice. Quiet until 07:00 CET = 06:00 UTC, not
    05:00 UTC (07:00 by the evening's offset)."""
    clock = Clock(utc(2026, 10, 25, 1, 15))  # 02:15, the second time
    async with alerts(engine, [hook(receiver, quiet_hours=NIGHTS)], clock=clock) as (service, _):
        await service.handle_batch([article("a1")])
        await at(clock, service, utc(2026, 10, 25, 5, 0))
        assert receiver.hits == []
        await at(clock, service, utc(2026, 10, 25, 6, 0))
        await until(lambda: len(receiver.hits) == 1)
    assert bodies(receiver)[0]["type"] == "alerts.summary"


async def test_two_processes_at_the_release_send_one_summary(
    engine: Any, receiver: Receiver
) -> None:
    """Two alerts processes share the database; both see the held alerts fall due at once."""
    url = engine.url.render_as_string(hide_password=False)
    other = open_engine(url)
    sub = hook(receiver, quiet_hours=NIGHTS)
    clock = Clock(utc(2026, 1, 14, 23, 0))
    config = Settings(webhook_retry_delays_s=[0.2], webhook_timeout_s=2)
    services = [
        AlertsService(config, MemoryBus(), eng, [sub], clock=clock) for eng in (engine, other)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.run(stop)) for s in services]
    try:
        await services[0].ensure_seeded()
        await services[0].handle_batch([article(f"a{i}") for i in range(4)])
        await services[1].handle_batch([article(f"b{i}") for i in range(4)])
        for round_ in range(3):  # at the release and after, both look, again and again
            clock.now = utc(2026, 1, 15, 6, 0) + timedelta(seconds=round_)
            for s in services:
                s.wake()
            await asyncio.sleep(0.3)
        await until(lambda: len(receiver.hits) >= 1)
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        await other.dispose()
    assert len(receiver.hits) == 1
    summary = bodies(receiver)[0]["data"]
    assert summary["count"] == 8


@asynccontextmanager
async def two_processes_sharing_a_budget(
    engine: Any,
) -> AsyncIterator[tuple[list[AlertsService], Clock]]:
    """Two alerts services, each on an engine of its own, for one subscription with a budget of
    3 alerts a day, seeded, on a clock at 2026-05-01 10:05 UTC."""
    other = open_engine(engine.url.render_as_string(hide_password=False))
    sub = Subscription(id="s1", channel="log", budget=Budget(max_alerts=3, per="day"))
    clock = Clock(utc(2026, 5, 1, 10, 5))
    services = [
        AlertsService(Settings(), MemoryBus(), eng, [sub], clock=clock) for eng in (engine, other)
    ]
    try:
        await services[0].ensure_seeded()
        yield services, clock
    finally:
        await other.dispose()


async def test_processes_recording_at_once_share_one_budget(engine: Any) -> None:
    """Two alerts processes record matches for one budgeted subscription at the same moment:
    the budget's row is locked while it is counted, so exactly the budget goes at once."""
    async with two_processes_sharing_a_budget(engine) as (services, _):
        for round_ in range(3):
            batches = [[article(f"{who}{round_}-{i}") for i in range(4)] for who in ("x", "y")]
            await asyncio.gather(
                *(s.handle_batch(b) for s, b in zip(services, batches, strict=True))
            )
        rows = await services[0].deliveries.deliveries(DeliveryFilter("s1"), 100, 0)
    statuses = Counter(d.status for d in rows)
    assert statuses == Counter({"pending": 3, "held": 21})
    assert {d.next_attempt_at for d in rows if d.status == "held"} == {utc(2026, 5, 2)}


# Quiet hours and budgets are decided again as an alert goes, not only as it is recorded.

NIGHTS_STRICT = QuietHours(start="22:00", end="07:00", timezone="Europe/Berlin")


async def test_a_backlog_resumed_in_quiet_hours_waits_for_their_end_in_one_summary(
    engine: Any, receiver: Receiver
) -> None:
    """Alerts recorded in the evening while the subscription was disabled (each within its
    hour's budget) do not go when it is resumed at 02:30 Berlin: they are held for 07:00."""
    sub = hook(receiver, quiet_hours=NIGHTS_STRICT, budget=HOURLY)
    clock = Clock(utc(2026, 5, 1, 18, 0))  # 20:00 CEST
    async with alerts(engine, [sub], clock=clock) as (service, api):
        await service.ensure_seeded()
        assert await service.subscriptions.update_subscription("s1", disabled_reason="HTTP 410")
        for hour, ids in ((18, (0, 1)), (19, (2, 3))):
            clock.now = utc(2026, 5, 1, hour, 0)
            assert await service.handle_batch([article(f"a{i}") for i in ids]) == 2
            await asyncio.sleep(0.1)
        clock.now = utc(2026, 5, 2, 0, 30)  # 02:30 CEST
        assert (await api.post("/subscriptions/s1/resume")).status_code == 200
        await at(clock, service, utc(2026, 5, 2, 0, 30))
        assert receiver.hits == []
        waiting = await held(api)
        assert sorted(d["article_id"] for d in waiting) == ["a0", "a1", "a2", "a3"]
        assert {(d["held_reason"], d["next_attempt_at"]) for d in waiting} == {
            ("quiet_hours", "2026-05-02T05:00:00Z")
        }
        await at(clock, service, utc(2026, 5, 2, 5, 0))  # 07:00 CEST
        await until(lambda: len(receiver.hits) == 1)
        await asyncio.sleep(0.3)
    assert len(receiver.hits) == 1
    summary = bodies(receiver)[0]
    assert summary["type"] == "alerts.summary" and summary["data"]["count"] == 4


async def test_a_backlog_resumed_in_a_later_hour_spends_that_hours_budget(
    engine: Any, receiver: Receiver
) -> None:
    """Alerts recorded yesterday while disabled count in the hour they go in: two go at once,
    the rest wait for the hour's end, together."""
    clock = Clock(utc(2026, 5, 1, 8, 0))
    async with alerts(engine, [hook(receiver, budget=HOURLY)], clock=clock) as (service, api):
        await service.ensure_seeded()
        assert await service.subscriptions.update_subscription("s1", disabled_reason="HTTP 410")
        for hour, ids in ((8, (0, 1)), (9, (2, 3)), (10, (4, 5))):
            clock.now = utc(2026, 5, 1, hour, 0)
            assert await service.handle_batch([article(f"a{i}") for i in ids]) == 2
            await asyncio.sleep(0.1)
        clock.now = utc(2026, 5, 2, 12, 10)
        assert (await api.post("/subscriptions/s1/resume")).status_code == 200
        await at(clock, service, utc(2026, 5, 2, 12, 10))
        await until(lambda: len(receiver.hits) == 2)
        await asyncio.sleep(0.3)
        assert len(receiver.hits) == 2
        waiting = await held(api)
        assert {(d["held_reason"], d["next_attempt_at"]) for d in waiting} == {
            ("budget", "2026-05-02T13:00:00Z")
        }
        assert len(waiting) == 4
        # A retry of what went, or a second look, spends nothing more.
        await at(clock, service, utc(2026, 5, 2, 12, 30))
        assert len(receiver.hits) == 2
        await at(clock, service, utc(2026, 5, 2, 13, 0))
        await until(lambda: len(receiver.hits) == 3)
    kinds = [b["type"] for b in bodies(receiver)]
    assert kinds == ["article.matched", "article.matched", "alerts.summary"]
    assert bodies(receiver)[2]["data"]["count"] == 4


async def test_a_retry_due_in_quiet_hours_waits_for_their_end_as_itself(
    engine: Any, receiver: Receiver
) -> None:
    """An alert sent at 21:59 Berlin fails; its retry, due at 22:00:30, waits for 07:00 and
    then goes as the same message (same webhook-id), not in a summary; it spends no budget."""
    sub = hook(receiver, quiet_hours=NIGHTS_STRICT, budget=Budget(max_alerts=1, per="day"))
    clock = Clock(utc(2026, 5, 1, 19, 59, 30))  # 21:59:30 CEST
    settings = {"webhook_retry_delays_s": [60.0], "webhook_retry_jitter": 0.0}
    async with alerts(engine, [sub], clock=clock, **settings) as (service, api):
        receiver.mode = "500"
        assert await service.handle_batch([article("a1")]) == 1
        await until(lambda: len(receiver.hits) == 1)
        receiver.mode = "200"
        await at(clock, service, utc(2026, 5, 1, 20, 0, 30))  # 22:00:30 CEST: the retry is due
        await at(clock, service, utc(2026, 5, 1, 20, 0, 31))
        assert len(receiver.hits) == 1
        assert await held(api) == []
        row = await service.deliveries.get(delivery_id("s1", "a1", "fentanyl"))
        assert row is not None and row.status == "pending" and row.held_reason is None
        assert row.next_attempt_at == utc(2026, 5, 2, 5, 0)
        await at(clock, service, utc(2026, 5, 2, 5, 0))  # 07:00 CEST, a new day's budget
        await until(lambda: len(receiver.hits) == 2)
        await asyncio.sleep(0.3)
    first, second = receiver.hits
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert json.loads(second.body)["type"] == "article.matched"


async def test_a_summary_retry_due_in_quiet_hours_waits_for_their_end(
    engine: Any, receiver: Receiver
) -> None:
    """A budget summary released at 21:00 Berlin fails; its retry, due in quiet hours, waits
    for 07:00 and goes under the same webhook-id."""
    sub = hook(receiver, quiet_hours=NIGHTS_STRICT, budget=Budget(max_alerts=1, per="hour"))
    clock = Clock(utc(2026, 5, 1, 18, 30))  # 20:30 CEST
    settings = {"webhook_retry_delays_s": [3600.0], "webhook_retry_jitter": 0.0}
    async with alerts(engine, [sub], clock=clock, **settings) as (service, _):
        assert await service.handle_batch([article("a1"), article("a2")]) == 2
        await until(lambda: len(receiver.hits) == 1)
        receiver.mode = "500"
        await at(clock, service, utc(2026, 5, 1, 19, 0))  # the summary fails
        await until(lambda: len(receiver.hits) == 2)
        receiver.mode = "200"
        await at(clock, service, utc(2026, 5, 1, 20, 0))  # 22:00 CEST: its retry is due
        await at(clock, service, utc(2026, 5, 1, 20, 0, 1))
        assert len(receiver.hits) == 2
        waiting = await service.deliveries.get(delivery_id("s1", "a2", "fentanyl"))
        assert waiting is not None and waiting.next_attempt_at == utc(2026, 5, 2, 5, 0)
        await at(clock, service, utc(2026, 5, 2, 5, 0))
        await until(lambda: len(receiver.hits) == 3)
    assert receiver.hits[2].headers["webhook-id"] == receiver.hits[1].headers["webhook-id"]
    assert json.loads(receiver.hits[2].body)["type"] == "alerts.summary"


async def test_processes_taking_a_backlog_at_once_share_one_budget(engine: Any) -> None:
    """Two processes claim the same backlog of a budgeted subscription (recorded on earlier
    days, while no dispatcher ran, each day within its budget) at the same moment: each alert is
    taken by one, exactly the day's budget goes, and the rest are held for the day's end."""
    async with two_processes_sharing_a_budget(engine) as (services, clock):
        for day in range(1, 6):
            clock.now = utc(2026, 5, day, 10, 5)
            await services[0].handle_batch([article(f"a{day}-{i}") for i in range(2)])
        clock.now = utc(2026, 5, 6, 9, 0)
        stores = [s.deliveries for s in services]
        due = await stores[0].due(100)
        assert len(due) == 10 and {d.delivery.status for d in due} == {"pending"}
        won = await asyncio.gather(*(s.claim_scheduled(due, 60) for s in stores))
        rows = await stores[0].deliveries(DeliveryFilter("s1"), 100, 0)
    assert not won[0] & won[1]
    assert len(won[0] | won[1]) == 3
    held_ = [d for d in rows if d.status == "held"]
    assert len(held_) == 7
    assert {(d.held_reason, d.next_attempt_at) for d in held_} == {("budget", utc(2026, 5, 7))}
