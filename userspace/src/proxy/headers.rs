//! Header handling shared by every request: hop-by-hop filtering (RFC 9110
//! §7.6.1), the request id, `x-forwarded-for`, and the client's headers
//! rendered once for the upstream request.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
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
/// Shared: the request context, its log lines and its ledger row hold it.
pub fn request_id(headers: &HeaderMap) -> Arc<str> {
    if let Some(v) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok())
        && !v.is_empty()
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_graphic())
    {
        return Arc::from(v);
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
    // `kedge-{start:016x}-{n:08x}`, written in place: one allocation, the Arc's.
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut id = *b"kedge-0000000000000000-00000000";
    hex_into(&mut id[6..22], start);
    hex_into(&mut id[23..], n);
    Arc::from(std::str::from_utf8(&id).unwrap_or("kedge"))
}

/// The low `out.len()` hex digits of `value`, lower case, into `out`.
fn hex_into(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
    }
}

/// A peer address as text, formatted once per connection (it is the
/// `x-forwarded-for` of every request on it).
#[derive(Clone, Copy)]
pub struct PeerText {
    len: u8,
    /// Long enough for any IPv6 address, IPv4-mapped included.
    text: [u8; 45],
}

impl PeerText {
    pub fn new(ip: IpAddr) -> PeerText {
        use std::io::Write as _;
        let mut text = [0u8; 45];
        let mut out = &mut text[..];
        // Every IpAddr fits; a failure would leave the text short, not wrong.
        let _ = write!(out, "{ip}");
        let len = 45 - out.len();
        PeerText {
            len: len as u8,
            text,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..self.len as usize]
    }
}

/// The client's headers as the upstream gets them, rendered once per
/// request (every attempt of a failover sends the same lines). The client's
/// `Authorization` is kept apart: a backend with its own key replaces it.
pub struct Forwarded {
    /// `name: value\r\n` lines.
    pub lines: Vec<u8>,
    pub authorization: Option<HeaderValue>,
}

impl Forwarded {
    /// `client`'s end-to-end headers for which `keep` holds, then `extra`
    /// ones, then `x-forwarded-for` with `peer` appended. Hop-by-hop
    /// headers, those the `Connection` header names, `host` and
    /// `content-length` (the upstream request has its own) never pass.
    pub fn render(
        client: &HeaderMap,
        keep: impl Fn(&HeaderName) -> bool,
        extra: &[(&str, &[u8])],
        peer: &PeerText,
    ) -> Forwarded {
        let named = connection_named(client);
        let mut lines = Vec::with_capacity(256);
        let mut authorization = None;
        let mut forwarded_for: Option<&HeaderValue> = None;
        for (name, value) in client {
            if is_hop_by_hop(name)
                || *name == header::HOST
                || *name == header::CONTENT_LENGTH
                || named.contains(name)
                || !keep(name)
            {
                continue;
            }
            if *name == header::AUTHORIZATION {
                authorization = Some(value.clone());
            } else if name.as_str() == "x-forwarded-for" {
                // Several lines are one list; the last is appended to below.
                if let Some(prev) = forwarded_for.replace(value) {
                    push_line(&mut lines, name.as_str(), prev.as_bytes());
                }
            } else {
                push_line(&mut lines, name.as_str(), value.as_bytes());
            }
        }
        for (name, value) in extra {
            push_line(&mut lines, name, value);
        }
        lines.extend_from_slice(b"x-forwarded-for: ");
        if let Some(prev) = forwarded_for {
            lines.extend_from_slice(prev.as_bytes());
            lines.extend_from_slice(b", ");
        }
        lines.extend_from_slice(peer.as_bytes());
        lines.extend_from_slice(b"\r\n");
        Forwarded {
            lines,
            authorization,
        }
    }
}

fn push_line(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
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

/// The fixed hop-by-hop headers of RFC 9110 §7.6.1, lower case.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    // Their legacy kin.
    "keep-alive",
    "proxy-connection",
];

/// The fixed hop-by-hop headers of RFC 9110 §7.6.1 (and their legacy kin).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // A `HeaderName` is lower case already.
    HOP_BY_HOP.contains(&name.as_str())
}

/// [`is_hop_by_hop`] for a header name as it came off the wire.
pub fn is_hop_by_hop_name(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(h: &HeaderMap, keep: impl Fn(&HeaderName) -> bool) -> (String, Option<HeaderValue>) {
        let peer = PeerText::new("192.0.2.1".parse().unwrap());
        let f = Forwarded::render(h, keep, &[("content-type", b"application/json")], &peer);
        (String::from_utf8(f.lines).unwrap(), f.authorization)
    }

    #[test]
    fn forwards_end_to_end_headers_only() {
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
        h.insert(header::HOST, HeaderValue::from_static("kedge"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.insert("x-kedge-tenant", HeaderValue::from_static("t"));
        h.insert("x-trace", HeaderValue::from_static("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        let (lines, auth) = render(&h, |n| n.as_str() != "x-kedge-tenant");
        assert_eq!(
            lines,
            "x-trace: abc\r\ncontent-type: application/json\r\nx-forwarded-for: 192.0.2.1\r\n"
        );
        assert_eq!(auth.unwrap(), "Bearer k");
    }

    #[test]
    fn forwarded_for_appends_the_peer() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        h.append("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let (lines, _) = render(&h, |_| true);
        assert!(
            lines.ends_with(
                "x-forwarded-for: 198.51.100.7\r\ncontent-type: application/json\r\n\
                 x-forwarded-for: 203.0.113.9, 192.0.2.1\r\n"
            ),
            "{lines}"
        );
        let v6 = PeerText::new("::ffff:255.255.255.255".parse().unwrap());
        assert_eq!(v6.as_bytes(), b"::ffff:255.255.255.255");
        let long = PeerText::new("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap());
        assert_eq!(long.as_bytes().len(), 39);
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
        assert_eq!(&*request_id(&h), "abc-123");
        let a = request_id(&HeaderMap::new());
        let b = request_id(&HeaderMap::new());
        assert!(a.starts_with("kedge-") && a != b);
        // kedge-<16 hex: process start>-<8 hex: counter>
        assert_eq!((a.len(), &a[22..23]), (31, "-"), "{a}");
        assert!(
            a[6..22]
                .bytes()
                .chain(a[23..].bytes())
                .all(|c| c.is_ascii_hexdigit())
        );
        let next = |id: &str| u32::from_str_radix(&id[23..], 16).unwrap();
        assert!(next(&b) > next(&a));
        h.insert(X_REQUEST_ID, HeaderValue::from_static(""));
        assert!(request_id(&h).starts_with("kedge-"));
    }
}
