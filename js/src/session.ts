/**
 * A chat session: one room, one user, reconnecting on its own.
 *
 * The session runs one loop: ask the directory for the room's URL, open the
 * WebSocket (with `since` = the last seq seen), read frames until the
 * connection ends, then let `decide` (the contract's close-code table) and the
 * `Backoff` say how long to wait before asking again. Unacked sends stay in the
 * `Outbox` and are written again, same id, after every welcome (the shard acks
 * a resent id with its original seq and broadcasts nothing twice); received
 * messages pass through the `Inbox`, so the application sees each message once,
 * in seq order, and a `gap` event when the server could not recover some.
 *
 * In a browser the session does not retry while the page is offline (or
 * hidden, unless `pauseWhenHidden: false`): it waits for `online` /
 * `visibilitychange` and comes back at once. A connection that is open stays
 * open while the page is hidden.
 *
 * Events reach callbacks (`on`) and async iterators (`events()`, or the
 * session itself for messages and gaps). An iterator sees the events from its
 * creation on and buffers them without a bound until it is read: create it
 * before awaiting anything else, and keep reading it.
 */

import { type Fetch, type HistoryOptions, type HistoryPage, history, resolve, type Route, withSince }
  from './directory.js';
import { ConnectRefused, DirectoryUnavailable, RoomshardError, SendRefused, SessionClosed } from './errors.js';
import { type Gap, Inbox, type Message, type Presence } from './inbox.js';
import { Outbox } from './outbox.js';
import { afterRetryAfter, Backoff, type BackoffOptions, CloseCode, type Decision, decide } from './reconnect.js';

export type State = 'connecting' | 'open' | 'moving' | 'closed';

export interface StateChange {
  readonly type: 'state';
  readonly state: State;
  readonly reason: string;
  readonly instance: string | null;
  readonly epoch: number | null;
}

/** An `error` frame that did not concern one of this session's pending sends. */
export interface ServerError {
  readonly type: 'error';
  readonly code: string;
  readonly message: string;
  readonly id: string | null;
}

/** The room's members changed (a welcome, a join, a leave): the whole list. */
export interface MembersChange {
  readonly type: 'members';
  readonly members: readonly string[];
}

export type SessionEvent = Message | Gap | Presence | StateChange | ServerError | MembersChange;

interface EventMap {
  message: Message;
  gap: Gap;
  presence: Presence;
  state: StateChange;
  error: ServerError;
  members: MembersChange;
}

export interface Ack {
  readonly id: string;
  readonly seq: number;
}

/**
 * The part of the WebSocket API the session uses: a browser's own, Node 22's, or the `ws`
 * package's (all three fit).
 */
