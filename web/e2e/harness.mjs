// What the browser tests share: a natter server started from its binary, the
// built page (web/dist) served from another origin (so CORS is exercised),
// headless Chromium through playwright-core, and helpers to drive the page.
//
// Environment: NATTER_BIN (default target/debug/natter of this repo), CHROMIUM
// (default /usr/bin/chromium).
import { test } from "node:test";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { createReadStream, existsSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import http from "node:http";
import path from "node:path";
import readline from "node:readline";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const webDir = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const distDir = path.join(webDir, "dist");
export const artifacts = path.join(webDir, "e2e", "artifacts");
export const natterBin = process.env.NATTER_BIN ? path.resolve(process.env.NATTER_BIN) : path.resolve(webDir, "../target/debug/natter");
const chromiumBin = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const WAIT = 15_000; // the longest any single wait may take

// ---------------------------------------------------------------- the natter server

/**
 * Starts `natter serve` on `port` (0: any) with its data in `dataDir` (and
 * `args` besides) and resolves once it logs its address: { proc, port, log, exited }.
 */
export async function startNatter(dataDir, port = 0, args = []) {
  if (!existsSync(natterBin)) {
    throw new Error(`natter binary not found at ${natterBin}: run \`cargo build -p natter\` or set NATTER_BIN`);
  }
  const proc = spawn(natterBin, [
    "serve", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir, "--log-format", "json",
    "--shutdown-grace", "2s", ...args,
  ], { stdio: ["ignore", "pipe", "pipe"] });
  const log = [];
  const exited = once(proc, "exit");
  const listening = new Promise((resolve, reject) => {
    for (const stream of [proc.stdout, proc.stderr]) {
      readline.createInterface({ input: stream }).on("line", (line) => {
        log.push(line);
        let addr;
        try {
          const rec = JSON.parse(line);
          if (rec.message === "natter listening" || rec.fields?.message === "natter listening") addr = rec.addr ?? rec.fields?.addr;
        } catch {
          addr = /natter listening.*addr=(\S+)/.exec(line.replace(/\x1b\[[0-9;]*m/g, ""))?.[1];
        }
        if (addr) resolve(Number(addr.split(":").pop()));
      });
    }
    exited.then(([code]) => reject(new Error(`natter exited (${code}) before listening:\n${log.join("\n")}`)));
    setTimeout(() => reject(new Error(`natter did not log its address within 30s:\n${log.join("\n")}`)), 30_000).unref();
  });
  const actualPort = await listening;
  return { proc, port: actualPort, log, exited };
}

export async function stopNatter(s) {
  if (!s || s.proc.exitCode !== null || s.proc.signalCode !== null) return;
  s.proc.kill("SIGTERM");
  const timer = setTimeout(() => s.proc.kill("SIGKILL"), 10_000);
  await s.exited;
  clearTimeout(timer);
}

// ---------------------------------------------------------------- the page, from another origin

const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".map": "application/json" };

/** Serves web/dist on a free port of 127.0.0.1; resolves to the http.Server. */
export function serveDist() {
  if (!existsSync(path.join(distDir, "index.html"))) throw new Error(`${distDir} has no index.html: run \`npm run build\` first`);
  const srv = http.createServer((req, res) => {
    const name = new URL(req.url, "http://x").pathname.replace(/^\/$/, "/index.html");
    const file = path.join(distDir, path.normalize(name));
    if (!file.startsWith(distDir + path.sep) || !existsSync(file)) {
      res.writeHead(404).end("not found");
      return;
    }
    res.writeHead(200, { "content-type": types[path.extname(file)] ?? "application/octet-stream" });
    createReadStream(file).pipe(res);
  });
  return new Promise((resolve) => srv.listen(0, "127.0.0.1", () => resolve(srv)));
}

/** The page's address on `staticServer`, talking to natter on `natterPort`. */
export const pageUrlOf = (staticServer, natterPort) =>
  `http://127.0.0.1:${staticServer.address().port}/?server=http://127.0.0.1:${natterPort}`;

// ---------------------------------------------------------------- the browser

export const launchBrowser = () =>
  chromium.launch({
    executablePath: chromiumBin,
    timeout: 30_000,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });

/** A person with a page of their own (own storage); uncaught page errors go to `pageErrors`. */
export async function newPerson(browser, url, label, pageErrors) {
  const context = await browser.newContext({ viewport: { width: 1000, height: 700 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT);
  page.on("pageerror", (err) => pageErrors.push(`${label}: ${err.stack ?? err}`));
  page.on("console", (msg) => {
    if (msg.type() === "error" || msg.type() === "warning") console.log(`  [${label} console.${msg.type()}] ${msg.text()}`);
  });
  await page.goto(url);
  return page;
}

/** The rendered conversation: [{seq, text}] top to bottom (sent messages only). */
export const conversation = (page) =>
  page.$$eval("#messages .message", (items) =>
    items.map((li) => ({ seq: li.dataset.seq ? Number(li.dataset.seq) : null, text: li.querySelector(".text").textContent })),
  );

export const escapeRe = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Waits until the open conversation shows a sent message with exactly this text. */
export const waitForMessage = (page, text) =>
  page.locator("#messages .message[data-seq] .text", { hasText: new RegExp(`^${escapeRe(text)}$`) }).waitFor();

export async function send(page, text) {
  await page.fill("#composer", text);
  await page.press("#composer", "Enter");
  await waitForMessage(page, text);
}

export async function signUp(page, person) {
  await page.fill("#username", person.name);
  await page.fill("#password", person.password);
  await page.click("#register");
  await page.locator("#me", { hasText: person.name }).waitFor();
}

export const chatItem = (page, name) => page.locator(".chat-item", { has: page.locator(".chat-name", { hasText: name }) });

export async function openChatWith(page, name) {
  await chatItem(page, name).click();
  await page.locator("#chat-title", { hasText: name }).waitFor();
}

// ---------------------------------------------------------------- the story

/**
 * A story told in steps: once one fails the rest are skipped, not piled on,
 * and every page `pages()` names ([[who, page]]) is screenshotted to
 * e2e/artifacts/failure-<who>.png. `story.failed` says whether one failed.
 */
export function story(pages) {
  const s = {
    failed: false,
    step(name, fn) {
      test(name, { timeout: 120_000 }, async (t) => {
        if (s.failed) return t.skip("an earlier step failed");
        try {
          await fn(t);
        } catch (err) {
          s.failed = true;
          await mkdir(artifacts, { recursive: true });
          for (const [who, page] of pages()) {
            await page?.screenshot({ path: path.join(artifacts, `failure-${who}.png`) }).catch(() => {});
          }
          throw err;
        }
      });
    },
  };
  return s;
}
