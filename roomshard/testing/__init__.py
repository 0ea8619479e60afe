"""Helpers shared by ``tests/`` and ``bench/``: real processes, a throwaway PostgreSQL, time bounds.

- :mod:`roomshard.testing.timing`: every time bound in one unit CI can scale
  (``ROOMSHARD_TEST_TIME_SCALE``), and polling for a condition instead of
  sleeping;
- :mod:`roomshard.testing.procs`: start ``roomshard directory`` and
  ``roomshard shard`` on loopback and stop every process started;
- :mod:`roomshard.testing.pg`: a PostgreSQL server in a temporary directory;
- :mod:`roomshard.testing.chatter`: a raw chat client that records every
  frame, for checking the no-loss and no-duplicate guarantees.
"""
