"""Distributed mode: ``newsmon ingest|classify|alerts`` as real processes on one Kafka-protocol
broker (Tansu) and one fresh PostgreSQL database, under scale-out, a crash and a broker restart.

Each test starts its processes together, as an orchestrator would: they race to migrate the
empty database, and must all come up on a schema built once.

"Exactly once in effect" is counted where a subscriber sees it: verified webhook deliveries per
(article, topic) at a loopback receiver, against the topic each test article is written about.
What the processes do is read from what they expose (``/readyz``, ``/metrics``), from the broker
(the classify consumer group) and from the shared database; never from their logs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

import newsmon.migrations
from newsmon.bus import BusError, open_bus
from newsmon.classify.store import recent_table
from newsmon.db import open_engine
from tests.helpers import (
    ROOT,
    Broker,
    LoopbackServer,
    Reply,
    free_port,
    parse_metrics,
    scratch_database,
    verify_standard_webhook,
    write_seeds,
)

pytestmark = [pytest.mark.kafka, pytest.mark.model, pytest.mark.postgres]

SECRET = "whsec_" + base64.b64encode(b"distributed-test-secret-0123456789").decode()
PUBLISH_TIMEOUT_S = 3.0
SHUTDOWN_TIMEOUT_S = 5.0
SESSION_TIMEOUT_S = 10.0  # the bus's Kafka consumers: a dead member's partitions move after this
GROUP = "classify"  # the consumer group of the classify processes
CLASSIFIED = "newsmon_articles_classified_total"
# Set once a classify process has taken messages from articles.fetched, before it classifies them.
LAG = f'newsmon_consumer_lag{{group="{GROUP}",topic="articles.fetched"}}'

# The alerts due are plain from the text: each item is about one seed topic and names none of
# the terms the other three require (``require_any`` in seeds/topics.toml), and the everyday
# stories name none of any topic's; test_the_expected_alerts_follow_from_the_text checks this.
ON_TOPIC = [
    ("fentanyl",
     "Border agents seize record haul of fentanyl pills at Nogales crossing",
     "Customs officers found two million counterfeit fentanyl pills hidden in a tractor-trailer; "
     "investigators say they were pressed in clandestine labs from precursor chemicals."),
    ("fentanyl",
     "Fentanyl overdose deaths climb again, CDC says",
     "Synthetic opioids such as fentanyl drove most of the more than 100,000 overdose deaths "
     "in the United States last year, and counterfeit pills are killing teenagers."),
    ("cartel-arrests",
     "Authorities arrest a top leader of the Jalisco New Generation Cartel",
     "Soldiers captured the cartel boss, one of the most wanted drug lords, in a dawn raid in "
     "Guadalajara; he is accused of running drug shipments north."),
    ("cartel-arrests",
     "Soldiers capture Gulf Clan drug lord in Colombian jungle raid",
     "Colombia's most wanted drug lord, the leader of the Gulf Clan, was captured by soldiers "
     "and police in a jungle raid after years on the run."),
    ("extradition",
     "Spain extradites former banker to the United States to face fraud charges",
     "A Spanish court approved the extradition of the former bank executive, who was flown to "
     "New York to stand trial on wire fraud and money laundering charges."),
    ("us-mexico-summit",
     "Biden and Lopez Obrador meet in Mexico City to discuss migration and trade",
     "At the North American Leaders' Summit, President Biden and Mexican President Andres "
     "Manuel Lopez Obrador agreed to work together on migration, trade and security."),
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


def on_topic(start: int = 0, stop: int | None = None) -> list[tuple[str, str]]:
    return [(title, body) for _, title, body in ON_TOPIC[start:stop]]


def expected_alerts(start: int = 0, stop: int | None = None) -> set[tuple[str, str]]:
    """(link, topic) of the alert each of ``ON_TOPIC[start:stop]`` is written to get."""
    return {(item_link(title), topic) for topic, title, _ in ON_TOPIC[start:stop]}


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


def deliveries(server: LoopbackServer) -> Counter[tuple[str, str]]:
    """Verified webhook deliveries per (article link, topic)."""
    counts: Counter[tuple[str, str]] = Counter()
    for request in server.requests_to("/hook"):
        data = verify_standard_webhook(request, SECRET)["data"]
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


async def _equals(value: Awaitable[Any], wanted: Any) -> bool:
    return await value == wanted


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
    name: str
    log: Path  # read only to explain a failure
    port: int
    process: subprocess.Popen[bytes]
    killed: bool = False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@dataclass
class Fleet:
    """The newsmon processes of one test; whatever is left running at the end is killed."""

    tmp_path: Path
    env: dict[str, str]
    client: httpx.AsyncClient
    services: list[Service] = field(default_factory=list)

    def start(self, role: str, **env: str) -> Service:
        name = f"{role}-{sum(s.name.startswith(f'{role}-') for s in self.services)}"
        log = self.tmp_path / f"{name}.log"
        port = free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "newsmon.cli", role],
                env={**self.env, "NEWSMON_HTTP_PORT": str(port), **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, log, port, process)
        self.services.append(service)
        return service

    async def start_together(self, *roles: str, **env: str) -> list[Service]:
        """All of ``roles`` at once (no one waits for another), then until every one is ready."""
        started = [self.start(role, **env) for role in roles]

        async def all_up() -> bool:
            self.check_alive()
            return await all_ready(self.client, started, 200)

        await until(all_up, 180, lambda: f"not all ready:\n{self.logs()}")
        return started

    async def metrics(self, service: Service) -> dict[str, float]:
        response = await self.client.get(service.url("/metrics"))
        response.raise_for_status()
        return parse_metrics(response.text)

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
            outcome[s.name] = (code, round(time.monotonic() - start, 2))
        return outcome

    def kill_all(self) -> None:
        for s in self.services:
            if s.process.poll() is None:
                s.process.kill()
            s.process.wait()


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


async def poll_feed(client: httpx.AsyncClient, ingest: Service) -> None:
    """Have ingest poll the test's one feed now (the default schedule is minutes away)."""
    response = await client.post(ingest.url("/feeds/1/poll"))
    assert response.status_code == 200, response.text


