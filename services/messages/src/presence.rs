//! Presence: a user is online while at least one of their public
//! StreamEvents streams is open on any replica, offline otherwise with the
//! time they were last online.
//!
//! Each replica counts its own streams per user and tells the others over
//! the bus ([`Topic::Presence`]) with [`Beat`]s: `Online` when a user's first
//! stream opens on it, `Offline` when their last one closes, and every
//! heartbeat interval a `Heartbeat` listing every user it holds streams of,
//! which replaces what its peers knew of it (so a lost `Online` or `Offline`
//! is mended by the next heartbeat). A peer not heard of for
//! [`MISSED_BEATS`] of its intervals is taken as dead: its users go offline
//! as of its last word, unless online elsewhere. So is, sooner, a peer
//! whose process the bus finds dead (NATS: its liveness announcements, one
//! a second, stopped for 3 s; [`BeatKind::Lost`], delivered by this
//! process's bus only) and that is not heard again within its grace
//! (`--presence-lost-grace`, [`LOST_GRACE`] by default, or its heartbeat
//! expiry if shorter): a replica's id is its bus's
//! process id ([`EventBus::process`]; random within one process). A
//! replica that starts says `Hello` and its peers answer with a heartbeat
//! at once; one that stops says `Goodbye`; one whose bus reconnects after a
//! cut ([`BeatKind::Rejoined`], from its own bus) sends a heartbeat and a
//! hello at once. Each replica thus holds user -> replicas, and works out
//! every change by itself: it tells its own streams (never another
//! replica's), so no stream gets a change twice, and it records an offline
//! user's last-seen time in the store (each replica that sees the change
//! writes the same or a close time; the store keeps the latest).
//!
//! Timing: on NATS a dead peer is found within about 4 s of its death,
//! through the bus, and its users go offline when the grace ends, within
//! about 14 s of its death. The grace is for a peer only cut off from NATS
//! (a network fault, a NATS restart, a long pause), which the others
//! cannot tell from a dead one: one back within it (its cut, reconnect
//! included, under about 13 s) re-announces its users at once and they
//! never show offline anywhere; one back later has them offline meanwhile
//! and online again as soon as it is back, not at its next heartbeat. Its
//! own view mends the same way: the peers answer its hello (it heard
//! nothing while away, and takes them as dead itself only after their
//! heartbeat expiry). A peer's silence is checked too, at each of this
//! replica's own heartbeats, so a peer the bus does not find (one of a
//! build before it, whose replica id is not its process's, or one that
//! died before this process's bus heard it announce itself: the bus asks
//! its peers to announce themselves at once when it starts, so that takes
//! a death within a round trip of its start) goes 3 to 4 intervals after
//! its last word (30-40 s by default). A starting replica knows its peers' users
//! once they answer its hello (a round trip), at the latest after one
//! heartbeat interval; until then it may take a user online only elsewhere
//! as offline. A heartbeat of
//! more than `PART_USERS` (16,384) users goes in parts (NATS limits a message to
//! 1 MB by default).
//!
//! Cost: a change goes to every stream following a chat of the user, so a
//! group of n members whose members all (re)connect at once sends about n²
//! presence events in all (each stream one per other member).
//!
//! Streams learn of a change through the chats they follow: the change is
//! published locally on the topic of each chat of the user (one lookup of
//! the user's chats per change, only when this replica has streams; the
//! same call names the users with a block either way with the user, whose
//! streams drop it: a block hides presence both ways), and a
//! stream keeps, per user, the serial of the last change it passed on, so a
//! change reaching it through several shared chats goes out once (and an
//! older one arriving late is dropped). Nothing of this touches sends or
//! their fan-out: presence changes come from stream opens and closes only.
//!
//! The assistant's internal streams (FollowChats) are not counted and get no
//! presence events; the assistant, holding no public stream, is offline.
//!
//! The presence topic also carries other news of a user for everyone who
//! shares a chat with them: `user_updated` (a new display name or username,
//! published by the sessions service with no beat). Each replica that holds
//! streams hands it on exactly as a presence change, through the user's
//! chats, and streams deduplicate it by its serial (the change's number,
//! which the sessions service's database gave it).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use natter_bus::{Beat, BeatKind, Event as BusEvent, EventBus, Lagged, Subscription, Topic};
use natter_kit::id::UserId;
use natter_kit::time::now_micros;
use natter_links::ChatDirectory;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::grpc;
use crate::store::MessageStore;

/// Heartbeats a peer may miss before it is taken as dead.
pub const MISSED_BEATS: u32 = 3;

/// How long a peer the bus lost ([`BeatKind::Lost`]) keeps its users online
/// by default (`--presence-lost-grace`; at most its heartbeat expiry): a
/// replica only cut off from NATS for a few seconds comes back within it,
/// and its users never show offline (module docs).
pub const LOST_GRACE: Duration = Duration::from_secs(10);

/// A lost peer's grace as configured ([`LOST_GRACE`] unless set).
#[derive(Clone, Copy, Debug)]
struct Grace(Duration);

