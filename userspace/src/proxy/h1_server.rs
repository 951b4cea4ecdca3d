//! The client-facing HTTP/1.1 server: reads a connection's request heads,
//! frames their bodies, writes the answers, keeps the connection alive
//! between requests. HTTP/2 connections go to hyper (`proxy/server.rs`).
//!
//! Why not hyper's HTTP/1 server: on the proxy's path it cost about 12 000
//! instructions a request (its dispatch loop, the body channel, encoding the
//! response head from the header map, buffered reads and flushes) — a quarter
//! of all kedge executed per request, and most of its gap to nginx
//! (docs/benchmarks.md). Here the connection's task reads the head and, when
//! the body came with it (nearly every LLM API request), hands the body over
//! as it lies in the buffer; an answer of known length goes out with its head
//! in one write; a stream's events that are ready together go out together.
//!
//! Rules (RFC 9112), strict wherever a lenient reading lets kedge and a proxy
//! in front of it disagree on where a request ends (request smuggling):
//! - `Transfer-Encoding` with `Content-Length`, in an HTTP/1.0 request, or
//!   not ending in `chunked`: 400; a coding other than `chunked`: 501. The
//!   connection closes after any framing error.
//! - `Content-Length`: digits only; repeated values must agree (`5, 5`).
//! - Chunk lines end in CRLF, chunk data is followed by CRLF, sizes are hex
//!   (at most 15 digits), no control bytes in extensions (`h1::Framing`).
//! - Obsolete line folding, space before a header's colon, bare CR: 400
//!   (httparse's defaults).
//! - A head over 64 KiB or over 100 header lines: 431.
//! - A body the handler did not read to its end (a 401 before the upload,
//!   a 413): the connection closes after the answer rather than guess where
//!   the next request starts, reading on for a moment so that the answer is
//!   not lost to a reset (a lingering close).
//! - `Expect: 100-continue`: the 100 goes out when the body is not already
//!   here.
//!
//! Keep-alive: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
//! `Connection: keep-alive`. Pipelined requests are answered in order. A
//! client that closes its side while its request is served cancels the
//! request (hyper does the same): the upstream call is dropped and the
//! budget settles what was used. Time limits are the connection watchdog's
//! (`proxy/server.rs`); graceful shutdown closes after the current answer.

use std::{
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::{mpsc, oneshot},
};

use super::{
    AnswerTags, Body, BoxError, Proxy, error_response,
    h1::{Framing, Step},
    server::{Activity, ConnInfo},
};
use crate::openai::ApiError;

/// Most bytes of a request head (431 above).
pub(super) const MAX_HEAD: usize = 64 << 10;
/// Most header lines of a request head (431 above), as hyper.
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before each read of a body.
const READ_CHUNK: usize = 8 << 10;
/// Answer bytes gathered before they are written.
const WRITE_BATCH: usize = 64 << 10;
/// Pieces of a still-arriving body read ahead of the handler.
const BODY_AHEAD: usize = 4;
/// The empty line that ends a head; the searcher built once.
static HEAD_END: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));
/// Longest a closing connection reads on for its client (see [`linger`]).
const LINGER: Duration = Duration::from_secs(2);

/// A request's body as the handler reads it.
pub enum RequestBody {
    /// All of it, read with the head (`None`: empty).
    Whole(Option<Bytes>),
    /// Still arriving: the connection's task reads and decodes it.
    Arriving {
        pieces: mpsc::Receiver<io::Result<Bytes>>,
        /// Told when the handler first reads: the client waits for a 100
        /// (`Expect: 100-continue`) before it sends the body.
        wanted: Option<oneshot::Sender<()>>,
    },
    /// An HTTP/2 stream's body.
    Http2(Incoming),
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RequestBody::Arriving { pieces, wanted } => {
                if let Some(wanted) = wanted.take() {
                    let _ = wanted.send(());
                }
                pieces
                    .poll_recv(cx)
                    .map(|piece| piece.map(|r| r.map(Frame::data).map_err(Into::into)))
            }
            RequestBody::Http2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Whole(bytes) => bytes.is_none(),
            RequestBody::Arriving { .. } => false,
            RequestBody::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len()) as u64)
            }
            RequestBody::Arriving { .. } => SizeHint::default(),
            RequestBody::Http2(body) => body.size_hint(),
        }
    }
}

