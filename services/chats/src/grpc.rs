//! The tonic face of the chats service: authenticate, validate and convert
//! at the boundary, call [`Chats`], convert back.

use std::sync::Arc;

use natter_auth::Authenticator;
use natter_kit::time::{micros, timestamp};
use natter_kit::{id, paging};
use natter_proto::chats::v1::{
    self as pb, chat_internal_service_server::ChatInternalService, chat_service_server::ChatService,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::{self, Kind, Limits, Role, Visibility};
use crate::error::ChatsError;
use crate::service::{ChatView, Chats, NewChat};
use crate::store::{ChatFilter, MemberRow};

/// Longest text excerpt in a chat's last_message preview, in characters.
const EXCERPT_CHARS: usize = 200;

fn kind_pb(k: Kind) -> pb::ChatKind {
    match k {
        Kind::Direct => pb::ChatKind::Direct,
        Kind::Group => pb::ChatKind::Group,
    }
}

fn visibility_pb(v: Visibility) -> pb::Visibility {
    match v {
        Visibility::Private => pb::Visibility::Private,
        Visibility::Public => pb::Visibility::Public,
    }
}

fn role_pb(r: Role) -> pb::MemberRole {
    match r {
        Role::Owner => pb::MemberRole::Owner,
        Role::Admin => pb::MemberRole::Admin,
        Role::Member => pb::MemberRole::Member,
    }
}

fn chat_pb(view: ChatView) -> pb::Chat {
    let c = view.chat;
    let (last_message, unread_count) = match view.summary {
        Some(s) => (
            Some(pb::LastMessage {
                seq: s.last_seq,
                author_id: s.last_author_id,
                text: s.last_text.chars().take(EXCERPT_CHARS).collect(),
                send_time: s.last_send_time,
            }),
            s.unread_count,
        ),
        None => (None, 0),
    };
    pb::Chat {
        kind: kind_pb(Kind::parse(&c.kind)) as i32,
        visibility: visibility_pb(Visibility::parse(&c.visibility)) as i32,
        id: c.id,
        title: c.title,
        description: c.description,
        owner_id: c.owner_id,
        member_count: i32::try_from(c.member_count).unwrap_or(i32::MAX),
        archived: c.archive_time.is_some(),
        create_time: Some(timestamp(c.create_time)),
        update_time: Some(timestamp(c.update_time)),
        last_activity_time: Some(timestamp(c.last_activity_time)),
        last_message,
        unread_count,
    }
}

fn member_pb(m: MemberRow) -> pb::Member {
    pb::Member {
        user_id: m.user_id,
        role: role_pb(Role::parse(&m.role)) as i32,
        join_time: Some(timestamp(m.join_time)),
    }
}

fn kind_from_pb(field: &str, value: i32) -> Result<Option<Kind>, ChatsError> {
    match pb::ChatKind::try_from(value) {
        Ok(pb::ChatKind::Unspecified) => Ok(None),
        Ok(pb::ChatKind::Direct) => Ok(Some(Kind::Direct)),
        Ok(pb::ChatKind::Group) => Ok(Some(Kind::Group)),
        Err(_) => Err(ChatsError::invalid(field, "unknown chat kind")),
    }
}

fn visibility_from_pb(field: &str, value: i32) -> Result<Option<Visibility>, ChatsError> {
    match pb::Visibility::try_from(value) {
        Ok(pb::Visibility::Unspecified) => Ok(None),
        Ok(pb::Visibility::Private) => Ok(Some(Visibility::Private)),
        Ok(pb::Visibility::Public) => Ok(Some(Visibility::Public)),
        Err(_) => Err(ChatsError::invalid(field, "unknown visibility")),
    }
}

/// Validates a CreateChat request against `limits` (INVALID_ARGUMENT naming
/// the field at fault).
pub fn new_chat(r: pb::CreateChatRequest, limits: &Limits) -> Result<NewChat, Status> {
    domain::check_title(&r.title, limits).map_err(|e| ChatsError::invalid("title", e))?;
    domain::check_description(&r.description, limits).map_err(|e| ChatsError::invalid("description", e))?;
    if r.member_ids.len() > limits.group_members {
        return Err(
            ChatsError::invalid("member_ids", format!("a chat has at most {} members", limits.group_members)).into()
        );
    }
    let member_ids = r
        .member_ids
        .iter()
        .enumerate()
        .map(|(i, m)| id::parse(&format!("member_ids[{i}]"), m))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NewChat {
        chat_id: id::parse_optional("chat_id", &r.chat_id)?,
        kind: kind_from_pb("kind", r.kind)?,
        title: r.title.trim().to_owned(),
        description: r.description,
        member_ids,
        visibility: visibility_from_pb("visibility", r.visibility)?.unwrap_or(Visibility::Private),
    })
}

/// `natter.chats.v1.ChatService`.
#[derive(Clone)]
pub struct ChatApi {
    chats: Arc<Chats>,
    auth: Authenticator,
}

