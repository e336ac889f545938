//! natter's assistant service: an AI assistant as a bot member of chats.
//!
//! The assistant is a bot user (`--assistant-username`, created on first
//! start through the sessions service). It follows every chat it is a
//! member of through the messages service's `FollowChats` stream, which
//! resumes each chat from the bot's read position, and answers each
//! person's message (in a direct chat: every one; in a group: those that
//! mention `@username`) with a reply streamed from an OpenAI-compatible
//! `/v1/chat/completions` server. The messages service owns every message
//! and seq: the assistant starts, streams, checkpoints and finishes replies
//! through its internal calls (see `messages_internal.proto`).
//!
//! Exactly once: a reply's id is derived from its prompt's id, under a
//! secret key where one is configured ([`service::ReplyIds`]), and
//! StartReply is idempotent by it, so a prompt seen twice (a replay after a
//! reconnect or a restart, a retried Ask, several assistant replicas) is
//! answered once. A crash mid-reply leaves a GENERATING reply whose
//! checkpoint stops being renewed; the sweeper ends it INTERRUPTED with its
//! last checkpoint once its lease (`--assistant-lease`) ran out. A planned
//! shutdown is no crash: no new prompt is taken, the replies being written
//! get a grace to finish (`--assistant-shutdown-grace` of `natter
//! assistant`; the all-in-one's `--shutdown-grace`), those still going then
//! end INTERRUPTED with their text so far, and [`run`] (and the
//! all-in-one's) returns only after that ([`Assistant::stopped`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use natter_auth::Authenticator;
use natter_kit::Server;
use natter_links::{AssistantChats, AssistantMessages, AssistantUsers};
use natter_proto::assistant::v1::assistant_service_server::AssistantServiceServer;
use tokio_util::sync::CancellationToken;

pub mod grpc;
pub mod retry;
pub mod service;

pub use grpc::AssistantApi;
pub use retry::Retry;
pub use service::{Assistant, ReplyIds, Settings};

