/**
 * What the kernels and blobs routes share: a path inside an entry (a file, or a directory
 * listing as JSON or HTML) and the entry's original archive. The two route families differ only
 * in how they name the entry and in their Cache-Control.
 */
import { createHash } from 'node:crypto';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { TreeNode } from '../../store/tree-index.js';
import { archiveBody } from './bytes.js';
import type { Catalog, ServedEntry } from './catalog.js';
import { httpDate } from './catalog.js';
import { prefersHtml } from './conditional.js';
import { encodeTreePath } from './paths.js';
import { contentTypeFor, sendError, sendRepresentation, type Representation } from './respond.js';

/** Release-named URLs: a cache must revalidate (the release may be re-ingested, `current` moves). */
export const REVALIDATE = 'no-cache';
/** Content-addressed URLs: the bytes behind them can never change. */
export const IMMUTABLE = 'public, max-age=31536000, immutable';

export interface TreeRequest {
  served: ServedEntry;
  /** Decoded, validated segments of the path inside the tree. */
  segments: readonly string[];
  /** URL of the entry, e.g. `/v1/kernels/current` (for links in listings). */
  base: string;
  cacheControl: string;
  /** The URL ended with '/': only a directory may answer it. */
  trailingSlash: boolean;
}

export async function serveTreePath(catalog: Catalog, req: FastifyRequest, reply: FastifyReply, t: TreeRequest): Promise<FastifyReply> {
  const { served } = t;
  const wanted = t.segments.join('/');
  // The index is the sandbox: a name that is not in it does not exist, whatever it looks like.
  const node = served.lookup(wanted);
  const m = served.manifest;
  if (node < 0) return sendError(reply, 'E_NOT_FOUND', `${wanted || '/'}: no such file in ${m.release} (${m.digest.slice(0, 12)})`);
  const index = served.entry.index;
  if (index.kindOf(node) === 'dir') return sendListing(catalog, req, reply, t, index.node(node)!);
  // As the kernel answers `cat file/`: a file is not a directory.
  if (t.trailingSlash) return sendError(reply, 'E_NOT_FOUND', `${wanted}/: not a directory (${wanted} is a file in ${m.release})`);
  return sendRepresentation(req, reply, fileRepresentation(served, node, t.cacheControl), catalog.bytes);
}

/** A file node as a representation (shared with the fast path). */
export function fileRepresentation(served: ServedEntry, node: number, cacheControl: string): Representation {
  return served.representation(node, cacheControl, () => buildFileRepresentation(served, node, cacheControl));
}

function buildFileRepresentation(served: ServedEntry, node: number, cacheControl: string): Representation {
  const index = served.entry.index;
  const ct = contentTypeFor(index.nameOf(node));
  const blob = index.dataOf(node).blob;
  return {
    body: served.body(node),
    etag: served.etag(node),
    lastModified: served.lastModified(node),
    mtime: index.mtimeOf(node),
    contentType: ct.type,
    cacheControl,
    compressible: ct.text,
    ranges: true,
    // Files made beside the archive (vmlinux.h, .config) carry the digest recorded when they were
    // made, so a client (pull) can check what it received, as it does the archive.
    ...(blob !== undefined ? { headers: { 'repr-digest': `sha-256=:${index.blob(blob).sha256.toString('base64')}:` } } : {}),
  };
}

export async function serveArchive(catalog: Catalog, req: FastifyRequest, reply: FastifyReply, served: ServedEntry, cacheControl: string): Promise<FastifyReply> {
  const m = served.manifest;
  if (m.kind !== 'headers') return sendError(reply, 'E_NOT_FOUND', `${m.release} has no header archive (only vmlinux.h from BTF)`);
  return sendRepresentation(
    req,
    reply,
    {
      body: archiveBody(served.entry.reader, m.archiveBytes, served.cacheKey),
      etag: served.archiveEtag,
      lastModified: httpDate(served.treeMtime),
      mtime: served.treeMtime,
      contentType: 'application/x-xz',
      cacheControl,
      compressible: false, // already xz: gzip would only cost CPU
      ranges: true,
      headers: {
        // RFC 9530 and its predecessor (RFC 3230), for clients that check either.
        'repr-digest': `sha-256=:${served.digestBase64}:`,
        digest: `sha-256=${served.digestBase64}`,
        'content-disposition': `attachment; filename="kheaders-${m.release}.tar.xz"`,
      },
    },
    catalog.bytes,
  );
}

