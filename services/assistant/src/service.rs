//! The assistant's domain: which messages are prompts, one reply at a time
//! per chat (later prompts wait, FIFO), the generation itself (stream,
//! publish deltas, checkpoint, stop), the sweeper of interrupted replies,
//! and a planned shutdown's grace for the replies being written
//! ([`Assistant::stopped`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use mpb::stream_events_response::Event;
use natter_links::Sight;
use natter_llm::{ChatMessage, Event as LlmEvent};
use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Status;
use uuid::Uuid;

use crate::Links;
use crate::retry::{Retry, is_transient};

/// The public namespace of reply ids (UUID version 5, RFC 9562 section
/// 5.5): anyone who reads this source can derive ids under it.
const REPLY_NAMESPACE: Uuid = Uuid::from_u128(0x1d6c_3f0e_2b7a_5c41_9e08_a55e_7a17_0001);

/// How many ids a prompt's first reply may take where they are public
/// ([`ReplyIds::of`]).
pub const REPLY_ID_CANDIDATES: usize = 8;

/// Where the id of a prompt's first reply comes from: UUIDs version 5 of
/// the prompt's id, the same on every replica and after every restart, so
/// StartReply (idempotent by id) answers a prompt once however often it is
/// seen (a replay after a reconnect or a restart, a retried SendMessage or
/// Ask, several replicas).
///
/// Clients choose message ids too (SendMessage takes any UUID), so an id
/// a member can compute is one they can take first. Keyed ids are derived
/// under a namespace made of a secret key (`--assistant-reply-key-file`;
/// in split mode, failing that, the service credential that every replica
/// shares already): nobody without the key can tell a reply's id before it
/// exists, so a prompt has one. Changing the key changes the ids: do it
/// with every assistant replica stopped (a new credential needs every
/// service restarted anyway), or two replicas on different keys answer a
/// prompt twice. Public ids (the all-in-one without a key) are computable:
/// a prompt has [`REPLY_ID_CANDIDATES`], and one taken by another message
/// is passed over for the next (a taken id stays taken, so every replica
/// and restart walks to the same one). Either way Ask takes only a message
/// that is the prompt's reply.
#[derive(Clone)]
pub struct ReplyIds {
    namespace: Uuid,
    keyed: bool,
}

impl ReplyIds {
    /// Public ids (see the type's docs): those of earlier releases.
    pub fn public() -> Self {
        Self { namespace: REPLY_NAMESPACE, keyed: false }
    }

    /// Ids under a namespace derived from `key` (at least 32 random bytes:
    /// the namespace keeps 122 bits of it).
    pub fn keyed(key: &[u8]) -> Self {
        let name = [b"natter-assistant-reply-key\0".as_slice(), key].concat();
        Self { namespace: Uuid::new_v5(&REPLY_NAMESPACE, &name), keyed: true }
    }

    /// Whether the ids are keyed (unguessable without the key).
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// The id of the reply a Regenerate of `caller` in `chat` with the
    /// client's `request_id` starts: the same for every retry of it, on
    /// every replica (the request id is the client's to keep, so the id is
    /// nobody else's to compute).
    pub fn regenerated(&self, chat: &str, caller: &str, request_id: &str) -> String {
        let name = format!("regenerate/{chat}/{caller}/{request_id}");
        Uuid::new_v5(&self.namespace, name.as_bytes()).to_string()
    }

    /// The ids the first reply to the prompt with id `prompt` may take, in
    /// the order StartReply tries them (one when keyed): the first is taken
    /// unless another message holds it.
    pub fn of(&self, prompt: &str) -> Vec<String> {
        let candidates = if self.keyed { 1 } else { REPLY_ID_CANDIDATES };
        (0..candidates)
            .map(|k| {
                let name = if k == 0 { prompt.to_owned() } else { format!("{prompt}/{k}") };
                Uuid::new_v5(&self.namespace, name.as_bytes()).to_string()
            })
            .collect()
    }
}

impl Default for ReplyIds {
    fn default() -> Self {
        Self::public()
    }
}

/// Never shows the namespace: with it, anyone could compute the ids.
impl std::fmt::Debug for ReplyIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.keyed { "ReplyIds(keyed)" } else { "ReplyIds(public)" })
    }
}

/// What the assistant answers, instead of asking the model, to a prompt the
/// injection detector rates HIGH or CRITICAL.
pub const REFUSAL: &str = "I can't help with that request.";

/// The `generation.error` of a refusal ([`REFUSAL`]): the same for every
/// prompt, so that the reply, which every member reads, tells nobody the
/// detector's verdict (severity, categories), which only those who see
/// flags may read, on the prompt.
pub const REFUSAL_REASON: &str = "the prompt was flagged as a prompt injection: not sent to the model";

/// The `generation.error` of a reply that failed because the external
/// classifier could not judge its prompt (down, too slow, an answer it
/// could not read): the prompt was not sent to the model (fail closed);
/// Regenerate asks again.
pub const UNCHECKED_REASON: &str = "the injection classifier could not check the prompt: not sent to the model";

/// Most verdicts of the external classifier kept (by message id and
/// revision), so that a message is classified once however many
/// conversations it goes with; when full, all are forgotten.
const VERDICTS_KEPT: usize = 4096;

/// The finish reason of a refusal (the chat-completions term for content a
/// filter held back).
pub const CONTENT_FILTER: &str = "content_filter";

/// The finish reason of a reply cut at [`REPLY_MAX_BYTES`] (the OpenAI
/// chat-completions value for a reply cut by its length).
pub const LENGTH: &str = "length";

/// The longest reply the assistant stores, in bytes of UTF-8: twice the
/// longest text a person may send (32 KiB). Every request carries
/// `max_tokens`, but a server that ignores it would otherwise write on for
/// ever, and each checkpoint rewrites (and re-indexes) the whole text: the
/// reply is cut there, COMPLETE with finish reason `length`, and the
/// model's stream closed.
pub const REPLY_MAX_BYTES: usize = 64 * 1024;

/// The injection verdict of `text` that bars it from the model: HIGH or
/// CRITICAL by `detector` (natter-detect's rules), or a detector that
/// failed (fail closed). None: it may go to the model.
pub fn barred(detector: &natter_detect::Detector, text: &str) -> Option<String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| detector.scan(text))) {
        Ok(v) if v.severity >= natter_detect::Severity::High => {
            let categories: Vec<&str> = v.categories.iter().map(|c| c.as_str()).collect();
            Some(format!(
                "the prompt was flagged {:?} ({}) by {}: not sent to the model",
                v.severity,
                categories.join(", "),
                natter_detect::DETECTOR
            ))
        }
        Ok(_) => None,
        Err(_) => Some("the injection detector failed: not sent to the model".into()),
    }
}

/// Why `message` may not go to the model by its stored flags: HIGH or
/// CRITICAL, whoever raised them (the detector when it was sent, an
/// external classifier since, or this assistant's canary on a reply that
/// leaked its instructions). None otherwise.
fn flagged(message: &mpb::Message) -> Option<String> {
    let flags = message.flags.as_ref().filter(|f| f.severity >= mpb::Severity::High as i32)?;
    Some(format!("the prompt was flagged {} by {}: not sent to the model", flags.categories.join(", "), flags.detector))
}

/// How the assistant works (see [`crate::AssistantArgs`] for each).
#[derive(Clone, Debug)]
pub struct Settings {
    pub username: String,
    pub model: String,
    pub system_prompt: String,
    pub context_messages: u32,
    pub context_chars: usize,
    pub concurrency: usize,
    /// Of `concurrency`, the most one prompt author's replies take at once.
    pub concurrency_per_user: usize,
    pub queue: usize,
    pub reply_rate: natter_kit::limits::Rate,
    pub lease: Duration,
    /// The pace of a reply's message_delta events: one per `flush` on
    /// average, two at most within one `flush` (GCRA); text that comes
    /// sooner is held and sent together (coalesced). Zero: every piece of
    /// text goes out as it comes.
    pub flush: Duration,
    /// How often the text so far is checkpointed (and the lease renewed).
    pub checkpoint: Duration,
    /// Where the ids of prompts' first replies come from.
    pub reply_ids: ReplyIds,
    /// How CheckMembership and StartReply, which decide whether a prompt is
    /// answered, are tried again after a transient failure
    /// ([`crate::retry::is_transient`]); a prompt they still fail for is
    /// left unread, to be replayed.
    pub retry: Retry,
    /// How often prompts left unread after a transient failure are
    /// replayed (the bot's stream reconnects and resumes from its read
    /// positions) while any is held.
    pub held_replay: Duration,
    /// How long a prompt is held before it is given up (logged; the read
    /// position passes it with the next answered prompt): one that fails
    /// the same way every time does not block its chat for good.
    pub held_limit: Duration,
    /// After shutdown, how long the replies being generated may go on to
    /// finish before they are ended INTERRUPTED ([`Assistant::stopped`]);
    /// zero (the default, where nobody waits for them): at once.
    pub shutdown_grace: Duration,
    /// How long after a message that is not a prompt the bot's read
    /// position moves past it (and past those after it, in one MarkReadAs),
    /// once nothing of its chat is being answered or held
    /// (`Assistant::pass`).
    pub pass_after: Duration,
    /// The external prompt-injection classifier (`--classifier-url`), if
    /// any: each person's message is classified before it goes to the
    /// model (`Assistant::classified`), whatever the messages service's
    /// own classification of it (after its commit) has come to yet.
    pub classifier: Option<natter_llm::classifier::Classifier>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            username: "assistant".into(),
            model: "default".into(),
            system_prompt: "You are a helpful assistant.".into(),
            context_messages: 40,
            context_chars: 16_000,
            concurrency: 16,
            concurrency_per_user: 4,
            queue: 8,
            reply_rate: natter_kit::limits::Rate::Off,
            lease: Duration::from_secs(15),
            flush: Duration::from_millis(50),
            checkpoint: Duration::from_secs(1),
            reply_ids: ReplyIds::public(),
            retry: Retry::default(),
            held_replay: Duration::from_secs(30),
            held_limit: Duration::from_secs(3600),
            shutdown_grace: Duration::ZERO,
            pass_after: Duration::from_secs(5),
            classifier: None,
        }
    }
}

/// The pace of one reply's message_delta events, by GCRA (governor's rate
/// limiter, after the ATM Forum's Generic Cell Rate Algorithm): one delta
/// per `flush` on average, at most two within one `flush`. Text at the
/// model's own pace (a token every `flush` or slower, give or take its
/// jitter) goes out the moment it comes; faster text is held and sent
/// together. (A rule of "at least `flush` since the last delta" held back
/// every token that came a hair early, and that wait, wound up further by
/// the timer's slack, carried on to every later token.)
struct Pace<C: Clock = DefaultClock> {
    /// None: no pacing (`flush` zero).
    limiter: Option<RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>>,
    clock: C,
}

