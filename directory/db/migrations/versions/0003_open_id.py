"""rooms.opened_by: the open request that opened the room at opened_epoch.

A shard that retries an open whose answer it never got (a timeout) sends
the same ``open_id``; the directory then answers the same grant instead of
treating it as a new copy of the room (which would bump the epoch and make
the copy the shard already serves stale).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("opened_by", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("opened_by")
