//! The bus across replicas: core NATS between processes, a [`Hub`] within
//! each.
//!
//! Subjects are `natter.events.<chat|user|session>.<uuid>` and
//! `natter.events.presence` (and `natter.events.alive`, the processes'
//! liveness, below); payloads are the
//! bus's own wire form of an [`Event`](crate::Event) (`Event::to_wire`),
//! encoded once per publish by the publisher task. A publish goes to the local hub at
//! once and to NATS through one publisher task (so the process's events keep
//! their order); the connection is opened with `no_echo`, so a process never
//! receives its own events twice.
//!
//! Events are routed by interest ([`Routing::Interest`], the default): a
//! process subscribes to the subject of each topic its hub has subscribers
//! for, from the first subscriber on, and unsubscribes `LINGER` (1 s) after
//! the last one went (a stream that reconnects at once costs no UNSUB and
//! SUB), plus the subjects every process needs (`natter.events.presence`).
//! So a replica's bus traffic follows its own streams, not the whole
//! deployment's. The router task batches what changed (one task, the
//! changes queued meanwhile handled together). A subscription takes effect
//! only once the server has processed the SUB, and an event published
//! before that is not received (a stream with no later event would never
//! notice): after each batch of SUBs the router makes one round trip to the
//! server (a barrier: a request to `natter.caches.barrier.<uuid>`, answered
//! by the server's no-responders status once it has processed everything
//! sent before), then hints the new topics' subscribers to re-read the
//! store. The same round trip comes before the resync after a reconnect
//! (the client re-sends every SUB first). A round trip not answered within
//! `CONFIRM_TIMEOUT` (a slow server or network) hints all the same, and
//! its topics are hinted again once a later one (sent every second while
//! connected) is answered: an event published while the SUB was still on
//! its way was not received. [`Routing::Broadcast`] subscribes
//! to `natter.events.>` instead: every process receives every event, the
//! behaviour before interest routing, kept to measure against
//! (SCALING.md).
//!
//! Cache invalidations ([`EventBus::invalidate`]) go on
//! `natter.caches.invalidate` straight from the caller, which then waits for
//! a barrier (a request to `natter.caches.barrier.<uuid>`, answered by the
//! server's no-responders status after everything sent before it): when it
//! returns, the server has the invalidation. Every process applies them
//! from a subscription of its own, and a cache hit waits for the bus's sync
//! (a barrier of the receiving process, then a drain of that subscription;
//! see `natter_kit::cache`). The process's caches are off from a
//! disconnect, reconnect or slow-consumer notice until a barrier after it
//! confirms the re-sent subscriptions. The sync and that subscription last
//! until [`EventBus::close`], past the shutdown token: a stopping replica
//! still serves the calls it accepted, and their look-ups need answers;
//! after `close` a look-up asks the owning service.
//!
//! What a publisher loses: a publish only queues the event in the client,
//! which writes it to the socket later, so what sits in the client's or
//! the kernel's buffers, or went out on a connection that had died without
//! a word, is gone when the connection drops; the other replicas, whose own
//! connections never wavered, have nothing to resync on, and their streams
//! of that chat would hear of the change only at its next event. So the
//! publisher task keeps the topics it published to until a round trip on
//! the same connection (a barrier, once a second while it has any) proves
//! the server had them; when the client has reconnected since (its
//! `connects` count moved), it publishes a resync hint on each topic not
//! proven, and their subscribers re-read the store (a hint is no event:
//! exactly once still holds). On the presence topic only news of users
//! (renames) is kept, not beats, which the next heartbeat makes up for; its
//! hint is an event with neither beat nor payload, which the messages
//! service's presence takes as news lost (its streams send
//! `ephemeral_lost`). An event dropped before it reached the publisher
//! task (its queue, `PUBLISH_QUEUE`, full) is hinted the same way, as soon
//! as the task gets to it. So is an invalidation whose caller could not
//! confirm it (no barrier answer, or one on a later connection than its
//! publish): the publisher publishes its tags again at its next tick, on
//! the connection it has then (the new one after a reconnect), and keeps
//! them like topics until confirmed; applying an invalidation twice is
//! harmless. Past `KEPT_TAGS` such tags it publishes `INVALIDATE_ALL`
//! instead, which drops every entry of the other processes' caches (a
//! refill costs them at most what one `--cache-ttl` of expiries does); past
//! `KEPT_TOPICS` topics, it announces that it lost events (the liveness's
//! `Lost`, below), and every other process hints all its chat, user and
//! session topics.
//!
//! What a publisher loses without living to tell: a process that dies
//! (killed, out of memory, its host's power gone) after committing a change
//! but before NATS had its event cannot hint anything. So every process
//! announces itself on `natter.events.alive` once a second and tracks the
//! peers it hears (the `alive` module); a peer silent for three of its
//! intervals, or that says goodbye with events lost, makes every other
//! process of the deployment (its `--nats-subject-prefix`) hint all its
//! local topics once (its streams re-read the store and tell their clients
//! that ephemeral news may be lost), within about 4 s of the crash. A
//! silent peer is also told to the process's presence
//! (`Event::process_lost` on the presence topic, local only), whose
//! replica id is the bus's process id ([`EventBus::process`]): the dead
//! replica's users go offline after a grace (a replica only cut off comes
//! back within it), not after its missed presence heartbeats; and a
//! reconnect is told to it (`Event::rejoined`), which re-announces the
//! process's users at once. A clean goodbye is forgotten silently.
//!
//! At shutdown the publisher keeps going until [`EventBus::close`], not the
//! shutdown token: a stopping process publishes through its drain (up to
//! `--shutdown-grace`) and after it (its stores, its presence goodbye),
//! and calls `close` last, which sends what is queued and then waits for a
//! round trip to confirm what the publisher keeps (a reconnect meanwhile:
//! its hints and invalidations go out first), `CLOSE_GRACE` (5 s) at most
//! from its call, and then says goodbye (within another `GOODBYE_WAIT`,
//! 1 s). What is still queued or unconfirmed then may be lost: the goodbye
//! says so, and every other process hints all its topics; if the goodbye
//! is lost too (NATS could take nothing for those seconds), its peers miss
//! the process's announcements and do the same once they expire. Only an
//! invalidation lost so waits for `--cache-ttl`. An event published after
//! `close()` (a late publisher) reaches this process's streams only:
//! logged once, counted in `natter_bus_unsent_total`.
//!
//! Anyone who may publish on `natter.events.>` can forge events, so a shared
//! NATS server should require a log-in and grant that subject to natter's
//! user only (and `natter.caches.>`, the invalidations, barriers and the
//! request inbox `natter.caches.inbox`): natter logs in with a user and password ([`Credentials`]),
//! given as flags (the password in a file) or in the URL. The password never
//! reaches a log line: the URL is stripped of it before the client sees it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::{ConnectErrorKind, ServerAddr};
use futures::FutureExt as _;
use futures::StreamExt as _;
use natter_kit::cache::{Invalidator, Tag};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Event, EventBus, Hub, Interest, Shared, Subscription, Topic};

mod alive;
use alive::{Liveness, Say};

/// The first tokens of every NATS subject of one deployment
/// (`--nats-subject-prefix`, default `natter`): its events go on
/// `<prefix>.events.>`, its caches' invalidations, barriers and request
/// inbox on `<prefix>.caches.>`. Deployments (or test runs) sharing one
/// NATS server with different prefixes hear none of each other's events,
/// invalidations or liveness; with the same prefix they are one
/// deployment.
///
/// Valid: one or more dot-separated tokens, none empty, with no
/// whitespace (nor other control character) and no `*` or `>` (NATS
/// wildcards), none of them `events` or `caches` (so that no prefix nests
/// inside another deployment's subjects): `natter`, `staging.natter`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectPrefix(String);

impl SubjectPrefix {
    /// The default, under which every release before the flag published.
    pub const DEFAULT: &str = "natter";

    /// The prefix as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SubjectPrefix {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for SubjectPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SubjectPrefix {
    type Err = String;

    /// Errors: an empty token (an empty prefix, or a dot at either end or
    /// twice in a row), whitespace or another control character, a
    /// wildcard (`*`, `>`), or a token `events` or `caches` (the tokens
    /// natter puts after a prefix: with neither in any prefix, no
    /// deployment's subjects fall under another's `PREFIX.events.>` or
    /// `PREFIX.caches.>`, as `natter.events.x.events.chat.ID` would under
    /// the default's); the message says which token.
    fn from_str(prefix: &str) -> Result<Self, Self::Err> {
        for token in prefix.split('.') {
            if token.is_empty() {
                return Err(format!(
                    "{prefix:?} is no NATS subject prefix: dot-separated tokens, none empty (such as natter or \
                     staging.natter)"
                ));
            }
            if matches!(token, "events" | "caches") {
                return Err(format!(
                    "{prefix:?} is no NATS subject prefix: token {token:?} is one natter puts after the prefix \
                     (events, caches), so this deployment's subjects could fall under another's"
                ));
            }
            if let Some(c) = token.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '*' | '>')) {
                return Err(format!(
                    "{prefix:?} is no NATS subject prefix: token {token:?} holds {c:?} (no whitespace, and no \
                     wildcard * or >)"
                ));
            }
        }
        Ok(Self(prefix.to_owned()))
    }
}

