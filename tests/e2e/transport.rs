//! Transport limits and failures as a client on a bad network, or a hostile
//! one, meets them: stream and header limits, a request body that never
//! comes, a dependency that hangs, an upstream that dies mid-stream behind
//! the edge.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser as _;
use natter_proto::messages::v1 as mpb;
use natter_proto::sessions::v1 as spb;
use natter_testkit::{Cluster, authed, grpc_web};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::Code;

/// The bearer token of calls through the edge to a stand-in upstream, which
/// checks none (the edge refuses a call without any).
const STAND_IN_TOKEN: &str = "stand-in";

/// A guard against a hang: every wait in this module ends within it.
const GUARD: Duration = Duration::from_secs(20);

/// An HTTP/2 connection to `addr` with the h2 crate, so a test can do what
/// tonic would not (advertised settings, a request body that never comes).
async fn h2_connect(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    h2_connect_watched(addr).await.0
}

fn grpc_request(addr: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_limit_is_advertised_and_a_silent_body_times_out() {
    let c = Cluster::all_in_one(&["--max-concurrent-streams", "7", "--request-timeout", "300ms"]).await;
    let mut send = h2_connect(c.addr).await.ready().await.unwrap();

    // A unary call whose body never comes: headers sent, stream left open.
    let (response, _body_never_sent) =
        send.send_request(grpc_request(c.addr, "/natter.sessions.v1.SessionService/CreateSession"), false).unwrap();
    let response = tokio::time::timeout(GUARD, response).await.expect("the server answers").unwrap();
    let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED: {response:?}");

    // By now the server's SETTINGS frame has been read: SETTINGS_MAX_CONCURRENT_STREAMS.
    assert_eq!(send.current_max_send_streams(), 7);
    c.stop().await;
}

/// Reads a response to its end; its trailers (None: the stream was reset
/// or the connection closed).
async fn until_trailers(response: h2::client::ResponseFuture) -> Option<http::HeaderMap> {
    let mut body = response.await.ok()?.into_body();
    while let Some(data) = body.data().await {
        data.ok()?;
    }
    body.trailers().await.ok().flatten()
}

/// The 5-byte gRPC message prefix of an uncompressed message of `len` bytes.
fn message_prefix(len: u32) -> Bytes {
    let mut prefix = vec![0];
    prefix.extend_from_slice(&len.to_be_bytes());
    Bytes::from(prefix)
}

const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// Server reflection needs no token and its stream answers at once, so
/// neither the token gate nor the time to answer bounded it: a message
/// declared at 128 KiB whose bytes never come is refused by its length (64
/// KiB is reflection's and health's most; it was tonic's 4 MiB, held per
/// stream), here long before the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_refuses_a_large_message_by_its_length() {
    let c = Cluster::all_in_one(&["--request-timeout", "60s"]).await;
    let mut send = h2_connect(c.addr).await.ready().await.unwrap();
    let (response, mut body) = send.send_request(grpc_request(c.addr, REFLECTION), false).unwrap();
    body.send_data(message_prefix(128 * 1024), false).unwrap();
    tokio::time::timeout(GUARD, until_trailers(response)).await.expect("the stream ends before the request timeout");
    c.stop().await;
}

/// No request body takes longer than twice the request timeout to arrive:
/// a reflection stream that was answered and then sends nothing more, its
/// body never ended, is ended then (it was held until the connection's
/// age, an hour by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_never_ends_is_cut_at_the_request_timeout() {
    let c = Cluster::all_in_one(&["--request-timeout", "300ms"]).await;
    let mut send = h2_connect(c.addr).await.ready().await.unwrap();
    let (response, mut body) = send.send_request(grpc_request(c.addr, REFLECTION), false).unwrap();
    // list_services: field 7, an empty string.
    body.send_data(message_prefix(2), false).unwrap();
    body.send_data(Bytes::from_static(&[0x3a, 0x00]), false).unwrap();
    let mut reply = tokio::time::timeout(GUARD, response).await.expect("answered").unwrap().into_body();
    let first = tokio::time::timeout(GUARD, reply.data()).await.expect("the service list").expect("a message");
    assert!(first.unwrap().len() > 5, "a list of services");
    // The body stays open and silent: the server ends the stream.
    let ended = tokio::time::timeout(GUARD, async {
        while let Some(data) = reply.data().await {
            if data.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream ends once its body is past twice the request timeout");
    c.stop().await;
}

/// A call that needs a token and carries none is refused before its body
/// is read: here a body that never comes, answered UNAUTHENTICATED at once
/// rather than at the request timeout; log-in needs no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_without_a_token_is_refused_before_its_body() {
    let c = Cluster::all_in_one(&["--request-timeout", "60s"]).await;
    let mut send = h2_connect(c.addr).await.ready().await.unwrap();
    let status_of = |response: &http::Response<h2::RecvStream>| {
        response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned())
    };
    for path in ["/natter.chats.v1.ChatService/ListChats", "/natter.messages.v1.MessageService/SendMessage"] {
        let (response, _body_never_sent) = send.send_request(grpc_request(c.addr, path), false).unwrap();
        let response = tokio::time::timeout(GUARD, response).await.expect("answered before the body").unwrap();
        assert_eq!(status_of(&response).as_deref(), Some("16"), "UNAUTHENTICATED: {path}");
    }
    // Log-in needs no token: its call is read and answered.
    let (response, mut body) =
        send.send_request(grpc_request(c.addr, "/natter.sessions.v1.SessionService/CreateSession"), false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    let response = tokio::time::timeout(GUARD, response).await.unwrap().unwrap();
    assert_ne!(status_of(&response).as_deref(), Some("16"), "a guest session, or its refusal, but no token asked");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_on_both_transports() {
    let c = Cluster::all_in_one(&["--max-header-list-bytes", "8192"]).await;
    let big = "x".repeat(16 * 1024);
    let path = "/natter.sessions.v1.SessionService/GetCurrentSession";
    // gRPC-web over HTTP/1.1: hyper alone would take ~400 KB of headers.
    let reply = grpc_web::unary(c.addr, path, &spb::GetCurrentSessionRequest {}, Some(&big)).await;
    assert_eq!(reply.grpc_status.as_deref(), Some("8"), "RESOURCE_EXHAUSTED: {reply:?}");
    let reply = grpc_web::unary(c.addr, path, &spb::GetCurrentSessionRequest {}, Some("small")).await;
    assert_eq!(reply.grpc_status.as_deref(), Some("16"), "a normal request still reaches the service");
    // gRPC over HTTP/2.
    let status =
        c.sessions().get_current_session(natter_testkit::with_token(&big, spb::GetCurrentSessionRequest {})).await;
    assert_ne!(status.map(|_| ()).unwrap_err().code(), Code::Unauthenticated, "refused before authentication");
    c.stop().await;
}

/// A split messages service whose chats dependency accepts connections but
/// never answers (a stopped process): a send fails with DEADLINE_EXCEEDED
/// within `--internal-call-timeout` instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_dependency_fails_the_call_within_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let credential = natter_testkit::write_credential(dir.path());
    let data = dir.path().display().to_string();
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let (sessions_public, sessions_internal) = (bind().await, bind().await);
    let (messages_public, messages_internal) = (bind().await, bind().await);
    // The kernel completes the handshake; nobody ever reads.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sessions_url = format!("http://{}", sessions_internal.local_addr().unwrap());
    let hung_url = format!("http://{}", hung.local_addr().unwrap());
    let common = ["--data-dir", &data, "--service-credential-file", &credential, "--internal-call-timeout", "300ms"];
    let shutdown = CancellationToken::new();
    let sessions = natter_sessions::Config::try_parse_from(["natter-sessions"].iter().chain(&common)).unwrap();
    let sessions_addr = sessions_public.local_addr().unwrap();
    let sessions_task =
        tokio::spawn(natter_sessions::run(sessions, sessions_public, sessions_internal, shutdown.clone()));
    let messages = natter_messages::Config::try_parse_from(
        ["natter-messages", "--sessions-url", &sessions_url, "--chats-url", &hung_url].iter().chain(&common),
    )
    .unwrap();
    let messages_addr = messages_public.local_addr().unwrap();
    let messages_task =
        tokio::spawn(natter_messages::run(messages, messages_public, messages_internal, shutdown.clone()));

    let sessions_channel = connect_when_ready(sessions_addr).await;
    let guest = spb::session_service_client::SessionServiceClient::new(sessions_channel)
        .create_session(spb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let user = natter_testkit::TestUser {
        id: guest.user.unwrap().id,
        username: String::new(),
        token: guest.token,
        session_id: guest.session.unwrap().id,
    };
    let mut messages_client =
        mpb::message_service_client::MessageServiceClient::new(connect_when_ready(messages_addr).await);
    let send =
        mpb::SendMessageRequest { chat_id: uuid::Uuid::now_v7().to_string(), text: "hi".into(), ..Default::default() };
    let status = tokio::time::timeout(GUARD, messages_client.send_message(authed(&user, send)))
        .await
        .expect("the call ends instead of hanging")
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // Named, but not by its address: an internal address is no business of
    // a caller outside.
    assert!(status.message().contains("the chats service"), "names the dependency: {status:?}");
    assert!(!status.message().contains(&hung_url), "no internal address: {status:?}");
    drop(hung);
    shutdown.cancel();
    sessions_task.await.unwrap().unwrap();
    messages_task.await.unwrap().unwrap();
}

async fn connect_when_ready(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for _ in 0..400 {
        let check = health.check(tonic_health::pb::HealthCheckRequest::default()).await;
        if check.is_ok_and(|r| r.get_ref().status == 1) {
            return channel;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{addr} did not become healthy");
}

/// The edge in front of an upstream that sends one event of a stream and
/// then fails (its connection reset, as when a replica is killed): the
/// client sees the event, then UNAVAILABLE ("reconnect and resume"), not
/// INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_reports_an_upstream_failing_mid_stream_as_unavailable() {
    let crash = std::sync::Arc::new(tokio::sync::Notify::new());
    let (mut stream, shutdown, edge) = a_stream_through_the_edge(crash.clone(), &[]).await;
    let first = tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap().expect("one event");
    assert_eq!(first.chat_id, "before-the-crash");
    crash.notify_waiters();
    let failure = tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap_err();
    assert_eq!(failure.code(), Code::Unavailable, "{failure:?}");
    shutdown.cancel();
    edge.await.unwrap();
}

/// A TCP relay on a listener of its own to `upstream`: it copies both
/// ways until `freeze` is cancelled, then copies nothing more and keeps
/// its sockets open, as a replica lost without a word (its node down, a
/// partition) looks to the edge.
async fn freezing_relay(upstream: std::net::SocketAddr, freeze: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let freeze = freeze.clone();
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect(upstream).await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    () = freeze.cancelled() => {
                        // Held open, silent, until the test ends.
                        std::future::pending::<()>().await;
                    }
                }
            });
        }
    });
    url
}

