//! The listener: accept, read the connection's kernel tag, terminate TLS,
//! serve HTTP/1.1 (`proxy/h1_server.rs`) and HTTP/2 (hyper; h2c by preface,
//! or ALPN), and keep slow or idle clients from holding resources.
//!
//! Limits per connection, kept by one watchdog timer per connection (no timer
//! per request): the TLS handshake, the first HTTP/1 request head (counted
//! from the accept) and every later one (counted from its first byte) must
//! arrive within `header_read_timeout_ms`; a connection with no request in
//! flight and no bytes moving for `idle_timeout_ms` is closed. So a
//! keep-alive connection may rest between requests for the idle timeout, as
//! configured, while a client that connects and sends nothing, or dribbles a
//! head, is cut off by the header timeout (nginx's `client_header_timeout`
//! and `keepalive_timeout`). A connection whose writes have made no progress
//! for `send_timeout_ms` — a client that stopped reading its answer — is
//! closed even with a request open, which cancels that request (nginx's
//! `send_timeout`): otherwise it would hold its backend slot and its
//! upstream stream for as long as it liked. Over HTTP/2 a client can also
//! stop reading one stream (no flow-control window for it) while reading the
//! others: each streamed answer is pumped by its own task, which cancels its
//! request when the client has taken nothing for `send_timeout_ms`
//! ([`pumped`]), and the connection lives on.
//!
//! Shutdown: the listener closes; an HTTP/1 connection closes at once between
//! requests and after its answer otherwise, an HTTP/2 one gracefully
//! (GOAWAY, open streams finish); after 10 s whatever is left is dropped.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::TlsAcceptor;

use super::{
    Body, BoxError, Proxy, ProxySlot, h1_server, h1_server::RequestBody, headers::PeerText,
};
use crate::{cidr::CidrTable, clock, config::Loaded, kernel::TagReader};

/// How a connection's class and tenant are found.
pub enum Tags {
    /// From the kernel: socket mark, else the pinned LPM maps.
    Kernel(Box<TagReader>),
    /// No kernel program: the same networks, matched in userspace.
    Table {
        table: CidrTable<(u32, u32)>,
        default_class: u32,
    },
}

impl Tags {
    pub fn from_config(cfg: &Loaded) -> Tags {
        let mut table = CidrTable::default();
        for n in &cfg.raw.networks {
            let tenant = n.tenant.as_ref().map_or(0, |t| cfg.tenant_ids[t.get_ref()]);
            table.insert(
                *n.cidr.get_ref(),
                (cfg.class_ids[n.class.get_ref()], tenant),
            );
        }
        Tags::Table {
            table,
            default_class: cfg.default_class,
        }
    }

    fn tag(&self, stream: &TcpStream, peer: IpAddr) -> (u32, u32) {
        match self {
            Tags::Kernel(reader) => reader.tag(stream, peer),
            Tags::Table {
                table,
                default_class,
            } => table.lookup(peer).copied().unwrap_or((*default_class, 0)),
        }
    }
}

/// What is known about a connection when it is accepted.
#[derive(Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `x-forwarded-for` gives it.
    pub peer_text: PeerText,
    /// The kernel's (class, tenant id); tenant 0 = none.
    pub kernel: (u32, u32),
}

/// When a connection last moved bytes, how many requests it has open, and
/// since when the HTTP/1 request head being read has been arriving. Stamped
/// on every read and write, so by the coarse clock (a tick is far below any
/// timeout).
pub struct Activity {
    /// [`clock::coarse_ms`] of the last read or write.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// [`clock::coarse_ms`] when the request head now being read began: the
    /// accept, then the first byte read after a request ended. [`NO_HEAD`]
    /// while none is being read (a request is open, the keep-alive
    /// connection rests, or it speaks HTTP/2).
    head_since_ms: AtomicU64,
    http2: AtomicBool,
    /// Shutting down: an HTTP/1 connection closes after the answer.
    closing: AtomicBool,
    /// [`clock::coarse_ms`] when a write first found the socket full (the
    /// client's window closed) with no byte written since; [`NOT_STALLED`]
    /// otherwise.
    stalled_since_ms: AtomicU64,
}

