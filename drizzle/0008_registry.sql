CREATE TABLE "checkpoint_tags" (
	"tenant_id" uuid NOT NULL,
	"tag" text NOT NULL,
	"checkpoint_id" uuid NOT NULL,
	CONSTRAINT "checkpoint_tags_tenant_id_tag_checkpoint_id_pk" PRIMARY KEY("tenant_id","tag","checkpoint_id")
);
--> statement-breakpoint
CREATE TABLE "model_aliases" (
	"tenant_id" uuid NOT NULL,
	"name" text NOT NULL,
	"alias" text NOT NULL,
	"version" integer NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "model_aliases_tenant_id_name_alias_pk" PRIMARY KEY("tenant_id","name","alias")
);
--> statement-breakpoint
CREATE TABLE "models" (
	"tenant_id" uuid NOT NULL,
	"name" text NOT NULL,
	"latest_version" integer NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "models_tenant_id_name_pk" PRIMARY KEY("tenant_id","name")
);
--> statement-breakpoint
DROP INDEX "checkpoints_name_idx";--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "version" integer;--> statement-breakpoint
-- Existing checkpoints become their name's versions in the order they were registered.
UPDATE "checkpoints" SET "version" = v."version" FROM (
	SELECT "id", row_number() OVER (PARTITION BY "tenant_id", "name" ORDER BY "id") AS "version" FROM "checkpoints"
) v WHERE v."id" = "checkpoints"."id";--> statement-breakpoint
ALTER TABLE "checkpoints" ALTER COLUMN "version" SET NOT NULL;--> statement-breakpoint
INSERT INTO "models" ("tenant_id", "name", "latest_version", "created_at")
	SELECT "tenant_id", "name", max("version"), min("created_at") FROM "checkpoints" GROUP BY "tenant_id", "name";--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "tags" text[] DEFAULT '{}'::text[] NOT NULL;--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "description" text;--> statement-breakpoint
ALTER TABLE "metrics" ADD COLUMN "tenant_id" uuid;--> statement-breakpoint
UPDATE "metrics" SET "tenant_id" = c."tenant_id" FROM "checkpoints" c WHERE c."id" = "metrics"."checkpoint_id";--> statement-breakpoint
ALTER TABLE "metrics" ALTER COLUMN "tenant_id" SET NOT NULL;--> statement-breakpoint
ALTER TABLE "metrics" ADD COLUMN "current" boolean DEFAULT true NOT NULL;--> statement-breakpoint
-- Of the values recorded for one (checkpoint, dataset, split, name), the latest is current.
UPDATE "metrics" SET "current" = false WHERE EXISTS (
	SELECT 1 FROM "metrics" n WHERE n."checkpoint_id" = "metrics"."checkpoint_id" AND n."dataset" = "metrics"."dataset"
		AND n."split" = "metrics"."split" AND n."name" = "metrics"."name" AND n."id" > "metrics"."id"
);--> statement-breakpoint
ALTER TABLE "checkpoint_tags" ADD CONSTRAINT "checkpoint_tags_checkpoint_id_checkpoints_id_fk" FOREIGN KEY ("checkpoint_id") REFERENCES "public"."checkpoints"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "models" ADD CONSTRAINT "models_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "checkpoint_tags_checkpoint_idx" ON "checkpoint_tags" USING btree ("checkpoint_id");--> statement-breakpoint
ALTER TABLE "metrics" ADD CONSTRAINT "metrics_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE UNIQUE INDEX "checkpoints_version_idx" ON "checkpoints" USING btree ("tenant_id","name","version");--> statement-breakpoint
CREATE INDEX "checkpoints_name_prefix_idx" ON "checkpoints" USING btree ("tenant_id","name" text_pattern_ops,"id");--> statement-breakpoint
CREATE INDEX "checkpoints_job_idx" ON "checkpoints" USING btree ("job_id");--> statement-breakpoint
CREATE UNIQUE INDEX "metrics_current_idx" ON "metrics" USING btree ("checkpoint_id","dataset","split","name") WHERE "metrics"."current";--> statement-breakpoint
CREATE INDEX "metrics_search_idx" ON "metrics" USING btree ("tenant_id","dataset","split","name","value","checkpoint_id") WHERE "metrics"."current";