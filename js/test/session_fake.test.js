// The Session driven frame by frame against a fake directory and fake sockets: the outbox
// across reconnects, duplicates, every close code, 401 refresh, Retry-After, the
// unreachable hint, rate limits and a browser going offline.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, test } from 'node:test';

import { ConnectRefused, connect, PACED_INTERVAL_S, RATE_LIMITED_RETRY_S, SessionClosed } from '../dist/index.js';
import { FakeSocket, fakeDirectory, until } from './fake.js';

const sessions = [];
beforeEach(() => { FakeSocket.all.length = 0; });
// A failed test must not leave a session reconnecting (its timers keep the process alive).
afterEach(async () => { await Promise.all(sessions.splice(0).map((s) => s.close())); });

function session(dir, extra = {}) {
  const s = connect({ directoryUrl: 'http://directory.invalid', room: 'r', user: 'alice', WebSocket: FakeSocket,
    fetch: dir.fetch, random: () => 0, ...extra });
  sessions.push(s);
  return s;
}

async function opened(count) {
  await until(() => FakeSocket.all.length === count, `socket ${count}`);
  return FakeSocket.last;
}

test('an unacked send is written again, same id, after every welcome, and once per connection', async () => {
  const dir = fakeDirectory();
  const s = session(dir);
  const ws1 = await opened(1);
  ws1.welcome({ seq: 7 });
  const ack = s.send('hello', { id: 'm1' });
  assert.deepEqual(ws1.sent, [{ type: 'send', id: 'm1', text: 'hello', ordered: true }]);
  ws1.serverClose(1001); // the shard stops before acking
  const ws2 = await opened(2);
  assert.equal(ws2.since, 7, 'the reconnect resumes after the last seq seen');
  assert.deepEqual(ws2.sent, [], 'nothing is written before the welcome');
  ws2.welcome({ seq: 7, recovered: true });
  assert.deepEqual(ws2.sent, [{ type: 'send', id: 'm1', text: 'hello', ordered: true }]);
  s.send('second', { id: 'm2' });
  assert.deepEqual(ws2.sent.map((f) => f.id), ['m1', 'm2'], 'm1 not written twice on one connection');
  ws2.frame({ type: 'ack', id: 'm1', seq: 8 });
  assert.deepEqual(await ack, { id: 'm1', seq: 8 });
  assert.equal(s.pending, 1);
  await s.close();
  await assert.rejects(s.send('late'), SessionClosed);
});

test('each message reaches the application once, in seq order, even when the server repeats it', async () => {
  const dir = fakeDirectory();
  const s = session(dir);
  const seen = [];
  s.on('message', (m) => seen.push(`${m.seq}:${m.id}`));
  const ws1 = await opened(1);
  ws1.welcome({ seq: 0 });
  ws1.frame({ type: 'message', seq: 1, id: 'a', user: 'bob', text: '1', ts: 1 });
  ws1.frame({ type: 'message', seq: 2, id: 'b', user: 'bob', text: '2', ts: 1 });
  ws1.serverClose(4010);
  const ws2 = await opened(2);
  assert.equal(ws2.since, 2);
  ws2.welcome({ seq: 3, recovered: true });
  ws2.frame({ type: 'message', seq: 2, id: 'b', user: 'bob', text: '2', ts: 1 }); // overlap
  ws2.frame({ type: 'message', seq: 3, id: 'c', user: 'bob', text: '3', ts: 1 });
  // A room lost with its shard: the same send comes back under a new seq.
  ws2.frame({ type: 'message', seq: 9, id: 'c', user: 'bob', text: '3', ts: 1 });
  assert.deepEqual(seen, ['1:a', '2:b', '3:c']);
  await s.close();
});

test('every close code of the table: ask the directory again, resume with since; 1009 stops', async () => {
  for (const code of [4001, 4003, 4004, 4009, 4010, 1001, 1013, 1006, 1011]) {
    FakeSocket.all.length = 0;
    const dir = fakeDirectory();
    const s = session(dir);
    const states = [];
    s.on('state', (e) => states.push(e.state));
    const ws1 = await opened(1);
    ws1.welcome({ seq: 4 });
    ws1.serverClose(code);
    const ws2 = await opened(2);
    assert.equal(dir.calls.length, 2, `close ${code}: a new ticket from the directory`);
    assert.notEqual(ws2.url, ws1.url);
    assert.equal(ws2.since, 4, `close ${code}: resumes after what it saw`);
    ws2.welcome({ seq: 4, recovered: true });
    assert.deepEqual(states, ['open', code === 4010 ? 'moving' : 'connecting', 'open'], `close ${code}`);
    await s.close();
  }
  const dir = fakeDirectory();
  FakeSocket.all.length = 0;
  const s = session(dir);
  const ws = await opened(1);
  ws.welcome();
  ws.serverClose(1009);
  await until(() => s.state === 'closed', 'the session to end');
  assert.ok(s.error instanceof SessionClosed && /1009/.test(s.error.message), String(s.error));
  await assert.rejects(s.ready(), SessionClosed);
  assert.equal(dir.calls.length, 1, 'a frame too big is the client\'s bug: no retry');
});

