#!/usr/bin/env node
// roomshard benchmark load generator: one Node process, many WebSocket clients.
//
// Usage: node bench/loadgen/loadgen.js '<json config>'   (or a path to a JSON file)
// Prints one JSON document (the result) on stdout; progress goes to stderr.
//
// It speaks three protocols so every server gets the same workload:
//   raw       ws://HOST:PORT/room/ROOM, every text frame is relayed to the room
//   socketio  Engine.IO 4 / Socket.IO 5 over a plain WebSocket (no polling):
//             emit "join" ROOM, wait for "joined", emit "msg" TEXT, get "msg" TEXT
//   roomshard POST DIR/v1/rooms/ROOM/connect {"user"}, open the returned url,
//             wait for "welcome", send {"type":"send","id","text"}, get "message"
// The Socket.IO wire protocol is written by hand on top of `ws` (it is four
// packet types) because socket.io-client costs several times more CPU per
// message and the load generator must not be the bottleneck.
//
// Each published text is "STEP:T:padding" where T is performance.now() of the
// sender (same process, so latency needs no clock sync). A delivery counts for
// its step only; anything arriving after the step's drain is "late".
'use strict';

const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');
const { performance, monitorEventLoopDelay } = require('perf_hooks');

const nodeRequire = createRequire(path.join(__dirname, '..', 'node', 'package.json'));
const WebSocket = nodeRequire('ws');
const { closeAll: closeDirectories, postConnect } = require('./directory');

const PAD = 'hello from the roomshard benchmark';
// How the shard encodes every presence frame (shard/room.py: type first, no spaces).
const PRESENCE_PREFIX = '{"type":"presence"';
const HIST_BUCKETS = 100000; // 0.1 ms buckets up to 10 s

function log(...args) {
  process.stderr.write(`[loadgen] ${args.join(' ')}\n`);
}

// ---------------------------------------------------------------- statistics

class LatencyHistogram {
  constructor() {
    this.buckets = new Uint32Array(HIST_BUCKETS + 1);
    this.count = 0;
    this.max = 0;
  }
  add(ms) {
    let b = Math.floor(ms * 10);
    if (b < 0) b = 0;
    if (b > HIST_BUCKETS) b = HIST_BUCKETS;
    this.buckets[b]++;
    this.count++;
    if (ms > this.max) this.max = ms;
  }
  percentile(p) {
    if (this.count === 0) return null;
    const rank = Math.ceil((p / 100) * this.count);
    let seen = 0;
    for (let i = 0; i <= HIST_BUCKETS; i++) {
      seen += this.buckets[i];
      if (seen >= rank) return (i + 1) / 10; // upper edge of the bucket
    }
    return this.max;
  }
}

// ---------------------------------------------------------------- /proc

function readCpuTicks(pid) {
  // /proc/PID/stat: "pid (comm) state ..." — comm may hold spaces, so split after ')'.
  const text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]); // utime + stime (fields 14, 15)
}

// A process and every descendant (a database server's backends), with the children it
// reaped (fields 16, 17: cutime + cstime): the CPU a process tree used, in ticks.
function readTreeTicks(root) {
  const parents = new Map();
  for (const name of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const text = fs.readFileSync(`/proc/${name}/stat`, 'utf8');
      const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
      parents.set(Number(name), { ppid: Number(fields[1]), ticks: Number(fields[11]) + Number(fields[12]),
        reaped: Number(fields[13]) + Number(fields[14]) });
    } catch (e) { /* gone meanwhile */ }
  }
  const top = parents.get(root);
  if (!top) return 0;
  let total = top.ticks + top.reaped;
  const stack = [root];
  while (stack.length) {
    const pid = stack.pop();
    for (const [child, info] of parents) {
      if (info.ppid === pid) { total += info.ticks; stack.push(child); }
    }
  }
  return total;
}

function sampleDatabase(pids) {
  let ticks = 0;
  for (const pid of pids) ticks += readTreeTicks(pid);
  return ticks;
}

function readRssKb(pid) {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) : 0;
}

function sampleServers(pids) {
  const out = {};
  for (const pid of pids) {
    try {
      out[pid] = { ticks: readCpuTicks(pid), rssKb: readRssKb(pid) };
    } catch (e) {
      out[pid] = { ticks: 0, rssKb: 0, gone: true };
    }
  }
  return out;
}

