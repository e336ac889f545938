//! Starts natter for tests and talks to it over real sockets.
//!
//! [`Cluster::all_in_one`] runs the `natter` app on SQLite in a temporary
//! directory; [`Cluster::split`] runs the sessions, chats and messages
//! services as separate servers (each on its own port, linked over gRPC) on
//! PostgreSQL, behind the edge. Both are configured through the binaries' own
//! command-line parsers, bind `127.0.0.1:0` before anything starts, and stop
//! through the same shutdown token a signal would cancel.

use std::future::Future;
use std::net::SocketAddr;

use clap::Parser as _;
use natter_proto::chats::v1::chat_service_client::ChatServiceClient;
use natter_proto::messages::v1::message_service_client::MessageServiceClient;
use natter_proto::sessions::v1::{self as spb, session_service_client::SessionServiceClient};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub mod grpc_web;
pub mod otlp;

/// Which deployment a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `natter serve` on SQLite: one process, one port.
    AllInOne,
    /// Separate service servers on PostgreSQL behind the edge.
    Split,
}

/// Extra flags for one test's deployment, by the service that owns them:
/// the all-in-one takes all of them, each split service only its own (so a
/// flag need not be one that every binary accepts).
#[derive(Clone, Copy, Debug, Default)]
pub struct Flags<'a> {
    /// For the sessions service (`natter_sessions::Config`).
    pub sessions: &'a [&'a str],
    /// For the chats service.
    pub chats: &'a [&'a str],
    /// For the messages service.
    pub messages: &'a [&'a str],
    /// For the assistant service (`--assistant-base-url` and the like).
    pub assistant: &'a [&'a str],
    /// For the edge in split mode, and the all-in-one too: only flags both
    /// accept (`--failed-auth-rate`, `--trusted-proxies`).
    pub edge: &'a [&'a str],
}

impl Flags<'static> {
    /// No flags (as `Default`, in a `const`).
    pub const NONE: Self = Self { sessions: &[], chats: &[], messages: &[], assistant: &[], edge: &[] };
}

impl Flags<'_> {
    /// Every service's flags, for the all-in-one: a flag given with the
    /// same value to several services (a transport limit for the edge and
    /// a service alike) is passed once, as the all-in-one takes each once.
    fn all(&self) -> Vec<&str> {
        let services = self.sessions.iter().chain(self.chats).chain(self.messages).chain(self.assistant);
        let mut tokens = services.chain(self.edge).copied().peekable();
        let mut seen: Vec<[&str; 2]> = Vec::new();
        let mut all = Vec::new();
        while let Some(flag) = tokens.next() {
            let value = tokens.next_if(|value| flag.starts_with("--") && !value.starts_with("--"));
            let item = [flag, value.unwrap_or_default()];
            if !seen.contains(&item) {
                seen.push(item);
                all.extend(std::iter::once(flag).chain(value));
            }
        }
        all
    }
}

/// A running natter and the way to reach it.
pub struct Cluster {
    /// Which deployment this is.
    pub mode: Mode,
    /// Where clients connect: the all-in-one's port or the edge's.
    pub addr: SocketAddr,
    /// Split mode: the services' own public ports (sessions, chats,
    /// messages, assistant), which the edge forwards to; empty for the
    /// all-in-one.
    pub service_addrs: Vec<SocketAddr>,
    /// Split mode: the services' internal listeners (sessions, chats,
    /// messages, assistant: health only); empty for the all-in-one.
    pub internal_addrs: Vec<SocketAddr>,
    /// Split mode: the service credential file the services share.
    pub credential_file: Option<String>,
    channel: Channel,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    pg: Option<(String, String)>,
    /// The all-in-one's event bus.
    bus: Option<std::sync::Arc<dyn natter_bus::EventBus>>,
    _dir: tempfile::TempDir,
}

/// A user with a live session.
#[derive(Clone, Debug)]
pub struct TestUser {
    pub id: String,
    pub username: String,
    pub token: String,
    pub session_id: String,
}

