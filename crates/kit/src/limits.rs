//! Abuse limits every service shares: keyed rate limits that answer
//! RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo`, the client address a
//! per-address limit is keyed by, and the one check every stored string
//! passes (length, and no U+0000, which PostgreSQL `text` cannot hold).
//!
//! Rate limits are kept in memory, per process: in split mode each replica
//! enforces its own, so N replicas behind a balancer admit up to N times a
//! limit. A limiter shared by every replica would cost a round trip to
//! PostgreSQL or Redis on every call it guards, for limits that only need to
//! be the right order of magnitude.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

/// Lets a repeated event through at most once per period and counts the
/// ones it holds back in between: for log lines that would otherwise repeat
/// on every failing call (a refused credential, a dependency down, a
/// collector unreachable), each saying how many like it went unlogged.
/// Shared by clones.
#[derive(Clone, Debug)]
pub struct Throttle {
    every: Duration,
    state: std::sync::Arc<std::sync::Mutex<Throttled>>,
}

/// What a [`Throttle`] remembers.
#[derive(Debug, Default)]
struct Throttled {
    /// When an event was last let through.
    last: Option<std::time::Instant>,
    /// Events held back since then.
    held: u64,
}

impl Throttle {
    /// A throttle that admits once per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, state: std::sync::Arc::default() }
    }

    /// `Some(held)` at the first call and then once `every` has passed since
    /// the last `Some`, where `held` is how many calls got `None` since that
    /// one (0 the first time); else `None`.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(std::time::Instant::now())
    }

    fn admit_at(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.last.is_some_and(|t| now.saturating_duration_since(t) < self.every) {
            state.held += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.held))
    }
}

/// Most ids one internal LookupUsers call takes; at least the most members a
/// group may have (1,000), and callers with more split them into calls of
/// this size.
pub const LOOKUP_USERS_MAX_IDS: usize = 1000;

/// Longest page token accepted, in bytes (tokens this server issues are far
/// shorter: a keyset position and a fingerprint).
pub const PAGE_TOKEN_MAX_BYTES: usize = 1024;

/// A flag value for a rate limit: `N/PERIOD` admits at most N calls at once
/// and N per PERIOD on average (a GCRA bucket of N cells refilled evenly over
/// PERIOD, a humantime duration: `60/1m`, `5/1s`, `100/1h`); `off` admits
/// everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rate {
    /// No limit.
    Off,
    /// At most `count` at once, refilled at `count` per `period`.
    Limit {
        /// Burst size and calls per period.
        count: NonZeroU32,
        /// The period `count` calls are spread over.
        period: Duration,
    },
}

impl Rate {
    /// Parses `off` or `N/PERIOD` (see [`Rate`]); the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("off") {
            return Ok(Self::Off);
        }
        let (count, period) = s.split_once('/').ok_or_else(|| format!("{s:?} is not N/PERIOD (60/1m) or off"))?;
        let count: NonZeroU32 =
            count.trim().parse().map_err(|_| format!("{count:?} is not a count above 0 (in N/PERIOD)"))?;
        let period = period.trim();
        // `60/m` reads as `60/1m`.
        let period = humantime::parse_duration(period)
            .or_else(|_| humantime::parse_duration(&format!("1{period}")))
            .map_err(|e| format!("{period:?} is not a period (1s, 1m, 1h): {e}"))?;
        if period.is_zero() {
            return Err("the period must be more than 0".to_owned());
        }
        Ok(Self::Limit { count, period })
    }

    /// The governor quota, `None` when off.
    fn quota(self) -> Option<Quota> {
        match self {
            Self::Off => None,
            Self::Limit { count, period } => {
                let interval = period / count.get();
                Quota::with_period(interval.max(Duration::from_nanos(1))).map(|q| q.allow_burst(count))
            }
        }
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Limit { count, period } => write!(f, "{count}/{}", humantime::format_duration(*period)),
        }
    }
}