/// Every subject of one deployment, derived from its [`SubjectPrefix`]
/// (the module docs name them with the default prefix).
#[derive(Debug)]
struct Subjects {
    /// `<prefix>.events`: the events' subjects are
    /// `<prefix>.events.<chat|user|session>.<uuid>` and
    /// `<prefix>.events.presence`.
    events: String,
    /// `<prefix>.events.alive`: the processes' liveness (`alive`).
    alive: String,
    /// `<prefix>.caches.invalidate`: cache invalidations
    /// ([`EventBus::invalidate`]); every process subscribes to it (on a
    /// subscription of its own, so a sync can drain it); the payload is the
    /// tags, [`Tag::encode`]d one after another, or [`INVALIDATE_ALL`].
    invalidate: String,
    /// `<prefix>.caches.barrier`, the prefix of the subjects of barrier
    /// requests: nobody subscribes to them, so the server answers each with
    /// its no-responders status, after it has processed everything the
    /// connection sent before.
    barrier: String,
    /// `<prefix>.caches.inbox`: the client's request inbox (the barriers'
    /// answers). Under the deployment's subjects, so the NATS user needs no
    /// `_INBOX.>` permission, and outside `<prefix>.events.>`, which a
    /// broadcast replica subscribes to (the server would hand a
    /// no-responders answer to that subscription, not the request's).
    inbox: String,
}

impl Subjects {
    fn new(prefix: &SubjectPrefix) -> Self {
        Self {
            events: format!("{prefix}.events"),
            alive: format!("{prefix}.events.alive"),
            invalidate: format!("{prefix}.caches.invalidate"),
            barrier: format!("{prefix}.caches.barrier"),
            inbox: format!("{prefix}.caches.inbox"),
        }
    }

    /// The subject of `topic`'s events.
    fn of(&self, topic: Topic) -> String {
        let events = &self.events;
        match topic {
            Topic::Chat(id) => format!("{events}.chat.{id}"),
            Topic::User(id) => format!("{events}.user.{id}"),
            Topic::Session(id) => format!("{events}.session.{id}"),
            Topic::Presence => format!("{events}.presence"),
        }
    }

    /// The topic whose events go on `subject`, if any.
    fn topic(&self, subject: &str) -> Option<Topic> {
        let rest = subject.strip_prefix(self.events.as_str())?.strip_prefix('.')?;
        if rest == "presence" {
            return Some(Topic::Presence);
        }
        let (kind, id) = rest.split_once('.')?;
        let id = Uuid::try_parse(id).ok()?;
        match kind {
            "chat" => Some(Topic::Chat(id)),
            "user" => Some(Topic::User(id)),
            "session" => Some(Topic::Session(id)),
            _ => None,
        }
    }

    /// The subjects every process subscribes to whatever streams it holds
    /// (with interest routing; broadcast takes [`Subjects::every_event`]
    /// instead).
    fn always(&self) -> Vec<String> {
        vec![self.of(Topic::Presence), self.alive.clone()]
    }

    /// `<prefix>.events.>`: every event of the deployment (broadcast).
    fn every_event(&self) -> String {
        format!("{}.>", self.events)
    }
}

/// The payload of an invalidation that drops every cached entry, in place
/// of tags (no tag encoding is one byte long): what a publisher announces
/// when it lost more invalidations than it keeps ([`KEPT_TAGS`]).
const INVALIDATE_ALL: &[u8] = &[0];

/// Most tags of unconfirmed invalidations the publisher keeps to announce
/// again (17 bytes each on the wire: one message of about 70 KB, far under
/// NATS's default 1 MiB payload limit); past it, it announces
/// [`INVALIDATE_ALL`] instead.
const KEPT_TAGS: usize = 4096;

/// Most topics the publisher keeps to hint (their events unconfirmed, or
/// dropped for a full queue); past it, it announces that it lost events on
/// the liveness subject instead, and every other process hints all its
/// topics (`alive`). 16 Ki topics: about 1.5 MB of hints after a reconnect,
/// a set of under 1 MB while kept; a replica publishing to more distinct
/// topics than that within a second of unconfirmed time has most of the
/// deployment's streams among its receivers anyway.
const KEPT_TOPICS: usize = 16 * 1024;

/// Longest wait for the server to confirm an invalidation, or the
/// subscriptions after a reconnect.
const BARRIER_WAIT: Duration = Duration::from_secs(2);

/// Least time between two barriers of the caches' return to live
/// (`keep_caches_live`) when one failed: a barrier refused at once (no
/// permission) is not sent again in a loop.
const BARRIER_RETRY: Duration = Duration::from_secs(1);

/// Longest wait for a cache hit's sync; past it the look-up asks the owning
/// service instead.
const SYNC_WAIT: Duration = Duration::from_millis(250);

/// The longest a router's round trip waits for the server's answer (longer
/// only while disconnected: the reconnect resyncs anyway); then the hints
/// go out after this.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a topic stays subscribed after its last local subscriber went:
/// a stream that reconnects within it (to this replica) costs no UNSUB, no
/// SUB and no resync hint.
const LINGER: Duration = Duration::from_secs(1);

/// Most interest changes the router takes in one batch (one round trip).
const ROUTER_BATCH: usize = 4096;

/// Which subjects a replica subscribes to (`--nats-routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Routing {
    /// Only the subjects of the topics this process has subscribers for
    /// (and presence): a replica receives the events of its own streams.
    #[default]
    Interest,
    /// Every event of the deployment (`natter.events.>`): the behaviour
    /// before interest routing, kept to measure against it.
    Broadcast,
}

/// How many events may wait for the publisher task before new ones are
/// dropped (the store has them; the publisher hints their topics instead).
const PUBLISH_QUEUE: usize = 16 * 1024;

/// First and longest pause between start-up attempts while the NATS server
/// cannot be reached (it may still be starting).
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The longest [`EventBus::close`] waits for the publisher to send what is
/// queued, from its call; the rest is dropped then.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What the publisher task is handed.
enum Outgoing {
    /// An event to publish.
    Event(Topic, Shared),
    /// Flush, answer, and stop.
    Close(tokio::sync::oneshot::Sender<()>),
}

/// Events over core NATS, fanned out locally by a [`Hub`].
pub struct NatsBus {
    hub: Arc<Hub>,
    outbox: mpsc::Sender<Outgoing>,
    /// Topics whose event found the outbox full: the publisher hints them.
    dropped: Arc<Dropped>,
    counts: Arc<Counts>,
    /// For invalidations, which are published and confirmed by the caller.
    client: async_nats::Client,
    /// The deployment's subjects (`--nats-subject-prefix`).
    subjects: Arc<Subjects>,
    /// The router's queue (interest routing), for [`EventBus::settled`].
    router: Option<mpsc::UnboundedSender<Interest>>,
    /// This process's announcements and the peers it heard (`alive`).
    liveness: Arc<Liveness>,
    /// Asks the liveness task for the goodbye, once, at [`EventBus::close`].
    goodbye: std::sync::Mutex<Option<Goodbye>>,
    /// Whether an event published after close was logged (once).
    told_unsent: AtomicBool,
    /// Cancelled by [`EventBus::close`] (or when the bus is dropped): ends
    /// the tasks a draining replica still needs after the shutdown token,
    /// the caches' sync and their invalidations.
    closed: CancellationToken,
    _close_on_drop: tokio_util::sync::DropGuard,
}

/// What to say at the goodbye, and whom to tell once it is written.
type Goodbye = oneshot::Sender<(Say, oneshot::Sender<()>)>;

/// What one bus received and holds (the process-wide metrics add up every
/// bus of the process; tests run several).
struct Counts {
    received: AtomicU64,
    /// Events the client took (not those dropped for a full queue, after
    /// close, or refused by a closed client; nor hints).
    published: AtomicU64,
    subscriptions: AtomicU64,
    /// Warnings of undecodable events (a replica of a newer release sends
    /// them with every beat or event): one a minute, with the count held
    /// back.
    undecodable: natter_kit::limits::Throttle,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            received: AtomicU64::default(),
            published: AtomicU64::default(),
            subscriptions: AtomicU64::default(),
            undecodable: natter_kit::limits::Throttle::new(std::time::Duration::from_secs(60)),
        }
    }
}

impl Counts {
    fn subscribed(&self, n: u64) {
        self.subscriptions.fetch_add(n, Ordering::Relaxed);
        natter_kit::metrics::bus_subscribed(n);
    }

    fn unsubscribed(&self, n: u64) {
        self.subscriptions.fetch_sub(n, Ordering::Relaxed);
        natter_kit::metrics::bus_unsubscribed(n);
    }
}

/// A NATS user and its password (the server's `authorization { users }`).
///
/// `Debug` shows the user only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The NATS user name.
    pub user: String,
    password: String,
}

impl Credentials {
    /// A user and its password.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self { user: user.into(), password: password.into() }
    }

    /// Reads the password from `path`: the whole file, without the line
    /// break at its end (a mounted Kubernetes Secret or a compose secret).
    ///
    /// Errors: the file cannot be read, holds no password, or holds the
    /// deploy files' placeholder in a Kubernetes pod
    /// (`natter_kit::config::check_secret`).
    pub fn from_password_file(user: impl Into<String>, path: PathBuf) -> Result<Self, ConnectError> {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ConnectError::PasswordFile { path: path.clone(), reason: e.to_string() })?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() {
            return Err(ConnectError::PasswordFile { path, reason: "the file is empty".into() });
        }
        natter_kit::config::check_secret("the NATS password (--nats-password-file)", password)
            .map_err(|e| ConnectError::PasswordFile { path, reason: e.to_string() })?;
        Ok(Self::new(user, password))
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).field("password", &"<redacted>").finish()
    }
}

/// Why the bus could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `--nats-url` is no NATS URL (`nats://host:4222`).
    #[error("invalid --nats-url: {0}")]
    Url(String),
    /// The credential options contradict each other or lack a part.
    #[error("{0}")]
    Options(&'static str),
    /// `--nats-password-file` cannot be read or is empty.
    #[error("cannot read --nats-password-file {}: {reason}", path.display())]
    PasswordFile {
        /// The file named by the flag.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The server refused the log-in: wrong or missing credentials.
    #[error("nats at {server} refused {}: {error} (check --nats-user and --nats-password-file)",
        user.as_deref().map_or_else(|| "a client without credentials".to_owned(), |u| format!("user {u}")))]
    Refused {
        /// The server's URL, without credentials.
        server: String,
        /// The user natter logged in as, if any.
        user: Option<String>,
        /// The client's error (shown in the message, so not a `source`).
        error: async_nats::ConnectError,
    },
    /// The connection was set up but subscribing failed.
    #[error("nats at {server}: cannot subscribe: {reason}")]
    Subscribe {
        /// The server's URL, without credentials.
        server: String,
        /// What went wrong.
        reason: String,
    },
    /// Shut down before the server could be reached.
    #[error("nats at {server}: shut down while waiting for the server")]
    ShutDown {
        /// The server's URL, without credentials.
        server: String,
    },
}

