"""classify: stories (matching articles about one event, grouped across feeds and outlets)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-16 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "classify_stories",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("first_article_id", sa.String(length=128), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("article_count", sa.Integer(), nullable=False),
        sa.Column("updates", sa.Integer(), nullable=False),
        sa.Column("vector_sum", sa.LargeBinary(), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("topics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_classify_stories_last_seen", "classify_stories", ["last_seen"])
    op.create_table(
        "classify_story_articles",
        sa.Column("article_id", sa.String(length=128), nullable=False),
        sa.Column("story_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("link", sa.Text(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("published", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update", sa.Boolean(), nullable=False),
        sa.Column("new", sa.JSON(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("similarity", sa.Float(), nullable=True),
        sa.Column("topics", sa.JSON(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("joined_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("article_id"),
    )
    op.create_index(
        "ix_classify_story_articles_story", "classify_story_articles", ["story_id", "position"]
    )
    op.create_table(
        "classify_story_topics",
        sa.Column("story_id", sa.String(length=32), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("story_id", "topic"),
    )
    op.create_index("ix_classify_story_topics_topic", "classify_story_topics", ["topic"])


def downgrade() -> None:
    op.drop_index("ix_classify_story_topics_topic", table_name="classify_story_topics")
    op.drop_table("classify_story_topics")
    op.drop_index("ix_classify_story_articles_story", table_name="classify_story_articles")
    op.drop_table("classify_story_articles")
    op.drop_index("ix_classify_stories_last_seen", table_name="classify_stories")
    op.drop_table("classify_stories")
