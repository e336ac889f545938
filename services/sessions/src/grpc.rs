//! The tonic face of the sessions service: convert, call [`Sessions`], convert.

use std::sync::Arc;

use natter_kit::paging;
use natter_kit::time::timestamp;
use natter_proto::sessions::v1::{
    self as pb, session_internal_service_server::SessionInternalService, session_service_server::SessionService,
};
use tonic::{Request, Response, Status};

use crate::domain::{self, NewUser};
use crate::error::SessionsError;
use crate::service::{LookupCaller, NewSession, Sessions};
use crate::store::{self, SessionRow, TokenRow, UserRow};

/// Most ids in one BatchGetUsers request.
pub const BATCH_GET_USERS_MAX_IDS: usize = 200;

fn user(u: UserRow) -> pb::User {
    let kind = match u.kind.as_str() {
        store::HUMAN => pb::UserKind::Human,
        store::GUEST => pb::UserKind::Guest,
        store::BOT => pb::UserKind::Bot,
        _ => pb::UserKind::Unspecified,
    };
    pb::User {
        guest: u.guest(),
        kind: kind as i32,
        id: u.id,
        username: u.username.unwrap_or_default(),
        display_name: u.display_name,
        create_time: Some(timestamp(u.create_time)),
        profile_version: u.profile_version,
    }
}

fn session(s: SessionRow, current_id: &str) -> pb::Session {
    pb::Session {
        current: s.id == current_id,
        id: s.id,
        user_id: s.user_id,
        create_time: Some(timestamp(s.create_time)),
        expire_time: Some(timestamp(s.expire_time)),
    }
}

fn created(n: NewSession) -> pb::CreateSessionResponse {
    let id = n.session.id.clone();
    pb::CreateSessionResponse { session: Some(session(n.session, &id)), token: n.token, user: Some(user(n.user)) }
}

/// `natter.sessions.v1.SessionService`.
#[derive(Clone)]
pub struct SessionApi {
    sessions: Arc<Sessions>,
}

impl SessionApi {
    pub fn new(sessions: Arc<Sessions>) -> Self {
        Self { sessions }
    }

    /// The caller's address, for per-address limits.
    fn client<T>(&self, request: &Request<T>) -> Option<std::net::IpAddr> {
        natter_kit::client_ip(request, self.sessions.trusts_forwarded_for(), self.sessions.trusted_proxies())
    }

    /// The caller's live session, or UNAUTHENTICATED.
    async fn caller<T>(&self, request: &Request<T>) -> Result<TokenRow, Status> {
        let token = natter_auth::bearer_token(request.metadata())?;
        self.sessions
            .introspect(token)
            .await?
            .ok_or_else(|| Status::unauthenticated("invalid, expired or revoked token"))
    }
}