/// The assistant's flags (and `NATTER_` environment variables). Without
/// `--assistant-base-url` the assistant is off: its RPCs answer
/// FAILED_PRECONDITION and nothing else changes.
#[derive(Clone, Debug, clap::Args)]
pub struct AssistantArgs {
    /// Base URL of an OpenAI-compatible chat-completions server, with or
    /// without `/v1`: llama.cpp's `llama-server` (`http://127.0.0.1:8080`),
    /// Ollama (`http://127.0.0.1:11434`), vLLM (`http://127.0.0.1:8000`), LM
    /// Studio (`http://127.0.0.1:1234`), OpenAI (`https://api.openai.com`).
    /// Unset: no assistant.
    #[arg(long, env = "NATTER_ASSISTANT_BASE_URL")]
    pub assistant_base_url: Option<String>,
    /// The `model` of every request (llama.cpp serves whatever it loaded;
    /// Ollama and OpenAI need a model's name).
    #[arg(long, env = "NATTER_ASSISTANT_MODEL", default_value = "default")]
    pub assistant_model: String,
    /// File holding the API key sent as `Authorization: Bearer` (first line,
    /// trimmed); never logged. Unset: no key (local servers need none).
    #[arg(long, env = "NATTER_ASSISTANT_API_KEY_FILE")]
    pub assistant_api_key_file: Option<PathBuf>,
    /// The system message sent ahead of every conversation.
    #[arg(
        long,
        env = "NATTER_ASSISTANT_SYSTEM_PROMPT",
        default_value = "You are a helpful assistant in a chat app. Answer briefly and clearly."
    )]
    pub assistant_system_prompt: String,
    /// The assistant's username (a bot user, created on first start).
    #[arg(long, env = "NATTER_ASSISTANT_USERNAME", default_value = "assistant")]
    pub assistant_username: String,
    /// `max_tokens` of every request: the longest reply, in tokens (sent as
    /// `max_completion_tokens` once the model refuses `max_tokens`, as
    /// OpenAI's o-series and gpt-5 models do).
    #[arg(long, env = "NATTER_ASSISTANT_MAX_TOKENS", default_value_t = 512)]
    pub assistant_max_tokens: u32,
    /// Most earlier messages of the chat sent to the model with a prompt.
    #[arg(long, env = "NATTER_ASSISTANT_CONTEXT_MESSAGES", default_value_t = 40)]
    pub assistant_context_messages: u32,
    /// Most characters of those messages (the newest are kept; the prompt
    /// always goes).
    #[arg(long, env = "NATTER_ASSISTANT_CONTEXT_CHARS", default_value_t = 16_000)]
    pub assistant_context_chars: usize,
    /// Longest wait for the connection to the server.
    #[arg(long, env = "NATTER_ASSISTANT_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub assistant_connect_timeout: Duration,
    /// Longest wait from the request to the reply's first text; the reply
    /// then ends FAILED.
    #[arg(long, env = "NATTER_ASSISTANT_FIRST_TOKEN_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub assistant_first_token_timeout: Duration,
    /// Longest pause between two chunks of a reply; the reply then ends
    /// FAILED with its text so far.
    #[arg(long, env = "NATTER_ASSISTANT_IDLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub assistant_idle_timeout: Duration,
    /// Longest a whole reply may take; it then ends FAILED with its text so
    /// far.
    #[arg(long, env = "NATTER_ASSISTANT_TOTAL_TIMEOUT", default_value = "10m", value_parser = humantime::parse_duration)]
    pub assistant_total_timeout: Duration,
    /// Most replies generated at once by this process (each chat has one at
    /// a time; the others wait their turn).
    #[arg(long, env = "NATTER_ASSISTANT_CONCURRENCY", default_value_t = 16)]
    pub assistant_concurrency: usize,
    /// Most replies generated at once by this process for the prompts of
    /// one person (the others wait their turn), so that someone prompting
    /// in many chats at once cannot take every slot of
    /// --assistant-concurrency.
    #[arg(long, env = "NATTER_ASSISTANT_CONCURRENCY_PER_USER", default_value_t = 4)]
    pub assistant_concurrency_per_user: usize,
    /// Most prompts waiting per chat behind the reply being generated; Ask
    /// beyond is RESOURCE_EXHAUSTED, a sent message beyond gets a FAILED
    /// reply.
    #[arg(long, env = "NATTER_ASSISTANT_QUEUE", default_value_t = 8)]
    pub assistant_queue: usize,
    /// Replies per prompt author (each a paid or GPU-bound generation):
    /// N/PERIOD admits N at once and N per PERIOD, per process; `off`
    /// admits all. Regenerate beyond is RESOURCE_EXHAUSTED; a prompt beyond
    /// (sent, or asked) gets a FAILED reply saying when to retry.
    #[arg(long, env = "NATTER_ASSISTANT_REPLY_RATE", default_value = "120/1h")]
    pub assistant_reply_rate: natter_kit::limits::Rate,
    /// A GENERATING reply whose checkpoint (renewed about every second) is
    /// older than this lost its generator (a crash): the sweeper ends it
    /// INTERRUPTED.
    #[arg(long, env = "NATTER_ASSISTANT_LEASE", default_value = "15s", value_parser = humantime::parse_duration)]
    pub assistant_lease: Duration,
    /// File holding the key reply ids are derived from: a secret of at least
    /// 32 bytes (surrounding whitespace ignored), the same for every
    /// assistant replica and kept across restarts (a reply's id names it
    /// once per prompt). Without the key nobody can tell a reply's id before
    /// it exists, and so take it first with SendMessage. Unset: in split
    /// mode the service credential; in an all-in-one alone, a key it makes
    /// once and keeps in its data directory (`assistant-reply-key`); in
    /// all-in-ones linked by NATS, ids anyone can compute (a taken one is
    /// passed over). Change it only with every assistant replica stopped.
    #[arg(long, env = "NATTER_ASSISTANT_REPLY_KEY_FILE")]
    pub assistant_reply_key_file: Option<PathBuf>,
}

impl AssistantArgs {
    /// Whether the assistant is on: a base URL is set.
    pub fn enabled(&self) -> bool {
        self.assistant_base_url.as_deref().is_some_and(|u| !u.is_empty())
    }

