//! Who is calling: `authorization: Bearer <token>` checked by a
//! [`SessionVerifier`].
//!
//! The sessions service owns tokens; every other service asks it through this
//! trait. In the all-in-one process the verifier is a direct call into the
//! sessions service ([`InProcessVerifier`]); in split mode it is a gRPC call
//! to `SessionInternalService.IntrospectSession` ([`GrpcVerifier`]). Neither
//! caches. Replicas on NATS wrap theirs in a [`CachingVerifier`], whose
//! entries the bus drops when a session is revoked (see
//! [`natter_kit::cache`] for the guarantee).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use natter_kit::Link;
use natter_kit::cache::{Invalidator, Lookup, Tag, TaggedCache};
use natter_proto::sessions::v1::{
    IntrospectSessionRequest, IntrospectSessionResponse, session_internal_service_client::SessionInternalServiceClient,
    session_internal_service_server::SessionInternalService,
};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use uuid::Uuid;

/// The authenticated caller of an RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The user the token belongs to.
    pub user_id: Uuid,
    /// The session (device log-in) the token belongs to.
    pub session_id: Uuid,
    /// True for a guest user.
    pub guest: bool,
    /// When the session expires, in microseconds since the Unix epoch.
    pub expire_micros: i64,
}

/// Checks bearer tokens (OAuth 2.0 token introspection, RFC 7662, in spirit).
#[async_trait]
pub trait SessionVerifier: Send + Sync + 'static {
    /// `Ok(None)` for an unknown, expired or revoked token; `Err` only when
    /// the check itself failed (for example UNAVAILABLE).
    async fn introspect(&self, token: &str) -> Result<Option<Principal>, Status>;
    /// As [`SessionVerifier::introspect`], asking the sessions service
    /// itself, never a cache (for the periodic re-check of a long-lived
    /// stream, which must catch a revocation whose invalidation was lost).
    async fn introspect_fresh(&self, token: &str) -> Result<Option<Principal>, Status> {
        self.introspect(token).await
    }
}

/// Extracts the token of `authorization: Bearer <token>` (scheme
/// case-insensitive, RFC 6750 section 2.1). Missing or malformed:
/// UNAUTHENTICATED.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization: Bearer token"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization header"))?;
    let (scheme, token) =
        value.split_once(' ').ok_or_else(|| Status::unauthenticated("malformed authorization header"))?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(Status::unauthenticated("authorization must be: Bearer <token>"));
    }
    Ok(token)
}

/// Authenticates requests with a [`SessionVerifier`].
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<dyn SessionVerifier>,
}

impl Authenticator {
    /// Wraps a verifier.
    pub fn new(verifier: Arc<dyn SessionVerifier>) -> Self {
        Self { verifier }
    }

    /// The caller of `request`, or UNAUTHENTICATED (no token, or a token that
    /// is unknown, expired or revoked), or the verifier's own failure.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        self.authenticate_metadata(request.metadata()).await
    }

    /// As [`Authenticator::authenticate`], from metadata alone.
    pub async fn authenticate_metadata(&self, metadata: &MetadataMap) -> Result<Principal, Status> {
        let token = bearer_token(metadata)?;
        self.check(token).await
    }

    /// Checks a token taken earlier from a request.
    pub async fn check(&self, token: &str) -> Result<Principal, Status> {
        self.verifier.introspect(token).await?.ok_or_else(unauthenticated)
    }

    /// Checks a token with the sessions service itself, past any cache: for
    /// streams that re-check their session (see
    /// [`SessionVerifier::introspect_fresh`]).
    pub async fn recheck(&self, token: &str) -> Result<Principal, Status> {
        self.verifier.introspect_fresh(token).await?.ok_or_else(unauthenticated)
    }
}

fn unauthenticated() -> Status {
    Status::unauthenticated("invalid, expired or revoked token")
}

/// Keeps live introspections in memory (a replica's own, see
/// [`natter_kit::cache`]): each is tagged with its session and user, so a
/// revocation ([`Tag::Session`]) or a guest's claim ([`Tag::User`]) drops
/// it on every replica; an expired session is never answered from memory.
/// Unknown and revoked tokens are not cached: each costs a call.
pub struct CachingVerifier<V> {
    inner: V,
    cache: Arc<TaggedCache<String, Principal>>,
}

