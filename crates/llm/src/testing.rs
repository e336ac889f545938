//! A scripted OpenAI-compatible server for tests (feature `testing`): axum
//! on 127.0.0.1:0, answering `POST /v1/chat/completions` the way llama.cpp's
//! server, Ollama or vLLM do, or misbehaving on cue. What cannot be had from
//! a real model on demand (a hang, an error mid-stream, a 429) is scripted
//! here, on the real wire protocol: HTTP/1.1, `text/event-stream`, bytes cut
//! at arbitrary points (inside a UTF-8 character, inside a JSON line).
//!
//! Each request takes the next queued [`Script`] (or [`Script::reply`] of
//! "ok" when none is queued); the server records every request and when its
//! client went away ([`ScriptedServer::requests`]).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use futures::StreamExt as _;
use rand::{Rng as _, SeedableRng as _};

/// One step of a streamed answer.
#[derive(Clone, Debug)]
pub enum Step {
    /// These bytes (SSE lines), written in pieces cut at random points.
    Bytes(String),
    /// A pause.
    Wait(Duration),
    /// Nothing more, ever, until the client goes away.
    Hang,
    /// Nothing more until [`ScriptedServer::release`] (or the client goes
    /// away), then the steps after it.
    Held,
    /// A chunk whose text is the time it is written, in µs since the Unix
    /// epoch, then `|`: a load test's token that carries when the provider
    /// emitted it.
    Stamp,
    /// A chunk whose text is the request's system message (a model that
    /// leaks its instructions).
    EchoSystem,
}

/// How the server answers one request.
#[derive(Clone, Debug)]
pub struct Script {
    /// The HTTP status; anything but 200, or 200 with a `body`, answers
    /// `body` as JSON (`application/json`) at once.
    pub status: u16,
    /// For a non-200 status, or 200 answered with JSON: the body.
    pub body: String,
    /// For 200 without a body: the streamed steps (`text/event-stream`);
    /// the stream ends after the last (with or without `[DONE]`, as the
    /// steps say).
    pub steps: Vec<Step>,
    /// Headers of the answer besides its content type (`Retry-After`, say).
    pub headers: Vec<(String, String)>,
}

/// `data: <chunk>` of a chunk carrying `text`.
pub fn content(text: &str) -> String {
    data(
        &serde_json::json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]}),
    )
}

/// `data: <json>` and the blank line that ends the event.
pub fn data(json: &serde_json::Value) -> String {
    format!("data: {json}\n\n")
}

