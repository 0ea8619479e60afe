"""The message store: rooms' messages beyond a shard's memory (``ROOMSHARD_HISTORY_URL``).

- :mod:`roomshard.store.tables`: the ``messages`` table (one row per message,
  keyed by room and seq) and its migrations, run at start-up like the
  directory's; the store may share the directory's database;
- :mod:`roomshard.store.messages`: :class:`~roomshard.store.messages.MessageStore`,
  the reads and writes (a batch of messages in one transaction; a room's
  tail, what follows a seq, what precedes one; expiry in bounded batches);
- :mod:`roomshard.store.commit`: :class:`~roomshard.store.commit.GroupCommit`,
  which writes whatever arrived while the previous batch was being written
  as the next batch (group commit), in order, retrying a failed batch until
  the store is back, and says when what waits has outgrown its bounds.

Both services use it: a shard writes and recovers its rooms, the directory
reads history. See docs/STORE.md.
"""
