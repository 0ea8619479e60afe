// Type-checked (never run) under `strict`: the package as an application sees it through
// its .d.ts files. `npm run typecheck` fails if the public types stop fitting these uses.
import { WebSocket } from 'ws';

import {
  type Ack, connect, ConnectRefused, type Gap, type Message, type SessionEvent, type State,
} from '../dist/index.js';

export async function example(): Promise<void> {
  const session = connect({
    directoryUrl: 'http://127.0.0.1:8080', room: 'lobby', user: 'alice', WebSocket,
    getToken: async ({ refresh }) => (refresh ? 'new' : 'cached'),
  });
  const stop: () => void = session.on('message', (m: Message) => { void m.text.toUpperCase(); });
  stop();
  session.on('gap', (g: Gap) => { void g.afterSeq; });
  session.on('state', (s) => { const state: State = s.state; void state; });
  session.on('members', (m) => { void m.members.length; });
  await session.ready(10);
  const ack: Ack = await session.send('hello', { id: 'x' });
  void ack.seq;
  for await (const item of session) {
    // messages and gaps only
    if (item.type === 'message') void item.seq;
    else void item.roomSeq;
  }
  for await (const event of session.events()) {
    const e: SessionEvent = event;
    switch (e.type) {
      case 'message': void e.text; break;
      case 'presence': void e.event; break;
      case 'gap': void e.epoch; break;
      case 'state': void e.reason; break;
      case 'error': void e.code; break;
      case 'members': void e.members; break;
      default: { const never: never = e; void never; }
    }
  }
  const page = await session.history({ before: 10, limit: 20 });
  void page.messages[0]?.seq;
  try {
    await session.ready();
  } catch (err) {
    if (err instanceof ConnectRefused) void err.status;
  }
  await session.close();
}