/// Splits a NATS URL (`nats://[user:password@]host[:port]`; the scheme may
/// be left out) into the server's address without credentials and the
/// credentials it carried (percent-decoded).
///
/// Errors: not a NATS URL, or a user without a password (token log-ins are
/// not supported).
pub fn split_url(url: &str) -> Result<(ServerAddr, Option<Credentials>), ConnectError> {
    let addr: ServerAddr = url.trim().parse().map_err(|e: std::io::Error| ConnectError::Url(e.to_string()))?;
    let user = addr.username().map(decode);
    let password = addr.password().map(decode);
    let mut bare = addr.into_inner();
    // Cannot fail for nats://, tls://, ws:// and wss:// URLs (they have a host).
    let _ = bare.set_password(None);
    let _ = bare.set_username("");
    let bare = ServerAddr::from_url(bare).map_err(|e| ConnectError::Url(e.to_string()))?;
    let credentials = match (user, password) {
        (None, None) => None,
        (Some(user), Some(password)) if !password.is_empty() => Some(Credentials::new(user, password)),
        _ => return Err(ConnectError::Url("a user needs a password (user:password@host)".into())),
    };
    Ok((bare, credentials))
}

/// `url` with any password replaced by `***`, for logs and `Debug`.
pub fn redact_url(url: &str) -> String {
    match split_url(url) {
        Ok((addr, Some(c))) => {
            let mut shown = addr.into_inner();
            let _ = shown.set_username(&c.user);
            let _ = shown.set_password(Some("***"));
            shown.to_string()
        }
        Ok((addr, None)) => addr.as_url_str().to_owned(),
        Err(_) if url.contains('@') => "<unparsable URL with credentials>".to_owned(),
        Err(_) => url.to_owned(),
    }
}

fn decode(part: &str) -> String {
    percent_encoding::percent_decode_str(part).decode_utf8_lossy().into_owned()
}

/// Waits until the NATS server has processed everything `client` sent
/// before: a request to a subject nobody subscribes to, which the server
/// answers with its no-responders status in order (so every message the
/// server had for this client by then has arrived before the answer).
/// False when it could not tell within `wait` (disconnected, no
/// permission).
async fn barrier(client: &async_nats::Client, subjects: &Subjects, wait: Duration) -> bool {
    let subject = format!("{}.{}", subjects.barrier, Uuid::now_v7());
    match tokio::time::timeout(wait, client.request(subject, bytes::Bytes::new())).await {
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => true,
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "nats: barrier request failed");
            false
        }
        Err(_) => {
            tracing::warn!(?wait, "nats: barrier request not answered");
            false
        }
    }
}

/// Makes the caches live again after each (re)connection or slow-consumer
/// notice in `events`, once the server has confirmed the subscriptions the
/// client re-sent (so no invalidation published from then on is missed).
///
/// Until then they stay off, however long it takes: a barrier not answered
/// within [`BARRIER_WAIT`] (a slow server or network just after a
/// reconnect, the SUBs still on their way) is sent again, at most once per
/// [`BARRIER_RETRY`], while the client stays connected; a barrier answered
/// on a later connection than it was sent on proves nothing, and that
/// connection's own notice starts over. Caches that went live on an
/// unconfirmed subscription would miss the invalidations the server routed
/// before it took the SUB, and answer them until `--cache-ttl`. Ends with
/// `closed` (the bus's `close()`, after which look-ups ask the owning
/// services) or when the client's events end.
async fn keep_caches_live(
    client: async_nats::Client,
    subjects: Arc<Subjects>,
    invalidator: Arc<Invalidator>,
    mut events: mpsc::UnboundedReceiver<()>,
    closed: CancellationToken,
) {
    let connects = || client.statistics().connects.load(Ordering::SeqCst);
    let connected = || client.connection_state() == async_nats::connection::State::Connected;
    'notices: loop {
        tokio::select! {
            () = closed.cancelled() => return,
            notice = events.recv() => if notice.is_none() { return },
        }
        // Whether this notice's wait was logged (once; each barrier that
        // fails logs too).
        let mut told = false;
        loop {
            // Several notices at once need one barrier.
            while events.try_recv().is_ok() {}
            let (sent, connection) = (Instant::now(), connects());
            let confirmed = tokio::select! {
                () = closed.cancelled() => return,
                confirmed = barrier(&client, &subjects, BARRIER_WAIT) => confirmed,
            };
            if !connected() {
                // Off until the reconnect's notice.
                continue 'notices;
            }
            if confirmed && connects() == connection {
                invalidator.set_live(true);
                continue 'notices;
            }
            if !std::mem::replace(&mut told, true) {
                tracing::warn!("nats: caches stay off until the server confirms the subscriptions; asking again");
            }
            tokio::select! {
                () = closed.cancelled() => return,
                () = tokio::time::sleep_until(sent + BARRIER_RETRY) => {}
                // A new connection or notice: the loop's next barrier
                // covers it.
                notice = events.recv() => if notice.is_none() { return },
            }
        }
    }
}

/// Applies the invalidations other processes publish, in order; on a drain
/// request, first applies every one already received (without waiting for
/// more), then answers. Runs until `closed` (the bus's `close()`), not the
/// shutdown token: the calls a stopping replica still serves look up its
/// caches.
async fn apply_invalidations(
    mut invalidations: async_nats::Subscriber,
    invalidator: Arc<Invalidator>,
    mut drains: mpsc::Receiver<oneshot::Sender<()>>,
    closed: CancellationToken,
) {
    let apply = |message: async_nats::Message| {
        natter_kit::metrics::bus_received(1);
        if message.payload.as_ref() == INVALIDATE_ALL {
            return invalidator.invalidate_all();
        }
        match Tag::decode_all(&message.payload) {
            Some(tags) => invalidator.invalidate(&tags),
            None => tracing::warn!("nats: undecodable invalidation"),
        }
    };
    loop {
        tokio::select! {
            () = closed.cancelled() => break,
            next = invalidations.next() => match next {
                Some(message) => apply(message),
                None => break,
            },
            Some(done) = drains.recv() => {
                while let Some(Some(message)) = invalidations.next().now_or_never() {
                    apply(message);
                }
                let _ = done.send(());
            }
        }
    }
}

/// The bus's sync ([`Invalidator::set_sync`]): rounds of a barrier and a
/// drain of the invalidations received by then, one at a time; a caller
/// waits for the first round that started after it asked, so concurrent
/// cache hits share one round trip.
struct Syncer {
    /// Callers so far (each takes the next number).
    asked: AtomicU64,
    wake: Notify,
    /// The last finished round: the highest caller number it covers, and
    /// whether it was confirmed. Only the rounds' task holds the sender, so
    /// once the rounds end every caller waiting or still to come gets
    /// false (and asks the owning service) instead of waiting for ever.
    done: watch::Receiver<(u64, bool)>,
}

impl Syncer {
    /// Starts the rounds over `client`, draining through `drains`, until
    /// `closed` (the bus's `close()`); the returned function is the sync.
    fn start(
        client: async_nats::Client,
        subjects: Arc<Subjects>,
        drains: mpsc::Sender<oneshot::Sender<()>>,
        closed: CancellationToken,
    ) -> natter_kit::cache::SyncFn {
        let (finished, done) = watch::channel((0, true));
        let syncer = Arc::new(Syncer { asked: AtomicU64::new(0), wake: Notify::new(), done });
        let rounds = syncer.clone();
        tokio::spawn(async move {
            let mut covered = 0;
            loop {
                tokio::select! {
                    // Closed: no more rounds, even for callers waiting.
                    biased;
                    () = closed.cancelled() => break,
                    () = rounds.wake.notified() => {}
                }
                let target = rounds.asked.load(Ordering::SeqCst);
                if target <= covered {
                    continue;
                }
                let confirmed = barrier(&client, &subjects, SYNC_WAIT).await && {
                    let (done, drained) = oneshot::channel();
                    drains.send(done).await.is_ok() && drained.await.is_ok()
                };
                covered = target;
                finished.send_replace((target, confirmed));
            }
        });
        Box::new(move || {
            let syncer = syncer.clone();
            Box::pin(async move {
                let mut done = syncer.done.clone();
                let mine = syncer.asked.fetch_add(1, Ordering::SeqCst) + 1;
                syncer.wake.notify_one();
                loop {
                    let (covered, confirmed) = *done.borrow_and_update();
                    if covered >= mine {
                        return confirmed;
                    }
                    if done.changed().await.is_err() {
                        return false;
                    }
                }
            })
        })
    }
}

