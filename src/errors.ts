/**
 * Every failure a user can cause or meet is a KheadersError with a stable code, so the CLI can
 * choose an exit status and a message without parsing text, and HTTP can map it to a status.
 */
export type ErrorCode =
  | 'E_USAGE' // bad flags or arguments
  | 'E_CONFIG' // a bad configuration file or variable
  | 'E_ARCHIVE_NOT_FOUND' // no header archive anywhere we looked
  | 'E_ARCHIVE_CORRUPT' // not xz, truncated, CRC mismatch, trailing garbage, bad tar
  | 'E_UNSAFE_ENTRY' // traversal, absolute name, hard link, device, escaping symlink, duplicate
  | 'E_LIMIT' // an xz-bomb guard tripped (total bytes, entry count, file size)
  | 'E_NO_SPACE' // the cache filesystem is full
  | 'E_LOCKED' // another process holds the cache lock
  | 'E_CACHE_UNSAFE' // cache dir owned by someone else or writable by others
  | 'E_NOT_FOUND' // no such cache entry or path inside one
  | 'E_ENTRY_DAMAGED' // a cache entry failed its checks (bad index or manifest, short pack, digest mismatch): moved aside and rebuilt
  | 'E_ELF' // an ELF file we cannot read
  | 'E_BTF' // malformed BTF
  | 'E_FUSE' // the mount could not be made or kept
  | 'E_HTTP' // the HTTP listener could not start or a pull failed
  | 'E_ADB' // adb missing, no device, several devices
  | 'E_IO' // writing the output failed (stdout of `cat`, an export directory)
  | 'E_INTERNAL';

/** Process exit statuses, one per class of failure (documented in the README). */
export const EXIT = {
  ok: 0,
  internal: 1,
  usage: 2,
  archiveNotFound: 3,
  badArchive: 4,
  environment: 5,
  notFound: 6,
} as const;

export class KheadersError extends Error {
  readonly code: ErrorCode;
  /** Machine-readable context: the offending entry, the paths tried, the limit hit. */
  readonly details: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'KheadersError';
    this.code = code;
    this.details = details;
  }

  get exitCode(): number {
    switch (this.code) {
      case 'E_USAGE':
      case 'E_CONFIG':
        return EXIT.usage;
      case 'E_ARCHIVE_NOT_FOUND':
        return EXIT.archiveNotFound;
      case 'E_ARCHIVE_CORRUPT':
      case 'E_UNSAFE_ENTRY':
      case 'E_LIMIT':
      case 'E_ELF':
      case 'E_BTF':
        return EXIT.badArchive;
      case 'E_NOT_FOUND':
        // Nothing wrong with the machine: what was asked for (an entry, a file, a module) is not there.
        return EXIT.notFound;
      case 'E_NO_SPACE':
      case 'E_LOCKED':
      case 'E_CACHE_UNSAFE':
      case 'E_ENTRY_DAMAGED':
      case 'E_FUSE':
      case 'E_HTTP':
      case 'E_ADB':
      case 'E_IO':
        return EXIT.environment;
      default:
        return EXIT.internal;
    }
  }
}

export function isKheadersError(err: unknown, code?: ErrorCode): err is KheadersError {
  return err instanceof KheadersError && (code === undefined || err.code === code);
}

/** The errno of a Node system error, if it is one. */
export function errnoOf(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}
