/**
 * debuginfod's URL scheme on the HTTP server: a kernel's headers, BTF, vmlinux.h and .config by
 * the kernel's build id, checked with plain requests and with elfutils' own client
 * (`debuginfod-find`, Debian's `debuginfod` package) pointed at the daemon by DEBUGINFOD_URLS.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { ingest } from '../src/store/ingest.js';
import { tempDir } from './helpers/archives.js';
import { BtfBuilder } from './helpers/btf-builder.js';
import { buildIdNotes } from './helpers/kernels.js';
import { makeTarXz, quietLog, request, startEnv, synthTree } from './helpers/http-env.js';

const BUILD_ID = '1959b21d7a4018f684478a3b95d70a8643ddac89';

function find(args: string[], env: NodeJS.ProcessEnv): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile('debuginfod-find', args, { env, timeout: 60_000 }, (err, stdout, stderr) => {
      resolve({ code: err === null ? 0 : typeof err.code === 'number' ? err.code : 1, stdout, stderr });
    });
  });
}

test('/buildid/<id>/…: sources, section/.BTF, vmlinux.h by the kernel build id; debuginfod-find gets them', async (t) => {
  const work = await tempDir(t, 'kheaders-debuginfod-');
  const cacheDir = path.join(work, 'cache');
  // The "running kernel": its archive at the live path, its build id in its notes, its BTF.
  const liveArchive = await makeTarXz(synthTree('6.9.0-live', 'd'), path.join(work, 'kheaders.tar.xz'));
  const notesPath = path.join(work, 'notes');
  await writeFile(notesPath, buildIdNotes(BUILD_ID));
  const b = new BtfBuilder();
  b.struct('task_struct', 4, [{ name: 'pid', type: b.int('int', 4, { signed: true }), bitOffset: 0 }]);
  const liveBtf = path.join(work, 'vmlinux.btf');
  await writeFile(liveBtf, b.build());
  const { entry } = await ingest({ cacheDir, livePaths: [liveArchive], notesPath, liveBtf, modprobe: false, liveConfig: path.join(work, 'none'), bootDir: work, log: quietLog() });
  assert.equal(entry.manifest.buildId, BUILD_ID);
  assert.ok(entry.index.get('vmlinux.h'));
  const srv = await startEnv({ work, cacheDir, liveBtf });
  t.after(() => srv.close());
  srv.state.live = { release: entry.manifest.release, buildId: BUILD_ID, btfDigest: null };
  const port = srv.port;

  const types = await request(port, `/buildid/${BUILD_ID}/source/usr/src/linux-6.9/include/linux/types.h`);
  assert.equal(types.status, 200);
  assert.equal(types.body.toString(), '#define TYPES_d 1\n');
  assert.equal((await request(port, `/buildid/${BUILD_ID.toUpperCase()}/source/build/arch/x86/include/asm/ptrace.h`)).status, 200);
  assert.equal((await request(port, `/buildid/${BUILD_ID}/source/usr/src/linux/kernel/sched/core.c`)).status, 404, 'only the headers are held');
  assert.equal((await request(port, `/buildid/${'ab'.repeat(20)}/source/x/include/linux/types.h`)).status, 404, 'another kernel');
  const btf = await request(port, `/buildid/${BUILD_ID}/section/.BTF`);
  assert.equal(btf.status, 200);
  assert.ok(btf.body.equals(await readFile(liveBtf)));
  const vmlinuxH = await request(port, `/buildid/${BUILD_ID}/vmlinux.h`);
  assert.equal(vmlinuxH.status, 200);
  assert.match(vmlinuxH.body.toString(), /struct task_struct \{\n\tint pid;\n\};/);
  for (const held of ['debuginfo', 'executable']) assert.equal((await request(port, `/buildid/${BUILD_ID}/${held}`)).status, 404);
  assert.equal((await request(port, '/buildid/not-hex/source/x')).status, 404);

  // elfutils' client, as a user configures it.
  const which = await new Promise<boolean>((resolve) => execFile('sh', ['-c', 'command -v debuginfod-find'], (err) => resolve(err === null)));
  if (!which) return t.skip('debuginfod-find is not installed (Debian package debuginfod)');
  const env = { ...process.env, DEBUGINFOD_URLS: `http://127.0.0.1:${port}`, DEBUGINFOD_CACHE_PATH: path.join(work, 'client-cache'), DEBUGINFOD_TIMEOUT: '30' };
  const src = await find(['source', BUILD_ID, '/usr/src/linux-6.9/include/linux/types.h'], env);
  assert.equal(src.code, 0, src.stderr);
  assert.equal(await readFile(src.stdout.trim(), 'utf8'), '#define TYPES_d 1\n');
  const section = await find(['section', BUILD_ID, '.BTF'], env);
  assert.equal(section.code, 0, section.stderr);
  assert.ok((await readFile(section.stdout.trim())).equals(await readFile(liveBtf)));
  assert.notEqual((await find(['debuginfo', BUILD_ID], env)).code, 0, 'debuginfo is not held');
  return undefined;
});