impl Script {
    /// A well-behaved streamed reply of `text`: a role-only first chunk, a
    /// keep-alive comment, the text in pieces of up to 3 characters, the
    /// finish reason `stop`, a usage chunk, `[DONE]`.
    pub fn reply(text: &str) -> Self {
        let mut steps = vec![
            Step::Bytes(data(&serde_json::json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))),
            Step::Bytes(": keep-alive\n\n".into()),
        ];
        steps.extend(pieces(text).map(|piece| Step::Bytes(content(&piece))));
        steps.push(Step::Bytes(data(
            &serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        )));
        let usage = serde_json::json!({"prompt_tokens": 5, "completion_tokens": text.chars().count(), "total_tokens": 5 + text.chars().count()});
        steps.push(Step::Bytes(data(&serde_json::json!({"choices": [], "usage": usage}))));
        steps.push(Step::Bytes("data: [DONE]\n\n".into()));
        Self { headers: Vec::new(), status: 200, body: String::new(), steps }
    }

    /// [`Script::reply`] with `pause` before every piece of text.
    pub fn slow(text: &str, pause: Duration) -> Self {
        let mut script = Self::reply(text);
        script.steps = script
            .steps
            .into_iter()
            .flat_map(|step| match &step {
                Step::Bytes(b) if b.contains("\"content\"") => vec![Step::Wait(pause), step],
                _ => vec![step],
            })
            .collect();
        script
    }

    /// The first `text`, then nothing until the client goes away.
    pub fn hang_after(text: &str) -> Self {
        Self {
            headers: Vec::new(),
            status: 200,
            body: String::new(),
            steps: vec![Step::Bytes(content(text)), Step::Hang],
        }
    }

    /// The first `text`, then nothing until [`ScriptedServer::release`],
    /// then `rest` and the end of a well-behaved reply ([`Script::reply`]:
    /// finish reason `stop`, usage, `[DONE]`): a model that ends its
    /// answer exactly when a test says.
    pub fn held_after(text: &str, rest: &str) -> Self {
        let mut script = Self::reply(rest);
        // After the role-only first chunk and the keep-alive comment.
        script.steps.splice(2..2, [Step::Bytes(content(text)), Step::Held]);
        script
    }

    /// `text`, then an error object inside the stream (what llama.cpp's
    /// server sends when it fails mid-generation).
    pub fn error_after(text: &str, message: &str) -> Self {
        let error = data(&serde_json::json!({"error": {"message": message, "type": "server_error"}}));
        Self {
            headers: Vec::new(),
            status: 200,
            body: String::new(),
            steps: vec![Step::Bytes(content(text)), Step::Bytes(error)],
        }
    }

    /// `text`, then the end of the body without a finish reason or `[DONE]`.
    pub fn eof_after(text: &str) -> Self {
        Self { headers: Vec::new(), status: 200, body: String::new(), steps: vec![Step::Bytes(content(text))] }
    }

    /// `text`, then a failure the way llama.cpp's server reports one mid-
    /// reply: an `error: {...}` line (not `data:`), and the end of the body.
    pub fn llama_error_after(text: &str, message: &str) -> Self {
        let error = serde_json::json!({"code": 500, "message": message, "type": "server_error"});
        Self {
            headers: Vec::new(),
            status: 200,
            body: String::new(),
            steps: vec![Step::Bytes(content(text)), Step::Bytes(format!("error: {error}\n\n"))],
        }
    }

    /// `tokens` pieces of [`Step::Stamp`], one every `interval`, between the
    /// role-only first chunk and the finish reason, usage and `[DONE]`.
    pub fn stamped(tokens: usize, interval: Duration) -> Self {
        let mut steps =
            vec![Step::Bytes(data(&serde_json::json!({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})))];
        for _ in 0..tokens {
            steps.extend([Step::Wait(interval), Step::Stamp]);
        }
        steps.push(Step::Bytes(data(
            &serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
        )));
        steps.push(Step::Bytes("data: [DONE]\n\n".into()));
        Self { headers: Vec::new(), status: 200, body: String::new(), steps }
    }

    /// A reply that repeats the request's system message, then stops.
    pub fn echo_system() -> Self {
        Self {
            headers: Vec::new(),
            status: 200,
            body: String::new(),
            steps: vec![Step::EchoSystem, Step::Bytes("data: [DONE]\n\n".into())],
        }
    }

    /// `status` before any stream, with an OpenAI-style error body.
    pub fn status(status: u16, message: &str) -> Self {
        let body = serde_json::json!({"error": {"message": message, "code": status}}).to_string();
        Self { headers: Vec::new(), status, body, steps: Vec::new() }
    }

    /// This answer with the header `name: value` too.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// 200 with an OpenAI-style error body as `application/json` in place
    /// of the stream, as some servers answer a request they cannot serve.
    pub fn json_error(message: &str) -> Self {
        let body = serde_json::json!({"error": {"message": message, "type": "api_error"}}).to_string();
        Self { headers: Vec::new(), status: 200, body, steps: Vec::new() }
    }
}

/// `text` in pieces of up to 3 characters.
fn pieces(text: &str) -> impl Iterator<Item = String> + '_ {
    let chars: Vec<char> = text.chars().collect();
    (0..chars.len()).step_by(3).map(move |i| chars[i..(i + 3).min(chars.len())].iter().collect())
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The JSON body (`model`, `messages`, `stream`, `max_tokens`, ...).
    pub body: serde_json::Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// When it arrived.
    pub at: Instant,
    /// When the client closed the stream before its end, if it did.
    pub disconnected_at: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    scripts: VecDeque<Script>,
    /// How a request is answered when no script is queued (None: "ok").
    fallback: Option<Script>,
    requests: Vec<Recorded>,
    seed: u64,
}

/// See the module docs. Clones share the server.
#[derive(Clone)]
pub struct ScriptedServer {
    shared: Arc<Mutex<Shared>>,
    disconnects: Arc<tokio::sync::Notify>,
    /// True once [`ScriptedServer::release`]d.
    released: Arc<tokio::sync::watch::Sender<bool>>,
    url: String,
}

