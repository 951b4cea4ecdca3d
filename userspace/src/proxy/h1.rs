//! The upstream HTTP/1.1 client: a pool of keep-alive connections per backend,
//! each request written and its answer read by the request's own task.
//!
//! Why not hyper's client: it runs every connection as a task of its own and
//! hands the request, the response head and every body chunk across channels
//! between that task and the request's. On the proxy's path those hand-overs
//! (a wake-up and a scheduler round each) cost more CPU than the HTTP work
//! (docs/benchmarks.md). Here the task serving the client reads the upstream
//! socket itself: a whole answer costs one write and usually one read, a
//! streamed one a read per burst of events, with nothing in between.
//!
//! Scope: what OpenAI-compatible backends speak. HTTP/1.1 over TCP or TLS
//! (ALPN `http/1.1`); bodies framed by content-length, chunked or the
//! connection's close; keep-alive. No pipelining, no upgrades, no HTTP/2
//! upstream (clients may still speak HTTP/2 to kedge).

use std::{
    fmt,
    io::{self, Write as _},
    mem::MaybeUninit,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker, ready},
    time::{Duration, Instant},
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::{
    HeaderMap, Method, Response, StatusCode, Version,
    header::{HeaderName, HeaderValue},
};
use rustls::{ClientConfig, pki_types::ServerName};
use smallvec::SmallVec;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::headers;

/// Idle connections kept per backend.
const MAX_IDLE: usize = 64;
/// An idle connection older than this is closed rather than reused (servers
/// close theirs after a while; vLLM's uvicorn after 5 s by default, which the
/// staleness check and the one retry below absorb).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most bytes of a response head.
const MAX_HEAD: usize = 64 << 10;
/// Most header lines of a response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line (extensions included), as hyper's
/// bound on chunk extensions: a line dribbled in is searched again after
/// every read, so its length bounds that work.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 << 10;
/// A body up to this size goes out in the same write as the head.
const INLINE_BODY: usize = 32 << 10;

/// Why a request failed.
#[derive(Debug)]
pub enum Error {
    /// No connection: refused, unreachable, timed out, TLS handshake failed.
    /// Nothing was sent.
    Connect(io::Error),
    /// The connection failed while sending or receiving.
    Io(io::Error),
    /// The answer was not HTTP/1.x as this client reads it.
    Protocol(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect(e) => write!(f, "connect: {e}"),
            Error::Io(e) => write!(f, "connection: {e}"),
            Error::Protocol(what) => write!(f, "protocol: {what}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect(e) | Error::Io(e) => Some(e),
            Error::Protocol(_) => None,
        }
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One upstream connection and what was read from it but not yet used.
struct Conn {
    io: Stream,
    read: BytesMut,
    /// Taken from the pool (the server may have closed it meanwhile).
    reused: bool,
}

impl Conn {
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }

    /// Whether an idle connection has been closed (or spoken out of turn) by
    /// the server. Looks at what the reactor already knows, without waiting.
    fn looks_closed(&self) -> bool {
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        match self.io.tcp().poll_peek(&mut cx, &mut buf) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => true,
            // A plain connection has nothing to say between answers; over TLS
            // the bytes may be a session ticket, which the next read takes.
            Poll::Ready(Ok(_)) => matches!(self.io, Stream::Plain(_)),
        }
    }
}

