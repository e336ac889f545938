// The natter chat page: sign-in, chat list, one open conversation, the live
// event stream and the assistant's streamed replies. Plain DOM; all server
// calls go through ./api.
import { create } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import * as api from "./api";
import { UserKind, UserSchema, type User } from "./gen/natter/sessions/v1/sessions_pb";
import { ChatKind, DirectChats, GroupAdds, LastMessageSchema, ReadReceipts, MemberRole, type Chat, type Member } from "./gen/natter/chats/v1/chats_pb";
import {
  AccountChange,
  AssistantReplies,
  GenerationStatus,
  MembershipChange,
  MessageRole,
  PresenceState,
  SortOrder as MessageOrder,
  type Message,
  type MessageDelta,
  type Presence,
  type StreamEventsResponse,
  type UserUpdated,
} from "./gen/natter/messages/v1/messages_pb";
import { RegenerateMode } from "./gen/natter/assistant/v1/assistant_pb";

const PAGE_SIZE = 30;
const el = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const input = (id: string) => el<HTMLInputElement>(id);

// ---------------------------------------------------------------- state

let me: User | null = null;
const users = new Map<string, User>(); // user id -> user
/** The ids BatchGetUsers no longer knows: deleted accounts. */
const deletedUsers = new Set<string>();
const chats = new Map<string, Chat>(); // chat id -> chat (with preview)
const peers = new Map<string, string>(); // direct chat id -> the other member's id
const fetchingChats = new Map<string, Promise<void>>(); // chats being fetched after a stream event
/** Group chats' members as this page last read them (ListMembers, when the group is opened), and our role there. */
const groupMembers = new Map<string, { ids: string[]; role: MemberRole }>();
/** Per chat, the newest seq delivered (list snapshot, then the stream): the resume point. */
const lastSeq = new Map<string, bigint>();
/** Read receipts of the chats opened: chat id -> member id -> the seq they have read up to. */
const readBy = new Map<string, Map<string, bigint>>();
/**
 * Per chat, the highest change_seq the stream delivered: the resume point
 * (`resume_changes`), under which every edit, delete and membership change
 * missed while away is replayed once. A chat with no event yet resumes by
 * its newest seq (the compatibility `resume`), which replays the same from
 * that message on.
 */
const lastChange = new Map<string, bigint>();
let stream: AbortController | null = null;
/** A ClaimAccount under way: it ends the guest's token before its answer brings the account's. */
let claiming: Promise<void> | null = null;

/** Per chat, who is typing (user id -> until, ms since the epoch): see SetTyping. */
const typers = new Map<string, Map<string, number>>();
/** The presence of the people of our direct chats (GetPresence, presence_changed). */
const presence = new Map<string, { online: boolean; lastSeen?: Date }>();
/** When this page last told the server we are typing, per chat (ms). */
const typingSent = new Map<string, number>();
/** How often to renew our own indicator while typing (it lasts 5 s). */
const TYPING_RENEW_MS = 3_000;

interface Pending {
  id: string;
  chatId: string;
  text: string;
  mentionUserIds: string[];
  /** Set for a reply in a thread. */
  threadRootSeq?: bigint;
  error?: string;
}
const pending = new Map<string, Pending>(); // client message id -> unsent message

/**
 * The open chat: its messages by seq, and the token of the page before
 * them. `heard` holds the changes (edits, deletions, reactions, a reply's
 * end) the stream brought for messages not held yet: one to a message of a
 * page still on its way (the chat opening, an older page loading) is laid
 * over that page when it comes, the newer state winning (change_seq).
 */
interface OpenChat {
  id: string;
  messages: Map<bigint, Message>;
  olderToken: string;
  loadingOlder: boolean;
  heard: Map<bigint, Message>;
}

/** Holds a page of `state`'s messages, with what the stream told of them meanwhile. */
function putPage(state: OpenChat, page: Message[]) {
  for (const m of page) {
    putMessage(state, m);
    const heard = state.heard.get(m.seq);
    if (heard) {
      putMessage(state, heard);
      state.heard.delete(m.seq);
    }
  }
}
let open: OpenChat | null = null;
/** The thread shown in the side panel: its chat, its root's seq and its replies by seq. */
let thread: { chatId: string; rootSeq: bigint; replies: Map<bigint, Message> } | null = null;
/** List superseded assistant replies too (ListMessages include_history): "show older versions". */
let showHistory = false;

/**
 * The open chat's pinned messages: ListMessages(pinned) when the chat is
 * opened and whenever the stream reconnects, kept live from its
 * message_edited and message_deleted events and this page's own pins and
 * unpins. `known` holds each message of the chat heard of since, pinned or
 * not, as last changed (change_seq), with the count of `pinsHeard` when it
 * was heard: a read started before a pin or unpin heard since does not undo
 * it. `read` is false until the first read is answered.
 */
interface Pins { chatId: string; known: Map<string, { m: Message; heard: number }>; read: boolean }
let pins: Pins | null = null;
/** Counts the messages noted in `pins`, events and answers alike. */
let pinsHeard = 0;
/** Whether the Pinned side panel is open (on the open chat's pins). */
let pinnedOpen = false;

// Reply deltas are placed by byte offset into the reply's UTF-8 text.
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

// ---------------------------------------------------------------- helpers

function userName(id: string | undefined): string {
  if (!id) return "";
  const u = users.get(id);
  if (!u) return "…";
  return u.displayName || u.username || `guest ${u.id.slice(-6)}`;
}

const isBot = (id: string | undefined) => !!id && users.get(id)?.kind === UserKind.BOT;
const isReply = (m: Message) => m.role === MessageRole.ASSISTANT;
const isGenerating = (m: Message) => m.generationStatus === GenerationStatus.GENERATING;

function chatName(chat: Chat): string {
  if (chat.title) return chat.title;
  if (chat.kind === ChatKind.DIRECT) return userName(peers.get(chat.id)) || "Direct chat";
  return "Group chat";
}

function showError(message: string) {
  const p = el("error");
  p.textContent = message;
  p.hidden = !message;
}

/** Runs a UI action: shows its error, and signs out when the token is no longer good. */
async function act(what: () => Promise<void>) {
  showError("");
  const sentWith = api.token.get();
  try {
    await what();
  } catch (err) {
    if (me && sessionEnded(err, sentWith)) {
      signOutLocally();
      showError("Your session has ended; please sign in again.");
    } else if (me && api.isUnauthenticated(err)) {
      showError("Your sign-in changed while this ran (an account was just created); please try again.");
    } else {
      showError(api.describe(err));
    }
  }
}

/**
 * Whether an UNAUTHENTICATED answer to a call sent with token `sentWith`
 * means this page's session has ended: not while a claim is under way (it
 * ends the guest's token, then brings the account's), nor once the token
 * has changed since, nor while another tab's newer one is stored (this page
 * follows it or signs out when it hears of it: see "other tabs").
 */
function sessionEnded(err: unknown, sentWith: string | null): boolean {
  const stored = api.token.stored();
  return api.isUnauthenticated(err) && !claiming && !claimingElsewhere() && api.token.get() === sentWith &&
    (!stored || stored === sentWith);
}

/** How long a claim another tab announced is waited for: longer than any ClaimAccount takes (its password check may queue). */
const CLAIM_MARK_MS = 30_000;

/**
 * Whether another tab of this browser is claiming an account for our guest
 * (api.claimMark): the claim ends our session before that tab has the
 * account's token to store, which this page then follows (see "other tabs").
 */
function claimingElsewhere(): boolean {
  const mark = api.claimMark.get();
  return !claiming && !!me && mark?.userId === me.id && mark.until > Date.now();
}

/** Resolves once no other tab claims for our guest any longer (it stored the account's token, or gave up), or on abort. */
function claimElsewhereEnded(signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("storage", onStorage);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const onStorage = () => {
      if (!claimingElsewhere()) done();
    };
    const timer = setTimeout(done, Math.max(0, (api.claimMark.get()?.until ?? 0) - Date.now()));
    window.addEventListener("storage", onStorage);
    signal.addEventListener("abort", done);
  });
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });

/** Fetches the users we do not know yet, 200 ids a call. */
async function ensureUsers(ids: Iterable<string>) {
  const missing = [...new Set([...ids].filter((id) => id && !users.has(id)))];
  for (let i = 0; i < missing.length; i += 200) {
    const batch = missing.slice(i, i + 200);
    const res = await api.sessions.batchGetUsers({ userIds: batch });
    for (const u of res.users) users.set(u.id, u);
    // An id the server no longer knows is a deleted account: its messages stay, under this name.
    for (const id of batch) if (!users.has(id)) markDeleted(id);
  }
}

/** Shows user `id` as a deleted account from now on: BatchGetUsers no longer knows it, or a user_updated said so. */
function markDeleted(id: string) {
  users.set(id, create(UserSchema, { id, displayName: "Deleted account" }));
  deletedUsers.add(id);
}

/**
 * Takes a user's names as the server has them at `version` (a user_updated
 * event, or a re-read): they replace what the page holds of the user, our
 * own `me` included, unless the page holds a newer version (a re-read that
 * overtook an event still on its way; 0, from a server older than versions,
 * is taken as it comes).
 * Says whether anything changed; the caller redraws. A user the page has not
 * read yet is left to be read when first shown.
 */
function takeNames(userId: string, username: string, displayName: string, version: bigint): boolean {
  const held = users.get(userId);
  if (!held || deletedUsers.has(userId)) return false;
  if (version > 0n && version < held.profileVersion) return false;
  if (version > held.profileVersion) held.profileVersion = version;
  if (held.username === username && held.displayName === displayName) return false;
  if (me?.id === userId) {
    // Settings' display name follows, unless it is being edited (it differs from what was saved).
    const box = input("display-name");
    if (box.value === me.displayName) box.value = displayName;
    box.placeholder = username;
    input("password-username").value = username;
    // In place: `me` stays the same object, which calls under way compare to tell a sign-out.
    me.username = username;
    me.displayName = displayName;
  }
  held.username = username;
  held.displayName = displayName;
  return true;
}

/**
 * Re-reads the names of every user the page holds (BatchGetUsers, 200 ids a
 * call): a rename made while the stream was down is sent to nobody later.
 * An id no longer known is a deleted account, as in ensureUsers.
 */
async function refreshUsers() {
  const user = me;
  const ids = [...users.keys()].filter((id) => !deletedUsers.has(id));
  let changed = false;
  for (let i = 0; i < ids.length; i += 200) {
    const batch = ids.slice(i, i + 200);
    const res = await api.sessions.batchGetUsers({ userIds: batch });
    if (me !== user) return; // signed out meanwhile
    for (const u of res.users) changed = takeNames(u.id, u.username, u.displayName, u.profileVersion) || changed;
    const found = new Set(res.users.map((u) => u.id));
    for (const id of batch) {
      if (found.has(id) || id === me?.id) continue;
      markDeleted(id);
      changed = true;
    }
  }
  if (changed) renderNames();
}

/** Learns who the other member of each direct chat is, and their names. */
async function resolveChats(list: Chat[]) {
  await Promise.all(
    list
      .filter((c) => c.kind === ChatKind.DIRECT && !peers.has(c.id))
      .map(async (c) => {
        const res = await api.chats.listMembers({ chatId: c.id, pageSize: 2 });
        const other = res.members.find((m) => m.userId !== me?.id);
        if (other) peers.set(c.id, other.userId);
      }),
  );
  await ensureUsers(list.flatMap((c) => [peers.get(c.id) ?? "", c.lastMessage?.authorId ?? ""]));
}

function addChat(chat: Chat) {
  chats.set(chat.id, chat);
  // A chat first seen now is resumed from its last message (0: from the start).
  if (!lastSeq.has(chat.id)) lastSeq.set(chat.id, chat.lastMessage?.seq ?? 0n);
}

/**
 * Holds a message of the open chat, unless we hold a newer state of it: a
 * call's answer can arrive after the stream's later change, and a reply
 * being written may hold more text (from its deltas) than a snapshot of it.
 */
function putMessage(state: OpenChat, m: Message) {
  const held = state.messages.get(m.seq);
  if (held?.id === m.id) {
    if (held.changeSeq > m.changeSeq) return;
    if (isGenerating(held) && isGenerating(m) && utf8.encode(held.text).length > utf8.encode(m.text).length) {
      m.text = held.text;
    }
  }
  state.messages.set(m.seq, m);
}

/** Moves a chat's preview forward to a newer message. */
function notePreview(chat: Chat, m: Message) {
  if (chat.lastMessage && chat.lastMessage.seq >= m.seq) return;
  chat.lastMessage = create(LastMessageSchema, {
    seq: m.seq, authorId: m.authorId, text: m.text.slice(0, 200), sendTime: m.sendTime,
  });
  if (m.sendTime) chat.lastActivityTime = m.sendTime;
}

// ---------------------------------------------------------------- rendering

/** The chats held, most recently active first (the chat list's order). */
function chatsByActivity(): Chat[] {
  return [...chats.values()].sort((a, b) => {
    const ta = a.lastActivityTime ? timestampDate(a.lastActivityTime).getTime() : 0;
    const tb = b.lastActivityTime ? timestampDate(b.lastActivityTime).getTime() : 0;
    return tb - ta;
  });
}

function renderChatList() {
  const ul = el("chat-list");
  const sorted = chatsByActivity();
  // A chat keeps its item's element, and the elements inside it, changed in
  // place (patchElement), and an item moves only when its place in the order
  // does: Chromium fires no click whose mouse went down on an element removed
  // before it came up, and the list is redrawn often (a stream event;
  // presence read afresh, which after a load turns every dot from unknown to
  // online or offline just as a person may be clicking a chat).
  const held = heldItems(ul, "chatId");
  const items = sorted.map((chat) => {
    const li = document.createElement("li");
    li.className = "chat-item" + (open?.id === chat.id ? " active" : "");
    li.dataset.chatId = chat.id;
    li.dataset.testid = "chat-item";
    const name = document.createElement("span");
    name.className = "chat-name";
    name.textContent = chatName(chat);
    if (chat.kind === ChatKind.DIRECT && isBot(peers.get(chat.id))) name.append(" ", botBadge());
    const peer = peers.get(chat.id);
    if (peer && !isBot(peer)) name.prepend(presenceDot(peer));
    const excerpt = document.createElement("span");
    excerpt.className = "chat-excerpt";
    const last = chat.lastMessage;
    excerpt.textContent = last ? `${last.authorId === me?.id ? "You" : userName(last.authorId)}: ${last.text}` : "No messages yet";
    li.append(name, excerpt);
    if (chat.mentionCount > 0n) {
      const at = document.createElement("span");
      at.className = "mention-count";
      at.title = "unread messages that mention you";
      at.textContent = `@${chat.mentionCount >= 1000n ? "999+" : String(chat.mentionCount)}`;
      li.append(at);
    }
    if (chat.unreadCount > 0n) {
      const badge = document.createElement("span");
      badge.className = "unread";
      // natter counts unread messages up to 1000.
      badge.textContent = chat.unreadCount >= 1000n ? "999+" : String(chat.unreadCount);
      li.append(badge);
    }
    li.addEventListener("click", () => act(() => openChat(chat.id)));
    return keptOr(held.get(chat.id), li);
  });
  placeChildren(ul, items);
}

/**
 * Makes `items` the children of `list`, in order, moving only those out of
 * their place and then removing the rest: an element kept where it was
 * never leaves the document (replaceChildren takes each out and back), so
 * a press on it still ends in a click.
 */
function placeChildren(list: Element, items: Element[]) {
  for (const [i, item] of items.entries()) if (list.children[i] !== item) list.insertBefore(item, list.children[i] ?? null);
  while (list.children.length > items.length) list.lastElementChild?.remove();
}

