//! Retries of the assistant's calls that decide whether a prompt is
//! answered (CheckMembership, StartReply) when they fail transiently: a few
//! attempts with bounded exponential backoff, so that a brief outage of
//! the chats or messages service does not drop a prompt. The bound keeps a
//! call from holding up its chat (and, for CheckMembership, the bot's event
//! stream) for long; a prompt still failing after it is left unread, to be
//! replayed (see `Assistant::read_past`).
//!
//! No crate of the workspace offers backoff (neither `backon` nor
//! `tokio-retry` is a dependency), and a loop of a dozen lines needs none.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;

/// How a call that failed transiently ([`is_transient`]) is tried again:
/// up to `attempts` calls in all, waiting `first` after the first failure
/// and twice the previous wait after each later one, `max` at most.
///
/// The default, 5 attempts waiting 0.2, 0.4, 0.8 and 1.6 s, waits 3 s in
/// all, plus the attempts themselves: a callee that does not answer takes
/// each attempt's deadline (`--internal-call-timeout`, 10 s by default in
/// split mode), 53 s in all at worst. Meanwhile the prompt's chat waits
/// (StartReply) or, for CheckMembership (asked once per chat), the bot's
/// event stream. Waits are not jittered: the callers are a handful of
/// assistant replicas, not a crowd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Calls in all, the first included; 0 counts as 1.
    pub attempts: u32,
    /// The wait after the first failure.
    pub first: Duration,
    /// The longest wait between two attempts.
    pub max: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { attempts: 5, first: Duration::from_millis(200), max: Duration::from_secs(2) }
    }
}

impl Retry {
    /// The waits between the attempts, in order (`attempts - 1` of them).
    pub fn waits(&self) -> impl Iterator<Item = Duration> + use<> {
        let (first, max) = (self.first, self.max);
        (0..self.attempts.saturating_sub(1)).scan(first, move |wait, _| {
            let now = (*wait).min(max);
            *wait = now.saturating_mul(2);
            Some(now)
        })
    }

    /// Awaits `call()` until it succeeds, fails for good (a code that is
    /// not [transient](is_transient)), the attempts run out or `shutdown`
    /// fires during a wait; `what` names the call in the logs.
    ///
    /// Errors: the last attempt's status.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        shutdown: &CancellationToken,
        what: &str,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut waits = self.waits();
        let mut attempt = 1;
        loop {
            let status = match call().await {
                Err(status) if is_transient(&status) => status,
                done => return done,
            };
            let Some(wait) = waits.next() else {
                tracing::warn!(call = what, attempts = attempt, error = %status.message(), "retries failed");
                return Err(status);
            };
            tracing::info!(call = what, attempt, retry_in = ?wait, code = ?status.code(), error = %status.message(), "retrying");
            tokio::select! {
                () = shutdown.cancelled() => return Err(status),
                () = tokio::time::sleep(wait) => {}
            }
            attempt += 1;
        }
    }
}

/// Whether a failed call may succeed if tried again soon: the failures
/// [`natter_kit::Link::call`] counts as the callee's or the network's, save
/// UNIMPLEMENTED and DATA_LOSS (neither passes in seconds).
///
/// - UNAVAILABLE: the callee is down, restarting or unreachable (a link
///   not ready yet, a refused or reset connection, a server shutting down).
/// - DEADLINE_EXCEEDED: no answer within the link's deadline; the call may
///   have been carried out (a lost answer), so only idempotent calls are
///   retried.
/// - INTERNAL: a store failure (a dropped database connection, a pool
///   timeout: natter's services answer those as a plain INTERNAL) or an
///   HTTP/2 error of the transport.
/// - UNKNOWN: a transport failure tonic cannot classify.
///
/// Not RESOURCE_EXHAUSTED: natter answers it for a request over a size
/// limit (the same request fails again) and for a rate limit whose
/// RetryInfo is usually longer than the backoff. Nor ABORTED: StartReply's
/// "another reply of this chat is being generated" has its own wait (for
/// that reply's end). Never the callee's verdicts: INVALID_ARGUMENT,
/// NOT_FOUND, ALREADY_EXISTS, PERMISSION_DENIED, FAILED_PRECONDITION,
/// UNAUTHENTICATED, ...
pub fn is_transient(status: &Status) -> bool {
    natter_kit::internal::failed_in_transit(status)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tonic::Code;

    use super::*;

    #[test]
    fn the_default_waits_3_s_in_all_over_5_attempts() {
        let waits: Vec<u64> = Retry::default().waits().map(|w| w.as_millis() as u64).collect();
        assert_eq!(waits, [200, 400, 800, 1600]);
        let capped = Retry { attempts: 6, first: Duration::from_millis(500), max: Duration::from_secs(1) };
        assert_eq!(capped.waits().map(|w| w.as_millis() as u64).collect::<Vec<_>>(), [500, 1000, 1000, 1000, 1000]);
        assert_eq!(Retry { attempts: 0, ..Retry::default() }.waits().count(), 0, "one call, no wait");
    }

    #[test]
    fn only_failures_of_the_callee_or_the_network_are_transient() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::Internal, Code::Unknown] {
            assert!(is_transient(&Status::new(code, "")), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::ResourceExhausted,
            Code::Unauthenticated,
            Code::Unimplemented,
        ] {
            assert!(!is_transient(&Status::new(code, "")), "{code:?}");
        }
    }

    /// `run` of a call answering `codes` in turn (then OK): its result and
    /// how many calls it took.
    async fn calls(policy: Retry, shutdown: &CancellationToken, codes: &[Code]) -> (Result<u32, Code>, u32) {
        let made = AtomicU32::new(0);
        let result = policy
            .run(shutdown, "test", || {
                let n = made.fetch_add(1, Ordering::SeqCst);
                let answer = match codes.get(n as usize) {
                    Some(&code) => Err(Status::new(code, "")),
                    None => Ok(n),
                };
                async move { answer }
            })
            .await;
        (result.map_err(|s| s.code()), made.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn transient_failures_are_retried_up_to_the_bound_and_others_never() {
        let policy = Retry { first: Duration::from_millis(1), max: Duration::from_millis(1), ..Retry::default() };
        let shutdown = CancellationToken::new();
        assert_eq!(calls(policy, &shutdown, &[Code::Unavailable, Code::DeadlineExceeded]).await, (Ok(2), 3));
        assert_eq!(calls(policy, &shutdown, &[Code::Unavailable; 5]).await, (Err(Code::Unavailable), 5));
        assert_eq!(calls(policy, &shutdown, &[Code::NotFound]).await, (Err(Code::NotFound), 1));
        assert_eq!(calls(policy, &shutdown, &[Code::Internal, Code::Aborted]).await, (Err(Code::Aborted), 2));
        shutdown.cancel();
        assert_eq!(
            calls(policy, &shutdown, &[Code::Unavailable]).await,
            (Err(Code::Unavailable), 1),
            "none at shutdown"
        );
    }
}
