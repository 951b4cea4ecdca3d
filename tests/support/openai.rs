//! A local upstream that speaks the OpenAI protocol (the cloud LLM that cannot
//! exist here), and an HTTP client for the proxy tests.
//!
//! The upstream's behaviour is chosen by the model name kedge sends it:
//! - `normal`: answers with usage (prompt 11, completion 7); streams "Hel","lo",
//!   " world" and, when asked for `stream_options.include_usage`, a usage-only
//!   chunk (prompt 11, completion 3)
//! - `nousage`: the same without any usage
//! - `strict`: 400 when the body has `stream_options` (as some servers do), else `nousage`
//! - `hold`: streams "first", then waits for [`FakeOpenAi::release`], then "second"
//! - `drip`: streams 20 chunks "tok " 25 ms apart (usage 9/20 when asked),
//!   and notes whether the reader went away before the end
//! - `flood`: streams 4 KiB chunks without pause until the reader goes away
//!   (at most 64 GiB, far more than any test reads), and notes its end as a
//!   drip's
//! - `reset`: streams "one", "two", waits for [`FakeOpenAi::release`], then
//!   resets the connection
//! - `garbage`: a 200 whose JSON body is not JSON; `badhttp`: not HTTP at all
//! - `hang`: never answers
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Request, StatusCode, body::Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::{Value, json};

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a `drip` stream ended on the upstream side.
#[derive(Clone, Copy, Debug)]
pub struct DripEnd {
    pub chunks_sent: usize,
    /// A write failed: the proxy closed the upstream connection (cancelled).
    pub reader_gone: bool,
}

#[derive(Default)]
struct State {
    connections: std::sync::atomic::AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    drips: Mutex<Vec<DripEnd>>,
    gate: (Mutex<bool>, Condvar),
}

pub struct FakeOpenAi {
    pub addr: SocketAddr,
    state: Arc<State>,
}

pub const DRIP_CHUNKS: usize = 20;

impl FakeOpenAi {
    pub fn start() -> FakeOpenAi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let s = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let s = s.clone();
                s.connections
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || serve(stream, &s));
            }
        });
        FakeOpenAi { addr, state }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Lets every `hold` stream continue.
    pub fn release(&self) {
        let (open, cv) = &self.state.gate;
        *open.lock().unwrap() = true;
        cv.notify_all();
    }

    fn released(&self) -> bool {
        *self.state.gate.0.lock().unwrap()
    }

    /// How the `drip` and `flood` streams that ended so far ended.
    pub fn stream_ends(&self) -> Vec<DripEnd> {
        self.state.drips.lock().unwrap().clone()
    }

    /// Waits (bounded) for a `drip` or `flood` stream to end on the upstream side.
    pub fn wait_drip_end(&self, timeout: Duration) -> DripEnd {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.state.drips.lock().unwrap().first() {
                return *end;
            }
            assert!(
                Instant::now() < deadline,
                "no drip stream ended in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(stream: TcpStream, state: &State) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                let (k, v) = (k.trim().to_string(), v.trim().to_string());
                if k.eq_ignore_ascii_case("content-length") {
                    content_length = v.parse().unwrap_or(0);
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0; content_length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let path = request_line
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .to_string();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        state.seen.lock().unwrap().push(Seen {
            path: path.clone(),
            headers,
            body: body.clone(),
        });
        if path == "/v1/models" {
            respond_json(
                &mut w,
                200,
                &json!({"object":"list","data":[{"id":"upstream-own","object":"model"}]}),
            );
            continue;
        }
        let model = body["model"].as_str().unwrap_or("").to_string();
        let stream = body["stream"].as_bool().unwrap_or(false);
        let wants_usage = body["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        let keep_going = match model.as_str() {
            "garbage" => {
                let payload = "<html>upstream exploded</html>";
                write!(
                    w,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
                    payload.len()
                )
                .is_ok()
            }
            "badhttp" => {
                let _ = w.write_all(b"\x00\x01 this is not http\r\n\r\n");
                false
            }
            "hang" => {
                // Hold the connection until the proxy gives up on it.
                let mut sink = [0u8; 64];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                false
            }
            "strict" if body.get("stream_options").is_some() => {
                respond_json(
                    &mut w,
                    400,
                    &json!({"error":{"message":"stream_options is not supported","type":"BadRequestError","code":400}}),
                );
                true
            }
            _ if stream => stream_answer(&mut w, &model, wants_usage, state),
            _ => {
                respond_json(&mut w, 200, &whole_answer(&path, &model));
                true
            }
        };
        if !keep_going {
            return;
        }
    }
}

fn whole_answer(path: &str, model: &str) -> Value {
    let usage = json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18});
    let mut v = match path {
        "/v1/embeddings" => json!({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
            "model": model,
            "usage": {"prompt_tokens": 11, "total_tokens": 11},
        }),
        "/v1/completions" => json!({
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": model,
            "choices": [{"index": 0, "text": "Hello world", "finish_reason": "stop", "logprobs": null}],
            "usage": usage,
        }),
        _ => json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                         "finish_reason": "stop", "logprobs": null}],
            "usage": usage,
        }),
    };
    if model == "nousage" || model == "strict" {
        v.as_object_mut().unwrap().remove("usage");
    }
    v
}

