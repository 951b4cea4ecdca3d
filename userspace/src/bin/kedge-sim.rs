//! `kedge-sim`: a simulated OpenAI-compatible model server for the demo and the
//! benchmarks. It behaves like a GPU server with a fixed number of batch slots:
//! a request waits for a slot, then "prefills" (time per prompt token) and
//! "decodes" (time per output token), streaming or not, with exact `usage`.
//! It publishes its load as a vLLM-style `/metrics` page and, with
//! `--gpu-state FILE`, as the state file of the fake NVML library
//! (tests/fake_nvml), so kedge's real GPU code paths see load follow traffic.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::Semaphore};

#[derive(Parser, Clone)]
#[command(about = "A simulated OpenAI-compatible model server (for demos and benchmarks)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Concurrent requests the simulated GPU serves; more wait in its queue.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Time to first token, before prefill (ms).
    #[arg(long, default_value_t = 20)]
    ttft_ms: u64,
    /// Prefill time per prompt token (µs).
    #[arg(long, default_value_t = 50)]
    prefill_us_per_token: u64,
    /// Decode time per output token (ms); 0 answers instantly.
    #[arg(long, default_value_t = 15)]
    decode_ms_per_token: u64,
    /// Output tokens when the request gives no max_tokens.
    #[arg(long, default_value_t = 64)]
    default_output_tokens: u64,
    /// Write "utilization used total" here for the fake NVML library.
    #[arg(long)]
    gpu_state: Option<PathBuf>,
    /// Model names served (default: any name is accepted).
    #[arg(long)]
    model: Vec<String>,
}

struct Sim {
    args: Args,
    slots: Arc<Semaphore>,
    running: AtomicU64,
    waiting: AtomicU64,
    next_id: AtomicU64,
}

type Body = BoxBody<Bytes, Infallible>;

