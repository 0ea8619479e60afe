"""roomshard: room-sharded WebSocket chat.

Shared pieces used by both the directory and the shards live in this package:
the wire protocol constants (:mod:`roomshard.protocol`), ticket and cluster
token signing (:mod:`roomshard.tickets`), configuration
(:mod:`roomshard.config`) and the command line (:mod:`roomshard.cli`).
"""

__version__ = "0.1.0"
