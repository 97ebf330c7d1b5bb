import { fileURLToPath } from "node:url";
import {
  aws_apigatewayv2 as apigw,
  aws_autoscaling as autoscaling,
  CfnOutput,
  Duration,
  aws_ec2 as ec2,
  aws_ecs as ecs,
  aws_iam as iam,
  aws_lambda as lambda,
  aws_logs as logs,
  RemovalPolicy,
  aws_rds as rds,
  Stack,
  type StackProps,
  aws_s3 as s3,
  aws_secretsmanager as secretsmanager,
} from "aws-cdk-lib";
import { HttpLambdaIntegration } from "aws-cdk-lib/aws-apigatewayv2-integrations";
import type { Construct } from "constructs";

/** The repository root: the build context of every image (see .dockerignore). */
const repositoryRoot = fileURLToPath(new URL("../..", import.meta.url));
/** Where the images put RDS's certificate authorities (infra/Dockerfile*). */
const rdsCaFile = "/etc/papa/rds-global-bundle.pem";

export interface PapaStackProps extends StackProps {
  /** EC2 instance type of the GPU training workers (one NVIDIA GPU each). */
  gpuInstanceType?: string;
  /** Training workers: one task per GPU instance. */
  trainWorkers?: number;
  /** CPU merge workers (Fargate tasks). */
  mergeWorkers?: number;
  /** Keep the database and the bucket when the stack is deleted. */
  retainData?: boolean;
}

/**
 * papa-service on AWS: the API as a Lambda behind an HTTP API, checkpoints in S3, Postgres on
 * RDS (also the job queue), CPU merge workers on Fargate, GPU training workers on ECS/EC2.
 * Secrets (the database's password, the first API key) stay in Secrets Manager; the processes
 * read them at start (`DATABASE_SECRET_ARN`, `PAPA_API_KEY_SECRET_ARN`).
 */
