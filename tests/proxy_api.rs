//! The proxy core against a local OpenAI-speaking upstream, through the real
//! `kedge` binary (attach = "off": no root needed): every status code, the
//! endpoints, streaming order and timing, exact usage, disconnect accounting.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    Kedge, free_port,
    openai::{Answer, DRIP_CHUNKS, FakeOpenAi, HttpClient, next_data, sse_payloads},
};

const KEY_CI: &str = "sk-kedge-test-ci";
const KEY_LIMITED: &str = "sk-kedge-test-limited";

/// A kedge in front of `up`, with one route per upstream behaviour.
fn start(up: &FakeOpenAi, extra: &str) -> (Kedge, String) {
    let port = free_port("127.0.0.1");
    let down = free_port("127.0.0.1");
    let config = format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"

[kernel]
attach = "off"
pin_root = "{{pin_root}}"
default_class = "standard"

[limits]
max_body_bytes = 4096

[classify]
trusted_cidrs = ["192.0.2.0/24"]

[[class]]
name = "interactive"
priority = 0

[[class]]
name = "standard"
priority = 2

[[network]]
cidr = "127.0.0.0/8"
class = "standard"
tenant = "loopback"

[[api_key]]
name = "ci"
sha256 = "{ci}"
tenant = "product"
class = "interactive"

[[api_key]]
name = "limited"
sha256 = "{limited}"
tenant = "research"
models = ["gpt-test"]

[[backend]]
name = "fake"
url = "http://{up}"
response_timeout_ms = 1500
stream_idle_timeout_ms = 1500

[[backend]]
name = "fake-no-stream-usage"
url = "http://{up}"
stream_usage = false

[[backend]]
name = "fake-drain"
url = "http://{up}"
on_disconnect = "drain"

[[backend]]
name = "down"
url = "http://127.0.0.1:{down}"
connect_timeout_ms = 500

[[route]]
model = "gpt-test"
backend = "fake"
upstream_model = "normal"

{routes}
{extra}

[metrics]
addr = "{{admin}}"
"#,
        ci = sha(KEY_CI),
        limited = sha(KEY_LIMITED),
        up = up.addr,
        routes = [
            ("nousage", "fake"),
            ("strict", "fake"),
            ("hold", "fake"),
            ("drip", "fake"),
            ("reset", "fake"),
            ("garbage", "fake"),
            ("badhttp", "fake"),
            ("hang", "fake"),
        ]
        .iter()
        .map(|(m, b)| format!("[[route]]\nmodel = \"{m}\"\nbackend = \"{b}\"\n"))
        .chain([
            "[[route]]\nmodel = \"strict-plain\"\nbackend = \"fake-no-stream-usage\"\nupstream_model = \"strict\"\n".to_string(),
            "[[route]]\nmodel = \"drip-drain\"\nbackend = \"fake-drain\"\nupstream_model = \"drip\"\n".to_string(),
            "[[route]]\nmodel = \"offline\"\nbackend = \"down\"\n".to_string(),
        ])
        .collect::<String>(),
    );
    let kedge = Kedge::start(&config);
    (kedge, format!("http://127.0.0.1:{port}"))
}

fn sha(key: &str) -> String {
    kedge::classify::sha256_hex(key.as_bytes())
}

fn chat(model: &str, stream: bool) -> String {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
}