test('the waits: 1013 and 4008 keep their floors, a Retry-After is waited with jitter', async () => {
  for (const [code, floor] of [[1013, 0.1], [4008, 1.0]]) {
    FakeSocket.all.length = 0;
    const dir = fakeDirectory();
    const s = session(dir);
    const ws = await opened(1);
    ws.welcome();
    const closedAt = performance.now();
    ws.serverClose(code);
    await until(() => dir.calls.length === 2, `the retry after ${code}`, 3000);
    assert.ok(dir.calls[1].at - closedAt >= floor * 1000 - 5, `close ${code}: waited ${dir.calls[1].at - closedAt} ms`);
    await s.close();
  }
  FakeSocket.all.length = 0;
  const dir = fakeDirectory((_, n) => (n === 1 ? { status: 503, headers: { 'retry-after': '0.3' } } : {}));
  const s = session(dir, { random: () => 0.5 });
  await opened(1);
  assert.ok(dir.calls[1].at - dir.calls[0].at >= 450 - 5, 'Retry-After 0.3 s with jitter 0.5: 0.45 s');
  await s.close();
});

test('a shard that could not be reached is named on the next connect (a hint to check it)', async () => {
  const dir = fakeDirectory();
  const s = session(dir);
  const ws1 = await opened(1);
  assert.equal(dir.calls[0].body.unreachable, undefined);
  ws1.fail();
  await opened(2);
  assert.deepEqual(dir.calls[1].body, { user: 'alice', unreachable: 'i1' });
  await s.close();
});

test('jwt: a 401 asks getToken for a fresh token and tries again at once; a second 401 ends it', async () => {
  let fresh = 0;
  const asked = [];
  const getToken = ({ refresh }) => { asked.push(refresh); return refresh ? `fresh-${++fresh}` : 'expired'; };
  const dir = fakeDirectory((call) => (call.authorization === 'Bearer expired' ? { status: 401 } : {}));
  const s = session(dir, { user: undefined, getToken });
  const ws = await opened(1);
  ws.welcome();
  await s.ready();
  assert.deepEqual(dir.calls.map((c) => c.authorization), ['Bearer expired', 'Bearer fresh-1']);
  assert.deepEqual(asked, [false, true]);
  ws.serverClose(4010); // a reconnect keeps the token it has
  (await opened(2)).welcome();
  assert.equal(dir.calls[2].authorization, 'Bearer fresh-1');
  assert.deepEqual(asked, [false, true]);
  assert.equal(dir.calls[1].body.user, undefined, 'no user in the body in jwt mode');
  await s.close();

  const always = fakeDirectory(() => ({ status: 401 }));
  const t = session(always, { user: undefined, getToken: () => 'bad' });
  await assert.rejects(t.ready(), (err) => err instanceof ConnectRefused && err.status === 401);
  assert.equal(always.calls.length, 2);
});

test('rate_limited: the message is held, written again, and later writes are paced', async () => {
  const dir = fakeDirectory();
  const s = session(dir);
  const ws = await opened(1);
  ws.welcome();
  const ack = s.send('a', { id: 'a' });
  const refusedAt = performance.now(); // before the refusal: the hold runs from it
  ws.frame({ type: 'error', id: 'a', code: 'rate_limited', message: 'slow down' });
  s.send('b', { id: 'b' });
  await until(() => ws.sent.filter((f) => f.id === 'a').length === 2, 'a written again');
  assert.ok(performance.now() - refusedAt >= RATE_LIMITED_RETRY_S * 1000,
    `written again after ${performance.now() - refusedAt} ms`);
  await until(() => ws.sent.some((f) => f.id === 'b'), 'b written');
  ws.frame({ type: 'ack', id: 'a', seq: 1 });
  assert.equal((await ack).seq, 1);
  const writes = ws.sent.map((f) => f.id);
  assert.deepEqual(writes, ['a', 'a', 'b'], 'in order, no extra write');
  assert.ok(PACED_INTERVAL_S > 0);
  // An error frame about nothing pending reaches the application.
  const errors = [];
  s.on('error', (e) => errors.push(e.code));
  ws.frame({ type: 'error', code: 'bad_request', message: 'what?' });
  assert.deepEqual(errors, ['bad_request']);
  await s.close();
});

