//! The tonic face of the chats service: authenticate, validate each request
//! once into domain types (the parse functions below are the one door for
//! input), call [`Chats`], and build protobuf from what it returns (only
//! here).

use std::sync::Arc;

use natter_auth::Authenticator;
use natter_kit::error::invalid_argument;
use natter_kit::id::{ChatId, MessageId, UserId};
use natter_kit::paging;
use natter_kit::time::{micros, timestamp, timestamp_opt};
use natter_proto::chats::v1::{
    self as pb, chat_internal_service_server::ChatInternalService, chat_service_server::ChatService,
};
use tonic::{Request, Response, Status};

use crate::domain::{
    self, Activity, AssistantReplies, ChatCursor, ChatFilter, ChatOrder, ChatUpdate, DirectChats, GroupAdds, Kind,
    Limits, Member, MemberCursor, NewChat, PrivacyChoices, PrivacySettings, ReadReceipts, Role, SeverityFilter,
    Visibility,
};
use crate::error::ChatsError;
use crate::service::{ChatView, Chats};
use crate::store::assistant_replies_pb;

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
    let (last_message, unread_count, mention_count) = match view.preview {
        Some(p) => (
            Some(pb::LastMessage {
                seq: p.seq,
                author_id: p.author_id,
                text: p.text.chars().take(EXCERPT_CHARS).collect(),
                send_time: timestamp_opt(p.send_time),
            }),
            p.unread_count,
            p.mention_count,
        ),
        None => (None, 0, 0),
    };
    pb::Chat {
        assistant_replies: assistant_replies_pb(&c),
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
        mention_count,
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
    /// Whose chats (staff only, checked by the service); None: the
    /// caller's (also when the request names the caller).
    pub user: Option<UserId>,
    /// Filters and order.
    pub filter: ChatFilter,
    /// Where the page starts (from the page token).
    pub after: Option<ChatCursor>,
    /// 1..=200, 50 by default.
    pub page_size: u32,
    /// Binds page tokens to the caller, the user listed, the filters and
    /// the order.
    fingerprint: u64,
}

/// natter.messages.v1.Severity LOW to CRITICAL, for the filter `field`.
fn severity_level(field: &str, value: i32) -> Result<i32, ChatsError> {
    use natter_proto::messages::v1::Severity;
    if (Severity::Low as i32..=Severity::Critical as i32).contains(&value) {
        Ok(value)
    } else {
        Err(ChatsError::invalid(field, "must be LOW, MEDIUM, HIGH or CRITICAL"))
    }
}

/// The severity filter of `flagged`, `min_severity` and `severity` (at most
/// one of the last two).
fn severity_filter(flagged: bool, min_severity: i32, severity: i32) -> Result<Option<SeverityFilter>, ChatsError> {
    Ok(match (min_severity, severity) {
        (0, 0) => flagged.then_some(SeverityFilter::AtLeast(natter_proto::messages::v1::Severity::Low as i32)),
        (n, 0) => Some(SeverityFilter::AtLeast(severity_level("min_severity", n)?)),
        (0, n) => Some(SeverityFilter::Exactly(severity_level("severity", n)?)),
        _ => return Err(ChatsError::invalid("severity", "must not be set together with min_severity")),
    })
}

