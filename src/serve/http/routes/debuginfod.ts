/**
 * debuginfod's URL scheme for what this daemon holds, keyed by the kernel's GNU build id (the one
 * `/sys/kernel/notes` and the vmlinux carry), so that clients configured with DEBUGINFOD_URLS can
 * fetch a device's kernel files by the id they already know:
 *
 *   /buildid/<id>/source/<absolute path>  a header of that kernel: the tail of the path that is a
 *                                         file of its tree (/usr/src/linux/include/linux/sched.h
 *                                         → include/linux/sched.h)
 *   /buildid/<id>/section/.BTF            the kernel's BTF, for the running kernel (whose BTF this
 *                                         daemon can read and vouch for)
 *   /buildid/<id>/vmlinux.h               kheadersd's own artifacts under the same key: the
 *   /buildid/<id>/.config                 header made from that BTF, the kernel's configuration
 *   /buildid/<id>/debuginfo, executable   404: this daemon holds neither
 *
 * A build id names one kernel build, but a kheaders.ko rebuilt for it is another archive: the
 * current entry is preferred, then the newest. Entries record a build id when their archive was
 * read from the running kernel (or its BTF was: a vmlinux.h-only entry).
 */
import { stat } from 'node:fs/promises';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { fileBody } from '../bytes.js';
import { httpDate, type ServedEntry } from '../catalog.js';
import { sendError, sendRepresentation } from '../respond.js';
import { fileRepresentation, REVALIDATE } from '../tree.js';
import { getAndHead, type RouteContext } from './context.js';
import { segmentsAfter } from './kernels.js';

const PREFIX = ['buildid'];
const BUILD_ID_RE = /^[0-9a-f]{2,128}$/;
/** The tree's top-level directories: a source path is matched from the first of these on. */
const TREE_ROOTS = new Set(['include', 'arch']);
const DEFAULT_LIVE_BTF = '/sys/kernel/btf/vmlinux';

export interface DebuginfodOptions {
  /** The running kernel's BTF (default /sys/kernel/btf/vmlinux). */
  liveBtf?: string;
}

export async function debuginfodRoutes(app: FastifyInstance, ctx: RouteContext & DebuginfodOptions): Promise<void> {
  const { catalog, state } = ctx;
  const liveBtf = ctx.liveBtf ?? DEFAULT_LIVE_BTF;

  /** The entry for a build id: the current one if it has it, else the newest. */
  const entryFor = async (buildId: string): Promise<ServedEntry | undefined> => {
    const snap = await catalog.snapshot();
    const matching = snap.manifests.filter((m) => m.buildId === buildId);
    const chosen = matching.find((m) => m.id === snap.currentId) ?? matching[0];
    return chosen === undefined ? undefined : catalog.byId(chosen.id);
  };

  getAndHead(app, '/buildid/*', async (req: FastifyRequest, reply: FastifyReply) => {
    const rest = segmentsAfter(req, reply, PREFIX);
    if (!Array.isArray(rest)) return rest;
    const buildId = (rest[0] ?? '').toLowerCase();
    const kind = rest[1];
    if (!BUILD_ID_RE.test(buildId) || kind === undefined) return sendError(reply, 'E_NOT_FOUND', 'debuginfod paths are /buildid/<hex build id>/<artifact>');

    if (kind === 'section') {
      if (rest.length !== 3 || rest[2] !== '.BTF') return sendError(reply, 'E_NOT_FOUND', 'the only section held is .BTF');
      if (state.live?.buildId !== buildId) return sendError(reply, 'E_NOT_FOUND', `${buildId} is not the running kernel: its BTF is not held`);
      const st = await stat(liveBtf).catch(() => undefined);
      if (!st) return sendError(reply, 'E_NOT_FOUND', 'the running kernel has no BTF');
      const seconds = Math.floor(st.mtimeMs / 1000);
      return sendRepresentation(
        req,
        reply,
        {
          body: fileBody(liveBtf, 0, st.size),
          etag: `"btf-${buildId.slice(0, 40)}"`,
          lastModified: httpDate(seconds),
          mtime: seconds,
          contentType: 'application/octet-stream',
          cacheControl: REVALIDATE,
          compressible: false,
          ranges: true,
        },
        catalog.bytes,
      );
    }

    const served = await entryFor(buildId);
    if (!served) return sendError(reply, 'E_NOT_FOUND', `no cached entry is for the kernel with build id ${buildId}`);
    let node: number;
    if (kind === 'source') node = sourceNode(served, rest.slice(2));
    else if ((kind === 'vmlinux.h' || kind === '.config') && rest.length === 2) node = served.lookup(kind);
    else return sendError(reply, 'E_NOT_FOUND', `${kind}: not held here (sources, section/.BTF, vmlinux.h and .config are)`);
    if (node < 0 || served.entry.index.kindOf(node) !== 'file') return sendError(reply, 'E_NOT_FOUND', `${rest.slice(1).join('/')}: not in ${served.manifest.release}'s files`);
    return sendRepresentation(req, reply, fileRepresentation(served, node, REVALIDATE), catalog.bytes);
  });
}

/** The file of the tree a source path names: its tail from the first `include` or `arch` on (-1: none). */
function sourceNode(served: ServedEntry, segments: readonly string[]): number {
  for (let i = 0; i < segments.length; i++) {
    if (!TREE_ROOTS.has(segments[i]!)) continue;
    const node = served.lookup(segments.slice(i).join('/'));
    if (node >= 0 && served.entry.index.kindOf(node) === 'file') return node;
  }
  return -1;
}
