CREATE TABLE "checkpoint_changes" (
	"tenant_id" uuid PRIMARY KEY NOT NULL,
	"changes" bigint NOT NULL
);
--> statement-breakpoint
ALTER TABLE "checkpoint_changes" ADD CONSTRAINT "checkpoint_changes_tenant_id_tenants_id_fk" FOREIGN KEY ("tenant_id") REFERENCES "public"."tenants"("id") ON DELETE no action ON UPDATE no action;
--> statement-breakpoint
-- Counts a statement's change to the checkpoints of each tenant it touched (a row's own tenant, or
-- a lineage edge's child's), in the changing transaction: the counts of one tenant queue on its
-- row, so its count only grows, in commit order. Once a statement, however many rows it wrote.
CREATE FUNCTION "count_checkpoint_changes"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format(
    'INSERT INTO "checkpoint_changes" ("tenant_id", "changes")
       SELECT DISTINCT %s, 1 FROM %I AS "changed"
     ON CONFLICT ("tenant_id") DO UPDATE SET "changes" = "checkpoint_changes"."changes" + 1',
    CASE WHEN TG_TABLE_NAME = 'lineage_edges'
      THEN '(SELECT "tenant_id" FROM "checkpoints" WHERE "id" = "changed"."child_id")'
      ELSE '"changed"."tenant_id"' END,
    CASE WHEN TG_OP = 'DELETE' THEN 'old_rows' ELSE 'new_rows' END);
  RETURN NULL;
END
$$;
--> statement-breakpoint
CREATE TRIGGER "checkpoints_inserted" AFTER INSERT ON "checkpoints" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "checkpoints_updated" AFTER UPDATE ON "checkpoints" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "checkpoints_deleted" AFTER DELETE ON "checkpoints" REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "checkpoint_tags_inserted" AFTER INSERT ON "checkpoint_tags" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "checkpoint_tags_updated" AFTER UPDATE ON "checkpoint_tags" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "checkpoint_tags_deleted" AFTER DELETE ON "checkpoint_tags" REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "lineage_edges_inserted" AFTER INSERT ON "lineage_edges" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "lineage_edges_updated" AFTER UPDATE ON "lineage_edges" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "lineage_edges_deleted" AFTER DELETE ON "lineage_edges" REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "metrics_inserted" AFTER INSERT ON "metrics" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "metrics_updated" AFTER UPDATE ON "metrics" REFERENCING NEW TABLE AS new_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();
--> statement-breakpoint
CREATE TRIGGER "metrics_deleted" AFTER DELETE ON "metrics" REFERENCING OLD TABLE AS old_rows
  FOR EACH STATEMENT EXECUTE FUNCTION "count_checkpoint_changes"();