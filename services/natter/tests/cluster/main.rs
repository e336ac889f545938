//! Replicas as separate processes: two of each service on one PostgreSQL and
//! one NATS, the edge in front, driven through the generated clients. Runs
//! when NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are set (CI sets
//! both and fails without them).
//!
//! Every process is the `natter` binary running one component
//! (`natter messages ...`), started with the same flags an operator would
//! use; a replica is killed with SIGKILL mid-run and started again.

mod assistant;
mod assistant_replicas;
mod caches;
mod moderation;
mod operate;
mod presence;
mod traces;

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use natter_proto::chats::v1::{self as cpb, chat_service_client::ChatServiceClient};
use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};
use natter_proto::sessions::v1::{self as spb, session_service_client::SessionServiceClient};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use mpb::stream_events_response::Event;

/// A free port on loopback for a process to bind a moment later: below the
/// kernel's ephemeral range (32768-60999 on Linux), where the outgoing
/// connections of the tests running meanwhile (database pools, NATS,
/// clients) cannot take it as their source port, as one did between a
/// `bind(0)` and the process's own bind ("Address already in use"). A port
/// is handed out once per test binary; it is checked free by binding it.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    const PORTS: std::ops::Range<u16> = 20_000..32_000;
    let span = PORTS.end - PORTS.start;
    let start = (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u16;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    (0..span)
        .map(|i| PORTS.start + (start + i) % span)
        .find(|port| !given.contains(port) && std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .inspect(|port| {
            given.insert(*port);
        })
        .expect("a free port below the ephemeral range")
}

struct Node {
    args: Vec<String>,
    /// Environment variables of the process beyond the test's own.
    env: Vec<(String, String)>,
    port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(component: &str, port: u16, args: Vec<String>) -> Self {
        Self::start_with_env(component, port, args, Vec::new())
    }

    /// As [`Node::start`], the process with `env` set too.
    fn start_with_env(component: &str, port: u16, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        let mut all = vec![
            component.to_owned(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--log-format".into(),
            "json".into(),
        ];
        all.extend(args);
        let mut node = Self { args: all, env, port, child: None };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_natter"))
            .args(&self.args)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(if std::env::var_os("NATTER_TEST_LOGS").is_some() { Stdio::inherit() } else { Stdio::null() })
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start natter");
        self.child = Some(child);
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaped");
        }
    }

    /// Stops the process with SIGTERM, as an orchestrator does, and waits
    /// for it: it must exit with status 0.
    fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let status = child.wait().expect("reaped");
        assert!(status.success(), "natter exited with {status} on SIGTERM");
    }

    async fn channel(&self) -> Channel {
        healthy(&self.url()).await.unwrap_or_else(|| panic!("{} did not become healthy", self.url()))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A channel to `url` once it answers health as serving (bounded wait for
/// a process to bind and start): None after 15 s.
async fn healthy(url: &str) -> Option<Channel> {
    for _ in 0..300 {
        if let Ok(channel) = Channel::from_shared(url.to_owned()).unwrap().connect().await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let check = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            if matches!(check, Ok(r) if r.get_ref().status == 1) {
                return Some(channel);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn authed<T>(token: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var_os("CI").is_some() => panic!("CI must set {name}"),
        _ => None,
    }
}

async fn user(channel: &Channel, name: &str) -> (String, String) {
    let username = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let password = "correct horse battery".to_owned();
    let mut sessions = SessionServiceClient::new(channel.clone());
    sessions
        .create_user(spb::CreateUserRequest {
            username: username.clone(),
            password: password.clone(),
            display_name: name.into(),
        })
        .await
        .unwrap();
    let s = sessions.create_session(spb::CreateSessionRequest { username, password }).await.unwrap().into_inner();
    (s.user.unwrap().id, s.token)
}

/// Sends with a client-chosen id, retrying the same id until acknowledged
/// (what a well-behaved client does across a replica's death).
async fn send_until_acked(channel: &Channel, token: &str, chat: &str, text: String) -> mpb::Message {
    let id = uuid::Uuid::now_v7().to_string();
    for _ in 0..100 {
        let request = mpb::SendMessageRequest {
            chat_id: chat.to_owned(),
            message_id: id.clone(),
            text: text.clone(),
            ..Default::default()
        };
        match MessageServiceClient::new(channel.clone()).send_message(authed(token, request)).await {
            Ok(r) => return r.into_inner().message.unwrap(),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("send failed: {s:?}"),
        }
    }
    panic!("send never acknowledged");
}

/// A stream that reconnects with `resume` after errors and records what
/// arrives, until `total` messages were seen. Each channel says whether it
/// goes through the edge.
async fn collect(channels: Vec<(Channel, bool)>, token: String, chat: String, total: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    let mut attempt = 0usize;
    while (seen.len() as i64) < total {
        let (channel, via_edge) = channels[attempt % channels.len()].clone();
        attempt += 1;
        let last = seen.last().copied().unwrap_or(0);
        let request = mpb::StreamEventsRequest {
            chat_ids: vec![chat.clone()],
            resume: [(chat.clone(), last)].into(),
            ..Default::default()
        };
        let mut stream = match MessageServiceClient::new(channel).stream_events(authed(&token, request)).await {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                Ok(Ok(Some(e))) => {
                    if let Some(Event::MessageCreated(m)) = e.event {
                        seen.push(m.seq);
                        if seen.len() as i64 == total {
                            return seen;
                        }
                    }
                }
                Ok(Ok(None)) => break,
                // Through the edge, a killed replica is UNAVAILABLE: what the
                // protos tell clients to resume after. (Seen directly, the
                // client library reports the broken connection itself.)
                Ok(Err(status)) => {
                    if via_edge {
                        assert_eq!(status.code(), Code::Unavailable, "a stream cut by a crash: {status:?}");
                    }
                    break;
                }
                Err(_) => panic!("stream stalled after {} messages", seen.len()),
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_every_guarantee_through_a_crash() {
    let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
        return;
    };
    let prefix = format!("r{}_", uuid::Uuid::new_v4().simple());
    // The shared secret the services authenticate each other's calls with.
    let secrets = tempfile::tempdir().unwrap();
    let credential = credential_file(secrets.path());
    let ports: Vec<u16> = (0..7).map(|_| free_port()).collect();
    // Each service replica's internal listener, which the other services call.
    let internal: BTreeMap<u16, u16> = ports[..6].iter().map(|p| (*p, free_port())).collect();
    let common = |port: u16, more: &[String]| -> Vec<String> {
        let mut v = shared_store(&db, &prefix, &nats);
        v.extend([
            "--internal-listen".into(),
            format!("127.0.0.1:{}", internal[&port]),
            "--service-credential-file".into(),
            credential.clone(),
        ]);
        v.extend_from_slice(more);
        v
    };
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let internal_url = |p: u16| url(internal[&p]);
    let (s1, s2, c1, c2, m1, m2, edge_port) = (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5], ports[6]);
    let sessions = vec![Node::start("sessions", s1, common(s1, &[])), Node::start("sessions", s2, common(s2, &[]))];
    let chats_args = |c: u16, s: u16, m: u16| {
        common(c, &["--sessions-url".into(), internal_url(s), "--messages-url".into(), internal_url(m)])
    };
    let chats =
        vec![Node::start("chats", c1, chats_args(c1, s1, m1)), Node::start("chats", c2, chats_args(c2, s2, m2))];
    let messages_args = |m: u16, s: u16, c: u16| {
        common(m, &["--sessions-url".into(), internal_url(s), "--chats-url".into(), internal_url(c)])
    };
    let mut messages = vec![
        Node::start("messages", m1, messages_args(m1, s1, c1)),
        Node::start("messages", m2, messages_args(m2, s2, c2)),
    ];
    let list = |a: u16, b: u16| format!("{},{}", url(a), url(b));
    let edge = Node::start(
        "edge",
        edge_port,
        vec![
            "--sessions-url".into(),
            list(s1, s2),
            "--chats-url".into(),
            list(c1, c2),
            "--messages-url".into(),
            list(m1, m2),
            "--upstream-health-interval".into(),
            "200ms".into(),
        ],
    );
    for node in sessions.iter().chain(&chats).chain(&messages) {
        node.channel().await;
    }
    let edge_ch = edge.channel().await;
    let (m1_ch, m2_ch) = (messages[0].channel().await, messages[1].channel().await);

    let (alice_id, alice) = user(&edge_ch, "alice").await;
    let (bob_id, bob) = user(&edge_ch, "bob").await;
    let (carol_id, carol) = user(&edge_ch, "carol").await;
    let _ = alice_id;
    let create = cpb::CreateChatRequest {
        title: "replicas".into(),
        member_ids: vec![bob_id.clone(), carol_id.clone()],
        ..Default::default()
    };
    let chat = ChatServiceClient::new(edge_ch.clone())
        .create_chat(authed(&alice, create))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap()
        .id;

    // Streams held on each replica, and one through the edge.
    let per_sender = 25i64;
    let total = per_sender * 3;
    let on_a =
        tokio::spawn(collect(vec![(m1_ch.clone(), false), (edge_ch.clone(), true)], bob.clone(), chat.clone(), total));
    let on_b = tokio::spawn(collect(vec![(m2_ch.clone(), false)], carol.clone(), chat.clone(), total));
    let via_edge = tokio::spawn(collect(vec![(edge_ch.clone(), true)], alice.clone(), chat.clone(), total));

    // Concurrent senders on both replicas directly, and through the edge.
    let sender = |channel: Channel, token: String, tag: &'static str| {
        let chat = chat.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..per_sender {
                acked.push(send_until_acked(&channel, &token, &chat, format!("{tag}{i}")).await);
            }
            acked
        })
    };
    let from_a = sender(m1_ch.clone(), alice.clone(), "a");
    let from_b = sender(m2_ch.clone(), bob.clone(), "b");
    let from_edge = sender(edge_ch.clone(), carol.clone(), "e");

    // Kill replica A mid-run, then bring it back on the same port.
    wait_for_seq(&edge_ch, &alice, &chat, total / 3).await;
    messages[0].kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    messages[0].spawn();
    messages[0].channel().await;

    let mut acked: Vec<mpb::Message> = Vec::new();
    for task in [from_a, from_b, from_edge] {
        acked.extend(task.await.unwrap());
    }
    // Every acknowledgement names a distinct message and seq, 1..=total.
    let mut seqs: Vec<i64> = acked.iter().map(|m| m.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "gap-free, unique seqs across replicas");
    let ids: HashSet<&str> = acked.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.len() as i64, total);

    // Every stream saw every acknowledged message exactly once, in order.
    for (name, stream) in [("replica A (killed)", on_a), ("replica B", on_b), ("edge", via_edge)] {
        let got = tokio::time::timeout(Duration::from_secs(60), stream).await.expect("stream finished").unwrap();
        assert_eq!(got, (1..=total).collect::<Vec<_>>(), "{name}");
    }

    // The store has exactly one row per message.
    let mut rows: BTreeMap<i64, String> = BTreeMap::new();
    for (seq, id) in all_messages(&edge_ch, &alice, &chat).await {
        assert!(rows.insert(seq, id).is_none(), "duplicate seq");
    }
    assert_eq!(rows.len() as i64, total);

    // A retry of one message_id on the other replica returns the original.
    let original = acked.iter().find(|m| m.text.starts_with('a')).unwrap();
    let retry = mpb::SendMessageRequest {
        chat_id: chat.clone(),
        message_id: original.id.clone(),
        text: original.text.clone(),
        ..Default::default()
    };
    let again = MessageServiceClient::new(m2_ch.clone())
        .send_message(authed(&alice, retry))
        .await
        .unwrap()
        .into_inner()
        .message
        .unwrap();
    assert_eq!((again.id.as_str(), again.seq), (original.id.as_str(), original.seq));

    // A stream held on replica A, cut by A's death, resumes by change number
    // and sees the edit and the delete made on replica B meanwhile, once
    // each, in their state now, then live with no gap.
    let m1_ch = messages[0].channel().await;
    let request = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut held = MessageServiceClient::new(m1_ch).stream_events(authed(&bob, request)).await.unwrap().into_inner();
    let marker = send_until_acked(&m2_ch, &alice, &chat, "before the second kill".into()).await;
    let last = loop {
        let event = next(&mut held).await.expect("the marker arrives on A");
        if matches!(&event.event, Some(Event::MessageCreated(m)) if m.id == marker.id) {
            break event.change_seq;
        }
    };
    messages[0].kill();
    loop {
        // Drains what A sent before it died; then the cut shows.
        if next(&mut held).await.is_err() {
            break;
        }
    }
    // Two of alice's messages (the first sender's): she may edit and delete.
    let (edited, gone) = (&acked[0], &acked[1]);
    let edit = mpb::EditMessageRequest { message_id: edited.id.clone(), text: "edited on B".into() };
    MessageServiceClient::new(m2_ch.clone()).edit_message(authed(&alice, edit)).await.unwrap();
    let delete = mpb::DeleteMessageRequest { message_id: gone.id.clone() };
    MessageServiceClient::new(m2_ch.clone()).delete_message(authed(&alice, delete)).await.unwrap();
    messages[0].spawn();
    let m1_ch = messages[0].channel().await;
    let request = mpb::StreamEventsRequest {
        chat_ids: vec![chat.clone()],
        resume_changes: [(chat.clone(), last)].into(),
        ..Default::default()
    };
    let mut resumed = MessageServiceClient::new(m1_ch).stream_events(authed(&bob, request)).await.unwrap().into_inner();
    let after = send_until_acked(&m2_ch, &alice, &chat, "after the restart".into()).await;
    let mut replayed = Vec::new();
    loop {
        let event = next(&mut resumed).await.expect("replay and live on the restarted replica");
        let done = matches!(&event.event, Some(Event::MessageCreated(m)) if m.id == after.id);
        replayed.push(event);
        if done {
            break;
        }
    }
    let shapes: Vec<(&str, &str, &str)> = replayed
        .iter()
        .map(|e| match &e.event {
            Some(Event::MessageEdited(m)) => ("edited", m.id.as_str(), m.text.as_str()),
            Some(Event::MessageDeleted(m)) => ("deleted", m.id.as_str(), m.text.as_str()),
            Some(Event::MessageCreated(m)) => ("created", m.id.as_str(), m.text.as_str()),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(
        shapes,
        [
            ("edited", edited.id.as_str(), "edited on B"),
            ("deleted", gone.id.as_str(), ""),
            ("created", after.id.as_str(), "after the restart")
        ]
    );
    let numbers: Vec<i64> = replayed.iter().map(|e| e.change_seq).collect();
    assert_eq!(numbers, [last + 1, last + 2, last + 3], "each change once, gap-free into live");

    // Membership and revocation made on one replica reach streams on the other.
    let m1_ch = messages[0].channel().await;
    let request = mpb::StreamEventsRequest { chat_ids: vec![chat.clone()], ..Default::default() };
    let mut bobs = MessageServiceClient::new(m1_ch.clone())
        .stream_events(authed(&bob, request.clone()))
        .await
        .unwrap()
        .into_inner();
    let mut carols =
        MessageServiceClient::new(m1_ch.clone()).stream_events(authed(&carol, request)).await.unwrap().into_inner();
    let c2_ch = chats[1].channel().await;
    let remove = cpb::RemoveMemberRequest { chat_id: chat.clone(), user_id: bob_id.clone() };
    ChatServiceClient::new(c2_ch).remove_member(authed(&alice, remove)).await.unwrap();
    let removed = next(&mut bobs).await.expect("an event");
    assert!(
        matches!(removed.event, Some(Event::MembershipChanged(ref m)) if m.user_id == bob_id && m.change == mpb::MembershipChange::Removed as i32)
    );
    let s2_ch = sessions[1].channel().await;
    SessionServiceClient::new(s2_ch)
        .revoke_session(authed(&carol, spb::RevokeSessionRequest::default()))
        .await
        .unwrap();
    // Carol's stream saw the membership event, then ends UNAUTHENTICATED.
    loop {
        match next(&mut carols).await {
            Ok(_) => continue,
            Err(status) => {
                assert_eq!(status.code(), Code::Unauthenticated);
                break;
            }
        }
    }
    // Bob's stream gets nothing more of the chat: the next event after a new
    // message would be it; instead the stream stays quiet (checked by
    // sending and then reading with a bound).
    send_until_acked(&edge_ch, &alice, &chat, "after bob left".into()).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), bobs.message()).await;
    assert!(quiet.is_err(), "bob's stream received {quiet:?} after his removal");

    drop(edge);
    drop(messages);
    drop(chats);
    drop(sessions);
    drop_schemas(&db, &prefix).await;
}

/// The all-in-one on SQLite, killed with SIGKILL while 32 callers send:
/// every message acknowledged before the kill is there after the restart,
/// with the seq its acknowledgement named, and the seqs stay gap-free. (The
/// messages writer hands each commit's WAL frames to the kernel in one write
/// at its sync: nothing acknowledged may still sit in the process.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_in_one_keeps_every_acknowledged_message_through_sigkill() {
    let dir = std::env::temp_dir().join(format!("natter-sigkill-{}", uuid::Uuid::new_v4().simple()));
    let port = free_port();
    let mut node = Node::start("serve", port, vec!["--data-dir".into(), dir.display().to_string()]);
    let ch = node.channel().await;
    let (_, alice) = user(&ch, "alice").await;
    let (bob_id, _) = user(&ch, "bob").await;
    let create = cpb::CreateChatRequest { title: "sigkill".into(), member_ids: vec![bob_id], ..Default::default() };
    let chat = ChatServiceClient::new(ch.clone()).create_chat(authed(&alice, create)).await.unwrap().into_inner();
    let chat = chat.chat.unwrap().id;

    let (callers, each) = (32, 25);
    let senders: Vec<_> = (0..callers)
        .map(|c| {
            let (ch, alice, chat) = (ch.clone(), alice.clone(), chat.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..each {
                    acked.push(send_until_acked(&ch, &alice, &chat, format!("{c}/{i}")).await);
                }
                acked
            })
        })
        .collect();
    // Kill once a third is in, while the writer is busy.
    wait_for_seq(&ch, &alice, &chat, callers * each / 3).await;
    node.kill();
    node.spawn();
    let ch = node.channel().await;

    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }
    let stored: BTreeMap<i64, String> = all_messages(&ch, &alice, &chat).await.into_iter().collect();
    let total = callers * each;
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>(), "gap-free seqs");
    for m in &acked {
        assert_eq!(stored.get(&m.seq), Some(&m.id), "acknowledged message {} (seq {}) kept", m.text, m.seq);
    }
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The all-in-one on SQLite keeps chat activity in memory between writes
/// (here for up to 8s): killed with SIGKILL before it wrote any, it gets the
/// activity back from the messages at start-up, so the chat that got the last
/// message is on top of ListChats after the restart, at that message's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_in_one_recovers_chat_activity_after_sigkill() {
    let (dir, mut node) = all_in_one_holding_activity("activity");
    let ch = node.channel().await;
    let (_, alice) = user(&ch, "alice").await;
    let create = |title: &str| {
        let request = cpb::CreateChatRequest { title: title.into(), ..Default::default() };
        let mut chats = ChatServiceClient::new(ch.clone());
        let request = authed(&alice, request);
        async move { chats.create_chat(request).await.unwrap().into_inner().chat.unwrap().id }
    };
    let older = create("older").await;
    let newer = create("newer").await;
    // Nothing lists before the kill: a listing would write the activity.
    let sent = send_until_acked(&ch, &alice, &older, "bump".into()).await;
    node.kill();
    node.spawn();
    let ch = node.channel().await;

    let request = cpb::ListChatsRequest::default();
    let listed = ChatServiceClient::new(ch).list_chats(authed(&alice, request)).await.unwrap().into_inner().chats;
    assert_eq!(listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), [older.as_str(), newer.as_str()]);
    assert_eq!(listed[0].last_activity_time, sent.send_time, "the older chat's activity is its message's");
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The all-in-one on SQLite stopped with SIGTERM writes the chat activity
/// it kept in memory (here for up to 8s) before it exits: `chats.db` itself
/// holds the chat's newest seq and time afterwards. (A restart alone would
/// not show a lost write: the start-up re-announcement puts it back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_in_one_writes_chat_activity_when_stopped() {
    let (dir, mut node) = all_in_one_holding_activity("stop");
    let ch = node.channel().await;
    let (_, alice) = user(&ch, "alice").await;
    let request = cpb::CreateChatRequest { title: "stopped".into(), ..Default::default() };
    let chat = ChatServiceClient::new(ch.clone()).create_chat(authed(&alice, request)).await.unwrap();
    let chat = chat.into_inner().chat.unwrap().id;
    send_until_acked(&ch, &alice, &chat, "first".into()).await;
    let sent = send_until_acked(&ch, &alice, &chat, "last".into()).await;
    drop(ch);
    node.terminate();

    use sqlx::Connection as _;
    let url = format!("sqlite://{}?mode=ro", dir.join("chats.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let (last_seq, last_message_time): (i64, Option<i64>) =
        sqlx::query_as("SELECT last_seq, last_message_time FROM chats WHERE id = ?")
            .bind(&chat)
            .fetch_one(&mut db)
            .await
            .unwrap();
    let sent_time = sent.send_time.unwrap();
    let sent_micros = sent_time.seconds * 1_000_000 + i64::from(sent_time.nanos) / 1_000;
    assert_eq!((last_seq, last_message_time), (sent.seq, Some(sent_micros)), "the activity in chats.db");
    db.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `natter serve` on SQLite in a fresh data directory (`natter-<name>-<uuid>`
/// under the temp dir, returned for cleanup) that keeps chat activity in
/// memory for the longest interval allowed (8s,
/// `natter_links::activity::MAX_FLUSH_INTERVAL`), so within a test this
/// short only a listing, a restart's re-announcement or the shutdown
/// writes it.
fn all_in_one_holding_activity(name: &str) -> (std::path::PathBuf, Node) {
    let dir = std::env::temp_dir().join(format!("natter-{name}-{}", uuid::Uuid::new_v4().simple()));
    let args = vec!["--data-dir".into(), dir.display().to_string(), "--activity-flush-interval".into(), "8s".into()];
    let node = Node::start("serve", free_port(), args);
    (dir, node)
}

/// Waits until the chat's newest message has at least `seq` (polling the
/// newest page of one).
async fn wait_for_seq(channel: &Channel, token: &str, chat: &str, seq: i64) {
    let mut probe = MessageServiceClient::new(channel.clone());
    loop {
        let request = mpb::ListMessagesRequest { chat_id: chat.to_owned(), page_size: 1, ..Default::default() };
        let listed = probe.list_messages(authed(token, request)).await.unwrap().into_inner();
        if listed.messages.first().is_some_and(|m| m.seq >= seq) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every stored message of the chat as (seq, id), oldest first, page by page.
async fn all_messages(channel: &Channel, token: &str, chat: &str) -> Vec<(i64, String)> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = mpb::ListMessagesRequest {
            chat_id: chat.to_owned(),
            page_size: 200,
            page_token,
            order: mpb::SortOrder::Asc as i32,
            ..Default::default()
        };
        let page = MessageServiceClient::new(channel.clone()).list_messages(authed(token, request)).await.unwrap();
        let page = page.into_inner();
        all.extend(page.messages.into_iter().map(|m| (m.seq, m.id)));
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// The next event but presence changes (presence.rs tests those), within
/// 10 s.
async fn next(
    stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>,
) -> Result<mpb::StreamEventsResponse, Status> {
    loop {
        let event = next_any(stream).await?;
        if !matches!(event.event, Some(Event::PresenceChanged(_))) {
            return Ok(event);
        }
    }
}

/// The next event, within 10 s.
async fn next_any(
    stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>,
) -> Result<mpb::StreamEventsResponse, Status> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await.expect("an event within 10 s") {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(Status::cancelled("stream ended")),
        Err(s) => Err(s),
    }
}

/// Writes a fresh service credential into `dir`; its path.
fn credential_file(dir: &std::path::Path) -> String {
    let path = dir.join("service-credential").display().to_string();
    std::fs::write(&path, format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())).unwrap();
    path
}

/// The flags that put a process on the PostgreSQL schemas of `prefix` at
/// `db` and on NATS at `nats`, under the NATS subjects of that deployment
/// ([`nats_subjects`]).
fn shared_store(db: &str, prefix: &str, nats: &str) -> Vec<String> {
    let subjects = nats_subjects(prefix);
    ["--database-url", db, "--database-schema-prefix", prefix, "--nats-url", nats, "--nats-subject-prefix", &subjects]
        .map(str::to_owned)
        .into()
}

/// The NATS subject prefix of the test deployment on the schemas of
/// `prefix` (`k0a1b..._` gives `natter.k0a1b...`): the tests running at the
/// same time on one NATS server hear none of each other's events, cache
/// invalidations or deaths, as deployments of their own.
fn nats_subjects(prefix: &str) -> String {
    format!("natter.{}", prefix.trim_end_matches('_'))
}

async fn drop_schemas(url: &str, prefix: &str) {
    use sqlx::Connection as _;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    for name in ["sessions", "chats", "messages"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {prefix}{name} CASCADE")))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// libfaketime (Debian's `faketime` package), which shifts a process's wall
/// clock: None when it is not installed (CI installs it and must not skip).
fn libfaketime() -> Option<String> {
    // /usr/lib/<multiarch triple>/faketime/, whatever the machine.
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|arch| arch.path().join("faketime/libfaketimeMT.so.1"))
        .find(|path| path.exists());
    match found {
        Some(path) => Some(path.display().to_string()),
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must install libfaketime (/usr/lib/*/faketime/libfaketimeMT.so.1: apt-get install faketime)")
        }
        None => None,
    }
}

/// Environment variables of a process: (name, value).
type Env = Vec<(String, String)>;

/// The environment that sets a process's wall clock an hour ahead (a host
/// without NTP) and leaves its monotonic clock alone; None without
/// libfaketime (see [`libfaketime`]).
fn an_hour_ahead() -> Option<Env> {
    Some(vec![
        ("LD_PRELOAD".to_owned(), libfaketime()?),
        ("FAKETIME".to_owned(), "+1h".to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
    ])
}

/// PostgreSQL's and NATS's URLs and the environment of a clock an hour
/// ahead ([`an_hour_ahead`]); None, the test skipping and saying why,
/// without them.
fn store_bus_and_a_clock_ahead() -> Option<(String, String, Env)> {
    let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
        return None;
    };
    let Some(skewed) = an_hour_ahead() else {
        eprintln!("skipped: libfaketime is not installed");
        return None;
    };
    Some((db, nats, skewed))
}
