/**
 * Every failure a user can cause or meet is a KheadersError with a stable code, so the CLI can
 * choose an exit status and a message without parsing text, and HTTP can choose a status. The
 * one table below says, for each code, what it means, how the process exits and what HTTP
 * answers; nothing else maps codes (a code added here is handled everywhere at once).
 */

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

export type ExitStatus = (typeof EXIT)[keyof typeof EXIT];

interface ErrorKind {
  /** What the code means (the README's table says the same). */
  readonly what: string;
  readonly exit: ExitStatus;
  /** The HTTP status when this error ends a request. */
  readonly http: number;
  /**
   * Whether an HTTP client is told the message. Only messages about what the client asked for
   * are: the rest name paths and details of the host, which stay in the daemon's log.
   */
  readonly public: boolean;
}

export const ERRORS = {
  E_USAGE: { what: 'bad flags or arguments', exit: EXIT.usage, http: 400, public: true },
  E_CONFIG: { what: 'a bad configuration file or variable', exit: EXIT.usage, http: 500, public: false },
  E_ARCHIVE_NOT_FOUND: { what: 'no header archive anywhere we looked', exit: EXIT.archiveNotFound, http: 500, public: false },
  E_ARCHIVE_CORRUPT: { what: 'not xz, truncated, CRC mismatch, trailing garbage, bad tar', exit: EXIT.badArchive, http: 500, public: false },
  E_UNSAFE_ENTRY: { what: 'traversal, absolute name, hard link, device, escaping symlink, duplicate', exit: EXIT.badArchive, http: 500, public: false },
  E_LIMIT: { what: 'an xz-bomb guard tripped (total bytes, entry count, file size)', exit: EXIT.badArchive, http: 500, public: false },
  E_ELF: { what: 'an ELF file we cannot read', exit: EXIT.badArchive, http: 500, public: false },
  E_BTF: { what: 'malformed BTF', exit: EXIT.badArchive, http: 500, public: false },
  E_NO_SPACE: { what: 'the filesystem being written is full', exit: EXIT.environment, http: 507, public: false },
  E_LOCKED: { what: 'another process holds the cache lock', exit: EXIT.environment, http: 503, public: false },
  E_CACHE_UNSAFE: { what: 'cache dir owned by someone else or writable by others', exit: EXIT.environment, http: 500, public: false },
  E_CACHE_UNREADABLE: { what: 'a file or directory of the cache that this user may not read (its modes keep others out)', exit: EXIT.environment, http: 500, public: false },
  E_ENTRY_DAMAGED: {
    what: 'a cache entry failed its checks (bad index or manifest, short pack, digest mismatch): moved aside and rebuilt',
    exit: EXIT.environment,
    http: 500,
    // Says which entry and file did not prove, so a client knows its bytes were withheld, not lost.
    public: true,
  },
  E_STAGING_CHANGED: {
    what: 'a file an ingest was staging in the cache\'s tmp/ changed under it (another process truncated or wrote it): nothing was cached, and the archive was not at fault',
    exit: EXIT.environment,
    http: 500,
    public: false,
  },
  E_ARCHIVE_CHANGED: {
    what: 'the archive changed between two reads of one ingest (the daemon\'s and its ingest process\'s): nothing was cached; the next ingest reads it as it is then',
    exit: EXIT.environment,
    http: 500,
    public: false,
  },
  E_KILLED: {
    what: 'a process doing the work (the xz decoder, the ingest process) was killed by a signal: the out-of-memory killer or someone\'s kill, not a bug and not the archive',
    exit: EXIT.environment,
    http: 500,
    public: false,
  },
  E_FUSE: { what: 'the mount could not be made or kept', exit: EXIT.environment, http: 500, public: false },
  E_HTTP: { what: 'the HTTP listener could not start or a pull failed', exit: EXIT.environment, http: 500, public: false },
  E_ADB: { what: 'adb missing, no device, several devices', exit: EXIT.environment, http: 500, public: false },
  E_IO: { what: 'reading or writing outside the cache failed (stdout of `cat`, an export directory)', exit: EXIT.environment, http: 500, public: false },
  E_NOT_FOUND: {
    what: 'no such cache entry, file in one, module or route',
    // Nothing wrong with the machine: what was asked for is not there.
    exit: EXIT.notFound,
    http: 404,
    public: true,
  },
  // The wire codes: what the HTTP server answers about a request. No command raises them (pull
  // reports a refused request as E_HTTP or E_NOT_FOUND); their exit status, usage, says whose
  // fault it is.
  E_BAD_PATH: { what: 'a request path with a dot-segment, encoded slash, NUL or other trick', exit: EXIT.usage, http: 400, public: true },
  E_BAD_REQUEST: { what: 'a request HTTP itself rejects (bad header, body too large)', exit: EXIT.usage, http: 400, public: true },
  E_UNAUTHORIZED: { what: 'no or the wrong bearer token', exit: EXIT.usage, http: 401, public: true },
  E_RANGE: { what: 'a Range outside the representation', exit: EXIT.usage, http: 416, public: true },
  E_INTERNAL: { what: 'a bug: the log has the details', exit: EXIT.internal, http: 500, public: false },
} as const satisfies Record<string, ErrorKind>;

