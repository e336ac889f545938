//! Presence across replicas: a replica killed with SIGKILL while it holds a
//! user's stream must not leave the user online; its peers take it as dead
//! after three missed heartbeats. And what rides with presence: a rename
//! made on one replica reaches the streams held by another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natter_kit::time::{micros, now_micros};
use natter_proto::chats::v1::{self as cpb, chat_service_client::ChatServiceClient};
use natter_proto::messages::v1::{self as mpb, message_service_client::MessageServiceClient};
use natter_proto::sessions::v1::{self as spb, session_service_client::SessionServiceClient};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use super::{Event, Node, authed, drop_schemas, env, free_port, next_any, store_bus_and_a_clock_ahead, user};

/// The next presence change of the stream (other events skipped).
async fn next_presence(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>) -> mpb::Presence {
    loop {
        if let Some(Event::PresenceChanged(p)) = next_any(stream).await.expect("the stream stays open").event {
            return p;
        }
    }
}

/// The next presence change of the stream within `wait` (other events
/// skipped), however long the stream stays quiet meanwhile.
async fn presence_within(
    stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>,
    wait: Duration,
) -> mpb::Presence {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("a presence change within {wait:?}"));
        if let Some(Event::PresenceChanged(p)) = next.expect("the stream stays open").expect("not ended").event {
            return p;
        }
    }
}

/// A subscription to the presence beats of the deployment on the schemas of
/// `prefix` (`<prefix>.events.presence`).
async fn presence_beats(nats: &str, prefix: &str) -> async_nats::Subscriber {
    let client = async_nats::connect(nats).await.expect("connect to NATS");
    let subject = format!("{}.events.presence", super::nats_subjects(prefix));
    let beats = client.subscribe(subject).await.expect("subscribe to the beats");
    // (The beats waited for come seconds later.)
    client.flush().await.expect("the subscription reached NATS");
    beats
}

/// Waits (10 s at most) for the next heartbeat on `beats` that lists `user`.
async fn heartbeat_with(beats: &mut async_nats::Subscriber, user: &str, what: &str) {
    use futures::StreamExt as _;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, beats.next())
            .await
            .unwrap_or_else(|_| panic!("{what} within 10 s"))
            .expect("the subscription stays open");
        let Ok(event) = natter_bus::Event::from_wire(message.payload) else { continue };
        if event.beat.is_some_and(|b| b.kind == natter_bus::BeatKind::Heartbeat)
            && event.users.iter().any(|u| u.to_string() == user)
        {
            return;
        }
    }
}

/// Returns once `replicas` processes of the deployment on the schemas of
/// `prefix` each announced themselves on the bus after this was called,
/// so every replica started before it has heard every other: the bus finds
/// dead only a peer it heard (one killed before that goes by the missed
/// presence heartbeats). The announcement (`<prefix>.events.alive`) is a
/// protobuf message whose field 1 is the process id; one goes out a second.
async fn all_heard(nats: &str, prefix: &str, replicas: usize) {
    use futures::StreamExt as _;
    let client = async_nats::connect(nats).await.expect("connect to NATS");
    let subject = format!("{}.events.alive", super::nats_subjects(prefix));
    let mut announcements = client.subscribe(subject).await.expect("subscribe to the announcements");
    client.flush().await.expect("the subscription reached NATS");
    let mut heard = std::collections::HashSet::new();
    while heard.len() < replicas {
        let said = tokio::time::timeout(Duration::from_secs(10), announcements.next())
            .await
            .expect("every replica announces itself within 10 s")
            .expect("the subscription stays open");
        // Field 1 (process, bytes): tag 0x0a, length, the id.
        if let [0x0a, 16, id @ ..] = &said.payload[..] {
            heard.insert(id[..16].to_vec());
        }
    }
}

/// `natter serve` on the shared PostgreSQL schemas of `prefix` and NATS,
/// heartbeating every `heartbeat`.
fn replica(db: &str, prefix: &str, nats: &str, heartbeat: &str) -> Node {
    replica_with_env(db, prefix, nats, heartbeat, Vec::new())
}

