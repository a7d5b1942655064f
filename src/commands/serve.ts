/**
 * `kheadersd serve`: ingest the running kernel's archive, then serve the cache over HTTP and a
 * FUSE mount until told to stop. Lifecycle only: what is served is the store's business, how it
 * is served belongs to serve/http and serve/fuse.
 *
 *   start ─ ingest (or reuse, its entry checked; a new entry is built in a child process) ─
 *     HTTP up ─ every other entry checked, the damaged repaired, while the mount is made ─
 *     the mount answers ─ ready (sd_notify)
 *   SIGHUP ─ re-read the live kernel's release and archive digest; if new, ingest and flip `current`
 *   a read finds an entry's bytes wrong ─ that read fails (EIO / 500); the entry is moved to
 *     quarantine and rebuilt (from its archive, else the live source), then served again
 *   SIGTERM/SIGINT ─ kill an ingest or a repair's rebuild at work, stop accepting, finish
 *     in-flight responses (for at most the HTTP drain bound), remove the --link-modules links,
 *     unmount (lazily if busy), exit 0; during start-up, the start stops at its next step. A
 *     second signal, or a stop past STOP_DEADLINE_MS, removes the links, detaches the mount and
 *     exits 1 at once.
 *
 * Nothing on disk stops it from starting: the entry it serves is checked before HTTP answers (and
 * rebuilt if damaged), every other just after (the damaged quarantined and rebuilt in turn), and
 * what is intact is served.
 *
 * A mount that cannot be made is logged and reported by /readyz and `doctor`; HTTP keeps
 * working without it.
 */
