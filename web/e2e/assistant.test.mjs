// End-to-end test of the page's assistant chat: natter with its assistant on
// natter-llm's scripted OpenAI-compatible server (every request streams the
// same reply, a few characters every 40 ms), the built page from another
// origin, one person in headless Chromium: a reply streams in, is reloaded,
// stopped mid-stream, rerun with an edited prompt, and the replaced replies
// are listed as older versions; a pinned reply that a reload replaces is
// shown from the Pinned panel among them; then, in a group with the assistant, its
// owner has it answer every message, then none, while a member who may not
// change it watches.
//
//   cargo build -p natter-llm --features testing --example scripted_llm
//   npm run build && npm run test:e2e
//
// Environment: SCRIPTED_LLM_BIN (default target/debug/examples/scripted_llm
// of this repo), and as e2e/harness.mjs: NATTER_BIN, CHROMIUM;
// NATTER_UPDATE_SCREENSHOT=1 to refresh web/screenshot-assistant.png.
import { after, before } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import readline from "node:readline";
import {
  artifacts, chatItem, conversation, escapeRe, launchBrowser, newPerson, pageUrlOf, send, serveDist, signUp, startNatter,
  stopNatter, story, waitForMessage, webDir,
} from "./harness.mjs";

const llmBin = process.env.SCRIPTED_LLM_BIN
  ? path.resolve(process.env.SCRIPTED_LLM_BIN)
  : path.resolve(webDir, "../target/debug/examples/scripted_llm");
/** What the scripted server answers to everything. */
const REPLY = "natter is a chat backend: gRPC services for sessions, chats, messages and this assistant.";
const ada = { name: `ada-${Math.random().toString(36).slice(2, 8)}`, password: "analytical engine" };
const bea = { name: `bea-${Math.random().toString(36).slice(2, 8)}`, password: "difference engine" };

let llm; // { proc, url }
let dataDir;
let server;
let staticServer;
let browser;
let page;
let beaPage; // a member of ada's group, neither its owner nor an admin
const pageErrors = [];
const tale = story(() => [["assistant-ada", page], ["assistant-bea", beaPage]]);
const step = tale.step;

/** Starts the scripted model server; it prints its base URL on its first line. */
async function startScriptedLlm() {
  if (!existsSync(llmBin)) {
    throw new Error(
      `scripted_llm not found at ${llmBin}: run \`cargo build -p natter-llm --features testing --example scripted_llm\` or set SCRIPTED_LLM_BIN`,
    );
  }
  const proc = spawn(llmBin, [], { stdio: ["ignore", "pipe", "inherit"] });
  const lines = readline.createInterface({ input: proc.stdout });
  const [url] = await Promise.race([
    once(lines, "line"),
    once(proc, "exit").then(([code]) => { throw new Error(`scripted_llm exited (${code}) before printing its URL`); }),
  ]);
  return { proc, url: url.trim() };
}

// The page's parts this test looks at.
const replies = () => page.locator("#messages .message.reply");
const replyWith = (status) => page.locator(`#messages .message.reply[data-status="${status}"]`);
const textOf = (locator) => locator.locator(".text").textContent();

/** The sent message with exactly `text`, and its seq. */
const messageWith = (text) =>
  page.locator("#messages .message[data-seq]", { has: page.locator(".text", { hasText: new RegExp(`^${escapeRe(text)}$`) }) });
const seqOf = (text) => messageWith(text).getAttribute("data-seq");
/** The reply (any version) to the prompt with seq `seq`. */
const replyTo = (seq) => page.locator(`#messages .message.reply[data-reply-to="${seq}"]`);

/** Sets the open group's "Assistant answers" and waits until the server has it. */
async function setAssistantReplies(value) {
  await page.selectOption("#assistant-replies", value);
  await page.locator(`#assistant-replies[data-saved="${value}"]:not([disabled])`).waitFor();
}

/** Waits for a reply being written that shows some text, and returns that text. */
async function partialReply() {
  const writing = replyWith("generating");
  await writing.locator(".text", { hasText: /\S/ }).waitFor();
  await writing.locator(".gen-status", { hasText: "writing…" }).waitFor();
  return textOf(writing);
}

