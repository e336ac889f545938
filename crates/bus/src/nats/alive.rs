//! The bus's liveness: what a peer committed but never published is not
//! lost to this process's streams until the chat's next event.
//!
//! Every process announces itself on `<prefix>.events.alive` (the
//! deployment's `--nats-subject-prefix`, `natter` by default) once per
//! [`ANNOUNCE_EVERY`] (its id, new at every start, and that interval) and
//! tracks the peers it hears. Its first announcement says hello
//! ([`Say::Hello`]), which every peer answers with an announcement at once:
//! a process that just started knows its peers within a round trip, so one
//! that dies a moment later is found dead as any other (its presence hears
//! the peers' users as soon, from their answers to its presence's hello). A peer that falls silent for [`MISSED`] of
//! its intervals (it crashed, lost power, or was cut off from NATS that
//! long) or that says goodbye admitting it lost events (its `close()` gave
//! up with events unconfirmed or queued), or that says it lost more than it
//! can name ([`Say::Lost`]), makes every other process hint all its local
//! chat, user and session topics ([`Hub::resync`]): their streams re-read
//! the store, which has every committed change (a hint is no event:
//! exactly once still holds), their user's chats (a dead chats replica's
//! unpublished "added to a chat" reaches the added user's open streams
//! within seconds, not at their next user event or reconnect) and their
//! session. A user topic's hint also has the stream tell its client that
//! ephemeral news may be lost (`ephemeral_lost`), which is true: the dead
//! peer's typing, presence, renames and read receipts on their way are.
//! Each silent peer is also delivered, before the hints, to this process's
//! presence topic ([`Event::process_lost`], never published): the messages
//! service's presence, whose replica id is this bus's process id, takes the
//! users who held streams only on that peer offline unless it is back
//! within a grace (10 s), rather than after missing its heartbeats
//! (`--presence-heartbeat`, 30-40 s by default). A clean goodbye (everything it published confirmed) is
//! forgotten silently.
//!
//! Only the processes of one deployment hear each other: the subject is
//! under the deployment's `--nats-subject-prefix`. Deployments sharing a
//! NATS server under one prefix (the default) hear each other's deaths,
//! and each death has every client of all of them told `ephemeral_lost`:
//! such deployments need prefixes of their own (README).
//!
//! The trade-off: one message of about 30 bytes per process per interval,
//! and no work per topic unless a peer is lost; then one store re-read per
//! local stream on every other process (one pass per check however many
//! peers were lost in it), including for a peer that was only cut off
//! (whose own reconnect hints what it lost, topic by topic). The interval:
//! 1 s, as the publisher's own confirmations, so a crashed peer's last
//! changes reach the other streams within about 4 s (three missed
//! announcements and a check), and two late announcements (a pause of the
//! peer's runtime, a slow network) cost nothing.
//!
//! The wire form, a small protobuf message like the events':
//!
//! ```proto
//! message Alive {
//!   bytes process = 1;  // 16 bytes (UUID), new at every start
//!   int32 kind = 2;     // Say: 1 alive .. 4 lost, 5 hello
//!   int64 interval = 3; // µs between the sender's announcements
//! }
//! ```
//!
//! `<prefix>.events.alive` lies under the subjects natter's NATS user is
//! granted already; a replica of a build from before it ignores it (no
//! topic of its own), and is never heard, so never missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Event, Hub, Topic};

/// How often a process announces itself (module docs on the choice).
pub(super) const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

/// A peer is lost after this many of its intervals without a word.
const MISSED: u32 = 3;

/// Bounds of the interval a peer announces (a garbled or hostile value
/// neither expires peers at once nor keeps a dead one for ever).
const SHORTEST: Duration = Duration::from_millis(10);
const LONGEST: Duration = Duration::from_secs(60);

