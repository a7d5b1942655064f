/**
 * What a FUSE backend takes and gives back. Both transports (fuse-native over libfuse2 in
 * ./native.ts, and the /dev/fuse protocol in ./kernel/) implement this, so the daemon and the
 * tests never care which one is serving.
 */
import type { Logger } from '../../log.js';
import type { FsModel } from './fs-model.js';

export interface MountOptions {
  /** Absolute (or cwd-relative) directory to mount on; created when missing. */
  mountpoint: string;
  model: FsModel;
  log: Logger;
  /** Let other users (compilers run by anyone) read the mount. Default true. */
  allowOther?: boolean;
  /**
   * Requests wait for this: the mount may be made before the model holds what it is to show,
   * while `until` is pending (the daemon checks its entries meanwhile), but nothing is answered
   * before it resolves, so no reader ever sees a partial tree. A rejection takes the mount down
   * again and the mount's promise rejects. Default: serve at once.
   */
  until?: Promise<void>;
  /**
   * With `until`: called once the mount has gone as far as it can without this thread (its
   * `mount` child is running, or it waits for `until`), so the caller can give the thread to its
   * own work. Not called when the mount fails before then.
   */
  onUnderWay?: () => void;
  /**
   * Gives up the mount while the kernel backend's `mount` child runs, as a rejected `until` does,
   * without waiting for that child (killed: one that hangs would hold a stop until its timeout):
   * the mount's promise rejects with the signal's reason, nothing left mounted. No effect once
   * the child is done (`until` decides then), nor on the native backend, which has no child.
   */
  signal?: AbortSignal;
}

/** Requests the backend answered, by operation name ('lookup', 'getattr', 'read', ...). */
export type FuseOpCounts = Readonly<Record<string, number>>;

export interface FuseMount {
  readonly mountpoint: string;
  readonly backend: 'native' | 'kernel';
  /** Detach the mount and release the backend's resources. Safe to call twice. */
  unmount(): Promise<void>;
  /**
   * How many requests of each kind reached the backend since mounting (benchmarks report the
   * callbacks one compile costs). Optional: a backend may not count.
   */
  opCounts?(): FuseOpCounts;
}
