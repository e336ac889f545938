//! The NATS bus against a real nats-server that requires log-ins and lets
//! only natter's user publish events: natter logs in with the credentials
//! from its flags or URL, start-up fails at once without them, other users
//! cannot inject events, and passwords never reach a log line. And interest
//! routing: a replica receives the events of the topics it has subscribers
//! for and no others, a new subscription's subscribers are hinted once it
//! is in effect, and the last subscriber's going ends it. And the
//! replicas' caches through a disconnect: forgotten, and off until
//! resynchronised; and an invalidation a publisher lost with its own
//! connection, sent again after its reconnect. And a shutdown: caches answer while the replica
//! drains, until it closes its bus, and what it publishes until then goes
//! out.
//!
//! Each test starts its own server (skipped only when nats-server is not
//! installed and CI is unset).

mod relay;
mod server;

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser as _;
use natter_bus::{BusArgs, ConnectError, Credentials, Event, EventBus, NatsBus, Routing, Shared, SubjectPrefix, Topic};
use natter_proto::messages::v1::StreamEventsResponse;
use relay::Relay;
use server::{INTRUDER_USER, NATTER_USER, NatsServer, OTHER_PREFIX, RELAY_USER};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long start-up may take to fail before it counts as a hang.
const START_UP: Duration = Duration::from_secs(10);
/// How long an event may take to cross the server.
const DELIVERY: Duration = Duration::from_secs(5);

/// The bus flags as a binary parses them.
#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    bus: BusArgs,
}

fn parse(args: &[&str]) -> Result<BusArgs, clap::Error> {
    Cli::try_parse_from(std::iter::once("natter").chain(args.iter().copied())).map(|c| c.bus)
}

/// `nats://user:password@127.0.0.1:<port>`.
fn url_with(server: &NatsServer, user: &str, password: &str) -> String {
    server.url.replacen("nats://", &format!("nats://{user}:{password}@"), 1)
}

/// An event of `chat` at `seq` whose payload carries nothing but the ids.
fn event(chat: Uuid, seq: i64) -> Shared {
    Arc::new(Event::new(
        chat.into(),
        StreamEventsResponse { chat_id: chat.to_string(), change_seq: seq, ..Default::default() },
    ))
}

/// The seq of the next event on `rx` within DELIVERY, passing over resync
/// hints (seq 0: the bus asks streams to re-read the store, as it does
/// whenever a connection is made).
async fn next_seq(rx: &mut natter_bus::Subscription) -> Option<i64> {
    let deadline = tokio::time::Instant::now() + DELIVERY;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(e))) if e.change_seq == 0 => continue,
            Ok(Some(Ok(e))) => return Some(e.change_seq),
            _ => return None,
        }
    }
}

/// Publishes on `from` until `to` receives one of its events (bounded):
/// `to`'s subscription reaches the server asynchronously (async-nats's
/// flush writes it to the socket; nothing waits for the server to process
/// it). Returns the seq `to` received.
async fn until_crossed(from: &Arc<dyn EventBus>, to: &Arc<dyn EventBus>) -> Option<i64> {
    let chat = Uuid::now_v7();
    let mut rx = to.subscribe(Topic::Chat(chat));
    for seq in 1..=50 {
        from.publish(Topic::Chat(chat), event(chat, seq));
        match tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            Ok(Some(Ok(e))) if e.change_seq != 0 => return Some(e.change_seq),
            _ => {}
        }
    }
    None
}

/// Waits (within DELIVERY) for the resync hint that says `rx`'s topic is
/// subscribed on the server now, passing over events; false if none came.
async fn in_effect(rx: &mut natter_bus::Subscription) -> bool {
    hinted_within(rx, DELIVERY).await
}

/// Waits up to `within` for a resync hint on `rx`, passing over events.
async fn hinted_within(rx: &mut natter_bus::Subscription, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(e))) if e.is_hint() => return true,
            Ok(Some(Ok(_))) => continue,
            _ => return false,
        }
    }
}

/// natter's bus on `server`, routing as told, on the default subjects.
async fn natter_bus(server: &NatsServer, routing: Routing, stop: &CancellationToken) -> Arc<NatsBus> {
    natter_bus_under(server, routing, &SubjectPrefix::default(), stop).await
}

/// natter's bus on `server`, routing as told, on the subjects of `prefix`.
async fn natter_bus_under(
    server: &NatsServer,
    routing: Routing,
    prefix: &SubjectPrefix,
    stop: &CancellationToken,
) -> Arc<NatsBus> {
    NatsBus::connect(&url_with(server, NATTER_USER, &server.password), None, routing, prefix, stop.clone())
        .await
        .expect("natter logs in")
}

/// natter's bus on `server` through `relay` (interest routing, default
/// subjects).
async fn natter_bus_through(relay: &Relay, server: &NatsServer, stop: &CancellationToken) -> Arc<NatsBus> {
    let url = relay.url.replacen("nats://", &format!("nats://{NATTER_USER}:{}@", server.password), 1);
    NatsBus::connect(&url, None, Routing::Interest, &SubjectPrefix::default(), stop.clone())
        .await
        .expect("natter logs in through the relay")
}

async fn connect_fails(args: &BusArgs) -> ConnectError {
    match tokio::time::timeout(START_UP, args.connect(CancellationToken::new())).await {
        Ok(Ok(_)) => panic!("connected without valid credentials"),
        Ok(Err(e)) => e,
        Err(_) => panic!("start-up hung for {START_UP:?} instead of failing"),
    }
}

#[tokio::test]
async fn natter_logs_in_from_flags_or_url_and_events_cross() {
    let Some(server) = NatsServer::start().await else { return };
    let file = server.file("nats-password", &format!("{}\n", server.password));
    let stop = CancellationToken::new();
    let from_flags =
        parse(&["--nats-url", &server.url, "--nats-user", NATTER_USER, "--nats-password-file", file.to_str().unwrap()])
            .unwrap();
    let a = from_flags.connect(stop.clone()).await.expect("natter logs in with --nats-user and --nats-password-file");
    let from_url = parse(&["--nats-url", &url_with(&server, NATTER_USER, &server.password)]).unwrap();
    let b = from_url.connect(stop.clone()).await.expect("natter logs in with the credentials in --nats-url");

    assert!(until_crossed(&a, &b).await.is_some(), "b received a's events through the server");
    assert!(until_crossed(&b, &a).await.is_some(), "a received b's events through the server");
    stop.cancel();
}

