// Bundles page/scenario.js for the browser once per matrix-js-sdk version, with esbuild:
//
//   node build.mjs OUT_DIR     ->  OUT_DIR/index.html, scenario-37.js, scenario-43.js
//
// "matrix-js-sdk" in scenario.js is aliased to the npm alias of each version
// (package.json: matrix-js-sdk-37 = matrix-js-sdk@37.5.0, matrix-js-sdk-43 = @43.0.0), so
// both pages run the same code. Run by tests/test_browser_synapse.py before the browser starts.

import { copyFileSync, mkdirSync, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const outDir = resolve(process.argv[2] ?? "");
if (!process.argv[2]) {
    console.error("usage: node build.mjs OUT_DIR");
    process.exit(2);
}
mkdirSync(outDir, { recursive: true });

for (const sdk of ["37", "43"]) {
    const alias = `matrix-js-sdk-${sdk}`;
    const { version } = JSON.parse(readFileSync(join(here, "node_modules", alias, "package.json"), "utf8"));
    await build({
        absWorkingDir: here,
        entryPoints: ["page/scenario.js"],
        outfile: join(outDir, `scenario-${sdk}.js`),
        bundle: true,
        format: "esm",
        // The SDK's package.json "browser" field (lib/browser-index.js) is the entry point.
        platform: "browser",
        alias: { "matrix-js-sdk": alias },
        define: { SDK_VERSION: JSON.stringify(version) },
        logLevel: "warning",
    });
}
copyFileSync(join(here, "page", "index.html"), join(outDir, "index.html"));
console.log(JSON.stringify({ outDir, files: ["index.html", "scenario-37.js", "scenario-43.js"] }));
