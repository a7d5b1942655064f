/**
 * Readiness and state notifications to systemd (`Type=notify`), the sd_notify(3) protocol.
 *
 * The protocol is one datagram of `KEY=VALUE` lines to the AF_UNIX/SOCK_DGRAM socket named by
 * $NOTIFY_SOCKET. Node cannot send that: `dgram` speaks only UDP and `net` only stream sockets. So
 * each notification runs the `systemd-notify` binary (it ships with systemd, so it is there
 * whenever $NOTIFY_SOCKET is), which:
 *
 *  - by default sends with its *parent's* PID in SCM_CREDENTIALS (sd_pid_notify(getppid())). We
 *    spawn it directly, without a shell, so that parent is this daemon, the unit's main process.
 *    Forging the PID needs CAP_SYS_ADMIN, which the service has; without it the kernel refuses and
 *    it resends with its own PID. The unit sets `NotifyAccess=all` so both are accepted. We never
 *    pass `--pid`: it also sends MAINPID=, and `--pid=$MAINPID` alone is the classic race where
 *    NotifyAccess=main drops the message from a PID that is not the main one.
 *  - then waits for a BARRIER=1 round trip (systemd >= 246; `--no-block` turns it off), so it is
 *    still alive while PID 1 looks up which unit its message came from. Without the barrier a
 *    short-lived sender can exit first and PID 1 drops the message even with NotifyAccess=all.
 *
 * Only VARIABLE=VALUE arguments are used, never `--ready`/`--stopping`/`--reloading`: the long
 * options differ between systemd versions, the assignments work in all of them.
 *
 * Every function is a no-op when $NOTIFY_SOCKET is unset (not started by systemd) and never
 * throws: a lost notification is logged, and systemd's TimeoutStartSec= reports it to the user.
 */
import type { Logger } from '../log.js';

/** How long one `systemd-notify` may take (its own barrier timeout is 5 s). */
const NOTIFY_TIMEOUT_MS = 10_000;

export interface NotifyOptions {
  /** The socket; default $NOTIFY_SOCKET. */
  socket?: string | undefined;
  /** The sender binary; default `systemd-notify` on PATH. */
  binary?: string;
  timeoutMs?: number;
}

/** The values of one notification, sent as `KEY=VALUE` lines. */
export type NotifyFields = Record<string, string>;

/**
 * Send one notification. Resolves true when systemd-notify reported success, false when there is
 * no socket or sending failed (logged).
 */
export function sdNotify(fields: NotifyFields, log: Logger, opts: NotifyOptions = {}): Promise<boolean> {
  const socket = 'socket' in opts ? opts.socket : process.env.NOTIFY_SOCKET;
  if (socket === undefined || socket === '') return Promise.resolve(false);
  const args: string[] = [];
  for (const [key, value] of Object.entries(fields)) {
    // A newline would start a new field in the datagram: refuse rather than inject.
    if (!/^[A-Z_][A-Z0-9_]*$/.test(key) || value.includes('\n')) {
      log.warn({ key }, 'sd_notify: refusing a malformed field');
      return Promise.resolve(false);
    }
    args.push(`${key}=${value}`);
  }
  const binary = opts.binary ?? 'systemd-notify';
  // child_process only under systemd (with a socket): a start elsewhere never loads it.
  return import('node:child_process').then(({ execFile }) => new Promise<boolean>((resolve) => {
    execFile(
      binary,
      args,
      { env: { ...process.env, NOTIFY_SOCKET: socket }, timeout: opts.timeoutMs ?? NOTIFY_TIMEOUT_MS, killSignal: 'SIGKILL' },
      (err, _stdout, stderr) => {
        if (!err) {
          log.debug({ fields: Object.keys(fields) }, 'sd_notify sent');
          resolve(true);
          return;
        }
        const reason =
          (err as NodeJS.ErrnoException).code === 'ENOENT'
            ? `${binary} is not installed, so systemd cannot be told (install systemd, or use Type=exec)`
            : (stderr.trim() || err.message).split('\n')[0];
        log.warn({ fields: Object.keys(fields), socket }, `sd_notify failed: ${reason}`);
        resolve(false);
      },
    );
  }));
}

/**
 * The daemon is serving the running kernel's entry: systemd moves the unit from "activating" to
 * "active" and starts what is ordered after it. Call once at start and again after a reload.
 */
export async function notifyReady(log: Logger, status?: string, opts?: NotifyOptions): Promise<void> {
  await sdNotify({ READY: '1', ...(status !== undefined ? { STATUS: status } : {}) }, log, opts);
}

/** The daemon is shutting down (unmounting): systemd shows "deactivating" instead of a crash. */
export async function notifyStopping(log: Logger, opts?: NotifyOptions): Promise<void> {
  await sdNotify({ STOPPING: '1', STATUS: 'stopping: unmounting' }, log, opts);
}

/**
 * A re-check of the kernel (SIGHUP) has begun; follow it with notifyReady. MONOTONIC_USEC is what
 * Type=notify-reload (systemd >= 253) requires; older versions ignore it. process.hrtime is
 * CLOCK_MONOTONIC on Linux, the clock systemd compares it with.
 */
export async function notifyReloading(log: Logger, opts?: NotifyOptions): Promise<void> {
  const usec = process.hrtime.bigint() / 1000n;
  await sdNotify({ RELOADING: '1', MONOTONIC_USEC: usec.toString(), STATUS: 'reloading: re-checking the running kernel' }, log, opts);
}

/** A one-line status for `systemctl status` (e.g. what is served where). */
export async function notifyStatus(log: Logger, status: string, opts?: NotifyOptions): Promise<void> {
  await sdNotify({ STATUS: status }, log, opts);
}