#[tokio::test]
async fn start_up_fails_at_once_without_credentials_or_with_a_wrong_password() {
    let Some(server) = NatsServer::start().await else { return };

    let none = parse(&["--nats-url", &server.url]).unwrap();
    let e = connect_fails(&none).await;
    assert!(matches!(e, ConnectError::Refused { user: None, .. }), "{e:?}");
    assert!(e.to_string().contains("without credentials"), "{e}");

    let wrong = server.file("wrong-password", "not-the-password");
    let flags = parse(&[
        "--nats-url",
        &server.url,
        "--nats-user",
        NATTER_USER,
        "--nats-password-file",
        wrong.to_str().unwrap(),
    ])
    .unwrap();
    let e = connect_fails(&flags).await;
    assert!(matches!(&e, ConnectError::Refused { user: Some(u), .. } if u == NATTER_USER), "{e:?}");
    assert!(!e.to_string().contains("not-the-password"), "the error shows no password: {e}");

    let in_url = parse(&["--nats-url", &url_with(&server, NATTER_USER, "wrong-in-url")]).unwrap();
    let e = connect_fails(&in_url).await;
    assert!(matches!(e, ConnectError::Refused { .. }), "{e:?}");
    assert!(!e.to_string().contains("wrong-in-url"), "the error shows no password: {e}");
}

/// A user without publish permission on natter.events.> publishes a forged
/// event: the server refuses it and natter never sees it. The control (a
/// user the server does let publish there) shows a forged event would
/// arrive.
#[tokio::test]
async fn other_users_cannot_inject_events() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let natter = |s: &NatsServer| parse(&["--nats-url", &url_with(s, NATTER_USER, &s.password)]).unwrap();
    let a = natter(&server).connect(stop.clone()).await.unwrap();
    let b = natter(&server).connect(stop.clone()).await.unwrap();

    assert!(until_crossed(&a, &b).await.is_some(), "b's subscription is in place");

    // forge(user, chat) publishes seq 1 of `chat` as `user` and returns the
    // server's errors to that client: a refused publish is answered with
    // -ERR once the server has handled it.
    let forge = |user: &'static str, chat: Uuid| {
        let (url, password) = (server.url.clone(), server.password.clone());
        async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password)
                .event_callback(move |e| {
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(e.to_string());
                    }
                })
                .connect(url)
                .await
                .unwrap_or_else(|e| panic!("{user} logs in: {e}"));
            let forged = Event::new(
                chat.into(),
                StreamEventsResponse { chat_id: chat.to_string(), change_seq: 1, ..Default::default() },
            );
            client.publish(format!("natter.events.chat.{chat}"), forged.to_wire()).await.unwrap();
            client.flush().await.unwrap();
            let mut said = Vec::new();
            while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                said.push(e);
                if said.last().is_some_and(|e| e.to_lowercase().contains("permissions violation")) {
                    break;
                }
            }
            said
        }
    };

    let control = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(control));
    assert!(in_effect(&mut on_b).await, "b's subscription to the control chat is in place");
    forge(RELAY_USER, control).await;
    assert_eq!(next_seq(&mut on_b).await, Some(1), "control: a permitted publisher's forged event arrives");

    let chat = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut on_b).await, "b's subscription is in place");
    let said = forge(INTRUDER_USER, chat).await;
    assert!(
        said.iter().any(|e| e.to_lowercase().contains("permissions violation")),
        "the server refused the intruder's publish: {said:?}"
    );
    // The server handled (and dropped) the forged event before its -ERR, so
    // before natter's next one: had it been delivered, b would see it first.
    a.publish(Topic::Chat(chat), event(chat, 100));
    assert_eq!(next_seq(&mut on_b).await, Some(100), "natter's event arrives, the forged one never did");
    assert!(futures::FutureExt::now_or_never(on_b.recv()).is_none(), "and nothing after it");
    stop.cancel();
}

/// Everything the bus and async-nats log (at TRACE) while connecting with a
/// password in the URL, and while failing with a wrong one, and the
/// options' `Debug`: no password anywhere.
#[tokio::test]
async fn passwords_never_reach_logs_or_debug_output() {
    let Some(server) = NatsServer::start_alone().await else { return };
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    // This test runs on a current-thread runtime: the client's tasks log
    // on this thread, into this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests of this binary run on other threads without a subscriber;
    // a callsite they reached first may have cached "no interest" while this
    // one was being set. Recompute every callsite's interest now that it is.
    tracing::callsite::rebuild_interest_cache();

    let stop = CancellationToken::new();
    let good = parse(&["--nats-url", &url_with(&server, NATTER_USER, &server.password)]).unwrap();
    let bus = good.connect(stop.clone()).await.unwrap();
    let chat = Uuid::now_v7();
    let mut rx = bus.subscribe(Topic::Chat(chat));
    bus.publish(Topic::Chat(chat), event(chat, 1));
    assert_eq!(next_seq(&mut rx).await, Some(1));
    let bad = parse(&["--nats-url", &url_with(&server, NATTER_USER, "wrong-secret-123")]).unwrap();
    let error = connect_fails(&bad).await;
    tracing::error!(%error, "logged as a binary would");
    stop.cancel();

    let debug = format!("{good:?} {bad:?}");
    let logs = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("nats: connected") && logs.contains("refused"), "the logs were captured: {logs}");
    for secret in [server.password.as_str(), "wrong-secret-123"] {
        assert!(!logs.contains(secret), "a password in the logs:\n{logs}");
        assert!(!debug.contains(secret), "a password in Debug: {debug}");
    }
    assert!(debug.contains("natter:***@127.0.0.1"), "Debug shows the user and hides the password: {debug}");
}

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn credential_flags_come_in_pairs_and_files_must_hold_a_password() {
    let user_only = parse(&["--nats-url", "nats://x:4222", "--nats-user", NATTER_USER]);
    assert!(user_only.is_err(), "--nats-user without --nats-password-file is refused");
    let file_only = parse(&["--nats-url", "nats://x:4222", "--nats-password-file", "/x"]);
    assert!(file_only.is_err(), "--nats-password-file without --nats-user is refused");

    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::File::create(&empty).unwrap().write_all(b"\n").unwrap();
    let e = Credentials::from_password_file(NATTER_USER, empty).unwrap_err();
    assert!(e.to_string().contains("--nats-password-file") && e.to_string().contains("empty"), "{e}");
    let e = Credentials::from_password_file(NATTER_USER, dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().contains("--nats-password-file"), "{e}");
}

/// `--nats-subject-prefix` defaults to the subjects of every release
/// before it, and a prefix NATS would not take as the start of a subject
/// (or would read as a wildcard, hearing other deployments) stops start-up
/// with an error naming the flag and the fault.
#[test]
fn a_subject_prefix_nats_cannot_take_is_refused_naming_the_flag() {
    let default = parse(&["--nats-url", "nats://x:4222"]).unwrap();
    assert_eq!(default.nats_subject_prefix.as_str(), "natter");
    let given = parse(&["--nats-url", "nats://x:4222", "--nats-subject-prefix", "staging.natter"]).unwrap();
    assert_eq!(given.nats_subject_prefix.as_str(), "staging.natter");
    for (bad, fault) in [("", "none empty"), ("natter.", "none empty"), ("a b", "whitespace"), ("natter.*", "wildcard")]
    {
        let e = parse(&["--nats-url", "nats://x:4222", "--nats-subject-prefix", bad]).expect_err(bad).to_string();
        assert!(e.contains("--nats-subject-prefix") && e.contains(fault), "{bad:?}: {e}");
    }
}

