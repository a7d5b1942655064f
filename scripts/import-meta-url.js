// Injected into every file of the CommonJS bundle (scripts/bundle.mjs) as `import.meta.url`: the
// URL of the file that runs, so that `new URL('./x.js', import.meta.url)` finds x.js beside it.
// It runs inside the bundle's CommonJS files, so it uses their require and __filename.
/* global require, __filename */
// eslint-disable-next-line @typescript-eslint/no-require-imports -- the bundle is CommonJS: an import here would be a second module system
export const import_meta_url = require('node:url').pathToFileURL(__filename).href;
