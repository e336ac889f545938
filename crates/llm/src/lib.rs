//! natter's client for OpenAI-compatible chat-completions servers:
//! llama.cpp server, Ollama, vLLM, LM Studio and OpenAI itself all speak
//! `POST {base}/v1/chat/completions` with `"stream": true`, answering with
//! server-sent events (the WHATWG HTML "server-sent events" format), one
//! `chat.completion.chunk` JSON object per `data:` line and `data: [DONE]`
//! at the end.
//!
//! The servers differ at the edges, so the chunks are read leniently with
//! types of our own rather than a strict OpenAI crate's: an empty
//! `finish_reason` is no finish reason, `usage: {}` or `null` is no usage,
//! `choices: null` is no choices, an event whose `data:` is empty is
//! nothing, a model's thinking is read under either name servers give it
//! (`reasoning_content`, `reasoning`), fields we do not know (`timings`,
//! ...) are ignored,
//! an `{"error": ...}` object inside the stream is an error, so is a
//! JSON body answered with 200 in place of the stream, and a stream
//! that ends without `[DONE]` after a `finish_reason` simply ends (the
//! caller sees no [`Event::Done`]; several servers just close the body).
//! One that ends with neither was cut short: [`LlmError::Truncated`]. That
//! is also how llama.cpp's server's mid-stream failure reads, which it
//! sends as an `error: {...}` line, a field the SSE format says to ignore.
//! SSE framing is the kept `eventsource-stream` crate's, which reassembles
//! lines and UTF-8 characters split across reads.
//!
//! Stopping a generation is dropping its stream: that closes the HTTP
//! connection (HTTP/1.1) or resets the stream (HTTP/2), the only cancel
//! these servers understand.
//!
//! [`classifier`] is the client of the other model server natter talks
//! to: an external prompt-injection classifier (text-embeddings-inference).

use std::fmt::Display;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub mod classifier;
#[cfg(feature = "testing")]
pub mod testing;

use eventsource_stream::Eventsource as _;
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};

/// Who said a message of the conversation sent to the model (the
/// chat-completions `role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions ahead of the conversation.
    System,
    /// A person's message.
    User,
    /// A reply of the model.
    Assistant,
}

/// One message of the conversation sent to the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// Who said it.
    pub role: Role,
    /// What was said (plain text).
    pub content: String,
    /// The chat-completions `name`: which participant of `role` said it,
    /// where several people share the user role (a group chat). At most 64
    /// of `[A-Za-z0-9_-]`, the pattern OpenAI's API accepts; left out of
    /// the request when None.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// `content` said as `role`, by no named participant.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self { role, content: content.into(), name: None }
    }
}

/// Where and how to reach the server.
#[derive(Clone)]
pub struct Config {
    /// The server's base URL, with or without a trailing `/v1` (for
    /// example `http://127.0.0.1:8080` or `https://api.openai.com/v1`).
    pub base_url: String,
    /// The `model` of every request.
    pub model: String,
    /// Sent as `Authorization: Bearer <key>` when set; never logged (the
    /// `Debug` of this type hides it).
    pub api_key: Option<String>,
    /// `max_tokens` of every request: the longest reply, in tokens (sent as
    /// `max_completion_tokens` to a model that refuses `max_tokens`: see
    /// [`Client::stream`]).
    pub max_tokens: u32,
    /// Longest wait for the TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// How long a reply may take to start, pause and last.
    pub timeouts: Timeouts,
}

/// The limits of one reply; each ends it with [`LlmError::Timeout`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request to the first piece of text (prompt processing).
    pub first_token: Duration,
    /// Between two chunks once text flows.
    pub idle: Duration,
    /// The whole reply.
    pub total: Duration,
}

impl Default for Timeouts {
    /// 60 s to the first token, 30 s between chunks, 10 minutes in all.
    fn default() -> Self {
        Self { first_token: Duration::from_secs(60), idle: Duration::from_secs(30), total: Duration::from_secs(600) }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("max_tokens", &self.max_tokens)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// What a streamed reply brings, in the order the server sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The next piece of the reply's text (never empty); the reply is
    /// these pieces concatenated.
    Content(String),
    /// A piece of a reasoning model's thinking before its answer: a
    /// delta's `reasoning_content` (DeepSeek-R1-style, as llama.cpp and
    /// vLLM send it) or `reasoning` (as Ollama's OpenAI-compatible endpoint
    /// sends it); a delta with both gives one event, of the first that is
    /// not empty, `reasoning_content` first (both names are taken to carry
    /// the same thought). Not part of the reply, but the model is at work,
    /// so it counts as the first token and against the idle limit as text
    /// does.
    Reasoning(String),
    /// Why the model stopped (`stop`, `length`, ...; a server's own words).
    Finish(String),
    /// Token counts, when the server reports them (most do in a last chunk).
    Usage(Usage),
    /// `data: [DONE]`: the server ended the stream as it should.
    Done,
}

/// Token counts of a reply (any of them may be missing: servers differ).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    /// Tokens of the conversation sent.
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    /// Tokens of the reply.
    #[serde(default)]
    pub completion_tokens: Option<u64>,
    /// Their sum, as the server counts it.
    #[serde(default)]
    pub total_tokens: Option<u64>,
}