/// As [`replica`], the process with `env` set too.
fn replica_with_env(db: &str, prefix: &str, nats: &str, heartbeat: &str, env: super::Env) -> Node {
    let mut args = super::shared_store(db, prefix, nats);
    args.extend(["--presence-heartbeat".to_owned(), heartbeat.to_owned()]);
    Node::start_with_env("serve", free_port(), args, env)
}

/// Alice and bob, who share a direct chat: ((alice's id, alice's token),
/// bob's id, bob's token).
async fn pair(channel: &Channel) -> ((String, String), String, String) {
    let (alice_id, alice) = user(channel, "alice").await;
    let (bob_id, bob) = user(channel, "bob").await;
    let create = cpb::CreateChatRequest { member_ids: vec![bob_id.clone()], ..Default::default() };
    ChatServiceClient::new(channel.clone()).create_chat(authed(&alice, create)).await.unwrap();
    ((alice_id, alice), bob_id, bob)
}

/// A stream of every chat of the holder of `token`.
async fn stream(channel: &Channel, token: &str) -> tonic::codec::Streaming<mpb::StreamEventsResponse> {
    let all = mpb::StreamEventsRequest::default();
    MessageServiceClient::new(channel.clone()).stream_events(authed(token, all)).await.unwrap().into_inner()
}

async fn presence_of(channel: &Channel, token: &str, user_id: &str) -> mpb::Presence {
    let request = mpb::GetPresenceRequest { user_ids: vec![user_id.to_owned()] };
    let answer = MessageServiceClient::new(channel.clone()).get_presence(authed(token, request)).await.unwrap();
    answer.into_inner().presences.remove(0)
}

/// Two all-in-one replicas on fresh schemas of one PostgreSQL and one NATS,
/// heartbeating every `heartbeat` (the first has migrated the schemas when
/// the second starts); bob streams on `one`, alice watches on `two` and has
/// seen bob come online there. None (test skipped) without PostgreSQL and
/// NATS. With a relay, `one` reaches NATS through it.
struct Scene {
    relay: Option<Relay>,
    db: String,
    nats: String,
    prefix: String,
    one: Node,
    two: Node,
    on_two: Channel,
    alice: String,
    alice_id: String,
    bob_id: String,
    bob: String,
    watching: tonic::codec::Streaming<mpb::StreamEventsResponse>,
    _held: tonic::codec::Streaming<mpb::StreamEventsResponse>,
}

impl Scene {
    async fn start(heartbeat: &str) -> Option<Self> {
        Self::start_with(heartbeat, false).await
    }

