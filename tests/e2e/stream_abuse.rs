//! StreamEvents under abuse: a removed member whose stream stalled, a
//! revocation whose bus event was lost, too many streams or chat ids, and
//! streams that come and go.

use std::time::Duration;

use natter_proto::chats::v1 as cpb;
use natter_proto::messages::v1 as mpb;
use natter_proto::messages::v1::message_service_client::MessageServiceClient;
use natter_testkit::{Cluster, TestUser, authed};
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt as _;

use crate::chats::{direct, send};
use crate::stream::{end_of, next};
use mpb::stream_events_response::Event;

crate::both_modes!(
    streams_per_user_are_capped_and_freed_however_they_end,
    too_many_chat_ids_or_resume_entries_are_refused_by_field,
);

/// The stalled-stream tests send a [`FLOOD`] from one user, faster than the
/// default per-user send rate admits.
mod flood {
    use super::{
        a_stalled_stream_gets_nothing_sent_after_its_removal,
        a_stream_stalled_in_a_refill_gets_nothing_sent_after_its_removal,
    };

    /// No send rate; and the slow-consumer rule (`--max-unread-answer-time`)
    /// past the flood, which a stalled stream must outlast whole (minutes,
    /// on a loaded machine), on the messages service and the edge alike.
    pub(crate) const FLAGS: natter_testkit::Flags<'static> = natter_testkit::Flags {
        sessions: &[],
        chats: &[],
        messages: &["--send-message-rate", "off", "--max-unread-answer-time", "1h"],
        assistant: &[],
        edge: &["--max-unread-answer-time", "1h"],
    };

    crate::both_modes!(
        flags = crate::stream_abuse::flood::FLAGS;
        a_stalled_stream_gets_nothing_sent_after_its_removal,
        a_stream_stalled_in_a_refill_gets_nothing_sent_after_its_removal,
    );
}

/// Messages sent while a stream stalls: more than the bus queues for one
/// subscriber (1,024) plus what HTTP/2 buffers on the way (the edge's
/// upstream window, 2 MiB, in split mode), so the stream also lags.
const FLOOD: i64 = 1400;

/// Text of each flood message: 16 KiB, so a few fill a stream's window.
fn flood_text(i: i64) -> String {
    format!("{i:>8}").repeat(2048)
}

/// A channel whose HTTP/2 windows are the protocol's initial 64 KiB, so a
/// reader that stops reading stalls the server's side within a few events.
async fn small_window_channel(c: &Cluster) -> Channel {
    Endpoint::from_shared(format!("http://{}", c.addr))
        .expect("url")
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .expect("connect")
}

/// Sends `FLOOD` 16 KiB messages to `chat`, 32 at a time; returns the last seq.
async fn flood(c: &Cluster, author: &TestUser, chat: &str) -> i64 {
    use futures::StreamExt as _;
    let sends = futures::stream::iter(1..=FLOOD).map(|i| {
        let mut client = c.messages();
        let request = authed(
            author,
            mpb::SendMessageRequest { chat_id: chat.to_owned(), text: flood_text(i), ..Default::default() },
        );
        async move { client.send_message(request).await.expect("send").into_inner().message.expect("message").seq }
    });
    sends.buffer_unordered(32).fold(0, |last, seq| async move { last.max(seq) }).await
}

/// Alice's group with Bob, and their direct chat.
async fn club_and_dm(c: &Cluster) -> (TestUser, TestUser, String, String) {
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let request =
        cpb::CreateChatRequest { title: "club".into(), member_ids: vec![bob.id.clone()], ..Default::default() };
    let club = c.chats().create_chat(authed(&alice, request)).await.unwrap().into_inner().chat.unwrap();
    let dm = direct(c, &alice, &bob).await;
    (alice, bob, club.id, dm.id)
}