/// Why a reply could not be had, or ended early.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// The configuration cannot work (a malformed base URL, say).
    #[error("invalid LLM client configuration: {0}")]
    Config(String),
    /// No HTTP answer: connection refused, timed out, reset.
    #[error("the LLM server could not be reached: {0}")]
    Unreachable(String),
    /// The server refused before streaming: HTTP `status` (401, 429, 500,
    /// ...) with the server's message; or it answered 200 with a JSON body
    /// (`Content-Type: application/json`) instead of an event stream, as
    /// some servers answer an error, with that body's message. Whatever
    /// the status, the message never holds the configured API key, nor a
    /// word shaped like one.
    #[error("the LLM server answered HTTP {status}: {message}")]
    Status {
        /// The HTTP status code.
        status: u16,
        /// The server's `error.message`, or the start of its body.
        message: String,
    },
    /// The server sent an error object inside the stream.
    #[error("the LLM server reported an error mid-stream: {0}")]
    Stream(String),
    /// The connection failed mid-stream, or the bytes were not UTF-8 or SSE.
    #[error("reading the LLM server's stream failed: {0}")]
    Transport(String),
    /// A `data:` line that is neither `[DONE]` nor a JSON object.
    #[error("the LLM server sent a chunk that is not JSON: {0}")]
    Malformed(String),
    /// The stream ended with neither a `finish_reason` nor `[DONE]`: the
    /// server stopped writing mid-reply (it failed, or sent an error in a
    /// form that is not a `data:` chunk, as llama.cpp's `error:` line).
    #[error("the LLM server ended the stream mid-reply (no finish_reason, no [DONE])")]
    Truncated,
    /// A limit of [`Timeouts`] passed: `"first token"`, `"idle"` or
    /// `"total"`. The reply ends there (the text so far stands).
    #[error("the LLM server's reply timed out ({0})")]
    Timeout(&'static str),
}

impl LlmError {
    /// Whether the same request may succeed later: the server was
    /// unreachable, overloaded (429) or failed inside (5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable(_) | Self::Transport(_) | Self::Timeout(_) | Self::Truncated => true,
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Config(_) | Self::Stream(_) | Self::Malformed(_) => false,
        }
    }
}

/// A streamed reply: [`Event`]s until the server ends it; dropping it
/// closes the connection (stops the generation upstream).
pub type Reply = Pin<Box<dyn Stream<Item = Result<Event, LlmError>> + Send>>;

/// A client of one server and model; cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct Client {
    /// Whether the model refused `max_tokens` (OpenAI's o-series and
    /// gpt-5 models), so the limit goes as `max_completion_tokens`; shared
    /// by the clones.
    completion_tokens: Arc<AtomicBool>,
    http: reqwest::Client,
    /// Where requests go.
    endpoint: String,
    /// `endpoint` without the user name and password a base URL may carry.
    url: String,
    config: Config,
}

/// Most bytes of an error body read into [`LlmError::Status`].
const ERROR_BODY_BYTES: usize = 4_096;

/// Most times a request refused before its stream ([`retryable`]) is
/// sent again.
pub const RETRIES: u32 = 3;

/// The backoff step of the first retry, doubled for each further one
/// (0.25 s, 0.5 s, 1 s): the most a wait the server named none for lasts,
/// and the most added to one it named ([`retry_wait`]).
pub const RETRY_BACKOFF: Duration = Duration::from_millis(250);

/// The longest `Retry-After` honoured: a server that asks for a longer
/// wait is taken at its word, and the refusal is the answer.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(20);

/// Whether an answer of `status` before any stream may be asked again:
/// 429 (too many requests), 502, 503, 504 (a proxy, a loading or busy
/// server, a gateway timeout). Nothing was generated, so nothing is
/// paid or written twice.
pub fn retryable(status: u16) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
}

/// The wait before retry number `retry` (0 for the first), given the
/// server's `Retry-After` (`asked`, if it named one) and `draw`, a random
/// number in `[0, 1)`, so that the many replies one busy server refused at
/// once do not all come back at the same moment and refuse it again
/// ("Exponential Backoff And Jitter", AWS Architecture Blog, 2015). With
/// `step` = [`RETRY_BACKOFF`] doubled `retry` times:
///
/// - no `Retry-After`: equal jitter, between half a step and a step
///   (0.125..0.25 s, 0.25..0.5 s, 0.5..1 s): at least half the backoff, so
///   a server loading its model still gets room, and spread over the
///   other half;
/// - a `Retry-After`: the server's wait, never less (RFC 9110 section
///   10.2.3: how long to wait at least), plus up to a step, so that those
///   it told the same second (or the same HTTP date, whose resolution is a
///   second) spread over the step after it.
///
/// A `draw` outside `[0, 1]` is clamped to it (NaN to 0).
pub fn retry_wait(retry: u32, asked: Option<Duration>, draw: f64) -> Duration {
    let step = RETRY_BACKOFF.saturating_mul(2u32.saturating_pow(retry));
    let draw = if draw.is_nan() { 0.0 } else { draw.clamp(0.0, 1.0) };
    match asked {
        None => step / 2 + (step / 2).mul_f64(draw),
        Some(asked) => asked.saturating_add(step.mul_f64(draw)),
    }
}