    /// The LLM client's configuration, or None when no base URL is set.
    ///
    /// Errors: the API key file cannot be read or is empty.
    pub fn llm_config(&self) -> anyhow::Result<Option<natter_llm::Config>> {
        let Some(base_url) = self.assistant_base_url.clone().filter(|u| !u.is_empty()) else { return Ok(None) };
        let api_key = match &self.assistant_api_key_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("--assistant-api-key-file {}: {e}", path.display()))?;
                let key = text.lines().next().unwrap_or_default().trim().to_owned();
                anyhow::ensure!(!key.is_empty(), "--assistant-api-key-file {}: the file is empty", path.display());
                Some(key)
            }
        };
        Ok(Some(natter_llm::Config {
            base_url,
            model: self.assistant_model.clone(),
            api_key,
            max_tokens: self.assistant_max_tokens,
            connect_timeout: self.assistant_connect_timeout,
            timeouts: natter_llm::Timeouts {
                first_token: self.assistant_first_token_timeout,
                idle: self.assistant_idle_timeout,
                total: self.assistant_total_timeout,
            },
        }))
    }

    /// Where reply ids come from: the key of `--assistant-reply-key-file`,
    /// else `fallback` (split mode: the service credential), else none
    /// (public ids). See [`ReplyIds`].
    ///
    /// Errors: the file cannot be read, holds fewer than 32 bytes (trimmed),
    /// or holds the deploy files' placeholder in a Kubernetes pod.
    pub fn reply_ids(&self, fallback: Option<&[u8]>) -> anyhow::Result<ReplyIds> {
        let Some(path) = &self.assistant_reply_key_file else {
            return Ok(fallback.map_or_else(ReplyIds::public, ReplyIds::keyed));
        };
        let what = "the reply key (--assistant-reply-key-file)";
        let text =
            std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {what} {}: {e}", path.display()))?;
        natter_kit::config::check_secret(what, &text)?;
        let key = text.trim();
        anyhow::ensure!(
            key.len() >= natter_kit::internal::MIN_CREDENTIAL_BYTES,
            "{what} must be at least {} bytes",
            natter_kit::internal::MIN_CREDENTIAL_BYTES
        );
        Ok(ReplyIds::keyed(key.as_bytes()))
    }

    /// How the assistant works, from these flags (reply ids public: see
    /// [`AssistantArgs::reply_ids`]).
    pub fn settings(&self) -> Settings {
        Settings {
            username: self.assistant_username.clone(),
            model: self.assistant_model.clone(),
            system_prompt: self.assistant_system_prompt.clone(),
            context_messages: self.assistant_context_messages.clamp(1, 200),
            context_chars: self.assistant_context_chars,
            concurrency: self.assistant_concurrency.max(1),
            concurrency_per_user: self.assistant_concurrency_per_user.max(1),
            queue: self.assistant_queue,
            reply_rate: self.assistant_reply_rate,
            lease: self.assistant_lease.max(Duration::from_secs(2)),
            ..Settings::default()
        }
    }
}

/// The services the assistant calls.
#[derive(Clone)]
pub struct Links {
    pub users: Arc<dyn AssistantUsers>,
    pub messages: Arc<dyn AssistantMessages>,
    pub chats: Arc<dyn AssistantChats>,
}

/// Starts the assistant `args` configures (None when no base URL is set):
/// makes sure its bot user exists, then follows its chats and sweeps
/// interrupted replies until `shutdown`. Reply ids are keyed by
/// `--assistant-reply-key-file`, else by `fallback_key` (split mode: the
/// service credential; the all-in-one alone: a key kept in its data
/// directory), else public ([`AssistantArgs::reply_ids`]).
///
/// At `shutdown` it takes no new prompt; the replies being written may go
/// on for `shutdown_grace` ([`Settings::shutdown_grace`]), then end
/// INTERRUPTED with their text so far. A caller that awaits
/// [`Assistant::stopped`] once its server drained, before it closes the
/// stores, has those ends stored before its runtime ends (one that ends
/// first drops them GENERATING, to be swept as after a crash).
///
/// `classifier`, the external prompt-injection classifier (the messages
/// service's `--classifier-url`), judges every person's message before it
/// goes to the model ([`Settings::classifier`]).
///
/// Errors: a bad configuration (base URL, API key file, reply key file), or
/// the sessions service refused the bot user (its username is a person's).
pub async fn open(
    args: &AssistantArgs,
    links: Links,
    fallback_key: Option<&[u8]>,
    shutdown: CancellationToken,
    shutdown_grace: Duration,
    classifier: Option<natter_llm::classifier::Classifier>,
) -> anyhow::Result<Option<Arc<Assistant>>> {
    let Some(config) = args.llm_config()? else { return Ok(None) };
    let settings = Settings { reply_ids: args.reply_ids(fallback_key)?, shutdown_grace, classifier, ..args.settings() };
    let keyed = settings.reply_ids.is_keyed();
    let llm = natter_llm::Client::new(config)?;
    let assistant = Assistant::start(llm, links, settings, shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("starting the assistant: {}", e.message()))?;
    tracing::info!(url = assistant.llm_url(), username = %args.assistant_username, keyed_reply_ids = keyed, "assistant on");
    Ok(Some(assistant))
}