import { chmod, lstat, mkdir, readlink, rmdir, symlink, unlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { Config } from '../config.js';
import { KheadersError, errnoOf, isKheadersError } from '../errors.js';
import { CacheStore } from '../store/cache.js';
import { damageOf } from '../store/entry-load.js';
import type { CacheEntry, Manifest } from '../store/entry.js';
import type { HealReport, KnownDamage } from '../store/heal.js';
import { Resolver } from '../store/resolve.js';
import type { ReadMode } from '../store/small-file.js';
import { readTokenFile } from '../token.js';
import { matchRunning, readLiveKernel, type LiveKernel } from '../store/kernel-match.js';
import { MODULE_HEADERS_SUBDIR, ModuleHeaders } from '../store/module-btf.js';
import { DaemonState } from '../serve/state.js';
import { healWithConfig, ingestWithConfig, type CommandIO } from './store-commands.js';
import type { FuseMount } from '../serve/fuse/types.js';
import type { IndexFsModel } from '../serve/fuse/index-model.js';
import type { IngestProcess } from './ingest-process.js';
import type { StagedBuild } from '../store/ingest.js';

export interface RunningDaemon {
  state: DaemonState;
  /** Re-check the kernel (what SIGHUP does). */
  refresh(reason: string): Promise<void>;
  /** Stop everything (what SIGTERM does). */
  stop(): Promise<void>;
  /** Take the mount down now, whatever the stop is waiting for (a second signal). */
  detachNow(): Promise<void>;
  readonly httpUrl: string | null;
}

/** How long a stop may take before the mount is detached and the process exits regardless. */
const STOP_DEADLINE_MS = 6_000;

/**
 * One daemon's stop, shared by its start and its signal handlers. The first SIGTERM/SIGINT
 * requests it (`signal` aborts: the start stops at its next step); a second one, or a stop past
 * its deadline, detaches the mount now. startDaemon says how as soon as it begins, not when the
 * start is done: a start that has mounted but not finished (still publishing, or waiting on
 * systemd's READY=1) must not leave its mount behind as a dead ENOTCONN directory.
 */
export class StopRequest {
  private readonly controller = new AbortController();
  private detach: () => Promise<void> = () => Promise.resolve();
  private readonly pending: Array<Promise<unknown>> = [];
  readonly signal = this.controller.signal;

  /**
   * Work a clean stop lets finish before the process exits (within the stop's deadline): the
   * compiled code being kept at ready, which a stop just after ready would otherwise cut short,
   * so that every later start compiled again.
   */
  finishBeforeExit(work: Promise<unknown>): void {
    this.pending.push(work.catch(() => undefined));
  }

  /** Resolves once the work given to finishBeforeExit is done. */
  async finished(): Promise<void> {
    await Promise.all(this.pending);
  }

  request(): void {
    this.controller.abort();
  }

  /** How to take the daemon's mount down now (startDaemon's). */
  detachWith(detach: () => Promise<void>): void {
    this.detach = detach;
  }

  /** Request the stop, and take the mount down now (made, or being made), whatever the start is doing. */
  detachNow(): Promise<void> {
    this.request();
    return this.detach();
  }
}

/** Where the daemon touches the system outside its cache and mount (tests give temp dirs). */
export interface SystemPaths {
  /** Where --link-modules makes `<release>/build` (default /lib/modules). */
  modulesRoot?: string;
}

/**
 * Start the daemon; resolves once it is serving, or, when `stopRequest` is requested during the
 * start, once what was started is stopped again (its stop() then resolves at once). Signal
 * handling is `installSignalHandlers`, which requests the stop at the first SIGTERM/SIGINT.
 */
export async function startDaemon(cfg: Config, io: CommandIO, stopRequest?: StopRequest, paths: SystemPaths = {}): Promise<RunningDaemon> {
  const { log } = io;
  const stopSignal = stopRequest?.signal;
  // Aborted by the stop, however it comes: kills an ingest process at work (its xz with it).
  const cancel = new AbortController();
  if (stopSignal?.aborted) cancel.abort();
  else stopSignal?.addEventListener('abort', () => cancel.abort(), { once: true });
  // Before any work: a token file that breaks the rule is a configuration error, not a late surprise.
  const token = cfg.http && cfg.tokenFile !== undefined ? await readTokenFile(cfg.tokenFile) : undefined;
  // The servers' modules load while the store is checked: that work mostly waits on the disk,
  // and loading them is mostly the JS thread's (compiling), so the two overlap.
  const serverModules = {
    http: cfg.http ? early(import('../serve/http/server.js')) : undefined,
    model: cfg.mount ? early(import('../serve/fuse/index-model.js')) : undefined,
    notify: early(import('../serve/sd-notify.js')),
  };
  const state = new DaemonState();
  const store = await CacheStore.open(cfg.cacheDir, { write: true, lockTimeoutMs: cfg.lockTimeout * 1000 });
  let model: IndexFsModel | null = null;
  let mount: FuseMount | null = null;
  /** The mount, once mountFuse is called: a detach during the call waits for it, then takes it down. */
  let mounting: Promise<FuseMount | null> = Promise.resolve(null);
  let http: { url: string; close(): Promise<void> } | null = null;
  const links = new ModuleLinks(log, paths.modulesRoot);
  let refreshing: Promise<void> = Promise.resolve();

  // What the running kernel is: the entries are told apart from it by release and build id
  // (and its BTF digest, read in publish() only if an entry needs it).
  // Headers of the loaded modules, made on request under the running kernel's entry.
  const [first, modules] = await Promise.all([readLiveKernel({}, []), ModuleHeaders.open({ dir: path.join(store.dir, MODULE_HEADERS_SUBDIR), log })]);
  let live = first;
  state.live = live;

  /** Count what a repair did, for /metrics. */
  const counted = (report: HealReport): void => {
    state.quarantined += report.quarantined.length;
    state.rebuilt += report.rebuilt.length;
  };

  /** The entries that load; a damaged one is left out (and repaired: see repair()). */
  const intactEntries = async (mode: ReadMode): Promise<CacheEntry[]> => {
    const { entries, damaged } = await store.scan(undefined, mode);
    for (const d of damaged) log.warn({ id: d.id }, `not serving ${d.error.message}`);
    if (damaged.length > 0) repair([]);
    const out: CacheEntry[] = [];
    for (const m of entries) {
      const entry = await store.load(m.id, mode).catch(() => undefined);
      if (entry) out.push(entry);
    }
    return out;
  };

  /** What the last publish served, by id (to retire instances a repair replaced). */
  const published = new Map<string, CacheEntry>();
  /** The start has succeeded (and said "serving"). */
  let started = false;

  /**
   * HTTP's view of the store, before the first publish(): which entry is `current` and which is
   * the running kernel's, those two checked. HTTP reads every other entry through the store,
   * checked when first asked for, so HTTP can answer (and /readyz say ready) before the start
   * has checked them all; publish() does that next, before the mount shows any of them. An
   * entry of the two that does not load is passed over, as publish() passes it over.
   */
  const publishForHttp = async (): Promise<void> => {
    let candidates = await store.list();
    live = await readLiveKernel({}, candidates);
    state.live = live;
    const pointer = await store.currentId();
    for (;;) {
      const serving = whatToServe(candidates, pointer, live);
      const ids = [serving.currentId, serving.runningId].filter((id): id is string => id !== null);
      const failed = (await Promise.all(ids.map((id) => store.load(id).then(() => null, () => id)))).find((id) => id !== null);
      if (failed === undefined) {
        state.currentId = serving.currentId;
        state.runningId = serving.runningId;
        state.ready = serving.currentId !== null;
        return;
      }
      candidates = candidates.filter((m) => m.id !== failed);
    }
  };

  /** --link-modules: `<release>/build` into the mount, for `current`'s entry (once mounted). */
  const linkModules = async (entry: CacheEntry | undefined): Promise<void> => {
    if (cfg.linkModules && mount && entry) await links.point(entry.manifest.release, path.join(mount.mountpoint, entry.manifest.release));
  };

  /**
   * Bring the model and state up to date with the store (after any ingest or repair). `mode`:
   * how the cache is read. The start's reads are synchronous (fastest; the mount being made
   * waits on another process meanwhile); once serving, through the thread pool ('async'), so
   * HTTP and the mount answer between the reads and wait only behind each index's check.
   */
  const publish = async (mode: ReadMode = 'async'): Promise<void> => {
    const entries = await intactEntries(mode);
    // Every entry HTTP may summarise (a damaged one's manifest may still read), not only the intact ones.
    live = await readLiveKernel({}, await store.list(mode), mode);
    state.live = live;
    const pointer = await store.currentId(mode);
    // The same resolver decides `current` for FUSE (setEntries) and HTTP (state.currentId).
    const { currentId: current, runningId } = whatToServe(
      entries.map((e) => e.manifest),
      pointer,
      live,
    );
    state.currentId = current;
    state.ready = current !== null;
    state.runningId = runningId;
    const currentEntry = entries.find((e) => e.manifest.id === current);
    if (currentEntry) {
      const m = matchRunning(currentEntry.manifest, live);
      if (m.match !== 'yes') {
        log.warn(
          { current, runningRelease: live.release, match: m.match },
          `current is ${currentEntry.manifest.release} from ${currentEntry.manifest.source}, ${m.match === 'no' ? 'NOT the running kernel' : 'not known to be the running kernel'}: ${m.why}. ` +
            'Tools on this machine reading `current` get these headers, not the running kernel\'s.',
        );
      }
    }
    if (pointer !== null && pointer !== current) log.warn({ currentId: pointer }, 'the current pointer names no intact cache entry');
    // FUSE gets the resolved id, so its `current` is HTTP's even where the pointer names nothing.
    model?.setEntries(entries, current, state.runningId);
    // An id served by a new instance was rebuilt after damage: the old one's files now sit in
    // quarantine (soon deleted), so stop reading them; an open file on it gets EIO, not old bytes
    // that were never proven. (An entry gc removed keeps its reader: open files finish reading.)
    for (const entry of entries) {
      const before = published.get(entry.manifest.id);
      published.set(entry.manifest.id, entry);
      if (before && before !== entry) {
        void before.reader.kill(new KheadersError('E_ENTRY_DAMAGED', `cache entry ${entry.manifest.id} was rebuilt after damage; this copy is no longer read`, { id: entry.manifest.id, errno: 'EIO' }));
      }
    }
    await linkModules(currentEntry);
    state.changed();
  };

  /**
   * publish() after a refresh or a repair. Its failure (the cache unreadable, entries/ not a
   * directory, a --link-modules link it cannot make) is said as it is and leaves what was
   * published served: thrown, it rejected `refreshing`,
   * which every later SIGHUP and repair is chained on, so none of them ever ran again.
   */
  const publishOrSay = async (): Promise<void> => {
    try {
      await publish();
      // A repair's publish during the start is not said: the start says it once it has succeeded.
      if (started) log.info({ current: state.currentId }, 'serving');
    } catch (err) {
      log.error({ code: isKheadersError(err) ? err.code : 'E_INTERNAL' }, `cannot publish the cache's entries, still serving what was published: ${(err as Error).message}`);
    }
  };

  const ingestNow = async (reason: string): Promise<void> => {
    const started = new Date().toISOString();
    try {
      // The daemon's own store: what the repair check validated is not read and validated again.
      // A new entry is built in a child process (ingest-process.ts), so its buffers die with it.
      // Loaded only then: a start with its entry cached never spawns (nor loads child_process and readline).
      // The child is started as soon as the archive's source turns out unread by this cache and
      // no cached entry can be its (a new kernel's first boot), so that its node start overlaps
      // the reading, hashing and lookup here; if the entry is cached after all, it is killed
      // unasked. A source merely not remembered (a file just written, sources.json lost) with
      // an entry of its release cached starts none: a child for nothing is a node start on the
      // other core, and a cached start loads none of the ingest process's code.
      let child: Promise<IngestProcess> | undefined;
      const startChild = (): Promise<IngestProcess> => (child ??= import('./ingest-process.js').then((m) => m.startIngestProcess(cfg, io, process.execPath, cancel.signal)));
      // The archive's release, when known before it is read: --release, or the running kernel's for its own archive.
      const release = cfg.release ?? (cfg.archive === undefined ? os.release() : undefined);
      const mayBeCached = async (): Promise<boolean> => (await store.list()).some((m) => release === undefined || m.release === release);
      // Once the ingest has ended, nothing starts a child: one started then would wait unasked for good.
      let ended = false;
      // A failed import or list is the build's failure, below, if there is a build.
      const willRead = (): void => void mayBeCached().then((cached) => (cached || ended ? undefined : startChild()), () => undefined).catch(() => {});
      const buildElsewhere = async (): Promise<void> => (await startChild()).run();
      // With xz, the daemon starts the decode itself as soon as it knows it must build, and the
      // child builds from it: xz no longer waits for the child's node to start (ingest.ts, StagedBuild).
      const buildStaged = async (staged: StagedBuild): Promise<boolean> => (await startChild()).runStaged(staged);
      // The stop reaches a build made here too (no child could be started): it stops at its next step.
      // Only the served entries are checked here (and rebuilt if damaged); every other is checked
      // by the publish() that follows (once serving, through the thread pool; a damaged one is
      // sent to repair), so a SIGHUP does not read every index synchronously on the serving thread.
      const checkEntries = false;
      const result = await ingestWithConfig(cfg, io, { setCurrent: true, store, buildElsewhere, buildStaged, willRead, signal: cancel.signal, checkEntries }).finally(() => {
        ended = true;
        void child?.then((c) => c.discard(), () => {}); // nothing after run()
      });
      counted(result.healed);
      state.lastIngest = { at: started, durationMs: result.durationMs, id: result.entry.manifest.id, reused: result.reused };
      state.lastIngestError = null;
      log.info({ reason, id: result.entry.manifest.id, reused: result.reused }, result.reused ? 'kernel unchanged' : 'kernel headers ingested');
    } catch (err) {
      const code = err instanceof KheadersError ? err.code : 'E_INTERNAL';
      state.lastIngestError = { at: started, code, message: err instanceof Error ? err.message : String(err) };
      throw err;
    }
  };

  const refresh = (reason: string): Promise<void> => {
    // One refresh at a time: a burst of SIGHUPs queues, it does not race.
    refreshing = refreshing.then(async () => {
      if (cancel.signal.aborted) return;
      try {
        await ingestNow(reason);
      } catch (err) {
        if (cancel.signal.aborted) return log.info({ reason }, 'ingest stopped: the daemon is stopping');
        log.error({ reason, code: isKheadersError(err) ? err.code : 'E_INTERNAL' }, `ingest failed, still serving the last good entry: ${(err as Error).message}`);
      }
      await publishOrSay();
    });
    return refreshing;
  };

  /**
   * Repair entries readers found damaged (and any that no longer load): quarantine, rebuild from
   * their own archive, then ingest the live kernel again (which rebuilds its entry from the live
   * source if its archive was no good), and serve the result. Queued with the refreshes.
   */
  const pendingDamage: KnownDamage[] = [];
  let repairQueued = false;
  const repair = (known: readonly KnownDamage[]): void => {
    pendingDamage.push(...known);
    if (repairQueued) return;
    repairQueued = true;
    refreshing = refreshing.then(async () => {
      repairQueued = false;
      const batch = pendingDamage.splice(0);
      try {
        counted(await healWithConfig(cfg, io, batch, store, cancel.signal));
      } catch (err) {
        // Stopped: what it was rebuilding is back as it was, for the next start; nothing more to do.
        if (cancel.signal.aborted) return log.info('repair stopped: the daemon is stopping');
        log.error({ code: isKheadersError(err) ? err.code : 'E_INTERNAL' }, `repairing the cache failed: ${(err as Error).message}`);
      }
      try {
        await ingestNow('repair');
      } catch (err) {
        if (cancel.signal.aborted) return log.info('ingest stopped: the daemon is stopping');
        log.error({ code: isKheadersError(err) ? err.code : 'E_INTERNAL' }, `ingest after a repair failed, still serving what is intact: ${(err as Error).message}`);
      }
      await publishOrSay();
    });
  };
  store.onDamage((err, manifest) => {
    state.damageReports++;
    const what = damageOf(err);
    log.error({ id: manifest.id, file: what.file }, `${err.message}: the read failed; repairing the entry`);
    repair([{ id: manifest.id, ingestedAt: manifest.ingestedAt, ...what }]);
  });

  let stopping: Promise<void> | null = null;
  const stop = (): Promise<void> => {
    cancel.abort();
    stopping ??= (async () => {
      await (await serverModules.notify).notifyStopping(log);
      await refreshing.catch(() => {});
      await http?.close();
      await links.removeAll();
      await mount?.unmount();
      await model?.close();
      await modules.close();
      log.info('stopped');
    })();
    return stopping;
  };
  const handle: RunningDaemon = {
    state,
    refresh,
    stop,
    detachNow: async () => {
      cancel.abort();
      // The links first: they point into the mount, and must not outlive it as dangling links.
      await links.removeAll();
      await (await mounting)?.unmount();
    },
    get httpUrl() {
      return http?.url ?? null;
    },
  };
  stopRequest?.detachWith(() => handle.detachNow());
  /** A stop that came during the start: undo what is up, and hand back a daemon already stopped. */
  const stoppedDuringStart = async (): Promise<RunningDaemon> => {
    log.info('stopped during start-up');
    await stop();
    return handle;
  };

  // The first ingest decides whether there is anything to serve at all.
  try {
    await ingestNow('start');
  } catch (err) {
    if (cancel.signal.aborted) return stoppedDuringStart();
    // With no archive but an earlier entry for this kernel (e.g. the module cannot be loaded any
    // more), or a cache volume too full to take even its lock, serve what the cache has rather
    // than nothing: what is on disk must not stop the start. A SIGHUP ingests again.
    const code = err instanceof KheadersError ? err.code : undefined;
    if ((code !== 'E_ARCHIVE_NOT_FOUND' && code !== 'E_NO_SPACE') || (await store.currentId()) === null) throw err;
    const why = (err as KheadersError).message;
    if (code === 'E_NO_SPACE') log.error({ code }, `serving the cached entry, not checked against the archive: ${why}`);
    else log.warn({ code }, `no live archive; serving the cached entry: ${why}`);
  }

  if (serverModules.model) {
    const { IndexFsModel } = await serverModules.model;
    model = new IndexFsModel({ log, modules });
  }
  // The mount is made while publish() checks every entry (a damaged one sent to repair) and
  // gives the model them all: its device, mountpoint and `mount` child (another process, on the
  // other core) overlap that work. It is begun once HTTP listens, not before: its modules'
  // evaluation and first steps (3-20 ms here) held up the listen, and with it /readyz, while its
  // steps before the child wait on the thread pool anyway. It answers nothing, INIT included,
  // before the model has them (`until`): a tool that looks in meanwhile waits, then sees the whole tree.
  let modelReady!: (ready: boolean) => void;
  const until = new Promise<void>((resolve, reject) => {
    modelReady = (ready) => (ready ? resolve() : reject(new KheadersError('E_INTERNAL', 'the start ended before the mount could serve')));
  });
  until.catch(() => {}); // with no mount, nothing else awaits it
  let onUnderWay!: () => void;
  const underWay = new Promise<void>((resolve) => (onUnderWay = resolve));
  const [mountOn, fsModel] = [cfg.mount, model];
  let made: Promise<FuseMount> | undefined;
  const beginMount = (): void => {
    made = mountOn && fsModel ? import('../serve/fuse/index.js').then(({ mountFuse }) => mountFuse({ mountpoint: mountOn, model: fsModel, log, allowOther: true, backend: cfg.fuseBackend, until, onUnderWay, signal: cancel.signal })) : undefined;
    mounting = made?.catch(() => null) ?? mounting;
  };
  /** The start ends here without serving: the mount, made or being made, comes down having answered nothing. */
  const abandonMount = async (): Promise<void> => {
    modelReady(false);
    await mounting;
  };
  try {
    if (cfg.http && serverModules.http) {
      // HTTP is up once `current` is checked: each other entry costs ~10 ms to check (its index),
      // which HTTP's first requests need not wait for (see publishForHttp).
      await publishForHttp();
      if (cancel.signal.aborted) {
        await abandonMount();
        return stoppedDuringStart();
      }
      const { startHttpServer } = await serverModules.http;
      const limits = { maxConnectionsPerClient: cfg.httpMaxConnectionsPerClient, headersTimeoutMs: cfg.httpHeadersTimeout * 1000, idleTimeoutMs: cfg.httpIdleTimeout * 1000 };
      // startHttpServer logs "HTTP listening" (url, token) itself.
      http = await startHttpServer({ listen: cfg.http, store, state, log, limits, modules, ...(token !== undefined ? { token } : {}) });
    }
    beginMount();
    // publish() reads and checks without a turn of the event loop: the mount's own steps
    // (device, mountpoint, which `mount`) go first, so its child works while publish() does.
    // A mount that fails first ends the wait too (`mounting`).
    if (made) await Promise.race([underWay, mounting]);
    if (!cancel.signal.aborted) await publish('sync');
  } catch (err) {
    // The start fails: what it brought up comes down with the mount. HTTP left listening kept the
    // process, its failure reported, answering (/readyz "ready") for good, never restarted.
    await abandonMount();
    await stop().catch(() => {});
    throw err;
  }
  if (cancel.signal.aborted) {
    await abandonMount();
    return stoppedDuringStart();
  }
  modelReady(true);

  if (made) {
    try {
      mount = await made;
      state.mountpoint = mount.mountpoint;
      state.mountError = null;
      log.info({ mountpoint: mount.mountpoint, backend: mount.backend }, 'mounted');
      // Now that the mount exists, --link-modules can point at it: nothing else the publish did
      // depends on the mount, so only the link is made (a second publish listed the store and
      // read the running kernel again, logged its damage twice and sent it to repair again).
      // `current` is what the last publish served: a repair's, if one ran meanwhile.
      await linkModules(state.currentId === null ? undefined : published.get(state.currentId));
      state.changed();
    } catch (err) {
      // Mounted, the start's --link-modules link failed (<release> a file, say): not the mount's
      // failure. The start fails, its mount taken down: left up, the process stayed (or, once
      // gone, left a dead ENOTCONN directory), and "no FUSE mount" was untrue.
      if (mount) {
        await stop().catch(() => {});
        throw err;
      }
      // A stop gave the mount up while its `mount` child ran: the start stops, below.
      if (cancel.signal.aborted) return stoppedDuringStart();
      state.mountError = err instanceof Error ? err.message : String(err);
      if (!http) throw err;
      log.error({ code: isKheadersError(err) ? err.code : 'E_FUSE' }, `no FUSE mount, serving HTTP only: ${state.mountError}`);
    }
  }

  if (cancel.signal.aborted) return stoppedDuringStart();
  // Said once the start has succeeded: a start that fails (its mount, with no HTTP) never served.
  started = true;
  log.info({ current: state.currentId }, 'serving');
  await (await serverModules.notify).notifyReady(log);
  return handle;
}

/**
 * The entry `current` means (the pointer's, else the running kernel's newest) and the running
 * kernel's own entry (the current one if it is that, else any that is), among `manifests`. One
 * rule for FUSE (setEntries) and HTTP (state.currentId).
 */
function whatToServe(manifests: readonly Manifest[], pointer: string | null, live: LiveKernel): { currentId: string | null; runningId: string | null } {
  const currentId = new Resolver(manifests, pointer, live.release, live.buildId).currentId;
  const running = manifests.filter((m) => matchRunning(m, live).match === 'yes');
  return { currentId, runningId: (running.find((m) => m.id === currentId) ?? running[0])?.id ?? null };
}

/** A promise awaited later: a rejection meanwhile is not unhandled (the await still throws it). */
function early<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {});
  return p;
}

