"""Delivery policy against a real webhook receiver whose behaviour the test switches mid-run,
with the operator endpoints (/deliveries, retry, replay) over the real HTTP API app."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from newsmon.alerts.delivery_store import DeliveryStore, delivery_id
from newsmon.alerts.subscriptions import Subscription
from tests.helpers import (
    SECRET,
    LoopbackServer,
    Receiver,
    Reply,
    alerts,
    detail,
    matched,
    message,
    serve_receiver,
    status_is,
    until,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


def hook(sub_id: str, url: str) -> Subscription:
    return Subscription(id=sub_id, channel="webhook", url=url, secret=SECRET)


@pytest.mark.parametrize(
    ("mode", "status_code", "error"),
    [
        ("500", 500, "HTTP 500"),
        ("timeout", None, "no response within 1 s"),
        ("reset", None, "Error: "),  # ReadError or RemoteProtocolError, by timing
        ("301", 301, "HTTP 301 (redirects are not followed)"),
        ("429", 429, "HTTP 429"),
    ],
)
async def test_a_failed_attempt_is_recorded_then_retried_until_the_receiver_recovers(
    engine: Any, receiver: Receiver, mode: str, status_code: int | None, error: str
) -> None:
    receiver.mode = mode
    async with alerts(engine, [hook("s1", receiver.url())]) as (service, api):
        await service.handle_batch([message(matched())])
        await until(lambda: len(receiver.hits) >= 1)
        receiver.mode = "200"  # switched mid-run
        await until(lambda: status_is(api, "s1", "delivered"))
        delivery = await detail(api, "s1")
    first, last = delivery["attempt_log"][0], delivery["attempt_log"][-1]
    assert first["status_code"] == status_code and error in first["error"]
    assert last == {**last, "status_code": 200, "error": None}
    assert all(a["latency_ms"] >= 0 for a in delivery["attempt_log"])
    assert len({h.headers["webhook-id"] for h in receiver.hits}) == 1
    assert [h.path for h in receiver.hits if h.path != "/hook"] == []  # no redirect followed
    if mode == "429":  # Retry-After: 1 outweighs the 0.2 s schedule
        assert receiver.hits[1].at - receiver.hits[0].at >= 0.9
    if mode == "timeout":
        assert first["latency_ms"] >= 1000


async def test_a_slow_receiver_within_the_deadline_succeeds(
    engine: Any, receiver: Receiver
) -> None:
    receiver.mode = "slow"
    async with alerts(engine, [hook("s1", receiver.url())]) as (service, api):
        await service.handle_batch([message(matched())])
        await until(lambda: status_is(api, "s1", "delivered"))
        log = (await detail(api, "s1"))["attempt_log"]
    assert len(log) == 1 and log[0]["latency_ms"] >= 450


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # 6 s of waiting: once is enough
async def test_the_deadline_is_the_setting_not_httpx_default(engine: Any) -> None:
    """A receiver answering in 6 s, beyond httpx's 5 s default, under an 8 s setting."""
    server = LoopbackServer()
    server.routes["/hook"] = Reply(200, b"ok", delay=6)
    try:
        hooked = hook("s1", server.url("/hook"))
        async with alerts(engine, [hooked], webhook_timeout_s=8) as (service, api):
            await service.handle_batch([message(matched())])
            await until(lambda: status_is(api, "s1", "delivered"), timeout=20)
            log = (await detail(api, "s1"))["attempt_log"]
        assert len(log) == 1 and log[0]["error"] is None and log[0]["latency_ms"] >= 5900
        assert len(server.requests_to("/hook")) == 1  # sent once, not again after a false failure
    finally:
        server.close()


async def test_410_disables_the_subscription_until_it_is_resumed(
    engine: Any, receiver: Receiver
) -> None:
    receiver.mode = "410"
    async with alerts(engine, [hook("s1", receiver.url())]) as (service, api):
        await service.handle_batch([message(matched("a1"))])
        await until(lambda: status_is(api, "s1", "dead", "a1"))
        sub = (await api.get("/subscriptions/s1")).json()
        assert sub["active"] is False and sub["disabled_reason"] == "endpoint answered 410 Gone"
        # Matches while disabled are recorded and held, not sent.
        await service.handle_batch([message(matched("a2"))])
        await asyncio.sleep(0.6)
        assert len(receiver.hits) == 1
        receiver.mode = "200"
        resumed = (await api.post("/subscriptions/s1/resume")).json()
        assert resumed["active"] is True and resumed["disabled_reason"] is None
        await until(lambda: status_is(api, "s1", "delivered", "a2"))
    assert len(receiver.hits) == 2


async def test_continuous_failure_for_the_period_disables_and_says_why(
    engine: Any, receiver: Receiver
) -> None:
    receiver.mode = "500"
    settings = {"subscription_disable_after_s": 0.5, "webhook_retry_delays_s": [0.2] * 20}
    async with alerts(engine, [hook("s1", receiver.url())], **settings) as (service, api):
        await service.handle_batch([message(matched())])

        async def disabled() -> bool:
            return bool((await api.get("/subscriptions/s1")).json()["disabled_reason"])

        await until(disabled)
        sub = (await api.get("/subscriptions/s1")).json()
        hits = len(receiver.hits)
        await asyncio.sleep(0.6)
        assert len(receiver.hits) == hits  # nothing more is sent to a disabled endpoint
    assert sub["disabled_reason"].startswith("failing continuously since")
    assert sub["disabled_reason"].endswith("HTTP 500") and sub["failing_since"]
    assert 2 <= hits <= 6


