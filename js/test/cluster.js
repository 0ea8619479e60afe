// A real `roomshard dev` cluster on loopback for the end-to-end tests: started by the
// test, stopped by it (its whole process group), its URLs read from what it prints.
import { spawn } from 'node:child_process';
import * as fsSync from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = resolve(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
export const ADMIN_TOKEN = 'js-client-test-admin-token';
// Slow machines (CI) stretch every bound by the same factor as the Python tests.
export const SCALE = Number(process.env.ROOMSHARD_TEST_TIME_SCALE || 1);

/** Poll `predicate` (sync or async) until true; throws `what` after `seconds`. */
export async function waitFor(predicate, seconds, what) {
  const deadline = Date.now() + seconds * SCALE * 1000;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${seconds} s waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export async function startCluster({ shards = 2, env = {}, args = [] } = {}) {
  const python = process.env.ROOMSHARD_PYTHON || 'python3';
  const dataDir = mkdtempSync(join(tmpdir(), 'roomshard-js-'));
  const proc = spawn(python, ['-m', 'roomshard', 'dev', '--port', '0', '--shards', String(shards),
    '--data-dir', dataDir, ...args], {
    cwd: REPO,
    env: { ...process.env, ROOMSHARD_ADMIN_TOKEN: ADMIN_TOKEN, ...env },
    // In the test runner's process group: a runner that is killed takes it along;
    // stop() asks it to stop its directory and shards itself (SIGINT, as Ctrl-C).
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout.on('data', (d) => { out += d; });
  proc.stderr.on('data', (d) => { out += d; });
  const exited = new Promise((r) => proc.once('exit', r));
  const cluster = {
    proc, dataDir,
    output: () => out,
    directory: null,
    shards: {},
    async admin(method, path, body) {
      const resp = await fetch(`${cluster.directory}${path}`, {
        method,
        headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await resp.text();
      if (resp.status !== 200) throw new Error(`${method} ${path}: ${resp.status} ${text}`);
      return JSON.parse(text);
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill('SIGINT');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 15000 * SCALE);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  try {
    await waitFor(() => {
      if (proc.exitCode !== null) throw new Error(`roomshard dev exited ${proc.exitCode}:\n${out}`);
      return out.includes('the service is up.');
    }, 60, 'roomshard dev to start');
    cluster.directory = /directory:\s+(\S+)/.exec(out)[1];
    for (const m of out.matchAll(/shard (i\d+):\s+(\S+)/g)) cluster.shards[m[1]] = m[2];
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}

/** The pid of shard `instance` of `cluster` (a descendant of its `roomshard dev`), from /proc. */
export function shardPid(cluster, instance) {
  const { readdirSync, readFileSync } = fsSync;
  const parent = (pid) => {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
    } catch { return 0; }
  };
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let args;
    try { args = readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0'); } catch { continue; }
    const at = args.indexOf('--instance');
    if (!args.includes('shard') || at < 0 || args[at + 1] !== instance) continue;
    for (let pid = Number(entry), hops = 0; pid > 1 && hops < 5; pid = parent(pid), hops++) {
      if (pid === cluster.proc.pid) return Number(entry);
    }
  }
  throw new Error(`no process of shard ${instance} under roomshard dev ${cluster.proc.pid}`);
}
