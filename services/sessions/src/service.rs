//! The sessions domain: registration, log-in, token checks, revocation.
//! Plain Rust over the [`Store`]; the gRPC layer only translates.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use natter_bus::{EventBus, Topic};
use natter_kit::cache::Tag;
use natter_kit::id::UserId;
use natter_kit::limits::RateLimiter;
use natter_kit::time::now_micros;
use uuid::Uuid;

use crate::SessionsArgs;
use crate::domain::{self, NewUser};
use crate::error::SessionsError;
use crate::guard::LoginGuard;
use crate::store::{self, SessionRow, Store, TokenRow, UserRow};

/// A session just created, with its token (shown once).
#[derive(Debug)]
pub struct NewSession {
    pub session: SessionRow,
    pub token: String,
    pub user: UserRow,
}

/// Whose budget a look-up by username draws on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LookupCaller {
    /// A person's (or a claimed guest's) own, `--username-lookup-rate`:
    /// accounts cost a registration each (`--create-user-rate`, an Argon2
    /// hash).
    Account(String),
    /// Every guest at one client address together,
    /// `--guest-username-lookup-rate`: a guest costs one call, so per guest
    /// the budget would be no cap at all.
    GuestsAt(Option<IpAddr>),
}

/// The sessions service's domain object; cheap to share behind an `Arc`.
pub struct Sessions {
    store: Store,
    bus: Arc<dyn EventBus>,
    session_ttl: Duration,
    /// Whether the client address comes from `x-forwarded-for`.
    trust_forwarded_for: bool,
    /// The proxies whose `x-forwarded-for` entries name the client.
    trusted_proxies: natter_kit::TrustedProxies,
    /// CreateSession calls per client address.
    create_session_rate: RateLimiter<Option<IpAddr>>,
    create_guest_rate: RateLimiter<Option<IpAddr>>,
    /// `--password-check-queue`.
    password_check_queue: usize,
    /// CreateUser calls per client address.
    create_user_rate: RateLimiter<Option<IpAddr>>,
    /// Log-in back-off and per-username budget.
    logins: LoginGuard,
    /// GetUser by username, per account.
    username_lookup_rate: RateLimiter<String>,
    /// GetUser by username, by guests per address.
    guest_username_lookup_rate: RateLimiter<Option<IpAddr>>,
    /// UpdateUser and ChangePassword, per user.
    profile_change_rate: RateLimiter<String>,
    /// Live tokens by hash; only when this is the only sessions instance
    /// (see [`Sessions::with_token_cache`]).
    cache: Option<Mutex<TokenCache>>,
}

/// Cached live tokens by hash, and a generation that every eviction bumps: a
/// look-up that raced with a revocation (read the store before it, would
/// cache after its eviction) sees the generation moved and does not cache.
#[derive(Default)]
struct TokenCache {
    /// token hash -> its session, and when it was cached (µs).
    entries: HashMap<String, (TokenRow, i64)>,
    generation: u64,
}

/// How long a cached token is trusted without asking the store again (µs).
/// The cache is exact while this process is the only one revoking (see
/// [`Sessions::with_token_cache`]); should a second process share the
/// database without NATS (a misconfiguration), its revocations reach this
/// one within this time rather than at the token's expiry.
const CACHE_TTL_US: i64 = 10_000_000;

/// Most tokens the cache holds before it starts over.
const CACHE_ENTRIES: usize = 100_000;

impl Sessions {
    /// A service over `store`, announcing revocations on `bus`, with the
    /// session lifetime and limits of `args`.
    pub fn new(store: Store, bus: Arc<dyn EventBus>, args: &SessionsArgs) -> Self {
        Self {
            store,
            bus,
            session_ttl: args.session_ttl,
            trust_forwarded_for: args.trust_forwarded_for,
            trusted_proxies: args.trusted_proxies.clone(),
            create_session_rate: RateLimiter::new("sessions created from this address", args.create_session_rate),
            create_guest_rate: RateLimiter::new("guests created from this address", args.create_guest_rate),
            password_check_queue: args.password_check_queue as usize,
            create_user_rate: RateLimiter::new("users created from this address", args.create_user_rate),
            logins: LoginGuard::new(
                args.login_backoff,
                args.login_backoff_max,
                args.login_free_failures,
                args.login_retry_rate,
            ),
            username_lookup_rate: RateLimiter::new("look-ups by username", args.username_lookup_rate),
            guest_username_lookup_rate: RateLimiter::new(
                "look-ups by username by guests at this address",
                args.guest_username_lookup_rate,
            ),
            profile_change_rate: RateLimiter::new("profile changes", args.profile_change_rate),
            cache: None,
        }
    }

