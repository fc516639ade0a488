"""Status reports count once: `device_status.report_key` keeps the idempotency key of the report that
last changed the row, so a resent copy (the agent's outbox resends until it sees an answer) is
recognised and does not count as a fresh failure after a paused rollout is resumed.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("device_status", sa.Column("report_key", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("device_status") as batch:
        batch.drop_column("report_key")
