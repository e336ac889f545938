//! Answers of other services kept in memory by a replica, dropped when the
//! event bus says they changed: token introspections (by the sessions
//! service's revocations) and memberships (by the chats service's changes).
//!
//! The guarantee (README, "Replicas"): once RevokeSession or a membership
//! change has returned, no replica answers from its cache as if it had not
//! happened. The RPC returns only after it published the invalidation and
//! the NATS server confirmed it; a replica answers a look-up from its cache
//! only after a round trip of its own to the server (a *sync*, started
//! after the look-up began, shared by every look-up waiting at the time)
//! has confirmed it has applied every invalidation the server took before.
//! It is the read-side barrier of ZooKeeper's `sync` and etcd's ReadIndex:
//! it costs a replica one NATS round trip per batch of cache hits, instead
//! of a call to the owning service and a database query per check. A
//! replica whose bus connection is down, lagging or just re-established
//! clears its caches and answers from the owning service
//! ([`Invalidator::set_live`]) until it is connected again; an entry also
//! expires after a TTL (`--cache-ttl`), a backstop.
//!
//! One RPC needs one sync, however many look-ups it makes (a send checks a
//! token, then a membership): the guarantee is about calls that *arrive*
//! after the change returned, so any sync confirmed that started after the
//! call arrived covers all its look-ups. natter's RPC layer records each
//! call's arrival ([`within_call`]); a look-up inside a call reuses the
//! last confirmed sync if it started after that instant, and syncs anew
//! otherwise (and always outside a call).
//!
//! A look-up that misses gets a [`Ticket`]: the cache's generation, which
//! every invalidation and clear moves on. Its answer is stored only if the
//! generation has not moved meanwhile, so an answer read from the owner
//! before a change and returned after its invalidation is never cached (the
//! same rule as the all-in-one's exact caches in the sessions and chats
//! services).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use uuid::Uuid;

/// What a change is about; each cached entry carries the tags whose change
/// drops it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tag {
    /// A session (revoked).
    Session(Uuid),
    /// A user (a guest claimed, so its sessions' introspections changed).
    User(Uuid),
    /// A chat (any change of its members, roles, visibility or state).
    Chat(Uuid),
}

impl Tag {
    /// Bytes on the wire: one kind byte (1 session, 2 user, 3 chat) and the
    /// 16 bytes of the UUID.
    pub const WIRE_LEN: usize = 17;

    /// Appends this tag's [`Tag::WIRE_LEN`] bytes to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        let (kind, id) = match self {
            Tag::Session(id) => (1, id),
            Tag::User(id) => (2, id),
            Tag::Chat(id) => (3, id),
        };
        out.push(kind);
        out.extend_from_slice(id.as_bytes());
    }

    /// The tags of `bytes` (a concatenation of [`Tag::encode`]s), or `None`
    /// when its length or a kind byte is not one of them.
    pub fn decode_all(bytes: &[u8]) -> Option<Vec<Tag>> {
        if !bytes.len().is_multiple_of(Self::WIRE_LEN) {
            return None;
        }
        bytes
            .chunks_exact(Self::WIRE_LEN)
            .map(|chunk| {
                let id = Uuid::from_slice(&chunk[1..]).ok()?;
                match chunk[0] {
                    1 => Some(Tag::Session(id)),
                    2 => Some(Tag::User(id)),
                    3 => Some(Tag::Chat(id)),
                    _ => None,
                }
            })
            .collect()
    }
}

/// A cache the [`Invalidator`] reaches.
pub trait Invalidate: Send + Sync {
    /// Drops the entries carrying any of `tags`.
    fn invalidate(&self, tags: &[Tag]);
    /// Drops every entry.
    fn clear(&self);
}

tokio::task_local! {
    /// When the RPC being served arrived (see [`within_call`]).
    static CALL_ARRIVAL: Instant;
}

/// Runs `call`, an RPC's handling, with the instant it arrived known to
/// the caches' look-ups inside it, so they share one sync (module docs).
/// Work the call spawns onto other tasks does not inherit it and syncs on
/// its own.
pub fn within_call<F: std::future::Future>(
    arrival: Instant,
    call: F,
) -> tokio::task::futures::TaskLocalFuture<Instant, F> {
    CALL_ARRIVAL.scope(arrival, call)
}

