"""PostgreSQL: notify every directory replica of the changes a connect depends on.

Triggers that ``pg_notify`` when a room's owner, epoch, privacy or members
change or the room is deleted (channel ``roomshard_rooms``, the room id), and
when an instance's state, addresses or process change or it is deleted
(``roomshard_instances``, the instance id; a new instance too). Heartbeats (``last_heartbeat``,
load) and a shard's opens (``opened_epoch``) notify nothing. The directory's
room cache (``directory.db.room_cache``) forgets what is named, so it is
right whichever replica, or anyone else, made the change. SQLite: nothing
(one process; it reads its own database at once).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ROOMS_CHANGED = """
CREATE OR REPLACE FUNCTION roomshard_room_changed() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('roomshard_rooms', OLD.room);
  RETURN NULL;
END $$ LANGUAGE plpgsql
"""
_INSTANCES_CHANGED = """
CREATE OR REPLACE FUNCTION roomshard_instance_changed() RETURNS trigger AS $$
BEGIN
  PERFORM pg_notify('roomshard_instances', COALESCE(OLD.id, NEW.id));
  RETURN NULL;
END $$ LANGUAGE plpgsql
"""
_TRIGGERS = [
    """CREATE TRIGGER roomshard_rooms_updated AFTER UPDATE ON rooms FOR EACH ROW
       WHEN (OLD.instance IS DISTINCT FROM NEW.instance OR OLD.epoch IS DISTINCT FROM NEW.epoch
             OR OLD.private IS DISTINCT FROM NEW.private
             OR OLD.members::text IS DISTINCT FROM NEW.members::text)
       EXECUTE FUNCTION roomshard_room_changed()""",
    """CREATE TRIGGER roomshard_rooms_deleted AFTER DELETE ON rooms FOR EACH ROW
       EXECUTE FUNCTION roomshard_room_changed()""",
    """CREATE TRIGGER roomshard_instances_updated AFTER UPDATE ON instances FOR EACH ROW
       WHEN (OLD.state IS DISTINCT FROM NEW.state
             OR OLD.state_reason IS DISTINCT FROM NEW.state_reason
             OR OLD.internal_url IS DISTINCT FROM NEW.internal_url
             OR OLD.public_base IS DISTINCT FROM NEW.public_base
             OR OLD.boot_id IS DISTINCT FROM NEW.boot_id)
       EXECUTE FUNCTION roomshard_instance_changed()""",
    """CREATE TRIGGER roomshard_instances_deleted AFTER DELETE ON instances FOR EACH ROW
       EXECUTE FUNCTION roomshard_instance_changed()""",
    """CREATE TRIGGER roomshard_instances_inserted AFTER INSERT ON instances FOR EACH ROW
       EXECUTE FUNCTION roomshard_instance_changed()""",
]
_DROP = [
    "DROP TRIGGER IF EXISTS roomshard_rooms_updated ON rooms",
    "DROP TRIGGER IF EXISTS roomshard_rooms_deleted ON rooms",
    "DROP TRIGGER IF EXISTS roomshard_instances_updated ON instances",
    "DROP TRIGGER IF EXISTS roomshard_instances_deleted ON instances",
    "DROP TRIGGER IF EXISTS roomshard_instances_inserted ON instances",
    "DROP FUNCTION IF EXISTS roomshard_room_changed()",
    "DROP FUNCTION IF EXISTS roomshard_instance_changed()",
]


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in (_ROOMS_CHANGED, _INSTANCES_CHANGED, *_TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for statement in _DROP:
        op.execute(statement)
