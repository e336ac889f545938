//! The tonic face of the chats service: authenticate, validate each request
//! once into domain types (the parse functions below are the one door for
//! input), call [`Chats`], and build protobuf from what it returns (only
//! here).

use std::sync::Arc;

use natter_auth::Authenticator;
use natter_kit::error::invalid_argument;
use natter_kit::id::{ChatId, UserId};
use natter_kit::paging;
use natter_kit::time::{micros, timestamp, timestamp_opt};
use natter_proto::chats::v1::{
    self as pb, chat_internal_service_server::ChatInternalService, chat_service_server::ChatService,
};
use tonic::{Request, Response, Status};

use crate::domain::{
    self, Activity, ChatCursor, ChatFilter, ChatUpdate, Kind, Limits, Member, MemberCursor, NewChat, Role, Visibility,
};
use crate::error::ChatsError;
use crate::service::{ChatView, Chats};

/// Longest text excerpt in a chat's last_message preview, in characters.
const EXCERPT_CHARS: usize = 200;

/// Default and largest ListChats / ListMembers page.
const PAGE_SIZE: (u32, u32) = (50, 200);

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
    let (last_message, unread_count) = match view.preview {
        Some(p) => (
            Some(pb::LastMessage {
                seq: p.seq,
                author_id: p.author_id,
                text: p.text.chars().take(EXCERPT_CHARS).collect(),
                send_time: timestamp_opt(p.send_time),
            }),
            p.unread_count,
        ),
        None => (None, 0),
    };
    pb::Chat {
        id: c.id.to_string(),
        kind: kind_pb(c.kind) as i32,
        title: c.title,
        description: c.description,
        visibility: visibility_pb(c.visibility) as i32,
        owner_id: c.owner_id.to_string(),
        member_count: i32::try_from(c.member_count).unwrap_or(i32::MAX),
        archived: c.archive_time.is_some(),
        create_time: Some(timestamp(c.create_time)),
        update_time: Some(timestamp(c.update_time)),
        last_activity_time: Some(timestamp(c.last_activity_time)),
        last_message,
        unread_count,
        message_count: view.aggregates.message_count,
        flagged: view.moderator && view.aggregates.max_severity >= natter_proto::messages::v1::Severity::Low as i32,
        max_severity: if view.moderator { view.aggregates.max_severity } else { 0 },
    }
}