const WORDS: &[&str] = &[
    "the",
    "model",
    "answers",
    "with",
    "simulated",
    "tokens",
    "that",
    "stream",
    "back",
    "to",
    "you",
    "while",
    "kedge",
    "keeps",
    "the",
    "gpu",
    "busy",
    "but",
    "never",
    "melting",
];
const GPU_MEMORY_BYTES: u64 = 80 << 30;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    eprintln!(
        "kedge-sim listening on {} with {} slots",
        listener.local_addr()?,
        args.slots
    );
    let sim = Arc::new(Sim {
        slots: Arc::new(Semaphore::new(args.slots.max(1))),
        args,
        running: AtomicU64::new(0),
        waiting: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
    });
    sim.publish_gpu_state();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let sim = sim.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let sim = sim.clone();
                async move { Ok::<_, Infallible>(sim.handle(req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

impl Sim {
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/metrics") => text(StatusCode::OK, self.metrics()),
            (Method::GET, "/v1/models") => {
                let data: Vec<Value> = self
                    .args
                    .model
                    .iter()
                    .map(|m| json!({"id": m, "object": "model", "owned_by": "kedge-sim"}))
                    .collect();
                json_response(StatusCode::OK, json!({"object": "list", "data": data}))
            }
            (Method::POST, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
                let body = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => return error(StatusCode::BAD_REQUEST, "unreadable body"),
                };
                let Ok(body) = serde_json::from_slice::<Value>(&body) else {
                    return error(StatusCode::BAD_REQUEST, "body is not JSON");
                };
                let model = body
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                if !self.args.model.is_empty() && !self.args.model.contains(&model) {
                    return error(
                        StatusCode::NOT_FOUND,
                        &format!("model `{model}` not served"),
                    );
                }
                self.complete(&path, model, body).await
            }
            _ => error(StatusCode::NOT_FOUND, "unknown path"),
        }
    }

    /// Waits for a slot, then simulates prefill and decode.
    async fn complete(self: Arc<Self>, path: &str, model: String, body: Value) -> Response<Body> {
        let prompt_tokens = prompt_tokens(&body);
        let output_tokens = if path.ends_with("embeddings") {
            0
        } else {
            body.get("max_tokens")
                .or_else(|| body.get("max_completion_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(self.args.default_output_tokens)
        };
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.publish_gpu_state();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.running.fetch_add(1, Ordering::SeqCst);
        self.publish_gpu_state();
        let guard = SlotGuard {
            sim: self.clone(),
            _permit: permit,
        };
        let prefill = Duration::from_millis(self.args.ttft_ms)
            + Duration::from_micros(self.args.prefill_us_per_token * prompt_tokens);
        pause(prefill).await;

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens,
        });
        if path.ends_with("embeddings") {
            drop(guard);
            return json_response(
                StatusCode::OK,
                json!({"object": "list", "model": model, "usage": usage,
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}),
            );
        }
        let chat = path.ends_with("chat/completions");
        let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        let decode = Duration::from_millis(self.args.decode_ms_per_token);
        if !stream {
            pause(decode * output_tokens as u32).await;
            drop(guard);
            let text = words(output_tokens);
            let choice = if chat {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            } else {
                json!({"index": 0, "text": text, "finish_reason": "length"})
            };
            return json_response(
                StatusCode::OK,
                json!({"id": format!("sim-{id}"), "object": if chat { "chat.completion" } else { "text_completion" },
                       "created": created, "model": model, "choices": [choice], "usage": usage}),
            );
        }
        let include_usage = body
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        tokio::spawn(async move {
            let _guard = guard;
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let chunk = |delta: Value, finish: Value| {
                let choice = if chat {
                    json!({"index": 0, "delta": delta, "finish_reason": finish})
                } else {
                    json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish})
                };
                json!({"id": format!("sim-{id}"), "object": object, "created": created, "model": model, "choices": [choice]})
            };
            let mut events = vec![chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            )];
            for i in 0..output_tokens {
                events.push(chunk(
                    json!({"content": format!("{} ", WORDS[i as usize % WORDS.len()])}),
                    Value::Null,
                ));
            }
            events.push(chunk(json!({}), json!("length")));
            if include_usage {
                events.push(
                    json!({"id": format!("sim-{id}"), "object": object, "created": created,
                                   "model": model, "choices": [], "usage": usage}),
                );
            }
            for (i, event) in events.into_iter().enumerate() {
                if i > 0 && i <= output_tokens as usize {
                    pause(decode).await;
                }
                if tx
                    .send(Bytes::from(format!("data: {event}\n\n")))
                    .await
                    .is_err()
                {
                    return; // client went away: stop decoding, free the slot
                }
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let body = ChannelBody(rx);
        Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(BodyExt::boxed(body))
            .expect("valid response")
    }

    fn metrics(&self) -> String {
        let running = self.running.load(Ordering::SeqCst);
        let waiting = self.waiting.load(Ordering::SeqCst);
        format!(
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name=\"sim\"}} {running}\n\
             # TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name=\"sim\"}} {waiting}\n\
             # TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc{{model_name=\"sim\"}} {:.3}\n",
            self.utilization() as f64 / 100.0
        )
    }

    /// Busy slots as a share of all slots, 0..=100.
    fn utilization(&self) -> u64 {
        (self.running.load(Ordering::SeqCst) * 100 / self.args.slots.max(1) as u64).min(100)
    }

    fn publish_gpu_state(&self) {
        if let Some(path) = &self.args.gpu_state {
            let util = self.utilization();
            let used = GPU_MEMORY_BYTES / 4 + GPU_MEMORY_BYTES / 2 * util / 100;
            // Write then rename: the NVML reader never sees a half-written file.
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, format!("{util} {used} {GPU_MEMORY_BYTES}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, path);
            }
        }
    }
}

struct SlotGuard {
    sim: Arc<Sim>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.sim.running.fetch_sub(1, Ordering::SeqCst);
        self.sim.publish_gpu_state();
    }
}

/// A response body fed by a channel: each message is sent as its own frame.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// Sleeps, except for zero: even a zero sleep waits for the next timer tick
/// (about 1 ms), which would make the "instant" upstream of the benchmarks slow.
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// Prompt size as the simulated tokenizer sees it: about four bytes a token.
fn prompt_tokens(body: &Value) -> u64 {
    let mut bytes = 0usize;
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            bytes += m.get("content").map_or(0, |c| c.to_string().len()) + 4;
        }
    }
    for key in ["prompt", "input"] {
        if let Some(v) = body.get(key) {
            bytes += v.to_string().len();
        }
    }
    (bytes as u64).div_ceil(4).max(1)
}

fn words(n: u64) -> String {
    (0..n)
        .map(|i| WORDS[i as usize % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn json_response(status: StatusCode, v: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("valid response")
}

fn text(status: StatusCode, s: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
        .body(Full::new(Bytes::from(s)).boxed())
        .expect("valid response")
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json_response(
        status,
        json!({"error": {"message": message, "type": "invalid_request_error", "code": null}}),
    )
}