    /// Whether per-address limits read the client address from
    /// `x-forwarded-for` (see [`natter_kit::client_ip`]).
    pub fn trusts_forwarded_for(&self) -> bool {
        self.trust_forwarded_for
    }

    /// The proxies whose `x-forwarded-for` entries name the client (see
    /// [`natter_kit::client_ip`]).
    pub fn trusted_proxies(&self) -> &natter_kit::TrustedProxies {
        &self.trusted_proxies
    }

    /// Caches live tokens in memory. Correct only when this instance is the
    /// one that revokes them (the all-in-one without NATS): revocation, claim
    /// and expiry are then all seen here, so the cache has no stale window.
    /// An entry is asked again after `CACHE_TTL_US` all the same, which
    /// bounds the window should a second process share the database.
    /// Replicas on NATS cache in the callers instead
    /// (`natter_auth::CachingVerifier`, invalidated over the bus).
    pub fn with_token_cache(mut self) -> Self {
        self.cache = Some(Mutex::new(TokenCache::default()));
        self
    }

    /// Drops cached tokens for which `keep` is false (after a change commits).
    fn evict(&self, keep: impl Fn(&TokenRow) -> bool) {
        if let Some(cache) = &self.cache {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.generation += 1;
            cache.entries.retain(|_, (row, _)| keep(row));
        }
    }

    /// Deletes the sessions that expired more than `retention` ago, a
    /// batch of 1,000 at a time, and the tokens of accounts deleted more
    /// than [`DELETED_ACCOUNT_RETRY`] ago; returns how many sessions.
    pub async fn purge_expired(&self, retention: std::time::Duration) -> Result<u64, SessionsError> {
        self.store.purge_deleted_account_tokens(natter_kit::time::micros_ago(DELETED_ACCOUNT_RETRY)).await?;
        let before = natter_kit::time::micros_ago(retention);
        let mut purged = 0;
        loop {
            let n = self.store.purge_sessions(before, 1000).await?;
            purged += n;
            if n < 1000 {
                return Ok(purged);
            }
        }
    }

    /// Deletes the guests created more than `retention` ago who have no
    /// session left (their last one purged by [`Sessions::purge_expired`]),
    /// a batch of 1,000 at a time, logging each for the chats service
    /// (`ListDeletedUsers`); returns how many. Their tokens are gone with
    /// their sessions, so no cache holds them. Nothing is announced here:
    /// the chats service, taking each out of its chats within seconds,
    /// tells each chat's streams first (`user_updated.deleted`), which is
    /// soon enough for guests gone this long. A notice per guest on the
    /// presence topic would cost every replica a chats call per guest, and
    /// a burst of them could make replicas fall behind that topic.
    pub async fn purge_guests(&self, retention: std::time::Duration) -> Result<usize, SessionsError> {
        let before = natter_kit::time::micros_ago(retention);
        let mut deleted = 0;
        loop {
            let gone = self.store.purge_guests(before, now_micros(), 1000).await?;
            deleted += gone.len();
            if gone.len() < 1000 {
                return Ok(deleted);
            }
        }
    }

    /// Up to `limit` entries of the deletion log after `after` (see
    /// [`Store::deleted_users`]).
    pub async fn deleted_users(&self, after: i64, limit: i64) -> Result<Vec<(i64, String, i64)>, SessionsError> {
        self.store.deleted_users(after, limit).await
    }

    /// The store (for shutdown).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Registers a password user; `client` is the caller's address, for the
    /// per-address limit.
    pub async fn create_user(&self, client: Option<IpAddr>, new: NewUser) -> Result<UserRow, SessionsError> {
        self.create_user_rate.check(&client)?;
        let hash = self.hash_for(&new.username, new.password).await?;
        let user = UserRow {
            id: Uuid::now_v7().to_string(),
            username: Some(new.username.as_str().to_owned()),
            display_name: new.display_name,
            password_hash: Some(hash),
            create_time: now_micros(),
            kind: store::HUMAN.to_owned(),
            profile_version: 0,
        };
        self.store.insert_user(&user, Some(&new.username.key())).await?;
        tracing::info!(user_id = %user.id, "user created");
        Ok(user)
    }