/**
 * SIGHUP re-checks the kernel; SIGTERM/SIGINT stop cleanly, a second one exits at once.
 * Installed before start-up begins: the first stop requests `stopRequest` (the start's), so a
 * start still under way stops at its next step and undoes what is up.
 */
export function installSignalHandlers(starting: Promise<RunningDaemon>, io: CommandIO, stopRequest: StopRequest): void {
  process.on('SIGHUP', () => {
    io.log.info('SIGHUP: re-checking the running kernel');
    void starting.then((daemon) => daemon.refresh('SIGHUP')).catch(() => {});
  });
  let signalled = false;
  /**
   * Exit now, but not with the mount left behind as a dead ENOTCONN directory: detach it first
   * (bounded). Through the stop request, not the started daemon: the start may not be done.
   */
  const exitNow = (why: string): void => {
    io.log.warn(why);
    const detached = stopRequest.detachNow().catch(() => {});
    // Referenced: the process must not end on its own, with status 0, before this exit. Above the
    // unmount's own bounds (mount.ts: three children, 0.9 s each), so a hung `umount` is outlasted.
    const bound = new Promise((resolve) => setTimeout(resolve, 3_000));
    void Promise.race([detached, bound]).then(() => process.exit(1));
  };
  const onStop = (signal: NodeJS.Signals): void => {
    if (signalled) return exitNow(`second signal (${signal}): exiting now`);
    signalled = true;
    io.log.info({ signal }, 'stopping');
    stopRequest.request();
    setTimeout(() => exitNow(`the stop did not finish in ${STOP_DEADLINE_MS / 1000} s: exiting now`), STOP_DEADLINE_MS).unref();
    starting
      .then((daemon) => daemon.stop())
      .then(() => stopRequest.finished())
      .then(
        () => process.exit(0),
        (err: unknown) => {
          // A failed start has already been reported by the command; exit with its status.
          if (process.exitCode === undefined) io.log.error({ err }, 'unclean stop');
          process.exit(typeof process.exitCode === 'number' && process.exitCode !== 0 ? process.exitCode : 1);
        },
      );
  };
  process.on('SIGTERM', onStop);
  process.on('SIGINT', onStop);
}