    /// As [`Scene::start`], replica one behind a [`Relay`] if `relayed`.
    async fn start_with(heartbeat: &str, relayed: bool) -> Option<Self> {
        let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
            eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
            return None;
        };
        let prefix = format!("p{}_", uuid::Uuid::new_v4().simple());
        let relay = if relayed { Some(Relay::to(&nats).await) } else { None };
        let one = replica(&db, &prefix, relay.as_ref().map_or(&nats, |r| &r.url), heartbeat);
        let on_one = one.channel().await;
        let two = replica(&db, &prefix, &nats, heartbeat);
        let on_two = two.channel().await;
        let ((alice_id, alice), bob_id, bob) = pair(&on_one).await;
        let mut watching = stream(&on_two, &alice).await;
        let _held = stream(&on_one, &bob).await;
        let online = next_presence(&mut watching).await;
        assert_eq!((online.user_id.as_str(), online.state), (bob_id.as_str(), mpb::PresenceState::Online as i32));
        assert_eq!(presence_of(&on_two, &alice, &bob_id).await.state, mpb::PresenceState::Online as i32);
        Some(Self { relay, db, nats, prefix, one, two, on_two, alice, alice_id, bob_id, bob, watching, _held })
    }

    /// Alice's next presence change, which must be bob going offline: its
    /// last-seen time (µs).
    async fn bob_goes_offline(&mut self) -> i64 {
        let offline = next_presence(&mut self.watching).await;
        assert_eq!(
            (offline.user_id.as_str(), offline.state),
            (self.bob_id.as_str(), mpb::PresenceState::Offline as i32)
        );
        micros(offline.last_seen_time.as_ref().expect("a last_seen_time"))
    }

    async fn finish(self) {
        drop(self.watching);
        drop((self.one, self.two));
        drop_schemas(&self.db, &self.prefix).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_users_go_offline_after_its_missed_heartbeats() {
    // A silent replica is dead after 600 ms.
    let Some(mut s) = Scene::start("200ms").await else { return };

    // Replica one dies without a word: replica two takes bob offline once
    // one's heartbeats stop (3 missed, checked every 200 ms), as of one's
    // last heartbeat.
    let killed_at = now_micros();
    let killed = Instant::now();
    s.one.kill();
    let last_seen = s.bob_goes_offline().await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "offline {took:?} after the kill (expiry 600-800 ms)");
    assert!(
        (killed_at - 1_000_000..=killed_at).contains(&last_seen),
        "last seen at replica one's last heartbeat, before the kill: {last_seen} vs {killed_at}"
    );
    let asked = presence_of(&s.on_two, &s.alice, &s.bob_id).await;
    assert_eq!(
        (asked.state, asked.last_seen_time.as_ref().map(micros)),
        (mpb::PresenceState::Offline as i32, Some(last_seen))
    );
    s.finish().await;
}

/// With heartbeats a minute apart, a replica killed with SIGKILL takes its
/// users offline once the bus finds its process dead (its liveness
/// announcements stop: seconds) and the grace in which a replica only cut
/// off could come back is over (10 s), not when its heartbeats would have
/// expired (3-4 minutes), with a `presence_changed` to those who share a
/// chat, as of its last word. A user who also streams on a live replica
/// stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_users_go_offline_once_the_bus_finds_it_dead_not_after_its_heartbeats() {
    let started = now_micros();
    let Some(mut s) = Scene::start("60s").await else { return };
    // Carol, who shares a chat with alice, streams on a third replica (as
    // replica two knows) and on replica one.
    let three = replica(&s.db, &s.prefix, &s.nats, "60s");
    let on_three = three.channel().await;
    let (carol_id, carol) = user(&on_three, "carol").await;
    let create = cpb::CreateChatRequest { member_ids: vec![carol_id.clone()], ..Default::default() };
    ChatServiceClient::new(s.on_two.clone()).create_chat(authed(&s.alice, create)).await.unwrap();
    let _carol_on_three = stream(&on_three, &carol).await;
    let waited = Instant::now();
    while presence_of(&s.on_two, &s.alice, &carol_id).await.state != mpb::PresenceState::Online as i32 {
        assert!(waited.elapsed() < Duration::from_secs(10), "replica two never learnt carol is online");
        // Within --presence-rate (120/1m) for the whole deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _carol_on_one = stream(&s.one.channel().await, &carol).await;
    // The bus finds dead only a peer it heard: replica one may not have
    // announced itself since replica two and three started listening.
    all_heard(&s.nats, &s.prefix, 3).await;

    let killed_at = now_micros();
    let killed = Instant::now();
    s.one.kill();
    // Alice's stream may tell of carol coming online (the chat is new to
    // it), never of her going offline; then bob goes offline, about 4 s
    // (the bus) and 10 s (the grace) after the kill.
    let offline = loop {
        let p = presence_within(&mut s.watching, Duration::from_secs(25)).await;
        if p.user_id == carol_id {
            assert_eq!(p.state, mpb::PresenceState::Online as i32, "carol still streams on replica three");
            continue;
        }
        break p;
    };
    assert_eq!((offline.user_id.as_str(), offline.state), (s.bob_id.as_str(), mpb::PresenceState::Offline as i32));
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(20), "offline {took:?} after the kill, not after its heartbeats' minutes");
    let last_seen = micros(offline.last_seen_time.as_ref().expect("a last_seen_time"));
    assert!(
        (started..=killed_at).contains(&last_seen),
        "last seen at replica one's last word: {last_seen} vs {killed_at}"
    );
    let asked = presence_of(&s.on_two, &s.alice, &s.bob_id).await;
    assert_eq!(
        (asked.state, asked.last_seen_time.as_ref().map(micros)),
        (mpb::PresenceState::Offline as i32, Some(last_seen))
    );
    let carol_now = presence_of(&s.on_two, &s.alice, &carol_id).await;
    assert_eq!(carol_now.state, mpb::PresenceState::Online as i32, "carol's stream on replica three is open");
    drop(three);
    s.finish().await;
}

