// The directory's connect call for the Node benchmark clients (loadgen.js, storm.js).
//
// Node's own HTTP client over kept-alive sockets: a third of the CPU of `fetch`
// (undici) per request, which made the load generator, not the server, the limit of
// the connect measurement (docs/benchmarks/connect.md).
'use strict';

const http = require('http');

const AGENT = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });

// A directory's base URL parsed once (a URL string per request is parsed per request).
const ORIGINS = new Map();
function origin(directory) {
  let o = ORIGINS.get(directory);
  if (o === undefined) {
    const u = new URL(directory);
    o = { hostname: u.hostname, port: u.port || 80, base: u.pathname.replace(/\/$/, '') };
    ORIGINS.set(directory, o);
  }
  return o;
}

// POST /v1/rooms/ROOM/connect {"user", "unreachable"?}: resolves {status, retryAfter (s),
// body (JSON or null)}. `unreachable`: the instance the last try could not reach.
function postConnect(directory, room, user, unreachable) {
  return new Promise((resolve, reject) => {
    const data = Buffer.from(JSON.stringify(unreachable ? { user, unreachable } : { user }));
    const o = origin(directory);
    const req = http.request({
      hostname: o.hostname,
      port: o.port,
      path: `${o.base}/v1/rooms/${room}/connect`,
      method: 'POST',
      agent: AGENT,
      headers: { 'content-type': 'application/json', 'content-length': data.length },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        let body = null;
        try { body = JSON.parse(Buffer.concat(chunks).toString()); } catch (e) { body = null; }
        resolve({ status: res.statusCode, retryAfter: Number(res.headers['retry-after'] || 0), body });
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(data);
  });
}

module.exports = { AGENT, postConnect };
