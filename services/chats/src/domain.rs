//! Chat rules and the chats domain in plain Rust: kinds, roles, visibility,
//! the chat and member records every layer speaks, and what a valid new
//! chat, update or group size is. No IO, no tonic, no rows.

use natter_kit::FieldViolations;
use natter_kit::id::{ChatId, UserId};
use natter_kit::limits::{MaxLen, check_str};

/// Configurable limits of the chats service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest title, in characters (DESIGN: 200).
    pub title_chars: usize,
    /// Longest description, in characters.
    pub description_chars: usize,
    /// Most members of a group, the owner included (DESIGN: 1,000).
    pub group_members: usize,
    /// Most group chats one person (not a bot) is a member of at once,
    /// archived ones too: it bounds the groups anyone can put a user in,
    /// which their streams follow. Direct chats are not counted: they
    /// cannot be left, so counting them would let strangers fill it.
    /// (Telegram's is 500 groups and channels, and refuses an add past it.)
    pub groups_per_user: usize,
    /// Most users one user may block at once (BlockUser).
    pub blocks_per_user: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            title_chars: 200,
            description_chars: 2000,
            group_members: 1000,
            groups_per_user: 5000,
            blocks_per_user: 1000,
        }
    }
}

impl Limits {
    /// The one member-limit rule: true when a chat of `members` members (the
    /// owner included) is allowed. Request checks ([`Limits::check_members`])
    /// and the store's exact count under the chat's lock both ask this.
    pub fn admits_members(&self, members: usize) -> bool {
        members <= self.group_members
    }

    /// [`Limits::admits_members`] as a field violation of `field`
    /// (INVALID_ARGUMENT: `a chat has at most N members`).
    pub fn check_members(&self, field: &str, members: usize) -> Result<(), FieldViolations> {
        if self.admits_members(members) {
            Ok(())
        } else {
            Err(FieldViolations::single(field, format!("a chat has at most {} members", self.group_members)))
        }
    }
}

/// Declares a domain enum stored as lower-case text, parsed strictly.
macro_rules! text_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            /// The stored text, as the migrations' comments list it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            /// Parses the stored text; None for anything else (a store turns
            /// that into an error, never into a default).
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

text_enum!(
    /// Direct (two people, fixed) or group.
    Kind {
        /// Two people, unique per pair, members never change.
        Direct = "direct",
        /// A titled chat of up to [`Limits::group_members`] members.
        Group = "group",
    }
);

text_enum!(
    /// Who may see and join a chat.
    Visibility {
        /// Members only.
        Private = "private",
        /// Anyone may read and join.
        Public = "public",
    }
);

text_enum!(
    /// A member's role; owners and admins manage members.
    Role {
        /// The one owner: deletes the chat, changes roles.
        Owner = "owner",
        /// Manages members and the chat's fields.
        Admin = "admin",
        /// Reads and writes.
        Member = "member",
    }
);

text_enum!(
    /// Which messages of a group chat its assistant members answer
    /// (natter.messages.v1.AssistantReplies).
    AssistantReplies {
        /// Those that mention the assistant by name (the default).
        Mentions = "mentions",
        /// Every person's message.
        All = "all",
        /// None.
        Off = "off",
    }
);

text_enum!(
    /// Who may add a user to a group (CreateChat of a group, AddMembers):
    /// their privacy setting, as WhatsApp's and Telegram's "who can add me
    /// to groups". Joining a public chat oneself is never refused by it.
    GroupAdds {
        /// Anyone (the default, unless `--default-group-adds` says otherwise).
        Everyone = "everyone",
        /// Users who share a chat with them at the time of the add, a
        /// public chat aside ([`crate::store::ChatStore::peers_among`]:
        /// anyone may join one).
        Peers = "peers",
        /// Nobody: they join public chats or create groups themselves.
        Nobody = "nobody",
    }
);

text_enum!(
    /// Who may start a direct chat with a user (CreateChat of a direct
    /// chat that does not exist yet): their privacy setting, as Telegram's
    /// "who can message me". A direct chat that exists goes on whatever it
    /// says.
    DirectChats {
        /// Anyone (the default, unless `--default-direct-chats` says
        /// otherwise).
        Everyone = "everyone",
        /// Users who share a chat with them at the time, a public chat
        /// aside ([`crate::store::ChatStore::peers_among`]: anyone may
        /// join one).
        Peers = "peers",
        /// Nobody: they start their direct chats themselves.
        Nobody = "nobody",
    }
);

