//! The open StreamEvents streams of this process: the per-user cap and the
//! periodic re-check of every open stream's session.
//!
//! Both are per process: in split mode every messages replica counts and
//! checks its own streams, so a user may hold the cap on each replica.
//! Sessions are re-checked once per distinct session (many streams of one
//! device cost one check), each on its own jittered schedule, by one task
//! with a bounded number of checks in flight: a revocation whose bus event
//! was lost still ends the session's streams within the interval, and 50,000
//! streams opened together do not re-check together.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt as _;
use natter_auth::{Authenticator, Principal};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::MessagesError;

/// Session checks in flight at once at most.
const CHECKS_IN_FLIGHT: usize = 16;

/// How long a client refused by the per-user cap is asked to wait
/// (google.rpc.RetryInfo): a slot frees only when one of its streams ends.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Limits of StreamEvents (flags of the messages service).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Most streams one user may hold open on this process (replica).
    pub streams_per_user: usize,
    /// Most entries in each of a request's `chat_ids` and `resume`.
    pub chats_per_request: usize,
    /// Longest time between two checks of an open stream's session; zero:
    /// never checked.
    pub session_recheck: Duration,
    /// Streams one user may open per period (`--stream-open-rate`).
    pub open_rate: natter_kit::limits::Rate,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            streams_per_user: 32,
            chats_per_request: 1000,
            session_recheck: Duration::from_secs(60),
            open_rate: natter_kit::limits::Rate::parse("120/1m").expect("valid rate"),
        }
    }
}

/// The open streams of this process; share it behind an `Arc`.
#[derive(Debug)]
pub struct StreamRegistry {
    limits: StreamLimits,
    /// Stream opens per user ([`StreamLimits::open_rate`]).
    opens: natter_kit::limits::RateLimiter<Uuid>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Open streams by user.
    users: HashMap<Uuid, usize>,
    /// Sessions with open streams.
    sessions: HashMap<Uuid, Watched>,
    /// When each session is checked next; entries of sessions gone or
    /// rescheduled are skipped when they come up.
    due: BinaryHeap<Reverse<(Instant, Uuid)>>,
}

/// Its `Debug` leaves the token out.
struct Watched {
    token: String,
    streams: usize,
    next_check: Instant,
    /// Cancelled once the session is found revoked.
    revoked: CancellationToken,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("token", &"<redacted>")
            .field("streams", &self.streams)
            .field("next_check", &self.next_check)
            .field("revoked", &self.revoked.is_cancelled())
            .finish()
    }
}

/// One admitted stream: counts against its user's cap until dropped.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<StreamRegistry>,
    user: Uuid,
    session: Uuid,
    revoked: CancellationToken,
}

impl Ticket {
    /// Cancelled when a periodic check finds the stream's session revoked
    /// or expired.
    pub fn revoked(&self) -> &CancellationToken {
        &self.revoked
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        if let Some(n) = state.users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                state.users.remove(&self.user);
            }
        }
        if let Some(w) = state.sessions.get_mut(&self.session) {
            w.streams -= 1;
            if w.streams == 0 {
                state.sessions.remove(&self.session);
            }
        }
    }
}

/// A delay in `[interval / 2, interval]`: spreads checks over time while
/// keeping each session's checks at most `interval` apart.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::random_range(0.5..=1.0))
}