/// The edge pings its upstream connections (at its own
/// --http2-keepalive-interval, here 200 ms): a replica that goes silent
/// mid-stream, its connection neither closed nor reset, ends the client's
/// stream with UNAVAILABLE once a ping goes unanswered. Before, the stream
/// waited for ever (the edge's client had no keepalive), while the
/// client's own pings, which the edge answers, told it all was well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_gone_silent_ends_the_edge_s_streams_with_unavailable() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    tokio::spawn(serve_failing_stream(upstream, std::sync::Arc::new(tokio::sync::Notify::new())));
    let freeze = CancellationToken::new();
    let relay = freezing_relay(upstream_addr, freeze.clone()).await;
    let flags = ["--http2-keepalive-interval", "200ms", "--http2-keepalive-timeout", "200ms"];
    let (channel, shutdown, edge) = edge_before(&relay, &flags).await;
    let mut client = mpb::message_service_client::MessageServiceClient::new(channel);
    let open = client.stream_events(natter_testkit::with_token(STAND_IN_TOKEN, mpb::StreamEventsRequest::default()));
    let mut stream = tokio::time::timeout(GUARD, open).await.unwrap().expect("the stream starts").into_inner();
    let first = tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap().expect("one event");
    assert_eq!(first.chat_id, "before-the-crash");
    freeze.cancel();
    let failure = tokio::time::timeout(GUARD, stream.message()).await.expect("the stream ends").unwrap_err();
    assert_eq!(failure.code(), Code::Unavailable, "{failure:?}");
    shutdown.cancel();
    edge.await.unwrap();
}

/// A StreamEvents stream through the edge (with `flags`) to an upstream
/// that sends one event, then fails when `crash` is told; the edge's
/// shutdown token and task.
async fn a_stream_through_the_edge(
    crash: std::sync::Arc<tokio::sync::Notify>,
    flags: &[&str],
) -> (tonic::Streaming<mpb::StreamEventsResponse>, CancellationToken, tokio::task::JoinHandle<()>) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    tokio::spawn(serve_failing_stream(upstream, crash));
    let (channel, shutdown, edge) = edge_before(&upstream_url, flags).await;
    let mut client = mpb::message_service_client::MessageServiceClient::new(channel);
    let open = client.stream_events(natter_testkit::with_token(STAND_IN_TOKEN, mpb::StreamEventsRequest::default()));
    let stream = tokio::time::timeout(GUARD, open).await.unwrap().expect("the stream starts").into_inner();
    (stream, shutdown, edge)
}

/// The edge shutting down ends the streams it carries at once with
/// UNAVAILABLE ("reconnect and resume"), as a replica does, rather than
/// holding them for its shutdown grace and then cutting them mid-message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_shutting_down_ends_its_streams_with_unavailable() {
    // An upstream whose stream sends one event and never fails nor ends;
    // a grace longer than the guard: a stream held for it fails the test.
    let never = std::sync::Arc::new(tokio::sync::Notify::new());
    let (mut stream, shutdown, edge) = a_stream_through_the_edge(never, &["--shutdown-grace", "60s"]).await;
    tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap().expect("one event");
    shutdown.cancel();
    let end = tokio::time::timeout(GUARD, stream.message()).await.expect("ended within the guard").unwrap_err();
    assert_eq!((end.code(), end.message()), (Code::Unavailable, "server shutting down; reconnect and resume"));
    tokio::time::timeout(GUARD, edge).await.expect("the edge stops").unwrap();
}

/// A replica caps the streams of a connection (SETTINGS_MAX_CONCURRENT_STREAMS)
/// and a live stream holds its place: the edge opens more connections when
/// its own are full, so streams beyond connections x cap still start (they
/// used to wait, and every call after them with them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_a_replicas_per_connection_cap_still_start() {
    const CAP: u32 = 2;
    const STREAMS: usize = 9;
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let held = std::sync::Arc::new(Held::default());
    tokio::spawn(serve_held_streams(upstream, CAP, held.clone()));
    let cap = CAP.to_string();
    let (channel, shutdown, edge) =
        edge_before(&upstream_url, &["--upstream-connections", "1", "--upstream-calls-per-connection", &cap]).await;
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut client = mpb::message_service_client::MessageServiceClient::new(channel.clone());
        let open =
            client.stream_events(natter_testkit::with_token(STAND_IN_TOKEN, mpb::StreamEventsRequest::default()));
        let mut stream = tokio::time::timeout(GUARD, open)
            .await
            .unwrap_or_else(|_| panic!("stream {i} did not start"))
            .expect("the stream starts")
            .into_inner();
        let first = tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap().expect("one event");
        assert_eq!(first.chat_id, "held", "stream {i}");
        streams.push(stream);
    }
    let opened = held.connections.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(opened, STREAMS.div_ceil(CAP as usize), "connections carrying {STREAMS} streams");
    // Streams that end give their places back (the edge drops them, which
    // the upstream sees): as many again fit on the same connections.
    drop(streams);
    let mut live = held.live.subscribe();
    tokio::time::timeout(GUARD, live.wait_for(|n| *n == 0)).await.unwrap().unwrap();
    let mut again = Vec::new();
    for _ in 0..STREAMS {
        let mut client = mpb::message_service_client::MessageServiceClient::new(channel.clone());
        let open =
            client.stream_events(natter_testkit::with_token(STAND_IN_TOKEN, mpb::StreamEventsRequest::default()));
        let mut stream = tokio::time::timeout(GUARD, open).await.unwrap().expect("the stream starts").into_inner();
        tokio::time::timeout(GUARD, stream.message()).await.unwrap().unwrap().expect("one event");
        again.push(stream);
    }
    assert_eq!(held.connections.load(std::sync::atomic::Ordering::SeqCst), opened, "no more connections");
    shutdown.cancel();
    drop(again);
    edge.await.unwrap();
}

/// What [`serve_held_streams`] saw.
#[derive(Default)]
struct Held {
    /// Connections that carried StreamEvents calls (not the edge's health
    /// checks).
    connections: std::sync::atomic::AtomicUsize,
    /// StreamEvents calls open now.
    live: tokio::sync::watch::Sender<usize>,
}

/// Counts a held stream until its body is dropped (the edge let it go).
struct Live(std::sync::Arc<Held>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n -= 1);
    }
}

