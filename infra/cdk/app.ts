#!/usr/bin/env node
import { App } from "aws-cdk-lib";
import { PapaStack } from "./stack.js";

/**
 * The CDK app: `npm run cdk -- deploy` (see the README). Context values (`-c key=value`):
 * gpuInstanceType, trainWorkers, mergeWorkers, retainData (default true).
 */
const app = new App();
const context = (key: string) => app.node.tryGetContext(key) as string | undefined;
const count = (key: string) => {
  const value = context(key);
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(String(value))) throw new Error(`-c ${key}=${value}: must be a whole number`);
  return Number(value);
};
new PapaStack(app, context("stackName") ?? "PapaService", {
  env: { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION },
  gpuInstanceType: context("gpuInstanceType"),
  trainWorkers: count("trainWorkers"),
  mergeWorkers: count("mergeWorkers"),
  retainData: context("retainData") !== "false",
});