/** The children of `list` by their `data-{key}`: the items a redraw patches in place rather than replaces. */
function heldItems(list: Element, key: string): Map<string, HTMLElement> {
  const held = new Map<string, HTMLElement>();
  for (const item of list.children) {
    if (!(item instanceof HTMLElement)) continue;
    const id = item.dataset[key];
    if (id !== undefined) held.set(id, item);
  }
  return held;
}

/**
 * `held` made to look as `fresh` does (patchElement) and returned, if there
 * is one; else `fresh`. A kept item keeps its listeners and those of the
 * elements inside it that it keeps: they must look up what they act on
 * when they run, not hold what was drawn first.
 */
function keptOr(held: HTMLElement | undefined, fresh: HTMLElement): HTMLElement {
  if (!held) return fresh;
  patchElement(held, fresh);
  return held;
}

/**
 * Makes `held` look as `fresh` does (`fresh`, not in the document, is used
 * up), keeping `held` and each node inside it whose kind (tag, or text)
 * matches the new one at its place: attributes and text change in place, and
 * only nodes of another kind, or past the end of either, are replaced, added
 * or removed. Listeners are not compared: `held`'s and those of the nodes
 * it keeps stay, and a node taken from `fresh` brings its own.
 */
function patchElement(held: Element, fresh: Element) {
  for (const a of [...held.attributes]) if (!fresh.hasAttribute(a.name)) held.removeAttribute(a.name);
  for (const a of [...fresh.attributes]) if (held.getAttribute(a.name) !== a.value) held.setAttribute(a.name, a.value);
  const have = [...held.childNodes];
  const want = [...fresh.childNodes];
  for (const [i, node] of want.entries()) {
    const old = have[i];
    if (!old) held.append(node);
    else if (old.nodeName !== node.nodeName) old.replaceWith(node);
    else if (old instanceof Element) patchElement(old, node as Element);
    else if (old.nodeValue !== node.nodeValue) old.nodeValue = node.nodeValue;
  }
  for (const old of have.slice(want.length)) old.remove();
}

/** How `userId` stands, for people: "online", "last seen 14:02", or "" when unknown. */
function presenceText(userId: string): string {
  const p = presence.get(userId);
  if (!p) return "";
  if (p.online) return "online";
  return p.lastSeen ? `last seen ${p.lastSeen.toLocaleString()}` : "offline";
}

/** A dot before a person's name: green while they are online. */
function presenceDot(userId: string): HTMLSpanElement {
  const dot = document.createElement("span");
  const p = presence.get(userId);
  dot.className = "presence" + (p?.online ? " online" : "");
  dot.dataset.testid = "presence";
  dot.dataset.state = p ? (p.online ? "online" : "offline") : "unknown";
  dot.title = presenceText(userId) || "presence unknown";
  return dot;
}

/** Shows the open direct chat's other member's presence beside its title (in full in its tooltip, as it may be cut). */
function renderPresence() {
  const peer = open ? peers.get(open.id) : undefined;
  const text = peer && !isBot(peer) ? presenceText(peer) : "";
  el("chat-presence").textContent = text;
  el("chat-presence").title = text;
}

/** Notes a Presence (GetPresence's or an event's); UNSPECIFIED tells nothing. */
function notePresence(p: Presence) {
  if (p.state === PresenceState.UNSPECIFIED) return;
  presence.set(p.userId, {
    online: p.state === PresenceState.ONLINE,
    lastSeen: p.lastSeenTime ? timestampDate(p.lastSeenTime) : undefined,
  });
}

/**
 * Asks the presence of the people of our direct chats (the stream pushes
 * changes, not the state: so at every (re)connect).
 */
async function refreshPresence() {
  const ids = [...new Set(peers.values())].filter((id) => !isBot(id));
  for (let i = 0; i < ids.length; i += 100) {
    const res = await api.messages.getPresence({ userIds: ids.slice(i, i + 100) });
    res.presences.forEach(notePresence);
  }
  renderChatList();
  renderPresence();
}

function botBadge(): HTMLSpanElement {
  const badge = document.createElement("span");
  badge.className = "bot";
  badge.textContent = "bot";
  return badge;
}

/** A button that runs `onClick` (through `run`: act, unless told) and is disabled meanwhile. */
function smallButton(
  label: string, testid: string, onClick: () => Promise<void>, run: (what: () => Promise<void>) => Promise<void> = act,
): HTMLButtonElement {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.testid = testid;
  b.addEventListener("click", () => {
    b.disabled = true;
    void run(onClick).finally(() => (b.disabled = false));
  });
  return b;
}

/** How a reply stands, for people: empty once it is complete. */
function generationLabel(m: Message): string {
  const why = m.generation?.error;
  switch (m.generationStatus) {
    case GenerationStatus.GENERATING: return "writing…";
    case GenerationStatus.STOPPED: return "stopped";
    case GenerationStatus.FAILED: return `failed: ${why || "unknown error"}`;
    case GenerationStatus.INTERRUPTED: return why ? `interrupted: ${why}` : "interrupted";
    default: return "";
  }
}

/** What a message offers: Reload on the latest finished reply, Edit & rerun on its prompt. */
interface Offers { reload?: boolean; editRerun?: boolean; inThread?: boolean }

