"""ix_rooms_unused: the rooms no shard ever opened, by age (the unused-room sweep).

A partial index (PostgreSQL and SQLite both have them): it holds only rooms
whose ``opened_epoch`` is NULL, so the sweep that removes rooms nobody joined
(``ROOMSHARD_ROOM_UNUSED_TTL``) reads a few index entries, not the table.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    unopened = sa.text("opened_epoch IS NULL")
    op.create_index("ix_rooms_unused", "rooms", ["created_at"],
                    postgresql_where=unopened, sqlite_where=unopened)


def downgrade() -> None:
    op.drop_index("ix_rooms_unused", table_name="rooms")
