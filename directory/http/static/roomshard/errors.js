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
    name = 'RoomshardError';
}
/** A final answer of the directory (4xx): asking again will not help. */
export class ConnectRefused extends RoomshardError {
    status;
    code;
    name = 'ConnectRefused';
    constructor(
    /** The HTTP status (400, 401, 403, 404, ...). */
    status, 
    /** The contract's error code (`invalid_room`, `unauthorized`, `forbidden`, ...). */
    code, message) {
        super(`${status} ${code}: ${message}`);
        this.status = status;
        this.code = code;
    }
}
/** The directory did not answer now (5xx, 429, a network error): retry after `retryAfter`. */
export class DirectoryUnavailable extends RoomshardError {
    retryAfter;
    name = 'DirectoryUnavailable';
    constructor(message, 
    /** Seconds the directory asked to wait (`Retry-After`), or null. */
    retryAfter = null) {
        super(message);
        this.retryAfter = retryAfter;
    }
}
/** The shard refused this message for good (`too_long`, `bad_request`): it was not sent. */
export class SendRefused extends RoomshardError {
    code;
    name = 'SendRefused';
    constructor(code, message) {
        super(`${code}: ${message}`);
        this.code = code;
    }
}
/** The session has ended: nothing more is sent or received. */
export class SessionClosed extends RoomshardError {
    name = 'SessionClosed';
}
