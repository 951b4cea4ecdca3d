//! Cost routing, failover and GPU feedback, end to end: the real `kedge`
//! binary in front of `kedge-sim` servers (a local GPU arm and a cloud arm),
//! real HTTP, and the real `nvml-wrapper` path against a fake NVML driver.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{Kedge, Sim, http_post, metric_value, wait_until};

fn config(local: &str, cloud: SocketAddr, route_extra: &str, extra: &str) -> String {
    let port = support::free_port("127.0.0.1");
    format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"

[kernel]
attach = "off"

[[class]]
name = "interactive"
priority = 0

[[class]]
name = "batch"
priority = 3

[[backend]]
name = "local"
url = "http://{local}"
connect_timeout_ms = 300

[[backend]]
name = "cloud"
url = "http://{cloud}"

[[route]]
model = "llama"
cloud_context_threshold = 200
{route_extra}

[[route.arm]]
backend = "local"
kind = "local"
max_context = 8192
gpus = [0]

[[route.arm]]
backend = "cloud"
kind = "cloud"
upstream_model = "gpt-cloud"
price_input_per_mtok = 0.5
price_output_per_mtok = 1.5
max_context = 128000

[routing]
breaker = {{ failure_threshold = 2, open_ms = 60000 }}

{extra}

[metrics]
addr = "{{admin}}"
"#
    )
}

fn proxy_addr(kedge: &Kedge) -> SocketAddr {
    let text = std::fs::read_to_string(&kedge.config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("addr = \"127.0.0.1:"))
        .unwrap();
    line.trim_start_matches("addr = \"")
        .trim_end_matches('"')
        .parse()
        .unwrap()
}