/// A stand-in upstream speaking gRPC over HTTP/2 that allows `cap` streams
/// a connection (as natter's `--max-concurrent-streams` does) and answers
/// every call with one StreamEventsResponse, then holds it open.
async fn serve_held_streams(listener: TcpListener, cap: u32, held: std::sync::Arc<Held>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let held = held.clone();
        let counted = std::sync::atomic::AtomicBool::new(false);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let streams = request.uri().path().ends_with("/StreamEvents");
                if streams && !counted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    held.connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let live = streams.then(|| {
                    held.live.send_modify(|n| *n += 1);
                    Live(held.clone())
                });
                async move {
                    let first = futures::stream::iter([Ok::<_, std::io::Error>(event_frame("held"))]);
                    let open = futures::stream::poll_fn(move |_| {
                        let _live = &live;
                        std::task::Poll::Pending
                    });
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(http_body_util::StreamBody::new(futures::StreamExt::chain(first, open)))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .max_concurrent_streams(cap)
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Through the edge, streams whose client never reads, while the upstream
/// has megabytes for each (a chat receiving a burst of messages), hold no
/// more than their own flow-control windows on the upstream connection they
/// share with other users' calls: a call on that connection still answers.
/// (With hyper's default windows, 2 MiB a stream and 5 MiB a connection,
/// three such streams exhausted the connection's window, and every call on
/// it hung after its response headers, beyond the request timeout's reach.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_nobody_reads_do_not_stall_other_calls_on_their_upstream_connection() {
    /// Calls on one upstream connection: the stalled streams take all
    /// places but the one the unary call needs, so the test holds at the
    /// edge of the connection's budget, not far inside it.
    const CALLS: usize = 8;
    /// Bytes of events the upstream has for each stream: more than any
    /// window, so only flow control stops it.
    const FLOOD: usize = 3 * 1024 * 1024;
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let event = event_frame(&"x".repeat(64 * 1024)).into_data().unwrap();
    let flood = Bytes::from(event.repeat(FLOOD.div_ceil(event.len())));
    let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(serve_floods(upstream, flood, connections.clone(), Default::default()));
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = edge_listener.local_addr().unwrap();
    let calls = CALLS.to_string();
    let (shutdown, edge) = edge_on(
        edge_listener,
        &upstream_url,
        &["--upstream-connections", "1", "--upstream-calls-per-connection", &calls],
    );

    // A client that never reads: h2 gives a stream's capacity back only
    // when the application releases it, which this one never does.
    let mut stalled_client = h2_connect(edge_addr).await;
    let mut stalled = Vec::new();
    for i in 0..CALLS - 1 {
        stalled_client = stalled_client.ready().await.unwrap();
        let mut request = grpc_request(edge_addr, "/natter.messages.v1.MessageService/StreamEvents");
        let bearer = format!("Bearer {STAND_IN_TOKEN}").parse().unwrap();
        request.headers_mut().insert(http::header::AUTHORIZATION, bearer);
        let (response, _) = stalled_client.send_request(request, true).unwrap();
        let response =
            tokio::time::timeout(GUARD, response).await.unwrap_or_else(|_| panic!("stream {i} did not start")).unwrap();
        assert_eq!(response.status(), http::StatusCode::OK, "stream {i}");
        // Held, never polled: its events wait in the edge and the upstream.
        stalled.push(response);
    }

    // Another user, on a connection of their own to the edge, whose call
    // the edge puts on the same upstream connection.
    let mut other = mpb::message_service_client::MessageServiceClient::new(connect(edge_addr).await);
    let call = other.get_message(natter_testkit::with_token(STAND_IN_TOKEN, mpb::GetMessageRequest::default()));
    let answer = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .expect("a call sharing an upstream connection with unread streams answers within 5 s");
    assert_eq!(answer.unwrap().into_inner(), mpb::GetMessageResponse::default());
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the streams and the call shared one upstream connection"
    );
    drop((stalled, stalled_client));
    shutdown.cancel();
    edge.await.unwrap();
}

/// The slow-consumer rule at the edge: a client that stops reading a
/// stream (and still answers PINGs) has it reset once its answer waited
/// `--max-unread-answer-time` (CANCELLED; StreamEvents resumes when called
/// again), and the edge lets go of the stream to the replica too, so the
/// replica's call ends and the upstream connection's window it held is
/// free. Before, the edge held the stream, 256 KiB of the replica's
/// answer, and the replica's call, until the client's connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_nobody_reads_through_the_edge_is_reset_and_let_go_upstream() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let event = event_frame(&"x".repeat(64 * 1024)).into_data().unwrap();
    let flood = Bytes::from(event.repeat(16));
    let held = std::sync::Arc::new(Held::default());
    tokio::spawn(serve_floods(upstream, flood, Default::default(), held.clone()));
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = edge_listener.local_addr().unwrap();
    let (shutdown, edge) = edge_on(edge_listener, &upstream_url, &["--max-unread-answer-time", "300ms"]);

    // A client that takes its frames off the connection (its task answers
    // PINGs) but never gives their window back.
    let mut client = h2_connect(edge_addr).await.ready().await.unwrap();
    let mut request = grpc_request(edge_addr, "/natter.messages.v1.MessageService/StreamEvents");
    request.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {STAND_IN_TOKEN}").parse().unwrap());
    let (response, _) = client.send_request(request, true).unwrap();
    let response = tokio::time::timeout(GUARD, response).await.expect("the stream started").unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    let mut body = response.into_body();
    let reset = tokio::time::timeout(GUARD, async {
        loop {
            match body.data().await {
                Some(Ok(_)) => {}
                Some(Err(reset)) => break reset,
                None => panic!("the stream ended whole"),
            }
        }
    })
    .await
    .expect("the edge did not reset the stream nobody reads");
    assert_eq!(reset.reason(), Some(h2::Reason::CANCEL), "reset by the edge: {reset:?}");
    let mut live = held.live.subscribe();
    tokio::time::timeout(GUARD, live.wait_for(|&live| live == 0))
        .await
        .expect("the edge held its stream to the replica after the client's was reset")
        .unwrap();
    drop(client);
    shutdown.cancel();
    edge.await.unwrap();
}

/// A stand-in upstream speaking gRPC over HTTP/2: a StreamEvents call gets
/// `flood` (gRPC frames of events) at once and then stays open, counted in
/// `held.live` until its body is dropped; any other call an empty message
/// (every field at its default) and status OK. Counts the connections that
/// carried calls of the messages service (the edge's health checks come on
/// a connection of their own).
async fn serve_floods(
    listener: TcpListener,
    flood: Bytes,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    held: std::sync::Arc<Held>,
) {
    use futures::StreamExt as _;
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let (flood, connections, held) = (flood.clone(), connections.clone(), held.clone());
        let counted = std::sync::atomic::AtomicBool::new(false);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let path = request.uri().path();
                if path.starts_with("/natter.messages.v1.MessageService/")
                    && !counted.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let frames = if path.ends_with("/StreamEvents") {
                    let events = http_body::Frame::data(flood.clone());
                    held.live.send_modify(|n| *n += 1);
                    let live = Live(held.clone());
                    let open = futures::stream::poll_fn(move |_| {
                        let _live = &live;
                        std::task::Poll::Pending
                    });
                    futures::stream::iter([Ok::<_, std::io::Error>(events)]).chain(open).boxed()
                } else {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    // An empty message: a flag byte and a zero length.
                    let message = http_body::Frame::data(Bytes::from_static(&[0; 5]));
                    futures::stream::iter([Ok(message), Ok(http_body::Frame::trailers(trailers))]).boxed()
                };
                async move { Ok::<_, Infallible>(grpc_response(frames)) }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
    }
}

/// The edge, with every service at `upstream_url` and `more` flags, and a
/// channel to it.
async fn edge_before(
    upstream_url: &str,
    more: &[&str],
) -> (tonic::transport::Channel, CancellationToken, tokio::task::JoinHandle<()>) {
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = edge_listener.local_addr().unwrap();
    let (shutdown, edge) = edge_on(edge_listener, upstream_url, more);
    (connect(edge_addr).await, shutdown, edge)
}

/// The edge serving on `listener`, with every service at `upstream_url`
/// and `more` flags, until the token is cancelled.
fn edge_on(
    listener: TcpListener,
    upstream_url: &str,
    more: &[&str],
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let urls = ["--sessions-url", upstream_url, "--chats-url", upstream_url, "--messages-url", upstream_url];
    let args =
        natter_edge::EdgeArgs::try_parse_from(std::iter::once("natter-edge").chain(urls).chain(more.iter().copied()))
            .unwrap();
    let shutdown = CancellationToken::new();
    let run = natter_edge::run(args, listener, shutdown.clone());
    let edge = tokio::spawn(async move { run.await.expect("the edge ends cleanly") });
    (shutdown, edge)
}

