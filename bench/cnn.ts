/**
 * The Fashion-MNIST CNN experiment of issue 6: conv 3x3 32 (BN, ReLU, maxpool 2) -> conv 3x3 64
 * (BN, ReLU, maxpool 2) -> dense 10; population 5; the diversity sets of PAPA.md; SGD momentum
 * 0.9 Nesterov, lr 0.05 cosine to 1e-4, weight decay 5e-4, batch 128; `independent`, `papa`
 * (alpha 0.99 every 10 steps), `papa-all` and `papa-2` (every 2 epochs). Prints the table and
 * the wall time. The run is the full 60k training set for 8 epochs (the default).
 *
 * usage: npm run bench:cnn [-- MAX_TRAIN [EPOCHS [VARIANTS [LR [WARMUP_STEPS [SEED]]]]]]
 *   e.g. -- 6000 4 independent,papa 0.05 100
 * LR defaults to the 0.05; WARMUP_STEPS defaults to one epoch of steps: without warm-up
 * (0), that rate makes this CNN's first steps blow up and members collapse to one class (PyTorch
 * too: loss 2.6 -> 11.6 -> 21, then chance).
 * Reads PAPA_FASHION_MNIST_DIR (default /usr/share/datasets/fashion-mnist); PAPA_BACKEND forces
 * a backend.
 */
import { selectBackend } from "../src/ml/backend.js";
import { loadBuiltInDataset } from "../src/ml/datasets.js";
import { type Progress, type TrainingSpec, trainPopulation, type Variant } from "../src/ml/population.js";
import { printTableHeader, printTableRow } from "./table.js";

const maxTrain = Number(process.argv[2] ?? 60_000);
const epochs = Number(process.argv[3] ?? 8);
const variants = (process.argv[4] ?? "independent,papa,papa-all,papa-2").split(",") as Variant[];
const lr = Number(process.argv[5] ?? 0.05);
const seed = Number(process.argv[7] ?? 1);
const batchSize = 128;

function spec(variant: Variant, warmupSteps: number): TrainingSpec {
  return {
    model: { kind: "cnn", channels: [32, 64] },
    population: {
      size: 5,
      variant,
      seed,
      alpha: 0.99,
      everyKSteps: 10,
      lrScaling: "linear",
      everyKEpochs: 2,
    },
    diversity: {
      mixup: [0, 0.5, 1.0],
      labelSmoothing: [0, 0.05, 0.1],
      cutmix: [0, 0.5, 1.0],
      randomErasing: [0, 0.15, 0.35],
    },
    optimizer: {
      kind: "sgd",
      lr,
      momentum: 0.9,
      nesterov: true,
      weightDecay: 5e-4,
      schedule: "cosine",
      minLr: 1e-4,
      warmupSteps,
    },
    epochs,
    batchSize,
    baseAugmentation: false,
  };
}

const backend = await selectBackend({ forced: process.env.PAPA_BACKEND as "wasm" | undefined });
const data = await loadBuiltInDataset("fashion-mnist", {
  fashionMnistDir: process.env.PAPA_FASHION_MNIST_DIR ?? "/usr/share/datasets/fashion-mnist",
  maxTrain,
  maxTest: 10_000,
});
const warmupSteps = Number(process.argv[6] ?? Math.ceil(data.train.count / batchSize));
console.log(
  `# fashion-mnist CNN: ${data.train.count} train, ${data.test.count} test examples, ${epochs} epochs, population 5, lr ${lr}, warm-up ${warmupSteps} steps, seed ${seed}, backend ${backend}`,
);
const started = performance.now();
printTableHeader();
for (const variant of variants) {
  // Progress on stderr, once per epoch: a full run takes hours.
  let reported = -1;
  const onProgress = ({ epoch, step, steps, examplesPerSecond }: Progress) => {
    if (epoch === reported) return;
    reported = epoch;
    process.stderr.write(
      `# ${variant}: epoch ${epoch + 1} of ${epochs}, step ${step} of ${steps}, ${examplesPerSecond.toFixed(0)} examples/s\n`,
    );
  };
  printTableRow(variant, await trainPopulation(spec(variant, warmupSteps), data, { onProgress }));
}
console.log(`wall ${((performance.now() - started) / 1000).toFixed(0)} s`);
