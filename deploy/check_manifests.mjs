// Checks deploy/k8s/*.yaml: Kubernetes objects against Kubernetes' own OpenAPI schemas (the
// kubernetes-models package), KServe objects for the fields KServe requires (its schemas are not
// here), and every container of either against the server: its flags are http_server's, its
// probes are the Open Inference Protocol's health endpoints.
// usage: node deploy/check_manifests.mjs HTTP_SERVER_HELP_FILE MANIFEST...
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const [helpFile, ...files] = process.argv.slice(2);
const flags = new Set([...readFileSync(helpFile, "utf8").matchAll(/^\s+--([a-z-]+) /gm)].map((m) => m[1]));
if (flags.size === 0) throw new Error(`no flags in ${helpFile}: expected http_server --help output`);
let failures = 0, checked = 0;
const fail = (where, message) => { console.log(`FAIL ${where}: ${message}`); failures++; };

function checkContainer(where, c) {
  for (const a of c.args ?? []) {
    if (typeof a === "string" && a.startsWith("--") && !flags.has(a.slice(2)))
      fail(where, `container '${c.name}': http_server has no flag ${a}`);
  }
  for (const probe of ["readinessProbe", "livenessProbe"]) {
    const path = c[probe]?.httpGet?.path;
    const want = probe === "readinessProbe" ? "/v2/health/ready" : "/v2/health/live";
    if (path !== undefined && path !== want) fail(where, `${probe} expected ${want}, got ${path}`);
  }
}

// What KServe requires of its two kinds (from its API reference).
const kserve = {
  "serving.kserve.io/v1alpha1/ServingRuntime": (o, where) => {
    if (!Array.isArray(o.spec?.containers) || o.spec.containers.length === 0)
      fail(where, "spec.containers: expected at least one container");
    if (!Array.isArray(o.spec?.supportedModelFormats) || o.spec.supportedModelFormats.length === 0)
      fail(where, "spec.supportedModelFormats: expected at least one format");
    if (!(o.spec?.protocolVersions ?? []).includes("v2"))
      fail(where, "spec.protocolVersions: expected v2 (the Open Inference Protocol)");
    return o.spec?.containers ?? [];
  },
  "serving.kserve.io/v1beta1/InferenceService": (o, where) => {
    const m = o.spec?.predictor?.model;
    if (!m?.modelFormat?.name) fail(where, "spec.predictor.model.modelFormat.name: expected a format");
    if (!m?.storageUri) fail(where, "spec.predictor.model.storageUri: expected a URI");
    return [];
  },
};
const runtimes = new Map(), services = [];

for (const file of files) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) { fail(file, doc.errors[0].message); continue; }
    const o = doc.toJS();
    if (o === null) continue;
    const where = `${file}: ${o.kind} ${o.metadata?.name}`;
    checked++;
    const key = `${o.apiVersion}/${o.kind}`;
    if (kserve[key]) {
      for (const c of kserve[key](o, where)) checkContainer(where, c);
      if (o.kind === "ServingRuntime") runtimes.set(o.metadata.name, o);
      else services.push([where, o]);
      continue;
    }
    const group = o.apiVersion.includes("/") ? o.apiVersion : `v1`;
    let Model;
    try {
      ({ [o.kind]: Model } = await import(`kubernetes-models/${group}/${o.kind}`));
    } catch (e) {
      fail(where, `no Kubernetes schema for ${key}`);
      continue;
    }
    try {
      new Model(o).validate();
    } catch (e) {
      fail(where, e.message);
    }
    for (const c of o.spec?.template?.spec?.containers ?? []) checkContainer(where, c);
  }
}
for (const [where, o] of services) {
  const m = o.spec.predictor.model, rt = runtimes.get(m.runtime);
  if (m.runtime && !rt) fail(where, `runtime '${m.runtime}': not among this check's ServingRuntimes`);
  if (rt && !rt.spec.supportedModelFormats.some((f) => f.name === m.modelFormat.name))
    fail(where, `modelFormat '${m.modelFormat.name}': runtime '${m.runtime}' does not support it`);
}
console.log(`${checked} objects checked, ${failures} failures`);
if (checked === 0 || failures > 0) process.exit(1);
