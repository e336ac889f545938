//! What a client that does not read can make a natter server hold, over
//! real sockets: the answers it never reads, and the requests no service
//! reads.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use natter_kit::config::ServerArgs;
use natter_kit::serve::{
    CONNECTION_WINDOW_BYTES, HTTP1_MAX_BUF_BYTES, MAX_SEND_BUF_BYTES, STREAM_WINDOW_BYTES, Server,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

/// A guard against a hang: every wait in this module ends within it.
const GUARD: Duration = Duration::from_secs(20);

/// The size of each chunk of [`Endless`]'s body: a large message.
const CHUNK: usize = 16 * 1024;

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// The size of the one chunk of a `Large` answer of [`Stand`].
const LARGE: usize = 1024 * 1024;

/// A stand-in service (no token needed: not a natter service): `Answer`
/// answers with an endless body ([`Endless`]) that counts the bytes hyper
/// took from it; `Hold` answers with headers and keeps its request body,
/// unread, for as long as the call lasts; `Done` answers with an empty
/// body, at once.
#[derive(Clone, Default)]
struct Stand {
    pulled: Arc<AtomicUsize>,
    /// How many `Answer` calls have ended (their bodies dropped).
    ended: Arc<tokio::sync::watch::Sender<usize>>,
}

impl tonic::server::NamedService for Stand {
    const NAME: &'static str = "kit.test.Stand";
}

impl tower::Service<http::Request<tonic::body::Body>> for Stand {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let path = request.uri().path();
        let body = if path.ends_with("/Large") {
            StandBody::Large(Some(Bytes::from(vec![0; LARGE])))
        } else if path.ends_with("/Chunk") {
            StandBody::Large(Some(Bytes::from_static(&ZEROS)))
        } else if path.ends_with("/Answer") {
            StandBody::Endless(Endless { pulled: self.pulled.clone(), ended: self.ended.clone() })
        } else if path.ends_with("/Done") {
            StandBody::Done
        } else {
            StandBody::Holding(request.into_body())
        };
        let response = http::Response::builder()
            .header("content-type", "application/grpc")
            .body(tonic::body::Body::new(body))
            .unwrap();
        std::future::ready(Ok(response))
    }
}

/// The answers of [`Stand`].
enum StandBody {
    /// Endless [`CHUNK`]s, counting those taken.
    Endless(Endless),
    /// No end, and the request's body kept unread.
    Holding(tonic::body::Body),
    /// Nothing: the call ends with its headers.
    Done,
    /// One chunk (`Large`: of [`LARGE`] bytes, a page of history is one
    /// message; `Chunk`: of [`CHUNK`] bytes), then the end.
    Large(Option<Bytes>),
}

impl http_body::Body for StandBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match &mut *self {
            Self::Endless(endless) => {
                endless.pulled.fetch_add(CHUNK, Ordering::Relaxed);
                Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(&ZEROS)))))
            }
            Self::Holding(_request) => Poll::Pending,
            Self::Done => Poll::Ready(None),
            Self::Large(chunk) => Poll::Ready(chunk.take().map(|chunk| Ok(http_body::Frame::data(chunk)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Done | Self::Large(None))
    }
}

/// What an endless answer counts: the bytes taken, and, once dropped, its
/// end.
struct Endless {
    pulled: Arc<AtomicUsize>,
    ended: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.ended.send_modify(|ended| *ended += 1);
    }
}

/// A natter server with [`Stand`] on `listener`, until the token is
/// cancelled.
async fn serve(listener: tokio::net::TcpListener, stand: Stand) -> CancellationToken {
    serve_with(&ServerArgs::default(), listener, stand).await
}

/// [`serve`] with `args`.
async fn serve_with(args: &ServerArgs, listener: tokio::net::TcpListener, stand: Stand) -> CancellationToken {
    let mut server = Server::new(args);
    server.add_service(stand).await;
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(listener, shutdown.clone()));
    shutdown
}