function messageItem(m: Message, offers: Offers = {}): HTMLLIElement {
  const li = document.createElement("li");
  const reply = isReply(m);
  li.className = "message" + (m.authorId === me?.id ? " mine" : "") + (m.deleted ? " deleted" : "") +
    (me && m.authorId !== me.id && m.mentionUserIds.includes(me.id) ? " mentions-me" : "") +
    (reply ? " reply" : "") + (isGenerating(m) ? " generating" : "") + (m.superseded ? " superseded" : "") +
    (isPinned(m) ? " pinned" : "") + (flashed?.id === m.id && Date.now() < flashed.until ? " flash" : "");
  li.dataset.seq = String(m.seq);
  li.dataset.id = m.id;
  li.dataset.testid = "message";
  if (reply) {
    li.dataset.status = (GenerationStatus[m.generationStatus] ?? "").toLowerCase();
    li.dataset.replyTo = String(m.replyToSeq);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = m.sendTime ? timestampDate(m.sendTime).toLocaleTimeString() : "";
  meta.append(userName(m.authorId));
  if (isBot(m.authorId)) meta.append(" ", botBadge());
  meta.append(` · ${time}${m.editTime ? " · edited" : ""}`);
  const label = reply ? generationLabel(m) : "";
  if (label) {
    const status = document.createElement("span");
    status.className = "gen-status";
    status.dataset.testid = "generation-status";
    status.textContent = label;
    meta.append(" · ", status);
  }
  if (m.superseded) {
    const older = document.createElement("span");
    older.className = "older";
    older.textContent = "older version";
    meta.append(" · ", older);
  }
  const text = document.createElement("div");
  text.className = "text";
  if (m.deleted) text.textContent = "message deleted";
  else text.append(...withMentions(m.text, m.mentionUserIds));
  if (isPinned(m)) li.append(pinnedBy(m));
  li.append(meta, text);
  if (!m.deleted && !isGenerating(m) && !m.superseded) li.append(reactionBar(m));
  if (!offers.inThread && m.threadRootSeq === 0n && !m.superseded && (!m.deleted || (m.thread?.replyCount ?? 0) > 0)) {
    li.append(threadLink(m));
  }
  const buttons: HTMLButtonElement[] = [];
  if (reply && isGenerating(m) && !m.superseded) buttons.push(smallButton("Stop", "stop", () => stopReply(m)));
  if (offers.reload) buttons.push(smallButton("Reload", "reload", () => regenerate(RegenerateMode.RELOAD)));
  if (offers.editRerun) buttons.push(smallButton("Edit & rerun", "edit-rerun", () => editAndRerun(m)));
  // A reply a Regenerate replaced stays pinned (ListMessages pinned lists it): Unpin, but no new Pin.
  if (!m.deleted && (!m.superseded || isPinned(m)) && mayPin(m.chatId)) buttons.push(pinButton(m));
  if (buttons.length > 0) {
    const actions = document.createElement("div");
    actions.className = "actions";
    actions.append(...buttons);
    li.append(actions);
  }
  return li;
}

/** Under a message of the main timeline: its thread's summary (or "Reply in thread"), opening the side panel. */
function threadLink(m: Message): HTMLButtonElement {
  const summary = m.thread;
  const count = summary?.replyCount ?? 0;
  const b = document.createElement("button");
  b.type = "button";
  b.className = "thread-link";
  b.dataset.testid = count > 0 ? "thread-summary" : "open-thread";
  if (count > 0) {
    const last = summary?.lastReplyTime ? timestampDate(summary.lastReplyTime).toLocaleTimeString() : "";
    const who = (summary?.participants ?? []).slice(0, 3).map(userName).join(", ");
    b.textContent = `${count} ${count === 1 ? "reply" : "replies"}${who ? ` · ${who}` : ""}${last ? ` · last ${last}` : ""}`;
  } else {
    b.textContent = "Reply in thread";
  }
  b.addEventListener("click", () => void act(() => openThread(m.chatId, m.seq)));
  return b;
}

/** The emoji the "+" button offers (any emoji or :short_code: works through the API). */
const QUICK_REACTIONS = ["👍", "❤️", "😂", "🎉", "😮", "😢"];

/**
 * A message's reactions, each a toggle (pressed when one of them is ours:
 * click to remove it, or to add ours), and a "+" that offers a few emoji.
 */
function reactionBar(m: Message): HTMLDivElement {
  const bar = document.createElement("div");
  bar.className = "reactions";
  for (const r of m.reactions) {
    const b = smallButton(`${r.emoji} ${r.count}`, "reaction", () => react(m, r.emoji, !r.reactedByMe));
    b.className = "reaction" + (r.reactedByMe ? " mine" : "");
    b.dataset.emoji = r.emoji;
    b.setAttribute("aria-pressed", String(r.reactedByMe));
    b.title = r.reactedByMe ? "remove your reaction" : "react with this too";
    bar.append(b);
  }
  const picker = document.createElement("span");
  picker.className = "picker";
  picker.hidden = true;
  for (const emoji of QUICK_REACTIONS) {
    const b = smallButton(emoji, "pick-reaction", () => react(m, emoji, true));
    b.dataset.emoji = emoji;
    picker.append(b);
  }
  const plus = document.createElement("button");
  plus.type = "button";
  plus.className = "add-reaction";
  plus.dataset.testid = "add-reaction";
  plus.title = "add a reaction";
  plus.textContent = "+";
  plus.addEventListener("click", () => (picker.hidden = !picker.hidden));
  bar.append(plus, picker);
  return bar;
}

/** Adds or removes our reaction `emoji` on `m`, and shows the message as the server answers it. */
async function react(m: Message, emoji: string, add: boolean) {
  const request = { messageId: m.id, emoji };
  const { message } = add ? await api.messages.addReaction(request) : await api.messages.removeReaction(request);
  if (message && open?.id === message.chatId && open.messages.has(message.seq)) {
    putMessage(open, message);
    renderMessages("keep");
  }
}

/** `@username` in a text: letters, digits, `_`, `.` and `-`, not ending in `.` or `-` ("@bob." names bob). */
const MENTION = /@([\p{L}\p{N}_](?:[\p{L}\p{N}_.-]*[\p{L}\p{N}_])?)/gu;

/**
 * The ids of the users `text` mentions as `@username` (case-insensitive)
 * among the people of chat `chatId` this page knows (the other member of a
 * direct chat, a group's members, and us): what SendMessage's
 * mention_user_ids carries. The
 * server keeps them with the message and counts them as mentions.
 */
function mentionsIn(text: string, chatId: string): string[] {
  const known = [peers.get(chatId), me?.id, ...(groupMembers.get(chatId)?.ids ?? [])];
  const members = known.flatMap((id) => (id && users.get(id) ? [users.get(id)!] : []));
  const ids = new Set<string>();
  for (const [, name] of text.matchAll(MENTION)) {
    const user = members.find((u) => u.username.toLowerCase() === name.toLowerCase());
    if (user) ids.add(user.id);
  }
  return [...ids];
}

/** `text` as nodes, each `@username` of a mentioned user in a highlighted span. */
function withMentions(text: string, mentioned: string[]): Node[] {
  const names = new Set(mentioned.flatMap((id) => (users.get(id) ? [users.get(id)!.username.toLowerCase()] : [])));
  if (names.size === 0) return [document.createTextNode(text)];
  const nodes: Node[] = [];
  let from = 0;
  for (const match of text.matchAll(MENTION)) {
    if (!names.has(match[1].toLowerCase())) continue;
    nodes.push(document.createTextNode(text.slice(from, match.index)));
    const span = document.createElement("span");
    span.className = "mention" + (match[1].toLowerCase() === me?.username.toLowerCase() ? " me" : "");
    span.textContent = match[0];
    nodes.push(span);
    from = match.index + match[0].length;
  }
  nodes.push(document.createTextNode(text.slice(from)));
  return nodes;
}

/** Counts `m` (someone else's) as unread in `chat`, and as a mention if it names us. */
function noteUnread(chat: Chat, m: Message) {
  chat.unreadCount += 1n;
  if (me && m.mentionUserIds.includes(me.id)) chat.mentionCount += 1n;
}

function pendingItem(p: Pending): HTMLLIElement {
  const li = document.createElement("li");
  li.className = "message mine pending" + (p.error ? " failed" : "");
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = p.error ? `not sent: ${p.error} · click to retry` : "sending…";
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = p.text;
  li.append(meta, text);
  if (p.error) li.addEventListener("click", () => void send(p));
  return li;
}

/**
 * The open chat's latest reply (not superseded) if it can be regenerated
 * (finished, and no reply of the chat is being written), and its prompt if
 * that is ours: where Reload and Edit & rerun go.
 */
function rerunnable(state: OpenChat): { reply?: Message; prompt?: Message } {
  let latest: Message | undefined;
  for (const m of state.messages.values()) {
    if (!isReply(m) || m.superseded) continue;
    if (isGenerating(m)) return {};
    if (!latest || m.seq > latest.seq) latest = m;
  }
  if (!latest) return {};
  const prompt = state.messages.get(latest.replyToSeq);
  return { reply: latest, prompt: prompt && prompt.authorId === me?.id && !prompt.deleted ? prompt : undefined };
}

const atBottomOf = (pane: HTMLElement) => pane.scrollHeight - pane.scrollTop - pane.clientHeight < 40;

/** Redraws the open conversation; keeps the view at the bottom if it was there. */
function renderMessages(scroll: "bottom" | "keep" | "auto" = "auto") {
  const pane = el("messages-pane");
  const atBottom = atBottomOf(pane);
  const fromBottom = pane.scrollHeight - pane.scrollTop;
  const ol = el("messages");
  if (!open) {
    ol.replaceChildren();
    el("history-toggle").hidden = true;
    return;
  }
  const all = [...open.messages.values()];
  const sent = new Set(all.map((m) => m.id));
  // Where replies are (an assistant chat), offer the older versions a Regenerate replaced.
  el("history-toggle").hidden = !(isBot(peers.get(open.id)) || all.some(isReply));
  const { reply, prompt } = rerunnable(open);
  const items = all
    .filter((m) => (showHistory || !m.superseded) && m.threadRootSeq === 0n)
    .sort((a, b) => (a.seq < b.seq ? -1 : 1))
    .map((m) => messageItem(m, { reload: m === reply, editRerun: m === prompt }));
  for (const p of pending.values()) {
    if (p.chatId === open.id && !p.threadRootSeq && !sent.has(p.id)) items.push(pendingItem(p));
  }
  ol.replaceChildren(...items);
  renderSeen();
  el("load-older").hidden = !open.olderToken;
  if (scroll === "bottom" || (scroll === "auto" && atBottom)) pane.scrollTop = pane.scrollHeight;
  else pane.scrollTop = pane.scrollHeight - fromBottom;
}

/**
 * Says on our newest message of the open chat's timeline who has read it:
 * "Seen" in a direct chat, "Seen by …" in a group (three names, then how
 * many more). Bots are left out; nothing shows until someone has read it.
 */
function renderSeen() {
  const ol = el("messages");
  for (const old of ol.querySelectorAll(".seen")) old.remove();
  let mine = 0n;
  for (const m of open?.messages.values() ?? []) {
    if (m.authorId === me?.id && m.threadRootSeq === 0n && !m.deleted && m.seq > mine) mine = m.seq;
  }
  const item = ol.querySelector(`li[data-seq="${mine}"]`);
  if (!open || mine === 0n || !item) return;
  const who = [...(readBy.get(open.id) ?? [])]
    .filter(([id, seq]) => seq >= mine && id !== me?.id && !isBot(id))
    .map(([id]) => userName(id));
  if (who.length === 0) return;
  const seen = document.createElement("div");
  seen.className = "seen";
  seen.dataset.testid = "seen";
  const shown = who.slice(0, 3).join(", ") + (who.length > 3 ? ` and ${who.length - 3} more` : "");
  seen.textContent = chats.get(open.id)?.kind === ChatKind.DIRECT ? "Seen" : `Seen by ${shown}`;
  item.append(seen);
}

/** For each chat, the reads of its receipts under way: each one's set of the users heard live (read_updated) since it started. */
const receiptReads = new Map<string, Set<Set<string>>>();

/**
 * Reads chat `chatId`'s read receipts (ListReadPositions): when it is opened,
 * and when the stream reconnects (a resume replays only our own position).
 * Positions heard live meanwhile land in the same map, and only ever move
 * forward, so an answer older than one of them changes nothing. A member
 * it no longer lists goes, unless heard since it started: they hid their
 * receipts (read_receipts NOBODY), blocked us, or left. Departures heard
 * live take their member out too (membership_changed, which a resume
 * replays).
 */
async function readReceipts(chatId: string) {
  const held = readBy.get(chatId) ?? new Map<string, bigint>();
  readBy.set(chatId, held);
  const heard = new Set<string>();
  const reads = receiptReads.get(chatId) ?? new Set<Set<string>>();
  receiptReads.set(chatId, reads.add(heard));
  try {
    const read: { userId: string; readSeq: bigint }[] = [];
    let pageToken = "";
    do {
      const res = await api.messages.listReadPositions({ chatId, pageToken });
      read.push(...res.readPositions);
      pageToken = res.nextPageToken;
    } while (pageToken);
    await ensureUsers(read.map((r) => r.userId));
    const listed = new Set(read.map((r) => r.userId));
    for (const id of [...held.keys()]) if (!listed.has(id) && !heard.has(id)) held.delete(id);
    for (const r of read) if ((held.get(r.userId) ?? -1n) < r.readSeq) held.set(r.userId, r.readSeq);
    if (open?.id === chatId) renderSeen();
  } finally {
    reads.delete(heard);
    if (reads.size === 0 && receiptReads.get(chatId) === reads) receiptReads.delete(chatId);
  }
}

/** Another member's read position moved (read_updated): the receipts of a chat we have opened follow. */
function noteRead(chatId: string, userId: string, readSeq: bigint) {
  const read = readBy.get(chatId);
  if (!read || userId === me?.id || (read.get(userId) ?? -1n) >= readSeq) return;
  read.set(userId, readSeq);
  for (const heard of receiptReads.get(chatId) ?? []) heard.add(userId);
  void act(async () => {
    await ensureUsers([userId]);
    if (open?.id === chatId) renderSeen();
  });
}

// ---------------------------------------------------------------- chats and messages

/** The caller's chats as ListChats has them now (at most 1,000, by activity). */
async function listAllChats(): Promise<Chat[]> {
  const list: Chat[] = [];
  let pageToken = "";
  do {
    const res = await api.chats.listChats({ pageSize: 200, pageToken });
    list.push(...res.chats);
    pageToken = res.nextPageToken;
  } while (pageToken && list.length < 1000);
  return list;
}

/** Lists the caller's chats afresh; chats no longer listed are forgotten. */
async function loadChats() {
  const list = await listAllChats();
  await resolveChats(list);
  const listed = new Set(list.map((c) => c.id));
  for (const id of [...chats.keys(), ...lastSeq.keys()]) {
    if (!listed.has(id)) {
      chats.delete(id);
      lastSeq.delete(id);
      lastChange.delete(id);
    }
  }
  for (const c of list) addChat(c);
  if (open && !listed.has(open.id)) closeChat();
  renderChatList();
}

/** Counts the chats this page left (forgetChat), and the count at each one's latest departure. */
let departures = 0;
const departed = new Map<string, number>();

/**
 * Lists the chats we joined while the stream was down (someone created one
 * with us, or added us): a resume replays the chats it names, and one we
 * were not in yet starts live, with no event of what came before. Chats the
 * page holds stay as they are (the resume brings their changes), and none
 * goes here: a departure is replayed, and one heard while this read ran
 * keeps its chat out.
 */
async function listMissedChats() {
  const user = me;
  const started = departures;
  const missed = (await listAllChats()).filter((c) => !chats.has(c.id));
  if (missed.length === 0 || me !== user) return;
  await resolveChats(missed);
  if (me !== user) return;
  const added = missed.filter((c) => !chats.has(c.id) && (departed.get(c.id) ?? 0) <= started);
  for (const c of added) addChat(c);
  if (added.length === 0) return;
  renderChatList();
  void refreshPresence().catch((e) => console.warn("presence:", e));
}

/** A stream event named a chat we have not listed (someone started it with us). */
function fetchChat(chatId: string): Promise<void> {
  let pending = fetchingChats.get(chatId);
  if (!pending) {
    pending = (async () => {
      try {
        const res = await api.chats.getChat({ chatId });
        if (!res.chat) return;
        await resolveChats([res.chat]);
        addChat(res.chat);
        renderChatList();
        void refreshPresence().catch((e) => console.warn("presence:", e));
      } finally {
        fetchingChats.delete(chatId);
      }
    })();
    fetchingChats.set(chatId, pending);
  }
  return pending;
}

async function openChat(chatId: string) {
  const chat = chats.get(chatId);
  if (!chat) return;
  const state: OpenChat = { id: chatId, messages: new Map(), olderToken: "", loadingOlder: false, heard: new Map() };
  open = state;
  const focused = document.activeElement;
  if (thread && thread.chatId !== chatId) closeThread();
  if (membersPanel && membersPanel.chatId !== chatId) closeMembers();
  if (pins?.chatId !== chatId) {
    pins = { chatId, known: new Map(), read: false };
    closePinned();
  }
  const pinsRead = readPins(pins);
  pinsRead.catch(() => {}); // awaited below, unless another chat is opened first
  void readReceipts(chatId).catch((e) => console.warn("read receipts:", e));
  el("open-members").hidden = chat.kind !== ChatKind.GROUP;
  showChatTitle(chatName(chat));
  renderPresence();
  el("composer-form").hidden = false;
  composerError("");
  renderBlocking();
  input("composer").placeholder = isBot(peers.get(chatId)) ? "Ask the assistant" : "Message";
  renderChatList();
  renderMessages("bottom");
  renderTyping();
  renderAssistantReplies();
  renderPins();
  const [res] = await Promise.all([
    api.messages.listMessages({ chatId, pageSize: PAGE_SIZE, includeHistory: showHistory }),
    chat.kind === ChatKind.GROUP ? loadGroupMembers(chatId) : Promise.resolve(),
  ]);
  if (open !== state) return;
  renderAssistantReplies();
  await ensureUsers(res.messages.map((m) => m.authorId));
  putPage(state, res.messages);
  state.olderToken = res.nextPageToken;
  renderMessages("bottom");
  renderPins(); // Unpin in the panel, now that our role is known
  focusAfterLoad(input("composer"), focused);
  await markRead();
  await pinsRead;
}

/**
 * Focuses `box` as a load ends, unless the person has put the focus
 * elsewhere since it began (`focused`: the document's activeElement then,
 * the body after a click on a chat): what they go on typing stays where
 * they type it. A chat's messages and members take a while to read; a guest
 * who opened Settings meanwhile and typed its username there had the rest
 * of it, or its password, land in the composer.
 */
function focusAfterLoad(box: HTMLElement, focused: Element | null) {
  const now = document.activeElement;
  if (now === focused || now === null || now === document.body) box.focus();
}

async function loadOlder() {
  const state = open;
  if (!state || !state.olderToken || state.loadingOlder) return;
  state.loadingOlder = true;
  try {
    const res = await api.messages.listMessages({
      chatId: state.id, pageSize: PAGE_SIZE, pageToken: state.olderToken, includeHistory: showHistory,
    });
    if (open !== state) return;
    await ensureUsers(res.messages.map((m) => m.authorId));
    putPage(state, res.messages);
    state.olderToken = res.nextPageToken;
    renderMessages("keep");
  } finally {
    state.loadingOlder = false;
  }
}

/** The stream skipped seqs (after, before) of the open chat: read them from the store. */
async function fillGap(chatId: string, after: bigint, before: bigint) {
  const res = await api.messages.listMessages({
    chatId, afterSeq: after, beforeSeq: before, order: MessageOrder.ASC, pageSize: 200, includeHistory: showHistory,
  });
  if (open?.id !== chatId) return;
  await ensureUsers(res.messages.map((m) => m.authorId));
  for (const m of res.messages) putMessage(open, m);
  renderMessages();
}

/** Marks the open chat read up to its newest message. */
async function markRead() {
  if (!open || document.visibilityState === "hidden") return;
  const chat = chats.get(open.id);
  let newest = 0n;
  for (const seq of open.messages.keys()) if (seq > newest) newest = seq;
  if (!chat || newest === 0n) return;
  const res = await api.messages.markRead({ chatId: open.id, seq: newest });
  chat.unreadCount = res.unreadCount;
  if (res.unreadCount === 0n) chat.mentionCount = 0n;
  renderChatList();
}

/** Sends (or re-sends) a message; the client-chosen id makes a retry safe. */
async function send(p: Pending) {
  p.error = undefined;
  pending.set(p.id, p);
  renderMessages("bottom");
  renderThread();
  for (let attempt = 0; ; attempt++) {
    // Signed out meanwhile (which forgets what was pending): not sent, and
    // never as whoever signs in next.
    if (pending.get(p.id) !== p) return;
    const sentWith = api.token.get();
    try {
      const res = await api.messages.sendMessage({
        chatId: p.chatId, messageId: p.id, text: p.text, mentionUserIds: p.mentionUserIds,
        threadRootSeq: p.threadRootSeq ?? 0n,
      });
      pending.delete(p.id);
      const m = res.message;
      if (m) {
        const chat = chats.get(p.chatId);
        if (chat) notePreview(chat, m);
        if (open?.id === p.chatId) putMessage(open, m);
        noteThreadReply(m);
      }
      renderChatList();
      renderMessages();
      renderThread();
      return;
    } catch (err) {
      if (api.isUnauthenticated(err) && !sessionEnded(err, sentWith) && attempt < 3) {
        await claiming; // sent with the guest's token as it ended: again with the account's (same message id)
        continue;
      }
      if (api.isUnauthenticated(err)) {
        signOutLocally();
        showError("Your session has ended; please sign in again.");
        return;
      }
      if (api.isTransient(err) && attempt < 3) {
        await new Promise((r) => setTimeout(r, 500 * 2 ** attempt));
        continue;
      }
      if (api.isPermissionDenied(err) && !p.threadRootSeq && open?.id === p.chatId) {
        // Refused as things stand (one of a direct chat's two blocked the
        // other, say), which no retry changes: the server's words above the
        // composer, and what was typed back in it, to send once it may be,
        // unless something else was typed there meanwhile (then it stays as
        // an unsent message).
        composerError(api.describe(err));
        const box = input("composer");
        if (!box.value) {
          box.value = p.text;
          pending.delete(p.id);
          renderMessages();
          renderThread();
          return;
        }
      }
      p.error = api.describe(err);
      renderMessages();
      renderThread();
      return;
    }
  }
}

// ---------------------------------------------------------------- the assistant

/** The choices of a group's "Assistant answers" control, by the value of its options. */
const REPLIES: [AssistantReplies, string][] = [
  [AssistantReplies.MENTIONS, "mentions"],
  [AssistantReplies.ALL, "all"],
  [AssistantReplies.OFF, "off"],
];

/** Reads a group's members (and our role there), and their names. */
async function loadGroupMembers(chatId: string) {
  const ids: string[] = [];
  let role = MemberRole.UNSPECIFIED;
  let pageToken = "";
  do {
    const res = await api.chats.listMembers({ chatId, pageSize: 200, pageToken });
    for (const m of res.members) {
      ids.push(m.userId);
      if (m.userId === me?.id) role = m.role;
    }
    pageToken = res.nextPageToken;
  } while (pageToken && ids.length < 1000);
  await ensureUsers(ids);
  groupMembers.set(chatId, { ids, role });
}

/**
 * The open group's "Assistant answers" control (its assistant_replies):
 * shown where an assistant is a member, changeable by the owner and admins.
 * `data-saved` holds the setting as the server last said it.
 */
function renderAssistantReplies() {
  const control = el("assistant-replies-control");
  const select = el<HTMLSelectElement>("assistant-replies");
  const chat = open ? chats.get(open.id) : undefined;
  const group = open ? groupMembers.get(open.id) : undefined;
  if (!chat || chat.kind !== ChatKind.GROUP || !group || !group.ids.some(isBot)) {
    control.hidden = true;
    return;
  }
  // UNSPECIFIED reads as MENTIONS.
  const saved = REPLIES.find(([value]) => value === chat.assistantReplies)?.[1] ?? "mentions";
  select.value = saved;
  select.dataset.saved = saved;
  const manager = group.role === MemberRole.OWNER || group.role === MemberRole.ADMIN;
  select.disabled = !manager;
  control.title = manager
    ? "Which messages of this group the assistant answers"
    : "Which messages of this group the assistant answers (the owner or an admin may change it)";
  control.hidden = false;
}

/** Opens the caller's chat with the assistant (made on first use), or says there is none. */
async function openAssistant() {
  const notice = el("assistant-notice");
  let res;
  try {
    res = await api.assistant.getOrCreateAssistantChat({});
  } catch (err) {
    if (!api.isFailedPrecondition(err)) throw err;
    notice.textContent = "The assistant is not available on this server.";
    notice.title = api.describe(err);
    notice.hidden = false;
    return;
  }
  notice.hidden = true;
  peers.set(res.chatId, res.assistantUserId);
  await ensureUsers([res.assistantUserId]);
  if (!chats.has(res.chatId)) await fetchChat(res.chatId);
  await openChat(res.chatId);
}

/** Replaces the open chat's latest reply: RELOAD asks again, EDIT first edits its prompt to `text`. */
async function regenerate(mode: RegenerateMode, text = "") {
  const state = open;
  if (!state) return;
  const res = await api.assistant.regenerate({ chatId: state.id, mode, text });
  if (open !== state) return;
  for (const m of [res.prompt, res.reply]) if (m) putMessage(state, m);
  // The stream says so too (a change of the old reply); hide it at once.
  const old = [...state.messages.values()].find((m) => m.id === res.reply?.replacesMessageId);
  if (old) old.superseded = true;
  renderMessages("bottom");
}

async function editAndRerun(promptMessage: Message) {
  const text = window.prompt("Edit your message; the assistant answers it again:", promptMessage.text)?.trim();
  if (!text) return;
  await regenerate(RegenerateMode.EDIT, text);
}

/** Re-reads what the open chat shows with include_history: the superseded replies among it. */
async function loadOlderVersions() {
  const state = open;
  if (!state) return;
  const seqs = [...state.messages.keys()];
  if (seqs.length === 0) return;
  const first = seqs.reduce((a, b) => (b < a ? b : a));
  const last = seqs.reduce((a, b) => (b > a ? b : a));
  let pageToken = "";
  do {
    const res = await api.messages.listMessages({
      chatId: state.id, afterSeq: first - 1n, beforeSeq: last + 1n, order: MessageOrder.ASC, pageSize: 200,
      pageToken, includeHistory: true,
    });
    if (open !== state) return;
    await ensureUsers(res.messages.map((m) => m.authorId));
    for (const m of res.messages) putMessage(state, m);
    pageToken = res.nextPageToken;
  } while (pageToken);
  renderMessages("keep");
}

/** Stops a reply being written: it keeps its text so far and ends STOPPED. */
async function stopReply(m: Message) {
  const res = await api.assistant.stopGeneration({ messageId: m.id });
  if (open?.id === m.chatId && res.reply) {
    putMessage(open, res.reply);
    renderMessages();
  }
}

/**
 * A piece of a reply being written: appended when it starts where the text
 * we hold ends; a piece we hold already is ignored, and after a gap (we
 * hold a checkpoint) the finished reply (message_edited) brings the rest.
 */
function applyDelta(chatId: string, d: MessageDelta) {
  if (open?.id !== chatId) return;
  const m = [...open.messages.values()].find((x) => x.id === d.messageId);
  if (!m || !isGenerating(m)) return;
  const held = utf8.encode(m.text).length;
  const offset = Number(d.offset);
  const piece = utf8.encode(d.text);
  if (offset > held || offset + piece.length <= held) return;
  m.text += fromUtf8.decode(piece.subarray(held - offset));
  const pane = el("messages-pane");
  const atBottom = atBottomOf(pane);
  const text = el("messages").querySelector(`li[data-id="${CSS.escape(m.id)}"] .text`);
  if (text) text.textContent = m.text;
  else renderMessages();
  if (atBottom) pane.scrollTop = pane.scrollHeight;
}

// ---------------------------------------------------------------- live events

/** Shows who is typing in the open chat, and hides it once everyone's time is up. */
function renderTyping() {
  const p = el("typing");
  const now = Date.now();
  const who = [...(open ? (typers.get(open.id) ?? new Map()) : new Map<string, number>())]
    .filter(([id, until]) => until > now && id !== me?.id)
    .map(([id]) => userName(id));
  p.textContent = who.length === 0 ? "" : `${who.join(" and ")} ${who.length === 1 ? "is" : "are"} typing…`;
  p.hidden = who.length === 0;
}

function noteTyping(chatId: string, userId: string, until: number) {
  const forChat = typers.get(chatId) ?? new Map<string, number>();
  typers.set(chatId, forChat);
  if (until <= Date.now()) forChat.delete(userId);
  else {
    forChat.set(userId, until);
    setTimeout(renderTyping, until - Date.now() + 50);
  }
  void act(async () => {
    await ensureUsers([userId]);
    renderTyping();
  });
}

/**
 * Redraws everything that shows people's names, after a rename: the chat
 * list (a direct chat is called by its other member's name), the open
 * chat's title, its messages' authors and read receipts, the thread, the
 * typing line, the members panel, whom we block (the Block button, the composer's note,
 * Settings' Blocked people), the search results, the Pinned panel (authors
 * and pinners) and the header.
 */
function renderNames() {
  renderChatList();
  const chat = open ? chats.get(open.id) : undefined;
  if (chat) showChatTitle(chatName(chat));
  renderMessages("keep");
  renderThread();
  renderTyping();
  renderMembers();
  renderBlocking();
  renderSearchNames();
  renderPins();
  renderMe();
}

/**
 * What others see of a user changed (user_updated): the page shows their new
 * names, or "Deleted account" once the account is gone. A user the page has
 * not read yet is read (as deleted, if so) when first shown.
 */
function noteUser(u: UserUpdated) {
  if (!u.deleted) {
    if (takeNames(u.userId, u.username, u.displayName, u.profileVersion)) renderNames();
    return;
  }
  if (!users.has(u.userId) || deletedUsers.has(u.userId) || u.userId === me?.id) return;
  markDeleted(u.userId);
  renderNames();
}

/**
 * Our account changed in another tab or on another device (account_updated):
 * re-reads what changed. Also sent for this page's own change, whose re-read
 * then finds what the page shows already.
 */
function noteAccountChange(change: AccountChange) {
  switch (change) {
    case AccountChange.PRIVACY_SETTINGS:
      void refreshPrivacy().catch((e) => console.warn("privacy settings:", e));
      return;
    case AccountChange.BLOCKED_USERS:
      void refreshBlocked().catch((e) => console.warn("blocked users:", e));
      return;
  }
}

function handleEvent(ev: StreamEventsResponse) {
  const { chatId } = ev;
  const chat = chats.get(chatId);
  // Ephemeral: not a change, so not a resume point either.
  if (ev.event.case === "typing") {
    const t = ev.event.value;
    noteTyping(chatId, t.userId, t.until ? timestampDate(t.until).getTime() : 0);
    return;
  }
  if (ev.event.case === "messageDelta") {
    applyDelta(chatId, ev.event.value);
    return;
  }
  if (ev.event.case === "presenceChanged") {
    notePresence(ev.event.value);
    renderChatList();
    renderPresence();
    return;
  }
  // Of a user rather than a chat: what others see of someone (a rename), or
  // our own account changed elsewhere (privacy settings, whom we block).
  if (ev.event.case === "userUpdated") {
    noteUser(ev.event.value);
    return;
  }
  if (ev.event.case === "accountUpdated") {
    noteAccountChange(ev.event.value.change);
    return;
  }
  // Some of the above may have been lost while the stream stayed open (it
  // fell behind, or the server's bus reconnected): read again what a
  // reconnect reads. Within 2 s, at random: every page on a server that
  // lost news hears this at once, and should not all ask at once.
  if (ev.event.case === "ephemeralLost") {
    setTimeout(rereadEphemeral, Math.random() * 2000);
    return;
  }
  // Anything else of no chat (a kind of event newer than this page) is no
  // chat to list and no resume point.
  if (!chatId) return;
  // We are out of the chat, told by the stream itself at a number we have
  // (a chat deleted while we were away, its numbers gone with it): no
  // duplicate, since we would not be told again.
  if (ev.event.case === "membershipChanged" && ev.event.value.userId === me?.id && isDeparture(ev.event.value.change)) {
    if (ev.changeSeq <= (lastChange.get(chatId) ?? 0n)) return forgetChat(chatId);
  }
  if (ev.event.case === "chatReset") {
    // The server cannot replay what we missed of this chat: its log no
    // longer reaches back to our point, or it holds less than we saw (a
    // database restored from a backup). Go on from this event's change_seq,
    // even below ours, and re-read the chat: its seqs may start over below
    // those we hold.
    lastChange.set(chatId, ev.changeSeq);
    lastSeq.delete(chatId);
    void act(async () => {
      await loadChats();
      if (open?.id === chatId) await openChat(chatId);
    });
    return;
  }
  // Another member's read receipt may come with a number we have seen (the
  // server's store read covered it; it is no change of ours): applied all
  // the same, each reader's position only ever moving forward (noteRead).
  const othersReceipt = ev.event.case === "readUpdated" && ev.event.value.userId !== me?.id;
  if (ev.changeSeq > 0n) {
    const had = lastChange.get(chatId);
    if (had !== undefined && ev.changeSeq <= had) {
      if (!othersReceipt) return; // delivered already
    } else {
      lastChange.set(chatId, ev.changeSeq);
    }
  }
  switch (ev.event.case) {
    case "messageCreated": {
      const m = ev.event.value;
      const seen = lastSeq.get(chatId);
      if (seen !== undefined && m.seq <= seen) {
        // A replay sends a message created and then changed while we were
        // away at its latest change, after newer ones: show it as it is.
        notePin(m);
        if (open?.id === chatId) {
          putMessage(open, m);
          void act(async () => {
            await ensureUsers([m.authorId]);
            renderMessages();
          });
        }
        return;
      }
      lastSeq.set(chatId, m.seq);
      if (seen !== undefined && m.seq > seen + 1n && open?.id === chatId) void act(() => fillGap(chatId, seen, m.seq));
      if (!chat) {
        // The chat is new to us: fetch it, then apply this message if the
        // snapshot was taken before it.
        void act(async () => {
          await fetchChat(chatId);
          const fetched = chats.get(chatId);
          if (!fetched || (fetched.lastMessage && fetched.lastMessage.seq >= m.seq)) return;
          notePreview(fetched, m);
          if (m.authorId !== me?.id) noteUnread(fetched, m);
          renderChatList();
        });
        return;
      }
      notePreview(chat, m);
      noteThreadReply(m);
      renderThread();
      // Their message ends their typing.
      if (typers.get(chatId)?.delete(m.authorId)) renderTyping();
      if (open?.id === chatId) {
        putMessage(open, m);
        void act(async () => {
          await ensureUsers([m.authorId]);
          renderMessages();
          await markRead();
        });
      } else if (m.authorId !== me?.id) {
        noteUnread(chat, m);
      }
      renderChatList();
      return;
    }
    case "messageEdited":
    case "messageDeleted": {
      const m = ev.event.value;
      if (open?.id === chatId && open.messages.has(m.seq)) {
        putMessage(open, m);
        renderMessages();
      } else if (open?.id === chatId && !m.threadRootSeq) {
        // Of a page not here yet, maybe on its way: laid over it when it comes.
        const heard = open.heard.get(m.seq);
        if (!heard || heard.changeSeq < m.changeSeq) open.heard.set(m.seq, m);
      }
      noteThreadReply(m);
      if (thread?.chatId === chatId) renderThread();
      // Pinned or unpinned (by anyone, this page too), deleted, or edited while pinned.
      notePin(m);

      if (chat?.lastMessage?.seq === m.seq) {
        chat.lastMessage.text = m.deleted ? "" : m.text.slice(0, 200);
        renderChatList();
      }
      // A shown search result must not keep text deleted or edited away.
      if (m.deleted) dropSearchResults((r) => r.dataset.chatId === chatId && r.dataset.seq === String(m.seq));
      else refreshSearchResult(chatId, m);
      return;
    }
    case "readUpdated": {
      const r = ev.event.value;
      noteRead(chatId, r.userId, r.readSeq);
      // Our own read position moved (maybe on another device).
      if (chat && r.userId === me?.id && chat.lastMessage && r.readSeq >= chat.lastMessage.seq) {
        chat.unreadCount = 0n;
        chat.mentionCount = 0n;
        renderChatList();
      }
      return;
    }
    case "chatUpdated": {
      const u = ev.event.value;
      if (chat) {
        chat.title = u.title;
        chat.description = u.description;
        if (u.updateMask?.paths.includes("assistant_replies")) chat.assistantReplies = u.assistantReplies;
        if (open?.id === chatId) {
          showChatTitle(chatName(chat));
          renderAssistantReplies();
        }
        renderChatList();
      }
      return;
    }
    case "membershipChanged": {
      const c = ev.event.value;
      const gone = c.change === MembershipChange.LEFT || c.change === MembershipChange.REMOVED;
      if (gone) readBy.get(chatId)?.delete(c.userId);
      if (c.userId === me?.id && gone) {
        forgetChat(chatId);
      } else if (!chat) {
        void act(async () => {
          try {
            await fetchChat(chatId);
          } catch (err) {
            // Left (or removed) since: a late event of a chat we are no longer in.
            if (!api.isDenied(err)) throw err;
          }
        });
      } else if (open?.id === chatId && chat.kind === ChatKind.GROUP) {
        // Someone joined, left, was removed or changed role (we too, maybe):
        // the members, our role and the panel as the server has them now.
        void act(() => refreshMembers(chatId));
      }
      return;
    }
  }
}

const isDeparture = (change: MembershipChange) => change === MembershipChange.LEFT || change === MembershipChange.REMOVED;

/** We are no longer in chat `chatId` (we left, or were removed): it goes from the page. */
function forgetChat(chatId: string) {
  departed.set(chatId, ++departures);
  dropSearchResults((r) => r.dataset.chatId === chatId);
  chats.delete(chatId);
  lastSeq.delete(chatId);
  lastChange.delete(chatId);
  groupMembers.delete(chatId);
  readBy.delete(chatId);
  if (open?.id === chatId) closeChat();
  renderChatList();
}

/** Reads again what the stream tells of only as it changes: people's names, our privacy settings, whom we block. */
async function refreshAccount() {
  await Promise.all([refreshUsers(), refreshPrivacy(), refreshBlocked()]);
}

/**
 * Reads again what the stream tells of only as it happens and never replays:
 * presence, names, our account, the open chat's read receipts (only our own
 * position is replayed). After a reconnect, and when the stream says some of
 * it may have been lost while it stayed open (ephemeral_lost). Typing and
 * replies being written need nothing: an indicator ends by itself, and a
 * reply's end is a change the stream sends.
 */
function rereadEphemeral() {
  // One re-read at a time: one asked for meanwhile runs once after it.
  if (rereading) {
    rereadAgain = true;
    return;
  }
  rereading = (async () => {
    do {
      rereadAgain = false;
      await Promise.all([
        refreshPresence().catch((e) => console.warn("presence:", e)),
        refreshAccount().catch((e) => console.warn("names and account:", e)),
        open ? readReceipts(open.id).catch((e) => console.warn("read receipts:", e)) : undefined,
      ]);
    } while (rereadAgain);
  })().finally(() => {
    rereading = null;
  });
}

/** The re-read of rereadEphemeral under way, and whether another is due when it ends. */
let rereading: Promise<void> | null = null;
let rereadAgain = false;

/** Shows the open chat's name in the header: on one line, cut with "…" when long, the whole in its tooltip. */
function showChatTitle(text: string) {
  const title = el("chat-title");
  title.textContent = text;
  title.title = text;
}

function setStatus(text: string) {
  el("status").textContent = text;
}

/** Keeps StreamEvents open; after an error or end, reconnects with backoff from the last changes seen. */
async function runStream(signal: AbortSignal) {
  let backoff = 500;
  let opened = false;
  // How many chats a request names at most: all of them, until the server
  // refuses that many (INVALID_ARGUMENT: `--max-stream-chats`, 1,000 by
  // default, and the page may hold more); then half as many as were sent,
  // the open chat and the most recently active ones.
  let cap = Infinity;
  while (!signal.aborted) {
    setStatus("connecting…");
    const sentWith = api.token.get();
    let named = 0;
    try {
      const held = new Set([...lastChange.keys(), ...lastSeq.keys()]);
      let chosen = held;
      if (held.size > cap) {
        const order = [open?.id, ...chatsByActivity().map((c) => c.id), ...held].filter((id) => id && held.has(id));
        chosen = new Set([...new Set(order)].slice(0, cap) as string[]);
      }
      const left = chosen.size < held.size;
      named = chosen.size;
      const resumeChanges = Object.fromEntries([...lastChange].filter(([id]) => chosen.has(id)));
      const resume = Object.fromEntries([...lastSeq].filter(([id]) => chosen.has(id) && !lastChange.has(id)));
      const onHeader = () => {
        setStatus("live");
        backoff = 500;
        // Chats left out of the resume start live: what they missed
        // meanwhile is read with the chat list (and when one opens).
        if (left) void loadChats().catch((e) => console.warn("list chats:", e));
        // Presence, renames, account changes and others' read receipts of
        // while it was down are sent to nobody later: read them again (the
        // first connection follows the page's own reads, but for presence).
        if (opened) rereadEphemeral();
        else void refreshPresence().catch((e) => console.warn("presence:", e));
        // So are the chats we joined meanwhile, which no resume names.
        if (opened) void listMissedChats().catch((e) => console.warn("list chats:", e));
        // The open chat's pins are read again as well (resume replays their
        // changes; a fresh read also covers a chat reset or missed replay).
        if (opened && pins) void readPins(pins).catch((e) => console.warn("pins:", e));
        opened = true;
      };
      for await (const ev of api.messages.streamEvents({ resume, resumeChanges }, { signal, onHeader })) handleEvent(ev);
    } catch (err) {
      if (signal.aborted) return;
      if (api.isUnauthenticated(err) && claimingElsewhere()) {
        // Our guest session ended with another tab's claim: that tab stores
        // the account's token next, which this page follows (aborting this
        // loop). A claim that ends without one tries again here, and an
        // ended session then signs out.
        setStatus("following the account made in another tab…");
        await claimElsewhereEnded(signal);
        continue;
      }
      if (sessionEnded(err, sentWith)) {
        signOutLocally();
        showError("Your session has ended; please sign in again.");
        return;
      }
      if (api.isUnauthenticated(err)) return; // another tab's sign-in: the page follows it or signs out
      console.warn("event stream:", err);
      // `resume` named a chat we have left or that was deleted: re-list ours.
      if (api.isDenied(err)) await loadChats().catch((e) => console.warn("list chats:", e));
      // It named more chats than the server takes: name fewer, at once.
      if (api.isInvalidArgument(err) && named > 1) {
        cap = Math.ceil(named / 2);
        continue;
      }
    }
    if (signal.aborted) return;
    const wait = backoff + Math.random() * backoff * 0.3;
    setStatus(`reconnecting in ${Math.round(wait / 1000)}s…`);
    await sleep(wait, signal);
    backoff = Math.min(backoff * 2, 15_000);
  }
}

// ---------------------------------------------------------------- sign-in

function showAuth() {
  el("auth-view").hidden = false;
  el("chat-view").hidden = true;
  el("logout").hidden = true;
  el("open-settings").hidden = true;
  el("me").textContent = "";
  setStatus("");
  input("username").focus();
}

async function enter(user: User) {
  me = user;
  users.set(user.id, user);
  el("auth-view").hidden = true;
  el("chat-view").hidden = false;
  el("logout").hidden = false;
  el("open-settings").hidden = false;
  renderMe();
  resetProfile();
  void loadPrivacy();
  void loadBlocked();
  await loadChats();
  stream = new AbortController();
  void runStream(stream.signal);
}

function closeChat() {
  open = null;
  showChatTitle("Pick a chat or start one");
  closeThread();
  closeMembers();
  closePinned();
  pins = null;
  renderPins();
  el("open-members").hidden = true;
  renderPresence();
  renderAssistantReplies();
  el("composer-form").hidden = true;
  composerError("");
  renderBlocking();
  el("load-older").hidden = true;
  renderMessages();
  renderTyping();
}

function signOutLocally() {
  stream?.abort();
  stream = null;
  api.token.clear(); // the stored one only if still ours, not one another tab stored since
  me = null;
  for (const m of [users, deletedUsers, chats, peers, groupMembers, lastSeq, lastChange, pending, readBy]) m.clear();
  departed.clear();
  blocked = null;
  blockCalls.clear();
  closeSettings();
  el("assistant-notice").hidden = true;
  el("new-group-error").hidden = true;
  clearPrivacy();
  resetProfile();
  clearSearch();
  closeChat();
  input("composer").value = ""; // a draft is not for whoever signs in next
  renderChatList();
  showAuth();
}

/** Runs an auth request with the sign-in buttons disabled. */
async function signIn(how: () => Promise<{ token: string; user?: User }>) {
  const buttons = ["login", "register", "guest"].map((id) => el<HTMLButtonElement>(id));
  buttons.forEach((b) => (b.disabled = true));
  try {
    await act(async () => {
      const res = await how();
      if (!res.user) throw new Error("the server returned no user");
      api.token.set(res.token);
      await enter(res.user);
    });
  } finally {
    buttons.forEach((b) => (b.disabled = false));
  }
}

const credentials = () => ({ username: input("username").value.trim(), password: input("password").value });

// A page pointed at another server (`?server=`) says which, where the
// password is typed: a link must not pass someone else's server off as
// this site's. (The page natter serves itself may connect to its own
// origin only: its Content-Security-Policy refuses any other.)
if (api.serverUrl !== window.location.origin) {
  el("server-note").textContent = `Server: ${api.serverUrl}`;
  el("server-note").hidden = false;
}

el("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  void signIn(() => api.sessions.createSession(credentials()));
});
el("register").addEventListener("click", () => {
  const form = el<HTMLFormElement>("auth-form");
  if (!form.reportValidity()) return;
  void signIn(async () => {
    await api.sessions.createUser(credentials());
    return api.sessions.createSession(credentials());
  });
});
el("guest").addEventListener("click", () => void signIn(() => api.sessions.createSession({})));
// Signed out here first, so this page's other tabs (the same session) hear
// of it from this one, before the revocation ends their streams.
el("logout").addEventListener("click", () =>
  void act(async () => {
    const sentWith = api.token.get();
    signOutLocally();
    await api.sessions.revokeSession({}, { headers: { authorization: `Bearer ${sentWith}` } });
  }),
);

