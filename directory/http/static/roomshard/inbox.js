/**
 * The receiving side of a session: welcome, ordering, duplicates and gaps.
 *
 * The server sends every message of a room in seq order; a reconnect with
 * `since` replays the history after `since`. Across reconnects the same
 * message can arrive twice (a replay overlapping what was seen) and, after a
 * shard crash, a resent message can come back under a new seq. The inbox
 * keeps the last seq seen and a bounded window of `(user, id)` pairs so the
 * application sees each message once, in order; when a welcome says
 * `recovered: false` it reports a `Gap` instead of hiding it.
 *
 * Pure: decoded frames in, events out. The same rules as the Python client's
 * `roomshard.client.inbox`.
 */
/** How many recent (user, id) pairs are remembered (a message a crash made reappear). */
export const SEEN_IDS_WINDOW = 10_000;
const str = (v) => (v === undefined || v === null ? '' : String(v));
const int = (v) => {
    const n = Number(v);
    return Number.isFinite(n) ? Math.trunc(n) : 0;
};
export class Inbox {
    seenLimit;
    /** Highest seq handed to the application (or the room's seq at the first welcome). */
    lastSeq;
    members = [];
    seen = new Set();
    constructor(lastSeq = null, seenLimit = SEEN_IDS_WINDOW) {
        this.seenLimit = seenLimit;
        this.lastSeq = lastSeq;
    }
    /** The `since` of the next connection: resume after what was seen. */
    since() {
        return this.lastSeq;
    }
    /** Take a welcome received on a connection opened with `since`. */
    onWelcome(frame, since) {
        const members = Array.isArray(frame['members']) ? [...new Set(frame['members'].map(str))] : [];
        const recovered = frame['recovered'];
        const welcome = {
            room: str(frame['room']), instance: str(frame['instance']), epoch: int(frame['epoch']),
            user: str(frame['user']), seq: int(frame['seq']), members,
            recovered: typeof recovered === 'boolean' ? recovered : null,
        };
        this.members = [...members];
        let gap = null;
        if (since === null) {
            // First connection without a resume point: start at the room's present.
            if (this.lastSeq === null)
                this.lastSeq = welcome.seq;
        }
        else if (welcome.recovered === false) {
            gap = { type: 'gap', afterSeq: since, roomSeq: welcome.seq, epoch: welcome.epoch };
            // The room's numbering below what was seen (it never should go back; be safe):
            // accept its messages rather than drop them.
            if (this.lastSeq !== null && welcome.seq < this.lastSeq)
                this.lastSeq = welcome.seq;
        }
        return { welcome, gap };
    }
    /** The message to hand to the application, or null for a duplicate. */
    onMessage(frame) {
        const msg = {
            type: 'message', seq: int(frame['seq']), id: str(frame['id']), user: str(frame['user']),
            text: str(frame['text']), ts: frame['ts'],
        };
        if (this.lastSeq !== null && msg.seq <= this.lastSeq)
            return null;
        this.lastSeq = msg.seq;
        if (msg.id) {
            const key = `${msg.user}\u0000${msg.id}`;
            if (this.seen.has(key))
                return null; // the same send under a new seq after a lost room
            this.seen.add(key);
            if (this.seen.size > this.seenLimit) {
                const oldest = this.seen.values().next().value;
                if (oldest !== undefined)
                    this.seen.delete(oldest);
            }
        }
        return msg;
    }
    /** The presence event (the member list follows it), or null for an event this client
     * does not know. */
    onPresence(frame) {
        const event = frame['event'];
        if (event !== 'join' && event !== 'leave')
            return null;
        const p = { type: 'presence', event, user: str(frame['user']) };
        const at = this.members.indexOf(p.user);
        if (event === 'join' && at < 0)
            this.members.push(p.user);
        else if (event === 'leave' && at >= 0)
            this.members.splice(at, 1);
        return p;
    }
}
