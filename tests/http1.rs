//! kedge's HTTP/1.1 server (`proxy/h1_server.rs`) spoken to byte by byte
//! over real TCP: framing kedge must refuse (request smuggling shapes) never
//! reaches a backend and closes the connection; pipelined requests, bodies in
//! pieces, `Expect: 100-continue`, HTTP/1.0 keep-alive and HEAD behave as
//! RFC 9112 says; a client that leaves mid-request cancels it.

mod support;

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use support::{Kedge, free_port, openai::FakeOpenAi, wait_until};

fn start(up: &FakeOpenAi) -> (Kedge, SocketAddr) {
    let port = free_port("127.0.0.1");
    let config = format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
[kernel]
attach = "off"
pin_root = "{{pin_root}}"
[[class]]
name = "standard"
priority = 2
[[backend]]
name = "fake"
url = "http://{up}"
[[route]]
model = "gpt-test"
backend = "fake"
upstream_model = "normal"
[[route]]
model = "hang"
backend = "fake"
[metrics]
addr = "{{admin}}"
"#,
        up = up.addr
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (Kedge::start(&config), addr)
}

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;

fn chat(extra: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kedge\r\ncontent-type: application/json\r\n\
         {extra}content-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    )
}

/// One answer as read off the wire.
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw client connection; answers are read exactly to their framing so
/// pipelined ones stay apart.
struct Raw {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let w = TcpStream::connect(addr).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw {
            r: BufReader::new(w.try_clone().unwrap()),
            w,
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("reading a line");
        assert!(line.ends_with("\r\n"), "cut short: {line:?}");
        line
    }

    /// Reads one answer; `head_only` for the answer to a HEAD request.
    fn answer(&mut self, head_only: bool) -> Answer {
        let mut head = String::new();
        loop {
            let line = self.line();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut answer = Answer {
            status,
            head,
            body: Vec::new(),
        };
        if head_only {
            return answer;
        }
        if let Some(n) = answer.header("content-length") {
            let mut body = vec![0; n.parse().unwrap()];
            self.r.read_exact(&mut body).unwrap();
            answer.body = body;
        } else if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(self.line().trim_end(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.r.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                answer.body.extend_from_slice(&chunk[..size]);
            }
        } else {
            self.r.read_to_end(&mut answer.body).unwrap();
        }
        answer
    }

    /// Whether kedge closed the connection (EOF or reset) within 5 s,
    /// with nothing more to read.
    fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match self.r.read_to_end(&mut rest) {
            Ok(_) => rest.is_empty(),
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }
}

#[test]
fn smuggling_shapes_are_refused_closed_and_reach_no_backend() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    // Each carries a second request a lenient reader would take as the body
    // or as the next request; none may reach the backend.
    let smuggled = chat("");
    let cases = [
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ncontent-length: 5\r\n\
                 transfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            400,
            "bad_request",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ntransfer-encoding: chunked\r\n\
                 content-length: 5\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            400,
            "bad_request",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ncontent-length: 0\r\n\
                 content-length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
            400,
            "bad_request",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\n\
                 transfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            501,
            "unsupported_transfer_coding",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\n\
                 transfer-encoding: chunked, identity\r\n\r\n{smuggled}"
            ),
            400,
            "bad_request",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\nhost: k\r\n\
                 transfer-encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
            400,
            "bad_request",
        ),
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\n\
                 x-folded: a\r\n b\r\ncontent-length: 0\r\n\r\n{smuggled}"
            ),
            400,
            "bad_request",
        ),
        // A chunk-size line ended by a bare LF: the body is unreadable.
        (
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\n{CHAT}\r\n0\r\n\r\n{smuggled}",
                CHAT.len()
            ),
            400,
            "unreadable_body",
        ),
    ];
    for (bytes, status, code) in cases {
        let mut c = Raw::connect(addr);
        c.send(bytes.as_bytes());
        let answer = c.answer(false);
        let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(
            (answer.status, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{bytes:?}: {}",
            answer.head
        );
        assert_eq!(answer.header("connection"), Some("close"), "{bytes:?}");
        assert!(c.closed(), "{bytes:?}: still open");
    }
    assert!(
        up.seen().is_empty(),
        "smuggled requests reached the backend: {:?}",
        up.seen()
    );
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    let both = [
        chat("x-request-id: first\r\n"),
        chat("x-request-id: second\r\n"),
    ]
    .concat();
    c.send(both.as_bytes());
    for id in ["first", "second"] {
        let a = c.answer(false);
        assert_eq!(a.status, 200, "{}", a.head);
        assert_eq!(a.header("x-request-id"), Some(id));
        assert_eq!(a.header("connection"), None, "kept alive");
        assert!(a.header("date").is_some(), "{}", a.head);
    }
    assert_eq!(up.seen().len(), 2);
}

