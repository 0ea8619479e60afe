// The pure parts: the close-code table, the backoff, the outbox and the inbox.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { afterRetryAfter, Backoff, CloseCode, decide, Inbox, Outbox, POLICY_FLOOR_S, TRY_AGAIN_FLOOR_S }
  from '../dist/index.js';

test('every row of the close-code table', () => {
  const rows = [
    [4001, 'retry', 0, false], [4003, 'retry', 0, false], [4004, 'retry', 0, false],
    [4008, 'retry', POLICY_FLOOR_S, false], [4009, 'retry', 0, false], [4010, 'retry', 0, true],
    [1001, 'retry', 0, false], [1013, 'retry', TRY_AGAIN_FLOOR_S, false], [1009, 'stop', 0, false],
  ];
  for (const [code, action, minDelay, moving] of rows) {
    const d = decide(code);
    assert.deepEqual([d.action, d.minDelay, d.moving], [action, minDelay, moving], `close ${code}`);
  }
  assert.equal(CloseCode.ROOM_MOVED, 4010);
  // Never opened, and codes outside the table: back with backoff.
  for (const code of [null, 1006, 1011, 1000]) {
    const d = decide(code);
    assert.equal(d.action, 'retry');
    assert.equal(d.backoff, true);
  }
});

test('backoff: first retry within base, then full jitter under an exponential ceiling', () => {
  const b = new Backoff({ base: 0.1, factor: 2, cap: 5 });
  const lost = decide(null);
  assert.equal(b.delay(0, 0.5, lost), 0.05);
  assert.equal(b.delay(0, 0.999, decide(1013)), TRY_AGAIN_FLOOR_S + 0.0999);
  assert.equal(b.delay(1, 0.999, lost), 0.0999);
  assert.equal(b.delay(4, 0.5, lost), 0.4);
  assert.equal(b.delay(20, 0.999, lost), 5 * 0.999);
  assert.equal(b.delay(3, 0, decide(4008)), POLICY_FLOOR_S); // the floor holds under jitter
  assert.throws(() => new Backoff({ base: 0 }), RangeError);
  assert.equal(afterRetryAfter(2, 0.5), 3);
});

test('outbox: due once per connection, in order, until acked; resent after a reconnect', () => {
  const o = new Outbox();
  o.add('a', 'one');
  o.add('b', 'two');
  assert.throws(() => o.add('a', 'again'));
  o.newConnection();
  assert.deepEqual(o.due().map((e) => e.id), ['a', 'b']);
  o.markSent('a');
  assert.deepEqual(o.due().map((e) => e.id), ['b']);
  o.markSent('b');
  assert.deepEqual(o.due(), []);
  assert.equal(o.ack('a').text, 'one');
  assert.equal(o.ack('a'), undefined); // a duplicate ack
  o.newConnection();
  assert.deepEqual(o.due().map((e) => e.id), ['b']);
  o.markSent('b');
  o.markUnsent('b'); // rate_limited: write it again
  assert.deepEqual(o.due().map((e) => e.id), ['b']);
  assert.equal(o.refuse('b').id, 'b');
  assert.equal(o.size, 0);
});

test('outbox: a refused entry is due again with every entry written after it, in order', () => {
  const o = new Outbox();
  for (const id of ['a', 'b', 'c', 'd', 'e']) o.add(id, id);
  for (const id of ['a', 'b', 'c', 'd']) o.markSent(id);
  o.markUnsent('b'); // the shard holds c and d behind b: all three are written again
  assert.deepEqual(o.due().map((e) => e.id), ['b', 'c', 'd', 'e']);
  for (const id of ['b', 'c', 'd', 'e']) o.markSent(id);
  o.markUnsent('gone'); // acked meanwhile: nothing changes
  assert.deepEqual(o.due(), []);
});

test('outbox: the refusals of a burst mark its tail once', () => {
  const o = new Outbox();
  for (const id of ['a', 'b', 'c', 'd', 'e', 'f']) o.add(id, id);
  for (const id of ['a', 'b', 'c', 'd', 'e']) o.markSent(id);
  o.markUnsent('b');
  o.markSent('f'); // written while b's refusal was being read
  o.markUnsent('c'); // c's refusal: due already, nothing changes
  assert.deepEqual(o.due().map((e) => e.id), ['b', 'c', 'd', 'e']);
  o.markUnsent('f'); // f's own refusal
  assert.deepEqual(o.due().map((e) => e.id), ['b', 'c', 'd', 'e', 'f']);
});

test('inbox: each message once, in order; a gap is announced; presence keeps the members', () => {
  const inbox = new Inbox();
  const first = inbox.onWelcome({ type: 'welcome', room: 'r', instance: 'i1', epoch: 1, user: 'a', seq: 5,
    members: ['a', 'b', 'a'] }, null);
  assert.equal(first.gap, null);
  assert.deepEqual(inbox.members, ['a', 'b']);
  assert.equal(inbox.since(), 5);
  assert.equal(inbox.onMessage({ seq: 5, id: 'x', user: 'b', text: 'old' }), null);
  assert.equal(inbox.onMessage({ seq: 6, id: 'm6', user: 'b', text: 'hi' }).text, 'hi');
  assert.equal(inbox.onMessage({ seq: 6, id: 'm6', user: 'b', text: 'hi' }), null); // replayed
  // The same send under a new seq (a room lost with its shard, the id resent): once.
  assert.equal(inbox.onMessage({ seq: 9, id: 'm6', user: 'b', text: 'hi' }), null);
  assert.equal(inbox.onMessage({ seq: 10, id: 'm6', user: 'c', text: 'other user' }).seq, 10);
  const { gap } = inbox.onWelcome({ instance: 'i2', epoch: 3, seq: 20, members: ['a'], recovered: false }, 10);
  assert.deepEqual(gap, { type: 'gap', afterSeq: 10, roomSeq: 20, epoch: 3 });
  assert.equal(inbox.onWelcome({ seq: 20, recovered: true }, 10).gap, null);
  assert.deepEqual(inbox.onPresence({ event: 'join', user: 'c' }), { type: 'presence', event: 'join', user: 'c' });
  inbox.onPresence({ event: 'join', user: 'c' });
  assert.deepEqual(inbox.members, ['c']);
  inbox.onPresence({ event: 'leave', user: 'c' });
  assert.deepEqual(inbox.members, []);
  assert.equal(inbox.onPresence({ event: 'wave', user: 'c' }), null);
});

test('inbox: the seen-ids window is bounded', () => {
  const inbox = new Inbox(0, 3);
  for (let seq = 1; seq <= 5; seq++) inbox.onMessage({ seq, id: `m${seq}`, user: 'u', text: '' });
  // m1 and m2 left the window: a resend of m1 under a new seq is shown; m5 is not.
  assert.equal(inbox.onMessage({ seq: 6, id: 'm5', user: 'u', text: '' }), null);
  assert.equal(inbox.onMessage({ seq: 7, id: 'm1', user: 'u', text: '' }).seq, 7);
});

test('message ids: 32 hex digits, a new one every time', async () => {
  const { newId } = await import('../dist/index.js');
  const ids = new Set(Array.from({ length: 1000 }, () => newId()));
  assert.equal(ids.size, 1000);
  for (const id of ids) assert.match(id, /^[0-9a-f]{32}$/);
});
