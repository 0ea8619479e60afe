// A fake directory (fetch) and fake WebSocket for driving a Session frame by frame:
// every close code, every refusal and every resend, with no network.

export class FakeSocket {
  static all = [];
  static get last() { return FakeSocket.all.at(-1); }

  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }

  // -- the session's side
  send(data) {
    if (this.closedWith !== null) throw new Error('send on a closed socket');
    this.sent.push(JSON.parse(data));
  }
  close(code = 1005) {
    if (this.closedWith !== null) return;
    this.closedWith = code;
    queueMicrotask(() => this.onclose?.({ code }));
  }

  // -- the test's side (the shard)
  open() { this.onopen?.({}); }
  frame(obj) { this.onmessage?.({ data: JSON.stringify(obj) }); }
  welcome(fields = {}) {
    this.open();
    this.frame({ type: 'welcome', room: 'r', instance: 'i1', epoch: 1, user: 'alice', seq: 0, members: ['alice'],
      ...fields });
  }
  serverClose(code) { this.closedWith = code; this.onclose?.({ code }); }
  /** Refused before any handshake (connection refused). */
  fail() { this.closedWith = 1006; this.onerror?.({}); this.onclose?.({ code: 1006 }); }
  get since() {
    const s = new URL(this.url).searchParams.get('since');
    return s === null ? null : Number(s);
  }
}

/** A fetch that answers connects from `answers` (a function of the call), recording each. */
export function fakeDirectory(answer = () => ({ status: 200 })) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    const call = { url, at: performance.now(), body: init.body ? JSON.parse(init.body) : null,
      authorization: init.headers?.authorization ?? null };
    calls.push(call);
    const { status = 200, body, headers = {} } = answer(call, calls.length);
    const n = calls.length;
    const payload = body ?? (status === 200
      ? { room: 'r', instance: 'i1', epoch: 1, url: `ws://shard.invalid/i1/room/r?ticket=t${n}`, expires_in: 60 }
      : { error: { code: `status_${status}`, message: 'refused' } });
    return new Response(JSON.stringify(payload), { status, headers });
  };
  return { fetch, calls };
}

/** Resolve once `predicate()` holds (polled every ms), or fail after `ms`. */
export async function until(predicate, what, ms = 3000) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}
