// The client against a real `roomshard dev` cluster on loopback (started here): sends and
// acks, members and presence, resumes with and without a gap, refusals, and a live move
// and a drain in the middle of a conversation (no duplicate, no loss).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { WebSocket } from 'ws';

import { ConnectRefused, connect, SendRefused } from '../dist/index.js';
import { startCluster, waitFor } from './cluster.js';

let cluster;
before(async () => { cluster = await startCluster({ shards: 2 }); });
after(async () => { await cluster?.stop(); });

function open(room, user, extra = {}) {
  return connect({ directoryUrl: cluster.directory, room, user, WebSocket, ...extra });
}

/** Every message event of `session` from now on, in order. */
function record(session) {
  const seen = [];
  session.on('message', (m) => seen.push(m));
  return seen;
}

test('send resolves with the seq; every member gets every message once, in order', async () => {
  const alice = open('js-basic', 'alice');
  const bob = open('js-basic', 'bob');
  const got = record(bob);
  await Promise.all([alice.ready(10), bob.ready(10)]);
  const acks = [];
  for (let i = 0; i < 20; i++) acks.push(alice.send(`hello ${i}`, i === 0 ? { id: 'first-id' } : {}));
  const done = await Promise.all(acks);
  assert.equal(done[0].id, 'first-id');
  const seqs = done.map((a) => a.seq);
  assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y));
  assert.equal(new Set(seqs).size, 20);
  await waitFor(() => got.length === 20, 10, 'bob to get 20 messages');
  assert.deepEqual(got.map((m) => m.seq), seqs);
  assert.deepEqual(got.map((m) => m.text), Array.from({ length: 20 }, (_, i) => `hello ${i}`));
  assert.ok(got.every((m) => m.user === 'alice' && m.type === 'message'));
  assert.equal(alice.pending, 0);
  await Promise.all([alice.close(), bob.close()]);
  assert.equal(alice.state, 'closed');
});

test('members and presence follow joins and leaves', async () => {
  const alice = open('js-presence', 'alice');
  await alice.ready(10);
  assert.deepEqual(alice.members, ['alice']);
  const presence = [];
  alice.on('presence', (p) => presence.push(`${p.event} ${p.user}`));
  const carol = open('js-presence', 'carol');
  await carol.ready(10);
  assert.deepEqual([...carol.members].sort(), ['alice', 'carol']);
  await waitFor(() => alice.members.includes('carol'), 10, 'alice to see carol join');
  await carol.close();
  await waitFor(() => !alice.members.includes('carol'), 10, 'alice to see carol leave');
  assert.deepEqual(presence, ['join carol', 'leave carol']);
  await alice.close();
});

test('a session started with since gets what it missed, in order, and no gap', async () => {
  const alice = open('js-resume', 'alice');
  await alice.ready(10);
  const first = await alice.send('one');
  await alice.send('two');
  await alice.send('three');
  const late = open('js-resume', 'bob', { since: first.seq });
  const events = late.events();
  await late.ready(10);
  const got = [];
  for await (const ev of events) {
    assert.notEqual(ev.type, 'gap');
    if (ev.type === 'message') got.push(ev.text);
    if (got.length === 2) break;
  }
  assert.deepEqual(got, ['two', 'three']);
  await Promise.all([alice.close(), late.close()]);
});

test('a resume the room cannot serve is announced as a gap', async () => {
  const alice = open('js-gap', 'alice');
  await alice.ready(10);
  const { seq } = await alice.send('only');
  const ahead = open('js-gap', 'bob', { since: seq + 1000 }); // beyond the room's latest seq
  const gaps = [];
  ahead.on('gap', (g) => gaps.push(g));
  await ahead.ready(10);
  assert.equal(gaps.length, 1);
  assert.equal(gaps[0].afterSeq, seq + 1000);
  assert.equal(gaps[0].roomSeq, seq);
  // ... and it goes on: the next message reaches it.
  const got = record(ahead);
  const next = await alice.send('after the gap');
  await waitFor(() => got.some((m) => m.seq === next.seq), 10, 'the message after the gap');
  await Promise.all([alice.close(), ahead.close()]);
});