export interface ListingItem {
  name: string;
  type: 'file' | 'dir' | 'symlink';
  size: number;
  /** ISO time; null for a directory the archive only implied (no mtime of its own). */
  mtime: string | null;
  target?: string;
  /** For files made beside the archive (vmlinux.h, .config): the sha256 of their bytes. */
  sha256?: string;
}

export interface Listing {
  release: string;
  digest: string;
  path: string;
  entries: ListingItem[];
}

function listingOf(served: ServedEntry, dir: TreeNode): Listing {
  return {
    release: served.manifest.release,
    digest: served.manifest.digest,
    path: dir.path,
    entries: served.entry.index.list(dir).map((n) => ({
      name: n.name,
      type: n.kind,
      size: n.size,
      mtime: n.mtime > 0 ? new Date(n.mtime * 1000).toISOString() : null,
      ...(n.target !== undefined ? { target: n.target } : {}),
      ...(n.sha256 !== undefined ? { sha256: n.sha256 } : {}),
    })),
  };
}

async function sendListing(catalog: Catalog, req: FastifyRequest, reply: FastifyReply, t: TreeRequest, dir: TreeNode): Promise<FastifyReply> {
  const html = prefersHtml(req.headers.accept);
  const listing = listingOf(t.served, dir);
  const body = Buffer.from(html ? renderHtml(listing, t.base) : JSON.stringify(listing));
  const tag = createHash('sha256')
    .update(`${t.served.manifest.digest}\0listing\0${html ? 'html' : 'json'}\0${dir.path}`)
    .digest('base64url')
    .slice(0, 27);
  if (html) reply.header('content-security-policy', "default-src 'none'; style-src 'unsafe-inline'");
  return sendRepresentation(
    req,
    reply,
    {
      body: { kind: 'buffer', data: body },
      etag: `"${tag}"`,
      lastModified: dir.mtime > 0 ? httpDate(dir.mtime) : null,
      mtime: dir.mtime > 0 ? dir.mtime : null,
      contentType: html ? 'text/html; charset=utf-8' : 'application/json; charset=utf-8',
      cacheControl: t.cacheControl,
      compressible: true,
      ranges: false,
      varyAccept: true,
    },
    catalog.bytes,
  );
}

export function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

/** A plain page for a person browsing the tree. Every name is escaped; every link is absolute. */
export function renderHtml(listing: Listing, base: string): string {
  const filesUrl = (p: string): string => `${base}/files/${encodeTreePath(p)}`;
  const title = `/${listing.path}`;
  const rows: string[] = [];
  if (listing.path !== '') {
    const parent = listing.path.includes('/') ? listing.path.slice(0, listing.path.lastIndexOf('/')) : '';
    rows.push(`<tr><td><a href="${escapeHtml(filesUrl(parent))}${parent ? '/' : ''}">../</a></td><td></td><td></td></tr>`);
  }
  for (const e of listing.entries) {
    const childPath = listing.path === '' ? e.name : `${listing.path}/${e.name}`;
    const href = filesUrl(childPath) + (e.type === 'dir' ? '/' : '');
    const label = escapeHtml(e.name) + (e.type === 'dir' ? '/' : '') + (e.target !== undefined ? ` → ${escapeHtml(e.target)}` : '');
    const size = e.type === 'file' ? String(e.size) : '';
    rows.push(`<tr><td><a href="${escapeHtml(href)}">${label}</a></td><td class="n">${size}</td><td>${e.mtime === null ? '' : escapeHtml(e.mtime.replace(/\.\d+Z$/, 'Z'))}</td></tr>`);
  }
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(`${listing.release} ${title}`)}</title>
<style>body{font-family:monospace;margin:1em 2em}td{padding:0 1em 0 0}.n{text-align:right}</style></head>
<body><h1>${escapeHtml(title)}</h1>
<p>kernel ${escapeHtml(listing.release)}, archive sha256 ${escapeHtml(listing.digest)} &middot; <a href="${escapeHtml(base)}/archive.tar.xz">archive.tar.xz</a></p>
<table>
${rows.join('\n')}
</table></body></html>
`;
}
