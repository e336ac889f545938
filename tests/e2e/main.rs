//! End-to-end tests: every test runs against the all-in-one `natter` on
//! SQLite and, when `NATTER_TEST_DATABASE_URL` is set (CI sets it and fails
//! without it), against the split services on PostgreSQL behind the edge.
//! Clients are the generated tonic stubs over real sockets.

mod assistant;
mod authz;
mod chats;
mod exposure;
mod flags;
mod fuzz;
mod limits;
mod manage;
mod mentions;
mod messages;
mod otel;
mod presence;
mod resume_property;
mod search;
mod sessions;
mod stream;
mod stream_abuse;
mod threads;
mod transport;
mod unread;
mod wire;

use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// Generates one test per deployment for each named `async fn(&Cluster)`;
/// `flags = EXPR;` first starts each deployment with those
/// `natter_testkit::Flags` (give a path from the crate root).
#[macro_export]
macro_rules! both_modes {
    ($($name:ident),* $(,)?) => {
        $crate::both_modes!(flags = natter_testkit::Flags::default(); $($name),*);
    };
    (flags = $flags:expr; $($name:ident),* $(,)?) => {
        mod all_in_one {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mode = natter_testkit::Mode::AllInOne;
                    let Some(cluster) = natter_testkit::Cluster::start_with(mode, $flags).await else { return };
                    super::$name(&cluster).await;
                    cluster.stop().await;
                }
            )*
        }
        mod split {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mode = natter_testkit::Mode::Split;
                    let Some(cluster) = natter_testkit::Cluster::start_with(mode, $flags).await else { return };
                    super::$name(&cluster).await;
                    cluster.stop().await;
                }
            )*
        }
    };
}

/// An `all_in_one` and a `split` test of each `name(mode)` that starts
/// its own cluster (with flags of its own, or restarting it), in a module
/// of that name.
#[macro_export]
macro_rules! each_mode {
    ($($name:ident),*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn all_in_one() {
                super::$name(natter_testkit::Mode::AllInOne).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn split() {
                super::$name(natter_testkit::Mode::Split).await;
            }
        }
    )*};
}

/// The status code of a failed call (panics if it succeeded).
#[track_caller]
pub(crate) fn code<T: std::fmt::Debug>(result: Result<T, Status>) -> Code {
    result.expect_err("call should fail").code()
}

/// The delay a RESOURCE_EXHAUSTED status asks for in its RetryInfo (panics
/// on another code or without the detail).
#[track_caller]
pub(crate) fn retry_delay(status: &Status) -> std::time::Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    status.get_error_details().retry_info().and_then(|r| r.retry_delay).expect("a RetryInfo with a delay")
}

/// The subject of the one violation of a RESOURCE_EXHAUSTED status's
/// QuotaFailure (a count quota such as groups per user or reactions per
/// message), which has no RetryInfo (panics otherwise).
#[track_caller]
pub(crate) fn quota_subject(status: &Status) -> String {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let quota = status.get_error_details().quota_failure().cloned().expect("a QuotaFailure");
    assert_eq!(quota.violations.len(), 1, "{quota:?}");
    assert!(status.get_error_details().retry_info().is_none(), "waiting does not help: {status:?}");
    quota.violations[0].subject.clone()
}

/// The fields named by the BadRequest detail of an INVALID_ARGUMENT status.
pub(crate) fn violated_fields(status: &Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}
