"""alerts: an index of each subscription's due deliveries

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08 12:00:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.create_index(
            "ix_alerts_deliveries_subscription_due",
            ["subscription_id", "status", "next_attempt_at"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("alerts_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_deliveries_subscription_due")