impl ScriptedServer {
    /// Serves on an ephemeral port until the runtime ends; byte cuts come
    /// from `seed` (each request its own, in order).
    pub async fn start(seed: u64) -> Self {
        let shared = Arc::new(Mutex::new(Shared { seed, ..Shared::default() }));
        let disconnects = Arc::new(tokio::sync::Notify::new());
        let released = Arc::new(tokio::sync::watch::channel(false).0);
        let state = (shared.clone(), disconnects.clone(), released.clone());
        let app = Router::new().route("/v1/chat/completions", post(complete)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self { shared, disconnects, released, url }
    }

    /// The base URL (`http://127.0.0.1:port`, an `--assistant-base-url`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Queues how the next request is answered.
    pub fn push(&self, script: Script) {
        self.shared.lock().unwrap().scripts.push_back(script);
    }

    /// How requests are answered while no script is queued (instead of
    /// [`Script::reply`] of "ok").
    pub fn set_fallback(&self, script: Script) {
        self.shared.lock().unwrap().fallback = Some(script);
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().unwrap().requests.clone()
    }

    /// Lets every answer held at a [`Step::Held`] go on, now and for good.
    pub fn release(&self) {
        self.released.send_replace(true);
    }

    /// Waits until the client of request `index` (0: the first) has gone
    /// away before the stream's end; when, or None if not `within`.
    pub async fn disconnected(&self, index: usize, within: Duration) -> Option<Instant> {
        let wait = async {
            loop {
                let changed = self.disconnects.notified();
                if let Some(at) = self.requests().get(index).and_then(|r| r.disconnected_at) {
                    return at;
                }
                changed.await;
            }
        };
        tokio::time::timeout(within, wait).await.ok()
    }
}

/// Marks its request disconnected when dropped before the stream's end.
struct Watch {
    shared: Arc<Mutex<Shared>>,
    disconnects: Arc<tokio::sync::Notify>,
    index: usize,
    finished: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.lock().unwrap().requests[self.index].disconnected_at = Some(Instant::now());
            self.disconnects.notify_waiters();
        }
    }
}

type AppState = (Arc<Mutex<Shared>>, Arc<tokio::sync::Notify>, Arc<tokio::sync::watch::Sender<bool>>);

async fn complete(
    State((shared, disconnects, released)): State<AppState>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let (script, index, seed, system) = {
        let mut state = shared.lock().unwrap();
        let body: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
        let system = body["messages"][0]["content"].as_str().unwrap_or_default().to_owned();
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
        state.requests.push(Recorded { body, authorization, at: Instant::now(), disconnected_at: None });
        let fallback = state.fallback.clone().unwrap_or_else(|| Script::reply("ok"));
        let script = state.scripts.pop_front().unwrap_or(fallback);
        (script, state.requests.len() - 1, state.seed.wrapping_add(state.requests.len() as u64), system)
    };
    if script.status != 200 || !script.body.is_empty() {
        let mut response = Response::builder()
            .status(StatusCode::from_u16(script.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header("content-type", "application/json");
        for (name, value) in &script.headers {
            response = response.header(name, value);
        }
        return response.body(Body::from(script.body)).expect("response");
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let watch = Watch { shared, disconnects, index, finished: false };
    let steps: Vec<Step> = script.steps;
    let stream = async_stream(move |tx| async move {
        // The whole watch lives as long as the stream is written.
        let mut watch = watch;
        for step in steps {
            let step = match step {
                Step::Stamp => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                    Step::Bytes(content(&format!("{}|", now.as_micros())))
                }
                Step::EchoSystem => Step::Bytes(content(&system)),
                other => other,
            };
            match step {
                Step::Bytes(text) => {
                    let bytes = text.into_bytes();
                    let mut start = 0;
                    while start < bytes.len() {
                        let end = (start + rng.random_range(1..=16)).min(bytes.len());
                        if tx.send(Bytes::copy_from_slice(&bytes[start..end])).await.is_err() {
                            return;
                        }
                        start = end;
                    }
                }
                Step::Wait(pause) => tokio::time::sleep(pause).await,
                Step::Hang => {
                    tx.closed().await;
                    return;
                }
                Step::Held => {
                    let mut release = released.subscribe();
                    tokio::select! {
                        _ = release.wait_for(|released| *released) => {}
                        () = tx.closed() => return,
                    }
                }
                Step::Stamp | Step::EchoSystem => unreachable!("turned into bytes above"),
            }
        }
        watch.finished = true;
    });
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream.map(Ok::<_, Infallible>)))
        .expect("response")
}

