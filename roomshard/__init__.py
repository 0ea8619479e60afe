"""roomshard: room-sharded WebSocket chat.

Shared pieces used by both the directory and the shards live in this package:
what crosses the wire (:mod:`roomshard.wire`: the protocol constants, ticket
and cluster token signing, the error body, the directory <-> shard bodies), configuration
(:mod:`roomshard.config`) and the command line (:mod:`roomshard.cli`).
"""

__version__ = "0.1.0"