/// Most tokens a [`CachingVerifier`] keeps before it starts over.
const CACHED_TOKENS: usize = 100_000;

impl<V: SessionVerifier> CachingVerifier<V> {
    /// `inner`, with its live answers kept for `ttl` (zero: none) and
    /// dropped by `invalidator`.
    pub fn new(inner: V, ttl: Duration, invalidator: Arc<Invalidator>) -> Self {
        Self { inner, cache: TaggedCache::new("tokens", ttl, CACHED_TOKENS, invalidator) }
    }
}

#[async_trait]
impl<V: SessionVerifier> SessionVerifier for CachingVerifier<V> {
    async fn introspect(&self, token: &str) -> Result<Option<Principal>, Status> {
        let key = token.to_owned();
        let ticket = match self.cache.get(&key).await {
            Lookup::Hit(principal) if principal.expire_micros > natter_kit::time::now_micros() => {
                return Ok(Some(principal));
            }
            Lookup::Hit(_) => return Ok(None),
            Lookup::Miss(ticket) => Some(ticket),
            Lookup::Bypass => None,
        };
        let answer = self.inner.introspect(token).await?;
        if let (Some(ticket), Some(principal)) = (ticket, answer) {
            let tags = vec![Tag::Session(principal.session_id), Tag::User(principal.user_id)];
            self.cache.put(ticket, key, principal, tags);
        }
        Ok(answer)
    }

    async fn introspect_fresh(&self, token: &str) -> Result<Option<Principal>, Status> {
        let answer = self.inner.introspect_fresh(token).await?;
        if answer.is_none() {
            self.cache.remove(&token.to_owned());
        }
        Ok(answer)
    }
}

fn principal(response: IntrospectSessionResponse) -> Result<Option<Principal>, Status> {
    if !response.active {
        return Ok(None);
    }
    let user_id = Uuid::try_parse(&response.user_id).map_err(natter_kit::internal)?;
    let session_id = Uuid::try_parse(&response.session_id).map_err(natter_kit::internal)?;
    let expire_micros = response.expire_time.as_ref().map(natter_kit::time::micros).unwrap_or(i64::MAX);
    Ok(Some(Principal { user_id, session_id, guest: response.guest, expire_micros }))
}

/// Verifies tokens by calling the sessions service's internal listener over
/// gRPC (with the service credential and a deadline).
#[derive(Clone, Debug)]
pub struct GrpcVerifier {
    link: Link,
}

impl GrpcVerifier {
    /// A verifier over a link to the sessions service's internal listener.
    pub fn new(link: Link) -> Self {
        Self { link }
    }
}

#[async_trait]
impl SessionVerifier for GrpcVerifier {
    async fn introspect(&self, token: &str) -> Result<Option<Principal>, Status> {
        let request = self.link.request(IntrospectSessionRequest { token: token.to_owned() });
        let response =
            self.link.call(SessionInternalServiceClient::new(self.link.channel()).introspect_session(request)).await?;
        principal(response)
    }
}

/// Verifies tokens by calling the sessions service's implementation directly,
/// in the same process.
pub struct InProcessVerifier<S>(pub Arc<S>);

#[async_trait]
impl<S: SessionInternalService> SessionVerifier for InProcessVerifier<S> {
    async fn introspect(&self, token: &str) -> Result<Option<Principal>, Status> {
        let request = Request::new(IntrospectSessionRequest { token: token.to_owned() });
        let call = self.0.introspect_session(request);
        let response = natter_kit::in_process("/natter.sessions.v1.SessionInternalService/IntrospectSession", call)
            .await?
            .into_inner();
        principal(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().unwrap());
        m
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token(&metadata("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&metadata("bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(&metadata("Basic abc")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(bearer_token(&metadata("Bearer ")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(bearer_token(&MetadataMap::new()).unwrap_err().code(), tonic::Code::Unauthenticated);
    }
}