    /// Internal: the bot user named `username` (an automated member such as
    /// the assistant), created with `display_name` if it does not exist yet.
    /// A bot has no password: no log-in reaches it.
    ///
    /// Errors: INVALID_ARGUMENT for a malformed username or display name;
    /// ALREADY_EXISTS when the username belongs to a human or a claimed
    /// guest.
    pub async fn ensure_bot(&self, username: &str, display_name: &str) -> Result<UserRow, SessionsError> {
        let username = domain::Username::parse(username).map_err(|r| SessionsError::invalid("username", r))?;
        let display_name = domain::display_name_or_username(display_name, &username)
            .map_err(|r| SessionsError::invalid("display_name", r))?;
        let key = username.key();
        if let Some(existing) = self.store.user_by_key(&key).await? {
            return if existing.kind == store::BOT { Ok(existing) } else { Err(SessionsError::UsernameTaken) };
        }
        let user = UserRow {
            id: Uuid::now_v7().to_string(),
            username: Some(username.as_str().to_owned()),
            display_name,
            password_hash: None,
            create_time: now_micros(),
            kind: store::BOT.to_owned(),
            profile_version: 0,
        };
        match self.store.insert_user(&user, Some(&key)).await {
            Ok(()) => {
                tracing::info!(user_id = %user.id, username = username.as_str(), "bot user created");
                Ok(user)
            }
            // Created by a concurrent call: that one, if it is a bot.
            Err(SessionsError::UsernameTaken) => match self.store.user_by_key(&key).await? {
                Some(existing) if existing.kind == store::BOT => Ok(existing),
                _ => Err(SessionsError::UsernameTaken),
            },
            Err(e) => Err(e),
        }
    }

    /// Logs in with a username and password from `client` (see
    /// [`crate::guard`] for the back-off).
    pub async fn login(
        &self,
        client: Option<IpAddr>,
        username: &str,
        password: &str,
    ) -> Result<NewSession, SessionsError> {
        domain::check_credentials(username, password).map_err(|(field, r)| SessionsError::invalid(field, r))?;
        self.create_session_rate.check(&client)?;
        let key = username.to_ascii_lowercase();
        // A place in the password checks' queue first: a log-in refused for
        // a full queue (a flood from elsewhere) is no failed log-in.
        let place = argon2_place(self.password_check_queue)?;
        // The user read before the throttle counts the attempt: a store that
        // fails is no failed log-in either.
        let user = self.store.user_by_key(&key).await?;
        self.logins.admit(&key, client, Instant::now())?;
        // Verify against a dummy hash for unknown users so that timing does
        // not tell which usernames exist.
        let phc = match user.as_ref().and_then(|u| u.password_hash.clone()) {
            Some(phc) => phc,
            None => dummy_hash().to_owned(),
        };
        let ok = verify_in(place, password.to_owned(), phc).await?;
        // Only a password user logs in: a bot has no password, and the dummy
        // hash must never let anyone in.
        let Some(user) = user.filter(|u| ok && u.kind == store::HUMAN && u.password_hash.is_some()) else {
            return Err(SessionsError::BadCredentials);
        };
        self.logins.succeeded(&key, client);
        // Deleted while its password was checked: as if it never existed.
        self.start_session(user).await.map_err(|e| match e {
            SessionsError::UserNotFound => SessionsError::BadCredentials,
            e => e,
        })
    }

    /// A new session of `user`, stored.
    async fn start_session(&self, user: UserRow) -> Result<NewSession, SessionsError> {
        let (session, token) = self.new_session(&user.id);
        self.store.insert_session(&session, &domain::token_hash(&token)).await?;
        Ok(NewSession { session, token, user })
    }

    /// The Argon2 hash of `password` for a new password user named
    /// `username`. A taken username is refused before hashing (each hash
    /// holds a core for tens of milliseconds); the insert that follows
    /// still decides a race.
    ///
    /// Errors: ALREADY_EXISTS (taken), RESOURCE_EXHAUSTED
    /// (--password-check-queue).
    async fn hash_for(&self, username: &domain::Username, password: String) -> Result<String, SessionsError> {
        if self.store.user_by_key(&username.key()).await?.is_some() {
            return Err(SessionsError::UsernameTaken);
        }
        hash_password(password, self.password_check_queue).await
    }

    /// Creates a guest user and its first session for a caller at `client`
    /// (within --create-session-rate and --create-guest-rate).
    pub async fn create_guest(&self, client: Option<IpAddr>) -> Result<NewSession, SessionsError> {
        self.create_session_rate.check(&client)?;
        self.create_guest_rate.check(&client)?;
        let id = Uuid::now_v7();
        let user = UserRow {
            id: id.to_string(),
            username: None,
            display_name: domain::guest_name(&id),
            password_hash: None,
            create_time: now_micros(),
            kind: store::GUEST.to_owned(),
            profile_version: 0,
        };
        let (session, token) = self.new_session(&user.id);
        self.store.insert_user_with_session(&user, &session, &domain::token_hash(&token)).await?;
        tracing::info!(user_id = %user.id, "guest created");
        Ok(NewSession { session, token, user })
    }

