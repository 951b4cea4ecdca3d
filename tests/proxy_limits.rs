//! Slow and hostile clients cannot hold kedge's resources: a raw TCP client
//! that dribbles its headers (first request or a later one), one that
//! connects and says nothing, one that stalls its body; and a stalled
//! upstream stream is ended. A keep-alive connection between requests, over
//! HTTP/1.1 or HTTP/2, rests for the idle timeout, not the header timeout. A
//! client that stops reading its answer is cut off after the send timeout,
//! its request cancelled; one that pauses for less is not.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use support::{
    Kedge, free_port,
    openai::{DripEnd, FakeOpenAi, HttpClient, next_data},
    wait_until,
};

fn start(up: &FakeOpenAi) -> (Kedge, SocketAddr) {
    let port = free_port("127.0.0.1");
    let config = format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
[kernel]
attach = "off"
pin_root = "{{pin_root}}"
[limits]
header_read_timeout_ms = 500
body_read_timeout_ms = 500
idle_timeout_ms = 1500
send_timeout_ms = 1000
[[class]]
name = "standard"
priority = 2
[[backend]]
name = "fake"
url = "http://{up}"
stream_idle_timeout_ms = 500
[[route]]
model = "hold"
backend = "fake"
[[route]]
model = "flood"
backend = "fake"
[[route]]
model = "gpt-test"
backend = "fake"
upstream_model = "normal"
[metrics]
addr = "{{admin}}"
"#,
        up = up.addr
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    (Kedge::start(&config), addr)
}

/// Whether the peer has closed the connection (EOF or reset), waiting up to `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            // An error response before the close is fine; keep reading.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Sends a request line, then a header line every 100 ms for up to 5 s:
/// bytes keep moving, so only the header deadline can end this. Returns how
/// long kedge held the connection (and fails if it still does after 5 s).
fn dribble_a_head(s: &mut TcpStream) -> Duration {
    let started = Instant::now();
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: kedge\r\n")
        .unwrap();
    while started.elapsed() < Duration::from_secs(5) {
        if s.write_all(b"x-slow: 1\r\n").is_err() || closed_within(s, Duration::from_millis(100)) {
            return started.elapsed();
        }
    }
    panic!(
        "kedge still held the connection after {:?}",
        started.elapsed()
    );
}

#[test]
fn a_client_dribbling_its_headers_is_cut_off() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    let elapsed = dribble_a_head(&mut s);
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "closed after {elapsed:?}; header_read_timeout_ms = 500"
    );
    assert!(up.seen().is_empty());
}

#[test]
fn a_silent_connection_is_closed_by_the_first_timeout() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(5)),
        "a connection that sends nothing must not be held"
    );
    // A connection that never sends its first request head meets the header
    // read timeout (500 ms from the accept), well before the idle timeout
    // (1500 ms).
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450) && elapsed < Duration::from_millis(1200),
        "closed after {elapsed:?}"
    );
}

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;

/// Sends one chat request on `s` and reads its whole answer (content-length framed).
fn exchange(s: &mut TcpStream) -> String {
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kedge\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("reading the answer");
        assert!(
            n > 0,
            "closed mid-answer: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a content-length answer")
                .parse()
                .unwrap();
            if body.len() >= length {
                return text.into_owned();
            }
        }
    }
}

#[test]
fn a_keep_alive_connection_rests_for_the_idle_timeout_not_the_header_timeout() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    for n in 0..3 {
        let answer = exchange(&mut s);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        if n < 2 {
            // Past the header timeout (500 ms), within the idle one (1500 ms).
            assert!(
                !closed_within(&mut s, Duration::from_millis(900)),
                "a keep-alive connection was closed while resting after request {n}"
            );
        }
    }
    // Resting past the idle timeout ends it.
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)));
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1300) && elapsed < Duration::from_secs(4),
        "closed after {elapsed:?}; idle_timeout_ms = 1500"
    );
}

#[test]
fn a_later_head_dribbled_on_a_keep_alive_connection_is_cut_off() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    assert!(exchange(&mut s).starts_with("HTTP/1.1 200"));
    // Rest a while, then dribble the next head: its 500 ms run from its
    // first byte, and bytes keep moving, so the idle timeout cannot end it.
    assert!(!closed_within(&mut s, Duration::from_millis(700)));
    let elapsed = dribble_a_head(&mut s);
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_millis(1400),
        "closed after {elapsed:?}; header_read_timeout_ms = 500 from the head's first byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_rests_between_requests_for_the_idle_timeout() {
    use http_body_util::{BodyExt, Full};
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2c handshake (prior knowledge)");
    let conn = tokio::spawn(conn);
    for n in 0..3 {
        let req = hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(CHAT.as_bytes())))
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .unwrap_or_else(|e| panic!("request {n} on the rested connection: {e}"));
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), hyper::Version::HTTP_2);
        resp.into_body().collect().await.unwrap();
        if n < 2 {
            // Past the header timeout, within the idle one: HTTP/2 has no
            // heads for the header timer to wait on.
            tokio::time::sleep(Duration::from_millis(900)).await;
        }
    }
    conn.abort();
}

