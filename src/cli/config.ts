import { CliFailure } from "./remote.js";

export interface CliConfig {
  url: string;
  apiKey: string | undefined;
}

/**
 * The CLI's server and key: flags win, then PAPA_URL / PAPA_API_KEY, then the config file
 * (`$XDG_CONFIG_HOME/papa/config.json` or `~/.config/papa/config.json`: {"url", "api_key"}),
 * then http://127.0.0.1:8080.
 */
export function loadCliConfig(
  flags: { url?: string | undefined; key?: string | undefined },
  readFile: (path: string) => string | null,
  env: Record<string, string | undefined> = process.env,
): CliConfig {
  const dir = env.XDG_CONFIG_HOME ?? `${env.HOME ?? ""}/.config`;
  const text = readFile(`${dir}/papa/config.json`);
  let file: { url?: unknown; api_key?: unknown } = {};
  if (text) {
    try {
      file = JSON.parse(text) as typeof file;
    } catch {
      throw new CliFailure(`${dir}/papa/config.json is not valid JSON`);
    }
  }
  const str = (v: unknown) => (typeof v === "string" && v !== "" ? v : undefined);
  return {
    url: flags.url ?? str(env.PAPA_URL) ?? str(file.url) ?? "http://127.0.0.1:8080",
    apiKey: flags.key ?? str(env.PAPA_API_KEY) ?? str(file.api_key),
  };
}
