/** Pure parts of the HTTP server: path rules, HTTP semantics, metrics text, token checks. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { bearerChecker } from '../src/serve/http/auth.js';
import { ByteLru } from '../src/serve/http/bytes.js';
import { acceptsGzip, ifRangeHolds, noneMatch, notModifiedSince, parseRange, prefersHtml } from '../src/serve/http/conditional.js';
import { HttpMetrics, escapeLabel } from '../src/serve/http/metrics.js';
import { MAX_PATH_BYTES, PathError, encodeTreePath, parseRequestPath } from '../src/serve/http/paths.js';
import { exposureWarning, isLoopbackHost } from '../src/serve/http/server.js';
import { escapeHtml, renderHtml } from '../src/serve/http/tree.js';
import { DaemonState } from '../src/serve/state.js';

test('parseRequestPath: plain, encoded and trailing-slash paths', () => {
  assert.deepEqual(parseRequestPath('/v1/kernels/current/files/include/linux/sched.h?x=1'), {
    segments: ['v1', 'kernels', 'current', 'files', 'include', 'linux', 'sched.h'],
    trailingSlash: false,
  });
  assert.deepEqual(parseRequestPath('/a/b/'), { segments: ['a', 'b'], trailingSlash: true });
  assert.deepEqual(parseRequestPath('/'), { segments: [], trailingSlash: false });
  assert.deepEqual(parseRequestPath('/a%20b/%C3%A9.h').segments, ['a b', 'é.h']);
  assert.deepEqual(parseRequestPath('/x/.hidden/..h/...').segments, ['x', '.hidden', '..h', '...']);
});

test('parseRequestPath: every traversal and encoding trick is a PathError', () => {
  const bad: Array<[string, string]> = [
    ['/a/../b', 'dot-segment'],
    ['/a/./b', 'dot-segment'],
    ['/a/..', 'dot-segment'],
    ['/a/%2e%2e/b', 'dot-segment'],
    ['/a/%2E%2E/b', 'dot-segment'],
    ['/a/.%2e/b', 'dot-segment'],
    ['/a/%2e/b', 'dot-segment'],
    ['/a/b%2fc', 'encoded-slash'],
    ['/a/b%2Fc', 'encoded-slash'],
    ['/a/%2e%2e%2fetc', 'encoded-slash'],
    ['/a/b%5cc', 'backslash'],
    ['/a/b\\c', 'backslash'],
    ['/a/..\\..\\etc', 'backslash'],
    ['/a/b%00.h', 'nul'],
    ['/a/b%0a', 'control-character'],
    ['/a/%c0%ae%c0%ae/x', 'invalid-utf8'], // over-long '.'
    ['/a/%c0%af', 'invalid-utf8'], // over-long '/'
    ['/a/%ff', 'invalid-utf8'],
    ['/a/%ed%a0%80', 'invalid-utf8'], // a UTF-16 surrogate
    ['/a/%zz', 'bad-escape'],
    ['/a/%2', 'bad-escape'],
    ['/a//b', 'empty-segment'],
    ['/a/b c', 'raw-character'],
    ['/a/b#c', 'raw-character'],
    ['/a/é', 'raw-character'],
    ['/a/"x"', 'raw-character'],
    ['/' + 'a'.repeat(MAX_PATH_BYTES + 1), 'path-too-long'],
    ['/' + 'a'.repeat(256), 'segment-too-long'],
    ['/' + '%41'.repeat(256), 'segment-too-long'],
    ['http://evil/x', 'not-absolute'],
  ];
  for (const [p, reason] of bad) {
    assert.throws(
      () => parseRequestPath(p),
      (err: unknown) => err instanceof PathError && err.reason === reason,
      `${JSON.stringify(p)} should be refused as ${reason}`,
    );
  }
});

test('encodeTreePath keeps slashes and encodes the rest', () => {
  assert.equal(encodeTreePath('include/odd <b>&"name\'.h'), "include/odd%20%3Cb%3E%26%22name'.h");
  assert.equal(encodeTreePath(''), '');
});

test('parseRange: single ranges, suffixes, unsatisfiable and ignored forms', () => {
  assert.deepEqual(parseRange(undefined, 100), { kind: 'none' });
  assert.deepEqual(parseRange('bytes=0-9', 100), { kind: 'range', start: 0, end: 9 });
  assert.deepEqual(parseRange('bytes=90-', 100), { kind: 'range', start: 90, end: 99 });
  assert.deepEqual(parseRange('bytes=90-1000', 100), { kind: 'range', start: 90, end: 99 });
  assert.deepEqual(parseRange('bytes=-10', 100), { kind: 'range', start: 90, end: 99 });
  assert.deepEqual(parseRange('bytes=-1000', 100), { kind: 'range', start: 0, end: 99 });
  assert.deepEqual(parseRange('bytes=100-', 100), { kind: 'unsatisfiable' });
  assert.deepEqual(parseRange('bytes=-0', 100), { kind: 'unsatisfiable' });
  assert.deepEqual(parseRange('bytes=0-', 0), { kind: 'unsatisfiable' });
  assert.deepEqual(parseRange('bytes=0-1,5-6', 100), { kind: 'none' }); // several: whole body
  assert.deepEqual(parseRange('bytes=9-3', 100), { kind: 'none' });
  assert.deepEqual(parseRange('items=0-1', 100), { kind: 'none' });
  assert.deepEqual(parseRange('bytes=a-b', 100), { kind: 'none' });
});

test('conditional headers', () => {
  assert.equal(noneMatch('"a"', ['"a"']), true);
  assert.equal(noneMatch('W/"a"', ['"a"']), true);
  assert.equal(noneMatch('"x", "a"', ['"a"']), true);
  assert.equal(noneMatch('*', ['"a"']), true);
  assert.equal(noneMatch('"b"', ['"a"']), false);
  const mtime = Date.parse('2024-03-01T12:00:00Z') / 1000;
  assert.equal(notModifiedSince('Fri, 01 Mar 2024 12:00:00 GMT', mtime), true);
  assert.equal(notModifiedSince('Fri, 01 Mar 2024 11:59:59 GMT', mtime), false);
  assert.equal(notModifiedSince('garbage', mtime), false);
  assert.equal(ifRangeHolds(undefined, '"a"', 'x'), true);
  assert.equal(ifRangeHolds('"a"', '"a"', 'x'), true);
  assert.equal(ifRangeHolds('W/"a"', '"a"', 'x'), false);
  assert.equal(ifRangeHolds('"b"', '"a"', 'x'), false);
  assert.equal(ifRangeHolds('Fri, 01 Mar 2024 12:00:00 GMT', '"a"', 'Fri, 01 Mar 2024 12:00:00 GMT'), true);
});

test('Accept-Encoding and Accept', () => {
  assert.equal(acceptsGzip('gzip, deflate, br'), true);
  assert.equal(acceptsGzip('br;q=1, gzip;q=0'), false);
  assert.equal(acceptsGzip('*'), true);
  assert.equal(acceptsGzip('identity'), false);
  assert.equal(acceptsGzip(undefined), false);
  assert.equal(prefersHtml('text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8'), true);
  assert.equal(prefersHtml('*/*'), false);
  assert.equal(prefersHtml('application/json'), false);
  assert.equal(prefersHtml('application/json, text/html;q=0.5'), false);
  assert.equal(prefersHtml(undefined), false);
});