impl Default for Grace {
    fn default() -> Self {
        Self(LOST_GRACE)
    }
}

/// Most users in one beat: about 300 KB on the wire, well within NATS's
/// default 1 MB payload limit (a longer heartbeat goes in parts).
const PART_USERS: usize = 16 * 1024;

/// Most changes recorded in one store write.
const BATCH: usize = 512;

/// Longest wait at shutdown for the changes already seen to be recorded.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// A user's presence as GetPresence answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not the caller's to know: the user shares no chat with them (or does
    /// not exist), or either of the two blocked the other.
    Hidden,
    /// A stream of the user is open on some replica.
    Online,
    /// No stream open; last online at this time (µs since the epoch), if
    /// ever seen online.
    Offline(Option<i64>),
}

/// One change of a user's presence, as this replica saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Change {
    user: Uuid,
    online: bool,
    /// When, µs since the epoch: for an offline change, the last-seen time.
    at: i64,
    /// This replica's order of changes (what streams deduplicate by).
    serial: i64,
}

/// What the announcing task is handed.
enum Work {
    Changed(Change),
    /// Another kind of news of a user for the streams that follow their
    /// chats (`user_updated`, published on the presence topic by the
    /// sessions service).
    Profile(Arc<BusEvent>),
    /// Answered once everything before it is done.
    Flush(oneshot::Sender<()>),
}

/// Presence as this replica knows it; share it behind an `Arc`.
pub struct Presence {
    replica: Uuid,
    interval: Duration,
    bus: Arc<dyn EventBus>,
    state: Mutex<State>,
    work: mpsc::UnboundedSender<Work>,
    /// Counts the times news of users meant for this replica's streams was
    /// lost (see [`Presence::news_lost`]).
    news_lost: watch::Sender<u64>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").field("replica", &self.replica).field("interval", &self.interval).finish()
    }
}

/// Who is online where (no IO: the rules, unit-tested below).
#[derive(Debug, Default)]
struct State {
    /// Open streams per user on this replica.
    local: HashMap<Uuid, usize>,
    /// The other replicas heard of.
    peers: HashMap<Uuid, Peer>,
    /// user -> how many peers hold streams of the user.
    remote: HashMap<Uuid, usize>,
    /// The last serial handed out.
    serial: i64,
    /// Users taken offline whose last-seen time the store may not hold yet
    /// (the announcing task records it after the flip): the time, µs,
    /// until [`State::recorded`] (or until they come online again).
    unrecorded: HashMap<Uuid, i64>,
    /// How long a peer the bus lost keeps its users (at most its expiry).
    lost_grace: Grace,
}

#[derive(Debug)]
struct Peer {
    users: HashSet<Uuid>,
    /// When it was last heard of (this replica's clock).
    heard: Instant,
    /// The time of its last word, by its clock (µs): when its users were
    /// last known online if it dies.
    alive_at: i64,
    /// Silence after which it is taken as dead.
    expiry: Duration,
    /// When the bus lost its process ([`BeatKind::Lost`]), if it has not
    /// been heard since: it is taken as dead after [`Peer::grace`].
    lost: Option<Instant>,
    /// The parts of a heartbeat sent in several: its time, how many came,
    /// their users.
    gathering: Option<(i64, u32, HashSet<Uuid>)>,
}

impl Peer {
    /// How long after the bus lost it, unheard meanwhile, it is taken as
    /// dead: the `configured` grace ([`State::lost_grace`]), or its
    /// heartbeat expiry if shorter.
    fn grace(&self, configured: Grace) -> Duration {
        configured.0.min(self.expiry)
    }

    /// When it is taken as dead unless heard before, with the `configured`
    /// grace.
    fn dead_at(&self, configured: Grace) -> Instant {
        let silent = self.heard + self.expiry;
        self.lost.map_or(silent, |lost| silent.min(lost + self.grace(configured)))
    }

    /// The users of a whole heartbeat, once its last part (of `beat.parts`)
    /// has come; parts of an older heartbeat still gathered are dropped (one
    /// was lost: the next heartbeat will do).
    fn gather(&mut self, beat: &Beat, users: HashSet<Uuid>) -> Option<HashSet<Uuid>> {
        if beat.parts <= 1 {
            return Some(users);
        }
        let (time, came, gathered) = self.gathering.get_or_insert_with(|| (beat.time, 0, HashSet::new()));
        if *time != beat.time {
            (*time, *came) = (beat.time, 0);
            gathered.clear();
        }
        *came += 1;
        gathered.extend(users);
        if *came < beat.parts {
            return None;
        }
        self.gathering.take().map(|(_, _, all)| all)
    }
}

impl State {
    fn online(&self, user: &Uuid) -> bool {
        self.local.contains_key(user) || self.remote.contains_key(user)
    }