/// A request head as read, with what it says about framing and the
/// connection.
struct Head {
    request: Request<()>,
    /// Chunked, else `length` bytes of body.
    chunked: bool,
    length: u64,
    keep_alive: bool,
    expect_continue: bool,
}

/// Why a head is refused; the connection closes after the answer.
#[derive(Debug, PartialEq)]
enum HeadError {
    /// 400: not HTTP/1.x as the rules above read it.
    Bad(&'static str),
    /// 431: too long, or too many lines.
    TooLarge,
    /// 501: a transfer coding kedge does not decode.
    Unsupported,
}

impl HeadError {
    fn answer(&self) -> Response<Body> {
        let (status, code, message) = match self {
            HeadError::Bad(why) => (StatusCode::BAD_REQUEST, "bad_request", *why),
            HeadError::TooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                "The request head is larger than 64 KiB or has more than 100 header lines",
            ),
            HeadError::Unsupported => (
                StatusCode::NOT_IMPLEMENTED,
                "unsupported_transfer_coding",
                "Only the chunked transfer coding is supported",
            ),
        };
        error_response(&ApiError::new(
            status,
            "invalid_request_error",
            code,
            message.to_string(),
        ))
    }
}

/// Takes a request head off the front of `buf`, if it is all there.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    // Uninitialised slots: zeroing 100 of them would cost more than the parse.
    let mut lines = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut lines)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad("The request is not HTTP/1.x")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    // httparse takes a bare LF as a line's end, which a proxy in front of
    // kedge may not: every line must end in CRLF.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|at| at == 0 || buf[at - 1] != b'\r') {
        return Err(HeadError::Bad(
            "A line of the request head does not end in CRLF",
        ));
    }
    let version = if req.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Bad("Bad request method"))?;
    let base = buf.as_ptr() as usize;
    let path = req.path.unwrap_or_default();
    let path_at = path.as_ptr() as usize - base;
    let path = path_at..path_at + path.len();

    let mut framing = FramingFacts::default();
    let (mut close, mut keep_alive_asked) = (false, false);
    let mut expect_continue = false;
    let mut hosts = 0;
    // Where each line lies in the head, to slice the frozen bytes (no copy);
    // pushed in place (a collected SmallVec is copied out whole, 768 bytes).
    let mut spans = smallvec::SmallVec::<[_; 24]>::new();
    for h in req.headers.iter() {
        let (name_at, value_at) = (
            h.name.as_ptr() as usize - base,
            h.value.as_ptr() as usize - base,
        );
        spans.push((
            name_at..name_at + h.name.len(),
            value_at..value_at + h.value.len(),
        ));
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            framing.length(h.value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.codings(h.value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in tokens(h.value) {
                close |= token.eq_ignore_ascii_case(b"close");
                keep_alive_asked |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case(b"expect") {
            // An HTTP/1.0 client does not know interim answers.
            expect_continue = version == Version::HTTP_11
                && h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        }
    }
    let chunked = framing.chunked(version)?;
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1 (a proxy in front of kedge
    // and kedge must not read two different ones).
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11) {
        return Err(HeadError::Bad(
            "An HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let keep_alive = !close && (version == Version::HTTP_11 || keep_alive_asked);
    let bytes = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(bytes.slice(path))
        .map_err(|_| HeadError::Bad("Bad request target"))?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    // By reference: moving the inline array out would copy all of it.
    for (name, value) in spans.iter().cloned() {
        let name =
            HeaderName::from_bytes(&bytes[name]).map_err(|_| HeadError::Bad("Bad header name"))?;
        let value = HeaderValue::from_maybe_shared(bytes.slice(value))
            .map_err(|_| HeadError::Bad("Bad header value"))?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        chunked,
        length: framing.length.unwrap_or(0),
        keep_alive,
        expect_continue,
    }))
}

/// What a head's `Content-Length` and `Transfer-Encoding` lines say.
#[derive(Default)]
struct FramingFacts {
    length: Option<u64>,
    /// Transfer codings in order; `chunked_last` whether the last is chunked.
    codings: usize,
    chunked_last: bool,
    /// A `Transfer-Encoding` line was there, even an empty one.
    transfer_encoding: bool,
}

impl FramingFacts {
    fn length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        for item in value.split(|b| *b == b',') {
            let digits = item.trim_ascii();
            // `u64::from_str` would take a sign; 19 digits cannot overflow.
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(HeadError::Bad("Bad content-length"));
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if self.length.is_some_and(|m| m != n) {
                return Err(HeadError::Bad("Conflicting content-length values"));
            }
            self.length = Some(n);
        }
        Ok(())
    }

    fn codings(&mut self, value: &[u8]) {
        self.transfer_encoding = true;
        for coding in tokens(value) {
            self.codings += 1;
            self.chunked_last = coding.eq_ignore_ascii_case(b"chunked");
        }
    }

    /// Whether the body is chunked; the framing errors of RFC 9112 §6.
    fn chunked(&self, version: Version) -> Result<bool, HeadError> {
        if !self.transfer_encoding {
            return Ok(false);
        }
        if version == Version::HTTP_10 {
            return Err(HeadError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if self.length.is_some() {
            return Err(HeadError::Bad("Both Transfer-Encoding and Content-Length"));
        }
        if !self.chunked_last {
            return Err(HeadError::Bad("chunked is not the final transfer coding"));
        }
        if self.codings > 1 {
            return Err(HeadError::Unsupported);
        }
        Ok(true)
    }
}

/// The non-empty comma-separated items of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// How a connection ended: `Err` for an I/O error worth a debug line.
pub(super) type Served = io::Result<()>;

/// Serves HTTP/1.1 requests on `io` until the client closes, a request says
/// `close`, a framing error, or shutdown. `buf` holds bytes already read.
///
/// A block, not an `async fn`, whose arguments would keep their room twice
/// in the state (see `Conn::serve`).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn doubles its arguments' room"
)]
pub(super) fn serve<T>(
    proxy: &Arc<Proxy>,
    io: &mut T,
    mut buf: BytesMut,
    info: &ConnInfo,
    activity: &Arc<Activity>,
) -> impl Future<Output = Served>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    async move {
        // Both buffers are dropped while the connection rests (below), and a
        // head is read through a per-thread scratch buffer (`read_through_scratch`):
        // an idle keep-alive connection holds no buffer, as with nginx.
        let mut out = Vec::new();
        loop {
            // How much of `buf` is known not to hold the head's end.
            let mut scanned = 0usize;
            let head = loop {
                // Empty lines before a request are ignored (RFC 9112 §2.2).
                while buf.starts_with(b"\r\n") {
                    buf.advance(2);
                    scanned = scanned.saturating_sub(2);
                }
                // Parsed once its end is here: a head dribbled a byte at a time
                // is scanned once, not parsed again after every read. Matched
                // as a temporary: a `let` would keep its room (240 bytes) in
                // this state across the read below, as every resting
                // connection's.
                let refused = match match HEAD_END.find(&buf[scanned.saturating_sub(3)..]) {
                    Some(_) => parse_head(&mut buf),
                    None if buf.len() > MAX_HEAD => Err(HeadError::TooLarge),
                    None => Ok(None),
                } {
                    Ok(Some(head)) => break head,
                    Ok(None) => None,
                    Err(e) => Some(e),
                };
                if let Some(e) = refused {
                    // The ends of a connection are boxed (here and below): their
                    // state would be room every resting one keeps.
                    return built_in_box(|| refuse(io, &mut out, e)).await;
                }
                scanned = buf.len();
                if read_through_scratch(io, &mut buf).await? == 0 {
                    return Ok(());
                }
            };
            // Boxed: the request's part of the connection (the handler's state,
            // 5 KB, and the writing of its answer) is held while it is served,
            // not by every resting connection (docs/benchmarks.md).
            let exchanged =
                built_in_box(|| exchange(proxy, io, &mut buf, &mut out, head, *info, activity));
            let (kept, body_read) = match exchanged.await? {
                Exchanged::ClientGone => return Ok(()),
                Exchanged::Answered { kept, body_read } => (kept, body_read),
            };
            if !body_read || ((!kept || activity.closing()) && !buf.is_empty()) {
                built_in_box(|| linger(io)).await;
                return Ok(());
            }
            if !kept || activity.closing() {
                // An orderly end (TLS: close_notify), bounded.
                let _ = built_in_box(|| tokio::time::timeout(LINGER, io.shutdown())).await;
                return Ok(());
            }
            if buf.is_empty() {
                // Resting: give the buffers back (the read buffer may still be
                // the allocation the request's body was cut from).
                buf = BytesMut::new();
                out = Vec::new();
            } else {
                // A pipelined head is already arriving: its time runs from now.
                activity.on_read();
            }
        }
    }
}

/// `make()` in a box, built where it lies: `Box::pin(make())` would build it
/// on the stack and copy all its room (the exchange's, 6 KB) over.
fn built_in_box<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// How one request's exchange ended.
enum Exchanged {
    /// The client left before its answer.
    ClientGone,
    /// Answered; `kept`: the answer allows another request; `body_read`:
    /// the request's body was read to its end, so the next head's start
    /// is known.
    Answered { kept: bool, body_read: bool },
}

/// Serves one request whose head has been read: hands it to the handler,
/// reads the rest of its body beside it (or watches for the client
/// leaving), and writes the answer.
async fn exchange<T: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Arc<Proxy>,
    io: &mut T,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    head: Head,
    info: ConnInfo,
    activity: &Arc<Activity>,
) -> io::Result<Exchanged> {
    let in_flight = activity.begin();
    let head_only = head.request.method() == Method::HEAD;
    let version = head.request.version();
    // Nearly every request's body came with its head: it is handed over
    // as it lies in the buffer. The rest (a body still arriving, or
    // chunked, which API clients rarely send) is read beside the handler.
    let mut arriving = None;
    let body = if head.chunked || head.length > buf.len() as u64 {
        // The 100 waits for the handler's first read: a client refused
        // before that (401, 413 by its declared length) never uploads.
        let (wanted, continue_after) = if head.expect_continue && buf.is_empty() {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let (tx, pieces) = mpsc::channel(BODY_AHEAD);
        arriving = Some(Arriving {
            framing: Framing::request(head.chunked, head.length),
            tx,
            continue_after,
        });
        RequestBody::Arriving { pieces, wanted }
    } else if head.length == 0 {
        RequestBody::Whole(None)
    } else {
        RequestBody::Whole(Some(buf.split_to(head.length as usize).freeze()))
    };
    let mut body_read = arriving.is_none();
    // In a block: the handler's state ends before the answer is written,
    // and the two share their room.
    let answer = {
        let handling = Proxy::handle(proxy, head.request.map(|()| body), info, in_flight);
        tokio::pin!(handling);
        loop {
            tokio::select! {
                biased;
                (answer, tags) = &mut handling => break (answer, Some(tags)),
                fed = feed(io, buf, &mut arriving) => match fed {
                    Fed::Piece | Fed::Broken => {}
                    Fed::End => body_read = true,
                    Fed::ClientGone => return Ok(Exchanged::ClientGone),
                },
            }
        }
    };
    let keep_alive = head.keep_alive && body_read && !activity.closing();
    let kept = write_answer(io, out, answer, version, head_only, keep_alive).await?;
    Ok(Exchanged::Answered { kept, body_read })
}

/// Size of the per-thread buffer a connection reads into while it holds no
/// buffer of its own: waiting for a head, or for its answer.
const HEAD_SCRATCH: usize = 16 << 10;

thread_local! {
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; HEAD_SCRATCH].into_boxed_slice());
}