impl StreamRegistry {
    /// An empty registry enforcing `limits`.
    pub fn new(limits: StreamLimits) -> Arc<Self> {
        let opens = natter_kit::limits::RateLimiter::new("streams opened", limits.open_rate);
        Arc::new(Self { limits, opens, state: Mutex::default() })
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits one more stream of `principal` (whose bearer token is `token`).
    ///
    /// Errors (RESOURCE_EXHAUSTED with RetryInfo): the user opened more
    /// streams lately than [`StreamLimits::open_rate`] admits, or already
    /// holds [`StreamLimits::streams_per_user`] streams on this process.
    pub fn admit(self: &Arc<Self>, principal: &Principal, token: &str) -> Result<Ticket, MessagesError> {
        self.opens.check(&principal.user_id)?;
        let mut state = self.lock();
        let open = state.users.get(&principal.user_id).copied().unwrap_or(0);
        if open >= self.limits.streams_per_user {
            return Err(MessagesError::TooManyStreams {
                limit: self.limits.streams_per_user,
                retry_after: RETRY_AFTER,
            });
        }
        state.users.insert(principal.user_id, open + 1);
        let now = Instant::now();
        let interval = self.limits.session_recheck;
        let mut scheduled = None;
        let watched = state.sessions.entry(principal.session_id).or_insert_with(|| {
            let next_check = now + jittered(interval);
            scheduled = Some(next_check).filter(|_| !interval.is_zero());
            Watched { token: token.to_owned(), streams: 0, next_check, revoked: CancellationToken::new() }
        });
        watched.streams += 1;
        let revoked = watched.revoked.clone();
        if let Some(at) = scheduled {
            state.due.push(Reverse((at, principal.session_id)));
        }
        Ok(Ticket { registry: self.clone(), user: principal.user_id, session: principal.session_id, revoked })
    }

    /// Streams `user` holds open on this process.
    pub fn open_streams(&self, user: Uuid) -> usize {
        self.lock().users.get(&user).copied().unwrap_or(0)
    }

    /// The sessions whose check is due at `now`, each rescheduled.
    fn take_due(&self, now: Instant) -> Vec<(Uuid, String, CancellationToken)> {
        let mut state = self.lock();
        let interval = self.limits.session_recheck;
        let mut due = Vec::new();
        while let Some(Reverse((at, session))) = state.due.peek().copied() {
            if at > now {
                break;
            }
            state.due.pop();
            let Some(watched) = state.sessions.get_mut(&session) else { continue };
            if watched.next_check != at {
                continue;
            }
            watched.next_check = now + jittered(interval);
            let next = watched.next_check;
            due.push((session, watched.token.clone(), watched.revoked.clone()));
            state.due.push(Reverse((next, session)));
        }
        due
    }

    /// Re-checks the sessions of open streams until `shutdown` (or until the
    /// registry is dropped): a session the verifier no longer accepts has
    /// its streams ended (UNAUTHENTICATED); a failed check (the sessions
    /// service unreachable) ends nothing and is tried again next time.
    pub fn spawn_session_recheck(self: &Arc<Self>, auth: Authenticator, shutdown: CancellationToken) {
        if self.limits.session_recheck.is_zero() {
            return;
        }
        let registry: Weak<Self> = Arc::downgrade(self);
        // Fine enough that a check is late by a small part of the interval.
        let tick = (self.limits.session_recheck / 16).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut timer = tokio::time::interval(tick);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = timer.tick() => {}
                }
                let Some(due) = registry.upgrade().map(|r| r.take_due(Instant::now())) else { return };
                futures::stream::iter(due)
                    .for_each_concurrent(CHECKS_IN_FLIGHT, |(session, token, revoked)| {
                        let auth = auth.clone();
                        async move {
                            match auth.recheck(&token).await {
                                Ok(_) => {}
                                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                                    tracing::info!(session_id = %session, "session no longer valid; ending its streams");
                                    revoked.cancel();
                                }
                                Err(status) => {
                                    tracing::warn!(session_id = %session, error = %status, "session re-check failed");
                                }
                            }
                        }
                    })
                    .await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use natter_auth::SessionVerifier;
    use tonic::Status;

    use super::*;

    /// A verifier whose answer the test sets, counting its calls and the
    /// tokens it was asked about.
    #[derive(Default)]
    struct Switch {
        revoked: AtomicBool,
        down: AtomicBool,
        calls: AtomicUsize,
        tokens: Mutex<HashSet<String>>,
    }

