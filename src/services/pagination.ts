import { InvalidInputError } from "./errors.js";

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Pagination cursors are opaque to clients: the last id of a page, base64url-encoded. */
export function encodeIdCursor(id: string): string {
  return Buffer.from(id).toString("base64url");
}

export function decodeIdCursor(cursor: string): string {
  const id = Buffer.from(cursor, "base64url").toString("utf8");
  if (!UUID.test(id)) throw new InvalidInputError("cursor is not one this API returned");
  return id;
}