/// The order of `order` and `order_by` (AIP-132: a field, then `asc`, the
/// default, or `desc`): what to sort by, and whether ascending.
fn chat_order(order: i32, order_by: &str) -> Result<(ChatOrder, bool), ChatsError> {
    let ascending = match pb::SortOrder::try_from(order) {
        Ok(pb::SortOrder::Unspecified) => None,
        Ok(pb::SortOrder::Desc) => Some(false),
        Ok(pb::SortOrder::Asc) => Some(true),
        Err(_) => return Err(ChatsError::invalid("order", "unknown sort order")),
    };
    if order_by.trim().is_empty() {
        return Ok((ChatOrder::Activity, ascending.unwrap_or(false)));
    }
    if ascending.is_some() {
        return Err(ChatsError::invalid("order", "must be unspecified when order_by is set"));
    }
    let words: Vec<&str> = order_by.split_whitespace().collect();
    let field = match words[0] {
        "last_activity_time" | "activity" => Some(ChatOrder::Activity),
        "create_time" => Some(ChatOrder::CreateTime),
        _ => None,
    };
    let ascending = match words.get(1..) {
        Some([]) => Some(true),
        Some([d]) if d.eq_ignore_ascii_case("asc") => Some(true),
        Some([d]) if d.eq_ignore_ascii_case("desc") => Some(false),
        _ => None,
    };
    match (field, ascending) {
        (Some(field), Some(ascending)) => Ok((field, ascending)),
        _ => {
            // Quoted, and cut short: the message goes back in a header.
            let shown: String = order_by.chars().take(64).collect();
            Err(ChatsError::invalid(
                "order_by",
                format!("{shown:?} is not an order: use last_activity_time or create_time, then asc or desc"),
            ))
        }
    }
}

/// Validates a ListChats request of `caller`.
pub fn list_chats(r: pb::ListChatsRequest, caller: UserId, limits: &Limits) -> Result<ListChats, Status> {
    let page_size = paging::page_size("page_size", r.page_size, PAGE_SIZE.0, PAGE_SIZE.1)?;
    let (order_by, ascending) = chat_order(r.order, &r.order_by)?;
    let public = match pb::Availability::try_from(r.availability) {
        Ok(pb::Availability::Unspecified | pb::Availability::Member) => false,
        Ok(pb::Availability::Public) => true,
        Err(_) => return Err(ChatsError::invalid("availability", "unknown availability").into()),
    };
    let user = UserId::parse_optional("user_id", &r.user_id)?.filter(|u| *u != caller);
    if user.is_some() && public {
        return Err(ChatsError::invalid("user_id", "lists a user's chats: not with AVAILABILITY_PUBLIC").into());
    }
    domain::check_query(&r.query, limits).map_err(|e| ChatsError::invalid("query", e))?;
    let query = domain::title_key(r.query.trim());
    let filter = ChatFilter {
        public,
        kind: kind_from_pb("kind", r.kind)?,
        archived: r.archived,
        last_message_after: r.last_message_after.as_ref().map(micros),
        last_message_before: r.last_message_before.as_ref().map(micros),
        query: (!query.is_empty()).then_some(query),
        created_after: r.create_time_after.as_ref().map(micros),
        created_before: r.create_time_before.as_ref().map(micros),
        ascending,
        order_by,
        severity: severity_filter(r.flagged, r.min_severity, r.severity)?,
        managed_only: false,
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
    // Each later part only when set, so that earlier tokens stay valid; the
    // later ones named, so that no two requests share a fingerprint.
    let (min_severity, exact_severity) = match filter.severity {
        Some(SeverityFilter::AtLeast(n)) => (Some(n), None),
        Some(SeverityFilter::Exactly(n)) => (None, Some(("severity", i64::from(n)))),
        None => (None, None),
    };
    let named = [
        exact_severity,
        (order_by == ChatOrder::CreateTime).then_some(("order_by create_time", 0)),
        filter.created_after.map(|t| ("create_time_after", t)),
        filter.created_before.map(|t| ("create_time_before", t)),
    ];
    let user_uuid = user.map(|u| ("user_id", u.uuid()));
    parts.extend(min_severity.iter().map(|n| n as &dyn std::fmt::Debug));
    parts.extend(named.iter().flatten().map(|p| p as &dyn std::fmt::Debug));
    parts.extend(user_uuid.iter().map(|p| p as &dyn std::fmt::Debug));
    let fingerprint = paging::fingerprint(&parts);
    let after = paging::decode::<(i64, String)>("page_token", &r.page_token, fingerprint)?
        .map(|(time, id)| Ok::<_, Status>(ChatCursor { time, chat_id: token_id(&id)? }))
        .transpose()?;
    Ok(ListChats { user, filter, after, page_size, fingerprint })
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
        return Err(ChatsError::invalid(
            "update_mask",
            "must name at least one of: title, description, visibility, assistant_replies",
        )
        .into());
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
            "assistant_replies" => {
                use natter_proto::messages::v1::AssistantReplies as Pb;
                update.assistant_replies = Some(match Pb::try_from(chat.assistant_replies) {
                    Ok(Pb::Mentions) => AssistantReplies::Mentions,
                    Ok(Pb::All) => AssistantReplies::All,
                    Ok(Pb::Off) => AssistantReplies::Off,
                    _ => {
                        return Err(
                            ChatsError::invalid("chat.assistant_replies", "must be MENTIONS, ALL or OFF").into()
                        );
                    }
                });
            }
            other => {
                return Err(natter_kit::error::unknown_mask_path(
                    i,
                    other,
                    "title, description, visibility, assistant_replies",
                ));
            }
        }
    }
    Ok((chat_id, update))
}

