//! The internal side of a split natter service: the listener that serves its
//! `*InternalService` to the other natter services, and the service
//! credential every call to it carries.
//!
//! The credential is a shared secret read from a file (a Kubernetes or
//! compose secret), sent as `natter-service-credential` metadata and compared
//! in constant time. We chose a shared secret over mutual TLS: it needs no
//! certificate authority or rotation machinery to run, and the network
//! policies in deploy/ already keep the internal ports away from everything
//! but natter pods; a service mesh (Linkerd, Istio) adds mTLS underneath
//! without any change here. The public listener never serves an internal
//! service, and the all-in-one does not serve them at all.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use subtle::ConstantTimeEq as _;

use crate::observe::TracedChannel;

/// Metadata key of the service credential on internal calls.
pub const CREDENTIAL_HEADER: &str = "natter-service-credential";

/// Shortest accepted secret, in bytes (256 bits, as for session tokens).
pub const MIN_CREDENTIAL_BYTES: usize = 32;

/// Flags of a split service's internal side.
#[derive(Clone, Debug, clap::Args)]
pub struct InternalArgs {
    /// Address of the internal listener, which serves only this service's
    /// `*InternalService` (and grpc.health.v1) to the other natter services;
    /// the edge never routes to it. Port 0 picks a free port.
    #[arg(long, env = "NATTER_INTERNAL_LISTEN", default_value = "127.0.0.1:7071")]
    pub internal_listen: std::net::SocketAddr,

    /// File holding the service credential: a shared secret of at least 32
    /// bytes (surrounding whitespace ignored) that every internal call
    /// carries and every internal listener checks. Generate one with
    /// `head -c 32 /dev/urandom | base64`.
    #[arg(long, env = "NATTER_SERVICE_CREDENTIAL_FILE")]
    pub service_credential_file: Option<PathBuf>,

    /// Deadline of every call to another natter service: a dependency that
    /// does not answer within it fails the caller's call with
    /// DEADLINE_EXCEEDED instead of hanging it. Generous, so that a busy
    /// but working dependency is not mistaken for a hung one.
    #[arg(long, env = "NATTER_INTERNAL_CALL_TIMEOUT", value_parser = humantime::parse_duration, default_value = "10s")]
    pub internal_call_timeout: Duration,
}

impl InternalArgs {
    /// The credential from `--service-credential-file`.
    ///
    /// Errors: the flag is missing, the file cannot be read, or the secret is
    /// shorter than [`MIN_CREDENTIAL_BYTES`] or not a valid header value.
    pub fn credential(&self) -> anyhow::Result<ServiceCredential> {
        let path = self.service_credential_file.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "--service-credential-file (NATTER_SERVICE_CREDENTIAL_FILE) is required: the split services \
                 authenticate each other with it (one file of at least {MIN_CREDENTIAL_BYTES} bytes for them \
                 all; {MAKE_CREDENTIAL})"
            )
        })?;
        ServiceCredential::from_file(path)
    }
}

/// How to make a credential, for the messages that ask for one (README's
/// split-mode block does so).
const MAKE_CREDENTIAL: &str = "make one with: head -c 32 /dev/urandom | base64 > service-credential";

/// The shared secret of natter's internal calls (see the module docs).
#[derive(Clone)]
pub struct ServiceCredential {
    value: HeaderValue,
}

impl std::fmt::Debug for ServiceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceCredential(..)")
    }
}

impl ServiceCredential {
    /// A credential from a secret string (trimmed).
    ///
    /// Errors: shorter than [`MIN_CREDENTIAL_BYTES`], or characters a header
    /// value cannot carry.
    pub fn new(secret: &str) -> anyhow::Result<Self> {
        let secret = secret.trim();
        anyhow::ensure!(
            secret.len() >= MIN_CREDENTIAL_BYTES,
            "the service credential must be at least {MIN_CREDENTIAL_BYTES} bytes, not {} ({MAKE_CREDENTIAL})",
            secret.len()
        );
        let mut value = HeaderValue::from_str(secret)
            .map_err(|_| anyhow::anyhow!("the service credential must be printable ASCII (base64 works)"))?;
        value.set_sensitive(true);
        Ok(Self { value })
    }

    /// Reads the secret from `path`.
    ///
    /// Errors: as [`ServiceCredential::new`], the file cannot be read, or it
    /// holds the deploy files' placeholder in a Kubernetes pod
    /// ([`crate::config::check_secret`]).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let secret = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the service credential {}: {e}", path.display()))?;
        crate::config::check_secret("the service credential (--service-credential-file)", &secret)?;
        Self::new(&secret).map_err(|e| anyhow::anyhow!("{} (--service-credential-file): {e}", path.display()))
    }

    /// The metadata value internal calls carry.
    pub fn header_value(&self) -> HeaderValue {
        self.value.clone()
    }

    /// Whether `presented` is this credential, compared in constant time.
    pub fn matches(&self, presented: Option<&HeaderValue>) -> bool {
        presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(self.value.as_bytes())))
    }
}