impl ChatApi {
    pub fn new(chats: Arc<Chats>, auth: Authenticator) -> Self {
        Self { chats, auth }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<Uuid, Status> {
        Ok(self.auth.authenticate(request).await?.user_id)
    }
}

#[tonic::async_trait]
impl ChatService for ChatApi {
    async fn create_chat(
        &self,
        request: Request<pb::CreateChatRequest>,
    ) -> Result<Response<pb::CreateChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let new = new_chat(request.into_inner(), self.chats.limits())?;
        let view = self.chats.create_chat(caller, new).await?;
        Ok(Response::new(pb::CreateChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn get_chat(&self, request: Request<pb::GetChatRequest>) -> Result<Response<pb::GetChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        let size = match r.message_page_size {
            0 => 0,
            n => paging::page_size("message_page_size", n, 20, 200)?,
        };
        let (view, messages) = self.chats.get_chat(caller, chat_id, size).await?;
        Ok(Response::new(pb::GetChatResponse { chat: Some(chat_pb(view)), messages }))
    }

    async fn list_chats(
        &self,
        request: Request<pb::ListChatsRequest>,
    ) -> Result<Response<pb::ListChatsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let size = paging::page_size("page_size", r.page_size, 50, 200)?;
        let ascending = match pb::SortOrder::try_from(r.order) {
            Ok(pb::SortOrder::Unspecified | pb::SortOrder::Desc) => false,
            Ok(pb::SortOrder::Asc) => true,
            Err(_) => return Err(ChatsError::invalid("order", "unknown sort order").into()),
        };
        let public = match pb::Availability::try_from(r.availability) {
            Ok(pb::Availability::Unspecified | pb::Availability::Member) => false,
            Ok(pb::Availability::Public) => true,
            Err(_) => return Err(ChatsError::invalid("availability", "unknown availability").into()),
        };
        domain::check_query(&r.query, self.chats.limits()).map_err(|e| ChatsError::invalid("query", e))?;
        let query = r.query.trim().to_lowercase();
        let filter = ChatFilter {
            public,
            kind: kind_from_pb("kind", r.kind)?,
            archived: r.archived,
            last_message_after: r.last_message_after.as_ref().map(micros),
            last_message_before: r.last_message_before.as_ref().map(micros),
            query: (!query.is_empty()).then_some(query),
            ascending,
        };
        let fingerprint = paging::fingerprint(&[
            &caller,
            &filter.public,
            &filter.kind,
            &filter.archived,
            &filter.last_message_after,
            &filter.last_message_before,
            &filter.query,
            &filter.ascending,
        ]);
        let after = paging::decode("page_token", &r.page_token, fingerprint)?;
        let (views, next) = self.chats.list_chats(caller, &filter, after, size).await?;
        Ok(Response::new(pb::ListChatsResponse {
            chats: views.into_iter().map(chat_pb).collect(),
            next_page_token: next.map(|k| paging::encode(&k, fingerprint)).unwrap_or_default(),
        }))
    }