/// The caches of one process and the state of the bus that keeps them
/// right: the bus calls [`Invalidator::invalidate`] for each invalidation it
/// receives and [`Invalidator::set_live`] as its connection comes and goes.
pub struct Invalidator {
    /// Whether caches may answer: the bus is connected and caught up.
    live: AtomicBool,
    caches: Mutex<Vec<Weak<dyn Invalidate>>>,
    /// The bus's sync ([`Invalidator::set_sync`]); none: invalidations are
    /// applied synchronously (one process).
    sync: OnceLock<SyncFn>,
    /// The newest confirmed sync, for look-ups of calls that arrived
    /// before it was asked for.
    synced: Mutex<Synced>,
}

/// See [`Invalidator::sync`].
#[derive(Default)]
struct Synced {
    /// When the newest confirmed sync was asked for (the round it waited
    /// for started no earlier); none since the last liveness change.
    asked: Option<Instant>,
    /// Moves on at every liveness change: a sync asked for before one
    /// confirms nothing after it.
    epoch: u64,
}

/// A bus's sync: resolves to true once every invalidation the bus had
/// taken when it was called has been applied, false if that could not be
/// confirmed.
pub type SyncFn = Box<dyn Fn() -> BoxFuture<'static, bool> + Send + Sync>;

impl std::fmt::Debug for Invalidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidator").field("live", &self.live.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Invalidator {
    /// An invalidator with no caches yet; `live` as [`Invalidator::set_live`].
    pub fn new(live: bool) -> Arc<Self> {
        METRICS.bypass.set(i64::from(!live));
        Arc::new(Self {
            live: AtomicBool::new(live),
            caches: Mutex::default(),
            sync: OnceLock::new(),
            synced: Mutex::default(),
        })
    }

    fn caches(&self) -> MutexGuard<'_, Vec<Weak<dyn Invalidate>>> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn each(&self, f: impl Fn(&dyn Invalidate)) {
        let caches: Vec<_> = self.caches().iter().filter_map(Weak::upgrade).collect();
        for cache in caches {
            f(cache.as_ref());
        }
    }

    /// Sets the bus's sync, which every cache hit awaits (once; later calls
    /// are ignored).
    pub fn set_sync(&self, sync: SyncFn) {
        let _ = self.sync.set(sync);
    }

    /// Waits until every invalidation the bus had taken when this was
    /// called (or, inside an RPC, when that call arrived) is applied: true
    /// at once without a sync (one process) or when a confirmed sync asked
    /// for after the call arrived covers it, false if the bus could not
    /// confirm it (the caller must not answer from a cache then).
    pub async fn sync(&self) -> bool {
        let Some(sync) = self.sync.get() else { return true };
        if let Ok(arrival) = CALL_ARRIVAL.try_with(|arrival| *arrival)
            && self.synced().asked.is_some_and(|asked| asked >= arrival)
        {
            return true;
        }
        let (asked, epoch) = (Instant::now(), self.synced().epoch);
        let confirmed = sync().await;
        let mut synced = self.synced();
        if confirmed && synced.epoch == epoch && synced.asked.is_none_or(|a| a < asked) {
            synced.asked = Some(asked);
        }
        confirmed
    }

    fn synced(&self) -> MutexGuard<'_, Synced> {
        self.synced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether caches may answer now.
    pub fn live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// Drops every cached entry carrying any of `tags`, in every cache.
    pub fn invalidate(&self, tags: &[Tag]) {
        self.each(|cache| cache.invalidate(tags));
    }

    /// Drops every cached entry, in every cache, without changing whether
    /// they may answer: what a bus does when another process says it lost
    /// invalidations it cannot name.
    pub fn invalidate_all(&self) {
        self.each(|cache| cache.clear());
    }

    /// Clears every cache and says whether they may answer from now on:
    /// false while the bus is disconnected (invalidations would be missed),
    /// true once it is connected and subscribed again. A slow-consumer
    /// notice (invalidations may have been dropped) clears with `true`.
    pub fn set_live(&self, live: bool) {
        // Stop answering first, so no look-up hits between the clear and
        // the flag.
        if !live {
            self.live.store(false, Ordering::Release);
        }
        // A sync from before the change confirms nothing after it.
        {
            let mut synced = self.synced();
            synced.epoch += 1;
            synced.asked = None;
        }
        self.each(|cache| cache.clear());
        if live {
            self.live.store(true, Ordering::Release);
        }
        METRICS.bypass.set(i64::from(!live));
    }

    fn register(&self, cache: Weak<dyn Invalidate>) {
        let mut caches = self.caches();
        caches.retain(|c| c.strong_count() > 0);
        caches.push(cache);
    }
}