/// A lazily connecting link to another natter service's internal listener:
/// every call carries the trace context and the service credential, and has
/// a deadline (`--internal-call-timeout`), sent along as `grpc-timeout` so
/// the callee gives up too.
#[derive(Clone, Debug)]
pub struct Link {
    channel: TracedChannel,
    deadline: Duration,
    /// The callee's URL: logged, never told to callers.
    target: Arc<str>,
    /// The callee's name ("chats"): what a failed call's status names, so
    /// that no internal address reaches a caller outside.
    service: &'static str,
    /// When this link last logged a failed call (one WARN a minute at most).
    last_warning: crate::limits::Throttle,
}

impl Link {
    /// A link to `service` (its name, such as "chats") at `url`
    /// (`http://host:port`, the callee's `--internal-listen`).
    ///
    /// Errors: a malformed URL, described for the caller's start-up error.
    pub fn connect(
        service: &'static str,
        url: &str,
        credential: &ServiceCredential,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
            .map_err(|e| anyhow::anyhow!("bad url {url:?}: {e}"))?
            .tcp_nodelay(true)
            .connect_timeout(deadline.min(Duration::from_secs(5)))
            .http2_keep_alive_interval(Duration::from_secs(30));
        let channel = crate::observe::traced(endpoint.connect_lazy())
            .with_header(http::HeaderName::from_static(CREDENTIAL_HEADER), credential.header_value())
            .with_server(endpoint_authority(url));
        Ok(Self {
            channel,
            deadline,
            target: url.into(),
            service,
            last_warning: crate::limits::Throttle::new(Duration::from_secs(60)),
        })
    }

    /// The channel, for a generated client.
    pub fn channel(&self) -> TracedChannel {
        self.channel.clone()
    }

    /// `message` as a request with this link's deadline.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }

    /// Awaits a call made with [`Link::request`]; a callee that does not
    /// answer within the deadline is DEADLINE_EXCEEDED naming it. A failure
    /// that is the callee's or the network's (UNAVAILABLE, DEADLINE_EXCEEDED,
    /// INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS) is logged at WARN naming
    /// the dependency, at most once a minute per link, with the number of
    /// such failures not logged since the previous line (`suppressed`); the
    /// answers a callee gives on purpose (NOT_FOUND, PERMISSION_DENIED, ...)
    /// are not.
    ///
    /// A callee that refuses this process's service credential (the
    /// replicas were given different ones, as during a rotation) answers
    /// UNAUTHENTICATED, which is no fault of the caller's client: passed on,
    /// it would end that client's streams as if its session were revoked,
    /// and a browser would sign its user out. It is UNAVAILABLE here (retry
    /// later), logged as above. (An internal API never answers a user's bad
    /// token with UNAUTHENTICATED: introspection says `active: false`.)
    pub async fn call<T>(
        &self,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let late = || {
            tonic::Status::deadline_exceeded(format!(
                "the {} service did not answer within {:?}",
                self.service, self.deadline
            ))
        };
        let result = match tokio::time::timeout(self.deadline, call).await {
            Ok(Ok(response)) => return Ok(response.into_inner()),
            // The callee's own deadline fired first (tonic reports it as CANCELLED).
            Ok(Err(status)) if status.code() == tonic::Code::Cancelled => late(),
            Ok(Err(status)) if status.code() == tonic::Code::Unauthenticated => {
                tonic::Status::unavailable(format!("the {} service refused this service's credential", self.service))
            }
            // The callee's answer did not decode here (tonic's INTERNAL, in
            // the words a request that does not decode has, which the
            // server answers INVALID_ARGUMENT: `crate::serve`): no client's
            // fault, so said in other words.
            Ok(Err(status)) if status.code() == tonic::Code::Internal && status.message().starts_with(UNDECODED) => {
                let detail = status.message().trim_start_matches(UNDECODED);
                tonic::Status::internal(format!("the {} service's answer could not be read{detail}", self.service))
            }
            Ok(Err(status)) => status,
            Err(_elapsed) => late(),
        };
        if failed_in_transit(&result) || matches!(result.code(), tonic::Code::Unimplemented | tonic::Code::DataLoss) {
            self.warn_failed(&result);
        }
        Err(result)
    }

