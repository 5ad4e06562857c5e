"""The classify service's shell: batches off the bus, bad messages isolated, matches published.

A small fake embedder (our own boundary) keeps these fast; the real model is exercised by
test_seed_fixture.py and test_e2e.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from services.bus import MemoryBus, Message
from services.classify.model import Vectors
from services.classify.service import ClassifyService
from services.classify.topics import Topic
from services.events import (
    ARTICLES_FETCHED,
    ARTICLES_MATCHED,
    Article,
    ArticleFetched,
    ArticleMatched,
)
from services.settings import Settings

WORDS = ("fentanyl", "weather", "football")


class WordEmbedder:
    """Embeds a text as the unit vector of which of three words it mentions."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.fail_on = fail_on
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> Vectors:
        self.calls += 1
        if self.fail_on and any(self.fail_on in t for t in texts):
            raise RuntimeError("model failure")
        rows = np.array(
            [[float(w in t.lower()) for w in WORDS] + [0.01] for t in texts], dtype=np.float32
        )
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


TOPIC = Topic(
    slug="fentanyl",
    name="Fentanyl",
    description="fentanyl",
    examples=("fentanyl seizure",),
    counter_examples=("football match",),
    threshold=0.6,
)


def fetched(article_id: str, title: str, text: str = "") -> ArticleFetched:
    return ArticleFetched(
        event_id=article_id,
        article=Article(article_id=article_id, feed_url="https://f/", title=title, summary=text),
    )


def message(event: ArticleFetched | bytes, offset: int) -> Message:
    value = event if isinstance(event, bytes) else event.encode()
    return Message(ARTICLES_FETCHED, 0, offset, None, value)


async def published(bus: MemoryBus) -> list[ArticleMatched]:
    async with bus.consumer([ARTICLES_MATCHED], "test") as consumer:
        return [ArticleMatched.decode(m.value) for m in await consumer.poll(100, timeout=0.1)]


async def test_only_matching_articles_are_published_with_every_topic_score() -> None:
    bus = MemoryBus()
    service = ClassifyService(Settings(), bus, WordEmbedder(), [TOPIC])
    await service.handle_batch(
        [message(fetched("a", "Fentanyl seized at border"), 0), message(fetched("b", "Weather"), 1)]
    )
    [event] = await published(bus)
    assert event.article.article_id == "a"
    [score] = event.scores
    assert score.matched and score.topic == "fentanyl" and score.topic_version == 1
    assert score.evidence.passage == "Fentanyl seized at border"


async def test_a_redelivered_article_yields_the_same_matched_event_id() -> None:
    bus = MemoryBus()
    service = ClassifyService(Settings(), bus, WordEmbedder(), [TOPIC])
    event = fetched("a", "fentanyl")
    await service.handle_batch([message(event, 0)])
    await service.handle_batch([message(event, 0)])
    first, second = await published(bus)
    assert first.event_id == second.event_id


async def test_bad_messages_are_skipped_with_coordinates_and_the_rest_flows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    embedder = WordEmbedder(fail_on="poison")
    service = ClassifyService(Settings(), bus, embedder, [TOPIC])
    await service.handle_batch(
        [
            message(b"not json", 3),
            message(fetched("empty", "   ", "  \n "), 4),
            message(fetched("poison", "fentanyl poison"), 5),
            message(fetched("good", "fentanyl news"), 6),
        ]
    )
    assert [e.article.article_id for e in await published(bus)] == ["good"]
    assert "articles.fetched[0]@3" in caplog.text  # malformed
    assert "articles.fetched[0]@4" in caplog.text  # nothing to score
    assert "articles.fetched[0]@5" in caplog.text  # the model failed on it