fn request(path: &str) -> http::Request<()> {
    http::Request::post(format!("http://localhost/kit.test.Stand/{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// An empty gRPC-web call to `path` of [`Stand`] over HTTP/1.1, as
/// a client writes it on its socket.
fn grpc_web_request(path: &str) -> Vec<u8> {
    format!(
        "POST /kit.test.Stand/{path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/grpc-web+proto\r\n\
         x-grpc-web: 1\r\ncontent-length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// A TCP stream that never reads: its client sends its frames and never
/// takes a byte of what the server sends.
struct NeverReads(TcpStream);

impl AsyncRead for NeverReads {
    fn poll_read(self: Pin<&mut Self>, _cx: &mut Context<'_>, _buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for NeverReads {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Waits until `counter` stops growing (the same over ten looks 50 ms
/// apart) and returns it. Nothing tells a client that hyper stopped taking
/// from a body; a look too early could only find less, never more.
async fn settled(counter: &AtomicUsize) -> usize {
    let mut last = counter.load(Ordering::Relaxed);
    let mut same = 0;
    let deadline = tokio::time::Instant::now() + GUARD;
    while same < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = counter.load(Ordering::Relaxed);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// A natter server with `stand`, and a client connected to it, both with
/// small socket buffers, so that what the kernel holds is small and known
/// (Linux doubles what is asked; accepted sockets take the listener's).
/// Returns the client's stream, the most the kernel holds between them
/// (both buffers, and one segment of loopback's 64 KiB taken past the send
/// buffer's mark) and the server's shutdown.
async fn small_buffered(stand: Stand) -> (TcpStream, usize, CancellationToken) {
    let server_socket = TcpSocket::new_v4().unwrap();
    server_socket.set_send_buffer_size(8 * 1024).unwrap();
    server_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server_send_buffer = server_socket.send_buffer_size().unwrap() as usize;
    let listener = server_socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = serve(listener, stand).await;
    let client_socket = TcpSocket::new_v4().unwrap();
    client_socket.set_recv_buffer_size(8 * 1024).unwrap();
    let client_receive_buffer = client_socket.recv_buffer_size().unwrap() as usize;
    let tcp = client_socket.connect(addr).await.unwrap();
    (tcp, server_send_buffer + client_receive_buffer + 64 * 1024, shutdown)
}

/// A client that opens streams whose answers are large, grants the
/// server all the flow-control window it may ask for, and never reads a
/// byte (its socket's receive buffer full, the server's send buffer full)
/// makes hyper hold at most [`MAX_SEND_BUF_BYTES`] and two chunks a stream
/// (one sent past the mark, one waiting for room) beyond what the sockets
/// and one HTTP/2 frame hold: it was hyper's default of 400 KiB a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_never_reads_are_held_up_to_the_send_buffer_a_stream() {
    const STREAMS: usize = 4;
    let stand = Stand::default();
    let (tcp, sockets, shutdown) = small_buffered(stand.clone()).await;
    let (mut send, connection) = h2::client::Builder::new()
        .initial_window_size(i32::MAX as u32)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, Bytes>(NeverReads(tcp))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut calls = Vec::new();
    for _ in 0..STREAMS {
        send = send.ready().await.unwrap();
        calls.push(send.send_request(request("Answer"), true).unwrap());
    }

    let pulled = tokio::time::timeout(GUARD, settled(&stand.pulled)).await.unwrap();
    // h2's: one frame being written.
    let frame = 16 * 1024 + 9;
    let held_by_hyper = STREAMS * (MAX_SEND_BUF_BYTES + 2 * CHUNK);
    assert!(
        pulled <= held_by_hyper + sockets + frame,
        "hyper took {pulled} bytes of {STREAMS} answers nobody reads: more than {STREAMS} x \
         ({MAX_SEND_BUF_BYTES} + 2 x {CHUNK}) + the sockets' {sockets} + a frame"
    );
    shutdown.cancel();
}

/// A gRPC-web client on HTTP/1.1 (a browser, a health check through a
/// proxy) that asks for a large answer and never reads a byte makes hyper
/// hold at most its HTTP/1.1 write buffer ([`HTTP1_MAX_BUF_BYTES`]) and two
/// chunks beyond what the sockets hold: hyper's default buffer took about
/// 408 KiB a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_an_http1_client_never_reads_are_held_up_to_the_write_buffer() {
    use tokio::io::AsyncWriteExt as _;
    let stand = Stand::default();
    let (mut tcp, sockets, shutdown) = small_buffered(stand.clone()).await;
    // An empty gRPC-web call; the client never reads its socket.
    tcp.write_all(&grpc_web_request("Answer")).await.unwrap();

    let pulled = tokio::time::timeout(GUARD, settled(&stand.pulled)).await.unwrap();
    assert!(pulled > 0, "the call was answered");
    let held_by_hyper = HTTP1_MAX_BUF_BYTES + 2 * CHUNK;
    assert!(
        pulled <= held_by_hyper + sockets,
        "hyper took {pulled} bytes of an HTTP/1.1 answer nobody reads: more than its write buffer's \
         {HTTP1_MAX_BUF_BYTES} + 2 x {CHUNK} + the sockets' {sockets}"
    );
    drop(tcp);
    shutdown.cancel();
}

/// A client that sends requests no service reads can send at most
/// [`STREAM_WINDOW_BYTES`] on each stream and [`CONNECTION_WINDOW_BYTES`]
/// on its connection, all streams together: hyper's defaults were 1 MiB
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_service_reads_stop_at_the_flow_control_windows() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = serve(listener, Stand::default()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().expect("the first ping_pong");
    tokio::spawn(connection);
    // A round trip: the server's SETTINGS and its connection WINDOW_UPDATE,
    // sent before its PONG, have been read.
    let barrier = async |ping: &mut h2::PingPong| {
        tokio::time::timeout(GUARD, ping.ping(h2::Ping::opaque())).await.expect("a pong").unwrap();
    };
    barrier(&mut ping).await;

    // One stream more than the connection's window holds windows of.
    let streams = (CONNECTION_WINDOW_BYTES / STREAM_WINDOW_BYTES) as usize + 1;
    let mut bodies = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..streams {
        send = send.ready().await.unwrap();
        let (call, mut body) = send.send_request(request("Hold"), false).unwrap();
        body.reserve_capacity(2 * STREAM_WINDOW_BYTES as usize);
        bodies.push(body);
        calls.push(call);
    }
    barrier(&mut ping).await;
    let mut sent = Vec::new();
    for body in &mut bodies {
        let capacity = body.capacity();
        body.send_data(Bytes::from(vec![0; capacity]), false).unwrap();
        sent.push(capacity);
    }
    // Every byte sent has reached the server: had it let the client send
    // more, its WINDOW_UPDATEs would come with the services reading, and
    // they read nothing.
    barrier(&mut ping).await;
    let total: usize = sent.iter().sum();
    assert!(
        sent.iter().all(|&s| s <= STREAM_WINDOW_BYTES as usize),
        "a stream nobody reads took {sent:?} bytes: more than the stream window of {STREAM_WINDOW_BYTES}"
    );
    assert_eq!(sent[0], STREAM_WINDOW_BYTES as usize, "the first stream fills its window: {sent:?}");
    assert_eq!(
        total, CONNECTION_WINDOW_BYTES as usize,
        "streams nobody reads took {sent:?} bytes: the connection window is {CONNECTION_WINDOW_BYTES}"
    );
    assert!(
        bodies.iter().all(|b| b.capacity() == 0),
        "the server let the client send more than its windows with nothing read"
    );
    shutdown.cancel();
}

/// A connection past `--max-connection-age` is asked to close (GOAWAY: no
/// new calls on it) while its calls in flight go on until the grace ends.
/// tonic's server, given a grace, sent no GOAWAY at the age and closed
/// the connection, calls and all, at the end of the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_is_asked_to_close_and_its_calls_go_on() {
    let mut args = ServerArgs::default();
    args.transport.max_connection_age = Duration::from_millis(300);
    args.transport.max_connection_age_grace = 3 * GUARD;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = serve_with(&args, listener, Stand::default()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut send, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let mut ping = connection.ping_pong().expect("the first ping_pong");
    tokio::spawn(connection);
    send = send.ready().await.unwrap();
    let (call, mut in_flight) = send.send_request(request("Hold"), false).unwrap();
    let response = tokio::time::timeout(GUARD, call).await.expect("headers").unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);

    // A new call is refused once the client has read the GOAWAY; nothing
    // tells it sooner than trying.
    let deadline = tokio::time::Instant::now() + GUARD;
    let refused = loop {
        assert!(tokio::time::Instant::now() < deadline, "no GOAWAY within {GUARD:?} of a 300 ms age");
        tokio::time::sleep(Duration::from_millis(50)).await;
        ping.ping(h2::Ping::opaque()).await.expect("the connection stays open");
        if let Err(e) = send.send_request(request("Hold"), true) {
            break e;
        }
    };
    assert!(refused.is_go_away() && refused.is_remote(), "refused by the server's GOAWAY: {refused:?}");
    // The call in flight goes on: the connection is open, and the stream
    // still takes data.
    ping.ping(h2::Ping::opaque()).await.expect("the connection stays open past its age");
    in_flight.send_data(Bytes::from_static(b"still here"), false).expect("the call in flight goes on");
    let reset = futures::future::poll_fn(|cx| in_flight.poll_reset(cx));
    assert!(futures::FutureExt::now_or_never(reset).is_none(), "the call in flight was reset");
    shutdown.cancel();
}

/// A client connected to a natter server with [`Stand`] whose
/// `--max-connection-idle` is 300 ms, and the server's shutdown.
async fn connect_to_idle_server() -> (TcpStream, CancellationToken) {
    let mut args = ServerArgs::default();
    args.transport.max_connection_idle = Duration::from_millis(300);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = serve_with(&args, listener, Stand::default()).await;
    (TcpStream::connect(addr).await.unwrap(), shutdown)
}

/// An HTTP/2 connection with no call in flight for `--max-connection-idle`
/// is closed gracefully: its client is sent GOAWAY (so it opens a new
/// connection for its next call, and a call that crossed the GOAWAY is
/// refused as never processed, safe to retry) and the connection ends
/// without an error. It was dropped, with no GOAWAY: the client found a
/// broken connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_sent_goaway_before_it_closes() {
    let (tcp, shutdown) = connect_to_idle_server().await;
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut send = send.ready().await.unwrap();
    let (call, _) = send.send_request(request("Done"), true).unwrap();
    let response = tokio::time::timeout(GUARD, call).await.expect("an answer").unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    drop(response);

    let ended = tokio::time::timeout(GUARD, connection).await.expect("closed within the idle time").unwrap();
    assert!(ended.is_ok(), "the idle connection was not closed gracefully: {ended:?}");
    let refused = send.send_request(request("Done"), true).expect_err("no new call on a closed connection");
    assert!(refused.is_go_away() && refused.is_remote(), "the server sent no GOAWAY: {refused:?}");
    shutdown.cancel();
}

/// An HTTP/1.1 connection (gRPC-web) with no call in flight for
/// `--max-connection-idle` is closed after its answer was sent whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_closed_after_its_answer() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut tcp, shutdown) = connect_to_idle_server().await;
    tcp.write_all(&grpc_web_request("Done")).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(GUARD, tcp.read_to_end(&mut answer)).await.expect("closed within the idle time").unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "the call was answered before the close: {answer}");
    shutdown.cancel();
}

/// A natter server with [`Stand`] whose `--max-unread-answer-time` is
/// `bound`, and its address and shutdown.
async fn serve_with_unread_bound(stand: Stand, bound: Duration) -> (std::net::SocketAddr, CancellationToken) {
    let mut args = ServerArgs::default();
    args.transport.max_unread_answer_time = bound;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, serve_with(&args, listener, stand).await)
}

/// An HTTP/2 connection to `addr` whose streams' windows are h2's default
/// (64 KiB) and whose connection window is as large as HTTP/2 allows (a
/// stream nobody reads takes none of another's), served in the
/// background, so it answers the server's PINGs.
async fn h2_client(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    h2_client_with_window(addr, 65_535).await
}

/// [`h2_client`] with streams' windows of `stream_window` bytes.
async fn h2_client_with_window(addr: std::net::SocketAddr, stream_window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(stream_window)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    send.ready().await.unwrap()
}

/// Opens an `Answer` call on `send` and returns its body once the answer's
/// headers came.
async fn open_answer(send: &mut h2::client::SendRequest<Bytes>) -> h2::RecvStream {
    open(send, "Answer").await
}

/// Opens a call to `path` of [`Stand`] on `send` and returns its body once
/// the answer's headers came.
async fn open(send: &mut h2::client::SendRequest<Bytes>, path: &str) -> h2::RecvStream {
    let (call, _) = send.send_request(request(path), true).unwrap();
    let response = tokio::time::timeout(GUARD, call).await.expect("the answer's headers").unwrap();
    assert_eq!(response.status(), http::StatusCode::OK);
    response.into_body()
}

/// Takes the frames of `unread` off the connection without giving back
/// its window, until the server resets it, and checks that it did so with
/// CANCEL (a gRPC client hears CANCELLED).
async fn assert_reset_unread(unread: &mut h2::RecvStream) {
    let reset = tokio::time::timeout(GUARD, async {
        loop {
            match unread.data().await {
                Some(Ok(_)) => {}
                Some(Err(reset)) => break reset,
                None => panic!("the answer nobody reads ended whole"),
            }
        }
    })
    .await
    .expect("the stream nobody reads was not reset");
    assert_eq!(reset.reason(), Some(h2::Reason::CANCEL), "reset by the server: {reset:?}");
}

/// The slow-consumer rule: a client that reads its socket and answers
/// PINGs, but grants one stream no more flow-control window, has that
/// stream reset (CANCEL; CANCELLED to a gRPC client) once its answer waited
/// `--max-unread-answer-time`, and the call behind it ends, while a stream
/// it reads on the same connection goes on. The unread stream was held,
/// with its call and up to 64 KiB of its answer, until the connection's
/// age and grace (70 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_answer_goes_unread_is_reset_and_its_neighbours_go_on() {
    let stand = Stand::default();
    let (addr, shutdown) = serve_with_unread_bound(stand.clone(), Duration::from_secs(1)).await;
    let mut send = h2_client(addr).await;
    let mut unread = open_answer(&mut send).await;
    let mut read = open_answer(&mut send).await;
    // The read stream: read, and its window given back, as it comes.
    let read_bytes = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let read_bytes = read_bytes.clone();
        async move {
            while let Some(data) = read.data().await {
                let data = data.expect("the stream that is read is never reset");
                read.flow_control().release_capacity(data.len()).unwrap();
                read_bytes.fetch_add(data.len(), Ordering::Relaxed);
            }
            panic!("the endless answer ended");
        }
    });

    // The unread stream: its frames are taken off the connection, but its
    // window is never given back.
    assert_reset_unread(&mut unread).await;
    let mut ended = stand.ended.subscribe();
    tokio::time::timeout(GUARD, ended.wait_for(|&ended| ended >= 1))
        .await
        .expect("the call of the stream nobody reads ended")
        .unwrap();

    // The stream that is read goes on: more of its answer comes after the
    // reset than a window holds.
    let after_reset = read_bytes.load(Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + GUARD;
    while read_bytes.load(Ordering::Relaxed) < after_reset + 4 * CHUNK {
        assert!(tokio::time::Instant::now() < deadline, "the stream that is read stopped with its neighbour");
        assert!(!reader.is_finished(), "the stream that is read ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*stand.ended.borrow(), 1, "only the stream nobody reads ended");
    reader.abort();
    shutdown.cancel();
}

/// A large answer in one chunk (a unary call's one message) that its
/// client does not read is reset by the slow-consumer rule too, as hyper
/// is handed it a piece at a time: handed all of it at the first byte of
/// window, hyper passed it to h2 whole, the call ended, and the server held
/// the megabyte, out of the rule's reach, for as long as the connection
/// lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_nobody_reads_is_reset() {
    let (addr, shutdown) = serve_with_unread_bound(Stand::default(), Duration::from_millis(300)).await;
    let mut send = h2_client(addr).await;
    let mut unread = open(&mut send, "Large").await;
    assert_reset_unread(&mut unread).await;
    shutdown.cancel();
}

/// An answer that ended with most of its last chunk past the client's
/// window (here a window of one byte, and one 16 KiB chunk) is reset by the
/// slow-consumer rule too, as hyper is handed the chunk's last byte on its
/// own and waits for window to take it: handed the chunk whole, hyper
/// passed it to h2 at the first byte of window, the call ended, and the
/// server held the rest, out of the rule's reach, for as long as the
/// connection lived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_ended_past_the_window_is_reset() {
    let (addr, shutdown) = serve_with_unread_bound(Stand::default(), Duration::from_millis(300)).await;
    let mut send = h2_client_with_window(addr, 1).await;
    let mut unread = open(&mut send, "Chunk").await;
    assert_reset_unread(&mut unread).await;
    shutdown.cancel();
}

