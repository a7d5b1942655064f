/**
 * fastify, built on the first request the fast path declines rather than at start.
 *
 * Loading it costs ~8 MiB of anonymous memory, ~15 MiB of RSS and ~200 ms of CPU; a daemon on a
 * phone that only ever serves headers and answers health checks never needs it. The first
 * request that does starts the load; it and every request arriving meanwhile are queued and
 * handed to fastify in the order they came, once it is ready. A load that fails answers the
 * queued requests 500 and is tried again on the next request.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from '../../log.js';
import type { App } from './fastify-app.js';
import { sendJson, serviceUnavailable } from './raw-reply.js';

export type FastifyState = 'not loaded' | 'loading' | 'loaded';

export class LazyApp {
  private app: App | undefined;
  private loading: Promise<void> | undefined;
  private queue: Array<[IncomingMessage, ServerResponse]> = [];
  private closed = false;

  constructor(
    private readonly build: () => Promise<App>,
    private readonly log: Logger,
  ) {}

  /** Where fastify is: not loaded, being loaded (requests queued), or answering. */
  get state(): FastifyState {
    return this.app ? 'loaded' : this.loading ? 'loading' : 'not loaded';
  }

  handle(req: IncomingMessage, res: ServerResponse): void {
    if (this.app) {
      this.app.handler(req, res);
      return;
    }
    if (this.closed) {
      serviceUnavailable(res); // as fastify answers once closing
      return;
    }
    this.queue.push([req, res]);
    this.loading ??= this.load();
  }

  private async load(): Promise<void> {
    const started = performance.now();
    let failure: unknown;
    try {
      this.app = await this.build();
      this.log.debug({ ms: Math.round(performance.now() - started), queued: this.queue.length }, 'fastify loaded (a request the fast path does not answer)');
    } catch (err) {
      failure = err;
      this.log.error({ err }, 'cannot load the HTTP router');
    }
    this.loading = undefined;
    const queued = this.queue;
    this.queue = [];
    // Synchronously, in arrival order: nothing else can run in between.
    for (const [req, res] of queued) {
      if (this.app) this.app.handler(req, res);
      else if (failure !== undefined) sendJson(res, 500, 'no-store', { error: { code: 'E_INTERNAL', message: 'internal error (the daemon log has the details)' } });
    }
  }

  /**
   * Let requests already queued reach fastify (they were in flight before close began), then run
   * fastify's onClose hooks. The server's connections are the caller's to close.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.loading;
    await this.app?.close();
  }
}