// ---------------------------------------------------------------- clients

class Client {
  constructor(gen, index, room, user) {
    this.gen = gen;
    this.index = index;
    this.room = room;
    this.user = user;
    this.ws = null;
    this.ready = false;
    this.closed = false;
    this.counter = 0;
  }

  onText(text) {
    // Extract "STEP:T:..." and account for it; the protocol layer found `text`.
    const c1 = text.indexOf(':');
    const c2 = text.indexOf(':', c1 + 1);
    if (c1 < 0 || c2 < 0) return;
    this.gen.delivered(Number(text.slice(0, c1)), Number(text.slice(c1 + 1, c2)));
  }
}

function openSocket(url, client, onOpen, onMessage, resolve, reject) {
  const ws = new WebSocket(url, { perMessageDeflate: false, skipUTF8Validation: true });
  client.ws = ws;
  let settled = false;
  const timer = setTimeout(() => {
    if (!settled) { settled = true; ws.terminate(); reject(new Error('connect timeout')); }
  }, 30000);
  ws.on('open', onOpen);
  ws.on('message', (data) => {
    const s = data.toString();
    if (onMessage(s) === true && !settled) {
      settled = true; clearTimeout(timer); client.ready = true; resolve();
    }
  });
  ws.on('error', (err) => {
    if (!settled) { settled = true; clearTimeout(timer); reject(err); }
    client.gen.errors.push(String(err.message || err));
  });
  ws.on('close', (code) => {
    client.closed = true;
    if (!settled) {
      settled = true;
      clearTimeout(timer);
      const err = new Error(`closed ${code} before ready`);
      err.retryable = [1001, 1013, 4001, 4004, 4010].includes(code);
      client.closed = false;
      reject(err);
      return;
    }
    if (!client.gen.shuttingDown) client.gen.closeCodes[code] = (client.gen.closeCodes[code] || 0) + 1;
  });
}

const PROTOCOLS = {
  raw: {
    connect(client, target) {
      return new Promise((resolve, reject) => {
        openSocket(`${target}/room/${client.room}`, client,
          () => { client.ready = true; resolve(); },
          (s) => { client.onText(s); return false; }, resolve, reject);
      });
    },
    send(client, text) { client.ws.send(text); },
  },

  socketio: {
    connect(client, target) {
      return new Promise((resolve, reject) => {
        openSocket(`${target}/socket.io/?EIO=4&transport=websocket`, client, () => {}, (s) => {
          const ws = client.ws;
          if (s === '2') { ws.send('3'); return false; } // Engine.IO ping -> pong
          if (s.startsWith('42')) {
            const packet = JSON.parse(s.slice(2));
            if (packet[0] === 'msg') { client.onText(packet[1]); return false; }
            return packet[0] === 'joined';
          }
          if (s[0] === '0') { ws.send('40'); return false; } // Engine.IO open -> Socket.IO connect
          if (s.startsWith('40')) { ws.send(`42${JSON.stringify(['join', client.room])}`); return false; }
          if (s.startsWith('44')) client.gen.errors.push(`socket.io connect_error ${s}`);
          return false;
        }, resolve, reject);
      });
    },
    send(client, text) { client.ws.send(`42${JSON.stringify(['msg', text])}`); },
  },

  roomshard: {
    // What the contract tells a client to do: on 1013 (shard not ready, room
    // mid-move), 1001, 4001, 4004 or 4010 before the welcome, or a 503 from
    // the directory, ask the directory again after a short wait.
    async connect(client, directory) {
      for (let attempt = 1; ; attempt++) {
        try {
          return await PROTOCOLS.roomshard.connectOnce(client, directory);
        } catch (e) {
          if (attempt >= 5 || !e.retryable) throw e;
          client.gen.connectRetries++;
          await new Promise((r) => setTimeout(r, 200 * attempt));
        }
      }
    },
    async connectOnce(client, directory) {
      const t0 = performance.now();
      const res = await postConnect(directory, client.room, client.user);
      const t1 = performance.now();
      client.gen.phases.directory.add(t1 - t0);
      const body = res.body;
      if (res.status !== 200 || body === null) {
        const err = new Error(`connect ${res.status} ${JSON.stringify(body)}`);
        err.retryable = res.status === 503;
        throw err;
      }
      client.instance = body.instance;
      return new Promise((resolve, reject) => {
        openSocket(body.url, client, () => {}, (s) => {
          // Presence frames (a connect storm's most frequent) need no parse here.
          if (s.startsWith(PRESENCE_PREFIX)) return false;
          const frame = JSON.parse(s);
          switch (frame.type) {
            case 'message': client.onText(frame.text); return false;
            case 'ack': client.gen.acks++; return false;
            case 'welcome': client.gen.phases.socket.add(performance.now() - t1); return true;
            case 'error': client.gen.errors.push(`error frame ${frame.code}`); return false;
            default: return false; // presence
          }
        }, resolve, reject);
      });
    },
    send(client, text) {
      client.counter++;
      client.ws.send(JSON.stringify({ type: 'send', id: `${client.index}-${client.counter}`, text }));
    },
  },
};