    /// The rate-limited WARN of [`Link::call`].
    fn warn_failed(&self, status: &tonic::Status) {
        if let Some(suppressed) = self.last_warning.admit() {
            tracing::warn!(
                dependency = self.service,
                url = %self.target,
                code = ?status.code(),
                message = status.message(),
                suppressed,
                "a call to another natter service failed"
            );
        }
    }
}

/// The `host:port` of a link's URL (`http://chats:7071` -> `chats:7071`).
fn endpoint_authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().unwrap_or(rest)
}

/// The check of an internal listener (a [`crate::serve`] gate): a call
/// without the right credential ends with UNAUTHENTICATED before reaching a
/// service, except grpc.health.v1 (probes carry no secret and learn nothing
/// from it). Refusals are logged at most once a minute, each line counting
/// the refusals not logged since the previous one.
pub(crate) fn require_credential(
    credential: ServiceCredential,
) -> impl Fn(&http::request::Parts) -> Option<tonic::Status> + Clone {
    let last_warning = crate::limits::Throttle::new(Duration::from_secs(60));
    move |parts| {
        let health = parts.uri.path().starts_with("/grpc.health.v1.Health/");
        if health || credential.matches(parts.headers.get(CREDENTIAL_HEADER)) {
            return None;
        }
        if let Some(suppressed) = last_warning.admit() {
            tracing::warn!(
                path = parts.uri.path(),
                suppressed,
                "internal call without a valid service credential refused"
            );
        }
        Some(tonic::Status::unauthenticated("internal call without a valid service credential"))
    }
}

/// How tonic's message of a message that does not decode begins.
const UNDECODED: &str = "failed to decode Protobuf message";

/// Whether a call to another natter service failed on the callee's or the
/// network's side, so that the same call may succeed later: UNAVAILABLE
/// (down, unreachable), DEADLINE_EXCEEDED (slow), INTERNAL (failed inside,
/// e.g. its database connection dropped) or UNKNOWN. Not the answers a
/// callee gives on purpose (NOT_FOUND, PERMISSION_DENIED, ...).
pub fn failed_in_transit(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::Unknown)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_must_be_long_and_match_exactly() {
        assert!(ServiceCredential::new("short").is_err());
        let secret = "0123456789abcdef0123456789abcdef";
        let credential = ServiceCredential::new(&format!("  {secret}\n")).expect("32 bytes, trimmed");
        assert!(credential.matches(Some(&HeaderValue::from_static("0123456789abcdef0123456789abcdef"))));
        assert!(!credential.matches(Some(&HeaderValue::from_static("0123456789abcdef0123456789abcdeF"))));
        assert!(!credential.matches(Some(&HeaderValue::from_static("0123456789abcdef"))));
        assert!(!credential.matches(None));
        assert_eq!(format!("{credential:?}"), "ServiceCredential(..)", "the secret never reaches a log");
    }

    /// An answer of another service that does not decode here is INTERNAL
    /// in words of the link's own, never in those of a request that does
    /// not decode, which a server answers INVALID_ARGUMENT (`crate::serve`).
    #[tokio::test]
    async fn an_answer_that_does_not_decode_is_internal_in_other_words() {
        let credential = ServiceCredential::new("0123456789abcdef0123456789abcdef").unwrap();
        let link = Link::connect("chats", "http://127.0.0.1:1", &credential, Duration::from_secs(1)).unwrap();
        let undecoded = tonic::Status::internal(
            "failed to decode Protobuf message: CheckMembershipResponse.chat_id: invalid string value",
        );
        let status = link.call(async { Err::<tonic::Response<()>, _>(undecoded) }).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(
            status.message(),
            "the chats service's answer could not be read: CheckMembershipResponse.chat_id: invalid string value"
        );
        let own = link.call(async { Err::<tonic::Response<()>, _>(tonic::Status::internal("database down")) }).await;
        assert_eq!(own.unwrap_err().message(), "database down", "the callee's own INTERNAL goes as it is");
    }

    /// A credential file too short (a typo, a secret cut off) is refused
    /// naming the file, the flag, its length and how to make a good one.
    #[test]
    fn a_short_credential_file_is_named_with_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service-credential");
        std::fs::write(&path, "short\n").unwrap();
        let err = ServiceCredential::from_file(&path).expect_err("refused").to_string();
        assert!(err.starts_with(&format!("{} (--service-credential-file): ", path.display())), "{err}");
        assert!(err.contains("at least 32 bytes, not 5") && err.contains(MAKE_CREDENTIAL), "{err}");
        let missing = InternalArgs {
            internal_listen: "127.0.0.1:0".parse().unwrap(),
            service_credential_file: None,
            internal_call_timeout: Duration::from_secs(1),
        };
        let err = missing.credential().expect_err("required").to_string();
        assert!(err.contains(MAKE_CREDENTIAL), "{err}");
    }
}
