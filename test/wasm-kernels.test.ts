import * as tf from "@tensorflow/tfjs";
import { beforeAll, describe, expect, it } from "vitest";
import { reestimateBatchNorm } from "../src/ml/averaging.js";
import { selectBackend } from "../src/ml/backend.js";
import { buildModel } from "../src/ml/models.js";
import { MemberOptimizer } from "../src/ml/optimizer.js";
import { seededRandom } from "../src/random.js";

/** Deterministic values in [-1, 1). */
function values(n: number, seed: number): Float32Array {
  const random = seededRandom(seed);
  return Float32Array.from({ length: n }, () => random() * 2 - 1);
}

interface Input {
  shape: number[];
  seed: number;
  /** Added to every value (a variance must be positive). */
  plus?: number;
}

/** Runs one kernel on a backend, from fresh inputs, and reads the result back. */
async function runOn(
  backend: "wasm" | "cpu",
  kernel: string,
  inputs: Record<string, Input>,
  attrs: object,
): Promise<{ shape: number[]; data: Float32Array }> {
  await tf.setBackend(backend);
  const tensors = Object.fromEntries(
    Object.entries(inputs).map(([name, { shape, seed, plus = 0 }]) => [
      name,
      tf.tensor(
        values(tf.util.sizeFromShape(shape), seed).map((v) => v + plus),
        shape,
      ),
    ]),
  );
  const out = tf.engine().runKernel(kernel, tensors as never, attrs as never) as tf.Tensor;
  const result = { shape: out.shape, data: (await out.data()) as Float32Array };
  out.dispose();
  for (const t of Object.values(tensors)) t.dispose();
  return result;
}

/** Our wasm kernel's result equals the cpu backend's, within float32 rounding of the sums. */
async function expectSameAsCpu(kernel: string, inputs: Record<string, Input>, attrs: object) {
  const wasm = await runOn("wasm", kernel, inputs, attrs);
  const cpu = await runOn("cpu", kernel, inputs, attrs);
  expect(wasm.shape).toEqual(cpu.shape);
  let worst = 0;
  for (let i = 0; i < cpu.data.length; i++) {
    worst = Math.max(worst, Math.abs((wasm.data[i] as number) - (cpu.data[i] as number)));
  }
  const scale = Math.max(1, ...Array.from(cpu.data, Math.abs));
  expect(worst / scale, `${kernel} ${JSON.stringify(attrs)}`).toBeLessThan(1e-5);
  expect(cpu.data.some((v) => v !== 0)).toBe(true);
}