test('HTML listing escapes names and targets', () => {
  const html = renderHtml(
    { release: '6.1<x>', digest: 'd'.repeat(64), path: 'include', entries: [{ name: '<script>alert(1)<\\script>.h', type: 'symlink', size: 1, mtime: null, target: '"><img src=x>' }] },
    '/v1/kernels/current',
  );
  assert.ok(!html.includes('<script>'), html);
  assert.ok(!html.includes('<img'), html);
  assert.ok(html.includes('&lt;script&gt;alert(1)&lt;\\script&gt;.h'));
  assert.ok(html.includes('href="/v1/kernels/current/files/include/%3Cscript%3Ealert(1)%3C%5Cscript%3E.h"'));
  assert.equal(escapeHtml(`<&>"'`), '&lt;&amp;&gt;&quot;&#39;');
});

test('metrics text: counters, histogram, escaping, gauges', () => {
  const m = new HttpMetrics();
  m.observe('/v1/kernels/:ref/files/*', 200, 0.0004, 100);
  m.observe('/v1/kernels/:ref/files/*', 200, 0.003, 50);
  m.observe('/v1/kernels/:ref/files/*', 404, 20, 10);
  const state = new DaemonState();
  state.lastIngestError = { at: '2024-01-01T00:00:00Z', code: 'E_ARCHIVE_NOT_FOUND', message: 'x' };
  const text = m.render([], state);
  assert.match(text, /^kheadersd_http_requests_total\{route="\/v1\/kernels\/:ref\/files\/\*",status="200"\} 2$/m);
  assert.match(text, /^kheadersd_http_requests_total\{route="\/v1\/kernels\/:ref\/files\/\*",status="404"\} 1$/m);
  assert.match(text, /^kheadersd_http_response_bytes_total\{route="\/v1\/kernels\/:ref\/files\/\*"\} 160$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_bucket\{route="[^"]+",le="0.0005"\} 1$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_bucket\{route="[^"]+",le="0.005"\} 2$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_bucket\{route="[^"]+",le="10"\} 2$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_bucket\{route="[^"]+",le="\+Inf"\} 3$/m);
  assert.match(text, /^kheadersd_http_request_duration_seconds_count\{route="[^"]+"\} 3$/m);
  assert.match(text, /^kheadersd_cache_entries 0$/m);
  assert.match(text, /^kheadersd_ingest_last_error\{code="E_ARCHIVE_NOT_FOUND"\} 1$/m);
  assert.match(text, /^kheadersd_ready 0$/m);
  assert.equal(escapeLabel('a"b\\c\nd'), 'a\\"b\\\\c\\nd');
  // Every sample line is NAME{labels} VALUE or NAME VALUE.
  for (const line of text.trim().split('\n')) if (!line.startsWith('#')) assert.match(line, /^[a-z_]+(\{[^}]*\})? [-+0-9.eInfNa]+$/, line);
});

