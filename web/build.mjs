// Bundles src/ into dist/: index.html, app.js, style.css. dist/ is committed
// and compiled into natter (crates/kit/src/web_page.rs): no source map, so a
// page change stays a small diff; `SOURCEMAP=1 npm run bundle` for debugging.
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

const outdir = new URL("./dist/", import.meta.url);
await rm(outdir, { recursive: true, force: true });
await mkdir(outdir, { recursive: true });
await build({
  entryPoints: ["src/app.ts"],
  outfile: "dist/app.js",
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  sourcemap: process.env.SOURCEMAP === "1",
  logLevel: "info",
});
for (const file of ["index.html", "style.css"]) {
  await copyFile(new URL(`./src/${file}`, import.meta.url), new URL(file, outdir));
}