/// Bob's stream stalls (he stops reading) while Alice floods the club;
/// after `read_first` events more he stalls again; then Alice removes him and
/// sends two more messages. Draining the stream then must show nothing of
/// the club beyond the removal: no message after it, nothing at all after
/// the removal event, up to a marker sent to their direct chat.
async fn removal_while_stalled(c: &Cluster, read_first: usize) {
    let (alice, bob, club, dm) = club_and_dm(c).await;
    let request = mpb::StreamEventsRequest { chat_ids: vec![club.clone(), dm.clone()], ..Default::default() };
    let mut stream: Streaming<mpb::StreamEventsResponse> = MessageServiceClient::new(small_window_channel(c).await)
        .stream_events(authed(&bob, request))
        .await
        .expect("stream opens")
        .into_inner();
    let removal_seq = flood(c, &alice, &club).await;
    assert_eq!(removal_seq, FLOOD);
    // What is read before the removal is the club's flood, in order.
    let mut last_read = 0;
    for _ in 0..read_first {
        let event = next(&mut stream).await;
        let Some(Event::MessageCreated(m)) = event.event else { panic!("not a message: {event:?}") };
        assert!(event.chat_id == club && m.seq > last_read, "the club's messages in order");
        last_read = m.seq;
    }
    let remove = cpb::RemoveMemberRequest { chat_id: club.clone(), user_id: bob.id.clone() };
    c.chats().remove_member(authed(&alice, remove)).await.unwrap();
    send(c, &alice, &club, "after the removal 1").await;
    send(c, &alice, &club, "after the removal 2").await;

    let mut removed = false;
    loop {
        let event = next(&mut stream).await;
        // A stream that fell behind says ephemeral events may have been
        // lost (of no chat), once it has caught up.
        if let Some(Event::EphemeralLost(_)) = event.event {
            assert_eq!((event.chat_id.as_str(), event.change_seq), ("", 0), "of no chat");
            continue;
        }
        if event.chat_id == dm {
            assert!(removed, "the marker is sent only after the removal was seen");
            break;
        }
        assert_eq!(event.chat_id, club);
        assert!(!removed, "nothing of the club after the removal event (got seq {})", event.seq);
        match event.event {
            Some(Event::MessageCreated(m)) => {
                assert!(m.seq <= removal_seq, "message {} was sent after the removal (at {removal_seq})", m.seq);
                assert!(m.seq > last_read, "message {} again or out of order (read up to {last_read})", m.seq);
                last_read = m.seq;
            }
            Some(Event::MembershipChanged(m)) => {
                assert_eq!((m.user_id.as_str(), m.change), (bob.id.as_str(), mpb::MembershipChange::Removed as i32));
                removed = true;
                send(c, &alice, &dm, "marker").await;
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    // How many more of the flood arrive before the removal depends on how
    // much was in flight when it committed (none is fine), so no count is
    // asserted: each that does is one sent before it, after those read.
}

async fn a_stalled_stream_gets_nothing_sent_after_its_removal(c: &Cluster) {
    removal_while_stalled(c, 0).await;
}

async fn a_stream_stalled_in_a_refill_gets_nothing_sent_after_its_removal(c: &Cluster) {
    // Reading a few events lets the stream notice it lagged and start
    // refilling from the store; it stalls again in the middle of a page.
    removal_while_stalled(c, 8).await;
}

/// StreamEvents for `chats`, as `user`, on `channel`.
async fn open_on(
    channel: Channel,
    user: &TestUser,
    chats: &[&str],
) -> Result<Streaming<mpb::StreamEventsResponse>, tonic::Status> {
    let request =
        mpb::StreamEventsRequest { chat_ids: chats.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    Ok(MessageServiceClient::new(channel).stream_events(authed(user, request)).await?.into_inner())
}

async fn streams_per_user_are_capped_and_freed_however_they_end(c: &Cluster) {
    const CAP: usize = 32; // --max-streams-per-user's default
    let (alice, bob, club, dm) = club_and_dm(c).await;
    let carol = c.user("carol").await;
    let carol_elsewhere = another_session(c, &carol).await;
    let channel = connect(c).await;
    // Streams refused for other reasons hold no slot.
    for _ in 0..CAP + 8 {
        let refused = open_on(channel.clone(), &carol, &[&club]).await;
        assert_eq!(code_of(refused), Code::PermissionDenied);
    }
    // The cap is per user, whichever session (device) opens the streams.
    let mut held = Vec::new();
    for _ in 0..CAP - 1 {
        held.push(open_on(channel.clone(), &carol, &[]).await.expect("within the cap"));
    }
    let mut doomed = open_on(channel.clone(), &carol_elsewhere, &[]).await.expect("within the cap");
    let refused = open_on(channel.clone(), &carol, &[]).await.expect_err("over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let retry = refused.get_error_details().retry_info().cloned().expect("a RetryInfo detail");
    assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()));
    // Another user has a cap of their own.
    let mut bobs = open_on(channel.clone(), &bob, &[&dm]).await.expect("bob is not capped by carol");

    // A stream the client closes frees its slot (once the server notices).
    held.pop();
    let reopened = wait_for(|| async { open_on(channel.clone(), &carol, &[]).await.ok() }).await;
    held.push(reopened);
    assert_eq!(code_of(open_on(channel.clone(), &carol, &[]).await), Code::ResourceExhausted);

    // A stream the server ends (its session revoked) frees its slot too.
    let revoke = natter_proto::sessions::v1::RevokeSessionRequest::default();
    c.sessions().revoke_session(authed(&carol_elsewhere, revoke)).await.unwrap();
    if c.mode == natter_testkit::Mode::AllInOne || natter_testkit::nats_url().is_some() {
        let end = tokio::time::timeout(Duration::from_secs(10), doomed.message()).await.expect("ends");
        assert_eq!(code_of(end), Code::Unauthenticated);
        held.push(wait_for(|| async { open_on(channel.clone(), &carol, &[]).await.ok() }).await);
    }
    send(c, &alice, &dm, "bob's stream still works").await;
    assert_eq!(next(&mut bobs).await.chat_id, dm);
}

/// A second session (device) of `user`.
async fn another_session(c: &Cluster, user: &TestUser) -> TestUser {
    let request = natter_proto::sessions::v1::CreateSessionRequest {
        username: user.username.clone(),
        password: "correct horse battery".into(), // natter_testkit's password
    };
    let s = c.sessions().create_session(request).await.expect("log in").into_inner();
    TestUser { token: s.token, session_id: s.session.expect("session").id, ..user.clone() }
}

/// A connection of its own (streams held open should not crowd the
/// cluster's shared one).
async fn connect(c: &Cluster) -> Channel {
    Endpoint::from_shared(format!("http://{}", c.addr)).expect("url").connect().await.expect("connect")
}

/// The code of a failed call (or OK).
fn code_of<T>(result: Result<T, tonic::Status>) -> Code {
    result.err().map_or(Code::Ok, |s| s.code())
}

/// Polls `attempt` until it yields a value, for at most 10 s.
pub(crate) async fn wait_for<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn too_many_chat_ids_or_resume_entries_are_refused_by_field(c: &Cluster) {
    const MAX: usize = 1000; // --max-stream-chats' default
    let (alice, bob, _club, dm) = club_and_dm(c).await;
    let ids = |n: usize| (0..n).map(|_| uuid::Uuid::now_v7().to_string()).collect::<Vec<_>>();
    let refuse = |request: mpb::StreamEventsRequest| {
        let mut client = c.messages();
        let request = authed(&bob, request);
        async move { client.stream_events(request).await.expect_err("refused") }
    };
    let status = refuse(mpb::StreamEventsRequest { chat_ids: ids(MAX + 1), ..Default::default() }).await;
    assert_eq!(crate::violated_fields(&status), ["chat_ids"]);
    let resume = ids(MAX + 1).into_iter().map(|c| (c, 0)).collect();
    let status = refuse(mpb::StreamEventsRequest { resume, ..Default::default() }).await;
    assert_eq!(crate::violated_fields(&status), ["resume"]);

    // The same chat a thousand times is one chat, delivered once.
    let request = mpb::StreamEventsRequest { chat_ids: vec![dm.clone(); MAX], ..Default::default() };
    let mut stream = c.messages().stream_events(authed(&bob, request)).await.expect("opens").into_inner();
    send(c, &alice, &dm, "once").await;
    send(c, &alice, &dm, "twice").await;
    assert_eq!(next(&mut stream).await.seq, 1);
    assert_eq!(next(&mut stream).await.seq, 2, "no duplicate of seq 1");
}

/// A revocation whose bus event is lost (here: made straight in the
/// sessions store, in split mode, where every replica asks the sessions
/// service) still ends the session's stream, through the periodic re-check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_lost_by_the_bus_ends_the_stream_within_the_recheck_interval() {
    let Some(url) = natter_testkit::postgres_url() else {
        eprintln!("skipped: NATTER_TEST_DATABASE_URL is not set");
        return;
    };
    let c = Cluster::split_with(
        &url,
        &[],
        natter_testkit::Flags { messages: &["--stream-session-recheck-interval", "500ms"], ..Default::default() },
    )
    .await;
    let (alice, bob) = (c.user("alice").await, c.user("bob").await);
    let chat = direct(&c, &alice, &bob).await;
    let mut stream = open_on(c.channel(), &bob, &[&chat.id]).await.expect("opens");
    assert!(c.revoke_session_silently(&bob.session_id).await);
    let revoked_at = tokio::time::Instant::now();
    let end = end_of(&mut stream).await;
    assert_eq!(end.code(), Code::Unauthenticated);
    // Within the interval, give or take a tick and a round trip.
    assert!(revoked_at.elapsed() < Duration::from_secs(2), "ended after {:?}", revoked_at.elapsed());
    c.stop().await;
}

/// Streams that open and close leave no channel in the bus: each topic's
/// channel goes with its last subscriber, not at its next publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_streams_leave_no_bus_channel_behind() {
    let c = Cluster::all_in_one(&["--create-guest-rate", "off"]).await;
    let alice = c.user("alice").await;
    let before = c.bus_topics().expect("all-in-one");
    let mut streams = Vec::new();
    let mut channels = Vec::new();
    for i in 0..100 {
        // A hundred guests, four streams each (two on their chat with Alice,
        // two on all their chats), on topics no one publishes to; 100
        // streams per connection.
        let guest = c.guest().await;
        let chat = direct(&c, &guest, &alice).await;
        if i % 25 == 0 {
            channels.push(connect(&c).await);
        }
        let channel = channels.last().expect("a channel").clone();
        for chats in [vec![chat.id.as_str()], vec![chat.id.as_str()], vec![], vec![]] {
            streams.push(open_on(channel.clone(), &guest, &chats).await.expect("opens"));
        }
    }
    let open = c.bus_topics().unwrap();
    assert!(open >= before + 300, "each guest's user, session and chat topics: {open}");
    drop(streams);
    drop(channels);
    wait_for(|| async { (c.bus_topics() == Some(before)).then_some(()) }).await;
    c.stop().await;
}