#[tokio::test]
async fn credentials_given_twice_are_refused_before_connecting() {
    let stop = CancellationToken::new();
    let e = NatsBus::connect(
        "nats://natter:pw@127.0.0.1:1",
        Some(Credentials::new("natter", "pw")),
        Routing::Interest,
        &SubjectPrefix::default(),
        stop,
    )
    .await
    .err()
    .expect("refused");
    assert!(e.to_string().contains("given twice"), "{e}");
    assert!(
        matches!(natter_bus::split_url("nats://natter@127.0.0.1:4222"), Err(ConnectError::Url(_))),
        "a user without a password"
    );
}

/// Replica b follows one chat; a publishes ten events of another chat, then
/// one of b's. b receives that one only (the server would have sent the
/// other ten first, on one connection). The control, c with broadcast
/// routing, receives all eleven.
#[tokio::test]
async fn a_replica_receives_the_events_of_its_topics_only() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a: Arc<dyn EventBus> = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let c = natter_bus(&server, Routing::Broadcast, &stop).await;
    let c_dyn: Arc<dyn EventBus> = c.clone();
    assert!(until_crossed(&a, &c_dyn).await.is_some(), "c's natter.events.> is in place");

    let (followed, other) = (Uuid::now_v7(), Uuid::now_v7());
    let mut on_b = b.subscribe(Topic::Chat(followed));
    let mut on_c = c.subscribe(Topic::Chat(followed));
    assert!(in_effect(&mut on_b).await, "b's subscription is in place");
    let (b_before, c_before) = (b.received(), c.received());
    for seq in 1..=10 {
        a.publish(Topic::Chat(other), event(other, seq));
    }
    a.publish(Topic::Chat(followed), event(followed, 1));
    assert_eq!(next_seq(&mut on_b).await, Some(1));
    assert_eq!(next_seq(&mut on_c).await, Some(1));
    assert_eq!(b.received() - b_before, 1, "interest: the followed chat's event, none of the other's");
    assert_eq!(c.received() - c_before, 11, "broadcast: every event");
    stop.cancel();
}

/// An event published just before b follows its chat may reach the server
/// before b's SUB does, and is then lost to b: b's subscribers of a new
/// topic (chat, user, session) get a resync hint once the subscription is
/// in effect, after which a's next event crosses at its first try.
#[tokio::test]
async fn a_topic_followed_just_after_a_publish_converges_by_a_hint() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let chat = Uuid::now_v7();
    a.publish(Topic::Chat(chat), event(chat, 1));
    let mut on_b = b.subscribe(Topic::Chat(chat));
    let hint = loop {
        match tokio::time::timeout(DELIVERY, on_b.recv()).await {
            Ok(Some(Ok(e))) if e.change_seq == 1 => continue,
            Ok(Some(Ok(e))) => break e,
            other => panic!("no hint for the new chat topic: {other:?}"),
        }
    };
    assert!(hint.is_hint() && hint.chat == Some(chat.into()), "a hint to re-read the chat: {hint:?}");
    a.publish(Topic::Chat(chat), event(chat, 2));
    // Event 1 raced b's SUB at the server: it may come after the hint or
    // not at all; event 2 must come.
    let mut next = next_seq(&mut on_b).await;
    if next == Some(1) {
        next = next_seq(&mut on_b).await;
    }
    assert_eq!(next, Some(2), "the subscription was in effect when the hint came");

    for topic in [Topic::User(Uuid::now_v7()), Topic::Session(Uuid::now_v7())] {
        let mut rx = b.subscribe(topic);
        assert!(in_effect(&mut rx).await, "{topic:?}: a hint to re-read the user's chats / re-check the session");
    }
    stop.cancel();
}

/// The last subscriber of a topic going ends b's NATS subscription (after
/// the linger); a's events of that chat stop reaching b; following it
/// again subscribes again, with a new hint.
#[tokio::test]
async fn the_last_subscriber_going_ends_the_subscription() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let baseline = b.subscriptions();
    assert_eq!(baseline, 3, "presence, liveness and cache invalidations only");
    let (chat, marker) = (Uuid::now_v7(), Uuid::now_v7());
    let mut first = b.subscribe(Topic::Chat(chat));
    let second = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut first).await);
    assert_eq!(b.subscriptions(), baseline + 1, "one subscription for two subscribers");
    drop(first);
    drop(second);
    // The linger (1 s), then the router's turn.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1) + DELIVERY;
    while b.subscriptions() != baseline {
        assert!(tokio::time::Instant::now() < deadline, "still subscribed: {}", b.subscriptions());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut on_marker = b.subscribe(Topic::Chat(marker));
    assert!(in_effect(&mut on_marker).await);
    let before = b.received();
    for seq in 1..=5 {
        a.publish(Topic::Chat(chat), event(chat, seq));
    }
    a.publish(Topic::Chat(marker), event(marker, 1));
    assert_eq!(next_seq(&mut on_marker).await, Some(1));
    assert_eq!(b.received() - before, 1, "nothing of the chat nobody follows on b any more");

    let mut again = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut again).await, "subscribed again, hinted again");
    a.publish(Topic::Chat(chat), event(chat, 6));
    assert_eq!(next_seq(&mut again).await, Some(6));
    stop.cancel();
}

