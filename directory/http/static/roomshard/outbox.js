/**
 * The sends that have no ack yet, kept in order and written again after a reconnect.
 *
 * A send stays here from the moment the application calls `send` until the
 * server acks it (or refuses it for good). Each new connection bumps the
 * generation; `due()` returns, in order, every entry not yet written on the
 * current connection, so the session writes after a welcome and after each
 * new send without writing anything twice on one connection. Resends keep the
 * message id: the server's idempotency window turns a resend of a message it
 * already sequenced into the original ack, so nothing is broadcast twice.
 *
 * Pure: no sockets and no promises; the session keeps the promises by id.
 */
export class Outbox {
    entries = new Map();
    generation = 0;
    get size() {
        return this.entries.size;
    }
    has(id) {
        return this.entries.has(id);
    }
    /** Queue a new send; throws if `id` is already pending. */
    add(id, text) {
        if (this.entries.has(id))
            throw new Error(`message id ${JSON.stringify(id)} is already pending`);
        const entry = { id, text, sentOn: -1 };
        this.entries.set(id, entry);
        return entry;
    }
    /** A new connection is open: everything pending is due again. */
    newConnection() {
        this.generation += 1;
    }
    /** Entries not yet written on the current connection, oldest first. */
    due() {
        const out = [];
        for (const e of this.entries.values())
            if (e.sentOn !== this.generation)
                out.push(e);
        return out;
    }
    markSent(id) {
        const e = this.entries.get(id);
        if (e !== undefined)
            e.sentOn = this.generation;
    }
    /** Write it again on this connection (after a `rate_limited` or `unavailable` refusal),
     * and every entry written after it too: the shard holds the ordered sends behind a
     * refused one (docs/PROTOCOL.md, "Ordered sends"), so they are refused as well, and
     * writing them again in order keeps the order they were sent in. One the shard took
     * meanwhile (a shard without the hold) is acked again, not sequenced twice.
     *
     * An entry due already was marked with its whole tail (the refusals of a burst arrive
     * one per entry: each costs nothing after the first); what was written after that mark
     * is behind the held send and gets its own refusal. */
    markUnsent(id) {
        const entry = this.entries.get(id);
        if (entry === undefined || entry.sentOn !== this.generation)
            return;
        let behind = false;
        for (const e of this.entries.values()) {
            behind = behind || e === entry;
            if (behind)
                e.sentOn = -1;
        }
    }
    /** Remove an acked entry; undefined for an ack nobody waits for (a duplicate). */
    ack(id) {
        const e = this.entries.get(id);
        this.entries.delete(id);
        return e;
    }
    /** Drop an entry the server refused for good (too long, malformed). */
    refuse(id) {
        return this.ack(id);
    }
    pending() {
        return [...this.entries.values()];
    }
    clear() {
        const all = this.pending();
        this.entries.clear();
        return all;
    }
}