impl NatsBus {
    /// Connects to NATS at `url` as `credentials` (or as the user and
    /// password in `url`), on the subjects under `prefix`
    /// ([`SubjectPrefix`]: the deployment's), and starts the publisher, subscriber and (with
    /// [`Routing::Interest`]) router tasks. The subscriber and router end
    /// when `shutdown` is cancelled; the publisher, the caches' sync and
    /// their invalidations go on until [`EventBus::close`], for what the
    /// replica still serves and publishes while it drains and after.
    ///
    /// While the server cannot be reached, start-up waits for it (retrying
    /// with a growing pause, logged); a refused log-in ends it at once.
    ///
    /// Errors: `url` is malformed, credentials are given both in `url` and
    /// as `credentials`, the server refuses the log-in, subscribing fails,
    /// or `shutdown` fires first. Later disconnects are retried by the
    /// client and answered with a resync.
    pub async fn connect(
        url: &str,
        credentials: Option<Credentials>,
        routing: Routing,
        prefix: &SubjectPrefix,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, ConnectError> {
        let (addr, in_url) = split_url(url)?;
        let subjects = Arc::new(Subjects::new(prefix));
        let credentials = match (credentials, in_url) {
            (Some(_), Some(_)) => {
                return Err(ConnectError::Options(
                    "nats credentials given twice: in --nats-url and as --nats-user/--nats-password-file",
                ));
            }
            (given, in_url) => given.or(in_url),
        };
        let server = addr.as_url_str().to_owned();
        let user = credentials.as_ref().map(|c| c.user.clone());
        let (router, changes) = mpsc::unbounded_channel();
        // Caches stay off until the invalidation subscription is confirmed.
        let (hub, reconnected, router) = match routing {
            Routing::Interest => (Hub::with_interest(router.clone()), Some(Arc::new(Notify::new())), Some(router)),
            Routing::Broadcast => (Hub::new(), None, None),
        };
        let hub = Arc::new(hub.with_invalidator(Invalidator::new(false)));
        let (caches_back, caches_notices) = mpsc::unbounded_channel();
        let publisher_wake = Arc::new(Notify::new());
        let wakes = Wakes { router: reconnected.clone(), publisher: publisher_wake.clone() };
        let client =
            Self::first_connection(&addr, credentials.as_ref(), &subjects, &hub, &wakes, &caches_back, &shutdown)
                .await?;
        tracing::info!(%server, user = user.as_deref().unwrap_or("-"), ?routing, subject_prefix = %prefix, "nats: connected");
        let counts = Arc::new(Counts::default());
        let always = match routing {
            Routing::Interest => subjects.always(),
            Routing::Broadcast => vec![subjects.every_event()],
        };
        let mut subscribers = Vec::with_capacity(always.len());
        for subject in always {
            match client.subscribe(subject.clone()).await {
                Ok(s) => subscribers.push(s),
                Err(e) => return Err(ConnectError::Subscribe { server, reason: format!("{subject}: {e}") }),
            }
        }
        let invalidations = match client.subscribe(subjects.invalidate.clone()).await {
            Ok(s) => s,
            Err(e) => {
                return Err(ConnectError::Subscribe { server, reason: format!("{}: {e}", subjects.invalidate) });
            }
        };
        counts.subscribed(subscribers.len() as u64 + 1);
        let closed = CancellationToken::new();
        // The first connection's notice is queued already: the caches go
        // live once the server confirms the subscriptions.
        tokio::spawn(keep_caches_live(
            client.clone(),
            subjects.clone(),
            hub.invalidator().clone(),
            caches_notices,
            closed.clone(),
        ));
        let (drains, drain_requests) = mpsc::channel(16);
        tokio::spawn(apply_invalidations(invalidations, hub.invalidator().clone(), drain_requests, closed.clone()));
        hub.invalidator().set_sync(Syncer::start(client.clone(), subjects.clone(), drains, closed.clone()));
        match routing {
            // In effect before serving: no presence beat is missed.
            Routing::Interest => {
                round_trip(&client, &subjects).await;
            }
            // Sent before serving. (async-nats 0.51's flush only writes it
            // to the socket; an event published while the server is still
            // processing it is missed, like any lost announcement. No round
            // trip here: every other broadcast replica would receive the
            // request, so none would answer.)
            Routing::Broadcast => {
                if let Err(e) = client.flush().await {
                    tracing::warn!(error = %e, "nats: flush after subscribe failed");
                }
            }
        }
        let (outbox, queue) = mpsc::channel::<Outgoing>(PUBLISH_QUEUE);
        let dropped = Arc::new(Dropped::default());
        let liveness = Arc::new(Liveness::new(subjects.alive.clone()));
        // Until close() (its Close, or its grace over) or the bus dropped:
        // not the shutdown token, which the drain and what follows it
        // outlast.
        let publisher =
            Publisher::new(client.clone(), subjects.clone(), dropped.clone(), liveness.clone(), counts.clone());
        tokio::spawn(publisher.run(queue, publisher_wake, closed.clone()));
        // Announces until the goodbye (or the bus dropped); hears and
        // expires peers until the shutdown token, as the subscriber.
        let (goodbye, said) = oneshot::channel();
        tokio::spawn(liveness.clone().run(client.clone(), hub.clone(), said, shutdown.clone(), closed.clone()));

        if let Some(reconnected) = reconnected {
            let router = Router {
                client: client.clone(),
                subjects: subjects.clone(),
                hub: hub.clone(),
                counts: counts.clone(),
                subscribed: HashMap::new(),
                lingering: VecDeque::new(),
                unconfirmed: HashSet::new(),
                retry_at: None,
            };
            tokio::spawn(router.run(changes, reconnected, shutdown.clone()));
        }

        let local = hub.clone();
        let received = counts.clone();
        let peers = liveness.clone();
        let on_subjects = subjects.clone();
        tokio::spawn(async move {
            let mut subscriber = futures::stream::select_all(subscribers);
            loop {
                let message = tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = subscriber.next() => match next { Some(m) => m, None => break },
                };
                // Not an event (nor counted as one): a peer's liveness.
                if message.subject.as_str() == on_subjects.alive {
                    peers.heard(&local, message.payload);
                    continue;
                }
                deliver(&local, &on_subjects, &received, message);
            }
            for mut subscriber in subscriber {
                let _ = subscriber.unsubscribe().await;
            }
        });

        let _close_on_drop = closed.clone().drop_guard();
        Ok(Arc::new(Self {
            hub,
            outbox,
            dropped,
            counts,
            client,
            subjects,
            router,
            liveness,
            goodbye: std::sync::Mutex::new(Some(goodbye)),
            told_unsent: AtomicBool::new(false),
            closed,
            _close_on_drop,
        }))
    }

    /// Events this bus received from NATS so far (for tests and
    /// measurements; the process-wide total is `natter_bus_received_total`).
    pub fn received(&self) -> u64 {
        self.counts.received.load(Ordering::Relaxed)
    }

    /// Events this bus's publisher handed to NATS so far: not those dropped
    /// (a full publish queue, after close), nor the hints it sent for them
    /// (for tests and measurements; the process-wide total is
    /// `natter_bus_published_total`).
    pub fn published(&self) -> u64 {
        self.counts.published.load(Ordering::Relaxed)
    }

    /// NATS subscriptions this bus holds now (for tests; the process-wide
    /// figure is `natter_bus_subscriptions`).
    pub fn subscriptions(&self) -> u64 {
        self.counts.subscriptions.load(Ordering::Relaxed)
    }

    /// Other processes on the bus this one has heard announce themselves
    /// and not yet lost or heard say goodbye (for tests).
    pub fn peers(&self) -> usize {
        self.liveness.peers()
    }

    /// Checks for peers fallen silent this bus has made so far, about one a
    /// second while connected and until the shutdown token (for tests: a
    /// peer still heard would be lost by the fifth after its last word).
    pub fn peer_checks(&self) -> u64 {
        self.liveness.checks()
    }

    /// Opens the client's first connection: retried while the server cannot
    /// be reached, given up when it refuses the log-in (async-nats's own
    /// `retry_on_initial_connect` would retry a refused log-in for ever).
    async fn first_connection(
        addr: &ServerAddr,
        credentials: Option<&Credentials>,
        subjects: &Subjects,
        hub: &Arc<Hub>,
        wakes: &Wakes,
        caches_back: &mpsc::UnboundedSender<()>,
        shutdown: &CancellationToken,
    ) -> Result<async_nats::Client, ConnectError> {
        let server = addr.as_url_str().to_owned();
        let mut pause = RETRY_FIRST;
        loop {
            let mut options =
                async_nats::ConnectOptions::new().no_echo().name("natter").custom_inbox_prefix(subjects.inbox.clone());
            if let Some(c) = credentials {
                options = options.user_and_password(c.user.clone(), c.password.clone());
            }
            let on_event = hub.clone();
            let on_connected = wakes.clone();
            let stopping = shutdown.clone();
            let caches_back = caches_back.clone();
            let options = options.event_callback(move |event| {
                let hub = on_event.clone();
                let wakes = on_connected.clone();
                let stopping = stopping.clone();
                let caches_back = caches_back.clone();
                async move {
                    // Invalidations may be missed while away or dropped for
                    // a slow consumer: caches are off (and cleared) until a
                    // barrier confirms the re-sent subscriptions.
                    if matches!(
                        event,
                        async_nats::Event::Connected
                            | async_nats::Event::SlowConsumer(_)
                            | async_nats::Event::Disconnected
                    ) {
                        hub.invalidator().set_live(false);
                        if !matches!(event, async_nats::Event::Disconnected) {
                            let _ = caches_back.send(());
                        }
                    }
                    match event {
                        // Announcements may have been lost while away: re-read
                        // the store once the server has the re-sent SUBs (the
                        // router's round trip), or at once (broadcast).
                        // And what this process published may not have
                        // reached the server: its publisher hints those
                        // topics' subscribers on the other replicas.
                        // And the presence re-announces this process's
                        // users and asks for the peers' (its peers may
                        // have taken it as dead meanwhile; on the first
                        // connection it has no presence yet).
                        async_nats::Event::Connected => {
                            tracing::info!(%event, "nats: resync streams from the store");
                            hub.fan_out(Topic::Presence, Arc::new(Event::rejoined()));
                            wakes.publisher.notify_one();
                            match wakes.router {
                                Some(router) => router.notify_one(),
                                None => hub.resync(),
                            }
                        }
                        // Dropped for a slow consumer: re-read the store.
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::info!(%event, "nats: resync streams from the store");
                            hub.resync();
                        }
                        // The connection closed because the process is
                        // shutting down: expected, not a warning.
                        async_nats::Event::Closed if stopping.is_cancelled() => tracing::info!(%event, "nats"),
                        other => tracing::warn!(event = %other, "nats"),
                    }
                }
            });
            let error = tokio::select! {
                () = shutdown.cancelled() => return Err(ConnectError::ShutDown { server }),
                result = options.connect(addr.clone()) => match result {
                    Ok(client) => return Ok(client),
                    Err(e) => e,
                },
            };
            if matches!(error.kind(), ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication) {
                let user = credentials.map(|c| c.user.clone());
                return Err(ConnectError::Refused { server, user, error });
            }
            tracing::warn!(%server, %error, retry_in = ?pause, "nats: cannot connect yet");
            tokio::select! {
                () = shutdown.cancelled() => return Err(ConnectError::ShutDown { server }),
                () = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(RETRY_MAX);
        }
    }
}

