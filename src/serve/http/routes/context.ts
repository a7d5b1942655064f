/** What every route plugin is given: the catalog it reads, the metrics it reports, the daemon's state. */
import type { FastifyInstance, RouteHandlerMethod } from 'fastify';
import type { ModuleHeaderSource } from '../../../store/module-btf.js';
import type { DaemonState } from '../../state.js';
import type { Catalog } from '../catalog.js';
import type { HttpMetrics } from '../metrics.js';

export interface RouteContext {
  catalog: Catalog;
  metrics: HttpMetrics;
  state: DaemonState;
  /** Loaded modules' headers, under the running kernel's entry (`files/btf/`); absent: none. */
  modules?: ModuleHeaderSource;
}

/**
 * Register GET and HEAD together. fastify's automatic HEAD routes replace an empty HEAD body's
 * Content-Length with 0; a route declared for HEAD itself keeps the length we set, so HEAD
 * answers with the headers GET would (without reading the file).
 */
export function getAndHead(app: FastifyInstance, url: string, handler: RouteHandlerMethod): void {
  app.route({ method: ['GET', 'HEAD'], url, handler });
}
