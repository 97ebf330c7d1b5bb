import type { components } from "../generated/openapi.js";
import type { ApiKey } from "../services/api-keys/api-keys.js";
import type { Checkpoint } from "../services/checkpoints/checkpoints.js";

type Schemas = components["schemas"];

export function checkpointBody(c: Checkpoint): Schemas["Checkpoint"] {
  return {
    id: c.id,
    name: c.name,
    format: "safetensors",
    status: c.deletedAt ? "deleted" : "available",
    size_bytes: c.sizeBytes,
    sha256: c.sha256,
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
    created_at: c.createdAt.toISOString(),
    deleted_at: c.deletedAt ? c.deletedAt.toISOString() : null,
    weights_url: `/v1/checkpoints/${c.id}/weights`,
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