// ---------------------------------------------------------------- generator

class LoadGen {
  constructor(cfg) {
    this.cfg = cfg;
    this.proto = PROTOCOLS[cfg.protocol];
    if (!this.proto) throw new Error(`unknown protocol ${cfg.protocol}`);
    this.clients = [];
    this.errors = [];
    this.closeCodes = {};
    this.acks = 0;
    this.connectRetries = 0;
    // Where a connect's time goes: the whole connect (every try), and for roomshard
    // the directory's answer and the socket until the welcome (the last try).
    this.phases = { connect: new LatencyHistogram(), directory: new LatencyHistogram(),
      socket: new LatencyHistogram() };
    this.step = -1;
    this.stepDelivered = 0;
    this.late = 0;
    this.hist = new LatencyHistogram();
    this.shuttingDown = false;
  }

  delivered(step, sentAt) {
    if (step !== this.step || !this.collecting) { this.late++; return; }
    this.stepDelivered++;
    this.hist.add(performance.now() - sentAt);
  }

  targetFor(member) {
    const c = this.cfg;
    if (c.protocol === 'roomshard') {
      // Several directory replicas: a room's members alternate between them.
      const dirs = c.directories && c.directories.length ? c.directories : [c.directory];
      return dirs[member % dirs.length];
    }
    return c.targets[member % c.targets.length]; // spread each room over every node
  }

  async connectAll() {
    const c = this.cfg;
    // Interleave rooms so consecutive publishers hit different rooms.
    for (let m = 0; m < c.members; m++) {
      for (let r = 0; r < c.rooms; r++) {
        const idx = this.clients.length;
        this.clients.push(new Client(this, idx, `${c.roomPrefix}-${r}`, `u${idx}`));
      }
    }
    const t0 = performance.now();
    // The CPU both sides spent on the connects: which core bounds the rate, and the
    // server's own cost per connect (the one figure independent of the load generator).
    const cpu0 = process.cpuUsage();
    const servers0 = sampleServers(c.pids || []);
    const database0 = sampleDatabase(c.databasePids || []);
    let next = 0;
    let failed = 0;
    const firstErrors = [];
    const worker = async () => {
      while (next < this.clients.length) {
        const client = this.clients[next++];
        const member = Math.floor(client.index / c.rooms);
        try {
          const started = performance.now();
          await this.proto.connect(client, this.targetFor(member));
          this.phases.connect.add(performance.now() - started);
        } catch (e) {
          failed++;
          if (firstErrors.length < 5) firstErrors.push(String(e.message || e));
        }
      }
    };
    await Promise.all(Array.from({ length: c.connectConcurrency || 100 }, worker));
    const seconds = (performance.now() - t0) / 1000;
    const own = process.cpuUsage(cpu0);
    const servers1 = sampleServers(c.pids || []);
    let ticks = 0;
    for (const pid of Object.keys(servers1)) ticks += servers1[pid].ticks - (servers0[pid] ? servers0[pid].ticks : 0);
    // A directory's database (PostgreSQL) is part of what a connect costs the service.
    const databaseCpu = (sampleDatabase(c.databasePids || []) - database0) / (c.clkTck || 100);
    const serverCpu = ticks / (c.clkTck || 100) + databaseCpu;
    const loadgenCpu = (own.user + own.system) / 1e6;
    const ok = this.clients.filter((x) => x.ready).length;
    log(`connected ${ok}/${this.clients.length} in ${seconds.toFixed(1)} s: server cpu `
      + `${(serverCpu / seconds * 100).toFixed(0)}% loadgen cpu ${(loadgenCpu / seconds * 100).toFixed(0)}%`);
    return {
      ok, failed, seconds, per_s: ok / seconds, first_errors: firstErrors,
      server_cpu_seconds: serverCpu,  // the database's included
      database_cpu_seconds: (c.databasePids || []).length ? databaseCpu : null,
      loadgen_cpu_seconds: loadgenCpu,
      server_cpu_util: serverCpu / seconds,
      loadgen_cpu_util: loadgenCpu / seconds,
      per_server_cpu_second: serverCpu > 0 ? ok / serverCpu : null,
      latency_ms: Object.fromEntries(Object.entries(this.phases)
        .filter(([, h]) => h.count > 0)
        .map(([name, h]) => [name, { p50: h.percentile(50), p90: h.percentile(90),
          p99: h.percentile(99), max: h.max }])),
    };
  }

