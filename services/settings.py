"""Settings, read from ``NEWSMON_*`` environment variables (and a ``.env`` file if present)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.access import ApiKey


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEWSMON_", env_file=".env", extra="ignore")

    bus_url: str = Field("memory://", description="memory:// or kafka://host:port[?partitions=N]")
    database_url: str = Field(
        "sqlite+aiosqlite:///newsmon.db", description="SQLAlchemy async URL of the state store"
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    log_level: str = "INFO"
    shutdown_timeout_s: float = Field(
        20.0, gt=0, description="on SIGTERM, how long in-flight work may take to finish"
    )

    # operator API access
    api_keys: list[ApiKey] = Field(
        default=[], description='JSON list of {"name", "key", "role": "read"|"admin"}'
    )
    api_rate_per_minute: float = Field(600.0, gt=0, description="requests per minute per key")
    api_rate_burst: int = Field(60, ge=1)
    api_max_body_bytes: int = Field(1024 * 1024, ge=1024)

    feeds_file: Path = Path("seeds/feeds.toml")
    topics_file: Path = Path("seeds/topics.toml")
    subscriptions_file: Path = Path("seeds/subscriptions.toml")

    # ingest
    poll_interval_s: float = Field(600.0, gt=0, description="default seconds between polls")
    fetch_timeout_s: float = Field(20.0, gt=0, description="total deadline of one feed fetch")
    fetch_max_bytes: int = Field(15 * 1024 * 1024, gt=0)
    user_agent: str = "newsmon/0.1 (+https://github.com/newsmon/newsmon)"

    # classify
    model_device: Literal["cpu", "cuda"] = "cpu"
    classify_batch_size: int = Field(32, ge=1, le=1024)
    classify_batch_wait_s: float = Field(0.05, ge=0)

    # alerts
    webhook_timeout_s: float = Field(15.0, gt=0)
    webhook_retry_delays_s: list[float] = Field(
        default=[5.0, 60.0, 300.0], description="waits before the 2nd, 3rd … attempt"
    )
    delivery_concurrency: int = Field(64, ge=1)

    @field_validator("webhook_retry_delays_s")
    @classmethod
    def _non_negative(cls, delays: list[float]) -> list[float]:
        if any(d < 0 for d in delays):
            raise ValueError("retry delays must be >= 0")
        return delays

    @model_validator(mode="after")
    def _keys_unless_loopback(self) -> Settings:
        # An API without keys is only for a developer's own machine.
        if not self.api_keys and not _is_loopback(self.http_host):
            raise ValueError(
                f"NEWSMON_HTTP_HOST={self.http_host} is reachable from other machines: "
                "set NEWSMON_API_KEYS to protect the operator API"
            )
        names = [k.name for k in self.api_keys]
        if len(set(names)) != len(names):
            raise ValueError("API key names must be unique")
        return self


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