async fn bind() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.expect("bind an ephemeral port")
}

/// The PostgreSQL URL for tests, or `None` (outside CI) when unset. In CI
/// (`CI` set) an unset URL is a failure, so split tests never skip silently.
pub fn postgres_url() -> Option<String> {
    natter_db::testing::postgres_url()
}

/// The NATS URL for tests (`NATTER_TEST_NATS_URL`), or `None` outside CI
/// when unset; in CI an unset URL is a failure.
pub fn nats_url() -> Option<String> {
    match std::env::var("NATTER_TEST_NATS_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => panic!("CI must set NATTER_TEST_NATS_URL"),
        _ => None,
    }
}

fn spawn<F>(tasks: &mut Vec<JoinHandle<anyhow::Result<()>>>, f: F)
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tasks.push(tokio::spawn(f));
}

impl Cluster {
    /// Starts the deployment `mode`; `None` for [`Mode::Split`] when no
    /// PostgreSQL is configured outside CI.
    pub async fn start(mode: Mode) -> Option<Self> {
        Self::start_with(mode, Flags::default()).await
    }

    /// As [`Cluster::start`], with extra `flags` for the services.
    pub async fn start_with(mode: Mode, flags: Flags<'_>) -> Option<Self> {
        match mode {
            Mode::AllInOne => Some(Self::all_in_one(&flags.all()).await),
            Mode::Split => match postgres_url() {
                Some(url) => Some(Self::split_with(&url, &[], flags).await),
                None => {
                    eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
                    None
                }
            },
        }
    }

    /// `natter serve` on SQLite in a temporary directory, with `extra` flags.
    ///
    /// Chat activity stays in memory for the longest interval allowed
    /// unless something reads it (`--activity-flush-interval 8s`,
    /// `natter_links::activity::MAX_FLUSH_INTERVAL`): a test shorter than
    /// that sees activity only through what a listing writes first and what
    /// a read of one chat lays over its row, never through the timer, so a
    /// read path that forgot either fails instead of passing on a lucky tick.
    pub async fn all_in_one(extra: &[&str]) -> Self {
        Self::all_in_one_in(tempfile::tempdir().expect("temp dir"), extra).await
    }