/// Polls a metric until it equals `want` (settlement happens after the response).
fn wait_metric(kedge: &Kedge, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = kedge.metric(name, labels);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} = {got}, want {want}\n{}",
            kedge.metrics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tokens(kedge: &Kedge, direction: &str, class: &str, tenant: &str) -> f64 {
    kedge.metric(
        "kedge_tokens_total",
        &[
            ("direction", direction),
            ("class", class),
            ("tenant", tenant),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_status_in_openai_shape() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let chat_url = format!("{base}/v1/chat/completions");
    let bearer_ci = format!("Bearer {KEY_CI}");
    let bearer_limited = format!("Bearer {KEY_LIMITED}");

    let cases: Vec<(u16, &str, Answer)> = vec![
        (
            400,
            "invalid_json",
            c.call("POST", &chat_url, &[], "{not json").await,
        ),
        (
            400,
            "missing_required_parameter",
            c.call("POST", &chat_url, &[], r#"{"messages":[]}"#).await,
        ),
        (
            400,
            "missing_required_parameter",
            c.call("POST", &chat_url, &[], r#"{"model":"gpt-test"}"#)
                .await,
        ),
        (
            401,
            "invalid_api_key",
            c.call(
                "POST",
                &chat_url,
                &[("authorization", "Bearer sk-wrong")],
                &chat("gpt-test", false),
            )
            .await,
        ),
        (
            403,
            "model_not_allowed",
            c.call(
                "POST",
                &chat_url,
                &[("authorization", &bearer_limited)],
                &chat("nousage", false),
            )
            .await,
        ),
        (
            404,
            "model_not_found",
            c.call(
                "POST",
                &chat_url,
                &[("authorization", &bearer_ci)],
                &chat("gpt-9", false),
            )
            .await,
        ),
        (
            404,
            "not_found",
            c.call("GET", &format!("{base}/v2/whatever"), &[], "").await,
        ),
        (
            405,
            "method_not_allowed",
            c.call("GET", &chat_url, &[], "").await,
        ),
        (
            413,
            "request_too_large",
            c.call("POST", &chat_url, &[], &chat(&"x".repeat(5000), false))
                .await,
        ),
        (
            502,
            "bad_gateway",
            c.call("POST", &chat_url, &[], &chat("garbage", false))
                .await,
        ),
        (
            502,
            "bad_gateway",
            c.call("POST", &chat_url, &[], &chat("badhttp", false))
                .await,
        ),
        (
            503,
            "backend_unavailable",
            c.call("POST", &chat_url, &[], &chat("offline", false))
                .await,
        ),
        (
            504,
            "upstream_timeout",
            c.call("POST", &chat_url, &[], &chat("hang", false)).await,
        ),
    ];
    for (status, code, answer) in &cases {
        assert_eq!(answer.status.as_u16(), *status, "{code}: {}", answer.body);
        assert_eq!(answer.error_code(), *code, "{}", answer.body);
        assert!(answer.headers.contains_key("x-request-id"));
        assert!(!answer.body.contains(KEY_CI) && !answer.body.contains("sk-wrong"));
    }
    // Only the garbage/badhttp/hang requests reached the upstream.
    let models: Vec<String> = up
        .seen()
        .iter()
        .map(|s| s.body["model"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(models, ["garbage", "badhttp", "hang"]);
    let log = kedge.log_text();
    assert!(
        !log.contains(KEY_CI) && !log.contains("sk-wrong"),
        "keys are never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_api_keys_refuse_anonymous_requests() {
    let up = FakeOpenAi::start();
    let c = HttpClient::default();
    {
        let (_kedge, base) = start(&up, "");
        let a = c
            .call(
                "POST",
                &format!("{base}/v1/chat/completions"),
                &[],
                &chat("gpt-test", false),
            )
            .await;
        assert_eq!(
            a.status, 200,
            "keys optional: anonymous allowed: {}",
            a.body
        );
    }
    let (_kedge, base) = start_requiring_keys(&up);
    let url = format!("{base}/v1/chat/completions");
    let a = c.call("POST", &url, &[], &chat("gpt-test", false)).await;
    assert_eq!(a.status, 401, "{}", a.body);
    assert_eq!(a.error_code(), "missing_api_key");
    let auth = format!("Bearer {KEY_CI}");
    let a = c
        .call(
            "POST",
            &url,
            &[("authorization", &auth)],
            &chat("gpt-test", false),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
}

fn start_requiring_keys(up: &FakeOpenAi) -> (Kedge, String) {
    let port = free_port("127.0.0.1");
    let config = format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
[kernel]
attach = "off"
pin_root = "{{pin_root}}"
[classify]
require_api_key = true
[[class]]
name = "standard"
priority = 2
[[api_key]]
name = "ci"
sha256 = "{ci}"
tenant = "product"
[[backend]]
name = "fake"
url = "http://{up}"
[[route]]
model = "gpt-test"
backend = "fake"
upstream_model = "normal"
[metrics]
addr = "{{admin}}"
"#,
        ci = sha(KEY_CI),
        up = up.addr
    );
    (Kedge::start(&config), format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_route_rename_and_count_reported_usage() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let auth = format!("Bearer {KEY_CI}");
    let h = [("authorization", auth.as_str()), ("x-request-id", "req-42")];

    let a = c
        .call(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &h,
            &chat("gpt-test", false),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["choices"][0]["message"]["content"], "Hello world");
    assert_eq!(a.headers["x-request-id"], "req-42");
    assert_eq!(
        a.headers["x-kedge-class"], "interactive",
        "class from the key"
    );
    assert_eq!(
        a.headers["x-kedge-tenant"], "product",
        "tenant from the key"
    );

    let body = json!({"model": "gpt-test", "prompt": "Say hi"}).to_string();
    let a = c
        .call("POST", &format!("{base}/v1/completions"), &h, &body)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["choices"][0]["text"], "Hello world");

    let body = json!({"model": "gpt-test", "input": "embed me"}).to_string();
    let a = c
        .call("POST", &format!("{base}/v1/embeddings"), &h, &body)
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["data"][0]["embedding"][1], -0.5);

    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    // Pooled: at least one request reused a connection. (A connection goes
    // back to the pool just after its answer ends, so a request right behind
    // may still open a second one on a loaded machine.)
    assert!(
        up.connections() < 3,
        "three requests opened {} upstream connections",
        up.connections()
    );
    let paths: Vec<_> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    );
    for s in &seen {
        assert_eq!(s.body["model"], "normal", "routed under the upstream name");
        assert_eq!(s.header("x-request-id"), Some("req-42"));
        assert_eq!(s.header("authorization"), None, "kedge keys stay at kedge");
        assert_eq!(s.header("x-forwarded-for"), Some("127.0.0.1"));
    }
    // Chat + completion reported 11/7 each, embeddings 11/0.
    wait_metric(
        &kedge,
        "kedge_tokens_total",
        &[
            ("direction", "input"),
            ("class", "interactive"),
            ("tenant", "product"),
        ],
        33.0,
    );
    assert_eq!(tokens(&kedge, "output", "interactive", "product"), 14.0);

    let a = c
        .call(
            "GET",
            &format!("{base}/v1/models"),
            &[("authorization", &format!("Bearer {KEY_LIMITED}"))],
            "",
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let ids: Vec<_> = a.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["gpt-test"], "only the models this key may use");
    let a = c.call("GET", &format!("{base}/v1/models"), &[], "").await;
    assert!(
        a.json()["data"].as_array().unwrap().len() > 10,
        "{}",
        a.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_classification_headers_are_ignored_and_counted() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let a = c
        .call(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[
                ("x-kedge-tenant", "product"),
                ("x-kedge-class", "interactive"),
            ],
            &chat("gpt-test", false),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.headers["x-kedge-tenant"], "loopback",
        "from the connection, not the header"
    );
    assert_eq!(a.headers["x-kedge-class"], "standard");
    let untrusted = kedge.metrics().lines().find_map(|l| {
        l.strip_prefix("kedge_untrusted_header_total ")
            .map(str::to_owned)
    });
    assert_eq!(untrusted.as_deref(), Some("1"));
    let seen = up.seen();
    assert_eq!(
        seen[0].header("x-kedge-tenant"),
        None,
        "classification headers stay at kedge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_event_reaches_the_client_before_the_upstream_finishes() {
    let up = FakeOpenAi::start();
    let (_kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let resp = c
        .send(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[],
            &chat("hold", true),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The upstream is blocked after its first event until `release`.
    let first = next_data(&mut body, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&first).contains("\"first\""),
        "{first:?}"
    );
    up.release();
    let mut rest = String::new();
    while let Some(d) = next_data(&mut body, Duration::from_secs(5)).await {
        rest.push_str(&String::from_utf8_lossy(&d.unwrap()));
    }
    assert!(rest.contains("\"second\""), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_usage_is_exact_and_the_extra_chunk_is_hidden() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let url = format!("{base}/v1/chat/completions");

    // The client did not ask for usage: kedge asks, reads it, hides the chunk.
    let a = c.call("POST", &url, &[], &chat("gpt-test", true)).await;
    assert_eq!(a.status, 200);
    let chunks = sse_payloads(&a.body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello world");
    assert!(
        chunks.iter().all(|c| c["usage"].is_null()),
        "usage chunk leaked: {}",
        a.body
    );
    assert_eq!(up.seen()[0].body["stream_options"]["include_usage"], true);
    wait_metric(
        &kedge,
        "kedge_tokens_total",
        &[
            ("direction", "output"),
            ("class", "standard"),
            ("tenant", "loopback"),
        ],
        3.0,
    );
    assert_eq!(tokens(&kedge, "input", "standard", "loopback"), 11.0);

    // The client asked: it gets the usage chunk, exactly as the upstream sent it.
    let body = json!({"model": "gpt-test", "stream": true, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "hi"}]});
    let a = c.call("POST", &url, &[], &body.to_string()).await;
    let last = sse_payloads(&a.body).pop().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 3, "{}", a.body);
    wait_metric(
        &kedge,
        "kedge_tokens_total",
        &[
            ("direction", "output"),
            ("class", "standard"),
            ("tenant", "loopback"),
        ],
        6.0,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstream_usage_kedge_counts() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let url = format!("{base}/v1/chat/completions");
    let labels_out = [
        ("direction", "output"),
        ("class", "standard"),
        ("tenant", "loopback"),
    ];
    let labels_in = [
        ("direction", "input"),
        ("class", "standard"),
        ("tenant", "loopback"),
    ];

    // A server that rejects stream_options: with stream_usage on, its 400 passes through...
    let a = c.call("POST", &url, &[], &chat("strict", true)).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("stream_options is not supported"));
    // ...with the per-backend switch off, the stream works and kedge counts:
    // "Hello world" = 11 bytes = 3 tokens; prompt "hi" = 4 + 1 + 3 = 8 tokens.
    let a = c.call("POST", &url, &[], &chat("strict-plain", true)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        up.seen()
            .last()
            .unwrap()
            .body
            .get("stream_options")
            .is_none()
    );
    wait_metric(&kedge, "kedge_tokens_total", &labels_out, 3.0);
    assert_eq!(kedge.metric("kedge_tokens_total", &labels_in), 8.0);

    // Non-streaming without usage: counted from the message.
    let a = c.call("POST", &url, &[], &chat("nousage", false)).await;
    assert_eq!(a.status, 200, "{}", a.body);
    wait_metric(&kedge, "kedge_tokens_total", &labels_out, 6.0);
    assert_eq!(kedge.metric("kedge_tokens_total", &labels_in), 16.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_mid_stream_aborts_the_client_stream_and_counts_what_passed() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    let c = HttpClient::default();
    let resp = c
        .send(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[],
            &chat("reset", true),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The first event arrives while the upstream still holds the connection...
    let first = next_data(&mut body, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    let mut text = String::from_utf8_lossy(&first).into_owned();
    // ...then it resets it.
    up.release();
    let mut aborted = false;
    while let Some(d) = next_data(&mut body, Duration::from_secs(5)).await {
        match d {
            Ok(d) => text.push_str(&String::from_utf8_lossy(&d)),
            Err(_) => {
                aborted = true;
                break;
            }
        }
    }
    assert!(
        aborted,
        "the client must see the stream break, not a clean end: {text}"
    );
    assert!(text.contains("\"one\""), "{text}");
    assert!(!text.contains("[DONE]"));
    // kedge counts what it received from the upstream: at least what reached
    // the client, at most what the upstream sent ("one" + "two" = 6 bytes =
    // 2 tokens; the reset may discard "two" in a socket buffer on either hop).
    let passed: String = sse_payloads(&text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let at_least = kedge::tokens::count_text(&passed) as f64;
    let labels = [
        ("direction", "output"),
        ("class", "standard"),
        ("tenant", "loopback"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = loop {
        let v = kedge.metric("kedge_tokens_total", &labels);
        if v >= at_least || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        (at_least..=2.0).contains(&counted),
        "counted {counted}, client saw {passed:?}"
    );
}

/// Reads `n` events of a drip stream, then drops the connection.
async fn read_then_disconnect(base: &str, model: &str, n: usize) {
    let c = HttpClient::default();
    let resp = c
        .send(
            "POST",
            &format!("{base}/v1/chat/completions"),
            &[],
            &chat(model, true),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0;
    while got < n {
        let d = next_data(&mut body, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        got += String::from_utf8_lossy(&d).matches("\"tok \"").count();
    }
    drop(body);
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_upstream_and_counts_what_streamed() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    read_then_disconnect(&base, "drip", 3).await;
    let end = up.wait_drip_end(Duration::from_secs(5));
    assert!(
        end.reader_gone,
        "the upstream request was cancelled: {end:?}"
    );
    assert!(end.chunks_sent < DRIP_CHUNKS, "{end:?}");
    // Each "tok " is one token; the upstream reported nothing yet, so kedge
    // counted what passed: at least what the client read, at most what was sent.
    let labels = [
        ("direction", "output"),
        ("class", "standard"),
        ("tenant", "loopback"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let counted = loop {
        let v = kedge.metric("kedge_tokens_total", &labels);
        if v > 0.0 || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        (3.0..=end.chunks_sent as f64).contains(&counted),
        "counted {counted}, upstream sent {}",
        end.chunks_sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_with_drain_settles_the_exact_usage() {
    let up = FakeOpenAi::start();
    let (kedge, base) = start(&up, "");
    read_then_disconnect(&base, "drip-drain", 3).await;
    let end = up.wait_drip_end(Duration::from_secs(5));
    assert!(!end.reader_gone, "drained to the end: {end:?}");
    assert_eq!(end.chunks_sent, DRIP_CHUNKS);
    // The upstream's own usage (9 in, 20 out) is what lands.
    let labels = [
        ("direction", "output"),
        ("class", "standard"),
        ("tenant", "loopback"),
    ];
    wait_metric(&kedge, "kedge_tokens_total", &labels, DRIP_CHUNKS as f64);
    assert_eq!(tokens(&kedge, "input", "standard", "loopback"), 9.0);
}
