/**
 * Training speed (issue 6): one training step of ours (the same `trainStep` jobs run) against
 * PyTorch (Debian's python3-torch, bench/torch_step.py) with the same model, batch 128, SGD
 * Nesterov with weight decay, and the same thread count, in one run.
 * - mlp: 784-512-256-10
 * - cnn: conv 3x3 32 (BN, ReLU, maxpool 2) -> conv 3x3 64 (BN, ReLU, maxpool 2) -> dense 10
 *
 * Needs Debian's python3-torch with an optimised BLAS: apt-get install python3-torch
 * libopenblas0-pthread (with only the reference libblas3, PyTorch's MLP step is ~17x slower).
 * Our wasm backend runs one thread (see the README), so PyTorch gets one thread too.
 *
 * Then, ours alone, what a training's evaluation repeats: a test evaluation (inference in batches
 * of 256) and a BatchNorm re-estimation (CALIBRATION_BATCHES batches of 128), medians of ROUNDS.
 *
 * usage: npm run bench:speed [-- --backend wasm|cpu] [--steps N] [--rounds R] [--profile] [--models mlp,cnn]
 * --profile prints where our time goes, by kernel. Ends with two lines per model:
 *   mlp step_ms ours=.. torch=.. ratio=..
 *   mlp evaluate_ms_per_1k=.. reestimate_ms=..
 */
import { execFileSync } from "node:child_process";
import { parseArgs } from "node:util";
import * as tf from "@tensorflow/tfjs";
import { reestimateBatchNorm } from "../src/ml/averaging.js";
import { type BackendName, selectBackend } from "../src/ml/backend.js";
import { evaluate } from "../src/ml/evaluation.js";
import { buildModel, logitsModel, type ModelSpec } from "../src/ml/models.js";
import { MemberOptimizer } from "../src/ml/optimizer.js";
import { CALIBRATION_BATCHES } from "../src/ml/population.js";
import { trainStep } from "../src/ml/step.js";
import { median } from "./stats.js";

const { values } = parseArgs({
  options: {
    backend: { type: "string", default: "wasm" },
    steps: { type: "string", default: "20" },
    models: { type: "string", default: "mlp,cnn" },
    profile: { type: "boolean", default: false },
    rounds: { type: "string", default: "3" },
  },
});
const steps = Number(values.steps);
const models: Record<string, ModelSpec> = {
  mlp: { kind: "mlp", hidden: [512, 256] },
  cnn: { kind: "cnn", channels: [32, 64] },
};
const BATCH = 128;
/** Steps run before measuring: V8 moves our wasm loops to its optimising tier only after they have run a while. */
const WARMUP = 10;
/** Examples of a timed test evaluation. */
const EVALUATED = 2048;

const backend = await selectBackend({ forced: values.backend as BackendName });
const threads = backend === "wasm" ? wasmThreads() : 1;
console.log(
  `backend ${backend}, ${threads} thread(s), batch ${BATCH}, median of ${steps} steps after ${WARMUP} warm-up steps`,
);

function wasmThreads(): number {
  const wasm = tf.backend() as unknown as { wasm?: { _getThreadsCount?: () => number } };
  return wasm.wasm?._getThreadsCount?.() ?? 1;
}

/** `count` 28x28 images of a fixed pattern, values in [0, 1]. */
function images(count: number): Float32Array {
  return new Float32Array(count * 784).map((_, i) => ((i * 7919) % 256) / 255);
}

/**
 * Our step on one model: `measure()` gives the median of `steps` steps, `evaluation()` the times
 * of a test evaluation (per 1k examples) and of a BatchNorm re-estimation; `dispose()` frees it.
 */