/// With heartbeats a minute apart, neither a stop nor a start waits for
/// one: a replica stopped with SIGTERM takes its users offline on its way
/// out, and a replica that starts asks the others who is online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_s_users_go_offline_at_once_and_a_new_one_asks_who_is_online() {
    let Some(mut s) = Scene::start("60s").await else { return };

    // A third replica knows bob is online within moments, not a minute.
    let three = replica(&s.db, &s.prefix, &s.nats, "60s");
    let on_three = three.channel().await;
    let started = Instant::now();
    while presence_of(&on_three, &s.alice, &s.bob_id).await.state != mpb::PresenceState::Online as i32 {
        assert!(started.elapsed() < Duration::from_secs(10), "the new replica never learnt bob is online");
        // Within --presence-rate (120/1m) for the whole deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Replica one stops: bob is offline everywhere at once (3 minutes before
    // his replica's heartbeats would have expired).
    let stopping = now_micros();
    s.one.terminate();
    let last_seen = s.bob_goes_offline().await;
    assert!((stopping..=now_micros()).contains(&last_seen), "last seen as replica one stopped");
    let asked = presence_of(&on_three, &s.alice, &s.bob_id).await;
    assert_eq!(asked.state, mpb::PresenceState::Offline as i32, "replica three heard it too");
    drop(three);
    s.finish().await;
}

/// The next event of the stream that is not a presence change.
async fn next_news(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>) -> mpb::StreamEventsResponse {
    loop {
        let event = next_any(stream).await.expect("the stream stays open");
        if !matches!(event.event, Some(Event::PresenceChanged(_))) {
            return event;
        }
    }
}

/// Sets the display name of the holder of `token`; their id.
async fn rename(channel: &Channel, token: &str, name: &str) -> String {
    let rename = spb::UpdateUserRequest {
        user: Some(spb::User { display_name: name.into(), ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["display_name".into()] }),
    };
    let renamed = SessionServiceClient::new(channel.clone()).update_user(authed(token, rename)).await.unwrap();
    renamed.into_inner().user.expect("the user").id
}

/// The next event of the stream that is not a presence change, which must
/// be a rename: the display name it gives.
async fn next_rename(stream: &mut tonic::codec::Streaming<mpb::StreamEventsResponse>) -> String {
    match next_news(stream).await.event {
        Some(Event::UserUpdated(u)) => u.display_name,
        other => panic!("expected user_updated, got {other:?}"),
    }
}

/// Alice renames herself twice, first through replica two, whose wall
/// clock is an hour ahead (libfaketime), then through replica one: bob's
/// stream and her own show both, the later last. A rename is ordered by the version
/// the users row gives it, not by its replica's clock (which made the
/// second look an hour older, and bob's stream drop it as stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_made_through_replicas_whose_clocks_disagree_reach_a_stream_in_order() {
    let Some((db, nats, skewed)) = store_bus_and_a_clock_ahead() else { return };
    let prefix = format!("p{}_", uuid::Uuid::new_v4().simple());
    let one = replica(&db, &prefix, &nats, "60s");
    let on_one = one.channel().await;
    let ahead = replica_with_env(&db, &prefix, &nats, "60s", skewed);
    let on_ahead = ahead.channel().await;
    let ((_, alice), _, bob) = pair(&on_one).await;
    let (mut bobs, mut alices) = (stream(&on_one, &bob).await, stream(&on_one, &alice).await);

    rename(&on_ahead, &alice, "Alice, an hour ahead").await;
    for stream in [&mut bobs, &mut alices] {
        assert_eq!(next_rename(stream).await, "Alice, an hour ahead");
    }
    rename(&on_one, &alice, "Alice, on time").await;
    for stream in [&mut bobs, &mut alices] {
        assert_eq!(next_rename(stream).await, "Alice, on time");
    }

    drop((bobs, alices));
    drop((one, ahead));
    drop_schemas(&db, &prefix).await;
}

