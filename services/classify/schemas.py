"""The shapes classify's HTTP API reads and answers: scoring requests, matches, previews."""

from __future__ import annotations

from datetime import datetime

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


class Preview(BaseModel):
    slug: str
    current_version: int | None
    articles: int = Field(description="recently classified articles replayed")
    matching_now: int
    matching_with_draft: int
    would_match: list[PreviewArticle] = Field(description="articles the draft adds")
    would_stop_matching: list[PreviewArticle] = Field(description="articles the draft drops")
