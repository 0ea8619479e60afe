#!/usr/bin/env node
// The trivial Node `ws` broadcast server: the load generator's own ceiling.
// ws://HOST:PORT/room/ROOM; every text frame is relayed verbatim to the room
// (the sender included). No parsing, no JSON: as little server work as possible.
//   node bench/servers/ws_broadcast.js [--host 127.0.0.1] [--port 0] [--ready-file F]
'use strict';
const fs = require('fs');
const path = require('path');
const { createRequire } = require('module');
const { parseArgs } = require('util');

const { WebSocketServer } = createRequire(path.join(__dirname, '..', 'node', 'package.json'))('ws');
const { values: args } = parseArgs({
  options: { host: { type: 'string', default: '127.0.0.1' }, port: { type: 'string', default: '0' },
    'ready-file': { type: 'string' } },
});

const rooms = new Map();
const wss = new WebSocketServer({ host: args.host, port: Number(args.port), perMessageDeflate: false,
  clientTracking: false });
wss.on('connection', (ws, req) => {
  const room = req.url.slice(req.url.lastIndexOf('/') + 1);
  let members = rooms.get(room);
  if (!members) { members = new Set(); rooms.set(room, members); }
  members.add(ws);
  ws.on('message', (data, isBinary) => {
    for (const m of members) m.send(data, { binary: isBinary });
  });
  ws.on('close', () => {
    members.delete(ws);
    if (members.size === 0) rooms.delete(room);
  });
});
wss.on('listening', () => {
  const url = `ws://${args.host}:${wss.address().port}`;
  if (args['ready-file']) fs.writeFileSync(args['ready-file'], JSON.stringify({ url }));
  else console.log(url);
});
process.on('SIGTERM', () => process.exit(0));
