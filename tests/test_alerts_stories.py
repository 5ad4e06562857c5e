"""One alert per (subscription, topic, story), and again when the story develops: against a real
loopback webhook receiver, through the HTTP API, on SQLite and PostgreSQL, with processes racing
for the same story."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from newsmon.alerts.delivery_store import delivery_id
from newsmon.alerts.policy import SUPPRESSED
from newsmon.alerts.service import AlertsService
from newsmon.alerts.signing import verify
from newsmon.alerts.subscriptions import Subscription
from newsmon.alerts.tables import deliveries
from newsmon.bus import MemoryBus
from newsmon.db import open_engine
from newsmon.settings import Settings
from tests.helpers import (
    SECRET,
    Receiver,
    alerts,
    in_story,
    matched,
    message,
    serve_receiver,
    until,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


def hook(sub_id: str, receiver: Receiver, **kw: Any) -> Subscription:
    return Subscription(
        id=sub_id, channel="webhook", url=receiver.url(f"/{sub_id}"), secret=SECRET, **kw
    )


def bodies(receiver: Receiver, sub_id: str) -> list[dict[str, Any]]:
    return [json.loads(h.body) for h in receiver.hits if h.path == f"/{sub_id}"]


async def test_one_alert_per_story_again_when_it_develops_and_every_article_on_request(
    engine: Any, receiver: Receiver
) -> None:
    subs = [hook("story", receiver), hook("every", receiver, grouping="article")]
    events = [
        in_story(matched("a1"), "S", 1),
        in_story(matched("a2"), "S", 2),  # a rewrite: no alert
        in_story(matched("a3"), "S", 3, update=True, new=["extradited to the United States"]),
        in_story(matched("a4"), "S", 4, update=True, new=["extradited to the United States"]),
        in_story(matched("a5"), "T", 1),  # another story
    ]
    async with alerts(engine, subs) as (service, api):
        assert await service.handle_batch([message(e, i) for i, e in enumerate(events[:2])]) == 3
        assert await service.handle_batch([message(e, i) for i, e in enumerate(events[2:])]) == 5
        await until(lambda: len(receiver.hits) == 8)
        # The bus redelivers everything: nothing new, for either subscription.
        assert await service.handle_batch([message(e, i) for i, e in enumerate(events)]) == 0
        await asyncio.sleep(0.3)
        listed = (await api.get("/deliveries", params={"story_id": "S"})).json()
        suppressed = (await api.get("/deliveries", params={"status": "suppressed"})).json()
    assert len(receiver.hits) == 8
    story = bodies(receiver, "story")
    assert [b["data"]["article"]["id"] for b in story] == ["a1", "a3", "a5"]
    assert [b["data"]["story"]["article_count"] for b in story] == [1, 3, 1]
    first, update, other = (b["data"]["story"] for b in story)
    assert first == {
        "id": "S", "title": "Story S", "article_count": 1, "first_seen": first["first_seen"],
        "update": False, "new": [], "reason": "test",
    }  # fmt: skip
    assert update["update"] is True and update["new"] == ["extradited to the United States"]
    assert other["id"] == "T"
    assert [b["data"]["article"]["id"] for b in bodies(receiver, "every")] == [
        "a1", "a2", "a3", "a4", "a5",
    ]  # fmt: skip
    now = int(time.time())
    assert all(verify(SECRET, h.headers, h.body, now=now) for h in receiver.hits)
    # An operator sees the story's suppressed articles beside its alerts.
    by_sub = Counter((d["subscription_id"], d["status"]) for d in listed)
    assert by_sub == Counter(
        {("story", "delivered"): 2, ("story", "suppressed"): 2, ("every", "delivered"): 4}
    )
    assert {(d["article_id"], d["story_id"]) for d in suppressed} == {("a2", "S"), ("a4", "S")}


async def test_without_story_information_each_article_is_a_story_of_its_own(
    engine: Any, receiver: Receiver
) -> None:
    async with alerts(engine, [hook("s1", receiver)]) as (service, _):
        assert await service.handle_batch([message(matched("a1")), message(matched("a2"), 1)]) == 2
        await until(lambda: len(receiver.hits) == 2)
    stories = [b["data"]["story"] for b in bodies(receiver, "s1")]
    assert [(s["id"], s["article_count"], s["update"]) for s in stories] == [
        ("a1", 1, False),
        ("a2", 1, False),
    ]


async def test_an_update_is_the_first_alert_where_the_story_reached_no_one_before(
    engine: Any, receiver: Receiver
) -> None:
    """The story's first articles scored below this subscriber's minimum: its first alert is
    the development, and the rewrites after it add none."""
    sub = hook("picky", receiver, min_score=0.85)
    events = [
        in_story(matched("a1", {"fentanyl": 0.6}), "S", 1),
        in_story(matched("a2", {"fentanyl": 0.9}), "S", 2, update=True, new=["arrested"]),
        in_story(matched("a3", {"fentanyl": 0.9}), "S", 3),
        in_story(matched("a4", {"fentanyl": 0.9}), "S", 4, update=True, new=["sentenced"]),
    ]
    async with alerts(engine, [sub]) as (service, _):
        for i, event in enumerate(events):
            await service.handle_batch([message(event, i)])
        await until(lambda: len(receiver.hits) == 2)
        await asyncio.sleep(0.3)
    assert [b["data"]["article"]["id"] for b in bodies(receiver, "picky")] == ["a2", "a4"]


async def test_processes_racing_for_one_story_alert_it_once(engine: Any) -> None:
    """Two alerts processes record different articles of the same new stories at the same
    moment (Kafka gives them different partitions): the database lets one claim each story."""
    url = engine.url.render_as_string(hide_password=False)
    other = open_engine(url)
    subs = [Subscription(id=f"s{i}", channel="log") for i in range(3)]
    settings = Settings()
    one = AlertsService(settings, MemoryBus(), engine, subs)
    two = AlertsService(settings, MemoryBus(), other, subs)
    try:
        await one.ensure_seeded()
        for round_ in range(5):
            stories = [f"r{round_}-story{k}" for k in range(4)]
            batch_one = [
                message(in_story(matched(f"{s}-x"), s, 1), i) for i, s in enumerate(stories)
            ]
            batch_two = [
                message(in_story(matched(f"{s}-y"), s, 2), i)
                for i, s in enumerate(reversed(stories))
            ]
            made = await asyncio.gather(one.handle_batch(batch_one), two.handle_batch(batch_two))
            assert sum(made) == len(stories) * len(subs)
        query = select(deliveries.c.subscription_id, deliveries.c.story_id, deliveries.c.status)
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
    finally:
        await other.dispose()
    alerted = Counter((r.subscription_id, r.story_id) for r in rows if r.status != SUPPRESSED)
    assert len(rows) == 5 * 4 * 2 * len(subs)  # every article recorded, once
    assert len(alerted) == 5 * 4 * len(subs) and set(alerted.values()) == {1}


async def test_a_subscription_can_switch_to_every_article(engine: Any, receiver: Receiver) -> None:
    async with alerts(engine, [hook("s1", receiver)]) as (service, api):
        await service.handle_batch([message(in_story(matched("a1"), "S", 1))])
        await service.handle_batch([message(in_story(matched("a2"), "S", 2), 1)])
        changed = await api.patch("/subscriptions/s1", json={"grouping": "article"})
        assert changed.status_code == 200 and changed.json()["grouping"] == "article"
        await service.handle_batch([message(in_story(matched("a3"), "S", 3), 2)])
        await until(lambda: len(receiver.hits) == 2)
        await asyncio.sleep(0.3)
    assert [b["data"]["article"]["id"] for b in bodies(receiver, "s1")] == ["a1", "a3"]
    assert receiver.hits[0].headers["webhook-id"] == delivery_id("s1", "a1", "fentanyl")


async def test_a_subscription_deleted_and_made_again_under_its_id_starts_afresh(
    engine: Any,
) -> None:
    """Deleting a subscription deletes its story claims and its budget's count with it: the
    new one under the same id is alerted of the old story's next article, within its budget."""
    from newsmon.alerts.tables import budgets, story_claims

    body = {"id": "s1", "channel": "log", "budget": {"max_alerts": 1, "per": "day"}}
    async with alerts(engine) as (service, api):
        assert (await api.post("/subscriptions", json=body)).status_code == 201
        assert await service.handle_batch([message(in_story(matched("a1"), "S", 1))]) == 1
        assert (await api.delete("/subscriptions/s1")).status_code == 204
        async with engine.connect() as conn:
            for table in (story_claims, budgets):
                left = await conn.execute(select(table).where(table.c.subscription_id == "s1"))
                assert left.all() == []
        assert (await api.post("/subscriptions", json=body)).status_code == 201
        assert await service.handle_batch([message(in_story(matched("a2"), "S", 2))]) == 1
        again = await service.deliveries.get(delivery_id("s1", "a2", "fentanyl"))
    assert again is not None and again.status in ("pending", "delivered")