    /// Applies `change` and returns the users among `affected` whose
    /// presence it flipped, each with its new state, as changes at `at`.
    fn flips(&mut self, affected: &HashSet<Uuid>, at: i64, change: impl FnOnce(&mut Self)) -> Vec<Change> {
        let before: Vec<(Uuid, bool)> = affected.iter().map(|u| (*u, self.online(u))).collect();
        change(self);
        let mut out = Vec::new();
        for (user, was) in before {
            let online = self.online(&user);
            if online != was {
                if online {
                    self.unrecorded.remove(&user);
                } else {
                    self.unrecorded.insert(user, at);
                }
                self.serial += 1;
                out.push(Change { user, online, at, serial: self.serial });
            }
        }
        out
    }

    /// The last-seen times in `seen` are in the store: forgets those no
    /// newer than what is recorded.
    fn recorded(&mut self, seen: &[(UserId, i64)]) {
        for (user, at) in seen {
            if self.unrecorded.get(&user.0).is_some_and(|pending| pending <= at) {
                self.unrecorded.remove(&user.0);
            }
        }
    }

    /// `user`'s presence as known here: [`Seen::Offline`] carries the
    /// last-seen time while it is [unrecorded](State::unrecorded).
    fn seen(&self, user: &Uuid) -> Seen {
        match self.online(user) {
            true => Seen::Online,
            false => Seen::Offline(self.unrecorded.get(user).copied()),
        }
    }

    fn remote_add(&mut self, user: Uuid) {
        *self.remote.entry(user).or_default() += 1;
    }

    fn remote_remove(&mut self, user: Uuid) {
        if let Some(n) = self.remote.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.remote.remove(&user);
            }
        }
    }

    /// One more stream of `user` here; `true` if it is their first.
    fn open(&mut self, user: Uuid, at: i64) -> (bool, Vec<Change>) {
        let first = !self.local.contains_key(&user);
        let changes = self.flips(&HashSet::from([user]), at, |s| *s.local.entry(user).or_default() += 1);
        (first, changes)
    }

    /// One stream of `user` fewer here; `true` if it was their last.
    fn close(&mut self, user: Uuid, at: i64) -> (bool, Vec<Change>) {
        let Some(n) = self.local.get(&user).copied() else { return (false, Vec::new()) };
        let changes = self.flips(&HashSet::from([user]), at, |s| {
            if n <= 1 {
                s.local.remove(&user);
            } else {
                s.local.insert(user, n - 1);
            }
        });
        (n <= 1, changes)
    }

    /// What a peer's beat changes; `now` is when it arrived. A goodbye's
    /// users go offline as of the goodbye. A peer the bus lost changes
    /// nothing yet: unless heard again within its grace, [`State::expire`]
    /// takes its users offline as of its last word, as an expired one's.
    /// Any other beat of it shows it is there (back, if it was lost).
    fn heard(&mut self, beat: &Beat, users: HashSet<Uuid>, now: Instant, own_interval: Duration) -> Vec<Change> {
        if beat.kind == BeatKind::Lost {
            if let Some(peer) = self.peers.get_mut(&beat.replica)
                && peer.lost.is_none()
            {
                peer.lost = Some(now);
                tracing::info!(replica = %beat.replica, users = peer.users.len(), grace = ?peer.grace(self.lost_grace), "presence: replica's process lost; its users go offline unless it is back within the grace");
            }
            return Vec::new();
        }
        if beat.kind == BeatKind::Goodbye {
            let Some(peer) = self.peers.remove(&beat.replica) else { return Vec::new() };
            let gone = peer.users;
            return self.flips(&gone.clone(), beat.time, |s| gone.into_iter().for_each(|u| s.remote_remove(u)));
        }
        let interval = u64::try_from(beat.interval).ok().filter(|i| *i > 0).map_or(own_interval, Duration::from_micros);
        let peer = self.peers.entry(beat.replica).or_insert_with(|| Peer {
            users: HashSet::new(),
            heard: now,
            alive_at: beat.time,
            expiry: interval * MISSED_BEATS,
            lost: None,
            gathering: None,
        });
        if peer.lost.take().is_some() {
            tracing::info!(replica = %beat.replica, "presence: lost replica back within the grace; its users stay online");
        }
        peer.heard = now;
        peer.alive_at = peer.alive_at.max(beat.time);
        peer.expiry = interval * MISSED_BEATS;
        let (added, removed): (HashSet<Uuid>, HashSet<Uuid>) = match beat.kind {
            BeatKind::Heartbeat => {
                let Some(users) = peer.gather(beat, users) else { return Vec::new() };
                (users.difference(&peer.users).copied().collect(), peer.users.difference(&users).copied().collect())
            }
            BeatKind::Online => (users.difference(&peer.users).copied().collect(), HashSet::new()),
            BeatKind::Offline => (HashSet::new(), users.intersection(&peer.users).copied().collect()),
            BeatKind::Hello | BeatKind::Goodbye | BeatKind::Lost | BeatKind::Rejoined => {
                (HashSet::new(), HashSet::new())
            }
        };
        if added.is_empty() && removed.is_empty() {
            return Vec::new();
        }
        let replica = beat.replica;
        let affected: HashSet<Uuid> = added.union(&removed).copied().collect();
        self.flips(&affected, beat.time, |s| {
            let peer = s.peers.get_mut(&replica).expect("inserted above");
            peer.users.extend(&added);
            peer.users.retain(|u| !removed.contains(u));
            added.into_iter().for_each(|u| s.remote_add(u));
            removed.into_iter().for_each(|u| s.remote_remove(u));
        })
    }

    /// Drops the peers silent for longer than their expiry at `now`, and
    /// those the bus lost and not heard within their grace until `now`:
    /// their users go offline as of each peer's last word.
    fn expire(&mut self, now: Instant) -> Vec<Change> {
        let dead: Vec<Uuid> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                now.duration_since(p.heard) > p.expiry || (p.lost.is_some() && now >= p.dead_at(self.lost_grace))
            })
            .map(|(id, _)| *id)
            .collect();
        let mut changes = Vec::new();
        for replica in dead {
            let peer = self.peers.remove(&replica).expect("listed above");
            tracing::info!(replica = %replica, users = peer.users.len(), lost = peer.lost.is_some(), "presence: replica gone silent; its users are offline");
            let gone = peer.users;
            changes.extend(
                self.flips(&gone.clone(), peer.alive_at, |s| gone.into_iter().for_each(|u| s.remote_remove(u))),
            );
        }
        changes
    }

    /// The first time a peer the bus lost is due to be taken as dead, if
    /// any is (a silent one not lost waits for this replica's heartbeat).
    fn due(&self) -> Option<Instant> {
        self.peers.values().filter(|p| p.lost.is_some()).map(|p| p.dead_at(self.lost_grace)).min()
    }
}

