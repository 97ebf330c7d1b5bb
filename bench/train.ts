/**
 * Training benchmark (issue 4).
 * 1. Overhead: seconds per epoch of a `papa` population (pull every 10 steps) against the same
 *    population trained `independent`, same backend, same run. Goal: at most 3% overhead.
 * 2. Does it work: the four variants with the same model and budget; members' mean/min/max test
 *    accuracy, ensemble, uniform soup, greedy soup.
 *
 * usage: npm run bench:train [-- DATASET [MAX_TRAIN [EPOCHS [ALPHA [EVERY_K_STEPS]]]]]
 *        (default: mnist 8000 4 0.99 10)
 * DATASET fashion-mnist reads PAPA_FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist).
 */
import { papaPull } from "../src/ml/averaging.js";
import { selectBackend } from "../src/ml/backend.js";
import { type BuiltInDataset, loadBuiltInDataset } from "../src/ml/datasets.js";
import { buildModel } from "../src/ml/models.js";
import { type TrainingSpec, trainPopulation, type Variant } from "../src/ml/population.js";
import { printTableHeader, printTableRow } from "./table.js";

const dataset = (process.argv[2] ?? "mnist") as BuiltInDataset;
const maxTrain = Number(process.argv[3] ?? 8000);
const epochs = Number(process.argv[4] ?? 4);
const alpha = Number(process.argv[5] ?? 0.99);
const everyKSteps = Number(process.argv[6] ?? 10);

function spec(variant: Variant, epochCount: number): TrainingSpec {
  return {
    model: { kind: "mlp", hidden: [256, 128] },
    population: {
      size: 4,
      variant,
      seed: 1,
      alpha,
      everyKSteps,
      lrScaling: "linear",
      everyKEpochs: 2,
    },
    diversity: { mixup: [0, 0.5], labelSmoothing: [0, 0.1], cutmix: [0], randomErasing: [0, 0.15] },
    optimizer: {
      kind: "sgd",
      lr: 0.05,
      momentum: 0.9,
      nesterov: true,
      weightDecay: 5e-4,
      schedule: "cosine",
      minLr: 1e-4,
      warmupSteps: 0,
    },
    epochs: epochCount,
    batchSize: 128,
    baseAugmentation: false,
  };
}

async function main(): Promise<void> {
  const backend = await selectBackend();
  const data = await loadBuiltInDataset(dataset, {
    fashionMnistDir: process.env.PAPA_FASHION_MNIST_DIR ?? "/usr/share/datasets/fashion-mnist",
    maxTrain,
    maxTest: 5000,
  });
  console.log(
    `# ${dataset}: ${data.train.count} train, ${data.test.count} test examples; backend ${backend}`,
  );

  const perEpoch: Record<string, number> = {};
  for (const variant of ["independent", "papa", "independent", "papa"] as const) {
    const outcome = await trainPopulation(spec(variant, 1), data);
    perEpoch[variant] = Math.min(perEpoch[variant] ?? Number.POSITIVE_INFINITY, outcome.seconds.train);
    for (const m of [
      ...outcome.members.map((x) => x.model),
      outcome.uniformSoup.model,
      outcome.greedySoup.model,
    ])
      m.dispose();
  }
  const overhead = ((perEpoch.papa ?? 0) / (perEpoch.independent ?? 1) - 1) * 100;
  console.log(
    `train overhead papa_s_per_epoch=${perEpoch.papa?.toFixed(2)} independent_s_per_epoch=${perEpoch.independent?.toFixed(2)} overhead=${overhead.toFixed(1)}% (best of 2 each)`,
  );

  // The pull itself, timed alone: its share of a k-step window is the overhead free of epoch noise.
  const population = Array.from({ length: 4 }, (_, j) =>
    buildModel(spec("papa", 1).model, data.shape, data.classes, j + 1),
  );
  const pulls = 50;
  papaPull(population, 0.01);
  const pullStart = performance.now();
  for (let i = 0; i < pulls; i++) papaPull(population, 0.01);
  const pullMs = (performance.now() - pullStart) / pulls;
  const stepMs = ((perEpoch.independent ?? 0) * 1000) / Math.ceil((data.train.count * 0.98) / 128);
  for (const m of population) m.dispose();
  console.log(
    `papa pull_ms=${pullMs.toFixed(2)} population_step_ms=${stepMs.toFixed(1)} every_k_steps=${everyKSteps} ` +
      `overhead=${((100 * pullMs) / (everyKSteps * stepMs)).toFixed(2)}%`,
  );

  printTableHeader();
  for (const variant of ["independent", "papa", "papa-all", "papa-2"] as const) {
    printTableRow(variant, await trainPopulation(spec(variant, epochs), data));
  }
}

await main();