const deleteDialog = el<HTMLDialogElement>("delete-dialog");
el("delete-account").addEventListener("click", () => {
  // A guest has no password to confirm with.
  el("delete-password-label").hidden = !!me?.guest;
  input("delete-password").value = "";
  deleteDialog.showModal();
});
el("delete-cancel").addEventListener("click", () => deleteDialog.close());
el("delete-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const password = me?.guest ? "" : input("delete-password").value;
  deleteDialog.close();
  void act(async () => {
    stream?.abort(); // its end by the deletion is not an error to show
    try {
      await api.sessions.deleteAccount({ password });
    } catch (err) {
      // Still signed in (a wrong password, say): live again, from where the stream was.
      stream = new AbortController();
      void runStream(stream.signal);
      throw err;
    }
    signOutLocally(); // every session of the account has ended with it
  });
});

// ---------------------------------------------------------------- threads

/** Opens the side panel on the thread of message `rootSeq` of chat `chatId`: its root and replies, oldest first. */
async function openThread(chatId: string, rootSeq: bigint) {
  const state = { chatId, rootSeq, replies: new Map<bigint, Message>() };
  thread = state;
  const focused = document.activeElement;
  closeMembers(); // one side panel at a time
  closeSettings();
  closePinned();
  el("thread-panel").hidden = false;
  renderThread();
  let pageToken = "";
  do {
    const res = await api.messages.listMessages({ chatId, threadRootSeq: rootSeq, pageSize: 200, pageToken });
    if (thread !== state) return;
    await ensureUsers(res.messages.map((m) => m.authorId));
    for (const m of res.messages) if (!state.replies.has(m.seq)) state.replies.set(m.seq, m);
    pageToken = res.nextPageToken;
  } while (pageToken && state.replies.size < 1000);
  renderThread();
  focusAfterLoad(input("thread-composer"), focused);
}