    async fn update_chat(
        &self,
        request: Request<pb::UpdateChatRequest>,
    ) -> Result<Response<pb::UpdateChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(ChatsError::invalid(
                "update_mask",
                "must name at least one of: title, description, visibility",
            )
            .into());
        }
        let chat = r.chat.unwrap_or_default();
        let (mut title, mut description, mut visibility) = (None, None, None);
        for (i, path) in paths.iter().enumerate() {
            match path.as_str() {
                "title" => {
                    domain::check_title(&chat.title, self.chats.limits())
                        .map_err(|e| ChatsError::invalid("chat.title", e))?;
                    title = Some(chat.title.trim().to_owned());
                }
                "description" => {
                    domain::check_description(&chat.description, self.chats.limits())
                        .map_err(|e| ChatsError::invalid("chat.description", e))?;
                    description = Some(chat.description.clone());
                }
                "visibility" => {
                    visibility = Some(
                        visibility_from_pb("chat.visibility", chat.visibility)?
                            .ok_or_else(|| ChatsError::invalid("chat.visibility", "must be PRIVATE or PUBLIC"))?,
                    );
                }
                other => {
                    // Quoted, and cut short: the message goes back in a header.
                    let shown: String = other.chars().take(64).collect();
                    let reason =
                        format!("{shown:?} is not a field that can be updated (title, description, visibility)");
                    return Err(ChatsError::invalid(format!("update_mask.paths[{i}]"), reason).into());
                }
            }
        }
        let view = self.chats.update_chat(caller, chat_id, title, description, visibility).await?;
        Ok(Response::new(pb::UpdateChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn archive_chat(
        &self,
        request: Request<pb::ArchiveChatRequest>,
    ) -> Result<Response<pb::ArchiveChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = id::parse("chat_id", &request.into_inner().chat_id)?;
        let view = self.chats.set_archived(caller, chat_id, true).await?;
        Ok(Response::new(pb::ArchiveChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn unarchive_chat(
        &self,
        request: Request<pb::UnarchiveChatRequest>,
    ) -> Result<Response<pb::UnarchiveChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = id::parse("chat_id", &request.into_inner().chat_id)?;
        let view = self.chats.set_archived(caller, chat_id, false).await?;
        Ok(Response::new(pb::UnarchiveChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn delete_chat(
        &self,
        request: Request<pb::DeleteChatRequest>,
    ) -> Result<Response<pb::DeleteChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = id::parse("chat_id", &request.into_inner().chat_id)?;
        self.chats.delete_chat(caller, chat_id).await?;
        Ok(Response::new(pb::DeleteChatResponse {}))
    }

    async fn add_members(
        &self,
        request: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::AddMembersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        if r.user_ids.is_empty() {
            return Err(ChatsError::invalid("user_ids", "must name at least one user").into());
        }
        if r.user_ids.len() > self.chats.limits().group_members {
            let limit = self.chats.limits().group_members;
            return Err(ChatsError::invalid("user_ids", format!("a chat has at most {limit} members")).into());
        }
        let user_ids = r
            .user_ids
            .iter()
            .enumerate()
            .map(|(i, u)| id::parse(&format!("user_ids[{i}]"), u))
            .collect::<Result<Vec<_>, _>>()?;
        let added = self.chats.add_members(caller, chat_id, user_ids).await?;
        Ok(Response::new(pb::AddMembersResponse { members: added.into_iter().map(member_pb).collect() }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        let user_id = id::parse("user_id", &r.user_id)?;
        self.chats.remove_member(caller, chat_id, user_id).await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn update_member(
        &self,
        request: Request<pb::UpdateMemberRequest>,
    ) -> Result<Response<pb::UpdateMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        let user_id = id::parse("user_id", &r.user_id)?;
        let role = match pb::MemberRole::try_from(r.role) {
            Ok(pb::MemberRole::Owner) => Role::Owner,
            Ok(pb::MemberRole::Admin) => Role::Admin,
            Ok(pb::MemberRole::Member) => Role::Member,
            _ => return Err(ChatsError::invalid("role", "must be OWNER, ADMIN or MEMBER").into()),
        };
        let row = self.chats.update_member(caller, chat_id, user_id, role).await?;
        Ok(Response::new(pb::UpdateMemberResponse { member: Some(member_pb(row)) }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = id::parse("chat_id", &r.chat_id)?;
        let size = paging::page_size("page_size", r.page_size, 50, 200)?;
        let fingerprint = paging::fingerprint(&[&chat_id]);
        let after = paging::decode("page_token", &r.page_token, fingerprint)?;
        let (rows, next) = self.chats.list_members(caller, chat_id, after, size).await?;
        Ok(Response::new(pb::ListMembersResponse {
            members: rows.into_iter().map(member_pb).collect(),
            next_page_token: next.map(|k| paging::encode(&k, fingerprint)).unwrap_or_default(),
        }))
    }
}

/// `natter.chats.v1.ChatInternalService`: membership checks and activity
/// records for the messages service.
#[derive(Clone)]
pub struct ChatInternalApi {
    chats: Arc<Chats>,
}

impl ChatInternalApi {
    pub fn new(chats: Arc<Chats>) -> Self {
        Self { chats }
    }
}

#[tonic::async_trait]
impl ChatInternalService for ChatInternalApi {
    async fn check_membership(
        &self,
        request: Request<pb::CheckMembershipRequest>,
    ) -> Result<Response<pb::CheckMembershipResponse>, Status> {
        let r = request.into_inner();
        let response = match self.chats.membership(&r.chat_id, &r.user_id).await? {
            None => pb::CheckMembershipResponse::default(),
            Some(access) => pb::CheckMembershipResponse {
                chat_exists: true,
                member: access.role.is_some(),
                role: access.role.map(|r| role_pb(r) as i32).unwrap_or_default(),
                archived: access.chat.archive_time.is_some(),
                visibility: visibility_pb(Visibility::parse(&access.chat.visibility)) as i32,
            },
        };
        Ok(Response::new(response))
    }

    async fn list_member_chat_ids(
        &self,
        request: Request<pb::ListMemberChatIdsRequest>,
    ) -> Result<Response<pb::ListMemberChatIdsResponse>, Status> {
        let chat_ids = self.chats.member_chat_ids(&request.into_inner().user_id).await?;
        Ok(Response::new(pb::ListMemberChatIdsResponse { chat_ids }))
    }

    async fn record_activity(
        &self,
        request: Request<pb::RecordActivityRequest>,
    ) -> Result<Response<pb::RecordActivityResponse>, Status> {
        let activities: Vec<(String, i64, i64)> = request
            .into_inner()
            .activities
            .into_iter()
            .map(|a| {
                let time = a.last_activity_time.as_ref().map(micros).unwrap_or_default();
                (a.chat_id, a.last_seq, time)
            })
            .collect();
        self.chats.record_activity(&activities).await?;
        Ok(Response::new(pb::RecordActivityResponse {}))
    }
}