const NO_HEAD: u64 = u64::MAX;
const NOT_STALLED: u64 = u64::MAX;

/// Time since the [`clock::coarse_ms`] stamp in `since`, unless it holds `unset`.
fn age(since: &AtomicU64, unset: u64) -> Option<Duration> {
    let since = since.load(Ordering::Relaxed);
    (since != unset).then(|| Duration::from_millis(clock::coarse_ms().saturating_sub(since)))
}

/// The watchdog's shortest sleep: a few coarse-clock ticks.
const MIN_CHECK: Duration = Duration::from_millis(10);

/// The HTTP/2 connection preface (RFC 9113 §3.4): a connection that opens
/// with it speaks HTTP/2 (prior knowledge, h2c).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Activity {
    /// A connection just accepted: its first head is due within the header
    /// timeout from now.
    fn accepted() -> Activity {
        let now = clock::coarse_ms();
        Activity {
            last_ms: AtomicU64::new(now),
            in_flight: AtomicUsize::new(0),
            head_since_ms: AtomicU64::new(now),
            http2: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stalled_since_ms: AtomicU64::new(NOT_STALLED),
        }
    }

    fn touch(&self) {
        self.last_ms.store(clock::coarse_ms(), Ordering::Relaxed);
    }

    /// A write's outcome: bytes written mean the client is reading; a
    /// socket found full starts (or continues) a stall, timed from the first.
    fn on_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(1..)) => {
                self.touch();
                // Loaded first: on the common path (never stalled) no store.
                if self.stalled_since_ms.load(Ordering::Relaxed) != NOT_STALLED {
                    self.stalled_since_ms.store(NOT_STALLED, Ordering::Relaxed);
                }
            }
            Poll::Pending => {
                if self.stalled_since_ms.load(Ordering::Relaxed) == NOT_STALLED {
                    self.stalled_since_ms
                        .store(clock::coarse_ms(), Ordering::Relaxed);
                }
            }
            Poll::Ready(_) => {}
        }
    }

    /// How long writes have been waiting for the client to read, if they are.
    fn stall_age(&self) -> Option<Duration> {
        age(&self.stalled_since_ms, NOT_STALLED)
    }

    /// Bytes arrived: between requests of an HTTP/1 connection they are the
    /// start of the next head, and its deadline starts running.
    pub fn on_read(&self) {
        let now = clock::coarse_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == NO_HEAD
            && !self.http2.load(Ordering::Relaxed)
        {
            self.head_since_ms.store(now, Ordering::Relaxed);
        }
    }

    /// The connection speaks HTTP/2: no heads to time (each stream is a
    /// request with its own body and upstream limits).
    fn set_http2(&self) {
        self.http2.store(true, Ordering::Relaxed);
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
    }

    /// How long the connection has been quiet.
    fn quiet(&self) -> Duration {
        Duration::from_millis(
            clock::coarse_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }

    /// How long the head being read has been arriving, if one is.
    fn head_age(&self) -> Option<Duration> {
        age(&self.head_since_ms, NO_HEAD)
    }

    /// Why the connection must close now, if it must.
    fn expired(&self, limits: ConnLimits) -> Option<&'static str> {
        // Even with a request open: it is the request that cannot proceed.
        if self.stall_age().is_some_and(|age| age >= limits.send) {
            return Some("the client stopped reading its answer");
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if self.head_age().is_some_and(|age| age >= limits.header_read) {
            return Some("the request head did not arrive in time");
        }
        (self.quiet() >= limits.idle).then_some("idle")
    }

    /// How long the watchdog may sleep before [`Activity::expired`] could
    /// change its answer. With no head being read a new one may begin at any
    /// moment, so an HTTP/1 connection is looked at at least once per header
    /// timeout: a head that began since is then timed from its first byte.
    /// Likewise at least once per send timeout, for a stall that begins
    /// (closed between one and two send timeouts after its start).
    /// Never less than [`MIN_CHECK`], so a zero timeout cannot spin.
    fn next_check(&self, limits: ConnLimits) -> Duration {
        // The longest wait while no head is being read.
        let heads = if self.http2.load(Ordering::Relaxed) {
            limits.idle
        } else {
            limits.header_read.min(limits.idle)
        };
        let wait = if self.in_flight.load(Ordering::Relaxed) > 0 {
            heads
        } else {
            let head_left = self
                .head_age()
                .map_or(heads, |age| limits.header_read.saturating_sub(age));
            head_left.min(limits.idle.saturating_sub(self.quiet()))
        };
        let stall_left = self
            .stall_age()
            .map_or(limits.send, |age| limits.send.saturating_sub(age));
        wait.min(stall_left).max(MIN_CHECK)
    }

    /// Whether an HTTP/1 connection is to close after its current answer.
    pub fn closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Marks a request open until the returned guard is dropped: its head
    /// has been read.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since_ms.store(NO_HEAD, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// An open request; held by the response body until it is done.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Stamps the connection's activity on every read and write.
struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.on_write(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.on_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Limits applied to every connection, from `[limits]`.
#[derive(Clone, Copy)]
struct ConnLimits {
    header_read: Duration,
    idle: Duration,
    send: Duration,
}

impl ProxySlot {
    /// Accepts until `shutdown` flips, then lets in-flight requests finish
    /// (bounded). Each connection is served by the proxy current when it was
    /// accepted, so a config reload applies to new connections while open
    /// ones finish under the config they started with.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<TlsAcceptor>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let first = self.get();
        let limits = &first.cfg.raw.limits;
        let limits = ConnLimits {
            header_read: Duration::from_millis(limits.header_read_timeout_ms),
            idle: Duration::from_millis(limits.idle_timeout_ms),
            send: limits.send_timeout(),
        };
        // No HTTP/2 keep-alive pings: answered pings would count as activity
        // and keep an idle connection open forever; the idle watchdog decides.
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        // Answer bytes buffered per stream while the socket drains: 64 KiB
        // (hyper's default, 400 KB, times 256 streams let one client that
        // grants large windows and reads slowly park 100 MB here; an LLM
        // stream needs far less).
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_send_buf_size(64 << 10)
            .max_header_list_size(64 * 1024);
        let h2 = Arc::new(h2);
        // Every connection's task holds a sender: once all are dropped, the
        // connections are done.
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.get();
            let info = ConnInfo {
                peer,
                peer_text: PeerText::new(peer.ip()),
                kernel: proxy.tags.tag(&stream, peer.ip()),
            };
            tracing::debug!(%peer, class = proxy.cfg.class_name(info.kernel.0), "accepted");
            let conn = Conn {
                proxy,
                h2: h2.clone(),
                info,
                activity: Arc::new(Activity::accepted()),
                limits,
                shutdown: shutdown.clone(),
                _open: open.clone(),
            };
            let stream = Watched {
                inner: stream,
                activity: conn.activity.clone(),
            };
            // Two spawns, not one future with both arms: a task is as large
            // as its future's largest state, and a plain connection's should
            // not carry room for a TLS session's (an idle keep-alive
            // connection holds its task and little else: h1_server::serve).
            match tls.clone() {
                None => {
                    tokio::spawn(conn.serve(stream, false));
                }
                Some(acceptor) => {
                    tokio::spawn(async move {
                        match tokio::time::timeout(limits.header_read, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls_stream)) => {
                                let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                conn.serve(tls_stream, h2).await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        drop(listener);
        drop(open);
        tokio::select! {
            _ = all_closed.recv() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                tracing::warn!("in-flight requests still running after 10 s; closing them");
            }
        }
    }
}

/// An accepted connection and what serving it needs.
struct Conn {
    proxy: Arc<Proxy>,
    h2: Arc<http2::Builder<TokioExecutor>>,
    info: ConnInfo,
    activity: Arc<Activity>,
    limits: ConnLimits,
    shutdown: watch::Receiver<bool>,
    /// Held until the connection ends (see [`ProxySlot::serve`]).
    _open: mpsc::Sender<()>,
}

impl Conn {
    /// Serves the connection (HTTP/2 if ALPN said `h2` or it opens with the
    /// preface, else HTTP/1) under its watchdog.
    ///
    /// A block, not an `async fn`: an async fn's arguments are copied into
    /// its body and keep their room twice in the task (every resting
    /// connection's); for the same reason the block borrows `self`'s parts
    /// instead of moving them out.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn doubles its arguments' room"
    )]
    fn serve<T>(mut self, mut io: T, alpn_h2: bool) -> impl Future<Output = ()> + Send
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        async move {
            let (proxy, activity, limits) = (&self.proxy, &self.activity, &self.limits);
            let (h2, info, h2_shutdown) = (&self.h2, &self.info, self.shutdown.clone());
            let serving = async {
                let mut buf = BytesMut::new();
                if alpn_h2 || opens_with_preface(&mut io, &mut buf).await? {
                    activity.set_http2();
                    let io = Prefixed {
                        prefix: buf.freeze(),
                        inner: io,
                    };
                    let streams = H2Streams {
                        activity,
                        send_timeout: limits.send,
                    };
                    // Boxed: an HTTP/1 connection need not carry its room.
                    let h2 = serve_h2(proxy.clone(), h2, io, *info, streams, h2_shutdown);
                    Box::pin(h2).await
                } else {
                    h1_server::serve(proxy, &mut io, buf, info, activity).await
                }
            };
            tokio::pin!(serving);
            let sleep = tokio::time::sleep(activity.next_check(*limits));
            tokio::pin!(sleep);
            let mut seen = self.shutdown.clone();
            let stop = self.shutdown.changed();
            tokio::pin!(stop);
            let mut armed = false;
            let mut shutting_down = false;
            let ended = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = serving.as_mut().poll(cx) {
                    return Poll::Ready(r.err().map(|e| e.to_string()));
                }
                // The watchdog's timer and the shutdown signal keep this task's
                // waker from their first poll; after that they are looked at (a
                // load each) when the connection wakes, not polled every time.
                // Unconstrained: a poll refused by tokio's per-task budget (a
                // connection that has just done a lot of I/O) would register
                // nothing, and with no second poll the watchdog would be off.
                if !armed {
                    armed = true;
                    let _ = Pin::new(&mut tokio::task::unconstrained(stop.as_mut())).poll(cx);
                    let _ = Pin::new(&mut tokio::task::unconstrained(sleep.as_mut())).poll(cx);
                }
                if !shutting_down && seen.has_changed().unwrap_or(true) {
                    shutting_down = true;
                    seen.mark_unchanged();
                    // HTTP/2 winds down by itself (`serve_h2`); HTTP/1 closes now
                    // between requests, else after the answer.
                    if !activity.http2.load(Ordering::Relaxed) {
                        if activity.in_flight.load(Ordering::Relaxed) == 0 {
                            return Poll::Ready(Some("shutting down".into()));
                        }
                        activity.closing.store(true, Ordering::Relaxed);
                    }
                }
                if sleep.is_elapsed() {
                    if let Some(why) = activity.expired(*limits) {
                        return Poll::Ready(Some(why.into()));
                    }
                    let next = tokio::time::Instant::now() + activity.next_check(*limits);
                    sleep.as_mut().reset(next);
                    let _ = Pin::new(&mut tokio::task::unconstrained(sleep.as_mut())).poll(cx);
                }
                Poll::Pending
            })
            .await;
            if let Some(why) = ended {
                tracing::debug!(peer = %info.peer, why, "connection closed");
            }
        }
    }
}