describe("our wasm kernels agree with the cpu backend", () => {
  beforeAll(async () => {
    await selectBackend({ forced: "wasm" }); // registers the kernels
    await selectBackend({ forced: "cpu" });
  });

  it.each([
    [[5, 7], [7, 3], false, false],
    [[7, 5], [7, 3], true, false],
    [[5, 7], [3, 7], false, true],
    [[7, 5], [3, 7], true, true],
    [[2, 6, 4], [2, 6, 3], true, false],
    [[1, 4, 6], [2, 3, 6], false, true], // broadcast batch
    [[128, 64], [128, 32], true, false],
    // simd.wat's matmul (columns a multiple of 8): rows past a multiple of 4, k in blocks of 256
    [[6, 300], [300, 16], false, false],
    [[300, 7], [300, 8], true, false],
    [[5, 9], [24, 9], false, true],
    [[9, 5], [8, 9], true, true],
    [[1, 600], [600, 8], false, false],
    [[3, 4, 10], [3, 10, 8], false, false],
    [[1, 5, 10], [2, 10, 8], false, false], // broadcast batch
    [[2, 10, 5], [10, 8], true, false], // b without batch
  ])("BatchMatMul %j x %j transposeA=%s transposeB=%s", async (a, b, transposeA, transposeB) => {
    await expectSameAsCpu(
      "BatchMatMul",
      { a: { shape: a, seed: 1 }, b: { shape: b, seed: 2 } },
      {
        transposeA,
        transposeB,
      },
    );
  });

  const convCases: [number[], number[], number, unknown][] = [
    [[1, 7, 7, 3], [3, 3, 3, 4], 1, "same"],
    [[2, 7, 7, 3], [3, 3, 3, 4], 1, "valid"],
    [[2, 8, 9, 2], [3, 3, 2, 5], 2, "same"],
    [[1, 9, 8, 2], [3, 2, 2, 3], 2, "valid"],
    [[2, 6, 6, 3], [2, 2, 3, 4], 1, "same"], // even kernel: asymmetric padding
    [[1, 6, 7, 2], [3, 3, 2, 2], 1, 1], // explicit padding
    [[3, 5, 5, 1], [1, 1, 1, 6], 1, "valid"],
    [[2, 8, 8, 4], [1, 1, 4, 6], 2, "same"], // ResNet-20's projections
    [[1, 10, 10, 4], [3, 3, 4, 8], 2, "same"], // ResNet-20's downsampling convs
    [[1, 11, 10, 2], [3, 3, 2, 3], 3, "valid"], // rows no window reaches
  ];

  /** The shape of dy (the convolution's output) for a case. */
  const dyShape = (x: number[], filter: number[], stride: number, pad: unknown) =>
    tf.backend_util.computeConv2DInfo(x as never, filter as never, stride, 1, pad as never).outShape;

  it.each(convCases)(
    "Conv2DBackpropFilter x=%j filter=%j stride=%d pad=%j",
    async (x, filter, stride, pad) => {
      await expectSameAsCpu(
        "Conv2DBackpropFilter",
        { x: { shape: x, seed: 3 }, dy: { shape: dyShape(x, filter, stride, pad), seed: 4 } },
        { strides: stride, pad, dataFormat: "NHWC", filterShape: filter },
      );
    },
  );

  it.each(convCases)(
    "Conv2DBackpropInput x=%j filter=%j stride=%d pad=%j",
    async (x, filter, stride, pad) => {
      await expectSameAsCpu(
        "Conv2DBackpropInput",
        { dy: { shape: dyShape(x, filter, stride, pad), seed: 5 }, filter: { shape: filter, seed: 6 } },
        { strides: stride, pad, dataFormat: "NHWC", inputShape: x },
      );
    },
  );

  it.each([
    [
      [2, 1, 3],
      [2, 3, 1],
    ],
    [
      [1, 1, 1, 4],
      [2, 3, 3, 1],
    ],
    [[5], [3]],
    [
      [2, 3],
      [1, 4],
    ],
  ])("Tile %j by %j", async (shape, reps) => {
    await expectSameAsCpu("Tile", { x: { shape, seed: 7 } }, { reps });
  });

  it.each([
    ["Sum", [4, 3, 5], [0], false],
    ["Sum", [4, 3, 5], [0, 1], true],
    ["Sum", [4, 3, 5], [1], false], // not leading: wasm's own kernel
    ["Sum", [128, 28, 28, 8], [0, 1, 2], false],
    ["Mean", [4, 3, 5], [0, 1], false],
    ["Mean", [2, 6, 6, 3], [0, 1, 2], true],
    ["Mean", [4, 3, 5], [2], false],
  ])("%s of %j over %j keepDims=%s", async (kernel, shape, axis, keepDims) => {
    await expectSameAsCpu(kernel as string, { x: { shape: shape as number[], seed: 8 } }, { axis, keepDims });
  });

  it.each([
    [[2, 6, 6, 3], 2, 2, "valid"],
    [[1, 7, 7, 2], 3, 2, "same"],
    [[1, 5, 5, 1], 2, 1, "valid"], // overlapping windows
    // channels a multiple of 4: simd.wat; others: JS
    [[2, 6, 6, 4], 2, 2, "valid"],
    [[1, 7, 7, 8], 3, 2, "same"],
    [[1, 5, 5, 4], 2, 1, "valid"],
    [[3, 9, 7, 12], 3, 3, "same"],
  ])("MaxPoolGrad input=%j filter=%d stride=%d pad=%s", async (shape, filterSize, stride, pad) => {
    const attrs = { filterSize, strides: stride, pad };
    const inShape = shape as [number, number, number, number];
    const { outShape } = tf.backend_util.computePool2DInfo(inShape, filterSize, stride, 1, pad as "same");
    // MaxPoolGrad also takes the pooled output (the cpu backend reads it), pooled on each backend.
    const runWithOutput = async (backend: "wasm" | "cpu") => {
      await tf.setBackend(backend);
      const input = tf.tensor4d(values(tf.util.sizeFromShape(shape), 9), inShape);
      const output = tf.maxPool(input, filterSize, stride, pad as "same" | "valid");
      const dy = tf.tensor(values(tf.util.sizeFromShape(outShape), 10), outShape);
      const dx = tf
        .engine()
        .runKernel("MaxPoolGrad", { dy, input, output } as never, attrs as never) as tf.Tensor;
      const data = (await dx.data()) as Float32Array;
      tf.dispose([input, output, dy, dx]);
      return data;
    };
    const wasm = await runWithOutput("wasm");
    const cpu = await runWithOutput("cpu");
    // Overlapping windows add several dy into one dx: cpu sums in float64, we in float32.
    for (const [i, v] of cpu.entries()) expect(wasm[i]).toBeCloseTo(v, 6);
  });

  it.each([[[3, 5, 5, 8]], [[7, 4]]])(
    "fused BatchNorm of %j: outputs and gradients through y, mean and variance as cpu's moments + batchNorm",
    async (shape) => {
      const channels = shape.at(-1) as number;
      const run = async (backend: "wasm" | "cpu") => {
        await tf.setBackend(backend);
        const x = tf.tensor(values(tf.util.sizeFromShape(shape), 21), shape);
        const gamma = tf.tensor1d(values(channels, 22));
        const beta = tf.tensor1d(values(channels, 23));
        const [wy, wm, wv] = [24, 25, 26].map((seed, i) =>
          tf.tensor(values(i === 0 ? x.size : channels, seed), i === 0 ? shape : [channels]),
        );
        const f = (x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) => {
          let [y, mean, variance]: tf.Tensor[] = [];
          if (backend === "wasm") {
            [y, mean, variance] = tf
              .engine()
              .runKernel(
                "PapaBatchNormTraining",
                { x, gamma, beta } as never,
                { epsilon: 1e-3 } as never,
              ) as tf.Tensor[];
          } else {
            ({ mean, variance } = tf.moments(
              x,
              shape.slice(0, -1).map((_, i) => i),
            ));
            y = tf.batchNorm(x, mean, variance, beta, gamma, 1e-3);
          }
          const terms = [
            tf.mul(y as tf.Tensor, wy as tf.Tensor),
            tf.mul(mean as tf.Tensor, wm as tf.Tensor),
            tf.mul(variance as tf.Tensor, wv as tf.Tensor),
          ];
          return tf.addN(terms.map((t) => tf.sum(t))) as tf.Scalar;
        };
        const { value, grads } = tf.valueAndGrads(f)([x, gamma, beta]);
        const out = [
          Array.from(await value.data()),
          ...(await Promise.all(grads.map(async (g) => Array.from(await g.data())))),
        ];
        tf.dispose([x, gamma, beta, wy, wm, wv, value, ...grads] as tf.Tensor[]);
        return out;
      };
      const wasm = await run("wasm");
      const cpu = await run("cpu");
      expect(wasm.length).toBe(4); // loss, dx, dgamma, dbeta
      for (const [i, g] of cpu.entries()) {
        const scale = Math.max(...g.map(Math.abs));
        const worst = Math.max(...g.map((v, j) => Math.abs(v - (wasm[i]?.[j] ?? Number.NaN))));
        expect(worst / scale).toBeLessThan(1e-4);
      }
    },
  );

  it.each([
    [[3, 5, 5, 8], [8], true],
    [[7, 4], [4], false], // no offset, no scale
    [[2, 3, 8], [1, 1, 8], true],
    // wasm's own kernel: channels not a multiple of 4, statistics not one per channel
    [[2, 4, 4, 6], [6], true],
    [[2, 3, 8], [1], true],
  ])("FusedBatchNorm (inference) of %j with statistics %j, offset and scale %s", async (x, stats, affine) => {
    await expectSameAsCpu(
      "FusedBatchNorm",
      {
        x: { shape: x, seed: 27 },
        mean: { shape: stats, seed: 28 },
        variance: { shape: stats, seed: 29, plus: 1.5 },
        ...(affine ? { offset: { shape: stats, seed: 30 }, scale: { shape: stats, seed: 31 } } : {}),
      },
      { varianceEpsilon: 1e-3 },
    );
  });

  it("re-estimates the CNN's BatchNorm statistics as the cpu backend does, layer after layer", async () => {
    const run = async (backend: "wasm" | "cpu") => {
      await tf.setBackend(backend);
      const model = buildModel({ kind: "cnn", channels: [8, 16] }, [12, 12, 1], 10, 3);
      const batches = [0, 1].map((b) =>
        tf.tensor4d(
          values(5 * 144, 40 + b).map((v) => 3 + v),
          [5, 12, 12, 1],
        ),
      );
      reestimateBatchNorm(model, batches);
      const moving = model.nonTrainableWeights.map((w) => Array.from(w.read().dataSync()));
      tf.dispose(batches);
      model.dispose();
      return moving;
    };
    const wasm = await run("wasm");
    const cpu = await run("cpu");
    expect(wasm.length).toBe(4); // 2 BN (moving mean, moving variance)
    for (const [i, want] of cpu.entries()) {
      expect(want.some((v) => Math.abs(v) > 0.01 && Math.abs(v - 1) > 0.01)).toBe(true); // not the initial 0 and 1
      for (const [j, v] of want.entries()) expect(wasm[i]?.[j]).toBeCloseTo(v, 4);
    }
  });

  it("shares an Identity's memory with its input, which lives until both are disposed", async () => {
    await tf.setBackend("wasm");
    const backend = tf.engine().backend;
    const before = backend.numDataIds();
    const a = tf.tensor([1, 2, 3]);
    const b = tf.clone(a); // TF.js's engine runs Identity for every tensor kept for a gradient
    expect(backend.numDataIds()).toBe(before + 1);
    a.dispose();
    expect(Array.from(await b.data())).toEqual([1, 2, 3]);
    b.dispose();
    expect(backend.numDataIds()).toBe(before);
  });

  it.each([true, false])(
    "gives three SGD steps (Nesterov %s) the cpu backend's parameters and momentum",
    async (nesterov) => {
      const run = async (backend: "wasm" | "cpu") => {
        await tf.setBackend(backend);
        // 24 values: the wasm backend's one-pass kernel; 3 (not a multiple of 4): op by op there too
        const params = [
          tf.variable(tf.tensor(values(24, 1), [4, 6])),
          tf.variable(tf.tensor(values(3, 2), [3])),
        ];
        const optimizer = new MemberOptimizer(
          {
            kind: "sgd",
            lr: 0.1,
            momentum: 0.9,
            nesterov,
            weightDecay: 0.01,
            schedule: "constant",
            minLr: 0,
            warmupSteps: 0,
          },
          params,
        );
        for (let step = 0; step < 3; step++) {
          const grads = params.map((p, i) => tf.tensor(values(p.size, 10 + 2 * step + i), p.shape));
          optimizer.step(grads, 0.1 * (step + 1));
          tf.dispose(grads);
        }
        const result = [
          ...params.map((p) => Array.from(p.dataSync())),
          ...optimizer.state().first.map((b) => Array.from(b)),
        ];
        optimizer.dispose();
        tf.dispose(params);
        return result;
      };
      const wasm = await run("wasm");
      const cpu = await run("cpu");
      expect(wasm.length).toBe(4);
      for (const [i, got] of wasm.entries()) {
        for (const [j, want] of (cpu[i] as number[]).entries()) expect(got[j]).toBeCloseTo(want, 6);
      }
    },
  );

  it("trains the CNN on wasm: a conv step gives the cpu backend's gradients", async () => {
    const grads = async (backend: "wasm" | "cpu") => {
      await tf.setBackend(backend);
      const x = tf.tensor4d(values(2 * 8 * 8 * 1, 11), [2, 8, 8, 1]);
      const w1 = tf.variable(tf.tensor4d(values(3 * 3 * 1 * 4, 12), [3, 3, 1, 4]));
      const w2 = tf.variable(tf.tensor4d(values(3 * 3 * 4 * 3, 13), [3, 3, 4, 3]));
      const { grads: g } = tf.variableGrads(() => {
        const h: tf.Tensor4D = tf.maxPool(tf.relu(tf.conv2d(x, w1, 1, "same")), 2, 2, "valid");
        const { mean, variance } = tf.moments(h, [0, 1, 2]);
        const normalised = tf.batchNorm4d(
          h,
          mean as tf.Tensor1D,
          variance as tf.Tensor1D,
          tf.zeros([4]) as tf.Tensor1D,
          tf.ones([4]) as tf.Tensor1D,
          1e-3,
        );
        return tf.sum(tf.square(tf.conv2d(normalised, w2, 2, "same")));
      });
      const out = await Promise.all(Object.values(g).map((t) => t.data()));
      tf.dispose([x, w1, w2, ...Object.values(g)]);
      return out.map((d) => Array.from(d));
    };
    const wasm = await grads("wasm");
    const cpu = await grads("cpu");
    expect(wasm.length).toBe(2);
    for (const [i, g] of cpu.entries()) {
      const scale = Math.max(...g.map(Math.abs));
      const worst = Math.max(...g.map((v, j) => Math.abs(v - (wasm[i]?.[j] ?? Number.NaN))));
      expect(worst / scale).toBeLessThan(1e-4);
    }
  });

  it("gives the CNN of the training jobs the cpu backend's loss, gradients and BatchNorm moving statistics", async () => {
    const run = async (backend: "wasm" | "cpu") => {
      await tf.setBackend(backend);
      const model = buildModel({ kind: "cnn", channels: [8, 16] }, [12, 12, 1], 10, 3);
      const x = tf.tensor4d(values(6 * 144, 14), [6, 12, 12, 1]);
      const y = tf.oneHot(tf.tensor1d([0, 1, 2, 3, 4, 5], "int32"), 10);
      const variables = model.trainableWeights.map((w) => w.read() as tf.Variable);
      const { value, grads } = tf.variableGrads(() => {
        const p = model.apply(x, { training: true }) as tf.Tensor;
        return tf.losses.softmaxCrossEntropy(y, tf.log(tf.clipByValue(p, 1e-7, 1))) as tf.Scalar;
      }, variables);
      const result = {
        loss: (await value.data())[0] as number,
        grads: await Promise.all(
          variables.map(async (v) => Array.from(await (grads[v.name] as tf.Tensor).data())),
        ),
        moving: await Promise.all(
          model.nonTrainableWeights.map(async (w) => Array.from(await w.read().data())),
        ),
      };
      tf.dispose([x, y, value, ...Object.values(grads)]);
      model.dispose();
      return result;
    };
    const wasm = await run("wasm");
    const cpu = await run("cpu");
    expect(wasm.loss).toBeCloseTo(cpu.loss, 5);
    expect(wasm.grads.length).toBe(8); // 2 convs, 2 BN (gamma, beta), dense (kernel, bias)
    expect(wasm.moving.length).toBe(4); // 2 BN (moving mean, moving variance)
    for (const [i, g] of [...cpu.grads, ...cpu.moving].entries()) {
      const scale = Math.max(...g.map(Math.abs));
      const theirs = [...wasm.grads, ...wasm.moving][i] ?? [];
      const worst = Math.max(...g.map((v, j) => Math.abs(v - (theirs[j] ?? Number.NaN))));
      expect(worst / scale).toBeLessThan(1e-4);
    }
  });
});