export interface SocketLike {
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => SocketLike;

export interface ConnectOptions {
  /** The directory's base URL, e.g. `https://chat.example.com`. */
  readonly directoryUrl: string;
  readonly room: string;
  /** The user id, in the directory's `open` auth mode. */
  readonly user?: string;
  /**
   * The Bearer JWT, in `jwt` mode: called once for the first directory call, and with
   * `refresh: true` whenever the directory answers 401 (the session then tries again at
   * once with the new token; a second 401 in a row ends it). The session keeps the
   * token it was given until then.
   */
  readonly getToken?: (context: { refresh: boolean }) => string | Promise<string>;
  /** Resume after this seq (a message the application already has). */
  readonly since?: number;
  /** Default: `globalThis.WebSocket`, else the `ws` package (Node 20). */
  readonly WebSocket?: WebSocketConstructor;
  /** Default: `globalThis.fetch`. */
  readonly fetch?: Fetch;
  readonly backoff?: Partial<BackoffOptions>;
  /** In [0, 1): the jitter's source (tests make it deterministic). */
  readonly random?: () => number;
  /** Seconds a WebSocket may take to open (default 10). */
  readonly openTimeout?: number;
  /** Wait for a hidden page to be visible again before reconnecting (default true). */
  readonly pauseWhenHidden?: boolean;
}

/** After a `rate_limited` refusal: hold every write this long, then space writes
 * PACED_INTERVAL_S apart for PACED_FOR_S (16/s, under the default 20/s). */
export const RATE_LIMITED_RETRY_S = 0.25;
export const PACED_INTERVAL_S = 0.06;
export const PACED_FOR_S = 3.0;
/** After an `unavailable` refusal (the shard's message store is down): write it again after this. */
export const UNAVAILABLE_RETRY_S = 1.0;

const UNAVAILABLE: Decision = { action: 'retry', minDelay: 0, backoff: true, moving: false, reason: 'directory unavailable' };
const NO_TOKEN: Decision = { action: 'retry', minDelay: 0, backoff: true, moving: false, reason: 'getToken failed' };

/** A random message id: `randomUUID` where there is one (Node; browsers in secure contexts),
 * else `getRandomValues` (every browser context); 32 hex digits either way. */
export function newId(): string {
  const c = globalThis.crypto;
  if (typeof c.randomUUID === 'function') return c.randomUUID().replace(/-/g, '');
  const bytes = new Uint8Array(16);
  c.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

const now = (): number => performance.now() / 1000;

/** One iterator's queue of events. */
class Channel<T> implements AsyncIterableIterator<T> {
  private readonly queue: T[] = [];
  private waiting: ((r: IteratorResult<T>) => void) | null = null;
  private failWaiting: ((e: unknown) => void) | null = null;
  private ended = false;
  private error: unknown = null;

  constructor(private readonly detach: (c: Channel<T>) => void) {}

  push(item: T): void {
    if (this.ended) return;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = this.failWaiting = null;
      w({ value: item, done: false });
    } else {
      this.queue.push(item);
    }
  }

  end(error: unknown): void {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    if (this.waiting) {
      const [w, f] = [this.waiting, this.failWaiting];
      this.waiting = this.failWaiting = null;
      if (error !== null && f) f(error);
      else w({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.queue.length > 0) return Promise.resolve({ value: this.queue.shift() as T, done: false });
    if (this.ended) {
      const error = this.error;
      this.error = null; // thrown once; later calls just end
      return error !== null ? Promise.reject(error) : Promise.resolve({ value: undefined, done: true });
    }
    return new Promise((resolveNext, rejectNext) => {
      this.waiting = resolveNext;
      this.failWaiting = rejectNext;
    });
  }

  return(): Promise<IteratorResult<T>> {
    this.ended = true;
    this.queue.length = 0;
    this.detach(this);
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<T> {
    return this;
  }
}

interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class Session implements AsyncIterable<Message | Gap> {
  readonly directoryUrl: string;
  readonly room: string;
  readonly user: string | undefined;
  /** The instance and epoch of the latest welcome. */
  instance: string | null = null;
  epoch: number | null = null;
  /** Why the session ended, when it ended with an error. */
  error: RoomshardError | null = null;
  /** How many connections reached their welcome. */
  connections = 0;

  private readonly outbox = new Outbox();
  private readonly inbox: Inbox;
  private readonly backoff: Backoff;
  private readonly random: () => number;
  private readonly fetchFn: Fetch;
  private readonly getToken: ConnectOptions['getToken'];
  private readonly openTimeout: number;
  private readonly pauseWhenHidden: boolean;
  private readonly socketClass: WebSocketConstructor | undefined;
  private stateNow: State = 'connecting';
  private readonly listeners = new Map<string, Set<(event: any) => void>>();
  private readonly channels = new Set<Channel<SessionEvent>>();
  /** Per pending send: its promise and how to settle it. */
  private readonly acks = new Map<string, {
    promise: Promise<Ack>; resolve: (ack: Ack) => void; reject: (e: unknown) => void;
  }>();
  private readonly waiters = new Set<Waiter>();
  private ws: SocketLike | null = null;
  /** The socket that had its welcome: writes go there only. */
  private live: SocketLike | null = null;
  private closing = false;
  private wakeSleep: (() => void) | null = null;
  private holdUntil = 0;
  private paceUntil = 0;
  private lastWrite = 0;
  private writeTimer: ReturnType<typeof setTimeout> | null = null;
  /** The token getToken gave last (jwt auth): kept until the directory answers 401. */
  private tokenNow: string | undefined = undefined;
  private readonly unpark = (): void => this.wakeSleep?.();
  private readonly done: Promise<void>;

  constructor(options: ConnectOptions) {
    if (!options.directoryUrl || !options.room) throw new TypeError('connect: directoryUrl and room are required');
    if (options.user === undefined && options.getToken === undefined) {
      throw new TypeError('connect: a user (open auth) or getToken (jwt auth) is required');
    }
    this.directoryUrl = options.directoryUrl;
    this.room = options.room;
    this.user = options.user;
    this.inbox = new Inbox(options.since ?? null);
    this.backoff = new Backoff(options.backoff);
    this.random = options.random ?? Math.random;
    const fetchFn = options.fetch ?? (globalThis.fetch?.bind(globalThis) as Fetch | undefined);
    if (!fetchFn) throw new TypeError('connect: no fetch in this runtime; pass options.fetch');
    this.fetchFn = fetchFn;
    this.getToken = options.getToken;
    this.openTimeout = options.openTimeout ?? 10;
    this.pauseWhenHidden = options.pauseWhenHidden ?? true;
    this.socketClass = options.WebSocket;
    const g = globalThis as any;
    if (typeof g.addEventListener === 'function') g.addEventListener('online', this.unpark);
    if (g.document && typeof g.document.addEventListener === 'function') {
      g.document.addEventListener('visibilitychange', this.unpark);
    }
    // Start on a later tick: callbacks and iterators made right after connect() see everything.
    this.done = Promise.resolve().then(() => this.run());
  }

  // -- what the application reads ---------------------------------------

  get state(): State {
    return this.stateNow;
  }

  /** The room's members now (each once, this user included). */
  get members(): readonly string[] {
    return [...this.inbox.members];
  }

  /** The last seq handed to the application: resume after it with `since`. */
  get lastSeq(): number | null {
    return this.inbox.lastSeq;
  }

  /** Sends not acked yet. */
  get pending(): number {
    return this.outbox.size;
  }

  /** Resolves once the session is open (again); rejects if it ends first, or after `timeout` s. */
  ready(timeout?: number): Promise<this> {
    if (this.stateNow === 'open') return Promise.resolve(this);
    if (this.stateNow === 'closed') return Promise.reject(this.error ?? new SessionClosed('session closed'));
    return new Promise<this>((resolveReady, rejectReady) => {
      let timer: ReturnType<typeof setTimeout> | null = null;
      const waiter: Waiter = {
        resolve: () => { if (timer) clearTimeout(timer); resolveReady(this); },
        reject: (e) => { if (timer) clearTimeout(timer); rejectReady(e); },
      };
      if (timeout !== undefined) {
        timer = setTimeout(() => {
          this.waiters.delete(waiter);
          rejectReady(new RoomshardError(`not open within ${timeout} s (${this.stateNow})`));
        }, timeout * 1000);
      }
      this.waiters.add(waiter);
    });
  }

  /** Call `listener` for every event of `type`; returns the function that stops it. */
  on<K extends keyof EventMap>(type: K, listener: (event: EventMap[K]) => void): () => void {
    let set = this.listeners.get(type);
    if (!set) this.listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => { set?.delete(listener); };
  }

  /** Every event from now on, in arrival order, until the session ends (then its error, if any). */
  events(): AsyncIterableIterator<SessionEvent> {
    const channel = new Channel<SessionEvent>((c) => this.channels.delete(c));
    if (this.stateNow === 'closed') channel.end(this.error);
    else this.channels.add(channel);
    return channel;
  }

  /** Messages and gaps from now on. */
  async *[Symbol.asyncIterator](): AsyncIterator<Message | Gap> {
    for await (const event of this.events()) {
      if (event.type === 'message' || event.type === 'gap') yield event;
    }
  }

  /** The room's messages before `before` (default: the latest), oldest first. */
  async history(options: HistoryOptions = {}): Promise<HistoryPage> {
    const token = await this.token(false);
    return history(this.fetchFn, this.directoryUrl, this.room, { user: this.user, token }, options);
  }

  // -- sending -----------------------------------------------------------

  /**
   * Send `text`; resolves with its seq once the shard acked it (stored, with a message
   * store). Kept and written again, same id, across reconnects and moves until then.
   * Rejects with `SendRefused` if the shard refuses it for good (too long), with
   * `SessionClosed` if the session ends first.
   */
  send(text: string, options: { id?: string } = {}): Promise<Ack> {
    if (this.stateNow === 'closed') return Promise.reject(this.error ?? new SessionClosed('session closed'));
    const id = options.id ?? newId();
    try {
      this.outbox.add(id, text);
    } catch (err) {
      return Promise.reject(err);
    }
    let settle!: { resolve: (ack: Ack) => void; reject: (e: unknown) => void };
    const acked = new Promise<Ack>((resolve, reject) => { settle = { resolve, reject }; });
    this.acks.set(id, { promise: acked, ...settle });
    // Fire and forget is fine: a send nobody awaits is no unhandled rejection when the
    // session ends; whoever awaits it still gets the error.
    acked.catch(() => undefined);
    this.writeDue();
    return acked;
  }

  /** Resolves once every send so far is acked or refused. */
  async flush(): Promise<void> {
    await Promise.allSettled([...this.acks.values()].map((entry) => entry.promise));
  }

  /** Close the connection (1000) and end the session; pending sends reject with SessionClosed. */
  async close(): Promise<void> {
    if (this.stateNow === 'closed') return;
    this.closing = true;
    this.wakeSleep?.();
    try {
      this.ws?.close(CloseCode.NORMAL);
    } catch {
      // already closing
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([this.done, new Promise<void>((r) => { timer = setTimeout(r, 5000); })]);
    clearTimeout(timer);
    this.finish(null);
  }

  // -- the connection loop -------------------------------------------------

  private emit(event: SessionEvent): void {
    for (const listener of this.listeners.get(event.type) ?? []) {
      try {
        listener(event);
      } catch (err) {
        // An application's callback must not end the session.
        queueMicrotask(() => { throw err; });
      }
    }
    for (const channel of this.channels) channel.push(event);
  }

  private setState(state: State, reason: string): void {
    if (state === this.stateNow) return;
    this.stateNow = state;
    this.emit({ type: 'state', state, reason, instance: this.instance, epoch: this.epoch });
  }

  private finish(error: RoomshardError | null): void {
    if (this.stateNow === 'closed') return;
    if (error !== null && this.error === null) this.error = error;
    this.setState('closed', this.error ? this.error.message : 'closed');
    const failure = this.error ?? new SessionClosed('session closed before the ack');
    for (const { reject } of this.acks.values()) reject(failure);
    this.acks.clear();
    this.outbox.clear();
    for (const w of this.waiters) w.reject(this.error ?? new SessionClosed('session closed'));
    this.waiters.clear();
    for (const channel of this.channels) channel.end(this.error);
    this.channels.clear();
    if (this.writeTimer) clearTimeout(this.writeTimer);
    this.writeTimer = null;
    const g = globalThis as any;
    if (typeof g.removeEventListener === 'function') g.removeEventListener('online', this.unpark);
    if (g.document && typeof g.document.removeEventListener === 'function') {
      g.document.removeEventListener('visibilitychange', this.unpark);
    }
  }

  /** Why the session should not try now (a browser offline, or hidden), or null. */
  private parked(): string | null {
    const g = globalThis as any;
    if (g.navigator && g.navigator.onLine === false) return 'offline';
    if (this.pauseWhenHidden && g.document && g.document.visibilityState === 'hidden') return 'page hidden';
    return null;
  }

  /** Wait `seconds` (forever: until woken), or until close/online/visible wakes it. */
  private sleep(seconds: number): Promise<void> {
    return new Promise((done) => {
      const timer = Number.isFinite(seconds) ? setTimeout(() => wake(), seconds * 1000) : null;
      const wake = (): void => {
        if (timer) clearTimeout(timer);
        if (this.wakeSleep === wake) this.wakeSleep = null;
        done();
      };
      this.wakeSleep = wake;
    });
  }

  /** The token for the next directory call: the one kept, else a new one from getToken. */
  private async token(refresh: boolean): Promise<string | undefined> {
    if (!this.getToken) return undefined;
    if (refresh || this.tokenNow === undefined) this.tokenNow = await this.getToken({ refresh });
    return this.tokenNow;
  }

  private async run(): Promise<void> {
    let attempt = 0;
    let unreachable: string | null = null; // the instance the last try could not reach
    let refreshed = false;
    try {
      while (!this.closing) {
        const parked = this.parked();
        if (parked !== null) {
          this.setState(this.stateNow === 'moving' ? 'moving' : 'connecting', parked);
          await this.sleep(Infinity);
          attempt = 0;
          continue;
        }
        let decision: Decision | null = null;
        let floor = 0;
        let route: Route | null = null;
        try {
          const token = await this.token(false);
          route = await resolve(this.fetchFn, this.directoryUrl, this.room, { user: this.user, token }, unreachable);
        } catch (err) {
          if (err instanceof ConnectRefused) {
            if (err.status === 401 && this.getToken && !refreshed) {
              refreshed = true;
              await this.token(true);
              continue;
            }
            this.finish(err);
            return;
          }
          if (err instanceof DirectoryUnavailable) {
            decision = UNAVAILABLE;
            floor = afterRetryAfter(err.retryAfter ?? 0, this.random());
          } else {
            decision = NO_TOKEN; // the application's getToken failed: try again later
          }
        }
        if (route !== null) {
          refreshed = false;
          const before = this.connections;
          const code = await this.connectOnce(route.url);
          if (this.closing) break;
          // Refused, no handshake, or ended without a close frame: say so next time.
          unreachable = code === null || code === CloseCode.ABNORMAL ? route.instance : null;
          decision = decide(code);
          if (this.connections !== before) attempt = 0; // it worked for a while: start over
          if (decision.action === 'stop') {
            this.finish(new SessionClosed(`closed by the server: ${code} ${decision.reason}`));
            return;
          }
        }
        if (decision === null) throw new Error('no decision after a try');
        const moving = decision.moving || this.stateNow === 'moving';
        this.setState(moving ? 'moving' : 'connecting', decision.reason);
        const delay = Math.max(floor, this.backoff.delay(attempt, this.random(), decision));
        attempt += 1;
        if (delay > 0) await this.sleep(delay);
      }
    } catch (err) {
      // A bug must end the session visibly, not hang it.
      this.finish(new SessionClosed(`internal error: ${String(err)}`));
    } finally {
      this.finish(null);
    }
  }

  private async openSocket(url: string): Promise<SocketLike> {
    let Ctor = this.socketClass ?? ((globalThis as any).WebSocket as WebSocketConstructor | undefined);
    if (!Ctor) {
      // Node 20 has no WebSocket of its own: the optional `ws` peer dependency.
      const name = 'ws';
      const mod: any = await import(/* webpackIgnore: true */ /* @vite-ignore */ name);
      Ctor = (mod.WebSocket ?? mod.default) as WebSocketConstructor;
    }
    return new Ctor(url);
  }

  /** One connection; resolves with its close code (null: it never opened). */
  private async connectOnce(url: string): Promise<number | null> {
    const since = this.inbox.since();
    let ws: SocketLike;
    try {
      ws = await this.openSocket(withSince(url, since));
    } catch {
      return null;
    }
    if (this.closing) {
      ws.close(CloseCode.NORMAL);
      return null;
    }
    this.ws = ws;
    return new Promise<number | null>((settle) => {
      let opened = false;
      let settled = false;
      const end = (code: number | null): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
        if (this.ws === ws) this.ws = null;
        if (this.live === ws) this.live = null;
        if (this.writeTimer) clearTimeout(this.writeTimer);
        this.writeTimer = null;
        settle(code);
      };
      const timer = setTimeout(() => {
        if (opened) return;
        try { ws.close(); } catch { /* never opened */ }
        end(null);
      }, this.openTimeout * 1000);
      ws.onopen = () => { opened = true; clearTimeout(timer); };
      ws.onerror = () => { /* the close event follows */ };
      ws.onclose = (event: { code?: number }) => end(opened ? (event.code ?? CloseCode.ABNORMAL) : null);
      ws.onmessage = (event: { data?: unknown }) => {
        if (typeof event.data !== 'string') return; // the protocol is text frames
        let frame: Record<string, unknown>;
        try {
          frame = JSON.parse(event.data) as Record<string, unknown>;
        } catch {
          return;
        }
        if (frame['type'] === 'welcome') this.onWelcome(ws, frame, since);
        else this.onFrame(frame);
      };
    });
  }

  private onWelcome(ws: SocketLike, frame: Record<string, unknown>, since: number | null): void {
    const { welcome, gap } = this.inbox.onWelcome(frame, since);
    this.instance = welcome.instance;
    this.epoch = welcome.epoch;
    this.outbox.newConnection();
    this.connections += 1;
    this.live = ws;
    this.setState('open', `welcome from ${welcome.instance}`);
    if (gap !== null) this.emit(gap);
    this.emit({ type: 'members', members: welcome.members });
    for (const w of this.waiters) w.resolve();
    this.waiters.clear();
    this.writeDue();
  }

  private onFrame(frame: Record<string, unknown>): void {
    switch (frame['type']) {
      case 'message': {
        const msg = this.inbox.onMessage(frame);
        if (msg !== null) this.emit(msg);
        return;
      }
      case 'ack': {
        const id = String(frame['id']);
        if (this.outbox.ack(id) !== undefined) {
          const entry = this.acks.get(id);
          this.acks.delete(id);
          entry?.resolve({ id, seq: Number(frame['seq']) });
        }
        return;
      }
      case 'presence': {
        const presence = this.inbox.onPresence(frame);
        if (presence !== null) {
          this.emit(presence);
          this.emit({ type: 'members', members: [...this.inbox.members] });
        }
        return;
      }
      case 'error':
        this.onError(frame);
        return;
      default:
        // a frame type this client does not know yet: servers may add some
    }
  }

  private onError(frame: Record<string, unknown>): void {
    const id = frame['id'] === undefined || frame['id'] === null ? null : String(frame['id']);
    const code = String(frame['code'] ?? '');
    const message = String(frame['message'] ?? '');
    if (id !== null && this.outbox.has(id)) {
      if (code === 'rate_limited' || code === 'unavailable') {
        // Still ours to deliver: hold every write a little, then write it again (going
        // on at full speed would get the connection closed with 4008; a store that is
        // down needs a moment to come back), with every send written after it (the
        // shard holds them behind it: the order is kept).
        this.outbox.markUnsent(id);
        const t = now();
        this.holdUntil = t + (code === 'rate_limited' ? RATE_LIMITED_RETRY_S : UNAVAILABLE_RETRY_S);
        this.paceUntil = t + PACED_FOR_S;
        this.writeDue();
        return;
      }
      this.outbox.refuse(id);
      const entry = this.acks.get(id);
      this.acks.delete(id);
      entry?.reject(new SendRefused(code, message));
      return;
    }
    this.emit({ type: 'error', code, message, id });
  }

  /** Write every due outbox entry in order, now or, while held or paced, on a timer. */
  private writeDue(): void {
    const ws = this.live;
    if (ws === null || this.writeTimer !== null) return;
    for (const entry of this.outbox.due()) {
      const t = now();
      const paced = t < this.paceUntil ? this.lastWrite + PACED_INTERVAL_S - t : 0;
      const wait = Math.max(this.holdUntil - t, paced);
      if (wait > 0) {
        this.writeTimer = setTimeout(() => {
          this.writeTimer = null;
          this.writeDue();
        }, wait * 1000);
        return;
      }
      try {
        ws.send(JSON.stringify({ type: 'send', id: entry.id, text: entry.text, ordered: true }));
      } catch {
        return; // closing: the close event follows and the next welcome writes it again
      }
      this.outbox.markSent(entry.id);
      this.lastWrite = t;
    }
  }
}

/** Start a session: it connects, and reconnects, on its own until `close()`. */
export function connect(options: ConnectOptions): Session {
  return new Session(options);
}
