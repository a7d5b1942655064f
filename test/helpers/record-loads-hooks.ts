/** The loader hooks of record-loads.ts: append each loaded URL to $KH_RECORD_LOADS. */
import { appendFileSync } from 'node:fs';

interface LoadContext {
  format?: string | null | undefined;
}
type NextLoad = (url: string, context: LoadContext) => Promise<unknown>;

export async function load(url: string, context: LoadContext, nextLoad: NextLoad): Promise<unknown> {
  const file = process.env['KH_RECORD_LOADS'];
  if (file) appendFileSync(file, url + '\n');
  return nextLoad(url, context);
}
