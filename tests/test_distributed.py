"""Distributed mode: ``newsmon ingest|classify|alerts`` as real processes on one Kafka-protocol
broker (Tansu) and one PostgreSQL database, under scale-out, a crash and a broker restart.

"Exactly once in effect" is counted where a subscriber sees it: webhook deliveries per
(article, topic) at a loopback receiver, against the matches the model gives in this process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
from sqlalchemy import func, select

from newsmon.bus import BusError, open_bus
from newsmon.classify.scoring import embed_articles, index_topics, score_embedded
from newsmon.classify.store import recent_table
from newsmon.classify.topics import load_topics
from newsmon.db import open_engine
from tests.conftest import (
    ROOT,
    Broker,
    LoopbackServer,
    Reply,
    free_port,
    scratch_database,
    start_tansu,
)
from tests.test_e2e import SECRET, verify_standard_webhook, write_seeds

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.postgres]

PUBLISH_TIMEOUT_S = 3.0
SHUTDOWN_TIMEOUT_S = 5.0
SESSION_TIMEOUT_S = 10.0  # services/kafka.py: a dead member's partitions move after this

ON_TOPIC = [
    ("Border agents seize record haul of fentanyl pills at Nogales crossing",
     "Customs officers found two million fentanyl pills hidden in a tractor-trailer; the "
     "Sinaloa cartel made them in clandestine labs from precursor chemicals bought in China."),
    ("Fentanyl overdose deaths climb again, CDC says",
     "Synthetic opioids such as fentanyl drove most of the more than 100,000 overdose deaths "
     "in the United States last year, and counterfeit pills are killing teenagers."),
    ("Mexican troops arrest cartel leader in Culiacan raid",
     "Mexican security forces captured a Sinaloa cartel boss wanted for drug trafficking "
     "after a gunfight in Culiacan; soldiers detained several of his bodyguards."),
    ("Mexico extradites alleged cartel kingpin to the United States",
     "The alleged Sinaloa cartel leader was flown to New York to face fentanyl trafficking "
     "charges after Mexico approved Washington's extradition request."),
    ("Biden and Lopez Obrador meet in Mexico City to discuss migration and fentanyl",
     "At the North American Leaders' Summit, President Biden and Mexican President Andres "
     "Manuel Lopez Obrador agreed to work together against fentanyl trafficking and migration."),
    ("Chinese firms charged with shipping fentanyl precursors to Mexican cartels",
     "Federal prosecutors charged companies that sold precursor chemicals used by Mexican "
     "cartels to make fentanyl that is smuggled across the southern border."),
]  # fmt: skip

UNRELATED = [
    "The council voted to add protected bike lanes on three avenues, with work starting in spring.",
    "Chipmakers led a broad rally as investors bet on lower interest rates next year.",
    "This moist lemon cake needs one bowl, five ingredients and forty minutes in the oven.",
    "A last-second goal sealed the title in front of a sold-out home crowd on Sunday night.",
    "Forecasters expect heavy snow in the mountains and a sunny, mild weekend on the coast.",
    "The museum reopened its dinosaur hall after a two-year renovation of the skeletons.",
    "A new phone promises a week of battery life and a camera that sees in the dark.",
    "Volunteers planted four hundred oak trees along the river to shade the walking trail.",
    "The orchestra announced a summer season of open-air concerts in the botanical garden.",
    "Researchers found that a daily walk of twenty minutes improves sleep in older adults.",
]


def unrelated_item(i: int, sentences: int) -> tuple[str, str]:
    """An everyday story, ``sentences`` long, that matches no seed topic."""
    body = " ".join(UNRELATED[(i + k) % len(UNRELATED)] for k in range(sentences))
    return f"Around town, story {i}: {UNRELATED[i % len(UNRELATED)][:40]}", body


def feed_xml(items: list[tuple[str, str]]) -> bytes:
    """An RSS document of ``(title, description)`` items, each with its own link."""
    body = "".join(
        f"<item><title>{escape(t)}</title><link>{item_link(t)}</link>"
        f"<description>{escape(d)}</description></item>"
        for t, d in items
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?><rss version="2.0"><channel>'
        f"<title>Loopback news</title><link>https://news.example.org/</link>{body}"
        "</channel></rss>"
    ).encode()


def item_link(title: str) -> str:
    return "https://news.example.org/" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def expected_alerts(embedder: Any, items: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """(link, topic) of every match the seed topics give, scored in this process."""
    indexes = index_topics(load_topics(ROOT / "seeds/topics.toml"), embedder)
    embedded = embed_articles(items, embedder)
    return {
        (item_link(title), score.topic)
        for (title, _), article in zip(items, embedded, strict=True)
        for score in score_embedded(article, indexes)
        if score.matched
    }


def deliveries(server: LoopbackServer) -> Counter[tuple[str, str]]:
    """Verified webhook deliveries per (article link, topic)."""
    counts: Counter[tuple[str, str]] = Counter()
    for request in server.requests_to("/hook"):
        data = verify_standard_webhook(request)["data"]
        counts[(data["article"]["link"], data["topic"])] += 1  # type: ignore[index]
    return counts


async def until(
    condition: Callable[[], Any], timeout: float, what: Callable[[], str] | str
) -> float:
    """Wait until ``condition()`` (or what it returns, awaited) is true; returns the seconds
    it took."""
    start = time.monotonic()
    while not ((await r) if asyncio.iscoroutine(r := condition()) else r):
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout:g} s: {what() if callable(what) else what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def settle_deliveries(server: LoopbackServer, expected: set[tuple[str, str]]) -> None:
    """Wait for every expected delivery, then a while longer for any duplicate or stray one."""
    await until(
        lambda: set(deliveries(server)) >= expected,
        120,
        lambda: f"missing deliveries: {sorted(expected - set(deliveries(server)))}",
    )
    await asyncio.sleep(2.0)


# Processes --------------------------------------------------------------------------------------


@dataclass
class Service:
    role: str
    log: Path
    port: int
    process: subprocess.Popen[bytes]
    killed: bool = False

    def lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()

    def batches(self) -> list[tuple[int, set[int]]]:
        """(articles, partitions) of every batch this classify process started on."""
        found = []
        for line in self.lines():
            if m := re.search(r"classifying (\d+) article\(s\) from (.*)", line):
                parts = {int(p) for p in re.findall(r"articles\.fetched\[(\d+)\]", m.group(2))}
                found.append((int(m.group(1)), parts))
        return found

    def assigned(self) -> set[int] | None:
        """The partitions of articles.fetched last assigned to this process, if any yet."""
        latest = None
        for line in self.lines():
            if "Setting newly assigned partitions" in line and "for group classify" in line:
                latest = {int(p) for p in re.findall(r"partition=(\d+)", line)}
        return latest

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Fleet:
    """The newsmon processes of one test; whatever is left running at the end is killed."""

    tmp_path: Path
    env: dict[str, str]
    services: list[Service] = field(default_factory=list)

    def start(self, role: str, **env: str) -> Service:
        name = f"{role}-{sum(s.role == role for s in self.services)}"
        log = self.tmp_path / f"{name}.log"
        port = free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "newsmon.cli", role],
                env={**self.env, "NEWSMON_HTTP_PORT": str(port), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(role, log, port, process)
        self.services.append(service)
        return service

    def logs(self) -> str:
        return "\n".join(f"--- {s.log.name}\n{s.log.read_text()[-3000:]}" for s in self.services)

    def check_alive(self) -> None:
        for s in self.services:
            assert s.killed or s.process.poll() is None, f"{s.log.name} exited:\n{self.logs()}"

    def terminate(self, deadline: float) -> dict[str, tuple[int, float]]:
        """SIGTERM every live process; (exit code, seconds to exit) of each."""
        live = [s for s in self.services if not s.killed]
        start = time.monotonic()
        for s in live:
            s.process.send_signal(signal.SIGTERM)
        outcome = {}
        for s in live:
            try:
                code = s.process.wait(timeout=max(0.1, deadline - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                code = -999
            outcome[s.log.name] = (code, round(time.monotonic() - start, 2))
        return outcome

    def kill_all(self) -> None:
        for s in self.services:
            if s.process.poll() is None:
                s.process.kill()
            s.process.wait()


@pytest.fixture
def database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, shared by its processes, dropped afterwards."""
    with scratch_database("newsmon_dist") as url:
        yield url