/// A channel (one HTTP/2 connection) to `addr`.
async fn connect(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// A StreamEventsResponse of `chat_id` as a gRPC message frame ("gRPC over
/// HTTP/2", Length-Prefixed-Message: a flag byte, a 4-byte big-endian
/// length, the message).
fn event_frame(chat_id: &str) -> http_body::Frame<Bytes> {
    let payload = mpb::StreamEventsResponse { chat_id: chat_id.into(), ..Default::default() }.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    http_body::Frame::data(Bytes::from(frame))
}

/// A stand-in upstream speaking gRPC over HTTP/2: every call gets one
/// StreamEventsResponse, then, once `crash` is notified, the response body
/// fails, so hyper resets the stream mid-response.
async fn serve_failing_stream(listener: TcpListener, crash: std::sync::Arc<tokio::sync::Notify>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let crash = crash.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request: http::Request<hyper::body::Incoming>| {
                let crash = crash.clone();
                async move {
                    let first = futures::stream::iter([Ok::<_, std::io::Error>(event_frame("before-the-crash"))]);
                    let failure = futures::stream::once(async move {
                        crash.notified().await;
                        Err(std::io::Error::other("replica killed"))
                    });
                    Ok::<_, Infallible>(grpc_response(futures::StreamExt::chain(first, failure)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
    }
}

/// A gRPC response of a stand-in upstream whose body is `frames`.
fn grpc_response<S>(frames: S) -> http::Response<http_body_util::StreamBody<S>> {
    http::Response::builder()
        .header("content-type", "application/grpc")
        .body(http_body_util::StreamBody::new(frames))
        .unwrap()
}

/// The `--handshake-timeout` of the connection tests: short, so a test
/// waits little, and long against a loaded machine's scheduling.
const HANDSHAKE: Duration = Duration::from_millis(300);

/// Reads (and drops) what the server sends until it closes the connection
/// (EOF, or an error such as a reset).
async fn until_closed(read: &mut (impl tokio::io::AsyncRead + Unpin)) {
    use tokio::io::AsyncReadExt as _;
    let mut buf = [0u8; 1024];
    while read.read(&mut buf).await.is_ok_and(|n| n > 0) {}
}

/// A TCP connection that never sends a byte (`nc host port`) is closed by
/// the server at the handshake timeout; it was held until
/// --max-connection-age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_at_the_handshake_timeout() {
    let c = Cluster::all_in_one(&["--handshake-timeout", "300ms"]).await;
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(c.addr).await.unwrap();
    tokio::time::timeout(GUARD, until_closed(&mut silent)).await.expect("the server closes a silent connection");
    assert!(started.elapsed() >= HANDSHAKE, "closed at {:?}, before the timeout", started.elapsed());
    c.stop().await;
}

/// Connections that keep sending a byte every sixth of the handshake
/// timeout but never complete a request are closed at the timeout all the
/// same: an HTTP/1.1 request head that never ends, and an HTTP/2
/// connection past its preface and SETTINGS that sends only PINGs (each
/// answered), never a HEADERS frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_drips_bytes_but_no_request_is_closed_at_the_handshake_timeout() {
    let c = Cluster::all_in_one(&["--handshake-timeout", "300ms"]).await;
    let http1_head = b"POST /grpc.health.v1.Health/Check HTTP/1.1\r\nhost: natter\r\n".to_vec();
    let http1_drip = b"x-drip: ".iter().copied().chain(std::iter::repeat(b'a'));
    // The connection preface, an empty SETTINGS frame (RFC 9113 3.4, 6.5);
    // then PING frames: length 8, type 6, no flags, stream 0, 8 bytes.
    let http2_start = [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let http2_drip = ping.into_iter().cycle();
    let (http1, http2) = tokio::join!(
        drip_until_closed(c.addr, http1_head, http1_drip),
        drip_until_closed(c.addr, http2_start, http2_drip)
    );
    let wrong: Vec<String> = [("HTTP/1.1", http1), ("HTTP/2", http2)]
        .into_iter()
        .filter_map(|(what, closed_at)| match closed_at {
            None => Some(format!("{what}: still open after {GUARD:?}")),
            Some(at) if at < HANDSHAKE => Some(format!("{what}: closed at {at:?}, before the timeout")),
            Some(_) => None,
        })
        .collect();
    assert!(wrong.is_empty(), "{wrong:?}");
    c.stop().await;
}

/// Connects to `addr`, sends `start`, then one byte of `drip` every sixth of
/// [`HANDSHAKE`] until the server closes the connection; how long after
/// connecting it did, or `None` if it had not within [`GUARD`].
async fn drip_until_closed(
    addr: std::net::SocketAddr,
    start: Vec<u8>,
    drip: impl Iterator<Item = u8>,
) -> Option<Duration> {
    use tokio::io::AsyncWriteExt as _;
    let started = std::time::Instant::now();
    let (mut read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
    let send = async move {
        write.write_all(&start).await?;
        for byte in drip {
            tokio::time::sleep(HANDSHAKE / 6).await;
            write.write_all(&[byte]).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    // A write that fails (the server reset the connection) ends it too.
    let closed = async {
        tokio::select! {
            () = until_closed(&mut read) => {}
            _ = send => {}
        }
    };
    tokio::time::timeout(GUARD, closed).await.ok().map(|()| started.elapsed())
}

/// A gRPC client whose connection made a call and then stays idle for five
/// times the handshake timeout calls again on that same connection (its
/// connector connects once only, so a closed connection would fail the
/// call): the timeout ends with a connection's first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_after_a_call_is_kept_past_the_handshake_timeout() {
    let c = Cluster::all_in_one(&["--handshake-timeout", "300ms"]).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(connect_once(c.addr).await);
    let check = || tonic_health::pb::HealthCheckRequest::default();
    let first = tokio::time::timeout(GUARD, health.check(check())).await.unwrap().expect("the first call");
    assert_eq!(first.get_ref().status, 1, "SERVING");
    tokio::time::sleep(HANDSHAKE * 5).await;
    let again =
        tokio::time::timeout(GUARD, health.check(check())).await.unwrap().expect("a call on the same connection");
    assert_eq!(again.get_ref().status, 1, "SERVING");
    c.stop().await;
}

/// The `--max-connection-idle` of the idle tests.
const IDLE: Duration = Duration::from_millis(300);

/// An HTTP/2 connection to `addr` (h2 crate) and its task, which ends when
/// the connection closes.
async fn h2_connect_watched(
    addr: std::net::SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    h2_watched(TcpStream::connect(addr).await.unwrap()).await
}

/// An HTTP/2 connection (h2 crate) over `tcp` and its task, which ends when
/// the connection closes.
async fn h2_watched(
    tcp: TcpStream,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<Result<(), h2::Error>>) {
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    (send, tokio::spawn(connection))
}

/// Starts a grpc.health.v1 call (`Check` or `Watch`, which needs no
/// token) for the whole server on `send`, its request sent whole; its
/// response's headers.
async fn health_call(
    send: &mut h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
    method: &str,
) -> http::Response<h2::RecvStream> {
    let mut send = send.clone().ready().await.unwrap();
    let path = format!("/grpc.health.v1.Health/{method}");
    let (response, mut body) = send.send_request(grpc_request(addr, &path), false).unwrap();
    // An empty HealthCheckRequest: the gRPC message prefix, length 0.
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).unwrap();
    tokio::time::timeout(GUARD, response).await.expect("the server answers").unwrap()
}

/// A connection whose calls all ended is closed once it has had none in
/// flight for --max-connection-idle (it was held until
/// --max-connection-age: an hour, room for a client to hold many).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_calls_is_closed_at_max_connection_idle() {
    let c = Cluster::all_in_one(&["--max-connection-idle", "300ms"]).await;
    let (mut send, closed) = h2_connect_watched(c.addr).await;
    let started = std::time::Instant::now();
    let mut body = health_call(&mut send, c.addr, "Check").await.into_body();
    while let Some(data) = body.data().await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.to_str().unwrap()), Some("0"), "{trailers:?}");

    let _ = tokio::time::timeout(GUARD, closed).await.expect("the server closes a connection idle past the limit");
    assert!(started.elapsed() >= IDLE, "closed at {:?}, before the idle timeout", started.elapsed());
    c.stop().await;
}

/// A connection with a stream open is not idle however long nothing moves
/// on it (a StreamEvents in a quiet chat): kept for five times
/// --max-connection-idle, then closed once the stream ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_with_a_stream_open_is_not_idle() {
    let c = Cluster::all_in_one(&["--max-connection-idle", "300ms"]).await;
    let (mut send, mut closed) = h2_connect_watched(c.addr).await;
    let mut watch = health_call(&mut send, c.addr, "Watch").await.into_body();
    let first = tokio::time::timeout(GUARD, watch.data()).await.expect("the current status");
    first.expect("a message").unwrap();

    let early = tokio::time::timeout(IDLE * 5, &mut closed).await;
    assert!(early.is_err(), "closed with a stream open: {early:?}");

    // Dropping the stream's receiving half cancels it (RST_STREAM).
    drop(watch);
    let _ = tokio::time::timeout(GUARD, closed).await.expect("closed once its stream ended and it idled");
    drop(send);
    c.stop().await;
}

/// A channel over a single TCP connection to `addr` (connected now; the
/// HTTP/2 handshake comes with the first call): the channel cannot
/// reconnect, so a call fails once the server closed it.
async fn connect_once(addr: std::net::SocketAddr) -> tonic::transport::Channel {
    let tcp = std::sync::Mutex::new(Some(TcpStream::connect(addr).await.unwrap()));
    let connector = tower::service_fn(move |_: http::Uri| {
        let tcp = tcp.lock().unwrap().take();
        async move { tcp.map(hyper_util::rt::TokioIo::new).ok_or_else(|| std::io::Error::other("connects once only")) }
    });
    tonic::transport::Endpoint::from_static("http://natter.test").connect_with_connector_lazy(connector)
}