impl Pace {
    fn new(flush: Duration) -> Self {
        Self::with_clock(flush, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Pace<C> {
    fn with_clock(flush: Duration, clock: C) -> Self {
        let limiter = Quota::with_period(flush).map(|quota| {
            RateLimiter::direct_with_clock(quota.allow_burst(NonZeroU32::MIN.saturating_add(1)), clock.clone())
        });
        Self { limiter, clock }
    }

    /// None when a delta may go now (its turn is taken); otherwise how long
    /// the text is to be held.
    fn turn(&self) -> Option<Duration> {
        let limiter = self.limiter.as_ref()?;
        limiter.check().err().map(|later| later.wait_time_from(self.clock.now()))
    }

    /// Takes a turn for held text that goes out (due or not).
    fn take(&self) {
        if let Some(limiter) = &self.limiter {
            let _ = limiter.check();
        }
    }
}

/// Which messages of a chat the assistant answers.
#[derive(Clone, Copy, Debug)]
struct Answers {
    /// natter.chats.v1.ChatKind: a direct chat's are all prompts.
    kind: i32,
    /// natter.messages.v1.AssistantReplies of a group chat.
    replies: i32,
    /// A title was given or found (direct chats are titled once).
    titled: bool,
}

/// A prompt left unread after a transient failure ([`Assistant::hold`]).
#[derive(Clone, Debug)]
struct Held {
    /// The prompt's id.
    id: String,
    /// The owner token of its job's StartReply calls, when it made any:
    /// one of them may have committed (its answer lost), so the replay
    /// retries the same start ([`Assistant::run`]).
    owner: Option<String>,
    /// When it was first held ([`Settings::held_limit`]).
    since: Instant,
}

/// One prompt to answer.
#[derive(Clone, Debug)]
struct Job {
    prompt: mpb::Message,
    /// The reply, when started already (Regenerate).
    started: Option<mpb::Message>,
}

/// A chat's reply being generated and the prompts waiting behind it.
#[derive(Default)]
struct Lane {
    queue: VecDeque<Job>,
}

#[derive(Default)]
struct State {
    /// Chats with a reply being generated (or started) here.
    lanes: HashMap<String, Lane>,
    /// Prompts queued or being answered here.
    prompts: HashSet<String>,
    /// Replies being generated here, with their chat and what stops each.
    running: HashMap<String, Running>,
    /// Those of `running` deleted meanwhile, or whose chat the bot was
    /// taken out of: none of their text goes out any more (not even what
    /// was held back for pacing).
    deleted: HashSet<String>,
    /// Chats seen: which of their messages are prompts (kept current by
    /// the chat_updated events of the bot's stream, in stream order; a
    /// chat_reset, which says the stream passed over changes its chat's log
    /// no longer holds, or a change of the bot's own membership, drops the
    /// chat's entry: read again from the chats service at its next
    /// message).
    chats: HashMap<String, Answers>,
    /// Per chat, the prompts (by seq) dropped after their
    /// CheckMembership or StartReply failed transiently past every retry:
    /// the bot's read position stays before the first, so that a
    /// reconnect or a restart replays it ([`Assistant::read_past`]).
    held: HashMap<String, BTreeMap<i64, Held>>,
    /// Per chat, the newest message that is not a prompt, to move the
    /// read position past ([`Assistant::pass`]).
    passing: HashMap<String, i64>,
}

/// A reply being generated here ([`State::running`]).
struct Running {
    /// Its chat: the bot's removal from it stops the reply.
    chat: String,
    /// Stops its generation (STOPPED).
    stop: CancellationToken,
}

/// Whether a prompt's turn may be taken, by [`Assistant::turn_refused`].
enum Turn {
    /// It may be answered: the members version its checks saw (the lowest
    /// of the author's and the bot's), which StartReply compares.
    May(i64),
    /// It may no longer be answered (why, for the log).
    Refused(String),
}

/// How a generation ended.
struct Outcome {
    text: String,
    status: mpb::GenerationStatus,
    info: mpb::GenerationInfo,
}

/// The detector name of a canary verdict.
pub const CANARY_DETECTOR: &str = "natter-canary";

/// The assistant; share it behind an `Arc`.
pub struct Assistant {
    llm: natter_llm::Client,
    /// Prompt-injection rules: a HIGH or CRITICAL prompt is refused, such
    /// earlier messages are left out of the conversation.
    detector: natter_detect::Detector,
    /// The external classifier's verdicts, by message id and revision
    /// ([`Assistant::classified`]; at most [`VERDICTS_KEPT`]).
    verdicts: Mutex<HashMap<(String, i32), natter_llm::classifier::Verdict>>,
    bot: spb::User,
    links: Links,
    settings: Settings,
    state: Mutex<State>,
    /// Replies per prompt author (`--assistant-reply-rate`).
    reply_rate: natter_kit::limits::RateLimiter<String>,
    permits: Semaphore,
    /// Prompt author -> their share of `permits` (`concurrency_per_user`),
    /// while any of their replies holds or waits for one.
    author_permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    finished: broadcast::Sender<mpb::Message>,
    /// Told whenever a chat's lane is released, and when a Regenerate
    /// started its reply (a retry of it may be waiting for the lane).
    lane_freed: tokio::sync::Notify,
    /// Told whenever a prompt is held ([`Assistant::hold`]): the event loop
    /// sets its replay time.
    held_more: tokio::sync::Notify,
    /// A random token in the system prompt: a reply that repeats it leaked
    /// the prompt, and is flagged so.
    canary: String,
    /// Stops the taking of prompts (and the event stream and the sweeper);
    /// replies being generated go on for [`Settings::shutdown_grace`].
    shutdown: CancellationToken,
    /// Fired once the shutdown grace is over: the replies still being
    /// generated end INTERRUPTED with their text so far.
    interrupt: CancellationToken,
    /// The tasks that may write a reply (each chat's [`Assistant::drive`],
    /// the event loop that starts them, the sweeper): shutdown waits for
    /// them ([`Assistant::stopped`]).
    tasks: TaskTracker,
}

impl Assistant {
    /// Makes sure the bot user exists, then starts following its chats and
    /// sweeping interrupted replies (both until `shutdown`).
    ///
    /// Errors: the sessions service refused the bot user.
    pub async fn start(
        llm: natter_llm::Client,
        links: Links,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, Status> {
        let bot = links.users.ensure_bot_user(&settings.username, "Assistant").await?;
        let assistant = Arc::new(Self {
            llm,
            detector: natter_detect::Detector::default(),
            verdicts: Mutex::new(HashMap::new()),
            bot,
            links,
            permits: Semaphore::new(settings.concurrency),
            author_permits: Mutex::new(HashMap::new()),
            reply_rate: natter_kit::limits::RateLimiter::new("assistant replies", settings.reply_rate),
            settings,
            state: Mutex::new(State::default()),
            finished: broadcast::channel(1024).0,
            lane_freed: tokio::sync::Notify::new(),
            held_more: tokio::sync::Notify::new(),
            canary: format!("natter-canary-{}", Uuid::new_v4().simple()),
            shutdown,
            interrupt: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        assistant.tasks.spawn(assistant.clone().follow());
        assistant.tasks.spawn(assistant.clone().sweep());
        tokio::spawn(assistant.clone().end_the_grace());
        Ok(assistant)
    }

    /// Waits until shutdown, then until every reply this process was
    /// generating has ended, at most about [`Settings::shutdown_grace`]
    /// and [`FINISH_WAIT`] from shutdown: a caller whose runtime ends next
    /// (the process exits) awaits it once its servers drained.
    ///
    /// A planned shutdown (SIGTERM, a deploy) is no crash: no new prompt
    /// is taken (those waiting in a chat's queue, or not seen yet, are
    /// left unread: the bot's read position stays before them, so the
    /// next replica or this one restarted answers them, once each, as
    /// after a crash), the replies being generated go on for the grace and
    /// end as they would have (COMPLETE, most of them), and those still
    /// going then end INTERRUPTED with their text so far, through the same
    /// FinishReply as any end. A reply whose end cannot be stored within
    /// [`FINISH_WAIT`] (the messages service down too) is left to the
    /// sweeper of another replica, as after a crash.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await;
        // Tasks spawned from here on (a chat's next prompt, which starts
        // nothing new) are waited for too; `wait` ends once none is left.
        self.tasks.close();
        let over = async {
            self.interrupt.cancelled().await;
            tokio::time::sleep(FINISH_WAIT).await;
        };
        tokio::select! {
            () = self.tasks.wait() => {}
            () = over => {
                let replies = self.state().running.len();
                tracing::warn!(replies, "replies not finished at shutdown: left to the sweeper");
            }
        }
    }

    /// Ends the shutdown grace: [`Settings::shutdown_grace`] after shutdown,
    /// the replies still being generated (a Regenerate that was being
    /// served at shutdown may have started one since) are told to end
    /// INTERRUPTED.
    async fn end_the_grace(self: Arc<Self>) {
        self.shutdown.cancelled().await;
        let replies = self.state().running.len();
        if replies > 0 {
            tracing::info!(replies, grace = ?self.settings.shutdown_grace, "shutting down: letting the replies being written finish");
        }
        tokio::time::sleep(self.settings.shutdown_grace).await;
        let replies = self.state().running.len();
        if replies > 0 {
            tracing::info!(replies, "the shutdown grace is over: ending the replies still being written INTERRUPTED");
        }
        self.interrupt.cancel();
    }

    /// The chat-completions endpoint replies come from.
    pub fn llm_url(&self) -> &str {
        self.llm.url()
    }

    /// The assistant's user id.
    pub fn user_id(&self) -> &str {
        &self.bot.id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Follows the bot's chats until shutdown, reconnecting (after 0.1 s,
    /// doubling to 10 s) when the stream ends or fails: each connection
    /// resumes from the bot's read positions, and a prompt seen twice is
    /// answered once.
    async fn follow(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            match self.links.messages.follow_chats(&self.bot.id).await {
                Ok(mut events) => {
                    // Prompts held after a transient failure are replayed
                    // by a new connection (it resumes from the read
                    // positions, which stay before them), `held_replay`
                    // after the connection first held one.
                    let mut replay_at: Option<tokio::time::Instant> = None;
                    loop {
                        replay_at = self.replay_after().map(|after| {
                            let at = tokio::time::Instant::now() + after;
                            replay_at.map_or(at, |set| set.min(at))
                        });
                        let replay = async {
                            match replay_at {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            () = self.shutdown.cancelled() => return,
                            () = replay => {
                                tracing::info!("replaying prompts left unread after a failure");
                                break;
                            }
                            // Held meanwhile: its replay time is set above.
                            () = self.held_more.notified() => {}
                            event = events.next() => match event {
                                Some(Ok(event)) => {
                                    backoff = Duration::from_millis(100);
                                    self.on_event(event).await;
                                }
                                Some(Err(status)) => {
                                    tracing::info!(error = %status.message(), "the assistant's event stream ended; reconnecting");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                }
                Err(status) => tracing::warn!(error = %status.message(), "the assistant cannot follow its chats"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// A stream event: a person's new message that is a prompt is queued; a
    /// reply that ended (here or on another replica) wakes the prompts
    /// waiting for the chat, and one deleted stops being generated; a
    /// chat's new assistant_replies applies to the messages after it, and
    /// after a chat_reset the chat's setting is read again.
    async fn on_event(self: &Arc<Self>, event: mpb::StreamEventsResponse) {
        let message = match event.event {
            // The stream passed over changes of the chat that its log no
            // longer holds (it resumed, or fell, that far behind): a switch
            // of assistant_replies may be among them, so the one kept here
            // may be stale. The next message asks the chats service
            // ([`Assistant::is_prompt`]), as after a restart.
            Some(Event::ChatReset(_)) => {
                self.state().chats.remove(&event.chat_id);
                return;
            }
            // The bot left, was removed or added (back), or changed role:
            // the chat's setting may have been switched while it was not a
            // member, whose stream carried none of that chat's changes.
            // Read it again at the next message, as after a reset. Taken
            // out (removed, left, or the chat deleted, which removes every
            // member first), its replies being written there stop now.
            Some(Event::MembershipChanged(m)) if m.user_id == self.bot.id => {
                self.state().chats.remove(&event.chat_id);
                let out = [mpb::MembershipChange::Left as i32, mpb::MembershipChange::Removed as i32];
                if out.contains(&m.change) {
                    self.taken_out_of(&event.chat_id).await;
                }
                return;
            }
            Some(Event::ChatUpdated(u)) => {
                let named = |path: &str| u.update_mask.as_ref().is_some_and(|m| m.paths.iter().any(|p| p == path));
                if let Some(answers) = self.state().chats.get_mut(&event.chat_id) {
                    if named("assistant_replies") {
                        answers.replies = u.assistant_replies;
                    }
                    // A title taken back with its prompt (or cleared by
                    // the person): the next complete reply titles the chat
                    // again.
                    if named("title") {
                        answers.titled = !u.title.is_empty();
                    }
                }
                return;
            }
            Some(Event::MessageCreated(message)) => message,
            Some(Event::MessageEdited(m)) if m.role == mpb::MessageRole::Assistant as i32 && is_finished(&m) => {
                let _ = self.finished.send(m);
                return;
            }
            // A reply deleted while being written ended STOPPED in the
            // delete's transaction: stop its generation here now (closing
            // the model's stream), not at its next checkpoint, so that no
            // more of its text goes out.
            Some(Event::MessageDeleted(m)) if m.role == mpb::MessageRole::Assistant as i32 => {
                let running = {
                    let mut state = self.state();
                    let running = state.running.get(&m.id).map(|r| r.stop.clone());
                    if running.is_some() {
                        state.deleted.insert(m.id.clone());
                    }
                    running
                };
                if let Some(stop) = running {
                    stop.cancel();
                }
                let _ = self.finished.send(m);
                return;
            }
            _ => return,
        };
        match self.is_prompt(&message).await {
            Ok(true) => self.submit(Job { prompt: message, started: None }).await,
            Ok(false) => {
                self.release(&message);
                self.pass(&message);
            }
            Err(status) if is_transient(&status) => {
                tracing::warn!(chat_id = %message.chat_id, message = %message.id, error = %status.message(), "cannot tell whether a message is a prompt; left unread");
                self.hold(&message, None);
            }
            Err(status) => {
                tracing::warn!(chat_id = %message.chat_id, message = %message.id, error = %status.message(), "cannot tell whether a message is a prompt");
            }
        }
    }

    /// Stops the replies being generated here in `chat`, which the bot was
    /// taken out of (removed, left, or the chat deleted), as StopGeneration
    /// stops one: each ends STOPPED with its text so far, its model stream
    /// closed, and none of its text goes out any more (not even what pacing
    /// held back). STOPPED, not FAILED: nothing went wrong with the reply,
    /// a member with the right to took the assistant out, as one may stop
    /// a reply; its text so far stays, as a stopped reply's does, and a
    /// Regenerate's replaced reply is not brought back. A replica that
    /// missed the event (or a reply started meanwhile) learns it at the
    /// reply's next checkpoint: UpdateReply answers the stop once the
    /// reply's author is no member (the messages service checks it there).
    ///
    /// Where replies are being generated in the chat, the bot's membership
    /// is read first (one CheckMembership): a removal replayed on a
    /// reconnect may be older than the bot's return to the chat. A check
    /// that fails stops nothing; the replies' next checkpoint tells.
    async fn taken_out_of(&self, chat: &str) {
        if !self.state().running.values().any(|r| r.chat == chat) {
            return;
        }
        match self.links.chats.check_membership(chat, &self.bot.id).await {
            Ok(m) if m.member => return,
            Ok(_) => {}
            Err(status) => {
                tracing::info!(chat_id = %chat, error = %status.message(), "cannot check the assistant's membership; its replies there stop at their next checkpoint if it is out");
                return;
            }
        }
        let stops: Vec<CancellationToken> = {
            let mut state = self.state();
            let stopped: Vec<(String, CancellationToken)> = state
                .running
                .iter()
                .filter(|(_, r)| r.chat == chat)
                .map(|(id, r)| (id.clone(), r.stop.clone()))
                .collect();
            for (id, _) in &stopped {
                state.deleted.insert(id.clone());
            }
            stopped.into_iter().map(|(_, stop)| stop).collect()
        };
        if !stops.is_empty() {
            tracing::info!(chat_id = %chat, replies = stops.len(), "the assistant was taken out of a chat: stopping its replies there");
        }
        for stop in stops {
            stop.cancel();
        }
    }

    /// Whether the assistant answers `message`: a person's (not a bot
    /// reply's), not deleted, with text, in no thread (its replies and the
    /// context it reads are the chat's main timeline: a thread reply is
    /// never a prompt, even one that mentions it); in a direct chat every
    /// one, in a group as its assistant_replies says (by default those that
    /// mention it: its id in mention_user_ids, or `@username` in the text).
    ///
    /// Errors: the bot's CheckMembership (asked once per chat) failed, after
    /// the retries of a transient failure ([`Settings::retry`]).
    async fn is_prompt(&self, message: &mpb::Message) -> Result<bool, Status> {
        if message.author_id == self.bot.id
            || message.role == mpb::MessageRole::Assistant as i32
            || message.thread_root_seq > 0
            || message.deleted
            || message.text.trim().is_empty()
        {
            return Ok(false);
        }
        let known = self.state().chats.get(&message.chat_id).copied();
        let answers = match known {
            Some(answers) => answers,
            None => {
                // A read: trying it again changes nothing.
                let check = || self.links.chats.check_membership(&message.chat_id, &self.bot.id);
                let m = self.settings.retry.run(&self.shutdown, "CheckMembership", check).await?;
                if !m.member {
                    return Ok(false);
                }
                let answers = Answers { kind: m.kind, replies: m.assistant_replies, titled: false };
                self.state().chats.insert(message.chat_id.clone(), answers);
                answers
            }
        };
        use mpb::AssistantReplies as Replies;
        Ok(match Replies::try_from(answers.replies) {
            _ if answers.kind == cpb::ChatKind::Direct as i32 => true,
            Ok(Replies::All) => true,
            Ok(Replies::Off) => false,
            _ => mentions(message, &self.bot.id, &self.settings.username),
        })
    }

    /// Moves the bot's read position past `message`, a person's message
    /// that is not a prompt, [`Settings::pass_after`] later and once its
    /// chat has no prompt being answered, queued or held (those move it,
    /// or keep it before them): one MarkReadAs for the messages of that
    /// while. Before, the position stayed at the last prompt answered, and
    /// a reconnect or a restart replayed every message since: each judged
    /// by the chat's assistant_replies of now, so that after a switch to
    /// ALL (or from OFF) messages never meant for the assistant were
    /// answered, and sent to the model. The bot's own messages are left
    /// (never prompts; the next prompt's answer passes them).
    fn pass(self: &Arc<Self>, message: &mpb::Message) {
        if message.author_id == self.bot.id {
            return;
        }
        let first = {
            let mut state = self.state();
            let newest = state.passing.entry(message.chat_id.clone()).or_insert(0);
            let first = *newest == 0;
            *newest = (*newest).max(message.seq);
            first
        };
        if first {
            self.tasks.spawn(Arc::clone(self).pass_later(message.chat_id.clone()));
        }
    }

    /// [`Assistant::pass`]'s wait and MarkReadAs for `chat`.
    async fn pass_later(self: Arc<Self>, chat: String) {
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(self.settings.pass_after) => {}
            }
            let seq = {
                let mut state = self.state();
                // Messages are taken in order: a prompt before `seq` is
                // being answered, waits or is held; wait for it.
                if state.lanes.contains_key(&chat) || state.held.contains_key(&chat) {
                    continue;
                }
                match state.passing.remove(&chat) {
                    Some(seq) => seq,
                    None => return,
                }
            };
            if let Err(status) = self.links.messages.mark_read_as(&self.bot.id, &chat, seq).await {
                tracing::warn!(chat_id = %chat, error = %status.message(), "cannot move the assistant's read position");
            }
            return;
        }
    }

    /// Keeps the bot's read position before `prompt`, which was dropped
    /// after a transient failure: it is replayed on the next reconnect or
    /// restart ([`Assistant::read_past`]); `owner`, the token of its
    /// StartReply calls (if it made any), goes to the replay in this
    /// process.
    fn hold(&self, prompt: &mpb::Message, owner: Option<String>) {
        let mut state = self.state();
        let chat = state.held.entry(prompt.chat_id.clone()).or_default();
        // Held again on a replay: since it was first held.
        let since = chat.get(&prompt.seq).map_or_else(Instant::now, |held| held.since);
        chat.insert(prompt.seq, Held { id: prompt.id.clone(), owner, since });
        drop(state);
        // A permit kept if the loop is not waiting yet.
        self.held_more.notify_one();
    }

    /// Whether a prompt is held (to be replayed) once those held longer
    /// than [`Settings::held_limit`] are given up.
    fn holds_any(&self) -> bool {
        let limit = self.settings.held_limit;
        let mut state = self.state();
        state.held.retain(|chat, held| {
            held.retain(|_, h| {
                let keep = h.since.elapsed() < limit;
                if !keep {
                    tracing::error!(chat_id = %chat, message = %h.id, "a prompt failed past every replay; given up");
                }
                keep
            });
            !held.is_empty()
        });
        !state.held.is_empty()
    }

    /// How long after now the prompts held are to be replayed, if any is
    /// held ([`Assistant::holds_any`]): [`Settings::held_replay`], but a
    /// third of the lease when one of them may have a reply started for it
    /// (a StartReply of its job committed, its answer lost): nobody renews
    /// that reply's lease, and a replay past it would find it swept
    /// INTERRUPTED, where the replay in time takes its generation up.
    fn replay_after(&self) -> Option<Duration> {
        if !self.holds_any() {
            return None;
        }
        let started = self.state().held.values().flat_map(BTreeMap::values).any(|held| held.owner.is_some());
        Some(if started { self.settings.held_replay.min(self.settings.lease / 3) } else { self.settings.held_replay })
    }

    /// Lets the bot's read position pass `prompt` again (it is being
    /// answered, or is no prompt after all). Returns the owner token of
    /// the StartReply calls of its dropped job, if it was held after some.
    fn release(&self, prompt: &mpb::Message) -> Option<String> {
        let mut state = self.state();
        let held = state.held.get_mut(&prompt.chat_id)?;
        let released = held.remove(&prompt.seq);
        if held.is_empty() {
            state.held.remove(&prompt.chat_id);
        }
        released.and_then(|held| held.owner)
    }

    /// Queues a prompt behind its chat's reply being generated, or starts
    /// answering it. A prompt queued or answered here already is ignored; a
    /// full queue gets a FAILED reply saying so.
    async fn submit(self: &Arc<Self>, job: Job) {
        let chat = job.prompt.chat_id.clone();
        let start = {
            let mut state = self.state();
            if !state.prompts.insert(job.prompt.id.clone()) {
                return;
            }
            match state.lanes.get_mut(&chat) {
                Some(lane) if lane.queue.len() >= self.settings.queue => {
                    state.prompts.remove(&job.prompt.id);
                    Some(Err((job, "too many prompts are waiting in this chat")))
                }
                Some(lane) => {
                    lane.queue.push_back(job);
                    None
                }
                None => {
                    state.lanes.insert(chat.clone(), Lane::default());
                    Some(Ok(job))
                }
            }
        };
        match start {
            None => {}
            Some(Ok(job)) => {
                self.tasks.spawn(self.clone().drive(chat, job));
            }
            Some(Err((job, why))) => self.refuse(&job.prompt, why).await,
        }
    }

    /// Answers `prompt` at once with a reply created FAILED, saying why (it
    /// does not wait for the chat's reply being generated). The bot's read
    /// position stays: earlier prompts still queued must be replayed after
    /// a restart (this one then finds its reply and is skipped).
    async fn refuse(&self, prompt: &mpb::Message, why: &str) {
        let info = mpb::GenerationInfo { error: why.into(), ..Default::default() };
        // Its turn never came (no check here but is_prompt's, kept per
        // chat): compared with nothing.
        self.answer_at_once(prompt, mpb::GenerationStatus::Failed, String::new(), info, false, None).await;
    }

    /// Creates `prompt`'s reply already finished (`status`, `text`, `info`),
    /// tells the waiting Ask calls and, with `advance`, moves the bot's read
    /// position past the prompt (only in the prompt's turn: never past
    /// prompts still waiting). A reply that exists already is left as it is.
    /// `members_version`, the one the prompt's turn was checked at (None:
    /// none), goes with the StartReply: refused as stale, the turn is
    /// checked again, afresh, once ([`Assistant::recheck`]).
    async fn answer_at_once(
        &self,
        prompt: &mpb::Message,
        status: mpb::GenerationStatus,
        text: String,
        info: mpb::GenerationInfo,
        advance: bool,
        members_version: Option<i64>,
    ) {
        let mut request = mpb::StartReplyRequest {
            status: status as i32,
            text,
            generation: Some(info),
            members_version,
            ..self.start_request(prompt, String::new(), "")
        };
        let mut rechecked = false;
        let started = loop {
            match self.start_first_reply(request.clone()).await {
                Err(status) if natter_kit::error::is_members_changed(&status) => {
                    match self.recheck(prompt, &mut rechecked, None).await {
                        Some(checked) => request.members_version = Some(checked),
                        None => return,
                    }
                }
                started => break started,
            }
        };
        if started.is_ok() {
            // Answered (a refused prompt replayed after it was held).
            self.release(prompt);
        }
        match started {
            Ok((reply, true)) => {
                let _ = self.finished.send(reply);
                if advance {
                    self.read_past(prompt).await;
                }
            }
            Ok((_, false)) => {}
            Err(status) if is_transient(&status) => {
                tracing::warn!(prompt = %prompt.id, error = %status.message(), "cannot refuse a prompt; left unread");
                self.hold(prompt, None);
            }
            // Deleted, or its chat archived, meanwhile: nothing to refuse.
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tracing::info!(prompt = %prompt.id, error = %status.message(), "a prompt deleted, or its chat archived, before its refusal");
                if advance {
                    self.read_past(prompt).await;
                }
            }
            Err(status) => tracing::warn!(prompt = %prompt.id, error = %status.message(), "cannot refuse a prompt"),
        }
    }

    /// Answers `first`, then every prompt queued behind it in the chat, in
    /// order, until the queue is empty.
    async fn drive(self: Arc<Self>, chat: String, first: Job) {
        let mut job = first;
        loop {
            let prompt = job.prompt.id.clone();
            self.run(job).await;
            let mut state = self.state();
            state.prompts.remove(&prompt);
            let next = state.lanes.get_mut(&chat).and_then(|lane| lane.queue.pop_front());
            match next {
                Some(next) => job = next,
                None => {
                    state.lanes.remove(&chat);
                    drop(state);
                    self.lane_freed.notify_waiters();
                    return;
                }
            }
        }
    }

    /// Starts `prompt`'s first reply (`request`, under each of the prompt's
    /// reply ids in turn, [`ReplyIds::of`]): an id another message holds (a
    /// member sent one under it first) is passed over, logged. Returns the
    /// reply and whether this call created it. A transient failure is
    /// tried again ([`Settings::retry`]).
    ///
    /// Errors: as StartReply (a transient one once the retries ran out);
    /// ALREADY_EXISTS when every id is taken.
    async fn start_first_reply(&self, mut request: mpb::StartReplyRequest) -> Result<(mpb::Message, bool), Status> {
        for id in self.settings.reply_ids.of(&request.prompt_message_id) {
            request.message_id = id;
            // Safe to repeat: StartReply is idempotent by message_id (the
            // reply id, derived from the prompt), so a retry of a call that
            // did commit (its answer lost) creates no second reply. With
            // the request's owner (the job's, see `run`) it answers that
            // reply, still GENERATING, as created: the job generates it.
            // Without one (a refusal: created finished, nothing to
            // generate) it answers the reply as it is, created = false.
            let start = || self.links.messages.start_reply(request.clone());
            match self.settings.retry.run(&self.shutdown, "StartReply", start).await {
                Err(status) if status.code() == tonic::Code::AlreadyExists => tracing::warn!(
                    prompt = %request.prompt_message_id,
                    reply = %request.message_id,
                    "a reply id of the prompt is another message's; trying the next"
                ),
                started => return started,
            }
        }
        Err(Status::already_exists("every reply id of the prompt is another message's"))
    }

    /// Whether `reply` is `prompt`'s reply: the bot's, in the prompt's chat,
    /// answering it. (A message under one of the prompt's reply ids that is
    /// not was sent there by someone who guessed the id.)
    fn answers(&self, reply: &mpb::Message, prompt: &mpb::Message) -> bool {
        reply.chat_id == prompt.chat_id
            && reply.role == mpb::MessageRole::Assistant as i32
            && reply.author_id == self.bot.id
            && reply.reply_to_seq == prompt.seq
    }

    fn start_request(&self, prompt: &mpb::Message, id: String, replaces: &str) -> mpb::StartReplyRequest {
        mpb::StartReplyRequest {
            chat_id: prompt.chat_id.clone(),
            message_id: id,
            author_id: self.bot.id.clone(),
            prompt_message_id: prompt.id.clone(),
            replaces_message_id: replaces.to_owned(),
            ..Default::default()
        }
    }

    /// Answers one prompt: starts its reply (unless started), moves the
    /// bot's read position past the prompt, generates and finishes it.
    /// Nothing new starts once shutting down (the prompt is answered after
    /// the restart, or by another replica: the read position did not move
    /// past it); a reply started already is generated within the shutdown
    /// grace ([`Assistant::stopped`]). A prompt whose StartReply fails
    /// transiently past every retry is held: the read position stays before
    /// it, so a reconnect or a restart replays it.
    ///
    /// Every StartReply of the job carries one owner token (a random UUID;
    /// its retries, its tries after ABORTED and, in this process, the
    /// replay of the prompt if it is held): one whose answer was lost after
    /// it committed is then answered as created by a later one, and the
    /// job generates the reply. A reply started under another token (by
    /// another replica, or by this assistant before a restart) is left to
    /// its generator: the token is per job, not per process, because the
    /// messages service cannot tell a dead generator from a live one but
    /// by its lease, so only the job that made the token may adopt. A
    /// restart replaying a prompt whose start committed unanswered thus
    /// still finds the reply taken; the sweeper ends it INTERRUPTED.
    ///
    /// The start carries the members version the turn's checks saw
    /// ([`Assistant::turn_refused`]): one that the messages service finds
    /// older than a departure recorded since (the bot's removal, the
    /// author's, the chat's deletion: MEMBERS_CHANGED) started nothing, and
    /// the turn is checked again, afresh, once ([`Assistant::recheck`]).
    async fn run(&self, mut job: Job) {
        if self.shutdown.is_cancelled() && job.started.is_none() {
            return;
        }
        // The token of a dropped job of this prompt, in this process: that
        // job ended, so its start (if one committed) is this job's to go on.
        let mut owner = None;
        // The members version the prompt's turn was checked at (a new
        // prompt's; a Regenerate's reply is started already).
        let mut version = None;
        if job.started.is_none() {
            // Replayed after it was dropped: held again if it fails again.
            // (This chat's other prompts wait in its lane meanwhile: none
            // moves the read position in between.)
            owner = self.release(&job.prompt);
        }
        // A Regenerate checked the chat before it started the reply; the
        // owner may have removed the bot, turned it off or archived the
        // chat since (while it waited for the lane): nothing goes to the
        // model then, and the replaced reply comes back.
        if let Some(reply) = &job.started
            && let Err(refused) = self.may_regenerate(&job.prompt.chat_id).await
        {
            let info = mpb::GenerationInfo { error: refused.message().to_owned(), ..Default::default() };
            let outcome = Outcome { text: String::new(), status: mpb::GenerationStatus::Failed, info };
            return self.finish(reply, outcome, true).await;
        }
        if job.started.is_none() {
            // The prompt as it is now: it may have waited its turn while its
            // author edited it (answer the new text) or deleted it (answer
            // nothing, and send nothing of it to the model).
            match self.reply(&job.prompt.id).await {
                Ok(Some(now)) if now.deleted => return self.read_past(&job.prompt).await,
                Ok(Some(now)) => job.prompt = now,
                Ok(None) => return,
                Err(status) => {
                    tracing::warn!(prompt = %job.prompt.id, error = %status.message(), "cannot re-read a prompt")
                }
            }
            // Its author removed from the chat (or gone) while it waited, or
            // the assistant no longer to answer there: not answered, nothing
            // of it sent to the model.
            match self.take_turn(&job.prompt, owner.clone()).await {
                Some(checked) => version = Some(checked),
                None => return,
            }
        }
        // The external classifier's verdict, before anything of the prompt
        // goes to the model: the messages service classifies it too, but
        // after its commit and in the background, so its flag may come
        // after the prompt was answered.
        let verdict = match barred(&self.detector, &job.prompt.text).or_else(|| flagged(&job.prompt)) {
            Some(why) => Ok(Some(why)),
            None => self.classified(&job.prompt).await,
        };
        let verdict = match verdict {
            Ok(verdict) => verdict,
            Err(error) => {
                tracing::warn!(prompt = %job.prompt.id, error = %error, "the injection classifier failed: the prompt is not sent to the model");
                let info = mpb::GenerationInfo { error: UNCHECKED_REASON.into(), ..Default::default() };
                let status = mpb::GenerationStatus::Failed;
                match job.started {
                    // A Regenerate's: the replaced reply comes back.
                    Some(reply) => self.finish(&reply, Outcome { text: String::new(), status, info }, true).await,
                    None => self.answer_at_once(&job.prompt, status, String::new(), info, true, version).await,
                }
                return;
            }
        };
        if let Some(why) = verdict {
            // Never sent to the model: a fixed refusal, marked as a content
            // filter's. The verdict is logged, not stored with the reply:
            // every member reads the reply, and only those who see flags
            // may read the verdict (on the prompt's flags).
            tracing::info!(prompt = %job.prompt.id, verdict = %why, "a prompt refused without asking the model");
            let info = mpb::GenerationInfo {
                finish_reason: CONTENT_FILTER.into(),
                error: REFUSAL_REASON.into(),
                ..Default::default()
            };
            let status = mpb::GenerationStatus::Complete;
            match job.started {
                // Regenerate started it already: finish it as a refusal.
                Some(reply) => {
                    self.finish(&reply, Outcome { text: REFUSAL.into(), status, info }, false).await;
                }
                None => self.answer_at_once(&job.prompt, status, REFUSAL.into(), info, true, version).await,
            }
            return;
        }
        // Regenerate counted its reply against the rate already.
        let counted = job.started.is_some();
        let owner = owner.unwrap_or_else(|| Uuid::new_v4().to_string());
        // Whether a start refused as stale was followed by a fresh check.
        let mut rechecked = false;
        let reply = match job.started {
            Some(reply) => reply,
            None => loop {
                // Shut down meanwhile (the re-read above, a wait for the
                // chat): left unread, for the next replica.
                if self.shutdown.is_cancelled() {
                    return;
                }
                let mut ended = self.finished.subscribe();
                let request = mpb::StartReplyRequest {
                    owner: owner.clone(),
                    members_version: version,
                    ..self.start_request(&job.prompt, String::new(), "")
                };
                match self.start_first_reply(request).await {
                    // Started by this call, or by an earlier one of this job
                    // whose answer was lost (the same owner).
                    Ok((reply, true)) => break reply,
                    // Answered already (here before a restart, or by another
                    // replica): nothing to do.
                    Ok((_, false)) => return,
                    // The bot or the prompt's author (or any member) was
                    // taken out, or the chat deleted, after the turn's
                    // checks: nothing started; checked again, afresh.
                    Err(status) if natter_kit::error::is_members_changed(&status) => {
                        match self.recheck(&job.prompt, &mut rechecked, Some(owner.clone())).await {
                            Some(checked) => version = Some(checked),
                            None => return,
                        }
                    }
                    // A direct chat closed by a block takes no reply.
                    Err(status) if status.code() == tonic::Code::PermissionDenied => {
                        tracing::info!(prompt = %job.prompt.id, error = %status.message(), "a reply may not start in its chat; not answered");
                        return self.read_past(&job.prompt).await;
                    }
                    // Another replica is answering in this chat: try again
                    // once a reply of the chat ends (seen on the stream), or
                    // in a second.
                    Err(status) if status.code() == tonic::Code::Aborted => {
                        let chat = &job.prompt.chat_id;
                        let wait = async {
                            loop {
                                match ended.recv().await {
                                    Ok(m) if &m.chat_id == chat => return,
                                    Err(broadcast::error::RecvError::Closed) => return,
                                    _ => {}
                                }
                            }
                        };
                        tokio::select! {
                            () = wait => {}
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = self.shutdown.cancelled() => return,
                        }
                    }
                    Err(status) if is_transient(&status) => {
                        tracing::warn!(prompt = %job.prompt.id, error = %status.message(), "cannot start a reply; the prompt is left unread");
                        return self.hold(&job.prompt, Some(owner));
                    }
                    // Deleted since it was re-read, or its chat archived
                    // since the turn's checks: nothing to answer.
                    Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                        tracing::info!(prompt = %job.prompt.id, error = %status.message(), "a prompt deleted, or its chat archived, before its reply started; not answered");
                        return self.read_past(&job.prompt).await;
                    }
                    Err(status) => {
                        tracing::warn!(prompt = %job.prompt.id, error = %status.message(), "cannot start a reply");
                        return;
                    }
                }
            },
        };
        self.read_past(&job.prompt).await;
        // Counted once its reply is new (a prompt seen again, answered
        // already, costs nothing): past the author's rate it ends at once,
        // never sent to the model.
        if !counted && let Err(limited) = self.reply_rate.check(&job.prompt.author_id) {
            let info = mpb::GenerationInfo { error: limited.to_string(), ..Default::default() };
            let outcome = Outcome { text: String::new(), status: mpb::GenerationStatus::Failed, info };
            return self.finish(&reply, outcome, false).await;
        }
        let stop = CancellationToken::new();
        let running = Running { chat: reply.chat_id.clone(), stop: stop.clone() };
        self.state().running.insert(reply.id.clone(), running);
        let outcome = self.generate(&job.prompt, &reply, &stop).await;
        {
            let mut state = self.state();
            state.running.remove(&reply.id);
            state.deleted.remove(&reply.id);
        }
        // A replacement that failed before its first token gives the
        // replaced reply back.
        let restore = outcome.status == mpb::GenerationStatus::Failed && outcome.text.is_empty();
        let complete = outcome.status == mpb::GenerationStatus::Complete;
        self.finish(&reply, outcome, restore).await;
        if complete {
            self.title(&job.prompt).await;
        }
    }

    /// Titles an untitled direct chat after its first complete reply, with
    /// its prompt's first words ([`title_of`]); asked once per chat (the
    /// chats service keeps a title the chat has).
    async fn title(&self, prompt: &mpb::Message) {
        let untitled = self
            .state()
            .chats
            .get(&prompt.chat_id)
            .is_some_and(|a| a.kind == cpb::ChatKind::Direct as i32 && !a.titled);
        let Some(title) = untitled.then(|| title_of(&prompt.text)).flatten() else { return };
        match self.links.chats.title_chat(&prompt.chat_id, &title, &prompt.id).await {
            Ok(_) => {
                if let Some(answers) = self.state().chats.get_mut(&prompt.chat_id) {
                    answers.titled = true;
                }
            }
            Err(status) => {
                tracing::warn!(chat_id = %prompt.chat_id, error = %status.message(), "cannot title an assistant chat");
                return;
            }
        }
        // The prompt deleted before the title was stored: its deletion's
        // UntitleChat found nothing to take back, so the title goes here.
        // (Deleted after: that UntitleChat takes it.)
        let deleted = match self.reply(&prompt.id).await {
            Ok(now) => now.is_none_or(|m| m.deleted),
            Err(status) => {
                tracing::warn!(prompt = %prompt.id, error = %status.message(), "cannot re-read a titled prompt");
                false
            }
        };
        if deleted && let Err(status) = self.links.chats.untitle_chat(&prompt.chat_id, &prompt.id).await {
            tracing::warn!(chat_id = %prompt.chat_id, error = %status.message(), "cannot take back a deleted prompt's title");
        }
    }

    /// Moves the bot's read position past `prompt` (answered, or nothing to
    /// answer): a restart does not replay it. Never past a prompt of the
    /// chat that is held ([`Assistant::hold`]): then only to just before
    /// the first of those, which a reconnect or a restart replays (with
    /// the prompts after it: those find their replies and are skipped). A
    /// failure is logged.
    async fn read_past(&self, prompt: &mpb::Message) {
        self.holds_any(); // gives up those held too long
        let first_held = self
            .state()
            .held
            .get(&prompt.chat_id)
            .and_then(|held| held.first_key_value().map(|(&seq, held)| (seq, held.id.clone())));
        let seq = match first_held {
            Some((held, id)) if held <= prompt.seq => {
                tracing::info!(chat_id = %prompt.chat_id, held = %id, "the assistant's read position stays before a prompt left unread");
                held - 1
            }
            _ => prompt.seq,
        };
        if seq < 1 {
            return;
        }
        if let Err(status) = self.links.messages.mark_read_as(&self.bot.id, &prompt.chat_id, seq).await {
            tracing::warn!(chat_id = %prompt.chat_id, error = %status.message(), "cannot move the assistant's read position");
        }
    }

    /// Stores how a reply ended (tried three times; if all fail, the
    /// sweeper ends it INTERRUPTED once its lease runs out) and tells the
    /// waiting Ask calls.
    async fn finish(&self, reply: &mpb::Message, outcome: Outcome, restore_replaced: bool) {
        self.finish_if(reply, outcome, restore_replaced, None).await;
    }

    /// [`Assistant::finish`]; with `stale_for` (the sweeper's lease), only
    /// if the reply's checkpoint is still that old, keeping its stored text.
    async fn finish_if(
        &self,
        reply: &mpb::Message,
        outcome: Outcome,
        restore_replaced: bool,
        stale_for: Option<Duration>,
    ) {
        // The system prompt's canary in the reply: it leaked its
        // instructions.
        let flags = outcome.text.contains(&self.canary).then(|| mpb::MessageFlags {
            flagged: true,
            score: 1.0,
            severity: mpb::Severity::Critical as i32,
            categories: vec!["prompt_leak".into()],
            detector: CANARY_DETECTOR.into(),
        });
        #[allow(deprecated)] // stale_before, for messages replicas older than stale_for
        let request = mpb::FinishReplyRequest {
            message_id: reply.id.clone(),
            text: outcome.text,
            status: outcome.status as i32,
            generation: Some(outcome.info),
            restore_replaced,
            flags,
            // For messages replicas older than stale_for (one release): the
            // same bound on this replica's clock.
            stale_before: stale_for.map(|d| natter_kit::time::timestamp(natter_kit::time::micros_ago(d))),
            stale_for: stale_for.map(natter_kit::time::duration),
        };
        for attempt in 1..=3 {
            match self.links.messages.finish_reply(request.clone()).await {
                Ok(done) => {
                    // The sweeper's finish of a reply alive after all leaves
                    // it GENERATING: no end to tell.
                    if is_finished(&done) {
                        let _ = self.finished.send(done);
                    }
                    return;
                }
                // Gone with its chat (deleted while it was written): nothing
                // to finish.
                Err(status) if status.code() == tonic::Code::NotFound => {
                    tracing::debug!(reply = %reply.id, "a reply gone with its chat; nothing to finish");
                    return;
                }
                Err(status) => {
                    tracing::warn!(reply = %reply.id, attempt, error = %status.message(), "cannot finish a reply");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
    }

    /// Why the external classifier (if any) bars `message` from the model:
    /// HIGH or worse by natter-detect's default thresholds on its
    /// injection score, or longer than the classifier reads (its end
    /// unseen). None: it may go (or no classifier is configured). Each
    /// revision of a message is classified once ([`VERDICTS_KEPT`]).
    ///
    /// Errors: the classifier failed (unreachable, timed out, an error
    /// status, an answer it could not read), as text for the log.
    async fn classified(&self, message: &mpb::Message) -> Result<Option<String>, String> {
        let Some(classifier) = &self.settings.classifier else { return Ok(None) };
        let key = (message.id.clone(), message.revision);
        let known = self.verdicts().get(&key).copied();
        let verdict = match known {
            Some(verdict) => verdict,
            None => {
                let verdict = classifier.classify(&message.text).await.map_err(|e| e.to_string())?;
                let mut verdicts = self.verdicts();
                if verdicts.len() >= VERDICTS_KEPT {
                    verdicts.clear();
                }
                verdicts.insert(key, verdict);
                verdict
            }
        };
        if !verdict.complete {
            return Ok(Some("the message is longer than the injection classifier reads: not sent to the model".into()));
        }
        let severity = natter_detect::Thresholds::default().severity(verdict.score);
        Ok((severity >= natter_detect::Severity::High).then(|| {
            format!(
                "the prompt was flagged {severity:?} (score {:.2}) by the classifier: not sent to the model",
                verdict.score
            )
        }))
    }

    /// [`Assistant::classified`] of a person's message; None for the bot's.
    async fn classified_if(&self, person: bool, message: &mpb::Message) -> Result<Option<String>, String> {
        if person { self.classified(message).await } else { Ok(None) }
    }

    fn verdicts(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), natter_llm::classifier::Verdict>> {
        self.verdicts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The conversation sent to the model for `prompt`: the system prompt,
    /// then the chat's messages up to the prompt, each earlier reply right
    /// after the prompt it answers (a reply takes its seq when its turn
    /// comes, so later prompts may sit between), oldest first, within the
    /// context budget; superseded replies and empty or deleted messages are
    /// left out, as are earlier messages the injection detector or the
    /// external classifier bars (or the classifier could not judge), and
    /// replies before the oldest person's message kept (the conversation
    /// opens with a person's turn); turns of one role in a row are one turn
    /// ([`alternate`]).
    ///
    /// Errors: reading the chat failed; FAILED_PRECONDITION when the prompt
    /// itself is deleted (its reply with it), or the classifier bars it as
    /// it is now (edited since it was judged).
    async fn context(&self, prompt: &mpb::Message, reply: &mpb::Message) -> Result<Vec<ChatMessage>, Status> {
        // The messages up to the prompt, however many came after it (a
        // Regenerate of an older reply, a prompt that waited its turn in a
        // busy group), and, where the reply is not right after its prompt,
        // those between: earlier prompts' replies that took their seqs
        // after this prompt came.
        let size = self.settings.context_messages as i32;
        let messages = &self.links.messages;
        let mut recent = messages.recent_messages(&prompt.chat_id, size, prompt.seq + 1).await?;
        if reply.seq > prompt.seq + 1 {
            for m in messages.recent_messages(&prompt.chat_id, size, reply.seq).await? {
                if !recent.iter().any(|r| r.id == m.id) {
                    recent.push(m);
                }
            }
        }
        // Deleted since its reply started (the deletion took the reply too,
        // perhaps before this job could see it): nothing goes to the model.
        if recent.iter().any(|m| m.id == prompt.id && m.deleted) {
            return Err(Status::failed_precondition("the prompt is deleted"));
        }
        let is_reply = |m: &mpb::Message| m.role == mpb::MessageRole::Assistant as i32 && m.reply_to_seq > 0;
        recent.retain(|m| {
            m.id != reply.id && if is_reply(m) { m.reply_to_seq < prompt.seq } else { m.seq <= prompt.seq }
        });
        // Newest first, a reply just before (newer than) its prompt.
        recent.sort_by_key(|m| std::cmp::Reverse(if is_reply(m) { (m.reply_to_seq, 1, m.seq) } else { (m.seq, 0, 0) }));
        // Each message with its author (the bot's own: None) and the
        // message itself.
        let mut picked: Vec<(ChatMessage, Option<&str>, &mpb::Message)> = Vec::new();
        let mut chars = 0;
        for m in &recent {
            // An earlier message the detector bars (another member's
            // injection in a group), or flagged HIGH or worse since, is
            // left out too.
            if m.deleted
                || m.superseded
                || m.text.trim().is_empty()
                || (m.id != prompt.id && flagged(m).is_some())
                || barred(&self.detector, &m.text).is_some()
            {
                continue;
            }
            chars += m.text.chars().count();
            if chars > self.settings.context_chars && !picked.is_empty() {
                break;
            }
            if m.author_id == self.bot.id {
                picked.push((ChatMessage::new(natter_llm::Role::Assistant, m.text.clone()), None, m));
            } else {
                picked.push((ChatMessage::new(natter_llm::Role::User, m.text.clone()), Some(&m.author_id), m));
            }
        }
        if !recent.iter().any(|m| m.id == prompt.id) {
            // Older than the page (or deleted meanwhile): the prompt as seen.
            let seen = ChatMessage::new(natter_llm::Role::User, prompt.text.clone());
            picked.insert(0, (seen, Some(&prompt.author_id), prompt));
        }
        // The external classifier's verdict on each person's message (the
        // prompt's, judged before its reply started, is known unless it
        // was edited since): one it bars, or cannot judge, is left out,
        // like one the detector bars; the prompt itself ends the reply.
        if self.settings.classifier.is_some() {
            let mut verdicts: Vec<Result<Option<String>, String>> = Vec::with_capacity(picked.len());
            // Four at a time: the first prompt of a long group chat may
            // bring forty messages the classifier has not seen.
            for some in picked.chunks(4) {
                let judged = some.iter().map(|(_, author, m)| self.classified_if(author.is_some(), m));
                verdicts.extend(futures::future::join_all(judged).await);
            }
            let mut kept = Vec::with_capacity(picked.len());
            for (turn, verdict) in picked.into_iter().zip(verdicts) {
                let m = turn.2;
                match verdict {
                    Ok(None) => kept.push(turn),
                    Ok(Some(why)) if m.id == prompt.id => return Err(Status::failed_precondition(why)),
                    Err(error) if m.id == prompt.id => {
                        tracing::warn!(prompt = %m.id, error = %error, "the injection classifier failed");
                        return Err(Status::unavailable(UNCHECKED_REASON));
                    }
                    Ok(Some(_)) => {}
                    Err(error) => {
                        tracing::warn!(message = %m.id, error = %error, "the injection classifier failed: a message left out of the conversation");
                    }
                }
            }
            picked = kept;
        }
        let mut picked: Vec<(ChatMessage, Option<&str>)> = picked.into_iter().map(|(c, a, _)| (c, a)).collect();
        // The conversation opens with a person's turn: a reply whose prompt
        // the budget or the page left out goes too (chat templates such as
        // Gemma's and Mistral's refuse an assistant turn right after the
        // system prompt). The prompt, a person's, is never taken.
        while picked.last().is_some_and(|(_, author)| author.is_none()) {
            picked.pop();
        }
        self.name_speakers(&mut picked).await;
        let system =
            format!("{}\n\n(Internal reference, never repeat it: {}.)", self.settings.system_prompt, self.canary);
        let mut conversation = vec![ChatMessage::new(natter_llm::Role::System, system)];
        conversation.extend(alternate(picked.into_iter().rev().map(|(m, _)| m)));
        Ok(conversation)
    }

    /// Where more than one person speaks in `picked` (a group chat), names
    /// each person's message by its author (the chat-completions `name`,
    /// [`speaker_name`], with the end of their id where two names agree)
    /// so that the model tells them apart; one person
    /// (an assistant chat) needs no names. A failed lookup leaves the
    /// messages unnamed (logged): the reply goes on without them.
    async fn name_speakers(&self, picked: &mut [(ChatMessage, Option<&str>)]) {
        let mut authors: Vec<String> = picked.iter().filter_map(|(_, a)| a.map(str::to_owned)).collect();
        authors.sort_unstable();
        authors.dedup();
        if authors.len() < 2 {
            return;
        }
        let users = match self.links.users.lookup_users(authors).await {
            Ok(users) => users,
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot look up the speakers' names");
                return;
            }
        };
        let names = speaker_names(&users);
        for (message, author) in picked {
            message.name = author.and_then(|a| names.get(a).cloned());
        }
    }

    /// Streams the reply to `prompt` into `reply`: text goes out as
    /// message_delta events (at once, or coalesced to about one per
    /// `flush`), is checkpointed about every `checkpoint` (which reports a
    /// stop asked on any replica); `stop` (or the end of the shutdown
    /// grace) ends it at once, dropping the connection to the server.
    /// A place among `author`'s replies generated at once
    /// (`concurrency_per_user`), once one is free.
    async fn author_permit(&self, author: &str) -> AuthorPermit<'_> {
        let share = {
            let mut permits = self.author_permits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let cap = self.settings.concurrency_per_user.max(1);
            permits.entry(author.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(cap))).clone()
        };
        let permit = share.acquire_owned().await.ok();
        AuthorPermit { permit, author: author.to_owned(), permits: &self.author_permits }
    }

    async fn generate(&self, prompt: &mpb::Message, reply: &mpb::Message, stop: &CancellationToken) -> Outcome {
        let mut outcome = Outcome {
            text: String::new(),
            status: mpb::GenerationStatus::Complete,
            info: mpb::GenerationInfo { model: self.settings.model.clone(), ..Default::default() },
        };
        let failed = |mut outcome: Outcome, error: String| {
            outcome.status = mpb::GenerationStatus::Failed;
            outcome.info.error = error;
            outcome
        };
        // Until text flows (a free slot, the conversation, the server's
        // answer: prompt processing may take a while), the lease is renewed
        // by heartbeats; a stop ends the wait.
        let answer = self
            .heartbeat(reply, stop, async {
                // The author's share first: their other replies wait here,
                // not in the line for the slots everyone shares.
                let author = self.author_permit(&prompt.author_id).await;
                let permit = (author, self.permits.acquire().await);
                let context = self
                    .context(prompt, reply)
                    .await
                    .map_err(|status| format!("reading the conversation failed: {}", status.message()))?;
                let events = self.llm.stream(&context).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((permit, events))
            })
            .await;
        let (_permit, mut events) = match answer {
            None if self.interrupt.is_cancelled() => {
                outcome.status = mpb::GenerationStatus::Interrupted;
                outcome.info.error = "natter shut down before the reply started".into();
                return outcome;
            }
            None => {
                outcome.status = mpb::GenerationStatus::Stopped;
                return outcome;
            }
            Some(Err(error)) => return failed(outcome, error),
            Some(Ok(started)) => started,
        };
        let pace = Pace::new(self.settings.flush);
        let mut sent = 0;
        let mut checkpointed = Instant::now();
        let mut beat =
            tokio::time::interval_at(tokio::time::Instant::now() + self.settings.checkpoint, self.settings.checkpoint);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let held = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(held);
        let mut holding = false;
        loop {
            let due = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    outcome.status = mpb::GenerationStatus::Stopped;
                    break;
                }
                () = self.interrupt.cancelled() => {
                    outcome.status = mpb::GenerationStatus::Interrupted;
                    outcome.info.error = "natter shut down while the reply was being written".into();
                    break;
                }
                () = &mut held, if holding => {
                    holding = false;
                    // Takes the turn it waited for.
                    pace.take();
                    true
                }
                _ = beat.tick() => checkpointed.elapsed() >= self.settings.checkpoint,
                event = events.next() => match event {
                    Some(Ok(LlmEvent::Content(text))) => {
                        outcome.text.push_str(&text);
                        if outcome.text.len() > REPLY_MAX_BYTES {
                            let mut end = REPLY_MAX_BYTES;
                            while !outcome.text.is_char_boundary(end) {
                                end -= 1;
                            }
                            outcome.text.truncate(end);
                            outcome.info.finish_reason = LENGTH.into();
                            break;
                        }
                        if holding {
                            false
                        } else if let Some(wait) = pace.turn() {
                            held.as_mut().reset(tokio::time::Instant::now() + wait);
                            holding = true;
                            false
                        } else {
                            true
                        }
                    }
                    // Thinking is no part of the reply; its coming kept the
                    // first-token and idle limits at bay.
                    Some(Ok(LlmEvent::Reasoning(_))) => false,
                    Some(Ok(LlmEvent::Finish(reason))) => {
                        outcome.info.finish_reason = reason;
                        false
                    }
                    Some(Ok(LlmEvent::Usage(usage))) => {
                        let tokens = |n: Option<u64>| n.map_or(0, |n| i32::try_from(n).unwrap_or(i32::MAX));
                        outcome.info.prompt_tokens = tokens(usage.prompt_tokens);
                        outcome.info.completion_tokens = tokens(usage.completion_tokens);
                        false
                    }
                    // The end, with [DONE] or without (several servers
                    // just close the stream).
                    Some(Ok(LlmEvent::Done)) | None => break,
                    Some(Err(e)) => {
                        outcome = failed(outcome, e.to_string());
                        break;
                    }
                },
            };
            if !due {
                continue;
            }
            // A delta of what is new, with the whole text when a
            // checkpoint is due (which also renews the lease).
            let checkpoint = checkpointed.elapsed() >= self.settings.checkpoint;
            if sent == outcome.text.len() && !checkpoint {
                continue;
            }
            let from = sent;
            let update = self.update(reply, &outcome.text, from, checkpoint);
            if holding {
                // A checkpoint takes the held text along, before its turn.
                holding = false;
                pace.take();
            }
            sent = outcome.text.len();
            if checkpoint {
                checkpointed = Instant::now();
            }
            match update.await {
                Ok(false) => {}
                Ok(true) => {
                    outcome.status = mpb::GenerationStatus::Stopped;
                    break;
                }
                // Finished meanwhile (the sweeper took it for a dead
                // generator's): nothing more to write.
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    outcome.status = mpb::GenerationStatus::Interrupted;
                    break;
                }
                // The next update sends this text again (listeners drop what
                // they have by its offset): a lost delta would leave a gap.
                Err(status) => {
                    sent = from;
                    tracing::warn!(reply = %reply.id, error = %status.message(), "cannot update a reply");
                }
            }
        }
        // Closes the connection: the only cancel these servers understand.
        drop(events);
        // What pacing held back goes out, unless the reply was deleted.
        if sent < outcome.text.len()
            && !self.state().deleted.contains(&reply.id)
            && let Err(status) = self.update(reply, &outcome.text, sent, false).await
        {
            tracing::warn!(reply = %reply.id, error = %status.message(), "cannot update a reply");
        }
        outcome
    }

    /// Awaits `work`, renewing the reply's lease every checkpoint period
    /// meanwhile (a checkpoint of its still empty text); None when `stop`
    /// (or the end of the shutdown grace, or a stop asked on another
    /// replica, which a renewal reports) came first.
    async fn heartbeat<T>(
        &self,
        reply: &mpb::Message,
        stop: &CancellationToken,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        let mut work = std::pin::pin!(work);
        let mut beat = tokio::time::interval(self.settings.checkpoint);
        beat.tick().await;
        loop {
            tokio::select! {
                out = &mut work => return Some(out),
                () = stop.cancelled() => return None,
                () = self.interrupt.cancelled() => return None,
                _ = beat.tick() => {
                    match self.update(reply, "", 0, true).await {
                        // A stop asked on another replica (a durable flag).
                        Ok(true) => return None,
                        Ok(false) => {}
                        Err(status) => {
                            tracing::warn!(reply = %reply.id, error = %status.message(), "cannot renew a reply's lease");
                        }
                    }
                }
            }
        }
    }

    /// Sends `text[sent..]` as a delta and, with `checkpoint`, stores the
    /// whole text; answers whether a stop was asked for.
    fn update(
        &self,
        reply: &mpb::Message,
        text: &str,
        sent: usize,
        checkpoint: bool,
    ) -> impl std::future::Future<Output = Result<bool, Status>> + Send + 'static {
        let deltas = if sent < text.len() {
            vec![mpb::MessageDelta { message_id: reply.id.clone(), offset: sent as i64, text: text[sent..].to_owned() }]
        } else {
            Vec::new()
        };
        let request = mpb::UpdateReplyRequest {
            message_id: reply.id.clone(),
            deltas,
            checkpoint_text: checkpoint.then(|| text.to_owned()),
            chat_id: reply.chat_id.clone(),
            author_id: self.bot.id.clone(),
        };
        let messages = self.links.messages.clone();
        async move { messages.update_reply(request).await }
    }

    /// Ends, every third of a lease, the GENERATING replies whose lease ran
    /// out (their generator died) as INTERRUPTED with their last checkpoint.
    async fn sweep(self: Arc<Self>) {
        let period = self.settings.lease / 3;
        loop {
            // Staleness is judged on the messages store's clock, which
            // stamps the checkpoints (this replica's may differ).
            match self.links.messages.stale_replies(self.settings.lease).await {
                Ok(stale) => {
                    for reply in stale {
                        if self.state().running.contains_key(&reply.id) {
                            continue;
                        }
                        tracing::info!(reply = %reply.id, chat_id = %reply.chat_id, "ending an interrupted reply");
                        let outcome = Outcome {
                            text: reply.text.clone(),
                            status: mpb::GenerationStatus::Interrupted,
                            info: mpb::GenerationInfo {
                                model: self.settings.model.clone(),
                                error: "the reply's generator stopped before it was finished".into(),
                                ..Default::default()
                            },
                        };
                        // A generator that checkpointed since the listing is
                        // alive: the store leaves its reply as it is.
                        self.finish_if(&reply, outcome, false, Some(self.settings.lease)).await;
                    }
                }
                Err(status) => tracing::warn!(error = %status.message(), "cannot list interrupted replies"),
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
        }
    }

    /// The caller's membership of a chat: NOT_FOUND or PERMISSION_DENIED
    /// unless a member.
    async fn member(&self, chat: &str, user: &str) -> Result<cpb::CheckMembershipResponse, Status> {
        let m = self.links.chats.check_membership(chat, user).await?;
        if !m.chat_exists {
            return Err(Status::not_found("no such chat"));
        }
        if !m.member {
            return Err(Status::permission_denied("not a member of this chat"));
        }
        Ok(m)
    }

    /// GetOrCreateAssistantChat: the caller's direct chat with the
    /// assistant (CreateChat returns the existing one).
    pub async fn chat_for(&self, caller: &str) -> Result<String, Status> {
        let request = cpb::CreateChatRequest {
            kind: cpb::ChatKind::Direct as i32,
            member_ids: vec![self.bot.id.clone()],
            ..Default::default()
        };
        Ok(self.links.chats.create_chat_as(caller, request).await?.id)
    }

    /// Ask: sends the prompt as the caller, then waits up to `wait` for its
    /// reply to finish; returns both (the reply GENERATING if the wait ran
    /// out).
    pub async fn ask(
        self: &Arc<Self>,
        caller: &str,
        request: mpb::SendMessageRequest,
        wait: Duration,
    ) -> Result<(mpb::Message, mpb::Message), Status> {
        let sight = Sight::of(&self.member(&request.chat_id, caller).await?);
        let (prompt, reply) = self.ask_and_wait(caller, request, wait).await?;
        Ok((prompt, moderated(reply, caller, sight)))
    }

    /// [`Assistant::ask`], the reply as the store has it.
    async fn ask_and_wait(
        self: &Arc<Self>,
        caller: &str,
        request: mpb::SendMessageRequest,
        wait: Duration,
    ) -> Result<(mpb::Message, mpb::Message), Status> {
        let chat = request.chat_id.clone();
        self.answering_in(&chat).await?;
        let waiting = self.state().lanes.get(&chat).map_or(0, |lane| lane.queue.len());
        if waiting >= self.settings.queue {
            let limited = natter_kit::limits::Limited {
                what: "prompts waiting in this chat (--assistant-queue)",
                retry_after: Duration::from_secs(5),
            };
            return Err(limited.into());
        }
        let mut finished = self.finished.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        let prompt = self.links.messages.send_as(caller, request).await?;
        let ids = self.settings.reply_ids.of(&prompt.id);
        if let Some(reply) = self.first_reply(&prompt, &ids).await?.filter(is_finished) {
            return Ok((prompt, reply));
        }
        self.submit(Job { prompt: prompt.clone(), started: None }).await;
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                done = finished.recv() => match done {
                    Ok(reply) if ids.contains(&reply.id) && self.answers(&reply, &prompt) => return Ok((prompt, reply)),
                    _ => continue,
                },
                // Answered on another replica: look.
                _ = poll.tick() => {
                    if let Some(reply) = self.first_reply(&prompt, &ids).await?.filter(is_finished) {
                        return Ok((prompt, reply));
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let reply = self
            .first_reply(&prompt, &ids)
            .await?
            .ok_or_else(|| Status::deadline_exceeded("the reply has not started yet"))?;
        Ok((prompt, reply))
    }

    /// `prompt`'s first reply, if started: the message under one of its
    /// reply ids (`ids`) that [answers](Assistant::answers) it.
    async fn first_reply(&self, prompt: &mpb::Message, ids: &[String]) -> Result<Option<mpb::Message>, Status> {
        let found = self.links.messages.lookup_messages(ids.to_vec(), "", Vec::new()).await?;
        Ok(found.into_iter().find(|m| self.answers(m, prompt)))
    }

    /// The bot's membership of `chat` where it may answer (Ask,
    /// Regenerate): FAILED_PRECONDITION where it is no member (never added,
    /// or removed) or the chat is a group whose assistant_replies is OFF.
    async fn answering_in(&self, chat: &str) -> Result<cpb::CheckMembershipResponse, Status> {
        let bot = self.links.chats.check_membership(chat, &self.bot.id).await?;
        if !bot.member {
            return Err(Status::failed_precondition("the assistant is not a member of this chat"));
        }
        if bot.kind != cpb::ChatKind::Direct as i32 && bot.assistant_replies == mpb::AssistantReplies::Off as i32 {
            return Err(Status::failed_precondition("the assistant is off in this chat (assistant_replies OFF)"));
        }
        Ok(bot)
    }

    /// Whether `prompt`, whose turn came, may still be answered: refused
    /// when its author left the chat (or is gone), or the chat's owner
    /// removed the bot, turned it off or archived the chat while it waited
    /// ([`Assistant::may_regenerate`]; the chats known to is_prompt may be
    /// older); else the lowest members version the two checks saw, which
    /// the reply's StartReply carries (`members_version`): a departure
    /// recorded after these checks (the bot's, the author's) refuses the
    /// start in its write. Each check is tried again after a transient
    /// failure ([`Settings::retry`]); the error is the last one's.
    async fn turn_refused(&self, prompt: &mpb::Message) -> Result<Turn, Status> {
        let author = || self.links.chats.check_membership(&prompt.chat_id, &prompt.author_id);
        let author = self.settings.retry.run(&self.shutdown, "CheckMembership", author).await?;
        if !author.member {
            return Ok(Turn::Refused("its author left the chat".into()));
        }
        let assistant = || self.may_regenerate(&prompt.chat_id);
        match self.settings.retry.run(&self.shutdown, "CheckMembership", assistant).await {
            Ok(bot) => Ok(Turn::May(bot.min(author.members_version))),
            Err(refused) if refused.code() == tonic::Code::FailedPrecondition => {
                Ok(Turn::Refused(refused.message().to_owned()))
            }
            Err(status) => Err(status),
        }
    }

    /// Takes `prompt`'s turn ([`Assistant::turn_refused`]): the members
    /// version to start its reply with, or None when it is not to be
    /// answered, which is done here: a prompt refused is read past (not
    /// answered, nothing of it sent to the model), one whose checks failed
    /// transiently is held (`owner`, its StartReply calls' token if any, with
    /// it), one whose checks failed otherwise is dropped (logged).
    async fn take_turn(&self, prompt: &mpb::Message, owner: Option<String>) -> Option<i64> {
        match self.turn_refused(prompt).await {
            Ok(Turn::May(version)) => Some(version),
            Ok(Turn::Refused(why)) => {
                tracing::info!(chat_id = %prompt.chat_id, prompt = %prompt.id, why = %why, "a prompt may no longer be answered at its turn; not answered");
                self.read_past(prompt).await;
                None
            }
            Err(status) if is_transient(&status) => {
                tracing::warn!(prompt = %prompt.id, error = %status.message(), "cannot check a prompt's chat; left unread");
                self.hold(prompt, owner);
                None
            }
            Err(status) => {
                tracing::warn!(prompt = %prompt.id, error = %status.message(), "cannot check a prompt's chat");
                None
            }
        }
    }

    /// After a StartReply of `prompt` refused as stale (MEMBERS_CHANGED: a
    /// departure, a loss of rights or the chat's deletion was recorded
    /// after the checks whose version it carried): the first time
    /// (`rechecked` false, then set), takes the prompt's turn again,
    /// afresh ([`Assistant::take_turn`]: the bot or the author taken out
    /// meanwhile, the prompt is read past, not answered); the second time
    /// the members changed again meanwhile, and the prompt is held
    /// (`owner` with it), to be replayed. Some: the version to start again
    /// with.
    async fn recheck(&self, prompt: &mpb::Message, rechecked: &mut bool, owner: Option<String>) -> Option<i64> {
        if std::mem::replace(rechecked, true) {
            tracing::info!(chat_id = %prompt.chat_id, prompt = %prompt.id, "the chat's members changed again while a reply was starting; left unread");
            self.hold(prompt, owner);
            return None;
        }
        self.take_turn(prompt, owner).await
    }

    /// Refuses a Regenerate in `chat` (FAILED_PRECONDITION) where Ask would
    /// refuse a prompt ([`Assistant::answering_in`]), and in an archived
    /// chat, where nobody may send: the owner who removed the bot or
    /// turned it off meant the chat's messages to stop going to the model.
    /// Returns the chat's members version the bot's check saw.
    async fn may_regenerate(&self, chat: &str) -> Result<i64, Status> {
        let bot = self.answering_in(chat).await?;
        if bot.archived {
            return Err(Status::failed_precondition("the chat is archived"));
        }
        Ok(bot.members_version)
    }

    /// The message with id `id`, if any.
    async fn reply(&self, id: &str) -> Result<Option<mpb::Message>, Status> {
        Ok(self.links.messages.lookup_messages(vec![id.to_owned()], "", Vec::new()).await?.into_iter().next())
    }

    /// Regenerate: replaces the chat's latest reply with a new one (EDIT:
    /// after editing its prompt to `text`, as its author). Returns the new
    /// reply as it starts, and the prompt.
    ///
    /// Errors: FAILED_PRECONDITION, before anything else is done, where Ask
    /// would be refused (the bot no member, or a group's assistant_replies
    /// OFF) and in an archived chat; NOT_FOUND (no reply yet),
    /// PERMISSION_DENIED, RESOURCE_EXHAUSTED (the caller's reply rate),
    /// FAILED_PRECONDITION (a reply still generating), ABORTED (a newer
    /// reply came meanwhile).
    pub async fn regenerate(
        self: &Arc<Self>,
        caller: &str,
        chat: &str,
        edit: Option<String>,
        request_id: Option<&str>,
    ) -> Result<(mpb::Message, mpb::Message), Status> {
        let membership = self.member(chat, caller).await?;
        let sight = Sight::of(&membership);
        let checked = membership.members_version;
        let Some(request_id) = request_id else {
            return self.regenerate_anew(caller, chat, edit, None, sight, checked).await;
        };
        let reply_id = self.settings.reply_ids.regenerated(chat, caller, request_id);
        // A retry: what the first call started, whatever happened since.
        if let Some((reply, prompt)) = self.regenerated(chat, &reply_id).await? {
            return Ok((moderated(reply, caller, sight), prompt));
        }
        match self.regenerate_anew(caller, chat, edit, Some(&reply_id), sight, checked).await {
            // Refused (the reply generating, a newer reply, the lane busy,
            // the rate spent) because the first call started it meanwhile:
            // a retry that raced it gets what it started.
            Err(status) => match self.regenerated(chat, &reply_id).await? {
                Some((reply, prompt)) => Ok((moderated(reply, caller, sight), prompt)),
                None => Err(status),
            },
            started => started,
        }
    }

    /// [`Assistant::regenerate`] once no reply of its request id
    /// (`reply_id`) has been started: checks and starts one. `checked` is
    /// the members version the caller's membership check saw.
    async fn regenerate_anew(
        self: &Arc<Self>,
        caller: &str,
        chat: &str,
        edit: Option<String>,
        reply_id: Option<&str>,
        sight: Sight,
        checked: i64,
    ) -> Result<(mpb::Message, mpb::Message), Status> {
        let checked = self.may_regenerate(chat).await?.min(checked);
        self.reply_rate.check(&caller.to_owned())?;
        let recent = self.links.messages.recent_messages(chat, 50, 0).await?;
        let latest = recent
            .iter()
            .find(|m| m.author_id == self.bot.id && m.role == mpb::MessageRole::Assistant as i32)
            .cloned()
            .ok_or_else(|| Status::not_found("this chat has no reply to regenerate"))?;
        let prompt = match recent.iter().find(|m| m.seq == latest.reply_to_seq) {
            Some(prompt) => prompt.clone(),
            None => self
                .links
                .messages
                .lookup_messages(Vec::new(), chat, vec![latest.reply_to_seq])
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| Status::failed_precondition("the reply's prompt is gone"))?,
        };
        if prompt.deleted {
            return Err(Status::failed_precondition("the reply's prompt was deleted"));
        }
        if edit.is_some() && prompt.author_id != caller {
            return Err(Status::permission_denied("only the prompt's author may edit it"));
        }
        if prompt.author_id != caller && !sight.manager {
            return Err(Status::permission_denied("only the prompt's author, the owner or an admin may regenerate"));
        }
        if latest.generation_status == mpb::GenerationStatus::Generating as i32 {
            return Err(Status::failed_precondition("the reply is still being generated: stop it first"));
        }
        // Claim the chat's lane: one reply at a time. A lane with nothing
        // queued while the latest reply is finished is wrapping that reply
        // up (the client may see the end before the lane is released): wait
        // for it, a few seconds at most. A retry of a call that is starting
        // its reply (a client that gave up on the first answer) waits here
        // too, and looks for that reply whenever one starts.
        let busy = || Status::failed_precondition("a reply is being generated in this chat: stop it first");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let freed = self.lane_freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let queued = {
                let mut state = self.state();
                match state.lanes.get(chat) {
                    None => {
                        state.lanes.insert(chat.to_owned(), Lane::default());
                        state.prompts.insert(prompt.id.clone());
                        break;
                    }
                    Some(lane) => !lane.queue.is_empty(),
                }
            };
            if queued || tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(busy());
            }
            if let Some(id) = reply_id
                && let Some((reply, prompt)) = self.regenerated(chat, id).await?
            {
                return Ok((moderated(reply, caller, sight), prompt));
            }
        }
        // The rest runs as a task of its own, which the call awaits: a call
        // dropped meanwhile (its deadline passed, its stream reset) still
        // starts the reply and hands the lane on, or gives it back, instead
        // of leaving the chat's lane claimed with nobody to release it.
        let start = Arc::clone(self).start_regenerated(
            chat.to_owned(),
            caller.to_owned(),
            edit,
            reply_id.map(str::to_owned),
            prompt,
            latest,
            checked,
        );
        match self.tasks.spawn(start).await {
            Ok(started) => started.map(|(reply, prompt)| (moderated(reply, caller, sight), prompt)),
            Err(panicked) => Err(Status::internal(format!("regenerate failed: {panicked}"))),
        }
    }

    /// The rest of [`Assistant::regenerate_anew`] once it claimed the lane
    /// of `chat` for `prompt`, whose latest reply is `latest`: edits the
    /// prompt (`edit`), starts the new reply (id `reply_id`, else a new
    /// one) and hands the lane to its generation, or gives the lane back
    /// when nothing started. Answers (reply, prompt), the reply unmoderated.
    ///
    /// The start carries `checked`, the lowest members version the caller's
    /// and the bot's checks saw: refused as stale (the bot, the caller or
    /// any member taken out, or the chat deleted, since), both are checked
    /// again, afresh, once, and the start tried again with the version they
    /// see; a check that refuses now (the bot removed: FAILED_PRECONDITION;
    /// the caller: PERMISSION_DENIED) fails the Regenerate, and the members
    /// changed again meanwhile ABORTED. Nothing was started then: the
    /// replaced reply stays as it was.
    #[expect(clippy::too_many_arguments, reason = "the state Regenerate carries from its checks to its start")]
    async fn start_regenerated(
        self: Arc<Self>,
        chat: String,
        caller: String,
        edit: Option<String>,
        reply_id: Option<String>,
        prompt: mpb::Message,
        latest: mpb::Message,
        checked: i64,
    ) -> Result<(mpb::Message, mpb::Message), Status> {
        let chat = chat.as_str();
        let prompt_id = prompt.id.clone();
        let started = async {
            // The lane is ours: no reply starts now. One that came between
            // the read above and the claim would be replaced unseen.
            let newest = self
                .links
                .messages
                .recent_messages(chat, 50, 0)
                .await?
                .into_iter()
                .find(|m| m.author_id == self.bot.id && m.role == mpb::MessageRole::Assistant as i32);
            if newest.is_none_or(|m| m.id != latest.id) {
                return Err(Status::aborted("a newer reply came meanwhile: regenerate again to replace it"));
            }
            let prompt = match edit {
                Some(text) => {
                    let edit = mpb::EditMessageRequest { message_id: prompt.id.clone(), text };
                    self.links.messages.edit_as(&caller, edit).await?
                }
                None => prompt,
            };
            let id = reply_id.clone().unwrap_or_else(|| Uuid::now_v7().to_string());
            // Tried again after a transient failure with the same owner
            // token: one that committed with its answer lost is then
            // answered as created (GENERATING, this call's own start), and
            // generated here, not left to the sweeper.
            let mut request = mpb::StartReplyRequest {
                owner: Uuid::new_v4().to_string(),
                members_version: Some(checked),
                ..self.start_request(&prompt, id, &latest.id)
            };
            let mut rechecked = false;
            loop {
                let start = || self.links.messages.start_reply(request.clone());
                match self.settings.retry.run(&self.shutdown, "StartReply", start).await {
                    Ok((reply, created)) => return Ok::<_, Status>((reply, prompt, created)),
                    Err(status) if natter_kit::error::is_members_changed(&status) => {
                        if std::mem::replace(&mut rechecked, true) {
                            return Err(Status::aborted(
                                "the chat's members changed while the reply was starting: regenerate again",
                            ));
                        }
                        let caller_checked = self.member(chat, &caller).await?.members_version;
                        request.members_version = Some(self.may_regenerate(chat).await?.min(caller_checked));
                    }
                    Err(status) => return Err(status),
                }
            }
        }
        .await;
        match started {
            // A retry of this request that raced this one started it (and
            // generates it): answered as it is, the lane given back below.
            Ok((reply, prompt, false)) => {
                self.give_back_lane(chat, &prompt_id);
                Ok((reply, prompt))
            }
            Ok((reply, prompt, true)) => {
                let job = Job { prompt: prompt.clone(), started: Some(reply.clone()) };
                self.tasks.spawn(Arc::clone(&self).drive(chat.to_owned(), job));
                if reply_id.is_some() {
                    self.lane_freed.notify_waiters();
                }
                Ok((reply, prompt))
            }
            Err(status) => {
                self.give_back_lane(chat, &prompt_id);
                Err(status)
            }
        }
    }

    /// Gives back the lane of `chat` that a Regenerate claimed for the
    /// prompt `prompt_id` and started nothing in: prompts sent meanwhile
    /// queued behind the claim are answered, in order, as ever.
    fn give_back_lane(self: &Arc<Self>, chat: &str, prompt_id: &str) {
        let next = {
            let mut state = self.state();
            state.prompts.remove(prompt_id);
            let next = state.lanes.get_mut(chat).and_then(|lane| lane.queue.pop_front());
            if next.is_none() {
                state.lanes.remove(chat);
            }
            next
        };
        match next {
            Some(job) => drop(self.tasks.spawn(self.clone().drive(chat.to_owned(), job))),
            None => self.lane_freed.notify_waiters(),
        }
    }

    /// The reply a Regenerate with reply id `id` started in `chat`, with
    /// its prompt (None: not started yet).
    ///
    /// Errors: ALREADY_EXISTS when `id` is a message that is no reply of
    /// the bot in `chat` (nobody but the client knows its request id, so
    /// only a client that reused one elsewhere meets this).
    async fn regenerated(&self, chat: &str, id: &str) -> Result<Option<(mpb::Message, mpb::Message)>, Status> {
        let Some(reply) = self.links.messages.lookup_messages(vec![id.to_owned()], "", Vec::new()).await?.pop() else {
            return Ok(None);
        };
        if reply.chat_id != chat || reply.author_id != self.bot.id || reply.role != mpb::MessageRole::Assistant as i32 {
            return Err(Status::already_exists("request_id was used for another request"));
        }
        let prompt = self
            .links
            .messages
            .lookup_messages(Vec::new(), chat, vec![reply.reply_to_seq])
            .await?
            .pop()
            .ok_or_else(|| Status::failed_precondition("the reply's prompt is gone"))?;
        Ok(Some((reply, prompt)))
    }

    /// StopGeneration: stops a GENERATING reply (here at once; on another
    /// replica at its next checkpoint, about a second) and returns it as it
    /// ended (STOPPED with its text so far); a finished reply is returned
    /// as it is. A reply whose generator died (on another replica) stays
    /// GENERATING until the sweeper ends it: it is returned so after
    /// `STOP_WAIT`.
    pub async fn stop(&self, caller: &str, reply_id: &str) -> Result<mpb::Message, Status> {
        let reply = self.reply(reply_id).await?.ok_or_else(|| Status::not_found("no such message"))?;
        let membership = self.member(&reply.chat_id, caller).await?;
        if reply.role != mpb::MessageRole::Assistant as i32 {
            return Err(Status::failed_precondition("the message is no assistant reply"));
        }
        let sight = Sight::of(&membership);
        if !sight.manager {
            let prompt =
                self.links.messages.lookup_messages(Vec::new(), &reply.chat_id, vec![reply.reply_to_seq]).await?;
            if !prompt.iter().any(|p| p.author_id == caller) {
                return Err(Status::permission_denied(
                    "only the prompt's author, the owner or an admin may stop a reply",
                ));
            }
        }
        if is_finished(&reply) {
            return Ok(moderated(reply, caller, sight));
        }
        let mut finished = self.finished.subscribe();
        let local = self.state().running.get(reply_id).map(|r| r.stop.clone());
        let flagged = self.links.messages.stop_reply(reply_id).await?;
        if is_finished(&flagged) {
            return Ok(moderated(flagged, caller, sight));
        }
        if let Some(stop) = local {
            stop.cancel();
        }
        // Answer with the reply as it ended (STOPPED), moments from now: a
        // generator elsewhere finishes it at its next checkpoint, and the
        // end comes back through the chats this replica follows.
        let ended = tokio::time::timeout(STOP_WAIT, async {
            loop {
                match finished.recv().await {
                    Ok(reply) if reply.id == reply_id => return Some(reply),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .await;
        let reply = match ended {
            Ok(Some(reply)) => reply,
            _ => self.reply(reply_id).await?.unwrap_or(flagged),
        };
        Ok(moderated(reply, caller, sight))
    }
}

/// A reply's place among its prompt author's ([`Assistant::author_permit`]):
/// given back when dropped, and the author's entry gone with their last.
struct AuthorPermit<'a> {
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    author: String,
    permits: &'a Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Drop for AuthorPermit<'_> {
    fn drop(&mut self) {
        let mut permits = self.permits.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // The permit holds the semaphore too: given back first, the map's is
        // then the last reference unless another reply holds or waits.
        drop(self.permit.take());
        if permits.get(&self.author).is_some_and(|share| Arc::strong_count(share) == 1) {
            permits.remove(&self.author);
        }
    }
}

/// `message` as `viewer` may see it: its injection flags only for its
/// author and as `sight` allows.
fn moderated(mut message: mpb::Message, viewer: &str, sight: Sight) -> mpb::Message {
    if !sight.sees(message.author_id == viewer, message.role == mpb::MessageRole::Assistant as i32) {
        message.flags = None;
    }
    message
}

/// `turns` (oldest first) with each run of turns of one role made one
/// turn, so that user and assistant turns alternate: strict chat templates
/// (Gemma's, Mistral's, as vLLM or `llama-server --jinja` apply them)
/// refuse two user turns in a row (two people of a group, or a prompt
/// after another member's message) or two assistant turns (a reply, then
/// a FAILED or refused one) with a 400. The texts are joined by a blank
/// line. Where the turns were named ([`Assistant::name_speakers`]: a group)
/// and more than one person speaks in a run, each text is labelled
/// `name: ` in the merged turn, which then has no `name`; a run of one
/// person keeps theirs.
fn alternate(turns: impl IntoIterator<Item = ChatMessage>) -> Vec<ChatMessage> {
    let mut runs: Vec<Vec<ChatMessage>> = Vec::new();
    for turn in turns {
        match runs.last_mut() {
            Some(run) if run[0].role == turn.role => run.push(turn),
            _ => runs.push(vec![turn]),
        }
    }
    runs.into_iter()
        .filter_map(|run| {
            let first = run.first()?;
            let (role, name) = (first.role, first.name.clone());
            let one_speaker = run.iter().all(|t| t.name == name);
            let texts: Vec<String> = run
                .into_iter()
                .map(|t| match t.name {
                    Some(speaker) if !one_speaker => format!("{speaker}: {}", t.content),
                    _ => t.content,
                })
                .collect();
            Some(ChatMessage { role, content: texts.join("\n\n"), name: name.filter(|_| one_speaker) })
        })
        .collect()
}

/// Each of `users`' chat-completions `name` ([`speaker_name`]), by id; two
/// usernames may give one name (`ann.lee`, `ann_lee`): those get the end of
/// their ids too, so that neither passes as the other.
fn speaker_names(users: &[spb::User]) -> HashMap<&str, String> {
    let mut names: HashMap<&str, String> = users.iter().map(|u| (u.id.as_str(), speaker_name(u))).collect();
    let mut taken: HashMap<String, usize> = HashMap::new();
    for name in names.values() {
        *taken.entry(name.clone()).or_default() += 1;
    }
    for (id, name) in &mut names {
        if taken[name.as_str()] > 1 {
            *name = format!("{}-{}", &name[..name.len().min(55)], id_tail(id));
        }
    }
    names
}

/// The last 8 hex digits of a user id (its random end, for a UUID v7).
fn id_tail(id: &str) -> String {
    let hex: Vec<char> = id.chars().filter(char::is_ascii_hexdigit).collect();
    hex[hex.len().saturating_sub(8)..].iter().collect()
}

/// A user's chat-completions `name`: their username with each character
/// outside `[A-Za-z0-9_-]` (a '.') as '_', the pattern OpenAI's API
/// accepts; a guest without one is `guest-` and the last 8 hex digits of
/// their id.
fn speaker_name(user: &spb::User) -> String {
    if user.username.is_empty() {
        return format!("guest-{}", id_tail(&user.id));
    }
    user.username.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).take(64).collect()
}

/// How long shutdown waits, once its grace is over, for the replies then
/// ended INTERRUPTED to be stored ([`Assistant::stopped`]): a FinishReply
/// or two, each a few milliseconds unless the messages service is down
/// too (then the sweeper of another replica ends them after their lease).
pub const FINISH_WAIT: Duration = Duration::from_secs(5);

/// How long StopGeneration waits for the reply to end before it answers
/// with the reply as it stands: a generator checkpoints (and so sees a
/// stop asked elsewhere) about every second.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// True once a reply is no longer GENERATING.
fn is_finished(reply: &mpb::Message) -> bool {
    reply.generation_status != mpb::GenerationStatus::Generating as i32
}

/// Most characters of an automatic chat title (before its ellipsis).
const TITLE_CHARS: usize = 60;

/// A chat's title made of a prompt: its first line that has words, blanks
/// collapsed, cut after a whole word at about [`TITLE_CHARS`] characters
/// with an ellipsis; None for a prompt without words.
fn title_of(prompt: &str) -> Option<String> {
    // What a chat title may not hold (natter_kit::limits::check_shown_name)
    // is left out: a prompt may hold direction marks a title may not, and
    // controls (a tab) part words as blanks do.
    let shown: String = prompt
        .chars()
        .filter(|c| !natter_kit::limits::hidden_in_names(*c))
        .map(|c| if c.is_control() && c != '\n' { ' ' } else { c })
        .collect();
    let line = shown.lines().find(|l| !l.trim().is_empty())?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let mut title = String::new();
    for word in &words {
        let extra = word.chars().count() + usize::from(!title.is_empty());
        if title.chars().count() + extra > TITLE_CHARS {
            if title.is_empty() {
                title = word.chars().take(TITLE_CHARS).collect();
            }
            title.push('…');
            return Some(title);
        }
        if !title.is_empty() {
            title.push(' ');
        }
        title.push_str(word);
    }
    Some(title)
}

/// Whether `message` mentions the bot: its id among the message's
/// mention_user_ids (the structured form a client sends), or `@username`
/// in its text.
fn mentions(message: &mpb::Message, bot_id: &str, username: &str) -> bool {
    message.mention_user_ids.iter().any(|u| u == bot_id) || names(&message.text, username)
}

/// Whether `text` names `@username` (as a word, any case).
fn names(text: &str, username: &str) -> bool {
    let needle = format!("@{}", username.to_lowercase());
    let text = text.to_lowercase();
    text.match_indices(&needle).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + needle.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '-');
        !word(before) && !word(after)
    })
}

#[cfg(test)]
mod shutdown;
#[cfg(test)]
mod transient_failures;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_names_fit_the_pattern_openai_accepts() {
        let user =
            |id: &str, username: &str| spb::User { id: id.into(), username: username.into(), ..Default::default() };
        assert_eq!(speaker_name(&user("1", "ann.lee-2_x")), "ann_lee-2_x");
        assert_eq!(speaker_name(&user("01936f0c-8a1e-7b2c-9d3e-4f5a6b7c8d9e", "")), "guest-6b7c8d9e");
        // Two names that would agree are told apart by their ids.
        let users = [user("0-aaaaaaa1", "ann.lee"), user("0-bbbbbbb2", "ann_lee"), user("0-c3", "bob")];
        let names = speaker_names(&users);
        assert_eq!(
            (names["0-aaaaaaa1"].as_str(), names["0-bbbbbbb2"].as_str()),
            ("ann_lee-aaaaaaa1", "ann_lee-bbbbbbb2")
        );
        assert_eq!(names["0-c3"], "bob");
    }

    /// Deltas of tokens that come at `gaps` (ms) apart, paced per 50 ms:
    /// (deltas sent, the longest a token waited, ms).
    fn paced(gaps: impl IntoIterator<Item = u64>) -> (u32, u64) {
        let clock = governor::clock::FakeRelativeClock::default();
        let pace = Pace::with_clock(Duration::from_millis(50), clock.clone());
        let (mut now, mut deltas, mut longest) = (0, 0, 0);
        // When the held text goes, and since when it waits.
        let mut held: Option<(u64, u64)> = None;
        for gap in gaps {
            let at = now + gap;
            if let Some((until, since)) = held.filter(|(until, _)| *until <= at) {
                clock.advance(Duration::from_millis(until - now));
                now = until;
                pace.take();
                deltas += 1;
                longest = longest.max(until - since);
                held = None;
            }
            clock.advance(Duration::from_millis(at - now));
            now = at;
            if held.is_none() {
                match pace.turn() {
                    None => deltas += 1,
                    Some(wait) => held = Some((now + wait.as_millis() as u64, now)),
                }
            }
        }
        (deltas, longest)
    }

    #[test]
    fn tokens_at_the_flush_pace_go_at_once_even_when_a_few_come_early() {
        // 200 tokens 50 ms apart on average, every other one 4 ms early.
        let gaps = (0..200).map(|i| if i % 2 == 0 { 46 } else { 54 });
        assert_eq!(paced(gaps), (200, 0));
        assert_eq!(paced(std::iter::repeat_n(50, 200)), (200, 0));
    }

    #[test]
    fn faster_tokens_are_coalesced_to_about_one_delta_per_flush() {
        // A token every 5 ms for one second: 200 tokens.
        let (deltas, longest) = paced(std::iter::repeat_n(5, 200));
        assert!((19..=22).contains(&deltas), "{deltas} deltas in 1 s at one per 50 ms");
        assert!(longest <= 50, "a token waited {longest} ms");
    }

    #[test]
    fn a_zero_flush_sends_every_token() {
        let pace = Pace::new(Duration::ZERO);
        assert!((0..100).all(|_| pace.turn().is_none()));
    }

    #[test]
    fn reply_ids_are_the_same_for_the_same_prompt_and_key_only() {
        let prompt = Uuid::now_v7().to_string();
        let key = ReplyIds::keyed(b"0123456789abcdef0123456789abcdef");
        let ids = key.of(&prompt);
        assert_eq!(ids.len(), 1, "nobody can take a keyed id first");
        assert_eq!(ReplyIds::keyed(b"0123456789abcdef0123456789abcdef").of(&prompt), ids, "every replica agrees");
        assert_ne!(key.of(&Uuid::now_v7().to_string()), ids);
        assert_ne!(ReplyIds::keyed(b"0123456789abcdef0123456789abcdeF").of(&prompt), ids);
        // Public ids (earlier releases' first) are others, each different.
        let public = ReplyIds::public().of(&prompt);
        assert_eq!(public[0], Uuid::new_v5(&REPLY_NAMESPACE, prompt.as_bytes()).to_string());
        assert_eq!(public.iter().collect::<HashSet<_>>().len(), REPLY_ID_CANDIDATES, "each a different id");
        assert_eq!(ReplyIds::public().of(&prompt), public);
        assert!(!public.contains(&ids[0]));
        assert_eq!(format!("{key:?}"), "ReplyIds(keyed)", "the namespace never reaches a log");
    }

    #[test]
    fn turns_of_one_role_in_a_row_are_one_turn_with_their_speakers_named() {
        use natter_llm::Role::{Assistant as A, User as U};
        let turn = |role, text: &str, name: Option<&str>| ChatMessage {
            role,
            content: text.into(),
            name: name.map(str::to_owned),
        };
        let merged = alternate([
            turn(U, "morning all", Some("ann")),
            turn(U, "@assistant what's the plan?", Some("bob")),
            turn(A, "Coffee first.", None),
            turn(A, "I can't help with that request.", None),
            turn(U, "and then?", Some("bob")),
            turn(U, "@assistant and after that?", Some("bob")),
        ]);
        assert_eq!(
            merged,
            [
                turn(U, "ann: morning all\n\nbob: @assistant what's the plan?", None),
                turn(A, "Coffee first.\n\nI can't help with that request.", None),
                turn(U, "and then?\n\n@assistant and after that?", Some("bob")),
            ]
        );
        // An assistant chat: no names, no labels.
        let plain = alternate([turn(U, "hi", None), turn(U, "hello?", None), turn(A, "Hi!", None)]);
        assert_eq!(plain, [turn(U, "hi\n\nhello?", None), turn(A, "Hi!", None)]);
        assert!(alternate([]).is_empty());
    }

    #[test]
    fn a_title_is_the_prompt_s_first_words() {
        assert_eq!(title_of("\n  How do   tides work?\nAnd why?").as_deref(), Some("How do tides work?"));
        let long = "word ".repeat(30);
        let title = title_of(&long).unwrap();
        assert!(title.ends_with('…') && title.chars().count() <= TITLE_CHARS + 1, "{title}");
        assert!(title.trim_end_matches('…').split(' ').all(|w| w == "word"), "whole words: {title}");
        let one = "x".repeat(200);
        assert_eq!(title_of(&one).unwrap().chars().count(), TITLE_CHARS + 1);
        assert_eq!(title_of(" \n\t"), None);
        let marked = "\u{2067}مرحبا\u{2069}\tworld\u{200B}!";
        assert_eq!(title_of(marked).as_deref(), Some("مرحبا world!"), "what a title may not hold is left out");
    }

    #[test]
    fn a_mention_is_the_username_as_a_word() {
        assert!(names("hey @assistant, what's up", "assistant"));
        assert!(names("@Assistant!", "assistant"));
        assert!(!names("mail me at x@assistant.example", "assistant"));
        assert!(!names("@assistants", "assistant"));
        assert!(!names("no mention", "assistant"));
    }

    #[test]
    fn a_mention_is_the_bot_s_id_among_the_mentions_or_its_name_in_the_text() {
        let (bot, other) = (Uuid::now_v7().to_string(), Uuid::now_v7().to_string());
        let message = |text: &str, mentioned: &[&String]| mpb::Message {
            text: text.into(),
            mention_user_ids: mentioned.iter().map(|u| u.to_string()).collect(),
            ..Default::default()
        };
        assert!(mentions(&message("what's up", &[&other, &bot]), &bot, "assistant"));
        assert!(mentions(&message("hey @assistant", &[]), &bot, "assistant"));
        assert!(!mentions(&message("hey @assistants", &[&other]), &bot, "assistant"));
    }
}
