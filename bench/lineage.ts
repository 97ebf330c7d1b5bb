/**
 * Lineage through the API (issue 13): registers `GENERATIONS` generations of PAPA pulls over
 * `WIDTH` checkpoints (default 30 x 4: 4^30 paths from the last to the first) on PGlite and on
 * this machine's Postgres, then asks for the last checkpoint's ancestors with their
 * contributions (depth 100), `ROUNDS` times, through the app in process. Prints
 * `lineage db=.. generations=.. nodes=.. p50_ms=.. max_ms=..`.
 *
 * usage: npm run bench:lineage [-- GENERATIONS [WIDTH [ROUNDS]]]
 */
import { type Harness, startHarness } from "../test/helpers/harness.js";
import { registerPullChain } from "../test/helpers/lineage.js";

const generations = Number(process.argv[2] ?? 30);
const width = Number(process.argv[3] ?? 4);
const rounds = Number(process.argv[4] ?? 20);

async function measure(h: Harness, db: string): Promise<void> {
  const chain = await registerPullChain(h.ctx, h.tenantA, generations, width, 0.3);
  const last = chain.at(-1)?.[0] ?? "";
  const times: number[] = [];
  let nodes = 0;
  for (let i = 0; i < rounds; i++) {
    const started = performance.now();
    const res = await h.app.request(`/v1/checkpoints/${last}/lineage?depth=100`, {
      headers: { Authorization: `Bearer ${h.keyA}` },
    });
    const body = (await res.json()) as { nodes: unknown[]; contributions: { weight: number }[] };
    times.push(performance.now() - started);
    if (res.status !== 200) throw new Error(`lineage answered ${res.status}`);
    nodes = body.nodes.length;
  }
  times.sort((a, b) => a - b);
  const p50 = times[Math.floor(times.length / 2)] ?? 0;
  console.log(
    `lineage db=${db} generations=${generations} width=${width} nodes=${nodes} p50_ms=${p50.toFixed(1)} max_ms=${(times.at(-1) ?? 0).toFixed(1)}`,
  );
}

for (const db of ["pglite", "postgres"] as const) {
  const h = await startHarness(db, "filesystem");
  try {
    await measure(h, db);
  } finally {
    await h.close();
  }
}