test('history pages back through the room, oldest first', async () => {
  const alice = open('js-history', 'alice');
  await alice.ready(10);
  const seqs = [];
  for (let i = 0; i < 7; i++) seqs.push((await alice.send(`h${i}`)).seq);
  const latest = await alice.history({ limit: 3 });
  assert.deepEqual(latest.messages.map((m) => m.text), ['h4', 'h5', 'h6']);
  assert.equal(latest.more, true);
  const older = await alice.history({ before: latest.messages[0].seq, limit: 10 });
  assert.deepEqual(older.messages.map((m) => m.seq), seqs.slice(0, 4));
  assert.equal(older.more, false);
  assert.ok(older.messages.every((m) => m.type === 'message' && m.user === 'alice'));
  await alice.close();
});

test('refusals: a bad room id ends the session, a too long message is refused alone', async () => {
  const bad = open('not a room id!', 'alice');
  await assert.rejects(bad.ready(10), (err) => err instanceof ConnectRefused && err.status === 400);
  assert.equal(bad.state, 'closed');
  await assert.rejects(bad.send('x'), ConnectRefused);

  const alice = open('js-refused', 'alice');
  await alice.ready(10);
  await assert.rejects(alice.send('x'.repeat(5000)), (err) => err instanceof SendRefused && err.code === 'too_long');
  const ok = await alice.send('short enough');
  assert.ok(ok.seq > 0);
  assert.equal(alice.state, 'open');
  await alice.close();
  await assert.rejects(alice.send('after close'), /closed/);
});

test('a frame over the shard\'s limit is closed with 1009 and the session ends (the client\'s bug)', async () => {
  const s = open('js-too-big', 'alice');
  await s.ready(10);
  const states = [];
  s.on('state', (e) => states.push(e.state));
  await assert.rejects(s.send('x'.repeat(1100000)), /1009/);
  assert.equal(s.state, 'closed');
  assert.match(String(s.error), /closed by the server: 1009 frame too big/);
  assert.deepEqual(states, ['closed'], 'no reconnect: the table says fix the client');
});

/** Alice sends `count` messages, one every few ms, while `during` runs; returns the acks. */
async function conversation(room, count, during) {
  const alice = open(room, 'alice');
  const bob = open(room, 'bob');
  const got = record(bob);
  const states = [];
  alice.on('state', (s) => states.push(s.state));
  await Promise.all([alice.ready(10), bob.ready(10)]);
  const acks = [];
  let sent = 0;
  const sending = (async () => {
    while (sent < count) {
      acks.push(alice.send(`m${sent++}`));
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  await waitFor(() => sent >= count / 4, 10, 'the conversation to start');
  const from = alice.instance;
  await during(from);
  await sending;
  const done = await Promise.all(acks);
  await waitFor(() => got.length >= count, 20, `bob to get all ${count} messages`);
  await new Promise((r) => setTimeout(r, 100)); // a duplicate would arrive now
  const seqs = done.map((a) => a.seq);
  assert.equal(new Set(seqs).size, count, 'every send has its own seq');
  assert.deepEqual(got.map((m) => m.text), Array.from({ length: count }, (_, i) => `m${i}`),
    'bob got every message once, in order');
  assert.deepEqual(got.map((m) => m.seq), seqs);
  for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], seqs[i - 1] + 1, 'no gap in the seqs');
  assert.notEqual(alice.instance, from, 'alice followed the room');
  assert.notEqual(bob.instance, from, 'bob followed the room');
  await Promise.all([alice.close(), bob.close()]);
  return { from, states };
}

test('a live move in the middle of a conversation: no duplicate, no loss', async () => {
  const { states } = await conversation('js-move', 200, async (from) => {
    const to = from === 'i1' ? 'i2' : 'i1';
    const report = await cluster.admin('POST', '/v1/admin/rooms/js-move/move', { to });
    assert.equal(report.to, to);
  });
  assert.ok(states.includes('moving'), `alice showed the move: ${states}`);
  assert.equal(states.at(-2), 'open');
});

test('a drain in the middle of a conversation: no duplicate, no loss', async () => {
  let drained;
  await conversation('js-drain', 200, async (from) => {
    drained = from;
    await cluster.admin('POST', `/v1/admin/instances/${from}/drain`, {});
  });
  await cluster.admin('PUT', `/v1/admin/instances/${drained}`, { state: 'active' });
});