/// The payload of an invalidation of `tags` (their [`Tag::encode`]s one
/// after another).
fn invalidation<'a>(tags: impl ExactSizeIterator<Item = &'a Tag>) -> bytes::Bytes {
    let mut payload = Vec::with_capacity(tags.len() * Tag::WIRE_LEN);
    tags.for_each(|t| t.encode(&mut payload));
    payload.into()
}

/// Hands a message from NATS to the local subscribers of its topic.
fn deliver(hub: &Hub, subjects: &Subjects, counts: &Counts, message: async_nats::Message) {
    natter_kit::metrics::bus_received(1);
    counts.received.fetch_add(1, Ordering::Relaxed);
    let Some(topic) = subjects.topic(message.subject.as_str()) else { return };
    match Event::from_wire(message.payload) {
        Ok(event) => hub.fan_out(topic, Arc::new(event)),
        Err(e) => {
            if let Some(held) = counts.undecodable.admit() {
                tracing::warn!(subject = %message.subject, error = %e, since_last_warning = held, "nats: undecodable event");
            }
        }
    }
}

/// Returns once the server has processed everything `client` sent before
/// (its SUBs), true, or after [`CONFIRM_TIMEOUT`], false: a [`barrier`].
/// (async-nats 0.51's `flush` only writes to the socket.)
async fn round_trip(client: &async_nats::Client, subjects: &Subjects) -> bool {
    let confirmed = barrier(client, subjects, CONFIRM_TIMEOUT).await;
    if !confirmed {
        tracing::debug!("nats: round trip unconfirmed; resync hints go out anyway, and again once one is");
    }
    confirmed
}

/// Whom the connection's events wake: the router (interest routing) to
/// hint its subscribers after a reconnect, the publisher to hint the other
/// replicas' subscribers of what it may have lost.
#[derive(Clone)]
struct Wakes {
    router: Option<Arc<Notify>>,
    publisher: Arc<Notify>,
}

/// The publisher task: sends the process's events to NATS in order, and
/// makes sure the other replicas' subscribers hear of every topic whose
/// event may have been lost on the way (module docs, "What a publisher
/// loses").
///
/// A publish only hands the event to the client, which writes it to the
/// socket later: what sits in its write buffer, or in the kernel's, or on a
/// connection that died without a word, is gone when the connection drops,
/// and the replicas it was for would learn of the change only at the chat's
/// next event. So the publisher keeps the topics it published to until a
/// round trip on the same connection (a [`barrier`], every
/// [`CONFIRM_EVERY`] while there are any) proves the server had them; when
/// the client has reconnected since, it publishes a resync hint for each
/// topic not proven (the receivers re-read the store, which has every
/// change: exactly once still, as for any hint). Cache invalidations its
/// callers could not confirm ([`EventBus::invalidate`]) it publishes again,
/// and keeps the same way.
struct Publisher {
    client: async_nats::Client,
    subjects: Arc<Subjects>,
    counts: Arc<Counts>,
    /// Whose `Lost` it announces past [`KEPT_TOPICS`].
    liveness: Arc<Liveness>,
    /// Topics whose event never reached this task (the outbox was full),
    /// and invalidations their callers could not confirm.
    dropped: Arc<Dropped>,
    /// The client's connections so far (`Statistics::connects`) when the
    /// topics below were published: a reconnect since means they may be
    /// lost.
    epoch: u64,
    /// Topics (and invalidations) published since the last round trip was
    /// sent.
    unconfirmed: Kept,
    /// Those published before the round trip in flight, which its answer
    /// confirms (if it comes on the same connection).
    confirming: Kept,
}

/// What the other replicas may not have heard of: the topics to hint, and
/// the cache invalidations to announce again.
#[derive(Default)]
struct Kept {
    /// At most about [`KEPT_TOPICS`] (then `all_topics` instead, and the
    /// presence topic only).
    topics: HashSet<Topic>,
    /// Too many topics to name: every other process hints all of its
    /// (the liveness's `Lost`).
    all_topics: bool,
    /// Tags of invalidations, at most about [`KEPT_TAGS`] (then
    /// `all_caches` instead).
    tags: HashSet<Tag>,
    /// Too many invalidations to name: every cached entry must go.
    all_caches: bool,
}

impl Kept {
    fn is_empty(&self) -> bool {
        self.topics.is_empty() && !self.all_topics && self.tags.is_empty() && !self.all_caches
    }

    /// Keeps `topic` to hint, or, past [`KEPT_TOPICS`], all of them. The
    /// presence topic is kept by name even then: a resync of every topic
    /// leaves it out (news of users is no store read), and its hint tells
    /// streams the news was lost.
    fn add_topic(&mut self, topic: Topic) {
        if self.all_topics && topic != Topic::Presence {
            return;
        }
        self.topics.insert(topic);
        if self.topics.len() > KEPT_TOPICS {
            self.all_topics = true;
            self.topics.retain(|t| *t == Topic::Presence);
        }
    }

    fn add_tags(&mut self, tags: impl IntoIterator<Item = Tag>) {
        if self.all_caches {
            return;
        }
        self.tags.extend(tags);
        if self.tags.len() > KEPT_TAGS {
            self.tags = HashSet::new();
            self.all_caches = true;
        }
    }

    /// Adds what `other` keeps.
    fn absorb(&mut self, other: Kept) {
        if other.all_topics {
            self.all_topics = true;
            self.topics.retain(|t| *t == Topic::Presence);
        }
        for topic in other.topics {
            self.add_topic(topic);
        }
        if other.all_caches {
            self.tags = HashSet::new();
            self.all_caches = true;
        }
        self.add_tags(other.tags);
    }
}

/// What never reached the publisher task or the server by the way it was
/// sent, for the publisher to announce once it gets to it: topics whose
/// event [`EventBus::publish`] dropped because the outbox was full (NATS
/// slower than the process publishes, or away for long), and invalidations
/// whose caller could not confirm that the server had them.
#[derive(Default)]
struct Dropped {
    /// Whether `kept` may hold any: one load per event when none does.
    any: AtomicBool,
    kept: std::sync::Mutex<Kept>,
}

impl Dropped {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, topic: Topic) {
        self.kept().add_topic(topic);
        self.any.store(true, Ordering::Release);
    }

    fn add_tags(&self, tags: &[Tag]) {
        self.kept().add_tags(tags.iter().copied());
        self.any.store(true, Ordering::Release);
    }

    /// What was added so far, taken (empty at the cost of one load when
    /// nothing was).
    fn take(&self) -> Kept {
        if !self.any.swap(false, Ordering::Acquire) {
            return Kept::default();
        }
        std::mem::take(&mut *self.kept())
    }
}

/// How often the publisher confirms with a round trip that the server has
/// what it published (when it published anything since the last one).
const CONFIRM_EVERY: Duration = Duration::from_secs(1);

impl Publisher {
    fn new(
        client: async_nats::Client,
        subjects: Arc<Subjects>,
        dropped: Arc<Dropped>,
        liveness: Arc<Liveness>,
        counts: Arc<Counts>,
    ) -> Self {
        let epoch = client.statistics().connects.load(Ordering::SeqCst);
        Self {
            client,
            subjects,
            counts,
            liveness,
            dropped,
            epoch,
            unconfirmed: Kept::default(),
            confirming: Kept::default(),
        }
    }

