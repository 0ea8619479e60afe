"""retired_processes: shard processes whose instance an admin removed from the registry.

``DELETE /v1/admin/instances/iN`` records the instance's current process
(its ``boot_id``). A heartbeat that would register the instance again from
that very process is refused (409 ``instance_retired``): a retired shard that
is still running (its machine not terminated yet) cannot put itself back into
the registry, and so back into the load balancer, after an operator or
``roomshard admin retire`` removed it. A new process (a restart, a new
machine) has a new boot id and registers as any other.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_processes",
        sa.Column("boot_id", sa.String(128), primary_key=True),
        sa.Column("instance", sa.String(8), nullable=False),
        sa.Column("retired_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_processes")