/// A refused call: what was limited and when to try again. Becomes
/// RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many {what}: retry in {}", humantime::format_duration(round_up(*retry_after)))]
pub struct Limited {
    /// What was limited, plural (`sends`, `log-in attempts for this username`).
    pub what: &'static str,
    /// How long until the call would be admitted.
    pub retry_after: Duration,
}

/// Rounds up to whole milliseconds (a message saying "retry in 0ns" helps
/// nobody; RetryInfo keeps full precision).
fn round_up(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

impl From<Limited> for Status {
    fn from(limited: Limited) -> Self {
        let details = ErrorDetails::with_retry_info(Some(limited.retry_after));
        Status::with_error_details(Code::ResourceExhausted, limited.to_string(), details)
    }
}

/// RESOURCE_EXHAUSTED for a call refused because the whole server is at one
/// of its process-wide caps (not the caller's own limit): the message says
/// `server busy: {why}; retry in {retry_after}`, with a
/// `google.rpc.RetryInfo` of `retry_after`.
pub fn server_busy(why: &str, retry_after: Duration) -> Status {
    let details = ErrorDetails::with_retry_info(Some(retry_after));
    let message = format!("server busy: {why}; retry in {}", humantime::format_duration(round_up(retry_after)));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// Checks between housekeeping looks at the limiter's size.
const HOUSEKEEPING_EVERY: u64 = 1024;
/// Keys a limiter holds before housekeeping starts dropping idle ones.
const HOUSEKEEPING_MIN_KEYS: usize = 4096;

/// A rate limit per key (a user id, a client address), on governor's keyed
/// GCRA limiter. Keys whose bucket is full again are dropped by
/// housekeeping (`retain_recent`) whenever the number of keys has doubled
/// since the last sweep, so memory follows the keys active within one
/// period, at amortised O(1) cost per check.
pub struct RateLimiter<K: Hash + Eq + Clone> {
    what: &'static str,
    limiter: Option<DefaultKeyedRateLimiter<K>>,
    rate: Rate,
    clock: DefaultClock,
    checks: AtomicU64,
    sweep_at: AtomicUsize,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("what", &self.what).field("on", &self.limiter.is_some()).finish()
    }
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// A limiter of `rate` per key; `what` (plural) names the limited calls
    /// in the RESOURCE_EXHAUSTED message.
    pub fn new(what: &'static str, rate: Rate) -> Self {
        Self {
            what,
            limiter: rate.quota().map(DefaultKeyedRateLimiter::keyed),
            rate,
            clock: DefaultClock::default(),
            checks: AtomicU64::new(0),
            sweep_at: AtomicUsize::new(HOUSEKEEPING_MIN_KEYS),
        }
    }

    /// Admits one call for `key`, or says how long until it would be.
    ///
    /// Errors: [`Limited`] when `key` has used its quota.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        self.check_n(key, 1)
    }

    /// Admits `n` units for `key` at once (bytes of a message: see
    /// [`Rate`], whose N is then units, not calls), or says how long until
    /// it would; 0 units pass without a look. `n` above the whole burst is
    /// taken as the burst, so it passes once the bucket is full again
    /// rather than never.
    ///
    /// Errors: [`Limited`] when `key` lacks `n` units now.
    pub fn check_n(&self, key: &K, n: u64) -> Result<(), Limited> {
        let (Some(limiter), Rate::Limit { count, period }) = (&self.limiter, self.rate) else { return Ok(()) };
        let Some(n) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX).min(count.get())) else { return Ok(()) };
        if self.checks.fetch_add(1, Ordering::Relaxed).is_multiple_of(HOUSEKEEPING_EVERY) {
            self.housekeeping(limiter);
        }
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                Err(Limited { what: self.what, retry_after: not_until.wait_time_from(self.clock.now()) })
            }
            // Not reached (`n` is at most the burst): a whole period refills it.
            Err(_) => Err(Limited { what: self.what, retry_after: period }),
        }
    }

    fn housekeeping(&self, limiter: &DefaultKeyedRateLimiter<K>) {
        if limiter.len() < self.sweep_at.load(Ordering::Relaxed) {
            return;
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
        self.sweep_at.store((limiter.len() * 2).max(HOUSEKEEPING_MIN_KEYS), Ordering::Relaxed);
    }

    /// Keys held now (for tests and housekeeping).
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, DefaultKeyedRateLimiter::len)
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Checks of unproven bearer tokens per client address: a call whose token
/// has not passed a check within [`PROVEN_FOR`] draws on its address's
/// budget (a GCRA bucket at `rate`, see [`Rate`]) before it goes on, and
/// beyond the budget is refused with RESOURCE_EXHAUSTED. A guesser's random
/// tokens each cost the sessions store a look-up; this caps what one
/// address can make it do, whatever it sends at once and whether or not it
/// waits for the answers, the way fail2ban caps SSH log-ins. A token that
/// passed a check costs nothing, so people behind the same NAT, or behind
/// a proxy not named in `--trusted-proxies`, keep using the sessions they
/// have while a guesser among them is held back. Calls that need no token
/// (log-in, a new guest, health) are never counted: they have limits of
/// their own.
///
/// Tokens are kept as a keyed hash (SipHash with this process's random
/// keys), never as text, in memory per process, like every
/// [`RateLimiter`]; those not seen for [`PROVEN_FOR`] are swept once the
/// map has doubled since the last sweep.
pub struct AuthFailures {
    unproven: RateLimiter<IpAddr>,
    /// Hash of a token -> when it last passed a check.
    proven: std::sync::Mutex<Proven>,
    hasher: std::hash::RandomState,
}

