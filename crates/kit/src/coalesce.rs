//! Server streams whose frames their connection writes together.
//!
//! When one event fans out to many streams of one HTTP/2 connection (a
//! typing indicator to the 1,000 members of a chat), each stream's task
//! hands its frame to h2, which wakes the connection's task. Tokio runs a
//! task woken by the running task next, in the worker's LIFO slot, so the
//! connection's task ran after every stream and wrote that one frame: a
//! `writev` and a trip through loopback TCP per delivery (0.59 write calls
//! per delivery measured), where one per connection per event would carry
//! them all.
//!
//! [`Coalesced`] wraps a response stream. Once its frame is handed over, the
//! next poll wakes a small idle task of ours, which takes the LIFO slot and
//! sends the connection's task to the back of the run queue: behind the
//! other streams the same event woke, which add their frames to the same
//! write. Only the order of ready tasks changes; no frame waits for a timer
//! or for another event, and a connection whose frame is alone is written as
//! soon as the queue reaches it. It matters where streams share a
//! connection (the edge's upstream connections in split mode, internal
//! clients, a client multiplexing its streams); a stream alone on its
//! connection is written as before.
//!
//! Tokio's own switch for this (`Builder::disable_lifo_slot`) is unstable and
//! applies to every task of the runtime, the unary calls' hand-offs too,
//! whose latency it raised (BENCHMARKS.md, "Tried in the fourth session").

use std::cell::RefCell;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use futures::task::AtomicWaker;
use pin_project_lite::pin_project;

pin_project! {
    /// A server-streaming response (any `Stream`) that, after each frame it
    /// gave, lets the other ready streams' frames join its connection's
    /// next write (see the module docs). Items pass through unchanged.
    pub struct Coalesced<S> {
        #[pin]
        inner: S,
        // An item went out and the write it joins has not been deferred yet.
        owed: bool,
        // The last poll found nothing: the item's frame was handed over
        // since (tonic polls again after an item, hyper after sending).
        idle: bool,
    }
}

impl<S> Coalesced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner, owed: false, idle: false }
    }
}

impl<S: Stream> Stream for Coalesced<S> {
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.project();
        if *this.owed && *this.idle {
            *this.owed = false;
            nudge();
        }
        let poll = this.inner.poll_next(cx);
        *this.idle = poll.is_pending();
        if let Poll::Ready(Some(_)) = poll {
            *this.owed = true;
        }
        poll
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

thread_local! {
    // The idle task of the runtime this thread works for, one per thread
    // that polls streams (a server's workers share one runtime's).
    static IDLE: RefCell<Option<Arc<Idle>>> = const { RefCell::new(None) };
}

/// A task that does nothing each time it is woken.
#[derive(Default)]
struct Idle {
    waker: AtomicWaker,
    /// Its runtime dropped it (shut down): a new one is needed.
    gone: AtomicBool,
}

/// Wakes this thread's idle task, starting one on first use and after its
/// runtime went. Outside a tokio runtime, does nothing.
fn nudge() {
    IDLE.with(|slot| {
        let mut slot = slot.borrow_mut();
        if let Some(idle) = slot.as_ref().filter(|idle| !idle.gone.load(Ordering::Acquire)) {
            idle.waker.wake();
            return;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let idle = Arc::new(Idle::default());
        tokio::spawn(idle_task(Gone(idle.clone())));
        *slot = Some(idle);
    });
}

/// Marks its idle task gone when dropped with it (by its runtime, polled
/// or not).
struct Gone(Arc<Idle>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.gone.store(true, Ordering::Release);
    }
}

/// Waits to be woken, forever.
async fn idle_task(gone: Gone) {
    std::future::poll_fn(|cx| {
        gone.0.waker.register(cx.waker());
        Poll::<()>::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use futures::{StreamExt as _, poll};
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn items_pass_through_in_order() {
        let items: Vec<u32> = Coalesced::new(futures::stream::iter(0..100)).collect().await;
        assert_eq!(items, (0..100).collect::<Vec<_>>());
    }

    /// A runtime that ends takes its idle task along; the next runtime on
    /// the same thread starts its own (a test's, or a restarted server's).
    #[test]
    fn each_runtime_on_a_thread_gets_an_idle_task() {
        let idle = || IDLE.with(|slot| slot.borrow().clone()).expect("an idle task");
        let first = {
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            runtime.block_on(async { nudge() });
            let first = idle();
            assert!(!first.gone.load(Ordering::Acquire));
            first
        };
        assert!(first.gone.load(Ordering::Acquire), "dropped with its runtime");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async { nudge() });
        let second = idle();
        assert!(!Arc::ptr_eq(&first, &second) && !second.gone.load(Ordering::Acquire));
    }

    /// What the wrapper is for, on one worker: a stream hands over its
    /// frame and wakes its connection's task while other streams' tasks
    /// are ready. Plain, the connection's task runs next and writes that one
    /// frame; coalesced, it runs after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_woken_connection_runs_after_the_other_ready_streams() {
        for coalesce in [false, true] {
            let order = Arc::new(Mutex::new(Vec::new()));
            let (registered, connection_registered) = oneshot::channel();
            let (frame, connection_waits) = oneshot::channel::<()>();
            let connection = tokio::spawn({
                let order = order.clone();
                async move {
                    registered.send(()).unwrap();
                    connection_waits.await.unwrap();
                    order.lock().unwrap().push("connection");
                }
            });
            let stream = tokio::spawn({
                let order = order.clone();
                async move {
                    connection_registered.await.unwrap();
                    let mut events = Coalesced::new(futures::stream::iter([1]).chain(futures::stream::pending()));
                    assert_eq!(events.next().await, Some(1));
                    assert!(poll!(events.next()).is_pending());
                    let others: Vec<_> = ["stream 2", "stream 3"]
                        .map(|name| {
                            let order = order.clone();
                            tokio::spawn(async move { order.lock().unwrap().push(name) })
                        })
                        .into();
                    // h2 wakes the connection's task with the frame.
                    frame.send(()).unwrap();
                    if coalesce {
                        // hyper polls the body again after sending.
                        assert!(poll!(events.next()).is_pending());
                    }
                    others
                }
            });
            for other in stream.await.unwrap() {
                other.await.unwrap();
            }
            connection.await.unwrap();
            let order = order.lock().unwrap().clone();
            let expected =
                if coalesce { ["stream 2", "stream 3", "connection"] } else { ["connection", "stream 2", "stream 3"] };
            assert_eq!(order, expected, "coalesce: {coalesce}");
        }
    }
}