  async settle(ms) {
    await new Promise((r) => setTimeout(r, ms));
  }

  async runStep(rate) {
    const c = this.cfg;
    const live = this.clients.filter((x) => x.ready && !x.closed);
    const step = this.step + 1;
    this.step = step;
    this.stepDelivered = 0;
    this.hist = new LatencyHistogram();
    this.collecting = true;
    const lateBefore = this.late;
    const roomSize = {};
    for (const cl of live) roomSize[cl.room] = (roomSize[cl.room] || 0) + 1;

    const loop = monitorEventLoopDelay({ resolution: 10 });
    loop.enable();
    const before = sampleServers(c.pids || []);
    const dbBefore = sampleDatabase(c.databasePids || []);
    const cpuBefore = process.cpuUsage();
    const t0 = performance.now();
    const durationMs = c.stepSeconds * 1000;
    let sent = 0;
    let expected = 0;
    let cursor = 0;
    await new Promise((resolve) => {
      const tick = () => {
        const now = performance.now();
        const elapsed = Math.min(now - t0, durationMs);
        const due = Math.floor((rate * elapsed) / 1000) - sent;
        for (let i = 0; i < due && live.length > 0; i++) {
          const cl = live[cursor++ % live.length];
          if (cl.closed) continue;
          this.proto.send(cl, `${step}:${performance.now()}:${PAD}`);
          sent++;
          expected += roomSize[cl.room];
        }
        if (now - t0 >= durationMs) resolve(); else setTimeout(tick, 2);
      };
      tick();
    });
    const sendEnd = performance.now();
    // Drain: wait (bounded) for everything still in flight.
    const drainUntil = sendEnd + (c.drainSeconds ?? 2) * 1000;
    while (this.stepDelivered < expected && performance.now() < drainUntil) {
      await this.settle(10);
    }
    const t1 = performance.now();
    const after = sampleServers(c.pids || []);
    const dbTicks = sampleDatabase(c.databasePids || []) - dbBefore;
    const own = process.cpuUsage(cpuBefore);
    this.collecting = false;
    loop.disable();

    let ticks = 0;
    for (const pid of Object.keys(after)) ticks += after[pid].ticks - (before[pid] ? before[pid].ticks : 0);
    const sendSeconds = (sendEnd - t0) / 1000;
    const windowSeconds = (t1 - t0) / 1000;
    const cpuSeconds = ticks / (c.clkTck || 100);
    const h = this.hist;
    const result = {
      rate_target: rate,
      sent,
      sent_rate: sent / sendSeconds,
      expected,
      delivered: this.stepDelivered,
      delivered_ratio: expected ? this.stepDelivered / expected : 0,
      deliveries_per_s: this.stepDelivered / sendSeconds,
      p50_ms: h.percentile(50),
      p90_ms: h.percentile(90),
      p99_ms: h.percentile(99),
      max_ms: h.max,
      send_seconds: sendSeconds,
      window_seconds: windowSeconds,
      server_cpu_seconds: cpuSeconds,
      server_cpu_util: cpuSeconds / windowSeconds,
      deliveries_per_cpu_second: cpuSeconds > 0 ? this.stepDelivered / cpuSeconds : null,
      // The message store's database server (PostgreSQL), not counted in server_cpu_*.
      database_cpu_seconds: (c.databasePids || []).length ? dbTicks / (c.clkTck || 100) : null,
      loadgen_cpu_util: (own.user + own.system) / 1e6 / windowSeconds,
      loadgen_loop_delay_p99_ms: loop.percentile(99) / 1e6,
      late_from_earlier_steps: this.late - lateBefore,
      connections_live: live.filter((x) => !x.closed).length,
    };
    // A server that dropped clients does not sustain the load, whatever the
    // survivors received (the rest of the ladder would run on fewer clients).
    result.connections_lost = this.clients.length - result.connections_live;
    const ok = result.delivered_ratio >= (c.minDelivered ?? 0.99)
      && result.p99_ms !== null && result.p99_ms < (c.maxP99Ms ?? 200)
      && result.connections_lost === 0;
    result.sustained = ok;
    log(`step ${step} rate ${rate}/s sent ${sent} delivered ${(result.delivered_ratio * 100).toFixed(2)}% `
      + `${Math.round(result.deliveries_per_s)} deliv/s p50 ${result.p50_ms} p99 ${result.p99_ms} ms `
      + `server cpu ${(result.server_cpu_util * 100).toFixed(0)}% loadgen cpu ${(result.loadgen_cpu_util * 100).toFixed(0)}%`
      + `${ok ? '' : ' NOT SUSTAINED'}`);
    return result;
  }