/// The wait a `Retry-After` value asks for (RFC 9110 section 10.2.3):
/// delay-seconds, or an HTTP date (now or past: no wait). None when it is
/// neither.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// A request refused before its stream: the error, and whether (and
/// after how long, if the server said) it may be sent again.
struct Refused {
    error: LlmError,
    retry: bool,
    retry_after: Option<Duration>,
    /// A 400 that names `max_tokens` ([`refuses_max_tokens`]).
    max_tokens: bool,
}

impl From<LlmError> for Refused {
    fn from(error: LlmError) -> Self {
        Self { error, retry: false, retry_after: None, max_tokens: false }
    }
}

/// Whether a 400's body refuses the `max_tokens` parameter itself, as
/// OpenAI answers it for its reasoning models (o1, o3, o4-mini, gpt-5...):
/// `error.code` is `unsupported_parameter` or `error.message` says the
/// parameter is unsupported ("Unsupported parameter: 'max_tokens' is not
/// supported with this model. Use 'max_completion_tokens' instead."), and
/// `error.param` or the message names `max_tokens`. A limit too large for
/// the model (OpenAI's "max_tokens is too large", vLLM's "'max_tokens' or
/// 'max_completion_tokens' is too large") names it too, but is no
/// refusal of the parameter: the request stays as it is.
fn refuses_max_tokens(body: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
    let error = &value["error"];
    let message = error["message"].as_str().unwrap_or_default();
    let unsupported = error["code"].as_str() == Some("unsupported_parameter")
        || message.contains("Unsupported parameter")
        || message.contains("not supported");
    unsupported && (error["param"].as_str() == Some("max_tokens") || message.contains("'max_tokens'"))
}

impl Client {
    /// A client for `config`.
    ///
    /// Errors: [`LlmError::Config`] when the base URL is not an `http` or
    /// `https` URL with a host.
    pub fn new(config: Config) -> Result<Self, LlmError> {
        let base = config.base_url.trim_end_matches('/');
        let parsed = reqwest::Url::parse(base).map_err(|e| LlmError::Config(format!("base URL {base:?}: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(LlmError::Config(format!("base URL {base:?}: not an http(s) URL with a host")));
        }
        let endpoint = if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        };
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        let url = match reqwest::Url::parse(&endpoint) {
            Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
                let _ = (u.set_username(""), u.set_password(None));
                u.to_string()
            }
            _ => endpoint.clone(),
        };
        Ok(Self { completion_tokens: Arc::new(AtomicBool::new(false)), http, endpoint, url, config })
    }

    /// The endpoint every request goes to, without any user name or
    /// password the base URL carries (for logs).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Asks for a streamed reply to `messages` (`stream: true`, the
    /// configured `model` and `max_tokens`, usage requested in the last
    /// chunk). Returns once the server answered with a success status; the
    /// reply then streams.
    ///
    /// The limit goes as `max_tokens`, which llama.cpp's server, Ollama,
    /// vLLM, LM Studio and OpenAI's older models read; a model that refuses
    /// it with a 400 naming it (OpenAI's o-series and gpt-5 want
    /// `max_completion_tokens`) is asked again at once with
    /// `max_completion_tokens`, and this client (with its clones: one
    /// model) sends that from then on.
    ///
    /// A request refused before its stream with 429, 502, 503 or 504
    /// ([`retryable`]), or whose connection could not be made, is sent
    /// again, at most [`RETRIES`] times: after the server's `Retry-After`
    /// (seconds or an HTTP date; one longer than [`RETRY_AFTER_CAP`] is
    /// not waited for), else after [`RETRY_BACKOFF`], doubling, each wait
    /// with random jitter ([`retry_wait`]). Only
    /// before any answer streamed: nothing is ever asked twice once a
    /// stream began (a paid generation, text already shown). The retries
    /// and their waits are within the first token's and the total limit
    /// (a wait that would pass it is not made: the refusal is the answer),
    /// and each connection within the connect timeout.
    ///
    /// The reply ends with [`LlmError::Timeout`] when a limit of the
    /// configured [`Timeouts`] passes (the wait for the answer's status
    /// counts towards the first token and the total).
    ///
    /// Errors: [`LlmError::Unreachable`] without an answer,
    /// [`LlmError::Status`] for a non-success status or a JSON error body
    /// in place of the stream (the last one, after retries),
    /// [`LlmError::Timeout`] when no answer came within the first token's
    /// limit.
    pub async fn stream(&self, messages: &[ChatMessage]) -> Result<Reply, LlmError> {
        let start = Instant::now();
        let timeouts = self.config.timeouts;
        let wait = timeouts.first_token.min(timeouts.total);
        let deadline = start + wait;
        let events = tokio::time::timeout(wait, self.start(messages, deadline))
            .await
            .map_err(|_| LlmError::Timeout("first token"))??;
        Ok(Box::pin(limited(events, timeouts, start)))
    }

