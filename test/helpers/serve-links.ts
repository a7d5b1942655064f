/**
 * `kheadersd serve` started as cli.ts starts it (a StopRequest, startDaemon, its signal
 * handlers), except that --link-modules makes its links under MODULES_ROOT instead of
 * /lib/modules: tests of the links never touch the machine's own.
 *
 *   node dist/test/helpers/serve-links.js MODULES_ROOT '{"cacheDir": "...", "mount": "...", ...}'
 *
 * The JSON holds configuration keys with their values as flags give them; --link-modules is on.
 */
import { StopRequest, installSignalHandlers, startDaemon } from '../../src/commands/serve.js';
import { resolveConfig } from '../../src/config.js';
import { createLogger } from '../../src/log.js';

const [modulesRoot, flags] = process.argv.slice(2);
if (!modulesRoot || !flags) {
  process.stderr.write('usage: serve-links MODULES_ROOT FLAGS_JSON\n');
  process.exit(2);
}
const cfg = resolveConfig({ flags: { ...(JSON.parse(flags) as Record<string, unknown>), linkModules: true }, env: {}, file: {}, fileName: 'none' });
const io = { stdout: process.stdout, stderr: process.stderr, log: createLogger(cfg.logLevel) };
const stopRequest = new StopRequest();
const starting = startDaemon(cfg, io, stopRequest, { modulesRoot });
installSignalHandlers(starting, io, stopRequest);
starting.catch((err: unknown) => {
  io.log.error({ err }, 'start failed');
  process.exitCode = 1;
});