function closeThread() {
  thread = null;
  el("thread-panel").hidden = true;
}

/** A reply of the open thread (sent by us or arrived on the stream) joins the panel. */
function noteThreadReply(m: Message) {
  if (thread && m.chatId === thread.chatId && m.threadRootSeq === thread.rootSeq) {
    const held = thread.replies.get(m.seq);
    if (!held || held.changeSeq <= m.changeSeq) thread.replies.set(m.seq, m);
  }
}

/** Redraws the thread panel: the root (as the open chat holds it), then the replies. */
function renderThread() {
  if (!thread) return;
  const ol = el("thread-messages");
  const root = open?.id === thread.chatId ? open.messages.get(thread.rootSeq) : undefined;
  const replies = [...thread.replies.values()].sort((a, b) => (a.seq < b.seq ? -1 : 1));
  const items = [
    ...(root ? [messageItem(root, { inThread: true })] : []),
    ...replies.map((m) => messageItem(m, { inThread: true })),
  ];
  if (root) items[0].classList.add("thread-root");
  const sent = new Set(replies.map((m) => m.id));
  for (const p of pending.values()) {
    if (p.chatId === thread.chatId && p.threadRootSeq === thread.rootSeq && !sent.has(p.id)) items.push(pendingItem(p));
  }
  ol.replaceChildren(...items);
  ol.scrollTop = ol.scrollHeight;
}

el("close-thread").addEventListener("click", closeThread);
el("thread-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const box = input("thread-composer");
  const text = box.value.trim();
  if (!thread || !text) return;
  box.value = "";
  const { chatId, rootSeq } = thread;
  void send({ id: api.newUuid(), chatId, text, mentionUserIds: mentionsIn(text, chatId), threadRootSeq: rootSeq });
});

// ---------------------------------------------------------------- pins

/** Whether `m` is pinned to its chat (a deleted message is pinned no more). */
function isPinned(m: Message): boolean {
  return !!m.pinTime && !m.deleted;
}

/**
 * Whether we may pin and unpin the messages of chat `chatId`, as
 * PinMessage has it: either member of a direct chat, a group's owner and
 * admins (our role as this page last read it). A direct chat closed by a
 * block keeps the button: the server's refusal says why.
 */
function mayPin(chatId: string): boolean {
  const chat = chats.get(chatId);
  if (chat?.kind === ChatKind.DIRECT) return true;
  const role = myRole(chatId);
  return chat?.kind === ChatKind.GROUP && (role === MemberRole.OWNER || role === MemberRole.ADMIN);
}

/** The "📌 Pinned by <name>" line of a pinned message. */
function pinnedBy(m: Message): HTMLDivElement {
  const line = document.createElement("div");
  line.className = "pinned-by";
  line.dataset.testid = "pinned-by";
  line.textContent = `📌 Pinned by ${userName(m.pinnedById)}`;
  if (m.pinTime) line.title = `pinned ${timestampDate(m.pinTime).toLocaleString()}`;
  return line;
}

/** A message's Pin (or Unpin) button. */
function pinButton(m: Message): HTMLButtonElement {
  const pinned = isPinned(m);
  const b = smallButton(pinned ? "Unpin" : "Pin", pinned ? "unpin" : "pin", () => setPin(m, !pinned));
  b.className = "pin";
  b.title = pinned ? "unpin it from the chat" : "pin it to the chat, for everyone in it to find under Pinned";
  return b;
}

/**
 * Pins or unpins `m` (PinMessage, UnpinMessage) and shows it as the server
 * answers it: in the timeline, the thread and the Pinned panel. A refusal
 * (a plain member of a group, a block, a 51st pin) goes to the page's error
 * line in the server's words, through act.
 */
async function setPin(m: Message, pin: boolean) {
  const request = { messageId: m.id };
  const { message } = pin ? await api.messages.pinMessage(request) : await api.messages.unpinMessage(request);
  if (!message) return;
  if (open?.id === message.chatId && open.messages.has(message.seq)) {
    putMessage(open, message);
    renderMessages("keep");
  }
  noteThreadReply(message);
  renderThread();
  notePin(message);
}

/**
 * A message of the chat as it is now (an event, a call's answer): the
 * Pinned panel and its count take it, or leave it out once unpinned or
 * deleted, unless they hold a later change of it.
 */
function notePin(m: Message) {
  if (!pins || pins.chatId !== m.chatId) return;
  const held = pins.known.get(m.id);
  if (held && held.m.changeSeq > m.changeSeq) return;
  pins.known.set(m.id, { m, heard: ++pinsHeard });
  if (isPinned(m) && !users.has(m.pinnedById)) {
    void ensureUsers([m.pinnedById, m.authorId])
      .then(() => {
        renderMessages("keep");
        renderThread();
        renderPins();
      })
      .catch((e) => console.warn("names:", e));
  }
  renderPins();
}

/**
 * Reads the pins of `state`'s chat (ListMessages pinned, 50 a page: a chat
 * holds at most 50) and shows them. A message heard of before the read
 * began and not listed is pinned no more; one heard of since keeps what
 * was heard, unless the read has a later change of it.
 */
async function readPins(state: Pins) {
  const started = pinsHeard;
  const found: Message[] = [];
  let pageToken = "";
  do {
    const res = await api.messages.listMessages({ chatId: state.chatId, pinned: true, pageSize: 50, pageToken });
    found.push(...res.messages);
    pageToken = res.nextPageToken;
  } while (pageToken && found.length < 200);
  await ensureUsers(found.flatMap((m) => [m.authorId, m.pinnedById]));
  if (pins !== state) return; // another chat opened meanwhile
  const listed = new Set(found.map((m) => m.id));
  for (const [id, held] of state.known) if (!listed.has(id) && held.heard <= started) state.known.delete(id);
  for (const m of found) {
    const held = state.known.get(m.id);
    if (!held || held.m.changeSeq <= m.changeSeq) state.known.set(m.id, { m, heard: held?.heard ?? started });
  }
  state.read = true;
  renderPins();
}

/** The open chat's pinned messages, the latest pin first. */
function pinnedMessages(): Message[] {
  if (!pins) return [];
  const time = (m: Message) => (m.pinTime ? timestampDate(m.pinTime).getTime() : 0);
  return [...pins.known.values()].map((held) => held.m).filter(isPinned).sort((a, b) => time(b) - time(a) || (a.seq < b.seq ? 1 : -1));
}

/** Shows the pins: the header's Pinned button with their count, and the side panel if open. */
function renderPins() {
  const button = el("open-pinned");
  const list = pinnedMessages();
  button.hidden = !open || !pins || pins.chatId !== open.id;
  const count = el("pinned-count");
  count.textContent = pins?.read ? String(list.length) : "…";
  button.dataset.count = pins?.read ? String(list.length) : "";
  button.title = pins?.read ? `${list.length} pinned ${list.length === 1 ? "message" : "messages"}` : "reading the pins…";
  if (!pinnedOpen) return;
  el("pinned-empty").hidden = !pins?.read || list.length > 0;
  // A message's item is kept and patched in place: the panel is redrawn
  // with each change of the chat's messages, and a click pressed on an item
  // (or its Unpin) just then was lost.
  const ul = el("pinned-list");
  const held = heldItems(ul, "id");
  placeChildren(ul, list.map((m) => keptOr(held.get(m.id), pinnedItem(m))));
}

/**
 * A pinned message in the panel: who wrote it and when, its text, who
 * pinned it, and Unpin for those who may. Its listeners act on the message
 * as the panel holds it when they run (a kept item outlives the drawing
 * that made it).
 */
function pinnedItem(m: Message): HTMLLIElement {
  const now = () => pins?.known.get(m.id)?.m ?? m;
  const li = document.createElement("li");
  li.className = "pinned-item";
  li.dataset.testid = "pinned-item";
  li.dataset.seq = String(m.seq);
  li.dataset.id = m.id;
  li.title = m.threadRootSeq === 0n ? "show it in the chat" : "show it in its thread";
  const meta = document.createElement("div");
  meta.className = "meta";
  const time = m.sendTime ? timestampDate(m.sendTime).toLocaleString() : "";
  meta.textContent = `${userName(m.authorId)} · ${time}${m.threadRootSeq === 0n ? "" : " · in a thread"}` +
    (m.superseded ? " · older version" : "");
  const text = document.createElement("div");
  text.className = "text";
  text.append(...withMentions(m.text, m.mentionUserIds));
  li.append(meta, text, pinnedBy(m));
  if (mayPin(m.chatId)) {
    const unpin = smallButton("Unpin", "unpin", () => setPin(now(), false));
    unpin.addEventListener("click", (e) => e.stopPropagation()); // not a click on the item
    li.append(unpin);
  }
  li.addEventListener("click", () => void act(() => showPinned(now())));
  return li;
}