    /// The request, up to the answer's status, with its retries (see
    /// [`Client::stream`]); none waits past `deadline`.
    async fn start(
        &self,
        messages: &[ChatMessage],
        deadline: Instant,
    ) -> Result<impl Stream<Item = Result<Event, LlmError>> + Send + use<>, LlmError> {
        let mut retries = 0;
        loop {
            let refused = match self.attempt(messages).await {
                Ok(events) => return Ok(events),
                Err(refused) => refused,
            };
            // Nothing was generated: asked again at once, the other way.
            if refused.max_tokens && !self.completion_tokens.swap(true, Ordering::Relaxed) {
                continue;
            }
            if !refused.retry || retries == RETRIES {
                return Err(refused.error);
            }
            if refused.retry_after.is_some_and(|asked| asked > RETRY_AFTER_CAP) {
                return Err(refused.error);
            }
            let wait = retry_wait(retries, refused.retry_after, rand::random());
            if Instant::now() + wait >= deadline {
                return Err(refused.error);
            }
            retries += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// One request, up to the answer's status.
    async fn attempt(
        &self,
        messages: &[ChatMessage],
    ) -> Result<impl Stream<Item = Result<Event, LlmError>> + Send + use<>, Refused> {
        let limit = if self.completion_tokens.load(Ordering::Relaxed) { "max_completion_tokens" } else { "max_tokens" };
        let body = serde_json::json!({
            "model": self.config.model,
            "messages": messages,
            "stream": true,
            limit: self.config.max_tokens,
            "stream_options": { "include_usage": true },
        });
        let mut request = self.http.post(&self.endpoint).json(&body).header("accept", "text/event-stream");
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        // Errors name no URL: the base URL may carry credentials, and the
        // text reaches the reply's `generation.error`, which members see.
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                // Only a connection never made is surely no request seen.
                let retry = e.is_connect();
                let error = LlmError::Unreachable(e.without_url().to_string());
                return Err(Refused { retry, ..Refused::from(error) });
            }
        };
        let status = response.status();
        let key = self.config.api_key.as_deref();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, std::time::SystemTime::now()));
            let body = body_start(response.bytes_stream(), Vec::new()).await;
            let message = match status.as_u16() {
                // The server's words may quote the key ("Incorrect API key
                // provided: sk-...abcd"); members see this text.
                401 | 403 => "the server refused natter's credentials (--assistant-api-key-file)".to_owned(),
                _ => redact(&error_message(&body), key),
            };
            let max_tokens = status == reqwest::StatusCode::BAD_REQUEST && refuses_max_tokens(&body);
            let error = LlmError::Status { status: status.as_u16(), message };
            return Err(Refused { error, retry: retryable(status.as_u16()), retry_after, max_tokens });
        }
        let json =
            response.headers().get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(is_json);
        let bytes = response.bytes_stream().map(|chunk| chunk.map_err(reqwest::Error::without_url));
        Ok(answer(json, bytes, key).await?)
    }
}

/// Whether a `Content-Type` is JSON's (`application/json`, or any
/// `+json` type, with or without parameters).
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The reply of a success answer whose body is `bytes`: its events, or,
/// when the answer is labelled `json` and its body is a JSON object (it
/// starts with `{`, which no SSE line does), the server's error
/// ([`LlmError::Status`] 200 with the body's `error.message`, without
/// `key`). A body labelled JSON that holds SSE lines streams as any other.
async fn answer<S, B, E>(
    json: bool,
    bytes: S,
    key: Option<&str>,
) -> Result<impl Stream<Item = Result<Event, LlmError>> + Send + use<S, B, E>, LlmError>
where
    S: Stream<Item = Result<B, E>> + Send,
    B: AsRef<[u8]> + Send,
    E: Display + Send,
{
    let mut bytes = Box::pin(bytes);
    // What was read to tell, handed on to the events when it is no JSON.
    let mut head = Vec::new();
    if json {
        let mut seen = Vec::new();
        while let Some(chunk) = bytes.next().await {
            let told = match &chunk {
                Ok(piece) => {
                    seen.extend_from_slice(piece.as_ref());
                    seen.iter().any(|b| !b.is_ascii_whitespace())
                }
                Err(_) => true,
            };
            head.push(chunk);
            if told {
                break;
            }
        }
        if seen.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
            let body = body_start(bytes, seen).await;
            return Err(LlmError::Status { status: 200, message: redact(&json_answer_message(&body), key) });
        }
    }
    Ok(events(futures::stream::iter(head).chain(bytes)))
}

/// `body` and what follows of `bytes`, up to [`ERROR_BODY_BYTES`] and the
/// first read error.
async fn body_start<B: AsRef<[u8]>, E>(bytes: impl Stream<Item = Result<B, E>>, mut body: Vec<u8>) -> Vec<u8> {
    let mut bytes = std::pin::pin!(bytes);
    while body.len() < ERROR_BODY_BYTES
        && let Some(Ok(chunk)) = bytes.next().await
    {
        body.extend_from_slice(chunk.as_ref());
    }
    body.truncate(ERROR_BODY_BYTES);
    body
}