/**
 * --link-modules: `/lib/modules/<release>/build -> <mount>/<release>` so unmodified tools find
 * headers with no variable at all. Never replaces an existing path; removes only what it made.
 * Once removeAll() has run (the daemon stops), it links nothing more: a publish still under way
 * then must not leave a link into a mount that is going away.
 */
export class ModuleLinks {
  private readonly made: Array<{ link: string; target: string; dirMade: string | null }> = [];
  private closed = false;
  /** One point() at a time: two publishes at once (the start's and a repair's) both found no link, and the second symlink() failed with EEXIST. */
  private pointing: Promise<void> = Promise.resolve();

  constructor(
    private readonly log: CommandIO['log'],
    private readonly modulesRoot = '/lib/modules',
  ) {}

  point(release: string, target: string): Promise<void> {
    const done = this.pointing.then(() => this.pointNow(release, target));
    this.pointing = done.catch(() => {});
    return done;
  }

  private async pointNow(release: string, target: string): Promise<void> {
    if (this.closed) return;
    const dir = path.join(this.modulesRoot, release);
    const link = path.join(dir, 'build');
    if (this.made.some((m) => m.link === link && m.target === target)) return;
    try {
      await lstat(link);
      this.log.info({ link }, `--link-modules: ${link} exists; left alone`);
      return;
    } catch (err) {
      if (errnoOf(err) !== 'ENOENT') throw err;
    }
    let dirMade: string | null = null;
    try {
      await lstat(dir);
    } catch {
      await mkdir(dir, { recursive: true, mode: 0o755 });
      await chmod(dir, 0o755); // the tools that follow the link run as any user: not the umask's choice
      dirMade = dir;
    }
    await symlink(target, link);
    this.made.push({ link, target, dirMade });
    if (this.closed) return this.removeAll(); // the stop came while it linked
    this.log.info({ link, target }, '--link-modules: linked');
  }

  async removeAll(): Promise<void> {
    this.closed = true;
    for (const { link, target, dirMade } of this.made.splice(0).reverse()) {
      // Only if it is still the link we made: someone may have replaced it meanwhile.
      if ((await readlink(link).catch(() => null)) === target) await unlink(link).catch(() => {});
      if (dirMade) await rmdir(dirMade).catch(() => {}); // only if empty
    }
  }
}
