"""Errors of the client library.

::

    ClientError              anything the session reports to the application
      ConnectRefused         the directory refused for good (400/401/403/404): code, message, status
      DirectoryUnavailable   the directory could not be reached or answered 5xx (retried)
      SendRefused            the shard refused one send (too_long, bad_request)
      SessionClosed          the session ended before this send was acked
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of every error the client library raises."""


class ConnectRefused(ClientError):
    """The directory refused the connect for a reason retrying cannot fix."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class DirectoryUnavailable(ClientError):
    """The directory could not be reached, or answered 5xx; ``retry_after`` in seconds if it said."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SendRefused(ClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class SessionClosed(ClientError):
    """The session is closed; ``reason`` says why (the user closed it, or a fatal error)."""
