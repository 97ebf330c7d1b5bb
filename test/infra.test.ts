import { execFile } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { promisify } from "node:util";
import { App } from "aws-cdk-lib";
import { Match, Template } from "aws-cdk-lib/assertions";
import { describe, expect, it } from "vitest";
import { PapaStack } from "../infra/cdk/stack.js";
import { loadConfig } from "../src/config.js";

const run = promisify(execFile);

describe("infra", () => {
  it("has a compose file that docker-compose accepts, with the whole stack", async () => {
    await run("docker-compose", ["-f", "infra/docker-compose.yml", "config", "-q"]);
    const { stdout } = await run("docker-compose", [
      "-f",
      "infra/docker-compose.yml",
      "config",
      "--services",
    ]);
    expect(stdout.trim().split("\n").sort()).toEqual(
      ["api", "create-bucket", "merge-worker", "minio", "postgres", "train-worker"].sort(),
    );
    const { stdout: resolved } = await run("docker-compose", ["-f", "infra/docker-compose.yml", "config"]);
    expect(resolved).toContain('PAPA_IN_PROCESS_WORKER: "false"');
    expect(resolved).toContain("PAPA_WORKER_QUEUES: train");
  });

  it.each(["infra/Dockerfile", "infra/Dockerfile.gpu-worker", "infra/Dockerfile.lambda"])(
    "%s copies only files that exist",
    (dockerfile) => {
      const text = readFileSync(dockerfile, "utf8");
      const sources = [...text.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) =>
        (m[1] ?? "").split(" "),
      );
      expect(sources.length).toBeGreaterThan(2);
      for (const source of sources) expect(existsSync(source), source).toBe(true);
    },
  );

  it.each(["infra/Dockerfile", "infra/Dockerfile.gpu-worker", "infra/Dockerfile.lambda"])(
    "%s gives npm ci the script npm's prepare runs",
    (dockerfile) => {
      const prepare = JSON.parse(readFileSync("package.json", "utf8")).scripts.prepare as string;
      const script = prepare.split(" ").at(-1) ?? "";
      expect(existsSync(script), script).toBe(true);
      const stages = readFileSync(dockerfile, "utf8")
        .split(/^FROM /m)
        .slice(1);
      expect(stages.filter((stage) => stage.includes("npm ci")).length).toBeGreaterThan(0);
      for (const stage of stages) {
        const install = stage.indexOf("npm ci");
        if (install >= 0) expect(stage.slice(0, install)).toMatch(new RegExp(`^COPY .*${script} `, "m"));
      }
    },
  );
});