/// Reads what the client sent next (a head, or bytes sent while a request
/// is handled) onto `buf`, through this thread's scratch buffer: while the
/// read waits, the connection holds no buffer of its own, and `buf` grows
/// by what arrived only (a head and its body, cut from it without a copy,
/// usually arrive in one read).
async fn read_through_scratch<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut read = ReadBuf::new(scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
    .await
}

/// Answers a head that cannot be served, and closes.
async fn refuse<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    out: &mut Vec<u8>,
    e: HeadError,
) -> Served {
    write_answer(io, out, (e.answer(), None), Version::HTTP_11, false, false).await?;
    linger(io).await;
    Ok(())
}

/// Closes the sending side, then reads and drops what the client still
/// sends, for up to [`LINGER`]: an answer sent before its request was read
/// to its end (a 413 during the upload, a framing error) must reach the
/// client, and closing a socket with unread bytes makes the kernel reset
/// the connection, which can destroy the answer in flight (nginx's
/// lingering close).
async fn linger<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T) {
    if io.shutdown().await.is_err() {
        return;
    }
    let until = tokio::time::Instant::now() + LINGER;
    let mut sink = vec![0u8; 4096];
    while let Ok(Ok(1..)) = tokio::time::timeout_at(until, io.read(&mut sink)).await {}
}

