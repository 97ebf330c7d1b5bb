import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { mergeCoefficients } from "../src/merge/methods.js";
import { augmentedBatch, cutmixBox, drawDiversity, ERASING } from "../src/ml/augmentation.js";
import { averageMembers, papaPull, reestimateBatchNorm } from "../src/ml/averaging.js";
import { BackendError, selectBackend } from "../src/ml/backend.js";
import { DatasetError, idxSplit } from "../src/ml/dataset-formats.js";
import { BUILT_IN_DESCRIPTIONS, installedDatasets, loadBuiltInDataset } from "../src/ml/datasets.js";
import { calibrationBatches, ensembleAccuracy, memberAccuracies } from "../src/ml/evaluation.js";
import { modelSize } from "../src/ml/memory.js";
import { buildModel, logitsModel, type ModelSpec, namedWeights } from "../src/ml/models.js";
import { MemberOptimizer } from "../src/ml/optimizer.js";
import {
  DivergenceError,
  holdOut,
  type OptimizerSpec,
  type PopulationSpec,
  type TrainingState,
  trainPopulation,
} from "../src/ml/population.js";
import { learningRate, papaBeta } from "../src/ml/schedule.js";
import { greedySoupOf } from "../src/ml/soups.js";
import { trainStep } from "../src/ml/step.js";
import { seededRandom, streamSeed } from "../src/random.js";

const SHAPE: [number, number, number] = [4, 4, 1];

/** Every weight of every member, as plain arrays. */
function snapshot(models: tf.LayersModel[]): number[][][] {
  return models.map((m) => namedWeights(m).map((w) => Array.from(w.variable.read().dataSync())));
}

function tinyPopulation(n: number, kind: "mlp" | "cnn" = "mlp"): tf.LayersModel[] {
  const spec = kind === "mlp" ? { kind, hidden: [3] } : { kind, channels: [2] };
  return Array.from({ length: n }, (_, j) => buildModel(spec as never, SHAPE, 2, j + 1));
}

/** SGD with Nesterov momentum at a constant lr 0.1, no weight decay: change what a test needs. */
function sgd(change: Partial<OptimizerSpec> = {}): OptimizerSpec {
  return {
    kind: "sgd",
    lr: 0.1,
    momentum: 0.9,
    nesterov: true,
    weightDecay: 0,
    schedule: "constant",
    minLr: 0,
    warmupSteps: 0,
    ...change,
  };
}

function expectClose(a: number[], b: number[]): void {
  expect(a.length).toBe(b.length);
  for (const [i, x] of a.entries()) expect(x).toBeCloseTo(b[i] ?? Number.NaN, 5);
}

beforeAll(async () => {
  await selectBackend({ forced: "cpu" });
});

describe("averaging members in place", () => {
  it("a PAPA event moves every member beta toward the mean taken before anyone moved", () => {
    const members = tinyPopulation(3);
    const before = snapshot(members);
    papaPull(members, 0.3);
    const after = snapshot(members);
    before[0]?.forEach((_, w) => {
      const mean = (before[0]?.[w] ?? []).map((_, i) => before.reduce((s, m) => s + (m[w]?.[i] ?? 0), 0) / 3);
      for (let j = 0; j < 3; j++) {
        expectClose(
          after[j]?.[w] ?? [],
          (before[j]?.[w] ?? []).map((x, i) => 0.7 * x + 0.3 * (mean[i] ?? 0)),
        );
      }
    });
  });

  it("a PAPA event costs O(p |theta|): one mean, one interpolation per member, not a p x p matrix", async () => {
    /** Elements every kernel of one pull writes, for a population of p. */
    const work = async (p: number) => {
      const members = tinyPopulation(p);
      const info = await tf.profile(() => papaPull(members, 0.1));
      for (const m of members) m.dispose();
      return info.kernels.reduce(
        (sum, k) => sum + k.outputShapes.reduce((a, shape) => a + shape.reduce((x, y) => x * y, 1), 0),
        0,
      );
    };
    const [two, sixteen] = [await work(2), await work(16)];
    // Linear: 8x the members, about 8x the work (a p x p matrix would be 64x).
    expect(sixteen / two).toBeLessThan(10);
  });

  it("PAPA-all leaves all members equal to the mean; PAPA-2 children are pair means", () => {
    const members = tinyPopulation(4);
    const before = snapshot(members);
    averageMembers(members, mergeCoefficients({ method: "papa-all" }, 4));
    const all = snapshot(members);
    for (let j = 1; j < 4; j++) expect(all[j]).toEqual(all[0]);
    expectClose(
      all[0]?.[0] ?? [],
      (before[0]?.[0] ?? []).map((_, i) => before.reduce((s, m) => s + (m[0]?.[i] ?? 0), 0) / 4),
    );

    const pairs = tinyPopulation(4);
    const start = snapshot(pairs);
    const rows = mergeCoefficients({ method: "papa-2", seed: 9 }, 4);
    averageMembers(pairs, rows);
    const end = snapshot(pairs);
    rows.forEach((row, j) => {
      const [a, b] = row.flatMap((c, k) => (c === 0.5 ? [k] : []));
      expectClose(
        end[j]?.[1] ?? [],
        (start[a ?? 0]?.[1] ?? []).map((x, i) => 0.5 * x + 0.5 * (start[b ?? 0]?.[1]?.[i] ?? 0)),
      );
    });
  });

  it("re-estimates BatchNorm statistics as exact averages over the batches", () => {
    const [model] = tinyPopulation(1, "cnn");
    if (!model) throw new Error("no model");
    const batches = [0, 1].map((b) =>
      tf.tensor4d(
        Array.from({ length: 3 * 16 }, (_, i) => Math.sin(i + 7 * b)),
        [3, 4, 4, 1],
      ),
    );
    reestimateBatchNorm(model, batches);
    // By hand: the conv output (BN input) of every example, per channel.
    const probe = tf.model({
      inputs: model.inputs,
      outputs: model.getLayer("conv_0").output as tf.SymbolicTensor,
    });
    const values = batches.flatMap((b) => Array.from((probe.predict(b) as tf.Tensor).dataSync()));
    const channel = (c: number) => values.filter((_, i) => i % 2 === c);
    const mean = [0, 1].map((c) => channel(c).reduce((a, b) => a + b, 0) / channel(c).length);
    const variance = [0, 1].map(
      (c) => channel(c).reduce((a, b) => a + (b - (mean[c] ?? 0)) ** 2, 0) / channel(c).length,
    );
    const bn = model.getLayer("bn_0");
    const [movingMean, movingVariance] = bn.getWeights().slice(2);
    expectClose(Array.from(movingMean?.dataSync() ?? []), mean);
    expectClose(Array.from(movingVariance?.dataSync() ?? []), variance);
  });
});