/** How many pages back "show it in the chat" reads at most to reach a pinned message (30 messages a page). */
const PINNED_PAGES_BACK = 10;

/**
 * Shows a pinned message where it is: a thread reply in its thread (the
 * side panel), a message of the timeline scrolled to and marked for a
 * moment, read from older pages first if it is not loaded yet (at most
 * PINNED_PAGES_BACK of them). A reply a Regenerate replaced shows among
 * the older versions, which this turns on.
 */
async function showPinned(m: Message) {
  const state = open;
  if (!state || state.id !== m.chatId) return;
  if (m.threadRootSeq !== 0n) {
    await openThread(m.chatId, m.threadRootSeq);
    flash(el("thread-messages").querySelector<HTMLElement>(`li[data-seq="${m.seq}"]`));
    return;
  }
  if (m.superseded && !showHistory) {
    input("show-history").checked = true;
    showHistory = true;
    await loadOlderVersions();
    if (open !== state) return;
  }
  for (let page = 0; !state.messages.has(m.seq) && state.olderToken && page < PINNED_PAGES_BACK; page++) {
    await loadOlder();
    if (open !== state) return;
  }
  const li = el("messages").querySelector<HTMLElement>(`li[data-seq="${m.seq}"]`);
  if (!li) {
    showError("That message is further back than this page has read: Load older messages to reach it.");
    return;
  }
  flash(li);
}

/** The message shown from the Pinned panel, marked until `until` (ms), through redraws too. */
let flashed: { id: string; until: number } | null = null;
const FLASH_MS = 2_000;

/** Scrolls to a message and marks it for a moment. */
function flash(li: HTMLElement | null) {
  if (!li?.dataset.id) return;
  li.scrollIntoView({ block: "center" });
  const shown = { id: li.dataset.id, until: Date.now() + FLASH_MS };
  flashed = shown;
  li.classList.add("flash");
  setTimeout(() => {
    if (flashed !== shown) return; // another since
    flashed = null;
    for (const item of document.querySelectorAll(".message.flash")) item.classList.remove("flash");
  }, FLASH_MS);
}

/** Opens the Pinned side panel on the open chat's pins. */
function openPinned() {
  if (!open || !pins) return;
  closeThread(); // one side panel at a time
  closeMembers();
  closeSettings();
  pinnedOpen = true;
  el("pinned-panel").hidden = false;
  el("open-pinned").setAttribute("aria-expanded", "true");
  renderPins();
}

function closePinned() {
  pinnedOpen = false;
  el("pinned-panel").hidden = true;
  el("open-pinned").setAttribute("aria-expanded", "false");
}

el("open-pinned").addEventListener("click", () => (pinnedOpen ? closePinned() : openPinned()));
el("close-pinned").addEventListener("click", closePinned);

// ---------------------------------------------------------------- members

/** How many members the panel reads at a time (ListMembers page_size); "More members" reads the next page. */
const MEMBERS_PAGE = 50;

/** A member's role by name: the panel's label, its data-role and the owner's <option> values. */
const ROLES: [MemberRole, string][] = [
  [MemberRole.OWNER, "owner"],
  [MemberRole.ADMIN, "admin"],
  [MemberRole.MEMBER, "member"],
];
const roleName = (role: MemberRole) => ROLES.find(([value]) => value === role)?.[1] ?? "member";

/** The members side panel: its group, the members read so far (join order), the token of the next page. */
let membersPanel: { chatId: string; members: Member[]; nextPageToken: string } | null = null;
/** Counts the panel's reads from the start: only the latest one started is shown. */
let membersReads = 0;

/** Our role in the group as this page last read it. */
const myRole = (chatId: string) => groupMembers.get(chatId)?.role ?? MemberRole.UNSPECIFIED;

/**
 * Whom we may remove, as RemoveMember has it: the owner removes admins and
 * members, an admin plain members; nobody removes the owner, and leaving is
 * "Leave group".
 */
function mayRemove(role: MemberRole, m: Member): boolean {
  if (m.userId === me?.id) return false;
  if (role === MemberRole.OWNER) return m.role !== MemberRole.OWNER;
  return role === MemberRole.ADMIN && m.role === MemberRole.MEMBER;
}

/** Opens the side panel on the open group's members. */
async function openMembers() {
  if (!open) return;
  const chatId = open.id;
  closeThread(); // one side panel at a time
  closeSettings();
  closePinned();
  membersPanel = { chatId, members: [], nextPageToken: "" };
  membersNote("");
  el("members-panel").hidden = false;
  renderMembers();
  await refreshMembers(chatId);
}

function closeMembers() {
  membersPanel = null;
  membersReads++; // a read under way is not shown
  el("members-panel").hidden = true;
}

/** Per group, the re-read under way, and whether another was asked for meanwhile. */
const membersRefreshes = new Map<string, { again: boolean; done: Promise<void> }>();

/**
 * Re-reads a group's members: all of them with our role (for mentions and
 * what we may change), and the panel's pages if it shows this group. Asked
 * while one is under way, it reads once more after it (a burst of events,
 * 50 people added at once, costs two reads, not 50), and resolves then.
 */
function refreshMembers(chatId: string): Promise<void> {
  const running = membersRefreshes.get(chatId);
  if (running) {
    running.again = true;
    return running.done;
  }
  const state = { again: false, done: Promise.resolve() };
  membersRefreshes.set(chatId, state);
  state.done = (async () => {
    try {
      do {
        state.again = false;
        await Promise.all([loadGroupMembers(chatId), membersPanel?.chatId === chatId ? readMembersPanel(chatId) : undefined]);
        renderAssistantReplies();
        renderMembers();
        // Pin and Unpin follow our role.
        if (open?.id === chatId) {
          renderMessages("keep");
          renderThread();
          renderPins();
        }
      } while (state.again);
    } finally {
      membersRefreshes.delete(chatId);
    }
  })();
  return state.done;
}

/**
 * Reads the panel's members afresh from the first page, as many pages as it
 * showed (at least one): a member added, removed or given another role
 * shows where the server has them now.
 */
async function readMembersPanel(chatId: string) {
  const read = ++membersReads;
  const atLeast = Math.max(MEMBERS_PAGE, membersPanel?.members.length ?? 0);
  const members: Member[] = [];
  let pageToken = "";
  do {
    const res = await api.chats.listMembers({ chatId, pageSize: MEMBERS_PAGE, pageToken });
    members.push(...res.members);
    pageToken = res.nextPageToken;
  } while (pageToken && members.length < atLeast);
  await ensureUsers(members.map((m) => m.userId));
  if (read !== membersReads || membersPanel?.chatId !== chatId) return; // closed, or read again since
  membersPanel = { chatId, members, nextPageToken: pageToken };
}

/** "More members": the panel's next page, appended. */
async function moreMembers() {
  const state = membersPanel;
  const read = membersReads;
  if (!state?.nextPageToken) return;
  const res = await api.chats.listMembers({ chatId: state.chatId, pageSize: MEMBERS_PAGE, pageToken: state.nextPageToken });
  await ensureUsers(res.members.map((m) => m.userId));
  if (membersPanel !== state || read !== membersReads) return; // closed, or read again from the start
  const shown = new Set(state.members.map((m) => m.userId));
  state.members.push(...res.members.filter((m) => !shown.has(m.userId)));
  state.nextPageToken = res.nextPageToken;
  renderMembers();
}

/**
 * Redraws the members panel: each member with their role, and what we may
 * do (by our role). A member's item is kept and patched in place while the
 * panel shows the same group: it is redrawn with each member's change and
 * each rename, and a Remove or a role pressed just then lost its click.
 */
function renderMembers() {
  if (!membersPanel) return;
  const { chatId } = membersPanel;
  const role = myRole(chatId);
  el("add-members-form").hidden = role !== MemberRole.OWNER && role !== MemberRole.ADMIN;
  const ul = el("member-list");
  if (ul.dataset.chatId !== chatId) {
    ul.replaceChildren(); // another group's items act on that group
    ul.dataset.chatId = chatId;
  }
  const held = heldItems(ul, "userId");
  placeChildren(ul, membersPanel.members.map((m) => {
    const fresh = memberItem(chatId, m, role);
    const li = keptOr(held.get(m.userId), fresh);
    // A select's choice is no attribute, so patchElement leaves it: the role as now known.
    const select = li.querySelector("select");
    if (li !== fresh && select) select.value = roleName(m.role);
    return li;
  }));
  el("more-members").hidden = !membersPanel.nextPageToken;
}

function memberItem(chatId: string, m: Member, role: MemberRole): HTMLLIElement {
  const li = document.createElement("li");
  li.className = "member" + (m.userId === me?.id ? " me" : "");
  li.dataset.testid = "member";
  li.dataset.userId = m.userId;
  li.dataset.role = roleName(m.role);
  const name = document.createElement("span");
  name.className = "member-name";
  name.textContent = userName(m.userId) + (m.userId === me?.id ? " (you)" : "");
  if (isBot(m.userId)) name.append(" ", botBadge());
  const username = document.createElement("span");
  username.className = "member-username";
  const u = users.get(m.userId);
  // Beside a display name of their own, the username tells people apart.
  if (u?.username && u.displayName && u.displayName !== u.username) username.textContent = `@${u.username}`;
  li.append(name, username);
  if (role === MemberRole.OWNER && m.userId !== me?.id) {
    li.append(roleSelect(chatId, m));
  } else {
    const label = document.createElement("span");
    label.className = "role";
    label.dataset.testid = "member-role";
    label.textContent = roleName(m.role);
    li.append(label);
  }
  if (mayRemove(role, m)) li.append(smallButton("Remove", "remove-member", () => removeMember(chatId, m.userId), membersAct));
  return li;
}

/** The owner's control of another member's role (UpdateMember); "owner" hands ownership over. */
function roleSelect(chatId: string, m: Member): HTMLSelectElement {
  // The member as the panel holds them when the select changes (a kept select outlives this drawing).
  const now = () => membersPanel?.members.find((x) => x.userId === m.userId) ?? m;
  const select = document.createElement("select");
  select.dataset.testid = "member-role";
  select.autocomplete = "off";
  select.title = "Their role (owner: hand the group over to them; you become an admin)";
  for (const [, name] of ROLES) select.append(new Option(name, name));
  select.value = roleName(m.role);
  select.addEventListener("change", () => {
    const wanted = ROLES.find(([, name]) => name === select.value)?.[0];
    if (wanted === undefined) return;
    if (wanted === MemberRole.OWNER &&
        !window.confirm(`Make ${userName(m.userId)} the owner of this group? You become an admin.`)) {
      select.value = roleName(now().role);
      return;
    }
    select.disabled = true;
    void membersAct(async () => {
      try {
        await api.chats.updateMember({ chatId, userId: m.userId, role: wanted });
      } finally {
        await refreshMembers(chatId); // the role as the server has it, saved or not
      }
    });
  });
  return select;
}

/** A refusal under the panel's form, in the server's words, until the next action or edit of the form. */
function membersNote(text: string) {
  el("members-error").textContent = text;
  el("members-error").hidden = !text;
}

/** The user ids a server message names, as usernames (or names) a person knows them by. */
function withUsernames(text: string): string {
  for (const [id, u] of users) if (text.includes(id)) text = text.split(id).join(u.username || userName(id));
  return text;
}

/**
 * Runs an action of the members panel: a refusal (someone's privacy
 * setting, no such user, too many members, the owner leaving) shows in the
 * panel, not as a page error.
 */
async function membersAct(what: () => Promise<void>) {
  membersNote("");
  await act(async () => {
    try {
      await what();
    } catch (err) {
      if (api.isUnauthenticated(err)) throw err; // act signs out
      membersNote(withUsernames(api.describe(err)));
    }
  });
}

/** Adds the people named in the panel's form (usernames, comma or space separated) to its group. */
async function addMembers() {
  const chatId = membersPanel?.chatId;
  const names = input("add-members").value.split(/[\s,]+/).map((n) => n.replace(/^@/, "")).filter(Boolean);
  if (!chatId || names.length === 0) return;
  const userIds: string[] = [];
  for (const username of new Set(names)) {
    let user: User | undefined;
    try {
      ({ user } = await api.sessions.getUser({ username }));
    } catch (err) {
      if (!api.isNotFound(err)) throw err;
      // The server's words name no one: say whom it did not find.
      membersNote(`${username}: ${api.describe(err)}`);
      return;
    }
    if (!user) continue;
    users.set(user.id, user);
    if (user.id !== me?.id) userIds.push(user.id);
  }
  if (userIds.length === 0) return;
  await api.chats.addMembers({ chatId, userIds });
  input("add-members").value = "";
  await refreshMembers(chatId);
}

async function removeMember(chatId: string, userId: string) {
  await api.chats.removeMember({ chatId, userId });
  await refreshMembers(chatId);
}

/** Leaves the panel's group (RemoveMember of ourselves): it goes from the page, as when the stream says so. */
async function leaveGroup() {
  const chatId = membersPanel?.chatId;
  const chat = chatId ? chats.get(chatId) : undefined;
  if (!chatId || !chat || !me) return;
  if (!window.confirm(`Leave ${chatName(chat)}? You can come back only if someone adds you.`)) return;
  await api.chats.removeMember({ chatId, userId: me.id });
  forgetChat(chatId);
}

el("open-members").addEventListener("click", () => {
  if (membersPanel && membersPanel.chatId === open?.id) closeMembers();
  else void act(openMembers);
});
el("close-members").addEventListener("click", closeMembers);
el("more-members").addEventListener("click", () => void act(moreMembers));
el("add-members-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const button = el<HTMLButtonElement>("add-members-submit");
  button.disabled = true;
  void membersAct(addMembers).finally(() => (button.disabled = false));
});
// A refusal shown stays while it is read, and goes once the form is edited.
el("add-members").addEventListener("input", () => membersNote(""));
el("leave-group").addEventListener("click", () => {
  const button = el<HTMLButtonElement>("leave-group");
  button.disabled = true;
  void membersAct(leaveGroup).finally(() => (button.disabled = false));
});

// ---------------------------------------------------------------- privacy

/**
 * A privacy setting in the Settings panel: its <select> (#id; its note, #id-note),
 * its field of PrivacySettings and path in an update_mask, and its values by
 * the <option> values. Each is saved alone, its path the only one in the
 * mask, so saving one never overwrites another.
 */
interface PrivacyControl {
  id: string;
  field: "groupAdds" | "directChats" | "readReceipts";
  path: string;
  options: [number, string][];
  /** As the server last gave it; undefined until read (the select stays disabled). */
  value?: number;
  /** The ticket of the read or save `value` came from: an answer to one started earlier is stale. */
  ticket: number;
  /** A save of this setting is under way: the select shows the choice being saved, disabled, until it ends. */
  saving: boolean;
  noteTimer?: ReturnType<typeof setTimeout>;
}

const PRIVACY: PrivacyControl[] = [
  {
    // "Who can add me to groups"
    id: "group-adds", field: "groupAdds", path: "group_adds", ticket: 0, saving: false,
    options: [[GroupAdds.EVERYONE, "everyone"], [GroupAdds.PEERS, "peers"], [GroupAdds.NOBODY, "nobody"]],
  },
  {
    // "Who can start a chat with me"
    id: "direct-chats", field: "directChats", path: "direct_chats", ticket: 0, saving: false,
    options: [[DirectChats.EVERYONE, "everyone"], [DirectChats.PEERS, "peers"], [DirectChats.NOBODY, "nobody"]],
  },
  {
    // "Read receipts": hidden, others' pages show no "Seen" for us (ours still show theirs)
    id: "read-receipts", field: "readReceipts", path: "read_receipts", ticket: 0, saving: false,
    options: [[ReadReceipts.EVERYONE, "everyone"], [ReadReceipts.NOBODY, "nobody"]],
  },
];