text_enum!(
    /// Who sees how far a user has read a chat (ListReadPositions, and the
    /// read_updated events of their MarkRead calls): their privacy setting,
    /// as WhatsApp's and Signal's "read receipts" and Matrix's private read
    /// receipts (`m.read.private`, Matrix spec v1.4). Their unread counts
    /// and their own other devices follow their position either way.
    ReadReceipts {
        /// The chat's members (the default, unless `--default-read-receipts`
        /// says otherwise).
        Everyone = "everyone",
        /// Nobody but the user.
        Nobody = "nobody",
    }
);

/// A user's privacy settings in the chats service, as they apply: each one
/// the user did not set is the deployment's default
/// (`--default-group-adds`, `--default-direct-chats`,
/// `--default-read-receipts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrivacySettings {
    /// Who may add them to a group.
    pub group_adds: GroupAdds,
    /// Who may start a direct chat with them.
    pub direct_chats: DirectChats,
    /// Who sees how far they have read.
    pub read_receipts: ReadReceipts,
    /// When they last changed them (µs since the Unix epoch); None while
    /// they are the defaults, never set.
    pub update_time: Option<i64>,
}

/// The privacy settings a user chose: None for each they never set (the
/// deployment's default applies). As an update (UpdatePrivacySettings),
/// None for each its mask does not name (kept as it is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrivacyChoices {
    /// Who may add them to a group.
    pub group_adds: Option<GroupAdds>,
    /// Who may start a direct chat with them.
    pub direct_chats: Option<DirectChats>,
    /// Who sees how far they have read.
    pub read_receipts: Option<ReadReceipts>,
}

/// A user's stored privacy choices and when they last changed them (µs
/// since the Unix epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredPrivacy {
    /// What they chose.
    pub choices: PrivacyChoices,
    /// When they last changed any.
    pub update_time: i64,
}

impl Role {
    /// True for owner and admin.
    pub fn manages(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

/// A chat as stored. Times are µs since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chat {
    /// Client-chosen or UUID v7.
    pub id: ChatId,
    /// Direct or group; never changes.
    pub kind: Kind,
    /// At most [`Limits::title_chars`]; empty for a direct chat, but for
    /// an assistant's, which its first reply titles (TitleChat).
    pub title: String,
    /// At most [`Limits::description_chars`].
    pub description: String,
    /// Who may see and join it.
    pub visibility: Visibility,
    /// The one member whose role is [`Role::Owner`].
    pub owner_id: UserId,
    /// Who created it (a client-chosen id repeated by someone else is
    /// ALREADY_EXISTS).
    pub creator_id: UserId,
    /// Members, the owner included.
    pub member_count: i64,
    /// Set while archived.
    pub archive_time: Option<i64>,
    /// When it was created.
    pub create_time: i64,
    /// Last change of its fields, state or membership.
    pub update_time: i64,
    /// Time of the newest message, else `create_time`: the ListChats order.
    pub last_activity_time: i64,
    /// seq of the newest message, 0 before the first.
    pub last_seq: i64,
    /// Time of the newest message, None before the first.
    pub last_message_time: Option<i64>,
    /// Which messages its assistant members answer (a group chat's
    /// setting; a direct chat keeps the default and is always answered).
    pub assistant_replies: AssistantReplies,
    /// Raised by every departure of a member (`chats.members_version`,
    /// see [`crate::store::ChatStore::remove_member`]); 0 before any.
    pub members_version: i64,
}

impl Chat {
    /// Lays `activity` over the chat where it is newer (a higher seq), the
    /// rule every activity write follows: activity never moves back.
    pub fn apply(&mut self, activity: &Activity) {
        if activity.last_seq > self.last_seq {
            self.last_seq = activity.last_seq;
            self.last_activity_time = activity.time;
            self.last_message_time = Some(activity.time);
        }
    }

    /// The keyset position of this chat in a listing in `order`.
    pub fn cursor(&self, order: ChatOrder) -> ChatCursor {
        let time = match order {
            ChatOrder::Activity => self.last_activity_time,
            ChatOrder::CreateTime => self.create_time,
        };
        ChatCursor { time, chat_id: self.id }
    }
}

/// A member of a chat. `join_time` is µs since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    /// The chat.
    pub chat_id: ChatId,
    /// The member.
    pub user_id: UserId,
    /// What they may do.
    pub role: Role,
    /// When they joined.
    pub join_time: i64,
}

impl Member {
    /// The keyset position of this member in a listing by join order.
    pub fn cursor(&self) -> MemberCursor {
        MemberCursor { join_time: self.join_time, user_id: self.user_id }
    }
}

/// A chat with one user's role in it (None: not a member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatAccess {
    /// The chat, with its newest activity.
    pub chat: Chat,
    /// The user's role; None when not a member.
    pub role: Option<Role>,
}