/// The NATS server restarts: the clients reconnect and re-send their SUBs;
/// b's subscribers are hinted once the server has them again (the round
/// trip after Connected), after which a's next event crosses at its first
/// try.
#[tokio::test]
async fn after_a_reconnect_subscribers_are_hinted_once_their_subscriptions_are_back() {
    let Some(mut server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let (chat, on_a_side) = (Uuid::now_v7(), Uuid::now_v7());
    let mut on_b = b.subscribe(Topic::Chat(chat));
    let mut on_a = a.subscribe(Topic::Chat(on_a_side));
    assert!(in_effect(&mut on_b).await && in_effect(&mut on_a).await);

    server.restart().await;
    // Reconnecting may take a few of the client's back-off steps.
    let reconnect = Duration::from_secs(20);
    assert!(hinted_within(&mut on_b, reconnect).await, "b hinted after its reconnect");
    assert!(hinted_within(&mut on_a, reconnect).await, "a reconnected too");
    a.publish(Topic::Chat(chat), event(chat, 7));
    assert_eq!(next_seq(&mut on_b).await, Some(7), "b's subscription was back when the hint came");
    stop.cancel();
}

/// Waits (bounded by `within`) until `done` holds: a state the bus's own
/// tasks reach; false if it never did.
async fn until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// The replicas' caches through a real disconnect. Invalidations sent
/// while a replica is cut off never reach it (core NATS keeps nothing), so
/// a replica whose connection drops must forget what it cached and answer
/// nothing from its caches until a barrier after the reconnect confirms
/// that its invalidation subscription is back; from then on, another
/// process's invalidation reaches it again.
#[tokio::test]
async fn a_replica_that_lost_its_connection_forgets_its_caches_until_resynchronised() {
    use natter_kit::cache::{Lookup, Tag, TaggedCache};
    let Some(mut server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    assert!(until(DELIVERY, || b.invalidator().live()).await, "b's caches go live once connected");
    // A TTL far longer than the test: only the disconnect can drop entries.
    let cache = TaggedCache::<u8, u8>::new("disconnect", Duration::from_secs(3600), 10, b.invalidator().clone());
    let (chat, other) = (Uuid::now_v7(), Uuid::now_v7());
    let fill = |key: u8, chat: Uuid| {
        let cache = cache.clone();
        async move {
            let Lookup::Miss(ticket) = cache.get(&key).await else { panic!("a live cache without the key misses") };
            cache.put(ticket, key, key, vec![Tag::Chat(chat)]);
        }
    };
    fill(1, chat).await;
    assert!(matches!(cache.get(&1).await, Lookup::Hit(1)), "the entry is cached while connected");

    server.restart().await;
    // Look-ups ask the owner (Bypass) while b is cut off or resyncing, and
    // miss once it is live again: never the entry cached before.
    let reconnect = Duration::from_secs(20);
    let deadline = tokio::time::Instant::now() + reconnect;
    loop {
        match cache.get(&1).await {
            Lookup::Hit(_) => panic!("b answered from a cache filled before its connection dropped"),
            Lookup::Miss(_) => break,
            Lookup::Bypass => {
                assert!(tokio::time::Instant::now() < deadline, "b resynchronised within {reconnect:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    // Live again: another process's invalidation reaches b, as before.
    assert!(until(reconnect, || a.invalidator().live()).await, "a resynchronised too");
    fill(1, chat).await;
    fill(2, other).await;
    a.invalidate(vec![Tag::Chat(chat)]).await;
    assert!(matches!(cache.get(&1).await, Lookup::Miss(_)), "an invalidation after the reconnect reaches b");
    assert!(matches!(cache.get(&2).await, Lookup::Hit(2)), "and leaves other chats' entries");
    stop.cancel();
}

/// A look-up that finds `key` missing fills it with `key`, tagged `chat`.
async fn fill(cache: &natter_kit::cache::TaggedCache<u8, u8>, key: u8, chat: Uuid) {
    use natter_kit::cache::{Lookup, Tag};
    let Lookup::Miss(ticket) = cache.get(&key).await else { panic!("a live cache without the key misses") };
    cache.put(ticket, key, key, vec![Tag::Chat(chat)]);
}

/// A replica's shutdown token fires while it still serves the calls it
/// accepted before (its drain, up to --shutdown-grace): their cached token
/// and membership look-ups answer at once, not when the grace cuts them,
/// and stay right (an invalidation from a replica still serving reaches
/// it) until `close()`; after it, look-ups ask the owning service.
#[tokio::test]
async fn cache_look_ups_answer_through_a_drain_and_after_close() {
    use natter_kit::cache::{Lookup, Tag, TaggedCache};
    let Some(server) = NatsServer::start().await else { return };
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let a = natter_bus(&server, Routing::Interest, &a_stop).await;
    let b = natter_bus(&server, Routing::Interest, &b_stop).await;
    assert!(until(DELIVERY, || b.invalidator().live()).await, "b's caches go live once connected");
    let cache = TaggedCache::<u8, u8>::new("drain", Duration::from_secs(3600), 10, b.invalidator().clone());
    let (chat, other) = (Uuid::now_v7(), Uuid::now_v7());
    fill(&cache, 1, chat).await;
    fill(&cache, 2, other).await;

    b_stop.cancel();
    // Outside a call every hit syncs: a few in a row, so some are asked
    // for after b's tasks have seen the token.
    let answer = Duration::from_secs(1);
    for _ in 0..3 {
        let got = tokio::time::timeout(answer, cache.get(&2)).await;
        assert!(matches!(got, Ok(Lookup::Hit(2))), "a hit during the drain answers within {answer:?}: {got:?}");
    }
    a.invalidate(vec![Tag::Chat(chat)]).await;
    let got = tokio::time::timeout(answer, cache.get(&1)).await;
    assert!(matches!(got, Ok(Lookup::Miss(_))), "an invalidation during the drain still reaches b: {got:?}");

    b.close().await;
    let got = tokio::time::timeout(answer, cache.get(&2)).await;
    assert!(matches!(got, Ok(Lookup::Bypass)), "after close() b asks the owning service: {got:?}");
    a_stop.cancel();
}

/// A stopping replica drains for up to --shutdown-grace (10 s by default)
/// after its shutdown token, then writes its stores and says its presence
/// goodbye: what it publishes that late still reaches the other replicas,
/// sent when it closes its bus.
#[tokio::test]
async fn events_published_late_in_a_drain_go_out_at_close() {
    let Some(server) = NatsServer::start().await else { return };
    let (a_stop, b_stop) = (CancellationToken::new(), CancellationToken::new());
    let a = natter_bus(&server, Routing::Interest, &a_stop).await;
    let b = natter_bus(&server, Routing::Interest, &b_stop).await;
    let chat = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut on_b).await, "b's subscription is in place");

    // Past the whole default drain on the paused clock, which the bus's
    // timers follow (this runtime's, as in a replica); real time again for
    // the network.
    tokio::time::pause();
    a_stop.cancel();
    tokio::time::sleep(Duration::from_secs(11)).await;
    tokio::time::resume();
    a.publish(Topic::Chat(chat), event(chat, 1));
    a.close().await;
    assert_eq!(next_seq(&mut on_b).await, Some(1), "the event published 11 s into a's drain reached b");
    b_stop.cancel();
}

/// A replica's own connection to NATS goes dark (what it writes is lost on
/// the way, the socket still open) while it publishes a change of a chat and
/// of a user that another replica's streams follow, and news of a user on
/// the presence topic (a rename), and then drops. The
/// other replica's connection never wavered, so nothing of its own tells
/// its streams to re-read: once the publisher has reconnected, its
/// subscribers of those topics are hinted to re-read the store (within a
/// bounded wait), where without the hint they would hear of the change only
/// at the chat's next event, and presence's to tell streams that ephemeral
/// news was lost.
#[tokio::test]
async fn what_a_publisher_lost_with_its_connection_is_hinted_after_its_reconnect() {
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus_through(&relay, &server, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let (chat, user) = (Uuid::now_v7(), Uuid::now_v7());
    let mut chat_on_b = b.subscribe(Topic::Chat(chat));
    let mut user_on_b = b.subscribe(Topic::User(user));
    let mut presence_on_b = b.subscribe(Topic::Presence);
    assert!(in_effect(&mut chat_on_b).await && in_effect(&mut user_on_b).await, "b's subscriptions are in place");
    a.publish(Topic::Chat(chat), event(chat, 1));
    assert_eq!(next_seq(&mut chat_on_b).await, Some(1), "a's events cross through the relay");

    relay.freeze();
    a.publish(Topic::Chat(chat), event(chat, 2));
    let account = natter_proto::messages::v1::AccountChange::BlockedUsers;
    a.publish(Topic::User(user), Arc::new(Event::account_updated(user.into(), account)));
    a.publish(Topic::Presence, Arc::new(Event::user_updated(user.into(), "u".into(), "Renamed".into(), 2)));
    let topics =
        [format!("natter.events.chat.{chat}"), format!("natter.events.user.{user}"), "natter.events.presence".into()];
    for topic in topics {
        assert!(relay.swallowed(&topic, DELIVERY).await, "a's event on {topic} was lost on the way");
    }
    relay.cut();

    // Reconnecting may take a few of the client's back-off steps.
    let reconnect = Duration::from_secs(20);
    let deadline = tokio::time::Instant::now() + reconnect;
    match tokio::time::timeout_at(deadline, chat_on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint() && e.chat == Some(chat.into()), "a hint to re-read the chat: {e:?}"),
        other => panic!("b's subscribers of the chat heard nothing within {reconnect:?}: {other:?}"),
    }
    match tokio::time::timeout_at(deadline, user_on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint(), "a hint to re-read the user's chats: {e:?}"),
        other => panic!("b's subscribers of the user heard nothing within {reconnect:?}: {other:?}"),
    }
    match tokio::time::timeout_at(deadline, presence_on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint(), "a hint of news lost: {e:?}"),
        other => panic!("b's presence heard nothing within {reconnect:?}: {other:?}"),
    }
    a.publish(Topic::Chat(chat), event(chat, 3));
    assert_eq!(next_seq(&mut chat_on_b).await, Some(3), "and a's events cross again");
    stop.cancel();
}

/// A replica's own connection to NATS goes dark (what it writes is lost on
/// the way, the socket still open) while it invalidates a chat's cached
/// memberships (a member was removed), and then drops. The other replica's
/// connection never wavered, so nothing of its own clears its caches: once
/// the publisher has reconnected, it publishes the invalidation again and
/// the other replica drops the chat's entries within a bounded wait, where
/// without it the removed member would be let in from that replica's cache
/// until --cache-ttl (an hour here). Other chats' entries stay.
#[tokio::test]
async fn an_invalidation_a_publisher_lost_with_its_connection_reaches_the_others_after_its_reconnect() {
    use natter_kit::cache::{Lookup, Tag, TaggedCache};
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus_through(&relay, &server, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    assert!(until(DELIVERY, || b.invalidator().live()).await, "b's caches go live once connected");
    let cache = TaggedCache::<u8, u8>::new("lost", Duration::from_secs(3600), 10, b.invalidator().clone());
    let (chat, other) = (Uuid::now_v7(), Uuid::now_v7());
    fill(&cache, 1, chat).await;
    fill(&cache, 2, other).await;

    relay.freeze();
    // Returns once its barrier times out, unconfirmed.
    a.invalidate(vec![Tag::Chat(chat)]).await;
    assert!(relay.swallowed("natter.caches.invalidate", DELIVERY).await, "a's invalidation was lost on the way");
    assert!(matches!(cache.get(&1).await, Lookup::Hit(1)), "b still answers the chat from its cache");
    relay.cut();

    // Reconnecting may take a few of the client's back-off steps.
    let reconnect = Duration::from_secs(20);
    let deadline = tokio::time::Instant::now() + reconnect;
    loop {
        match cache.get(&1).await {
            Lookup::Miss(_) => break,
            Lookup::Hit(_) => {
                assert!(tokio::time::Instant::now() < deadline, "b answered the chat from its cache for {reconnect:?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Lookup::Bypass => panic!("b's own connection never dropped: its caches stay live"),
        }
    }
    assert!(matches!(cache.get(&2).await, Lookup::Hit(2)), "another chat's entry stays");
    stop.cancel();
}

/// A replica reconnects to NATS over a network that got slow: its
/// handshake is through, but the subscriptions the client re-sends reach
/// the server only after its router's round trip gave up its 2 s wait, so
/// its streams are hinted to re-read the store before the subscription of
/// their chat is back. Another replica publishes a change of the chat in
/// that window: the server has no subscription to route it to. Once the
/// subscriptions arrive, the streams are hinted again (a later round trip
/// answered), where they used to hear of the change only at the chat's
/// next event.
#[tokio::test]
async fn a_replica_whose_subscriptions_are_slow_to_return_hints_its_streams_again_once_they_are_back() {
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus_through(&relay, &server, &stop).await;
    // A third replica, whose receipt says the server has routed a change.
    let c = natter_bus(&server, Routing::Interest, &stop).await;
    let chat = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(chat));
    let mut on_c = c.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut on_b).await && in_effect(&mut on_c).await, "b's and c's subscriptions are in place");

    relay.hold_new();
    relay.cut();
    // Reconnecting may take a few of the client's back-off steps; the hint
    // comes once the router's round trip was answered or gave up.
    assert!(hinted_within(&mut on_b, Duration::from_secs(20)).await, "b's streams hinted after its reconnect");
    // Re-read done; the change comes after it, while b's SUB is held.
    a.publish(Topic::Chat(chat), event(chat, 1));
    assert_eq!(next_seq(&mut on_c).await, Some(1), "the server routed the change");
    relay.release();
    match tokio::time::timeout(DELIVERY, on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint(), "a hint to re-read the chat: {e:?}"),
        other => panic!("b's stream heard nothing of the change made before its subscription was back: {other:?}"),
    }
    stop.cancel();
}

/// A replica reconnects to NATS over a network that got slow: its
/// handshake is through, but the subscriptions the client re-sends (and
/// the barriers after them) reach the server only after the caches'
/// barrier gave up its 2 s wait. Meanwhile another replica removes a member
/// (it invalidates the chat's memberships, confirmed by its own server
/// round trip): the server routes that before it has the slow replica's
/// subscription, so that replica never receives it. Its caches must stay
/// off until a barrier confirms the subscriptions, so they cannot answer
/// an entry cached before the invalidation; where they went live at the
/// end of the 2 s wait, the entry cached then was answered after the
/// invalidation (the removed member let in) until --cache-ttl, an hour
/// here.
#[tokio::test]
async fn a_replica_whose_subscriptions_are_slow_to_return_keeps_its_caches_off_until_they_are_confirmed() {
    use natter_kit::cache::{Lookup, Tag, TaggedCache};
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus_through(&relay, &server, &stop).await;
    assert!(until(DELIVERY, || b.invalidator().live()).await, "b's caches go live once connected");
    let cache = TaggedCache::<u8, u8>::new("slow", Duration::from_secs(3600), 10, b.invalidator().clone());
    let chat = Uuid::now_v7();

    relay.hold_new();
    relay.cut();
    // Reconnecting may take a few of the client's back-off steps. Then the
    // caches' barrier and the router's round trip go out, and are held.
    const BARRIER: &str = "natter.caches.barrier";
    let reconnect = Duration::from_secs(20);
    assert!(relay.swallowed_times(BARRIER, 2, reconnect).await, "b reconnected and its barriers are held");
    // Until the caches' barrier has given up its 2 s wait: the caches went
    // live without it, or asked again.
    let asked_again = || relay.swallowed_count(BARRIER) >= 3;
    assert!(until(DELIVERY, || b.invalidator().live() || asked_again()).await, "the caches' barrier ended its wait");
    // A look-up now: cached if the caches answer.
    if let Lookup::Miss(ticket) = cache.get(&1).await {
        cache.put(ticket, 1, 1, vec![Tag::Chat(chat)]);
    }
    a.invalidate(vec![Tag::Chat(chat)]).await;

    relay.release();
    assert!(until(reconnect, || b.invalidator().live()).await, "b's caches go live once its subscriptions are back");
    let got = cache.get(&1).await;
    assert!(
        !matches!(got, Lookup::Hit(_)),
        "b answered from an entry cached before an invalidation it never received: {got:?}"
    );
    stop.cancel();
}

/// A replica stops just as its own connection to NATS goes dark (what it
/// writes is lost on the way) and then drops: the chat's change it
/// published in its last second was lost, and its close() sees no
/// confirmation of it. Close waits (within its grace) for the reconnect and
/// hints the chat's subscribers on the other replica, where without it
/// they would hear of the change only at the chat's next event.
#[tokio::test]
async fn what_a_stopping_publisher_lost_with_its_connection_is_hinted_before_close_returns() {
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus_through(&relay, &server, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let chat = Uuid::now_v7();
    let mut chat_on_b = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut chat_on_b).await, "b's subscription is in place");

    relay.freeze();
    a.publish(Topic::Chat(chat), event(chat, 1));
    // The publisher's own round trip for it (once a second) is lost too,
    // and holds off the next for its 2 s wait: a round trip from now on is
    // close()'s.
    const BARRIER: &str = "natter.caches.barrier";
    assert!(relay.swallowed(BARRIER, DELIVERY).await, "a's round trip was lost on the way");
    let before = relay.swallowed_count(BARRIER);
    let closing = a.close();
    tokio::pin!(closing);
    let closed = tokio::select! {
        () = &mut closing => true,
        seen = relay.swallowed_times(BARRIER, before + 1, DELIVERY) => {
            assert!(seen, "close() neither returned nor confirmed");
            false
        }
    };
    // Close is under way (or over): the connection drops.
    relay.cut();
    if !closed {
        closing.await;
    }
    match tokio::time::timeout(DELIVERY, chat_on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint() && e.chat == Some(chat.into()), "a hint to re-read the chat: {e:?}"),
        other => panic!("b's subscribers of the chat heard nothing of a's last change: {other:?}"),
    }
    stop.cancel();
}