async def test_a_restart_in_the_middle_of_the_schedule_resumes_it(
    engine: Any, receiver: Receiver
) -> None:
    receiver.mode = "500"
    subs = [hook("s1", receiver.url())]
    schedule = {"webhook_retry_delays_s": [0.2, 2.0, 0.2]}
    event = matched()
    async with alerts(engine, subs, **schedule) as (service, _):
        await service.handle_batch([message(event)])
        await until(lambda: len(receiver.hits) == 2)
        await asyncio.sleep(0.3)  # the 2nd failure is recorded; the 3rd attempt is 2 s away
    stored = await DeliveryStore(engine).get(delivery_id("s1", "a1", "fentanyl"))
    assert stored is not None and stored.attempts == 2 and stored.status == "pending"
    assert stored.next_attempt_at > datetime.now(UTC) + timedelta(seconds=0.5)
    receiver.mode = "200"
    async with alerts(engine, subs, **schedule) as (service, api):
        assert await service.handle_batch([message(event)] * 3) == 0  # redelivered: nothing new
        await until(lambda: status_is(api, "s1", "delivered"))
        log = (await detail(api, "s1"))["attempt_log"]
    assert [a["status_code"] for a in log] == [500, 500, 200]
    assert receiver.hits[2].at - receiver.hits[1].at >= 1.8  # the stored wait was kept
    assert len(receiver.hits) == 3


async def test_the_same_match_three_times_is_delivered_once(
    engine: Any, receiver: Receiver
) -> None:
    event = matched()
    async with alerts(engine, [hook("s1", receiver.url())]) as (service, api):
        counts = [await service.handle_batch([message(event, offset)]) for offset in range(3)]
        await until(lambda: status_is(api, "s1", "delivered"))
        await asyncio.sleep(0.5)
    assert counts == [1, 0, 0] and len(receiver.hits) == 1


async def test_a_hanging_endpoint_holds_only_its_share_of_the_slots(
    engine: Any, receiver: Receiver
) -> None:
    """Four slots in all, at most two per subscription: the fast one always has room."""
    receiver.mode = "200"
    hanging = Receiver(mode="timeout")
    server = await asyncio.start_server(hanging.handle, "127.0.0.1", 0)
    hanging.port = server.sockets[0].getsockname()[1]
    subs = [hook("hang", hanging.url()), hook("fast", receiver.url())]
    settings = {"delivery_concurrency": 4, "delivery_per_subscription": 2, "webhook_timeout_s": 3}
    try:
        async with alerts(engine, subs, **settings) as (service, _):
            started = time.monotonic()
            await service.handle_batch([message(matched(f"a{i}")) for i in range(10)])
            await until(lambda: len(receiver.hits) == 10, timeout=2.5)
            elapsed = time.monotonic() - started
            assert len(hanging.hits) == 2
    finally:
        server.close()
    assert elapsed < 2.5


async def test_operators_list_inspect_retry_and_replay_deliveries(
    engine: Any, receiver: Receiver
) -> None:
    receiver.mode = "500"
    subs = [hook("s1", receiver.url()), hook("s2", receiver.url("/other"))]
    async with alerts(engine, subs, webhook_retry_delays_s=[0.1]) as (service, api):
        before = datetime.now(UTC)
        await service.handle_batch([message(matched("a1"))])
        await until(lambda: status_is(api, "s1", "dead"))
        await until(lambda: status_is(api, "s2", "dead"))

        listed = (await api.get("/deliveries", params={"subscription_id": "s1"})).json()
        assert [d["subscription_id"] for d in listed] == ["s1"]
        assert listed[0]["status"] == "dead" and listed[0]["last_error"] == "HTTP 500"
        dead = (await api.get("/deliveries", params={"status": "dead"})).json()
        assert len(dead) == 2
        later = (before + timedelta(hours=1)).isoformat()
        assert (await api.get("/deliveries", params={"since": later})).json() == []
        assert len((await api.get("/deliveries", params={"until": later})).json()) == 2
        bad = await api.get("/deliveries", params={"status": "lost", "limit": 0})
        assert bad.status_code == 422
        assert {e["loc"][-1] for e in bad.json()["detail"]} == {"status", "limit"}

        one = await detail(api, "s1")
        assert [a["status_code"] for a in one["attempt_log"]] == [500, 500]
        assert one["payload"]["data"]["article"]["title"] == "Title a1"

        receiver.mode = "200"
        retried = await api.post(f"/deliveries/{one['id']}/retry")
        assert retried.status_code == 202 and retried.json()["status"] == "pending"
        await until(lambda: status_is(api, "s1", "delivered"))
        assert (await api.post("/deliveries/msg_nope/retry")).status_code == 404

        window = {"since": before.isoformat(), "until": datetime.now(UTC).isoformat()}
        replayed = await api.post("/subscriptions/s2/replay", json=window)
        assert replayed.json() == {"requeued": 1}
        await until(lambda: status_is(api, "s2", "delivered"))
        # Replaying a delivered one sends it again, with the same webhook-id.
        replayed = await api.post("/subscriptions/s1/replay", json={"since": window["since"]})
        assert replayed.json() == {"requeued": 1}
        await until(lambda: len([h for h in receiver.hits if h.path == "/hook"]) == 4)
        backwards = {"since": window["until"], "until": window["since"]}
        wrong = await api.post("/subscriptions/s1/replay", json=backwards)
        assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "until"]
    s1_ids = {h.headers["webhook-id"] for h in receiver.hits if h.path == "/hook"}
    assert s1_ids == {delivery_id("s1", "a1", "fentanyl")}
    body = json.loads(receiver.hits[-1].body)
    assert body["data"]["subscription_id"] in ("s1", "s2")