/// A body that had not all arrived with its head, fed to the handler.
struct Arriving {
    framing: Framing,
    tx: mpsc::Sender<io::Result<Bytes>>,
    /// Fires at the handler's first read; then the 100 goes out.
    continue_after: Option<oneshot::Receiver<()>>,
}

/// What one round of reading beside the handler did.
enum Fed {
    /// A piece of the body went to the handler (or more bytes were read).
    Piece,
    /// The body has ended.
    End,
    /// The body's framing broke; the handler has been told.
    Broken,
    /// The client closed its side, or the connection broke.
    ClientGone,
}

/// Reads the rest of the body for the handler, then watches for the client
/// leaving (keeping what it sends next, a pipelined request, in `buf`).
/// Cancel-safe where the handler finishing drops it: a piece lost then was
/// for a handler that no longer reads.
async fn feed<T: AsyncRead + AsyncWrite + Unpin>(
    io: &mut T,
    buf: &mut BytesMut,
    arriving: &mut Option<Arriving>,
) -> Fed {
    let Some(body) = arriving else {
        if buf.len() >= MAX_HEAD {
            // Enough of the next request is here; the handler decides.
            std::future::pending::<()>().await;
        }
        // Through the scratch buffer: a connection waiting for its answer
        // holds no read buffer of its own either.
        return match read_through_scratch(io, buf).await {
            Ok(0) | Err(_) => Fed::ClientGone,
            Ok(_) => Fed::Piece,
        };
    };
    if let Some(wanted) = &mut body.continue_after {
        if wanted.await.is_err() {
            // The handler answered without reading: the client never sends.
            *arriving = None;
            return Fed::Broken;
        }
        body.continue_after = None;
        let sent = io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await;
        return match sent.and(io.flush().await) {
            Ok(()) => Fed::Piece,
            Err(_) => Fed::ClientGone,
        };
    }
    match body.framing.step(buf) {
        Ok(Step::Data(piece)) => {
            // The handler stopped reading (it answered): the rest is not
            // needed, and the connection closes after the answer.
            if body.tx.send(Ok(piece)).await.is_err() {
                *arriving = None;
                return Fed::Broken;
            }
            Fed::Piece
        }
        Ok(Step::End) => {
            *arriving = None;
            Fed::End
        }
        Ok(Step::More) => {
            buf.reserve(READ_CHUNK);
            match io.read_buf(buf).await {
                Ok(0) | Err(_) => Fed::ClientGone,
                Ok(_) => Fed::Piece,
            }
        }
        Err(e) => {
            let e = io::Error::new(io::ErrorKind::InvalidData, e.to_string());
            let _ = body.tx.send(Err(e)).await;
            *arriving = None;
            Fed::Broken
        }
    }
}

