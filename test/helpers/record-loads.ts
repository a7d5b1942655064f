/**
 * `node --import <this>`: writes the URL of every module the ES module loader loads to the file
 * named by KH_RECORD_LOADS, one a line, so that a test can see which files a real process loaded.
 * (The hooks run on a thread of their own; require() of CommonJS does not pass through them.)
 */
import { register } from 'node:module';

register('./record-loads-hooks.js', import.meta.url);