/** Asserts `text` is some but not all of the scripted reply. */
function assertPartial(text, what) {
  assert.ok(text.length > 0 && text.length < REPLY.length && REPLY.startsWith(text), `${what}: ${JSON.stringify(text)}`);
}

before(async () => {
  llm = await startScriptedLlm();
  dataDir = await mkdtemp(path.join(tmpdir(), "natter-e2e-assistant-"));
  server = await startNatter(dataDir, 0, ["--assistant-base-url", llm.url]);
  staticServer = await serveDist();
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close().catch(() => {});
  staticServer?.close();
  await stopNatter(server);
  llm?.proc.kill();
  if (tale.failed && server) console.log(`natter log (last 40 lines):\n${server.log.slice(-40).join("\n")}`);
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
});

step("ada opens her assistant chat from the chat list", async () => {
  page = await newPerson(browser, pageUrlOf(staticServer, server.port), "ada", pageErrors);
  await signUp(page, ada);
  await page.click("#open-assistant");
  await page.locator("#chat-title", { hasText: "Assistant" }).waitFor();
  await chatItem(page, "Assistant").locator(".bot").waitFor(); // the assistant is a bot
  assert.equal(await page.getAttribute("#composer", "placeholder"), "Ask the assistant");
  await page.locator("#history-toggle").waitFor();
  assert.equal(await page.locator("#assistant-notice").isHidden(), true);
});

step("a prompt gets a reply that streams in and ends complete", async () => {
  await send(page, "What is natter?");
  // The reply starts empty; text while it is still being written came by message_delta.
  assertPartial(await partialReply(), "the reply while it streams");
  await mkdir(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "assistant-writing.png") });
  await replyWith("complete").waitFor();
  assert.equal(await textOf(replyWith("complete")), REPLY);
  assert.equal(await replyWith("complete").locator(".gen-status").count(), 0, "no label on a complete reply");
  await replyWith("complete").locator("[data-testid=reload]").waitFor();
  await page.locator("#messages .message.mine [data-testid=edit-rerun]").waitFor();
});

step("after its first reply the assistant chat is titled with the prompt (and shows the reply)", async () => {
  const titled = chatItem(page, "What is natter?");
  await titled.locator(".bot").waitFor(); // still the assistant's chat
  await titled.locator(".chat-excerpt", { hasText: "natter is a chat backend" }).waitFor();
  await page.locator("#chat-title", { hasText: "What is natter?" }).waitFor();
});

step("reload, then stop the new reply while it streams: it keeps its text so far", async () => {
  await replyWith("complete").locator("[data-testid=reload]").click();
  await partialReply();
  assert.equal(await replies().count(), 1, "the replaced reply is hidden");
  await replyWith("generating").locator("[data-testid=stop]").click();
  const stopped = replyWith("stopped");
  await stopped.locator(".gen-status", { hasText: "stopped" }).waitFor();
  const text = await textOf(stopped);
  assertPartial(text, "the stopped reply");
  await page.waitForTimeout(300);
  assert.equal(await textOf(stopped), text, "nothing is added after the stop");
  assert.equal(await stopped.locator("[data-testid=stop]").count(), 0);
  await stopped.locator("[data-testid=reload]").waitFor(); // the latest reply, finished
});

step("older versions: the first reply is listed as one", async () => {
  await page.check("#show-history");
  const older = page.locator("#messages .message.superseded");
  await older.waitFor();
  assert.equal(await older.count(), 1);
  assert.equal(await textOf(older), REPLY);
  await older.locator(".older", { hasText: "older version" }).waitFor();
  assert.equal(await older.locator("button").count(), 0, "no actions on an older version");
  const shown = await conversation(page);
  assert.deepEqual(shown.map((m) => m.seq), [1, 2, 3]);
  assert.equal(shown[0].text, "What is natter?");
  assert.equal(await page.locator('#messages .message[data-seq="3"]').getAttribute("data-status"), "stopped");

  await mkdir(artifacts, { recursive: true });
  await page.screenshot({ path: path.join(artifacts, "assistant.png") });
  if (process.env.NATTER_UPDATE_SCREENSHOT === "1") {
    await copyFile(path.join(artifacts, "assistant.png"), path.join(webDir, "screenshot-assistant.png"));
  }
});