/** Numbers the privacy reads and saves in the order they start. */
let privacyTickets = 0;

/** Takes a setting's value from the answer to read or save `ticket`, unless a later one's is held already. */
function takePrivacy(c: PrivacyControl, value: number | undefined, ticket: number): boolean {
  if (ticket < c.ticket) return false;
  c.ticket = ticket;
  c.value = value;
  return true;
}

/** Shows a setting's value in its select, which is enabled once it is known (and no save of it is under way). */
function renderPrivacy(c: PrivacyControl) {
  const select = el<HTMLSelectElement>(c.id);
  const name = c.options.find(([value]) => value === c.value)?.[1];
  select.value = name ?? "everyone";
  select.disabled = name === undefined || c.saving;
}

/** A word beside a setting: a confirmation (gone after a few seconds) or an error (kept until the next change). */
function privacyNote(c: PrivacyControl, text: string, failed = false) {
  clearTimeout(c.noteTimer);
  const note = el(`${c.id}-note`);
  note.textContent = text;
  note.classList.toggle("failed", failed);
  if (text && !failed) c.noteTimer = setTimeout(() => (note.textContent = ""), 4_000);
}

/** Forgets the settings shown: each select disabled, its note empty. */
function resetPrivacy() {
  for (const c of PRIVACY) {
    c.value = undefined;
    c.ticket = ++privacyTickets; // what a read or save under way brings is not ours
    renderPrivacy(c);
    privacyNote(c, "");
  }
}

/** Reads the caller's privacy settings after sign-in; a failure leaves the selects disabled and says why. */
async function loadPrivacy() {
  resetPrivacy();
  await readPrivacy(true);
}

/**
 * Reads the privacy settings again: they changed in another tab or on
 * another device (account_updated), or the stream reconnected (it sends no
 * change made while it was down). A failure leaves the selects as they were.
 */
function refreshPrivacy() {
  return readPrivacy(false);
}

/**
 * Reads the privacy settings (GetPrivacySettings) into the selects. One
 * being saved shows the choice until the save ends, then the newest value
 * known. A select the person has open, or has focused, takes the new value
 * all the same: a select only ever shows a saved setting, so there is no
 * half-made choice to keep, and a pick made after it is saved as picked
 * (the last change wins, as between two tabs). A setting that changed
 * while shown says so beside it, so it does not change unseen.
 */
async function readPrivacy(signIn: boolean) {
  const user = me;
  const ticket = ++privacyTickets;
  try {
    const { settings } = await api.chats.getPrivacySettings({});
    if (me !== user) return; // signed out meanwhile
    for (const c of PRIVACY) {
      const shown = c.value;
      if (!takePrivacy(c, settings?.[c.field], ticket) || c.saving) continue;
      renderPrivacy(c);
      if (shown === undefined) privacyNote(c, ""); // a failed read's note goes
      else if (c.value !== shown) privacyNote(c, "Changed in another tab or on another device");
    }
  } catch (err) {
    if (me !== user) return;
    if (!signIn) throw err;
    for (const c of PRIVACY) privacyNote(c, `Cannot read this setting: ${api.describe(err)}`, true);
  }
}

/** Forgets the settings (on sign-out): the next person's are read afresh. */
function clearPrivacy() {
  resetPrivacy();
}

/** Saves the value chosen in a setting's select (UpdatePrivacySettings, its path alone in the mask). */
function savePrivacy(c: PrivacyControl) {
  const select = el<HTMLSelectElement>(c.id);
  const wanted = c.options.find(([, name]) => name === select.value)?.[0];
  if (wanted === undefined) return;
  c.saving = true;
  select.disabled = true;
  privacyNote(c, "");
  const user = me;
  const ticket = ++privacyTickets;
  void act(async () => {
    try {
      const { settings } = await api.chats.updatePrivacySettings({
        settings: { [c.field]: wanted }, updateMask: { paths: [c.path] },
      });
      if (me !== user) return; // signed out meanwhile
      // Unless a read started since has been answered (another tab's change, maybe after this one).
      takePrivacy(c, settings?.[c.field] ?? wanted, ticket);
      privacyNote(c, "Saved");
    } catch (err) {
      if (me !== user) return;
      if (api.isUnauthenticated(err)) throw err; // act signs out
      // Not saved: say why beside the select, which goes back to the saved value.
      privacyNote(c, `Not saved: ${api.describe(err)}`, true);
    } finally {
      c.saving = false;
      if (me === user) renderPrivacy(c);
    }
  });
}

for (const c of PRIVACY) el(c.id).addEventListener("change", () => savePrivacy(c));

// ---------------------------------------------------------------- blocking

/**
 * The users we blocked: ListBlockedUsers at sign-in, read again whenever
 * another tab or device of ours blocks or unblocks someone (account_updated)
 * and when the stream reconnects, and this page's own Block and Unblock
 * meanwhile. null until read: the Block button waits for it.
 */
let blocked: Set<string> | null = null;
/** Numbers the reads of whom we blocked, and this page's own blocks and unblocks, in the order they start or end. */
let blockedTickets = 0;
/** The ticket of what `blocked` holds: a read started before it brings an older list. */
let blockedTicket = 0;
/** Counts the reads of whom we blocked started, so that a Block or Unblock can tell one started while it ran. */
let blockedReads = 0;
/**
 * The users this page's own Block or Unblock (the chat's button, Settings'
 * Blocked people) is under way for: their buttons stay disabled until it
 * answers, whatever a re-read shows meanwhile.
 */
const blockCalls = new Set<string>();

/** The other person of direct chat `chatId`, if a person this page may block or unblock (not a bot, not deleted). */
function blockablePeer(chatId: string): string | undefined {
  const chat = chats.get(chatId);
  const peer = peers.get(chatId);
  if (chat?.kind !== ChatKind.DIRECT || !peer || isBot(peer) || deletedUsers.has(peer)) return undefined;
  return peer;
}

/** Whether we blocked the other person of direct chat `chatId` (so it takes no messages from us either). */
function blockedByMe(chatId: string): boolean {
  const peer = peers.get(chatId);
  return !!peer && !!blocked?.has(peer) && chats.get(chatId)?.kind === ChatKind.DIRECT;
}

/** Reads whom we blocked after sign-in, every page; a failure says why and leaves the Block button disabled. */
function loadBlocked() {
  return readBlocked(true);
}

/** Reads whom we blocked again (account_updated, a reconnect); a failure leaves the list as it was. */
function refreshBlocked() {
  return readBlocked(false);
}

/** Reads whom we blocked (ListBlockedUsers, every page) and shows it, unless something newer is shown already. */
async function readBlocked(signIn: boolean) {
  const user = me;
  const ticket = ++blockedTickets;
  blockedReads++;
  if (signIn) {
    blocked = null;
    blockedTicket = ticket;
    renderBlocking();
  }
  try {
    const ids = new Set<string>();
    let pageToken = "";
    do {
      const res = await api.chats.listBlockedUsers({ pageSize: 200, pageToken });
      for (const b of res.blockedUsers) ids.add(b.userId);
      pageToken = res.nextPageToken;
    } while (pageToken);
    await ensureUsers(ids);
    if (me !== user || ticket < blockedTicket) return; // signed out meanwhile, or a newer list is shown
    blockedTicket = ticket;
    blocked = ids;
  } catch (err) {
    if (me !== user) return;
    if (!signIn) throw err;
    if (api.isUnauthenticated(err)) return; // the stream signs out
    showError(`Cannot read whom you blocked: ${api.describe(err)}`);
  }
  renderBlocking();
}

/**
 * Shows the block as it stands: the open direct chat's Block (or Unblock)
 * button, the composer closed with a line saying why while we block its
 * other person, and Settings' Blocked people if the panel is open.
 */
function renderBlocking() {
  const button = el<HTMLButtonElement>("block-user");
  const peer = open ? blockablePeer(open.id) : undefined;
  button.hidden = !peer;
  button.disabled = !blocked || (!!peer && blockCalls.has(peer));
  const isBlocked = !!peer && !!blocked?.has(peer);
  button.textContent = isBlocked ? "Unblock" : "Block";
  button.title = !blocked
    ? "reading whom you blocked…"
    : isBlocked
      ? `Let ${userName(peer)} write to you again`
      : `Stop ${userName(peer)} writing to you, starting chats with you or adding you to groups`;
  const note = el("composer-blocked");
  note.textContent = isBlocked ? `You blocked ${userName(peer)}. Unblock to send messages.` : "";
  note.hidden = !isBlocked;
  input("composer").disabled = isBlocked;
  el<HTMLButtonElement>("send").disabled = isBlocked;
  renderBlockedPanel();
}

/** A refusal of a send in the open chat, in the server's words, under the timeline; "" puts it away. */
function composerError(text: string) {
  el("composer-error").textContent = text;
  el("composer-error").hidden = !text;
}

/**
 * Blocks (BlockUser) or unblocks (UnblockUser) `userId`, their buttons
 * disabled meanwhile. The answer says how things stood when the call was
 * made; a re-read started while it ran (another tab's block or unblock, or
 * the news of this one) may have read before or after it, so then a read
 * made after the answer decides what is shown.
 */
async function setBlocked(userId: string, block: boolean) {
  const user = me;
  const readsBefore = blockedReads;
  blockCalls.add(userId);
  renderBlocking();
  try {
    if (block) await api.chats.blockUser({ userId });
    else await api.chats.unblockUser({ userId });
    if (me !== user || !blocked) return;
    if (blockedReads !== readsBefore) {
      try {
        await refreshBlocked();
        return;
      } catch (err) {
        if (me !== user || !blocked) return;
        console.warn("blocked users:", err); // then the answer is the newest word this page has
      }
    }
    blockedTicket = ++blockedTickets; // a read under way may not have seen it
    if (block) blocked.add(userId);
    else blocked.delete(userId);
  } finally {
    blockCalls.delete(userId);
    if (me === user) renderBlocking();
  }
}

const blockUser = (userId: string) => setBlocked(userId, true);
const unblockUser = (userId: string) => setBlocked(userId, false);

el("block-user").addEventListener("click", () => {
  const button = el<HTMLButtonElement>("block-user");
  const peer = open ? blockablePeer(open.id) : undefined;
  if (!peer || !blocked) return;
  if (blocked.has(peer)) {
    button.disabled = true;
    void act(() => unblockUser(peer)).finally(renderBlocking);
    return;
  }
  const name = userName(peer);
  if (!window.confirm(`Block ${name}? Neither of you can write in this chat until you unblock ${name}, ` +
      `and ${name} can no longer start a chat with you or add you to groups.`)) return;
  button.disabled = true;
  void act(() => blockUser(peer)).finally(renderBlocking);
});

/** A refusal in Settings' Blocked people, in the server's words, until the next action there. */
function blockedNote(text: string) {
  el("blocked-error").textContent = text;
  el("blocked-error").hidden = !text;
}

/**
 * Redraws Settings' Blocked people: each user we blocked by username, with
 * Unblock. Until the first read answers, a line says it is under way, and
 * "You have blocked nobody" then takes its place: the sections below do
 * not move down under a pointer as the read ends (a guest about to press
 * Create account had its press land on the button and its release above
 * it, and no click). A user's row is kept and patched in place: it is
 * redrawn with each re-read (another tab's or device's block) and each
 * chat opened, and an Unblock pressed just then lost its click.
 */
function renderBlockedPanel() {
  if (!settingsOpen) return;
  const ids = [...(blocked ?? [])];
  el("blocked-reading").hidden = !!blocked;
  el("blocked-empty").hidden = !blocked || ids.length > 0;
  const ul = el("blocked-list");
  const held = heldItems(ul, "userId");
  placeChildren(ul, ids.map((id) => {
    const li = document.createElement("li");
    li.className = "blocked-user";
    li.dataset.testid = "blocked-user";
    li.dataset.userId = id;
    const name = document.createElement("span");
    name.className = "blocked-name";
    name.textContent = users.get(id)?.username || userName(id);
    const unblock = smallButton("Unblock", "unblock-user", () => unblockUser(id), blockedAct);
    unblock.disabled = blockCalls.has(id);
    li.append(name, unblock);
    return keptOr(held.get(id), li);
  }));
}

/** Runs an action of Settings' Blocked people: its refusal shows in the panel, not as a page error. */
async function blockedAct(what: () => Promise<void>) {
  blockedNote("");
  await act(async () => {
    try {
      await what();
    } catch (err) {
      if (api.isUnauthenticated(err)) throw err; // act signs out
      blockedNote(withUsernames(api.describe(err)));
    }
  });
}

// ---------------------------------------------------------------- profile and password

/** The header's "who is signed in": our display name as the server last gave it. */
function renderMe() {
  el("me").textContent = me ? userName(me.id) + (me.guest ? " (guest)" : "") : "";
}

let profileNoteTimer: ReturnType<typeof setTimeout> | undefined;

/** A word beside Save: "Saved" (gone after a few seconds) or why not (kept until the next save). */
function profileNote(text: string, failed = false) {
  clearTimeout(profileNoteTimer);
  const note = el("display-name-note");
  note.textContent = text;
  note.classList.toggle("failed", failed);
  if (text && !failed) profileNoteTimer = setTimeout(() => (note.textContent = ""), 4_000);
}

/** A line under Change password: the outcome, in the server's words if refused. */
function passwordNote(text: string, failed = false) {
  const note = el("password-note");
  note.textContent = text;
  note.classList.toggle("failed", failed);
}

/** A line under the guest's "create an account" form: why the server refused it. */
function claimNote(text: string) {
  el("claim-note").textContent = text;
}

/**
 * Shows the caller's profile in Settings as signed in (nobody: empty and
 * disabled), Change password for a person only (a guest has no password),
 * and "create an account" for a guest only, empty.
 */
function resetProfile() {
  const box = input("display-name");
  box.value = me?.displayName ?? "";
  box.placeholder = me?.username ?? "";
  box.disabled = !me;
  el<HTMLButtonElement>("save-display-name").disabled = !me;
  profileNote("");
  el("password-form").hidden = !me || me.guest;
  input("password-username").value = me?.username ?? "";
  input("current-password").value = "";
  input("new-password").value = "";
  passwordNote("");
  el("claim-form").hidden = !me?.guest;
  for (const id of ["claim-username", "claim-password", "claim-display-name"]) input(id).value = "";
  claimNote("");
}

/** Takes our user as the server now has it: the header, our messages and the panels show the new name. */
function noteMe(user: User) {
  me = user;
  users.set(user.id, user);
  renderMe();
  renderChatList();
  renderMessages("keep");
  renderThread();
  renderMembers();
  renderPins();
}

// Saves the display name (UpdateUser, mask display_name alone); empty is the username again.
el("profile-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = me;
  if (!user) return;
  const box = input("display-name");
  const save = el<HTMLButtonElement>("save-display-name");
  save.disabled = true;
  profileNote("");
  void act(async () => {
    try {
      const res = await api.sessions.updateUser({
        user: { id: user.id, displayName: box.value }, updateMask: { paths: ["display_name"] },
      });
      if (me !== user) return; // signed out meanwhile
      if (!res.user) throw new Error("the server returned no user");
      noteMe(res.user);
      box.value = res.user.displayName; // as stored: trimmed, or the username for an empty one
      profileNote("Saved");
    } catch (err) {
      if (me !== user) return;
      if (api.isUnauthenticated(err)) throw err; // act signs out
      profileNote(`Not saved: ${api.describe(err)}`, true); // what was typed stays, to correct
    } finally {
      if (me) save.disabled = false;
    }
  });
});

