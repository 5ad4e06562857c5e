"""Delivery policy against a real webhook receiver whose behaviour the test switches mid-run,
with the operator endpoints (/deliveries, retry, replay) over the real HTTP API app."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from newsmon.alerts.delivery_store import DeliveryStore, delivery_id
from newsmon.alerts.routes import build_public_router, build_router
from newsmon.alerts.service import AlertsService
from newsmon.alerts.subscriptions import Subscription
from newsmon.api import build_app
from newsmon.bus import MemoryBus
from newsmon.settings import Settings
from newsmon.ssrf import Resolver, system_resolver
from tests.test_alerts_service import SECRET, matched, message, until


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A raw asyncio HTTP/1.1 webhook receiver on loopback; ``mode`` picks its next answers:
    200, 500, 410, 301, "429" (Retry-After), "timeout", "slow", "reset"."""

    mode: str = "200"
    retry_after: str = "1"
    hits: list[Hit] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.hits.append(Hit(lines[0].split()[1], headers, body, time.monotonic()))
                mode = self.mode
                if mode == "reset":
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                if mode == "timeout":
                    await asyncio.sleep(30)
                if mode == "slow":
                    await asyncio.sleep(0.5)
                status, extra = {
                    "429": ("429 Too Many Requests", f"Retry-After: {self.retry_after}\r\n"),
                    "301": ("301 Moved Permanently", "Location: http://127.0.0.1:9/elsewhere\r\n"),
                    "410": ("410 Gone", ""),
                    "500": ("500 Internal Server Error", ""),
                }.get(mode, ("200 OK", ""))
                writer.write(f"HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\nok".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with serve_receiver() as r:
        yield r


@asynccontextmanager
async def serve_receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await r.handle(reader, writer)
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    r.port = server.sockets[0].getsockname()[1]
    yield r
    server.close()
    for task in list(handlers):
        task.cancel()
    await asyncio.gather(*handlers, return_exceptions=True)
    await server.wait_closed()


def hook(sub_id: str, url: str) -> Subscription:
    return Subscription(id=sub_id, channel="webhook", url=url, secret=SECRET)


@asynccontextmanager
async def alerts(
    engine: Any,
    seeds: Sequence[Subscription] = (),
    resolver: Resolver = system_resolver,
    **settings: Any,
) -> AsyncIterator[tuple[AlertsService, httpx.AsyncClient]]:
    """The alerts service running, and a client of the HTTP API app that serves its routes."""
    config = Settings(**{
        "webhook_retry_delays_s": [0.2, 0.2, 0.2], "webhook_timeout_s": 1,
        "webhook_retry_jitter": 0, "api_rate_burst": 10**6, **settings,
    })  # fmt: skip
    service = AlertsService(config, MemoryBus(), engine, seeds, resolver=resolver)

    async def ready() -> dict[str, bool]:
        return {}

    app = build_app([build_router(service)], ready, config, [build_public_router(service)])
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://newsmon"
        ) as api:
            yield service, api
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def detail(api: httpx.AsyncClient, sub: str, article: str = "a1") -> dict[str, Any]:
    response = await api.get(f"/deliveries/{delivery_id(sub, article, 'fentanyl')}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def status_is(api: httpx.AsyncClient, sub: str, want: str, article: str = "a1") -> bool:
    return (await detail(api, sub, article))["status"] == want


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