/// Validates an UpdatePrivacySettings request into the choices it makes:
/// each field its mask names (`group_adds`, `direct_chats`,
/// `read_receipts`) must be specified; the others are kept as they are.
pub fn privacy_settings_update(r: pb::UpdatePrivacySettingsRequest) -> Result<PrivacyChoices, Status> {
    const PATHS: &str = "group_adds, direct_chats, read_receipts";
    let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
    if paths.is_empty() {
        return Err(ChatsError::invalid("update_mask", format!("must name at least one of: {PATHS}")).into());
    }
    let settings = r.settings.unwrap_or_default();
    let mut update = PrivacyChoices::default();
    for (i, path) in paths.iter().enumerate() {
        match path.as_str() {
            "group_adds" => {
                update.group_adds = Some(match pb::GroupAdds::try_from(settings.group_adds) {
                    Ok(pb::GroupAdds::Everyone) => GroupAdds::Everyone,
                    Ok(pb::GroupAdds::Peers) => GroupAdds::Peers,
                    Ok(pb::GroupAdds::Nobody) => GroupAdds::Nobody,
                    _ => {
                        return Err(
                            ChatsError::invalid("settings.group_adds", "must be EVERYONE, PEERS or NOBODY").into()
                        );
                    }
                });
            }
            "direct_chats" => {
                update.direct_chats = Some(match pb::DirectChats::try_from(settings.direct_chats) {
                    Ok(pb::DirectChats::Everyone) => DirectChats::Everyone,
                    Ok(pb::DirectChats::Peers) => DirectChats::Peers,
                    Ok(pb::DirectChats::Nobody) => DirectChats::Nobody,
                    _ => {
                        return Err(
                            ChatsError::invalid("settings.direct_chats", "must be EVERYONE, PEERS or NOBODY").into()
                        );
                    }
                });
            }
            "read_receipts" => {
                update.read_receipts = Some(match pb::ReadReceipts::try_from(settings.read_receipts) {
                    Ok(pb::ReadReceipts::Everyone) => ReadReceipts::Everyone,
                    Ok(pb::ReadReceipts::Nobody) => ReadReceipts::Nobody,
                    _ => return Err(ChatsError::invalid("settings.read_receipts", "must be EVERYONE or NOBODY").into()),
                });
            }
            other => return Err(natter_kit::error::unknown_mask_path(i, other, PATHS)),
        }
    }
    Ok(update)
}