    fn new_session(&self, user_id: &str) -> (SessionRow, String) {
        let now = now_micros();
        let ttl = i64::try_from(self.session_ttl.as_micros()).unwrap_or(i64::MAX);
        let session = SessionRow {
            id: Uuid::now_v7().to_string(),
            user_id: user_id.to_owned(),
            create_time: now,
            expire_time: now.saturating_add(ttl),
        };
        (session, domain::new_token())
    }

    /// The live session a token belongs to, or `None` (unknown, expired, revoked).
    pub async fn introspect(&self, token: &str) -> Result<Option<TokenRow>, SessionsError> {
        if token.is_empty() || token.len() > 256 {
            return Ok(None);
        }
        let hash = domain::token_hash(token);
        let now = now_micros();
        let mut generation = 0;
        if let Some(cache) = &self.cache {
            let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((row, cached)) = cache.entries.get(&hash)
                && row.expire_time > now
                && now - cached < CACHE_TTL_US
            {
                return Ok(Some(row.clone()));
            }
            generation = cache.generation;
        }
        let row = self.store.session_by_token(&hash).await?.filter(|r| r.revoke_time.is_none() && r.expire_time > now);
        if let (Some(cache), Some(row)) = (&self.cache, &row) {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.generation == generation {
                if cache.entries.len() >= CACHE_ENTRIES {
                    cache.entries.clear();
                }
                cache.entries.insert(hash, (row.clone(), now));
            }
        }
        Ok(row)
    }

    /// A user by id.
    pub async fn user(&self, user_id: &str) -> Result<UserRow, SessionsError> {
        self.store.user_by_id(user_id).await?.ok_or(SessionsError::UserNotFound)
    }

    /// A user by username (case-insensitive), looked up by `caller` (at
    /// `--username-lookup-rate`, or `--guest-username-lookup-rate`).
    ///
    /// Errors: INVALID_ARGUMENT (`username`), RESOURCE_EXHAUSTED, NOT_FOUND.
    pub async fn user_by_username(&self, caller: LookupCaller, username: &str) -> Result<UserRow, SessionsError> {
        natter_kit::limits::check_str(username, natter_kit::limits::MaxLen::Chars(*domain::USERNAME_LEN.end()))
            .map_err(|r| SessionsError::invalid("username", r))?;
        match caller {
            LookupCaller::Account(id) => self.username_lookup_rate.check(&id)?,
            LookupCaller::GuestsAt(client) => self.guest_username_lookup_rate.check(&client)?,
        }
        self.store.user_by_key(&username.to_ascii_lowercase()).await?.ok_or(SessionsError::UserNotFound)
    }

    /// The users among `ids` that exist, in the order of `ids`.
    pub async fn users(&self, ids: &[String]) -> Result<Vec<UserRow>, SessionsError> {
        let mut rows = self.store.users_by_ids(ids).await?;
        rows.sort_by_key(|r| ids.iter().position(|id| *id == r.id));
        Ok(rows)
    }

    /// One session by id.
    pub async fn session(&self, session_id: &str) -> Result<SessionRow, SessionsError> {
        self.store.session_by_id(session_id).await?.ok_or(SessionsError::SessionNotFound)
    }

