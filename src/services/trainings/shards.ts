import { derivedId } from "../../ids.js";
import type { TrainingParams } from "./trainings.js";

/** Where a shard stands in a placed training. */
export interface Placement {
  leadJobId: string;
  populationId: string;
  shard: number;
  workers: number;
  /** The members this shard trains. */
  members: number[];
  /** Every shard's job id, the lead's first. */
  jobIds: string[];
}

/** Shard `shard` of `workers` trains members [floor(s p / N), floor((s + 1) p / N)). */
export function shardMembers(size: number, workers: number, shard: number): number[] {
  const first = Math.floor((shard * size) / workers);
  const end = Math.floor(((shard + 1) * size) / workers);
  return Array.from({ length: end - first }, (_, k) => first + k);
}

/**
 * Whether this shard evaluates the uniform soup for the lead (the last shard, so that the lead's
 * greedy soup and it run in parallel): it gathers every member's final weights as the lead does.
 */
export function makesUniformSoup(placement: Placement): boolean {
  return placement.shard === placement.workers - 1;
}

/** The job's place in a training placed on several workers, or null for a training in one job. */
export function placementOf(job: { id: string; params: unknown }): Placement | null {
  const params = job.params as TrainingParams;
  const workers = params.placement?.workers ?? 1;
  if (workers < 2) return null;
  const leadJobId = params.shard?.lead_job_id ?? job.id;
  const shard = params.shard?.index ?? 0;
  return {
    leadJobId,
    populationId: derivedId(leadJobId, "population"),
    shard,
    workers,
    members: shardMembers(params.population.size, workers, shard),
    jobIds: Array.from({ length: workers }, (_, s) =>
      s === 0 ? leadJobId : derivedId(leadJobId, `shard-${s}`),
    ),
  };
}