step("edit & rerun: the prompt is edited and answered again", async () => {
  page.once("dialog", (dialog) => dialog.accept("What is natter, in one line?"));
  await page.click("#messages .message.mine [data-testid=edit-rerun]");
  await waitForMessage(page, "What is natter, in one line?");
  await page.locator('#messages .message[data-seq="1"] .meta', { hasText: "edited" }).waitFor();
  await partialReply();
  await page.locator("#messages .message.reply:not(.superseded)[data-status=complete]").waitFor();
  assert.equal(await page.locator("#messages .message.superseded").count(), 2, "both replaced replies are older versions");
  await page.uncheck("#show-history");
  assert.equal(await replies().count(), 1);
  assert.equal(await textOf(replies()), REPLY);
});

step("after a reload the chat shows the prompt and its latest reply", async () => {
  await page.reload();
  await page.locator("#me", { hasText: ada.name }).waitFor();
  // Titled once: the edited prompt did not rename it.
  await chatItem(page, "What is natter?").click();
  await page.locator("#chat-title", { hasText: "What is natter?" }).waitFor();
  await replyWith("complete").waitFor();
  assert.deepEqual(await conversation(page), [
    { seq: 1, text: "What is natter, in one line?" },
    { seq: 4, text: REPLY },
  ]);
});

step("a pinned reply that a Reload replaces stays among the pins: the Pinned panel calls it an older version, and a click on it shows it among the older versions", async () => {
  const pinned = replyWith("complete"); // the chat's latest reply, seq 4
  const seq = await pinned.getAttribute("data-seq");
  await pinned.locator("[data-testid=pin]").click();
  await pinned.locator("[data-testid=pinned-by]", { hasText: `📌 Pinned by ${ada.name}` }).waitFor();
  await page.click("[data-testid=open-pinned]");
  const item = page.locator(`#pinned-list [data-testid=pinned-item][data-seq="${seq}"]`);
  await item.waitFor();
  await page.locator('[data-testid=open-pinned][data-count="1"]').waitFor();

  await pinned.locator("[data-testid=reload]").click();
  await partialReply();
  const latest = page.locator(`#messages .message.reply[data-status=complete]:not([data-seq="${seq}"])`);
  await latest.waitFor();
  assert.equal(await replies().count(), 1, "the replaced reply is hidden from the timeline");
  assert.equal(await page.isChecked("#show-history"), false);
  // Still pinned: listed, as an older version, with its Unpin; counted.
  await item.locator(".meta", { hasText: "older version" }).waitFor();
  assert.equal(await page.locator("#pinned-list [data-testid=pinned-item]").count(), 1);
  await item.locator("[data-testid=unpin]").waitFor();
  assert.equal(await page.getAttribute("[data-testid=open-pinned]", "data-count"), "1");
  // So the server lists it (ListMessages pinned) for a fresh page too.
  await page.reload();
  await page.locator("#me", { hasText: ada.name }).waitFor();
  await chatItem(page, "What is natter?").click();
  await latest.waitFor();
  await page.click("[data-testid=open-pinned]");
  await item.locator(".meta", { hasText: "older version" }).waitFor();
  assert.equal(await replies().count(), 1);

  // A click shows it where it is: among the older versions, turned on, marked for a moment and in view.
  await item.locator(".text").click();
  const older = page.locator(`#messages .message.superseded[data-seq="${seq}"]`);
  await older.locator(".older", { hasText: "older version" }).waitFor();
  await older.locator("[data-testid=pinned-by]").waitFor();
  assert.equal(await page.isChecked("#show-history"), true, "older versions are shown");
  await page.locator(`#messages .message.superseded.flash[data-seq="${seq}"]`).waitFor();
  await page.waitForFunction((want) => {
    const pane = document.getElementById("messages-pane").getBoundingClientRect();
    const shown = document.querySelector(`#messages [data-seq="${want}"]`)?.getBoundingClientRect();
    return !!shown && shown.top >= pane.top && shown.bottom <= pane.bottom;
  }, seq, { polling: 100 });
  assert.equal(await page.locator("#error").isHidden(), true);

  // Its Unpin in the timeline takes it off the pins; no Pin comes back on an older version.
  await older.locator("[data-testid=unpin]").click();
  await page.locator("[data-testid=pinned-empty]").waitFor();
  await older.locator("[data-testid=pinned-by]").waitFor({ state: "detached" });
  assert.equal(await older.locator("[data-testid=pin]").count(), 0);
  await page.click("[data-testid=close-pinned]");
  await page.uncheck("#show-history");
  assert.equal(await replies().count(), 1);
  assert.equal(await page.locator("#error").isHidden(), true);
});