/// The result of [`TaggedCache::get`].
#[derive(Debug)]
pub enum Lookup<V> {
    /// A live entry.
    Hit(V),
    /// No live entry: ask the owner, then [`TaggedCache::put`] with this
    /// ticket.
    Miss(Ticket),
    /// The bus is not live (or caching is off): ask the owner, store
    /// nothing.
    Bypass,
}

/// The cache's generation when a look-up missed.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

struct Entry<V> {
    value: V,
    stored: Instant,
    /// The tags it is listed under in `by_tag`.
    tags: Vec<Tag>,
}

struct Inner<K, V> {
    entries: HashMap<K, Entry<V>>,
    /// The keys carrying each tag (may name keys dropped since).
    by_tag: HashMap<Tag, Vec<K>>,
    generation: u64,
}

/// A map from `K` to `V` whose entries carry [`Tag`]s, expire after a TTL
/// and are dropped by the process's [`Invalidator`].
pub struct TaggedCache<K, V> {
    /// Its series of `natter_cache_lookups_total` (hit, miss, bypass) and
    /// `natter_cache_invalidations_total`, resolved once: a look-up only
    /// bumps an atomic.
    hits: IntCounter,
    misses: IntCounter,
    bypasses: IntCounter,
    invalidations: IntCounter,
    ttl: Duration,
    capacity: usize,
    invalidator: Arc<Invalidator>,
    inner: Mutex<Inner<K, V>>,
}