    /// As [`Cluster::all_in_one`], on the data directory `dir`.
    async fn all_in_one_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let listener = bind().await;
        let addr = listener.local_addr().expect("local addr");
        let data_dir = dir.path().display().to_string();
        let mut argv =
            vec!["natter", "--listen", "127.0.0.1:0", "--data-dir", &data_dir, "--activity-flush-interval", "8s"];
        argv.extend_from_slice(extra);
        let args = ServeCli::try_parse_from(argv).expect("valid flags").args;
        let shutdown = CancellationToken::new();
        let app = natter::App::build_on(&args, listener, shutdown.clone()).await.expect("natter starts");
        let bus = app.bus().clone();
        let mut tasks = Vec::new();
        spawn(&mut tasks, app.run());
        let mut cluster = Self::connected(Mode::AllInOne, addr, shutdown, tasks, None, dir).await;
        cluster.bus = Some(bus);
        cluster
    }

    /// The three services on PostgreSQL at `url` (fresh schemas), each on
    /// its own port and linked over gRPC, behind the edge; `extra` flags go
    /// to every service.
    pub async fn split(url: &str, extra: &[&str]) -> Self {
        Self::split_with(url, extra, Flags::default()).await
    }

    /// As [`Cluster::split`], and each service gets its own `flags` too.
    pub async fn split_with(url: &str, extra: &[&str], flags: Flags<'_>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let prefix = format!("t{}_", uuid::Uuid::new_v4().simple());
        Self::split_in(url, dir, prefix, extra, flags).await
    }

    /// As [`Cluster::split_with`], on the schemas of `prefix` (fresh or
    /// not), with its credential file in `dir`.
    async fn split_in(url: &str, dir: tempfile::TempDir, prefix: String, extra: &[&str], flags: Flags<'_>) -> Self {
        let (ls, lc, lm, le, la) = (bind().await, bind().await, bind().await, bind().await, bind().await);
        // Each service's internal listener, which the others call with the
        // service credential (the edge never does).
        let (is, ic, im, ia) = (bind().await, bind().await, bind().await, bind().await);
        let ia_addr = ia.local_addr().expect("addr");
        let [s, c, m, a] = [&ls, &lc, &lm, &la].map(|l| format!("http://{}", l.local_addr().expect("addr")));
        let [internal_s, internal_c, internal_m] =
            [&is, &ic, &im].map(|l| format!("http://{}", l.local_addr().expect("addr")));
        let addr = le.local_addr().expect("addr");
        let credential = write_credential(dir.path());
        // Cross-service events (joins, removals, revocations) travel over
        // NATS between the services when it is configured, under subjects
        // of this deployment's own (the schemas' prefix, the same after a
        // restart): the tests running at once on that server hear none of
        // each other's events, cache invalidations or deaths.
        let nats = nats_url();
        let subjects = format!("natter.{}", prefix.trim_end_matches('_'));
        let mut common = vec![
            "--listen",
            "127.0.0.1:0",
            "--internal-listen",
            "127.0.0.1:0",
            "--service-credential-file",
            &credential,
            "--database-url",
            url,
            "--database-schema-prefix",
            &prefix,
        ];
        if let Some(nats) = nats.as_deref() {
            common.extend(["--nats-url", nats, "--nats-subject-prefix", &subjects]);
        }
        let argv = |name: &'static str, more: &[&str], own: &[&str]| -> Vec<String> {
            std::iter::once(name)
                .chain(common.iter().copied())
                .chain(more.iter().copied())
                .chain(extra.iter().copied())
                .chain(own.iter().copied())
                .map(str::to_owned)
                .collect()
        };
        let shutdown = CancellationToken::new();
        let mut tasks = Vec::new();
        let sessions =
            natter_sessions::Config::try_parse_from(argv("natter-sessions", &[], flags.sessions)).expect("valid flags");
        let chats = natter_chats::Config::try_parse_from(argv(
            "natter-chats",
            &["--sessions-url", &internal_s, "--messages-url", &internal_m],
            flags.chats,
        ))
        .expect("valid flags");
        let messages = natter_messages::Config::try_parse_from(argv(
            "natter-messages",
            &["--sessions-url", &internal_s, "--chats-url", &internal_c],
            flags.messages,
        ))
        .expect("valid flags");
        // The assistant has no store and no bus: flags of its own (not
        // `extra`).
        let assistant = natter_assistant::Config::try_parse_from(
            [
                "natter-assistant",
                "--listen",
                "127.0.0.1:0",
                "--internal-listen",
                "127.0.0.1:0",
                "--service-credential-file",
                &credential,
                "--sessions-url",
                &internal_s,
                "--chats-url",
                &internal_c,
                "--messages-url",
                &internal_m,
            ]
            .into_iter()
            .chain(flags.assistant.iter().copied()),
        )
        .expect("valid flags");
        let edge = natter_edge::EdgeArgs::try_parse_from(
            [
                "natter-edge",
                "--listen",
                "127.0.0.1:0",
                "--sessions-url",
                &s,
                "--chats-url",
                &c,
                "--messages-url",
                &m,
                "--assistant-url",
                &a,
            ]
            .into_iter()
            .chain(flags.edge.iter().copied()),
        )
        .expect("valid flags");
        spawn(&mut tasks, natter_sessions::run(sessions, ls, is, shutdown.clone()));
        spawn(&mut tasks, natter_chats::run(chats, lc, ic, shutdown.clone()));
        spawn(&mut tasks, natter_messages::run(messages, lm, im, shutdown.clone()));
        spawn(&mut tasks, natter_assistant::run(assistant, la, ia, shutdown.clone()));
        spawn(&mut tasks, natter_edge::run(edge, le, shutdown.clone()));
        let mut cluster =
            Self::connected(Mode::Split, addr, shutdown, tasks, Some((url.to_owned(), prefix)), dir).await;
        cluster.service_addrs =
            [s, c, m, a].iter().map(|u| u.trim_start_matches("http://").parse().expect("addr")).collect();
        let internal_a = format!("http://{ia_addr}");
        cluster.internal_addrs = [internal_s, internal_c, internal_m, internal_a]
            .iter()
            .map(|u| u.trim_start_matches("http://").parse().expect("addr"))
            .collect();
        cluster.credential_file = Some(credential);
        cluster
    }

    async fn connected(
        mode: Mode,
        addr: SocketAddr,
        shutdown: CancellationToken,
        tasks: Vec<JoinHandle<anyhow::Result<()>>>,
        pg: Option<(String, String)>,
        dir: tempfile::TempDir,
    ) -> Self {
        // The listener is bound, so connecting cannot race the server's start.
        let channel = Channel::from_shared(format!("http://{addr}")).expect("url").connect().await.expect("connect");
        let cluster = Self {
            mode,
            addr,
            service_addrs: Vec::new(),
            internal_addrs: Vec::new(),
            credential_file: None,
            channel,
            shutdown,
            tasks,
            pg,
            bus: None,
            _dir: dir,
        };
        // Split mode: wait until every service answers through the edge
        // (their stores migrate concurrently after binding).
        cluster.wait_ready().await;
        cluster
    }

    /// Waits until the sessions service answers through the cluster's port
    /// and, in split mode, the edge reports every public service SERVING
    /// (a service's replica migrates its store after binding, and until the
    /// edge's check sees it serve, the edge's health says NOT_SERVING).
    async fn wait_ready(&self) {
        self.wait_answered().await;
        if self.mode != Mode::Split {
            return;
        }
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        for service in
            ["natter.sessions.v1.SessionService", "natter.chats.v1.ChatService", "natter.messages.v1.MessageService"]
        {
            let serving = tonic_health::ServingStatus::Serving as i32;
            let mut tries = 0;
            loop {
                let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
                match health.check(request).await {
                    Ok(status) if status.get_ref().status == serving => break,
                    _ if tries < 400 => tries += 1,
                    other => panic!("the edge never reported {service} serving: {other:?}"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        }
    }

    /// Waits until the sessions service answers through the cluster's port.
    async fn wait_answered(&self) {
        for _ in 0..200 {
            let probe = self
                .sessions()
                .create_session(spb::CreateSessionRequest {
                    username: "probe-x".into(),
                    password: "probe-probe".into(),
                })
                .await;
            match probe {
                // Answered by the sessions service (a test's tight
                // CreateSession limit may refuse even this probe).
                Err(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted) => return,
                Ok(_) => return,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
            }
        }
        panic!("natter did not become ready");
    }

    /// A channel to the cluster's public port.
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn sessions(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel.clone())
    }

    pub fn chats(&self) -> ChatServiceClient<Channel> {
        ChatServiceClient::new(self.channel.clone())
    }

    /// A client of the assistant service.
    pub fn assistant(&self) -> natter_proto::assistant::v1::assistant_service_client::AssistantServiceClient<Channel> {
        natter_proto::assistant::v1::assistant_service_client::AssistantServiceClient::new(self.channel())
    }

    /// A client of the messages service.
    pub fn messages(&self) -> MessageServiceClient<Channel> {
        MessageServiceClient::new(self.channel.clone())
    }

    /// Registers `name` (made unique) with a password and logs in.
    pub async fn user(&self, name: &str) -> TestUser {
        let username = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let password = "correct horse battery".to_owned();
        self.sessions()
            .create_user(spb::CreateUserRequest {
                username: username.clone(),
                password: password.clone(),
                display_name: name.into(),
            })
            .await
            .expect("create user");
        let s = self
            .sessions()
            .create_session(spb::CreateSessionRequest { username: username.clone(), password })
            .await
            .expect("log in")
            .into_inner();
        let session = s.session.expect("session");
        TestUser { id: s.user.expect("user").id, username, token: s.token, session_id: session.id }
    }

    /// A new guest user with a session.
    pub async fn guest(&self) -> TestUser {
        let s = self.sessions().create_session(spb::CreateSessionRequest::default()).await.expect("guest").into_inner();
        let session = s.session.expect("session");
        TestUser { id: s.user.expect("user").id, username: String::new(), token: s.token, session_id: session.id }
    }

    /// Stops every server as [`Cluster::stop`] does, keeping what they
    /// stored (the all-in-one's data directory, the split services'
    /// schemas), and starts the same deployment again on it with `flags`
    /// (for settings only a restart changes, such as `--staff-user-ids`):
    /// users, sessions and chats survive; the addresses are new.
    pub async fn restart_with(self, flags: Flags<'_>) -> Self {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.expect("server task").expect("server ran cleanly");
        }
        match (self.mode, self.pg) {
            (Mode::AllInOne, _) => Self::all_in_one_in(self._dir, &flags.all()).await,
            (Mode::Split, Some((url, prefix))) => Self::split_in(&url, self._dir, prefix, &[], flags).await,
            (Mode::Split, None) => unreachable!("a split cluster has its schemas"),
        }
    }

    /// Cancels the shutdown token, waits for every server to drain, and
    /// drops the PostgreSQL schemas of a split cluster.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.expect("server task").expect("server ran cleanly");
        }
        if let Some((url, prefix)) = self.pg {
            use sqlx::Connection as _;
            sqlx::any::install_default_drivers();
            let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to drop schemas");
            for name in ["sessions", "chats", "messages"] {
                let sql = format!("DROP SCHEMA IF EXISTS {prefix}{name} CASCADE");
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.expect("drop schema");
            }
        }
    }

    /// Channels the all-in-one's event bus holds (one per topic with a
    /// subscriber); `None` in split mode.
    pub fn bus_topics(&self) -> Option<usize> {
        self.bus.as_ref().map(|bus| bus.topic_count())
    }

    /// Revokes a session of a split cluster straight in the sessions store,
    /// announcing nothing on the bus (as when the revocation's event is
    /// lost); `false` in the all-in-one, whose sessions service caches
    /// tokens and would not notice.
    pub async fn revoke_session_silently(&self, session_id: &str) -> bool {
        use sqlx::Connection as _;
        let Some((url, prefix)) = &self.pg else { return false };
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(url).await.expect("connect to the sessions store");
        let sql = format!("UPDATE {prefix}sessions.sessions SET revoke_time = create_time WHERE id = '{session_id}'");
        let done = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.expect("revoke in the store");
        assert_eq!(done.rows_affected(), 1, "one session revoked");
        true
    }

    /// Deletes user `user_id` straight in the sessions store, as
    /// DeleteAccount does (its sessions, the user, an entry in the log of
    /// deleted users the chats service follows), announcing nothing on the
    /// bus: as when the replica that deleted it stopped before publishing,
    /// or its bus connection dropped the announcement.
    pub async fn delete_user_silently(&self, user_id: &str) {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let (url, schema) = match &self.pg {
            Some((url, prefix)) => (url.clone(), format!("{prefix}sessions.")),
            None => (format!("sqlite://{}", self._dir.path().join("sessions.db").display()), String::new()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to the sessions store");
        let mut tx = conn.begin().await.expect("begin");
        for sql in [
            format!("UPDATE {schema}deleted_users_lock SET runs = runs + 1 WHERE id = 1"),
            format!("DELETE FROM {schema}sessions WHERE user_id = '{user_id}'"),
            format!("DELETE FROM {schema}users WHERE id = '{user_id}'"),
            format!(
                "INSERT INTO {schema}deleted_users (position, user_id, delete_time) \
                 SELECT COALESCE(MAX(position), 0) + 1, '{user_id}', 0 FROM {schema}deleted_users"
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.expect("delete in the store");
        }
        tx.commit().await.expect("commit");
        conn.close().await.expect("close");
    }

    /// Takes `blocker`'s block of `blocked` back straight in the chats
    /// store, telling nobody: the chats service's membership checks say
    /// their direct chat is open (once nothing cached says otherwise),
    /// while the messages service still has it closed. That is where a send
    /// whose membership was checked just before the block stands when it
    /// reaches its write after BlockUser answered.
    pub async fn unblock_silently(&self, blocker: &str, blocked: &str) {
        let done = self
            .write_chats_store(|schema| {
                vec![format!(
                    "DELETE FROM {schema}blocks WHERE user_id = '{blocker}' AND blocked_user_id = '{blocked}'"
                )]
            })
            .await;
        assert_eq!(done, [1], "one block taken back");
    }

    /// Puts `user` back in group `chat` as a plain member straight in the
    /// chats store, with the chat's members version as it was before the
    /// departure, telling nobody: the chats service's membership checks
    /// (once nothing cached says otherwise) say `user` is a member, as of
    /// before the departure, while the messages service has the departure
    /// recorded. That is where a send whose membership was checked just
    /// before a RemoveMember stands when it reaches its write after the
    /// removal answered.
    pub async fn undo_departure_silently(&self, chat: &str, user: &str) {
        self.undo_departure_silently_as(chat, user, "member").await;
    }

    /// As [`Cluster::undo_departure_silently`], putting `user` back with
    /// `role` (as the chats store spells it: `member`, `admin`): where a
    /// pin by an admin checked just before their removal stands.
    pub async fn undo_departure_silently_as(&self, chat: &str, user: &str, role: &str) {
        let done = self
            .write_chats_store(|schema| {
                vec![
                    format!("INSERT INTO {schema}members (chat_id, user_id, role, join_time) VALUES ('{chat}', '{user}', '{role}', 0)"),
                    format!(
                        "UPDATE {schema}chats SET members_version = members_version - 1, member_count = member_count + 1 \
                         WHERE id = '{chat}' AND members_version > 0"
                    ),
                ]
            })
            .await;
        assert_eq!(done, [1, 1], "back in, as of before");
    }

    /// Takes `user` out of group `chat` straight in the chats store (its
    /// membership gone, the chat's members version raised as a RemoveMember
    /// raises it), telling nobody: no change recorded in the messages
    /// service, no event on any stream, nothing kept dropped. The chats
    /// service's membership checks say `user` is no member once nothing
    /// cached says otherwise (a change of the chat through the chats
    /// service drops what is kept of it everywhere). That is where a
    /// replica stands that missed the news of a removal: a service that
    /// hears of departures by events (the assistant) goes on as if `user`
    /// were a member, while a check afresh says otherwise.
    pub async fn remove_member_silently(&self, chat: &str, user: &str) {
        let done = self
            .write_chats_store(|schema| {
                vec![
                    format!("DELETE FROM {schema}members WHERE chat_id = '{chat}' AND user_id = '{user}'"),
                    format!(
                        "UPDATE {schema}chats SET members_version = members_version + 1, \
                         member_count = member_count - 1 WHERE id = '{chat}'"
                    ),
                ]
            })
            .await;
        assert_eq!(done, [1, 1], "taken out");
    }

    /// Copies chat `chat`'s row and memberships aside in the chats store
    /// (tables of their own), behind the service's back, for
    /// [`Cluster::undo_deletion_silently`].
    pub async fn copy_chat_aside(&self, chat: &str) {
        let aside = chat.replace('-', "_");
        self.write_chats_store(|schema| {
            vec![
                format!("CREATE TABLE {schema}aside_chats_{aside} AS SELECT * FROM {schema}chats WHERE id = '{chat}'"),
                format!(
                    "CREATE TABLE {schema}aside_members_{aside} AS SELECT * FROM {schema}members \
                     WHERE chat_id = '{chat}'"
                ),
            ]
        })
        .await;
    }

    /// Puts deleted chat `chat` back straight in the chats store, as
    /// [`Cluster::copy_chat_aside`] copied it before its DeleteChat,
    /// telling nobody: the chats service's membership checks (once nothing
    /// cached says otherwise) say its members are members of a live chat,
    /// while the messages service has the chat purged. That is where a
    /// send whose membership was checked just before a DeleteChat stands
    /// when it reaches its write after the delete answered.
    pub async fn undo_deletion_silently(&self, chat: &str) {
        let aside = chat.replace('-', "_");
        let done = self
            .write_chats_store(|schema| {
                vec![
                    format!("INSERT INTO {schema}chats SELECT * FROM {schema}aside_chats_{aside}"),
                    format!("INSERT INTO {schema}members SELECT * FROM {schema}aside_members_{aside}"),
                    format!("DROP TABLE {schema}aside_chats_{aside}"),
                    format!("DROP TABLE {schema}aside_members_{aside}"),
                ]
            })
            .await;
        assert!(done[0] == 1 && done[1] > 0, "back as it was: {done:?}");
    }

    /// Gives `user` of group `chat` back `role` (as the chats store spells
    /// it: `admin`, `owner`) straight in the chats store, with the chat's
    /// members version one lower (as it was before the demotion that
    /// raised it; left at 0 if none did), telling nobody: the chats
    /// service's membership checks (once nothing cached says otherwise) say
    /// `user` holds `role`, as of before the demotion, while the messages
    /// service has the demotion's members version recorded. That is where
    /// a pin or a moderation deletion checked just before an UpdateMember
    /// that demoted its user stands when it reaches its write after the
    /// demotion answered. Only the role is asserted: a demotion that raised
    /// no version leaves nothing to refuse the write, which is what a test
    /// of that rule is to find.
    pub async fn undo_demotion_silently(&self, chat: &str, user: &str, role: &str) {
        let done = self
            .write_chats_store(|schema| {
                vec![
                    format!(
                        "UPDATE {schema}members SET role = '{role}' WHERE chat_id = '{chat}' AND user_id = '{user}'"
                    ),
                    format!(
                        "UPDATE {schema}chats SET members_version = members_version - 1 \
                         WHERE id = '{chat}' AND members_version > 0"
                    ),
                ]
            })
            .await;
        assert_eq!(done[0], 1, "the role given back");
    }

    /// Takes `chat`'s archive back straight in the chats store, telling
    /// nobody: the chats service's membership checks say it is not archived
    /// (once nothing cached says otherwise), while the messages service
    /// still has it archived. That is where a send whose membership was
    /// checked just before ArchiveChat stands when it reaches its write
    /// after ArchiveChat answered.
    pub async fn unarchive_silently(&self, chat: &str) {
        let done = self
            .write_chats_store(|schema| {
                vec![format!(
                    "UPDATE {schema}chats SET archive_time = NULL WHERE id = '{chat}' AND archive_time IS NOT NULL"
                )]
            })
            .await;
        assert_eq!(done[0], 1, "the archive taken back");
    }

    /// Runs the statements `sqls` makes (given the chats store's table
    /// prefix: a split cluster's schema and a dot, or nothing) on the chats
    /// store, behind the service's back, and answers the rows each touched.
    async fn write_chats_store(&self, sqls: impl FnOnce(&str) -> Vec<String>) -> Vec<u64> {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let (url, schema) = match &self.pg {
            Some((url, prefix)) => (url.clone(), format!("{prefix}chats.")),
            None => (format!("sqlite://{}", self._dir.path().join("chats.db").display()), String::new()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to the chats store");
        let mut done = Vec::new();
        for sql in sqls(&schema) {
            let written =
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.expect("write the chats store");
            done.push(written.rows_affected());
        }
        conn.close().await.expect("close");
        done
    }

    /// The count `sql` (a `SELECT COUNT(*) ...` naming the tables of
    /// service `service`'s store unqualified; `service` is `sessions`,
    /// `chats` or `messages`) reads straight from that store's database,
    /// behind the service's back: the all-in-one's SQLite file, read-only,
    /// or a split cluster's PostgreSQL schema. For what no call shows.
    pub async fn count_in_store(&self, service: &str, sql: &str) -> i64 {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let url = match &self.pg {
            Some((url, _)) => url.clone(),
            None => format!("sqlite://{}?mode=ro", self._dir.path().join(format!("{service}.db")).display()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to the store");
        if let Some((_, prefix)) = &self.pg {
            let schema = format!("SET search_path TO {prefix}{service}");
            sqlx::query(sqlx::AssertSqlSafe(schema)).execute(&mut conn).await.expect("the service's schema");
        }
        let (count,): (i64,) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&mut conn).await.expect("count");
        conn.close().await.expect("close");
        count
    }

    /// Holds back every write to `table` of service `service`'s store
    /// (`sessions`, `chats` or `messages`) until [`HeldWrites::release`],
    /// leaving reads free: a transaction of the test's own that holds the
    /// all-in-one's SQLite write lock (`BEGIN IMMEDIATE`: the service's
    /// writes wait in its busy handler, 5 s at most) or, on PostgreSQL,
    /// the table in `EXCLUSIVE` mode. For what a service answers while a
    /// write of its own has not committed yet.
    pub async fn hold_writes(&self, service: &str, table: &str) -> HeldWrites {
        use sqlx::Connection as _;
        sqlx::any::install_default_drivers();
        let (url, sqls) = match &self.pg {
            Some((url, prefix)) => (
                url.clone(),
                vec!["BEGIN".to_owned(), format!("LOCK TABLE {prefix}{service}.{table} IN EXCLUSIVE MODE")],
            ),
            None => (
                format!("sqlite://{}", self._dir.path().join(format!("{service}.db")).display()),
                vec!["BEGIN IMMEDIATE".to_owned()],
            ),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.expect("connect to the store");
        for sql in sqls {
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.expect("hold the store's writes");
        }
        HeldWrites { conn }
    }

    /// The shutdown token (to test graceful shutdown).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// A store's writes held back by [`Cluster::hold_writes`].
pub struct HeldWrites {
    conn: sqlx::AnyConnection,
}

impl HeldWrites {
    /// Lets the held writes go (rolls the holding transaction back).
    pub async fn release(mut self) {
        use sqlx::Connection as _;
        sqlx::query("ROLLBACK").execute(&mut self.conn).await.expect("release the store's writes");
        self.conn.close().await.expect("close");
    }
}

/// Writes a fresh random service credential to `dir/service-credential`
/// and returns the file's path, for `--service-credential-file`.
pub fn write_credential(dir: &std::path::Path) -> String {
    let path = dir.join("service-credential");
    let secret = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    std::fs::write(&path, secret).expect("write the service credential");
    path.display().to_string()
}

/// A request carrying `authorization: Bearer <token>`.
pub fn authed<T>(user: &TestUser, message: T) -> tonic::Request<T> {
    with_token(&user.token, message)
}

/// A request carrying `authorization: Bearer <token>`.
pub fn with_token<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {token}").parse().expect("ascii token");
    request.metadata_mut().insert("authorization", value);
    request
}

#[derive(clap::Parser)]
struct ServeCli {
    #[command(flatten)]
    args: natter::ServeArgs,
}

/// A plain HTTP/1.1 GET: (status, body as text).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let uri: http::Uri = format!("http://{addr}{path}").parse().expect("uri");
    let response = client.get(uri).await.expect("GET");
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}