/// How long a token that passed a check is let through without drawing on
/// its address's budget.
pub const PROVEN_FOR: Duration = Duration::from_secs(15 * 60);

/// The proven tokens of [`AuthFailures`].
#[derive(Debug)]
struct Proven {
    at: std::collections::HashMap<u64, std::time::Instant>,
    sweep_at: usize,
}

impl std::fmt::Debug for AuthFailures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthFailures").field("unproven", &self.unproven).finish_non_exhaustive()
    }
}

impl AuthFailures {
    /// Checks of unproven tokens admitted per address at `rate` (`off`:
    /// none counted, none refused).
    pub fn new(rate: Rate) -> Self {
        Self {
            unproven: RateLimiter::new("checks of new or failed tokens from this address", rate),
            proven: std::sync::Mutex::new(Proven {
                at: std::collections::HashMap::new(),
                sweep_at: HOUSEKEEPING_MIN_KEYS,
            }),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn hash(&self, token: &[u8]) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, token)
    }

    /// Admits a call from `client` carrying `token` (the `authorization`
    /// value): at once if the token passed a check within [`PROVEN_FOR`],
    /// else by drawing on the address's budget.
    ///
    /// Errors: [`Limited`] when the budget is spent.
    pub fn check(&self, client: IpAddr, token: &[u8]) -> Result<(), Limited> {
        self.check_at(client, token, std::time::Instant::now())
    }

    fn check_at(&self, client: IpAddr, token: &[u8], now: std::time::Instant) -> Result<(), Limited> {
        let proven = self.proven.lock().unwrap_or_else(|p| p.into_inner()).at.get(&self.hash(token)).copied();
        if proven.is_some_and(|t| now.saturating_duration_since(t) < PROVEN_FOR) {
            return Ok(());
        }
        self.unproven.check(&client)
    }

    /// Records that `token` passed a check (a service answered the call).
    pub fn passed(&self, token: &[u8]) {
        self.passed_at(token, std::time::Instant::now());
    }