@dataclass
class ConsumerGroup:
    """The broker's view of a consumer group."""

    admin: AIOKafkaAdminClient
    group: str

    async def state(self) -> tuple[str, int]:
        """The group's state (Stable once its members have their partitions) and member count."""
        [response] = await self.admin.describe_consumer_groups([self.group])
        _error, _group, state, _kind, _protocol, members, *_ = response.groups[0]
        return state, len(members)


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
        "NEWSMON_FEED_ALLOW_PRIVATE": "true",  # the feed is served on loopback
    }
    async with httpx.AsyncClient(timeout=10) as client:
        running = Fleet(tmp_path, env, client)
        try:
            yield running
        finally:
            running.kill_all()


@pytest.fixture
async def classify_group(kafka: Broker) -> AsyncIterator[ConsumerGroup]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        yield ConsumerGroup(admin, GROUP)
    finally:
        await admin.close()


async def classified_articles(database: str) -> int:
    """Articles the classify processes recorded in the shared store."""
    eng = open_engine(database)
    try:
        async with eng.connect() as conn:
            return int((await conn.scalar(select(func.count()).select_from(recent_table))) or 0)
    finally:
        await eng.dispose()


def head_revision() -> str | None:
    """The newest revision among the migration scripts."""
    config = Config()
    config.set_main_option("script_location", str(Path(newsmon.migrations.__file__).parent))
    return ScriptDirectory.from_config(config).get_current_head()


async def check_migrated_once(database: str) -> None:
    """The processes that raced to migrate left one schema, at the newest revision, built by
    one transaction: one of them migrated, the others found the work done."""
    eng = open_engine(database)
    try:
        async with eng.connect() as conn:
            revisions = (await conn.scalars(text("SELECT version_num FROM alembic_version"))).all()
            # The transaction that created each table (pg_class rows: xmin).
            builders = (
                await conn.scalars(
                    text(
                        "SELECT DISTINCT xmin::text FROM pg_class "
                        "WHERE relnamespace = 'public'::regnamespace AND relkind = 'r'"
                    )
                )
            ).all()
    finally:
        await eng.dispose()
    assert revisions == [head_revision()]
    assert len(builders) == 1, f"the tables were created by {len(builders)} transactions"


# The tests --------------------------------------------------------------------------------------


