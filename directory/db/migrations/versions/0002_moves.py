"""Live moves: one row per room handoff, with a lease for the replica driving it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "moves",
        sa.Column("move_id", sa.String(32), primary_key=True),
        sa.Column("room", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Column("lease_owner", sa.String(64)),
        sa.Column("lease_until", sa.Double, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("ix_moves_state", "moves", ["state"])
    op.create_index("ix_moves_room", "moves", ["room"])


def downgrade() -> None:
    op.drop_index("ix_moves_room", "moves")
    op.drop_index("ix_moves_state", "moves")
    op.drop_table("moves")
