"""Rollout modes and quality gates: a channel's rollout is `canary` (null, as before) or `shadow` (the
candidate runs beside the channel's version on `rollout_sample_rate` of a device's requests), and may
carry its own overrides of the server's quality gates (`rollout_gates`, JSON).

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("channels", sa.Column("rollout_mode", sa.String(16), nullable=True))
    op.add_column("channels", sa.Column("rollout_sample_rate", sa.Float(), nullable=True))
    op.add_column("channels", sa.Column("rollout_gates", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("channels") as batch:
        batch.drop_column("rollout_gates")
        batch.drop_column("rollout_sample_rate")
        batch.drop_column("rollout_mode")