fn member_pb(m: Member) -> pb::Member {
    pb::Member { user_id: m.user_id.to_string(), role: role_pb(m.role) as i32, join_time: Some(timestamp(m.join_time)) }
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

/// Parses `ids` (field `field[i]` each) into distinct user ids in request
/// order, leaving out `except`.
fn user_ids(field: &str, ids: &[String], except: Option<UserId>) -> Result<Vec<UserId>, Status> {
    let mut out: Vec<UserId> = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let id = UserId::parse(&format!("{field}[{i}]"), id)?;
        if Some(id) != except && !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// Validates a CreateChat request of `caller` against `limits`
/// (INVALID_ARGUMENT naming the field at fault): title, description, the
/// member ids and their number (the creator included, once), kind and
/// visibility as given.
pub fn new_chat(r: pb::CreateChatRequest, caller: UserId, limits: &Limits) -> Result<NewChat, Status> {
    domain::check_title(&r.title, limits).map_err(|e| ChatsError::invalid("title", e))?;
    domain::check_description(&r.description, limits).map_err(|e| ChatsError::invalid("description", e))?;
    // A cheap bound before parsing: however many repeat, more ids than a
    // chat may have members cannot make a valid chat.
    limits.check_members("member_ids", r.member_ids.len()).map_err(ChatsError::from)?;
    let others = user_ids("member_ids", &r.member_ids, Some(caller))?;
    limits.check_members("member_ids", others.len() + 1).map_err(ChatsError::from)?;
    Ok(NewChat {
        chat_id: ChatId::parse_optional("chat_id", &r.chat_id)?,
        kind: kind_from_pb("kind", r.kind)?,
        title: r.title.trim().to_owned(),
        description: r.description,
        others,
        visibility: visibility_from_pb("visibility", r.visibility)?.unwrap_or(Visibility::Private),
    })
}

/// A validated ListChats request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListChats {
    /// Filters and order.
    pub filter: ChatFilter,
    /// Where the page starts (from the page token).
    pub after: Option<ChatCursor>,
    /// 1..=200, 50 by default.
    pub page_size: u32,
    /// Binds page tokens to the caller and the filters.
    fingerprint: u64,
}

/// Validates a ListChats request of `caller`.
pub fn list_chats(r: pb::ListChatsRequest, caller: UserId, limits: &Limits) -> Result<ListChats, Status> {
    let page_size = paging::page_size("page_size", r.page_size, PAGE_SIZE.0, PAGE_SIZE.1)?;
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
    domain::check_query(&r.query, limits).map_err(|e| ChatsError::invalid("query", e))?;
    let query = domain::title_key(r.query.trim());
    let filter = ChatFilter {
        public,
        kind: kind_from_pb("kind", r.kind)?,
        archived: r.archived,
        last_message_after: r.last_message_after.as_ref().map(micros),
        last_message_before: r.last_message_before.as_ref().map(micros),
        query: (!query.is_empty()).then_some(query),
        ascending,
        min_severity: match (r.flagged, r.min_severity) {
            (false, 0) => 0,
            (true, 0) => natter_proto::messages::v1::Severity::Low as i32,
            (_, n) if (2..=5).contains(&n) => n,
            _ => return Err(ChatsError::invalid("min_severity", "must be LOW, MEDIUM, HIGH or CRITICAL").into()),
        },
    };
    // The same parts as ever (the caller as a plain UUID), so tokens stay
    // valid across versions.
    let caller_uuid = caller.uuid();
    let mut parts: Vec<&dyn std::fmt::Debug> = vec![
        &caller_uuid,
        &filter.public,
        &filter.kind,
        &filter.archived,
        &filter.last_message_after,
        &filter.last_message_before,
        &filter.query,
        &filter.ascending,
    ];
    // Only when set, so that earlier tokens stay valid.
    if filter.min_severity > 0 {
        parts.push(&filter.min_severity);
    }
    let fingerprint = paging::fingerprint(&parts);
    let after = paging::decode::<(i64, String)>("page_token", &r.page_token, fingerprint)?
        .map(|(last_activity_time, id)| Ok::<_, Status>(ChatCursor { last_activity_time, chat_id: token_id(&id)? }))
        .transpose()?;
    Ok(ListChats { filter, after, page_size, fingerprint })
}

/// The id in a page token; anything else than an id is a token this server
/// never issued.
fn token_id<T: std::str::FromStr>(id: &str) -> Result<T, Status> {
    id.parse().map_err(|_| invalid_argument("page_token", "is not a page token issued by this server"))
}

/// Validates an UpdateChat request: the chat id and the fields its mask
/// names.
pub fn update_chat(r: pb::UpdateChatRequest, limits: &Limits) -> Result<(ChatId, ChatUpdate), Status> {
    let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
    let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(
            ChatsError::invalid("update_mask", "must name at least one of: title, description, visibility").into()
        );
    }
    let chat = r.chat.unwrap_or_default();
    let mut update = ChatUpdate::default();
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "title" => {
                domain::check_title(&chat.title, limits).map_err(|e| ChatsError::invalid("chat.title", e))?;
                update.title = Some(chat.title.trim().to_owned());
            }
            "description" => {
                domain::check_description(&chat.description, limits)
                    .map_err(|e| ChatsError::invalid("chat.description", e))?;
                update.description = Some(chat.description.clone());
            }
            "visibility" => {
                update.visibility = Some(
                    visibility_from_pb("chat.visibility", chat.visibility)?
                        .ok_or_else(|| ChatsError::invalid("chat.visibility", "must be PRIVATE or PUBLIC"))?,
                );
            }
            other => {
                // Quoted, and cut short: the message goes back in a header.
                let shown: String = other.chars().take(64).collect();
                let reason = format!("{shown:?} is not a field that can be updated (title, description, visibility)");
                return Err(ChatsError::invalid(format!("update_mask.paths[{i}]"), reason).into());
            }
        }
    }
    Ok((chat_id, update))
}

