// The package as a plain Node project sees it: `import` and `require`.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, test } from "node:test";

const root = resolve(__dirname, "..");
const project = mkdtempSync(join(tmpdir(), "streamer-client-consumer-"));
mkdirSync(join(project, "node_modules", "@streamer"), { recursive: true });
symlinkSync(root, join(project, "node_modules", "@streamer", "client"), "dir");
writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true }));

after(() => rmSync(project, { recursive: true, force: true }));

const names = ["ConnectionsClient", "ProgressClient", "StreamerError", "RetryableError", "HandlerError", "JobAborted", "text"];

function run(file: string, source: string): string {
  writeFileSync(join(project, file), source);
  return execFileSync(process.execPath, [file], { cwd: project, encoding: "utf8" }).trim();
}

test("named imports work from an ES module", () => {
  const out = run(
    "esm.mjs",
    `import { ${names.join(", ")} } from "@streamer/client";\n` +
      `console.log([${names.join(", ")}].map((x) => typeof x).join(","));\n`,
  );
  assert.equal(out, names.map(() => "function").join(","));
});

test("require works from CommonJS", () => {
  const out = run(
    "cjs.cjs",
    `const client = require("@streamer/client");\n` +
      `console.log(${JSON.stringify(names)}.map((n) => typeof client[n]).join(","));\n`,
  );
  assert.equal(out, names.map(() => "function").join(","));
});
