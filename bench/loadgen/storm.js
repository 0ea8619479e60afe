#!/usr/bin/env node
// roomshard reconnect-storm client: many clients that follow the contract's close codes.
//
// Usage: node bench/loadgen/storm.js '<json config>'
//   {"directory": "http://127.0.0.1:PORT", "rooms": 250, "members": 20,
//    "roomPrefix": "storm", "connectConcurrency": 200, "timeoutSeconds": 60}
//
// It connects every client (POST /v1/rooms/ROOM/connect, then the room URL), then
// prints {"ready": true, "instances": {...}} on stdout and waits for one line on stdin:
// the wall-clock time (ms since the epoch) at which the orchestrator stopped the shard,
// optionally followed by that shard's instance id (then only its clients are waited for).
// From then on, every client whose connection ends reconnects as a production client
// does: it asks the directory again; a 503 is waited out after its Retry-After with
// jitter (uniform in [RA, 2 RA)); 1013 waits 100 ms; 1001/4001/4004/4010 retry at
// once; a lost connection (1006, a refused TCP connect) gets full-jitter exponential
// backoff (100 ms doubling to 5 s); every first retry is spread over 100 ms. It resumes
// with `since` = the last seq it saw. When every client that lost its connection has its
// next welcome (or the timeout passes), it prints one JSON document: per-client times
// from the stop to that welcome, how many welcomes said recovered: false, which instances
// served them, and what the directory and the shards answered on the way.
'use strict';

const path = require('path');
const readline = require('readline');
const { createRequire } = require('module');

const nodeRequire = createRequire(path.join(__dirname, '..', 'node', 'package.json'));
const WebSocket = nodeRequire('ws');
const { closeAll: closeDirectories, postConnect } = require('./directory');

const BACKOFF = { base: 100, factor: 2, cap: 5000 };
// How the shard encodes every presence frame (shard/room.py: type first, no spaces).
const PRESENCE_PREFIX = '{"type":"presence"';
const FLOOR = { 1013: 100, 4008: 1000 };

function log(...args) { process.stderr.write(`[storm] ${args.join(' ')}\n`); }
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function delay(attempt, code) {
  const floor = FLOOR[code] || 0;
  if (attempt === 0) return floor + Math.random() * BACKOFF.base;
  const ceiling = Math.min(BACKOFF.cap, BACKOFF.base * BACKOFF.factor ** (attempt - 1));
  return Math.min(BACKOFF.cap, Math.max(floor, Math.random() * ceiling));
}

class Stats {
  constructor() { this.directory = {}; this.closes = {}; this.errors = {}; }
  count(table, key) { table[key] = (table[key] || 0) + 1; }
}

class Client {
  constructor(storm, index, room, user) {
    Object.assign(this, { storm, index, room, user });
    this.seq = null; this.ws = null; this.lostAt = null; this.backAt = null;
    this.recovered = null; this.instance = null; this.attempt = 0; this.seenAt = 0;
    this.unreachable = null;  // the instance the last try could not reach (a hint)
  }