/// Counts one open stream of a user towards their presence until dropped.
#[derive(Debug)]
pub struct Online {
    presence: Arc<Presence>,
    user: Uuid,
}

impl Drop for Online {
    fn drop(&mut self) {
        self.presence.leave(self.user);
    }
}

impl Presence {
    /// Starts presence on this replica: subscribes to the presence topic,
    /// says hello, then heartbeats every `interval` (which must not be
    /// zero) until [`Presence::close`] (or until dropped). A peer the bus
    /// loses keeps its users online for `lost_grace` (at most its
    /// heartbeat expiry; zero: none). Changes are recorded in `store` and
    /// announced to local streams through the chats `chats` lists.
    ///
    /// Panics outside a Tokio runtime.
    pub fn start(
        bus: Arc<dyn EventBus>,
        chats: Arc<dyn ChatDirectory>,
        store: Arc<dyn MessageStore>,
        interval: Duration,
        lost_grace: Duration,
    ) -> Arc<Self> {
        let (work, queue) = mpsc::unbounded_channel();
        let presence = Arc::new(Self {
            // The bus's id for this process: a death the bus finds is this
            // replica's ([`BeatKind::Lost`]).
            replica: bus.process().unwrap_or_else(Uuid::new_v4),
            interval,
            bus: bus.clone(),
            state: Mutex::new(State { lost_grace: Grace(lost_grace), ..State::default() }),
            work,
            news_lost: watch::channel(0).0,
            stop: CancellationToken::new(),
        });
        // Subscribed before the hello, so no answer is missed.
        let beats = bus.subscribe(Topic::Presence);
        tokio::spawn(announce(queue, Arc::downgrade(&presence), chats, store, bus));
        tokio::spawn(listen(Arc::downgrade(&presence), beats, presence.stop.clone(), interval));
        presence.publish(BeatKind::Hello, Vec::new(), now_micros());
        presence
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes a beat of this replica (under the state's lock, so beats
    /// leave in the order the state changed); a heartbeat of more than
    /// [`PART_USERS`] users goes in parts.
    fn publish(&self, kind: BeatKind, users: Vec<Uuid>, time: i64) {
        let interval = i64::try_from(self.interval.as_micros()).unwrap_or(i64::MAX);
        let parts = u32::try_from(users.len().div_ceil(PART_USERS)).unwrap_or(u32::MAX);
        let beat = Beat { replica: self.replica, kind, time, interval, parts };
        if users.len() <= PART_USERS {
            let users = users.into_iter().map(UserId).collect();
            self.bus.publish(Topic::Presence, Arc::new(BusEvent::beat(beat, users)));
            return;
        }
        for part in users.chunks(PART_USERS) {
            let users = part.iter().copied().map(UserId).collect();
            self.bus.publish(Topic::Presence, Arc::new(BusEvent::beat(beat, users)));
        }
    }

    fn hand_over(&self, changes: Vec<Change>) {
        for change in changes {
            // Fails only once the announcing task is gone (shutdown).
            let _ = self.work.send(Work::Changed(change));
        }
    }

    /// Counts a newly opened public stream of `user` until the returned
    /// guard is dropped.
    pub fn enter(self: &Arc<Self>, user: UserId) -> Online {
        let mut state = self.lock();
        let now = now_micros();
        let (first, changes) = state.open(user.0, now);
        if first {
            self.publish(BeatKind::Online, vec![user.0], now);
        }
        self.hand_over(changes);
        Online { presence: self.clone(), user: user.0 }
    }

    fn leave(&self, user: Uuid) {
        let mut state = self.lock();
        let now = now_micros();
        let (last, changes) = state.close(user, now);
        if last {
            self.publish(BeatKind::Offline, vec![user], now);
        }
        self.hand_over(changes);
    }

    /// Whether each of `users` is online on any replica, as far as this one
    /// knows: [`Seen::Online`], or [`Seen::Offline`] with the time they
    /// went offline while the store may not hold it yet (None otherwise:
    /// read the store's, which a caller should do after this call, so that
    /// a time recorded meanwhile is found in one of the two). Never
    /// [`Seen::Hidden`].
    pub fn seen(&self, users: &[UserId]) -> Vec<Seen> {
        let state = self.lock();
        users.iter().map(|u| state.seen(&u.0)).collect()
    }

    /// A peer's beat, or news of a user for the streams of their chats.
    fn on_beat(&self, event: &Arc<BusEvent>) {
        if event.beat.is_none() {
            if is_profile(event) {
                // Fails only once the announcing task is gone (shutdown).
                let _ = self.work.send(Work::Profile(event.clone()));
            } else if event.is_hint() {
                // A replica that lost its NATS connection may have lost news
                // of users it was publishing (natter_bus's nats module).
                self.lose_news();
            }
            return;
        }
        if event.beat.is_some_and(|b| b.kind == BeatKind::Rejoined) {
            return self.rejoined();
        }
        let Some(beat) = event.beat.filter(|b| b.replica != self.replica) else { return };
        let users: HashSet<Uuid> = event.users.iter().map(|u| u.0).collect();
        let mut state = self.lock();
        let changes = state.heard(&beat, users, Instant::now(), self.interval);
        if beat.kind == BeatKind::Hello {
            // A replica that has just started learns this one's users now
            // rather than at the next heartbeat.
            self.publish(BeatKind::Heartbeat, state.local.keys().copied().collect(), now_micros());
        }
        self.hand_over(changes);
    }

    /// This replica's bus is connected again after a cut: its peers may
    /// have lost it (and keep its users for their grace only) and it
    /// missed their beats. A heartbeat now has them keep (or take back) its
    /// users, and a hello has them answer with theirs.
    fn rejoined(&self) {
        let state = self.lock();
        let now = now_micros();
        tracing::info!(users = state.local.len(), "presence: back on the bus; announcing this replica's users");
        self.publish(BeatKind::Heartbeat, state.local.keys().copied().collect(), now);
        self.publish(BeatKind::Hello, Vec::new(), now);
    }

    /// The periodic work: a heartbeat, and the peers that fell silent.
    fn tick(&self) {
        let mut state = self.lock();
        self.publish(BeatKind::Heartbeat, state.local.keys().copied().collect(), now_micros());
        let changes = state.expire(Instant::now());
        self.hand_over(changes);
    }

    /// When [`Presence::expire`] is next due (a lost peer's grace ends).
    fn due(&self) -> Option<Instant> {
        self.lock().due()
    }

    /// Takes the peers due to be dead as dead now.
    fn expire(&self) {
        let mut state = self.lock();
        let changes = state.expire(Instant::now());
        self.hand_over(changes);
    }

    /// Changes (from the state it is in when subscribed) each time news of
    /// users meant for this replica's streams was lost before it reached
    /// them: the presence topic fell behind (`user_updated` events dropped
    /// with beats), a replica that published some may have lost them with
    /// its NATS connection (its hint on the presence topic), or a user's
    /// chats could not be listed to pass a change
    /// on. Public streams then tell their clients (`ephemeral_lost`).
    pub fn news_lost(&self) -> watch::Receiver<u64> {
        self.news_lost.subscribe()
    }

    fn lose_news(&self) {
        self.news_lost.send_modify(|n| *n += 1);
    }

    /// Whether this replica holds any public stream (someone to tell).
    fn has_streams(&self) -> bool {
        !self.lock().local.is_empty()
    }

    /// Stops presence at shutdown: says goodbye (the users of streams still
    /// open here go offline now, here and on every peer) and waits (5 s at
    /// most) until the changes seen so far are recorded. Streams that close
    /// afterwards change nothing.
    pub async fn close(&self) {
        self.stop.cancel();
        {
            let mut state = self.lock();
            let now = now_micros();
            let users: HashSet<Uuid> = state.local.keys().copied().collect();
            let changes = state.flips(&users, now, |s| s.local.clear());
            self.publish(BeatKind::Goodbye, Vec::new(), now);
            self.hand_over(changes);
        }
        let (done, flushed) = oneshot::channel();
        if self.work.send(Work::Flush(done)).is_ok() && tokio::time::timeout(CLOSE_WAIT, flushed).await.is_err() {
            tracing::warn!("presence: last-seen times not all recorded at shutdown");
        }
    }
}

/// Heartbeats every `interval` and takes in the peers' beats, until `stop`
/// or until the presence is dropped.
async fn listen(presence: Weak<Presence>, mut beats: Subscription, stop: CancellationToken, interval: Duration) {
    let mut timer = tokio::time::interval_at(Instant::now() + interval, interval);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let due = presence.upgrade().and_then(|p| p.due());
        tokio::select! {
            () = stop.cancelled() => return,
            _ = timer.tick() => match presence.upgrade() {
                Some(p) => p.tick(),
                None => return,
            },
            // A lost peer's grace is over.
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => match presence.upgrade() {
                Some(p) => p.expire(),
                None => return,
            },
            beat = beats.recv() => match (beat, presence.upgrade()) {
                (Some(Ok(event)), Some(p)) => p.on_beat(&event),
                // Lost beats: the peers' next heartbeats make up for them;
                // not for the news of users among them.
                (Some(Err(Lagged(n))), Some(p)) => {
                    tracing::warn!(lost = n, "presence: fell behind the bus");
                    p.lose_news();
                }
                _ => return,
            },
        }
    }
}

/// Records offline users' last-seen times and tells this replica's streams
/// of each change, in order, a batch at a time.
async fn announce(
    mut queue: mpsc::UnboundedReceiver<Work>,
    presence: Weak<Presence>,
    chats: Arc<dyn ChatDirectory>,
    store: Arc<dyn MessageStore>,
    bus: Arc<dyn EventBus>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let seen: Vec<(UserId, i64)> = batch
            .iter()
            .filter_map(|w| match w {
                Work::Changed(c) if !c.online => Some((UserId(c.user), c.at)),
                _ => None,
            })
            .collect();
        // Recorded before the streams hear of it: a client told "offline"
        // that asks GetPresence finds the time.
        match store.record_last_seen(&seen).await {
            Ok(()) => {
                if let Some(p) = presence.upgrade() {
                    p.lock().recorded(&seen);
                }
            }
            // Kept in memory meanwhile: GetPresence on this replica still
            // answers the time.
            Err(e) => tracing::warn!(error = %e, users = seen.len(), "presence: recording last-seen times failed"),
        }
        for work in batch.drain(..) {
            match work {
                Work::Flush(done) => {
                    let _ = done.send(());
                }
                Work::Changed(change) => {
                    if let Some(p) = presence.upgrade().filter(|p| p.has_streams())
                        && !tell_streams(change, chats.as_ref(), bus.as_ref()).await
                    {
                        p.lose_news();
                    }
                }
                Work::Profile(event) => {
                    if let Some(p) = presence.upgrade().filter(|p| p.has_streams())
                        && !tell_chats(event, chats.as_ref(), bus.as_ref()).await
                    {
                        p.lose_news();
                    }
                }
            }
        }
    }
}