/// A replica publishes faster than its publisher task sends (here: more
/// events than its queue holds, with no pause for the task), so the last
/// ones are dropped, among them the only event of a chat another replica's
/// streams follow. Those subscribers are hinted to re-read the store once
/// the publisher gets to it, where they would otherwise hear of the change
/// only at the chat's next event. The dropped event does not count as
/// published (`natter_bus_published_total` used to count it).
#[tokio::test]
async fn an_event_dropped_for_a_full_publish_queue_is_hinted() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let (busy, quiet) = (Uuid::now_v7(), Uuid::now_v7());
    let mut quiet_on_b = b.subscribe(Topic::Chat(quiet));
    assert!(in_effect(&mut quiet_on_b).await, "b's subscription is in place");
    // This test's runtime has one thread: nothing else runs in this loop.
    for seq in 1..=16 * 1024 {
        a.publish(Topic::Chat(busy), event(busy, seq));
    }
    a.publish(Topic::Chat(quiet), event(quiet, 1));
    match tokio::time::timeout(DELIVERY, quiet_on_b.recv()).await {
        Ok(Some(Ok(e))) => assert!(e.is_hint() && e.chat == Some(quiet.into()), "a hint to re-read the chat: {e:?}"),
        other => panic!("b's subscribers of the chat heard nothing within {DELIVERY:?}: {other:?}"),
    }
    a.close().await;
    assert_eq!(a.published(), 16 * 1024, "the events queued were published, the dropped one was not");
    stop.cancel();
}

