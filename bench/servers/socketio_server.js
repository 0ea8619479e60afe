#!/usr/bin/env node
// Socket.IO 4 peer server: one process, or one of several sharing a Redis adapter.
// Client emits "join" ROOM (answered with "joined"), then "msg" TEXT, which is
// broadcast as "msg" TEXT to the whole room, the sender included: the idiomatic
// Socket.IO chat room. With REDIS_URL set, rooms span processes through
// @socket.io/redis-adapter (every broadcast goes through Redis pub/sub).
//   node bench/servers/socketio_server.js [--host 127.0.0.1] [--port 0] [--ready-file F]
'use strict';
const fs = require('fs');
const http = require('http');
const path = require('path');
const { createRequire } = require('module');
const { parseArgs } = require('util');

const nodeRequire = createRequire(path.join(__dirname, '..', 'node', 'package.json'));
const { Server } = nodeRequire('socket.io');
const { values: args } = parseArgs({
  options: { host: { type: 'string', default: '127.0.0.1' }, port: { type: 'string', default: '0' },
    'ready-file': { type: 'string' } },
});

async function main() {
  const httpServer = http.createServer();
  const io = new Server(httpServer, { serveClient: false, perMessageDeflate: false });
  if (process.env.REDIS_URL) {
    const { createClient } = nodeRequire('redis');
    const { createAdapter } = nodeRequire('@socket.io/redis-adapter');
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  io.on('connection', (socket) => {
    socket.on('join', (room) => {
      socket.join(room);
      socket.data.room = room;
      socket.emit('joined');
    });
    socket.on('msg', (text) => {
      if (socket.data.room !== undefined) io.to(socket.data.room).emit('msg', text);
    });
  });
  httpServer.listen(Number(args.port), args.host, () => {
    const url = `ws://${args.host}:${httpServer.address().port}`;
    if (args['ready-file']) fs.writeFileSync(args['ready-file'], JSON.stringify({ url }));
    else console.log(url);
  });
}
process.on('SIGTERM', () => process.exit(0));
main().catch((e) => { console.error(e); process.exit(1); });
