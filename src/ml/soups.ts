import type * as tf from "@tensorflow/tfjs";
import { mergeCoefficients } from "../merge/methods.js";
import { averageInto, reestimateBatchNorm } from "./averaging.js";
import type { Dataset, Split } from "./datasets.js";
import { evaluate } from "./evaluation.js";
import { buildModel, type ModelSpec } from "./models.js";

/**
 * A new model whose weights are the uniform average of the members' (PAPA-all's coefficients
 * and primitive, `averageMembers`), BatchNorm statistics re-estimated on `calibration`.
 */
export function soupOf(
  members: tf.LayersModel[],
  spec: ModelSpec,
  data: Dataset,
  calibration: tf.Tensor[],
): tf.LayersModel {
  const soup = buildModel(spec, data.shape, data.classes, 0);
  const rows = members.length > 1 ? mergeCoefficients({ method: "papa-all" }, members.length) : [[1]];
  averageInto(members, [soup], rows);
  reestimateBatchNorm(soup, calibration);
  return soup;
}

/**
 * Greedy soup: members sorted by held-out accuracy; start from the best; add the next member to
 * the running average only if held-out accuracy strictly improves. Every candidate, the first
 * one-member soup included, is scored by `accuracyWith` (the same BatchNorm treatment for all).
 * Returns the chosen indices.
 */
export function greedySoupIngredients(
  heldOut: number[],
  accuracyWith: (ingredients: number[]) => number,
): number[] {
  const order = heldOut.map((acc, i) => ({ acc, i })).sort((a, b) => b.acc - a.acc || a.i - b.i);
  const first = order[0];
  if (!first) return [];
  const chosen = [first.i];
  let best = accuracyWith(chosen);
  for (const { i } of order.slice(1)) {
    const acc = accuracyWith([...chosen, i]);
    if (acc > best) {
      chosen.push(i);
      best = acc;
    }
  }
  return chosen;
}

/** The greedy soup of `members`, each candidate soup scored on the held-out split. */
export function greedySoup(
  members: tf.LayersModel[],
  heldOutAccuracy: number[],
  heldOut: Split,
  spec: ModelSpec,
  data: Dataset,
  calibration: tf.Tensor[],
): { model: tf.LayersModel; ingredients: number[] } {
  const soupOfSome = (ids: number[]) =>
    soupOf(
      ids.map((i) => members[i] as tf.LayersModel),
      spec,
      data,
      calibration,
    );
  const ingredients = greedySoupIngredients(heldOutAccuracy, (ids) => {
    const candidate = soupOfSome(ids);
    const acc = evaluate(candidate, heldOut, data.shape);
    candidate.dispose();
    return acc;
  });
  return { model: soupOfSome(ingredients), ingredients };
}