def test_the_expected_alerts_follow_from_the_text() -> None:
    """The premise of the expectations above, against the seed topics' keyword constraints."""
    topics = tomllib.loads((ROOT / "seeds/topics.toml").read_text())["topics"]
    required = {t["slug"]: t.get("require_any", []) for t in topics}
    assert set(required) == {topic for topic, _, _ in ON_TOPIC}
    assert all(required.values()), "every seed topic requires a keyword"

    def names(topic: str, text: str) -> bool:
        terms = [re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w) + r"\b"
                 for w in required[topic]]  # fmt: skip
        return re.search(r"\b(?:" + "|".join(terms) + ")", text, re.IGNORECASE) is not None

    for topic, title, body in ON_TOPIC:
        assert {t for t in required if names(t, f"{title}\n{body}")} == {topic}, title
    for sentence in UNRELATED:
        assert not any(names(t, sentence) for t in required), sentence


async def test_two_classify_members_split_the_work_and_alert_exactly_once(
    fleet: Fleet, http_server: LoopbackServer, classify_group: ConsumerGroup, database: str
) -> None:
    items = on_topic() + [unrelated_item(i, 3) for i in range(36)]
    expected = expected_alerts()
    # Nothing in the feed until both members are in the group: no work, so no rebalance, is
    # under way when the articles arrive.
    http_server.routes["/feed.xml"] = Reply(200, feed_xml([]))
    _, first, second, ingest = await fleet.start_together(
        "alerts", "classify", "classify", "ingest"
    )
    await check_migrated_once(database)
    await until(
        lambda: _equals(classify_group.state(), ("Stable", 2)),
        60,
        lambda: f"the classify group never had two members:\n{fleet.logs()}",
    )

    http_server.routes["/feed.xml"] = Reply(200, feed_xml(items))
    await poll_feed(fleet.client, ingest)
    await settle_deliveries(http_server, expected)
    fleet.check_alive()

    counts = deliveries(http_server)
    assert set(counts) == expected, "a match is missing or a non-match was alerted"
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    # No article lost: each was classified and recorded, matched or not.
    assert await classified_articles(database) == len(items)
    # Both members did work, and no article was classified twice: each took its own partitions.
    per_member = {s.name: (await fleet.metrics(s)).get(CLASSIFIED, 0) for s in (first, second)}
    assert all(per_member.values()), f"a member classified nothing: {per_member}"
    assert sum(per_member.values()) == len(items)  # no rebalance, so no redelivery
    assert await classify_group.state() == ("Stable", 2)

    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\n{len(items)} articles, {len(expected)} expected alerts, "
        f"{sum(counts.values())} delivered; classified per member {per_member}; exits {outcome}"
    )


async def test_classify_killed_mid_batch_survivor_takes_over_without_duplicates(
    fleet: Fleet, http_server: LoopbackServer, classify_group: ConsumerGroup, database: str
) -> None:
    # Long articles, all in one batch per member: the victim is still embedding when killed
    # (which the test checks), for seconds, and the survivor is done with its own well before
    # it takes the victim's partitions.
    items = on_topic() + [unrelated_item(i, 20) for i in range(54)]
    expected = expected_alerts()
    http_server.routes["/feed.xml"] = Reply(200, feed_xml([]))
    _, *members, ingest = await fleet.start_together(
        "alerts", "classify", "classify", "ingest",
        NEWSMON_CLASSIFY_BATCH_SIZE="256", NEWSMON_CLASSIFY_BATCH_WAIT_S="1.0",
    )  # fmt: skip
    await check_migrated_once(database)
    await until(
        lambda: _equals(classify_group.state(), ("Stable", 2)),
        60,
        lambda: f"the classify group never had two members:\n{fleet.logs()}",
    )

    http_server.routes["/feed.xml"] = Reply(200, feed_xml(items))
    await poll_feed(fleet.client, ingest)
    holding: dict[str, dict[str, float]] = {}

    async def a_member_holds_a_batch() -> bool:
        for member in members:
            metrics = await fleet.metrics(member)
            if LAG in metrics:
                holding[member.name] = metrics
                return True
        return False

    await until(a_member_holds_a_batch, 60, fleet.logs)
    [(name, seen)] = holding.items()
    victim = next(m for m in members if m.name == name)
    survivor = next(m for m in members if m is not victim)
    # It has taken its batch and classified none of it: killed now, it has committed nothing.
    assert seen.get(CLASSIFIED, 0) == 0, seen
    victim.process.kill()
    victim.process.wait()
    victim.killed = True

    # The broker notices the silence and gives the survivor every partition.
    takeover_s = await until(
        lambda: _equals(classify_group.state(), ("Stable", 1)),
        SESSION_TIMEOUT_S + 40,
        lambda: f"the victim's partitions never moved:\n{fleet.logs()}",
    )
    await settle_deliveries(http_server, expected)
    fleet.check_alive()

    counts = deliveries(http_server)
    assert set(counts) == expected
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
    assert await classified_articles(database) == len(items)
    # What the victim had taken but not committed was delivered again, to the survivor: it
    # classified every article, its own and the victim's.
    redone = (await fleet.metrics(survivor)).get(CLASSIFIED, 0)
    assert redone >= len(items)
    assert SESSION_TIMEOUT_S * 0.5 < takeover_s < SESSION_TIMEOUT_S + 40

    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\nvictim killed holding a batch it had not classified; its partitions moved after "
        f"{takeover_s:.1f} s; the survivor classified {redone:g} of {len(items)} articles; "
        f"{len(expected)} expected alerts, {sum(counts.values())} delivered"
    )