async function ours(spec: ModelSpec) {
  const model = buildModel(spec, [28, 28, 1], 10, 1);
  const logits = logitsModel(model);
  const trainable = model.trainableWeights.map((w) => w.read() as tf.Variable);
  const optimizer = new MemberOptimizer(
    {
      kind: "sgd",
      lr: 0.05,
      momentum: 0.9,
      nesterov: true,
      weightDecay: 5e-4,
      schedule: "constant",
      minLr: 0,
      warmupSteps: 0,
    },
    trainable,
  );
  const x = images(BATCH);
  const y = new Float32Array(BATCH * 10).fill(0.1);
  const step = () => {
    const loss = trainStep(
      logits,
      trainable,
      optimizer,
      tf.tensor4d(x, [BATCH, 28, 28, 1]),
      tf.tensor2d(y, [BATCH, 10]),
      0.05,
    );
    loss.dataSync(); // wait for the step
    loss.dispose();
  };
  for (let i = 0; i < WARMUP; i++) step();
  if (values.profile) {
    const info = await tf.profile(step);
    const byKernel = new Map<string, number>();
    for (const k of info.kernels) byKernel.set(k.name, (byKernel.get(k.name) ?? 0) + Number(k.kernelTimeMs));
    const total = [...byKernel.values()].reduce((a, b) => a + b, 0);
    for (const [name, ms] of [...byKernel].sort((a, b) => b[1] - a[1]).slice(0, 12)) {
      console.log(
        `  ${name.padEnd(24)} ${ms.toFixed(2).padStart(8)} ms  ${((100 * ms) / total).toFixed(1)}%`,
      );
    }
  }
  const examples = {
    x: images(EVALUATED),
    y: new Int32Array(EVALUATED).map((_, i) => i % 10),
    count: EVALUATED,
  };
  const calibration = Array.from({ length: CALIBRATION_BATCHES }, (_, b) =>
    tf.tensor4d(examples.x.subarray(b * BATCH * 784, (b + 1) * BATCH * 784), [BATCH, 28, 28, 1]),
  );
  const timed = (f: () => unknown) => {
    const start = performance.now();
    f();
    return performance.now() - start;
  };
  return {
    evaluation: () => ({
      evaluate: (1000 * timed(() => evaluate(model, examples, [28, 28, 1]))) / EVALUATED,
      reestimate: timed(() => reestimateBatchNorm(model, calibration)),
    }),
    measure: () => {
      const times: number[] = [];
      for (let i = 0; i < steps; i++) {
        const start = performance.now();
        step();
        times.push(performance.now() - start);
      }
      return median(times);
    },
    dispose: () => {
      tf.dispose(calibration);
      optimizer.dispose();
      model.dispose();
    },
  };
}

function torchMs(name: string): number {
  const out = execFileSync(
    "/usr/bin/python3",
    ["bench/torch_step.py", name, String(threads), String(steps), String(WARMUP)],
    {
      encoding: "utf8",
    },
  );
  const match = /step_ms=([\d.]+)/.exec(out);
  if (!match) throw new Error(`bench/torch_step.py printed: ${out}`);
  return Number(match[1]);
}

// This machine's speed drifts between runs (shared host): ours and PyTorch alternate, ROUNDS
// times, and each side's median over the rounds is compared.
const ROUNDS = Number(values.rounds);
const lines: string[] = [];
for (const name of values.models.split(",")) {
  const spec = models[name];
  if (!spec) throw new Error(`unknown model ${name}; known: ${Object.keys(models).join(", ")}`);
  const mine = await ours(spec);
  const oursRounds: number[] = [];
  const torchRounds: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    oursRounds.push(mine.measure());
    torchRounds.push(torchMs(name));
    console.log(
      `${name} round ${r + 1}: ours ${oursRounds.at(-1)?.toFixed(1)} ms, torch ${torchRounds.at(-1)?.toFixed(1)} ms`,
    );
  }
  const evaluations = Array.from({ length: ROUNDS }, () => mine.evaluation());
  mine.dispose();
  const o = median(oursRounds);
  const t = median(torchRounds);
  lines.push(`${name} step_ms ours=${o.toFixed(1)} torch=${t.toFixed(1)} ratio=${(o / t).toFixed(2)}`);
  lines.push(
    `${name} evaluate_ms_per_1k=${median(evaluations.map((e) => e.evaluate)).toFixed(0)} ` +
      `reestimate_ms=${median(evaluations.map((e) => e.reestimate)).toFixed(0)}`,
  );
}
console.log("");
for (const line of lines) console.log(line);