describe("loss and BatchNorm statistics", () => {
  it("trains on logits: a confidently wrong member still gets a gradient (log of a clipped probability gives none)", () => {
    const model = buildModel({ kind: "mlp", hidden: [3] }, SHAPE, 2, 1);
    const logits = model.getLayer("logits");
    const [kernel] = logits.getWeights();
    logits.setWeights([kernel as tf.Tensor, tf.tensor1d([40, 0])]); // p(class 1) ~ e^-40
    const trainable = model.trainableWeights.map((w) => w.read() as tf.Variable);
    const optimizer = new MemberOptimizer(sgd({ momentum: 0, nesterov: false }), trainable);
    const loss = trainStep(
      logitsModel(model),
      trainable,
      optimizer,
      tf.zeros([2, ...SHAPE]),
      tf.tensor2d([0, 1, 0, 1], [2, 2]),
      0.1,
    );
    // The true cross-entropy (~40), not -log(1e-7) = 16.1; and the bias moved down by lr * 1.
    expect(loss.dataSync()[0]).toBeGreaterThan(39);
    const [, bias] = logits.getWeights();
    expectClose(Array.from(bias?.dataSync() ?? []), [39.9, 0.1]);
    loss.dispose();
    optimizer.dispose();
    model.dispose();
  });

  it("exports models that give probabilities, from a softmax layer after the logits", () => {
    const model = buildModel({ kind: "cnn", channels: [2] }, SHAPE, 3, 1);
    expect(model.getLayer("logits").getConfig().activation).toBe("linear");
    expect(model.getLayer("probabilities").getConfig().activation).toBe("softmax");
    expect(model.outputs[0]?.sourceLayer.name).toBe("probabilities");
    const p = model.predict(tf.randomUniform([4, ...SHAPE], 0, 1, "float32", 3)) as tf.Tensor;
    for (const row of p.arraySync() as number[][]) expect(row.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 5);
    model.dispose();
  });

  it("re-estimates a multi-layer CNN's statistics layer after layer, each on re-estimated inputs", () => {
    const model = buildModel({ kind: "cnn", channels: [2, 3] }, [8, 8, 1], 2, 4);
    const batches = [0, 1].map((b) => tf.randomUniform([5, 8, 8, 1], 0, 1, "float32", 10 + b));
    reestimateBatchNorm(model, batches);
    for (const [layer, input, channels] of [
      ["bn_0", "conv_0", 2],
      ["bn_1", "conv_1", 3],
    ] as const) {
      // By hand, with the model as it now is: bn_1's input runs through the re-estimated bn_0.
      const probe = tf.model({
        inputs: model.inputs,
        outputs: model.getLayer(input).output as tf.SymbolicTensor,
      });
      const values = batches.flatMap((b) => Array.from((probe.predict(b) as tf.Tensor).dataSync()));
      const of = (c: number) => values.filter((_, i) => i % channels === c);
      const mean = Array.from(
        { length: channels },
        (_, c) => of(c).reduce((a, b) => a + b, 0) / of(c).length,
      );
      const variance = mean.map((m, c) => of(c).reduce((a, b) => a + (b - m) ** 2, 0) / of(c).length);
      const [movingMean, movingVariance] = model.getLayer(layer).getWeights().slice(2);
      expectClose(Array.from(movingMean?.dataSync() ?? []), mean);
      expectClose(Array.from(movingVariance?.dataSync() ?? []), variance);
    }
    model.dispose();
  });

  it("never stores a negative variance for a near-constant channel", () => {
    // 126.74 plus noise of 1e-4 of it: E[x^2] - E[x]^2 rounds to -0.002 in float32.
    const input = tf.input({ shape: [5, 5, 1] });
    const model = tf.model({
      inputs: input,
      outputs: tf.layers.batchNormalization().apply(input) as tf.SymbolicTensor,
    });
    const batch = tf.tidy(() =>
      tf.add(
        tf.fill([3, 5, 5, 1], 126.74),
        tf.mul(tf.randomUniform([3, 5, 5, 1], 0, 1, "float32", 2), 0.012674),
      ),
    );
    reestimateBatchNorm(model, [batch]);
    const variance = model.layers[1]?.getWeights()[3]?.dataSync()[0] ?? Number.NaN;
    expect(variance).toBeGreaterThanOrEqual(0);
    model.dispose();
  });
});