/// With --max-connections 2 and two connections open (the test's own
/// channel, which made calls, and a silent TCP connection), the listener
/// takes no third: a call on a new connection gets no answer for a second,
/// while calls on the open channel go on; once the silent connection
/// closes, that waiting call is answered (the listener took the waiting
/// connection from its queue), and the next calls on it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_connections_wait_until_one_closes() {
    let c = Cluster::all_in_one(&["--max-connections", "2", "--handshake-timeout", "60s"]).await;
    let check = || tonic_health::pb::HealthCheckRequest::default();
    let mut open = tonic_health::pb::health_client::HealthClient::new(c.channel());
    tokio::time::timeout(GUARD, open.check(check())).await.unwrap().expect("the first connection is served");
    let held = TcpStream::connect(c.addr).await.unwrap();

    let mut third = tonic_health::pb::health_client::HealthClient::new(connect_once(c.addr).await);
    let mut waiting = Box::pin(third.check(check()));
    let early = tokio::time::timeout(Duration::from_secs(1), &mut waiting).await;
    assert!(early.is_err(), "a third connection was served at the cap of two: {early:?}");
    let on_open = tokio::time::timeout(GUARD, open.check(check())).await.unwrap();
    assert_eq!(on_open.expect("an open connection goes on at the cap").get_ref().status, 1);

    drop(held);
    let answered = tokio::time::timeout(GUARD, waiting).await.expect("served once a connection closed");
    assert_eq!(answered.expect("the waiting call").get_ref().status, 1, "SERVING");
    let again = tokio::time::timeout(GUARD, third.check(check())).await.unwrap();
    assert_eq!(again.expect("the next call on that connection").get_ref().status, 1);
    c.stop().await;
}

/// A TCP connection to `addr` from the loopback address `from` (127.0.0.x:
/// Linux routes all of 127/8 to loopback), as another host's would be.
async fn connect_from(from: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether a health Check on a new connection from `from` is answered (a
/// connection closed at accept is not).
async fn health_from(from: [u8; 4], addr: std::net::SocketAddr) -> bool {
    let tcp = connect_from(from, addr).await;
    let Ok((send, connection)) = h2::client::handshake(tcp).await else { return false };
    tokio::spawn(connection);
    let Ok(mut send) = send.ready().await else { return false };
    let (response, mut body) = match send.send_request(grpc_request(addr, "/grpc.health.v1.Health/Check"), false) {
        Ok(sent) => sent,
        Err(_) => return false,
    };
    if body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true).is_err() {
        return false;
    }
    let Ok(response) = response.await else { return false };
    matches!(response.into_body().data().await, Some(Ok(_)))
}

/// With --max-connections-per-address 2, a host holding two connections
/// (silent ones, as a flood's) has its third closed at once, while another
/// host is served; once one of the two closes, the first host connects
/// again. Before, one host could take every place of --max-connections
/// with health Watches, which need no token and never end, and everyone
/// else waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_connections() {
    let c = Cluster::all_in_one(&["--max-connections-per-address", "2", "--handshake-timeout", "60s"]).await;
    let flooder = [127, 0, 0, 2];
    let first = connect_from(flooder, c.addr).await;
    let _second = connect_from(flooder, c.addr).await;
    let mut third = connect_from(flooder, c.addr).await;
    tokio::time::timeout(GUARD, until_closed(&mut third)).await.expect("the third connection is closed at once");
    assert!(!health_from(flooder, c.addr).await, "nor is a fourth served");
    assert!(health_from([127, 0, 0, 3], c.addr).await, "another host is served");

    // A place given back (once the server has seen the close) is the
    // flooder's again.
    drop(first);
    tokio::time::timeout(GUARD, async {
        while !health_from(flooder, c.addr).await {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("served once one of its two closed");
    c.stop().await;
}

/// The edge holds at most `--max-buffered-request-bytes` of requests at
/// once, all clients together: with one request held by a slow replica, a
/// second that would go past it is refused at once, RESOURCE_EXHAUSTED
/// "server busy" with a RetryInfo, and counted; once the first is given up
/// (its client went away) its bytes are free again, and once a call is
/// answered, too. (Without the budget, every client could make the edge
/// hold a megabyte per call for as long as the replica was slow.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_requests_past_its_budget_of_buffered_bytes() {
    let _counting = BUDGET_REFUSALS_COUNTED.lock().await;
    let (upstream_url, slow) = slow_upstream().await;
    let (channel, shutdown, edge) = edge_before(&upstream_url, &["--max-buffered-request-bytes", "3000"]).await;
    let send = || {
        let mut client = mpb::message_service_client::MessageServiceClient::new(channel.clone());
        let request = mpb::SendMessageRequest { text: "x".repeat(2000), ..Default::default() };
        async move { client.send_message(natter_testkit::with_token(STAND_IN_TOKEN, request)).await }
    };
    let mut waiting = slow.waiting.subscribe();

    // The first call's 2 KB wait at the edge for the slow replica.
    let first = tokio::spawn(send());
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 1)).await.unwrap().unwrap();
    let refusals = budget_refusals();
    let refused = tokio::time::timeout(GUARD, send()).await.expect("refused at once, not queued").unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().starts_with("server busy"), "{refused:?}");
    assert!(crate::retry_delay(&refused) > Duration::ZERO);
    assert_eq!(budget_refusals(), refusals + 1.0, "counted in natter_request_budget_refusals_total");

    // Its client gives up: the edge drops the call (the replica sees it go)
    // and its bytes with it.
    first.abort();
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 0)).await.unwrap().unwrap();
    let second = tokio::spawn(send());
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 1)).await.unwrap().unwrap();

    // Answered: its bytes are free again.
    slow.release.send_replace(true);
    tokio::time::timeout(GUARD, second).await.unwrap().unwrap().expect("answered");
    for _ in 0..3 {
        tokio::time::timeout(GUARD, send()).await.unwrap().expect("room again");
    }
    shutdown.cancel();
    edge.await.unwrap();
}

/// The all-in-one server, as every public natter server, holds at most
/// `--max-buffered-request-bytes` of request bodies at once, all clients
/// together. A guest's slow senders, each on a stream of its own (two
/// connections of two), send 10 KB of a 20 KB SendMessage and no more: the
/// budget of 35 KB holds three of them, and the fourth is refused at once,
/// RESOURCE_EXHAUSTED "server busy", as is a call that would go past what
/// is left, while a small call is answered. Once the slow clients go away
/// (their connections dropped mid-body), a call of 30 KB is answered.
/// (Before, the server read every message of every stream into memory as
/// it came, up to --max-request-bytes each: 1 MiB a stream, 128 streams a
/// connection, with no limit all together.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_fill_the_server_s_budget_of_request_bytes_until_they_go() {
    let _counting = BUDGET_REFUSALS_COUNTED.lock().await;
    let c = Cluster::all_in_one(&["--max-buffered-request-bytes", "35000", "--request-timeout", "60s"]).await;
    let (mallory, bob) = (c.guest().await, c.guest().await);
    let chat = crate::chats::direct(&c, &bob, &mallory).await;
    let refusals = budget_refusals();

    let mut connections = Vec::new();
    let mut bodies = Vec::new();
    let mut responses = Vec::new();
    for _ in 0..2 {
        let (send, connection) = h2_connect_watched(c.addr).await;
        connections.push(connection);
        for _ in 0..2 {
            let mut send = send.clone().ready().await.unwrap();
            let mut request = grpc_request(c.addr, "/natter.messages.v1.MessageService/SendMessage");
            let bearer = format!("Bearer {}", mallory.token);
            request.headers_mut().insert(http::header::AUTHORIZATION, bearer.parse().unwrap());
            let (response, mut body) = send.send_request(request, false).unwrap();
            // One DATA frame: the prefix of a 20,000-byte message and the
            // first 9,995 bytes of it; the rest never comes.
            let mut partial = message_prefix(20_000).to_vec();
            partial.resize(10_000, b'x');
            body.send_data(Bytes::from(partial), false).unwrap();
            bodies.push(body);
            responses.push(Box::pin(response));
        }
    }
    let (refused, _, mut held) =
        tokio::time::timeout(GUARD, futures::future::select_all(responses)).await.expect("one is refused at once");
    let refused = refused.unwrap();
    let header = |name| refused.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header("grpc-status").as_deref(), Some("8"), "RESOURCE_EXHAUSTED: {refused:?}");
    assert!(header("grpc-message").unwrap().starts_with("server%20busy"), "{refused:?}");
    assert_eq!(budget_refusals(), refusals + 1.0, "counted in natter_request_budget_refusals_total");
    // The other three are held: still waiting for their bodies.
    for response in &mut held {
        assert!(futures::FutureExt::now_or_never(response).is_none(), "held, not answered");
    }

    // 5 KB are left: a call of 9 KB is refused, one of a few bytes answered.
    let send = |text: String| {
        let mut client = c.messages();
        let request = authed(&bob, mpb::SendMessageRequest { chat_id: chat.id.clone(), text, ..Default::default() });
        async move { client.send_message(request).await }
    };
    let busy = tokio::time::timeout(GUARD, send("x".repeat(9_000))).await.expect("at once").unwrap_err();
    assert!(busy.message().starts_with("server busy"), "{busy:?}");
    assert!(crate::retry_delay(&busy) > Duration::ZERO, "RESOURCE_EXHAUSTED with a RetryInfo: {busy:?}");
    assert_eq!(budget_refusals(), refusals + 2.0);
    send("hi".to_owned()).await.expect("a small call is answered");

    // The slow clients go, mid-body: their 30 KB are free again (as soon
    // as the server has seen the connections close).
    for connection in connections {
        connection.abort();
    }
    drop((bodies, held));
    tokio::time::timeout(GUARD, async {
        loop {
            match send("y".repeat(30_000)).await {
                Ok(_) => break,
                Err(busy) if busy.message().starts_with("server busy") => tokio::task::yield_now().await,
                Err(other) => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("the budget is free once the slow clients are gone");
    c.stop().await;
}

/// Held by the tests that count `natter_request_budget_refusals_total`,
/// one process-wide counter, so that none sees another's refusals.
static BUDGET_REFUSALS_COUNTED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `natter_request_budget_refusals_total` of this process (the servers of
/// the tests run in it).
fn budget_refusals() -> f64 {
    natter_kit::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix("natter_request_budget_refusals_total ")?.parse().ok())
        .unwrap_or(0.0)
}

/// What [`serve_slowly`] is doing.
#[derive(Default)]
struct Slow {
    /// Calls waiting for `release` now.
    waiting: tokio::sync::watch::Sender<usize>,
    /// Set: every call is answered at once.
    release: tokio::sync::watch::Sender<bool>,
    /// The headers of the last call of the messages service.
    headers: tokio::sync::watch::Sender<http::HeaderMap>,
}

/// Counts a waiting call until it is answered or dropped (the edge reset
/// its stream).
struct Waiting(std::sync::Arc<Slow>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.send_modify(|n| *n -= 1);
    }
}

/// A [`serve_slowly`] upstream on a port of its own: its URL, and what it
/// is doing.
async fn slow_upstream() -> (String, std::sync::Arc<Slow>) {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let slow = std::sync::Arc::new(Slow::default());
    tokio::spawn(serve_slowly(upstream, slow.clone()));
    (upstream_url, slow)
}

/// A stand-in upstream speaking gRPC over HTTP/2, as a replica under load:
/// a call of the messages service waits until `release` is set, then gets
/// an empty message and OK; health checks are answered at once.
async fn serve_slowly(listener: TcpListener, slow: std::sync::Arc<Slow>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { return };
        let slow = slow.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let slow = slow.clone();
                let held = request.uri().path().starts_with("/natter.messages.v1.MessageService/");
                if held {
                    slow.headers.send_replace(request.headers().clone());
                }
                async move {
                    if held {
                        slow.waiting.send_modify(|n| *n += 1);
                        let _waiting = Waiting(slow.clone());
                        let _ = slow.release.subscribe().wait_for(|released| *released).await;
                    }
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let message = http_body::Frame::data(Bytes::from_static(&[0; 5]));
                    let frames = [Ok::<_, std::io::Error>(message), Ok(http_body::Frame::trailers(trailers))];
                    Ok::<_, Infallible>(grpc_response(futures::stream::iter(frames)))
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, service)
                .await;
        });
    }
}

