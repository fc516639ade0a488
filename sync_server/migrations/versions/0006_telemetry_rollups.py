"""Telemetry for drift and quality: the new report fields on `telemetry` (mode, shadow_of, the channel at
receipt, low-confidence, fallback answers, disagreements, agreements, class counts, input statistics),
hourly rollup tables the summary and the quality figures are read from, and `model_versions.baseline`
(the manifest's "baseline", filled in for versions already published).

Existing telemetry rows are rolled up here too, so the summary keeps counting them.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ROLLUP_TABLES = (
    "telemetry_hourly_confidence",
    "telemetry_hourly_classes",
    "telemetry_hourly_input",
    "telemetry_hourly_devices",
    "telemetry_hourly",
)


def _key(*extra: sa.Column) -> list:
    return [
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("mode", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("hour", sa.BigInteger(), primary_key=True),
        *extra,
    ]


def _count(name: str) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")


def upgrade() -> None:
    op.add_column("model_versions", sa.Column("baseline", sa.JSON(), nullable=True))

    op.add_column("telemetry", sa.Column("mode", sa.String(16), nullable=False, server_default="serving"))
    op.add_column("telemetry", sa.Column("shadow_of", sa.Integer(), nullable=True))
    op.add_column("telemetry", sa.Column("channel", sa.String(64), nullable=True))
    op.add_column("telemetry", sa.Column("low_confidence", sa.BigInteger(), nullable=True))
    op.add_column("telemetry", _count("fallback_answers"))
    op.add_column("telemetry", _count("disagreements"))
    op.add_column("telemetry", _count("agreements"))
    op.add_column("telemetry", sa.Column("class_counts", sa.JSON(), nullable=True))
    op.add_column("telemetry", sa.Column("input_stats", sa.JSON(), nullable=True))
    op.create_index("ix_telemetry_received_at", "telemetry", ["received_at"])

    op.create_table(
        "telemetry_hourly",
        *_key(
            *(_count(name) for name in ("reports", "predictions", "fallbacks", "errors", "low_confidence",
                                        "low_confidence_predictions", "fallback_answers", "disagreements", "agreements")),
            sa.Column("latency_p50_weighted", sa.Float(), nullable=False, server_default="0"),
            _count("latency_p50_weight"),
            sa.Column("latency_p50_sum", sa.Float(), nullable=False, server_default="0"),
            _count("latency_p50_reports"),
            sa.Column("latency_p99_max", sa.Float(), nullable=True),
            sa.Column("histogram_bins", sa.Integer(), nullable=False, server_default="0"),
            sa.Column("class_slots", sa.Integer(), nullable=False, server_default="0"),
            _count("input_images"),
        ),
    )
    op.create_table("telemetry_hourly_confidence", *_key(sa.Column("bin", sa.Integer(), primary_key=True), _count("n")))
    op.create_table("telemetry_hourly_classes", *_key(sa.Column("class_index", sa.Integer(), primary_key=True), _count("n")))
    op.create_table(
        "telemetry_hourly_input",
        *_key(
            sa.Column("channel_index", sa.Integer(), primary_key=True),
            _count("pixels"),
            sa.Column("pixel_sum", sa.Float(), nullable=False, server_default="0"),
            sa.Column("pixel_sum_sq", sa.Float(), nullable=False, server_default="0"),
        ),
    )
    op.create_table(  # the hour second in the key: a window is one covering range of the biggest rollup
        "telemetry_hourly_devices",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("hour", sa.BigInteger(), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("mode", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(40), primary_key=True),
    )
    for table in _ROLLUP_TABLES:
        op.create_index(f"ix_{table}_hour", table, ["hour"])
    op.create_table(
        "telemetry_devices",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("mode", sa.String(16), primary_key=True),
        sa.Column("channel", sa.String(64), primary_key=True),
        sa.Column("device_id", sa.String(40), primary_key=True),
        sa.Column("first_hour", sa.BigInteger(), nullable=False),
        sa.Column("last_hour", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_telemetry_devices_last_hour", "telemetry_devices", ["last_hour"])

    bind = op.get_bind()
    _backfill_baselines(bind)
    _roll_up_existing(bind)


def _backfill_baselines(bind) -> None:  # type: ignore[no-untyped-def]
    versions = sa.table("model_versions", sa.column("id", sa.Integer()), sa.column("manifest", sa.JSON()),
                        sa.column("baseline", sa.JSON()))
    for row_id, manifest in bind.execute(sa.select(versions.c.id, versions.c.manifest)).all():
        baseline = (manifest or {}).get("baseline") if isinstance(manifest, dict) else None
        if isinstance(baseline, dict):
            bind.execute(versions.update().where(versions.c.id == row_id).values(baseline=baseline))


def _roll_up_existing(bind) -> None:  # type: ignore[no-untyped-def]
    """Roll up the telemetry stored before this migration (their channel: the device's channel now)."""
    from sync_server.telemetry import roll_up_existing

    roll_up_existing(bind, bind.dialect.name)


def downgrade() -> None:
    op.drop_index("ix_telemetry_devices_last_hour", table_name="telemetry_devices")
    op.drop_table("telemetry_devices")
    for table in _ROLLUP_TABLES:
        op.drop_index(f"ix_{table}_hour", table_name=table)
        op.drop_table(table)
    op.drop_index("ix_telemetry_received_at", table_name="telemetry")
    with op.batch_alter_table("telemetry") as batch:
        for column in ("input_stats", "class_counts", "agreements", "disagreements", "fallback_answers",
                       "low_confidence", "channel", "shadow_of", "mode"):
            batch.drop_column(column)
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("baseline")
