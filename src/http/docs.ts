interface Op {
  operationId: string;
  summary?: string;
  description?: string;
  tags?: string[];
  security?: unknown[];
  parameters?: { name?: string; in?: string; required?: boolean; description?: string; $ref?: string }[];
  requestBody?: { content?: Record<string, { schema?: { $ref?: string } }> };
  responses?: Record<string, { description?: string; $ref?: string }>;
}

const html = (text: string) =>
  text.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c,
  );

/**
 * The API reference as one self-contained HTML page, rendered from openapi.yaml on the server:
 * no script, no CDN, nothing fetched by the browser. Operations are grouped by tag, each with
 * its parameters, body and responses.
 */
export function renderDocs(document: unknown): string {
  const doc = document as {
    info: { title: string; version: string; description?: string };
    tags?: { name: string; description?: string }[];
    paths: Record<string, Record<string, Op>>;
    components: {
      parameters: Record<string, { name: string; in: string; required?: boolean; description?: string }>;
    };
  };
  const ops = Object.entries(doc.paths).flatMap(([path, item]) =>
    Object.entries(item)
      .filter(([method]) => ["get", "post", "put", "delete", "patch"].includes(method))
      .map(([method, op]) => ({ path, method: method.toUpperCase(), op })),
  );
  const section = (tag: { name: string; description?: string }) => {
    const rows = ops.filter((o) => (o.op.tags ?? ["other"]).includes(tag.name));
    if (rows.length === 0) return "";
    return `<section><h2>${html(tag.name)}</h2><p>${html(tag.description ?? "")}</p>${rows
      .map(({ path, method, op }) => {
        const params = (op.parameters ?? []).map((p) =>
          p.$ref ? (doc.components.parameters[p.$ref.split("/").pop() ?? ""] ?? { name: p.$ref, in: "" }) : p,
        );
        const body = Object.entries(op.requestBody?.content ?? {})
          .map(
            ([type, media]) =>
              `${html(type)}${media.schema?.$ref ? ` (${html(media.schema.$ref.split("/").pop() ?? "")})` : ""}`,
          )
          .join(", ");
        return `<article id="${html(op.operationId)}" class="operation">
<h3><span class="method">${method}</span> <code>${html(path)}</code></h3>
<p class="summary">${html(op.summary ?? "")}</p>
<p class="meta">operationId <code>${html(op.operationId)}</code>${op.security?.length === 0 ? " - no key needed" : ""}</p>
${op.description ? `<pre class="description">${html(op.description)}</pre>` : ""}
${params.length ? `<table><tr><th>parameter</th><th>in</th><th>required</th><th>description</th></tr>${params.map((p) => `<tr><td><code>${html(p.name ?? "")}</code></td><td>${html(p.in ?? "")}</td><td>${p.required ? "yes" : "no"}</td><td>${html(p.description ?? "")}</td></tr>`).join("")}</table>` : ""}
${body ? `<p>Body: ${body}</p>` : ""}
<ul>${Object.entries(op.responses ?? {})
          .map(
            ([status, r]) =>
              `<li><code>${html(status)}</code> ${html(r.description ?? r.$ref?.split("/").pop() ?? "")}</li>`,
          )
          .join("")}</ul>
</article>`;
      })
      .join("\n")}</section>`;
  };
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>${html(doc.info.title)} API reference</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#1d1d1f}
h2{border-bottom:2px solid #ddd;margin-top:2.5rem}.operation{border:1px solid #e3e3e3;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}
.method{display:inline-block;min-width:4.5rem;font-weight:700;color:#0b5cad}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5rem}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}.meta{color:#666;font-size:13px}
</style></head><body>
<h1>${html(doc.info.title)} <small>${html(doc.info.version)}</small></h1>
<p>The contract: <a href="/openapi.yaml">openapi.yaml</a> (OpenAPI 3.1). ${ops.length} operations.</p>
<pre>${html(doc.info.description ?? "")}</pre>
${(doc.tags ?? []).map(section).join("\n")}
</body></html>`;
}
