import type { components } from "../generated/openapi.js";
import type { ApiKey } from "../services/api-keys/api-keys.js";
import type { Checkpoint, Metric } from "../services/checkpoints/checkpoints.js";
import { WEIGHTS_FILE } from "../services/checkpoints/files.js";
import type { DatasetRecord } from "../services/datasets/datasets.js";
import type { Job } from "../services/jobs/jobs.js";
import type { Lineage } from "../services/lineage/lineage.js";
import type { ModelAlias, ModelSummary } from "../services/models/models.js";
import type { Population, Round } from "../services/populations/populations.js";
import type { Submission } from "../services/populations/rounds.js";

type Schemas = components["schemas"];

export function checkpointBody(c: Checkpoint): Schemas["Checkpoint"] {
  return {
    id: c.id,
    name: c.name,
    version: c.version,
    tags: c.tags,
    description: c.description,
    format: "safetensors",
    status: c.deletedAt ? "deleted" : "available",
    size_bytes: c.sizeBytes,
    sha256: c.sha256,
    files: c.files.map((f) => ({
      name: f.name,
      url: `/v1/checkpoints/${c.id}/files/${encodeURIComponent(f.name)}`,
      size_bytes: f.sizeBytes,
      sha256: f.sha256,
    })),
    tensor_count: c.tensorCount,
    parameter_count: c.parameterCount,
    dtypes: c.dtypes,
    metadata: c.metadata,
    has_topology: c.hasTopology,
    job_id: c.jobId,
    parents: c.parents.map((p) => ({
      checkpoint_id: p.checkpointId,
      coefficient: p.coefficient,
      method: p.method,
      job_id: p.jobId,
    })),
    metrics: c.metrics.map(metricBody),
    created_at: c.createdAt.toISOString(),
    deleted_at: c.deletedAt ? c.deletedAt.toISOString() : null,
    weights_url: c.files.some((f) => f.name === WEIGHTS_FILE) ? `/v1/checkpoints/${c.id}/weights` : null,
    population: c.population,
  };
}

export function modelSummaryBody(m: ModelSummary): Schemas["ModelSummary"] {
  return {
    name: m.name,
    latest_version: m.latestVersion,
    version_count: m.versionCount,
    created_at: m.createdAt.toISOString(),
  };
}

export function aliasBody(a: ModelAlias): Schemas["ModelAlias"] {
  return {
    alias: a.alias,
    version: a.version,
    checkpoint_id: a.checkpointId,
    updated_at: a.updatedAt.toISOString(),
  };
}

export function roundBody(r: Round): Schemas["PopulationRound"] {
  return {
    round: r.round,
    status: r.status,
    opened_at: r.openedAt.toISOString(),
    closed_at: iso(r.closedAt),
    submitted: r.submitted,
    job_id: r.jobId,
    outputs: r.outputs.map((o) => ({ member: o.member, checkpoint_id: o.checkpointId })),
  };
}

export function populationBody(p: Population): Schemas["Population"] {
  return {
    id: p.id,
    name: p.name,
    size: p.size,
    method: p.method as Schemas["Population"]["method"],
    alpha: p.alpha,
    seed: p.seed,
    quorum: p.quorum,
    round_timeout_seconds: p.roundTimeoutSeconds,
    initial_checkpoint_id: p.initialCheckpointId,
    status: p.status,
    current_round: p.currentRound,
    rounds: p.rounds.map(roundBody),
    finish_job_id: p.finishJobId,
    soup_checkpoint_id: p.soupCheckpointId,
    created_at: p.createdAt.toISOString(),
    events_url: `/v1/populations/${p.id}/events`,
  };
}

export function submissionBody(s: Submission): Schemas["PopulationSubmission"] {
  return {
    population_id: s.populationId,
    round: s.round,
    member: s.member,
    checkpoint_id: s.checkpointId,
    created_at: s.createdAt.toISOString(),
  };
}

export function apiKeyBody(k: ApiKey): Schemas["ApiKey"] {
  return {
    id: k.id,
    name: k.name,
    prefix: k.prefix,
    created_at: k.createdAt.toISOString(),
    revoked_at: k.revokedAt ? k.revokedAt.toISOString() : null,
  };
}

export function metricBody(m: Metric): Schemas["Metric"] {
  return {
    id: m.id,
    dataset: m.dataset,
    split: m.split,
    name: m.name,
    value: m.value,
    current: m.current,
    job_id: m.jobId,
    created_at: m.createdAt.toISOString(),
  };
}

const iso = (d: Date | null) => (d ? d.toISOString() : null);

/**
 * A succeeded job's result with its `kind`: the job's, and for a training, whether it is a placed
 * training's shard other than the lead (whose result names its lead).
 */
function resultBody(j: Job): Schemas["JobResult"] | null {
  if (!j.result) return null;
  const result = j.result as { placement?: { lead_job_id?: string } };
  const kind = j.kind === "merge" ? "merge" : result.placement?.lead_job_id ? "training-shard" : "training";
  return { kind, ...result } as Schemas["JobResult"];
}

export function jobBody(j: Job): Schemas["Job"] {
  return {
    id: j.id,
    kind: j.kind,
    status: j.status,
    progress: j.progress,
    progress_detail: (j.progressDetail ?? null) as Schemas["Job"]["progress_detail"],
    params: j.params as Record<string, unknown>,
    result: resultBody(j),
    problem: j.problem as Schemas["Job"]["problem"],
    created_at: j.createdAt.toISOString(),
    started_at: iso(j.startedAt),
    finished_at: iso(j.finishedAt),
    events_url: `/v1/jobs/${j.id}/events`,
  };
}

export function lineageBody(
  id: string,
  direction: "ancestors" | "descendants",
  depth: number,
  l: Lineage,
): Schemas["Lineage"] {
  return {
    checkpoint_id: id,
    direction,
    depth,
    nodes: l.nodes.map((n) => ({
      id: n.id,
      name: n.name,
      status: n.deleted ? "deleted" : "available",
      job_id: n.jobId,
      created_at: n.createdAt.toISOString(),
      depth: n.depth,
      metrics: n.metrics.map(metricBody),
    })),
    edges: l.edges.map((e) => ({
      parent_id: e.parentId,
      child_id: e.childId,
      coefficient: e.coefficient,
      method: e.method,
      job_id: e.jobId,
    })),
    contributions: l.contributions.map((c) => ({
      checkpoint_id: c.checkpointId,
      weight: c.weight,
      root: c.root,
    })),
  };
}

export function datasetBody(d: DatasetRecord): Schemas["Dataset"] {
  return {
    id: d.id,
    name: d.name,
    format: d.format as Schemas["Dataset"]["format"],
    shape: d.shape,
    classes: d.classes,
    train_count: d.trainCount,
    test_count: d.testCount,
    size_bytes: d.sizeBytes,
    created_at: d.createdAt.toISOString(),
  };
}