step("in a group with the assistant, set to every message, a plain message gets a streamed reply", async () => {
  beaPage = await newPerson(browser, pageUrlOf(staticServer, server.port), "bea", pageErrors);
  await signUp(beaPage, bea);
  await page.fill("#new-group-title", "Team");
  await page.fill("#new-group-members", `assistant, ${bea.name}`);
  await page.click("#new-group");
  await page.locator("#chat-title", { hasText: "Team" }).waitFor();
  await page.locator("#assistant-replies-control").waitFor();
  assert.equal(await page.inputValue("#assistant-replies"), "mentions", "the default");
  assert.equal(await page.isEnabled("#assistant-replies"), true, "its owner may change it");
  await setAssistantReplies("all");
  // bea sees the setting, and may not change it.
  await chatItem(beaPage, "Team").click();
  await beaPage.locator('#assistant-replies[data-saved="all"]').waitFor();
  assert.equal(await beaPage.isDisabled("#assistant-replies"), true, "only the owner or an admin may change it");
  await send(page, "good morning, team");
  const prompt = await seqOf("good morning, team");
  assertPartial(await partialReply(), "the group's reply while it streams");
  await replyWith("complete").waitFor();
  assert.equal(await replyWith("complete").getAttribute("data-reply-to"), prompt);
  assert.equal(await textOf(replyWith("complete")), REPLY);
  await beaPage.locator(`#messages .message.reply[data-reply-to="${prompt}"][data-status="complete"]`).waitFor();
});

step("set to nothing, a message gets no reply (seen once a later mention is answered)", async () => {
  await setAssistantReplies("off");
  await beaPage.locator('#assistant-replies[data-saved="off"]').waitFor(); // live, from chat_updated
  await send(page, "nobody answers this");
  const unanswered = await seqOf("nobody answers this");
  // The assistant takes a chat's messages in order, and answers them in
  // order: once it has answered a later one, it has passed this one over.
  await setAssistantReplies("mentions");
  await send(page, "@assistant but this, please");
  const asked = await seqOf("@assistant but this, please");
  await page.locator(`#messages .message.reply[data-reply-to="${asked}"][data-status="complete"]`).waitFor();
  assert.equal(await replyTo(unanswered).count(), 0, "no reply to the message sent while it was off");
  const answeredSeqs = await replies().evaluateAll((items) => items.map((li) => li.dataset.replyTo));
  assert.deepEqual(answeredSeqs, [await seqOf("good morning, team"), asked]);
  // As the store has it, after a reload.
  await page.reload();
  await page.locator("#me", { hasText: ada.name }).waitFor();
  await chatItem(page, "Team").click();
  await page.locator(`#messages .message.reply[data-reply-to="${asked}"]`).waitFor();
  assert.equal(await replies().count(), 2);
  assert.equal(await replyTo(unanswered).count(), 0);
  assert.equal(await page.getAttribute("#assistant-replies", "data-saved"), "mentions");
});

step("no uncaught errors in the page", () => {
  assert.deepEqual(pageErrors, []);
});