async def test_story_claims_expire_once_their_story_had_no_article_for_the_retention(
    engine: Any,
) -> None:
    """A claim whose story the subscription heard nothing of for STORY_CLAIM_DAYS goes; one
    whose story still grows (a suppressed article counts) stays."""
    from datetime import UTC, datetime, timedelta

    from newsmon.alerts.delivery_store import STORY_CLAIM_DAYS
    from tests.helpers import Clock

    start = datetime(2026, 1, 1, tzinfo=UTC)
    clock = Clock(start)
    sub = Subscription(id="s1", channel="log")
    async with alerts(engine, [sub], clock=clock) as (service, _):
        first = [in_story(matched("old"), "OLD", 1), in_story(matched("live"), "LIVE", 1)]
        assert await service.handle_batch([message(e, i) for i, e in enumerate(first)]) == 2
        clock.now = start + timedelta(days=100)
        assert await service.handle_batch([message(in_story(matched("live2"), "LIVE", 2))]) == 0
        clock.now = start + timedelta(days=STORY_CLAIM_DAYS - 1)
        assert await service.deliveries.expire_story_claims() == 0
        clock.now = start + timedelta(days=STORY_CLAIM_DAYS, seconds=1)
        assert await service.deliveries.expire_story_claims() == 1
        later = [in_story(matched("old2"), "OLD", 2), in_story(matched("live3"), "LIVE", 3)]
        assert await service.handle_batch([message(e, i) for i, e in enumerate(later)]) == 1
        old2 = await service.deliveries.get(delivery_id("s1", "old2", "fentanyl"))
        live3 = await service.deliveries.get(delivery_id("s1", "live3", "fentanyl"))
    assert old2 is not None and old2.status != SUPPRESSED
    assert live3 is not None and live3.status == SUPPRESSED
