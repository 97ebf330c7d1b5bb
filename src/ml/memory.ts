import type { ModelSpec } from "./models.js";
import type { TrainingSpec } from "./population.js";

/** A model's size: parameters, and activations one example leaves for the backward pass. */
interface ModelSize {
  parameters: number;
  activationsPerExample: number;
}

/**
 * Counts what `buildModel` builds, layer by layer, without building it (the API process does
 * not load TensorFlow.js). BatchNorm counts its moving statistics with its parameters.
 */
export function modelSize(spec: ModelSpec, shape: [number, number, number], classes: number): ModelSize {
  let [h, w, c] = shape;
  let parameters = 0;
  let activations = h * w * c;
  const conv = (filters: number, kernel: number, strides: number) => {
    parameters += c * filters * kernel * kernel + 4 * filters; // conv without bias, BatchNorm
    h = Math.ceil(h / strides);
    w = Math.ceil(w / strides);
    c = filters;
    activations += 3 * h * w * c; // conv, BatchNorm, ReLU outputs
  };
  if (spec.kind === "mlp") {
    let width = h * w * c;
    for (const units of spec.hidden) {
      parameters += width * units + units;
      activations += 2 * units; // dense, ReLU
      width = units;
    }
    c = width;
    h = 1;
    w = 1;
  } else if (spec.kind === "cnn") {
    for (const filters of spec.channels) {
      conv(filters, 3, 1);
      h = Math.floor(h / 2);
      w = Math.floor(w / 2);
      activations += h * w * c; // max pooling
    }
  } else {
    conv(16, 3, 1);
    for (const [stage, filters] of [16, 32, 64].entries()) {
      for (let block = 0; block < 3; block++) {
        const strides = stage > 0 && block === 0 ? 2 : 1;
        const inChannels = c;
        conv(filters, 3, strides);
        conv(filters, 3, 1);
        if (strides !== 1) {
          parameters += inChannels * filters + 4 * filters; // 1x1 projection, BatchNorm
          activations += 2 * h * w * c;
        }
        activations += 2 * h * w * c; // add, ReLU
      }
    }
    h = 1;
    w = 1;
  }
  parameters += h * w * c * classes + classes;
  activations += 2 * classes; // logits, softmax
  return { parameters, activationsPerExample: activations };
}

export interface TrainingMemory {
  /** The whole estimate, in bytes. */
  bytes: number;
  /** Its parts: the population's weights and optimizer state, the step's, the data, the copies. */
  parts: Record<"population" | "step" | "data" | "copies", number>;
}

/**
 * An estimate of the memory a training takes at its peak, in bytes (float32 everywhere):
 * - population: every member's weights and optimizer state (1 moment for SGD, 2 for AdamW);
 * - step: one member's step at a time - its gradients, the population mean of a PAPA average,
 *   and the activations of a batch, kept for the backward pass and their gradients (x 2);
 * - data: the training and test images as float32;
 * - copies: the population once more when an epoch's state is saved, and the two soups.
 */
export function estimateTrainingMemory(
  spec: Pick<TrainingSpec, "model" | "population" | "optimizer" | "batchSize">,
  data: { shape: [number, number, number]; classes: number; examples: number },
): TrainingMemory {
  const { parameters, activationsPerExample } = modelSize(spec.model, data.shape, data.classes);
  const moments = spec.optimizer.kind === "adamw" ? 2 : 1;
  const perMember = parameters * (1 + moments);
  const p = spec.population.size;
  const parts = {
    population: 4 * p * perMember,
    step: 4 * (2 * parameters + 2 * spec.batchSize * activationsPerExample),
    data: 4 * data.examples * (data.shape[0] * data.shape[1] * data.shape[2] + 1),
    copies: 4 * (p * perMember + 2 * parameters),
  };
  return { bytes: Object.values(parts).reduce((a, b) => a + b, 0), parts };
}