/// A client that reads slowly, but reads (a frame every 50 ms), is not cut
/// by the slow-consumer rule, however long its answer takes: the bound is
/// on one wait for window, not on the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_slowly_is_not_cut() {
    let stand = Stand::default();
    let bound = Duration::from_secs(1);
    let (addr, shutdown) = serve_with_unread_bound(stand.clone(), bound).await;
    let mut send = h2_client(addr).await;
    let mut answer = open_answer(&mut send).await;
    let started = tokio::time::Instant::now();
    // Three times the bound.
    while started.elapsed() < 3 * bound {
        let data = tokio::time::timeout(GUARD, answer.data()).await.expect("a frame").expect("the answer goes on");
        let data = data.expect("a client that reads was cut");
        tokio::time::sleep(Duration::from_millis(50)).await;
        answer.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(*stand.ended.borrow(), 0, "the slow reader's call ended");
    shutdown.cancel();
}

/// A gRPC-web client on HTTP/1.1 that reads nothing of its socket has its
/// connection closed once the server's writes made no progress for
/// `--max-unread-answer-time`, and its call ends. Nothing ended it before:
/// its call in flight kept the idle deadline off, and the connection's age
/// waits for the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_that_reads_nothing_is_closed_after_the_bound() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stand = Stand::default();
    let (addr, shutdown) = serve_with_unread_bound(stand.clone(), Duration::from_millis(300)).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&grpc_web_request("Answer")).await.unwrap();

    let mut ended = stand.ended.subscribe();
    tokio::time::timeout(GUARD, ended.wait_for(|&ended| ended >= 1))
        .await
        .expect("the call of a client that reads nothing did not end")
        .unwrap();
    // The connection is closed: what the sockets held, then its end (or a
    // reset: the server closed with its answer unsent).
    let mut answer = Vec::new();
    let _end = tokio::time::timeout(GUARD, tcp.read_to_end(&mut answer)).await.expect("the connection was not closed");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "the call was answered before the close");
    shutdown.cancel();
}
