/**
 * Mount the model with the chosen FUSE backend. Each backend is imported only when chosen, so a
 * daemon that serves HTTP only never loads libfuse, and one backend's missing pieces never stop
 * the other from mounting.
 *
 *   native  libfuse2 through fuse-native (linux-x64 prebuild + Debian libfuse2)
 *   kernel  the FUSE protocol spoken to /dev/fuse in TypeScript (root; any architecture)
 *   auto    kernel (the faster, measured), else native where the kernel backend cannot mount
 */
import { KheadersError, isKheadersError } from '../../errors.js';
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
      // The kernel backend first: measured faster (BENCHMARKS.md, "fuse-kernel": a warm compile
      // sends it no request at all) and it needs no native code. It needs root to mount; where
      // it cannot mount, fuse-native (setuid fusermount, linux-x64) may still.
      const { mountKernel } = await import('./kernel/index.js');
      try {
        return await mountKernel(mountOpts);
      } catch (kernelErr) {
        if (!isKheadersError(kernelErr, 'E_FUSE')) throw kernelErr;
        opts.log.warn({ reason: kernelErr.message }, 'the kernel-protocol FUSE backend cannot mount; trying fuse-native');
        const { mountNative } = await import('./native.js');
        try {
          return await mountNative(mountOpts);
        } catch (nativeErr) {
          if (!isKheadersError(nativeErr, 'E_FUSE')) throw nativeErr;
          throw new KheadersError('E_FUSE', `no FUSE backend could mount ${mountOpts.mountpoint}: kernel: ${kernelErr.message}; native: ${nativeErr.message}`, {
            kernel: kernelErr.details,
            native: nativeErr.details,
          });
        }
      }
    }
    default: {
      const never: never = backend;
      throw new Error(`unknown FUSE backend ${String(never)}`);
    }
  }
}
