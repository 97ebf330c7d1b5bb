import type { TrainingOutcome } from "../src/ml/population.js";

/** The variants table of the training benchmarks: accuracies in %, then training seconds. */
export function printTableHeader(): void {
  console.log("| variant | members mean | min | max | ensemble | uniform soup | greedy soup | train s |");
  console.log("|---|---|---|---|---|---|---|---|");
}

/** Prints one variant's row and disposes the outcome's models. */
export function printTableRow(variant: string, o: TrainingOutcome): void {
  const acc = o.members.map((m) => m.accuracy);
  const pct = (x: number) => (100 * x).toFixed(2);
  console.log(
    `| ${variant} | ${pct(acc.reduce((a, b) => a + b, 0) / acc.length)} | ${pct(Math.min(...acc))} | ${pct(Math.max(...acc))} | ${pct(o.ensembleAccuracy)} | ${pct(o.uniformSoup.accuracy)} | ${pct(o.greedySoup.accuracy)} (${o.greedySoup.ingredients.length} of ${acc.length}) | ${o.seconds.train.toFixed(1)} |`,
  );
  for (const m of [...o.members.map((x) => x.model), o.uniformSoup.model, o.greedySoup.model]) m.dispose();
}
