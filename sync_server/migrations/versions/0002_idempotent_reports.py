"""Idempotent telemetry and counted rollbacks: `telemetry.idempotency_key`, unique per device, and
`device_status.rolled_back` (false for the rows already there).

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("telemetry", sa.Column("idempotency_key", sa.String(64), nullable=True))
    op.create_index(
        "uq_telemetry_device_idempotency_key", "telemetry", ["device_id", "idempotency_key"], unique=True
    )
    op.add_column(
        "device_status", sa.Column("rolled_back", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table("device_status") as batch:
        batch.drop_column("rolled_back")
    op.drop_index("uq_telemetry_device_idempotency_key", table_name="telemetry")
    with op.batch_alter_table("telemetry") as batch:
        batch.drop_column("idempotency_key")