    fn passed_at(&self, token: &[u8], now: std::time::Instant) {
        let key = self.hash(token);
        let mut proven = self.proven.lock().unwrap_or_else(|p| p.into_inner());
        if proven.at.len() >= proven.sweep_at {
            proven.at.retain(|_, t| now.saturating_duration_since(*t) < PROVEN_FOR);
            proven.sweep_at = (proven.at.len() * 2).max(HOUSEKEEPING_MIN_KEYS);
        }
        proven.at.insert(key, now);
    }

    /// Records that `token` failed a check: it is unproven again.
    pub fn failed(&self, token: &[u8]) {
        self.proven.lock().unwrap_or_else(|p| p.into_inner()).at.remove(&self.hash(token));
    }
}

/// How a server clients reach finds the address a call came from for its
/// per-address shares (of the request budget, `crate::budget`, and of the
/// streams without a token, `crate::tokenless`): as [`client_addr`], from
/// the binary's own flags (the edge's `--trusted-proxies`; the
/// all-in-one's `--trust-forwarded-for` and `--trusted-proxies`), the
/// source its other per-address limits use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientAddresses {
    /// Believe the last `x-forwarded-for` entry (behind natter's edge).
    pub trust_forwarded_for: bool,
    /// The proxies whose `x-forwarded-for` entries are believed.
    pub trusted: TrustedProxies,
}

impl ClientAddresses {
    /// The client of a request ([`client_addr`]); `None` when it has no
    /// socket or its trusted header names no address.
    pub fn of(&self, parts: &http::request::Parts) -> Option<IpAddr> {
        client_addr(parts, self.trust_forwarded_for, &self.trusted)
    }
}

/// The address a call came from, for per-address limits: as
/// [`client_ip`], from an HTTP request's parts (for a tower layer, before
/// tonic has made a [`tonic::Request`] of it).
pub fn client_addr(
    parts: &http::request::Parts,
    trust_forwarded_for: bool,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(tonic::transport::server::TcpConnectInfo::remote_addr)
        .map(|a| a.ip());
    let forwarded = parts.headers.get_all("x-forwarded-for");
    client_from(peer, || forwarded.iter().filter_map(|v| v.to_str().ok()), trust_forwarded_for, trusted)
}

/// [`client_ip`] and [`client_addr`] from the peer and the values of
/// `x-forwarded-for`.
fn client_from<'a, I: DoubleEndedIterator<Item = &'a str>>(
    peer: Option<IpAddr>,
    forwarded: impl Fn() -> I,
    trust_forwarded_for: bool,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let ip = if trust_forwarded_for && forwarded().next().is_some() {
        let last = forwarded().flat_map(|v| v.split(',')).next_back()?;
        parse_forwarded(last.trim())?
    } else {
        trusted.client(peer?, forwarded())
    };
    Some(match ip {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from_bits(v6.to_bits() & !(u128::MAX >> 64))),
        v4 => v4,
    })
}

/// The address a call came from, for per-address limits: the TCP peer, or,
/// when `trust_forwarded_for` (the service runs behind natter's edge, which
/// sets `x-forwarded-for` to the client it found), the last entry of
/// `x-forwarded-for`, the one the nearest proxy wrote. Never trust the
/// header on a port clients reach directly: anyone can send it. Else, when
/// the peer is one of the `trusted` proxies (an ingress in front of the
/// all-in-one), the client those proxies name ([`TrustedProxies::client`]).
/// `None` for an in-process call (no socket) or a header that is not an
/// address; a trusted call without the header counts by its peer.
///
/// An IPv6 address counts by its /64 network (its other bits zero): one
/// subscriber is usually given a whole /64 (RFC 6177) and may use any
/// address in it, so a per-address limit on the full 128 bits limits
/// nobody. An IPv4 address (or an IPv4-mapped IPv6 one) counts as itself.
pub fn client_ip<T>(
    request: &tonic::Request<T>,
    trust_forwarded_for: bool,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let forwarded = request.metadata().get_all("x-forwarded-for");
    let peer = request.remote_addr().map(|a| a.ip());
    client_from(peer, || forwarded.iter().filter_map(|v| v.to_str().ok()), trust_forwarded_for, trusted)
}

