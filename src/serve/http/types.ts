/**
 * Per-request fields the server decorates fastify's request with (declared here once so every
 * plugin sees the same types).
 */
declare module 'fastify' {
  interface FastifyRequest {
    /** Body bytes written, for the bytes-sent counter. */
    bytesOut: number;
  }
}

export {};