/// The bytes `produce` sends, as a stream; the receiver's drop (the client
/// went away) closes the channel.
fn async_stream<F, Fut>(produce: F) -> impl futures::Stream<Item = Bytes> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    tokio_stream_from(rx)
}

fn tokio_stream_from(mut rx: tokio::sync::mpsc::Receiver<Bytes>) -> impl futures::Stream<Item = Bytes> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A scripted classifier speaking text-embeddings-inference's `POST
/// /predict` (axum on 127.0.0.1:0; see [`crate::classifier`]): an input
/// (a string, or each of a batch `[["..."], ...]`) that holds the marker
/// within the characters the model reads is an injection (`INJECTION`
/// 0.95), any other safe (0.01); a batch is answered with one list per
/// input. The model reads the first `reads` characters of each input, as
/// TEI truncates to a model's maximum input. On cue ([`hold`]) it holds
/// the answers to requests that carry the marker until [`release`].
///
/// [`hold`]: ScriptedClassifier::hold
/// [`release`]: ScriptedClassifier::release
#[derive(Clone)]
pub struct ScriptedClassifier {
    inner: Arc<ClassifierInner>,
    url: String,
}

struct ClassifierInner {
    marker: String,
    reads: usize,
    /// Each request's inputs.
    requests: Mutex<Vec<Vec<String>>>,
    /// Told at every request.
    arrived: tokio::sync::Notify,
    /// True while marked requests are held.
    held: tokio::sync::watch::Sender<bool>,
}

impl ScriptedClassifier {
    /// Serves on an ephemeral port until the runtime ends.
    pub async fn start(marker: &str, reads: usize) -> Self {
        let inner = Arc::new(ClassifierInner {
            marker: marker.to_owned(),
            reads,
            requests: Mutex::new(Vec::new()),
            arrived: tokio::sync::Notify::new(),
            held: tokio::sync::watch::channel(false).0,
        });
        let app = Router::new().route("/predict", post(predict)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self { inner, url }
    }

    /// The base URL (`http://127.0.0.1:port`, a `--classifier-url`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Holds the answers to requests carrying the marker from now on.
    pub fn hold(&self) {
        self.inner.held.send_replace(true);
    }

    /// Answers the held requests, and those to come at once.
    pub fn release(&self) {
        self.inner.held.send_replace(false);
    }

    /// The inputs of every request so far.
    pub fn requests(&self) -> Vec<Vec<String>> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// Waits until `n` requests have carried the marker (anywhere in an
    /// input); whether they did `within`.
    pub async fn marked(&self, n: usize, within: Duration) -> bool {
        let wait = async {
            loop {
                let arrived = self.inner.arrived.notified();
                let marked =
                    self.requests().iter().filter(|r| r.iter().any(|i| i.contains(&self.inner.marker))).count();
                if marked >= n {
                    return;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
    }
}

async fn predict(State(inner): State<Arc<ClassifierInner>>, body: String) -> Response {
    let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let (inputs, batch): (Vec<String>, bool) = match &body["inputs"] {
        serde_json::Value::String(s) => (vec![s.clone()], false),
        serde_json::Value::Array(items) => {
            (items.iter().map(|i| i[0].as_str().unwrap_or_default().to_owned()).collect(), true)
        }
        _ => return Response::builder().status(422).body(Body::from("{\"error\":\"bad inputs\"}")).expect("response"),
    };
    let marked = inputs.iter().any(|i| i.contains(&inner.marker));
    inner.requests.lock().unwrap().push(inputs.clone());
    inner.arrived.notify_waiters();
    if marked {
        let mut held = inner.held.subscribe();
        let _ = held.wait_for(|held| !held).await;
    }
    let verdict = |input: &String| {
        let read: String = input.chars().take(inner.reads).collect();
        let p = if read.contains(&inner.marker) { 0.95 } else { 0.01 };
        serde_json::json!([{"label": "INJECTION", "score": p}, {"label": "SAFE", "score": 1.0 - p}])
    };
    let answer =
        if batch { serde_json::Value::Array(inputs.iter().map(verdict).collect()) } else { verdict(&inputs[0]) };
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(answer.to_string()))
        .expect("response")
}