/// Reads a connection's first bytes until they are, or cannot be, the
/// HTTP/2 preface; what was read stays in `buf`.
async fn opens_with_preface<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
) -> io::Result<bool> {
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(false);
        }
        if n == H2_PREFACE.len() {
            return Ok(true);
        }
        buf.reserve(8 << 10);
        if io.read_buf(buf).await? == 0 {
            return Ok(false);
        }
    }
}

/// What an HTTP/2 connection's streams share.
struct H2Streams<'a> {
    activity: &'a Arc<Activity>,
    send_timeout: Duration,
}

/// Serves an HTTP/2 connection with hyper; on shutdown it sends GOAWAY and
/// lets open streams finish.
async fn serve_h2<T>(
    proxy: Arc<Proxy>,
    builder: &http2::Builder<TokioExecutor>,
    io: T,
    info: ConnInfo,
    streams: H2Streams<'_>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = streams.activity.clone();
    let send_timeout = streams.send_timeout;
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let proxy = proxy.clone();
        let in_flight = activity.begin();
        async move {
            let req = req.map(RequestBody::Http2);
            let (mut answer, tags) = Proxy::handle(&proxy, req, info, in_flight).await;
            tags.insert_into(answer.headers_mut());
            // A whole answer is in memory already; a stream still holds its
            // upstream and backend slot.
            if hyper::body::Body::size_hint(answer.body())
                .exact()
                .is_none()
            {
                answer = answer.map(|body| pumped(body, send_timeout));
            }
            Ok::<_, std::convert::Infallible>(answer)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    r.map_err(io::Error::other)
}

/// An HTTP/2 streamed answer, moved by its own task through a channel of one
/// frame. hyper does not poll the body of a stream whose flow-control window
/// the client keeps shut, so the body cannot time that itself: the pump
/// does, and when a frame has waited `send_timeout` for the client to take it
/// the pump drops the answer, which cancels its request (upstream closed,
/// backend slot freed, budget settled). The client's stream is reset when
/// hyper next polls it (once the client opens its window; until then the
/// frames already handed over stay with it). A client that resets the stream
/// meanwhile cancels it at once.
fn pumped(mut answer: Body, send_timeout: Duration) -> Body {
    use http_body_util::BodyExt as _;
    let (tx, rx) = mpsc::channel(1);
    let ended = Arc::new(PumpEnd::default());
    let end = ended.clone();
    tokio::spawn(async move {
        loop {
            let frame = tokio::select! {
                frame = answer.frame() => frame,
                () = tx.closed() => return,
            };
            let Some(frame) = frame else {
                end.finish(answer);
                return;
            };
            let broke = frame.is_err();
            // The timer only when the client has not taken the last frame.
            let slot = match tx.try_reserve() {
                Ok(slot) => slot,
                Err(mpsc::error::TrySendError::Closed(())) => return,
                Err(mpsc::error::TrySendError::Full(())) => {
                    match tokio::time::timeout(send_timeout, tx.reserve()).await {
                        Ok(Ok(slot)) => slot,
                        Ok(Err(_)) => return,
                        Err(_) => {
                            tracing::debug!(
                                "an HTTP/2 client stopped reading its stream; cancelled"
                            );
                            return;
                        }
                    }
                }
            };
            slot.send(frame);
            if broke {
                // Nothing is read from a body after its error.
                return;
            }
        }
    });
    Pumped { rx, ended }.boxed()
}

/// How a pump ended, shared with the client's end.
#[derive(Default)]
struct PumpEnd {
    /// The answer ended cleanly and every frame was handed over.
    finished: AtomicBool,
    /// The ended answer, kept until the client's end is dropped: its request
    /// counts as open (`InFlight`) until its last frames have left.
    answer: std::sync::Mutex<Option<Body>>,
}

impl PumpEnd {
    fn finish(&self, answer: Body) {
        *self
            .answer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(answer);
        self.finished.store(true, Ordering::Release);
    }
}

/// The client's end of [`pumped`]: the answer's frames, then its end, or an
/// error if the pump stopped before the end.
struct Pumped {
    rx: mpsc::Receiver<Result<hyper::body::Frame<Bytes>, BoxError>>,
    ended: Arc<PumpEnd>,
}

impl hyper::body::Body for Pumped {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) if !self.ended.finished.load(Ordering::Acquire) => {
                Poll::Ready(Some(Err("the answer was cancelled".into())))
            }
            other => other,
        }
    }

    /// Lets hyper mark the last frame as the end (no empty DATA frame after).
    fn is_end_stream(&self) -> bool {
        // Every frame was sent before `finished` was set.
        self.ended.finished.load(Ordering::Acquire) && self.rx.is_empty()
    }
}

