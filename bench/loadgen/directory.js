// The directory's connect call for the Node benchmark clients (loadgen.js, storm.js).
//
// A minimal HTTP/1.1 client on kept-alive `net` sockets: what the load generator
// needs of the directory's answer (status, Retry-After, a JSON body with its
// Content-Length) and nothing else. Node's `http` client cost ~110 µs more of the
// load generator's CPU per connect, and undici's more (docs/benchmarks/connect.md),
// which made the load generator, not the server, the limit of the connect
// measurement: the same reason the Socket.IO protocol is written by hand in loadgen.js.
'use strict';

const net = require('net');

const HEAD_END = Buffer.from('\r\n\r\n');

// One kept-alive socket: one request at a time (no pipelining), like a browser's.
class Conn {
  constructor(pool) {
    this.pool = pool;
    this.pending = null; // { resolve, reject, request, reused }
    this.buf = null;
    this.head = null; // { status, length, retryAfter, close, bodyAt }
    this.dead = false;
    this.sock = net.connect({ host: pool.host, port: pool.port });
    this.sock.setNoDelay(true);
    this.sock.on('data', (chunk) => this.onData(chunk));
    this.sock.on('error', (err) => this.fail(err));
    this.sock.on('close', () => this.fail(new Error('directory connection closed')));
  }

  send(request, pending) {
    this.pending = pending;
    this.buf = null;
    this.head = null;
    this.sock.write(request);
  }

  fail(err) {
    if (this.dead) return;
    this.dead = true;
    this.pool.forget(this);
    this.sock.destroy();
    const p = this.pending;
    this.pending = null;
    if (p) {
      // A kept-alive socket the server closed while it was idle: nothing of the
      // answer arrived, so the request is sent again on a new connection.
      if (p.reused && this.buf === null) this.pool.send(p.request, p, false);
      else p.reject(err);
    }
  }

  onData(chunk) {
    this.buf = this.buf === null ? chunk : Buffer.concat([this.buf, chunk]);
    if (this.pending === null) { this.fail(new Error('directory sent bytes nobody asked for')); return; }
    if (this.head === null) {
      const end = this.buf.indexOf(HEAD_END);
      if (end < 0) return;
      this.head = parseHead(this.buf.latin1Slice(0, end));
      this.head.bodyAt = end + 4;
      if (this.head.length < 0) { this.fail(new Error('directory answer without content-length')); return; }
    }
    const h = this.head;
    if (this.buf.length < h.bodyAt + h.length) return;
    const text = this.buf.utf8Slice(h.bodyAt, h.bodyAt + h.length);
    const p = this.pending;
    this.pending = null;
    this.buf = null;
    this.head = null;
    let body = null;
    try { body = JSON.parse(text); } catch (e) { body = null; }
    if (h.close) this.fail(new Error('closed after its answer'));
    else this.pool.release(this);
    p.resolve({ status: h.status, retryAfter: h.retryAfter, body });
  }
}

// "HTTP/1.1 200 OK\r\nname: value..." -> status, content-length, retry-after, close.
function parseHead(text) {
  const lines = text.split('\r\n');
  const status = Number(lines[0].slice(9, 12));
  let length = -1; let retryAfter = 0; let close = false;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    const colon = line.indexOf(':');
    const name = line.slice(0, colon).toLowerCase();
    if (name === 'content-length') length = Number(line.slice(colon + 1));
    else if (name === 'retry-after') retryAfter = Number(line.slice(colon + 1)) || 0;
    else if (name === 'connection') close = line.slice(colon + 1).trim().toLowerCase() === 'close';
    else if (name === 'transfer-encoding') length = -1;
  }
  return { status, length, retryAfter, close };
}

class Pool {
  constructor(url) {
    const u = new URL(url);
    this.host = u.hostname;
    this.port = Number(u.port || 80);
    this.base = u.pathname.replace(/\/$/, '');
    this.hostHeader = u.host;
    this.idle = [];
    this.all = new Set();
  }

  send(request, pending, reuse = true) {
    pending.request = request;
    let conn = reuse ? this.idle.pop() : undefined;
    pending.reused = conn !== undefined;
    if (conn === undefined) { conn = new Conn(this); this.all.add(conn); }
    conn.send(request, pending);
  }

  release(conn) { this.idle.push(conn); }

  forget(conn) {
    this.all.delete(conn);
    const i = this.idle.indexOf(conn);
    if (i >= 0) this.idle.splice(i, 1);
  }

  close() {
    for (const conn of [...this.all]) { conn.dead = true; conn.sock.destroy(); }
    this.all.clear();
    this.idle = [];
  }
}

const POOLS = new Map();
function pool(directory) {
  let p = POOLS.get(directory);
  if (p === undefined) { p = new Pool(directory); POOLS.set(directory, p); }
  return p;
}

// POST /v1/rooms/ROOM/connect {"user", "unreachable"?}: resolves {status, retryAfter (s),
// body (JSON or null)}. `unreachable`: the instance the last try could not reach.
function postConnect(directory, room, user, unreachable) {
  const p = pool(directory);
  const data = JSON.stringify(unreachable ? { user, unreachable } : { user });
  const request = `POST ${p.base}/v1/rooms/${room}/connect HTTP/1.1\r\nhost: ${p.hostHeader}\r\n`
    + `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(data)}\r\n\r\n${data}`;
  return new Promise((resolve, reject) => p.send(request, { resolve, reject }));
}

// Close every directory connection (the end of a run).
function closeAll() {
  for (const p of POOLS.values()) p.close();
}

module.exports = { postConnect, closeAll };