    /// Publishes what it is handed until a `Close` (settled, flushed, then
    /// answered), the outbox closing, or `closed`; confirms and hints on
    /// every tick of [`CONFIRM_EVERY`] and each time `wake` says the client
    /// reconnected.
    async fn run(mut self, mut queue: mpsc::Receiver<Outgoing>, wake: Arc<Notify>, closed: CancellationToken) {
        let mut closing = None;
        let mut tick = tokio::time::interval(CONFIRM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The answer of the round trip in flight, and the epoch it was sent in.
        let mut in_flight: Option<oneshot::Receiver<(bool, u64)>> = None;
        loop {
            tokio::select! {
                biased;
                () = closed.cancelled() => break,
                next = queue.recv() => match next {
                    Some(Outgoing::Event(topic, event)) => {
                        self.catch_up().await;
                        self.publish(topic, &event).await;
                        self.announce_dropped().await;
                    }
                    Some(Outgoing::Close(done)) => {
                        closing = Some(done);
                        // What was queued behind the Close (a publish racing
                        // close()) goes out too, confirmed with the rest;
                        // a publish from now on finds the queue closed.
                        queue.close();
                        while let Some(next) = queue.recv().await {
                            match next {
                                Outgoing::Event(topic, event) => self.publish(topic, &event).await,
                                // A second close(): dropping its answer
                                // lets it go on at once.
                                Outgoing::Close(_) => {}
                            }
                        }
                        break;
                    }
                    None => break,
                },
                answer = async { in_flight.as_mut().expect("guarded").await }, if in_flight.is_some() => {
                    in_flight = None;
                    let (confirmed, sent_in) = answer.unwrap_or((false, 0));
                    self.confirmed(confirmed, sent_in);
                    self.catch_up().await;
                }
                () = wake.notified() => self.catch_up().await,
                _ = tick.tick() => {
                    self.catch_up().await;
                    self.announce_dropped().await;
                    // Not while known to be away: it could not be answered
                    // (and would log so every few seconds).
                    let connected = self.client.connection_state() == async_nats::connection::State::Connected;
                    if in_flight.is_none() && !self.unconfirmed.is_empty() && connected {
                        in_flight = Some(self.confirm());
                    }
                }
            }
        }
        if closing.is_some() {
            tokio::select! {
                () = self.settle(&wake) => {}
                () = closed.cancelled() => {}
            }
        }
        tokio::select! {
            _ = self.client.flush() => {}
            () = closed.cancelled() => {}
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    /// At close, until a round trip confirms every topic and invalidation
    /// kept: hints and sends again what a reconnect lost and what the
    /// outbox dropped, waits for the client while it knows it is away, and
    /// starts over when it reconnects. The caller bounds it by `close()`'s
    /// grace; on a sound connection it costs one round trip.
    async fn settle(&mut self, wake: &Notify) {
        // After a round trip that failed on the same connection (refused
        // at once: no permission), the next is sent CONFIRM_EVERY after it,
        // as while running.
        let mut retry_at = None;
        loop {
            self.catch_up().await;
            self.announce_dropped().await;
            if self.unconfirmed.is_empty() && self.confirming.is_empty() {
                return;
            }
            if self.client.connection_state() != async_nats::connection::State::Connected {
                // Its reconnect notifies (a permit kept if it came first).
                wake.notified().await;
                continue;
            }
            if let Some(at) = retry_at.take() {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => continue,
                }
            }
            // Covers what a round trip still in flight from the main loop
            // covered (sent after it).
            let (sent, answer) = (Instant::now(), self.confirm());
            tokio::select! {
                answer = answer => {
                    let (confirmed, sent_in) = answer.unwrap_or((false, 0));
                    self.confirmed(confirmed, sent_in);
                    retry_at = (!confirmed).then_some(sent + CONFIRM_EVERY);
                }
                // Reconnected: that answer can confirm nothing now.
                () = wake.notified() => {}
            }
        }
    }

    /// Publishes an event handed to the bus, counted once the client took
    /// it.
    async fn publish(&mut self, topic: Topic, event: &Event) {
        // A presence beat lost is made up for by the next heartbeat
        // (module docs).
        let kept = topic != Topic::Presence || event.beat.is_none();
        if self.send(topic, event.to_wire(), kept).await {
            self.counts.published.fetch_add(1, Ordering::Relaxed);
            natter_kit::metrics::bus_published(1);
        }
    }

    /// Publishes `payload` on `topic`'s subject and, if `kept`, keeps the
    /// topic until a round trip confirms it; whether the client took it.
    async fn send(&mut self, topic: Topic, payload: bytes::Bytes, kept: bool) -> bool {
        if kept {
            self.unconfirmed.add_topic(topic);
        }
        match self.client.publish(self.subjects.of(topic), payload).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "nats: publish failed (streams will refill from the store)");
                false
            }
        }
    }

    /// Sends a round trip that confirms the topics published so far, which
    /// move to `confirming`; returns its answer: whether the server
    /// answered, and the epoch it was sent in.
    fn confirm(&mut self) -> oneshot::Receiver<(bool, u64)> {
        self.confirming.absorb(std::mem::take(&mut self.unconfirmed));
        let (done, answer) = oneshot::channel();
        let (client, subjects, sent_in) = (self.client.clone(), self.subjects.clone(), self.epoch);
        // Spawned once every publish before it is in the client's queue, so
        // its request goes after them.
        tokio::spawn(async move {
            let _ = done.send((barrier(&client, &subjects, CONFIRM_TIMEOUT).await, sent_in));
        });
        answer
    }

    /// The round trip sent in epoch `sent_in` was answered (`confirmed`) or
    /// not: the topics it covered are proven delivered only if it was and
    /// the client has not reconnected since; otherwise they wait for the
    /// next one (or a hint).
    fn confirmed(&mut self, confirmed: bool, sent_in: u64) {
        if confirmed && sent_in == self.epoch && self.connects() == sent_in {
            self.confirming = Kept::default();
        } else {
            self.unconfirmed.absorb(std::mem::take(&mut self.confirming));
        }
    }

    fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::SeqCst)
    }

    /// Publishes a resync hint on `topic` (on the presence topic, an event
    /// with neither beat nor payload), kept like any event until confirmed.
    async fn hint(&mut self, topic: Topic) {
        let hint = Event::resync_hint(topic).unwrap_or_default();
        if self.send(topic, hint.to_wire(), true).await {
            natter_kit::metrics::bus_resent(1);
        }
    }

    /// Announces on the liveness subject that this process lost events on
    /// more topics than it keeps: every other process hints all its
    /// topics. Kept like any event until confirmed.
    async fn lost_all(&mut self) {
        self.unconfirmed.all_topics = true;
        self.unconfirmed.topics.retain(|t| *t == Topic::Presence);
        match self.client.publish(self.subjects.alive.clone(), self.liveness.payload(Say::Lost)).await {
            Ok(()) => natter_kit::metrics::bus_resent(1),
            Err(e) => tracing::warn!(error = %e, "nats: announcing lost events failed (kept for the next try)"),
        }
    }

    /// Publishes again the invalidations of `tags`, or one of every cached
    /// entry (`all`), kept like any event until confirmed: the other
    /// replicas drop those entries (again, if the first one arrived).
    async fn invalidate_again(&mut self, tags: HashSet<Tag>, all: bool) {
        let payload = if all {
            bytes::Bytes::from_static(INVALIDATE_ALL)
        } else if tags.is_empty() {
            return;
        } else {
            invalidation(tags.iter())
        };
        self.unconfirmed.absorb(Kept { tags, all_caches: all, ..Kept::default() });
        match self.client.publish(self.subjects.invalidate.clone(), payload).await {
            Ok(()) => natter_kit::metrics::bus_resent(1),
            Err(e) => {
                tracing::warn!(error = %e, "nats: publishing an invalidation again failed (kept for the next try)");
            }
        }
    }

    /// Hints each topic of `lost` (or, past [`KEPT_TOPICS`], announces
    /// that all may be lost) and publishes its invalidations again.
    async fn announce(&mut self, lost: Kept) {
        if lost.all_topics {
            self.lost_all().await;
        }
        for topic in lost.topics {
            self.hint(topic).await;
        }
        self.invalidate_again(lost.tags, lost.all_caches).await;
    }

    /// Hints the topics whose event was dropped for a full outbox (the
    /// other replicas' subscribers re-read what it announced: the change
    /// was committed before it was published), and publishes again the
    /// invalidations their callers could not confirm.
    async fn announce_dropped(&mut self) {
        let dropped = self.dropped.take();
        self.announce(dropped).await;
    }

    /// If the client reconnected since the topics kept were published,
    /// publishes a resync hint for each of them (on the new connection:
    /// the client sends what is queued only once connected).
    async fn catch_up(&mut self) {
        let now = self.connects();
        if now == self.epoch {
            return;
        }
        self.epoch = now;
        let mut lost = std::mem::take(&mut self.unconfirmed);
        lost.absorb(std::mem::take(&mut self.confirming));
        if !lost.is_empty() {
            tracing::info!(
                topics = lost.topics.len(),
                all_topics = lost.all_topics,
                invalidated_tags = lost.tags.len(),
                all_caches = lost.all_caches,
                "nats: reconnected; hinting the topics and invalidating again what was published since the last \
                 confirmation"
            );
        }
        self.announce(lost).await;
    }
}

/// Keeps the NATS subscriptions in step with the hub's topics (interest
/// routing, module docs).
struct Router {
    client: async_nats::Client,
    subjects: Arc<Subjects>,
    hub: Arc<Hub>,
    counts: Arc<Counts>,
    /// topic -> the task forwarding its subscription to the hub (aborting
    /// it drops the subscriber, which unsubscribes).
    subscribed: HashMap<Topic, tokio::task::AbortHandle>,
    /// Topics whose last local subscriber went, in order, with when to
    /// unsubscribe them (if nobody subscribed again by then).
    lingering: VecDeque<(Instant, Topic)>,
    /// Topics hinted after a round trip that went unanswered (their SUB
    /// may not have been in effect yet, so an event published after the
    /// subscribers re-read the store may have been missed): hinted again
    /// once a later round trip is answered.
    unconfirmed: HashSet<Topic>,
    /// When to send that later round trip (none: nothing unconfirmed, or
    /// the client is away and its reconnect's round trip will do).
    retry_at: Option<Instant>,
}

impl Router {
    async fn run(
        mut self,
        mut changes: mpsc::UnboundedReceiver<Interest>,
        reconnected: Arc<Notify>,
        shutdown: CancellationToken,
    ) {
        let mut batch = Vec::new();
        loop {
            let due = self.lingering.front().map(|(at, _)| *at);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                // Only the topics subscribed so far: the server has their
                // re-sent SUBs after the round trip. (A topic still queued
                // gets its hint once its own SUB is confirmed.)
                () = reconnected.notified() => {
                    let topics: Vec<Topic> = self.subscribed.keys().copied().collect();
                    self.hint_after_round_trip(topics).await;
                }
                n = changes.recv_many(&mut batch, ROUTER_BATCH) => {
                    if n == 0 {
                        break;
                    }
                    self.apply(&mut batch).await;
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => self.expire(),
                () = tokio::time::sleep_until(self.retry_at.unwrap_or_else(Instant::now)), if self.retry_at.is_some() => {
                    self.retry_at = None;
                    // Away: the reconnect's round trip hints every topic.
                    if self.client.connection_state() == async_nats::connection::State::Connected {
                        self.hint_after_round_trip(Vec::new()).await;
                    }
                }
            }
        }
        for task in self.subscribed.values() {
            task.abort();
        }
    }

