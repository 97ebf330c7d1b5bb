CREATE TABLE "datasets" (
	"id" uuid PRIMARY KEY NOT NULL,
	"tenant_id" uuid NOT NULL,
	"name" text NOT NULL,
	"format" text NOT NULL,
	"shape" jsonb NOT NULL,
	"classes" integer NOT NULL,
	"train_count" integer NOT NULL,
	"test_count" integer NOT NULL,
	"size_bytes" bigint NOT NULL,
	"files" jsonb NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "datasets" ADD CONSTRAINT "datasets_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "datasets_tenant_idx" ON "datasets" USING btree ("tenant_id","id");