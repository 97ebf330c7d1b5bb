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
 * one-member soup included, is made and scored by `scored` (the same BatchNorm treatment for
 * all). The soup kept is the last candidate accepted, not made again; every other candidate goes
 * to `discard`. Returns the kept soup and its members' indices.
 */
export function greedySoupOf<Soup>(
  heldOut: number[],
  scored: (ingredients: number[]) => { soup: Soup; accuracy: number },
  discard: (soup: Soup) => void,
): { soup: Soup; ingredients: number[] } {
  const [first, ...rest] = heldOut.map((acc, i) => ({ acc, i })).sort((a, b) => b.acc - a.acc || a.i - b.i);
  if (!first) throw new Error("a greedy soup needs at least one member");
  let best = { ...scored([first.i]), ingredients: [first.i] };
  try {
    for (const { i } of rest) {
      const ingredients = [...best.ingredients, i];
      const candidate = scored(ingredients);
      if (candidate.accuracy > best.accuracy) {
        discard(best.soup);
        best = { ...candidate, ingredients };
      } else {
        discard(candidate.soup);
      }
    }
  } catch (err) {
    discard(best.soup);
    throw err;
  }
  return { soup: best.soup, ingredients: best.ingredients };
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
  const { soup, ingredients } = greedySoupOf(
    heldOutAccuracy,
    (ids) => {
      const soup = soupOf(
        ids.map((i) => members[i] as tf.LayersModel),
        spec,
        data,
        calibration,
      );
      return { soup, accuracy: evaluate(soup, heldOut, data.shape) };
    },
    (soup) => soup.dispose(),
  );
  return { model: soup, ingredients };
}
