ALTER TABLE "jobs" ADD COLUMN "dispatched_at" timestamp with time zone;--> statement-breakpoint
-- Jobs from before per-tenant dispatch are all in the queue already.
UPDATE "jobs" SET "dispatched_at" = "created_at" WHERE "status" IN ('queued', 'running');--> statement-breakpoint
CREATE INDEX "jobs_active_idx" ON "jobs" USING btree ("tenant_id","id") WHERE "jobs"."status" in ('queued', 'running');
