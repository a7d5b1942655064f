/**
 * ELF note records, as found in a PT_NOTE segment, a .note.* section, or /sys/kernel/notes (the
 * running kernel's own notes). We want the GNU build id: it names the exact kernel build, so the
 * cache can tell two kernels with the same release string apart.
 *
 * Each record is: namesz, descsz, type (three 4-byte words in the producer's byte order), then
 * the name (namesz bytes, NUL included) and the descriptor (descsz bytes), each padded to 4 bytes.
 */
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { endianness } from 'node:os';

export interface ElfNote {
  name: string;
  type: number;
  desc: Buffer;
}

const NOTE_HEADER_SIZE = 12;
const NT_GNU_BUILD_ID = 3;

function align4(n: number): number {
  return n + ((4 - (n % 4)) % 4);
}

/**
 * The well-formed notes at the start of `notes`, in order. Iteration stops (without throwing) at
 * the first record that does not fit in the buffer: notes come from files we do not control.
 */
export function* parseNotes(notes: Buffer, littleEndian: boolean = endianness() === 'LE'): Generator<ElfNote> {
  const u32 = (off: number): number => (littleEndian ? notes.readUInt32LE(off) : notes.readUInt32BE(off));
  let off = 0;
  while (off + NOTE_HEADER_SIZE <= notes.length) {
    const namesz = u32(off);
    const descsz = u32(off + 4);
    const type = u32(off + 8);
    const nameStart = off + NOTE_HEADER_SIZE;
    const descStart = nameStart + align4(namesz);
    const next = descStart + align4(descsz);
    if (next > notes.length) return; // malformed: a size points past the end
    // The name's terminating NUL is counted in namesz; drop it (and any padding NULs).
    const name = notes.toString('latin1', nameStart, nameStart + namesz).replace(/\0+$/, '');
    yield { name, type, desc: notes.subarray(descStart, descStart + descsz) };
    off = next;
  }
}

/** The hex build id of the first GNU NT_GNU_BUILD_ID note, or null if there is none or the notes are malformed. */
export function parseBuildId(notes: Buffer, littleEndian: boolean = endianness() === 'LE'): string | null {
  for (const note of parseNotes(notes, littleEndian)) {
    if (note.name === 'GNU' && note.type === NT_GNU_BUILD_ID && note.desc.length > 0) return note.desc.toString('hex');
  }
  return null;
}

/**
 * The running kernel's build id. Its notes are in the machine's own byte order. Null when the
 * file is missing or unreadable (not Linux, a container hiding /sys, permissions). `mode` is
 * store/small-file's ReadMode, spelled out: source/ sits below the store and imports none of it.
 */
export async function readLiveBuildId(path: string = '/sys/kernel/notes', mode: 'sync' | 'async' = 'sync'): Promise<string | null> {
  let notes: Buffer;
  try {
    // Synchronous: a small file of sysfs (or a test's), read at every start. Through the thread
    // pool ('async') when the HTTP catalog refreshes while serving: that is a request's path.
    notes = mode === 'sync' ? readFileSync(path) : await readFile(path);
  } catch {
    return null;
  }
  return parseBuildId(notes);
}
