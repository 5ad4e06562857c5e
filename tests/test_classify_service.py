"""The classify service's shell: batches off the bus, dead letters, the store, topic changes.

A small fake embedder (our own boundary) keeps these fast; the real model is exercised by
test_seed_fixture.py, test_classify_model.py and test_e2e.py. The store is real (SQLite and
PostgreSQL through the ``engine`` fixture), and so is the bus (memory, and Tansu for Kafka).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from newsmon.bus import Bus, MemoryBus, Message, open_bus
from newsmon.classify import store
from newsmon.classify.routes import build_router
from newsmon.classify.service import ClassifyService
from newsmon.classify.topics import Topic, stored_topic
from newsmon.events import (
    ARTICLES_FETCHED,
    ARTICLES_FETCHED_DLQ,
    ARTICLES_MATCHED,
    Article,
    ArticleFetched,
    ArticleMatched,
)
from newsmon.settings import Settings
from tests.helpers import WORD_TOPIC, WordEmbedder

TOPIC = WORD_TOPIC
SETTINGS = Settings(classify_retry_delay_s=0.0, classify_batch_wait_s=0.0)


def fetched(article_id: str, title: str, text: str = "") -> ArticleFetched:
    return ArticleFetched(
        event_id=article_id,
        article=Article(article_id=article_id, feed_url="https://f/", title=title, summary=text),
    )


def message(event: ArticleFetched | bytes, offset: int) -> Message:
    value = event if isinstance(event, bytes) else event.encode()
    return Message(ARTICLES_FETCHED, 0, offset, None, value)


async def drain(bus: Bus, topic: str, group: str = "test") -> list[Message]:
    async with bus.consumer([topic], group) as consumer:
        return await consumer.poll(100, timeout=0.1)


async def published(bus: MemoryBus) -> list[ArticleMatched]:
    return [ArticleMatched.decode(m.value) for m in await drain(bus, ARTICLES_MATCHED)]


async def started(
    engine: Any, bus: Bus | None = None, embedder: WordEmbedder | None = None, **settings: Any
) -> ClassifyService:
    service = ClassifyService(
        SETTINGS.model_copy(update=settings),
        bus or MemoryBus(),
        engine,
        embedder or WordEmbedder(),
        [TOPIC],
    )
    await service.start()
    return service


async def test_only_matching_articles_are_published_with_every_topic_score(engine: Any) -> None:
    service = await started(engine)
    await service.handle_batch(
        [message(fetched("a", "Fentanyl seized at border"), 0), message(fetched("b", "Weather"), 1)]
    )
    [event] = await published(service.bus)  # type: ignore[arg-type]
    assert event.article.article_id == "a"
    [score] = event.scores
    assert score.matched and score.topic == "fentanyl" and score.topic_version == 1
    assert score.evidence.passage == "Fentanyl seized at border"
    page = await store.list_matches(
        engine, topic="fentanyl", since=None, until=None, limit=10, offset=0
    )
    assert [m["article_id"] for m in page.items] == ["a"]
    assert page.items[0]["topic_version"] == 1
    assert {r.article_id for r in await store.recent_articles(engine, 10)} == {"a", "b"}


async def test_a_redelivered_article_yields_the_same_event_id_and_one_match(engine: Any) -> None:
    service = await started(engine)
    event = fetched("a", "fentanyl")
    await service.handle_batch([message(event, 0)])
    await service.handle_batch([message(event, 0)])
    first, second = await published(service.bus)  # type: ignore[arg-type]
    assert first.event_id == second.event_id
    page = await store.list_matches(engine, topic=None, since=None, until=None, limit=10, offset=0)
    assert page.total == 1


async def test_bad_messages_are_dead_lettered_with_coordinates_and_the_rest_flows(
    engine: Any, caplog: pytest.LogCaptureFixture
) -> None:
    embedder = WordEmbedder(fail_on="poison")
    service = await started(engine, embedder=embedder, classify_max_attempts=3)
    await service.handle_batch(
        [
            message(b"not json", 3),
            message(b'{"type": "article.fetched", "data": "\xff"}'[:-3] + b'\xff"}', 4),
            message(fetched("empty", "   ", "  \n "), 5),
            message(fetched("poison", "fentanyl poison"), 6),
            message(fetched("good", "fentanyl news"), 7),
        ]
    )
    assert [e.article.article_id for e in await published(service.bus)] == ["good"]  # type: ignore[arg-type]
    dead = await drain(service.bus, ARTICLES_FETCHED_DLQ)
    assert [(m.headers["source-offset"], m.headers["attempts"]) for m in dead] == [
        ("3", "1"),
        ("4", "1"),
        ("6", "3"),
    ]
    assert dead[0].value == b"not json"
    assert dead[0].headers["source-topic"] == ARTICLES_FETCHED
    assert dead[0].headers["source-partition"] == "0"
    assert dead[0].headers["error"].startswith("malformed event: not JSON")
    assert "model failure" in dead[2].headers["error"]
    # One batch call, then one call per article, with the poison tried three times.
    assert embedder.calls == 1 + 2 + 3
    assert "articles.fetched[0]@5" in caplog.text  # nothing to score, said so


async def test_micro_batches_wait_briefly_to_fill(engine: Any) -> None:
    bus = MemoryBus()
    service = await started(engine, bus, classify_batch_size=8, classify_batch_wait_s=0.3)

    async def trickle() -> None:
        for i in range(5):
            await bus.publish(ARTICLES_FETCHED, fetched(f"a{i}", "fentanyl").encode())
            await asyncio.sleep(0.02)

    async with bus.consumer([ARTICLES_FETCHED], "classify") as consumer:
        producer = asyncio.create_task(trickle())
        batch, filling_s = await service._next_batch(consumer)
        await producer
        assert len(batch) == 5  # not 1: the batch waited for the others
        assert 0.05 < filling_s < 5  # from the first article until the batch was taken
        started_at = time.monotonic()
        assert await service._next_batch(consumer) == ([], 0.0)
        assert time.monotonic() - started_at < 5


# --- the HTTP API ------------------------------------------------------------------------------


@pytest.fixture
async def api(engine: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ClassifyService]]:
    from fastapi import FastAPI

    service = await started(engine)
    app = FastAPI()
    app.include_router(build_router(service))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://classify") as client:
        yield client, service


NEW_TOPIC = {
    "slug": "weather",
    "name": "Weather",
    "description": "weather reports",
    "examples": ["weather today"],
    "threshold": 0.6,
}


async def test_topics_crud_bumps_versions_and_reloads(api: Any) -> None:
    client, service = api
    assert [t["slug"] for t in (await client.get("/topics")).json()] == ["fentanyl"]
    created = await client.post("/topics", json=NEW_TOPIC)
    assert created.status_code == 201 and created.json()["version"] == 1
    assert {ix.topic.slug for ix in service.indexes} == {"fentanyl", "weather"}

    updated = await client.patch("/topics/weather", json={"threshold": 0.7})
    assert updated.json()["version"] == 2 and updated.json()["threshold"] == 0.7
    disabled = await client.post("/topics/weather/disable")
    assert disabled.json() == {**updated.json(), "enabled": False, "version": 3}
    assert (await client.post("/topics/weather/disable")).json()["version"] == 3  # no change
    assert (await client.post("/topics/weather/enable")).json()["version"] == 4
    assert (await client.get("/topics/weather")).json()["version"] == 4

    assert (await client.delete("/topics/weather")).status_code == 204
    assert (await client.get("/topics/weather")).status_code == 404
    assert {ix.topic.slug for ix in service.indexes} == {"fentanyl"}
    again = await client.post("/topics", json=NEW_TOPIC)
    assert again.json()["version"] == 6  # continues after the tombstone (5)
    assert (await client.patch("/topics/nope", json={"threshold": 0.5})).status_code == 404


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({**NEW_TOPIC, "description": "  "}, "description", "must not be empty"),
        ({**NEW_TOPIC, "threshold": 1.2}, "threshold", "less than or equal to 1"),
        ({**NEW_TOPIC, "slug": "fentanyl"}, "slug", "exists"),
        ({**NEW_TOPIC, "examples": [f"e{i}" for i in range(61)]}, "examples", "at most"),
        ({**NEW_TOPIC, "examples": ["x" * 501]}, "examples", "at most 500"),
        ({**NEW_TOPIC, "colour": "red"}, "colour", "Extra inputs"),
        ({**NEW_TOPIC, "exclude_any": ["from {STATES}"]}, "exclude_any", "unknown place list"),
    ],
)
async def test_invalid_topics_get_422_naming_the_field(
    api: Any, body: dict[str, Any], field: str, message: str
) -> None:
    client, _ = api
    response = await client.post("/topics", json=body)
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["loc"][:2] == ["body", field]
    assert message in error["msg"]


async def test_invalid_update_gets_422_and_changes_nothing(api: Any) -> None:
    client, _ = api
    response = await client.patch("/topics/fentanyl", json={"threshold": -1, "examples": []})
    assert response.status_code == 422
    assert {e["loc"][1] for e in response.json()["detail"]} == {"threshold", "examples"}
    assert (await client.get("/topics/fentanyl")).json()["version"] == 1


async def test_score_endpoint_returns_every_topic_with_evidence(api: Any) -> None:
    client, _ = api
    response = await client.post(
        "/score", json={"title": "Fentanyl seized", "content": "x" * (10 * 1024 * 1024)}
    )
    body = response.json()
    assert response.status_code == 200
    assert body["matches"] == ["fentanyl"] and body["truncated"] is True
    [score] = body["scores"]
    assert score["threshold"] == 0.6 and score["evidence"]["nearest_positive"]
    empty = await client.post("/score", json={"title": " ", "summary": "\n"})
    assert empty.status_code == 422
    assert "nothing to score" in empty.json()["detail"][0]["msg"]
    foreign = await client.post("/score", json={"title": "Глобальная погода", "content": "天气"})
    assert foreign.status_code == 200 and foreign.json()["matches"] == []


async def test_matches_are_filtered_by_topic_and_time_and_paginated(api: Any) -> None:
    client, service = api
    await client.post("/topics", json={**NEW_TOPIC, "threshold": 0.5})
    await service.handle_batch(
        [message(fetched(f"a{i}", f"fentanyl weather {i}"), i) for i in range(5)]
    )
    first = (await client.get("/matches", params={"topic": "fentanyl", "limit": 2})).json()
    assert first["total"] == 5 and len(first["items"]) == 2
    rest = (
        await client.get("/matches", params={"topic": "fentanyl", "limit": 10, "offset": 2})
    ).json()
    ids = [m["article_id"] for m in first["items"] + rest["items"]]
    assert sorted(ids) == [f"a{i}" for i in range(5)]
    assert (await client.get("/matches")).json()["total"] == 10
    later = (await client.get("/matches", params={"since": "2999-01-01T00:00:00Z"})).json()
    assert later["total"] == 0
    earlier = (await client.get("/matches", params={"until": "2000-01-01T00:00:00Z"})).json()
    assert earlier["total"] == 0
    assert first["items"][0]["topic_version"] == 1
    assert (await client.get("/matches", params={"limit": 0})).status_code == 422


async def test_score_reads_the_article_shape_and_refuses_unknown_fields_by_name(api: Any) -> None:
    client, _ = api
    # The body is the longer of content and summary, as for fed articles and newsmon score.
    both = await client.post(
        "/score", json={"title": "x", "summary": "weather", "content": "fentanyl seized again"}
    )
    assert both.status_code == 200 and both.json()["matches"] == ["fentanyl"]
    unknown = await client.post("/score", json={"title": "x", "body": "fentanyl", "text": "y"})
    assert unknown.status_code == 422
    assert {e["loc"][1] for e in unknown.json()["detail"]} == {"body", "text"}


async def test_an_update_that_changes_nothing_keeps_the_version_and_the_embedding(
    api: Any,
) -> None:
    client, service = api
    calls = service.embedder.calls
    same = await client.patch("/topics/fentanyl", json={"threshold": 0.6, "enabled": True})
    assert same.status_code == 200 and same.json()["version"] == 1
    assert (await client.patch("/topics/fentanyl", json={})).json()["version"] == 1
    assert service.embedder.calls == calls  # nothing re-embedded
    changed = await client.patch("/topics/fentanyl", json={"threshold": 0.65})
    assert changed.json()["version"] == 2


async def test_concurrent_creations_of_one_slug_store_one_and_refuse_the_rest(
    engine: Any,
) -> None:
    # Straight at the store: every creation reads the slug as free before any has written.
    weather = Topic.model_validate({**NEW_TOPIC, "version": 1})
    results = await asyncio.gather(
        *(store.create_topic(engine, weather) for _ in range(10)), return_exceptions=True
    )
    assert sum(isinstance(r, Topic) for r in results) == 1
    assert all(isinstance(r, store.TopicConflict) for r in results if not isinstance(r, Topic))


async def test_a_topic_stored_before_term_checks_still_loads(engine: Any) -> None:
    # "cartel *" was a valid term before a * had to end a word: the classify service must still
    # load the topic (one that failed to load would take every topic down with it).
    old = stored_topic({**NEW_TOPIC, "exclude_any": ["cartel *"], "version": 1})
    await store.create_topic(engine, old)
    [loaded] = [t for t in await store.load_topics(engine) if t.slug == "weather"]
    assert loaded.exclude_any == ("cartel *",)
    assert (await store.get_topic(engine, "weather")) == loaded


async def test_concurrent_creations_of_one_slug_give_one_201_and_422s(api: Any) -> None:
    client, _ = api
    answers = await asyncio.gather(*(client.post("/topics", json=NEW_TOPIC) for _ in range(10)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [201] + [422] * 9, codes
    for answer in answers:
        if answer.status_code == 422:
            [error] = answer.json()["detail"]
            assert error["loc"] == ["body", "slug"] and "exists" in error["msg"]


async def test_match_times_are_aware_and_filters_honour_the_utc_offset(api: Any) -> None:
    client, service = api
    await service.handle_batch([message(fetched("a1", "fentanyl"), 0)])
    [item] = (await client.get("/matches")).json()["items"]
    matched_at = datetime.fromisoformat(item["matched_at"])
    assert matched_at.utcoffset() == timedelta(0)
    # One instant, three spellings: each must split the match the same way.
    just_after = matched_at + timedelta(seconds=1)
    spellings = [
        just_after.isoformat(),
        just_after.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat(),
        just_after.astimezone(timezone(timedelta(hours=-7))).isoformat(),
    ]
    for spelled in spellings:
        since = (await client.get("/matches", params={"since": spelled})).json()["total"]
        until = (await client.get("/matches", params={"until": spelled})).json()["total"]
        assert (since, until) == (0, 1), spelled


async def test_preview_replays_a_draft_over_recent_articles(api: Any) -> None:
    client, service = api
    await service.handle_batch(
        [
            message(fetched("hit", "fentanyl seizure"), 0),
            message(fetched("both", "fentanyl football"), 1),
            message(fetched("miss", "weather"), 2),
        ]
    )
    stricter = await client.post("/topics/fentanyl/preview", json={"threshold": 0.95})
    body = stricter.json()
    assert (body["articles"], body["matching_now"], body["matching_with_draft"]) == (3, 2, 1)
    assert [a["article_id"] for a in body["would_stop_matching"]] == ["both"]
    assert body["would_match"] == []
    looser = (await client.post("/topics/fentanyl/preview", json={"threshold": 0.0})).json()
    assert [a["article_id"] for a in looser["would_match"]] == ["miss"]
    keyword = (
        await client.post("/topics/fentanyl/preview", json={"exclude_any": ["football"]})
    ).json()
    [dropped] = keyword["would_stop_matching"]
    assert dropped["evidence"]["rejected_by"] == "mentions the excluded term 'football'"
    # A preview saves nothing.
    assert (await client.get("/topics/fentanyl")).json()["version"] == 1
    bad = await client.post("/topics/fentanyl/preview", json={"threshold": 2})
    assert bad.status_code == 422


async def test_seeds_are_loaded_on_first_start_only(engine: Any) -> None:
    await started(engine)
    await store.save_topic(engine, TOPIC.model_copy(update={"threshold": 0.9}))
    again = await started(engine)
    [index] = again.indexes
    assert index.topic.threshold == 0.9 and index.topic.version == 2


# --- topic changes reach every classify process -------------------------------------------------


async def _two_processes_see_a_change(engine: Any, bus_a: Bus, bus_b: Bus) -> None:
    """``a`` changes a topic (as its API does); ``b``, running, must reload within seconds."""
    a = await started(engine, bus_a)
    b = await started(engine, bus_b)
    stop = asyncio.Event()
    # On one memory bus only one member per group may consume articles, so only b runs there.
    running = (a, b) if bus_a is not bus_b else (b,)
    tasks = [asyncio.create_task(s.run(stop)) for s in running]
    try:
        async with asyncio.timeout(30):
            for s in running:
                await s.following_changes.wait()
        saved = await store.save_topic(engine, TOPIC.model_copy(update={"threshold": 0.77}))
        await a.topic_changed(saved, "updated")
        async with asyncio.timeout(30):
            while b.indexes[0].topic.version != 2:
                await asyncio.sleep(0.05)
        assert b.indexes[0].topic.threshold == 0.77
        assert a.indexes[0].topic.version == 2
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_topic_changes_reach_other_processes_on_memory(engine: Any) -> None:
    bus = MemoryBus()
    await _two_processes_see_a_change(engine, bus, bus)


@pytest.mark.kafka
async def test_topic_changes_reach_other_processes_on_kafka(engine: Any, kafka: Any) -> None:
    buses = [open_bus(f"{kafka.url}?partitions=1", client_id=f"p{i}") for i in range(2)]
    for bus in buses:
        await bus.start()
    try:
        await _two_processes_see_a_change(engine, *buses)
    finally:
        for bus in buses:
            await bus.close()