/// A rename and a privacy change, both made through replica one: alice's
/// stream on replica two hears of both (her user topic, over NATS), and
/// bob's stream on replica one hears of her rename through their chat (the
/// presence topic, handed on by his replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_and_an_account_change_on_one_replica_reach_streams_held_by_another() {
    let Some(mut s) = Scene::start("60s").await else { return };
    let on_one = s.one.channel().await;
    let alice_id = rename(&on_one, &s.alice, "Alice Liddell").await;
    for stream in [&mut s.watching, &mut s._held] {
        match next_news(stream).await.event {
            Some(Event::UserUpdated(u)) => {
                assert_eq!((u.user_id.as_str(), u.display_name.as_str()), (alice_id.as_str(), "Alice Liddell"));
            }
            other => panic!("expected user_updated, got {other:?}"),
        }
    }
    let settings = cpb::UpdatePrivacySettingsRequest {
        settings: Some(cpb::PrivacySettings { direct_chats: cpb::DirectChats::Peers as i32, ..Default::default() }),
        update_mask: Some(natter_proto::FieldMask { paths: vec!["direct_chats".into()] }),
    };
    ChatServiceClient::new(on_one.clone()).update_privacy_settings(authed(&s.alice, settings)).await.unwrap();
    match next_news(&mut s.watching).await.event {
        Some(Event::AccountUpdated(a)) => assert_eq!(a.change(), mpb::AccountChange::PrivacySettings),
        other => panic!("expected account_updated, got {other:?}"),
    }
    s.finish().await;
}

/// A TCP relay between one replica and NATS, whose connections the test
/// cuts (both ends closed at once, as a network that drops them) and then
/// refuses until mended. Stops with the test's runtime.
struct Relay {
    url: String,
    open: Arc<AtomicBool>,
    relayed: Arc<Mutex<Vec<AbortHandle>>>,
}