/// Where a backend is and how to reach it.
pub struct Client {
    host: String,
    port: u16,
    /// The `Host` header.
    authority: HeaderValue,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl Client {
    /// `tls`: for an `https` backend; its ALPN is set to `http/1.1` here.
    pub fn new(
        uri: &hyper::Uri,
        tls: Option<ClientConfig>,
        connect_timeout: Duration,
    ) -> anyhow::Result<Arc<Client>> {
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("the URL {uri} has no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let tls = match tls {
            Some(mut config) => {
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let name = ServerName::try_from(host.clone())
                    .map_err(|e| anyhow::anyhow!("{host} is not a TLS server name: {e}"))?;
                Some((TlsConnector::from(Arc::new(config)), name))
            }
            None => None,
        };
        Ok(Arc::new(Client {
            authority: HeaderValue::from_str(authority.as_str())?,
            host,
            port,
            tls,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }))
    }

    /// Sends one request and reads the answer's head; the body is read as the
    /// caller polls it, and the connection returns to the pool once the body
    /// has been read to its end. `lines` are rendered header lines
    /// (`name: value\r\n`) without `host`, `content-length`,
    /// `authorization` or hop-by-hop fields; the answer's head keeps only its
    /// end-to-end headers, minus `content-length` (kedge frames its own).
    pub async fn send(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        lines: &[u8],
        authorization: Option<&HeaderValue>,
        body: &Bytes,
    ) -> Result<Response<ResponseBody>, Error> {
        let (head, inline) = self.request_head(method, path, lines, authorization, body);
        loop {
            let mut conn = match self.checkout() {
                Some(conn) => conn,
                None => self.connect().await?,
            };
            match exchange(&mut conn, &head, (!inline).then_some(body), method).await {
                Ok(resp) => return Ok(resp.map(|framing| ResponseBody::new(self, conn, framing))),
                // The server closed the idle connection before it read the
                // request (its keep-alive timeout raced our reuse): nothing
                // was received, so nothing was processed. Once more on
                // another connection; a fresh one is never retried.
                Err(Failure::BeforeAnswer(_)) if conn.reused => continue,
                Err(Failure::BeforeAnswer(e) | Failure::Other(e)) => return Err(e),
            }
        }
    }

    fn request_head(
        &self,
        method: &Method,
        path: &str,
        lines: &[u8],
        authorization: Option<&HeaderValue>,
        body: &Bytes,
    ) -> (Vec<u8>, bool) {
        let inline = body.len() <= INLINE_BODY;
        let mut head = Vec::with_capacity(128 + lines.len() + if inline { body.len() } else { 0 });
        head.extend_from_slice(method.as_str().as_bytes());
        head.push(b' ');
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(self.authority.as_bytes());
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(lines);
        if let Some(auth) = authorization {
            head.extend_from_slice(b"authorization: ");
            head.extend_from_slice(auth.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == Method::POST {
            // Writing into a Vec cannot fail.
            let _ = write!(head, "content-length: {}\r\n", body.len());
        }
        head.extend_from_slice(b"\r\n");
        if inline {
            head.extend_from_slice(body);
        }
        (head, inline)
    }

    /// The most recently used idle connection that still looks open.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((mut conn, since)) = idle.pop() {
            if crate::clock::coarse_instant().saturating_duration_since(since) < IDLE_TIMEOUT
                && !conn.looks_closed()
            {
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((conn, crate::clock::coarse_instant()));
        }
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let timed_out = || Error::Connect(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let tcp = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| timed_out())?
            .map_err(Error::Connect)?;
        tcp.set_nodelay(true).map_err(Error::Connect)?;
        let io = match &self.tls {
            None => Stream::Plain(tcp),
            Some((connector, name)) => {
                let handshake = connector.connect(name.clone(), tcp);
                let tls = tokio::time::timeout(self.connect_timeout, handshake)
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(Error::Connect)?;
                Stream::Tls(Box::new(tls))
            }
        };
        Ok(Conn {
            io,
            read: BytesMut::new(),
            reused: false,
        })
    }
}

enum Failure {
    /// Failed before a byte of the answer arrived.
    BeforeAnswer(Error),
    Other(Error),
}

/// Writes the request, reads the answer's head; leaves the body's first bytes
/// in `conn.read`.
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    body: Option<&Bytes>,
    method: &Method,
) -> Result<Response<Framing>, Failure> {
    let sent = async {
        conn.io.write_all(head).await?;
        if let Some(body) = body {
            conn.io.write_all(body).await?;
        }
        conn.io.flush().await
    };
    sent.await
        .map_err(|e| Failure::BeforeAnswer(Error::Io(e)))?;
    loop {
        if !conn.read.is_empty() {
            match parse_head(&mut conn.read, method).map_err(Failure::Other)? {
                Some(Parsed::Informational) => {}
                Some(Parsed::Final(resp)) => return Ok(resp),
                None if conn.read.len() > MAX_HEAD => {
                    return Err(Failure::Other(Error::Protocol("response head too large")));
                }
                None => {}
            }
        }
        let nothing_yet = conn.read.is_empty();
        let failed = |e| {
            if nothing_yet {
                Failure::BeforeAnswer(e)
            } else {
                Failure::Other(e)
            }
        };
        match conn.fill().await {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the answer");
                return Err(failed(Error::Io(e)));
            }
            Ok(_) => {}
            Err(e) => return Err(failed(Error::Io(e))),
        }
    }
}

