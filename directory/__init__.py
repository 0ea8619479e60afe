"""The roomshard directory: rooms -> instances, tickets, the admin API.

Modules, one concept each: ``db`` (tables, engine, migrations), ``placement``
(pure choice of an instance), ``registry`` (pure instance state rules),
``store`` (the SQL), ``auth``, ``shards`` (calls to shards), ``api_*`` (HTTP
routes), ``openapi``, ``metrics``, ``app`` (assembly), ``main`` (process).
"""
