import { InvalidInputError } from "./errors.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Pagination cursors are opaque to clients: the last id of a page, base64url-encoded. */
function encodeIdCursor(id: string): string {
  return Buffer.from(id).toString("base64url");
}

function decodeIdCursor(cursor: string): string {
  const id = Buffer.from(cursor, "base64url").toString("utf8");
  if (!UUID.test(id)) throw new InvalidInputError("cursor is not one this API returned");
  return id;
}

export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

/**
 * Keyset pagination on time-ordered ids, newest first. `fetch` returns up to `take` rows with
 * ids below `before` (all rows when undefined), in descending id order.
 */
export async function pageByIdDesc<T extends { id: string }>(
  page: { limit: number; cursor?: string | undefined },
  fetch: (before: string | undefined, take: number) => Promise<T[]>,
): Promise<Page<T>> {
  const before = page.cursor === undefined ? undefined : decodeIdCursor(page.cursor);
  const rows = await fetch(before, page.limit + 1);
  const items = rows.slice(0, page.limit);
  const last = items.at(-1);
  return { items, nextCursor: rows.length > page.limit && last ? encodeIdCursor(last.id) : null };
}