enum Parsed {
    /// A 1xx head (103 Early Hints, a stray 100 Continue): skipped.
    Informational,
    Final(Response<Framing>),
}

/// Takes the response head off the front of `buf`, if it is all there. The
/// header values are slices of the head's bytes (no copy); hop-by-hop
/// headers (RFC 9110 §7.6.1, and those `Connection` names) and
/// `content-length` only decide the framing and are not kept.
fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, Error> {
    // Uninitialised slots: zeroing 128 of them would cost more than the parse.
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut head, buf, &mut lines);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Protocol("too many headers")),
        Err(_) => return Err(Error::Protocol("not an HTTP/1.x response")),
    };
    let code = head.code.unwrap_or_default();
    let status = StatusCode::from_u16(code).map_err(|_| Error::Protocol("bad status code"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Protocol("upgrade not requested"));
        }
        buf.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let version = if head.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    // One pass over the lines: what they say about the framing, and where
    // each kept one lies in the head, to slice the frozen bytes (pushed in
    // place: a collected SmallVec is copied out whole).
    let base = buf.as_ptr() as usize;
    let mut facts = FramingLines::default();
    let mut kept = SmallVec::<[_; 16]>::new();
    for h in head.headers.iter() {
        if facts.read(h) || headers::is_hop_by_hop_name(h.name) {
            continue;
        }
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        kept.push((name, name + h.name.len(), value, value + h.value.len()));
    }
    if facts.connection {
        // The names `Connection` lists stop here too (rare: most list only
        // `close` or `keep-alive`).
        let named: Vec<&[u8]> = values(head.headers, "connection")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        kept.retain(|&mut (start, end, _, _)| {
            let name = &buf[start..end];
            !named.iter().any(|n| n.eq_ignore_ascii_case(name))
        });
    }
    let framing = facts.framing(status, method, version)?;
    let bytes = buf.split_to(len).freeze();
    // The tags kedge adds to every answer are written beside these over
    // HTTP/1 (`AnswerTags`); only HTTP/2 inserts them, and grows the map.
    let mut headers = HeaderMap::with_capacity(kept.len());
    for &(name_start, name_end, value_start, value_end) in &kept {
        let name = HeaderName::from_bytes(&bytes[name_start..name_end])
            .map_err(|_| Error::Protocol("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value_start..value_end))
            .map_err(|_| Error::Protocol("bad header value"))?;
        headers.append(name, value);
    }
    let mut resp = Response::new(framing);
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = headers;
    Ok(Some(Parsed::Final(resp)))
}

/// The values of every `name` header, in order.
fn values<'a>(
    all: &'a [httparse::Header<'a>],
    name: &'a str,
) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
    all.iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// What a response head's framing lines say (RFC 9112 §6.3), gathered in
/// the one pass over its lines.
#[derive(Default)]
struct FramingLines<'a> {
    /// A `Connection` line was there.
    connection: bool,
    /// One of them says `close`.
    close: bool,
    /// The last `Transfer-Encoding` value.
    transfer_encoding: Option<&'a [u8]>,
    /// The first `Content-Length` value, and whether a later one differs.
    length: Option<&'a [u8]>,
    lengths_differ: bool,
}

