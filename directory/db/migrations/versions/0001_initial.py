"""Initial schema: instances and rooms.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(8), primary_key=True),
        sa.Column("number", sa.Integer, nullable=False),
        sa.Column("internal_url", sa.Text, nullable=False),
        sa.Column("public_base", sa.Text),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.String(32)),
        sa.Column("boot_id", sa.String(128)),
        sa.Column("registered_at", sa.Double, nullable=False),
        sa.Column("last_heartbeat", sa.Double),
        sa.Column("load_rooms", sa.Integer, nullable=False, server_default="0"),
        sa.Column("load_connections", sa.Integer, nullable=False, server_default="0"),
        sa.Column("load_messages_per_s", sa.Double, nullable=False, server_default="0"),
        sa.Column("rooms_assigned", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "rooms",
        sa.Column("room", sa.String(64), primary_key=True),
        sa.Column("instance", sa.String(8)),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("owner_epoch", sa.BigInteger, nullable=False),
        sa.Column("opened_epoch", sa.BigInteger),
        sa.Column("seq_base", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("state", sa.String(16), nullable=False, server_default="active"),
        sa.Column("move_to", sa.String(8)),
        sa.Column("private", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("members", sa.JSON),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_index("ix_rooms_instance", "rooms", ["instance"])


def downgrade() -> None:
    op.drop_index("ix_rooms_instance", "rooms")
    op.drop_table("rooms")
    op.drop_table("instances")