#[test]
fn a_body_in_pieces_is_read_and_the_connection_kept() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    // Chunked, with an extension and a trailer, each piece its own write.
    let (a, b) = CHAT.split_at(20);
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ntransfer-encoding: chunked\r\n\r\n");
    c.send(format!("{:x};piece=1\r\n{a}\r\n", a.len()).as_bytes());
    c.send(format!("{:x}\r\n{b}\r\n", b.len()).as_bytes());
    c.send(b"0\r\nx-trailer: t\r\n\r\n");
    let answer = c.answer(false);
    assert_eq!(answer.status, 200, "{}", answer.head);
    // A content-length body cut across writes.
    let full = chat("");
    let (head, rest) = full.split_at(full.len() - 10);
    c.send(head.as_bytes());
    c.send(rest.as_bytes());
    assert_eq!(c.answer(false).status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.body["model"] == "normal"), "{seen:?}");
}

#[test]
fn expect_100_continue_gets_its_interim_answer_before_the_body_is_sent() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    let full = chat("expect: 100-continue\r\n");
    let (head, body) = full.split_at(full.len() - CHAT.len());
    c.send(head.as_bytes());
    assert_eq!(c.line(), "HTTP/1.1 100 Continue\r\n");
    assert_eq!(c.line(), "\r\n");
    c.send(body.as_bytes());
    assert_eq!(c.answer(false).status, 200);

    // Refused by its declared length before the handler reads: no 100, so
    // the client never uploads.
    let mut c = Raw::connect(addr);
    c.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\nexpect: 100-continue\r\n\
          content-length: 8388608\r\n\r\n",
    );
    let a = c.answer(false);
    assert_eq!(a.status, 413, "{}", a.head);
}

#[test]
fn http_1_0_closes_unless_asked_to_keep_alive() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let one_oh = |extra: &str| chat(extra).replacen("HTTP/1.1", "HTTP/1.0", 1);

    let mut c = Raw::connect(addr);
    c.send(one_oh("").as_bytes());
    let a = c.answer(false);
    assert_eq!((a.status, a.header("connection")), (200, Some("close")));
    assert!(c.closed());

    let mut c = Raw::connect(addr);
    for _ in 0..2 {
        c.send(one_oh("connection: keep-alive\r\n").as_bytes());
        let a = c.answer(false);
        assert_eq!(
            (a.status, a.header("connection")),
            (200, Some("keep-alive"))
        );
    }
}

#[test]
fn an_answer_to_head_has_no_body_and_the_connection_goes_on() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    c.send(b"HEAD /v1/chat/completions HTTP/1.1\r\nhost: k\r\n\r\n");
    let a = c.answer(true);
    assert_eq!(a.status, 405, "{}", a.head);
    assert!(a.header("content-length").is_some_and(|n| n != "0"));
    // Had a body followed the head, this would read it as the next answer.
    c.send(chat("").as_bytes());
    let next = c.answer(false);
    assert_eq!(next.status, 200, "{}", next.head);
}

#[test]
fn a_body_left_unread_closes_the_connection_after_the_answer() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    // An unknown path is answered before its body; the 10 bytes of 100 sent
    // leave no way to find where a next request would start.
    c.send(b"POST /v1/nothing HTTP/1.1\r\nhost: k\r\ncontent-length: 100\r\n\r\n0123456789");
    let a = c.answer(false);
    assert_eq!((a.status, a.header("connection")), (404, Some("close")));
    assert!(c.closed());
}

#[test]
fn a_huge_head_gets_431() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    let big = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 << 10)
    );
    // kedge may close before taking all of it.
    let _ = c.w.write_all(big.as_bytes());
    let a = c.answer(false);
    assert_eq!(a.status, 431, "{}", a.head);
    assert!(c.closed());
}

#[test]
fn a_client_leaving_mid_request_cancels_it() {
    let up = FakeOpenAi::start();
    let (kedge, addr) = start(&up);
    let in_flight = || kedge.metric("kedge_queue_in_flight", &[("backend", "fake")]);
    let mut c = Raw::connect(addr);
    let body = r#"{"model":"hang","messages":[{"role":"user","content":"hi"}]}"#;
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    wait_until(
        Duration::from_secs(5),
        "the request reaches the backend",
        || up.seen().len() == 1 && in_flight() == 1.0,
    );
    drop(c);
    wait_until(
        Duration::from_secs(5),
        "the backend slot is freed once the client left",
        || in_flight() == 0.0,
    );
}

#[test]
fn a_refused_upload_gets_its_answer_and_a_clean_close_not_a_reset() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut c = Raw::connect(addr);
    // Declared over `max_body_bytes` (4 MiB): refused before it is read,
    // while the client is still sending.
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ncontent-length: 8388608\r\n\r\n");
    let mut upload = c.w.try_clone().unwrap();
    let uploader = std::thread::spawn(move || {
        let piece = vec![b'x'; 64 << 10];
        for _ in 0..16 {
            if upload.write_all(&piece).is_err() {
                return false;
            }
        }
        true
    });
    let a = c.answer(false);
    assert_eq!((a.status, a.header("connection")), (413, Some("close")));
    // kedge read on and dropped the upload, then closed: the client sees
    // the end of the stream. Closing over unread bytes would have reset
    // the connection instead.
    let mut rest = [0u8; 16];
    assert_eq!(
        c.r.read(&mut rest).expect("an orderly close, not a reset"),
        0
    );
    assert!(uploader.join().unwrap(), "kedge kept reading the upload");
}