/// The longest the goodbye may take to reach the socket at `close()`.
pub(super) const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// What an announcement says (its wire `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Say {
    /// The process is running.
    Alive = 1,
    /// It stopped, and the server confirmed everything it published.
    Goodbye = 2,
    /// It stopped with events unconfirmed or still queued: they may be lost.
    GoodbyeLost = 3,
    /// It runs, but lost events on more topics than it keeps to hint one
    /// by one.
    Lost = 4,
    /// It has just started (its first announcement): every peer announces
    /// itself at once, so it hears them within a round trip, not up to an
    /// interval later (a peer dying meanwhile would go unnoticed by it).
    /// A build from before it takes it as `Alive` and does not answer.
    Hello = 5,
}

impl Say {
    /// A kind this build does not know counts as alive: the peer is there.
    fn from_wire(kind: i32) -> Self {
        [Self::Goodbye, Self::GoodbyeLost, Self::Lost, Self::Hello]
            .into_iter()
            .find(|s| *s as i32 == kind)
            .unwrap_or(Self::Alive)
    }
}

/// The wire form (module docs).
#[derive(Clone, PartialEq, prost::Message)]
struct Wire {
    #[prost(bytes = "bytes", tag = "1")]
    process: Bytes,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(int64, tag = "3")]
    interval: i64,
}

/// The peers heard lately, each with when it was last heard and its
/// interval; no IO, no clock of its own.
#[derive(Default)]
struct Peers {
    heard: HashMap<Uuid, (Instant, Duration)>,
}

impl Peers {
    /// Takes in what `process` said at `now`; true if this process must
    /// resync (the peer lost events).
    fn heard(&mut self, process: Uuid, say: Say, every: Duration, now: Instant) -> bool {
        match say {
            Say::Alive | Say::Lost | Say::Hello => {
                self.heard.insert(process, (now, every));
            }
            Say::Goodbye | Say::GoodbyeLost => {
                self.heard.remove(&process);
            }
        }
        matches!(say, Say::Lost | Say::GoodbyeLost)
    }

    /// Forgets the peers silent for more than [`MISSED`] of their intervals
    /// at `now`; returns them.
    fn expire(&mut self, now: Instant) -> Vec<Uuid> {
        let mut lost = Vec::new();
        self.heard.retain(|process, (last, every)| {
            let heard = now.duration_since(*last) <= *every * MISSED;
            if !heard {
                lost.push(*process);
            }
            heard
        });
        lost
    }

    /// Counts every peer as heard at `now`: this process could hear nobody
    /// before (it was cut off), and its reconnect's resync covers what was
    /// lost until then.
    fn refresh(&mut self, now: Instant) {
        for (last, _) in self.heard.values_mut() {
            *last = now;
        }
    }
}

/// One process's side of the liveness: its id, and the peers it heard.
pub(super) struct Liveness {
    /// This bus's id on NATS (new at every start).
    me: Uuid,
    /// The subject of the announcements (`<prefix>.events.alive`); every
    /// process of the deployment subscribes to it.
    subject: String,
    peers: Mutex<Peers>,
    /// Expiry checks made (for tests).
    checks: AtomicU64,
    /// A peer said hello: announce this process now.
    answer: Notify,
}