    /// Subscribes to the topics that gained a first subscriber (and have
    /// one still), confirms with a round trip, then hints their
    /// subscribers; topics that lost their last start lingering.
    async fn apply(&mut self, batch: &mut Vec<Interest>) {
        let mut fresh = HashSet::new();
        let mut settles = Vec::new();
        for change in batch.drain(..) {
            let (topic, wanted) = match change {
                // Subscribed from the start (`always_subjects`): a second
                // subscription would deliver each of its events twice.
                Interest::Topic(Topic::Presence, _) => continue,
                Interest::Topic(topic, wanted) => (topic, wanted),
                Interest::Settle(done) => {
                    settles.push(done);
                    continue;
                }
            };
            if wanted {
                if !self.subscribed.contains_key(&topic) {
                    fresh.insert(topic);
                }
            } else if !fresh.remove(&topic) {
                self.lingering.push_back((Instant::now() + LINGER, topic));
            }
        }
        if fresh.is_empty() {
            for done in settles {
                let _ = done.send(());
            }
            return;
        }
        let fresh: Vec<Topic> = fresh.into_iter().collect();
        let mut made = 0;
        for topic in &fresh {
            match self.client.subscribe(self.subjects.of(*topic)).await {
                Ok(subscriber) => {
                    let (hub, subjects, counts) = (self.hub.clone(), self.subjects.clone(), self.counts.clone());
                    let task = tokio::spawn(async move {
                        let mut subscriber = subscriber;
                        while let Some(message) = subscriber.next().await {
                            deliver(&hub, &subjects, &counts, message);
                        }
                    });
                    self.subscribed.insert(*topic, task.abort_handle());
                    made += 1;
                }
                // Only once the client is closed (shutdown).
                Err(e) => tracing::warn!(?topic, error = %e, "nats: cannot subscribe"),
            }
        }
        self.counts.subscribed(made);
        self.hint_after_round_trip(fresh).await;
        for done in settles {
            let _ = done.send(());
        }
    }

    /// Sends a round trip, then hints the subscribers of `topics`, whose
    /// SUBs went before it. Answered, it also proves every SUB before it in
    /// effect: the topics hinted after an unanswered one are hinted again.
    /// Unanswered (a slow server or network, the SUBs perhaps still on
    /// their way), `topics` are hinted all the same (the server may have
    /// them and only its answer be late) and kept for a later round trip,
    /// every [`CONFIRM_EVERY`] while connected: an event published after
    /// the subscribers re-read the store but before the server took the
    /// SUB never reached them, and only a hint after the SUB is in effect
    /// makes them re-read it (else they would hear of it at the topic's
    /// next event).
    async fn hint_after_round_trip(&mut self, topics: Vec<Topic>) {
        let confirmed = round_trip(&self.client, &self.subjects).await;
        if confirmed {
            self.unconfirmed.retain(|t| !topics.contains(t));
            let again: Vec<Topic> = self.unconfirmed.drain().collect();
            self.hub.resync_topics(&again);
            self.retry_at = None;
        } else {
            self.unconfirmed.extend(topics.iter().copied());
            if !self.unconfirmed.is_empty() {
                self.retry_at = Some(Instant::now() + CONFIRM_EVERY);
            }
        }
        self.hub.resync_topics(&topics);
    }

    /// Unsubscribes from the topics whose linger is over and that still
    /// have no local subscriber.
    fn expire(&mut self) {
        let now = Instant::now();
        let mut ended = 0;
        while let Some((at, topic)) = self.lingering.front().copied()
            && at <= now
        {
            self.lingering.pop_front();
            if self.hub.is_followed(topic) {
                continue;
            }
            if let Some(task) = self.subscribed.remove(&topic) {
                task.abort();
                ended += 1;
            }
        }
        self.counts.unsubscribed(ended);
    }
}

