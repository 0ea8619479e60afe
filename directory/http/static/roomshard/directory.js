/**
 * The directory calls a client makes: `POST /v1/rooms/{room}/connect` (where the room
 * lives, with a single-use ticket) and `GET /v1/rooms/{room}/messages` (history).
 *
 * HTTP outcomes become the client's errors here: a 4xx is final
 * (`ConnectRefused`), a 5xx, a 429 or a network error is retryable
 * (`DirectoryUnavailable`, carrying `Retry-After`).
 */
import { ConnectRefused, DirectoryUnavailable } from './errors.js';
function base(directoryUrl) {
    return directoryUrl.replace(/\/+$/, '');
}
function retryAfter(resp) {
    const raw = resp.headers.get('retry-after');
    if (raw === null)
        return null;
    const n = Number(raw);
    return Number.isFinite(n) && n >= 0 ? n : null;
}
/** The contract's error body `{"error": {"code", "message"}}`, or a stand-in for a proxy's page. */
async function errorOf(resp) {
    const text = await resp.text().catch(() => '');
    try {
        const body = JSON.parse(text);
        const err = body?.error;
        if (err && typeof err.code === 'string') {
            return { code: err.code, message: typeof err.message === 'string' ? err.message : '' };
        }
    }
    catch {
        // not JSON: a proxy's page, a load balancer's 502
    }
    return { code: `http_${resp.status}`, message: resp.statusText || text.slice(0, 200) };
}
/** Throw the client's error for an answer that is not a 200. */
async function check(resp) {
    if (resp.status === 200)
        return;
    const { code, message } = await errorOf(resp);
    if (resp.status >= 500 || resp.status === 429) {
        throw new DirectoryUnavailable(`${code}: ${message}`, retryAfter(resp));
    }
    throw new ConnectRefused(resp.status, code, message);
}
async function call(fetchFn, url, init) {
    try {
        return await fetchFn(url, init);
    }
    catch (err) {
        if (init.signal?.aborted)
            throw err;
        throw new DirectoryUnavailable(`directory unreachable: ${String(err)}`);
    }
}
/** The room URL with `since=SEQ` added (the directory's URL already has `?ticket=`). */
export function withSince(url, since) {
    if (since === null)
        return url;
    return `${url}${url.includes('?') ? '&' : '?'}since=${since}`;
}
/**
 * Ask the directory where `room` lives. `unreachable`: the instance this client could not
 * reach on its last try (a hint: the directory checks that shard before it answers).
 */
export async function resolve(fetchFn, directoryUrl, room, credentials, unreachable = null, signal) {
    const headers = { 'content-type': 'application/json' };
    if (credentials.token)
        headers['authorization'] = `Bearer ${credentials.token}`;
    const body = {};
    if (credentials.user !== undefined)
        body['user'] = credentials.user;
    if (unreachable !== null)
        body['unreachable'] = unreachable;
    const init = { method: 'POST', headers, body: JSON.stringify(body) };
    if (signal)
        init.signal = signal;
    const resp = await call(fetchFn, `${base(directoryUrl)}/v1/rooms/${encodeURIComponent(room)}/connect`, init);
    await check(resp);
    const data = (await resp.json().catch(() => null));
    if (data === null || typeof data['url'] !== 'string' || typeof data['instance'] !== 'string') {
        throw new DirectoryUnavailable(`unexpected connect answer: ${JSON.stringify(data).slice(0, 200)}`);
    }
    return {
        room: String(data['room'] ?? room), instance: data['instance'], epoch: Number(data['epoch'] ?? 0),
        url: data['url'], expiresIn: Number(data['expires_in'] ?? 60),
    };
}
/** The room's latest `limit` messages with seq < `before`, oldest first. */
export async function history(fetchFn, directoryUrl, room, credentials, options = {}) {
    const query = new URLSearchParams();
    if (options.before !== undefined)
        query.set('before', String(options.before));
    if (options.limit !== undefined)
        query.set('limit', String(options.limit));
    const headers = {};
    if (credentials.token)
        headers['authorization'] = `Bearer ${credentials.token}`;
    else if (credentials.user !== undefined)
        query.set('user', credentials.user);
    const url = `${base(directoryUrl)}/v1/rooms/${encodeURIComponent(room)}/messages?${query}`;
    const resp = await call(fetchFn, url, { headers });
    await check(resp);
    const data = (await resp.json());
    const messages = Array.isArray(data.messages) ? data.messages : [];
    return {
        room: String(data.room ?? room),
        messages: messages.map((m) => ({
            type: 'message', seq: Number(m['seq']), id: String(m['id'] ?? ''), user: String(m['user'] ?? ''),
            text: String(m['text'] ?? ''), ts: m['ts'],
        })),
        more: data.more === true,
    };
}
