"""Wire events: the facts the services tell each other, as versioned JSON.

Every event is an envelope ``{"type", "version", "id", "occurred_at", "data"}``. Consumers use
``id`` to stay idempotent; a breaking change to ``data`` gets a new bus topic (``….v2``), an
added field does not.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ARTICLES_FETCHED = "articles.fetched"
ARTICLES_MATCHED = "articles.matched"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` in UTC; a naive value is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class EventError(ValueError):
    """A bus message that is not a well-formed event of the expected type."""


class Event(BaseModel):
    """Base of all wire events: frozen, named in the past tense, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: ClassVar[str]
    version: ClassVar[int] = 1

    event_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    occurred_at: datetime = Field(default_factory=utcnow)

    def encode(self) -> bytes:
        envelope = {
            "type": self.type,
            "version": self.version,
            "id": self.event_id,
            "occurred_at": self.occurred_at.isoformat(),
            "data": self.model_dump(mode="json", exclude={"event_id", "occurred_at"}),
        }
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Any:
        try:
            envelope = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EventError(f"not JSON: {exc}") from exc
        if not isinstance(envelope, dict):
            raise EventError("not a JSON object")
        if envelope.get("type") != cls.type:
            raise EventError(f"expected type {cls.type!r}, got {envelope.get('type')!r}")
        if envelope.get("version") != cls.version:
            raise EventError(f"unsupported {cls.type} version {envelope.get('version')!r}")
        data = envelope.get("data")
        if not isinstance(data, dict):
            raise EventError("envelope has no data object")
        try:
            return cls.model_validate(
                {**data, "event_id": envelope.get("id"), "occurred_at": envelope.get("occurred_at")}
            )
        except ValidationError as exc:
            raise EventError(f"invalid {cls.type}: {exc.error_count()} error(s): {exc}") from exc


class Article(BaseModel):
    """A normalised news item, as ingest saw it."""

    model_config = ConfigDict(frozen=True)

    article_id: str
    feed_url: str
    feed_title: str = ""
    title: str
    link: str = ""
    summary: str = ""
    content: str = ""
    published: datetime | None = None

    @property
    def text(self) -> str:
        return article_text(self.summary, self.content)


def article_text(summary: str, content: str) -> str:
    """The body to classify: the longer of content and summary (feeds often repeat one)."""
    return content if len(content) >= len(summary) else summary


class ArticleFetched(Event):
    type: ClassVar[str] = "article.fetched"

    article: Article
    fetched_at: datetime = Field(default_factory=utcnow)


class LabelEvidence(BaseModel):
    """An article an operator labelled for the topic, as near as it came to the scored one."""

    model_config = ConfigDict(frozen=True)

    label_id: str
    article_id: str
    title: str
    similarity: float


class Evidence(BaseModel):
    """Why a topic scored what it did: the deciding passage, the examples nearest to it, and
    the labelled articles that moved the score."""

    model_config = ConfigDict(frozen=True)

    passage: str
    nearest_positive: str
    positive_similarity: float
    nearest_negative: str | None = None
    negative_similarity: float | None = None
    # Keyword constraints: the word that satisfied ``require_any``, and why the constraints
    # vetoed a match (a score above the threshold does not match when this is set).
    required_term: str | None = None
    rejected_by: str | None = None
    # The vote of the nearest examples (0..1), and its calibrated confidence before any label
    # counted; the score is that confidence moved by the labelled articles named below.
    vote: float | None = None
    calibrated: float | None = None
    relevant_label: LabelEvidence | None = None
    not_relevant_label: LabelEvidence | None = None


class TopicScore(BaseModel):
    model_config = ConfigDict(frozen=True)

    topic: str
    topic_version: int
    score: float
    threshold: float
    matched: bool
    evidence: Evidence


class StoryRef(BaseModel):
    """The story (one real-world event, across feeds and outlets) a matched article belongs to.

    ``update`` is true when the article develops the story (a new fact, not a rewrite):
    subscribers who get one alert per story are alerted again, marked as an update, with
    ``new`` saying what is new. ``reason`` explains, like a score's evidence, why the article
    joined this story (or started it).
    """

    model_config = ConfigDict(frozen=True)

    story_id: str
    title: str = Field(description="the headline of the story's first article")
    article_count: int = Field(ge=1, description="articles in the story, this one included")
    first_seen: datetime
    update: bool = False
    new: list[str] = Field(default_factory=list, description="what this article adds")
    reason: str = ""


class ArticleMatched(Event):
    """An article matched at least one topic; ``scores`` holds every live topic's result.

    ``story`` is the story the article joined (absent from producers that group none).
    """

    type: ClassVar[str] = "article.matched"

    article: Article
    scores: list[TopicScore]
    fetched_at: datetime
    story: StoryRef | None = None

    @property
    def matches(self) -> list[TopicScore]:
        return [s for s in self.scores if s.matched]


# Topic changes ------------------------------------------------------------------------------

TOPICS_CHANGED = "topics.changed"
# Where classify sends an ``articles.fetched`` message it could not process, with the original
# value and ``source-topic`` / ``source-partition`` / ``source-offset`` / ``error`` headers.
ARTICLES_FETCHED_DLQ = "articles.fetched.dlq"


class TopicChanged(Event):
    """A topic was created, updated, enabled, disabled or deleted; with its new version."""

    type: ClassVar[str] = "topic.changed"

    slug: str
    topic_version: int
    change: str
