import { describe, expect, it } from "vitest";
import { startThread, ThreadCalls, ThreadService } from "../src/threads.js";

type Request = { op: "echo" | "fail" | "late" | "die"; value: number };
// `startThread` loads the thread named beside `base`, from TypeScript when `base` is a `.ts` file.
const base = new URL("./helpers/echo-thread.ts", import.meta.url).href;

describe("threads", () => {
  it("answers each call with its own reply, a thrown error with its fields, and goes on serving", async () => {
    const service = new ThreadService<Request, number>(base, "echo-thread");
    const late = service.run({ op: "late", value: 1 });
    const failed = service.run({ op: "fail", value: 2 }).catch((err: Error & { code?: string }) => err);
    expect(await service.run({ op: "echo", value: 3 })).toBe(3);
    const err = await failed;
    expect(err).toBeInstanceOf(Error);
    expect([(err as Error).message, (err as { code?: string }).code]).toEqual(["refused 2", "E_TEST"]);
    expect(await late).toBe(1);
  });

  it("fails the calls in flight when its thread dies, and starts a new thread for the next", async () => {
    const service = new ThreadService<Request, number>(base, "echo-thread");
    const late = service.run({ op: "late", value: 1 });
    await expect(service.run({ op: "die", value: 0 })).rejects.toThrow(
      "the echo-thread thread exited with code 3",
    );
    await expect(late).rejects.toThrow("exited with code 3");
    expect(await service.run({ op: "echo", value: 4 })).toBe(4);
  });

  it("resolves idle once the calls in flight have their replies, and fails every call after its death", async () => {
    const calls = new ThreadCalls<Request, number>(
      startThread(base, "echo-thread"),
      (code) => new Error(`gone ${code}`),
    );
    await calls.idle();
    const replies: number[] = [];
    for (const value of [5, 6]) void calls.call({ op: "late", value }).then((r) => replies.push(r));
    await calls.idle();
    expect(replies).toEqual([5, 6]);
    await expect(calls.call({ op: "die", value: 0 })).rejects.toThrow("gone 3");
    await expect(calls.call({ op: "echo", value: 7 })).rejects.toThrow("gone 3");
  });
});
