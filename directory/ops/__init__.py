"""The directory's operations: the move driver, drains and rebalances (database and shards)."""