fn respond_json(w: &mut TcpStream, status: u16, v: &Value) {
    let payload = v.to_string();
    let reason = if status == 200 { "OK" } else { "Error" };
    let _ = write!(
        w,
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    );
}

fn chunk(model: &str, text: &str, with_usage_field: bool) -> String {
    let mut v = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null, "logprobs": null}],
    });
    if with_usage_field {
        v["usage"] = Value::Null;
    }
    format!("data: {v}\n\n")
}

fn usage_chunk(model: &str, prompt: u64, completion: u64) -> String {
    let v = json!({
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                  "total_tokens": prompt + completion},
    });
    format!("data: {v}\n\n")
}

/// One HTTP/1.1 chunk; false when the reader is gone.
fn send(w: &mut TcpStream, data: &str) -> bool {
    write!(w, "{:x}\r\n{data}\r\n", data.len()).is_ok() && w.flush().is_ok()
}

/// Streams an SSE answer; returns whether the connection can be reused.
fn stream_answer(w: &mut TcpStream, model: &str, wants_usage: bool, state: &State) -> bool {
    let usage = wants_usage && model != "nousage" && model != "strict";
    if write!(
        w,
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    match model {
        "hold" => {
            if !send(w, &chunk(model, "first", usage)) {
                return false;
            }
            wait_for_release(state);
            if !send(w, &chunk(model, "second", usage)) {
                return false;
            }
        }
        "drip" => {
            let mut sent = 0;
            let mut gone = false;
            for _ in 0..DRIP_CHUNKS {
                if !send(w, &chunk(model, "tok ", usage)) {
                    gone = true;
                    break;
                }
                sent += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            if !gone && usage {
                gone = !send(w, &usage_chunk(model, 9, DRIP_CHUNKS as u64));
            }
            if !gone {
                gone = !send(w, "data: [DONE]\n\n") || !send(w, "");
            }
            state.drips.lock().unwrap().push(DripEnd {
                chunks_sent: sent,
                reader_gone: gone,
            });
            return false;
        }
        "flood" => {
            const FLOOD_CHUNKS: usize = (64 << 30) / 4096;
            let piece = chunk(model, &"x".repeat(4096), usage);
            let mut sent = 0;
            while sent < FLOOD_CHUNKS && send(w, &piece) {
                sent += 1;
            }
            let gone = sent < FLOOD_CHUNKS || !send(w, "data: [DONE]\n\n") || !send(w, "");
            state.drips.lock().unwrap().push(DripEnd {
                chunks_sent: sent,
                reader_gone: gone,
            });
            return false;
        }
        "reset" => {
            let _ = send(w, &chunk(model, "one", usage));
            let _ = send(w, &chunk(model, "two", usage));
            wait_for_release(state);
            reset(w);
            return false;
        }
        _ => {
            for text in ["Hel", "lo", " world"] {
                if !send(w, &chunk(model, text, usage)) {
                    return false;
                }
            }
        }
    }
    if usage && !send(w, &usage_chunk(model, 11, 3)) {
        return false;
    }
    send(w, "data: [DONE]\n\n") && send(w, "")
}

fn wait_for_release(state: &State) {
    let (open, cv) = &state.gate;
    let mut g = open.lock().unwrap();
    while !*g {
        g = cv.wait(g).unwrap();
    }
}

/// Closes with a TCP RST (SO_LINGER 0) instead of a FIN.
fn reset(w: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            w.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
    let _ = w.shutdown(std::net::Shutdown::Read);
}

/// A plain HTTP client (hyper) for talking to kedge.
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }

    /// Asserts the OpenAI error shape and returns its code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].is_string(), "{}", self.body);
        assert!(e["type"].is_string(), "{}", self.body);
        e["code"].as_str().unwrap_or_default().to_string()
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }
}

impl HttpClient {
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> hyper::Response<Incoming> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .expect("kedge answers within 10 s")
            .expect("request succeeds")
    }

    pub async fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let resp = self.send(method, url, headers, body).await;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .expect("body within 10 s")
            .expect("body reads")
            .to_bytes();
        Answer {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// The next data frame of a body, or None at its end; panics after `timeout`.
pub async fn next_data(body: &mut Incoming, timeout: Duration) -> Option<Result<Bytes, String>> {
    loop {
        let frame = tokio::time::timeout(timeout, body.frame())
            .await
            .expect("next frame in time")?;
        match frame {
            Ok(f) => {
                if let Ok(d) = f.into_data() {
                    return Some(Ok(d));
                }
            }
            Err(e) => return Some(Err(e.to_string())),
        }
    }
}

/// The JSON payloads of the `data:` lines in an SSE text (without `[DONE]`).
pub fn sse_payloads(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}
