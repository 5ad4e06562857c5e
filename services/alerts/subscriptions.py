"""Subscriptions: who hears about which topics, and how; read from the seeds file."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.alerts.signing import decode_secret


class Subscription(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    channel: Literal["webhook", "log"]
    topics: tuple[str, ...] = Field(default=(), description="topic slugs; empty means all")
    min_score: float = Field(0.0, ge=0.0, le=1.0)
    url: str | None = None
    secret: str | None = Field(None, repr=False)

    @model_validator(mode="after")
    def _webhook_needs_url_and_secret(self) -> Subscription:
        if self.channel == "webhook":
            if not self.url or urlsplit(self.url).scheme not in ("http", "https"):
                raise ValueError(f"subscription {self.id}: webhook url must be http(s)")
            if not self.secret:
                raise ValueError(f"subscription {self.id}: webhook needs a whsec_ secret")
            decode_secret(self.secret)
        return self

    def wants(self, topic: str, score: float) -> bool:
        return (not self.topics or topic in self.topics) and score >= self.min_score


def load_subscriptions(path: Path) -> list[Subscription]:
    """Read ``[[subscriptions]]``; ``secret_env`` names the variable that holds a secret."""
    with path.open("rb") as f:
        data = tomllib.load(f)
    subscriptions = []
    for raw in data.get("subscriptions", []):
        raw = dict(raw)
        env = raw.pop("secret_env", None)
        if env:
            if env not in os.environ:
                raise ValueError(f"{path}: subscription {raw.get('id')}: ${env} is not set")
            raw["secret"] = os.environ[env]
        subscriptions.append(Subscription.model_validate(raw))
    ids = [s.id for s in subscriptions]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate subscription ids {duplicates}")
    return subscriptions
