/**
 * The client's errors, one tree:
 *
 *     RoomshardError
 *     ├── ConnectRefused        the directory said no for good (4xx): bad room or user id,
 *     │                         bad credentials, a private room, ...; the session ends
 *     ├── DirectoryUnavailable  the directory could not answer now (5xx, 429, network);
 *     │                         the session retries after `retryAfter`, with jitter
 *     ├── SendRefused           the shard refused one message for good (`too_long`, ...)
 *     └── SessionClosed         the session ended (closed by the application, or a close
 *                               code that says "fix the client", 1009)
 *
 * HTTP and WebSocket outcomes are translated into these at the boundary
 * (`directory.ts`, `session.ts`); nothing else is thrown at the application.
 */

export class RoomshardError extends Error {
  override name = 'RoomshardError';
}

/** A final answer of the directory (4xx): asking again will not help. */
export class ConnectRefused extends RoomshardError {
  override name = 'ConnectRefused';
  constructor(
    /** The HTTP status (400, 401, 403, 404, ...). */
    readonly status: number,
    /** The contract's error code (`invalid_room`, `unauthorized`, `forbidden`, ...). */
    readonly code: string,
    message: string,
  ) {
    super(`${status} ${code}: ${message}`);
  }
}

/** The directory did not answer now (5xx, 429, a network error): retry after `retryAfter`. */
export class DirectoryUnavailable extends RoomshardError {
  override name = 'DirectoryUnavailable';
  constructor(
    message: string,
    /** Seconds the directory asked to wait (`Retry-After`), or null. */
    readonly retryAfter: number | null = null,
  ) {
    super(message);
  }
}

/** The shard refused this message for good (`too_long`, `bad_request`): it was not sent. */
export class SendRefused extends RoomshardError {
  override name = 'SendRefused';
  constructor(readonly code: string, message: string) {
    super(`${code}: ${message}`);
  }
}

/** The session has ended: nothing more is sent or received. */
export class SessionClosed extends RoomshardError {
  override name = 'SessionClosed';
}
