//! The real Python `openai` package pointed at kedge (installed by
//! `cargo xtask setup`): chat, streaming with and without usage, models,
//! embeddings, and errors raised as the SDK's own exceptions. Skips cleanly
//! when python3 or the package is missing.

mod support;

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{Kedge, free_port, openai::FakeOpenAi};

const KEY: &str = "sk-kedge-sdk-test";

fn python_openai() -> Result<(), String> {
    match Command::new("python3")
        .args(["-c", "import openai"])
        .output()
    {
        Err(e) => Err(format!("python3 is not available ({e})")),
        Ok(o) if !o.status.success() => Err(
            "the Python `openai` package is not installed (cargo xtask setup installs it)".into(),
        ),
        Ok(_) => Ok(()),
    }
}

#[test]
fn the_openai_python_client_cannot_tell_kedge_is_there() {
    if let Err(why) = python_openai() {
        eprintln!("skipped: {why}");
        return;
    }
    let up = FakeOpenAi::start();
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
name = "sdk"
sha256 = "{hash}"
tenant = "sdk"
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
        hash = kedge::classify::sha256_hex(KEY.as_bytes()),
        up = up.addr
    );
    let kedge = Kedge::start(&config);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/python/openai_client.py"
    );
    let out = Command::new("python3")
        .args([
            script,
            &format!("http://127.0.0.1:{port}/v1"),
            KEY,
            "gpt-test",
        ])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        kedge.log_text()
    );
    let checks: HashMap<String, Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["check"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(checks["chat"]["content"], "Hello world");
    assert_eq!(checks["chat"]["completion_tokens"], 7);
    assert_eq!(checks["stream"]["content"], "Hello world");
    assert_eq!(
        checks["stream"]["usage_chunks"], 0,
        "kedge's usage chunk is hidden"
    );
    assert_eq!(checks["stream_usage"]["completion_tokens"], 3);
    assert_eq!(checks["models"]["ids"], serde_json::json!(["gpt-test"]));
    assert_eq!(checks["embeddings"]["dims"], 2);
    assert_eq!(checks["not_found"]["raised"], "NotFoundError");
    assert_eq!(checks["not_found"]["code"], "model_not_found");
    assert_eq!(checks["bad_key"]["raised"], "AuthenticationError");
    assert_eq!(checks["bad_key"]["code"], "invalid_api_key");
    // chat 7 + stream 3 + stream_usage 3 output tokens, all reported upstream
    // (a stream settles when its upstream ends, which may trail the client).
    let labels = [
        ("direction", "output"),
        ("class", "standard"),
        ("tenant", "sdk"),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    while kedge.metric("kedge_tokens_total", &labels) != 13.0 {
        assert!(Instant::now() < deadline, "{}", kedge.metrics());
        std::thread::sleep(Duration::from_millis(20));
    }
}
