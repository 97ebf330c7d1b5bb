/**
 * A seeded generator (mulberry32): the same seed gives the same draws on every machine, so a
 * merge or a training run can be repeated exactly. Returns floats in [0, 1).
 */
export function seededRandom(seed: number): () => number {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A uniform integer in [0, n). */
export function randomInt(random: () => number, n: number): number {
  return Math.floor(random() * n);
}

/** murmur3's 32-bit finaliser: every input bit moves every output bit. */
function mix32(h: number): number {
  let x = h >>> 0;
  x = Math.imul(x ^ (x >>> 16), 0x85ebca6b);
  x = Math.imul(x ^ (x >>> 13), 0xc2b2ae35);
  return (x ^ (x >>> 16)) >>> 0;
}

/**
 * The seed of one random stream of a run: a hash of (seed, purpose, member, epoch), so that no
 * two streams share draws (a linear combination such as seed * a + member * b + epoch makes
 * member 0's epoch 1 another seed's epoch 0). Purposes are names: "init", "data-order",
 * "augmentation", "papa-2", ...
 */
export function streamSeed(seed: number, purpose: string, member = 0, epoch = 0): number {
  let h = 0x9e3779b9;
  const feed = (value: number) => {
    h = mix32(h ^ mix32(value));
    h = (Math.imul(h, 5) + 0xe6546b64) >>> 0;
  };
  for (const v of [seed, member, epoch]) {
    feed(v >>> 0);
    feed(Math.floor(v / 2 ** 32) >>> 0);
  }
  for (let i = 0; i < purpose.length; i++) feed(purpose.charCodeAt(i));
  return mix32(h ^ purpose.length);
}
