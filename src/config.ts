import { availableParallelism } from "node:os";
import { z } from "zod";
import type { BuiltInDataset } from "./ml/datasets.js";

const booleanFlag = z
  .enum(["true", "false", "1", "0"], { message: "must be true, false, 1 or 0" })
  .transform((v) => v === "true" || v === "1");

const byteCount = (fallback: number) =>
  z.coerce
    .number({ message: "must be a number of bytes" })
    .int("must be a whole number of bytes")
    .positive("must be positive")
    .max(Number.MAX_SAFE_INTEGER)
    .default(fallback);

const emptyAsUndefined = (value: unknown) => (value === "" ? undefined : value);

const schema = z.object({
  PORT: z.coerce.number().int().min(0).max(65535).default(8080),
  HOST: z.string().min(1).default("0.0.0.0"),
  PAPA_DATA_DIR: z.string().min(1).default("./.papa"),
  PAPA_API_KEY: z.preprocess(
    emptyAsUndefined,
    z.string().min(20, "must be at least 20 characters").max(200).optional(),
  ),
  DATABASE_URL: z.preprocess(
    emptyAsUndefined,
    z
      .string()
      .regex(/^postgres(ql)?:\/\//, "must be a postgres:// URL")
      .optional(),
  ),
  S3_BUCKET: z.preprocess(emptyAsUndefined, z.string().min(3).optional()),
  S3_REGION: z.string().min(1).default("us-east-1"),
  S3_ENDPOINT: z.preprocess(emptyAsUndefined, z.url().optional()),
  S3_ACCESS_KEY_ID: z.preprocess(emptyAsUndefined, z.string().optional()),
  S3_SECRET_ACCESS_KEY: z.preprocess(emptyAsUndefined, z.string().optional()),
  S3_FORCE_PATH_STYLE: z.preprocess(emptyAsUndefined, booleanFlag.optional()),
  PAPA_MAX_UPLOAD_BYTES: byteCount(20 * 1024 ** 3),
  PAPA_MAX_SAFETENSORS_HEADER_BYTES: byteCount(25_000_000),
  PAPA_MAX_HTTP_HEADER_BYTES: byteCount(16 * 1024),
  PAPA_MAX_MERGE_INPUT_BYTES: byteCount(256 * 1024 ** 3),
  PAPA_MAX_MERGE_HEADER_BYTES: byteCount(64 * 1024 ** 2),
  PAPA_MAX_DATASET_BYTES: byteCount(1024 ** 3),
  PAPA_MAX_JSON_BODY_BYTES: byteCount(1024 ** 2),
  PAPA_MAX_TRAINING_MEMORY_BYTES: byteCount(3 * 1024 ** 3),
  PAPA_TENANT_MAX_QUEUED_JOBS: z.coerce.number().int().min(1).max(1_000_000).default(100),
  PAPA_TENANT_MAX_RUNNING_JOBS: z.coerce.number().int().min(1).max(10_000).default(4),
  PAPA_TENANT_MAX_EVENT_STREAMS: z.coerce.number().int().min(1).max(100_000).default(20),
  PAPA_RATE_LIMIT_PER_KEY_PER_MINUTE: z.coerce.number().int().min(0).max(100_000_000).default(6000),
  PAPA_AUTH_FAILURES_PER_MINUTE: z.coerce.number().int().min(0).max(1_000_000).default(30),
  PAPA_HTTP_HEADERS_TIMEOUT_SECONDS: z.coerce.number().min(0.1).max(3600).default(20),
  // Above the 15 s between the comments that keep quiet event streams moving.
  PAPA_HTTP_IDLE_TIMEOUT_SECONDS: z.coerce.number().min(20).max(86400).default(60),
  PAPA_HTTP_MAX_CONNECTIONS: z.coerce.number().int().min(1).max(1_000_000).default(10_000),
  PAPA_HTTP_MAX_CONNECTIONS_PER_CLIENT: z.coerce.number().int().min(0).max(1_000_000).default(256),
  PAPA_PRESIGN_EXPIRES_SECONDS: z.coerce.number().int().min(1).max(604800).default(900),
  PAPA_LOG_LEVEL: z.enum(["debug", "info", "warn", "error"]).default("info"),
  PAPA_IN_PROCESS_WORKER: z.preprocess(emptyAsUndefined, booleanFlag.optional()),
  PAPA_WORKER_QUEUES: z
    .string()
    .regex(/^(merge|train)(,(merge|train))*$/, "must list queues among: merge, train")
    .default("merge,train"),
  PAPA_BACKEND: z.preprocess(emptyAsUndefined, z.enum(["tensorflow", "wasm", "cpu"]).optional()),
  PAPA_FASHION_MNIST_DIR: z.string().min(1).default("/usr/share/datasets/fashion-mnist"),
  PAPA_DATASETS: z.preprocess(
    emptyAsUndefined,
    z
      .string()
      .regex(
        /^(mnist|fashion-mnist)(,(mnist|fashion-mnist))*$/,
        "must list datasets among: mnist, fashion-mnist",
      )
      .optional(),
  ),
  PAPA_MERGE_CONCURRENCY: z.coerce.number().int().min(1).max(64).default(1),
  PAPA_TRAIN_CONCURRENCY: z.coerce.number().int().min(1).max(64).default(1),
  PAPA_MERGE_THREADS: z.coerce.number().int().min(0).max(256).default(availableParallelism()),
  PAPA_JOB_RETRY_LIMIT: z.coerce.number().int().min(0).max(100).default(3),
  PAPA_JOB_RETRY_DELAY_SECONDS: z.coerce.number().int().min(1).max(86400).default(5),
  PAPA_JOB_LEASE_SECONDS: z.coerce.number().int().min(2).max(3600).default(60),
  PAPA_WORKER_DRAIN_SECONDS: z.coerce.number().min(0).max(3600).default(30),
  PAPA_QUEUE_MAINTENANCE_SECONDS: z.coerce.number().int().min(1).max(3600).default(30),
  PAPA_SWEEP_INTERVAL_SECONDS: z.coerce.number().int().min(1).max(86400).default(300),
  PAPA_ROUND_CHECK_SECONDS: z.coerce.number().int().min(1).max(3600).default(2),
  // Twice the 5 minutes between the touches of a live write, at least.
  PAPA_ABANDONED_WRITE_SECONDS: z.coerce
    .number()
    .int()
    .min(600)
    .max(30 * 86400)
    .default(900),
});

/** Every variable `loadConfig` reads (docs/configuration.md documents each; a test checks). */
export const CONFIG_VARIABLES = Object.keys(schema.shape);

export interface S3Config {
  bucket: string;
  region: string;
  endpoint: string | undefined;
  forcePathStyle: boolean;
  credentials: { accessKeyId: string; secretAccessKey: string } | undefined;
}

export interface Limits {
  /** Largest checkpoint upload, in bytes. */
  maxUploadBytes: number;
  /** Largest safetensors JSON header, in bytes. */
  maxSafetensorsHeaderBytes: number;
  /** Most bytes a merge may read, all inputs together. */
  maxMergeInputBytes: number;
  /** Most bytes of safetensors headers one merge may parse, all inputs together. */
  maxMergeHeaderBytes: number;
  /** Largest dataset upload (all files), parsed in memory. */
  maxDatasetBytes: number;
  /** Largest JSON request body. */
  maxJsonBodyBytes: number;
  /** Most memory a training may be estimated to take (422 beyond). */
  maxTrainingMemoryBytes: number;
  /** Jobs one tenant may have queued or running at once (429 beyond). */
  maxQueuedJobsPerTenant: number;
  /** Jobs of one tenant in the queue (for a worker, or running) at once; the rest wait their turn. */
  maxRunningJobsPerTenant: number;
  /** Event streams one tenant may have open on one API instance (429 beyond). */
  maxEventStreamsPerTenant: number;
  /** Requests per minute per API key, over all API instances (429 beyond); 0: none. */
  requestsPerKeyPerMinute: number;
  /** Requests per minute with a wrong key from one address before it is shut out for 5 minutes (429); 0: none. */
  authFailuresPerMinute: number;
}

/** The Node HTTP server's defences against slow, partial and too many connections. */
export interface HttpServerConfig {
  /** Largest HTTP request head (request line plus headers), in bytes: 431 beyond. */
  maxHeaderBytes: number;
  /** A request head must arrive within this (408, then the connection is closed). */
  headersTimeoutSeconds: number;
  /** A connection on which nothing moves for this long, while a body comes in or a response goes out, is closed. */
  idleTimeoutSeconds: number;
  maxConnections: number;
  /** Open connections from one address; 0 for no such cap (behind a load balancer). */
  maxConnectionsPerClient: number;
}

export interface WorkerConfig {
  /** Run a worker inside the API process (the embedded default). */
  inProcess: boolean;
  queues: ("merge" | "train")[];
  /** Forced TensorFlow.js backend; unset: the fastest that loads. */
  backend: "tensorflow" | "wasm" | "cpu" | undefined;
  fashionMnistDir: string;
  mergeConcurrency: number;
  /** Trainings one worker process runs at once, each in a process of its own. */
  trainConcurrency: number;
  mergeThreads: number;
  retryLimit: number;
  retryDelaySeconds: number;
  /**
   * A running job's lease, renewed by its worker every quarter of it: a job whose worker died is
   * failed and retried (a training resumes its last epoch) within this plus `maintenanceSeconds`.
   */
  leaseSeconds: number;
  drainSeconds: number;
  /** How often jobs whose lease ran out (their worker died) are failed so that they retry. */
  maintenanceSeconds: number;
  /** How often the worker removes what writers that died left, and expires upload sessions. */
  sweepIntervalSeconds: number;
  /** How often the worker closes populations' rounds whose timeout has passed with their quorum. */
  roundCheckSeconds: number;
  /** A write untouched this long belongs to a writer that died. */
  abandonedWriteSeconds: number;
}

export interface Config {
  port: number;
  host: string;
  dataDir: string;
  bootstrapApiKey: string | undefined;
  databaseUrl: string | undefined;
  s3: S3Config | undefined;
  limits: Limits;
  http: HttpServerConfig;
  presignExpiresSeconds: number;
  logLevel: "debug" | "info" | "warn" | "error";
  worker: WorkerConfig;
  /**
   * The built-in datasets trainings and evaluated merges may name; unset: `mnist`, and
   * `fashion-mnist` where its files are in the worker's `fashionMnistDir` on this machine.
   */
  datasets: readonly BuiltInDataset[] | undefined;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ConfigError";
  }
}

