// How many messages one Node process with the client delivers to its sessions.
//
//   node bench/deliveries.mjs '{"directory": "http://127.0.0.1:8080", "rooms": 100,
//     "members": 20, "rates": [2500, 5000], "seconds": 10}'
//
// Opens rooms x members sessions (connect(), the package as an application uses it),
// then, per rate, sends that many messages per second for `seconds` (each from the next
// session of the next room, through session.send) and counts the `message` events every
// session gets: deliveries per second, their latency from send to the event, the ack
// failures, and this process's CPU. Prints one JSON document. bench/js_client.py runs it
// against a roomshard cluster (docs/BENCHMARKS.md).
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';

import { WebSocket } from 'ws';

import { connect } from '../dist/index.js';

const cfg = { rooms: 100, members: 20, rates: [2500], seconds: 10, drainSeconds: 3, connectConcurrency: 200,
  prefix: `jsb${Date.now().toString(36)}`, ...JSON.parse(process.argv[2] || '{}') };
const log = (...a) => process.stderr.write(`[js-client-bench] ${a.join(' ')}\n`);

class Histogram { // 0.1 ms buckets up to 10 s
  constructor() { this.b = new Uint32Array(100001); this.n = 0; }
  add(ms) { this.b[Math.min(100000, Math.max(0, Math.floor(ms * 10)))]++; this.n++; }
  pct(p) {
    if (!this.n) return null;
    const rank = Math.ceil((p / 100) * this.n);
    for (let i = 0, seen = 0; i < this.b.length; i++) if ((seen += this.b[i]) >= rank) return (i + 1) / 10;
    return null;
  }
}

let step = -1;
let delivered = 0;
let late = 0;
let hist = new Histogram();

async function openAll() {
  const sessions = [];
  for (let m = 0; m < cfg.members; m++) {
    for (let r = 0; r < cfg.rooms; r++) sessions.push({ room: `${cfg.prefix}-${r}`, user: `u${r}x${m}` });
  }
  const t0 = performance.now();
  let next = 0;
  const worker = async () => {
    while (next < sessions.length) {
      const spec = sessions[next++];
      const s = connect({ directoryUrl: cfg.directory, room: spec.room, user: spec.user, WebSocket, openTimeout: 30 });
      s.on('message', (msg) => {
        const at = msg.text.indexOf(':');
        if (Number(msg.text.slice(0, at)) !== step) { late++; return; }
        delivered++;
        hist.add(performance.now() - Number(msg.text.slice(at + 1, msg.text.indexOf(':', at + 1))));
      });
      spec.session = s;
      await s.ready(60);
    }
  };
  await Promise.all(Array.from({ length: cfg.connectConcurrency }, worker));
  log(`${sessions.length} sessions open in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  return sessions.map((x) => x.session);
}

async function runStep(sessions, rate) {
  step += 1;
  delivered = 0;
  hist = new Histogram();
  let sent = 0;
  let failed = 0;
  const acks = [];
  const loop = monitorEventLoopDelay({ resolution: 10 });
  loop.enable();
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const windowMs = cfg.seconds * 1000;
  // Consecutive sends go to different rooms: session k is room k % rooms.
  await new Promise((done) => {
    const tick = () => {
      const now = performance.now();
      const due = Math.floor((rate * Math.min(now - t0, windowMs)) / 1000) - sent;
      for (let i = 0; i < due; i++) {
        const s = sessions[sent % sessions.length];
        acks.push(s.send(`${step}:${performance.now()}:js client benchmark`).catch(() => { failed++; }));
        sent++;
      }
      if (now - t0 >= windowMs) done(); else setTimeout(tick, 2);
    };
    tick();
  });
  const sendEnd = performance.now();
  const expected = sent * cfg.members;
  const drainUntil = sendEnd + cfg.drainSeconds * 1000;
  while (delivered < expected && performance.now() < drainUntil) await new Promise((r) => setTimeout(r, 10));
  await Promise.all(acks);
  const cpu = process.cpuUsage(cpu0);
  const wall = (performance.now() - t0) / 1000;
  loop.disable();
  const sendSeconds = (sendEnd - t0) / 1000;
  return {
    rate_target: rate, sent, sent_per_s: sent / sendSeconds, expected, delivered,
    delivered_ratio: expected ? delivered / expected : 0,
    deliveries_per_s: delivered / sendSeconds,
    p50_ms: hist.pct(50), p99_ms: hist.pct(99), send_failures: failed,
    client_cpu_seconds: (cpu.user + cpu.system) / 1e6,
    client_cpu_util: (cpu.user + cpu.system) / 1e6 / wall,
    event_loop_delay_p99_ms: loop.percentile(99) / 1e6,
  };
}

const sessions = await openAll();
const steps = [];
for (const rate of cfg.rates) {
  const r = await runStep(sessions, rate);
  log(`rate ${rate}/s: ${Math.round(r.deliveries_per_s)} deliveries/s, ${(r.delivered_ratio * 100).toFixed(2)} % `
    + `delivered, p99 ${r.p99_ms} ms, client cpu ${(r.client_cpu_util * 100).toFixed(0)} %`);
  steps.push(r);
}
await Promise.all(sessions.map((s) => s.close()));
process.stdout.write(`${JSON.stringify({ sessions: sessions.length, rooms: cfg.rooms, members: cfg.members,
  seconds: cfg.seconds, late_deliveries: late, steps })}\n`);
