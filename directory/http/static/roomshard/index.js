/**
 * roomshard's client for browsers and Node: `connect({directoryUrl, room, user})`.
 *
 * ```js
 * import { connect } from 'roomshard';
 * const session = connect({ directoryUrl: 'https://chat.example.com', room: 'lobby', user: 'alice' });
 * session.on('message', (m) => console.log(m.seq, m.user, m.text));
 * await session.ready();
 * const { seq } = await session.send('hello');
 * ```
 */
export { connect, Session, newId, RATE_LIMITED_RETRY_S, PACED_INTERVAL_S, PACED_FOR_S, UNAVAILABLE_RETRY_S } from './session.js';
export { Inbox, SEEN_IDS_WINDOW } from './inbox.js';
export { Outbox } from './outbox.js';
export { afterRetryAfter, Backoff, CloseCode, decide, DEFAULT_BACKOFF, POLICY_FLOOR_S, TRY_AGAIN_FLOOR_S } from './reconnect.js';
export { history, resolve, withSince } from './directory.js';
export { ConnectRefused, DirectoryUnavailable, RoomshardError, SendRefused, SessionClosed } from './errors.js';
