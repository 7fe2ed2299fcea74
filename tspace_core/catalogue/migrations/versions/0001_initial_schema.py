"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", sa.Double(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("job", sa.String(), nullable=True),
        sa.Column("unit", sa.Integer(), nullable=True),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("job_hash", sa.String(), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("name", name=op.f("uq_jobs_name")),
    )
    op.create_table(
        "workers",
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(), nullable=False),
        sa.Column("credential_hash", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("registered_at", sa.Double(), nullable=False),
        sa.Column("last_seen", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_workers")),
        sa.UniqueConstraint("credential_hash", name=op.f("uq_workers_credential_hash")),
        sa.UniqueConstraint("key_id", name=op.f("uq_workers_key_id")),
    )
    op.create_table(
        "ensembles",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_ensembles_job_id_jobs")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_ensembles")),
    )
    op.create_table(
        "shards",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_shards_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_shards")),
        sa.UniqueConstraint("job_id", "position", name=op.f("uq_shards_job_id_position")),
    )
    op.create_table(
        "tokens",
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("site", sa.String(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("used_at", sa.Double(), nullable=True),
        sa.Column("worker_id", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.worker_id"], name=op.f("fk_tokens_worker_id_workers")
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_tokens")),
    )
    op.create_table(
        "units",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("unit", sa.Integer(), nullable=False),
        sa.Column("timesteps", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_units_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_units")),
        sa.UniqueConstraint("job_id", "unit", name=op.f("uq_units_job_id_unit")),
    )
    op.create_index(op.f("ix_units_status"), "units", ["status"], unique=False)

    op.create_table(
        "checkpoints",
        sa.Column("sha256", sa.String(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("statement", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("shards_seen", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(
            ["unit_id"], ["units.id"], name=op.f("fk_checkpoints_unit_id_units")
        ),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.worker_id"], name=op.f("fk_checkpoints_worker_id_workers")
        ),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_checkpoints")),
    )
    op.create_index(
        op.f("ix_checkpoints_unit_id_step"), "checkpoints", ["unit_id", "step"], unique=False
    )
    op.create_index(op.f("ix_checkpoints_worker_id"), "checkpoints", ["worker_id"], unique=False)

    op.create_table(
        "ensemble_members",
        sa.Column("ensemble", sa.String(), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(), nullable=False),
        sa.ForeignKeyConstraint(
            ["checkpoint_sha256"],
            ["checkpoints.sha256"],
            name=op.f("fk_ensemble_members_checkpoint_sha256_checkpoints"),
        ),
        sa.ForeignKeyConstraint(
            ["ensemble"], ["ensembles.name"], name=op.f("fk_ensemble_members_ensemble_ensembles")
        ),
        sa.ForeignKeyConstraint(
            ["unit_id"], ["units.id"], name=op.f("fk_ensemble_members_unit_id_units")
        ),
        sa.PrimaryKeyConstraint("ensemble", "unit_id", name=op.f("pk_ensemble_members")),
    )
    op.create_table(
        "leases",
        sa.Column("lease_id", sa.String(), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("worker_id", sa.String(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Double(), nullable=False),
        sa.Column("images_per_s", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(
            ["checkpoint_sha256"],
            ["checkpoints.sha256"],
            name=op.f("fk_leases_checkpoint_sha256_checkpoints"),
        ),
        sa.ForeignKeyConstraint(["unit_id"], ["units.id"], name=op.f("fk_leases_unit_id_units")),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.worker_id"], name=op.f("fk_leases_worker_id_workers")
        ),
        sa.PrimaryKeyConstraint("lease_id", name=op.f("pk_leases")),
    )
    op.create_index(op.f("ix_leases_status"), "leases", ["status"], unique=False)
    op.create_index(op.f("ix_leases_unit_id"), "leases", ["unit_id"], unique=False)
    op.create_index(op.f("ix_leases_worker_id"), "leases", ["worker_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_leases_worker_id"), table_name="leases")
    op.drop_index(op.f("ix_leases_unit_id"), table_name="leases")
    op.drop_index(op.f("ix_leases_status"), table_name="leases")

    op.drop_table("leases")
    op.drop_table("ensemble_members")
    op.drop_index(op.f("ix_checkpoints_worker_id"), table_name="checkpoints")
    op.drop_index(op.f("ix_checkpoints_unit_id_step"), table_name="checkpoints")

    op.drop_table("checkpoints")
    op.drop_index(op.f("ix_units_status"), table_name="units")

    op.drop_table("units")
    op.drop_table("tokens")
    op.drop_table("shards")
    op.drop_table("ensembles")
    op.drop_table("workers")
    op.drop_table("jobs")
    op.drop_table("events")
