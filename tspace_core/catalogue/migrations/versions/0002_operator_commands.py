"""operator commands: token creation and revocation times, discarded checkpoints, aliases

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # batch mode: SQLite cannot add a column with a constraint in place.
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("created_at", sa.Double(), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.Double(), nullable=True))
    with op.batch_alter_table("checkpoints") as batch:
        batch.add_column(
            sa.Column("discarded", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_table(
        "aliases",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("ensemble", sa.String(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["ensemble"], ["ensembles.name"], name=op.f("fk_aliases_ensemble_ensembles")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_aliases")),
    )


def downgrade() -> None:
    op.drop_table("aliases")
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_column("discarded")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("revoked_at")
        batch.drop_column("created_at")
