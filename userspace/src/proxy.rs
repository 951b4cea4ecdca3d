//! The proxy listener: accept, tag the connection, forward `/v1/*` upstream.
//!
//! A request's path, top to bottom: `serve` accepts and reads the connection's
//! kernel tag once; `handle` checks the route, forwards with hop-by-hop headers
//! stripped (RFC 9110 §7.6.1) and streams the answer back unbuffered.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    service::service_fn,
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::{net::TcpListener, sync::watch};

use crate::{cidr::CidrTable, config::Loaded, kernel::TagReader, metrics::Metrics};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

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

    fn tag(&self, stream: &tokio::net::TcpStream, peer: IpAddr) -> (u32, u32) {
        match self {
            Tags::Kernel(reader) => reader.tag(stream, peer),
            Tags::Table {
                table,
                default_class,
            } => table.lookup(peer).copied().unwrap_or((*default_class, 0)),
        }
    }
}

/// Who a connection belongs to, fixed when it is accepted.
#[derive(Clone, Copy, Debug)]
struct ConnTag {
    class: u32,
    tenant: u32,
}

pub struct Proxy {
    cfg: Arc<Loaded>,
    client: Client<HttpConnector, Incoming>,
    tags: Tags,
    metrics: Arc<Metrics>,
}

impl Proxy {
    pub fn new(cfg: Arc<Loaded>, tags: Tags, metrics: Arc<Metrics>) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Proxy {
            cfg,
            client,
            tags,
            metrics,
        }
    }

    /// Accepts until `shutdown` flips, then lets in-flight requests finish (bounded).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
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
            let (class, tenant) = self.tags.tag(&stream, peer.ip());
            let tag = ConnTag { class, tenant };
            tracing::debug!(%peer, class = self.cfg.class_name(class), tenant, "accepted");
            let proxy = self.clone();
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(proxy.handle(req, tag, peer).await) }
            });
            let conn = graceful.watch(
                builder
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned(),
            );
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "connection ended with an error");
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

    async fn handle(
        &self,
        req: Request<Incoming>,
        tag: ConnTag,
        peer: SocketAddr,
    ) -> Response<Body> {
        let request_id = request_id(req.headers());
        let mut resp = self.forward(req, &request_id, peer).await;
        let class = self.cfg.class_name(tag.class);
        let tenant = self.cfg.tenant_name(tag.tenant).unwrap_or("-");
        self.metrics
            .requests
            .with_label_values(&[class, tenant, resp.status().as_str()])
            .inc();
        tracing::info!(
            request_id = %request_id,
            %peer,
            class,
            tenant,
            status = resp.status().as_u16(),
            "request"
        );
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            h.insert(X_REQUEST_ID, v);
        }
        if let Ok(v) = HeaderValue::from_str(class) {
            h.insert(X_KEDGE_CLASS, v);
        }
        if let Ok(v) = HeaderValue::from_str(tenant) {
            h.insert(X_KEDGE_TENANT, v);
        }
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        peer: SocketAddr,
    ) -> Response<Body> {
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if !path.starts_with("/v1/") {
            return openai_error(
                StatusCode::NOT_FOUND,
                &format!("Unknown path {}", req.uri().path()),
                "invalid_request_error",
                "not_found",
            );
        }
        let upstream = &self.cfg.upstream;
        let uri = match Uri::builder()
            .scheme(upstream.scheme_str().unwrap_or("http"))
            .authority(upstream.authority().map(|a| a.as_str()).unwrap_or_default())
            .path_and_query(path)
            .build()
        {
            Ok(u) => u,
            Err(_) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "Invalid request target",
                    "invalid_request_error",
                    "bad_path",
                );
            }
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        parts.version = hyper::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        if let Ok(v) = HeaderValue::from_str(request_id) {
            parts.headers.insert(X_REQUEST_ID, v);
        }
        append_forwarded_for(&mut parts.headers, peer.ip());

        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, body.map_err(|e| Box::new(e) as BoxError).boxed())
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream request failed");
                openai_error(
                    StatusCode::BAD_GATEWAY,
                    "The upstream model server could not be reached",
                    "upstream_error",
                    "upstream_unavailable",
                )
            }
        }
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_KEDGE_CLASS: HeaderName = HeaderName::from_static("x-kedge-class");
const X_KEDGE_TENANT: HeaderName = HeaderName::from_static("x-kedge-tenant");

/// The client's `x-request-id` if it sent a sane one, else a fresh one.
fn request_id(headers: &HeaderMap) -> String {
    if let Some(v) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_graphic())
    {
        return v.to_string();
    }
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (std::process::id() as u64) << 32
    });
    format!(
        "kedge-{start:016x}-{:08x}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including those the
/// `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// An error in OpenAI's shape: `{"error":{"message","type","code"}}`.
pub fn openai_error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "message": message, "type": kind, "param": null, "code": code }
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn request_id_is_propagated_or_generated() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert!(a.starts_with("kedge-") && a != b);
        h.insert(X_REQUEST_ID, HeaderValue::from_static(""));
        assert!(request_id(&h).starts_with("kedge-"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "192.0.2.1".parse().unwrap());
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, ::1");
    }

    #[tokio::test]
    async fn errors_have_openai_shape() {
        let resp = openai_error(
            StatusCode::NOT_FOUND,
            "nope",
            "invalid_request_error",
            "not_found",
        );
        assert_eq!(resp.status(), 404);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["message"], "nope");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "not_found");
    }
}