describe("population training rules", () => {
  const o = sgd({ schedule: "cosine", minLr: 0.001 });
  const p: PopulationSpec = {
    size: 2,
    variant: "papa",
    seed: 1,
    alpha: 0.99,
    everyKSteps: 10,
    lrScaling: "linear",
    everyKEpochs: 1,
  };

  it("steps the cosine schedule per iteration and scales beta by lr_t / lr_0", () => {
    expect(learningRate(o, 0, 100)).toBeCloseTo(0.1, 12);
    expect(learningRate(o, 50, 100)).toBeCloseTo(0.0505, 12);
    expect(learningRate(o, 100, 100)).toBeCloseTo(0.001, 12);
    expect(papaBeta(p, o, 50, 100)).toBeCloseTo(0.01 * 0.505, 12);
    expect(papaBeta({ ...p, lrScaling: "none" }, o, 50, 100)).toBeCloseTo(0.01, 12);
  });

  it("warms up linearly over warmupSteps, then runs the cosine over the remaining steps", () => {
    const warm = { ...o, warmupSteps: 10 };
    expect(learningRate(warm, 0, 110)).toBeCloseTo(0.01, 12);
    expect(learningRate(warm, 4, 110)).toBeCloseTo(0.05, 12);
    expect(learningRate(warm, 10, 110)).toBeCloseTo(0.1, 12);
    expect(learningRate(warm, 60, 110)).toBeCloseTo(0.0505, 12);
    expect(learningRate(warm, 110, 110)).toBeCloseTo(0.001, 12);
    expect(learningRate({ ...warm, schedule: "constant" }, 30, 110)).toBe(0.1);
    expect(papaBeta(p, warm, 4, 110)).toBeCloseTo(0.01 * 0.5, 12);
  });

  it("gives every random stream its own seed: no two (seed, purpose, member, epoch) share one", () => {
    const seen = new Map<number, string>();
    for (const seed of [0, 1, 2, 7, 2 ** 32 - 1])
      for (const purpose of ["init", "data-order", "augmentation", "papa-2", "diversity", "calibration"])
        for (let member = 0; member < 8; member++)
          for (let epoch = 0; epoch < 30; epoch++) {
            const key = `${seed}/${purpose}/${member}/${epoch}`;
            const value = streamSeed(seed, purpose, member, epoch);
            expect(seen.get(value), key).toBeUndefined();
            seen.set(value, key);
          }
    expect(seen.size).toBe(5 * 6 * 8 * 30);
  });

  it("draws diversity combinations without replacement", () => {
    const sets = { mixup: [0, 0.5], labelSmoothing: [0, 0.1], cutmix: [0], randomErasing: [0] };
    const drawn = drawDiversity(sets, 4, 3);
    expect(new Set(drawn.map((d) => JSON.stringify(d))).size).toBe(4);
    expect(drawDiversity(sets, 4, 3)).toEqual(drawn);
  });

  it("greedy soup adds a member only if held-out accuracy strictly improves, and keeps the soup it accepted last", () => {
    const soupAcc: Record<string, number> = { "1": 0.9, "1,2": 0.91, "1,2,0": 0.91, "1,2,3": 0.95 };
    const made: string[] = [];
    const discarded: string[] = [];
    const greedy = greedySoupOf(
      [0.5, 0.9, 0.7, 0.6],
      (ingredients) => {
        const soup = ingredients.join(",");
        made.push(soup);
        return { soup, accuracy: soupAcc[soup] ?? 0 };
      },
      (soup) => discarded.push(soup),
    );
    // Each candidate is made once: the kept soup is the "1,2,3" candidate, not made again.
    expect(made).toEqual(["1", "1,2", "1,2,3", "1,2,3,0"]);
    expect(greedy).toEqual({ soup: "1,2,3", ingredients: [1, 2, 3] });
    expect(discarded.sort()).toEqual(["1", "1,2", "1,2,3,0"]);
  });

  it("greedy soup scores the first member as a soup too, under the candidates' BatchNorm treatment", () => {
    // Member 1 scores 0.9 with its own statistics but 0.8 as a soup of one (re-estimated); the
    // two-member soup's 0.85 beats the like-for-like incumbent, not the member's own 0.9.
    const soupAcc: Record<string, number> = { "1": 0.8, "1,0": 0.85 };
    const scored = (ids: number[]) => ({ soup: ids, accuracy: soupAcc[ids.join(",")] ?? 0 });
    expect(greedySoupOf([0.7, 0.9], scored, () => {}).ingredients).toEqual([1, 0]);
  });

  it("greedy soup discards the soup it kept when making a candidate fails", () => {
    const discarded: string[] = [];
    const scored = (ids: number[]) => {
      if (ids.length > 1) throw new Error("out of memory");
      return { soup: ids.join(","), accuracy: 0.9 };
    };
    expect(() => greedySoupOf([0.7, 0.9], scored, (soup) => discarded.push(soup))).toThrow("out of memory");
    expect(discarded).toEqual(["1"]);
  });

  it("holds out a fixed 2% of the training split, disjoint from what trains", () => {
    const split = {
      x: Float32Array.from({ length: 1000 }, (_, i) => i),
      y: new Int32Array(1000),
      count: 1000,
    };
    const { heldOut, train } = holdOut(split);
    expect(heldOut.count).toBe(20);
    expect(train.count).toBe(980);
    const ids = [...heldOut.x, ...train.x];
    expect(new Set(ids).size).toBe(1000);
    expect(holdOut(split).heldOut.x).toEqual(heldOut.x);
  });

  it("draws calibration batches at random from the whole split, not its first (sorted) examples", () => {
    // Sorted by class, as the built-in MNIST is: 100 examples of each of 10 classes.
    const count = 1000;
    const split = {
      x: Float32Array.from({ length: count }, (_, i) => Math.floor(i / 100)),
      y: Int32Array.from({ length: count }, (_, i) => Math.floor(i / 100)),
      count,
    };
    const batches = calibrationBatches(split, [1, 1, 1], 32, 8, 7);
    const classes = batches.flatMap((b) => Array.from(b.dataSync()));
    expect(classes).toHaveLength(256);
    for (let c = 0; c < 10; c++) {
      const share = classes.filter((x) => x === c).length / 256;
      expect(share).toBeGreaterThan(0.04);
      expect(share).toBeLessThan(0.18);
    }
    const again = calibrationBatches(split, [1, 1, 1], 32, 8, 7).flatMap((b) => Array.from(b.dataSync()));
    expect(again).toEqual(classes);
    for (const b of batches) b.dispose();
  });

  it("ensembles by averaging probabilities, not by majority vote nor by averaging logits", () => {
    /** A model predicting the same logits [a, 0] for every input (class 0 vs 1: logit margin a). */
    const constant = (margin: number) => {
      const model = buildModel({ kind: "mlp", hidden: [] }, [1, 1, 1], 2, 1);
      const logits = model.getLayer("logits");
      logits.setWeights([tf.zeros([1, 2]), tf.tensor1d([margin, 0])]);
      return model;
    };
    const split = { x: new Float32Array([0.5]), y: Int32Array.of(1), count: 1 };
    // Margins 1, 1, -8: two of three vote class 0, but the mean probability of class 0 is
    // (0.731 + 0.731 + 0.0003) / 3 < 0.5: class 1.
    const tested = (models: tf.LayersModel[]) => {
      const { members, probabilities } = memberAccuracies(models, split, [1, 1, 1], 2);
      return { members, ensemble: ensembleAccuracy(probabilities, 2, split.y) };
    };
    const vote = [1, 1, -8].map(constant);
    expect(tested(vote)).toEqual({ members: [0, 0, 1], ensemble: 1 });
    // Margins 3, -1, -1: mean logit margin 1/3 (class 0), mean probability of class 0
    // (0.953 + 0.269 + 0.269) / 3 < 0.5: class 1.
    const logits = [3, -1, -1].map(constant);
    expect(tested(logits)).toEqual({ members: [0, 1, 1], ensemble: 1 });
    for (const m of [...vote, ...logits]) m.dispose();
  });

  it("erases timm's boxes (2-33% of the area, aspect 0.3-3.3) and cuts timm's CutMix boxes", () => {
    const [h, w] = [32, 32];
    const images = 300;
    const split = { x: new Float32Array(images * h * w).fill(2), y: new Int32Array(images), count: images };
    const diversity = { mixup: 0, labelSmoothing: 0, cutmix: 0, randomErasing: 1 };
    const { x } = augmentedBatch(
      split,
      Array.from({ length: images }, (_, i) => i),
      [h, w, 1],
      2,
      { diversity, baseAugmentation: false },
      seededRandom(5),
    );
    const areas: number[] = [];
    for (let i = 0; i < images; i++) {
      const erased: [number, number][] = [];
      for (let p = 0; p < h * w; p++) if (x[i * h * w + p] !== 2) erased.push([Math.floor(p / w), p % w]);
      const rows = erased.map(([r]) => r);
      const cols = erased.map(([, q]) => q);
      const eh = Math.max(...rows) - Math.min(...rows) + 1;
      const ew = Math.max(...cols) - Math.min(...cols) + 1;
      expect(eh * ew).toBe(erased.length); // one rectangle
      // Sides are rounded from the drawn area and aspect: allow that rounding.
      expect(erased.length).toBeGreaterThanOrEqual(Math.floor(ERASING.minArea * h * w * 0.8));
      expect(erased.length).toBeLessThanOrEqual(Math.ceil(ERASING.maxArea * h * w * 1.2));
      expect(eh / ew).toBeGreaterThan(0.3 * 0.7);
      expect(eh / ew).toBeLessThan(3.34 / 0.7);
      areas.push(erased.length / (h * w));
    }
    expect(areas.filter((a) => a > 0.25).length).toBeGreaterThan(images / 10);
    expect(areas.filter((a) => a < 0.08).length).toBeGreaterThan(images / 10);

    // CutMix: a box of sides floor(32 sqrt(1 - lam)) centred on a uniform pixel, clipped, and
    // lam recomputed from what is left.
    let clipped = 0;
    for (let t = 0; t < 200; t++) {
      const random = (() => {
        let i = 0;
        const draws = [(t % 20) / 20, Math.floor(t / 20) / 10];
        return () => draws[i++ % 2] as number;
      })();
      const box = cutmixBox([32, 32], 0.75, random);
      const [cy, cx] = [Math.floor(((t % 20) / 20) * 32), Math.floor((Math.floor(t / 20) / 10) * 32)];
      expect(box.top).toBe(Math.max(0, cy - 8));
      expect(box.bottom).toBe(Math.min(32, cy + 8));
      expect(box.left).toBe(Math.max(0, cx - 8));
      expect(box.right).toBe(Math.min(32, cx + 8));
      expect(box.lam).toBeCloseTo(1 - ((box.bottom - box.top) * (box.right - box.left)) / 1024, 12);
      if (box.lam > 0.75) clipped++;
    }
    expect(clipped).toBeGreaterThan(0);
  });

  it("crops with 4 pixels of zero padding and flips half the images, when the base augmentation is on", () => {
    const [h, w] = [8, 8];
    const images = 400;
    const one = Float32Array.from({ length: h * w }, (_, i) => i + 1);
    const split = { x: new Float32Array(images * h * w), y: new Int32Array(images), count: images };
    for (let i = 0; i < images; i++) split.x.set(one, i * h * w);
    const diversity = { mixup: 0, labelSmoothing: 0, cutmix: 0, randomErasing: 0 };
    const ids = Array.from({ length: images }, (_, i) => i);
    const { x } = augmentedBatch(
      split,
      ids,
      [h, w, 1],
      2,
      { diversity, baseAugmentation: true },
      seededRandom(1),
    );
    /** The image shifted by (dy, dx) after an optional flip, zeros where it leaves the original. */
    const moved = (dy: number, dx: number, flip: boolean) =>
      Array.from({ length: h * w }, (_, p) => {
        const [r, q] = [Math.floor(p / w) + dy, (flip ? w - 1 - (p % w) : p % w) + dx];
        return r >= 0 && r < h && q >= 0 && q < w ? (one[r * w + q] as number) : 0;
      });
    const seen = new Set<string>();
    let flipped = 0;
    for (let i = 0; i < images; i++) {
      const got = Array.from(x.subarray(i * h * w, (i + 1) * h * w));
      const match = [false, true].flatMap((flip) =>
        Array.from({ length: 81 }, (_, k) => [Math.floor(k / 9) - 4, (k % 9) - 4, flip] as const).filter(
          ([dy, dx]) => moved(dy, dx, flip).every((v, p) => v === got[p]),
        ),
      );
      expect(match.length, `image ${i}`).toBeGreaterThan(0);
      const [dy, dx, flip] = match[0] ?? [0, 0, false];
      seen.add(`${dy},${dx}`);
      if (flip) flipped++;
    }
    expect(seen.size).toBe(81); // every shift in [-4, 4]^2
    expect(flipped / images).toBeGreaterThan(0.4);
    expect(flipped / images).toBeLessThan(0.6);
    // Off: the images as they are.
    const plain = augmentedBatch(
      split,
      ids,
      [h, w, 1],
      2,
      { diversity, baseAugmentation: false },
      seededRandom(1),
    );
    expect(plain.x).toEqual(split.x);
  });

  it("PAPA-all averages every k epochs but never after the last one", async () => {
    const data = await loadBuiltInDataset("mnist", {
      fashionMnistDir: "/nowhere",
      maxTrain: 100,
      maxTest: 20,
    });
    const states: TrainingState[] = [];
    const outcome = await trainPopulation(
      {
        model: { kind: "mlp", hidden: [8] },
        population: { ...p, size: 2, variant: "papa-all", everyKEpochs: 1 },
        diversity: { mixup: [0], labelSmoothing: [0, 0.1], cutmix: [0], randomErasing: [0] },
        optimizer: o,
        epochs: 2,
        batchSize: 32,
        baseAugmentation: false,
      },
      data,
      { onEpochEnd: async (state) => void states.push(state) },
    );
    // After epoch 1 of 2: one average, both members equal.
    const [a, b] = states[0]?.members ?? [];
    expect(a?.weights).toEqual(b?.weights);
    // After the last epoch: none, the members are as they trained.
    const [first, second] = snapshot(outcome.members.map((m) => m.model));
    expect(first).not.toEqual(second);
    for (const m of [
      ...outcome.members.map((x) => x.model),
      outcome.uniformSoup.model,
      outcome.greedySoup.model,
    ])
      m.dispose();
  });

  it("stops with a DivergenceError, not a silent NaN model, when a member's loss is not finite", async () => {
    const data = await loadBuiltInDataset("mnist", {
      fashionMnistDir: "/nowhere",
      maxTrain: 64,
      maxTest: 16,
    });
    data.train.x[5] = Number.NaN; // one poisoned pixel: the first batch's loss is NaN
    const before = tf.memory().numTensors;
    const run = trainPopulation(
      {
        model: { kind: "mlp", hidden: [8] },
        population: { ...p, size: 2, everyKSteps: 2 },
        diversity: { mixup: [0], labelSmoothing: [0], cutmix: [0], randomErasing: [0] },
        optimizer: o,
        epochs: 1,
        batchSize: 64,
        baseAugmentation: false,
      },
      data,
    );
    await expect(run).rejects.toThrow(DivergenceError);
    await expect(run).rejects.toThrow(/member \d diverged at step 0/);
    expect(tf.memory().numTensors).toBe(before);
  });

  it("trains a population end to end on real MNIST digits without leaking tensors", async () => {
    const data = await loadBuiltInDataset("mnist", {
      fashionMnistDir: "/nowhere",
      maxTrain: 400,
      maxTest: 200,
    });
    expect(data.train.count).toBe(400);
    const before = tf.memory().numTensors;
    const tensorsAtProgress: number[] = [];
    const outcome = await trainPopulation(
      {
        model: { kind: "mlp", hidden: [32] },
        population: { ...p, size: 2, everyKSteps: 2 },
        diversity: { mixup: [0, 0.5], labelSmoothing: [0.1], cutmix: [0, 0.5], randomErasing: [0.2] },
        optimizer: { ...o, weightDecay: 5e-4 },
        epochs: 2,
        batchSize: 32,
        baseAugmentation: false,
      },
      data,
      { onProgress: () => tensorsAtProgress.push(tf.memory().numTensors) },
    );
    // Flat across batches: every progress report sees the same number of live tensors.
    expect(tensorsAtProgress.length).toBeGreaterThan(2);
    expect(new Set(tensorsAtProgress).size).toBe(1);
    for (const m of outcome.members) expect(m.accuracy).toBeGreaterThan(0.5);
    expect(outcome.ensembleAccuracy).toBeGreaterThan(0.5);
    expect(outcome.uniformSoup.accuracy).toBeGreaterThan(0.3);
    expect(outcome.greedySoup.ingredients.length).toBeGreaterThanOrEqual(1);
    for (const m of [
      ...outcome.members.map((x) => x.model),
      outcome.uniformSoup.model,
      outcome.greedySoup.model,
    ]) {
      m.dispose();
    }
    expect(tf.memory().numTensors).toBe(before);
  });
});