fn chat(prompt_words: usize) -> String {
    let prompt = vec!["word"; prompt_words].join(" ");
    format!(
        r#"{{"model":"llama","max_tokens":4,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    )
}

fn route_header(resp: &str) -> String {
    resp.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-kedge-route:"))
        .map(|l| l.split_once(':').unwrap().1.trim().to_string())
        .unwrap_or_default()
}

#[test]
fn short_prompts_stay_local_long_ones_go_to_the_cloud() {
    let local = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let cloud = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let kedge = Kedge::start(&config(
        &local.addr.to_string(),
        cloud.addr,
        "",
        "[gpu]\nsource = \"none\"",
    ));
    let addr = proxy_addr(&kedge);

    let short = http_post(addr, "/v1/chat/completions", &[], &chat(5));
    assert!(
        short.starts_with("HTTP/1.0 200") || short.starts_with("HTTP/1.1 200"),
        "{short}"
    );
    assert_eq!(route_header(&short), "local; reason=local_first", "{short}");

    let long = http_post(addr, "/v1/chat/completions", &[], &chat(600));
    assert!(long.contains(" 200 "), "{long}");
    assert_eq!(
        route_header(&long),
        "cloud; reason=context_too_long",
        "{long}"
    );
    // The cloud arm got its own model name.
    assert!(long.contains(r#""model":"gpt-cloud""#), "{long}");

    let m = kedge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "kedge_route_decisions_total",
            &[("reason", "context_too_long"), ("arm", "cloud")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "kedge_route_served_total", &[("kind", "local")]),
        1.0,
        "{m}"
    );
    assert_eq!(metric_value(&m, "kedge_route_local_ratio", &[]), 0.5, "{m}");
}

#[test]
fn a_dead_local_arm_fails_over_then_its_breaker_opens() {
    let dead = format!("127.0.0.1:{}", support::free_port("127.0.0.1"));
    let cloud = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let kedge = Kedge::start(&config(&dead, cloud.addr, "", "[gpu]\nsource = \"none\""));
    let addr = proxy_addr(&kedge);

    for _ in 0..2 {
        let r = http_post(addr, "/v1/chat/completions", &[], &chat(5));
        assert!(r.contains(" 200 "), "{r}");
        assert_eq!(route_header(&r), "cloud; reason=local_first", "{r}");
    }
    let failovers = |m: &str| {
        metric_value(
            m,
            "kedge_route_failovers_total",
            &[("arm", "local"), ("cause", "connect")],
        )
    };
    assert_eq!(failovers(&kedge.metrics()), 2.0);
    // Two failures opened the local breaker: the plan skips the arm now, no new attempt.
    let r = http_post(addr, "/v1/chat/completions", &[], &chat(5));
    assert!(r.contains(" 200 "), "{r}");
    assert_eq!(route_header(&r), "cloud; reason=local_unavailable", "{r}");
    assert_eq!(failovers(&kedge.metrics()), 2.0);
}

#[test]
fn every_arm_failing_gives_one_error_naming_the_route() {
    let dead1 = format!("127.0.0.1:{}", support::free_port("127.0.0.1"));
    let dead2: SocketAddr = format!("127.0.0.1:{}", support::free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let kedge = Kedge::start(&config(&dead1, dead2, "", "[gpu]\nsource = \"none\""));
    let r = http_post(proxy_addr(&kedge), "/v1/chat/completions", &[], &chat(5));
    assert!(r.contains(" 503 "), "{r}");
    assert!(
        r.contains("all_arms_failed") && r.contains("route `llama`"),
        "{r}"
    );
}

#[test]
fn gpu_load_from_nvml_moves_traffic_and_sets_admission() {
    let dir = std::env::temp_dir().join(format!("kedge-routing-gpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    std::fs::write(&state, "30 1000 8000\n").unwrap();
    let Some(lib) = support::build_fake_nvml(&dir, &state) else {
        eprintln!("skipped: no C compiler for the fake NVML library");
        return;
    };
    let local = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let cloud = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let gpu = format!(
        "[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\ninterval_ms = 20\n\
         [[gpu.shed]]\nabove_pct = 90\nmin_priority = 3\nadmit_permille = 200\n",
        lib.display()
    );
    let kedge = Kedge::start(&config(&local.addr.to_string(), cloud.addr, "", &gpu));
    let addr = proxy_addr(&kedge);
    let util = |m: &str| metric_value(m, "kedge_gpu_utilization_ratio", &[("gpu", "0")]);
    wait_until(Duration::from_secs(5), "GPU utilization 0.3", || {
        util(&kedge.metrics()) == 0.3
    });
    let r = http_post(addr, "/v1/chat/completions", &[], &chat(5));
    assert_eq!(route_header(&r), "local; reason=local_first", "{r}");
    let admission = |m: &str| metric_value(m, "kedge_admission_permille", &[("class", "batch")]);
    assert_eq!(admission(&kedge.metrics()), 1000.0);

    std::fs::write(&state, "97 7900 8000\n").unwrap();
    wait_until(Duration::from_secs(5), "GPU utilization 0.97", || {
        util(&kedge.metrics()) == 0.97
    });
    let r = http_post(addr, "/v1/chat/completions", &[], &chat(5));
    assert_eq!(route_header(&r), "cloud; reason=gpu_saturated", "{r}");
    wait_until(Duration::from_secs(5), "batch shed to 200", || {
        admission(&kedge.metrics()) == 200.0
    });
    let m = kedge.metrics();
    assert_eq!(
        metric_value(&m, "kedge_admission_permille", &[("class", "interactive")]),
        1000.0,
        "{m}"
    );

    // Back under the threshold minus the hysteresis: admission recovers.
    std::fs::write(&state, "40 1000 8000\n").unwrap();
    wait_until(Duration::from_secs(5), "batch back to 1000", || {
        admission(&kedge.metrics()) == 1000.0
    });
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_pressure_reaches_the_kernel_admission_map() {
    require_kernel!();
    let dir = std::env::temp_dir().join(format!("kedge-routing-kgpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    std::fs::write(&state, "20 1000 8000\n").unwrap();
    let Some(lib) = support::build_fake_nvml(&dir, &state) else {
        eprintln!("skipped: no C compiler for the fake NVML library");
        return;
    };
    let net = support::TestNet::new(&[2]);
    let local = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let cloud = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let gpu = format!(
        "[gpu]\nsource = \"nvml\"\nnvml_library = \"{}\"\ninterval_ms = 20\n\
         [[gpu.shed]]\nabove_pct = 90\nmin_priority = 3\nadmit_permille = 200\n",
        lib.display()
    );
    let cfg = config(&local.addr.to_string(), cloud.addr, "", &gpu).replace(
        "[kernel]\nattach = \"off\"",
        &format!(
            "[kernel]\ninterface = \"{}\"\nattach = \"tc\"\npin_root = \"{{pin_root}}\"",
            net.host_if
        ),
    );
    let kedge = Kedge::start(&cfg);
    let status = || -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kedge"))
            .args(["status", "--json", "--config"])
            .arg(&kedge.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let batch_admission = |s: &serde_json::Value| {
        s["classes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "batch")
            .unwrap()["admit_permille"]
            .as_u64()
    };
    wait_until(Duration::from_secs(5), "GPU_LOAD at 20%", || {
        status()["gpus"][0]["utilization_pct"] == 20
    });
    assert_eq!(batch_admission(&status()), Some(1000));
    std::fs::write(&state, "97 7900 8000\n").unwrap();
    wait_until(Duration::from_secs(5), "ADMISSION for batch at 200", || {
        batch_admission(&status()) == Some(200)
    });
    let s = status();
    assert_eq!(s["gpus"][0]["utilization_pct"], 97, "{s}");
    let interactive = s["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "interactive")
        .unwrap();
    assert_eq!(interactive["admit_permille"], 1000, "{s}");
    let _ = std::fs::remove_dir_all(&dir);
}
