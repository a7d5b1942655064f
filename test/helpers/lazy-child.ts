/**
 * A process of its own (so that nothing else has loaded fastify in it) serving a cache over HTTP:
 * it asks its own server the paths given, in order, and prints one JSON line per path: the
 * status, and whether fastify's modules are in the module cache by then.
 *
 *   node lazy-child.js <cacheDir> <path>...
 */
import { createRequire } from 'node:module';
import { startHttpServer } from '../../src/serve/http/server.js';
import { DaemonState } from '../../src/serve/state.js';
import { CacheStore } from '../../src/store/cache.js';
import { quietLog, request } from './http-env.js';

const [cacheDir, ...paths] = process.argv.slice(2);
const moduleCache = createRequire(import.meta.url).cache;
const fastifyLoaded = (): boolean => Object.keys(moduleCache).some((file) => /[\\/]node_modules[\\/]fastify[\\/]/.test(file));

const store = await CacheStore.open(cacheDir!);
const state = new DaemonState();
state.currentId = await store.currentId();
state.ready = true;
const server = await startHttpServer({ listen: { host: '127.0.0.1', port: 0 }, store, state, log: quietLog() });
console.log(JSON.stringify({ path: null, status: null, fastifyLoaded: fastifyLoaded(), state: server.fastify }));
for (const p of paths) {
  const res = await request(server.port, p);
  console.log(JSON.stringify({ path: p, status: res.status, fastifyLoaded: fastifyLoaded(), state: server.fastify }));
}
await server.close();
