import { randomInt, seededRandom } from "../random.js";

/** How to combine N inputs; each method is a matrix of coefficients, one row per output. */
export type MergeMethod =
  | { method: "papa-all" }
  | { method: "papa-2"; seed: number }
  | { method: "weighted"; coefficients: number[] }
  | { method: "papa-pull"; beta: number };

export class MergeSpecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "MergeSpecError";
  }
}

/** The i-th of the n(n-1)/2 unordered pairs (a < b) in lexicographic order. */
export function unrankPair(index: number, n: number): [number, number] {
  let a = 0;
  let remaining = index;
  while (remaining >= n - 1 - a) {
    remaining -= n - 1 - a;
    a++;
  }
  return [a, a + 1 + remaining];
}

/**
 * PAPA-2 pairs: one per output slot, `n` distinct pairs drawn uniformly (without replacement)
 * from all n(n-1)/2 unordered pairs, in random slot order, so that no two children are the same
 * average; for n = 3 that is all three pairs. Two inputs have one pair, which both slots get
 * (PAPA-2 is PAPA-all there). (The authors' code draws only from the first n pairs in
 * lexicographic order; we do not.)
 */
export function papa2Pairs(n: number, seed: number): [number, number][] {
  const random = seededRandom(seed);
  const count = (n * (n - 1)) / 2;
  if (count < n) return Array.from({ length: n }, () => unrankPair(0, n));
  // The first n steps of a Fisher-Yates shuffle of the pair indices, kept sparse: only the
  // displaced indices are stored, so 1000 inputs do not allocate half a million.
  const displaced = new Map<number, number>();
  return Array.from({ length: n }, (_, i) => {
    const j = i + randomInt(random, count - i);
    const picked = displaced.get(j) ?? j;
    displaced.set(j, displaced.get(i) ?? i);
    return unrankPair(picked, n);
  });
}

/** The coefficients of the average of inputs a and b, of n. */
function pairRow(n: number, [a, b]: [number, number]): number[] {
  return Array.from({ length: n }, (_, k) => (k === a || k === b ? 0.5 : 0));
}

/**
 * For each output (row), the input its integer and bool tensors are copied from: the input with
 * the largest coefficient, the lowest index on a tie. Input 0 for PAPA-all, a PAPA-2 child's
 * first parent, a pulled input itself, a weighted average's heaviest input.
 */
export function copySources(coefficients: number[][]): number[] {
  return coefficients.map((row) => row.reduce((best, c, k) => (c > (row[best] as number) ? k : best), 0));
}

/**
 * The coefficient matrix of a merge of n inputs: `rows[j][k]` is input k's weight in output j.
 * Every row sums to 1. Throws `MergeSpecError` for a spec that cannot apply to n inputs.
 */
export function mergeCoefficients(spec: MergeMethod, n: number): number[][] {
  if (n < 1) throw new MergeSpecError("a merge needs at least one input");
  switch (spec.method) {
    case "papa-all":
      if (n < 2) throw new MergeSpecError("papa-all needs at least 2 inputs");
      return [Array.from({ length: n }, () => 1 / n)];
    case "papa-2":
      if (n < 2) throw new MergeSpecError("papa-2 needs at least 2 inputs");
      return papa2Pairs(n, spec.seed).map((pair) => pairRow(n, pair));
    case "weighted": {
      const c = spec.coefficients;
      if (c.length !== n)
        throw new MergeSpecError(`weighted needs one coefficient per input: got ${c.length} for ${n}`);
      if (c.some((v) => !Number.isFinite(v))) throw new MergeSpecError("coefficients must be finite numbers");
      const sum = c.reduce((a, b) => a + b, 0);
      if (Math.abs(sum - 1) > 1e-9) throw new MergeSpecError(`coefficients must sum to 1, not ${sum}`);
      return [[...c]];
    }
    case "papa-pull": {
      const { beta } = spec;
      if (!(beta > 0 && beta <= 1)) throw new MergeSpecError(`beta must be in (0, 1], not ${beta}`);
      if (n < 2) throw new MergeSpecError("papa-pull needs at least 2 inputs");
      return Array.from({ length: n }, (_, j) =>
        Array.from({ length: n }, (_, k) => beta / n + (j === k ? 1 - beta : 0)),
      );
    }
  }
}

/** How a population's round averages its members' submissions. */
export interface RoundRule {
  method: "papa-all" | "papa-2" | "papa";
  /** papa: the weight each member keeps of its own submission. */
  alpha: number;
  /** papa-2: the seed of this round's pair draw. */
  seed: number;
}

/**
 * A population round's coefficients: `rows[j][k]` is the weight of submission k (of member
 * `submitted[k]`) in member j's next weights, for each of the `size` members. With m the mean of
 * the submissions: papa-all gives every member m; papa-2 gives each submitter the average of a
 * distinct random pair of submissions (`papa2Pairs`; one submission is its own pair); papa gives
 * submitter j `alpha * w_j + (1 - alpha) * m`. A member that did not submit gets m.
 */
export function roundCoefficients(rule: RoundRule, size: number, submitted: number[]): number[][] {
  const n = submitted.length;
  if (n < 1) throw new MergeSpecError("a round needs at least one submission");
  const mean = Array.from({ length: n }, () => 1 / n);
  const pairs = rule.method === "papa-2" && n > 1 ? papa2Pairs(n, rule.seed) : null;
  return Array.from({ length: size }, (_, member) => {
    const k = submitted.indexOf(member);
    if (k < 0 || rule.method === "papa-all" || n === 1) return mean;
    if (pairs) return pairRow(n, pairs[k] as [number, number]);
    return mean.map((c, i) => (1 - rule.alpha) * c + (i === k ? rule.alpha : 0));
  });
}