/// Whether `event` is news of a user that the streams of their chats pass
/// on (`user_updated`).
fn is_profile(event: &BusEvent) -> bool {
    matches!(
        event.payload.as_ref().and_then(|p| p.event.as_ref()),
        Some(natter_proto::messages::v1::stream_events_response::Event::UserUpdated(_))
    ) && event.users.len() == 1
}

/// Publishes `change` on this process's topic of each chat of its user,
/// where the streams that follow them pick it up, except those of users
/// with a block either way with its user (`unseen_by`, read in the same
/// call as the chats: a block or an unblock holds from the next change
/// on). False as for [`tell_chats`].
async fn tell_streams(change: Change, chats: &dyn ChatDirectory, bus: &dyn EventBus) -> bool {
    let user = UserId(change.user);
    let listed = match chats.member_chats_and_blocks(&user.to_string()).await {
        Ok(listed) => listed,
        Err(e) => return not_listed(user, &e),
    };
    let seen = if change.online { Seen::Online } else { Seen::Offline(Some(change.at)) };
    let event = Arc::new(BusEvent {
        users: vec![user],
        change_seq: change.serial,
        payload: Some(grpc::presence_event(user, seen)),
        unseen_by: listed.blocked_peer_user_ids.iter().filter_map(|u| u.parse().ok()).collect(),
        ..BusEvent::default()
    });
    publish_to_chats(&event, &listed.chat_ids, bus);
    true
}

