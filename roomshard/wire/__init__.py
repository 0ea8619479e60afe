"""What crosses the wire, defined once, for every side (the shared bottom layer).

- :mod:`roomshard.wire.errors`: the contract's error body, built here only;
- :mod:`roomshard.wire.internal`: the bodies of directory <-> shard calls, one
  msgspec Struct each, used by the side that sends and the side that reads.

Nothing here imports the directory, the shard or the command line.
"""