export class PapaStack extends Stack {
  constructor(scope: Construct, id: string, props: PapaStackProps = {}) {
    super(scope, id, props);
    const removalPolicy = props.retainData === false ? RemovalPolicy.DESTROY : RemovalPolicy.RETAIN;

    const vpc = new ec2.Vpc(this, "Vpc", { maxAzs: 2, natGateways: 1 });
    // Checkpoint traffic to S3 stays off the NAT gateway.
    vpc.addGatewayEndpoint("S3", { service: ec2.GatewayVpcEndpointAwsService.S3 });
    const privateSubnets = { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS };

    const bucket = new s3.Bucket(this, "Checkpoints", {
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      encryption: s3.BucketEncryption.S3_MANAGED,
      enforceSSL: true,
      removalPolicy,
      autoDeleteObjects: removalPolicy === RemovalPolicy.DESTROY,
      // Parts of abandoned uploads (killed workers, expired upload sessions) are deleted.
      lifecycleRules: [{ abortIncompleteMultipartUploadAfter: Duration.days(2) }],
      // Upload sessions PUT parts to presigned URLs; browsers need to read each part's ETag.
      cors: [
        {
          allowedMethods: [s3.HttpMethods.PUT, s3.HttpMethods.GET],
          allowedOrigins: ["*"],
          allowedHeaders: ["*"],
          exposedHeaders: ["ETag"],
        },
      ],
    });

    const database = new rds.DatabaseInstance(this, "Database", {
      engine: rds.DatabaseInstanceEngine.postgres({ version: rds.PostgresEngineVersion.VER_16 }),
      instanceType: ec2.InstanceType.of(ec2.InstanceClass.T4G, ec2.InstanceSize.MEDIUM),
      vpc,
      vpcSubnets: privateSubnets,
      credentials: rds.Credentials.fromGeneratedSecret("papa"),
      databaseName: "papa",
      allocatedStorage: 20,
      storageEncrypted: true,
      backupRetention: Duration.days(7),
      removalPolicy,
      deletionProtection: removalPolicy === RemovalPolicy.RETAIN,
    });
    const databaseSecret = database.secret;
    if (!databaseSecret) throw new Error("the database has a generated secret");

    const apiKey = new secretsmanager.Secret(this, "BootstrapApiKey", {
      description:
        "papa-service: the first API key (registered at start); create others with POST /v1/api-keys",
      generateSecretString: { passwordLength: 48, excludePunctuation: true },
    });

    const environment = {
      DATABASE_SECRET_ARN: databaseSecret.secretArn,
      DATABASE_CA_FILE: rdsCaFile,
      S3_BUCKET: bucket.bucketName,
      S3_REGION: this.region,
      PAPA_IN_PROCESS_WORKER: "false",
    };

    // The API.
    const apiFunction = new lambda.DockerImageFunction(this, "Api", {
      code: lambda.DockerImageCode.fromImageAsset(repositoryRoot, { file: "infra/Dockerfile.lambda" }),
      architecture: lambda.Architecture.X86_64,
      memorySize: 1769, // one full vCPU
      timeout: Duration.seconds(29), // the HTTP API's integration limit is 30 s
      vpc,
      vpcSubnets: privateSubnets,
      environment: {
        ...environment,
        PAPA_API_KEY_SECRET_ARN: apiKey.secretArn,
        // Lambda takes events up to 6 MB, binary bodies base64-encoded in them: 4.5 MB of file.
        // Larger files go through upload sessions.
        PAPA_MAX_UPLOAD_BYTES: String(4.5 * 1000 ** 2),
      },
      logGroup: new logs.LogGroup(this, "ApiLogs", { retention: logs.RetentionDays.ONE_MONTH }),
    });
    const api = new apigw.HttpApi(this, "HttpApi", {
      description: "papa-service API",
      defaultIntegration: new HttpLambdaIntegration("Lambda", apiFunction),
    });

    // Workers: long-running processes on the job queue.
    const cluster = new ecs.Cluster(this, "Workers", {
      vpc,
      containerInsightsV2: ecs.ContainerInsights.ENABLED,
    });
    const logging = (prefix: string) =>
      ecs.LogDrivers.awsLogs({ streamPrefix: prefix, logRetention: logs.RetentionDays.ONE_MONTH });

    // On SIGTERM a worker stops fetching and lets running jobs finish for up to 100 s; ECS waits
    // 120 s (its most) before SIGKILL. Jobs still running then are retried by other workers.
    const drain = { PAPA_WORKER_DRAIN_SECONDS: "100" };
    const stopTimeout = Duration.seconds(120);

    const merge = new ecs.FargateTaskDefinition(this, "MergeTask", {
      cpu: 2048,
      memoryLimitMiB: 8192,
      ephemeralStorageGiB: 100,
    });
    merge.addContainer("worker", {
      image: ecs.ContainerImage.fromAsset(repositoryRoot, { file: "infra/Dockerfile" }),
      command: ["node", "dist/worker.js"],
      environment: { ...environment, ...drain, PAPA_WORKER_QUEUES: "merge" },
      stopTimeout,
      logging: logging("merge"),
    });
    const mergeService = new ecs.FargateService(this, "MergeWorkers", {
      cluster,
      taskDefinition: merge,
      desiredCount: props.mergeWorkers ?? 1,
      vpcSubnets: privateSubnets,
      minHealthyPercent: 100,
      circuitBreaker: { rollback: true },
    });

    const gpuInstances = new autoscaling.AutoScalingGroup(this, "GpuInstances", {
      vpc,
      vpcSubnets: privateSubnets,
      launchTemplate: new ec2.LaunchTemplate(this, "GpuLaunchTemplate", {
        instanceType: new ec2.InstanceType(props.gpuInstanceType ?? "g4dn.xlarge"),
        machineImage: ecs.EcsOptimizedImage.amazonLinux2(ecs.AmiHardwareType.GPU),
        userData: ec2.UserData.forLinux(), // the capacity provider adds the cluster's name
        role: new iam.Role(this, "GpuInstanceRole", {
          assumedBy: new iam.ServicePrincipal("ec2.amazonaws.com"),
        }),
        securityGroup: new ec2.SecurityGroup(this, "GpuInstanceSecurityGroup", { vpc }),
        requireImdsv2: true,
        blockDevices: [
          { deviceName: "/dev/xvda", volume: ec2.BlockDeviceVolume.ebs(100, { encrypted: true }) },
        ],
      }),
      minCapacity: 0,
      maxCapacity: Math.max(1, props.trainWorkers ?? 1),
    });
    const gpuCapacity = new ecs.AsgCapacityProvider(this, "GpuCapacity", { autoScalingGroup: gpuInstances });
    cluster.addAsgCapacityProvider(gpuCapacity);
    const train = new ecs.Ec2TaskDefinition(this, "TrainTask");
    train.addContainer("worker", {
      image: ecs.ContainerImage.fromAsset(repositoryRoot, { file: "infra/Dockerfile.gpu-worker" }),
      gpuCount: 1,
      memoryReservationMiB: 12 * 1024,
      environment: { ...environment, ...drain, PAPA_WORKER_QUEUES: "train", PAPA_BACKEND: "tensorflow" },
      stopTimeout,
      logging: logging("train"),
    });
    new ecs.Ec2Service(this, "TrainWorkers", {
      cluster,
      taskDefinition: train,
      desiredCount: props.trainWorkers ?? 1,
      // One task per GPU: a deployment stops the old task first (its job resumes from its last epoch).
      minHealthyPercent: 0,
      maxHealthyPercent: 100,
      circuitBreaker: { rollback: true },
      capacityProviderStrategies: [{ capacityProvider: gpuCapacity.capacityProviderName, weight: 1 }],
    });

    // Who may read what.
    for (const grantee of [apiFunction, merge.taskRole, train.taskRole]) {
      bucket.grantReadWrite(grantee);
      databaseSecret.grantRead(grantee);
    }
    apiKey.grantRead(apiFunction);
    database.connections.allowDefaultPortFrom(apiFunction, "API");
    database.connections.allowDefaultPortFrom(mergeService, "merge workers");
    database.connections.allowDefaultPortFrom(gpuInstances, "training workers");

    new CfnOutput(this, "ApiUrl", { value: api.apiEndpoint, description: "PAPA_URL for the CLI" });
    new CfnOutput(this, "BucketName", { value: bucket.bucketName });
    new CfnOutput(this, "ApiKeySecretArn", {
      value: apiKey.secretArn,
      description: "aws secretsmanager get-secret-value --secret-id <this> gives PAPA_API_KEY",
    });
  }
}