@pytest.fixture
async def fleet(
    tmp_path: Path, http_server: LoopbackServer, kafka: Broker, database: str
) -> AsyncIterator[Fleet]:
    http_server.routes["/hook"] = Reply(204)
    env = {
        **os.environ,
        **write_seeds(tmp_path, http_server, SECRET),
        "NEWSMON_DATABASE_URL": database,
        "NEWSMON_BUS_URL": f"{kafka.url}?partitions=4&publish_timeout_s={PUBLISH_TIMEOUT_S}",
        "NEWSMON_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
        "NEWSMON_PARSE_WORKERS": "0",
    }
    running = Fleet(tmp_path, env)
    try:
        yield running
    finally:
        running.kill_all()


async def classified_articles(database: str) -> int:
    """Articles the classify processes recorded in the shared store."""
    eng = open_engine(database)
    try:
        async with eng.connect() as conn:
            return int((await conn.scalar(select(func.count()).select_from(recent_table))) or 0)
    finally:
        await eng.dispose()


async def start_two_classifiers(fleet: Fleet, **env: str) -> tuple[Service, Service]:
    """Alerts and two classify members, each holding two of the four partitions."""
    fleet.start("alerts")
    first = fleet.start("classify", **env)
    # The second starts once the first has created and seeded the tables: two processes
    # creating the same tables at the same moment race in PostgreSQL's catalog.
    await until(lambda: any("topics loaded" in line for line in first.lines()), 90, fleet.logs)
    second = fleet.start("classify", **env)

    def split() -> bool:
        fleet.check_alive()
        a, b = first.assigned(), second.assigned()
        return bool(a and b and not a & b and a | b == {0, 1, 2, 3})

    await until(split, 90, lambda: f"partitions not split:\n{fleet.logs()}")
    return first, second


