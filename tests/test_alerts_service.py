"""Alerts against real loopback webhook receivers, with the store on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from newsmon.alerts.delivery_store import DeliveryStore, delivery_id
from newsmon.alerts.policy import DEAD, DELIVERED
from newsmon.alerts.service import AlertsService
from newsmon.alerts.signing import verify
from newsmon.alerts.subscriptions import Subscription
from newsmon.bus import MemoryBus
from newsmon.settings import Settings
from tests.helpers import SECRET, LoopbackServer, Reply, matched, message, until


def webhook(sub_id: str, server: LoopbackServer, path: str, **kw: Any) -> Subscription:
    return Subscription(id=sub_id, channel="webhook", url=server.url(path), secret=SECRET, **kw)


@asynccontextmanager
async def running(
    engine: Any, subscriptions: list[Subscription], **settings: Any
) -> AsyncIterator[AlertsService]:
    config = Settings(**{"webhook_retry_delays_s": [0.1, 0.1], "webhook_timeout_s": 2, **settings})
    service = AlertsService(config, MemoryBus(), engine, subscriptions)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_one_signed_webhook_per_matched_topic(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/hook"] = Reply(200)
    async with running(engine, [webhook("s1", http_server, "/hook")]) as service:
        assert await service.handle_batch([message(matched())]) == 1
        await until(lambda: len(http_server.requests_to("/hook")) == 1)
    request = http_server.requests_to("/hook")[0]
    assert verify(SECRET, request.headers, request.body, now=int(time.time()))
    body = json.loads(request.body)
    assert body["type"] == "article.matched"
    assert body["data"]["topic"] == "fentanyl"  # extradition scored below its threshold
    assert body["data"]["article"]["title"] == "Title a1"
    assert request.headers["webhook-id"] == delivery_id("s1", "a1", "fentanyl")


async def test_a_match_redelivered_three_times_alerts_once(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/hook"] = Reply(200)
    event = matched()
    async with running(engine, [webhook("s1", http_server, "/hook")]) as service:
        assert await service.handle_batch([message(event)]) == 1
        assert await service.handle_batch([message(event), message(event, 1)]) == 0
        await until(lambda: len(http_server.requests_to("/hook")) == 1)
        await asyncio.sleep(0.5)
    assert len(http_server.requests_to("/hook")) == 1


async def test_failures_are_retried_with_the_same_id_then_delivered(
    engine: Any, http_server: LoopbackServer
) -> None:
    replies = iter([Reply(500), Reply(503), Reply(204)])
    http_server.routes["/flaky"] = lambda _r: next(replies)
    async with running(engine, [webhook("s1", http_server, "/flaky")]) as service:
        await service.handle_batch([message(matched())])
        await until(lambda: len(http_server.requests_to("/flaky")) == 3)
        await until(lambda: _is(engine, "s1", DELIVERED))
    ids = {r.headers["webhook-id"] for r in http_server.requests_to("/flaky")}
    assert len(ids) == 1


async def test_an_endpoint_that_always_fails_ends_dead_with_its_reason(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/down"] = Reply(500)
    async with running(engine, [webhook("s1", http_server, "/down")]) as service:
        await service.handle_batch([message(matched())])
        await until(lambda: _is(engine, "s1", DEAD))
    delivery = await DeliveryStore(engine).get(delivery_id("s1", "a1", "fentanyl"))
    assert delivery is not None
    assert delivery.attempts == 3 and delivery.last_error == "HTTP 500"
    assert len(http_server.requests_to("/down")) == 3


async def test_a_hanging_endpoint_never_delays_the_others(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/hang"] = Reply(200, delay=5)
    http_server.routes["/fast"] = Reply(200)
    subs = [webhook("slow", http_server, "/hang"), webhook("fast", http_server, "/fast")]
    async with running(engine, subs, webhook_retry_delays_s=[30]) as service:
        started = time.monotonic()
        await service.handle_batch([message(matched(f"a{i}")) for i in range(5)])
        await until(lambda: len(http_server.requests_to("/fast")) == 5, timeout=5)
        assert time.monotonic() - started < 1.5
        await until(lambda: len(http_server.requests_to("/hang")) == 5, timeout=5)
        await asyncio.sleep(2.5)  # the 2 s attempt deadline passes: each hang is a failure
    store = DeliveryStore(engine)
    delivery = await store.get(delivery_id("slow", "a0", "fentanyl"))
    assert delivery is not None and delivery.last_error == "no response within 2 s"


async def test_pending_deliveries_survive_a_restart(
    engine: Any, http_server: LoopbackServer
) -> None:
    http_server.routes["/hook"] = Reply(503)
    subs = [webhook("s1", http_server, "/hook")]
    async with running(engine, subs, webhook_retry_delays_s=[0.5, 0.5]) as service:
        await service.handle_batch([message(matched())])
        await until(lambda: len(http_server.requests_to("/hook")) == 1)
    http_server.routes["/hook"] = Reply(200)
    async with running(engine, subs, webhook_retry_delays_s=[0.5, 0.5]):
        await until(lambda: _is(engine, "s1", DELIVERED))
    assert len(http_server.requests_to("/hook")) == 2


async def test_malformed_events_are_skipped_with_their_coordinates(
    engine: Any, http_server: LoopbackServer, caplog: pytest.LogCaptureFixture
) -> None:
    http_server.routes["/hook"] = Reply(200)
    async with running(engine, [webhook("s1", http_server, "/hook")]) as service:
        added = await service.handle_batch([message(b"{broken", 7), message(matched(), 8)])
        assert added == 1
    assert "articles.matched[0]@7" in caplog.text


async def test_topic_filter_and_minimum_score(engine: Any, http_server: LoopbackServer) -> None:
    http_server.routes["/hook"] = Reply(200)
    subs = [
        webhook("only-summit", http_server, "/hook", topics=("us-mexico-summit",)),
        webhook("picky", http_server, "/hook", min_score=0.9),
        webhook("all", http_server, "/hook"),
    ]
    async with running(engine, subs) as service:
        assert await service.handle_batch([message(matched())]) == 1
        await until(lambda: len(http_server.requests_to("/hook")) == 1)
    body = json.loads(http_server.requests_to("/hook")[0].body)
    assert body["data"]["subscription_id"] == "all"


async def test_log_channel_prints_the_alert_and_its_evidence(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="newsmon.alerts")
    async with running(engine, [Subscription(id="console", channel="log")]) as service:
        await service.handle_batch([message(matched())])
        await until(lambda: "ALERT [fentanyl]" in caplog.text)
    assert (
        "Title a1" in caplog.text and "the passage" in caplog.text and "an example" in caplog.text
    )


async def status_of(engine: Any, sub: str) -> str | None:
    delivery = await DeliveryStore(engine).get(delivery_id(sub, "a1", "fentanyl"))
    return delivery.status if delivery else None


async def _is(engine: Any, sub: str, status: str) -> bool:
    return await status_of(engine, sub) == status
