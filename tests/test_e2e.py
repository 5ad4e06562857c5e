"""End to end: a loopback feed with the seed article becomes signed webhooks, and nothing else does.

Once in one process on the memory bus, and once as three `newsmon` processes on a Kafka-protocol
broker (Tansu). Signatures are checked here with hmac directly, not with newsmon's signer.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from newsmon.runner import ROLES, serve
from newsmon.settings import Settings
from tests.helpers import (
    Broker,
    LoopbackServer,
    Reply,
    feed_with_seed_article,
    free_port,
    parse_metrics,
    verify_standard_webhook,
    write_seeds,
)

pytestmark = pytest.mark.model

SECRET = "whsec_" + base64.b64encode(b"end-to-end-test-secret-0123456789").decode()
SEED_TOPICS = {"fentanyl", "cartel-arrests", "extradition", "us-mexico-summit"}

UNRELATED = [
    ("City council approves new bike lanes downtown",
     "The council voted 7-2 to add protected bike lanes on three avenues, with work starting in spring."),
    ("Tech shares lift stock markets to a weekly gain",
     "Chipmakers led a broad rally as investors bet on lower interest rates next year."),
    ("Recipe: a simple lemon olive-oil cake",
     "This moist cake needs one bowl, five ingredients and forty minutes in the oven."),
    ("Local team clinches the championship in overtime",
     "A last-second goal sealed the title in front of a sold-out home crowd on Sunday night."),
]  # fmt: skip


def metric_values() -> dict[str, float]:
    from newsmon.metrics import exposition

    return parse_metrics(exposition()[0].decode())


async def wait_for_webhooks(server: LoopbackServer, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(server.requests_to("/hook")) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"only {len(server.requests_to('/hook'))} of {count} webhooks arrived")
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # anything extra (an unrelated item, a duplicate) would arrive now


def check_alerts(server: LoopbackServer) -> float:
    """Exactly one verified webhook per seed topic, all for the seed article; returns latency."""
    hooks = server.requests_to("/hook")
    bodies = [verify_standard_webhook(r, SECRET) for r in hooks]
    topics = [b["data"]["topic"] for b in bodies]  # type: ignore[index]
    assert sorted(topics) == sorted(SEED_TOPICS)
    titles = {b["data"]["article"]["title"] for b in bodies}  # type: ignore[index]
    assert titles == {"Can the US and AMLO stop the cartel’s deadly flow of fentanyl?"}
    assert len({r.headers["webhook-id"] for r in hooks}) == len(hooks)
    for body in bodies:
        data = body["data"]
        assert data["score"] >= data["threshold"]  # type: ignore[index,operator]
        assert data["evidence"]["passage"]  # type: ignore[index]
    fetched_at = server.requests_to("/feed.xml")[0].at
    return max(r.at for r in hooks) - fetched_at


async def test_memory_bus_end_to_end(tmp_path: Path, http_server: LoopbackServer) -> None:
    http_server.routes["/feed.xml"] = Reply(
        200, feed_with_seed_article(UNRELATED), {"content-type": "application/rss+xml"}
    )
    http_server.routes["/hook"] = Reply(204)
    port = free_port()
    settings = Settings(
        **{k.removeprefix("NEWSMON_").lower(): v for k, v in write_seeds(tmp_path, http_server, SECRET).items()},
        bus_url="memory://",
        http_port=port,
    )  # fmt: skip
    stop = asyncio.Event()
    before = metric_values()
    running = asyncio.create_task(serve(settings, ROLES, stop))
    try:
        await wait_for_webhooks(http_server, len(SEED_TOPICS), timeout=60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as api:
            assert (await api.get("/healthz")).json() == {"status": "ok"}
            ready = (await api.get("/readyz")).json()
            assert ready == {
                "ready": True,
                "checks": dict.fromkeys(["bus", "database", *ROLES], True),
            }
            after = parse_metrics((await api.get("/metrics")).text)
            topics = (await api.get("/topics")).json()
            assert {t["slug"] for t in topics} == SEED_TOPICS
            feeds = (await api.get("/feeds")).json()
            assert feeds[0]["items_published"] == len(UNRELATED) + 1
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("newsmon_articles_classified_total") == len(UNRELATED) + 1
    for topic in SEED_TOPICS:
        assert delta(f'newsmon_articles_matched_total{{topic="{topic}"}}') == 1
    assert delta('newsmon_deliveries_total{channel="webhook",outcome="delivered"}') == 4
    assert delta('newsmon_end_to_end_seconds_count{channel="webhook"}') == 4
    assert delta('newsmon_feed_polls_total{outcome="ok"}') == 1
    latency = check_alerts(http_server)
    print(f"\nmemory bus: feed fetched -> last of 4 webhooks received in {latency:.3f} s")


@pytest.mark.kafka
async def test_kafka_end_to_end_three_processes(
    tmp_path: Path, http_server: LoopbackServer, kafka: Broker
) -> None:
    http_server.routes["/feed.xml"] = Reply(
        200, feed_with_seed_article(UNRELATED), {"content-type": "application/rss+xml"}
    )
    http_server.routes["/hook"] = Reply(204)
    env = {
        **os.environ,
        **write_seeds(tmp_path, http_server, secret=None),
        "E2E_WEBHOOK_SECRET": SECRET,
        "NEWSMON_BUS_URL": kafka.url,
        "NEWSMON_HTTP_PORT": "0",
    }
    logs = {role: (tmp_path / f"{role}.log").open("wb") for role in ROLES}
    # Downstream first, so that consumers are in their groups when the article arrives.
    processes = {
        role: subprocess.Popen(
            [sys.executable, "-m", "newsmon.cli", role], env=env, stdout=logs[role], stderr=subprocess.STDOUT
        )
        for role in reversed(ROLES)
    }  # fmt: skip
    try:
        await wait_for_webhooks(http_server, len(SEED_TOPICS), timeout=120)
        for role, process in processes.items():
            assert process.poll() is None, (
                f"{role} exited early:\n" + (tmp_path / f"{role}.log").read_text()
            )
    finally:
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        codes = {role: p.wait(timeout=40) for role, p in processes.items()}
        for f in logs.values():
            f.close()
    assert codes == dict.fromkeys(ROLES, 0), {
        r: (tmp_path / f"{r}.log").read_text()[-2000:] for r in ROLES
    }
    latency = check_alerts(http_server)
    print(f"\nkafka: feed fetched -> last of 4 webhooks received in {latency:.3f} s")