test('metrics text: every route and status in a fixed order, one histogram per route; a route with no answers yet is not shown', () => {
  const m = new HttpMetrics();
  m.route('/v1/blobs/:digest/files/*'); // taken by the fast path, never answered
  const files = m.route('/v1/kernels/:ref/files/*');
  files.observe(200, 0.0004, 100);
  m.observe('/v1/kernels/:ref', 200, 0.0002, 300);
  m.observe('/v1/kernels', 200, 0.001, 1000);
  files.observe(304, 0.0001, 0);
  m.observe('/v1/kernels/:ref/files/*', 200, 0.003, 50);
  files.observe(404, 20, 10);
  m.observe('/healthz', 200, 0.00001, 60);
  m.observe('/v1/kernels/:ref', 404, 0.002, 80);
  m.observe('unmatched', 404, 0.6, 70);
  files.observe(206, 0.0101, 4);
  const http = m
    .render([], new DaemonState())
    .split('\n')
    .filter((l) => l.startsWith('kheadersd_http_'));
  // As the daemon has always written them (the same observations, made before route handles existed).
  assert.deepEqual(http, [
    'kheadersd_http_requests_total{route="/healthz",status="200"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels",status="200"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref",status="200"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref",status="404"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref/files/*",status="200"} 2',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref/files/*",status="206"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref/files/*",status="304"} 1',
    'kheadersd_http_requests_total{route="/v1/kernels/:ref/files/*",status="404"} 1',
    'kheadersd_http_requests_total{route="unmatched",status="404"} 1',
    'kheadersd_http_response_bytes_total{route="/healthz"} 60',
    'kheadersd_http_response_bytes_total{route="/v1/kernels"} 1000',
    'kheadersd_http_response_bytes_total{route="/v1/kernels/:ref"} 380',
    'kheadersd_http_response_bytes_total{route="/v1/kernels/:ref/files/*"} 164',
    'kheadersd_http_response_bytes_total{route="unmatched"} 70',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.0005"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.001"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.0025"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.005"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.01"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.025"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.05"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.1"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.25"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="0.5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="1"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="2.5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="10"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/healthz",le="+Inf"} 1',
    'kheadersd_http_request_duration_seconds_sum{route="/healthz"} 0.00001',
    'kheadersd_http_request_duration_seconds_count{route="/healthz"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.0005"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.001"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.0025"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.005"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.01"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.025"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.05"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.1"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.25"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="0.5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="1"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="2.5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="10"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels",le="+Inf"} 1',
    'kheadersd_http_request_duration_seconds_sum{route="/v1/kernels"} 0.001',
    'kheadersd_http_request_duration_seconds_count{route="/v1/kernels"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.0005"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.001"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.0025"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.005"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.01"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.025"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.05"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.1"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.25"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="0.5"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="1"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="2.5"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="5"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="10"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref",le="+Inf"} 2',
    'kheadersd_http_request_duration_seconds_sum{route="/v1/kernels/:ref"} 0.0022',
    'kheadersd_http_request_duration_seconds_count{route="/v1/kernels/:ref"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.0005"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.001"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.0025"} 2',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.005"} 3',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.01"} 3',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.025"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.05"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.1"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.25"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="0.5"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="1"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="2.5"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="5"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="10"} 4',
    'kheadersd_http_request_duration_seconds_bucket{route="/v1/kernels/:ref/files/*",le="+Inf"} 5',
    'kheadersd_http_request_duration_seconds_sum{route="/v1/kernels/:ref/files/*"} 20.0136',
    'kheadersd_http_request_duration_seconds_count{route="/v1/kernels/:ref/files/*"} 5',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.0005"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.001"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.0025"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.005"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.01"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.025"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.05"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.1"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.25"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="0.5"} 0',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="1"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="2.5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="5"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="10"} 1',
    'kheadersd_http_request_duration_seconds_bucket{route="unmatched",le="+Inf"} 1',
    'kheadersd_http_request_duration_seconds_sum{route="unmatched"} 0.6',
    'kheadersd_http_request_duration_seconds_count{route="unmatched"} 1',
    'kheadersd_http_memory_cache_bytes 0',
  ]);
});

test('bearer token check', () => {
  const ok = bearerChecker('s3cret-token');
  assert.equal(ok('Bearer s3cret-token'), true);
  assert.equal(ok('bearer s3cret-token'), true);
  assert.equal(ok('Bearer s3cret-tokeN'), false);
  assert.equal(ok('Bearer s3cret-token2'), false);
  assert.equal(ok('Basic czNjcmV0LXRva2Vu'), false);
  assert.equal(ok('Bearer'), false);
  assert.equal(ok(undefined), false);
});

test('loopback detection and the exposure warning', () => {
  for (const h of ['127.0.0.1', '127.1.2.3', '::1', 'localhost', '::ffff:127.0.0.1']) assert.equal(isLoopbackHost(h), true, h);
  for (const h of ['0.0.0.0', '::', '192.168.1.10', 'example.com', '10.0.0.1']) assert.equal(isLoopbackHost(h), false, h);
  assert.match(exposureWarning('0.0.0.0', 'http://0.0.0.0:7711', false) ?? '', /WITHOUT a token/);
  assert.equal(exposureWarning('0.0.0.0', 'http://0.0.0.0:7711', true), undefined);
  assert.equal(exposureWarning('127.0.0.1', 'http://127.0.0.1:7711', false), undefined);
});

test('ByteLru: bounded in bytes, second chance for used items, prefix removal', () => {
  const lru = new ByteLru(100, 60);
  lru.set('/e1/a', Buffer.alloc(40));
  lru.set('/e1/b', Buffer.alloc(40));
  assert.equal(lru.bytes, 80);
  lru.set('/e2/huge', Buffer.alloc(61)); // over the item limit: not kept
  assert.equal(lru.get('/e2/huge'), undefined);
  assert.ok(lru.get('/e1/a')); // used: survives the next eviction
  lru.set('/e2/c', Buffer.alloc(40)); // 120 > 100: evicts b (a had its second chance)
  assert.ok(lru.get('/e1/a'));
  assert.equal(lru.get('/e1/b'), undefined);
  assert.ok(lru.get('/e2/c'));
  assert.equal(lru.bytes, 80);
  lru.deletePrefix('/e1/');
  assert.equal(lru.get('/e1/a'), undefined);
  assert.equal(lru.bytes, 40);
});