# The tests --------------------------------------------------------------------------------------


async def test_two_classify_members_split_partitions_and_alert_exactly_once(
    fleet: Fleet, http_server: LoopbackServer, embedder: Any, database: str
) -> None:
    items = ON_TOPIC + [unrelated_item(i, 3) for i in range(36)]
    http_server.routes["/feed.xml"] = Reply(200, feed_xml(items))
    expected = expected_alerts(embedder, items)
    assert len(expected) >= len(ON_TOPIC)  # the on-topic items do match

    first, second = await start_two_classifiers(fleet)
    fleet.start("ingest")
    await settle_deliveries(http_server, expected)
    fleet.check_alive()

    counts = deliveries(http_server)
    assert set(counts) == expected, "a match is missing or a non-match was alerted"
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    # No article lost: each was classified and recorded, matched or not.
    assert await classified_articles(database) == len(items)
    # Both members did work, each on its own partitions.
    work = {s.log.name: s.batches() for s in (first, second)}
    for name, batches in work.items():
        assert batches, f"{name} classified nothing"
    assert not set().union(*(p for _, p in work[first.log.name])) & set().union(
        *(p for _, p in work[second.log.name])
    )
    per_member = {name: sum(n for n, _ in batches) for name, batches in work.items()}
    assert sum(per_member.values()) == len(items)  # no rebalance, so no redelivery

    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\n{len(items)} articles, {len(expected)} expected alerts, "
        f"{sum(counts.values())} delivered; classified per member {per_member}; exits {outcome}"
    )


async def test_classify_killed_mid_batch_survivor_takes_over_without_duplicates(
    fleet: Fleet, http_server: LoopbackServer, embedder: Any, database: str
) -> None:
    # Long articles, all in one batch per member: the victim is still embedding when killed.
    items = ON_TOPIC + [unrelated_item(i, 40) for i in range(54)]
    http_server.routes["/feed.xml"] = Reply(200, feed_xml(items))
    expected = expected_alerts(embedder, items)

    members = await start_two_classifiers(
        fleet, NEWSMON_CLASSIFY_BATCH_SIZE="256", NEWSMON_CLASSIFY_BATCH_WAIT_S="1.0"
    )
    fleet.start("ingest")
    await until(lambda: any(m.batches() for m in members), 60, fleet.logs)
    victim = next(m for m in members if m.batches())
    victim.process.kill()
    killed_at = time.monotonic()
    victim.process.wait()
    victim.killed = True
    survivor = next(m for m in members if m is not victim)
    [(victim_articles, victim_partitions)] = victim.batches()  # the one it never committed

    def redone() -> int:
        return sum(n for n, parts in survivor.batches() if parts & victim_partitions)

    await until(lambda: redone() > 0, 60, fleet.logs)
    takeover_s = time.monotonic() - killed_at
    await settle_deliveries(http_server, expected)
    fleet.check_alive()

    counts = deliveries(http_server)
    assert set(counts) == expected
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert await classified_articles(database) == len(items)
    # What the victim had taken but not committed was delivered again, to the survivor.
    assert redone() >= victim_articles
    assert SESSION_TIMEOUT_S * 0.5 < takeover_s < SESSION_TIMEOUT_S + 40

    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\nvictim killed holding {victim_articles} uncommitted article(s) of partitions "
        f"{sorted(victim_partitions)}; survivor took over after {takeover_s:.1f} s and redid "
        f"{redone()}; {len(expected)} expected alerts, {sum(counts.values())} delivered"
    )


