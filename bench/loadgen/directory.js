// The directory's connect call for the Node benchmark clients (loadgen.js, storm.js).
//
// Node's own HTTP client over kept-alive sockets: a third of the CPU of `fetch`
// (undici) per request, which made the load generator, not the server, the limit of
// the connect measurement (docs/benchmarks/connect.md).
'use strict';

const http = require('http');

const AGENT = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });

// POST /v1/rooms/ROOM/connect {"user", "unreachable"?}: resolves {status, retryAfter (s),
// body (JSON or null)}. `unreachable`: the instance the last try could not reach.
function postConnect(directory, room, user, unreachable) {
  return new Promise((resolve, reject) => {
    const data = Buffer.from(JSON.stringify(unreachable ? { user, unreachable } : { user }));
    const req = http.request(`${directory}/v1/rooms/${room}/connect`, {
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
