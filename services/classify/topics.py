"""Topics: what operators want to hear about, and how they are loaded from the seeds file."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Topic(BaseModel):
    """A topic an article can match: described in words and by examples on both sides."""

    model_config = ConfigDict(frozen=True)

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(min_length=1, max_length=2000)
    examples: tuple[str, ...] = Field(min_length=1, max_length=100)
    counter_examples: tuple[str, ...] = Field(default=(), max_length=100)
    threshold: float = Field(ge=0.0, le=1.0)
    enabled: bool = True
    version: int = Field(1, ge=1)


def load_topics(path: Path) -> list[Topic]:
    """Read ``[[topics]]`` tables from a TOML file; duplicate slugs are an error."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    topics = [Topic.model_validate(t) for t in data.get("topics", [])]
    slugs = [t.slug for t in topics]
    duplicates = sorted({s for s in slugs if slugs.count(s) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate topic slugs {duplicates}")
    return topics
