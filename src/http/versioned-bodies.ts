/**
 * Response bodies kept by key with the version of the data they were made from, at most
 * `maxBytes` in all, keys included (the least recently used go first: a flood of distinct long
 * keys cannot hold more). A body is served only at the version it was made at: the caller reads
 * the data's current version (one small query) and asks with it.
 */
export class VersionedBodies {
  private readonly entries = new Map<string, { version: number; body: Uint8Array<ArrayBuffer> }>();
  private bytes = 0;

  constructor(private readonly maxBytes: number) {}

  /** The body kept for `key` at `version`; one kept at another version is dropped. */
  get(key: string, version: number): Uint8Array<ArrayBuffer> | undefined {
    const entry = this.entries.get(key);
    if (!entry) return undefined;
    this.delete(key);
    if (entry.version !== version) return undefined;
    this.entries.set(key, entry); // now the most recently used
    this.bytes += sizeOf(key, entry.body);
    return entry.body;
  }

  set(key: string, version: number, body: Uint8Array<ArrayBuffer>): void {
    this.delete(key);
    if (sizeOf(key, body) > this.maxBytes) return;
    this.entries.set(key, { version, body });
    this.bytes += sizeOf(key, body);
    for (const oldest of this.entries.keys()) {
      if (this.bytes <= this.maxBytes) break;
      this.delete(oldest);
    }
  }

  private delete(key: string): void {
    const entry = this.entries.get(key);
    if (!entry) return;
    this.entries.delete(key);
    this.bytes -= sizeOf(key, entry.body);
  }
}

/** What an entry holds: its body, and its key (at most two bytes a character in V8's strings). */
function sizeOf(key: string, body: Uint8Array): number {
  return 2 * key.length + body.byteLength;
}
