import * as tf from "@tensorflow/tfjs";

export interface OptimizerSpec {
  kind: "sgd" | "adamw";
  lr: number;
  momentum: number;
  nesterov: boolean;
  weightDecay: number;
  schedule: "cosine" | "constant";
  minLr: number;
  /** Steps of linear warm-up from lr / warmupSteps to lr, before the schedule starts; 0: none. */
  warmupSteps: number;
}

export interface OptimizerState {
  steps: number;
  first: Float32Array[];
  second: Float32Array[];
}

/**
 * A backend's kernel for one SGD step of one float32 parameter (size a multiple of 4): inputs
 * p, g and buf (the momentum buffer), attrs lr, momentum, weightDecay and nesterov; outputs
 * [p', buf']. The wasm backend has one (wasm-kernels.ts): one pass instead of eight ops.
 */
export const SGD_STEP_KERNEL = "PapaSgdStep";

/**
 * SGD with momentum (PyTorch semantics: weight decay added to the gradient, optional Nesterov)
 * and AdamW (decoupled weight decay), as tf ops on explicit state variables: the state is the
 * member's own, can be saved and restored, and is disposed with `dispose`.
 */
export class MemberOptimizer {
  private readonly first: tf.Variable[];
  private readonly second: tf.Variable[];
  private steps = 0;

  constructor(
    private readonly spec: OptimizerSpec,
    private readonly params: tf.Variable[],
  ) {
    const zeros = () => params.map((p) => tf.tidy(() => tf.variable(tf.zerosLike(p), false)));
    this.first = zeros();
    this.second = spec.kind === "adamw" ? zeros() : [];
  }

  /** Applies one update with learning rate `lr`; `grads` are in the order of the params. */
  step(grads: tf.Tensor[], lr: number): void {
    this.steps++;
    const { momentum: mu, weightDecay: wd, nesterov } = this.spec;
    const fused = this.spec.kind === "sgd" && tf.getKernel(SGD_STEP_KERNEL, tf.getBackend()) !== undefined;
    tf.tidy(() => {
      this.params.forEach((p, i) => {
        const g = grads[i] as tf.Tensor;
        const first = this.first[i] as tf.Variable;
        if (fused && p.dtype === "float32" && p.size % 4 === 0) {
          const [next, buf] = tf
            .engine()
            .runKernel(
              SGD_STEP_KERNEL,
              { p, g, buf: first },
              { lr, momentum: mu, weightDecay: wd, nesterov },
            ) as tf.Tensor[];
          first.assign(buf as tf.Tensor);
          p.assign(next as tf.Tensor);
        } else if (this.spec.kind === "sgd") {
          const d = wd > 0 ? tf.add(g, tf.mul(p, wd)) : g;
          const buf = tf.add(tf.mul(first, mu), d);
          first.assign(buf);
          const direction = this.spec.nesterov ? tf.add(d, tf.mul(buf, mu)) : buf;
          p.assign(tf.sub(p, tf.mul(direction, lr)));
        } else {
          const [b1, b2, eps] = [0.9, 0.999, 1e-8];
          const second = this.second[i] as tf.Variable;
          const m = tf.add(tf.mul(first, b1), tf.mul(g, 1 - b1));
          const v = tf.add(tf.mul(second, b2), tf.mul(tf.square(g), 1 - b2));
          first.assign(m);
          second.assign(v);
          const mHat = tf.div(m, 1 - b1 ** this.steps);
          const vHat = tf.div(v, 1 - b2 ** this.steps);
          const decayed = wd > 0 ? tf.mul(p, 1 - lr * wd) : p;
          p.assign(tf.sub(decayed, tf.mul(tf.div(mHat, tf.add(tf.sqrt(vHat), eps)), lr)));
        }
      });
    });
  }

  /** The state, to save: moment buffers in param order and the step count. */
  state(): OptimizerState {
    return {
      steps: this.steps,
      first: this.first.map((v) => v.dataSync() as Float32Array),
      second: this.second.map((v) => v.dataSync() as Float32Array),
    };
  }

  restore(state: OptimizerState): void {
    this.steps = state.steps;
    const load = (vars: tf.Variable[], values: Float32Array[]) => {
      vars.forEach((v, i) => {
        const t = tf.tensor(values[i] ?? new Float32Array(0), v.shape);
        v.assign(t);
        t.dispose();
      });
    };
    load(this.first, state.first);
    load(this.second, state.second);
  }

  dispose(): void {
    for (const v of [...this.first, ...this.second]) v.dispose();
  }
}