/// Replica b's presence (the messages service) follows the presence
/// topic, which every replica subscribes to from its start: b holds one
/// NATS subscription for it (interest routing subscribed it a second time
/// for its first local subscriber), and each presence event of another
/// replica (every replica's heartbeat, a rename) reaches b's subscribers
/// once, not once per subscription: doubled, every beat cost the server
/// and each replica twice its traffic and filled the presence topic's
/// channel twice as fast (its lag tells streams news was lost).
#[tokio::test]
async fn presence_events_arrive_once_over_one_subscription() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let before = b.subscriptions();
    let mut on_b = b.subscribe(Topic::Presence);
    b.settled().await;
    assert_eq!(b.subscriptions(), before, "the presence subject was subscribed already, from b's start");
    let user = Uuid::now_v7();
    a.publish(Topic::Presence, Arc::new(Event::user_updated(user.into(), "u".into(), "Renamed".into(), 2)));
    let first = tokio::time::timeout(DELIVERY, on_b.recv()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "b's presence received the rename: {first:?}");
    // A second copy would come right behind the first.
    let second = tokio::time::timeout(Duration::from_millis(200), on_b.recv()).await;
    assert!(second.is_err(), "b's presence received the rename twice: {second:?}");
    stop.cancel();
}

/// How long a peer's death may take to reach the other replicas' streams
/// before it counts as never: three missed announcements of a second and
/// a check (about 4 s), with room for a loaded machine. A bound, not a
/// speed.
const PEER_LOST: Duration = Duration::from_secs(20);

/// b following a new chat (the subscription in effect) once it has heard
/// the one other bus on the server announce itself.
async fn follow_hearing_a(b: &NatsBus, routing: Routing) -> (Uuid, natter_bus::Subscription) {
    let chat = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(chat));
    // Broadcast: `natter.events.>` is in place from b's start, no hint.
    if routing == Routing::Interest {
        assert!(in_effect(&mut on_b).await, "b's subscription is in place");
    }
    assert!(until(DELIVERY, || b.peers() == 1).await, "b heard a announce itself");
    (chat, on_b)
}

/// The next event on `rx`, within `within`, must be a resync hint of
/// `chat`; the panic names `who` heard nothing or something else.
async fn expect_hint(rx: &mut natter_bus::Subscription, chat: Uuid, within: Duration, who: &str) {
    match tokio::time::timeout(within, rx.recv()).await {
        Ok(Some(Ok(e))) => {
            assert!(e.is_hint() && e.change_seq == 0 && e.chat == Some(chat.into()), "{who}: not a hint: {e:?}");
        }
        other => panic!("{who}: heard nothing: {other:?}"),
    }
}

