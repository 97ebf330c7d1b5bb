import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

/**
 * The API reference: Swagger UI (the npm package swagger-ui-dist), served from this origin and
 * rendering /openapi.yaml in the browser, with try-it. Every URL is relative, so that the page
 * also works behind a path prefix (an API Gateway stage).
 */
export const DOCS_PAGE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>papa-service API reference</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/papa-docs.js"></script>
</body>
</html>
`;

/**
 * Starts Swagger UI on the page: bodies as their fields (the schema, not an example), a link to
 * an operation (`/docs#/trainings/createTraining`) opens it, `?docExpansion=full` opens every
 * operation; the online validator is off, so nothing is fetched elsewhere.
 */
const INIT_SCRIPT = `window.ui = SwaggerUIBundle({
  url: "openapi.yaml",
  dom_id: "#swagger-ui",
  deepLinking: true,
  docExpansion: new URLSearchParams(location.search).get("docExpansion") || "list",
  defaultModelsExpandDepth: 1,
  defaultModelRendering: "model",
  persistAuthorization: true,
  validatorUrl: null,
});
`;

/** The files the page loads, by name, with their media types. */
export const DOCS_ASSETS = {
  "swagger-ui.css": "text/css; charset=utf-8",
  "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
  "papa-docs.js": "text/javascript; charset=utf-8",
} as const;

export type DocsAsset = keyof typeof DOCS_ASSETS;

const loaded = new Map<DocsAsset, Promise<string>>();

/** An asset's text, read from swagger-ui-dist at its first request and kept. */
export function docsAsset(name: DocsAsset): Promise<string> {
  let text = loaded.get(name);
  if (text === undefined) {
    if (name === "papa-docs.js") {
      text = Promise.resolve(INIT_SCRIPT);
    } else {
      const dist = dirname(createRequire(import.meta.url).resolve("swagger-ui-dist/package.json"));
      // A failed read is not kept: the next request tries again.
      text = readFile(join(dist, name), "utf8").catch((err: unknown) => {
        loaded.delete(name);
        throw err;
      });
    }
    loaded.set(name, text);
  }
  return text;
}
