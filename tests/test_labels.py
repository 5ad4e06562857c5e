"""Topics that learn: labels from the API, the review queue, article look-up, drafts, backfills.

The classify service with a small fake embedder (our own boundary) over the real store (SQLite
and PostgreSQL through the ``engine`` fixture) and the real memory bus, driven over HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from newsmon.bus import MemoryBus, Message
from newsmon.classify.routes import build_router
from newsmon.classify.service import ClassifyService
from newsmon.events import (
    ARTICLES_FETCHED,
    ARTICLES_MATCHED,
    Article,
    ArticleFetched,
    ArticleMatched,
)
from newsmon.settings import Settings
from tests.helpers import WORD_TOPIC, WordEmbedder

TOPIC = WORD_TOPIC
SETTINGS = Settings(classify_retry_delay_s=0.0, classify_batch_wait_s=0.0)


def fetched(article_id: str, title: str) -> Message:
    event = ArticleFetched(
        event_id=f"e-{article_id}",
        article=Article(
            article_id=article_id,
            feed_url="https://feed.example/rss",
            title=title,
            link=f"https://news.example/{article_id}",
            summary="",
        ),
    )
    return Message(ARTICLES_FETCHED, 0, 0, None, event.encode())


async def matched_events(bus: MemoryBus) -> list[ArticleMatched]:
    async with bus.consumer([ARTICLES_MATCHED], "test") as consumer:
        return [ArticleMatched.decode(m.value) for m in await consumer.poll(1000, timeout=0.2)]


@pytest.fixture
async def api(engine: Any) -> AsyncIterator[tuple[httpx.AsyncClient, ClassifyService]]:
    service = ClassifyService(SETTINGS, MemoryBus(), engine, WordEmbedder(), [TOPIC])
    await service.start()
    app = FastAPI()

    @app.middleware("http")
    async def as_operator(request: Request, call_next: Any) -> Any:
        request.state.actor = "key ops-admin"  # what newsmon.api's guard records
        return await call_next(request)

    app.include_router(build_router(service))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://classify") as client:
        yield client, service


async def score_of(client: httpx.AsyncClient, article_id: str) -> dict[str, Any]:
    view = (await client.get(f"/articles/{article_id}")).json()
    [score] = [s for s in view["scores"] if s["topic"] == "fentanyl"]
    return score  # type: ignore[no-any-return]


async def test_a_label_is_kept_with_who_when_where_and_teaches_the_topic_at_once(api: Any) -> None:
    client, service = api
    # Mentions the topic and its counter-example: a false alarm above the threshold.
    await service.handle_batch(
        [fetched("a1", "fentanyl and football"), fetched("a2", "fentanyl in the weather")]
    )
    before = await score_of(client, "a1")
    assert before["matched"] and before["evidence"]["not_relevant_label"] is None

    response = await client.post(
        "/topics/fentanyl/labels", json={"article_id": "a1", "relevant": False}
    )
    assert response.status_code == 201, response.text
    label = response.json()
    assert label["actor"] == "key ops-admin" and label["source"] == "api"
    assert label["title"] == "fentanyl and football" and label["undone_at"] is None
    assert label["topic_version"] == 2
    assert (await client.get("/topics/fentanyl")).json()["version"] == 2

    # A rewrite of the same story now scores low, and says which label did it.
    await service.handle_batch([fetched("a3", "football, fentanyl")])
    after = await score_of(client, "a3")
    assert not after["matched"] and after["score"] < before["score"]
    assert after["evidence"]["not_relevant_label"]["label_id"] == label["id"]
    assert after["topic_version"] == 2
    # An article unlike the label is scored exactly as before.
    unlike = await score_of(client, "a2")
    assert unlike["score"] == unlike["evidence"]["calibrated"]
    assert not [e for e in await matched_events(service.bus) if e.article.article_id == "a3"]

    page = (await client.get("/topics/fentanyl/labels")).json()
    assert page["total"] == 1 and page["items"][0]["id"] == label["id"]


async def test_an_undone_label_stops_counting_and_stays_listed(api: Any) -> None:
    client, service = api
    await service.handle_batch([fetched("a1", "fentanyl and football")])
    label = (
        await client.post("/topics/fentanyl/labels", json={"article_id": "a1", "relevant": False})
    ).json()
    assert not (await score_of(client, "a1"))["matched"]

    undone = await client.delete(f"/topics/fentanyl/labels/{label['id']}")
    assert undone.status_code == 200, undone.text
    assert undone.json()["undone_by"] == "key ops-admin" and undone.json()["undone_at"]
    assert (await client.get("/topics/fentanyl")).json()["version"] == 3
    restored = await score_of(client, "a1")
    assert restored["matched"] and restored["evidence"]["not_relevant_label"] is None

    assert (await client.get("/topics/fentanyl/labels")).json()["total"] == 0
    listed = (await client.get("/topics/fentanyl/labels", params={"include_undone": True})).json()
    assert [i["id"] for i in listed["items"]] == [label["id"]]
    # Undoing twice changes nothing more.
    again = await client.delete(f"/topics/fentanyl/labels/{label['id']}")
    assert (
        again.status_code == 200 and (await client.get("/topics/fentanyl")).json()["version"] == 3
    )


async def test_a_new_label_of_an_article_replaces_its_old_one(api: Any) -> None:
    client, service = api
    await service.handle_batch([fetched("a1", "fentanyl and football")])
    first = (
        await client.post("/topics/fentanyl/labels", json={"article_id": "a1", "relevant": False})
    ).json()
    second = (
        await client.post("/topics/fentanyl/labels", json={"article_id": "a1", "relevant": True})
    ).json()
    active = (await client.get("/topics/fentanyl/labels")).json()
    assert [i["id"] for i in active["items"]] == [second["id"]]
    everything = (
        await client.get("/topics/fentanyl/labels", params={"include_undone": True})
    ).json()
    [old] = [i for i in everything["items"] if i["id"] == first["id"]]
    assert old["undone_at"] and "replaced" in old["undone_by"]


async def test_labels_of_what_is_not_there_are_refused_clearly(api: Any) -> None:
    client, service = api
    await service.handle_batch([fetched("a1", "fentanyl")])
    missing = await client.post(
        "/topics/fentanyl/labels", json={"article_id": "nope", "relevant": True}
    )
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    no_topic = await client.post(
        "/topics/other/labels", json={"article_id": "a1", "relevant": True}
    )
    assert no_topic.status_code == 404
    bad = await client.post("/topics/fentanyl/labels", json={"article_id": "a1", "relevant": "?"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "relevant"]
    unknown_label = await client.delete("/topics/fentanyl/labels/0123")
    assert unknown_label.status_code == 404
    assert (await client.get("/topics/fentanyl")).json()["version"] == 1


async def test_the_review_queue_shows_the_least_sure_on_both_sides_and_skips_the_answered(
    api: Any,
) -> None:
    client, service = api
    await service.handle_batch(
        [
            fetched("sure-yes", "fentanyl"),
            fetched("near-yes", "fentanyl and football"),
            fetched("near-no", "fentanyl, weather and football"),
            fetched("sure-no", "football"),
        ]
    )
    review = (await client.get("/topics/fentanyl/review", params={"limit": 2})).json()
    assert review["threshold"] == 0.6 and review["articles"] == 4
    assert [(i["article_id"], i["side"]) for i in review["items"]] == [
        ("near-yes", "above"),
        ("near-no", "below"),
    ]
    assert all(i["score"]["evidence"]["passage"] for i in review["items"])
    await client.post("/topics/fentanyl/labels", json={"article_id": "near-yes", "relevant": True})
    review = (await client.get("/topics/fentanyl/review", params={"limit": 2})).json()
    assert "near-yes" not in [i["article_id"] for i in review["items"]]
    assert (await client.get("/topics/nope/review")).status_code == 404


async def test_an_article_is_found_by_id_link_or_title_words_with_every_score_explained(
    api: Any,
) -> None:
    client, service = api
    await service.handle_batch([fetched("a1", "Weather turns cold"), fetched("a2", "fentanyl")])
    view = (await client.get("/articles/a1")).json()
    [score] = view["scores"]
    assert not score["matched"] and score["evidence"]["passage"] == "Weather turns cold"
    assert view["decided"]["fentanyl"] == {"score": score["score"], "version": 1, "matched": False}
    assert view["matches"] == [] and view["labels"] == []
    matched = (await client.get("/articles/a2")).json()
    assert [m["topic"] for m in matched["matches"]] == ["fentanyl"]

    by_words = (await client.get("/articles", params={"q": "weather COLD"})).json()
    assert [v["article_id"] for v in by_words] == ["a1"]
    by_link = (await client.get("/articles", params={"link": "https://news.example/a2"})).json()
    assert [v["article_id"] for v in by_link] == ["a2"]
    assert (await client.get("/articles", params={"q": "100%"})).json() == []
    assert (await client.get("/articles/unknown")).status_code == 404
    assert (await client.get("/articles")).status_code == 422


async def test_a_draft_is_previewed_then_published_and_backfilled_once(api: Any) -> None:
    client, service = api
    await service.handle_batch([fetched("w1", "weather warning"), fetched("f1", "football")])
    draft = {
        "slug": "weather",
        "name": "Weather",
        "description": "weather",
        "examples": ["weather warning"],
        "status": "draft",
    }
    created = await client.post("/topics", json=draft)
    assert created.status_code == 201 and created.json()["threshold"] == 0.5
    # A draft scores nothing as articles arrive...
    await service.handle_batch([fetched("w2", "weather: snow")])
    assert not [
        s for s in (await client.get("/articles/w2")).json()["scores"] if s["topic"] == "weather"
    ]
    refused = await client.post("/topics/weather/backfill", json={"articles": 10})
    assert refused.status_code == 409 and "draft" in refused.json()["detail"]
    # ...but previews over the recent articles.
    preview = (await client.post("/topics/weather/preview", json={})).json()
    assert preview["matching_with_draft"] == 2

    published = await client.post("/topics/weather/publish")
    assert published.json()["status"] == "live" and published.json()["version"] == 2
    before = len(await matched_events(service.bus))
    backfill = (await client.post("/topics/weather/backfill", json={"articles": 10})).json()
    assert backfill["created"] == 2 and sorted(backfill["article_ids"]) == ["w1", "w2"]
    events = (await matched_events(service.bus))[before:]
    assert sorted(e.article.article_id for e in events) == ["w1", "w2"]
    assert all(e.article.link.startswith("https://news.example/") for e in events)
    again = (await client.post("/topics/weather/backfill", json={"articles": 10})).json()
    assert again["created"] == 0 and again["matched"] == 2
    matches = (await client.get("/matches", params={"topic": "weather"})).json()
    assert matches["total"] == 2