  // One connect: resolves with the welcome, rejects with {code} (a close before it, or
  // null for a failed TCP/WebSocket connect) or {status, retryAfter} (directory).
  async connectOnce() {
    const stats = this.storm.stats;
    let res;
    try {
      res = await postConnect(this.storm.directoryFor(this), this.room, this.user,
                              this.unreachable);
    } catch (e) {
      stats.count(stats.directory, 'network error');
      throw { status: 0, retryAfter: 0 };
    }
    stats.count(stats.directory, res.body && res.body.error ? `${res.status} ${res.body.error.code}` : res.status);
    if (res.status !== 200) throw { status: res.status, retryAfter: res.retryAfter };
    const instance = res.body.instance;
    const url = this.seq === null ? res.body.url : `${res.body.url}&since=${this.seq}`;
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { perMessageDeflate: false, skipUTF8Validation: true });
      let welcomed = false;
      ws.on('pong', () => { this.seenAt = Date.now(); });
      ws.on('message', (data) => {
        this.seenAt = Date.now();
        const s = data.toString();
        if (s.startsWith(PRESENCE_PREFIX)) return; // a storm's most frequent frame: no parse
        const frame = JSON.parse(s);
        if (typeof frame.seq === 'number') this.seq = frame.seq;
        if (frame.type === 'welcome' && !welcomed) {
          welcomed = true; this.ws = ws; this.seenAt = Date.now(); resolve(frame);
        }
      });
      ws.on('error', (e) => { stats.count(stats.errors, e.code || String(e.message)); });
      ws.on('close', (code) => {
        if (!welcomed) {
          this.unreachable = !code || code === 1006 ? instance : null;
          reject({ code: code || null });
          return;
        }
        this.onLost(code);
      });
    });
  }

  // Connect until welcomed; with `lost` the time from the stop to the welcome is recorded.
  async connect(lost) {
    const stats = this.storm.stats;
    for (;;) {
      let wait;
      try {
        const welcome = await this.connectOnce();
        this.attempt = 0; this.unreachable = null;
        this.instance = welcome.instance;
        if (lost) {
          this.backAt = Date.now();
          this.recovered = welcome.recovered;
          this.storm.back(this);
        }
        return;
      } catch (e) {
        if (e.status !== undefined) {
          wait = e.status === 503 || e.status === 0 || e.status === 429
            ? Math.max(e.retryAfter * 1000 * (1 + Math.random()), delay(this.attempt, null))
            : null;
          if (wait === null) { this.storm.failed(this, `directory ${e.status}`); return; }
        } else {
          stats.count(stats.closes, `${e.code} before welcome`);
          if (e.code === 1009) { this.storm.failed(this, 'closed 1009'); return; }
          wait = delay(this.attempt, e.code);
        }
      }
      this.attempt += 1;
      if (this.storm.over) { this.storm.failed(this, 'timed out'); return; }
      await sleep(wait);
    }
  }

  onLost(code) {
    const stats = this.storm.stats;
    stats.count(stats.closes, code);
    this.ws = null;
    if (this.storm.shuttingDown) return;
    this.unreachable = code === 1006 ? this.instance : null;
    this.lostAt = Date.now();
    this.storm.lost(this);
    const first = delay(0, code);
    setTimeout(() => this.connect(true), first);
  }
}

class Storm {
  constructor(cfg) {
    // "directories": several replicas, the clients spread over them (else "directory").
    this.directories = cfg.directories && cfg.directories.length ? cfg.directories : [cfg.directory];
    this.cfg = cfg; this.stats = new Stats(); this.clients = [];
    this.lostSet = new Set(); this.backSet = new Set(); this.failures = {}; this.failedCount = 0;
    this.expected = 0; this.stopAt = null; this.over = false; this.shuttingDown = false; this.done = null;
  }

  directoryFor(client) { return this.directories[client.index % this.directories.length]; }
  // "liveness" (s): a client pings its shard every second and drops a connection that
  // answered nothing for that long (a stopped or unreachable shard sends no close), as a
  // production client's keepalive does; then it reconnects like after any lost connection.
  watchLiveness() {
    const limit = (this.cfg.liveness || 0) * 1000;
    if (!limit) return;
    const timer = setInterval(() => {
      const now = Date.now();
      for (const cl of this.clients) {
        if (!cl.ws) continue;
        if (now - cl.seenAt > limit) { this.stats.count(this.stats.errors, 'liveness'); cl.ws.terminate(); }
        else cl.ws.ping();
      }
    }, 1000);
    timer.unref();
  }
  lost(c) { this.lostSet.add(c); }
  back(c) { this.backSet.add(c); this.check(); }
  failed(c, why) { this.failures[why] = (this.failures[why] || 0) + 1; this.failedCount += 1; this.check(); }
  // Done when every client connected before the stop has its next welcome (or gave up).
  check() {
    if (this.done && this.backSet.size + this.failedCount >= this.expected) this.done();
  }