    /// A page of a user's live sessions, newest first.
    pub async fn sessions(
        &self,
        user_id: &str,
        before_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, SessionsError> {
        self.store.live_sessions(user_id, now_micros(), before_id, limit).await
    }

    /// Revokes one of a user's sessions, or all of them; announces each
    /// revocation so open streams of those sessions end.
    pub async fn revoke(&self, user_id: &str, session_id: Option<&str>, all: bool) -> Result<(), SessionsError> {
        let now = now_micros();
        let revoked = if all {
            self.store.revoke_all(user_id, now).await?
        } else {
            let session_id = session_id.ok_or_else(|| SessionsError::internal("no session id"))?;
            if !self.store.revoke(user_id, session_id, now).await? {
                return Err(SessionsError::SessionNotFound);
            }
            vec![session_id.to_owned()]
        };
        self.announce_ended(&revoked, None).await;
        Ok(())
    }

    /// After sessions `ended` (ids) ended in the store: this process's
    /// cache drops their tokens, their open streams end, and other
    /// replicas' cached introspections (and those of `user`, when given)
    /// go before this returns.
    async fn announce_ended(&self, ended: &[String], user: Option<&str>) {
        self.evict(|row| !ended.contains(&row.id));
        let ended: Vec<Uuid> = ended.iter().filter_map(|id| Uuid::try_parse(id).ok()).collect();
        for id in &ended {
            self.bus.publish(Topic::Session(*id), Arc::default());
        }
        let mut tags: Vec<Tag> = ended.into_iter().map(Tag::Session).collect();
        tags.extend(user.and_then(|u| Uuid::try_parse(u).ok()).map(Tag::User));
        self.bus.invalidate(tags).await;
    }

    /// Turns a guest into a password user, keeping its id; `client` is the
    /// caller's address. It counts against the per-address CreateUser rate
    /// (it makes a password user too), and a taken username is refused
    /// before the password is hashed: each Argon2 hash holds a core, so an
    /// unlimited stream of claims would make every log-in wait.
    ///
    /// Returns the user and a new session: every session of the guest,
    /// the caller's included, is revoked.
    ///
    /// Errors: RESOURCE_EXHAUSTED (the rate), FAILED_PRECONDITION (not a
    /// guest), ALREADY_EXISTS (the username is taken), NOT_FOUND (the
    /// account was deleted while the call ran).
    pub async fn claim(
        &self,
        client: Option<IpAddr>,
        user_id: &str,
        new: NewUser,
    ) -> Result<NewSession, SessionsError> {
        self.create_user_rate.check(&client)?;
        let current = self.user(user_id).await?;
        if !current.guest() {
            return Err(SessionsError::NotGuest);
        }
        let hash = self.hash_for(&new.username, new.password).await?;
        let username = new.username;
        // Every guest token ends with the claim, in its transaction, the
        // caller's too, and the account starts on a fresh one: a guest token
        // someone else kept or planted (a shared browser) must not open the
        // password account (session fixation, OWASP ASVS V3.2.1).
        let key = username.key();
        let claimed = self.store.claim(user_id, username.as_str(), &key, &new.display_name, &hash, now_micros());
        let ended = match claimed.await? {
            store::Claim::Claimed(ended) => ended,
            store::Claim::NotGuest => return Err(SessionsError::NotGuest),
            // DeleteAccount (or the guests' purge) won the race.
            store::Claim::Gone => return Err(SessionsError::UserNotFound),
        };
        // Cached tokens of this user still say "guest", here and in other
        // replicas' caches; the guest's streams end.
        self.evict(|row| row.user_id != user_id);
        self.announce_ended(&ended, Some(user_id)).await;
        let user = self.user(user_id).await?;
        self.announce_profile(&user);
        self.start_session(user).await
    }

    /// Tells the streams of everyone who shares a chat with `user`, and
    /// the user's own, what others now see of them (`user_updated`; see
    /// [`natter_bus::Event::user_updated`]). Ephemeral: a client that
    /// misses it re-reads users when it reconnects.
    fn announce_profile(&self, user: &UserRow) {
        let Ok(id) = Uuid::try_parse(&user.id) else { return };
        let event = natter_bus::Event::user_updated(
            UserId(id),
            user.username.clone().unwrap_or_default(),
            user.display_name.clone(),
            user.profile_version,
        );
        let event = Arc::new(event);
        self.bus.publish(Topic::User(id), event.clone());
        self.bus.publish(Topic::Presence, event);
    }

    /// Tells the streams of everyone who shares a chat with `user`, whose
    /// account is deleted, that it is ([`natter_bus::Event::user_deleted`]):
    /// a direct chat with it stays, and its person's page shows the deletion
    /// without a reload.
    fn announce_deleted(&self, user: &str) {
        if let Ok(id) = Uuid::try_parse(user) {
            self.bus.publish(Topic::Presence, Arc::new(natter_bus::Event::user_deleted(UserId(id))));
        }
    }

    /// Deletes account `user_id` at its own request from `client`
    /// (DeleteAccount): a person confirms with `password`, a guest sends
    /// none (whatever it sends is ignored). The user and its sessions go
    /// in one transaction that also logs the deletion for the chats
    /// service ([`Store::delete_user`]); then, as for a revocation, caches
    /// drop its tokens and its open streams end.
    ///
    /// A wrong password counts as a failed log-in for the username from
    /// `client` ([`LoginGuard`]): a stolen token does not open a faster way
    /// to guess the password than CreateSession.
    ///
    /// Errors: INVALID_ARGUMENT (`password` empty for a person, or too
    /// long), PERMISSION_DENIED (it does not match), RESOURCE_EXHAUSTED (the
    /// back-off, the username's log-in budget, or --password-check-queue),
    /// NOT_FOUND (deleted meanwhile), FAILED_PRECONDITION (claimed or
    /// changed meanwhile), UNAUTHENTICATED (the caller's session ended
    /// meanwhile).
    pub async fn delete_account(
        &self,
        client: Option<IpAddr>,
        caller: &TokenRow,
        password: &str,
    ) -> Result<(), SessionsError> {
        let user_id = caller.user_id.as_str();
        let user = self.user(user_id).await?;
        if let Some(phc) = user.password_hash.clone() {
            if password.is_empty() {
                return Err(SessionsError::invalid("password", "is required to delete an account that has one"));
            }
            domain::check_credentials(user.username.as_deref().unwrap_or_default(), password)
                .map_err(|(field, r)| SessionsError::invalid(field, r))?;
            let key = user.username.as_deref().unwrap_or_default().to_ascii_lowercase();
            let place = argon2_place(self.password_check_queue)?; // as in a log-in
            self.logins.admit(&key, client, Instant::now())?;
            if !verify_in(place, password.to_owned(), phc).await? {
                return Err(SessionsError::WrongPassword);
            }
            self.logins.succeeded(&key, client);
        }
        // The checks above hold at the deletion, or nothing is deleted: a
        // guest claimed meanwhile (by another holder of its token) has a
        // password nobody here confirmed.
        let deletion = self.store.delete_user(user_id, &caller.id, user.password_hash.as_deref(), now_micros()).await?;
        let sessions = match deletion {
            store::Deletion::Deleted(sessions) => sessions,
            store::Deletion::Gone => return Err(SessionsError::UserNotFound),
            store::Deletion::Changed => return Err(SessionsError::AccountChanged),
            store::Deletion::SessionEnded => return Err(SessionsError::SessionEnded),
        };
        tracing::info!(user_id, kind = user.kind, "account deleted at its own request");
        self.announce_ended(&sessions, Some(user_id)).await;
        self.announce_deleted(&caller.user_id);
        Ok(())
    }

    /// UpdateUser: sets the caller's display name (validated by
    /// [`domain::check_display_name`]; empty: the username, or a guest's
    /// own name) and returns the user.
    ///
    /// Errors: RESOURCE_EXHAUSTED (--profile-change-rate), NOT_FOUND
    /// (deleted meanwhile).
    pub async fn update_display_name(&self, user_id: &str, display_name: &str) -> Result<UserRow, SessionsError> {
        self.profile_change_rate.check(&user_id.to_owned())?;
        let user = self.user(user_id).await?;
        let name = match (display_name.trim(), &user.username) {
            ("", Some(username)) => username.clone(),
            ("", None) => Uuid::try_parse(user_id).map(|id| domain::guest_name(&id)).unwrap_or_default(),
            (name, _) => name.to_owned(),
        };
        let user = self.store.set_display_name(user_id, &name).await?.ok_or(SessionsError::UserNotFound)?;
        tracing::info!(user_id, "display name updated");
        self.announce_profile(&user);
        Ok(user)
    }

    /// ChangePassword: checks `current` as a log-in would (a wrong one
    /// counts as a failed log-in for the username from `client`), stores
    /// the hash of `new` (validated by [`domain::check_password`]) and ends
    /// every other session of the user, in one transaction; then, as for a
    /// revocation, caches drop their tokens and their streams end. The same
    /// request sent again by the session that made the change (its answer
    /// lost, or sent while it was under way) is answered OK, changing
    /// nothing more (`Sessions::changed_by`).
    ///
    /// Errors: RESOURCE_EXHAUSTED (--profile-change-rate, the back-off, the
    /// username's log-in budget, --password-check-queue), INVALID_ARGUMENT
    /// (`current` missing or too long), PERMISSION_DENIED (it does not
    /// match), FAILED_PRECONDITION (a guest; the password changed
    /// meanwhile), NOT_FOUND (deleted meanwhile).
    pub async fn change_password(
        &self,
        client: Option<IpAddr>,
        caller: &TokenRow,
        current: &str,
        new: &str,
    ) -> Result<(), SessionsError> {
        self.profile_change_rate.check(&caller.user_id)?;
        let user = self.user(&caller.user_id).await?;
        let Some(phc) = user.password_hash.clone() else { return Err(SessionsError::NoPassword) };
        let username = user.username.as_deref().unwrap_or_default();
        if current.is_empty() {
            return Err(SessionsError::invalid("current_password", "is required"));
        }
        domain::check_credentials(username, current).map_err(|(_, r)| SessionsError::invalid("current_password", r))?;
        domain::check_password(new).map_err(|r| SessionsError::invalid("new_password", r))?;
        let key = username.to_ascii_lowercase();
        let place = argon2_place(self.password_check_queue)?; // as in a log-in
        self.logins.admit(&key, client, Instant::now())?;
        if !verify_in(place, current.to_owned(), phc.clone()).await? {
            if self.changed_by(caller, new).await? {
                self.logins.succeeded(&key, client);
                return Ok(());
            }
            return Err(SessionsError::WrongPassword);
        }
        self.logins.succeeded(&key, client);
        let hash = hash_password(new.to_owned(), self.password_check_queue).await?;
        let Some(ended) = self.store.change_password(&user.id, &phc, &hash, &caller.id, now_micros()).await? else {
            // Changed meanwhile: by this very request sent twice, or not.
            if self.changed_by(caller, new).await? {
                return Ok(());
            }
            return Err(SessionsError::PasswordChanged);
        };
        tracing::info!(user_id = %user.id, ended = ended.len(), "password changed; other sessions ended");
        self.announce_ended(&ended, None).await;
        Ok(())
    }

    /// Whether a ChangePassword by `caller` to `new` is a retry of one that
    /// went through: `caller`'s session made the user's latest password
    /// change, within [`PASSWORD_CHANGE_RETRY`], and the hash it stored
    /// (still the user's) is `new`'s. Nobody else can tell a change was
    /// theirs: every other session of the user ended with it, and a session
    /// that logged in since knows the new password anyway. A session that
    /// did not make the latest change costs one read and no second hash.
    async fn changed_by(&self, caller: &TokenRow, new: &str) -> Result<bool, SessionsError> {
        let since = natter_kit::time::micros_ago(PASSWORD_CHANGE_RETRY);
        let Some(phc) = self.store.password_changed_by(&caller.user_id, &caller.id, since).await? else {
            return Ok(false);
        };
        verify_password(new.to_owned(), phc, self.password_check_queue).await
    }

    /// Whether `token` (no longer a live session's) deleted its own account
    /// within [`DELETED_ACCOUNT_RETRY`]: DeleteAccount called again with it
    /// is a retry of a call that went through, whose answer was lost.
    pub async fn deleted_by_token(&self, token: &str) -> Result<bool, SessionsError> {
        let since = natter_kit::time::micros_ago(DELETED_ACCOUNT_RETRY);
        self.store.deleted_by_token(&domain::token_hash(token), since).await
    }
}

/// How long a ChangePassword retried by the session that made the change
/// (its answer lost) is answered OK (a day, as for DeleteAccount).
pub const PASSWORD_CHANGE_RETRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How long a DeleteAccount retried with the token that deleted the
/// account is answered OK (a day: a client on a bad network retries within
/// it).
pub const DELETED_ACCOUNT_RETRY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Argon2 takes 19 MiB and a core per hash: more at once than there are
/// cores only queues in the blocking pool while the allocator keeps every
/// block it handed out (a burst of 64 log-ins left 1.2 GB resident). One
/// permit per core bounds both.
fn argon2_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    PERMITS.get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

/// Calls holding or waiting for an Argon2 permit.
static ARGON2_QUEUED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One place in the Argon2 queue, given back when dropped.
struct Queued;

impl Drop for Queued {
    fn drop(&mut self) {
        ARGON2_QUEUED.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A permit to hash: waits its turn when fewer than `queue` calls hold or
/// wait for one. Beyond, a call is refused at once rather than queued
/// behind a flood, where every real log-in would wait until its deadline.
///
/// Errors: RESOURCE_EXHAUSTED (retry in a second) when `queue` calls are
/// in line already.
async fn argon2_turn(queue: usize) -> Result<(Queued, tokio::sync::SemaphorePermit<'static>), SessionsError> {
    let queued = argon2_place(queue)?;
    let permit = argon2_permits().acquire().await.map_err(|e| SessionsError::internal(e))?;
    Ok((queued, permit))
}

/// A place in the Argon2 queue, taken at once, without waiting for a
/// permit ([`argon2_turn`] waits): a log-in takes it before the log-in
/// throttle counts the attempt, so that one refused here is not counted
/// as a failure ([`crate::guard`]).
///
/// Errors: RESOURCE_EXHAUSTED (retry in a second) when `queue` calls are
/// in line already.
fn argon2_place(queue: usize) -> Result<Queued, SessionsError> {
    let queued = Queued;
    if ARGON2_QUEUED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= queue {
        return Err(SessionsError::Limited(natter_kit::limits::Limited {
            what: "password checks under way on this server",
            retry_after: std::time::Duration::from_secs(1),
        }));
    }
    Ok(queued)
}

async fn hash_password(password: String, queue: usize) -> Result<String, SessionsError> {
    let _turn = argon2_turn(queue).await?;
    tokio::task::spawn_blocking(move || domain::hash_password(&password))
        .await
        .map_err(|e| SessionsError::internal(e))?
        .map_err(|e| SessionsError::internal(e))
}

async fn verify_password(password: String, phc: String, queue: usize) -> Result<bool, SessionsError> {
    verify_in(argon2_place(queue)?, password, phc).await
}

/// Checks `password` against `phc` from a `place` in the Argon2 queue
/// ([`argon2_place`]): waits for a permit, then hashes off the runtime.
async fn verify_in(place: Queued, password: String, phc: String) -> Result<bool, SessionsError> {
    let _turn = (place, argon2_permits().acquire().await.map_err(|e| SessionsError::internal(e))?);
    tokio::task::spawn_blocking(move || domain::verify_password(&password, &phc))
        .await
        .map_err(|e| SessionsError::internal(e))
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| domain::hash_password("natter-dummy-password").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;
    use natter_db::Db;

    use super::*;

    /// Guests long gone are purged without a notice each on the presence
    /// topic (every replica would list each one's chats): the deletion log,
    /// which the chats service follows and announces per chat, has them.
    #[tokio::test]
    async fn a_purge_of_guests_puts_nothing_on_the_presence_topic() {
        let dir = tempfile::tempdir().unwrap();
        let config = natter_db::DbConfig::sqlite_in(dir.path(), "sessions");
        let store = Store::new(Db::connect(&config, &crate::MIGRATOR).await.unwrap());
        for n in 1..=3 {
            let guest = UserRow {
                id: format!("0190a000-0000-7000-8000-00000000000{n}"),
                username: None,
                display_name: "guest".into(),
                password_hash: None,
                create_time: 0,
                kind: store::GUEST.into(),
                profile_version: 0,
            };
            store.insert_user(&guest, None).await.unwrap();
        }
        let hub = Arc::new(natter_bus::Hub::new());
        let mut presence = hub.subscribe(Topic::Presence);
        let sessions = Sessions::new(store, hub, &crate::SessionsArgs::default());
        assert_eq!(sessions.purge_guests(std::time::Duration::from_secs(1)).await.unwrap(), 3);
        assert_eq!(sessions.deleted_users(0, 10).await.unwrap().len(), 3, "logged for the chats service");
        assert!(presence.recv().now_or_never().is_none(), "nothing on the presence topic");
    }

    /// A log-in refused because the password checks' queue is full (a
    /// flood from other addresses) is not counted as a failed log-in of
    /// its username from its address: the owner's address does not back
    /// off for the flood's sake.
    #[tokio::test]
    async fn a_log_in_refused_for_a_full_password_queue_is_no_failed_log_in() {
        let dir = tempfile::tempdir().unwrap();
        let config = natter_db::DbConfig::sqlite_in(dir.path(), "sessions");
        let store = Store::new(Db::connect(&config, &crate::MIGRATOR).await.unwrap());
        let args = crate::SessionsArgs {
            password_check_queue: 0, // every check refused
            login_free_failures: 0,
            login_backoff: std::time::Duration::from_secs(3600),
            ..crate::SessionsArgs::default()
        };
        let sessions = Sessions::new(store, Arc::new(natter_bus::Hub::new()), &args);
        let client = Some(IpAddr::from([192, 0, 2, 7]));
        for _ in 0..3 {
            let refused = sessions.login(client, "alice", "correct horse battery").await.map(drop).unwrap_err();
            assert!(matches!(&refused, SessionsError::Limited(l) if l.what.contains("password checks")), "{refused:?}");
        }
        // One failure recorded would make the address wait an hour now.
        sessions.logins.admit("alice", client, Instant::now()).expect("no failure counted");
    }

    /// A log-in that fails because the store does (here: closed) is not
    /// counted as a failed log-in either.
    #[tokio::test]
    async fn a_log_in_the_store_failed_is_no_failed_log_in() {
        let dir = tempfile::tempdir().unwrap();
        let config = natter_db::DbConfig::sqlite_in(dir.path(), "sessions");
        let db = Db::connect(&config, &crate::MIGRATOR).await.unwrap();
        let args = crate::SessionsArgs {
            login_free_failures: 0,
            login_backoff: std::time::Duration::from_secs(3600),
            ..crate::SessionsArgs::default()
        };
        let sessions = Sessions::new(Store::new(db.clone()), Arc::new(natter_bus::Hub::new()), &args);
        db.close().await;
        let client = Some(IpAddr::from([192, 0, 2, 8]));
        let failed = sessions.login(client, "alice", "correct horse battery").await.map(drop).unwrap_err();
        assert!(!matches!(failed, SessionsError::BadCredentials | SessionsError::Limited(_)), "{failed:?}");
        sessions.logins.admit("alice", client, Instant::now()).expect("no failure counted");
    }
}
