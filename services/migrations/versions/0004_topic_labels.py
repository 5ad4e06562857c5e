"""classify: operators' labels, calibrated topic thresholds, decisions kept with recent articles

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-15 12:00:00

A stored topic's threshold was a raw similarity vote; it becomes the topic's calibration
midpoint (the vote at which it is as likely relevant as not), and the threshold becomes the
calibrated confidence 0.5 that the midpoint maps to — every topic decides exactly as before.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_topics = sa.table(
    "classify_topics",
    sa.column("slug", sa.String(64)),
    sa.column("definition", sa.JSON()),
)


def _rewrite(change: Any) -> None:
    conn = op.get_bind()
    for slug, definition in conn.execute(sa.select(_topics.c.slug, _topics.c.definition)):
        conn.execute(
            _topics.update()
            .where(_topics.c.slug == slug)
            .values(definition=change(dict(definition)))
        )


def _calibrated(definition: dict[str, Any]) -> dict[str, Any]:
    if "midpoint" not in definition:
        definition["midpoint"] = definition["threshold"]
        definition["threshold"] = 0.5
    return definition


def _raw(definition: dict[str, Any]) -> dict[str, Any]:
    midpoint = definition.pop("midpoint", None)
    if midpoint is not None:
        definition["threshold"] = midpoint
    definition.pop("status", None)
    return definition


def upgrade() -> None:
    op.create_table(
        "classify_labels",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("article_id", sa.String(length=128), nullable=False),
        sa.Column("relevant", sa.Boolean(), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("link", sa.Text(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=False),
        sa.Column("passages", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("subscription_id", sa.String(length=64), nullable=True),
        sa.Column("topic_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("undone_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("undone_by", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("classify_labels", schema=None) as batch_op:
        batch_op.create_index(
            "ix_classify_labels_topic_article", ["topic", "article_id"], unique=False
        )
        batch_op.create_index(
            "ix_classify_labels_topic_created", ["topic", "created_at"], unique=False
        )
    with op.batch_alter_table("classify_recent", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scores", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("article", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("fetched_at", sa.DateTime(timezone=True), nullable=True))
    _rewrite(_calibrated)


def downgrade() -> None:
    _rewrite(_raw)
    with op.batch_alter_table("classify_recent", schema=None) as batch_op:
        batch_op.drop_column("fetched_at")
        batch_op.drop_column("article")
        batch_op.drop_column("scores")
    with op.batch_alter_table("classify_labels", schema=None) as batch_op:
        batch_op.drop_index("ix_classify_labels_topic_created")
        batch_op.drop_index("ix_classify_labels_topic_article")
    op.drop_table("classify_labels")
