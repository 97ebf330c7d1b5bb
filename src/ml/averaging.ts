import * as tf from "@tensorflow/tfjs";
import { channelSums } from "./batch-norm.js";
import { namedWeights } from "./models.js";

/** For each float weight (in `namedWeights` order), that weight of every model: [weight][model]. */
function floatColumns(models: tf.LayersModel[]): tf.LayerVariable[][] {
  const weights = models.map((m) => namedWeights(m).map((w) => w.variable));
  return (weights[0] ?? []).flatMap((first, i) =>
    first.dtype === "float32" ? [weights.map((w) => w[i] as tf.LayerVariable)] : [],
  );
}

/**
 * Sets every target's float weights to a combination of the sources' weights, with the same
 * coefficient matrices as the merge engine (`mergeCoefficients`): rows[j][k] is source k's
 * weight in target j; a single row (PAPA-all, a soup) is given to every target. All new values
 * are computed before any target changes, as tf ops, then assigned in place, so sources and
 * targets may be the same models. Non-float weights are never averaged.
 */
export function averageInto(sources: tf.LayersModel[], targets: tf.LayersModel[], rows: number[][]): void {
  const into = floatColumns(targets);
  for (const [i, column] of floatColumns(sources).entries()) {
    const updated = tf.tidy(() => {
      const stacked = tf.stack(column.map((v) => v.read())); // [p, ...shape]
      return rows.map((row) => {
        const c = tf.tensor1d(row).reshape([row.length, ...Array(stacked.rank - 1).fill(1)]);
        return tf.keep(tf.sum(tf.mul(stacked, c), 0));
      });
    });
    for (const [j, target] of (into[i] ?? []).entries()) {
      target.write(updated[rows.length === 1 ? 0 : j] as tf.Tensor);
    }
    for (const t of updated) t.dispose();
  }
}

/** `averageInto` the members themselves: PAPA-all (one row), PAPA-2 (a row per member). */
export function averageMembers(members: tf.LayersModel[], rows: number[][]): void {
  averageInto(members, members, rows);
}

/**
 * The PAPA pull: every member moves `beta` of the way to the population mean,
 * theta_j <- (1 - beta) theta_j + beta mean, with the mean taken before any member moves: the
 * coefficients of `mergeCoefficients({ method: "papa-pull" })`, computed as one mean and one
 * interpolation per member, O(p |theta|), not as the p x p matrix, O(p^2 |theta|).
 */
export function papaPull(members: tf.LayersModel[], beta: number): void {
  for (const column of floatColumns(members)) {
    const pulled = tf.tidy(() => {
      const mean = tf.mul(tf.addN(column.map((v) => v.read())), beta / column.length);
      return column.map((v) => tf.keep(tf.add(tf.mul(v.read(), 1 - beta), mean)));
    });
    for (const [j, v] of column.entries()) v.write(pulled[j] as tf.Tensor);
    for (const t of pulled) t.dispose();
  }
}

/**
 * The PAPA pull toward a mean computed elsewhere (another process's members are in it):
 * `writeMean` writes the population's mean into the members, which then keep `1 - beta` of
 * their weights from before, theta_j <- (1 - beta) theta_j + beta mean, as `papaPull` does.
 */
export async function pullToward(
  members: tf.LayersModel[],
  beta: number,
  writeMean: () => Promise<void>,
): Promise<void> {
  const columns = floatColumns(members);
  const before = columns.map((column) => column.map((v) => tf.clone(v.read())));
  try {
    await writeMean();
    for (const [i, column] of columns.entries()) {
      for (const [j, v] of column.entries()) {
        const old = before[i]?.[j] as tf.Tensor;
        const pulled = tf.tidy(() => tf.add(tf.mul(old, 1 - beta), tf.mul(v.read(), beta)));
        v.write(pulled);
        pulled.dispose();
      }
    }
  } finally {
    for (const t of before.flat()) t.dispose();
  }
}

/**
 * Re-estimates every BatchNorm layer's moving mean and variance from `batches` (no augmentation),
 * layer after layer, as exact averages over all examples (not an exponential average; summed in
 * float64, `channelSums`): reset, then for each layer the statistics of its input, computed with
 * the earlier layers already re-estimated. Weights other than the statistics are unchanged.
 */
export function reestimateBatchNorm(model: tf.LayersModel, batches: tf.Tensor[]): void {
  const layers = model.layers.filter((l) => l.getClassName() === "BatchNormalization");
  for (const layer of layers) {
    const probe = tf.model({ inputs: model.inputs, outputs: layer.input as tf.SymbolicTensor });
    const [meanVar, varVar] = layer.weights.filter((w) => !w.trainable) as [
      tf.LayerVariable,
      tf.LayerVariable,
    ];
    const channels = meanVar.shape.at(-1) ?? 0;
    const sum = new Float64Array(channels);
    const squares = new Float64Array(channels);
    let n = 0;
    for (const batch of batches) {
      const h = probe.predict(batch, { batchSize: batch.shape[0] }) as tf.Tensor;
      n += h.size / channels;
      let sums: ReturnType<typeof channelSums>;
      try {
        sums = channelSums(h);
      } finally {
        h.dispose();
      }
      for (let c = 0; c < channels; c++) {
        sum[c] = (sum[c] as number) + (sums.sum[c] as number);
        squares[c] = (squares[c] as number) + (sums.squares[c] as number);
      }
    }
    if (n === 0) throw new Error("no batches to re-estimate BatchNorm statistics");
    const m = sum.map((s) => s / n);
    // E[x^2] - E[x]^2 can round below 0 for a near-constant channel: clamp, as the fused kernel does.
    const mean = tf.tensor1d(Float32Array.from(m));
    const variance = tf.tensor1d(
      Float32Array.from(squares, (q, c) => Math.max(0, q / n - (m[c] as number) ** 2)),
    );
    meanVar.write(mean);
    varVar.write(variance);
    mean.dispose();
    variance.dispose();
  }
}
