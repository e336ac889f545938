//! The slow-consumer rule: an HTTP/2 stream whose answer waits unread for
//! longer than `--max-unread-answer-time` is reset (RST_STREAM CANCEL), so
//! that nothing is held for a client that does not read (NATS's
//! `write_deadline`, Centrifugo's `client_queue_max_size`). The client
//! hears CANCELLED and calls again; StreamEvents resumes where it was.
//!
//! hyper's HTTP/2 server asks a response body for its next chunk only
//! once the chunk before it fits in the client's flow-control window
//! (`PipeToSendStream`): while the client grants none, hyper waits for
//! send capacity and never polls the body, so no body wrapper alone can
//! see the wait, nor end it. But hyper runs each stream (its `H2Stream`
//! future: the call, then the piping of its answer) on the executor the
//! server gives it, and dropping that future drops h2's handles of the
//! stream: h2 then resets the stream and frees what it buffered of it.
//! So `UnreadAnswerExecutor` runs each stream's future inside a
//! `Watched` one, and every response body is wrapped in an
//! `AnswerBody`, which tells the `Watched` polling it (through a
//! thread-local set only while it polls) whether its last poll gave a
//! chunk or found none ready. A stream whose future waits after its body
//! last gave a chunk is waiting for window: stalled. Stalled for the bound,
//! its future is dropped. Anything that polls the body again (the chunk
//! went out) ends the stall; a stream waiting for its next event, or for
//! its handler's answer, never stalls.
//!
//! `AnswerBody` also hands hyper at most [`ANSWER_PIECE_BYTES`] at a
//! time, so that hyper waits for window before each piece of a large
//! message (a page of history is one chunk of megabytes) instead of
//! handing h2 the whole of it at the first byte of window: then it would
//! not wait at all, and a unary answer nobody reads would be held whole,
//! out of the rule's reach, until the connection closed. And it hands on
//! the last byte of a chunk longer than [`UNWATCHED_CHUNK_BYTES`] on its
//! own: hyper takes it only once all before it fits in the window, so an
//! answer that ended, or a stream with nothing more to send, never leaves
//! more than that byte past the client's window unwatched. What is left
//! out of reach: a chunk of at most [`UNWATCHED_CHUNK_BYTES`] (an event, a
//! small answer) past the window of a stream with nothing more to send,
//! held until the client reads it or the connection closes
//! (`--max-connection-age`). A client that reads nothing at all (not even
//! PINGs) is closed by the write deadline of `crate::accept` and the
//! HTTP/2 keepalive.
//!
//! The trade-off: a client that reads, but takes longer than the bound to
//! take one piece (16 KiB), is cut too: at the default 30 s, one slower
//! than about 0.5 KiB/s.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// The most bytes of a response `AnswerBody` hands hyper at once: one
/// HTTP/2 frame at the default SETTINGS_MAX_FRAME_SIZE (RFC 9113 section
/// 6.5.2), so pieces cost no more frames on the wire than h2's own
/// splitting.
pub const ANSWER_PIECE_BYTES: usize = 16 * 1024;

/// The longest chunk `AnswerBody` hands hyper whole (in pieces of at most
/// [`ANSWER_PIECE_BYTES`]); a longer one's last byte goes on its own, as
/// an HTTP/2 frame of its own, after the rest fits in the client's window
/// (see the module docs). Most events and unary answers are shorter, and
/// cost no frame more.
pub const UNWATCHED_CHUNK_BYTES: usize = 1024;

/// What the body a [`Watched`] stream polls said last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LastPoll {
    /// Not polled in this poll of the stream.
    NotPolled,
    /// Gave a chunk: hyper waits for window before asking again.
    GaveChunk,
    /// Had none ready, or ended.
    Other,
}

thread_local! {
    /// Set to [`LastPoll::NotPolled`] by a [`Watched`] stream around each
    /// poll of its future, and by its [`AnswerBody`] when polled.
    static LAST_POLL: Cell<LastPoll> = const { Cell::new(LastPoll::NotPolled) };
}

/// hyper's executor for a server's HTTP/2 streams: spawns each on tokio
/// inside a [`Watched`] future that drops it once its answer waited unread
/// for `bound` (see the module docs). `bound` zero: never.
#[derive(Clone, Copy, Debug)]
pub(crate) struct UnreadAnswerExecutor {
    bound: Duration,
    listener: &'static str,
}

impl UnreadAnswerExecutor {
    /// Streams of a `listener` (`public`, `internal`; for the metrics)
    /// reset after `bound` unread (zero: never).
    pub(crate) fn new(bound: Duration, listener: &'static str) -> Self {
        Self { bound, listener }
    }
}

