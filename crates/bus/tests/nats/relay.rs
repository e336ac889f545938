//! A TCP relay between one bus and the NATS server, whose connections the
//! test freezes (what the client writes from then on is swallowed, as by a
//! network that went dark while the socket still looks open) and then cuts
//! (both ends closed). New connections after a cut are relayed as usual,
//! or, after [`Relay::hold_new`], held: once the client's handshake is
//! through, what it writes waits in the relay (a network that got slow,
//! the socket open, the bytes on their way) until [`Relay::release`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One relayed connection: frozen or not, and its cut.
struct Link {
    frozen: Arc<AtomicBool>,
    cut: CancellationToken,
}

/// A relay on a loopback port of its own; stops with the test's runtime.
pub(crate) struct Relay {
    /// `nats://127.0.0.1:<port>`, the relay's.
    pub(crate) url: String,
    links: Arc<Mutex<Vec<Link>>>,
    /// What the frozen connections' clients wrote, swallowed, and what the
    /// held ones' wrote while held.
    swallowed: Arc<Mutex<Vec<u8>>>,
    more_swallowed: Arc<Notify>,
    /// Set by `hold_new`: the connections opened from then on are held
    /// until it is cancelled (`release`).
    holding: Arc<Mutex<Option<CancellationToken>>>,
}

impl Relay {
    /// A relay to the NATS server at `upstream` (`nats://host:port`).
    pub(crate) async fn to(upstream: &str) -> Self {
        let upstream = upstream.trim_start_matches("nats://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay");
        let url = format!("nats://{}", listener.local_addr().expect("relay address"));
        let links = Arc::new(Mutex::new(Vec::<Link>::new()));
        let swallowed = Arc::new(Mutex::new(Vec::new()));
        let more_swallowed = Arc::new(Notify::new());
        let holding = Arc::new(Mutex::new(None::<CancellationToken>));
        let (adding, sink, told, holds) = (links.clone(), swallowed.clone(), more_swallowed.clone(), holding.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(&upstream).await else { continue };
                let (frozen, cut) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
                adding.lock().unwrap().push(Link { frozen: frozen.clone(), cut: cut.clone() });
                let (sink, told) = (sink.clone(), told.clone());
                let released = holds.lock().unwrap().clone();
                tokio::spawn(async move {
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_server, mut to_server) = outbound.into_split();
                    let upward = async {
                        let mut buf = vec![0; 16 * 1024];
                        // The client's handshake (CONNECT, then a PING whose
                        // PONG it awaits before writing anything else) goes
                        // through even on a held connection.
                        let mut handshake_done = false;
                        let mut held = Vec::new();
                        loop {
                            let n = tokio::select! {
                                read = from_client.read(&mut buf) => match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                },
                                () = async { released.as_ref().expect("guarded").cancelled().await },
                                    if released.is_some() && !held.is_empty() =>
                                {
                                    if to_server.write_all(&std::mem::take(&mut held)).await.is_err() {
                                        return;
                                    }
                                    continue;
                                }
                            };
                            let chunk = &buf[..n];
                            let holds = released.as_ref().is_some_and(|r| !r.is_cancelled()) && handshake_done;
                            handshake_done |= chunk.windows(6).any(|w| w == b"PING\r\n");
                            if frozen.load(Ordering::SeqCst) || holds {
                                sink.lock().unwrap().extend_from_slice(chunk);
                                told.notify_waiters();
                                if holds {
                                    held.extend_from_slice(chunk);
                                }
                            } else {
                                // What was held goes first (released while
                                // this was read).
                                held.extend_from_slice(chunk);
                                if to_server.write_all(&std::mem::take(&mut held)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    };
                    let downward = tokio::io::copy(&mut from_server, &mut to_client);
                    // Whichever ends first (or the cut) drops both sockets.
                    tokio::select! {
                        () = cut.cancelled() => {}
                        () = upward => {}
                        _ = downward => {}
                    }
                });
            }
        });
        Self { url, links, swallowed, more_swallowed, holding }
    }

    /// Holds the connections opened from now on: once a client's handshake
    /// is through (it is connected), what it writes waits in the relay,
    /// counted as swallowed, until [`Relay::release`] sends it on in order.
    pub(crate) fn hold_new(&self) {
        *self.holding.lock().unwrap() = Some(CancellationToken::new());
    }

    /// Sends on what the held connections wrote, and relays them as usual
    /// from then on.
    pub(crate) fn release(&self) {
        if let Some(released) = self.holding.lock().unwrap().take() {
            released.cancel();
        }
    }

    /// Swallows from now on what the clients of the open connections write.
    pub(crate) fn freeze(&self) {
        for link in self.links.lock().unwrap().iter() {
            link.frozen.store(true, Ordering::SeqCst);
        }
    }

    /// Waits until the frozen connections have swallowed `needle`; false if
    /// not within `within`.
    pub(crate) async fn swallowed(&self, needle: &str, within: std::time::Duration) -> bool {
        self.swallowed_times(needle, 1, within).await
    }

    /// How many times the frozen connections have swallowed `needle` so far.
    pub(crate) fn swallowed_count(&self, needle: &str) -> usize {
        self.swallowed.lock().unwrap().windows(needle.len()).filter(|w| *w == needle.as_bytes()).count()
    }

    /// Waits until the frozen connections have swallowed `needle` `times`
    /// times; false if not within `within`.
    pub(crate) async fn swallowed_times(&self, needle: &str, times: usize, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let told = self.more_swallowed.notified();
            tokio::pin!(told);
            told.as_mut().enable();
            if self.swallowed_count(needle) >= times {
                return true;
            }
            if tokio::time::timeout_at(deadline, told).await.is_err() {
                return false;
            }
        }
    }

    /// Closes every connection open now (frozen or not); later ones are
    /// relayed as usual.
    pub(crate) fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.cut.cancel();
        }
    }
}
