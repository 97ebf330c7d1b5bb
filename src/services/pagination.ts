import { InvalidInputError } from "./errors.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export interface Page<T> {
  items: T[];
  nextCursor: string | null;
}

/** How a page's last row becomes a cursor, and back: cursors are opaque to clients (base64url). */
export interface CursorCodec<T, K> {
  key(row: T): K;
  valid(key: unknown): key is K;
}

function refused(): never {
  throw new InvalidInputError("cursor is not one this API returned");
}

/**
 * Keyset pagination: `fetch` returns up to `take` rows after `after` (the previous page's last
 * row's key; all rows when undefined), in the page's order.
 */
export async function pageByKey<T extends R, R, K>(
  page: { limit: number; cursor?: string | undefined },
  codec: CursorCodec<R, K>,
  fetch: (after: K | undefined, take: number) => Promise<T[]>,
): Promise<Page<T>> {
  let after: K | undefined;
  if (page.cursor !== undefined) {
    let key: unknown;
    try {
      key = JSON.parse(Buffer.from(page.cursor, "base64url").toString("utf8"));
    } catch {
      refused();
    }
    if (!codec.valid(key)) refused();
    after = key;
  }
  const rows = await fetch(after, page.limit + 1);
  const items = rows.slice(0, page.limit);
  const last = items.at(-1);
  return {
    items,
    nextCursor:
      rows.length > page.limit && last !== undefined
        ? Buffer.from(JSON.stringify(codec.key(last))).toString("base64url")
        : null,
  };
}

export const isUuid = (value: unknown): value is string => typeof value === "string" && UUID.test(value);

export const idCursor: CursorCodec<{ id: string }, string> = { key: (row) => row.id, valid: isUuid };

/** Keyset pagination on time-ordered ids, newest first: `fetch` gets rows with ids below `before`. */
export function pageByIdDesc<T extends { id: string }>(
  page: { limit: number; cursor?: string | undefined },
  fetch: (before: string | undefined, take: number) => Promise<T[]>,
): Promise<Page<T>> {
  return pageByKey(page, idCursor, fetch);
}
