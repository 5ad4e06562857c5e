"""What a subscriber receives: the JSON body of an alert, a test alert, and its log rendering.

Pure functions over events; every channel (webhook, email, log) starts from this body.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping

from newsmon.events import Article, ArticleMatched, Evidence, TopicScore, utcnow

PAYLOAD_VERSION = 1
MATCHED_EVENT = "article.matched"
TEST_EVENT = "subscription.test"


def build_payload(
    subscription_id: str,
    event: ArticleMatched,
    score: TopicScore,
    *,
    feedback: Mapping[str, str],
    kind: str = MATCHED_EVENT,
) -> bytes:
    """The JSON body of one alert (Standard Webhooks shape: type, timestamp, data).

    ``feedback`` holds the alert's signed links (``newsmon.feedback_links.feedback_links``):
    ``relevant`` ("more like this"), ``not_relevant`` and their ``expires_at``.
    """
    article = event.article
    body = {
        "type": kind,
        "version": PAYLOAD_VERSION,
        "timestamp": event.occurred_at.isoformat(),
        "data": {
            "subscription_id": subscription_id,
            "topic": score.topic,
            "topic_version": score.topic_version,
            "score": score.score,
            "threshold": score.threshold,
            "evidence": score.evidence.model_dump(mode="json"),
            "article": {
                "id": article.article_id,
                "title": article.title,
                "link": article.link,
                "summary": article.summary,
                "published": article.published.isoformat() if article.published else None,
                "feed": {"url": article.feed_url, "title": article.feed_title},
                "fetched_at": event.fetched_at.isoformat(),
            },
            "feedback": dict(feedback),
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def test_event() -> tuple[ArticleMatched, TopicScore]:
    """A sample match for ``POST /subscriptions/{id}/test``: real shape, obviously not news."""
    score = TopicScore(
        topic="newsmon-test",
        topic_version=1,
        score=1.0,
        threshold=0.5,
        matched=True,
        evidence=Evidence(
            passage="This is a test alert sent from newsmon.",
            nearest_positive="A test alert.",
            positive_similarity=1.0,
        ),
    )
    article = Article(
        article_id="test_" + uuid.uuid4().hex,
        feed_url="https://newsmon.invalid/test-feed",
        feed_title="newsmon test feed",
        title="newsmon test alert",
        link="https://newsmon.invalid/test-alert",
        summary="Sent on request to check that this subscription receives alerts.",
    )
    return ArticleMatched(article=article, scores=[score], fetched_at=utcnow()), score


def describe_alert(payload: bytes) -> str:
    """A readable, multi-line rendering of an alert, for the log channel."""
    data = json.loads(payload)["data"]
    article, evidence = data["article"], data["evidence"]
    lines = [
        f"ALERT [{data['topic']}] score {data['score']:.3f} (threshold {data['threshold']:.2f}): "
        f"{article['title']}",
        f"    link:    {article['link'] or '-'}",
        f"    feed:    {article['feed']['title'] or article['feed']['url']}",
        f"    because: “{_clip(evidence['passage'], 220)}”",
        f"    nearest example ({evidence['positive_similarity']:.3f}): "
        f"“{_clip(evidence['nearest_positive'], 160)}”",
    ]
    if evidence.get("nearest_negative"):
        lines.append(
            f"    nearest counter-example ({evidence['negative_similarity']:.3f}): "
            f"“{_clip(evidence['nearest_negative'], 160)}”"
        )
    return "\n".join(lines)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
