"""room_counts: the new-room counts of each instance, in slots (PostgreSQL's placements).

An instance's rooms are ``instances.rooms_assigned`` plus the sum of its
``room_counts`` slots. A new room on PostgreSQL adds 1 to one slot (the
placing backend's ``pg_backend_pid() % 16``) in the statement that inserts
it, instead of to the instance's row: every placement on an instance had
waited for the one before it to commit (the row lock on ``instances`` is held
through the commit's WAL flush), so a storm's new rooms were placed one flush
at a time. Slots let concurrent placements commit together; the count stays
exact (each slot moves in the transaction that inserts the room). Moves,
re-placements and removals keep counting on ``instances.rooms_assigned``.
The start-up recount folds the slots back into it. SQLite (one writer)
leaves the table empty.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "room_counts",
        sa.Column("instance", sa.String(8), primary_key=True),
        sa.Column("slot", sa.Integer, primary_key=True),
        sa.Column("rooms", sa.Integer, nullable=False, server_default="0"),
    )


def downgrade() -> None:
    op.drop_table("room_counts")