impl Liveness {
    /// A new process id, announced on `subject`, no peers heard.
    pub(super) fn new(subject: String) -> Self {
        Self { me: Uuid::new_v4(), subject, peers: Mutex::default(), checks: AtomicU64::new(0), answer: Notify::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Peers> {
        // The map stays consistent whatever panicked while holding it.
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The announcement `say` of this process.
    pub(super) fn payload(&self, say: Say) -> Bytes {
        let interval = i64::try_from(ANNOUNCE_EVERY.as_micros()).unwrap_or(i64::MAX);
        Wire { process: Bytes::copy_from_slice(self.me.as_bytes()), kind: say as i32, interval }.encode_to_vec().into()
    }

    /// This process's id, as its announcements give it.
    pub(super) fn me(&self) -> Uuid {
        self.me
    }

    /// Peers heard and not yet lost or gone.
    pub(super) fn peers(&self) -> usize {
        self.lock().heard.len()
    }

    /// Expiry checks made so far.
    pub(super) fn checks(&self) -> u64 {
        self.checks.load(Ordering::SeqCst)
    }

    /// Takes in a peer's announcement (from the subscriber task, until the
    /// shutdown token), hints the local topics of `hub` if the peer lost
    /// events, and has this process announce itself at once if the peer
    /// said hello. An undecodable one is passed over: it
    /// comes from no natter of this wire form.
    pub(super) fn heard(&self, hub: &Hub, payload: Bytes) {
        let Ok(wire) = Wire::decode(payload) else { return };
        let Ok(process) = Uuid::from_slice(&wire.process) else { return };
        if process == self.me {
            return;
        }
        let say = Say::from_wire(wire.kind);
        let every = Duration::from_micros(u64::try_from(wire.interval).unwrap_or(0)).clamp(SHORTEST, LONGEST);
        if self.lock().heard(process, say, every, Instant::now()) {
            tracing::info!(peer = %process, ?say, "nats: a peer lost events; resync streams from the store");
            resync_after_loss(hub);
        }
        if say == Say::Hello {
            self.answer.notify_one();
        }
    }

    /// Says hello, then announces this process every [`ANNOUNCE_EVERY`]
    /// and whenever a peer says hello, until its goodbye
    /// (`goodbye`: what to say, and whom to answer once it is written) or
    /// `closed` (the bus dropped without `close()`: no goodbye, as after a
    /// crash); and until `shutdown` (when the subscriber stops hearing
    /// peers), checks after each announcement for peers gone silent, with
    /// one resync pass of `hub` for however many.
    pub(super) async fn run(
        self: std::sync::Arc<Self>,
        client: async_nats::Client,
        hub: std::sync::Arc<Hub>,
        goodbye: oneshot::Receiver<(Say, oneshot::Sender<()>)>,
        shutdown: CancellationToken,
        closed: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connection = client.statistics().connects.load(Ordering::SeqCst);
        tokio::pin!(goodbye);
        // The first tick is at once.
        let mut say = Say::Hello;
        loop {
            tokio::select! {
                biased;
                said = &mut goodbye => {
                    if let Ok((say, done)) = said {
                        self.announce(&client, say).await;
                        let _ = tokio::time::timeout(GOODBYE_WAIT, client.flush()).await;
                        let _ = done.send(());
                    }
                    return;
                }
                () = closed.cancelled() => return,
                _ = tick.tick() => {
                    self.announce(&client, std::mem::replace(&mut say, Say::Alive)).await;
                    if !shutdown.is_cancelled() {
                        self.check(&client, &hub, &mut connection);
                    }
                }
                () = self.answer.notified() => self.announce(&client, Say::Alive).await,
            }
        }
    }

    async fn announce(&self, client: &async_nats::Client, say: Say) {
        if let Err(e) = client.publish(self.subject.clone(), self.payload(say)).await {
            tracing::debug!(error = %e, ?say, "nats: liveness announcement not sent");
        }
    }

    /// Loses the peers silent too long and, if any, tells this process's
    /// presence of each ([`Event::process_lost`] on [`Topic::Presence`]:
    /// its users go offline after a grace, not after its missed
    /// heartbeats), then
    /// hints the local topics once. Not while this process is cut off (it
    /// cannot hear them; its own reconnect resyncs), and after a reconnect
    /// it counts every peer as just heard.
    fn check(&self, client: &async_nats::Client, hub: &Hub, connection: &mut u64) {
        if client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let now = Instant::now();
        let gone = {
            let mut peers = self.lock();
            let connects = client.statistics().connects.load(Ordering::SeqCst);
            if connects != *connection {
                *connection = connects;
                peers.refresh(now);
            }
            peers.expire(now)
        };
        self.checks.fetch_add(1, Ordering::SeqCst);
        if gone.is_empty() {
            return;
        }
        tracing::info!(peers = gone.len(), "nats: peers fell silent; resync streams from the store");
        // Presence first: a client told ephemeral_lost by the resync that
        // asks GetPresence again is then likelier to find them offline.
        for process in gone {
            hub.fan_out(Topic::Presence, std::sync::Arc::new(Event::process_lost(process)));
        }
        resync_after_loss(hub);
    }
}

/// One resync pass for peers' lost events (module docs), counted.
fn resync_after_loss(hub: &Hub) {
    natter_kit::metrics::bus_peer_resynced(1);
    hub.resync();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn a_silent_peer_is_lost_after_three_of_its_intervals_once() {
        let (mut peers, t0) = (Peers::default(), Instant::now());
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(!peers.heard(a, Say::Alive, SECOND, t0));
        assert!(!peers.heard(b, Say::Alive, 2 * SECOND, t0));
        assert!(peers.expire(t0 + 3 * SECOND).is_empty(), "three intervals are tolerated");
        assert_eq!(peers.expire(t0 + 3 * SECOND + Duration::from_millis(1)), [a], "a is lost, b's interval is longer");
        assert_eq!(peers.expire(t0 + 7 * SECOND), [b], "b too, then");
        assert!(peers.expire(t0 + 60 * SECOND).is_empty(), "a lost peer is lost once");
    }

    #[test]
    fn many_peers_lost_at_once_are_one_check() {
        let (mut peers, t0) = (Peers::default(), Instant::now());
        for _ in 0..5 {
            peers.heard(Uuid::new_v4(), Say::Alive, SECOND, t0);
        }
        assert_eq!(peers.expire(t0 + 4 * SECOND).len(), 5);
    }

    #[test]
    fn goodbyes_forget_and_only_a_loss_resyncs() {
        let (mut peers, t0) = (Peers::default(), Instant::now());
        let (clean, lossy, running) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for p in [clean, lossy, running] {
            peers.heard(p, Say::Alive, SECOND, t0);
        }
        assert!(!peers.heard(clean, Say::Goodbye, SECOND, t0), "a clean goodbye resyncs nothing");
        assert!(peers.heard(lossy, Say::GoodbyeLost, SECOND, t0), "a goodbye with events lost resyncs");
        assert!(peers.heard(running, Say::Lost, SECOND, t0), "so does a running peer's loss");
        assert_eq!(peers.heard.len(), 1, "the running peer is still heard, the others forgotten");
        assert_eq!(peers.expire(t0 + 10 * SECOND), [running], "and only it can be lost later");
    }

    #[test]
    fn after_a_reconnect_peers_count_as_just_heard() {
        let (mut peers, t0) = (Peers::default(), Instant::now());
        peers.heard(Uuid::new_v4(), Say::Alive, SECOND, t0);
        peers.refresh(t0 + 10 * SECOND);
        assert!(peers.expire(t0 + 12 * SECOND).is_empty());
        assert_eq!(peers.expire(t0 + 14 * SECOND).len(), 1);
    }

    #[test]
    fn a_peer_s_hello_is_heard_and_answered_at_once_and_an_alive_is_not() {
        let (me, newcomer, running) = (Liveness::new("a".into()), Liveness::new("a".into()), Liveness::new("a".into()));
        let hub = Hub::new();
        let answered = || futures::FutureExt::now_or_never(me.answer.notified()).is_some();
        me.heard(&hub, running.payload(Say::Alive));
        assert!(!answered(), "an alive is not answered");
        me.heard(&hub, newcomer.payload(Say::Hello));
        assert_eq!(me.peers(), 2, "the newcomer is heard");
        assert!(answered(), "a hello is answered");
    }

    #[test]
    fn announcements_cross_the_wire() {
        let live = Liveness::new("natter.events.alive".to_owned());
        for say in [Say::Alive, Say::Goodbye, Say::GoodbyeLost, Say::Lost, Say::Hello] {
            let wire = Wire::decode(live.payload(say)).unwrap();
            assert_eq!(Uuid::from_slice(&wire.process).unwrap(), live.me);
            assert_eq!(Say::from_wire(wire.kind), say);
            assert_eq!(wire.interval, 1_000_000);
        }
        assert_eq!(Say::from_wire(99), Say::Alive, "an unknown kind still says the peer is there");
        assert!(live.payload(Say::Alive).len() < 32, "one small message per process per interval");
    }
}
