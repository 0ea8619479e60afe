/**
 * What a client does when its connection ends: the contract's close-code table as data.
 *
 * Theory of operation: every reconnect asks the directory again (a ticket is
 * accepted once, so an old URL is never reused) and resumes with `since` =
 * the last seq seen. Close codes only change *how soon* and what the user is
 * shown: a stale route (4001/4003/4004) or a clean shard stop (1001) is
 * retried at once, a move (4010) too but shows "moving", a shard that is not
 * ready (1013) gets a short wait, a policy close (4008) or a lost connection
 * gets the exponential backoff, and a frame-too-big close (1009) is the
 * client's own bug, so it stops. Every wait has jitter, so that the thousands
 * of clients of one shard that stopped, or that a directory shed with the same
 * `Retry-After`, spread out instead of coming back in one wave.
 *
 * Pure: no sockets, no clock, no randomness (the caller passes `rand`).
 * The same table as the Python client's `roomshard.client.reconnect`.
 */
/** The close codes of the contract's table. */
export const CloseCode = {
    NORMAL: 1000,
    GOING_AWAY: 1001,
    ABNORMAL: 1006,
    MESSAGE_TOO_BIG: 1009,
    TRY_AGAIN_LATER: 1013,
    TICKET_INVALID: 4001,
    TICKET_MISMATCH: 4003,
    NOT_OWNER: 4004,
    POLICY: 4008,
    SLOW_CONSUMER: 4009,
    ROOM_MOVED: 4010,
};
/** 1013 means "not ready yet / mid-move": a move pauses a room for well under a second. */
export const TRY_AGAIN_FLOOR_S = 0.1;
/** 4008 means we were too fast: wait at least a second before coming back. */
export const POLICY_FLOOR_S = 1.0;
function retry(minDelay, moving, reason) {
    return Object.freeze({ action: 'retry', minDelay, backoff: true, moving, reason });
}
const TABLE = new Map([
    [CloseCode.TICKET_INVALID, retry(0, false, 'ticket refused')],
    [CloseCode.TICKET_MISMATCH, retry(0, false, 'ticket for another room or instance')],
    [CloseCode.NOT_OWNER, retry(0, false, 'stale route')],
    [CloseCode.ROOM_MOVED, retry(0, true, 'room moved')],
    [CloseCode.GOING_AWAY, retry(0, false, 'shard shutting down')],
    [CloseCode.SLOW_CONSUMER, retry(0, false, 'slow consumer')],
    [CloseCode.TRY_AGAIN_LATER, retry(TRY_AGAIN_FLOOR_S, false, 'shard not ready or room mid-move')],
    [CloseCode.POLICY, retry(POLICY_FLOOR_S, false, 'rate limit or policy violation')],
    [CloseCode.MESSAGE_TOO_BIG,
        Object.freeze({ action: 'stop', minDelay: 0, backoff: false, moving: false, reason: 'frame too big' })],
]);
const LOST = retry(0, false, 'connection lost');
/**
 * The decision for a connection that ended with close `code`.
 *
 * `null` means no WebSocket was established (refused, DNS, an HTTP error from
 * a proxy); it is treated like a lost connection. Codes the contract does not
 * list (1006, 1011, 1000 from the server...) are retried with backoff: a chat
 * client should come back whenever it can.
 */
export function decide(code) {
    if (code === null)
        return LOST;
    return TABLE.get(code) ?? retry(0, false, `closed with ${code}`);
}
export const DEFAULT_BACKOFF = Object.freeze({ base: 0.1, factor: 2, cap: 5 });
/**
 * Exponential backoff with full jitter, bounded by `cap`.
 *
 * `delay(attempt, rand, decision)`: attempt 0 is the first retry after a
 * working connection; `rand` in [0, 1) comes from the caller so the schedule is
 * deterministic in tests. The first retry comes within `base` (after the
 * decision's floor): a whole shard's clients that lose it together come back
 * spread over `base` instead of in one instant; the exponential schedule
 * starts after.
 */
export class Backoff {
    base;
    factor;
    cap;
    constructor(options = {}) {
        const o = { ...DEFAULT_BACKOFF, ...options };
        if (!(o.base > 0) || !(o.factor >= 1) || !(o.cap >= o.base)) {
            throw new RangeError('backoff: base > 0, factor >= 1 and cap >= base');
        }
        this.base = o.base;
        this.factor = o.factor;
        this.cap = o.cap;
    }
    ceiling(attempt) {
        return attempt > 0 ? Math.min(this.cap, this.base * this.factor ** Math.max(0, attempt - 1)) : this.base;
    }
    /** Seconds to wait before retry number `attempt` (0-based) after `decision`. */
    delay(attempt, rand, decision) {
        if (!decision.backoff)
            return decision.minDelay;
        if (attempt === 0)
            return decision.minDelay + rand * this.base;
        return Math.min(this.cap, Math.max(decision.minDelay, rand * this.ceiling(attempt)));
    }
}
/**
 * The wait a `Retry-After` of `retryAfter` seconds asks for, with jitter: uniform in
 * [retryAfter, 2 x retryAfter), so that the clients a directory shed together do not all
 * come back in the same instant.
 */
export function afterRetryAfter(retryAfter, rand) {
    return retryAfter * (1 + rand);
}