describe("resuming a training run", () => {
  it("continues from a saved epoch to exactly the weights of an uninterrupted run", async () => {
    const data = await loadBuiltInDataset("mnist", {
      fashionMnistDir: "/nowhere",
      maxTrain: 200,
      maxTest: 50,
    });
    const spec = {
      model: { kind: "cnn" as const, channels: [2] },
      population: {
        size: 2,
        variant: "papa" as const,
        seed: 3,
        alpha: 0.9,
        everyKSteps: 3,
        lrScaling: "linear" as const,
        everyKEpochs: 1,
      },
      diversity: { mixup: [0, 0.4], labelSmoothing: [0.1], cutmix: [0], randomErasing: [0.3] },
      optimizer: sgd({ lr: 0.05, weightDecay: 1e-4, schedule: "cosine" }),
      epochs: 2,
      batchSize: 32,
      baseAugmentation: true,
    };
    const straight = await trainPopulation(spec, data);
    let saved: TrainingState | undefined;
    const first = await trainPopulation(spec, data, {
      onEpochEnd: async (state) => {
        saved = state;
        throw new Error("worker died");
      },
    }).catch((e: unknown) => e);
    expect((first as Error).message).toBe("worker died");
    expect(saved?.epochs).toBe(1);
    const resumed = await trainPopulation(spec, data, { resume: saved });
    expect(snapshot(resumed.members.map((m) => m.model))).toEqual(
      snapshot(straight.members.map((m) => m.model)),
    );
    expect(resumed.members.map((m) => m.accuracy)).toEqual(straight.members.map((m) => m.accuracy));
    for (const o of [straight, resumed]) {
      for (const m of [...o.members.map((x) => x.model), o.uniformSoup.model, o.greedySoup.model])
        m.dispose();
    }
  });
});

