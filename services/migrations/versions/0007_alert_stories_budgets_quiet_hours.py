"""alerts: one alert per story, budgets, quiet hours

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-16 12:00:00

Subscriptions gain ``grouping`` (existing ones hear once per story, the new default),
``budget`` and ``quiet_hours``; deliveries gain the story they belong to and why they are held;
the stories each subscription was alerted of, and each budget's count, get tables of their own.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts_subscriptions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("grouping", sa.String(length=16), nullable=False, server_default="story")
        )
        batch_op.add_column(sa.Column("budget", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("quiet_hours", sa.Text(), nullable=True))
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("story_id", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("held_reason", sa.String(length=16), nullable=True))
        batch_op.create_index("ix_alerts_deliveries_story", ["story_id"], unique=False)
    op.create_table(
        "alerts_story_claims",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("topic", sa.String(length=64), nullable=False),
        sa.Column("story_id", sa.String(length=128), nullable=False),
        sa.Column("claim", sa.String(length=64), nullable=False),
        sa.Column("delivery_id", sa.String(length=40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", "topic", "story_id", "claim"),
    )
    op.create_table(
        "alerts_budgets",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id"),
    )


def downgrade() -> None:
    op.drop_table("alerts_budgets")
    op.drop_table("alerts_story_claims")
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_deliveries_story")
        batch_op.drop_column("held_reason")
        batch_op.drop_column("story_id")
    with op.batch_alter_table("alerts_subscriptions", schema=None) as batch_op:
        batch_op.drop_column("quiet_hours")
        batch_op.drop_column("budget")
        batch_op.drop_column("grouping")