/// Writes an answer; `Ok(false)` when the connection must close after it.
async fn write_answer<T: AsyncWrite + Unpin>(
    io: &mut T,
    out: &mut Vec<u8>,
    (answer, tags): (Response<Body>, Option<AnswerTags>),
    version: Version,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = answer.into_parts();
    let status = parts.status;
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let length = body.size_hint().exact();
    // An answer of unknown length is chunked; to an HTTP/1.0 client it ends
    // with the connection.
    let unknown_length = !bodiless && !head_only && length.is_none();
    let chunked = unknown_length && version == Version::HTTP_11;
    let keep_alive = keep_alive && (chunked || !unknown_length);
    out.clear();
    // Once per answer after a rest (the buffer is given back then).
    out.reserve(4096);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut line = |name: &HeaderName, value: &[u8]| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        // Framing and the connection are this hop's to say.
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || (tags.is_some() && AnswerTags::replaces(name))
        {
            continue;
        }
        line(name, value.as_bytes());
    }
    if let Some(tags) = &tags {
        tags.each(&mut line);
    }
    if !parts.headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&http_date());
        out.extend_from_slice(b"\r\n");
    }
    match (bodiless, length) {
        (true, _) => {}
        (false, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        (false, None) if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (false, None) => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if bodiless || head_only {
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep_alive);
    }
    // The body: pieces that are ready together go out in one write.
    let mut sent = 0u64;
    loop {
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending if !out.is_empty() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        match next {
            None => {
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
            }
            Some(None) => {
                if chunked {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                if length.is_some_and(|n| n != sent) {
                    return Err(io::Error::other("answer shorter than its length"));
                }
                io.write_all(out).await?;
                io.flush().await?;
                return Ok(keep_alive);
            }
            // The answer broke off (the upstream failed mid-stream): the
            // client must see it cut, not ended.
            Some(Some(Err(e))) => return Err(io::Error::other(e)),
            Some(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if length.is_some_and(|n| sent > n) {
                    return Err(io::Error::other("answer longer than its length"));
                }
                if chunked {
                    push_hex(out, data.len());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(&data);
                if chunked {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() >= WRITE_BATCH {
                    // Flushed too: under TLS, bytes written may wait in the
                    // session until a flush, and the next piece may be late.
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                }
            }
        }
    }
}

/// `n` in lower-case hex, as a chunk-size line has it.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (shift * 4)) & 0xf]);
    }
}

/// Now as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once a
/// second per thread.
fn http_date() -> [u8; 29] {
    thread_local! {
        static CACHE: std::cell::Cell<(i64, [u8; 29])> =
            const { std::cell::Cell::new((i64::MIN, [0; 29])) };
    }
    let now = crate::clock::coarse_timestamp();
    CACHE.with(|cache| {
        let (at, text) = cache.get();
        if at == now.as_second() {
            return text;
        }
        let mut text = *b"Thu, 01 Jan 1970 00:00:00 GMT";
        let mut formatted = String::with_capacity(29);
        if jiff::fmt::rfc2822::DateTimePrinter::new()
            .print_timestamp_rfc9110(&now, &mut formatted)
            .is_ok()
            && formatted.len() == 29
        {
            text.copy_from_slice(formatted.as_bytes());
        }
        cache.set((now.as_second(), text));
        text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, HeadError> {
        parse_head(&mut BytesMut::from(text))
    }

    fn framing_error(text: &str) -> HeadError {
        match head(text) {
            Err(e) => e,
            Ok(_) => panic!("accepted: {text:?}"),
        }
    }

    #[test]
    fn a_head_is_read_with_its_framing_and_connection() {
        let mut buf = BytesMut::from(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
             Authorization: Bearer k\r\n\r\nhello",
        );
        let h = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!(h.request.method(), Method::POST);
        assert_eq!(h.request.uri().path(), "/v1/chat/completions");
        assert_eq!(h.request.headers()["authorization"], "Bearer k");
        assert_eq!((h.chunked, h.length, h.keep_alive), (false, 5, true));
        assert_eq!(&buf[..], b"hello", "the body stays in the buffer");

        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 closes unless asked");
        let h = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = head("GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h =
            head("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.chunked && h.expect_continue);
        let h = head("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 7, 7\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.length, 7, "repeated equal lengths are one length");
        let h = head("GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive, "close wins");
    }

    #[test]
    fn host_lines_and_line_ends_are_strict() {
        for (text, want) in [
            (
                "GET / HTTP/1.1\r\n\r\n",
                "An HTTP/1.1 request needs exactly one Host header",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "An HTTP/1.1 request needs exactly one Host header",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nX: a\nContent-Length: 5\r\n\r\n",
                "A line of the request head does not end in CRLF",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \r\nContent-Length: 5\r\n\r\n",
                "Both Transfer-Encoding and Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,\r\n\r\n",
                "chunked is not the final transfer coding",
            ),
        ] {
            assert_eq!(framing_error(text), HeadError::Bad(want), "{text:?}");
        }
        assert!(
            head("GET / HTTP/1.0\r\n\r\n").unwrap().is_some(),
            "1.0 needs none"
        );
    }

    #[test]
    fn a_head_cut_anywhere_waits_for_the_rest() {
        let text = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\
                    Content-Length: 2\r\nX-A: b\r\n\r\n{}";
        let head_len = text.len() - 2;
        for cut in 0..head_len {
            let mut buf = BytesMut::from(&text[..cut]);
            assert!(parse_head(&mut buf).unwrap().is_none(), "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing taken before the head is whole");
        }
        let mut buf = BytesMut::from(text);
        let h = parse_head(&mut buf).unwrap().unwrap();
        assert_eq!((h.length, &buf[..]), (2, &b"{}"[..]));
        assert_eq!(h.request.headers()["x-a"], "b");
    }

    #[test]
    fn a_partial_head_waits_and_a_huge_one_is_refused() {
        assert!(head("POST / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        let long = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(framing_error(&long), HeadError::TooLarge);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            framing_error(&format!("GET / HTTP/1.1\r\n{many}\r\n")),
            HeadError::TooLarge
        );
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        for (text, want) in [
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Both Transfer-Encoding and Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "Both Transfer-Encoding and Content-Length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                "Conflicting content-length values",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
                "Conflicting content-length values",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
                "Bad content-length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
                "Bad content-length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length:\r\n\r\n",
                "Bad content-length",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                "Bad content-length",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                "chunked is not the final transfer coding",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n",
                "chunked is not the final transfer coding",
            ),
            (
                "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding in an HTTP/1.0 request",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length : 5\r\n\r\n",
                "The request is not HTTP/1.x",
            ),
            (
                "POST / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                "The request is not HTTP/1.x",
            ),
            (
                "POST / HTTP/1.1\r\nX: a\rb\r\n\r\n",
                "The request is not HTTP/1.x",
            ),
        ] {
            assert_eq!(framing_error(text), HeadError::Bad(want), "{text:?}");
        }
        assert_eq!(
            framing_error("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            HeadError::Unsupported
        );
        // Split over two lines, the codings are one list.
        assert_eq!(
            framing_error(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"
            ),
            HeadError::Bad("chunked is not the final transfer coding")
        );
    }

    #[test]
    fn chunked_request_bodies_are_framed_strictly() {
        let mut framing = Framing::request(true, 0);
        let mut buf = BytesMut::from("5;x=y\r\nhello\r\n6 ;z\r\n world\r\n0\r\nT: 1\r\n\r\nNEXT");
        let mut body = Vec::new();
        loop {
            match framing.step(&mut buf).unwrap() {
                Step::Data(d) => body.extend_from_slice(&d),
                Step::End => break,
                Step::More => panic!("all of it is here"),
            }
        }
        assert_eq!(body, b"hello world");
        assert_eq!(&buf[..], b"NEXT", "the next request stays");

        for bad in [
            "5\nhello\r\n0\r\n\r\n",
            "5\r\nhello\n0\r\n\r\n",
            "5;a\x01\r\nhello\r\n0\r\n\r\n",
            "5;a\rb\r\nhello\r\n0\r\n\r\n",
            " 5\r\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "0\r\nT: 1\n\r\n",
        ] {
            let mut framing = Framing::request(true, 0);
            let mut buf = BytesMut::from(bad);
            let failed = std::iter::from_fn(|| Some(framing.step(&mut buf)))
                .take(8)
                .find_map(|step| match step {
                    Err(_) => Some(true),
                    Ok(Step::End | Step::More) => Some(false),
                    Ok(Step::Data(_)) => None,
                });
            assert_eq!(failed, Some(true), "{bad:?}");
        }
    }

    #[test]
    fn chunk_sizes_are_written_in_hex() {
        for n in [
            0usize,
            1,
            9,
            10,
            15,
            16,
            255,
            256,
            4096,
            0xdead_beef,
            usize::MAX,
        ] {
            let mut out = Vec::new();
            push_hex(&mut out, n);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{n:x}"));
        }
    }

    #[test]
    fn the_date_is_an_http_date() {
        let date = http_date();
        let text = std::str::from_utf8(&date).unwrap();
        assert!(
            text.ends_with(" GMT") && text.as_bytes()[3] == b',',
            "{text}"
        );
        let parsed = jiff::fmt::rfc2822::DateTimeParser::new()
            .parse_timestamp(text)
            .unwrap();
        let now = crate::clock::coarse_timestamp();
        assert!((now.as_second() - parsed.as_second()).abs() <= 1, "{text}");
    }
}
