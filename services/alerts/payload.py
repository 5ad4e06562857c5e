"""What a subscriber receives: the JSON body of an alert, a test alert, the summary of held
alerts, and their log rendering.

Pure functions over events; every channel (webhook, email, log) starts from these bodies.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from newsmon.alerts.schedule import HOLD_BUDGET, HOLD_QUIET
from newsmon.events import Article, ArticleMatched, Evidence, StoryRef, TopicScore, utcnow

PAYLOAD_VERSION = 1
MATCHED_EVENT = "article.matched"
TEST_EVENT = "subscription.test"
# One webhook for the alerts held by quiet hours or a budget, when they end.
SUMMARY_EVENT = "alerts.summary"


def story_of(event: ArticleMatched) -> StoryRef:
    """The story of the event's article; from a producer that groups none, a story of its own
    (its id is the article's)."""
    if event.story is not None:
        return event.story
    article = event.article
    return StoryRef(
        story_id=article.article_id,
        title=article.title,
        article_count=1,
        first_seen=event.fetched_at,
        reason="no story information: the article is a story of its own",
    )


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
    story = story_of(event)
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
            "story": {
                "id": story.story_id,
                "title": story.title,
                "article_count": story.article_count,
                "first_seen": story.first_seen.isoformat(),
                "update": story.update,
                "new": list(story.new),
                "reason": story.reason,
            },
        },
    }
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def summary_id(delivery_ids: Sequence[str]) -> str:
    """The ``webhook-id`` of a summary: the same for the same held alerts, on every attempt."""
    digest = hashlib.sha256("\x00".join(sorted(delivery_ids)).encode()).hexdigest()
    return "msg_sum_" + digest[:28]


def build_summary(
    subscription_id: str,
    held: Sequence[tuple[str, bytes, str | None, datetime]],
    story_counts: Mapping[str, int],
) -> bytes:
    """One body for alerts that were held: ``held`` is (delivery id, alert payload, why it was
    held, when it was recorded) per alert, oldest first, one at least. Each alert is listed
    whole, as its own webhook would have carried it; where its story has grown since
    (``story_counts``: story id -> articles now), ``story.article_count_now`` says how far.
    The timestamp is when the latest of them was recorded."""
    alerts: list[dict[str, Any]] = []
    for delivery_id, payload, _, _ in held:
        alert = json.loads(payload)
        data = alert["data"]
        story = data.get("story")
        now = story_counts.get(story["id"]) if story else None
        if story and now and now > story["article_count"]:
            data["story"] = {**story, "article_count_now": now}
        alerts.append({"delivery_id": delivery_id, "type": alert["type"], **data})
    body = {
        "type": SUMMARY_EVENT,
        "version": PAYLOAD_VERSION,
        "timestamp": max(at for *_, at in held).isoformat(),
        "data": {
            "subscription_id": subscription_id,
            "held_for": sorted({reason for _, _, reason, _ in held if reason}),
            "count": len(alerts),
            "since": min(at for *_, at in held).isoformat(),
            "alerts": alerts,
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
        *_story_lines(data.get("story")),
        f"    nearest example ({evidence['positive_similarity']:.3f}): "
        f"“{_clip(evidence['nearest_positive'], 160)}”",
    ]
    if evidence.get("nearest_negative"):
        lines.append(
            f"    nearest counter-example ({evidence['negative_similarity']:.3f}): "
            f"“{_clip(evidence['nearest_negative'], 160)}”"
        )
    return "\n".join(lines)


HELD_FOR = {HOLD_QUIET: "quiet hours", HOLD_BUDGET: "over budget"}


def held_for(reasons: Sequence[str | None]) -> str:
    """Why alerts were held, in words: "quiet hours", "over budget", or both."""
    return " and ".join(HELD_FOR.get(r, r) for r in sorted({r for r in reasons if r})) or "held"


def story_line(story: Mapping[str, Any]) -> str:
    """One line naming an alert's story: its id and article count, and what is new in it."""
    count = story["article_count"]
    line = f"{story['id']} ({count} article{'s' if count != 1 else ''}"
    now = story.get("article_count_now")
    line += f"; {now} by now)" if now else ")"
    if story.get("update"):
        line += ", updated: " + ("; ".join(story.get("new") or []) or "a new development")
    return line


def _story_lines(story: Mapping[str, Any] | None) -> list[str]:
    # Alerts recorded before stories existed have none.
    return [f"    story:   {story_line(story)}"] if story else []


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