test('ordered: a refusal writes the refused send again with every send written after it', async () => {
  const dir = fakeDirectory();
  const s = session(dir);
  const ws = await opened(1);
  ws.welcome();
  const acks = ['a', 'b', 'c'].map((id) => s.send(id, { id }));
  await until(() => ws.sent.length === 3, 'a, b and c written');
  assert.ok(ws.sent.every((f) => f.ordered === true), 'every send asks the shard to keep its order');
  // a was refused; b and c, written before the client heard of it, are held behind it.
  ws.frame({ type: 'error', id: 'a', code: 'rate_limited', message: 'slow down' });
  await until(() => ws.sent.length === 6, 'a, b and c written again');
  ws.frame({ type: 'error', id: 'b', code: 'rate_limited', message: "behind 'a'" });
  ws.frame({ type: 'error', id: 'c', code: 'rate_limited', message: "behind 'a'" });
  ['a', 'b', 'c'].forEach((id, i) => ws.frame({ type: 'ack', id, seq: i + 1 }));
  assert.deepEqual((await Promise.all(acks)).map((a) => a.seq), [1, 2, 3]);
  const ids = ws.sent.map((f) => f.id);
  assert.deepEqual(ids.slice(0, 6), ['a', 'b', 'c', 'a', 'b', 'c']);
  await s.close();
});

test('a browser that is offline waits for online before it asks the directory', async () => {
  const target = new EventTarget();
  const saved = { navigator: Object.getOwnPropertyDescriptor(globalThis, 'navigator'),
    addEventListener: globalThis.addEventListener, removeEventListener: globalThis.removeEventListener };
  Object.defineProperty(globalThis, 'navigator', { value: { onLine: false }, configurable: true, writable: true });
  globalThis.addEventListener = target.addEventListener.bind(target);
  globalThis.removeEventListener = target.removeEventListener.bind(target);
  try {
    const dir = fakeDirectory();
    const s = session(dir);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(dir.calls.length, 0, 'no directory call while offline');
    globalThis.navigator.onLine = true;
    target.dispatchEvent(new Event('online'));
    const ws = await opened(1);
    ws.welcome();
    await s.ready();
    await s.close();
  } finally {
    if (saved.navigator) Object.defineProperty(globalThis, 'navigator', saved.navigator);
    else delete globalThis.navigator;
    globalThis.addEventListener = saved.addEventListener;
    globalThis.removeEventListener = saved.removeEventListener;
  }
});

test('a hidden page waits to be visible before it reconnects (pauseWhenHidden)', async () => {
  const doc = new EventTarget();
  doc.visibilityState = 'hidden';
  globalThis.document = doc;
  try {
    const dir = fakeDirectory();
    const s = session(dir);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(dir.calls.length, 0, 'no directory call while hidden');
    doc.visibilityState = 'visible';
    doc.dispatchEvent(new Event('visibilitychange'));
    const ws = await opened(1);
    ws.welcome();
    await s.ready();
    // An open connection stays open while hidden; only reconnects wait.
    doc.visibilityState = 'hidden';
    assert.equal(s.state, 'open');
    ws.serverClose(1001);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(dir.calls.length, 1, 'the reconnect waits for the page');
    doc.visibilityState = 'visible';
    doc.dispatchEvent(new Event('visibilitychange'));
    (await opened(2)).welcome();
    await s.ready();
    await s.close();
    // pauseWhenHidden: false reconnects hidden or not.
    doc.visibilityState = 'hidden';
    const eager = fakeDirectory();
    session(eager, { pauseWhenHidden: false });
    await until(() => eager.calls.length === 1, 'a call while hidden');
  } finally {
    delete globalThis.document;
  }
});

test('flush resolves once every send so far is acked or refused', async () => {
  const s = session(fakeDirectory());
  const ws = await opened(1);
  ws.welcome();
  s.send('one', { id: 'a' });
  const refused = s.send('two', { id: 'b' });
  let flushed = false;
  const flushing = s.flush().then(() => { flushed = true; });
  ws.frame({ type: 'ack', id: 'a', seq: 1 });
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(flushed, false, 'b is still pending');
  ws.frame({ type: 'error', id: 'b', code: 'too_long', message: 'too long' });
  await flushing;
  await assert.rejects(refused, /too_long/);
  assert.equal(s.pending, 0);
});
