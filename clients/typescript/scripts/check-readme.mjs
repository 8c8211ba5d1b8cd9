// Type-checks every ```ts example of README.md against the built package, as
// an ES module of a user's project would see it (`import ... from
// "@streamer/client"`). Run after `tsc`; fails on any type error.
import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "build-test", "readme");
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });

const readme = readFileSync(join(root, "README.md"), "utf8");
const blocks = [...readme.matchAll(/^```ts\n([\s\S]*?)^```$/gm)].map((match) => match[1]);
if (blocks.length === 0) {
  throw new Error("README.md has no ```ts examples");
}
const files = blocks.map((code, index) => {
  const file = `example-${index + 1}.mts`;
  writeFileSync(join(out, file), code);
  return file;
});
writeFileSync(
  join(out, "tsconfig.json"),
  JSON.stringify({
    compilerOptions: {
      target: "ES2022",
      lib: ["ES2022"],
      module: "NodeNext",
      moduleResolution: "NodeNext",
      types: ["node"],
      typeRoots: [join(root, "node_modules", "@types")],
      strict: true,
      noEmit: true,
      skipLibCheck: true,
    },
    files,
  }),
);
try {
  execFileSync(join(root, "node_modules", ".bin", "tsc"), ["-p", out], { encoding: "utf8", stdio: "pipe" });
} catch (error) {
  process.stderr.write(`README.md's examples do not type-check (${out}):\n${error.stdout}${error.stderr}`);
  process.exit(1);
}
console.log(`README.md: ${blocks.length} examples type-check`);