impl Relay {
    /// A relay to the NATS server of `nats` (a `nats://host:port` URL).
    async fn to(nats: &str) -> Self {
        let upstream = nats.trim_start_matches("nats://").rsplit('@').next().expect("host:port").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let (open, relayed) = (Arc::new(AtomicBool::new(true)), Arc::new(Mutex::new(Vec::<AbortHandle>::new())));
        let (accepting, adding) = (open.clone(), relayed.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
                adding.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { url, open, relayed }
    }

    /// Closes every relayed connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for task in self.relayed.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Takes connections again.
    fn mend(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

/// Bob's stream is held by a replica whose connection to NATS drops while
/// alice renames herself through the other replica: the rename never
/// reaches bob's replica, and nothing can replay it. Once that replica is
/// back on the bus, bob's stream says so (`ephemeral_lost`), and a re-read
/// of users, what a client then does, answers the new name with its
/// version. Without the event, bob's page would show the old name for as
/// long as its stream stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_replica_lost_the_bus_is_told_that_ephemeral_events_may_have_been_lost() {
    let (Some(db), Some(nats)) = (env("NATTER_TEST_DATABASE_URL"), env("NATTER_TEST_NATS_URL")) else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL and NATTER_TEST_NATS_URL are not set");
        return;
    };
    let relay = Relay::to(&nats).await;
    let prefix = format!("p{}_", uuid::Uuid::new_v4().simple());
    let one = replica(&db, &prefix, &relay.url, "60s");
    let on_one = one.channel().await;
    let two = replica(&db, &prefix, &nats, "60s");
    let on_two = two.channel().await;
    let ((_, alice), _, bob) = pair(&on_one).await;
    let mut bobs = stream(&on_one, &bob).await;
    // The bus works: a rename through two reaches bob on one.
    let alice_id = rename(&on_two, &alice, "Alice").await;
    assert_eq!(next_rename(&mut bobs).await, "Alice");

    relay.cut();
    rename(&on_two, &alice, "Alice, while one was away").await;
    relay.mend();
    // (Should one be back before two's announcement reaches NATS, bob
    // hears the rename too; either way, he is told.)
    loop {
        match next_news(&mut bobs).await.event {
            Some(Event::EphemeralLost(_)) => break,
            Some(Event::UserUpdated(u)) if u.display_name == "Alice, while one was away" => {}
            other => panic!("expected ephemeral_lost, got {other:?}"),
        }
    }
    let read = spb::BatchGetUsersRequest { user_ids: vec![alice_id.clone()] };
    let read = SessionServiceClient::new(on_one.clone()).batch_get_users(authed(&bob, read)).await.unwrap();
    let users = read.into_inner().users;
    assert_eq!(
        users.iter().map(|u| (u.display_name.as_str(), u.profile_version)).collect::<Vec<_>>(),
        [("Alice, while one was away", 2)]
    );
    // And live again.
    rename(&on_two, &alice, "Alice, back").await;
    assert_eq!(next_rename(&mut bobs).await, "Alice, back");

    drop(bobs);
    drop((one, two));
    drop_schemas(&db, &prefix).await;
}

/// Replica one, which holds bob's stream, is cut off from NATS long enough
/// for replica two's bus to take its process as dead (3 s without its
/// liveness announcements), then comes back: bob, whose stream never
/// closed, stays online for alice on replica two throughout (no
/// `presence_changed`, GetPresence online), and replica one tells the
/// others its users as soon as it is back, not at its next heartbeat (a
/// minute later). Before, two took bob offline at once and back online
/// only at one's next heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_nats_for_seconds_keeps_its_users_online() {
    let Some(mut s) = Scene::start_with("60s", true).await else { return };
    // Replica two's bus finds dead only a peer it heard.
    all_heard(&s.nats, &s.prefix, 2).await;
    let mut beats = presence_beats(&s.nats, &s.prefix).await;
    let relay = s.relay.take().expect("a relay");

    relay.cut();
    // Two's bus takes one as dead: its streams are told that ephemeral news
    // may be lost (after its presence heard of it).
    loop {
        match next_any(&mut s.watching).await.expect("the stream stays open").event {
            Some(Event::EphemeralLost(_)) => break,
            Some(Event::PresenceChanged(p)) => panic!("bob shown {p:?} while his replica was cut off"),
            _ => {}
        }
    }
    let asked = presence_of(&s.on_two, &s.alice, &s.bob_id).await;
    assert_eq!(asked.state, mpb::PresenceState::Online as i32, "a cut of seconds showed bob offline: {asked:?}");

    relay.mend();
    // One, back, announces bob at once; two answers its hello (after
    // taking in its heartbeat) with alice.
    heartbeat_with(&mut beats, &s.bob_id, "replica one's heartbeat with bob once back").await;
    heartbeat_with(&mut beats, &s.alice_id, "replica two's answer with alice").await;

    // Nothing of bob's presence reached alice before a rename of bob made
    // through two (handed to her stream after any presence change two saw
    // before it).
    rename(&s.on_two, &s.bob, "Bob, never away").await;
    loop {
        match next_any(&mut s.watching).await.expect("the stream stays open").event {
            Some(Event::UserUpdated(u)) if u.display_name == "Bob, never away" => break,
            Some(Event::PresenceChanged(p)) => panic!("bob shown {p:?} around his replica's cut"),
            _ => {}
        }
    }
    assert_eq!(presence_of(&s.on_two, &s.alice, &s.bob_id).await.state, mpb::PresenceState::Online as i32);
    s.finish().await;
}
