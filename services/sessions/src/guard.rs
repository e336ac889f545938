//! Log-in throttling that slows password guessing without locking the owner
//! out.
//!
//! Two rules, both in memory and per process (a replica counts only the
//! attempts it served; sharing the counts would cost a database or Redis
//! round trip per log-in):
//!
//! - **Back-off per (username, client address).** Every attempt counts as a
//!   failure until it succeeds. The first `free_failures` cost no wait (a
//!   typo, then the right password, is never held up); after the n-th
//!   failure beyond them the same address must wait `backoff × 2^(n-1)` (at
//!   most `backoff_max`) before trying that username again, and concurrent
//!   attempts wait too. A success clears the
//!   record; an address that has not failed for `max(4 × backoff_max, 1h)`
//!   starts afresh. An attacker elsewhere never delays the owner's address.
//! - **A looser budget per username, across addresses**, drawn only by
//!   attempts from addresses that already failed for that username (the
//!   retries of a guesser, wherever they come from). The owner's first
//!   attempt from a clean address never draws on it, so a distributed
//!   guesser can spend it without locking the owner out, and gets one
//!   guess per address before the back-off and this budget apply.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use natter_kit::limits::{Limited, Rate, RateLimiter};

/// Fewest records before a sweep of forgotten ones is worth its cost.
const SWEEP_MIN: usize = 4096;

/// One address's failures for one username.
#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    /// No attempt before this.
    until: Instant,
    last: Instant,
}

#[derive(Debug, Default)]
struct Records {
    by_key: HashMap<(String, Option<IpAddr>), Failures>,
    sweep_at: usize,
}

/// The log-in throttle (see the module docs).
#[derive(Debug)]
pub struct LoginGuard {
    backoff: Duration,
    backoff_max: Duration,
    /// Failures per (username, address) that cost no wait.
    free_failures: u32,
    forget_after: Duration,
    records: Mutex<Records>,
    retries: RateLimiter<String>,
}

impl LoginGuard {
    /// A guard with back-off `backoff` (zero: none) doubling up to
    /// `backoff_max`, and `retry_rate` attempts per username by addresses
    /// that failed for it.
    pub fn new(backoff: Duration, backoff_max: Duration, free_failures: u32, retry_rate: Rate) -> Self {
        Self {
            backoff,
            backoff_max,
            free_failures,
            forget_after: (backoff_max * 4).max(Duration::from_secs(3600)),
            records: Mutex::new(Records { by_key: HashMap::new(), sweep_at: SWEEP_MIN }),
            retries: RateLimiter::new("log-in attempts for this username", retry_rate),
        }
    }

    /// The wait after `failures` failures.
    fn wait(&self, failures: u32) -> Duration {
        let beyond = failures.saturating_sub(self.free_failures);
        if beyond == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(beyond - 1).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.backoff_max)
    }

    /// Admits a log-in attempt for `username_key` (lower case) from
    /// `client`, recording it as a failure until [`LoginGuard::succeeded`].
    ///
    /// Errors: [`Limited`] while the address backs off, or when the
    /// username's retry budget is spent.
    pub fn admit(&self, username_key: &str, client: Option<IpAddr>, now: Instant) -> Result<(), Limited> {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.by_key.len() >= records.sweep_at {
            let forget_after = self.forget_after;
            records.by_key.retain(|_, f| now.saturating_duration_since(f.last) < forget_after);
            records.sweep_at = (records.by_key.len() * 2).max(SWEEP_MIN);
        }
        let key = (username_key.to_owned(), client);
        let previous =
            records.by_key.get(&key).copied().filter(|f| now.saturating_duration_since(f.last) < self.forget_after);
        let count = match previous {
            Some(f) if f.until > now => {
                return Err(Limited {
                    what: "failed log-ins for this username from this address",
                    retry_after: f.until - now,
                });
            }
            Some(f) => {
                self.retries.check(&key.0)?;
                f.count.saturating_add(1)
            }
            None => 1,
        };
        records.by_key.insert(key, Failures { count, until: now + self.wait(count), last: now });
        Ok(())
    }

    /// Clears the record of `client` for `username_key` after a successful
    /// log-in.
    pub fn succeeded(&self, username_key: &str, client: Option<IpAddr>) {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records.by_key.remove(&(username_key.to_owned(), client));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn guard() -> LoginGuard {
        LoginGuard::new(Duration::from_secs(1), Duration::from_secs(60), 0, Rate::parse("3/1h").unwrap())
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let g = LoginGuard::new(Duration::from_secs(1), Duration::from_secs(60), 0, Rate::Off);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            g.admit("alice", ip("192.0.2.1"), now).unwrap();
            let refused = g.admit("alice", ip("192.0.2.1"), now).unwrap_err();
            waits.push(refused.retry_after.as_secs());
            now += refused.retry_after;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }

    #[test]
    fn the_first_failures_cost_no_wait() {
        let g = LoginGuard::new(Duration::from_secs(1), Duration::from_secs(60), 2, Rate::Off);
        let now = Instant::now();
        // A typo and another: each retry is admitted at once.
        g.admit("alice", ip("192.0.2.1"), now).unwrap();
        g.admit("alice", ip("192.0.2.1"), now).unwrap();
        // The third failure is the first that holds the address back.
        g.admit("alice", ip("192.0.2.1"), now).unwrap();
        assert_eq!(g.admit("alice", ip("192.0.2.1"), now).unwrap_err().retry_after, Duration::from_secs(1));
    }

    #[test]
    fn the_owner_elsewhere_is_not_delayed_and_success_clears() {
        let g = guard();
        let now = Instant::now();
        g.admit("alice", ip("192.0.2.1"), now).unwrap();
        assert!(g.admit("alice", ip("192.0.2.1"), now).is_err(), "the guesser waits");
        g.admit("alice", ip("198.51.100.2"), now).unwrap();
        g.succeeded("alice", ip("198.51.100.2"));
        g.admit("alice", ip("198.51.100.2"), now).unwrap();
        g.admit("bob", ip("192.0.2.1"), now).unwrap();
    }

    #[test]
    fn retries_from_many_addresses_share_one_budget_per_username() {
        let g = guard();
        let mut now = Instant::now();
        let addresses: Vec<_> = (1..=5).map(|i| ip(&format!("192.0.2.{i}"))).collect();
        for a in &addresses {
            g.admit("alice", *a, now).unwrap();
        }
        now += Duration::from_secs(2);
        let admitted = addresses.iter().filter(|a| g.admit("alice", **a, now).is_ok()).count();
        assert_eq!(admitted, 3, "the budget of 3 retries per hour");
        let refused = g.admit("alice", addresses[4], now).unwrap_err();
        assert_eq!(refused.what, "log-in attempts for this username");
        // A clean address (the owner's) is not refused.
        g.admit("alice", ip("203.0.113.9"), now).unwrap();
    }

    #[test]
    fn records_are_forgotten_after_a_quiet_hour() {
        let g = guard();
        let now = Instant::now();
        for _ in 0..5 {
            let _ = g.admit("alice", ip("192.0.2.1"), now);
        }
        assert!(g.admit("alice", ip("192.0.2.1"), now).is_err());
        let later = now + Duration::from_secs(3601);
        g.admit("alice", ip("192.0.2.1"), later).unwrap();
        assert!(g.admit("alice", ip("192.0.2.1"), later).unwrap_err().retry_after <= Duration::from_secs(1));
    }
}