impl<'a> FramingLines<'a> {
    /// Takes in a line; `true` when it is one of these (none is forwarded:
    /// the framing is this hop's to say).
    fn read(&mut self, h: &httparse::Header<'a>) -> bool {
        let name = h.name;
        if name.eq_ignore_ascii_case("connection") {
            self.connection = true;
            self.close |= has_token(h.value, "close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            self.transfer_encoding = Some(h.value);
        } else if name.eq_ignore_ascii_case("content-length") {
            match self.length {
                None => self.length = Some(h.value),
                Some(first) => self.lengths_differ |= first != h.value,
            }
        } else {
            return false;
        }
        true
    }

    /// How the body ends, and whether the connection outlives it.
    fn framing(
        &self,
        status: StatusCode,
        method: &Method,
        version: Version,
    ) -> Result<Framing, Error> {
        let close = version == Version::HTTP_10 || self.close;
        let kind = if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Kind::Length(0)
        } else if let Some(last) = self.transfer_encoding {
            if has_token(last, "chunked") {
                Kind::Chunked(Chunk::Size)
            } else {
                Kind::UntilClose
            }
        } else {
            match self.length {
                None => Kind::UntilClose,
                Some(_) if self.lengths_differ => {
                    return Err(Error::Protocol("conflicting content-length"));
                }
                Some(first) => {
                    let n = std::str::from_utf8(first)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or(Error::Protocol("bad content-length"))?;
                    Kind::Length(n)
                }
            }
        };
        Ok(Framing {
            keep_alive: !close && !matches!(kind, Kind::UntilClose),
            kind,
        })
    }
}

/// Whether a comma-separated header value lists `token` (case-insensitively).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

pub struct Framing {
    kind: Kind,
    keep_alive: bool,
}

enum Kind {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Done,
}

enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// What the buffered bytes give.
pub(super) enum Step {
    Data(Bytes),
    More,
    End,
}

impl Framing {
    /// A request body's framing, for the client-facing server
    /// (`proxy/h1_server.rs`): chunked, or this many bytes. A request body
    /// is never delimited by the connection's close.
    pub(super) fn request(chunked: bool, length: u64) -> Framing {
        Framing {
            kind: if chunked {
                Kind::Chunked(Chunk::Size)
            } else {
                Kind::Length(length)
            },
            keep_alive: true,
        }
    }

    /// Takes the next piece of body out of `buf`.
    pub(super) fn step(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match &mut self.kind {
                Kind::Done | Kind::Length(0) => {
                    self.kind = Kind::Done;
                    return Ok(Step::End);
                }
                Kind::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Kind::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                Kind::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    if *left == 0 {
                        self.kind = Kind::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Kind::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Protocol("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.kind = Kind::Chunked(Chunk::Size);
                }
                Kind::Chunked(Chunk::Size) => {
                    let Some(len) = line_len(buf)? else {
                        return Ok(Step::More);
                    };
                    // Whitespace may come before a chunk extension's `;`
                    // (RFC 9112 §7.1.1), never before the size.
                    let size = buf[..len].split(|b| *b == b';').next().unwrap_or_default();
                    let size = chunk_size(size.trim_ascii_end())
                        .ok_or(Error::Protocol("bad chunk size"))?;
                    buf.advance(len + 2);
                    self.kind = Kind::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Kind::Chunked(Chunk::Trailers) => {
                    let Some(len) = line_len(buf)? else {
                        return Ok(Step::More);
                    };
                    buf.advance(len + 2);
                    if len == 0 {
                        self.kind = Kind::Done;
                    }
                }
            }
        }
    }

    /// The connection closed: the end of a close-delimited body, else a break.
    fn closed(&mut self) -> Result<(), Error> {
        match self.kind {
            Kind::UntilClose | Kind::Done => {
                self.kind = Kind::Done;
                Ok(())
            }
            _ => Err(Error::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the middle of the answer",
            ))),
        }
    }
}

/// A chunk-size line's hex digits (a streamed answer has one per event).
fn chunk_size(hex: &[u8]) -> Option<u64> {
    if hex.is_empty() || hex.len() > 15 {
        return None;
    }
    hex.iter().try_fold(0u64, |n, c| {
        let d = (*c as char).to_digit(16)?;
        Some(n << 4 | u64::from(d))
    })
}