/// Replica a commits a change of a chat that replica b's stream follows,
/// and adds b's user to another chat, and dies before its events leave:
/// its host loses power, so nothing it writes from then on reaches the
/// server (the socket still looks open) and it says no goodbye. b's
/// connection never wavered and a never comes back to hint anything: b's
/// subscribers of the chat and of the user are hinted to re-read the store
/// (the chat from its last seq, the user's list of chats) once b misses
/// a's announcements, where without it they would hear of the change only
/// at the chat's next event, and of the new chat only at the user's next
/// event or reconnect. In either routing of b (broadcast hears the
/// announcements on `natter.events.>`). The user topic's hint has b's
/// stream tell its client that ephemeral news may be lost, which it may
/// (a's typing, renames, receipts on their way): only a process of b's
/// own deployment (its subject prefix) can make it. Before the hints, b's
/// presence is told a's process is dead (its users go offline now).
#[tokio::test]
async fn what_a_replica_that_died_never_published_is_hinted_by_the_others() {
    for routing in [Routing::Interest, Routing::Broadcast] {
        let Some(server) = NatsServer::start().await else { return };
        let relay = Relay::to(&server.url).await;
        let stop = CancellationToken::new();
        let a = natter_bus_through(&relay, &server, &stop).await;
        let b = natter_bus(&server, routing, &stop).await;
        // b's stream also follows its user's topic.
        let user = Uuid::now_v7();
        let mut user_on_b = b.subscribe(Topic::User(user));
        if routing == Routing::Interest {
            assert!(in_effect(&mut user_on_b).await, "b's user subscription is in place");
        }
        let (chat, mut on_b) = follow_hearing_a(&b, routing).await;
        let mut presence_on_b = b.subscribe(Topic::Presence);

        relay.freeze();
        a.publish(Topic::Chat(chat), event(chat, 1));
        let added = Uuid::now_v7();
        a.publish(Topic::User(user), event(added, 1));
        for subject in [format!("natter.events.chat.{chat}"), format!("natter.events.user.{user}")] {
            assert!(relay.swallowed(&subject, DELIVERY).await, "a's event on {subject} was lost on the way");
        }
        expect_hint(&mut on_b, chat, PEER_LOST, &format!("{routing:?}: b's subscribers, of a's last change")).await;
        assert_eq!(b.peers(), 0, "{routing:?}: b counts a as gone");
        // Hinted in the same pass as the chat.
        let user_hint = futures::FutureExt::now_or_never(user_on_b.recv());
        assert!(
            matches!(&user_hint, Some(Some(Ok(e))) if e.is_hint()),
            "{routing:?}: b's user stream was not told to re-read the user's chats: {user_hint:?}"
        );
        let lost = futures::FutureExt::now_or_never(presence_on_b.recv());
        let a_lost = Event::process_lost(a.process().expect("a NATS bus has a process id"));
        assert!(
            matches!(&lost, Some(Some(Ok(e))) if **e == a_lost),
            "{routing:?}: b's presence was not told a is dead: {lost:?}"
        );
        stop.cancel();
    }
}

/// Replica a publishes a change, closes its bus (everything confirmed)
/// and says goodbye: b forgets a without hinting its streams, also past
/// the time a silent a would have been counted as dead (every b stream
/// re-reading the store at each clean restart of a replica would be a
/// wasted read per stream).
#[tokio::test]
async fn a_replica_that_closes_cleanly_is_forgotten_without_a_resync() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let (chat, mut on_b) = follow_hearing_a(&b, Routing::Interest).await;
    let mut presence_on_b = b.subscribe(Topic::Presence);

    a.publish(Topic::Chat(chat), event(chat, 1));
    a.close().await;
    match tokio::time::timeout(DELIVERY, on_b.recv()).await {
        Ok(Some(Ok(e))) => assert_eq!(e.change_seq, 1, "a's last event, no hint: {e:?}"),
        other => panic!("b did not receive a's last event: {other:?}"),
    }
    assert!(until(DELIVERY, || b.peers() == 0).await, "b heard a's goodbye");
    // A peer still counted would be lost by b's fifth check after its last
    // word (`NatsBus::peer_checks`).
    let checks = b.peer_checks();
    assert!(until(PEER_LOST, || b.peer_checks() >= checks + 5).await, "b went on checking its peers");
    let after = futures::FutureExt::now_or_never(on_b.recv());
    assert!(after.is_none(), "b's stream was told to re-read the store after a clean goodbye: {after:?}");
    let lost = futures::FutureExt::now_or_never(presence_on_b.recv());
    assert!(lost.is_none(), "b's presence was told a closed cleanly is dead: {lost:?}");
    stop.cancel();
}

/// Replica a stops while the server confirms nothing it publishes (here:
/// its NATS user may publish events but make no round trip; in production
/// a server or network too slow for the close grace): its close() gives up
/// with a change unconfirmed, and its goodbye says so. b's streams re-read
/// the store, those of every chat, not only the ones a published to (a
/// cannot name them all), where without it they would hear of the change
/// only at the chat's next event.
#[tokio::test]
async fn a_replica_whose_close_gives_up_has_the_others_re_read_the_store() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = NatsBus::connect(
        &url_with(&server, RELAY_USER, &server.password),
        None,
        Routing::Interest,
        &SubjectPrefix::default(),
        stop.clone(),
    )
    .await
    .expect("the relay user logs in");
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let (followed, mut on_b) = follow_hearing_a(&b, Routing::Interest).await;
    let published = Uuid::now_v7();

    a.publish(Topic::Chat(published), event(published, 1));
    a.close().await;
    expect_hint(&mut on_b, followed, DELIVERY, "b's streams, of a's unconfirmed change").await;
    stop.cancel();
}

