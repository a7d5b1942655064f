/**
 * Prometheus metrics, hand-written: a few counters, one histogram and some gauges do not need a
 * client library. Text exposition format 0.0.4. Route labels are a fixed small set chosen by
 * the handlers (never the raw URL), so a scanner cannot blow up the label cardinality.
 */
import type { Manifest } from '../../store/entry.js';
import type { DaemonState } from '../state.js';

/** Request latency buckets, seconds: from a cached header (sub-ms) to a slow archive download. */
export const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10] as const;

export function escapeLabel(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function num(v: number): string {
  if (Number.isNaN(v)) return 'NaN';
  if (v === Infinity) return '+Inf';
  if (v === -Infinity) return '-Inf';
  return String(v);
}

/**
 * What one route label has seen. The request path holds its route's instance and counts into it
 * directly: no label string is built or hashed per request, and nothing is allocated.
 */
export class RouteMetrics {
  /** Requests by status. */
  private readonly statuses = new Map<number, number>();
  bytes = 0;
  /** Latency histogram: per bucket, not cumulative; the last one is +Inf. */
  readonly buckets: number[] = new Array<number>(LATENCY_BUCKETS.length + 1).fill(0);
  sum = 0;
  count = 0;

  constructor(readonly route: string) {}

  observe(status: number, seconds: number, bytesSent: number): void {
    this.statuses.set(status, (this.statuses.get(status) ?? 0) + 1);
    this.bytes += bytesSent;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.buckets[i]!++;
    this.sum += seconds;
    this.count++;
  }

  /** [status, requests], by status. */
  byStatus(): Array<[number, number]> {
    return [...this.statuses].sort(([a], [b]) => a - b);
  }
}

export class HttpMetrics {
  private readonly routes = new Map<string, RouteMetrics>();

  /** The counters of one route label, to observe into (made on first use). */
  route(route: string): RouteMetrics {
    let r = this.routes.get(route);
    if (!r) {
      r = new RouteMetrics(route);
      this.routes.set(route, r);
    }
    return r;
  }

  observe(route: string, status: number, seconds: number, bytesSent: number): void {
    this.route(route).observe(status, seconds, bytesSent);
  }

  render(manifests: readonly Manifest[], state: DaemonState, memoryCacheBytes = 0, quarantineEntries = 0): string {
    const out: string[] = [];
    const family = (name: string, type: string, help: string): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    };

    // Routes a request path took a handle for but that have answered nothing yet are not shown.
    const routes = [...this.routes.values()].filter((r) => r.count > 0).sort((a, b) => (a.route < b.route ? -1 : a.route > b.route ? 1 : 0));
    family('kheadersd_http_requests_total', 'counter', 'HTTP requests answered, by route and status.');
    for (const r of routes) {
      for (const [status, n] of r.byStatus()) out.push(`kheadersd_http_requests_total{route="${escapeLabel(r.route)}",status="${status}"} ${n}`);
    }

    family('kheadersd_http_response_bytes_total', 'counter', 'Response body bytes sent, by route.');
    for (const r of routes) out.push(`kheadersd_http_response_bytes_total{route="${escapeLabel(r.route)}"} ${r.bytes}`);

    family('kheadersd_http_request_duration_seconds', 'histogram', 'Time from request to the end of the response, by route.');
    for (const hist of routes) {
      const r = escapeLabel(hist.route);
      let cumulative = 0;
      LATENCY_BUCKETS.forEach((le, i) => {
        cumulative += hist.buckets[i]!;
        out.push(`kheadersd_http_request_duration_seconds_bucket{route="${r}",le="${le}"} ${cumulative}`);
      });
      cumulative += hist.buckets[LATENCY_BUCKETS.length]!;
      out.push(`kheadersd_http_request_duration_seconds_bucket{route="${r}",le="+Inf"} ${cumulative}`);
      out.push(`kheadersd_http_request_duration_seconds_sum{route="${r}"} ${num(hist.sum)}`);
      out.push(`kheadersd_http_request_duration_seconds_count{route="${r}"} ${hist.count}`);
    }

    family('kheadersd_cache_entries', 'gauge', 'Cache entries.');
    out.push(`kheadersd_cache_entries ${manifests.length}`);
    family('kheadersd_cache_bytes', 'gauge', 'Bytes the cache entries occupy (pack, archive, vmlinux.h).');
    out.push(`kheadersd_cache_bytes ${manifests.reduce((s, m) => s + m.packBytes + m.archiveBytes + (m.btf?.bytes ?? 0), 0)}`);

    family('kheadersd_entries_quarantined_total', 'counter', 'Damaged cache entries this daemon moved to quarantine/.');
    out.push(`kheadersd_entries_quarantined_total ${state.quarantined}`);
    family('kheadersd_entries_rebuilt_total', 'counter', 'Quarantined entries this daemon rebuilt from their own archive.');
    out.push(`kheadersd_entries_rebuilt_total ${state.rebuilt}`);
    family('kheadersd_entry_damage_reports_total', 'counter', "Reads refused because an entry's bytes did not match their digests (or its files were short).");
    out.push(`kheadersd_entry_damage_reports_total ${state.damageReports}`);
    family('kheadersd_quarantine_entries', 'gauge', 'Quarantined entries kept in the cache (the newest few).');
    out.push(`kheadersd_quarantine_entries ${quarantineEntries}`);

    family('kheadersd_http_memory_cache_bytes', 'gauge', 'Bytes of hot file bodies and compressed bodies the HTTP server keeps in memory.');
    out.push(`kheadersd_http_memory_cache_bytes ${memoryCacheBytes}`);

    family('kheadersd_ready', 'gauge', "1 when the running kernel's entry is cached and served.");
    out.push(`kheadersd_ready ${state.ready ? 1 : 0}`);

    family('kheadersd_ingest_duration_seconds', 'gauge', 'Duration of the last successful ingest (0 when it reused a cached entry quickly).');
    if (state.lastIngest) out.push(`kheadersd_ingest_duration_seconds ${num(state.lastIngest.durationMs / 1000)}`);
    family('kheadersd_ingest_last_success_timestamp_seconds', 'gauge', 'When the last successful ingest finished.');
    if (state.lastIngest) out.push(`kheadersd_ingest_last_success_timestamp_seconds ${num(Date.parse(state.lastIngest.at) / 1000)}`);

    family('kheadersd_ingest_last_error', 'gauge', 'Whether the last ingest failed (1), with its error code.');
    const e = state.lastIngestError;
    out.push(e ? `kheadersd_ingest_last_error{code="${escapeLabel(e.code)}"} 1` : 'kheadersd_ingest_last_error{code=""} 0');
    family('kheadersd_ingest_last_error_timestamp_seconds', 'gauge', 'When the last ingest failure happened.');
    if (e) out.push(`kheadersd_ingest_last_error_timestamp_seconds ${num(Date.parse(e.at) / 1000)}`);

    return out.join('\n') + '\n';
  }
}