/// The proxies in front of a server whose `x-forwarded-for` entries are
/// believed (`--trusted-proxies`): networks in CIDR notation, separated by
/// commas (`10.0.0.0/8,192.0.2.7`; a bare address is its own /32 or
/// /128). Empty: none, the TCP peer is the client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ipnet::IpNet>);

impl std::str::FromStr for TrustedProxies {
    type Err = String;

    /// Errors: an entry that is neither a network nor an address, named.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nets = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let net = entry
                .parse::<ipnet::IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("{entry:?} is no network (CIDR, like 10.0.0.0/8) nor IP address"))?;
            nets.push(net);
        }
        Ok(Self(nets))
    }
}

impl TrustedProxies {
    /// True when none is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is one of the proxies.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client behind `peer` (the TCP peer), by the `x-forwarded-for`
    /// entries `forwarded` (every value of the header, in order): while the
    /// address in hand is a trusted proxy, the entry that proxy appended
    /// (the rightmost one not yet read) is the next address; the first
    /// address that is no trusted proxy is the client. This is the
    /// "rightmost untrusted address" rule (MDN, X-Forwarded-For, "Selecting
    /// an IP address"): entries left of it are the client's own claims and
    /// never read. A proxy that appended nothing, or something that is no
    /// address, is taken for the client itself.
    pub fn client<'a>(&self, peer: IpAddr, forwarded: impl DoubleEndedIterator<Item = &'a str>) -> IpAddr {
        let mut entries = forwarded.flat_map(|v| v.split(',')).rev();
        let mut ip = peer.to_canonical();
        while self.contains(ip) {
            match entries.next().and_then(|e| parse_forwarded(e.trim())) {
                Some(next) => ip = next,
                None => break,
            }
        }
        ip
    }
}

/// An `x-forwarded-for` entry: an IP address, with or without a port
/// (`192.0.2.1`, `192.0.2.1:4711`, `[2001:db8::1]:4711`, `2001:db8::1`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .map(|ip| ip.to_canonical())
}

/// How a string field's length is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxLen {
    /// Bytes of UTF-8 (message text, URLs: what storage and the wire pay).
    Bytes(usize),
    /// Unicode scalar values (titles, names: what a person sees).
    Chars(usize),
}

/// Checks a string field before it is stored or used in a query: at most
/// `max` long and free of U+0000, which PostgreSQL `text` cannot hold (on
/// SQLite it would be stored, and cut short by its string functions). The
/// error describes the rule broken; the caller names the field.
pub fn check_str(value: &str, max: MaxLen) -> Result<(), String> {
    match max {
        MaxLen::Bytes(max) if value.len() > max => return Err(format!("must be at most {max} bytes")),
        // More bytes than allowed chars can still be few enough chars; count
        // only then.
        MaxLen::Chars(max) if value.len() > max && value.chars().count() > max => {
            return Err(format!("must be at most {max} characters"));
        }
        _ => {}
    }
    if value.contains('\0') {
        return Err("must not contain NUL (U+0000)".to_owned());
    }
    Ok(())
}

/// Checks a name others are shown (a display name, a chat title): no
/// control characters (Unicode category Cc), and none of the invisible or
/// direction-changing characters ([`hidden_in_names`]). The error
/// describes the rule broken, with the character's code point; the caller
/// names the field.
pub fn check_shown_name(value: &str) -> Result<(), String> {
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    match value.chars().find(|c| hidden_in_names(*c)) {
        Some(c) => {
            Err(format!("must not contain U+{:04X} (an invisible or direction-changing character)", u32::from(c)))
        }
        None => Ok(()),
    }
}