/// Two deployments on one NATS server under different subject prefixes
/// (`--nats-subject-prefix`): a (through a relay, so that it can die) and
/// c under the default prefix, b and d under another. c hears a's event,
/// invalidation and death; b hears none of them (its stream receives d's
/// event only, its cache keeps the entry a invalidated, a's death makes it
/// re-read nothing), where under one prefix every deployment on the server
/// hears all the others': a stranger's changes empty its caches, a
/// stranger's death has its streams re-read the store. In either routing
/// of b and d (broadcast subscribes to `<prefix>.events.>`).
#[tokio::test]
async fn deployments_under_other_subject_prefixes_hear_nothing_of_each_other() {
    use natter_kit::cache::{Lookup, Tag, TaggedCache};
    let other: SubjectPrefix = OTHER_PREFIX.parse().expect("a valid prefix");
    for routing in [Routing::Interest, Routing::Broadcast] {
        let Some(server) = NatsServer::start().await else { return };
        let relay = Relay::to(&server.url).await;
        let stop = CancellationToken::new();
        let a = natter_bus_through(&relay, &server, &stop).await;
        let c = natter_bus(&server, Routing::Interest, &stop).await;
        let b = natter_bus_under(&server, routing, &other, &stop).await;
        let d = natter_bus_under(&server, routing, &other, &stop).await;
        let chat = Uuid::now_v7();
        let (mut on_c, mut on_b) = (c.subscribe(Topic::Chat(chat)), b.subscribe(Topic::Chat(chat)));
        assert!(in_effect(&mut on_c).await, "c's subscription is in place");
        // Broadcast: `<prefix>.events.>` is in place from b's start, no hint.
        if routing == Routing::Interest {
            assert!(in_effect(&mut on_b).await, "b's subscription is in place");
        }
        assert!(until(DELIVERY, || c.peers() == 1 && b.peers() == 1).await, "{routing:?}: c heard a, b heard d");

        // Events: c receives a's; b's first is d's, published once the
        // server had routed a's (c received it): a's would have come first.
        a.publish(Topic::Chat(chat), event(chat, 1));
        assert_eq!(next_seq(&mut on_c).await, Some(1), "c received a's event");
        d.publish(Topic::Chat(chat), event(chat, 2));
        assert_eq!(next_seq(&mut on_b).await, Some(2), "{routing:?}: b received another deployment's event");

        // Invalidations: once a's has returned the server has it, and a
        // look-up syncs (a barrier, then what arrived before it).
        assert!(until(DELIVERY, || b.invalidator().live() && c.invalidator().live()).await, "caches are live");
        let cache = |bus: &NatsBus| {
            TaggedCache::<u8, u8>::new("prefixes", Duration::from_secs(3600), 10, bus.invalidator().clone())
        };
        let (on_b_cache, on_c_cache) = (cache(&b), cache(&c));
        fill(&on_b_cache, 1, chat).await;
        fill(&on_c_cache, 1, chat).await;
        a.invalidate(vec![Tag::Chat(chat)]).await;
        assert!(matches!(on_c_cache.get(&1).await, Lookup::Miss(_)), "c dropped the entry a invalidated");
        let kept = on_b_cache.get(&1).await;
        assert!(
            matches!(kept, Lookup::Hit(1)),
            "{routing:?}: b dropped its entry for another deployment's invalidation: {kept:?}"
        );
        d.invalidate(vec![Tag::Chat(chat)]).await;
        assert!(matches!(on_b_cache.get(&1).await, Lookup::Miss(_)), "{routing:?}: b dropped the entry d invalidated");

        // Deaths: a's power goes; c's streams re-read the store, b's not.
        relay.freeze();
        expect_hint(&mut on_c, chat, PEER_LOST, "c's subscribers, of a's death").await;
        // A peer b had heard would be lost by b's fifth check after its
        // last word (`NatsBus::peer_checks`).
        let checks = b.peer_checks();
        assert!(until(PEER_LOST, || b.peer_checks() >= checks + 5).await, "b went on checking its peers");
        assert_eq!(b.peers(), 1, "{routing:?}: b hears d, and never heard a");
        let after = futures::FutureExt::now_or_never(on_b.recv());
        assert!(after.is_none(), "{routing:?}: another deployment's death had b's stream re-read the store: {after:?}");
        stop.cancel();
    }
}

/// A publish racing close(): queued behind the Close, it still goes out
/// (and is confirmed with the rest) where it used to be dropped without a
/// word; one after close() returned reaches this process only, and is
/// counted.
#[tokio::test(flavor = "current_thread")]
async fn an_event_published_while_closing_still_goes_out() {
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    let chat = Uuid::now_v7();
    let mut on_b = b.subscribe(Topic::Chat(chat));
    assert!(in_effect(&mut on_b).await, "b's subscription is in place");

    let closing = a.close();
    tokio::pin!(closing);
    // One poll queues the Close; the publisher (this thread) has not run.
    assert!(futures::poll!(&mut closing).is_pending(), "close() waits for the publisher");
    a.publish(Topic::Chat(chat), event(chat, 1));
    closing.await;
    assert_eq!(next_seq(&mut on_b).await, Some(1), "the event published during close() reached b");

    let unsent = || metric(&natter_kit::metrics::render(), "natter_bus_unsent_total");
    let before = unsent();
    a.publish(Topic::Chat(chat), event(chat, 2));
    a.publish(Topic::Chat(chat), event(chat, 3));
    assert!(unsent() >= before + 2.0, "events published after close() are counted");
    stop.cancel();
}

/// The value of the unlabelled metric `name` in `text` (the exposition
/// format).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A bus that starts hears the others within a round trip: its first
/// announcement says hello and they answer at once, where before it heard
/// each at its next announcement, up to a second later (a peer dying
/// meanwhile went unnoticed by it, and the messages service's presence took
/// that peer's users offline only after its missed heartbeats). b starts
/// just after one of a's announcements, a second before the next.
#[tokio::test]
async fn a_starting_replica_hears_the_others_within_a_round_trip() {
    use futures::StreamExt as _;
    let Some(server) = NatsServer::start().await else { return };
    let stop = CancellationToken::new();
    let a = natter_bus(&server, Routing::Interest, &stop).await;
    let listener = async_nats::ConnectOptions::with_user_and_password(NATTER_USER.into(), server.password.clone())
        .connect(server.url.as_str())
        .await
        .expect("connect to NATS");
    let mut announcements = listener.subscribe("natter.events.alive").await.expect("subscribe");
    listener.flush().await.expect("the subscription reached NATS");
    // One of a's, then b starts.
    let heard = tokio::time::timeout(DELIVERY, announcements.next()).await.expect("a announces itself");
    assert!(heard.is_some());
    let announced = tokio::time::Instant::now();
    let b = natter_bus(&server, Routing::Interest, &stop).await;
    // Measured from b's start, not from a's announcement, so that a slow
    // start (a loaded machine) cannot eat the bound: a's answer to b's
    // hello takes a round trip; without it, b would wait for a's next
    // announcement, due a second after the one heard above.
    let waited = announced.elapsed();
    let within = Duration::from_millis(500);
    assert!(
        until(within, || b.peers() == 1).await,
        "b did not hear a within {within:?} of its start (its start took {waited:?}; a's next announcement was due a second after the one heard)"
    );
    drop(a);
    stop.cancel();
}

/// A bus whose connection drops tells its own process's presence once it
/// is connected again ([`Event::rejoined`] on the presence topic, local
/// only): the presence re-announces its users to peers that may have taken
/// the process as dead meanwhile.
#[tokio::test]
async fn a_reconnected_bus_tells_its_presence() {
    let Some(server) = NatsServer::start().await else { return };
    let relay = Relay::to(&server.url).await;
    let stop = CancellationToken::new();
    let a = natter_bus_through(&relay, &server, &stop).await;
    let mut presence = a.subscribe(Topic::Presence);
    relay.cut();
    // Reconnecting may take a few of the client's back-off steps.
    match tokio::time::timeout(Duration::from_secs(20), presence.recv()).await {
        Ok(Some(Ok(e))) => assert_eq!(*e, Event::rejoined(), "the presence topic's first news after the cut"),
        other => panic!("a's presence heard nothing of the reconnect: {other:?}"),
    }
    stop.cancel();
}