fn privacy_settings_pb(settings: PrivacySettings) -> pb::PrivacySettings {
    let group_adds = match settings.group_adds {
        GroupAdds::Everyone => pb::GroupAdds::Everyone,
        GroupAdds::Peers => pb::GroupAdds::Peers,
        GroupAdds::Nobody => pb::GroupAdds::Nobody,
    };
    let direct_chats = match settings.direct_chats {
        DirectChats::Everyone => pb::DirectChats::Everyone,
        DirectChats::Peers => pb::DirectChats::Peers,
        DirectChats::Nobody => pb::DirectChats::Nobody,
    };
    let read_receipts = match settings.read_receipts {
        ReadReceipts::Everyone => pb::ReadReceipts::Everyone,
        ReadReceipts::Nobody => pb::ReadReceipts::Nobody,
    };
    pb::PrivacySettings {
        group_adds: group_adds as i32,
        direct_chats: direct_chats as i32,
        read_receipts: read_receipts as i32,
        update_time: settings.update_time.map(timestamp),
    }
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
        let page = self.chats.list_chats(caller, list.user, &list.filter, list.after, list.page_size).await?;
        let next = page.next.map(|c| paging::encode(&(c.time, c.chat_id.to_string()), list.fingerprint));
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

    async fn get_privacy_settings(
        &self,
        request: Request<pb::GetPrivacySettingsRequest>,
    ) -> Result<Response<pb::GetPrivacySettingsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let settings = self.chats.privacy_settings(caller).await?;
        Ok(Response::new(pb::GetPrivacySettingsResponse { settings: Some(privacy_settings_pb(settings)) }))
    }

    async fn update_privacy_settings(
        &self,
        request: Request<pb::UpdatePrivacySettingsRequest>,
    ) -> Result<Response<pb::UpdatePrivacySettingsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let update = privacy_settings_update(request.into_inner())?;
        let settings = self.chats.set_privacy_settings(caller, update).await?;
        Ok(Response::new(pb::UpdatePrivacySettingsResponse { settings: Some(privacy_settings_pb(settings)) }))
    }

    async fn block_user(
        &self,
        request: Request<pb::BlockUserRequest>,
    ) -> Result<Response<pb::BlockUserResponse>, Status> {
        let caller = self.caller(&request).await?;
        let other = blocked_user(&request.get_ref().user_id)?;
        self.chats.block_user(caller, other).await?;
        Ok(Response::new(pb::BlockUserResponse {}))
    }

    async fn unblock_user(
        &self,
        request: Request<pb::UnblockUserRequest>,
    ) -> Result<Response<pb::UnblockUserResponse>, Status> {
        let caller = self.caller(&request).await?;
        let other = blocked_user(&request.get_ref().user_id)?;
        self.chats.unblock_user(caller, other).await?;
        Ok(Response::new(pb::UnblockUserResponse {}))
    }

    async fn list_blocked_users(
        &self,
        request: Request<pb::ListBlockedUsersRequest>,
    ) -> Result<Response<pb::ListBlockedUsersResponse>, Status> {
        let caller = self.caller(&request).await?;
        let r = request.into_inner();
        let size = paging::page_size("page_size", r.page_size, PAGE_SIZE.0, PAGE_SIZE.1)?;
        let fingerprint = paging::fingerprint(&[&"blocked_users"]);
        let after =
            paging::decode::<String>("page_token", &r.page_token, fingerprint)?.map(|id| token_id(&id)).transpose()?;
        let page = self.chats.blocked_users(caller, after, size).await?;
        Ok(Response::new(pb::ListBlockedUsersResponse {
            blocked_users: page
                .items
                .into_iter()
                .map(|(user, time)| pb::BlockedUser { user_id: user.to_string(), block_time: Some(timestamp(time)) })
                .collect(),
            next_page_token: page.next.map(|u| paging::encode(&u.to_string(), fingerprint)).unwrap_or_default(),
        }))
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

/// The user a BlockUser or UnblockUser request names.
fn blocked_user(user_id: &str) -> Result<UserId, Status> {
    UserId::parse("user_id", user_id)
}

/// Most `other_user_ids` one CheckMembership call asks about (the messages
/// service sends at most a message's 50 mentions).
pub const OTHER_USER_IDS_MAX: usize = 1000;

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
        if r.other_user_ids.len() > OTHER_USER_IDS_MAX {
            let reason = format!("at most {OTHER_USER_IDS_MAX}");
            return Err(ChatsError::invalid("other_user_ids", reason).into());
        }
        let (Ok(chat_id), Ok(user_id)) = (r.chat_id.parse::<ChatId>(), r.user_id.parse::<UserId>()) else {
            return Ok(Response::new(pb::CheckMembershipResponse::default()));
        };
        let Some(membership) = self.chats.membership(chat_id, user_id).await? else {
            return Ok(Response::new(pb::CheckMembershipResponse::default()));
        };
        let access = &membership.access;
        // Ids that are not UUIDs name no member.
        let others: Vec<Option<UserId>> = r.other_user_ids.iter().map(|u| u.parse().ok()).collect();
        let wanted: Vec<UserId> = others.iter().flatten().copied().collect();
        let other_members = if others.is_empty() {
            Vec::new()
        } else {
            let members = self.chats.members_among(chat_id, &wanted).await?;
            others.iter().map(|u| u.is_some_and(|u| members.contains(&u))).collect()
        };
        // Whose read receipts are private: the user's, then the others'.
        let (private_read_receipts, other_private_read_receipts) = if r.read_receipts {
            let private = self.chats.private_read_receipts(&[&[user_id], &wanted[..]].concat()).await?;
            // `wanted` is `others` without the ids that are no UUIDs.
            let mut flags = private.iter().copied().skip(1);
            let others = others.iter().map(|u| u.is_some() && flags.next().unwrap_or(false));
            (private.first().copied().unwrap_or(false), others.collect())
        } else {
            (false, Vec::new())
        };
        Ok(Response::new(pb::CheckMembershipResponse {
            chat_exists: true,
            member: access.role.is_some(),
            role: access.role.map(|r| role_pb(r) as i32).unwrap_or_default(),
            archived: access.chat.archive_time.is_some(),
            visibility: visibility_pb(access.chat.visibility) as i32,
            kind: kind_pb(access.chat.kind) as i32,
            assistant_replies: assistant_replies_pb(&access.chat),
            other_members,
            blocked: membership.blocked,
            private_read_receipts,
            other_private_read_receipts,
            members_version: access.chat.members_version,
        }))
    }

    async fn title_chat(
        &self,
        request: Request<pb::TitleChatRequest>,
    ) -> Result<Response<pb::TitleChatResponse>, Status> {
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
        let source = MessageId::parse_optional("source_message_id", &r.source_message_id)?;
        let chat = self.chats.title_chat(chat_id, &r.title, source).await?;
        // The chat's own fields (no preview, unread count or aggregates).
        let view = ChatView { chat, preview: None, aggregates: Default::default(), moderator: false };
        Ok(Response::new(pb::TitleChatResponse { chat: Some(chat_pb(view)) }))
    }

    async fn untitle_chat(
        &self,
        request: Request<pb::UntitleChatRequest>,
    ) -> Result<Response<pb::UntitleChatResponse>, Status> {
        let r = request.into_inner();
        let chat_id = ChatId::parse("chat_id", &r.chat_id)?;
        let source = MessageId::parse("source_message_id", &r.source_message_id)?;
        let changed = self.chats.untitle_chat(chat_id, source).await?;
        Ok(Response::new(pb::UntitleChatResponse { changed }))
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
        let blocked = if r.with_blocks { self.chats.blocked_peers(user_id).await? } else { Vec::new() };
        Ok(Response::new(pb::ListMemberChatIdsResponse {
            chat_ids: chat_ids.iter().map(ChatId::to_string).collect(),
            blocked_peer_user_ids: blocked.iter().map(UserId::to_string).collect(),
        }))
    }

    async fn filter_peers(
        &self,
        request: Request<pb::FilterPeersRequest>,
    ) -> Result<Response<pb::FilterPeersResponse>, Status> {
        let r = request.into_inner();
        let candidates: Vec<UserId> = r.candidate_user_ids.iter().filter_map(|id| id.parse().ok()).collect();
        if r.candidate_user_ids.len() > crate::service::PEER_CANDIDATES_MAX {
            let max = crate::service::PEER_CANDIDATES_MAX;
            let got = r.candidate_user_ids.len();
            return Err(ChatsError::invalid("candidate_user_ids", format!("at most {max} ids, got {got}")).into());
        }
        let (Ok(user_id), false) = (r.user_id.parse::<UserId>(), candidates.is_empty()) else {
            return Ok(Response::new(pb::FilterPeersResponse::default()));
        };
        let peers = self.chats.peers_among(user_id, &candidates).await?;
        Ok(Response::new(pb::FilterPeersResponse { peer_user_ids: peers.iter().map(UserId::to_string).collect() }))
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
        assert_eq!(next.after, Some(ChatCursor { time: 7, chat_id }));
        let forged = paging::encode(&(7_i64, "no id"), first.fingerprint);
        let request = pb::ListChatsRequest { page_token: forged, ..Default::default() };
        assert_eq!(violated(&list_chats(request, caller, &limits).unwrap_err()), ["page_token"]);
    }

    #[test]
    fn list_orders_parse_as_aip_132_and_refuse_anything_else() {
        let (caller, limits) = (UserId::new_v7(), Limits::default());
        let parse = |order_by: &str, order: pb::SortOrder| {
            let request = pb::ListChatsRequest { order_by: order_by.into(), order: order as i32, ..Default::default() };
            list_chats(request, caller, &limits).map(|l| (l.filter.order_by, l.filter.ascending))
        };
        use pb::SortOrder::{Asc, Unspecified};
        assert_eq!(parse("", Unspecified).unwrap(), (ChatOrder::Activity, false), "the default, as ever");
        assert_eq!(parse("", Asc).unwrap(), (ChatOrder::Activity, true));
        assert_eq!(parse("create_time desc", Unspecified).unwrap(), (ChatOrder::CreateTime, false));
        assert_eq!(parse("  create_time  ", Unspecified).unwrap(), (ChatOrder::CreateTime, true), "asc by default");
        assert_eq!(parse("create_time ASC", Unspecified).unwrap(), (ChatOrder::CreateTime, true));
        assert_eq!(parse("last_activity_time desc", Unspecified).unwrap(), (ChatOrder::Activity, false));
        assert_eq!(parse("activity desc", Unspecified).unwrap(), (ChatOrder::Activity, false));
        for bad in ["title", "create_time sideways", "create_time desc, id", "desc"] {
            assert_eq!(violated(&parse(bad, Unspecified).unwrap_err()), ["order_by"], "{bad}");
        }
        assert_eq!(violated(&parse("create_time", Asc).unwrap_err()), ["order"]);
    }

    #[test]
    fn severity_filters_take_one_valid_level() {
        let (caller, limits) = (UserId::new_v7(), Limits::default());
        let parse = |flagged: bool, min_severity: Severity, severity: Severity| {
            let request = pb::ListChatsRequest {
                flagged,
                min_severity: min_severity as i32,
                severity: severity as i32,
                ..Default::default()
            };
            list_chats(request, caller, &limits).map(|l| l.filter.severity)
        };
        use Severity::{Critical, High, Low, None as Clean, Unspecified};
        use natter_proto::messages::v1::Severity;
        assert_eq!(parse(false, Unspecified, Unspecified).unwrap(), None);
        assert_eq!(parse(true, Unspecified, Unspecified).unwrap(), Some(SeverityFilter::AtLeast(Low as i32)));
        assert_eq!(parse(false, High, Unspecified).unwrap(), Some(SeverityFilter::AtLeast(High as i32)));
        assert_eq!(parse(true, Unspecified, High).unwrap(), Some(SeverityFilter::Exactly(High as i32)));
        assert_eq!(violated(&parse(false, High, Critical).unwrap_err()), ["severity"]);
        assert_eq!(violated(&parse(false, Unspecified, Clean).unwrap_err()), ["severity"]);
        assert_eq!(violated(&parse(false, Clean, Unspecified).unwrap_err()), ["min_severity"]);
        let unknown = pb::ListChatsRequest { severity: 9, ..Default::default() };
        assert_eq!(violated(&list_chats(unknown, caller, &limits).unwrap_err()), ["severity"]);
    }

    #[test]
    fn tokens_bind_to_the_order_the_range_and_the_user_and_earlier_ones_stay_valid() {
        let (caller, limits) = (UserId::new_v7(), Limits::default());
        let fingerprint = |r: pb::ListChatsRequest| list_chats(r, caller, &limits).unwrap().fingerprint;
        // Unfiltered and flagged listings keep the fingerprints (and so the
        // tokens) of earlier versions.
        let none: (Option<Kind>, Option<bool>, Option<i64>, Option<String>) = (None, None, None, None);
        let legacy =
            paging::fingerprint(&[&caller.uuid(), &false, &none.0, &none.1, &none.2, &none.2, &none.3, &false]);
        assert_eq!(fingerprint(pb::ListChatsRequest::default()), legacy);
        let flagged_legacy =
            paging::fingerprint(&[&caller.uuid(), &false, &none.0, &none.1, &none.2, &none.2, &none.3, &false, &2]);
        assert_eq!(fingerprint(pb::ListChatsRequest { flagged: true, ..Default::default() }), flagged_legacy);
        // Every new filter and order has a fingerprint of its own.
        let at = |seconds| Some(natter_proto::Timestamp { seconds, nanos: 0 });
        let other = UserId::new_v7().to_string();
        let requests = [
            pb::ListChatsRequest::default(),
            pb::ListChatsRequest { order_by: "create_time desc".into(), ..Default::default() },
            pb::ListChatsRequest { order_by: "create_time".into(), ..Default::default() },
            pb::ListChatsRequest { order: pb::SortOrder::Asc as i32, ..Default::default() },
            pb::ListChatsRequest { create_time_after: at(5), ..Default::default() },
            pb::ListChatsRequest { create_time_before: at(5), ..Default::default() },
            pb::ListChatsRequest { min_severity: 4, ..Default::default() },
            pb::ListChatsRequest { severity: 4, ..Default::default() },
            pb::ListChatsRequest { user_id: other.clone(), ..Default::default() },
        ];
        let prints: std::collections::HashSet<u64> = requests.iter().cloned().map(fingerprint).collect();
        assert_eq!(prints.len(), requests.len());
        // The same order spelled two ways is one order; naming oneself is
        // the same as naming no one.
        let spelled = |order_by: &str| pb::ListChatsRequest { order_by: order_by.into(), ..Default::default() };
        assert_eq!(fingerprint(spelled("activity desc")), legacy);
        assert_eq!(fingerprint(spelled("last_activity_time desc")), legacy);
        let me = pb::ListChatsRequest { user_id: caller.to_string(), ..Default::default() };
        assert_eq!(list_chats(me.clone(), caller, &limits).unwrap().user, None);
        assert_eq!(fingerprint(me), legacy);
        let public = pb::ListChatsRequest {
            user_id: other,
            availability: pb::Availability::Public as i32,
            ..Default::default()
        };
        assert_eq!(violated(&list_chats(public, caller, &limits).unwrap_err()), ["user_id"]);
        let malformed = pb::ListChatsRequest { user_id: "x".into(), ..Default::default() };
        assert_eq!(violated(&list_chats(malformed, caller, &limits).unwrap_err()), ["user_id"]);
    }
}