/// Whether `c` is one of the invisible or direction-changing characters
/// that let one name pass for another or reorder the text around it where
/// it is shown, which [`check_shown_name`] refuses:
/// - the bidirectional embeddings, overrides and isolates, U+202A..=U+202E
///   and U+2066..=U+2069 (Unicode UAX #9, section 2; "Trojan Source",
///   CVE-2021-42574);
/// - the zero-width space U+200B, the word joiner and invisible operators
///   U+2060..=U+2064, the byte-order mark U+FEFF, the soft hyphen U+00AD,
///   the combining grapheme joiner U+034F, the Mongolian vowel separator
///   U+180E, and the Hangul fillers U+115F, U+1160, U+3164 and U+FFA0
///   (blank letters that make a name look empty).
///
/// The zero-width joiner and non-joiner (U+200D, U+200C: emoji sequences,
/// Persian and Indic scripts), variation selectors (emoji presentation)
/// and the left-to-right and right-to-left marks (U+200E, U+200F: weak,
/// they reorder nothing past the name) are not among them.
pub fn hidden_in_names(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
            | '\u{200B}'
            | '\u{2060}'..='\u{2064}'
            | '\u{FEFF}'
            | '\u{00AD}'
            | '\u{034F}'
            | '\u{180E}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{3164}'
            | '\u{FFA0}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_names_refuse_invisible_and_direction_changing_characters() {
        for name in ["Alice Liddell", "👩\u{200D}💻 Ann", "مریم\u{200C}ی", "❤\u{FE0F} Bob", "\u{200F}שרה"]
        {
            assert_eq!(check_shown_name(name), Ok(()), "{name:?}");
        }
        let refused = check_shown_name("al\u{202E}ecila").unwrap_err();
        assert_eq!(refused, "must not contain U+202E (an invisible or direction-changing character)");
        for name in ["a\u{2066}b", "al\u{200B}ice", "\u{3164}", "x\u{FEFF}", "soft\u{AD}hyphen", "a\u{2069}"] {
            assert!(check_shown_name(name).is_err(), "{name:?}");
        }
        assert_eq!(check_shown_name("a\u{7}b"), Err("must not contain control characters".to_owned()));
    }

    #[test]
    fn unproven_tokens_beyond_the_rate_are_refused_from_that_address_only() {
        let failures = AuthFailures::new(Rate::parse("3/1h").unwrap());
        let (guesser, neighbour): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let now = std::time::Instant::now();
        failures.passed_at(b"Bearer good", now);
        for i in 0..3 {
            assert_eq!(failures.check_at(guesser, format!("Bearer guess {i}").as_bytes(), now), Ok(()), "{i}");
        }
        // Counted as the calls go in, whether or not they come back.
        let refused = failures.check_at(guesser, b"Bearer new", now).unwrap_err();
        assert_eq!(refused.what, "checks of new or failed tokens from this address");
        assert!(refused.retry_after > Duration::from_secs(1000), "a refill of one check: {refused:?}");
        assert_eq!(failures.check_at(neighbour, b"Bearer new", now), Ok(()), "another address is not refused");
        // A token that passed a check lately gets through, until it fails
        // or is not seen for a while.
        for _ in 0..10 {
            assert_eq!(failures.check_at(guesser, b"Bearer good", now), Ok(()), "costs nothing");
        }
        assert!(failures.check_at(guesser, b"Bearer good", now + PROVEN_FOR).is_err(), "not seen for a while");
        failures.failed(b"Bearer good");
        assert!(failures.check_at(guesser, b"Bearer good", now).is_err(), "a failure forgets it");
        let off = AuthFailures::new(Rate::Off);
        for _ in 0..100 {
            assert_eq!(off.check_at(guesser, b"Bearer guess", now), Ok(()), "off counts nothing");
        }
    }

    #[test]
    fn a_throttle_admits_once_per_period_and_counts_the_rest() {
        let throttle = Throttle::new(Duration::from_secs(60));
        let start = std::time::Instant::now();
        assert_eq!(throttle.admit_at(start), Some(0), "the first is logged");
        for s in [1, 30, 59] {
            assert_eq!(throttle.admit_at(start + Duration::from_secs(s)), None, "held back at {s} s");
        }
        // A clone shares the count: one throttle per dependency, whatever
        // holds it.
        assert_eq!(throttle.clone().admit_at(start + Duration::from_secs(60)), Some(3), "the three held back");
        assert_eq!(throttle.admit_at(start + Duration::from_secs(61)), None);
        assert_eq!(throttle.admit_at(start + Duration::from_secs(200)), Some(1));
    }

    #[test]
    fn rates_parse_from_flags() {
        assert_eq!(Rate::parse("off").unwrap(), Rate::Off);
        let r = Rate::parse("60/1m").unwrap();
        assert_eq!(r, Rate::Limit { count: NonZeroU32::new(60).unwrap(), period: Duration::from_secs(60) });
        assert_eq!(Rate::parse("60/m").unwrap(), r);
        assert_eq!(r.to_string(), "60/1m");
        for bad in ["", "60", "0/1m", "-1/1m", "x/1m", "60/soon", "60/0s"] {
            assert!(Rate::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_key_gets_its_burst_then_a_retry_time() {
        let limiter = RateLimiter::new("sends", Rate::parse("3/1h").unwrap());
        for _ in 0..3 {
            limiter.check(&"alice").unwrap();
        }
        let refused = limiter.check(&"alice").unwrap_err();
        assert_eq!(refused.what, "sends");
        // One cell comes back every 20 minutes.
        assert!(refused.retry_after > Duration::from_secs(19 * 60) && refused.retry_after <= Duration::from_secs(1200));
        // Other keys are not affected.
        limiter.check(&"bob").unwrap();
        let status = Status::from(refused);
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(status.message().starts_with("too many sends: retry in "), "{}", status.message());
        let retry = status.get_error_details().retry_info().expect("retry info").retry_delay.expect("delay");
        assert!(retry > Duration::from_secs(19 * 60));
    }

    /// Units at once (bytes): a key draws several from one bucket, none
    /// for 0; more than the whole bucket passes once it is full, as the
    /// bucket, never as a refusal that no wait could end.
    #[test]
    fn units_draw_on_one_bucket_and_more_than_it_waits_for_a_full_one() {
        let limiter = RateLimiter::new("bytes stored", Rate::parse("100/1h").unwrap());
        limiter.check_n(&"alice", 60).unwrap();
        let refused = limiter.check_n(&"alice", 50).unwrap_err();
        // 10 units short, one every 36 s.
        assert!(refused.retry_after > Duration::from_secs(5 * 60) && refused.retry_after <= Duration::from_secs(360));
        limiter.check_n(&"alice", 40).unwrap();
        limiter.check_n(&"alice", 0).unwrap();
        limiter.check_n(&"alice", 1).unwrap_err();

        limiter.check_n(&"bob", 5_000).expect("a full bucket admits more than it holds, as the bucket");
        let refused = limiter.check_n(&"bob", 5_000).unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(59 * 60), "a whole bucket to wait for: {refused:?}");
    }

    #[test]
    fn off_admits_everything_and_holds_nothing() {
        let limiter = RateLimiter::new("sends", Rate::Off);
        for i in 0..10_000 {
            limiter.check(&i).unwrap();
        }
        assert!(limiter.is_empty());
    }

    #[test]
    fn idle_keys_are_swept() {
        // Keys refill within a microsecond, so every earlier key is idle.
        let limiter = RateLimiter::new("calls", Rate::parse("1/1us").unwrap());
        for i in 0..(HOUSEKEEPING_MIN_KEYS as u64 * 4) {
            limiter.check(&i).unwrap();
        }
        assert!(limiter.len() < HOUSEKEEPING_MIN_KEYS * 2, "{} keys kept", limiter.len());
    }

    #[test]
    fn the_client_is_the_rightmost_address_that_is_no_trusted_proxy() {
        let trusted: TrustedProxies = "10.0.0.0/8, 192.0.2.7".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let client = |peer: &str, header: &[&str]| trusted.client(ip(peer), header.iter().copied());
        // A client straight to us: its header, forged, is never read.
        assert_eq!(client("203.0.113.9", &["198.51.100.1"]), ip("203.0.113.9"));
        // Through the ingress (10.1.2.3): the entry it appended.
        assert_eq!(client("10.1.2.3", &["198.51.100.1, 203.0.113.9"]), ip("203.0.113.9"));
        // Through two trusted hops, the header split over two lines.
        assert_eq!(client("10.1.2.3", &["6.6.6.6, 203.0.113.9", "192.0.2.7"]), ip("203.0.113.9"));
        // A trusted proxy that appended nothing (or garbage) is the client.
        assert_eq!(client("10.1.2.3", &[]), ip("10.1.2.3"));
        assert_eq!(client("10.1.2.3", &["unknown"]), ip("10.1.2.3"));
        // None trusted: the peer, always.
        assert_eq!(TrustedProxies::default().client(ip("10.1.2.3"), ["203.0.113.9"].into_iter()), ip("10.1.2.3"));
        let bad = "10.0.0.0/8,nonsense".parse::<TrustedProxies>().unwrap_err();
        assert!(bad.contains("nonsense"), "{bad}");
    }

    #[test]
    fn the_forwarded_address_counts_only_when_trusted() {
        let mut request = tonic::Request::new(());
        request.metadata_mut().insert("x-forwarded-for", "198.51.100.7, 203.0.113.9".parse().unwrap());
        assert_eq!(client_ip(&request, false, &TrustedProxies::default()), None, "no socket, header ignored");
        assert_eq!(
            client_ip(&request, true, &TrustedProxies::default()),
            Some("203.0.113.9".parse().unwrap()),
            "the last entry"
        );
        request.metadata_mut().insert("x-forwarded-for", "[2001:db8::1]:4711".parse().unwrap());
        assert_eq!(
            client_ip(&request, true, &TrustedProxies::default()),
            Some("2001:db8::".parse().unwrap()),
            "an IPv6 client by its /64"
        );
        request.metadata_mut().insert("x-forwarded-for", "2001:db8::dead:beef:1".parse().unwrap());
        assert_eq!(
            client_ip(&request, true, &TrustedProxies::default()),
            Some("2001:db8::".parse().unwrap()),
            "any address of the /64"
        );
        request.metadata_mut().insert("x-forwarded-for", "2001:db8:0:1::1".parse().unwrap());
        assert_eq!(
            client_ip(&request, true, &TrustedProxies::default()),
            Some("2001:db8:0:1::".parse().unwrap()),
            "the next /64 apart"
        );
        request.metadata_mut().insert("x-forwarded-for", "::ffff:192.0.2.1".parse().unwrap());
        assert_eq!(
            client_ip(&request, true, &TrustedProxies::default()),
            Some("192.0.2.1".parse().unwrap()),
            "one key per IPv4 client"
        );
        request.metadata_mut().insert("x-forwarded-for", "unknown".parse().unwrap());
        assert_eq!(client_ip(&request, true, &TrustedProxies::default()), None);
    }

    #[test]
    fn strings_are_bounded_and_nul_free() {
        assert!(check_str("héllo", MaxLen::Chars(5)).is_ok());
        assert_eq!(check_str("héllo!", MaxLen::Chars(5)).unwrap_err(), "must be at most 5 characters");
        assert_eq!(check_str("héllo", MaxLen::Bytes(5)).unwrap_err(), "must be at most 5 bytes");
        assert_eq!(check_str("a\0b", MaxLen::Bytes(5)).unwrap_err(), "must not contain NUL (U+0000)");
        assert!(check_str("", MaxLen::Bytes(0)).is_ok());
    }
}