impl<F> hyper::rt::Executor<F> for UnreadAnswerExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        if self.bound.is_zero() {
            tokio::spawn(stream);
        } else {
            let listener = self.listener;
            tokio::spawn(Watched { stream: Some(stream), bound: self.bound, stall: None, stalled: false, listener });
        }
    }
}

pin_project_lite::pin_project! {
    /// One HTTP/2 stream's future, dropped once its answer waited unread
    /// for `bound`.
    struct Watched<F> {
        // `None` once dropped.
        #[pin]
        stream: Option<F>,
        bound: Duration,
        // The end of the stall, once there was one; reset for the next.
        stall: Option<Pin<Box<Sleep>>>,
        // Whether the stream waits for window now.
        stalled: bool,
        listener: &'static str,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(stream) = this.stream.as_mut().as_pin_mut() else { return Poll::Ready(()) };
        // Restored after: a stream polled inside another's poll (none
        // today) leaves the outer one's record as it was.
        let outer = LAST_POLL.replace(LastPoll::NotPolled);
        let polled = stream.poll(cx);
        let last = LAST_POLL.replace(outer);
        if polled.is_ready() {
            return Poll::Ready(());
        }
        match last {
            LastPoll::GaveChunk => {
                // A new stall (the chunk before went out: its stall ended).
                let end = tokio::time::Instant::now() + *this.bound;
                match this.stall.as_mut() {
                    Some(stall) => stall.as_mut().reset(end),
                    None => *this.stall = Some(Box::pin(tokio::time::sleep_until(end))),
                }
                *this.stalled = true;
            }
            LastPoll::Other => *this.stalled = false,
            LastPoll::NotPolled => {}
        }
        if *this.stalled
            && let Some(stall) = this.stall.as_mut()
            && stall.as_mut().poll(cx).is_ready()
        {
            tracing::debug!(
                listener = *this.listener,
                bound = ?*this.bound,
                "resetting a stream whose answer went unread for --max-unread-answer-time"
            );
            crate::metrics::unread_answer_ended(this.listener, "stream");
            // h2 resets the stream (CANCEL) and frees its buffers; the
            // call's body is dropped, so its handler ends.
            this.stream.set(None);
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

pin_project_lite::pin_project! {
    /// A response body as hyper sees it: at most [`ANSWER_PIECE_BYTES`] at
    /// a time, each poll recorded for the [`Watched`] stream polling it.
    pub(crate) struct AnswerBody<B> {
        #[pin]
        inner: B,
        // What is left of the last chunk, handed on piece by piece.
        rest: Bytes,
        // Whether the last byte of `rest` goes on its own.
        tail: bool,
    }
}

impl<B> AnswerBody<B> {
    pub(crate) fn new(inner: B) -> Self {
        Self { inner, rest: Bytes::new(), tail: false }
    }
}

/// The next piece of `rest`, taken off it: at most [`ANSWER_PIECE_BYTES`],
/// and with `tail`, never its last byte but on its own.
fn piece(rest: &mut Bytes, tail: bool) -> Bytes {
    let len = match rest.len() {
        len if len > ANSWER_PIECE_BYTES => ANSWER_PIECE_BYTES,
        len if tail && len > 1 => len - 1,
        len => len,
    };
    rest.split_to(len)
}

impl<B> Body for AnswerBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = if this.rest.has_remaining() {
            Poll::Ready(Some(Ok(Frame::data(piece(this.rest, *this.tail)))))
        } else {
            match this.inner.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        *this.tail = data.len() > UNWATCHED_CHUNK_BYTES;
                        *this.rest = data;
                        Poll::Ready(Some(Ok(Frame::data(piece(this.rest, *this.tail)))))
                    }
                    Err(frame) => Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        };
        let gave_chunk =
            matches!(&polled, Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| !d.is_empty()));
        LAST_POLL.set(if gave_chunk { LastPoll::GaveChunk } else { LastPoll::Other });
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(rest));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn a_large_chunk_is_handed_on_in_pieces_and_whole() {
        let chunk: Bytes = (0..40_000u32).map(|i| i as u8).collect::<Vec<u8>>().into();
        let body = http_body_util::Full::new(chunk.clone());
        let mut body = AnswerBody::new(body);
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap());
        }
        assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), [16_384, 16_384, 7_231, 1]);
        assert_eq!(pieces.concat(), chunk);
    }

    #[tokio::test]
    async fn a_small_chunk_is_handed_on_whole() {
        let chunk = Bytes::from_static(&[7; UNWATCHED_CHUNK_BYTES]);
        let mut body = AnswerBody::new(http_body_util::Full::new(chunk.clone()));
        let frame = body.frame().await.expect("a frame").unwrap();
        assert_eq!(frame.into_data().unwrap(), chunk);
        assert!(body.frame().await.is_none());
    }
}
