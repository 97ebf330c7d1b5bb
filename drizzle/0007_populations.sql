CREATE TABLE "population_rounds" (
	"population_id" uuid NOT NULL,
	"round" integer NOT NULL,
	"opened_at" timestamp with time zone DEFAULT now() NOT NULL,
	"job_id" uuid,
	CONSTRAINT "population_rounds_population_id_round_pk" PRIMARY KEY("population_id","round")
);
--> statement-breakpoint
CREATE TABLE "population_submissions" (
	"population_id" uuid NOT NULL,
	"round" integer NOT NULL,
	"member" integer NOT NULL,
	"checkpoint_id" uuid NOT NULL,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "population_submissions_population_id_round_member_pk" PRIMARY KEY("population_id","round","member")
);
--> statement-breakpoint
CREATE TABLE "populations" (
	"id" uuid PRIMARY KEY NOT NULL,
	"tenant_id" uuid NOT NULL,
	"name" text NOT NULL,
	"size" integer NOT NULL,
	"method" text NOT NULL,
	"alpha" double precision NOT NULL,
	"seed" bigint NOT NULL,
	"quorum" integer NOT NULL,
	"round_timeout_seconds" integer NOT NULL,
	"initial_checkpoint_id" uuid,
	"current_round" integer DEFAULT 0 NOT NULL,
	"finish_job_id" uuid,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "population_id" uuid;--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "population_round" integer;--> statement-breakpoint
ALTER TABLE "checkpoints" ADD COLUMN "population_member" integer;--> statement-breakpoint
ALTER TABLE "population_rounds" ADD CONSTRAINT "population_rounds_population_id_populations_id_fk" FOREIGN KEY ("population_id") REFERENCES "public"."populations"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "population_rounds" ADD CONSTRAINT "population_rounds_job_id_jobs_id_fk" FOREIGN KEY ("job_id") REFERENCES "public"."jobs"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "population_submissions" ADD CONSTRAINT "population_submissions_population_id_populations_id_fk" FOREIGN KEY ("population_id") REFERENCES "public"."populations"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "population_submissions" ADD CONSTRAINT "population_submissions_checkpoint_id_checkpoints_id_fk" FOREIGN KEY ("checkpoint_id") REFERENCES "public"."checkpoints"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "populations" ADD CONSTRAINT "populations_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "populations" ADD CONSTRAINT "populations_initial_checkpoint_id_checkpoints_id_fk" FOREIGN KEY ("initial_checkpoint_id") REFERENCES "public"."checkpoints"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "populations" ADD CONSTRAINT "populations_finish_job_id_jobs_id_fk" FOREIGN KEY ("finish_job_id") REFERENCES "public"."jobs"("id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "population_rounds_open_idx" ON "population_rounds" USING btree ("opened_at") WHERE "population_rounds"."job_id" is null;--> statement-breakpoint
CREATE INDEX "populations_tenant_idx" ON "populations" USING btree ("tenant_id","id");--> statement-breakpoint
CREATE INDEX "checkpoints_storage_key_idx" ON "checkpoints" USING btree ("storage_key");--> statement-breakpoint
CREATE INDEX "checkpoints_population_idx" ON "checkpoints" USING btree ("population_id","population_round") WHERE "checkpoints"."population_id" is not null;