def stop_broker(broker: Broker) -> None:
    broker.process.terminate()
    broker.process.wait(timeout=10)


def restart_broker(broker: Broker) -> None:
    """A fresh (empty: memory only) Tansu on the same port; the fixture stops it at the end."""
    broker.process = start_tansu(broker.port)


async def test_broker_restart_fails_fast_reports_unready_and_flow_resumes(
    fleet: Fleet, http_server: LoopbackServer, embedder: Any, kafka: Broker
) -> None:
    before = ON_TOPIC[:2] + [unrelated_item(i, 3) for i in range(4)]
    after = ON_TOPIC[2:4] + [unrelated_item(i, 3) for i in range(4, 8)]
    http_server.routes["/feed.xml"] = Reply(200, feed_xml(before))
    expected_before = expected_alerts(embedder, before)
    expected_after = expected_alerts(embedder, after)

    services = [fleet.start("alerts"), fleet.start("classify")]
    await until(lambda: services[1].assigned(), 90, fleet.logs)
    services.append(fleet.start("ingest"))
    ingest = services[-1]
    await settle_deliveries(http_server, expected_before)

    probe = open_bus(fleet.env["NEWSMON_BUS_URL"], client_id="probe")
    await probe.start()
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            await probe.publish("probe", b"before")
            stop_broker(kafka)

            # Publishing fails within the bound, rather than hanging.
            started = time.monotonic()
            with pytest.raises(BusError, match="publish to probe"):
                await probe.publish("probe", b"during")
            publish_fail_s = time.monotonic() - started
            assert publish_fail_s < PUBLISH_TIMEOUT_S + 5

            # Every process is alive but reports itself not ready.
            unready_s = await until(lambda: all_ready(client, services, 503), 30, fleet.logs)
            fleet.check_alive()
            assert await all_ready(client, services, 200, path="/healthz")

            restart_broker(kafka)
            ready_s = await until(lambda: all_ready(client, services, 200), 60, fleet.logs)
        finally:
            await probe.close()

        # The topics are back (the broker creates them on first use) and the groups rejoin:
        # what appears in the feed now flows end to end; nothing seen before is published again.
        http_server.routes["/feed.xml"] = Reply(200, feed_xml(before + after))
        poll = await client.post(ingest.url("/feeds/1/poll"))
        assert poll.status_code == 200, poll.text
        await settle_deliveries(http_server, expected_before | expected_after)
        fleet.check_alive()
        feed = (await client.get(ingest.url("/feeds/1"))).json()
        assert feed["items_published"] == len(before) + len(after)

    counts = deliveries(http_server)
    assert set(counts) == expected_before | expected_after
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]

    # With the broker gone again, SIGTERM still stops every process within the deadline.
    stop_broker(kafka)
    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\npublish to a dead broker failed after {publish_fail_s:.2f} s "
        f"(publish_timeout_s={PUBLISH_TIMEOUT_S}); all /readyz 503 after {unready_s:.1f} s; "
        f"ready again {ready_s:.1f} s after the restart; {sum(counts.values())} deliveries for "
        f"{len(expected_before | expected_after)} expected; exits with the broker down {outcome}"
    )


async def all_ready(
    client: httpx.AsyncClient, services: list[Service], status: int, path: str = "/readyz"
) -> bool:
    """Whether every service answers ``path`` with ``status``."""
    for s in services:
        try:
            if (await client.get(s.url(path))).status_code != status:
                return False
        except httpx.HTTPError:
            return False
    return True