/// Publishes `event`, about its one user, on this process's topic of each
/// chat of that user. False when the user's chats could not be listed (the
/// event is lost, logged).
async fn tell_chats(event: Arc<BusEvent>, chats: &dyn ChatDirectory, bus: &dyn EventBus) -> bool {
    let Some(user) = event.users.first().copied() else { return true };
    match chats.member_chat_ids(&user.to_string()).await {
        Ok(ids) => publish_to_chats(&event, &ids, bus),
        Err(e) => return not_listed(user, &e),
    }
    true
}

/// Logs that `user`'s chats could not be listed; false: a change of theirs
/// is lost.
fn not_listed(user: UserId, error: &tonic::Status) -> bool {
    tracing::warn!(user_id = %user, error = %error, "presence: cannot list the user's chats; change not announced");
    false
}

/// Publishes `event` on this process's topic of each of the chats `ids`.
fn publish_to_chats(event: &Arc<BusEvent>, ids: &[String], bus: &dyn EventBus) {
    for chat in ids.iter().filter_map(|c| Uuid::try_parse(c).ok()) {
        bus.publish_local(Topic::Chat(chat), event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn beat(replica: Uuid, kind: BeatKind, time: i64) -> Beat {
        Beat { replica, kind, time, interval: 1_000_000, parts: 0 }
    }

    fn flipped(changes: &[Change]) -> Vec<(Uuid, bool, i64)> {
        changes.iter().map(|c| (c.user, c.online, c.at)).collect()
    }

    #[test]
    fn local_streams_flip_a_user_on_the_first_and_off_with_the_last() {
        let mut s = State::default();
        let u = Uuid::now_v7();
        let (first, on) = s.open(u, 10);
        assert!(first);
        assert_eq!(flipped(&on), [(u, true, 10)]);
        assert_eq!(s.open(u, 11), (false, Vec::new()), "a second stream changes nothing");
        assert_eq!(s.close(u, 12), (false, Vec::new()), "one stream still open");
        let (last, off) = s.close(u, 13);
        assert!(last);
        assert_eq!(flipped(&off), [(u, false, 13)]);
        assert_eq!(s.close(u, 14), (false, Vec::new()), "a close too many is ignored");
        assert!(off[0].serial > on[0].serial, "serials grow");
    }

    #[test]
    fn a_user_gone_offline_has_their_time_until_the_store_holds_it() {
        let mut s = State::default();
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        s.open(u, 10);
        assert_eq!(s.seen(&u), Seen::Online);
        s.close(u, 13);
        assert_eq!(s.seen(&u), Seen::Offline(Some(13)), "not recorded yet: known here");
        s.recorded(&[(UserId(u), 12)]);
        assert_eq!(s.seen(&u), Seen::Offline(Some(13)), "an older time recorded: still the newer one");
        s.recorded(&[(UserId(u), 13)]);
        assert_eq!(s.seen(&u), Seen::Offline(None), "recorded: the store's to tell");
        // Offline as a peer says goodbye, online again before its record.
        s.heard(&beat(peer, BeatKind::Online, 20), [u].into(), now, SECOND);
        s.heard(&beat(peer, BeatKind::Goodbye, 21), HashSet::new(), now, SECOND);
        assert_eq!(s.seen(&u), Seen::Offline(Some(21)));
        s.open(u, 22);
        assert_eq!(s.seen(&u), Seen::Online);
        assert!(s.unrecorded.is_empty(), "nothing kept of a user online");
    }

    #[test]
    fn a_user_online_on_two_replicas_stays_online_while_either_holds_a_stream() {
        let mut s = State::default();
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        assert_eq!(flipped(&s.heard(&beat(peer, BeatKind::Online, 5), [u].into(), now, SECOND)), [(u, true, 5)]);
        assert!(s.open(u, 6).1.is_empty(), "already online elsewhere");
        assert!(s.heard(&beat(peer, BeatKind::Offline, 7), [u].into(), now, SECOND).is_empty(), "still here");
        assert_eq!(flipped(&s.close(u, 8).1), [(u, false, 8)]);
    }

    #[test]
    fn a_heartbeat_replaces_what_was_known_of_its_replica() {
        let mut s = State::default();
        let (a, b, c, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        s.heard(&beat(peer, BeatKind::Heartbeat, 1), [a, b].into(), now, SECOND);
        // The Offline of b and the Online of c were lost: the next heartbeat
        // mends both.
        let changes: HashSet<_> =
            flipped(&s.heard(&beat(peer, BeatKind::Heartbeat, 2), [a, c].into(), now, SECOND)).into_iter().collect();
        assert_eq!(changes, HashSet::from([(b, false, 2), (c, true, 2)]));
    }

    #[test]
    fn a_heartbeat_in_parts_applies_once_whole_and_a_lost_part_changes_nothing() {
        let mut s = State::default();
        let (a, b, c, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        s.heard(&beat(peer, BeatKind::Heartbeat, 1), [a].into(), now, SECOND);
        let part = |time: i64| Beat { parts: 2, ..beat(peer, BeatKind::Heartbeat, time) };
        // The first part alone changes nothing (a is not in it, yet stays).
        assert!(s.heard(&part(2), [b].into(), now, SECOND).is_empty());
        // Its second part was lost: the next heartbeat starts afresh.
        assert!(s.heard(&part(3), [c].into(), now, SECOND).is_empty());
        let changes: HashSet<_> = flipped(&s.heard(&part(3), [b].into(), now, SECOND)).into_iter().collect();
        assert_eq!(changes, HashSet::from([(a, false, 3), (b, true, 3), (c, true, 3)]));
    }

    #[test]
    fn a_silent_replica_expires_after_three_intervals_as_of_its_last_word() {
        let mut s = State::default();
        let (u, peer, start) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        s.heard(&beat(peer, BeatKind::Heartbeat, 100), [u].into(), start, SECOND);
        assert!(s.expire(start + 3 * SECOND).is_empty(), "three intervals is not yet too long");
        assert_eq!(flipped(&s.expire(start + 3 * SECOND + Duration::from_millis(1))), [(u, false, 100)]);
        assert!(s.peers.is_empty() && s.remote.is_empty());
    }

    #[test]
    fn a_replica_the_bus_lost_takes_its_users_offline_after_its_grace_as_of_its_last_word_unless_online_elsewhere() {
        let mut s = State::default();
        let (only_there, also_here, dead, now) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        let slow = |kind, time| Beat { interval: 60_000_000, ..beat(dead, kind, time) };
        s.heard(&slow(BeatKind::Heartbeat, 100), [only_there, also_here].into(), now, SECOND);
        s.heard(&slow(BeatKind::Online, 150), HashSet::new(), now, SECOND);
        assert!(s.open(also_here, 160).1.is_empty(), "already online there");
        let lost = BusEvent::process_lost(dead).beat.expect("a beat");
        assert!(s.heard(&lost, HashSet::new(), now, SECOND).is_empty(), "online for the grace");
        assert_eq!(s.due(), Some(now + LOST_GRACE), "the grace, not the minutes of its heartbeats");
        assert!(s.expire(now + LOST_GRACE - Duration::from_millis(1)).is_empty(), "still within the grace");
        assert!(s.heard(&lost, HashSet::new(), now + SECOND, SECOND).is_empty(), "lost again: the grace runs on");
        assert_eq!(flipped(&s.expire(now + LOST_GRACE)), [(only_there, false, 150)]);
        assert!(s.peers.is_empty() && s.remote.is_empty() && s.due().is_none());
        assert!(s.online(&also_here), "still has a stream here");
        assert!(s.heard(&lost, HashSet::new(), now, SECOND).is_empty(), "lost once");
    }

    #[test]
    fn a_lost_replica_heard_again_within_its_grace_keeps_its_users_online() {
        let mut s = State::default();
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        let slow = |kind, time| Beat { interval: 60_000_000, ..beat(peer, kind, time) };
        s.heard(&slow(BeatKind::Heartbeat, 100), [u].into(), now, SECOND);
        let lost = BusEvent::process_lost(peer).beat.expect("a beat");
        assert!(s.heard(&lost, HashSet::new(), now, SECOND).is_empty());
        // Back on the bus: its heartbeat at once.
        assert!(s.heard(&slow(BeatKind::Heartbeat, 200), [u].into(), now + SECOND, SECOND).is_empty());
        assert!(s.due().is_none(), "no grace running");
        assert!(s.expire(now + 2 * LOST_GRACE).is_empty(), "heard within its expiry");
        assert!(s.online(&u));
    }

    #[test]
    fn a_lost_replica_s_grace_is_at_most_its_heartbeat_expiry() {
        let mut s = State::default();
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        s.heard(&beat(peer, BeatKind::Heartbeat, 100), [u].into(), now, SECOND);
        let lost = BusEvent::process_lost(peer).beat.expect("a beat");
        s.heard(&lost, HashSet::new(), now + SECOND, SECOND);
        assert_eq!(s.due(), Some(now + 3 * SECOND), "its last word plus three of its 1 s intervals");
        assert_eq!(flipped(&s.expire(now + 3 * SECOND)), [(u, false, 100)]);
    }

    #[test]
    fn a_lost_replica_s_grace_is_the_one_configured() {
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        let slow = |kind, time| Beat { interval: 60_000_000, ..beat(peer, kind, time) };
        let lost = BusEvent::process_lost(peer).beat.expect("a beat");
        for grace in [Duration::from_secs(30), Duration::from_secs(2)] {
            let mut s = State { lost_grace: Grace(grace), ..State::default() };
            s.heard(&slow(BeatKind::Heartbeat, 100), [u].into(), now, SECOND);
            s.heard(&lost, HashSet::new(), now, SECOND);
            assert_eq!(s.due(), Some(now + grace), "{grace:?}");
            assert!(s.expire(now + grace - Duration::from_millis(1)).is_empty(), "{grace:?}: still within it");
            assert_eq!(flipped(&s.expire(now + grace)), [(u, false, 100)], "{grace:?}");
        }
        // None: offline as soon as the bus finds the death.
        let mut s = State { lost_grace: Grace(Duration::ZERO), ..State::default() };
        s.heard(&slow(BeatKind::Heartbeat, 100), [u].into(), now, SECOND);
        s.heard(&lost, HashSet::new(), now, SECOND);
        assert_eq!(flipped(&s.expire(now)), [(u, false, 100)], "no grace");
    }

    #[test]
    fn a_goodbye_takes_the_replica_s_users_offline_and_a_hello_changes_nothing() {
        let mut s = State::default();
        let (u, peer, now) = (Uuid::now_v7(), Uuid::now_v7(), Instant::now());
        assert!(s.heard(&beat(peer, BeatKind::Hello, 1), HashSet::new(), now, SECOND).is_empty());
        s.heard(&beat(peer, BeatKind::Online, 2), [u].into(), now, SECOND);
        assert_eq!(flipped(&s.heard(&beat(peer, BeatKind::Goodbye, 3), HashSet::new(), now, SECOND)), [(u, false, 3)]);
        assert!(s.peers.is_empty());
    }
}
