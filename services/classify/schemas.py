"""The shapes classify's HTTP API reads and answers: scoring requests, matches, previews."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from newsmon.classify.scoring import MAX_TEXT_CHARS
from newsmon.events import Evidence, TopicScore, article_text


class ScoreRequest(BaseModel):
    """An article as everything else reads one (feeds, ``newsmon score``): the body is the
    longer of ``content`` and ``summary``. Unknown fields are refused, by name."""

    model_config = ConfigDict(extra="forbid")

    title: str = ""
    summary: str = ""
    content: str = Field("", description=f"only the body's first {MAX_TEXT_CHARS} chars count")

    @property
    def text(self) -> str:
        return article_text(self.summary, self.content)

    @model_validator(mode="after")
    def _has_text(self) -> ScoreRequest:
        if not self.title.strip() and not self.text.strip():
            raise ValueError("title, summary and content are all empty: there is nothing to score")
        return self


class ScoreResponse(BaseModel):
    scores: list[TopicScore]
    matches: list[str]
    passages: int
    truncated: bool


class Match(BaseModel):
    event_id: str
    topic: str
    topic_version: int
    article_id: str
    title: str
    link: str
    score: float
    threshold: float
    evidence: Evidence
    matched_at: datetime


class MatchPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[Match]


class PreviewArticle(BaseModel):
    article_id: str
    title: str
    link: str
    classified_at: datetime
    score_before: float
    score_after: float
    evidence: Evidence


HISTOGRAM_BINS = 100


class ScoreHistogram(BaseModel):
    """How the replayed articles score under the draft: ``counts[i]`` articles score in
    ``[i / bins, (i + 1) / bins)`` (the last bin holds 1.0 too), so the articles that match at
    a threshold of two decimals ``t`` are exactly those in the bins from ``t * bins`` up."""

    bins: int = HISTOGRAM_BINS
    counts: list[int]
    vetoed: int = Field(description="articles the keyword constraints rule out at any threshold")


class Preview(BaseModel):
    slug: str
    current_version: int | None
    articles: int = Field(description="recently classified articles replayed")
    matching_now: int
    matching_with_draft: int
    would_match: list[PreviewArticle] = Field(description="articles the draft adds")
    would_stop_matching: list[PreviewArticle] = Field(description="articles the draft drops")
    would_match_total: int = Field(0, description="articles the draft adds, all of them")
    would_stop_matching_total: int = Field(0, description="articles the draft drops, all of them")
    histogram: ScoreHistogram = Field(description="the draft's scores of the replayed articles")


class FieldChange(BaseModel):
    before: Any
    after: Any


class HistoryLabel(BaseModel):
    article_id: str
    title: str
    relevant: bool
    undone: bool


class TopicVersion(BaseModel):
    """One version of a topic: what made it, who, when, and what it changed."""

    version: int
    change: str = Field(
        description="created, updated, enabled, disabled, published, deleted, "
        "labelled, label undone"
    )
    at: datetime | None
    actor: str | None
    changes: dict[str, FieldChange] = Field(description="the definition's fields that changed")
    labels: list[HistoryLabel] = Field(description="the labels given in this version")


class TopicHistory(BaseModel):
    slug: str
    version: int
    items: list[TopicVersion] = Field(
        description="newest first; versions made before history "
        "was kept, or by labels only, may be missing"
    )


class LabelRequest(BaseModel):
    """An operator's verdict on one recently classified article for a topic."""

    model_config = ConfigDict(extra="forbid")

    article_id: str = Field(min_length=1, max_length=128)
    relevant: bool


class Label(BaseModel):
    """A label as kept: what was said, by whom, when, from where, and whether it still counts."""

    id: str
    topic: str
    article_id: str
    title: str
    link: str
    relevant: bool
    source: str = Field(description="api, link (from an alert) or backtest")
    actor: str = Field(description="the API key's name, or the subscription a link was sent to")
    subscription_id: str | None
    topic_version: int = Field(description="the topic version this label produced")
    created_at: datetime
    undone_at: datetime | None
    undone_by: str | None


class LabelPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[Label]


class ReviewItem(BaseModel):
    article_id: str
    title: str
    link: str
    classified_at: datetime
    side: str = Field(description="above or below the threshold")
    score: TopicScore


class Review(BaseModel):
    slug: str
    topic_version: int
    threshold: float
    articles: int = Field(description="recent articles considered")
    items: list[ReviewItem] = Field(description="least sure first, alternating sides")


class Decision(BaseModel):
    """A topic's decision on an article when the article was classified."""

    score: float
    version: int
    matched: bool


class ArticleView(BaseModel):
    """A recently classified article: how every live topic scores it now, and what was decided,
    matched and labelled before."""

    article_id: str
    title: str
    link: str
    classified_at: datetime
    passages: int
    scores: list[TopicScore] = Field(description="each live topic's score now, with evidence")
    decided: dict[str, Decision] = Field(description="by topic, when it was classified")
    matches: list[Match]
    labels: list[Label]


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    articles: int = Field(1000, ge=1, le=20_000, description="the latest classified to replay")


class Backfill(BaseModel):
    slug: str
    topic_version: int
    articles: int = Field(description="recent articles replayed")
    matched: int = Field(description="of them, matching the topic now")
    created: int = Field(description="matches created now (the others had one already)")
    article_ids: list[str] = Field(description="the articles that got a new match")


class StorySummary(BaseModel):
    """A story: matching articles about one real-world event, across feeds and outlets."""

    story_id: str
    title: str = Field(description="the headline of its first article")
    first_article_id: str
    first_seen: datetime = Field(description="when its first article was published")
    last_seen: datetime = Field(description="when its latest article was published")
    article_count: int
    updates: int = Field(description="articles that developed it (a new fact, not a rewrite)")
    topics: list[str] = Field(description="the topics its articles matched")
    created_at: datetime


class StoryPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[StorySummary] = Field(description="newest activity first")


class StoryArticle(BaseModel):
    """An article of a story: where it joined, whether it was an update and why."""

    article_id: str
    position: int = Field(description="1 for the article that started the story")
    title: str
    link: str
    source: str = Field(description="the feed it came from")
    published: datetime
    update: bool
    new: list[str] = Field(description="what it added, when it was an update")
    reason: str = Field(description="why it joined the story (or started it)")
    similarity: float | None = Field(description="its cosine to the story when it joined")
    topics: list[str]
    joined_at: datetime


class StoryView(StorySummary):
    articles: list[StoryArticle] = Field(description="in the order they joined")