  async ladder() {
    const c = this.cfg;
    const steps = [];
    // The ladder ends after `maxConsecutiveFailures` failed rungs in a row, so
    // one burst of unrelated load on a shared machine does not end it early,
    // or at once when a client was dropped (later rungs would have fewer).
    let failures = 0;
    for (const rate of c.rates) {
      const r = await this.runStep(rate);
      steps.push(r);
      failures = r.sustained ? 0 : failures + 1;
      if (failures >= (c.maxConsecutiveFailures ?? 2) || r.connections_lost > 0) break;
      await this.settle(c.pauseMs ?? 300);
    }
    return steps;
  }

  async idle() {
    const c = this.cfg;
    const before = sampleServers(c.pids || []);
    const connect = await this.connectAll();
    await this.settle((c.settleSeconds ?? 2) * 1000);
    const after = sampleServers(c.pids || []);
    let rssBefore = 0;
    let rssAfter = 0;
    const perPid = {};
    for (const pid of Object.keys(after)) {
      rssBefore += before[pid] ? before[pid].rssKb : 0;
      rssAfter += after[pid].rssKb;
      perPid[pid] = { before_kb: before[pid] ? before[pid].rssKb : 0, after_kb: after[pid].rssKb };
    }
    const live = this.clients.filter((x) => x.ready && !x.closed).length;
    return {
      connect,
      connections: live,
      rss_before_kb: rssBefore,
      rss_after_kb: rssAfter,
      rss_per_connection_bytes: live ? ((rssAfter - rssBefore) * 1024) / live : null,
      per_pid: perPid,
    };
  }

  closeAll() {
    this.shuttingDown = true;
    for (const cl of this.clients) if (cl.ws) cl.ws.terminate();
    closeDirectories();
  }
}

async function main() {
  const arg = process.argv[2];
  if (!arg) {
    process.stderr.write('usage: loadgen.js <json config | config file>\n');
    process.exit(2);
  }
  const cfg = JSON.parse(arg.trim().startsWith('{') ? arg : fs.readFileSync(arg, 'utf8'));
  const gen = new LoadGen(cfg);
  const out = { protocol: cfg.protocol, mode: cfg.mode, rooms: cfg.rooms, members: cfg.members };
  if (cfg.mode === 'idle') {
    out.idle = await gen.idle();
  } else {
    out.connect = await gen.connectAll();
    if (out.connect.ok === gen.clients.length) {
      await gen.settle((cfg.settleSeconds ?? 1) * 1000); // let joins/presence finish
      out.steps = await gen.ladder();
    } else {
      out.steps = [];
    }
  }
  out.acks = gen.acks;
  out.connect_retries = gen.connectRetries;
  out.errors = gen.errors.slice(0, 20);
  out.error_count = gen.errors.length;
  out.close_codes = gen.closeCodes;
  gen.closeAll();
  process.stdout.write(`${JSON.stringify(out)}\n`);
  setTimeout(() => process.exit(0), 200).unref();
}

main().catch((e) => {
  process.stderr.write(`[loadgen] fatal: ${e.stack || e}\n`);
  process.exit(1);
});