#[tonic::async_trait]
impl SessionService for SessionApi {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let client = self.client(&request);
        let r = request.into_inner();
        let new = new_user(&r.username, &r.password, &r.display_name)?;
        let u = self.sessions.create_user(client, new).await?;
        Ok(Response::new(pb::CreateUserResponse { user: Some(user(u)) }))
    }

    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let client = self.client(&request);
        let r = request.into_inner();
        let new = match (r.username.is_empty(), r.password.is_empty()) {
            (true, true) => self.sessions.create_guest(client).await?,
            (false, false) => self.sessions.login(client, &r.username, &r.password).await?,
            (true, false) => return Err(SessionsError::invalid("username", "is required with a password").into()),
            (false, true) => return Err(SessionsError::invalid("password", "is required with a username").into()),
        };
        Ok(Response::new(created(new)))
    }

    async fn get_current_session(
        &self,
        request: Request<pb::GetCurrentSessionRequest>,
    ) -> Result<Response<pb::GetCurrentSessionResponse>, Status> {
        let caller = self.caller(&request).await?;
        let u = self.sessions.user(&caller.user_id).await?;
        let current = self.sessions.session(&caller.id).await?;
        Ok(Response::new(pb::GetCurrentSessionResponse {
            session: Some(session(current, &caller.id)),
            user: Some(user(u)),
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let size = paging::page_size("page_size", r.page_size, 50, 200)?;
        let filter = paging::fingerprint(&[&caller.user_id]);
        let before: Option<String> = paging::decode("page_token", &r.page_token, filter)?;
        let mut rows = self.sessions.sessions(&caller.user_id, before.as_deref(), size + 1).await?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last().map(|s| paging::encode(&s.id, filter)).unwrap_or_default()
        } else {
            String::new()
        };
        let sessions = rows.into_iter().map(|s| session(s, &caller.id)).collect();
        Ok(Response::new(pb::ListSessionsResponse { sessions, next_page_token }))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let target = if r.session_id.is_empty() {
            caller.id.clone()
        } else {
            natter_kit::id::parse("session_id", &r.session_id)?.to_string()
        };
        self.sessions.revoke(&caller.user_id, Some(&target), r.all).await?;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }

    async fn claim_account(
        &self,
        request: Request<pb::ClaimAccountRequest>,
    ) -> Result<Response<pb::ClaimAccountResponse>, Status> {
        let caller = self.caller(&request).await?;
        let client = self.client(&request);
        let r = request.into_inner();
        let new = new_user(&r.username, &r.password, &r.display_name)?;
        let claimed = created(self.sessions.claim(client, &caller.user_id, new).await?);
        Ok(Response::new(pb::ClaimAccountResponse {
            user: claimed.user,
            session: claimed.session,
            token: claimed.token,
        }))
    }

    async fn delete_account(
        &self,
        request: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteAccountResponse>, Status> {
        let caller = match self.caller(&request).await {
            Ok(caller) => caller,
            // A retry of a deletion that went through (its answer was
            // lost) learns that it did, rather than an error that reads as
            // a failure.
            Err(status)
                if status.code() == tonic::Code::Unauthenticated
                    && self.sessions.deleted_by_token(natter_auth::bearer_token(request.metadata())?).await? =>
            {
                return Ok(Response::new(pb::DeleteAccountResponse {}));
            }
            Err(status) => return Err(status),
        };
        let client = self.client(&request);
        let r = request.into_inner();
        self.sessions.delete_account(client, &caller, &r.password).await?;
        Ok(Response::new(pb::DeleteAccountResponse {}))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::GetUserResponse>, Status> {
        let caller = self.caller(&request).await?;
        let client = self.client(&request);
        let r = request.into_inner();
        let u = match (r.user_id.is_empty(), r.username.is_empty()) {
            (false, true) => self.sessions.user(&natter_kit::id::parse("user_id", &r.user_id)?.to_string()).await?,
            (true, false) => {
                let by = if caller.guest != 0 {
                    LookupCaller::GuestsAt(client)
                } else {
                    LookupCaller::Account(caller.user_id)
                };
                self.sessions.user_by_username(by, &r.username).await?
            }
            _ => return Err(SessionsError::invalid("user_id", "give exactly one of user_id and username").into()),
        };
        Ok(Response::new(pb::GetUserResponse { user: Some(user(u)) }))
    }

    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        self.caller(&request).await?;
        let ids = parse_user_ids(request.into_inner().user_ids, BATCH_GET_USERS_MAX_IDS)?;
        let users = self.sessions.users(&ids).await?.into_iter().map(user).collect();
        Ok(Response::new(pb::BatchGetUsersResponse { users }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let caller = self.caller(&request).await?;
        let display_name = profile_update(request.into_inner(), &caller.user_id)?;
        let updated = self.sessions.update_display_name(&caller.user_id, &display_name).await?;
        Ok(Response::new(pb::UpdateUserResponse { user: Some(user(updated)) }))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let caller = self.caller(&request).await?;
        let client = self.client(&request);
        let r = request.into_inner();
        self.sessions.change_password(client, &caller, &r.current_password, &r.new_password).await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }
}

/// Validates an UpdateUser request by `caller` (a user id) into the new
/// display name: its mask names `display_name`, the one field a user
/// updates; `user.id` is empty or the caller's.
pub fn profile_update(r: pb::UpdateUserRequest, caller: &str) -> Result<String, Status> {
    let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(SessionsError::invalid("update_mask", "must name display_name").into());
    }
    if let Some((i, other)) = paths.iter().enumerate().find(|(_, p)| p.as_str() != "display_name") {
        return Err(natter_kit::error::unknown_mask_path(i, other, "display_name"));
    }
    let user = r.user.unwrap_or_default();
    if !user.id.is_empty() && natter_kit::id::parse("user.id", &user.id)?.to_string() != caller {
        return Err(SessionsError::NotYourProfile.into());
    }
    domain::check_display_name(&user.display_name).map_err(|r| SessionsError::invalid("user.display_name", r))?;
    Ok(user.display_name)
}

/// Validates a CreateUser or ClaimAccount request (INVALID_ARGUMENT naming
/// the first field at fault).
pub fn new_user(username: &str, password: &str, display_name: &str) -> Result<NewUser, Status> {
    NewUser::parse(username, password, display_name).map_err(|(field, r)| SessionsError::invalid(field, r).into())
}

/// Validates the `user_ids` of BatchGetUsers or LookupUsers: at most `max`
/// UUIDs, returned in canonical form.
pub fn parse_user_ids(ids: Vec<String>, max: usize) -> Result<Vec<String>, Status> {
    if ids.len() > max {
        return Err(SessionsError::invalid("user_ids", format!("at most {max} ids")).into());
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            uuid::Uuid::try_parse(id)
                .map(|u| u.to_string())
                .map_err(|_| natter_kit::error::invalid_argument(&format!("user_ids[{i}]"), "must be a UUID"))
        })
        .collect()
}

/// `natter.sessions.v1.SessionInternalService`: token introspection and user
/// look-ups for the other services.
#[derive(Clone)]
pub struct SessionInternalApi {
    sessions: Arc<Sessions>,
}

impl SessionInternalApi {
    pub fn new(sessions: Arc<Sessions>) -> Self {
        Self { sessions }
    }
}

#[tonic::async_trait]
impl SessionInternalService for SessionInternalApi {
    async fn introspect_session(
        &self,
        request: Request<pb::IntrospectSessionRequest>,
    ) -> Result<Response<pb::IntrospectSessionResponse>, Status> {
        let token = request.into_inner().token;
        let response = match self.sessions.introspect(&token).await? {
            Some(row) => pb::IntrospectSessionResponse {
                active: true,
                user_id: row.user_id,
                session_id: row.id,
                expire_time: Some(timestamp(row.expire_time)),
                guest: row.guest != 0,
            },
            None => pb::IntrospectSessionResponse::default(),
        };
        Ok(Response::new(response))
    }

    async fn lookup_users(
        &self,
        request: Request<pb::LookupUsersRequest>,
    ) -> Result<Response<pb::LookupUsersResponse>, Status> {
        let ids = parse_user_ids(request.into_inner().user_ids, natter_kit::limits::LOOKUP_USERS_MAX_IDS)?;
        let users = self.sessions.users(&ids).await?.into_iter().map(user).collect();
        Ok(Response::new(pb::LookupUsersResponse { users }))
    }

    async fn list_deleted_users(
        &self,
        request: Request<pb::ListDeletedUsersRequest>,
    ) -> Result<Response<pb::ListDeletedUsersResponse>, Status> {
        let r = request.into_inner();
        if r.after_position < 0 {
            return Err(SessionsError::invalid("after_position", "must not be negative").into());
        }
        let size = paging::page_size("page_size", r.page_size, 100, 1000)?;
        let rows = self.sessions.deleted_users(r.after_position, i64::from(size)).await?;
        let deleted_users = rows
            .into_iter()
            .map(|(position, user_id, time)| pb::DeletedUser { position, user_id, delete_time: Some(timestamp(time)) })
            .collect();
        Ok(Response::new(pb::ListDeletedUsersResponse { deleted_users }))
    }

    async fn ensure_bot_user(
        &self,
        request: Request<pb::EnsureBotUserRequest>,
    ) -> Result<Response<pb::EnsureBotUserResponse>, Status> {
        let request = request.into_inner();
        let bot = self.sessions.ensure_bot(&request.username, &request.display_name).await?;
        Ok(Response::new(pb::EnsureBotUserResponse { user: Some(user(bot)) }))
    }
}
