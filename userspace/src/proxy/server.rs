//! The listener: accept, read the connection's kernel tag, terminate TLS,
//! serve HTTP/1.1 and HTTP/2 (h2c by preface, or ALPN), and keep slow or idle
//! clients from holding resources.
//!
//! Limits per connection: the TLS handshake and every HTTP/1 request head must
//! arrive within `header_read_timeout_ms`; a connection with no request in
//! flight and no bytes moving for `idle_timeout_ms` is closed (this also covers
//! a client that connects and sends nothing, or stalls an HTTP/2 preface).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;

use super::{Proxy, ProxySlot, headers::PeerText};
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

/// When a connection last moved bytes, and how many requests it has open.
/// Stamped on every read and write, so by the coarse clock (a tick is far
/// below any idle timeout).
#[derive(Default)]
pub struct Activity {
    /// [`clock::coarse_ms`] of the last read or write.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(clock::coarse_ms(), Ordering::Relaxed);
    }

    /// How long the connection has been quiet.
    fn quiet(&self) -> Duration {
        Duration::from_millis(
            clock::coarse_ms().saturating_sub(self.last_ms.load(Ordering::Relaxed)),
        )
    }

    /// Marks a request open until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
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
            self.activity.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
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
        };
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read)
            .max_buf_size(64 * 1024);
        // No HTTP/2 keep-alive pings: answered pings would count as activity
        // and keep an idle connection open forever; the idle watchdog decides.
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(256)
            .max_header_list_size(64 * 1024);
        let builder = Arc::new(builder);
        let graceful = GracefulShutdown::new();
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
            let watcher = graceful.watcher();
            let builder = builder.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let activity = Arc::new(Activity::default());
                activity.touch();
                let stream = Watched {
                    inner: stream,
                    activity: activity.clone(),
                };
                match tls {
                    None => {
                        serve_conn(proxy, &builder, watcher, stream, info, activity, limits).await
                    }
                    Some(acceptor) => {
                        match tokio::time::timeout(limits.header_read, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(tls_stream)) => {
                                serve_conn(
                                    proxy, &builder, watcher, tls_stream, info, activity, limits,
                                )
                                .await
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            });
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(Duration::from_secs(10)) => {
                tracing::warn!("in-flight requests still running after 10 s; closing them");
            }
        }
    }
}

async fn serve_conn<T>(
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    io: T,
    info: ConnInfo,
    activity: Arc<Activity>,
    limits: ConnLimits,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn_activity = activity.clone();
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let proxy = proxy.clone();
        let in_flight = conn_activity.begin();
        async move {
            Ok::<_, std::convert::Infallible>(Proxy::handle(&proxy, req, info, in_flight).await)
        }
    });
    let conn = watcher.watch(builder.serve_connection(TokioIo::new(io), svc).into_owned());
    tokio::pin!(conn);
    loop {
        // While a request is open (a long stream may be quiet) only look again later.
        let deadline = if activity.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + limits.idle
        } else {
            Instant::now() + limits.idle.saturating_sub(activity.quiet())
        };
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let idle = activity.quiet() >= limits.idle;
                if idle && activity.in_flight.load(Ordering::Relaxed) == 0 {
                    tracing::debug!(peer = %info.peer, "closing an idle connection");
                    return;
                }
            }
        }
    }
}