/// A gRPC-web call whose `grpc-timeout` passes while its replica is still
/// busy ends DEADLINE_EXCEEDED through the edge's layers, with CORS as every
/// other answer: tonic's own answer, from outside them, was CANCELLED
/// without Access-Control-Allow-Origin, which a browser reports as a
/// network error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_ends_a_grpc_web_call_with_deadline_exceeded_and_cors() {
    let (upstream_url, slow) = slow_upstream().await;
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = edge_listener.local_addr().unwrap();
    let (shutdown, edge) = edge_on(edge_listener, &upstream_url, &[]);
    let request = mpb::ListMessagesRequest { chat_id: uuid::Uuid::now_v7().to_string(), ..Default::default() };
    let path = "/natter.messages.v1.MessageService/ListMessages";
    let call = grpc_web::unary_with(edge_addr, path, &request, Some(STAND_IN_TOKEN), &[("grpc-timeout", "300m")]);
    let reply = tokio::time::timeout(GUARD, call).await.expect("answered at the client's deadline");
    assert_eq!(reply.grpc_status.as_deref(), Some("4"), "DEADLINE_EXCEEDED: {reply:?}");
    assert_eq!(reply.allow_origin.as_deref(), Some("*"), "CORS like any answer: {reply:?}");
    // The edge gave the replica's call up (the replica sees its stream reset).
    let mut waiting = slow.waiting.subscribe();
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 0)).await.unwrap().unwrap();
    shutdown.cancel();
    edge.await.unwrap();
}

/// A client's W3C trace context through the edge: its `traceparent` still
/// names the trace the replica's spans join, and its `tracestate` goes on
/// only within the spec's limits (32 members, 512 bytes); a larger one,
/// which anyone may send, is dropped, not carried to every hop and span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_passes_on_a_client_s_tracestate_only_within_w3c_limits() {
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", upstream.local_addr().unwrap());
    let slow = std::sync::Arc::new(Slow::default());
    slow.release.send_replace(true);
    tokio::spawn(serve_slowly(upstream, slow.clone()));
    let (channel, shutdown, edge) = edge_before(&upstream_url, &[]).await;
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    let traceparent = format!("00-{TRACE_ID}-b7ad6b7169203331-01");
    let forwarded = async |tracestate: &str| {
        let mut request = natter_testkit::with_token(STAND_IN_TOKEN, mpb::GetMessageRequest::default());
        request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
        request.metadata_mut().insert("tracestate", tracestate.parse().unwrap());
        let mut client = mpb::message_service_client::MessageServiceClient::new(channel.clone());
        tokio::time::timeout(GUARD, client.get_message(request)).await.unwrap().expect("answered");
        let headers = slow.headers.borrow().clone();
        let parent = headers.get("traceparent").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        assert_eq!(parent.get(3..35), Some(TRACE_ID), "the client's trace: {headers:?}");
        headers.get("tracestate").map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        forwarded("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7").await.as_deref(),
        Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    );
    let many = (0..40).map(|i| format!("k{i}=v")).collect::<Vec<_>>().join(",");
    assert_eq!(forwarded(&many).await, None, "40 members");
    let long = format!("big={}", "v".repeat(250)) + &format!(",bigger={}", "v".repeat(251));
    assert_eq!(forwarded(&long).await, None, "over 512 bytes");
    shutdown.cancel();
    edge.await.unwrap();
}

const REFLECTION_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// A reflection stream on `send` (at `path`, v1 or v1alpha) that asked for
/// the service list and got it, its request body left open for more; or
/// the status it was refused with.
async fn reflection_stream(
    send: &h2::client::SendRequest<Bytes>,
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<(h2::RecvStream, h2::SendStream<Bytes>), tonic::Status> {
    let mut send = send.clone().ready().await.unwrap();
    let (response, mut body) = send.send_request(grpc_request(addr, path), false).unwrap();
    // A refused stream may be closed before these go out.
    let _ = ask_for_services(&mut body);
    let response = tokio::time::timeout(GUARD, response).await.expect("the server answers at once").unwrap();
    // Trailers-only: the call was refused before its service saw it.
    if let Some(refused) = tonic::Status::from_header_map(response.headers()) {
        return Err(refused);
    }
    let mut reply = response.into_body();
    let list = tokio::time::timeout(GUARD, reply.data()).await.expect("the service list").expect("a message");
    assert!(list.unwrap().len() > 5, "a list of services");
    Ok((reply, body))
}

/// Sends reflection's list_services request (field 7, an empty string).
fn ask_for_services(body: &mut h2::SendStream<Bytes>) -> Result<(), h2::Error> {
    body.send_data(message_prefix(2), false)?;
    body.send_data(Bytes::from_static(&[0x3a, 0x00]), false)
}

/// Asserts that `refused` is the tokenless-stream cap's refusal, naming
/// `limit` and `scope` (connection or server).
fn assert_capped(refused: &tonic::Status, limit: usize, scope: &str) {
    use tonic_types::StatusExt as _;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let message = refused.message();
    assert!(message.contains(&format!("{limit} streaming calls")) && message.contains(scope), "{message}");
    assert!(refused.get_details_retry_info().is_some_and(|r| r.retry_delay.is_some()), "a RetryInfo: {refused:?}");
}

/// A client with no token could open 128 reflection streams on one
/// connection, ask each for answers and never read them: the server held
/// about 67 MB a connection. Now the stream over the per-connection cap is
/// refused at once while the others still answer, another connection
/// still gets one, and a stream that ends (a reset mid-stream, or a
/// finished one) gives its place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_streams_without_a_token_are_capped_per_connection_and_freed_however_they_end() {
    use natter_kit::tokenless::STREAMS_PER_CONNECTION;
    let c = Cluster::all_in_one(&["--request-timeout", "60s"]).await;
    let (send, _closed) = h2_connect_watched(c.addr).await;
    let mut open = Vec::new();
    for i in 0..STREAMS_PER_CONNECTION {
        let path = if i == 1 { REFLECTION_V1ALPHA } else { REFLECTION };
        open.push(reflection_stream(&send, c.addr, path).await.expect("under the cap"));
    }
    for path in [REFLECTION, REFLECTION_V1ALPHA] {
        let refused = reflection_stream(&send, c.addr, path).await.expect_err("over the cap");
        assert_capped(&refused, STREAMS_PER_CONNECTION, "connection");
    }

    // The open streams still answer; another connection gets its own.
    let (reply, body) = &mut open[0];
    ask_for_services(body).unwrap();
    let again = tokio::time::timeout(GUARD, reply.data()).await.expect("answered").expect("a message");
    assert!(again.unwrap().len() > 5);
    let (other, _other_closed) = h2_connect_watched(c.addr).await;
    let _another = reflection_stream(&other, c.addr, REFLECTION).await.expect("another connection has its own cap");

    // A client's reset mid-stream gives its place back.
    let (_reply, mut body) = open.remove(0);
    body.send_reset(h2::Reason::CANCEL);
    open.push(
        crate::stream_abuse::wait_for(|| async { reflection_stream(&send, c.addr, REFLECTION).await.ok() }).await,
    );
    // So does a stream its client ends and reads to the end.
    let (mut reply, mut body) = open.remove(0);
    body.send_data(Bytes::new(), true).unwrap();
    while let Some(data) = tokio::time::timeout(GUARD, reply.data()).await.expect("the stream ends") {
        data.unwrap();
    }
    let trailers = reply.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers.get("grpc-status").map(|v| v.to_str().unwrap()), Some("0"), "{trailers:?}");
    let freed =
        crate::stream_abuse::wait_for(|| async { reflection_stream(&send, c.addr, REFLECTION).await.ok() }).await;
    // Streams left open would hold up the server's shutdown for its grace.
    drop((freed, open, _another));
    c.stop().await;
}

