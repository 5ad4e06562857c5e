"""Alerts' tables: subscriptions, one row per delivery, every attempt of each, the stories
each subscription was alerted of, each subscription's budget count, and a marker.

Two stores share them: ``subscription_store`` (who hears what) and ``delivery_store`` (what is
owed to whom, and each attempt).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from newsmon.db import UTCDateTime

metadata = MetaData()

subscriptions = Table(
    "alerts_subscriptions",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("channel", String(16), nullable=False),
    Column("url", Text),
    Column("email", String(254)),
    Column("topics", Text, nullable=False),  # JSON list of slugs; [] means all
    Column("min_score", Float, nullable=False),
    Column("mode", String(16), nullable=False),
    Column("grouping", String(16), nullable=False, server_default="story"),
    Column("budget", Text),  # JSON Budget, or null
    Column("quiet_hours", Text),  # JSON QuietHours, or null
    Column("secret", Text),
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", UTCDateTime()),
    Column("unsubscribe_token", String(64), nullable=False, unique=True),
    Column("paused", Boolean, nullable=False),
    Column("paused_reason", Text),
    Column("disabled_reason", Text),
    Column("disabled_at", UTCDateTime()),
    Column("failing_since", UTCDateTime()),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

deliveries = Table(
    "alerts_deliveries",
    metadata,
    # Derived from (subscription, article, topic): the same match can only ever insert one row.
    Column("id", String(40), primary_key=True),
    Column("subscription_id", String(64), nullable=False),
    Column("article_id", String(64), nullable=False),
    Column("topic", String(64), nullable=False),
    # held (until next_attempt_at) | pending | delivered | dead | suppressed (a story's
    # later article: no alert of its own)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),  # in this round (retry resets)
    Column("next_attempt_at", UTCDateTime(), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("last_error", Text),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("story_id", String(128)),  # the story the article belongs to (itself, if none)
    # Why it was (or is) held: quiet_hours | budget; held deliveries go out together.
    Column("held_reason", String(16)),
    Index("ix_alerts_deliveries_due", "status", "next_attempt_at"),
    Index("ix_alerts_deliveries_story", "story_id"),
    Index("ix_alerts_deliveries_subscription", "subscription_id", "created_at"),
    # One subscription's due deliveries, found without the due index: PostgreSQL plans a
    # dispatcher query over both tables as a loop over subscriptions when its statistics are
    # missing or old (a new database, a burst of matches), and without this index each turn
    # of that loop reads every due delivery.
    Index("ix_alerts_deliveries_subscription_due", "subscription_id", "status", "next_attempt_at"),
)

attempts = Table(
    "alerts_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), nullable=False, index=True),
    Column("attempted_at", UTCDateTime(), nullable=False),
    Column("status_code", Integer),  # HTTP status or SMTP reply code; None: no reply
    Column("latency_ms", Float, nullable=False),
    Column("error", Text),  # None: the attempt succeeded
)

# A subscription's claim on a story for a topic: "story" (its first alert) or "update:<digest of
# what is new>" (an alert of a development). The primary key makes each claim once, whatever
# the processes racing for it; delivery_id is the alert that holds it.
story_claims = Table(
    "alerts_story_claims",
    metadata,
    Column("subscription_id", String(64), primary_key=True),
    Column("topic", String(64), primary_key=True),
    Column("story_id", String(128), primary_key=True),
    Column("claim", String(64), primary_key=True),
    Column("delivery_id", String(40), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
)

# Alerts a subscription with a budget was sent at once in its current budget period; the row
# is also the lock that makes two processes count one budget.
budgets = Table(
    "alerts_budgets",
    metadata,
    Column("subscription_id", String(64), primary_key=True),
    Column("period_start", UTCDateTime()),
    Column("used", Integer, nullable=False),
)

meta = Table(
    "alerts_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

SEEDED = "seeded_at"
