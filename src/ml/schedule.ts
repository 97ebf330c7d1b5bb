import type { OptimizerSpec } from "./optimizer.js";
import type { PopulationSpec } from "./population.js";

/**
 * Learning rate at step t of T: a linear warm-up to lr over the first warmupSteps, then cosine
 * from lr to minLr over the remaining steps, or constant.
 */
export function learningRate(o: OptimizerSpec, t: number, total: number): number {
  if (t < o.warmupSteps) return (o.lr * (t + 1)) / o.warmupSteps;
  if (o.schedule === "constant") return o.lr;
  const [u, span] = [t - o.warmupSteps, total - o.warmupSteps];
  return o.minLr + 0.5 * (o.lr - o.minLr) * (1 + Math.cos((Math.PI * u) / Math.max(1, span)));
}

/** The PAPA pull strength at step t: (1 - alpha), scaled by lr_t / lr_0 when `linear`. */
export function papaBeta(p: PopulationSpec, o: OptimizerSpec, t: number, total: number): number {
  const scale = p.lrScaling === "linear" ? learningRate(o, t, total) / o.lr : 1;
  return (1 - p.alpha) * scale;
}