describe("model zoo", () => {
  it("builds the CIFAR ResNet-20 (about 0.27M parameters) and serialises it to a TF.js topology", () => {
    const model = buildModel({ kind: "resnet20" }, [32, 32, 3], 10, 1);
    expect(model.countParams()).toBeGreaterThan(270_000);
    expect(model.countParams()).toBeLessThan(280_000);
    expect(model.layers.filter((l) => l.getClassName() === "Add")).toHaveLength(9);
    const out = model.predict(tf.zeros([2, 32, 32, 3])) as tf.Tensor;
    expect(out.shape).toEqual([2, 10]);
    out.dispose();
    expect(namedWeights(model).map((w) => w.name)).toContain("s2_b0_proj_conv/kernel");
    model.dispose();
  });

  it.each<[string, ModelSpec, [number, number, number], number]>([
    ["an MLP", { kind: "mlp", hidden: [300, 100] }, [28, 28, 1], 10],
    ["a CNN", { kind: "cnn", channels: [32, 64] }, [28, 28, 1], 10],
    ["a CNN on odd sizes", { kind: "cnn", channels: [8, 16, 24] }, [15, 9, 3], 7],
    ["ResNet-20", { kind: "resnet20" }, [32, 32, 3], 10],
    ["ResNet-20 on odd sizes", { kind: "resnet20" }, [9, 11, 1], 4],
  ])("counts the parameters of %s without building it, as TF.js does", (_name, spec, shape, classes) => {
    const model = buildModel(spec, shape, classes, 1);
    expect(modelSize(spec, shape, classes).parameters).toBe(model.countParams());
    model.dispose();
  });

  it("saves its BatchNorm and Conv2D layers as TF.js's own, which load and predict the same", async () => {
    const model = buildModel({ kind: "cnn", channels: [4] }, [8, 8, 1], 3, 2);
    const topology = model.toJSON(undefined, false) as unknown as {
      config: { layers: { class_name: string }[] };
    };
    expect(topology.config.layers.map((l) => l.class_name)).toEqual(
      expect.arrayContaining(["Conv2D", "BatchNormalization"]),
    );
    const loaded = await tf.models.modelFromJSON(topology as never);
    loaded.setWeights(model.getWeights());
    const x = tf.randomUniform([2, 8, 8, 1], 0, 1, "float32", 5);
    const [a, b] = [model, loaded].map((m) => m.predict(x) as tf.Tensor);
    expect(Array.from(await (b as tf.Tensor).data())).toEqual(Array.from(await (a as tf.Tensor).data()));
    tf.dispose([x, a as tf.Tensor, b as tf.Tensor]);
    model.dispose();
    loaded.dispose();
  });

  it("trains its conv layers without computing the gradient of the images", async () => {
    // One input gradient per conv layer but the first: TF.js's fused conv op computes all of them.
    for (const [channels, inputGradients] of [
      [[4], 0],
      [[4, 4], 1],
    ] as const) {
      const model = buildModel({ kind: "cnn", channels: [...channels] }, [8, 8, 1], 3, 1);
      const trainable = model.trainableWeights.map((w) => w.read() as tf.Variable);
      const optimizer = new MemberOptimizer(sgd(), trainable);
      const info = await tf.profile(() => {
        const x = tf.randomUniform([2, 8, 8, 1], 0, 1, "float32", 1);
        const y = tf.tidy(() => tf.oneHot([0, 2], 3).toFloat());
        trainStep(logitsModel(model), trainable, optimizer, x, y, 0.1).dispose();
      });
      const names = info.kernels.map((k) => k.name);
      expect(names).toContain("Conv2DBackpropFilter");
      expect(names.filter((name) => name === "Conv2DBackpropInput")).toHaveLength(inputGradients);
      optimizer.dispose();
      model.dispose();
    }
  });
});

