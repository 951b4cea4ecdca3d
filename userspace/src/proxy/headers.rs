//! Header handling shared by every request: hop-by-hop stripping (RFC 9110
//! §7.6.1), the request id, `x-forwarded-for`.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use hyper::{
    HeaderMap,
    header::{self, HeaderName, HeaderValue},
};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_KEDGE_CLASS: HeaderName = HeaderName::from_static("x-kedge-class");
pub const X_KEDGE_TENANT: HeaderName = HeaderName::from_static("x-kedge-tenant");
/// The arm that answered and why (when `[routing] explain_header`).
pub const X_KEDGE_ROUTE: HeaderName = HeaderName::from_static("x-kedge-route");

/// The client's `x-request-id` if it sent a sane one, else a fresh one.
pub fn request_id(headers: &HeaderMap) -> String {
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

/// The headers a `Connection` header names (hop-by-hop for this connection).
pub fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The fixed hop-by-hop headers of RFC 9110 §7.6.1 that `http` names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Their legacy kin, which `http` has no constants for.
const LEGACY_HOP_BY_HOP: [&str; 2] = ["keep-alive", "proxy-connection"];

/// The fixed hop-by-hop headers of RFC 9110 §7.6.1 (and their legacy kin).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || LEGACY_HOP_BY_HOP.contains(&name.as_str())
}

/// Removes the hop-by-hop headers of RFC 9110 §7.6.1, including those the
/// `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in LEGACY_HOP_BY_HOP {
        headers.remove(name);
    }
}

pub fn append_forwarded_for(headers: &mut HeaderMap, ip: IpAddr) {
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
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
    fn hop_by_hop_names() {
        for name in [
            "connection",
            "te",
            "keep-alive",
            "proxy-connection",
            "upgrade",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_hop_by_hop(&header::CONTENT_TYPE));
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-a, X-B"));
        h.append(header::CONNECTION, HeaderValue::from_static("close"));
        let named = connection_named(&h);
        assert_eq!(named.len(), 3);
        assert!(named.contains(&HeaderName::from_static("x-b")));
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
}