export type ErrorCode = keyof typeof ERRORS;

export function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && Object.hasOwn(ERRORS, code);
}

export class KheadersError extends Error {
  readonly code: ErrorCode;
  /** Machine-readable context: the offending entry, the paths tried, the limit hit, the errno. */
  readonly details: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'KheadersError';
    this.code = code;
    this.details = details;
  }

  get exitCode(): ExitStatus {
    return ERRORS[this.code].exit;
  }
}

export function isKheadersError(err: unknown, code?: ErrorCode): err is KheadersError {
  return err instanceof KheadersError && (code === undefined || err.code === code);
}

/** The errno of a Node system error, if it is one (a KheadersError's code is not an errno). */
export function errnoOf(err: unknown): string | undefined {
  if (err instanceof KheadersError) return undefined;
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}

/** The errnos that mean the filesystem being written is full (a quota counts). */
const DISK_FULL = new Set(['ENOSPC', 'EDQUOT']);

/**
 * The disk-full errno behind `err`: a system error's own, or the one an E_NO_SPACE carries in
 * its details (from a worker thread, or a step that already named it). Undefined otherwise.
 */
export function diskFullErrno(err: unknown): string | undefined {
  if (err instanceof KheadersError) return err.code === 'E_NO_SPACE' && typeof err.details.errno === 'string' ? err.details.errno : undefined;
  const errno = errnoOf(err);
  return errno !== undefined && DISK_FULL.has(errno) ? errno : undefined;
}

/**
 * The code for a bare errno from a system call that read or wrote outside what the code knows
 * (a worker's file, an output path): a full disk is E_NO_SPACE (the environment, exit 5), a
 * missing file E_NOT_FOUND, anything else E_IO. The errno stays in details.errno.
 */
export function codeForErrno(errno: string): ErrorCode {
  if (DISK_FULL.has(errno)) return 'E_NO_SPACE';
  if (errno === 'ENOENT') return 'E_NOT_FOUND';
  return 'E_IO';
}

/** Signals that mean the process crashed (a bug in it, or memory it was given that is bad), not that it was killed. */
const CRASH_SIGNALS: ReadonlySet<string> = new Set(['SIGSEGV', 'SIGBUS', 'SIGILL', 'SIGFPE', 'SIGABRT', 'SIGSYS', 'SIGTRAP']);

/**
 * `what` ended by `signal`: killed (E_KILLED: the OOM killer's SIGKILL on a phone, an operator's
 * kill; trying again may work) or crashed (E_INTERNAL: a bug, the log has the details).
 */
export function endedBySignal(what: string, signal: string, details: Record<string, unknown> = {}): KheadersError {
  if (CRASH_SIGNALS.has(signal)) return new KheadersError('E_INTERNAL', `${what} crashed (${signal})`, { signal, ...details });
  return new KheadersError('E_KILLED', `${what} was killed by ${signal} (the out-of-memory killer, or another process); nothing it did is used, and the next attempt starts again`, { signal, ...details });
}

/** What HTTP answers for an error that ended a request: its status, and a code and message fit to send. */
export function httpAnswer(err: unknown): { status: number; error: { code: ErrorCode; message: string } } {
  if (err instanceof KheadersError) {
    const kind: ErrorKind = ERRORS[err.code];
    if (kind.public) return { status: kind.http, error: { code: err.code, message: err.message } };
    return { status: kind.http, error: { code: err.code, message: `${kind.what} (the daemon log has the details)` } };
  }
  return { status: 500, error: { code: 'E_INTERNAL', message: 'internal error (the daemon log has the details)' } };
}