describe("member optimizers", () => {
  it("SGD with Nesterov momentum and weight decay, and AdamW, match their definitions", () => {
    const p = tf.variable(tf.tensor1d([1, 2]));
    const opt = new MemberOptimizer(sgd({ weightDecay: 0.1 }), [p]);
    opt.step([tf.tensor1d([0.5, -1])], 0.1);
    // d = g + wd p = [0.6, -0.8]; buf = d; direction = d + 0.9 buf = 1.9 d; p -= 0.1 x 1.9 d
    expectClose(Array.from(p.dataSync()), [1 - 0.114, 2 + 0.152]);
    opt.dispose();

    const q = tf.variable(tf.tensor1d([1, 2]));
    const adamw = new MemberOptimizer(sgd({ kind: "adamw", weightDecay: 0.01 }), [q]);
    adamw.step([tf.tensor1d([0.5, -1])], 0.1);
    // first step: m_hat = g, v_hat = g^2, update = g / |g| = sign(g); decoupled decay first
    expectClose(Array.from(q.dataSync()), [1 * (1 - 0.001) - 0.1, 2 * (1 - 0.001) + 0.1]);
    adamw.dispose();
  });
});

describe("backends and datasets", () => {
  it("selects a forced backend, or the fastest that loads", async () => {
    await expect(selectBackend({ forced: "tensorflow" })).rejects.toThrow(BackendError);
    expect(await selectBackend()).toBe("wasm"); // tfjs-node cannot be installed here
    expect(await selectBackend({ forced: "cpu" })).toBe("cpu");
  });

  it("parses IDX files, plain or gzipped, and refuses malformed ones", () => {
    const images = Buffer.concat([
      Buffer.from([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 2]),
      Buffer.from([0, 255, 51, 102, 1, 2, 3, 4]),
    ]);
    const labels = Buffer.concat([Buffer.from([0, 0, 8, 1, 0, 0, 0, 2]), Buffer.from([7, 3])]);
    const { split, shape } = idxSplit(gzipSync(images), labels);
    expect(shape).toEqual([2, 2, 1]);
    expect(Array.from(split.y)).toEqual([7, 3]);
    expect(split.x[1]).toBe(1);
    expect(split.x[2]).toBeCloseTo(0.2, 6);
    expect(() => idxSplit(Buffer.from([1, 2, 3, 4]), labels)).toThrow(DatasetError);
    expect(() => idxSplit(images.subarray(0, images.length - 1), labels)).toThrow("dimensions say");
    expect(() => idxSplit(images, Buffer.from([0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3]))).toThrow(
      "2 images but 3 labels",
    );
  });

  it("describes the built-in datasets as they load", async () => {
    const mnist = await loadBuiltInDataset("mnist", { fashionMnistDir: "" });
    expect({
      shape: mnist.shape,
      classes: mnist.classes,
      trainCount: mnist.train.count,
      testCount: mnist.test.count,
      natural: false,
    }).toEqual(BUILT_IN_DESCRIPTIONS.mnist);
  });

  it("names the missing files of a dataset that is not installed", async () => {
    await expect(loadBuiltInDataset("fashion-mnist", { fashionMnistDir: "/nowhere" })).rejects.toThrow(
      "/nowhere/train-images-idx3-ubyte",
    );
  });

  it("finds Fashion-MNIST installed only where all four files are, plain or gzipped", async () => {
    const dir = await mkdtemp(join(tmpdir(), "papa-fashion-"));
    try {
      expect(await installedDatasets(dir)).toEqual(["mnist"]);
      await writeFile(join(dir, "train-images-idx3-ubyte.gz"), "");
      await writeFile(join(dir, "train-labels-idx1-ubyte"), "");
      await writeFile(join(dir, "t10k-images-idx3-ubyte.gz"), "");
      expect(await installedDatasets(dir)).toEqual(["mnist"]);
      await writeFile(join(dir, "t10k-labels-idx1-ubyte.gz"), "");
      expect(await installedDatasets(dir)).toEqual(["mnist", "fashion-mnist"]);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