/**
 * Reads the configuration once, from the environment. Throws a `ConfigError` naming every bad
 * variable. Absent `DATABASE_URL` means PGlite under the data dir; absent `S3_BUCKET` means the
 * filesystem store under the data dir.
 */
export function loadConfig(env: Record<string, string | undefined> = process.env): Config {
  const parsed = schema.safeParse(env);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => `${issue.path.join(".")}: ${issue.message}`);
    throw new ConfigError(`invalid configuration: ${problems.join("; ")}`);
  }
  const e = parsed.data;
  const s3Settings = [e.S3_ENDPOINT, e.S3_ACCESS_KEY_ID, e.S3_SECRET_ACCESS_KEY, e.S3_FORCE_PATH_STYLE];
  if (!e.S3_BUCKET && s3Settings.some((v) => v !== undefined)) {
    throw new ConfigError("invalid configuration: S3_BUCKET: required when any other S3_* variable is set");
  }
  if ((e.S3_ACCESS_KEY_ID === undefined) !== (e.S3_SECRET_ACCESS_KEY === undefined)) {
    throw new ConfigError(
      "invalid configuration: S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY must be set together",
    );
  }
  return {
    port: e.PORT,
    host: e.HOST,
    dataDir: e.PAPA_DATA_DIR,
    bootstrapApiKey: e.PAPA_API_KEY,
    databaseUrl: e.DATABASE_URL,
    s3: e.S3_BUCKET
      ? {
          bucket: e.S3_BUCKET,
          region: e.S3_REGION,
          endpoint: e.S3_ENDPOINT,
          forcePathStyle: e.S3_FORCE_PATH_STYLE ?? false,
          credentials:
            e.S3_ACCESS_KEY_ID && e.S3_SECRET_ACCESS_KEY
              ? { accessKeyId: e.S3_ACCESS_KEY_ID, secretAccessKey: e.S3_SECRET_ACCESS_KEY }
              : undefined,
        }
      : undefined,
    limits: {
      maxUploadBytes: e.PAPA_MAX_UPLOAD_BYTES,
      maxSafetensorsHeaderBytes: e.PAPA_MAX_SAFETENSORS_HEADER_BYTES,
      maxMergeInputBytes: e.PAPA_MAX_MERGE_INPUT_BYTES,
      maxMergeHeaderBytes: e.PAPA_MAX_MERGE_HEADER_BYTES,
      maxDatasetBytes: e.PAPA_MAX_DATASET_BYTES,
      maxJsonBodyBytes: e.PAPA_MAX_JSON_BODY_BYTES,
      maxTrainingMemoryBytes: e.PAPA_MAX_TRAINING_MEMORY_BYTES,
      maxQueuedJobsPerTenant: e.PAPA_TENANT_MAX_QUEUED_JOBS,
      maxRunningJobsPerTenant: e.PAPA_TENANT_MAX_RUNNING_JOBS,
      maxEventStreamsPerTenant: e.PAPA_TENANT_MAX_EVENT_STREAMS,
      requestsPerKeyPerMinute: e.PAPA_RATE_LIMIT_PER_KEY_PER_MINUTE,
      authFailuresPerMinute: e.PAPA_AUTH_FAILURES_PER_MINUTE,
    },
    http: {
      maxHeaderBytes: e.PAPA_MAX_HTTP_HEADER_BYTES,
      headersTimeoutSeconds: e.PAPA_HTTP_HEADERS_TIMEOUT_SECONDS,
      idleTimeoutSeconds: e.PAPA_HTTP_IDLE_TIMEOUT_SECONDS,
      maxConnections: e.PAPA_HTTP_MAX_CONNECTIONS,
      maxConnectionsPerClient: e.PAPA_HTTP_MAX_CONNECTIONS_PER_CLIENT,
    },
    presignExpiresSeconds: e.PAPA_PRESIGN_EXPIRES_SECONDS,
    logLevel: e.PAPA_LOG_LEVEL,
    datasets:
      e.PAPA_DATASETS === undefined
        ? undefined
        : ([...new Set(e.PAPA_DATASETS.split(","))] as BuiltInDataset[]),
    worker: {
      inProcess: e.PAPA_IN_PROCESS_WORKER ?? true,
      queues: [...new Set(e.PAPA_WORKER_QUEUES.split(","))] as ("merge" | "train")[],
      backend: e.PAPA_BACKEND,
      fashionMnistDir: e.PAPA_FASHION_MNIST_DIR,
      mergeConcurrency: e.PAPA_MERGE_CONCURRENCY,
      trainConcurrency: e.PAPA_TRAIN_CONCURRENCY,
      mergeThreads: e.PAPA_MERGE_THREADS,
      retryLimit: e.PAPA_JOB_RETRY_LIMIT,
      retryDelaySeconds: e.PAPA_JOB_RETRY_DELAY_SECONDS,
      leaseSeconds: e.PAPA_JOB_LEASE_SECONDS,
      drainSeconds: e.PAPA_WORKER_DRAIN_SECONDS,
      maintenanceSeconds: e.PAPA_QUEUE_MAINTENANCE_SECONDS,
      sweepIntervalSeconds: e.PAPA_SWEEP_INTERVAL_SECONDS,
      roundCheckSeconds: e.PAPA_ROUND_CHECK_SECONDS,
      abandonedWriteSeconds: e.PAPA_ABANDONED_WRITE_SECONDS,
    },
  };
}