  async connectAll() {
    const c = this.cfg;
    for (let m = 0; m < c.members; m++) {
      for (let r = 0; r < c.rooms; r++) {
        const i = this.clients.length;
        this.clients.push(new Client(this, i, `${c.roomPrefix}-${r}`, `u${i}`));
      }
    }
    const t0 = Date.now();
    let next = 0;
    const worker = async () => {
      while (next < this.clients.length) await this.clients[next++].connect(false);
    };
    await Promise.all(Array.from({ length: c.connectConcurrency || 200 }, worker));
    const ok = this.clients.filter((x) => x.ws).length;
    log(`connected ${ok}/${this.clients.length} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    return ok;
  }

  instances() {
    const out = {};
    for (const cl of this.clients) if (cl.instance) out[cl.instance] = (out[cl.instance] || 0) + 1;
    return out;
  }

  async run() {
    const connected = await this.connectAll();
    this.expected = connected;
    this.watchLiveness();
    process.stdout.write(`${JSON.stringify({ ready: true, connected, instances: this.instances() })}\n`);
    const rl = readline.createInterface({ input: process.stdin });
    const line = await new Promise((resolve) => rl.once('line', resolve));
    rl.close();
    // "<ms since the epoch> [instance]": with the stopped instance, only its clients are
    // waited for (the others keep their connections); without, every client.
    const [at, stopped] = line.trim().split(/\s+/);
    this.stopAt = Number(at);
    if (stopped) this.expected = this.clients.filter((x) => x.ws && x.instance === stopped).length;
    const cpu0 = process.cpuUsage();
    this.stats = new Stats(); // what the directory and the shards answered after the stop
    const timeoutMs = (this.cfg.timeoutSeconds || 60) * 1000;
    await new Promise((resolve) => {
      this.done = resolve;
      setTimeout(resolve, timeoutMs);
      this.check();
    });
    this.over = true;
    this.shuttingDown = true;
    const cpu = process.cpuUsage(cpu0);
    const sorted = (xs) => xs.sort((a, b) => a - b);
    const quantile = (xs, p) => (xs.length ? xs[Math.min(xs.length - 1, Math.ceil(p * xs.length) - 1)] : null);
    const times = sorted([...this.backSet].map((c) => (c.backAt - this.stopAt) / 1000));
    const q = (p) => quantile(times, p);
    // When each client lost its connection (a drain closes a room's clients as its move
    // commits), and how long it took from there to its welcome.
    const lostTimes = sorted([...this.lostSet].map((c) => (c.lostAt - this.stopAt) / 1000));
    const rejoin = sorted([...this.backSet].map((c) => (c.backAt - c.lostAt) / 1000));
    const result = {
      clients: this.clients.length,
      lost: this.lostSet.size,
      welcomed_again: this.backSet.size,
      not_back: this.expected - this.backSet.size,
      p50_s: q(0.5), p90_s: q(0.9), p99_s: q(0.99), max_s: times.length ? times[times.length - 1] : null,
      lost_p50_s: quantile(lostTimes, 0.5), lost_max_s: quantile(lostTimes, 1),
      rejoin_p50_s: quantile(rejoin, 0.5), rejoin_p99_s: quantile(rejoin, 0.99),
      rejoin_max_s: quantile(rejoin, 1),
      within_2_s: times.filter((x) => x <= 2).length,
      within_5_s: times.filter((x) => x <= 5).length,
      within_10_s: times.filter((x) => x <= 10).length,
      within_20_s: times.filter((x) => x <= 20).length,
      recovered_false: [...this.backSet].filter((c) => c.recovered === false).length,
      instances_after: this.instances(),
      directory_answers: this.stats.directory,
      close_codes: this.stats.closes,
      socket_errors: this.stats.errors,
      failures: this.failures,
      // This process's CPU from the stop to the end: on a small machine the clients'
      // share of the cores is part of the measured time.
      client_cpu_s: (cpu.user + cpu.system) / 1e6,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
    for (const cl of this.clients) if (cl.ws) cl.ws.terminate();
    closeDirectories();
    process.exit(0);
  }
}

new Storm(JSON.parse(process.argv[2])).run().catch((e) => { log(e.stack || e); process.exit(1); });
