//! Connections, users and chats the scenarios share. One tonic `Channel` is
//! one HTTP/2 connection; callers are spread over a fixed set of them so the
//! connection count is a setting, not an accident.

use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use natter_proto::chats::v1 as chats_pb;
use natter_proto::chats::v1::chat_service_client::ChatServiceClient;
use natter_proto::messages::v1 as messages_pb;
use natter_proto::messages::v1::message_service_client::MessageServiceClient;
use natter_proto::sessions::v1 as sessions_pb;
use natter_proto::sessions::v1::session_service_client::SessionServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

/// Opens `n` HTTP/2 connections to `url` (at most 32 connecting at once).
///
/// Errors: a connection is refused or times out (10 s).
pub(crate) async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let endpoint = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        // Unlimited by natter's server anyway; keeps many idle streams
        // from ever being refused for lack of credit.
        .initial_connection_window_size(Some(8 * 1024 * 1024));
    futures::stream::iter(0..n)
        .map(|_| endpoint.connect())
        .buffer_unordered(32)
        .try_collect()
        .await
        .with_context(|| format!("cannot connect to {url}"))
}

/// A user the tool created, with a bearer token.
#[derive(Clone, Debug)]
pub(crate) struct User {
    pub(crate) id: String,
    bearer: MetadataValue<Ascii>,
}

impl User {
    /// Wraps `message` in a request that carries this user's token.
    pub(crate) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert("authorization", self.bearer.clone());
        request
    }
}

/// Users, chats and connections for one run.
pub(crate) struct Fixture {
    pub(crate) channels: Vec<Channel>,
    pub(crate) users: Vec<User>,
    /// A short random tag that keeps usernames unique across runs.
    pub(crate) run_id: String,
}

impl Fixture {
    /// Connects and creates `users` users, each with a session (CreateUser,
    /// then CreateSession: two argon2 hashes each on the server, so 16 at a
    /// time).
    ///
    /// Errors: the server refuses a call.
    pub(crate) async fn setup(url: &str, connections: usize, users: usize) -> anyhow::Result<Self> {
        let channels = connect(url, connections).await?;
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let users = futures::stream::iter(0..users)
            .map(|i| {
                let mut client = SessionServiceClient::new(channels[i % channels.len()].clone());
                let username = format!("bench_{run_id}_{i}");
                async move {
                    let password = "bench password".to_owned();
                    client
                        .create_user(sessions_pb::CreateUserRequest {
                            username: username.clone(),
                            password: password.clone(),
                            display_name: String::new(),
                        })
                        .await
                        .with_context(|| format!("CreateUser {username}"))?;
                    let session = client
                        .create_session(sessions_pb::CreateSessionRequest { username: username.clone(), password })
                        .await
                        .with_context(|| format!("CreateSession {username}"))?
                        .into_inner();
                    let id = session.user.context("CreateSession returned no user")?.id;
                    let bearer = MetadataValue::try_from(format!("Bearer {}", session.token))?;
                    anyhow::Ok(User { id, bearer })
                }
            })
            .buffered(16)
            .try_collect()
            .await?;
        Ok(Self { channels, users, run_id })
    }

    /// The connection for caller `i`.
    pub(crate) fn channel(&self, i: usize) -> Channel {
        self.channels[i % self.channels.len()].clone()
    }

    /// A MessageService client on the connection of caller `i`.
    pub(crate) fn messages(&self, i: usize) -> MessageServiceClient<Channel> {
        MessageServiceClient::new(self.channel(i))
    }

    /// Creates a group chat owned by `owner` with `members` (user indexes,
    /// the owner left out), returning its id.
    ///
    /// Errors: the server refuses the call.
    pub(crate) async fn group_chat(&self, owner: usize, members: &[usize], title: &str) -> anyhow::Result<String> {
        let mut client = ChatServiceClient::new(self.channel(owner));
        let member_ids = members.iter().filter(|&&m| m != owner).map(|&m| self.users[m].id.clone()).collect();
        let request = chats_pb::CreateChatRequest {
            chat_id: String::new(),
            kind: chats_pb::ChatKind::Group as i32,
            title: format!("{title} {}", self.run_id),
            description: String::new(),
            member_ids,
            visibility: chats_pb::Visibility::Private as i32,
        };
        let chat = client.create_chat(self.users[owner].request(request)).await.context("CreateChat")?.into_inner();
        Ok(chat.chat.context("CreateChat returned no chat")?.id)
    }

    /// Opens a StreamEvents stream of `user` on one chat (live events only:
    /// no resume). Returns once the server has answered with headers, which
    /// it does after subscribing, so no later message is missed.
    ///
    /// Errors: the server refuses the stream.
    pub(crate) async fn open_stream(
        channel: Channel,
        user: &User,
        chat_id: &str,
    ) -> Result<tonic::Streaming<messages_pb::StreamEventsResponse>, tonic::Status> {
        let request = messages_pb::StreamEventsRequest { chat_ids: vec![chat_id.to_owned()], ..Default::default() };
        Ok(MessageServiceClient::new(channel).stream_events(user.request(request)).await?.into_inner())
    }
}