/// Across connections, the server holds at most its cap of streams that
/// need no token (reflection and health Watch together): one more is
/// refused on a fresh connection, and answered once a connection holding
/// some has closed. (Each host holds at most its share of the cap: it
/// takes four to fill it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_token_are_capped_per_server_and_freed_when_a_connection_closes() {
    use natter_kit::tokenless::{STREAMS_PER_ADDRESS, STREAMS_PER_CONNECTION, STREAMS_PER_SERVER};
    let c = Cluster::all_in_one(&["--request-timeout", "60s"]).await;
    let full = STREAMS_PER_SERVER / STREAMS_PER_CONNECTION;
    // The host of the `i`th connection: 127.0.0.10 and on, each with its
    // share.
    let host = |i: usize| [127, 0, 0, 10 + u8::try_from(i / (STREAMS_PER_ADDRESS / STREAMS_PER_CONNECTION)).unwrap()];
    let mut connections = Vec::new();
    for i in 0..full - 1 {
        let (send, closed) = h2_watched(connect_from(host(i), c.addr).await).await;
        let mut streams = Vec::new();
        for _ in 0..STREAMS_PER_CONNECTION {
            streams.push(reflection_stream(&send, c.addr, REFLECTION).await.expect("under the caps"));
        }
        connections.push((send, closed, streams));
    }
    // The last connection holds health Watch streams: they count too.
    let (mut watching, watching_closed) = h2_watched(connect_from(host(full - 1), c.addr).await).await;
    let mut watches = Vec::new();
    for _ in 0..STREAMS_PER_CONNECTION {
        let watch = health_call(&mut watching, c.addr, "Watch").await;
        assert_eq!(tonic::Status::from_header_map(watch.headers()).map(|s| s.code()), None, "answered");
        watches.push(watch);
    }

    let (fresh, _fresh_closed) = h2_connect_watched(c.addr).await;
    let refused = reflection_stream(&fresh, c.addr, REFLECTION).await.expect_err("over the server's cap");
    assert_capped(&refused, STREAMS_PER_SERVER, "server");
    let mut fresh_send = fresh.clone();
    let watch = health_call(&mut fresh_send, c.addr, "Watch").await;
    assert_capped(&tonic::Status::from_header_map(watch.headers()).expect("refused"), STREAMS_PER_SERVER, "server");

    // A connection that closes gives its streams' places back.
    let (send, connection, streams) = connections.pop().unwrap();
    drop((send, streams));
    let _ = tokio::time::timeout(GUARD, connection).await.expect("the client's side of the connection closes");
    let freed =
        crate::stream_abuse::wait_for(|| async { reflection_stream(&fresh, c.addr, REFLECTION).await.ok() }).await;
    // Streams left open would hold up the server's shutdown for its grace.
    drop((freed, watching, watching_closed, watches, connections));
    c.stop().await;
}

/// One host could hold every one of the server's streams that need no
/// token, 16 connections of 4 reflection streams, and keep everyone else's
/// reflection and health Watch out for as long as it liked. Now a host
/// holds at most its share (a quarter): past it, its next stream is refused
/// at once, on a fresh connection too, and counted
/// (`natter_tokenless_stream_refusals_total{limit="address"}`), while
/// another host's is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_streams_without_a_token() {
    use natter_kit::tokenless::{STREAMS_PER_ADDRESS, STREAMS_PER_CONNECTION};
    let c = Cluster::all_in_one(&["--request-timeout", "60s"]).await;
    let flooder = [127, 0, 0, 2];
    let mut held = Vec::new();
    for _ in 0..STREAMS_PER_ADDRESS / STREAMS_PER_CONNECTION {
        let (send, closed) = h2_watched(connect_from(flooder, c.addr).await).await;
        let mut streams = Vec::new();
        for _ in 0..STREAMS_PER_CONNECTION {
            streams.push(reflection_stream(&send, c.addr, REFLECTION).await.expect("within its share"));
        }
        held.push((send, closed, streams));
    }
    let refusals = tokenless_refusals("address");
    let (fresh, _fresh_closed) = h2_watched(connect_from(flooder, c.addr).await).await;
    let refused = reflection_stream(&fresh, c.addr, REFLECTION).await.expect_err("past its share");
    assert_capped(&refused, STREAMS_PER_ADDRESS, "address");
    assert_eq!(tokenless_refusals("address"), refusals + 1.0, "counted");

    let (other, _other_closed) = h2_watched(connect_from([127, 0, 0, 3], c.addr).await).await;
    let answered = reflection_stream(&other, c.addr, REFLECTION).await.expect("another host is answered");
    // Streams left open would hold up the server's shutdown for its grace.
    drop((answered, held));
    c.stop().await;
}

/// `natter_tokenless_stream_refusals_total{limit}` of this process.
fn tokenless_refusals(limit: &str) -> f64 {
    let series = format!("natter_tokenless_stream_refusals_total{{limit=\"{limit}\"}} ");
    natter_kit::metrics::render().lines().find_map(|l| l.strip_prefix(&series)?.parse().ok()).unwrap_or(0.0)
}

/// One host could fill the whole budget of request bytes with slow senders
/// and have every other client refused "server busy" for as long as it
/// kept them. Now a host holds at most its share of it (by default a
/// quarter: here 10 KB of 40 KB): of a slow sender's two streams, 7 KB and
/// 4 KB of a message each, the one that would take it past its share is
/// refused at once, RESOURCE_EXHAUSTED naming the share, and counted
/// (`natter_request_budget_address_refusals_total`), while another host's
/// call of 8.5 KB is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_share_of_the_request_budget() {
    let c = Cluster::all_in_one(&[
        "--max-buffered-request-bytes",
        "40000",
        "--max-request-bytes",
        "9000",
        "--request-timeout",
        "60s",
    ])
    .await;
    let (mallory, bob) = (c.guest().await, c.guest().await);
    let chat = crate::chats::direct(&c, &bob, &mallory).await;
    let (send, _closed) = h2_watched(connect_from([127, 0, 0, 2], c.addr).await).await;
    let slow_send = |first: Bytes| {
        let send = send.clone();
        let bearer = format!("Bearer {}", mallory.token);
        async move {
            let mut send = send.ready().await.unwrap();
            let mut request = grpc_request(c.addr, "/natter.messages.v1.MessageService/SendMessage");
            request.headers_mut().insert(http::header::AUTHORIZATION, bearer.parse().unwrap());
            let (response, mut body) = send.send_request(request, false).unwrap();
            body.send_data(first, false).unwrap();
            (response, body)
        }
    };
    // One DATA frame each: the prefix of an 8,000-byte message and part of
    // it; the rest never comes.
    let partial = |len: usize| {
        let mut partial = message_prefix(8_000).to_vec();
        partial.resize(len, b'x');
        Bytes::from(partial)
    };
    let refusals = budget_address_refusals();
    let (first, _first_body) = slow_send(partial(7_000)).await;
    let (second, _second_body) = slow_send(partial(4_000)).await;
    // Whichever the server reads second is the one past the share.
    let (refused, _, mut held) = tokio::time::timeout(GUARD, futures::future::select_all([first, second]))
        .await
        .expect("one is refused at once, not held");
    let refused = tonic::Status::from_header_map(refused.unwrap().headers()).expect("refused before any message");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("from this client address (its share: 10000 at once)"), "{refused:?}");
    assert!(crate::retry_delay(&refused) > Duration::ZERO);
    assert_eq!(budget_address_refusals(), refusals + 1.0, "counted");
    assert!(futures::FutureExt::now_or_never(&mut held[0]).is_none(), "the other still held");

    // Another host is answered, with more than the sender has left.
    let request =
        authed(&bob, mpb::SendMessageRequest { chat_id: chat.id, text: "y".repeat(8_500), ..Default::default() });
    tokio::time::timeout(GUARD, c.messages().send_message(request)).await.unwrap().expect("another host is answered");
    c.stop().await;
}