impl EventBus for NatsBus {
    fn publish(&self, topic: Topic, event: Shared) {
        self.hub.fan_out(topic, event.clone());
        match self.outbox.try_send(Outgoing::Event(topic, event)) {
            Ok(()) => {}
            // A presence beat lost is made up for by the next heartbeat, as
            // in the publisher's own hints (module docs): a hint would tell
            // every public stream of every other replica that news was lost.
            Err(mpsc::error::TrySendError::Full(Outgoing::Event(_, event)))
                if topic == Topic::Presence && event.beat.is_some() =>
            {
                tracing::warn!("nats: publish queue full; presence beat dropped (the next heartbeat makes up for it)");
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!("nats: publish queue full; event dropped (its topic is hinted instead)");
                self.dropped.add(topic);
            }
            // The publisher has stopped (close(), or the bus dropped): the
            // goodbye is said, and no hint can follow. Once per bus, not
            // per event: a late publisher may send many.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                natter_kit::metrics::bus_unsent(1);
                if !self.told_unsent.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        ?topic,
                        "nats: published after close(); sent to this process only (logged once; \
                         natter_bus_unsent_total counts them)"
                    );
                }
            }
        }
    }

    fn publish_local(&self, topic: Topic, event: Shared) {
        self.hub.fan_out(topic, event);
    }

    fn subscribe(&self, topic: Topic) -> Subscription {
        self.hub.subscribe(topic)
    }

    fn invalidator(&self) -> &Arc<Invalidator> {
        self.hub.invalidator()
    }

    fn invalidate(&self, tags: Vec<Tag>) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            self.hub.invalidator().invalidate(&tags);
            let connects = || self.client.statistics().connects.load(Ordering::SeqCst);
            let connection = connects();
            let published = tokio::time::timeout(
                BARRIER_WAIT,
                self.client.publish(self.subjects.invalidate.clone(), invalidation(tags.iter())),
            );
            let published = matches!(published.await, Ok(Ok(())));
            if published {
                natter_kit::metrics::bus_published(1);
            }
            // A barrier answered on a later connection than the publish
            // went out on proves nothing about it.
            let confirmed =
                published && barrier(&self.client, &self.subjects, BARRIER_WAIT).await && connects() == connection;
            if !confirmed {
                tracing::warn!(
                    ?tags,
                    "nats: invalidation not confirmed by the server; other replicas may answer from their caches \
                     until the publisher has sent it again (on a new connection if this one dropped)"
                );
                self.dropped.add_tags(&tags);
            }
        })
    }

    fn close(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let (done, flushed) = tokio::sync::oneshot::channel();
            let closing = async {
                // Either fails only if the publisher has stopped already.
                if self.outbox.send(Outgoing::Close(done)).await.is_ok() {
                    let _ = flushed.await;
                }
            };
            let lost = tokio::time::timeout(CLOSE_GRACE, closing).await.is_err();
            if lost {
                tracing::warn!(
                    "nats: the last events were not all confirmed at shutdown; the goodbye tells the other \
                     replicas to re-read the store"
                );
            }
            // Taken once: a second close() says nothing more.
            let goodbye = self.goodbye.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(goodbye) = goodbye {
                let (done, said) = oneshot::channel();
                let say = if lost { Say::GoodbyeLost } else { Say::Goodbye };
                // Fails only if the liveness task has stopped (the bus is
                // being dropped).
                if goodbye.send((say, done)).is_ok() {
                    let _ = tokio::time::timeout(alive::GOODBYE_WAIT, said).await;
                }
            }
            // Cache look-ups from now on ask the owning services.
            self.closed.cancel();
        })
    }

    fn topic_count(&self) -> usize {
        self.hub.topic_count()
    }

    fn settled(&self) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(router) = &self.router else { return };
            let (done, answered) = tokio::sync::oneshot::channel();
            // Either fails only once the router has stopped (shutdown).
            if router.send(Interest::Settle(done)).is_ok() {
                let _ = answered.await;
            }
        })
    }

    fn process(&self) -> Option<Uuid> {
        Some(self.liveness.me())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let id = Uuid::now_v7();
        let subjects = Subjects::new(&SubjectPrefix::default());
        for t in [Topic::Chat(id), Topic::User(id), Topic::Session(id), Topic::Presence] {
            assert_eq!(subjects.topic(&subjects.of(t)), Some(t));
        }
        assert_eq!(subjects.topic("natter.events.chat.not-a-uuid"), None);
        assert_eq!(subjects.topic("other.chat.x"), None);
        let staging = Subjects::new(&"staging.natter".parse().unwrap());
        assert_eq!(staging.of(Topic::Chat(id)), format!("staging.natter.events.chat.{id}"));
        assert_eq!(staging.topic(&subjects.of(Topic::Chat(id))), None, "another deployment's subject");
        assert_eq!(subjects.topic(&staging.of(Topic::Chat(id))), None, "another deployment's subject");
    }

    /// The default prefix keeps every subject of the releases before the
    /// flag (a rolling upgrade's old and new replicas hear each other).
    #[test]
    fn the_default_prefix_keeps_the_old_subjects() {
        let s = Subjects::new(&SubjectPrefix::default());
        let id = Uuid::nil();
        assert_eq!(s.of(Topic::User(id)), format!("natter.events.user.{id}"));
        assert_eq!(s.of(Topic::Presence), "natter.events.presence");
        assert_eq!(s.every_event(), "natter.events.>");
        assert_eq!(
            [&s.alive, &s.invalidate, &s.barrier, &s.inbox].map(String::as_str),
            ["natter.events.alive", "natter.caches.invalidate", "natter.caches.barrier", "natter.caches.inbox"]
        );
    }

    #[test]
    fn a_subject_prefix_is_dot_separated_tokens_without_wildcards_or_whitespace() {
        for good in ["natter", "staging.natter", "t0a1b2_c", "natter-eu.v2"] {
            assert_eq!(good.parse::<SubjectPrefix>().map(|p| p.to_string()), Ok(good.to_owned()));
        }
        for bad in ["", ".", "natter.", ".natter", "a..b", "nat ter", "natter\t", "a.*", "a.>", "na*", "x>y"] {
            let e = bad.parse::<SubjectPrefix>().expect_err(bad);
            assert!(e.contains("no NATS subject prefix"), "{bad:?}: {e}");
        }
    }

    /// A prefix that nests inside another deployment's subjects is
    /// refused: `natter.events.x`'s events would reach every broadcast
    /// process of the default prefix (`natter.events.>`), which drops them
    /// as unreadable, and its caches' subjects likewise.
    #[test]
    fn a_prefix_nesting_in_another_deployment_s_subjects_is_refused() {
        for nesting in ["natter.events.x", "natter.caches", "events", "staging.caches.natter"] {
            let e = nesting.parse::<SubjectPrefix>().expect_err(nesting);
            assert!(e.contains("is one natter puts after the prefix"), "{nesting:?}: {e}");
        }
        for fine in ["natter.eventsx", "my-events.natter", "natter.cache"] {
            assert!(fine.parse::<SubjectPrefix>().is_ok(), "{fine:?}");
        }
    }

    #[test]
    fn urls_lose_their_credentials_and_redact_them() {
        let (addr, c) = split_url("nats://us%40er:p%3Ass%2Fw@nats:4222").unwrap();
        assert_eq!(addr.as_url_str(), "nats://nats:4222");
        assert_eq!(c, Some(Credentials::new("us@er", "p:ss/w")), "percent-decoded");
        let (addr, c) = split_url("nats:4222").unwrap();
        assert_eq!((addr.as_url_str(), c), ("nats://nats:4222", None));
        assert_eq!(redact_url("nats://natter:s3cret@nats:4222"), "nats://natter:***@nats:4222");
        assert_eq!(redact_url("nats://nats:4222"), "nats://nats:4222");
        assert!(!redact_url("http://natter:s3cret@[bad").contains("s3cret"));
        assert!(!format!("{:?}", Credentials::new("natter", "s3cret")).contains("s3cret"));
    }

    /// Two buses on the NATS server at NATTER_TEST_NATS_URL, stopped by the
    /// token; none when it is not set (and CI is not).
    async fn two_buses(routing: Routing) -> Option<(Arc<NatsBus>, Arc<NatsBus>, CancellationToken)> {
        let Some(url) = std::env::var("NATTER_TEST_NATS_URL").ok().filter(|u| !u.is_empty()) else {
            assert!(std::env::var_os("CI").is_none(), "CI must set NATTER_TEST_NATS_URL");
            return None;
        };
        let stop = CancellationToken::new();
        // A prefix of their own: other tests' buses on the server are no
        // peers of theirs.
        let prefix: SubjectPrefix = format!("natter.u{}", Uuid::new_v4().simple()).parse().unwrap();
        let a = NatsBus::connect(&url, None, routing, &prefix, stop.clone()).await.unwrap();
        let b = NatsBus::connect(&url, None, routing, &prefix, stop.clone()).await.unwrap();
        Some((a, b, stop))
    }

    /// Two buses on one NATS server: what one publishes, the other's
    /// subscribers receive (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn events_cross_processes() {
        let Some((a, b, stop)) = two_buses(Routing::Interest).await else { return };
        let chat = Uuid::now_v7();
        let mut on_b = b.subscribe(Topic::Chat(chat));
        let mut on_a = a.subscribe(Topic::Chat(chat));
        // Subscriptions travel to the server asynchronously: publish until
        // one arrives (bounded), then check order and the local copy.
        let mut got = None;
        for seq in 1..=50 {
            a.publish(Topic::Chat(chat), Arc::new(Event { change_seq: seq, ..Event::hint(chat.into()) }));
            if let Ok(Some(Ok(e))) = tokio::time::timeout(std::time::Duration::from_millis(100), on_b.recv()).await {
                got = Some(e.change_seq);
                break;
            }
        }
        assert!(got.is_some(), "b received a's event over NATS");
        // Passing over hints (a's own subscription's, once in effect).
        let first = loop {
            let e = on_a.recv().await.unwrap().unwrap();
            if !e.is_hint() || e.change_seq != 0 {
                break e.change_seq;
            }
        };
        assert_eq!(first, 1, "a's own subscribers get it locally, once");
        stop.cancel();
    }

    /// Waits (bounded) until `done` holds: a state another task reaches.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "not within 5 s: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Once `invalidate` has returned in one process, another process's
    /// caches no longer answer the entries of its tag (and still answer the
    /// others), in either routing; the caches go live only once connected
    /// (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn invalidations_cross_processes() {
        use natter_kit::cache::{Lookup, TaggedCache};
        for routing in [Routing::Interest, Routing::Broadcast] {
            let Some((a, b, stop)) = two_buses(routing).await else { return };
            until("b's caches are live", || b.invalidator().live()).await;
            let cache =
                TaggedCache::<u8, u8>::new("test", std::time::Duration::from_secs(60), 10, b.invalidator().clone());
            let (changed, other) = (Uuid::now_v7(), Uuid::now_v7());
            for (key, chat) in [(1, changed), (2, other)] {
                let Lookup::Miss(ticket) = cache.get(&key).await else { panic!("a live, empty cache misses") };
                cache.put(ticket, key, key, vec![Tag::Chat(chat)]);
            }
            a.invalidate(vec![Tag::Chat(changed)]).await;
            // No wait: b's next look-up syncs with the server, which has the
            // invalidation since `invalidate` returned.
            assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "{routing:?}: b dropped the changed chat's entry");
            assert!(matches!(cache.get(&2).await, Lookup::Hit(2)), "{routing:?}: another chat's entry stays");
            stop.cancel();
        }
    }

    /// Events dropped for a full publish queue: a presence beat is not
    /// hinted (the next heartbeat makes up for it, where the hint would
    /// have every other replica's public streams send `ephemeral_lost`,
    /// again at each of the publisher's turns while the queue stays full);
    /// news of a user on the presence topic (a rename) and a chat's event
    /// are (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn a_beat_dropped_for_a_full_queue_is_not_hinted() {
        let Some((a, _b, stop)) = two_buses(Routing::Interest).await else { return };
        let hinted = |topic| a.dropped.kept().topics.contains(&topic);
        // This test's runtime has one thread: the publisher task does not
        // run until the next await, so the queue stays full.
        let busy = Uuid::now_v7();
        for _ in 0..PUBLISH_QUEUE {
            a.publish(Topic::Chat(busy), Arc::new(Event::hint(busy.into())));
        }
        let user = natter_kit::id::UserId(Uuid::now_v7());
        let beat = crate::Beat {
            replica: Uuid::now_v7(),
            kind: crate::BeatKind::Online,
            time: 1,
            interval: 10_000_000,
            parts: 0,
        };
        a.publish(Topic::Presence, Arc::new(Event { users: vec![user], beat: Some(beat), ..Event::default() }));
        assert!(!hinted(Topic::Presence), "a dropped beat is hinted");
        a.publish(Topic::Presence, Arc::new(Event::user_updated(user, "u".into(), "Renamed".into(), 2)));
        assert!(hinted(Topic::Presence), "a dropped rename is hinted");
        let quiet = Uuid::now_v7();
        a.publish(Topic::Chat(quiet), Arc::new(Event::hint(quiet.into())));
        assert!(hinted(Topic::Chat(quiet)), "a dropped chat event is hinted");
        stop.cancel();
    }

    /// Events on more topics lost than the publisher keeps to hint one by
    /// one: it announces that it lost events, and another process hints
    /// every topic it follows, here a chat the publisher never published
    /// to, where it would otherwise hint 16 Ki topics by name and keep a
    /// set of any size (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn too_many_lost_topics_hint_every_topic_elsewhere() {
        let Some((a, b, stop)) = two_buses(Routing::Interest).await else { return };
        let followed = Uuid::now_v7();
        let mut on_b = b.subscribe(Topic::Chat(followed));
        b.settled().await;
        // Passing over the subscription's own hint.
        while futures::FutureExt::now_or_never(on_b.recv()).is_some() {}
        for _ in 0..=KEPT_TOPICS {
            a.dropped.add(Topic::Chat(Uuid::now_v7()));
        }
        {
            let kept = a.dropped.kept();
            assert!(kept.all_topics && kept.topics.is_empty(), "past the cap the set is dropped");
        }
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), on_b.recv()).await;
        assert!(
            matches!(&got, Ok(Some(Ok(e))) if e.is_hint() && e.chat == Some(followed.into())),
            "b hinted the chat it follows: {got:?}"
        );
        stop.cancel();
    }

    /// More unconfirmed invalidations than the publisher keeps are
    /// announced again as one that drops every entry of another process's
    /// caches (runs when NATTER_TEST_NATS_URL is set).
    #[tokio::test]
    async fn too_many_lost_invalidations_drop_every_entry_elsewhere() {
        use natter_kit::cache::{Lookup, TaggedCache};
        let Some((a, b, stop)) = two_buses(Routing::Interest).await else { return };
        until("b's caches are live", || b.invalidator().live()).await;
        let cache = TaggedCache::<u8, u8>::new("test", std::time::Duration::from_secs(60), 10, b.invalidator().clone());
        let Lookup::Miss(ticket) = cache.get(&1).await else { panic!("a live, empty cache misses") };
        cache.put(ticket, 1, 1, vec![Tag::Chat(Uuid::now_v7())]);
        // As if that many invalidate() calls had gone unconfirmed, none of
        // them about the cached chat.
        let lost: Vec<Tag> = (0..=KEPT_TAGS).map(|_| Tag::Chat(Uuid::now_v7())).collect();
        a.dropped.add_tags(&lost);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while !matches!(cache.get(&1).await, Lookup::Miss(_)) {
            assert!(tokio::time::Instant::now() < deadline, "b dropped its entries within 5 s");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        stop.cancel();
    }
}