/// `message` without `key`, nor any word shaped like a key (starting
/// `sk-`, as OpenAI's and several others' do, masked or not): a server's
/// words may quote the key, and members see them.
fn redact(message: &str, key: Option<&str>) -> String {
    let message = match key.filter(|k| !k.is_empty()) {
        Some(key) => message.replace(key, "[redacted]"),
        None => message.to_owned(),
    };
    let key_like = |word: &str| word.trim_start_matches(|c: char| !c.is_alphanumeric()).starts_with("sk-");
    message.split(' ').map(|word| if key_like(word) { "[redacted]" } else { word }).collect::<Vec<_>>().join(" ")
}

/// `events` within `timeouts`, counted from `start`: the first text within
/// `first_token`, each later event within `idle`, all within `total`; a
/// limit passed is one [`LlmError::Timeout`], then the end.
fn limited(
    events: impl Stream<Item = Result<Event, LlmError>> + Send,
    timeouts: Timeouts,
    start: Instant,
) -> impl Stream<Item = Result<Event, LlmError>> + Send {
    let state = (Box::pin(events), false, false);
    futures::stream::unfold(state, move |(mut events, text, over)| async move {
        if over {
            return None;
        }
        let left = timeouts.total.saturating_sub(start.elapsed());
        let (limit, which) = match text {
            false if timeouts.first_token.saturating_sub(start.elapsed()) < left => {
                (timeouts.first_token.saturating_sub(start.elapsed()), "first token")
            }
            true if timeouts.idle < left => (timeouts.idle, "idle"),
            _ => (left, "total"),
        };
        match tokio::time::timeout(limit, events.next()).await {
            Ok(Some(event)) => {
                let text = text || matches!(event, Ok(Event::Content(_) | Event::Reasoning(_)));
                Some((event, (events, text, false)))
            }
            Ok(None) => None,
            Err(_) => Some((Err(LlmError::Timeout(which)), (events, text, true))),
        }
    })
}

/// The reply events of a server-sent-events body, however its bytes are
/// split: what [`Client::stream`] returns, for any byte stream. A body
/// that ends before any `finish_reason`, `[DONE]` or error ends with
/// [`LlmError::Truncated`].
pub fn events<S, B, E>(bytes: S) -> impl Stream<Item = Result<Event, LlmError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send,
    B: AsRef<[u8]> + Send,
    E: Display + Send,
{
    // (events, whether the reply has ended: a finish, [DONE] or an error).
    let state = (Box::pin(framed(bytes)), false);
    futures::stream::unfold(state, |(mut events, ended)| async move {
        match events.next().await {
            Some(event) => {
                let ended = ended || matches!(event, Ok(Event::Finish(_) | Event::Done) | Err(_));
                Some((event, (events, ended)))
            }
            None if ended => None,
            None => Some((Err(LlmError::Truncated), (events, true))),
        }
    })
}

/// The events of the body's `data:` lines, in order.
fn framed<S, B, E>(bytes: S) -> impl Stream<Item = Result<Event, LlmError>> + Send
where
    S: Stream<Item = Result<B, E>> + Send,
    B: AsRef<[u8]> + Send,
    E: Display + Send,
{
    bytes
        .eventsource()
        .map(|event| match event {
            Ok(event) => parse_data(&event.data),
            Err(e) => Err(LlmError::Transport(e.to_string())),
        })
        .flat_map(|parsed| {
            futures::stream::iter(match parsed {
                Ok(events) => events.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            })
        })
}

/// A chunk as servers send it; every field optional (see the crate docs).
#[derive(Deserialize)]
struct Chunk {
    #[serde(default, deserialize_with = "null_as_default")]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

/// A choice's `delta`. The thinking comes under two names (see
/// [`Event::Reasoning`]): two fields, not a serde alias, which would fail
/// a delta that has both as a duplicate field.
#[derive(Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    reasoning: Option<String>,
}

/// `null` read as the type's default (`#[serde(default)]` covers a missing
/// field only).
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// The events of one `data:` payload: `[DONE]`, nothing for an empty (or
/// blank) payload, or a chunk's text, finish reason and usage, in that
/// order (a chunk may carry all three).
///
/// Errors: [`LlmError::Stream`] for an error object, [`LlmError::Malformed`]
/// for anything else that is not a JSON object.
pub fn parse_data(data: &str) -> Result<Vec<Event>, LlmError> {
    let data = data.trim();
    if data == "[DONE]" {
        return Ok(vec![Event::Done]);
    }
    // A bare `data:` line, which SSE delivers as an event with empty data
    // (a keep-alive, say).
    if data.is_empty() {
        return Ok(Vec::new());
    }
    let chunk: Chunk = serde_json::from_str(data).map_err(|e| LlmError::Malformed(format!("{e}: {}", cut(data))))?;
    if let Some(error) = chunk.error {
        return Err(LlmError::Stream(error_text(&error)));
    }
    let mut events = Vec::new();
    for choice in chunk.choices {
        let Delta { content, reasoning_content, reasoning } = choice.delta.unwrap_or_default();
        let thought = [reasoning_content, reasoning].into_iter().flatten().find(|t| !t.is_empty());
        if let Some(thought) = thought {
            events.push(Event::Reasoning(thought));
        }
        if let Some(text) = content.filter(|t| !t.is_empty()) {
            events.push(Event::Content(text));
        }
        if let Some(reason) = choice.finish_reason.filter(|r| !r.is_empty()) {
            events.push(Event::Finish(reason));
        }
    }
    if let Some(usage) = chunk.usage.filter(|u| *u != Usage::default()) {
        events.push(Event::Usage(usage));
    }
    Ok(events)
}