/// Validates an AddMembers request: the chat id and the distinct users,
/// at least one and no more than a chat may have members.
pub fn add_members(r: pb::AddMembersRequest, limits: &Limits) -> Result<(ChatId, Vec<UserId>), Status> {
    let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
    if r.user_ids.is_empty() {
        return Err(ChatsError::invalid("user_ids", "must name at least one user").into());
    }
    limits.check_members("user_ids", r.user_ids.len()).map_err(ChatsError::from)?;
    Ok((chat_id, user_ids("user_ids", &r.user_ids, None)?))
}

/// `natter.chats.v1.ChatService`.
#[derive(Clone)]
pub struct ChatApi {
    chats: Arc<Chats>,
    auth: Authenticator,
}

impl ChatApi {
    /// The public API over `chats`, authenticating with `auth`.
    pub fn new(chats: Arc<Chats>, auth: Authenticator) -> Self {
        Self { chats, auth }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<UserId, Status> {
        Ok(UserId::from(self.auth.authenticate(request).await?.user_id))
    }
}

#[tonic::async_trait]
impl ChatService for ChatApi {
    async fn create_chat(
        &self,
        request: Request<pb::CreateChatRequest>,
    ) -> Result<Response<pb::CreateChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let new = new_chat(request.into_inner(), caller, self.chats.limits())?;
        let view = self.chats.create_chat(caller, new).await?;
        Ok(Response::new(pb::CreateChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn get_chat(&self, request: Request<pb::GetChatRequest>) -> Result<Response<pb::GetChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
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
        let list = list_chats(request.into_inner(), caller, self.chats.limits())?;
        let page = self.chats.list_chats(caller, &list.filter, list.after, list.page_size).await?;
        let next = page.next.map(|c| paging::encode(&(c.last_activity_time, c.chat_id.to_string()), list.fingerprint));
        Ok(Response::new(pb::ListChatsResponse {
            chats: page.items.into_iter().map(chat_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn update_chat(
        &self,
        request: Request<pb::UpdateChatRequest>,
    ) -> Result<Response<pb::UpdateChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (chat_id, update) = update_chat(request.into_inner(), self.chats.limits())?;
        let view = self.chats.update_chat(caller, chat_id, update).await?;
        Ok(Response::new(pb::UpdateChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn archive_chat(
        &self,
        request: Request<pb::ArchiveChatRequest>,
    ) -> Result<Response<pb::ArchiveChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = ChatId::parse("chat_id", &request.into_inner().chat_id)?;
        let view = self.chats.set_archived(caller, chat_id, true).await?;
        Ok(Response::new(pb::ArchiveChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn unarchive_chat(
        &self,
        request: Request<pb::UnarchiveChatRequest>,
    ) -> Result<Response<pb::UnarchiveChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = ChatId::parse("chat_id", &request.into_inner().chat_id)?;
        let view = self.chats.set_archived(caller, chat_id, false).await?;
        Ok(Response::new(pb::UnarchiveChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn delete_chat(
        &self,
        request: Request<pb::DeleteChatRequest>,
    ) -> Result<Response<pb::DeleteChatResponse>, Status> {
        let caller = self.caller(&request).await?;
        let chat_id = ChatId::parse("chat_id", &request.into_inner().chat_id)?;
        self.chats.delete_chat(caller, chat_id).await?;
        Ok(Response::new(pb::DeleteChatResponse {}))
    }

    async fn add_members(
        &self,
        request: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::AddMembersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let (chat_id, user_ids) = add_members(request.into_inner(), self.chats.limits())?;
        let added = self.chats.add_members(caller, chat_id, user_ids).await?;
        Ok(Response::new(pb::AddMembersResponse { members: added.into_iter().map(member_pb).collect() }))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::RemoveMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
        let user_id = UserId::parse("user_id", &r.user_id)?;
        self.chats.remove_member(caller, chat_id, user_id).await?;
        Ok(Response::new(pb::RemoveMemberResponse {}))
    }

    async fn update_member(
        &self,
        request: Request<pb::UpdateMemberRequest>,
    ) -> Result<Response<pb::UpdateMemberResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
        let user_id = UserId::parse("user_id", &r.user_id)?;
        let role = match pb::MemberRole::try_from(r.role) {
            Ok(pb::MemberRole::Owner) => Role::Owner,
            Ok(pb::MemberRole::Admin) => Role::Admin,
            Ok(pb::MemberRole::Member) => Role::Member,
            _ => return Err(ChatsError::invalid("role", "must be OWNER, ADMIN or MEMBER").into()),
        };
        let member = self.chats.update_member(caller, chat_id, user_id, role).await?;
        Ok(Response::new(pb::UpdateMemberResponse { member: Some(member_pb(member)) }))
    }

    async fn list_members(
        &self,
        request: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
        let size = paging::page_size("page_size", r.page_size, PAGE_SIZE.0, PAGE_SIZE.1)?;
        let fingerprint = paging::fingerprint(&[&chat_id.uuid()]);
        let after = paging::decode::<(i64, String)>("page_token", &r.page_token, fingerprint)?
            .map(|(join_time, id)| Ok::<_, Status>(MemberCursor { join_time, user_id: token_id(&id)? }))
            .transpose()?;
        let page = self.chats.list_members(caller, chat_id, after, size).await?;
        let next = page.next.map(|c| paging::encode(&(c.join_time, c.user_id.to_string()), fingerprint));
        Ok(Response::new(pb::ListMembersResponse {
            members: page.items.into_iter().map(member_pb).collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }
}

/// `natter.chats.v1.ChatInternalService`: membership checks and activity
/// records for the messages service. Ids that are not UUIDs name nothing
/// (no chat, no chats, no activity), as they never reach the store.
#[derive(Clone)]
pub struct ChatInternalApi {
    chats: Arc<Chats>,
}

impl ChatInternalApi {
    /// The internal API over `chats`.
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
        let (Ok(chat_id), Ok(user_id)) = (r.chat_id.parse::<ChatId>(), r.user_id.parse::<UserId>()) else {
            return Ok(Response::new(pb::CheckMembershipResponse::default()));
        };
        let response = match self.chats.membership(chat_id, user_id).await? {
            None => pb::CheckMembershipResponse::default(),
            Some(access) => pb::CheckMembershipResponse {
                chat_exists: true,
                member: access.role.is_some(),
                role: access.role.map(|r| role_pb(r) as i32).unwrap_or_default(),
                archived: access.chat.archive_time.is_some(),
                visibility: visibility_pb(access.chat.visibility) as i32,
                kind: kind_pb(access.chat.kind) as i32,
            },
        };
        Ok(Response::new(response))
    }

    async fn create_chat_as(
        &self,
        request: Request<pb::CreateChatAsRequest>,
    ) -> Result<Response<pb::CreateChatAsResponse>, Status> {
        let r = request.into_inner();
        let caller = UserId::parse("user_id", &r.user_id)?;
        let new = new_chat(r.request.unwrap_or_default(), caller, self.chats.limits())?;
        let view = self.chats.create_chat(caller, new).await?;
        Ok(Response::new(pb::CreateChatAsResponse { chat: Some(chat_pb(view)) }))
    }

    async fn list_member_chat_ids(
        &self,
        request: Request<pb::ListMemberChatIdsRequest>,
    ) -> Result<Response<pb::ListMemberChatIdsResponse>, Status> {
        let r = request.into_inner();
        let Ok(user_id) = r.user_id.parse::<UserId>() else {
            return Ok(Response::new(pb::ListMemberChatIdsResponse::default()));
        };
        let chat_ids = self.chats.member_chat_ids(user_id, r.managed_only).await?;
        Ok(Response::new(pb::ListMemberChatIdsResponse { chat_ids: chat_ids.iter().map(ChatId::to_string).collect() }))
    }

    async fn record_activity(
        &self,
        request: Request<pb::RecordActivityRequest>,
    ) -> Result<Response<pb::RecordActivityResponse>, Status> {
        let activities: Vec<Activity> = request
            .into_inner()
            .activities
            .into_iter()
            .filter_map(|a| {
                let time = a.last_activity_time.as_ref().map(micros).unwrap_or_default();
                Some(Activity { chat_id: a.chat_id.parse().ok()?, last_seq: a.last_seq, time })
            })
            .collect();
        self.chats.record_activity(&activities).await?;
        Ok(Response::new(pb::RecordActivityResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violated(status: &Status) -> Vec<String> {
        use tonic_types::StatusExt as _;
        let details = status.get_error_details();
        details.bad_request().map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect()).unwrap_or_default()
    }

    #[test]
    fn a_new_chat_counts_its_members_once_with_the_creator() {
        let limits = Limits { group_members: 3, ..Limits::default() };
        let (caller, bob, carol) = (UserId::new_v7(), UserId::new_v7(), UserId::new_v7());
        let ids = |users: &[UserId]| users.iter().map(UserId::to_string).collect::<Vec<_>>();
        let request = |member_ids| pb::CreateChatRequest { title: " Team ".into(), member_ids, ..Default::default() };
        // Repeats and the creator are left out, and do not count twice.
        let new = new_chat(request(ids(&[bob, caller, carol])), caller, &limits).unwrap();
        assert_eq!((new.others, new.title.as_str()), (vec![bob, carol], "Team"));
        assert_eq!(new_chat(request(ids(&[carol, carol])), caller, &limits).unwrap().others, [carol]);
        let crowd = new_chat(request(ids(&[bob, carol, UserId::new_v7()])), caller, &limits).unwrap_err();
        assert_eq!(violated(&crowd), ["member_ids"]);
        assert!(crowd.message().contains("at most 3 members"), "{crowd:?}");
        let malformed = new_chat(request(vec![bob.to_string(), "x".into()]), caller, &limits).unwrap_err();
        assert_eq!(violated(&malformed), ["member_ids[1]"]);
    }

    #[test]
    fn add_members_needs_distinct_users_within_the_limit() {
        let limits = Limits { group_members: 2, ..Limits::default() };
        let chat_id = ChatId::new_v7();
        let bob = UserId::new_v7();
        let request = |user_ids: Vec<String>| pb::AddMembersRequest { chat_id: chat_id.to_string(), user_ids };
        assert_eq!(add_members(request(vec![bob.to_string(); 2]), &limits).unwrap(), (chat_id, vec![bob]));
        assert_eq!(violated(&add_members(request(vec![]), &limits).unwrap_err()), ["user_ids"]);
        assert_eq!(violated(&add_members(request(vec![bob.to_string(); 3]), &limits).unwrap_err()), ["user_ids"]);
    }

    #[test]
    fn a_page_token_names_a_chat_or_is_refused() {
        let caller = UserId::new_v7();
        let limits = Limits::default();
        let first = list_chats(pb::ListChatsRequest::default(), caller, &limits).unwrap();
        let chat_id = ChatId::new_v7();
        let token = paging::encode(&(7_i64, chat_id.to_string()), first.fingerprint);
        let request = pb::ListChatsRequest { page_token: token, ..Default::default() };
        let next = list_chats(request, caller, &limits).unwrap();
        assert_eq!(next.after, Some(ChatCursor { last_activity_time: 7, chat_id }));
        let forged = paging::encode(&(7_i64, "no id"), first.fingerprint);
        let request = pb::ListChatsRequest { page_token: forged, ..Default::default() };
        assert_eq!(violated(&list_chats(request, caller, &limits).unwrap_err()), ["page_token"]);
    }
}
