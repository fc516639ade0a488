"""Enrolment tokens: expiring, revocable, counted credentials an admin creates for the people who set
devices up, so one leaked secret does not open the whole fleet. `devices.enrollment_token_id` names the
token a device enrolled with (null: the fleet secret).

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", sa.String(24), primary_key=True),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), nullable=True),
        sa.Column("channel", sa.String(64), nullable=True),
        sa.Column("note", sa.String(200), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.add_column("devices", sa.Column("enrollment_token_id", sa.String(24), nullable=True))
    op.create_index("ix_devices_enrollment_token_id", "devices", ["enrollment_token_id"])


def downgrade() -> None:
    op.drop_index("ix_devices_enrollment_token_id", table_name="devices")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("enrollment_token_id")
    op.drop_table("enrollment_tokens")
