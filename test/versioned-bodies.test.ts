import { describe, expect, it } from "vitest";
import { VersionedBodies } from "../src/http/versioned-bodies.js";

const body = (bytes: number, fill = 1) => new Uint8Array(bytes).fill(fill);

describe("VersionedBodies", () => {
  it("serves a body only at the version it was kept at, and drops it when asked at another", () => {
    const bodies = new VersionedBodies(100);
    bodies.set("a", 3, body(10));
    expect(bodies.get("a", 3)).toEqual(body(10));
    expect(bodies.get("a", 4)).toBeUndefined();
    expect(bodies.get("a", 3)).toBeUndefined();
  });

  it("keeps at most its bytes, letting the least recently used go first", () => {
    const bodies = new VersionedBodies(106); // a key of one character takes 2 bytes
    bodies.set("a", 1, body(40, 1));
    bodies.set("b", 1, body(40, 2));
    expect(bodies.get("a", 1)).toBeDefined(); // b is now the least recently used
    bodies.set("c", 1, body(40, 3));
    expect([bodies.get("a", 1), bodies.get("b", 1), bodies.get("c", 1)].map((x) => x?.[0])).toEqual([
      1,
      undefined,
      3,
    ]);
    // Replacing a key frees its old bytes; a body over the whole budget is not kept.
    bodies.set("a", 2, body(60, 4));
    expect(bodies.get("c", 1)?.[0]).toBe(3);
    bodies.set("d", 1, body(105));
    expect(bodies.get("d", 1)).toBeUndefined();
    expect(bodies.get("a", 2)?.[0]).toBe(4);
  });

  it("counts keys against its bytes: long keys of empty bodies cannot hold more than the budget", () => {
    const bodies = new VersionedBodies(1000);
    const key = (i: number) => `${i}`.padStart(100, "?");
    for (let i = 0; i < 100; i++) bodies.set(key(i), 1, body(0));
    const kept = Array.from({ length: 100 }, (_, i) => bodies.get(key(i), 1)).filter(Boolean);
    expect(kept).toHaveLength(5); // 200 bytes a key
  });
});