/// A connection whose first bytes were already read: they are read again
/// first.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what calling `f` returns, without calling it.
    fn returned_size<A, B, C, R>(_: fn(A, B, C) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    #[test]
    fn a_resting_connection_holds_a_small_task() {
        // Every resting keep-alive connection keeps its task's future
        // whole: room in it for a request's work (a handler's 5 KB, an
        // answer's writing, a parsed head) is memory times the clients'
        // pools (docs/benchmarks.md). That work lives in a box per request.
        let size = returned_size(Conn::serve::<Watched<TcpStream>>);
        assert!(size <= 1024, "a plain connection's task is {size} bytes");
    }

    async fn preface(parts: &[&'static [u8]]) -> (bool, BytesMut) {
        let mut io: Box<dyn AsyncRead + Unpin> = Box::new(&b""[..]);
        for part in parts.iter().rev() {
            io = Box::new(AsyncReadExt::chain(*part, io));
        }
        let mut buf = BytesMut::new();
        (opens_with_preface(&mut io, &mut buf).await.unwrap(), buf)
    }

    #[tokio::test]
    async fn the_http2_preface_is_recognised_in_one_read_or_split() {
        assert!(preface(&[H2_PREFACE]).await.0);
        let split: Vec<&'static [u8]> = H2_PREFACE.chunks(5).collect();
        let (h2, buf) = preface(&split).await;
        assert!(h2);
        assert_eq!(&buf[..], H2_PREFACE, "kept to be read again");
        // The preface and the first frame in one read.
        assert!(
            preface(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"])
                .await
                .0
        );
    }

    #[tokio::test]
    async fn anything_else_is_http1_decided_at_the_first_difference() {
        for first in [
            &b"POST /v1/chat/completions HTTP/1.1\r\n"[..],
            b"PRI * HTTP/1.1\r\n",
            b"P",
        ] {
            let (h2, buf) = preface(&[first, b"OST / HTTP/1.1\r\n"]).await;
            assert!(!h2, "{first:?}");
            assert!(buf.starts_with(first), "what was read is kept");
        }
        // A connection closed before deciding is not HTTP/2.
        assert!(!preface(&[b"PRI * HT"]).await.0);
    }

    #[test]
    fn a_head_is_timed_from_its_first_byte_and_not_while_a_request_is_open() {
        let limits = ConnLimits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            send: Duration::from_secs(60),
        };
        let a = Arc::new(Activity::accepted());
        // Just accepted: the first head is due within the header timeout.
        assert!(a.next_check(limits) <= limits.header_read);
        assert_eq!(a.expired(limits), None);
        let open = a.begin();
        assert_eq!(a.head_age(), None);
        a.on_read(); // body bytes of the open request
        assert_eq!(a.head_age(), None);
        drop(open);
        // Resting between requests: no head deadline, only the idle one
        // (looked at once per header timeout, for a head starting later).
        assert_eq!(a.head_age(), None);
        assert!(a.next_check(limits) <= limits.header_read);
        a.on_read(); // the next head's first bytes
        assert!(a.head_age().is_some());
        a.set_http2();
        assert_eq!(a.head_age(), None);
        assert!(
            a.next_check(limits) > limits.header_read,
            "HTTP/2: idle only"
        );
    }

    #[test]
    fn zero_timeouts_close_at_once_and_never_spin_the_watchdog() {
        let zero = ConnLimits {
            header_read: Duration::ZERO,
            idle: Duration::ZERO,
            send: Duration::ZERO,
        };
        let a = Arc::new(Activity::accepted());
        assert!(a.expired(zero).is_some());
        let _open = a.begin();
        assert_eq!(
            a.expired(zero),
            None,
            "an open request is cut only by a stall"
        );
        assert_eq!(a.next_check(zero), MIN_CHECK);
    }

    #[test]
    fn a_stalled_write_cuts_even_an_open_request_and_a_written_byte_clears_it() {
        let limits = ConnLimits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            send: Duration::ZERO,
        };
        let a = Arc::new(Activity::accepted());
        let _open = a.begin();
        assert_eq!(a.expired(limits), None);
        a.on_write(&Poll::Ready(Ok(10)));
        assert_eq!(a.expired(limits), None, "writes that progress are no stall");
        a.on_write(&Poll::Pending);
        assert_eq!(
            a.expired(limits),
            Some("the client stopped reading its answer")
        );
        a.on_write(&Poll::Ready(Ok(1)));
        assert_eq!(a.expired(limits), None, "the client read again");
        // A stall is looked at within one send timeout of its start.
        let send = Duration::from_secs(3);
        a.on_write(&Poll::Pending);
        assert!(a.next_check(ConnLimits { send, ..limits }) <= send);
    }
}