// Changes the password (ChangePassword): the server ends every other session of ours, this one goes on.
el("password-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = me;
  if (!user || user.guest) return;
  const current = input("current-password");
  const next = input("new-password");
  const request = { currentPassword: current.value, newPassword: next.value };
  // Passwords stay on the page no longer than the call, whatever its outcome.
  current.value = "";
  next.value = "";
  const button = el<HTMLButtonElement>("change-password");
  button.disabled = true;
  passwordNote("");
  void act(async () => {
    try {
      await api.sessions.changePassword(request);
      if (me !== user) return;
      passwordNote("Password changed; your other sessions were signed out.");
    } catch (err) {
      if (me !== user) return;
      if (api.isUnauthenticated(err)) throw err; // act signs out
      passwordNote(`Not changed: ${api.describe(err)}`, true);
    } finally {
      button.disabled = false;
    }
  });
});

/**
 * ClaimAccount for guest `guestId`, and where its answer is lost (the
 * network or a restarting server: a transient error) a log-in with the
 * credentials it sent. The claim may have gone through all the same, and
 * then it ended the guest's session: only the account's password opens the
 * account now. The log-in answers the guest's own id if it did; then the
 * page goes on as after a claim. A log-in that fails, or opens another
 * user's account (the claim never came, and someone else has that username
 * and password: that session is revoked at once), leaves the claim's own
 * error standing, and the guest as it was.
 */
async function claimAccount(guestId: string, request: { username: string; password: string; displayName: string }) {
  try {
    return await api.sessions.claimAccount(request);
  } catch (err) {
    if (!api.isTransient(err)) throw err;
    const login = await api.sessions.createSession({ username: request.username, password: request.password }).catch(() => null);
    if (login?.user?.id === guestId) return login;
    if (login?.token) {
      void api.sessions.revokeSession({}, { headers: { authorization: `Bearer ${login.token}` } }).catch(() => {});
    }
    throw err;
  }
}

// A guest keeps its chats by claiming an account (ClaimAccount): the same
// user, now a person. The server ends every session of the guest, this
// page's too, and answers with the account's new session: the page stores
// its token and goes on with it at once, the chats and the open one as
// they are, its stream re-opened from where it was.
el("claim-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const user = me;
  if (!user?.guest || claiming) return;
  const password = input("claim-password");
  const request = {
    username: input("claim-username").value.trim(),
    password: password.value,
    displayName: input("claim-display-name").value.trim(),
  };
  password.value = ""; // the rest stays, to correct after a refusal
  const button = el<HTMLButtonElement>("claim-account");
  button.disabled = true;
  claimNote("");
  stream?.abort(); // its end by the claim is not an error to show
  stream = null;
  void act(async () => {
    let done = () => {};
    claiming = new Promise((resolve) => (done = resolve));
    api.claimMark.set(user.id, Date.now() + CLAIM_MARK_MS); // the other tabs' guest sessions end with this one
    try {
      const res = await claimAccount(user.id, request);
      if (!res.user || !res.token) throw new Error("the server returned no account");
      if (me !== user) return; // signed out meanwhile
      api.token.set(res.token);
      noteMe(res.user);
      resetProfile(); // the guest's form goes, Change password comes
    } catch (err) {
      if (me !== user) return;
      if (api.isUnauthenticated(err)) throw err; // the guest's session had ended already: act signs out
      claimNote(api.describe(err)); // username taken, a field refused, too many: nothing changed
    } finally {
      api.claimMark.clear(); // after the account's token is stored: the other tabs hear of that first
      claiming = null;
      done();
      button.disabled = false;
    }
    // The guest as before after a refusal, the account after a claim: live again from the last changes seen.
    stream = new AbortController();
    void runStream(stream.signal);
  });
});

// ---------------------------------------------------------------- settings

/**
 * The Settings side panel, opened from the header: the display name, the
 * privacy settings, the people we blocked (each with Unblock), Change
 * password and Delete account. Open or not.
 */
let settingsOpen = false;

function openSettings() {
  closeThread(); // one side panel at a time
  closeMembers();
  closePinned();
  settingsOpen = true;
  blockedNote("");
  el("settings-panel").hidden = false;
  el("open-settings").setAttribute("aria-expanded", "true");
  renderBlockedPanel();
}

function closeSettings() {
  settingsOpen = false;
  el("settings-panel").hidden = true;
  el("open-settings").setAttribute("aria-expanded", "false");
}

el("open-settings").addEventListener("click", () => (settingsOpen ? closeSettings() : openSettings()));
el("close-settings").addEventListener("click", closeSettings);

// ---------------------------------------------------------------- search

/** The search being shown: its query and the token of its next page. */
let search: { query: string; nextPageToken: string } | null = null;

/** A snippet's matches, which the server wraps in « and », as <mark>s. */
function snippetNodes(snippet: string): Node[] {
  return snippet.split(/(«[^»]*»)/).filter(Boolean).map((part) => {
    if (!part.startsWith("«")) return document.createTextNode(part);
    const mark = document.createElement("mark");
    mark.textContent = part.slice(1, -1);
    return mark;
  });
}

/**
 * Shows a page of search results (appended to the list unless `fresh`). The
 * server does a bounded share of work per call, so a page may come back
 * empty with a token to go on: a few such pages are followed at once.
 */
async function runSearch(query: string, pageToken = "") {
  let res = await api.messages.searchMessages({ query, pageToken, pageSize: 20 });
  for (let more = 0; res.results.length === 0 && res.nextPageToken && more < 5; more++) {
    res = await api.messages.searchMessages({ query, pageToken: res.nextPageToken, pageSize: 20 });
  }
  const list = el("search-list");
  if (!pageToken) list.replaceChildren();
  await ensureUsers(res.results.flatMap((r) => (r.message ? [r.message.authorId] : [])));
  const unknown = res.results.flatMap((r) => (r.message && !chats.has(r.message.chatId) ? [r.message.chatId] : []));
  for (const chatId of new Set(unknown)) await fetchChat(chatId);
  for (const r of res.results) {
    const m = r.message;
    if (!m) continue;
    const li = document.createElement("li");
    li.className = "search-result";
    li.dataset.testid = "search-result";
    li.dataset.chatId = m.chatId;
    li.dataset.seq = String(m.seq);
    li.dataset.authorId = m.authorId;
    li.dataset.time = m.sendTime ? timestampDate(m.sendTime).toLocaleString() : "";
    const where = document.createElement("div");
    where.className = "meta";
    where.textContent = searchWhere(li);
    const text = document.createElement("div");
    text.className = "snippet";
    text.append(...snippetNodes(r.snippet));
    li.append(where, text);
    li.addEventListener("click", () => void act(() => openChat(m.chatId)));
    list.append(li);
  }
  search = { query, nextPageToken: res.nextPageToken };
  el("search-summary").classList.remove("invalid");
  const shown = list.childElementCount;
  el("search-summary").textContent = shown === 0 ? `Nothing found for “${query}”` : `Messages with “${query}”`;
  el("search-more").hidden = !res.nextPageToken;
  el("search-results").hidden = false;
}

/** A search result's line above its snippet: its chat, its author and when, names as the page has them now. */
function searchWhere(result: HTMLElement): string {
  const chat = chats.get(result.dataset.chatId ?? "");
  return `${chat ? chatName(chat) : "a chat"} · ${userName(result.dataset.authorId)} · ${result.dataset.time ?? ""}`;
}

/** Names the shown search results' chats and authors anew, after a rename. */
function renderSearchNames() {
  for (const r of el("search-list").querySelectorAll<HTMLElement>(".search-result")) {
    const where = r.querySelector(".meta");
    if (where) where.textContent = searchWhere(r);
  }
}

/** Forgets the search: its results, its query and its token (on sign-out). */
function clearSearch() {
  search = null;
  input("search-query").value = "";
  el("search-list").replaceChildren();
  el("search-summary").textContent = "";
  el("search-more").hidden = true;
  el("search-results").hidden = true;
}

/** Removes the shown search results that `which` picks (a deleted message, a chat left). */
function dropSearchResults(which: (result: HTMLElement) => boolean) {
  for (const r of [...el("search-list").querySelectorAll<HTMLElement>(".search-result")]) if (which(r)) r.remove();
}

/** Shows an edited message's new text in place of its search snippet (the words searched for may be gone). */
function refreshSearchResult(chatId: string, m: Message) {
  for (const r of el("search-list").querySelectorAll<HTMLElement>(".search-result")) {
    if (r.dataset.chatId !== chatId || r.dataset.seq !== String(m.seq)) continue;
    const snippet = r.querySelector(".snippet");
    if (snippet) snippet.textContent = m.text.slice(0, 200);
  }
}

el("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const query = input("search-query").value.trim();
  if (!query) return;
  void act(async () => {
    try {
      await runSearch(query);
    } catch (err) {
      if (!api.isInvalidArgument(err)) throw err;
      // A query the server cannot read: say why beside the box, not as a failure.
      search = null;
      el("search-list").replaceChildren();
      el("search-more").hidden = true;
      el("search-summary").textContent = api.describe(err);
      el("search-summary").classList.add("invalid");
      el("search-results").hidden = false;
    }
  });
});
el("search-query").addEventListener("input", () => {
  if (!input("search-query").value.trim()) el("search-results").hidden = true;
});
el("search-more").addEventListener("click", () => {
  if (search?.nextPageToken) void act(() => runSearch(search!.query, search!.nextPageToken));
});

// ---------------------------------------------------------------- chat actions

el("new-chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  void act(async () => {
    const username = input("new-chat-username").value.trim();
    if (!username) return;
    const { user } = await api.sessions.getUser({ username });
    if (!user) return;
    users.set(user.id, user);
    let chat: Chat | undefined;
    try {
      ({ chat } = await api.chats.createChat({ memberIds: [user.id] }));
    } catch (err) {
      if (!api.isDenied(err)) throw err;
      // A new direct chat refused (their privacy setting direct_chats): the
      // server's words where this form's errors show, the user it names by
      // username; what was typed stays.
      showError(withUsernames(api.describe(err)));
      return;
    }
    if (!chat) return;
    peers.set(chat.id, user.id);
    addChat(chat);
    input("new-chat-username").value = "";
    await openChat(chat.id);
    await refreshPresence();
  });
});

// A group with a title and the members named (usernames, comma or space
// separated; `assistant` adds the assistant).
el("new-group-form").addEventListener("submit", (e) => {
  e.preventDefault();
  el("new-group-error").hidden = true;
  void act(async () => {
    const title = input("new-group-title").value.trim();
    const names = input("new-group-members").value.split(/[\s,]+/).map((n) => n.replace(/^@/, "")).filter(Boolean);
    if (!title || names.length === 0) return;
    const memberIds: string[] = [];
    const named = new Map<string, string>(); // user id -> the username typed for them
    for (const username of new Set(names)) {
      const { user } = await api.sessions.getUser({ username });
      if (!user) continue;
      users.set(user.id, user);
      named.set(user.id, user.username || username);
      if (user.id !== me?.id) memberIds.push(user.id);
    }
    let chat: Chat | undefined;
    try {
      ({ chat } = await api.chats.createChat({ kind: ChatKind.GROUP, title, memberIds }));
    } catch (err) {
      if (!api.isDenied(err)) throw err;
      // Refused for someone named (their privacy setting group_adds, or gone
      // meanwhile): the server's words under the form, until it is edited or
      // sent again, with the user id it names shown as the username typed.
      let text = api.describe(err);
      for (const [id, username] of named) text = text.split(id).join(username);
      el("new-group-error").textContent = text;
      el("new-group-error").hidden = false;
      return;
    }
    if (!chat) return;
    addChat(chat);
    input("new-group-title").value = "";
    input("new-group-members").value = "";
    await openChat(chat.id);
  });
});

// A refusal shown under the form stays while it is read, and goes once the form is edited.
el("new-group-form").addEventListener("input", () => (el("new-group-error").hidden = true));

el("assistant-replies").addEventListener("change", () => {
  const select = el<HTMLSelectElement>("assistant-replies");
  const chatId = open?.id;
  const wanted = REPLIES.find(([, name]) => name === select.value)?.[0];
  if (!chatId || wanted === undefined) return;
  select.disabled = true;
  void act(async () => {
    try {
      const { chat } = await api.chats.updateChat({
        chatId, chat: { assistantReplies: wanted }, updateMask: { paths: ["assistant_replies"] },
      });
      const held = chats.get(chatId);
      if (chat && held) held.assistantReplies = chat.assistantReplies;
    } finally {
      select.disabled = false;
      renderAssistantReplies();
    }
  });
});

el("composer-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const box = input("composer");
  const text = box.value.trim();
  if (!open || !text || blockedByMe(open.id)) return;
  box.value = "";
  composerError("");
  typingSent.delete(open.id); // the message ends the indicator; typing again renews it
  void send({ id: api.newUuid(), chatId: open.id, text, mentionUserIds: mentionsIn(text, open.id) });
});

// Tell the chat we are typing: at the first key, then at most every few
// seconds while it goes on (the indicator lasts 5 s on the others' pages).
input("composer").addEventListener("input", () => {
  if (!open || !input("composer").value.trim()) return;
  const chatId = open.id;
  const now = Date.now();
  if (now - (typingSent.get(chatId) ?? 0) < TYPING_RENEW_MS) return;
  typingSent.set(chatId, now);
  // Best effort: a refused or failed indicator is not worth an error.
  api.messages.setTyping({ chatId, typing: true }).catch(() => {});
});

el("open-assistant").addEventListener("click", () => void act(openAssistant));

input("show-history").addEventListener("change", () => {
  showHistory = input("show-history").checked;
  void act(showHistory ? loadOlderVersions : async () => renderMessages());
});

el("load-older").addEventListener("click", () => void act(loadOlder));
document.addEventListener("visibilitychange", () => void act(markRead));

// ---------------------------------------------------------------- other tabs

// The tabs of a browser share the stored token, but each page calls with
// its own (api.token), so another tab signing out or in as someone else
// never makes this one act for them unseen. This page follows instead: the
// same user's new token (a guest claimed its account there) quietly, its
// stream re-opened from where it was; anyone else's, or none, by going back
// to sign-in, saying why (a reload takes up the stored token).
let tabChanges = 0; // the latest storage change wins over lookups still under way

window.addEventListener("storage", (e) => {
  if (e.storageArea !== localStorage || (e.key !== null && e.key !== api.token.key)) return;
  const seen = ++tabChanges;
  const stored = api.token.stored();
  if (claiming || stored === api.token.get()) return; // a claim here stores its own token next
  if (!stored) {
    if (me) signOutLocally();
    showError("You signed out in another tab.");
    return;
  }
  void (async () => {
    const user = await api.userOf(stored).catch(() => undefined); // refused: no sign-in to follow
    if (!user || seen !== tabChanges || claiming || api.token.stored() !== stored) return;
    if (me && user.id === me.id) {
      const kindChanged = me.guest !== user.guest;
      api.token.follow(stored);
      noteMe(user);
      if (kindChanged) resetProfile(); // the guest's form goes, Change password comes
      stream?.abort();
      stream = new AbortController();
      void runStream(stream.signal);
      return;
    }
    if (me) signOutLocally();
    const who = user.guest ? "a guest" : user.displayName || user.username;
    showError(`You signed in as ${who} in another tab. Reload to go on as ${who}.`);
  })();
});

// ---------------------------------------------------------------- start

async function boot() {
  if (!api.token.load()) return showAuth();
  try {
    const res = await api.sessions.getCurrentSession({});
    if (!res.user) throw new Error("the server returned no user");
    await enter(res.user);
  } catch (err) {
    if (api.isUnauthenticated(err)) api.token.clear();
    else showError(`Cannot reach ${api.serverUrl}: ${api.describe(err)}`);
    showAuth();
  }
}

void boot();
