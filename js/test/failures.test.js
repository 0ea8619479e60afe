// The client against a real `roomshard dev` cluster when things go wrong: a shard killed
// with SIGKILL (no message store: the gap is announced, then the chat goes on), a slow
// consumer closed with 4009 that resumes without loss, and JWT auth where the first token
// has expired (a 401, then getToken({refresh: true})).
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { after, before, test } from 'node:test';

import { WebSocket } from 'ws';

import { connect } from '../dist/index.js';
import { shardPid, startCluster, waitFor } from './cluster.js';

const SECRET = 'js-client-test-jwt-secret-of-enough-length';
let cluster;

before(async () => {
  cluster = await startCluster({
    shards: 2,
    args: ['--history', 'memory'],
    env: {
      ROOMSHARD_AUTH: 'jwt', ROOMSHARD_JWT_SECRET: SECRET,
      // A stalled reader overflows its 128 KiB send queue within a hundred 4 KB messages;
      // the sender may go that fast (paced: the sender, who reads, keeps up).
      ROOMSHARD_SEND_QUEUE_BYTES: String(128 * 1024), ROOMSHARD_RATE: '10000', ROOMSHARD_RATE_BURST: '10000',
    },
  });
});
after(async () => { await cluster?.stop(); });

const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
function jwt(sub, expiresIn) {
  const body = `${b64({ alg: 'HS256', typ: 'JWT' })}.${b64({ sub, exp: Math.floor(Date.now() / 1000) + expiresIn })}`;
  return `${body}.${createHmac('sha256', SECRET).update(body).digest('base64url')}`;
}

/** Sockets the sessions opened, so a test can stall one. */
class TrackedSocket extends WebSocket {
  static all = [];
  constructor(url) {
    super(url);
    TrackedSocket.all.push(this);
  }
}

function open(room, user, extra = {}) {
  return connect({ directoryUrl: cluster.directory, room, getToken: () => jwt(user, 300),
    WebSocket: TrackedSocket, ...extra });
}

test('jwt: an expired token gets a 401, getToken refreshes it, the session opens', async () => {
  const asked = [];
  const s = connect({
    directoryUrl: cluster.directory, room: 'js-jwt', WebSocket,
    getToken: ({ refresh }) => { asked.push(refresh); return jwt('dana', refresh ? 300 : -60); },
  });
  await s.ready(10);
  assert.deepEqual(asked, [false, true]);
  assert.deepEqual(s.members, ['dana'], 'the user is the token\'s sub');
  const { seq } = await s.send('signed in');
  assert.ok(seq > 0);
  await s.close();
});

test('SIGKILL of the room\'s shard (no message store): the gap is announced, then the chat goes on', async () => {
  const alice = open('js-kill', 'alice');
  const bob = open('js-kill', 'bob');
  const got = [];
  const gaps = [];
  bob.on('message', (m) => got.push(m));
  bob.on('gap', (g) => gaps.push(g));
  await Promise.all([alice.ready(10), bob.ready(10)]);
  for (let i = 0; i < 5; i++) await alice.send(`before ${i}`);
  await waitFor(() => got.length === 5, 10, 'bob to get the first 5');
  const lastSeen = got.at(-1).seq;
  const victim = alice.instance;
  process.kill(shardPid(cluster, victim), 'SIGKILL');
  const pending = alice.send('during the failover'); // written when alice is back
  await waitFor(() => gaps.length === 1, 20, 'bob to be told of the gap');
  assert.equal(gaps[0].afterSeq, lastSeen);
  assert.ok(gaps[0].roomSeq < 2 ** 53 && gaps[0].epoch > 1, JSON.stringify(gaps[0]));
  const during = await pending;
  const next = await alice.send('after the failover');
  assert.ok(next.seq > during.seq && during.seq > lastSeen, 'the seqs never go back');
  await waitFor(() => got.some((m) => m.seq === next.seq), 10, 'bob to get the next message');
  const texts = got.map((m) => m.text);
  assert.deepEqual(texts.slice(5), ['during the failover', 'after the failover']);
  assert.equal(new Set(got.map((m) => m.seq)).size, got.length, 'no duplicate');
  await Promise.all([alice.close(), bob.close()]);
});

test('a slow consumer closed with 4009 resumes with since: every message once, in order', async () => {
  const N = 200;
  TrackedSocket.all.length = 0;
  const bob = open('js-slow', 'bob');
  const got = [];
  const reasons = [];
  bob.on('message', (m) => got.push(m.text));
  bob.on('state', (s) => reasons.push(s.reason));
  await bob.ready(10);
  const [stalled] = TrackedSocket.all; // bob's: no other session has opened one yet
  const alice = open('js-slow', 'alice');
  await alice.ready(10);
  stalled.pause(); // bob stops reading: the shard's queue for him overflows
  const pad = 'x'.repeat(4000);
  const acks = [];
  for (let i = 0; i < N; i++) {
    acks.push(alice.send(`${i} ${pad}`));
    await new Promise((r) => setTimeout(r, 2));
  }
  await Promise.all(acks);
  stalled.resume();
  await waitFor(() => got.length >= N, 20, `bob to get all ${N}`);
  assert.ok(reasons.includes('slow consumer'), `bob was closed with 4009: ${reasons}`);
  assert.ok(bob.connections >= 2);
  assert.deepEqual(got.map((t) => Number(t.split(' ')[0])), Array.from({ length: N }, (_, i) => i));
  await Promise.all([alice.close(), bob.close()]);
});
