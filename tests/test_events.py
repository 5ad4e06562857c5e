"""Wire events: versioned JSON envelopes, and clear errors for anything else."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from newsmon.events import (
    Article,
    ArticleFetched,
    ArticleMatched,
    EventError,
    Evidence,
    TopicScore,
)

ARTICLE = Article(
    article_id="a1", feed_url="https://f.example/rss", title="T", summary="S",
    published=datetime(2023, 1, 7, tzinfo=UTC),
)  # fmt: skip


def test_round_trip_keeps_id_and_fields() -> None:
    event = ArticleFetched(article=ARTICLE)
    decoded = ArticleFetched.decode(event.encode())
    assert decoded == event
    envelope = json.loads(event.encode())
    assert envelope["type"] == "article.fetched" and envelope["version"] == 1
    assert envelope["id"] == event.event_id


def test_matched_lists_only_matches() -> None:
    ev = Evidence(passage="p", nearest_positive="x", positive_similarity=0.7)
    scores = [
        TopicScore(topic="a", topic_version=1, score=0.7, threshold=0.5, matched=True, evidence=ev),
        TopicScore(
            topic="b", topic_version=1, score=0.2, threshold=0.5, matched=False, evidence=ev
        ),
    ]
    event = ArticleMatched(article=ARTICLE, scores=scores, fetched_at=datetime.now(UTC))
    decoded = ArticleMatched.decode(event.encode())
    assert [s.topic for s in decoded.matches] == ["a"]


def test_added_fields_are_ignored() -> None:
    envelope = json.loads(ArticleFetched(article=ARTICLE).encode())
    envelope["data"]["new_field"] = 1
    assert ArticleFetched.decode(json.dumps(envelope).encode()).article == ARTICLE


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"{nope", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"type":"article.matched","version":1,"data":{}}', "expected type"),
        (
            b'{"type":"article.fetched","version":2,"data":{}}',
            "unsupported article.fetched version",
        ),
        (b'{"type":"article.fetched","version":1}', "no data object"),
        (b'{"type":"article.fetched","version":1,"id":"x","data":{"article":{}}}', "invalid"),
    ],
)
def test_malformed_events_raise_event_error(raw: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        ArticleFetched.decode(raw)