describe("the AWS CDK app", () => {
  const template = Template.fromStack(new PapaStack(new App(), "Test", { trainWorkers: 2 }));
  const resources = (type: string) => Object.values(template.findResources(type));
  const containerEnvironment = (queues: string) => {
    const [taskDefinition] = resources("AWS::ECS::TaskDefinition").filter((task) =>
      JSON.stringify(task).includes(`"PAPA_WORKER_QUEUES","Value":"${queues}"`),
    );
    const [container] = taskDefinition?.Properties.ContainerDefinitions ?? [];
    return { taskDefinition, container };
  };
  /** The configuration a process reads, with CloudFormation references replaced by sample values. */
  const configFrom = (variables: { Name?: string; Value?: unknown }[] | Record<string, unknown>) => {
    const entries = Array.isArray(variables)
      ? variables.map((v) => [v.Name, v.Value])
      : Object.entries(variables);
    const env = Object.fromEntries(
      entries.map(([name, value]) => [
        name,
        typeof value === "string" ? value : `sample-${name}`.toLowerCase(),
      ]),
    );
    return {
      env,
      config: loadConfig({ ...env, DATABASE_URL: "postgres://sample/papa", PAPA_API_KEY: undefined }),
    };
  };

  it("serves the API from a Lambda in the VPC behind an HTTP API", () => {
    template.hasResourceProperties("AWS::ApiGatewayV2::Api", { ProtocolType: "HTTP" });
    template.resourceCountIs("AWS::ApiGatewayV2::Integration", 1);
    template.hasResourceProperties("AWS::Lambda::Function", {
      PackageType: "Image",
      Timeout: 29,
      VpcConfig: Match.objectLike({ SubnetIds: Match.anyValue() }),
    });
    const [fn] = resources("AWS::Lambda::Function").filter((f) => f.Properties.PackageType === "Image");
    const { env, config } = configFrom(fn?.Properties.Environment.Variables);
    expect(Object.keys(env).sort()).toEqual(
      [
        "DATABASE_CA_FILE",
        "DATABASE_SECRET_ARN",
        "PAPA_API_KEY_SECRET_ARN",
        "PAPA_IN_PROCESS_WORKER",
        "PAPA_MAX_UPLOAD_BYTES",
        "S3_BUCKET",
        "S3_REGION",
      ].sort(),
    );
    expect(config.worker.inProcess).toBe(false);
    expect(config.s3?.bucket).toBe("sample-s3_bucket");
    expect(config.limits.maxUploadBytes).toBe(4_500_000);
    expect(env.DATABASE_CA_FILE).toBe("/etc/papa/rds-global-bundle.pem");
    for (const dockerfile of ["infra/Dockerfile", "infra/Dockerfile.gpu-worker", "infra/Dockerfile.lambda"]) {
      expect(readFileSync(dockerfile, "utf8"), dockerfile).toContain(` ${env.DATABASE_CA_FILE}\n`);
    }
  });

  it("keeps checkpoints in a private bucket that aborts abandoned multipart uploads", () => {
    template.hasResourceProperties("AWS::S3::Bucket", {
      PublicAccessBlockConfiguration: {
        BlockPublicAcls: true,
        BlockPublicPolicy: true,
        IgnorePublicAcls: true,
        RestrictPublicBuckets: true,
      },
      LifecycleConfiguration: {
        Rules: [
          Match.objectLike({ AbortIncompleteMultipartUpload: { DaysAfterInitiation: 2 }, Status: "Enabled" }),
        ],
      },
      CorsConfiguration: { CorsRules: [Match.objectLike({ ExposedHeaders: ["ETag"] })] },
    });
    template.hasResource("AWS::S3::Bucket", { DeletionPolicy: "Retain" });
  });

  it("runs Postgres on RDS, encrypted, private, reachable only from the API and the workers", () => {
    template.hasResourceProperties("AWS::RDS::DBInstance", {
      Engine: "postgres",
      StorageEncrypted: true,
      PubliclyAccessible: false,
      DeletionProtection: true,
    });
    const ingress = resources("AWS::EC2::SecurityGroupIngress").filter((rule) =>
      JSON.stringify(rule.Properties.GroupId).includes("DatabaseSecurityGroup"),
    );
    template.hasResourceProperties("AWS::RDS::DBInstance", {
      VPCSecurityGroups: [{ "Fn::GetAtt": [Match.stringLikeRegexp("^DatabaseSecurityGroup"), "GroupId"] }],
    });
    template.hasResourceProperties("AWS::EC2::SecurityGroup", {
      GroupDescription: "Security group for Database database",
      SecurityGroupIngress: Match.absent(),
    });
    expect(ingress.map((rule) => rule.Properties.Description).sort()).toEqual([
      "API",
      "merge workers",
      "training workers",
    ]);
  });

  it("runs merge workers on Fargate and training workers on GPU instances", () => {
    const mergeWorker = containerEnvironment("merge");
    expect(mergeWorker.taskDefinition?.Properties.RequiresCompatibilities).toEqual(["FARGATE"]);
    expect(mergeWorker.container.Command).toEqual(["node", "dist/worker.js"]);
    expect(configFrom(mergeWorker.container.Environment).config.worker.queues).toEqual(["merge"]);

    const trainWorker = containerEnvironment("train");
    expect(trainWorker.container.ResourceRequirements).toEqual([{ Type: "GPU", Value: "1" }]);
    const train = configFrom(trainWorker.container.Environment).config;
    expect(train.worker).toMatchObject({ queues: ["train"], backend: "tensorflow", inProcess: false });
    template.hasResourceProperties("AWS::ECS::Service", {
      DesiredCount: 2,
      CapacityProviderStrategy: Match.anyValue(),
    });
    template.hasResourceProperties("AWS::EC2::LaunchTemplate", {
      LaunchTemplateData: Match.objectLike({
        InstanceType: "g4dn.xlarge",
        ImageId: { Ref: Match.stringLikeRegexp("gpu") },
      }),
    });
    template.hasResourceProperties("AWS::AutoScaling::AutoScalingGroup", { MaxSize: "2", MinSize: "0" });
  });

  it("keeps secrets out of environments: processes may read them, nothing else", () => {
    const environments = [
      ...resources("AWS::Lambda::Function").map((f) => f.Properties.Environment),
      ...resources("AWS::ECS::TaskDefinition").flatMap((t) => t.Properties.ContainerDefinitions),
    ];
    expect(environments.length).toBeGreaterThanOrEqual(3);
    expect(JSON.stringify(environments)).not.toMatch(/resolve:secretsmanager|SecretString/);
    const policies = resources("AWS::IAM::Policy");
    const readersOf = (secretLogicalId: RegExp) =>
      policies.filter((policy) =>
        policy.Properties.PolicyDocument.Statement.some(
          (s: { Action: string | string[]; Resource: unknown }) =>
            [s.Action].flat().includes("secretsmanager:GetSecretValue") &&
            secretLogicalId.test(JSON.stringify(s.Resource)),
        ),
      ).length;
    expect(readersOf(/DatabaseSecret/)).toBe(3);
    expect(readersOf(/BootstrapApiKey/)).toBe(1);
    template.hasOutput("ApiUrl", Match.anyValue());
  });
});