/// A chat's newest message as far as its activity goes, reported by the
/// messages service: `time` is its send time in µs since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// The chat.
    pub chat_id: ChatId,
    /// seq of its newest message (1, 2, ...).
    pub last_seq: i64,
    /// Send time of that message (µs).
    pub time: i64,
}

/// Filters and order of ListChats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatFilter {
    /// Public chats instead of the caller's chats.
    pub public: bool,
    /// Only chats of this kind.
    pub kind: Option<Kind>,
    /// Only archived (true) or active (false) chats.
    pub archived: Option<bool>,
    /// Newest message strictly after this (µs).
    pub last_message_after: Option<i64>,
    /// Newest message strictly before this (µs).
    pub last_message_before: Option<i64>,
    /// Lower-cased substring of the title ([`title_key`]).
    pub query: Option<String>,
    /// Created at or after this (µs; inclusive).
    pub created_after: Option<i64>,
    /// Created strictly before this (µs; exclusive).
    pub created_before: Option<i64>,
    /// Oldest first (by `order_by`).
    pub ascending: bool,
    /// What the listing is ordered by (the id breaks ties).
    pub order_by: ChatOrder,
    /// Only chats whose worst live flagged message matches this (the
    /// service asks the messages service; the store ignores it).
    pub severity: Option<SeverityFilter>,
    /// Only chats the listed user owns or administers (whose flags they
    /// see); set by the service, never by a request.
    pub managed_only: bool,
}

/// The order of a chat listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ChatOrder {
    /// By last activity (`last_activity_time`), as ever.
    #[default]
    Activity,
    /// By creation time.
    CreateTime,
}

/// A filter on a chat's worst live flagged message, by
/// natter.messages.v1.Severity (LOW 2 to CRITICAL 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeverityFilter {
    /// At least this.
    AtLeast(i32),
    /// Exactly this.
    Exactly(i32),
}

impl SeverityFilter {
    /// Whether a chat whose worst live flagged message has `max_severity`
    /// (0: none) passes.
    pub fn admits(self, max_severity: i32) -> bool {
        match self {
            SeverityFilter::AtLeast(n) => max_severity >= n,
            SeverityFilter::Exactly(n) => max_severity == n,
        }
    }
}

/// Keyset position in a listing of chats by `(time, id)`, `time` being what
/// the listing is ordered by ([`ChatOrder`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatCursor {
    /// The last listed chat's activity or creation time (µs).
    pub time: i64,
    /// The last listed chat.
    pub chat_id: ChatId,
}

/// Keyset position in a listing of members by `(join_time, user_id)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberCursor {
    /// The last listed member's join time (µs).
    pub join_time: i64,
    /// The last listed member.
    pub user_id: UserId,
}

/// The fields of an UpdateChat (None: unchanged), validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatUpdate {
    /// A new title (trimmed, checked).
    pub title: Option<String>,
    /// A new description (checked).
    pub description: Option<String>,
    /// A new visibility.
    pub visibility: Option<Visibility>,
    /// Which messages its assistant members answer from now on.
    pub assistant_replies: Option<AssistantReplies>,
}

/// A validated CreateChat request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChat {
    /// Client-chosen id (idempotent retries), else a new v7.
    pub chat_id: Option<ChatId>,
    /// Requested kind; None: resolved by [`resolve_kind`].
    pub kind: Option<Kind>,
    /// Trimmed.
    pub title: String,
    /// As given (checked).
    pub description: String,
    /// The other members: without the creator, without repeats, in request
    /// order; at most [`Limits::group_members`] - 1 of them.
    pub others: Vec<UserId>,
    /// Private unless asked.
    pub visibility: Visibility,
}

/// The key that makes a direct chat unique per pair of users
/// (`<lower uuid>:<higher uuid>`).
pub fn direct_key(a: UserId, b: UserId) -> String {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    format!("{lo}:{hi}")
}

/// Lower case for case-insensitive title search (full Unicode, unlike SQL
/// LOWER on SQLite).
pub fn title_key(title: &str) -> String {
    title.to_lowercase()
}

/// Checks a title against the limit; the error describes the rule broken.
pub fn check_title(title: &str, limits: &Limits) -> Result<(), String> {
    check_str(title, MaxLen::Chars(limits.title_chars))?;
    natter_kit::limits::check_shown_name(title)
}

/// Checks a description against the limit (and for NUL).
pub fn check_description(description: &str, limits: &Limits) -> Result<(), String> {
    check_str(description, MaxLen::Chars(limits.description_chars))
}

/// Checks a ListChats title query: no longer than a title can be, no NUL.
pub fn check_query(query: &str, limits: &Limits) -> Result<(), String> {
    check_str(query, MaxLen::Chars(limits.title_chars))
}

