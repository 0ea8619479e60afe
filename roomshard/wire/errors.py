"""The contract's error body, ``{"error": {"code": ..., "message": ...}}``, built here only.

Every HTTP error of the directory and of the shard carries it (the shard's
own HTTP stack and the directory's Starlette app both encode it with
:func:`error_body`); the Python client reads it back with :class:`ErrorBody`.
"""

from __future__ import annotations

import msgspec


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str  # machine-readable, snake_case (the contract's table)
    message: str  # for people


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


_encode = msgspec.json.Encoder().encode


def error_body(code: str, message: str) -> bytes:
    """The JSON bytes of the error body."""
    return _encode(ErrorBody(error=ErrorDetail(code=code, message=message)))