/// Adds the public assistant service to `server` (FAILED_PRECONDITION on
/// every call when `assistant` is None).
pub async fn add_services(server: &mut Server, assistant: Option<Arc<Assistant>>, auth: Authenticator) {
    let (limit, timeout) = (server.args().max_request_bytes, server.args().transport.request_timeout);
    let api = AssistantApi::new(assistant, auth, timeout);
    server.add_service(AssistantServiceServer::new(api).max_decoding_message_size(limit)).await;
}

/// Command line of `natter-assistant` (split mode).
#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "natter-assistant",
    version,
    about = "natter's assistant service: an AI assistant as a chat member, replies from an OpenAI-compatible server"
)]
pub struct Config {
    #[command(flatten)]
    pub server: natter_kit::ServerArgs,
    #[command(flatten)]
    pub assistant: AssistantArgs,
    /// The internal listener serves only grpc.health.v1 (the assistant has
    /// no internal API); the credential authenticates its calls to the
    /// other services.
    #[command(flatten)]
    pub internal: natter_kit::InternalArgs,
    /// URL of the sessions service's internal listener (token checks, the
    /// bot user), e.g. http://sessions:7071.
    #[arg(long, env = "NATTER_SESSIONS_URL")]
    pub sessions_url: String,
    /// URL of the chats service's internal listener (membership, the
    /// assistant chat), e.g. http://chats:7071.
    #[arg(long, env = "NATTER_CHATS_URL")]
    pub chats_url: String,
    /// URL of the messages service's internal listener (prompts, replies,
    /// the bot's event stream), e.g. http://messages:7071.
    #[arg(long, env = "NATTER_MESSAGES_URL")]
    pub messages_url: String,
    /// On a shutdown signal (SIGTERM: every deploy), how long the replies
    /// being written may go on to finish. No new prompt is taken meanwhile
    /// (those waiting are left unread: another replica, or this one
    /// restarted, answers them, once each); the replies still going when it
    /// runs out end INTERRUPTED with their text so far, and the process
    /// exits at most 5 s later (or when --shutdown-grace runs out, if that
    /// is later). Keep both 5 s or more inside the orchestrator's stop
    /// timeout: Kubernetes' terminationGracePeriodSeconds minus the preStop
    /// sleep (deploy/k8s: 30 s - 5 s), Compose's stop_grace_period (20 s).
    #[arg(long, env = "NATTER_ASSISTANT_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub assistant_shutdown_grace: Duration,
    /// Base URL of the external prompt-injection classifier the messages
    /// service uses (Hugging Face text-embeddings-inference serving a
    /// sequence classifier: `POST /predict`): give both the same. Each
    /// person's message is classified before it goes to the model (the
    /// messages service's verdict comes after the message's commit, in the
    /// background); a prompt it rates HIGH or worse is refused, one it
    /// cannot judge gets a FAILED reply. Unset: natter-detect alone.
    #[arg(long, env = "NATTER_CLASSIFIER_URL")]
    pub classifier_url: Option<String>,
    /// Longest wait for the classifier's answer.
    #[arg(long, env = "NATTER_CLASSIFIER_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub classifier_timeout: Duration,
}

/// The classifier at `url` (None: none), each call bounded by `timeout`.
///
/// Errors: the URL is not an http(s) URL with a host.
pub fn classifier(url: Option<&str>, timeout: Duration) -> anyhow::Result<Option<natter_llm::classifier::Classifier>> {
    let Some(url) = url.filter(|u| !u.is_empty()) else { return Ok(None) };
    let classifier =
        natter_llm::classifier::Classifier::new(url, timeout).map_err(|e| anyhow::anyhow!("--classifier-url: {e}"))?;
    Ok(Some(classifier))
}

