// The natter API as seen from the browser: gRPC-web clients for the
// services, the server address and the bearer token.
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { SessionService } from "./gen/natter/sessions/v1/sessions_pb";
import { ChatService } from "./gen/natter/chats/v1/chats_pb";
import { MessageService } from "./gen/natter/messages/v1/messages_pb";
import { AssistantService } from "./gen/natter/assistant/v1/assistant_pb";

/** The server: `?server=http://host:port`, else the page's own origin. */
export const serverUrl: string = (
  new URLSearchParams(window.location.search).get("server") || window.location.origin
).replace(/\/+$/, "");

// One token per server, so pointing the page at another server starts afresh.
const tokenKey = `natter.token:${serverUrl}`;

/**
 * This page's token: the one it signed in with or found stored at load,
 * held in memory. Every tab of the browser shares the stored one, so a tab
 * signing in as someone else changes what is stored, never what this page
 * calls with: the page sees it through the `storage` event and decides.
 */
let held: string | null = null;

export const token = {
  /** The localStorage key, to tell its `storage` events from others. */
  key: tokenKey,
  get: (): string | null => held,
  /** What is stored now: another tab's, maybe. */
  stored: (): string | null => localStorage.getItem(tokenKey),
  /** Takes the stored token as this page's (at load). */
  load: (): string | null => (held = localStorage.getItem(tokenKey)),
  /** Signs this page in with `value`, stored for the next load (and the other tabs). */
  set: (value: string) => {
    held = value;
    localStorage.setItem(tokenKey, value);
  },
  /** Goes on with a token another tab stored (the same user's), as stored already. */
  follow: (value: string) => (held = value),
  /** Forgets this page's token, and the stored one only if it is still this one. */
  clear: () => {
    if (held && localStorage.getItem(tokenKey) === held) localStorage.removeItem(tokenKey);
    held = null;
  },
};

/**
 * Says to this browser's other tabs that this one is claiming an account
 * for guest `userId` (ClaimAccount ends every session of the guest, theirs
 * too, before this tab has the account's token to store): until `until`
 * (ms since the epoch), after which a tab closed mid-claim is assumed.
 */
export const claimMark = {
  key: `natter.claim:${serverUrl}`,
  set: (userId: string, until: number) => localStorage.setItem(claimMark.key, JSON.stringify({ userId, until })),
  get: (): { userId: string; until: number } | null => {
    try {
      const mark = JSON.parse(localStorage.getItem(claimMark.key) ?? "null");
      return typeof mark?.userId === "string" && typeof mark?.until === "number" ? mark : null;
    } catch {
      return null;
    }
  },
  clear: () => localStorage.removeItem(claimMark.key),
};

/** Adds `authorization: Bearer <token>` to every call once logged in, unless the call names one. */
const bearer: Interceptor = (next) => (req) => {
  if (held && !req.header.has("authorization")) req.header.set("authorization", `Bearer ${held}`);
  return next(req);
};

const transport = createGrpcWebTransport({ baseUrl: serverUrl, interceptors: [bearer] });

export const sessions = createClient(SessionService, transport);
export const chats = createClient(ChatService, transport);
export const messages = createClient(MessageService, transport);
export const assistant = createClient(AssistantService, transport);

/** Whose token `t` is (GetCurrentSession with it, not with this page's). */
export async function userOf(t: string) {
  const res = await sessions.getCurrentSession({}, { headers: { authorization: `Bearer ${t}` } });
  return res.user;
}

export function isUnauthenticated(err: unknown): boolean {
  return ConnectError.from(err).code === Code.Unauthenticated;
}

/** The server refused: not a member (any more), or no such chat. */
export function isDenied(err: unknown): boolean {
  const code = ConnectError.from(err).code;
  return code === Code.PermissionDenied || code === Code.NotFound;
}

/** The server refused the caller this (a setting, a block, not a member): the message says why. */
export function isPermissionDenied(err: unknown): boolean {
  return ConnectError.from(err).code === Code.PermissionDenied;
}

/** No such thing (a user by that username, say). */
export function isNotFound(err: unknown): boolean {
  return ConnectError.from(err).code === Code.NotFound;
}

/** The server cannot do it as things stand (e.g. no assistant is configured). */
export function isFailedPrecondition(err: unknown): boolean {
  return ConnectError.from(err).code === Code.FailedPrecondition;
}

/** The request itself was wrong (the message names the field). */
export function isInvalidArgument(err: unknown): boolean {
  return ConnectError.from(err).code === Code.InvalidArgument;
}

/** Errors worth retrying with the same request (the network or server blipped). */
export function isTransient(err: unknown): boolean {
  const code = ConnectError.from(err).code;
  return code === Code.Unavailable || code === Code.Unknown || code === Code.DeadlineExceeded;
}

/** A message for a person: the server's own text without the code prefix. */
export function describe(err: unknown): string {
  const e = ConnectError.from(err);
  return e.rawMessage || Code[e.code] || String(err);
}

/** crypto.randomUUID needs a secure context; fall back to getRandomValues. */
export function newUuid(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}