    #[async_trait::async_trait]
    impl SessionVerifier for Switch {
        async fn introspect(&self, token: &str) -> Result<Option<Principal>, Status> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.tokens.lock().unwrap().insert(token.to_owned());
            if self.down.load(Ordering::SeqCst) {
                return Err(Status::unavailable("sessions down"));
            }
            Ok((!self.revoked.load(Ordering::SeqCst)).then(|| principal(Uuid::nil(), Uuid::nil())))
        }
    }

    fn principal(user_id: Uuid, session_id: Uuid) -> Principal {
        Principal { user_id, session_id, guest: false, expire_micros: i64::MAX }
    }

    fn limits(streams_per_user: usize, session_recheck: Duration) -> StreamLimits {
        StreamLimits { streams_per_user, session_recheck, ..StreamLimits::default() }
    }

    #[test]
    fn the_cap_counts_open_streams_per_user_and_frees_on_drop() {
        let registry = StreamRegistry::new(limits(2, Duration::from_secs(60)));
        let (alice, bob) = (principal(Uuid::now_v7(), Uuid::now_v7()), principal(Uuid::now_v7(), Uuid::now_v7()));
        let a1 = registry.admit(&alice, "ta").unwrap();
        let _a2 = registry.admit(&alice, "ta").unwrap();
        match registry.admit(&alice, "ta") {
            Err(MessagesError::TooManyStreams { limit: 2, .. }) => {}
            other => panic!("expected the cap, got {other:?}"),
        }
        let _b = registry.admit(&bob, "tb").expect("another user has a cap of their own");
        drop(a1);
        assert_eq!(registry.open_streams(alice.user_id), 1);
        let _a3 = registry.admit(&alice, "ta").expect("a slot freed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_session_ends_within_the_interval_checked_once_per_session() {
        let interval = Duration::from_secs(60);
        let registry = StreamRegistry::new(limits(32, interval));
        let switch = Arc::new(Switch::default());
        let stop = CancellationToken::new();
        registry.spawn_session_recheck(Authenticator::new(switch.clone()), stop.clone());
        let who = principal(Uuid::now_v7(), Uuid::now_v7());
        let tickets: Vec<Ticket> = (0..10).map(|_| registry.admit(&who, "t").unwrap()).collect();

        // Still valid: checked, nothing ends; ten streams of one session cost
        // one check per round.
        tokio::time::sleep(interval + Duration::from_secs(2)).await;
        let calls = switch.calls.load(Ordering::SeqCst);
        assert!((1..=2).contains(&calls), "one check per session per interval, got {calls}");
        assert!(!tickets[0].revoked().is_cancelled());

        // The sessions service is down: nothing ends.
        switch.down.store(true, Ordering::SeqCst);
        tokio::time::sleep(interval + Duration::from_secs(2)).await;
        assert!(!tickets[0].revoked().is_cancelled(), "an unreachable verifier ends no stream");
        switch.down.store(false, Ordering::SeqCst);

        // Revoked without any event: every stream of the session ends within
        // the interval (plus one tick).
        switch.revoked.store(true, Ordering::SeqCst);
        let revoked_at = Instant::now();
        tickets[9].revoked().cancelled().await;
        assert!(revoked_at.elapsed() <= interval + Duration::from_secs(1));
        assert!(tickets.iter().all(|t| t.revoked().is_cancelled()));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn checks_of_many_sessions_are_spread_over_the_interval() {
        let interval = Duration::from_secs(60);
        let registry = StreamRegistry::new(limits(32, interval));
        let switch = Arc::new(Switch::default());
        let stop = CancellationToken::new();
        registry.spawn_session_recheck(Authenticator::new(switch.clone()), stop.clone());
        let _tickets: Vec<Ticket> = (0..1000)
            .map(|i| registry.admit(&principal(Uuid::now_v7(), Uuid::now_v7()), &format!("t{i}")).unwrap())
            .collect();
        let checked = || switch.tokens.lock().unwrap().len();
        // Nothing is due in the first half of the interval; about half the
        // sessions in its third quarter; every one by its end (plus a tick).
        tokio::time::sleep(interval / 2 - Duration::from_secs(1)).await;
        assert_eq!(checked(), 0);
        tokio::time::sleep(interval / 4).await;
        assert!((300..700).contains(&checked()), "about half the sessions in the third quarter, got {}", checked());
        tokio::time::sleep(interval / 4 + Duration::from_secs(2)).await;
        assert_eq!(checked(), 1000);
        stop.cancel();
    }
}