/// Resolves the kind of a new chat from what the request gave: an explicit
/// kind wins; unspecified means direct for exactly one other member and no
/// title, else group. Errors name the field at fault.
pub fn resolve_kind(requested: Option<Kind>, title: &str, others: usize) -> Result<Kind, FieldViolations> {
    let kind = requested.unwrap_or(if others == 1 && title.is_empty() { Kind::Direct } else { Kind::Group });
    match kind {
        Kind::Direct if others != 1 => {
            Err(FieldViolations::single("member_ids", "a direct chat needs exactly one other member"))
        }
        Kind::Direct if !title.is_empty() => Err(FieldViolations::single("title", "a direct chat has no title")),
        Kind::Group if title.is_empty() && others < 2 => {
            Err(FieldViolations::single("title", "a group chat needs a title or at least two other members"))
        }
        k => Ok(k),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_keys_ignore_order() {
        let (a, b) = (UserId::new_v7(), UserId::new_v7());
        assert_eq!(direct_key(a, b), direct_key(b, a));
        assert_ne!(direct_key(a, b), direct_key(a, UserId::new_v7()));
    }

    #[test]
    fn kinds_resolve_as_designed() {
        assert_eq!(resolve_kind(None, "", 1), Ok(Kind::Direct));
        assert_eq!(resolve_kind(None, "team", 1), Ok(Kind::Group));
        assert_eq!(resolve_kind(None, "", 2), Ok(Kind::Group));
        assert_eq!(resolve_kind(None, "solo", 0), Ok(Kind::Group));
        assert!(resolve_kind(None, "", 0).is_err());
        assert!(resolve_kind(Some(Kind::Direct), "", 2).is_err());
        assert!(resolve_kind(Some(Kind::Direct), "x", 1).is_err());
        assert!(resolve_kind(Some(Kind::Group), "", 1).is_err());
    }

    #[test]
    fn titles_are_bounded() {
        let limits = Limits::default();
        assert!(check_title(&"é".repeat(200), &limits).is_ok());
        assert!(check_title(&"é".repeat(201), &limits).is_err());
        assert!(check_description("a\0b", &limits).is_err());
        assert!(check_query(&"q".repeat(201), &limits).is_err());
        assert_eq!(title_key("ÄBC"), "äbc");
    }

    #[test]
    fn stored_enums_parse_strictly() {
        for kind in [Kind::Direct, Kind::Group] {
            assert_eq!(Kind::parse(kind.as_str()), Some(kind));
        }
        for role in [Role::Owner, Role::Admin, Role::Member] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
        assert_eq!(Visibility::parse("public"), Some(Visibility::Public));
        assert_eq!(Kind::parse("channel"), None);
        assert_eq!(Role::parse("Owner"), None);
        assert_eq!(Visibility::parse(""), None);
    }

    #[test]
    fn the_member_limit_is_one_rule() {
        let limits = Limits { group_members: 3, ..Limits::default() };
        assert!(limits.admits_members(3));
        assert!(!limits.admits_members(4));
        let refused = limits.check_members("user_ids", 4).unwrap_err();
        assert_eq!(refused.violations()[0].0, "user_ids");
        assert!(refused.to_string().contains("at most 3 members"), "{refused}");
    }

    #[test]
    fn severity_filters_match_at_least_or_exactly() {
        assert!(SeverityFilter::AtLeast(3).admits(5));
        assert!(SeverityFilter::AtLeast(3).admits(3));
        assert!(!SeverityFilter::AtLeast(3).admits(2));
        assert!(SeverityFilter::Exactly(3).admits(3));
        assert!(!SeverityFilter::Exactly(3).admits(5), "worse is not the same");
        assert!(!SeverityFilter::AtLeast(2).admits(0), "no flagged message matches nothing");
    }

    #[test]
    fn activity_never_moves_a_chat_back() {
        let id = ChatId::new_v7();
        let owner = UserId::new_v7();
        let mut chat = Chat {
            id,
            kind: Kind::Group,
            title: "t".into(),
            description: String::new(),
            visibility: Visibility::Private,
            owner_id: owner,
            creator_id: owner,
            member_count: 1,
            archive_time: None,
            create_time: 1,
            update_time: 1,
            last_activity_time: 1,
            last_seq: 0,
            last_message_time: None,
            assistant_replies: AssistantReplies::Mentions,
            members_version: 0,
        };
        chat.apply(&Activity { chat_id: id, last_seq: 2, time: 20 });
        chat.apply(&Activity { chat_id: id, last_seq: 1, time: 30 });
        assert_eq!((chat.last_seq, chat.last_activity_time, chat.last_message_time), (2, 20, Some(20)));
    }
}
