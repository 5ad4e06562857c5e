"""The feed list: what to poll, read from the seeds file."""

from __future__ import annotations

import tomllib
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FeedSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str
    title: str = ""
    interval_s: float | None = Field(None, ge=60, description="seconds between polls")

    @field_validator("url")
    @classmethod
    def _supported_scheme(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https", "file"):
            raise ValueError(f"unsupported feed URL {url!r}: use http(s):// or file://")
        return url


def load_feeds(path: Path) -> list[FeedSpec]:
    """Read ``[[feeds]]`` from TOML. A ``url`` without a scheme is a file relative to ``path``."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    feeds = []
    for raw in data.get("feeds", []):
        url = str(raw.get("url", ""))
        if url and "://" not in url:
            raw = {**raw, "url": (path.parent / url).resolve().as_uri()}
        feeds.append(FeedSpec.model_validate(raw))
    return feeds
