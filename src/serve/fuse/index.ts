/**
 * Mount the model with the chosen FUSE backend. Each backend is imported only when chosen, so a
 * daemon that serves HTTP only never loads libfuse, and one backend's missing pieces never stop
 * the other from mounting.
 *
 *   native  libfuse2 through fuse-native (linux-x64 prebuild + Debian libfuse2)
 *   kernel  the FUSE protocol spoken to /dev/fuse in TypeScript (root; any architecture)
 *   auto    native where it can load, else kernel (arm64, Android, no libfuse2 installed)
 */
import { isKheadersError } from '../../errors.js';
import type { FuseMount, MountOptions } from './types.js';

export type { FuseMount, FuseOpCounts, MountOptions } from './types.js';
export type FuseBackend = 'native' | 'kernel' | 'auto';

export async function mountFuse(opts: MountOptions & { backend: FuseBackend }): Promise<FuseMount> {
  const { backend, ...mountOpts } = opts;
  switch (backend) {
    case 'native': {
      const { mountNative } = await import('./native.js');
      return mountNative(mountOpts);
    }
    case 'kernel': {
      const { mountKernel } = await import('./kernel/index.js');
      return mountKernel(mountOpts);
    }
    case 'auto': {
      // native is the backend measured first (bench/fuse.ts); the kernel backend covers the
      // machines where fuse-native cannot load. Any other native failure (no /dev/fuse, not
      // permitted, a busy mount point) would stop the kernel backend too, so it is reported as is.
      const { mountNative } = await import('./native.js');
      try {
        return await mountNative(mountOpts);
      } catch (err) {
        if (!isKheadersError(err, 'E_FUSE') || err.details['unavailable'] !== true) throw err;
        opts.log.warn({ reason: err.message }, 'fuse-native is unavailable; using the kernel-protocol FUSE backend');
        const { mountKernel } = await import('./kernel/index.js');
        return mountKernel(mountOpts);
      }
    }
    default: {
      const never: never = backend;
      throw new Error(`unknown FUSE backend ${String(never)}`);
    }
  }
}
