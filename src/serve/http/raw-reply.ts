/**
 * Answers written straight on node's response, byte for byte as fastify writes them (the same
 * headers in the same order, the same bodies): the fast path's JSON answers, and the few
 * answers the server gives before or without fastify (503 while closing, malformed requests).
 * test/http-parity.test.ts holds both sides to that.
 */
import { STATUS_CODES, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

const JSON_TYPE = 'application/json; charset=utf-8';

/**
 * A JSON answer as a fastify route sends one (`x-content-type-options` from the root hook,
 * then the route's headers). Returns the body bytes sent (0 for HEAD), for the metrics.
 */
export function sendJson(res: ServerResponse, status: number, cacheControl: string, value: unknown, extra?: Readonly<Record<string, string>>): number {
  return sendText(res, status, cacheControl, JSON_TYPE, JSON.stringify(value), extra);
}

/** A string body of `type` (see sendJson). */
export function sendText(res: ServerResponse, status: number, cacheControl: string, type: string, body: string, extra?: Readonly<Record<string, string>>): number {
  const length = Buffer.byteLength(body);
  const headers: Record<string, string> = { 'x-content-type-options': 'nosniff' };
  if (extra) Object.assign(headers, extra);
  headers['cache-control'] = cacheControl;
  headers['content-type'] = type;
  headers['content-length'] = String(length);
  res.writeHead(status, headers);
  res.end(body);
  return res.req.method === 'HEAD' ? 0 : length;
}

const UNAVAILABLE = '{"error":"Service Unavailable","message":"Service Unavailable","statusCode":503}';

/** What fastify answers (return503OnClosing) to a request arriving once the server is closing. */
export function serviceUnavailable(res: ServerResponse): void {
  res.setHeader('Connection', 'close');
  res.writeHead(503, { 'Content-Type': 'application/json', 'Content-Length': String(UNAVAILABLE.length) });
  res.end(UNAVAILABLE);
}

/**
 * The server's 'clientError' answer (a header timeout, oversized headers, a request node cannot
 * parse): fastify's default, which the daemon has always given, there from the start since
 * fastify may never be loaded.
 */
export function answerClientError(err: Error & { code?: string }, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const [status, message] = err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? [408, 'Client Timeout'] : err.code === 'HPE_HEADER_OVERFLOW' ? [431, 'Exceeded maximum allowed HTTP header size'] : [400, 'Client Error'];
  const reason = STATUS_CODES[status]!;
  const body = `{"error":"${reason}","message":"${message}","statusCode":${status}}`;
  if (socket.writable) socket.write(`HTTP/1.1 ${status} ${reason}\r\nContent-Length: ${body.length}\r\nContent-Type: application/json\r\n\r\n${body}`);
  socket.destroy(err);
}