/// Runs the assistant service alone until `shutdown`: the public API on
/// `listener`, health on `internal_listener`. Any number of replicas may
/// run: each prompt is answered by the one whose StartReply created the
/// reply. Returns once the servers drained and the replies being written
/// ended ([`Assistant::stopped`]: within `--assistant-shutdown-grace` and
/// [`service::FINISH_WAIT`] more).
///
/// Reply ids are keyed by the service credential, which every replica has
/// (unless `--assistant-reply-key-file` names another key).
///
/// Errors: no service credential, a malformed URL or assistant flag, the
/// bot user refused, or serving fails. When the sessions service is not up
/// yet, the bot user is asked for again every second for a minute.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    internal_listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let credential = config.internal.credential()?;
    let deadline = config.internal.internal_call_timeout;
    let sessions = natter_kit::Link::connect("sessions", &config.sessions_url, &credential, deadline)?;
    let chats = natter_kit::Link::connect("chats", &config.chats_url, &credential, deadline)?;
    let messages = natter_kit::Link::connect("messages", &config.messages_url, &credential, deadline)?;
    let links = Links {
        users: Arc::new(natter_links::Grpc(sessions.clone())),
        messages: Arc::new(natter_links::Grpc(messages)),
        chats: Arc::new(natter_links::Grpc(chats)),
    };
    let classifier = classifier(config.classifier_url.as_deref(), config.classifier_timeout)?;
    let mut attempts = 0;
    let assistant = loop {
        let key = credential.header_value();
        let grace = config.assistant_shutdown_grace;
        let (fallback, classifier) = (Some(key.as_bytes()), classifier.clone());
        match open(&config.assistant, links.clone(), fallback, shutdown.clone(), grace, classifier).await {
            Ok(assistant) => break assistant,
            Err(e) if attempts < 60 && !shutdown.is_cancelled() => {
                attempts += 1;
                tracing::warn!(error = %e, "the assistant cannot start yet; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    };
    let auth = Authenticator::new(Arc::new(natter_auth::GrpcVerifier::new(sessions)));
    let mut public = Server::new(&config.server);
    add_services(&mut public, assistant.clone(), auth).await;
    let internal = Server::internal(&config.server, credential);
    natter_kit::serve::serve_split((public, listener), (internal, internal_listener), shutdown).await?;
    // The replies being written: finished (within the grace, which ran
    // along with the drain) before the process exits.
    if let Some(assistant) = assistant {
        assistant.stopped().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        assistant: AssistantArgs,
    }

    /// The assistant's flags with `--assistant-reply-key-file` holding
    /// `key` (None: the flag unset).
    fn args(dir: &std::path::Path, key: Option<&str>) -> AssistantArgs {
        let mut argv = vec!["natter".to_owned()];
        if let Some(key) = key {
            let path = dir.join(format!("reply-key-{}", key.len()));
            std::fs::write(&path, key).unwrap();
            argv.extend(["--assistant-reply-key-file".to_owned(), path.display().to_string()]);
        }
        Cli::try_parse_from(argv).unwrap().assistant
    }

    #[test]
    fn reply_ids_are_keyed_by_the_key_file_else_the_fallback() {
        let dir = std::env::temp_dir().join(format!("natter-assistant-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let (key, credential) = ("0123456789abcdef0123456789abcdef", b"a service credential of 32 bytes!".as_slice());
        let prompt = uuid::Uuid::now_v7().to_string();
        let ids = |r: anyhow::Result<ReplyIds>| r.unwrap().of(&prompt);
        let from_file = ids(args(&dir, Some(&format!("  {key}\n"))).reply_ids(Some(credential)));
        assert_eq!(from_file, ReplyIds::keyed(key.as_bytes()).of(&prompt), "the file's key, trimmed, first");
        let unset = args(&dir, None);
        assert_eq!(ids(unset.reply_ids(Some(credential))), ReplyIds::keyed(credential).of(&prompt));
        assert!(!unset.reply_ids(None).unwrap().is_keyed(), "the all-in-one without a key");
        let short = args(&dir, Some("too short")).reply_ids(None).unwrap_err();
        assert!(short.to_string().contains("at least 32 bytes"), "{short}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