impl<K, V> TaggedCache<K, V>
where
    K: Clone + Eq + Hash + Send + 'static,
    V: Clone + Send + 'static,
{
    /// A cache called `name` in metrics, holding entries for `ttl` (zero:
    /// it never answers) and at most `capacity` of them (then it starts
    /// over), registered with `invalidator`.
    pub fn new(name: &'static str, ttl: Duration, capacity: usize, invalidator: Arc<Invalidator>) -> Arc<Self> {
        let lookups = |result| METRICS.lookups.with_label_values(&[name, result]);
        let cache = Arc::new(Self {
            hits: lookups("hit"),
            misses: lookups("miss"),
            bypasses: lookups("bypass"),
            invalidations: METRICS.invalidations.with_label_values(&[name]),
            ttl,
            capacity,
            invalidator: invalidator.clone(),
            inner: Mutex::new(Inner { entries: HashMap::new(), by_tag: HashMap::new(), generation: 0 }),
        });
        let weak: Weak<Self> = Arc::downgrade(&cache);
        invalidator.register(weak);
        cache
    }

    fn inner(&self) -> MutexGuard<'_, Inner<K, V>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live entry of `key`, or what to do without one. An entry is
    /// answered only after the bus's sync (see the module's guarantee): a
    /// look-up that found one waits for it, then looks again.
    pub async fn get(&self, key: &K) -> Lookup<V> {
        if self.ttl.is_zero() || !self.invalidator.live() {
            return self.count(Lookup::Bypass);
        }
        if let Lookup::Miss(ticket) = self.peek(key) {
            return self.count(Lookup::Miss(ticket));
        }
        if !self.invalidator.sync().await || !self.invalidator.live() {
            return self.count(Lookup::Bypass);
        }
        let found = self.peek(key);
        self.count(found)
    }

    /// The entry of `key` as it is now, without a sync.
    fn peek(&self, key: &K) -> Lookup<V> {
        let inner = self.inner();
        match inner.entries.get(key) {
            Some(entry) if entry.stored.elapsed() < self.ttl => Lookup::Hit(entry.value.clone()),
            _ => Lookup::Miss(Ticket(inner.generation)),
        }
    }

    fn count(&self, lookup: Lookup<V>) -> Lookup<V> {
        match lookup {
            Lookup::Hit(_) => &self.hits,
            Lookup::Miss(_) => &self.misses,
            Lookup::Bypass => &self.bypasses,
        }
        .inc();
        lookup
    }

    /// Stores `value` for `key` with `tags`, unless an invalidation or
    /// clear came since `ticket` was given out or the bus is not live.
    pub fn put(&self, ticket: Ticket, key: K, value: V, tags: Vec<Tag>) {
        let mut inner = self.inner();
        if inner.generation != ticket.0 || !self.invalidator.live() {
            return;
        }
        if inner.entries.len() >= self.capacity {
            inner.entries.clear();
            inner.by_tag.clear();
        }
        // A key stored again (after it expired) with the same tags is in
        // their lists already.
        if inner.entries.get(&key).is_none_or(|old| old.tags != tags) {
            for tag in &tags {
                inner.by_tag.entry(*tag).or_default().push(key.clone());
            }
        }
        inner.entries.insert(key, Entry { value, stored: Instant::now(), tags });
    }

    /// Drops `key`'s entry (its owner said it no longer holds), and any
    /// answer about it still on its way in.
    pub fn remove(&self, key: &K) {
        let mut inner = self.inner();
        inner.generation += 1;
        inner.entries.remove(key);
    }

    /// Entries held now (expired ones included until replaced).
    pub fn len(&self) -> usize {
        self.inner().entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K, V> Invalidate for TaggedCache<K, V>
where
    K: Clone + Eq + Hash + Send + 'static,
    V: Clone + Send + 'static,
{
    fn invalidate(&self, tags: &[Tag]) {
        let mut inner = self.inner();
        inner.generation += 1;
        let mut dropped = 0;
        for tag in tags {
            for key in inner.by_tag.remove(tag).unwrap_or_default() {
                // Its other tags' lists keep the key: harmless (a later
                // invalidation finds nothing), gone when the cache starts
                // over.
                if inner.entries.remove(&key).is_some() {
                    dropped += 1;
                }
            }
        }
        self.invalidations.inc_by(dropped);
    }

    fn clear(&self) {
        let mut inner = self.inner();
        inner.generation += 1;
        inner.entries.clear();
        inner.by_tag.clear();
    }
}

struct Metrics {
    lookups: IntCounterVec,
    invalidations: IntCounterVec,
    bypass: IntGauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let lookups = IntCounterVec::new(
        Opts::new(
            "natter_cache_lookups_total",
            "Look-ups of a replica's caches of other services' answers, by cache (tokens, memberships) and \
             result (hit, miss, bypass).",
        ),
        &["cache", "result"],
    )
    .expect("valid metric");
    let invalidations = IntCounterVec::new(
        Opts::new("natter_cache_invalidations_total", "Cached entries dropped by an invalidation from the bus."),
        &["cache"],
    )
    .expect("valid metric");
    let bypass = IntGauge::new(
        "natter_cache_bypass",
        "1 while the caches answer nothing because the bus is disconnected or resynchronising.",
    )
    .expect("valid metric");
    crate::metrics::register(Box::new(lookups.clone()));
    crate::metrics::register(Box::new(invalidations.clone()));
    crate::metrics::register(Box::new(bypass.clone()));
    Metrics { lookups, invalidations, bypass }
});

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(invalidator: &Arc<Invalidator>) -> Arc<TaggedCache<u32, &'static str>> {
        TaggedCache::new("test", Duration::from_secs(60), 100, invalidator.clone())
    }

    async fn fill(cache: &TaggedCache<u32, &'static str>, key: u32, value: &'static str, tags: Vec<Tag>) {
        match cache.get(&key).await {
            Lookup::Miss(ticket) => cache.put(ticket, key, value, tags),
            other => panic!("expected a miss, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn an_invalidation_drops_the_entries_of_its_tags_only() {
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        fill(&cache, 1, "one", vec![Tag::Session(a), Tag::User(b)]).await;
        fill(&cache, 2, "two", vec![Tag::Session(b)]).await;
        assert!(matches!(cache.get(&1).await, Lookup::Hit("one")));
        invalidator.invalidate(&[Tag::User(b)]);
        assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "dropped by its user tag");
        assert!(matches!(cache.get(&2).await, Lookup::Hit("two")), "a session tag of the same uuid is another tag");
    }

    #[tokio::test]
    async fn an_answer_read_before_an_invalidation_is_not_stored_after_it() {
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        let chat = Uuid::now_v7();
        let Lookup::Miss(ticket) = cache.get(&1).await else { panic!("empty cache") };
        invalidator.invalidate(&[Tag::Chat(chat)]);
        cache.put(ticket, 1, "stale", vec![Tag::Chat(chat)]);
        assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "the stale answer was not kept");
    }

    #[tokio::test]
    async fn a_bus_that_is_not_live_bypasses_and_clears() {
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        fill(&cache, 1, "one", vec![]).await;
        let Lookup::Miss(ticket) = cache.get(&2).await else { panic!("not cached") };
        invalidator.set_live(false);
        assert!(matches!(cache.get(&1).await, Lookup::Bypass));
        cache.put(ticket, 2, "two", vec![]);
        assert!(cache.is_empty(), "cleared, and nothing stored while not live");
        invalidator.set_live(true);
        assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "back, empty");
    }

    #[tokio::test]
    async fn entries_expire_and_a_zero_ttl_caches_nothing() {
        let invalidator = Invalidator::new(true);
        let cache = TaggedCache::new("test", Duration::from_millis(1), 100, invalidator.clone());
        fill(&cache, 1, "one", vec![]).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "expired");
        let off = TaggedCache::<u32, u32>::new("test", Duration::ZERO, 100, invalidator);
        assert!(matches!(off.get(&1).await, Lookup::Bypass));
    }

    #[tokio::test]
    async fn a_hit_waits_for_the_sync_and_what_it_applied_counts() {
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        let chat = Uuid::now_v7();
        fill(&cache, 1, "one", vec![Tag::Chat(chat)]).await;
        // The bus's sync applies an invalidation that was on its way.
        let on_the_way = Arc::downgrade(&invalidator);
        invalidator.set_sync(Box::new(move || {
            let invalidator = on_the_way.upgrade();
            Box::pin(async move {
                if let Some(invalidator) = invalidator {
                    invalidator.invalidate(&[Tag::Chat(chat)]);
                }
                true
            })
        }));
        assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "the entry the sync dropped is not answered");
    }

    #[tokio::test]
    async fn a_sync_that_fails_bypasses() {
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        fill(&cache, 1, "one", vec![]).await;
        invalidator.set_sync(Box::new(|| Box::pin(async { false })));
        assert!(matches!(cache.get(&1).await, Lookup::Bypass), "unconfirmed: ask the owner");
    }

    #[tokio::test]
    async fn one_call_needs_one_sync_and_a_later_call_a_new_one() {
        use std::sync::atomic::AtomicUsize;
        let invalidator = Invalidator::new(true);
        let cache = cache(&invalidator);
        fill(&cache, 1, "one", vec![]).await;
        fill(&cache, 2, "two", vec![]).await;
        let rounds = Arc::new(AtomicUsize::new(0));
        let counted = rounds.clone();
        invalidator.set_sync(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { true })
        }));
        let rounds = || rounds.load(Ordering::SeqCst);
        let hits_in_one_call = || {
            within_call(Instant::now(), async {
                assert!(matches!(cache.get(&1).await, Lookup::Hit("one")));
                assert!(matches!(cache.get(&2).await, Lookup::Hit("two")));
            })
        };
        hits_in_one_call().await;
        assert_eq!(rounds(), 1, "the token and the membership check of one call share a sync");
        hits_in_one_call().await;
        assert_eq!(rounds(), 2, "a call that arrived after that sync was asked for syncs anew");
        assert!(matches!(cache.get(&1).await, Lookup::Hit("one")));
        assert!(matches!(cache.get(&2).await, Lookup::Hit("two")));
        assert_eq!(rounds(), 4, "outside a call every hit syncs");

        // A call that arrived before a liveness change reuses nothing from
        // before it.
        let arrived_early = within_call(Instant::now(), async {
            assert!(matches!(cache.get(&1).await, Lookup::Hit("one")));
            invalidator.set_live(false);
            invalidator.set_live(true);
            fill(&cache, 2, "two", vec![]).await;
            assert!(matches!(cache.get(&2).await, Lookup::Hit("two")));
        });
        arrived_early.await;
        assert_eq!(rounds(), 6, "the sync before the change did not cover the look-up after it");
    }

    #[test]
    fn tags_round_trip_and_bad_bytes_are_refused() {
        let tags = vec![Tag::Session(Uuid::now_v7()), Tag::User(Uuid::now_v7()), Tag::Chat(Uuid::now_v7())];
        let mut bytes = Vec::new();
        tags.iter().for_each(|t| t.encode(&mut bytes));
        assert_eq!(Tag::decode_all(&bytes), Some(tags));
        assert_eq!(Tag::decode_all(&bytes[1..]), None, "a partial tag");
        bytes[0] = 9;
        assert_eq!(Tag::decode_all(&bytes), None, "an unknown kind");
    }
}
