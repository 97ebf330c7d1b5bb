import * as tf from "@tensorflow/tfjs";
import { namedWeights } from "./models.js";
import type { OptimizerState } from "./optimizer.js";
import type { Member } from "./population.js";

/**
 * Everything a population needs to continue after `epochs` completed epochs: every member's
 * weights (in `namedWeights` order) and optimizer state. Data order, augmentation draws and
 * diversity are functions of the seed, the member and the epoch, so they need no saving.
 */
export interface TrainingState {
  epochs: number;
  step: number;
  members: { weights: Float32Array[]; optimizer: OptimizerState }[];
}

export function captureState(members: Member[], epochs: number, step: number): TrainingState {
  return {
    epochs,
    step,
    members: members.map((m) => ({
      weights: namedWeights(m.model).map((w) => w.variable.read().dataSync() as Float32Array),
      optimizer: m.optimizer.state(),
    })),
  };
}

export function restoreState(members: Member[], state: TrainingState): void {
  if (state.members.length !== members.length) throw new Error("saved state is of another population size");
  for (const [j, member] of members.entries()) {
    const saved = state.members[j];
    if (!saved) continue;
    namedWeights(member.model).forEach(({ variable }, i) => {
      const values = tf.tensor(saved.weights[i] ?? new Float32Array(0), variable.shape as number[]);
      variable.write(values);
      values.dispose();
    });
    member.optimizer.restore(saved.optimizer);
  }
}