/// The length of the CRLF-terminated line at the front of `buf` (without
/// the CRLF), once it has all arrived; the caller reads it in place and
/// advances over it (cutting it off as a buffer of its own cost a reference
/// count's round trip per chunk). Strict: a bare LF or CR, or any other
/// control byte but a tab, is an error. Request bodies are framed by this
/// too, and a lenient reading of chunk lines is how a front proxy and the
/// server behind it come to disagree on where a request ends (request
/// smuggling).
fn line_len(buf: &[u8]) -> Result<Option<usize>, Error> {
    match memchr::memchr(b'\n', buf) {
        Some(end) => {
            if end == 0 || buf[end - 1] != b'\r' {
                return Err(Error::Protocol("chunk line not ended by CRLF"));
            }
            if buf[..end - 1]
                .iter()
                .any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
            {
                return Err(Error::Protocol("control byte in a chunk line"));
            }
            Ok(Some(end - 1))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err(Error::Protocol("chunk line too long")),
        None => Ok(None),
    }
}

/// The body of an upstream answer, read from the connection as it is polled.
/// Read to its end, it puts the connection back in the pool; dropped before
/// that, it closes the connection, which tells the backend to stop.
pub struct ResponseBody {
    client: Arc<Client>,
    conn: Option<Conn>,
    framing: Framing,
}

impl ResponseBody {
    fn new(client: &Arc<Client>, conn: Conn, framing: Framing) -> ResponseBody {
        ResponseBody {
            client: client.clone(),
            conn: Some(conn),
            framing,
        }
    }

    /// The body has ended: the connection goes back to the pool if it can
    /// carry another request.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.framing.keep_alive
            && conn.read.is_empty()
        {
            self.client.checkin(conn);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let step = this.framing.step(&mut conn.read);
            match step {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::More) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let read = ready!(conn.poll_fill(cx));
            let ended = match read {
                Ok(0) => this.framing.closed(),
                Ok(_) => continue,
                Err(e) => Err(Error::Io(e)),
            };
            this.conn = None;
            return Poll::Ready(ended.err().map(Err));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || matches!(self.framing.kind, Kind::Done | Kind::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.kind {
            Kind::Length(n) => SizeHint::with_exact(n),
            Kind::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A loopback server that answers the n-th request (over all connections)
    /// with `answers[n]`, written in the given pieces; an answer's `close`
    /// closes its connection after it. Counts the connections it accepts.
    struct Script {
        answers: Vec<(Vec<&'static [u8]>, bool)>,
    }

    async fn serve(script: Script) -> (Arc<Client>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: hyper::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let answers = Arc::new(Mutex::new(script.answers.into_iter()));
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let answers = answers.clone();
                tokio::spawn(async move {
                    while read_request(&mut tcp).await {
                        let Some((pieces, close)) = answers.lock().unwrap().next() else {
                            return;
                        };
                        for piece in pieces {
                            tcp.write_all(piece).await.unwrap();
                            tcp.flush().await.unwrap();
                            tokio::task::yield_now().await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        let client = Client::new(&uri, None, Duration::from_secs(2)).unwrap();
        (client, accepted)
    }

    /// Reads one request (head and content-length body); false at EOF.
    async fn read_request(tcp: &mut TcpStream) -> bool {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    return true;
                }
            }
            let mut chunk = [0u8; 4096];
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn post(client: &Arc<Client>) -> Result<(StatusCode, Bytes), Error> {
        let lines = b"content-type: application/json\r\n";
        let resp = client
            .send(
                &Method::POST,
                "/v1/x",
                lines,
                None,
                &Bytes::from_static(b"{}"),
            )
            .await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    #[tokio::test]
    async fn content_length_answers_reuse_one_connection() {
        let answer: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"ngth: 11\r\n\r\nhello",
            b" world",
        ];
        let (client, accepted) = serve(Script {
            answers: vec![(answer.clone(), false), (answer, false)],
        })
        .await;
        for _ in 0..2 {
            let (status, body) = post(&client).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, "hello world");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn chunked_answers_are_decoded_across_any_split() {
        let answer: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r",
            b"\n6\r\n world\r\n0\r\nx-trailer: 1\r\n",
            b"\r\n",
        ];
        let (client, accepted) = serve(Script {
            answers: vec![(answer.clone(), false), (answer, false)],
        })
        .await;
        for _ in 0..2 {
            assert_eq!(post(&client).await.unwrap().1, "hello world");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "reused after the trailers"
        );
    }

    #[tokio::test]
    async fn a_close_delimited_answer_ends_at_eof_and_is_not_reused() {
        let answer: Vec<&'static [u8]> = vec![b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it"];
        let (client, accepted) = serve(Script {
            answers: vec![(answer.clone(), true), (answer, true)],
        })
        .await;
        for _ in 0..2 {
            assert_eq!(post(&client).await.unwrap().1, "all of it");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_server_closed_is_replaced() {
        // The server closes after its first answer without saying so.
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (client, accepted) = serve(Script {
            answers: vec![(vec![ok], true), (vec![ok], false)],
        })
        .await;
        assert_eq!(post(&client).await.unwrap().1, "ok");
        assert_eq!(post(&client).await.unwrap().1, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_early_closes_its_connection() {
        let answer: Vec<&'static [u8]> =
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"];
        let (client, accepted) = serve(Script {
            answers: vec![(answer.clone(), false), (answer, false)],
        })
        .await;
        let resp = client
            .send(&Method::GET, "/", b"", None, &Bytes::new())
            .await
            .unwrap();
        drop(resp);
        assert_eq!(post(&client).await.unwrap().1, "abcd");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn chunk_sizes_are_hex_with_bounds() {
        assert_eq!(chunk_size(b"0"), Some(0));
        assert_eq!(chunk_size(b"1aF"), Some(0x1af));
        assert_eq!(chunk_size(b"fffffffffffffff"), Some(0xfff_ffff_ffff_ffff));
        for bad in [&b""[..], b"g", b"-1", b"+1", b"1 2", b"ffffffffffffffff"] {
            assert_eq!(chunk_size(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_head_keeps_end_to_end_headers_as_slices() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nx-hop: 1\r\n\
               Keep-Alive: timeout=5\r\nContent-Length: 2\r\ncontent-type: text/plain\r\n\
               x-ratelimit-remaining: 7\r\n\r\nok"[..],
        );
        let Some(Parsed::Final(resp)) = parse_head(&mut buf, &Method::POST).unwrap() else {
            panic!("a final head");
        };
        let names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-ratelimit-remaining"]);
        assert_eq!(resp.headers()["x-ratelimit-remaining"], "7");
        assert!(matches!(resp.body().kind, Kind::Length(2)) && resp.body().keep_alive);
        assert_eq!(&buf[..], b"ok", "the body's first bytes stay in the buffer");
        // `Connection: close` ends the connection with the body; so does HTTP/1.0.
        for head in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(head);
            let Some(Parsed::Final(resp)) = parse_head(&mut buf, &Method::POST).unwrap() else {
                panic!("a final head");
            };
            assert!(!resp.body().keep_alive);
        }
    }

    #[test]
    fn framing_lines_are_read_in_one_pass_whatever_their_order() {
        let head = |text: &str| parse_head(&mut BytesMut::from(text), &Method::POST);
        // A name listed by a `Connection` line further down still stops here.
        let Some(Parsed::Final(resp)) =
            head("HTTP/1.1 200 OK\r\nx-hop: 1\r\ncontent-length: 0\r\nConnection: X-Hop\r\n\r\n")
                .unwrap()
        else {
            panic!("a final head");
        };
        assert!(resp.headers().is_empty());
        // The last transfer coding decides; a length beside it does not count.
        let Some(Parsed::Final(resp)) = head(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 3\r\n\
             transfer-encoding: chunked\r\n\r\n",
        )
        .unwrap() else {
            panic!("a final head");
        };
        assert!(matches!(resp.body().kind, Kind::Chunked(_)));
        // Repeated lengths must agree, byte for byte.
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n").is_ok());
        for bad in ["2\r\ncontent-length: 3", "x"] {
            let text = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert!(head(&text).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error() {
        let (client, _) = serve(Script {
            answers: vec![(
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"],
                true,
            )],
        })
        .await;
        assert!(matches!(post(&client).await, Err(Error::Io(_))));
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error_and_a_closed_port_a_connect_error() {
        let (client, _) = serve(Script {
            answers: vec![(vec![b"SSH-2.0-OpenSSH\r\n\r\n"], true)],
        })
        .await;
        assert!(matches!(post(&client).await, Err(Error::Protocol(_))));

        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let uri = format!("http://127.0.0.1:{port}").parse().unwrap();
        let closed = Client::new(&uri, None, Duration::from_secs(2)).unwrap();
        assert!(matches!(post(&closed).await, Err(Error::Connect(_))));
    }
}