/// The message of a JSON body answered with 200 where an event stream
/// should be: its error's (see [`error_message`]), or, with neither
/// `error` nor `message` in it (a server that ignored `stream: true`, say),
/// what it is and its start.
fn json_answer_message(body: &[u8]) -> String {
    let value = serde_json::from_slice::<serde_json::Value>(body).ok();
    if value.is_some_and(|v| v.get("error").is_some() || v.get("message").is_some()) {
        error_message(body)
    } else {
        format!("a JSON body, not an event stream: {}", cut(&String::from_utf8_lossy(body)))
    }
}

/// The message of an error body: `error.message` (or `error` as text, or
/// `message`) of a JSON body, else the body's start.
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => match value.get("error") {
            Some(error) => error_text(error),
            None => value
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| cut(&value.to_string())),
        },
        Err(_) => cut(&String::from_utf8_lossy(body)),
    }
}

/// The text of an `error` value: its `message`, or itself as text.
fn error_text(error: &serde_json::Value) -> String {
    match error {
        serde_json::Value::String(text) => text.clone(),
        other => {
            other.get("message").and_then(|m| m.as_str()).map(str::to_owned).unwrap_or_else(|| cut(&other.to_string()))
        }
    }
}

/// At most 200 characters of `text`, for error messages.
fn cut(text: &str) -> String {
    text.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A body as llama.cpp's server sends it: a role-only first chunk, a
    /// keep-alive comment, text with multi-byte characters, an empty
    /// `finish_reason`, unknown fields, a usage chunk, then `[DONE]`.
    const BODY: &str = concat!(
        "data: {\"id\":\"1\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"},\"finish_reason\":null}]}\n\n",
        ": keep-alive\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"Héllo, \"},\"finish_reason\":\"\"}],\"usage\":{}}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"世界 🙂\",\"reasoning_content\":null}}],\"timings\":{\"n\":1}}\r\n\r\n",
        "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":4,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn expected() -> Vec<Event> {
        vec![
            Event::Content("Héllo, ".into()),
            Event::Content("世界 🙂".into()),
            Event::Finish("stop".into()),
            Event::Usage(Usage { prompt_tokens: Some(5), completion_tokens: Some(4), total_tokens: Some(9) }),
            Event::Done,
        ]
    }

    /// The events of `body` delivered in pieces cut at `cuts` (byte offsets).
    fn events_of(body: &[u8], mut cuts: Vec<usize>) -> Vec<Event> {
        cuts.sort_unstable();
        cuts.dedup();
        let mut pieces = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().filter(|c| *c > 0 && *c < body.len()) {
            pieces.push(Ok::<_, std::convert::Infallible>(bytes::Bytes::copy_from_slice(&body[start..cut])));
            start = cut;
        }
        pieces.push(Ok(bytes::Bytes::copy_from_slice(&body[start..])));
        let collected = futures::executor::block_on(events(futures::stream::iter(pieces)).collect::<Vec<_>>());
        collected.into_iter().map(|e| e.expect("no error")).collect()
    }

    #[test]
    fn a_llama_cpp_body_reads_as_its_text_finish_usage_and_done() {
        assert_eq!(events_of(BODY.as_bytes(), vec![]), expected());
    }

    proptest! {
        /// Any split of the same bytes (inside a UTF-8 character, a JSON
        /// line, a CRLF) gives the same events.
        #[test]
        fn any_chunking_gives_the_same_events(cuts in proptest::collection::vec(0..BODY.len(), 0..40)) {
            prop_assert_eq!(events_of(BODY.as_bytes(), cuts), expected());
        }
    }

    #[test]
    fn reasoning_comes_apart_from_the_text() {
        let both = r#"{"choices":[{"delta":{"reasoning_content":"hmm","content":"Hi"}}]}"#;
        assert_eq!(parse_data(both).unwrap(), [Event::Reasoning("hmm".into()), Event::Content("Hi".into())]);
        let empty = r#"{"choices":[{"delta":{"reasoning_content":"","content":null}}]}"#;
        assert_eq!(parse_data(empty).unwrap(), []);
    }

    #[test]
    fn ollamas_reasoning_field_is_thinking_too() {
        let llama = parse_data(r#"{"choices":[{"delta":{"reasoning_content":"hm"}}]}"#).unwrap();
        let ollama = parse_data(r#"{"choices":[{"delta":{"reasoning":"hm"}}]}"#).unwrap();
        assert_eq!(ollama, [Event::Reasoning("hm".into())]);
        assert_eq!(ollama, llama);
        // Both names in one delta: one thought, no duplicate-field error.
        let both = r#"{"choices":[{"delta":{"reasoning_content":"hm","reasoning":"hm","content":""}}]}"#;
        assert_eq!(parse_data(both).unwrap(), [Event::Reasoning("hm".into())]);
        let empty_first = r#"{"choices":[{"delta":{"reasoning_content":"","reasoning":"hm"}}]}"#;
        assert_eq!(parse_data(empty_first).unwrap(), [Event::Reasoning("hm".into())]);
    }

    #[test]
    fn errors_inside_the_stream_and_garbage_are_errors_not_text() {
        let error = parse_data(r#"{"error":{"message":"context too long","type":"invalid_request_error"}}"#);
        assert!(matches!(error, Err(LlmError::Stream(m)) if m == "context too long"));
        assert!(matches!(parse_data(r#"{"error":"boom"}"#), Err(LlmError::Stream(m)) if m == "boom"));
        assert!(matches!(parse_data("not json"), Err(LlmError::Malformed(_))));
        assert_eq!(parse_data(r#"{"choices":[{"delta":{"content":null}}],"usage":null}"#).unwrap(), []);
    }

    #[test]
    fn an_empty_data_event_is_nothing_not_a_failure() {
        assert_eq!(parse_data("").unwrap(), []);
        assert_eq!(parse_data(" ").unwrap(), []);
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                    data:\n\n\
                    data: \n\n\
                    data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                    data: [DONE]\n\n";
        let got = all_events(body);
        assert!(
            matches!(&got[..], [Ok(Event::Content(t)), Ok(Event::Finish(f)), Ok(Event::Done)] if t == "Hi" && f == "stop"),
            "{got:?}"
        );
    }

    #[test]
    fn null_choices_are_no_choices() {
        let usage = r#"{"choices":null,"usage":{"prompt_tokens":5,"completion_tokens":4,"total_tokens":9}}"#;
        let expected = Usage { prompt_tokens: Some(5), completion_tokens: Some(4), total_tokens: Some(9) };
        assert_eq!(parse_data(usage).unwrap(), [Event::Usage(expected)]);
        assert_eq!(parse_data(r#"{"choices":null}"#).unwrap(), []);
    }

    /// All the events of `body`, errors included, in one piece.
    fn all_events(body: &str) -> Vec<Result<Event, LlmError>> {
        let piece = Ok::<_, std::convert::Infallible>(bytes::Bytes::copy_from_slice(body.as_bytes()));
        futures::executor::block_on(events(futures::stream::iter([piece])).collect::<Vec<_>>())
    }

    #[test]
    fn a_stream_without_done_ends_after_a_finish_reason_and_is_cut_short_without_one() {
        let finished = "data: {\"choices\":[{\"delta\":{\"content\":\"all\"},\"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(
            events_of(finished.as_bytes(), vec![]),
            [Event::Content("all".into()), Event::Finish("stop".into())]
        );
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"half\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" a";
        let got = all_events(cut);
        assert!(matches!(&got[..], [Ok(Event::Content(t)), Err(LlmError::Truncated)] if t == "half"), "{got:?}");
        // llama.cpp's server reports a failure mid-reply as an `error:`
        // line, which SSE ignores: the reply reads as cut short.
        let llama = "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n\
                     error: {\"code\":500,\"message\":\"out of memory\",\"type\":\"server_error\"}\n\n";
        let got = all_events(llama);
        assert!(matches!(&got[..], [Ok(Event::Content(t)), Err(LlmError::Truncated)] if t == "par"), "{got:?}");
        // An error chunk ends it once: no second error after it.
        let error = "data: {\"error\":{\"message\":\"boom\"}}\n\n";
        assert!(matches!(&all_events(error)[..], [Err(LlmError::Stream(m))] if m == "boom"));
    }

    /// Retries of replies a busy server refused together spread out
    /// instead of coming back in lockstep: each wait within its bounds
    /// (never below the server's Retry-After), and the draws of one retry
    /// cover its range rather than sharing one moment.
    #[test]
    fn retry_waits_are_jittered_within_their_bounds() {
        let ms = Duration::from_millis;
        // Equal jitter without Retry-After: half a step, then up to a step.
        for (retry, (low, high)) in
            [(ms(125), ms(250)), (ms(250), ms(500)), (ms(500), ms(1000))].into_iter().enumerate()
        {
            let retry = retry as u32;
            assert_eq!(retry_wait(retry, None, 0.0), low);
            assert_eq!(retry_wait(retry, None, 0.5), low + (high - low) / 2);
            assert!(retry_wait(retry, None, 0.999_999) < high);
            // The server's word is the least wait, plus up to a step.
            assert_eq!(retry_wait(retry, Some(Duration::from_secs(1)), 0.0), Duration::from_secs(1));
            assert_eq!(retry_wait(retry, Some(Duration::from_secs(1)), 0.5), Duration::from_secs(1) + low);
        }
        assert_eq!(retry_wait(0, None, 7.0), ms(250), "a draw past 1 is clamped");
        assert_eq!(retry_wait(0, None, f64::NAN), ms(125));

        // The random draws the client makes: 1,000 clients refused at once
        // retry across the whole range, never outside it (the chance that
        // none of 1,000 lands in the lowest fifth, or none in the highest,
        // is below 1e-96).
        let waits: Vec<Duration> = (0..1_000).map(|_| retry_wait(1, None, rand::random())).collect();
        assert!(waits.iter().all(|w| (ms(250)..ms(500)).contains(w)), "{waits:?}");
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*min < ms(300) && *max > ms(450), "not spread: {min:?}..{max:?}");
        let told = Some(Duration::from_secs(2));
        let waits: Vec<Duration> = (0..1_000).map(|_| retry_wait(2, told, rand::random())).collect();
        assert!(waits.iter().all(|w| (ms(2000)..ms(3000)).contains(w)), "{waits:?}");
        let (min, max) = (waits.iter().min().unwrap(), waits.iter().max().unwrap());
        assert!(*min < ms(2200) && *max > ms(2800), "not spread: {min:?}..{max:?}");
    }

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-1", now), None);
        assert!([429, 502, 503, 504].into_iter().all(retryable));
        assert!(![400, 401, 404, 500, 501].into_iter().any(retryable), "a request the server cannot serve");
    }

    #[test]
    fn error_bodies_give_their_message() {
        assert_eq!(error_message(br#"{"error":{"message":"rate limited","code":429}}"#), "rate limited");
        assert_eq!(error_message(br#"{"message":"model not found"}"#), "model not found");
        assert_eq!(error_message(b"Bad Gateway"), "Bad Gateway");
    }

    /// What [`answer`] makes of `body` in `pieces`, labelled JSON or not.
    fn answered(json: bool, pieces: &[&str], key: Option<&str>) -> Result<Vec<Result<Event, LlmError>>, LlmError> {
        let pieces: Vec<_> = pieces.iter().map(|p| Ok::<_, std::convert::Infallible>(p.as_bytes().to_vec())).collect();
        futures::executor::block_on(async {
            Ok(answer(json, futures::stream::iter(pieces), key).await?.collect::<Vec<_>>().await)
        })
    }

    #[test]
    fn a_json_body_in_place_of_the_stream_is_the_servers_error() {
        let body = r#"{"error":{"message":"model 'qwen3' not found, try pulling it first","type":"api_error"}}"#;
        let got = answered(true, &[body], None);
        assert!(
            matches!(&got, Err(LlmError::Status { status: 200, message }) if message == "model 'qwen3' not found, try pulling it first"),
            "{got:?}"
        );
        assert!(!got.unwrap_err().is_transient());
        // In pieces, after blank space.
        let (head, tail) = body.split_at(7);
        let got = answered(true, &["\n", " ", head, tail], None);
        assert!(matches!(&got, Err(LlmError::Status { status: 200, .. })), "{got:?}");
        // A server that ignored `stream: true`: said so, not cut short.
        let whole = r#"{"object":"chat.completion","choices":[{"message":{"content":"Hi"}}]}"#;
        let got = answered(true, &[whole], None);
        assert!(
            matches!(&got, Err(LlmError::Status { status: 200, message }) if message.starts_with("a JSON body, not an event stream: {")),
            "{got:?}"
        );
    }

    #[test]
    fn a_server_that_labels_its_event_stream_json_still_streams() {
        let sse = [
            "\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n",
            "data: [DONE]\n\n",
        ];
        let got = answered(true, &sse, None).unwrap();
        assert!(
            matches!(&got[..], [Ok(Event::Content(t)), Ok(Event::Finish(_)), Ok(Event::Done)] if t == "Hi"),
            "{got:?}"
        );
        assert!(is_json("application/json; charset=utf-8") && is_json("Application/Problem+JSON"));
        assert!(!is_json("text/event-stream") && !is_json("application/jsonl"));
    }

    #[test]
    fn an_error_body_never_shows_the_api_key() {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-proj-abc123. Or sk-...c123, (sk-x)"}}"#;
        let got = answered(true, &[body], Some("sk-proj-abc123"));
        let Err(LlmError::Status { message, .. }) = got else { panic!("{got:?}") };
        assert_eq!(message, "Incorrect API key provided: [redacted]. Or [redacted] [redacted]");
        let other = redact("bad key gsk_live_42 given", Some("gsk_live_42"));
        assert_eq!(other, "bad key [redacted] given");
        assert_eq!(redact("the task-list is full", None), "the task-list is full");
    }

    #[test]
    fn only_http_urls_with_a_host_are_accepted_and_v1_is_not_doubled() {
        let config = |base: &str| Config {
            base_url: base.into(),
            model: "m".into(),
            api_key: Some("sk-secret".into()),
            max_tokens: 16,
            connect_timeout: Duration::from_secs(1),
            timeouts: Timeouts::default(),
        };
        assert_eq!(
            Client::new(config("http://127.0.0.1:8080/")).unwrap().url(),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(
            Client::new(config("https://api.example/v1")).unwrap().url(),
            "https://api.example/v1/chat/completions"
        );
        assert!(matches!(Client::new(config("ftp://x")), Err(LlmError::Config(_))));
        assert!(matches!(Client::new(config("localhost:8080")), Err(LlmError::Config(_))));
        assert!(!format!("{:?}", config("http://x")).contains("sk-secret"), "the key never shows");
        let with_password = Client::new(config("https://natter:hunter2@llm.example")).unwrap();
        assert_eq!(with_password.url(), "https://llm.example/v1/chat/completions", "nor a password in the URL");
    }
}
