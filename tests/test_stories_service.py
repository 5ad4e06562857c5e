"""Stories through the classify service: a stream of matches yields the right stories, every
``article.matched`` carries its story, a redelivery counts once, and ``/stories`` shows them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from newsmon.bus import MemoryBus, Message
from newsmon.classify.routes import build_router
from newsmon.classify.service import ClassifyService
from newsmon.events import ARTICLES_FETCHED, ARTICLES_MATCHED, Article, ArticleFetched
from newsmon.events import ArticleMatched as Matched
from newsmon.settings import Settings
from tests.helpers import WORD_TOPIC, WordEmbedder

T0 = datetime(2022, 11, 1, 9, tzinfo=UTC)
SETTINGS = Settings(classify_retry_delay_s=0.0, classify_batch_wait_s=0.0)


def fetched(article_id: str, title: str, text: str = "", *, hours: float = 0) -> ArticleFetched:
    at = T0 + timedelta(hours=hours)
    return ArticleFetched(
        event_id=f"fetched-{article_id}",
        article=Article(
            article_id=article_id,
            feed_url=f"https://{article_id}.example/feed",
            feed_title=f"Outlet {article_id}",
            title=title,
            summary=text,
            link=f"https://{article_id}.example/story",
            published=at,
        ),
        fetched_at=at + timedelta(minutes=5),
    )


def messages(*events: ArticleFetched) -> list[Message]:
    return [Message(ARTICLES_FETCHED, 0, i, None, e.encode()) for i, e in enumerate(events)]


async def published(bus: MemoryBus) -> list[Matched]:
    async with bus.consumer([ARTICLES_MATCHED], "test") as consumer:
        return [Matched.decode(m.value) for m in await consumer.poll(100, timeout=0.1)]


@pytest.fixture
async def service(engine: Any) -> ClassifyService:
    classify = ClassifyService(SETTINGS, MemoryBus(), engine, WordEmbedder(), [WORD_TOPIC])
    await classify.start()
    return classify


@pytest.fixture
async def client(service: ClassifyService) -> AsyncIterator[httpx.AsyncClient]:
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(build_router(service))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://classify") as c:
        yield c


# The word embedder sees only which of fentanyl / weather / football a text mentions: every
# fentanyl report is at cosine 1 to every other, and one that also mentions the weather at 0.71.
STREAM = [
    fetched("wire", "Fentanyl seized at Nogales", "Agents in Nogales found fentanyl."),
    fetched("rewrite", "Nogales fentanyl seizure", "Fentanyl was found in Nogales.", hours=2),
    fetched("noise", "Weather today", "Sunny.", hours=3),
    fetched(
        "follow-up",
        "Fentanyl: 3 charged",
        "Three drivers were charged over the Nogales fentanyl.",
        hours=5,
    ),
    fetched(
        "storm",
        "Fentanyl haul in bad weather",
        "In bad weather Nogales agents found fentanyl.",
        hours=6,
    ),
    fetched("month-later", "Fentanyl seized again", "More fentanyl was found.", hours=24 * 40),
]


async def test_a_stream_of_matches_yields_its_stories_on_every_event(
    service: ClassifyService,
) -> None:
    await service.handle_batch(messages(*STREAM[:3]))
    await service.handle_batch(messages(*STREAM[3:]))
    events = {e.article.article_id: e for e in await published(service.bus)}  # type: ignore[arg-type]
    assert set(events) == {"wire", "rewrite", "follow-up", "storm", "month-later"}
    stories = {k: e.story for k, e in events.items()}
    assert all(s is not None for s in stories.values())
    wire = stories["wire"]
    assert wire is not None and wire.article_count == 1 and not wire.update
    assert wire.reason == "new story: no open story within 30 days"
    # Another outlet's version, two hours later: joins, and is no update.
    rewrite = stories["rewrite"]
    assert rewrite is not None and rewrite.story_id == wire.story_id
    assert (rewrite.article_count, rewrite.update, rewrite.new) == (2, False, [])
    assert rewrite.reason.startswith(
        "cosine 1.00 to 'Fentanyl seized at Nogales' (Outlet wire, 2022-11-01); shared: fentanyl,"
        " Nogales; 2 h after its last article; same facts"
    )
    assert rewrite.title == "Fentanyl seized at Nogales" and rewrite.first_seen == T0
    # A new stage: an update that says so.
    follow = stories["follow-up"]
    assert follow is not None and follow.story_id == wire.story_id
    assert follow.update and follow.new == ["charged"]
    # Less alike (cosine 0.71), but two distinctive facts in common: joins through them.
    storm = stories["storm"]
    assert storm is not None and storm.story_id == wire.story_id and storm.article_count == 4
    assert "cosine 0.71" in storm.reason and "shared: fentanyl, Nogales" in storm.reason
    # Forty days on the story is closed: a new one.
    later = stories["month-later"]
    assert later is not None and later.story_id != wire.story_id and later.article_count == 1


async def test_a_redelivered_batch_carries_the_same_stories_and_counts_once(
    service: ClassifyService, client: httpx.AsyncClient
) -> None:
    await service.handle_batch(messages(*STREAM[:2]))
    await service.handle_batch(messages(*STREAM[:2]))
    first, second, again_first, again_second = await published(service.bus)  # type: ignore[arg-type]
    assert (again_first.event_id, again_second.event_id) == (first.event_id, second.event_id)
    assert (again_first.story, again_second.story) == (first.story, second.story)
    [story] = (await client.get("/stories")).json()["items"]
    assert story["article_count"] == 2


async def test_stories_api_lists_filters_pages_and_explains(
    service: ClassifyService, client: httpx.AsyncClient
) -> None:
    await service.handle_batch(messages(*STREAM))
    page = (await client.get("/stories")).json()
    assert page["total"] == 2 and page["limit"] == 50 and page["offset"] == 0
    newest, oldest = page["items"]
    assert newest["title"] == "Fentanyl seized again"  # the newest activity first
    assert oldest["title"] == "Fentanyl seized at Nogales"
    assert (oldest["article_count"], oldest["updates"], oldest["topics"]) == (4, 1, ["fentanyl"])
    assert (await client.get("/stories", params={"topic": "fentanyl"})).json()["total"] == 2
    assert (await client.get("/stories", params={"topic": "weather"})).json()["total"] == 0
    paged = (await client.get("/stories", params={"limit": 1, "offset": 1})).json()
    assert [s["story_id"] for s in paged["items"]] == [oldest["story_id"]]

    view = (await client.get(f"/stories/{oldest['story_id']}")).json()
    assert [a["article_id"] for a in view["articles"]] == ["wire", "rewrite", "follow-up", "storm"]
    assert [a["position"] for a in view["articles"]] == [1, 2, 3, 4]
    assert [a["update"] for a in view["articles"]] == [False, False, True, False]
    follow = view["articles"][2]
    assert follow["new"] == ["charged"] and "update: new stage charged" in follow["reason"]
    assert follow["source"] == "Outlet follow-up"
    assert follow["link"] == "https://follow-up.example/story"

    missing = await client.get("/stories/nope")
    assert missing.status_code == 404 and "no story 'nope'" in missing.json()["detail"]
    for params in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
        bad = await client.get("/stories", params=params)
        assert bad.status_code == 422, params
        assert bad.json()["detail"][0]["loc"][0] == "query"


async def test_a_backfill_carries_the_stories_its_articles_are_in(
    service: ClassifyService, client: httpx.AsyncClient
) -> None:
    from newsmon.classify.topics import TopicDefinition

    await service.handle_batch(messages(*STREAM[:2]))
    live = await published(service.bus)  # type: ignore[arg-type]
    definition = WORD_TOPIC.model_dump(exclude={"version"}) | {"slug": "fentanyl-too"}
    await service.create_topic(TopicDefinition.model_validate(definition))
    result = await service.backfill("fentanyl-too", articles=100)
    assert result.created == 2
    backfilled = await published(service.bus)  # type: ignore[arg-type]
    assert {e.article.article_id: e.story for e in backfilled} == {
        e.article.article_id: e.story for e in live
    }
    [story] = (await client.get("/stories", params={"topic": "fentanyl-too"})).json()["items"]
    assert story["topics"] == ["fentanyl", "fentanyl-too"] and story["article_count"] == 2


async def test_a_restart_in_the_middle_of_a_story_changes_nothing(engine: Any) -> None:
    """A second service on the same database (a restart, or another process) goes on with the
    story the first began: nothing about stories lives in a process."""
    first = ClassifyService(SETTINGS, MemoryBus(), engine, WordEmbedder(), [WORD_TOPIC])
    await first.start()
    await first.handle_batch(messages(*STREAM[:2]))
    [_, before] = await published(first.bus)  # type: ignore[arg-type]
    restarted = ClassifyService(SETTINGS, MemoryBus(), engine, WordEmbedder(), [WORD_TOPIC])
    await restarted.start()
    await restarted.handle_batch(messages(STREAM[3]))
    [after] = await published(restarted.bus)  # type: ignore[arg-type]
    assert before.story is not None and after.story is not None
    assert after.story.story_id == before.story.story_id
    assert (after.story.article_count, after.story.update) == (3, True)
