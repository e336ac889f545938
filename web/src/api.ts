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

export const token = {
  get: (): string | null => localStorage.getItem(tokenKey),
  set: (value: string) => localStorage.setItem(tokenKey, value),
  clear: () => localStorage.removeItem(tokenKey),
};

/** Adds `authorization: Bearer <token>` to every call once logged in. */
const bearer: Interceptor = (next) => (req) => {
  const t = token.get();
  if (t) req.header.set("authorization", `Bearer ${t}`);
  return next(req);
};

const transport = createGrpcWebTransport({ baseUrl: serverUrl, interceptors: [bearer] });

export const sessions = createClient(SessionService, transport);
export const chats = createClient(ChatService, transport);
export const messages = createClient(MessageService, transport);
export const assistant = createClient(AssistantService, transport);

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