async def test_broker_restart_fails_fast_reports_unready_and_flow_resumes(
    fleet: Fleet, http_server: LoopbackServer, kafka: Broker, database: str
) -> None:
    before = on_topic(0, 2) + [unrelated_item(i, 3) for i in range(4)]
    after = on_topic(2, 4) + [unrelated_item(i, 3) for i in range(4, 8)]
    expected_before, expected_after = expected_alerts(0, 2), expected_alerts(2, 4)
    http_server.routes["/feed.xml"] = Reply(200, feed_xml(before))

    services = await fleet.start_together("alerts", "classify", "ingest")
    await check_migrated_once(database)
    ingest = services[-1]
    await settle_deliveries(http_server, expected_before)

    client = fleet.client
    probe = open_bus(fleet.env["NEWSMON_BUS_URL"], client_id="probe")
    await probe.start()
    try:
        await probe.publish("probe", b"before")
        kafka.stop()

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

        kafka.restart()  # empty: memory only
        ready_s = await until(lambda: all_ready(client, services, 200), 60, fleet.logs)
    finally:
        await probe.close()

    # The topics are back (the broker creates them on first use) and the groups rejoin: what
    # appears in the feed now flows end to end; nothing seen before is published again.
    http_server.routes["/feed.xml"] = Reply(200, feed_xml(before + after))

    async def published_all() -> bool:
        # Right after the restart a publish may still fail (the broker recreating its topics):
        # ingest then records "bus unavailable", marks nothing seen, and the next poll
        # publishes it all. The test polls as the schedule would, only sooner.
        await poll_feed(client, ingest)
        feed = (await client.get(ingest.url("/feeds/1"))).json()
        if feed["items_published"] == len(before) + len(after):
            return True
        await asyncio.sleep(1)  # as a backoff would, only shorter
        return False

    await until(published_all, 60, fleet.logs)
    await settle_deliveries(http_server, expected_before | expected_after)
    fleet.check_alive()
    feed = (await client.get(ingest.url("/feeds/1"))).json()
    assert feed["items_published"] == len(before) + len(after)

    counts = deliveries(http_server)
    assert set(counts) == expected_before | expected_after
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]

    # With the broker gone again, SIGTERM still stops every process within the deadline.
    kafka.stop()
    outcome = fleet.terminate(SHUTDOWN_TIMEOUT_S + 15)
    assert {code for code, _ in outcome.values()} == {0}, (outcome, fleet.logs())
    print(
        f"\npublish to a dead broker failed after {publish_fail_s:.2f} s "
        f"(publish_timeout_s={PUBLISH_TIMEOUT_S}); all /readyz 503 after {unready_s:.1f} s; "
        f"ready again {ready_s:.1f} s after the restart; {sum(counts.values())} deliveries for "
        f"{len(expected_before | expected_after)} expected; exits with the broker down {outcome}"
    )