/// `natter_request_budget_address_refusals_total` of this process.
fn budget_address_refusals() -> f64 {
    natter_kit::metrics::render()
        .lines()
        .find_map(|l| l.strip_prefix("natter_request_budget_address_refusals_total ")?.parse().ok())
        .unwrap_or(0.0)
}

/// A client that sends half a request body through the edge and then
/// nothing is answered DEADLINE_EXCEEDED. (The request timeout answers it,
/// before the body deadline, twice as long, cuts the body off; the edge's
/// own answer to a body cut off, which was RESOURCE_EXHAUSTED "request too
/// large" for any body it could not read whole, is tested with the edge.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_stalled_half_way_through_the_edge_is_answered_deadline_exceeded() {
    let (upstream_url, _slow) = slow_upstream().await;
    let edge_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let edge_addr = edge_listener.local_addr().unwrap();
    let (shutdown, edge) = edge_on(edge_listener, &upstream_url, &["--request-timeout", "300ms"]);
    let mut send = h2_connect(edge_addr).await.ready().await.unwrap();
    let mut request = grpc_request(edge_addr, "/natter.messages.v1.MessageService/SendMessage");
    request.headers_mut().insert(http::header::AUTHORIZATION, format!("Bearer {STAND_IN_TOKEN}").parse().unwrap());
    let (response, mut body) = send.send_request(request, false).unwrap();
    let mut half = message_prefix(2_000).to_vec();
    half.resize(1_000, b'x');
    body.send_data(Bytes::from(half), false).unwrap();
    let response = tokio::time::timeout(GUARD, response).await.expect("answered").unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a status before any message");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    drop(body);
    shutdown.cancel();
    edge.await.unwrap();
}

/// Behind a trusted proxy, the edge gives each client the proxy names its
/// own share of the request budget (here 10 KB of 40 KB), not one share for
/// everyone behind the proxy: with 6 KB of one client's held by a slow
/// replica, its second call of 6 KB is refused at once, naming its share,
/// while another client's, through the same proxy, is held as its first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_each_client_has_its_own_share_of_the_edge_s_budget() {
    let (upstream_url, slow) = slow_upstream().await;
    let flags =
        ["--max-buffered-request-bytes", "40000", "--max-request-bytes", "9000", "--trusted-proxies", "127.0.0.1"];
    let (channel, shutdown, edge) = edge_before(&upstream_url, &flags).await;
    let send = |client: &'static str| {
        let mut messages = mpb::message_service_client::MessageServiceClient::new(channel.clone());
        let mut request = natter_testkit::with_token(
            STAND_IN_TOKEN,
            mpb::SendMessageRequest { text: "x".repeat(6_000), ..Default::default() },
        );
        // What the proxy in front (this test, at 127.0.0.1) appends.
        request.metadata_mut().insert("x-forwarded-for", client.parse().unwrap());
        async move { messages.send_message(request).await }
    };
    let mut waiting = slow.waiting.subscribe();
    let first = tokio::spawn(send("203.0.113.1"));
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 1)).await.unwrap().unwrap();

    let refused = tokio::time::timeout(GUARD, send("203.0.113.1")).await.expect("refused at once").unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("from this client address (its share: 10000 at once)"), "{refused:?}");
    let other = tokio::spawn(send("203.0.113.2"));
    tokio::time::timeout(GUARD, waiting.wait_for(|n| *n == 2)).await.expect("another client's is held").unwrap();

    slow.release.send_replace(true);
    for call in [first, other] {
        tokio::time::timeout(GUARD, call).await.unwrap().unwrap().expect("answered");
    }
    shutdown.cancel();
    edge.await.unwrap();
}

/// gRPC-web bodies cut short, by the client's fault: the server answers
/// (and counts) the client's error, never INTERNAL, whether it serves the
/// call itself (the all-in-one) or forwards it (the edge).
mod cut_grpc_web_bodies {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    crate::both_modes!(
        a_truncated_frame_is_invalid_argument,
        truncated_base64_is_invalid_argument,
        a_message_that_does_not_decode_is_invalid_argument,
        a_client_gone_mid_body_is_counted_cancelled_not_internal,
    );

    /// The path the tests call: one that needs no token (so the body is
    /// read), counted under its own method.
    const PATH: &str = "/natter.sessions.v1.SessionService/CreateUser";

    /// One HTTP/1.1 gRPC-web request of `content_type` to `c` announcing a
    /// body of `length` bytes, of which `body` is sent; then the client
    /// half-closes its side when `leave` says so. Returns the response as
    /// text (empty if the server closed without one).
    async fn exchange(c: &Cluster, content_type: &str, length: usize, body: &[u8], leave: bool) -> String {
        let mut tcp = TcpStream::connect(c.addr).await.unwrap();
        let head = format!(
            "POST {PATH} HTTP/1.1\r\nhost: natter\r\ncontent-type: {content_type}\r\nx-grpc-web: 1\r\n\
             origin: http://page.example\r\ncontent-length: {length}\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(body).await.unwrap();
        if leave {
            tcp.shutdown().await.unwrap();
        }
        let mut response = Vec::new();
        let read = async {
            let mut buf = [0; 4096];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => response.extend_from_slice(&buf[..n]),
                }
                // One response, trailers-only: its headers end it.
                if leave {
                    continue;
                }
                if response.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        };
        tokio::time::timeout(GUARD, read).await.expect("answered or closed");
        String::from_utf8_lossy(&response).into_owned()
    }

    /// The grpc-status of a trailers-only response (in its headers).
    fn grpc_status(response: &str) -> Option<&str> {
        response.lines().find_map(|l| l.strip_prefix("grpc-status:").map(str::trim))
    }

    /// A frame whose header announces 100 bytes, followed by 3 of them:
    /// the HTTP body ends cleanly, the gRPC message does not.
    async fn a_truncated_frame_is_invalid_argument(c: &Cluster) {
        let body = [0, 0, 0, 0, 100, 1, 2, 3];
        let response = exchange(c, "application/grpc-web+proto", body.len(), &body, false).await;
        assert_eq!(grpc_status(&response), Some("3"), "INVALID_ARGUMENT: {response}");
    }

    /// gRPC-web text whose base64 stops mid-quantum.
    async fn truncated_base64_is_invalid_argument(c: &Cluster) {
        let body = b"AAAAAAVhYmM";
        let response = exchange(c, "application/grpc-web-text", body.len(), body, false).await;
        assert_eq!(grpc_status(&response), Some("3"), "INVALID_ARGUMENT: {response}");
    }

    /// Whole frames whose message is no CreateUserRequest: a username that
    /// is not UTF-8 (which a browser's client cannot rule out), and a
    /// field of a wire type no field of it has.
    async fn a_message_that_does_not_decode_is_invalid_argument(c: &Cluster) {
        for message in [&[0x0a, 0x02, 0xff, 0xfe][..], &[0x0b, 0x01]] {
            let mut body = vec![0, 0, 0, 0, message.len() as u8];
            body.extend_from_slice(message);
            let response = exchange(c, "application/grpc-web+proto", body.len(), &body, false).await;
            assert_eq!(grpc_status(&response), Some("3"), "INVALID_ARGUMENT: {response}");
        }
    }

    /// `natter_rpc_requests_total` of CreateUser with `code`, of this
    /// process.
    fn create_user_calls(code: &str) -> f64 {
        let series = format!(
            "natter_rpc_requests_total{{code=\"{code}\",method=\"CreateUser\",service=\"natter.sessions.v1.SessionService\"}} "
        );
        natter_kit::metrics::render().lines().find_map(|l| l.strip_prefix(&series)?.parse().ok()).unwrap_or(0.0)
    }

    /// The client announces 100 bytes, sends 10 and goes away.
    async fn a_client_gone_mid_body_is_counted_cancelled_not_internal(c: &Cluster) {
        // Calls are counted once the process serves its metrics.
        let _metrics = natter_kit::metrics::serve_on("127.0.0.1:0".parse().unwrap()).expect("metrics endpoint");
        let internal = create_user_calls("INTERNAL");
        let cancelled = create_user_calls("CANCELLED");
        let response = exchange(c, "application/grpc-web+proto", 100, &[0, 0, 0, 0, 95, 1, 2, 3, 4, 5], true).await;
        assert_eq!(grpc_status(&response), Some("1"), "CANCELLED, if the client still hears it: {response}");
        assert_eq!(create_user_calls("INTERNAL"), internal, "no server error counted");
        assert!(create_user_calls("CANCELLED") > cancelled, "counted as the client's");
    }
}
