"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27 20:31:08.965884
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ingest_feeds",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("url", sa.String(length=2048), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("feed_title", sa.String(length=300), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("interval_s", sa.Float(), nullable=True),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("etag", sa.String(length=1024), nullable=True),
        sa.Column("last_modified", sa.String(length=256), nullable=True),
        sa.Column("last_polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fetches", sa.Integer(), nullable=False),
        sa.Column("not_modified", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("items_seen", sa.Integer(), nullable=False),
        sa.Column("items_published", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("url"),
    )
    with op.batch_alter_table("ingest_feeds", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ingest_feeds_next_poll_at"), ["next_poll_at"], unique=False
        )

    op.create_table(
        "ingest_seen_articles",
        sa.Column("article_id", sa.String(length=64), nullable=False),
        sa.Column("feed_url", sa.String(length=2048), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("article_id"),
    )
    with op.batch_alter_table("ingest_seen_articles", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_ingest_seen_articles_last_seen_at"), ["last_seen_at"], unique=False
        )

    op.create_table(
        "ingest_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=256), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "classify_matches",
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("topic_version", sa.Integer(), nullable=False),
        sa.Column("article_id", sa.String(length=128), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("link", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("matched_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", "topic"),
    )
    with op.batch_alter_table("classify_matches", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_classify_matches_article_id"), ["article_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_classify_matches_matched_at"), ["matched_at"], unique=False
        )

    op.create_table(
        "classify_recent",
        sa.Column("article_id", sa.String(length=128), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("link", sa.Text(), nullable=False),
        sa.Column("passages", sa.JSON(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("classified_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("article_id"),
    )
    with op.batch_alter_table("classify_recent", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_classify_recent_classified_at"), ["classified_at"], unique=False
        )

    op.create_table(
        "classify_state",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "classify_topics",
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition", sa.JSON(), nullable=False),
        sa.Column("deleted", sa.Boolean(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("slug"),
    )
    op.create_table(
        "alerts_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts_attempts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_alerts_attempts_delivery_id"), ["delivery_id"], unique=False
        )

    op.create_table(
        "alerts_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("article_id", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_alerts_deliveries_due", ["status", "next_attempt_at"], unique=False
        )
        batch_op.create_index(
            "ix_alerts_deliveries_subscription", ["subscription_id", "created_at"], unique=False
        )

    op.create_table(
        "alerts_meta",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "alerts_subscriptions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("channel", sa.String(length=16), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("email", sa.String(length=254), nullable=True),
        sa.Column("topics", sa.Text(), nullable=False),
        sa.Column("min_score", sa.Float(), nullable=False),
        sa.Column("mode", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.Text(), nullable=True),
        sa.Column("previous_secret", sa.Text(), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("unsubscribe_token", sa.String(length=64), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("unsubscribe_token"),
    )


def downgrade() -> None:
    op.drop_table("alerts_subscriptions")
    op.drop_table("alerts_meta")
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_deliveries_subscription")
        batch_op.drop_index("ix_alerts_deliveries_due")

    op.drop_table("alerts_deliveries")
    with op.batch_alter_table("alerts_attempts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alerts_attempts_delivery_id"))

    op.drop_table("alerts_attempts")
    op.drop_table("classify_topics")
    op.drop_table("classify_state")
    with op.batch_alter_table("classify_recent", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_classify_recent_classified_at"))

    op.drop_table("classify_recent")
    with op.batch_alter_table("classify_matches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_classify_matches_matched_at"))
        batch_op.drop_index(batch_op.f("ix_classify_matches_article_id"))

    op.drop_table("classify_matches")
    op.drop_table("ingest_state")
    with op.batch_alter_table("ingest_seen_articles", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingest_seen_articles_last_seen_at"))

    op.drop_table("ingest_seen_articles")
    with op.batch_alter_table("ingest_feeds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_ingest_feeds_next_poll_at"))

    op.drop_table("ingest_feeds")
