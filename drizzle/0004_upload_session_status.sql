CREATE TYPE "public"."upload_session_status" AS ENUM('open', 'completing');--> statement-breakpoint
ALTER TABLE "upload_sessions" ADD COLUMN "status" "upload_session_status" DEFAULT 'open' NOT NULL;