#[test]
fn a_stalled_body_gets_408_and_kedge_keeps_serving() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: kedge\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");

    // Meanwhile and afterwards, well-behaved clients are served.
    let c = HttpClient::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let a = rt.block_on(c.call(
        "POST",
        &format!("http://{addr}/v1/chat/completions"),
        &[],
        r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#,
    ));
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_stream_is_ended() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let c = HttpClient::default();
    let resp = c
        .send(
            "POST",
            &format!("http://{addr}/v1/chat/completions"),
            &[],
            r#"{"model":"hold","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = next_data(&mut body, Duration::from_secs(5)).await.unwrap();
    assert!(first.is_ok());
    // The upstream never sends its second event (never released):
    // stream_idle_timeout_ms = 500 ends the stream with an error.
    let started = Instant::now();
    let end = next_data(&mut body, Duration::from_secs(5)).await;
    assert!(matches!(end, Some(Err(_))), "{end:?}");
    // Ended by the idle timeout, not by anything sooner.
    let e = started.elapsed();
    assert!(
        e >= Duration::from_millis(400) && e < Duration::from_secs(3),
        "{e:?}"
    );
}

#[test]
fn a_burst_of_pipelined_requests_then_silence_still_meets_the_timeouts() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    // Hundreds of answers written in one go use up tokio's per-task budget;
    // the watchdog must still be armed afterwards.
    let burst = "GET /nothing HTTP/1.1\r\nhost: kedge\r\n\r\n".repeat(300);
    s.write_all(burst.as_bytes()).unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut s, Duration::from_secs(6)),
        "the connection outlived its idle timeout (1500 ms) after the burst"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed before its timeouts"
    );
}

/// A `flood` stream: it ends only when kedge stops reading it.
const FLOOD: &str =
    r#"{"model":"flood","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

fn ask_for_a_flood(s: &mut TcpStream) {
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: kedge\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{FLOOD}",
        FLOOD.len()
    )
    .unwrap();
}

/// The flood asked for `held` ago ended as the send timeout (1000 ms) ends
/// it: its upstream stream cancelled, not sooner, its backend slot freed.
fn assert_cancelled_by_the_send_timeout(kedge: &Kedge, end: DripEnd, held: Duration) {
    assert!(
        end.reader_gone,
        "the upstream stream must be cancelled: {end:?}"
    );
    assert!(
        held >= Duration::from_millis(900),
        "cancelled before the send timeout: {held:?}"
    );
    wait_until(Duration::from_secs(5), "the backend slot is freed", || {
        kedge.metric("kedge_queue_in_flight", &[("backend", "fake")]) == 0.0
    });
}

#[test]
fn a_client_that_stops_reading_is_cut_off_and_its_request_cancelled() {
    let up = FakeOpenAi::start();
    let (kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    let started = Instant::now();
    ask_for_a_flood(&mut s);
    // Never read: once the buffers between the upstream and this socket are
    // full, kedge's writes stop moving, and send_timeout_ms = 1000 ends it.
    let end = up.wait_drip_end(Duration::from_secs(10));
    assert_cancelled_by_the_send_timeout(&kedge, end, started.elapsed());
    assert!(closed_within(&mut s, Duration::from_secs(5)));
}

#[test]
fn a_client_reading_with_pauses_shorter_than_the_send_timeout_is_not_cut_off() {
    let up = FakeOpenAi::start();
    let (_kedge, addr) = start(&up);
    let mut s = TcpStream::connect(addr).unwrap();
    ask_for_a_flood(&mut s);
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // Eight pauses of 300 ms (2.4 s in all, over twice the send timeout),
    // each followed by 50 ms of reading as fast as the bytes come.
    for round in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        let reading = Instant::now();
        let mut got = 0;
        while reading.elapsed() < Duration::from_millis(50) {
            match s.read(&mut buf) {
                Ok(0) => panic!("closed in round {round}"),
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(got > 0, "nothing to read in round {round}");
    }
    assert!(
        up.stream_ends().is_empty(),
        "the stream was ended: {:?}",
        up.stream_ends()
    );
    drop(s);
    assert!(up.wait_drip_end(Duration::from_secs(5)).reader_gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_the_client_stops_reading_is_cancelled_and_the_connection_lives_on() {
    use http_body_util::{BodyExt, Full};
    let up = FakeOpenAi::start();
    let (kedge, addr) = start(&up);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // A small window for each stream: the client's connection task keeps
    // reading the socket, but a stream whose body is not read gets no more
    // window once 4 KiB are in, while the connection's window stays open.
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(4096)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("h2c handshake (prior knowledge)");
    let conn = tokio::spawn(conn);
    let post = |body: &'static str| {
        hyper::Request::post(format!("http://{addr}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
            .unwrap()
    };
    let started = Instant::now();
    let flood = send.send_request(post(FLOOD)).await.unwrap();
    assert_eq!(flood.status(), 200);
    // Not read: send_timeout_ms = 1000 cancels the stream's request.
    let end = tokio::task::spawn_blocking(move || up.wait_drip_end(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_cancelled_by_the_send_timeout(&kedge, end, started.elapsed());
    // The client is told the stream broke off, not that it ended.
    assert!(
        flood.into_body().collect().await.is_err(),
        "a cancelled stream must not end cleanly"
    );
    // The connection was not cut: another request on it is answered.
    let next = send.send_request(post(CHAT)).await.unwrap();
    assert_eq!(next.status(), 200);
    next.into_body().collect().await.unwrap();
    conn.abort();
}
