/**
 * A stand-in for a VM test file, for vm-harness.test.ts: one test under exitWhenDone that opens
 * a loopback server. KH_GUARD_MODE: 'leak', it fails without closing it (what a failed boot's
 * forgotten poller did); 'leak-passing', it passes without closing it; else it closes it and
 * passes. KH_GUARD_GRACE_MS: the guard's grace.
 * (The environment, not argv: `node --test FILE` passes no arguments to the file.)
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import { test } from 'node:test';
import { exitWhenDone } from '../vm/exit-guard.js';

const mode = process.env['KH_GUARD_MODE'] ?? 'clean';
exitWhenDone(
  test(`${mode}: opens a server`, async () => {
    const server = http.createServer();
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    if (mode === 'leak') assert.fail('the boot failed');
    if (mode !== 'leak-passing') await new Promise((resolve) => server.close(resolve));
  }),
  Number(process.env['KH_GUARD_GRACE_MS'] ?? 1000),
);
