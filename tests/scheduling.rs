//! Priority scheduling end to end: the real `kedge` binary, a slow simulated
//! upstream with one slot, and requests of two classes racing for it. The order
//! of service must follow the policy; a full queue answers 429 with Retry-After.

mod support;

use std::{net::SocketAddr, thread, time::Duration};

use support::{Kedge, Sim, http_post, metric_value, wait_until};

fn start(sim: SocketAddr, policy: &str) -> (Kedge, SocketAddr) {
    start_with(sim, policy, "")
}

fn start_with(sim: SocketAddr, policy: &str, schedule_extra: &str) -> (Kedge, SocketAddr) {
    let port = support::free_port("127.0.0.1");
    let cfg = format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"

[kernel]
attach = "off"

[classify]
trusted_cidrs = ["127.0.0.0/8"]

[[class]]
name = "interactive"
priority = 0

[[class]]
name = "batch"
priority = 3

[[backend]]
name = "gpu"
url = "http://{sim}"

[schedule]
policy = "{policy}"
max_in_flight = 1
{schedule_extra}

[[schedule.class]]
name = "batch"
max_queue = 3

[gpu]
source = "none"

[metrics]
addr = "{{admin}}"
"#
    );
    let kedge = Kedge::start(&cfg);
    (kedge, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Sends a chat request of `class` on its own thread; returns the sim's
/// response id number (the order the upstream served them in) or the status.
fn send(addr: SocketAddr, class: &'static str) -> thread::JoinHandle<String> {
    send_long(addr, class, 10)
}

/// Like [`send`], with `max_tokens` output tokens (the sim's time per request).
fn send_long(addr: SocketAddr, class: &'static str, max_tokens: u32) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        http_post(
            addr,
            "/v1/chat/completions",
            &[("x-kedge-class", class)],
            &format!(
                r#"{{"model":"m","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
            ),
        )
    })
}

fn served_order(resp: &str) -> u64 {
    let at = resp
        .find("\"id\":\"sim-")
        .unwrap_or_else(|| panic!("not served: {resp}"));
    resp[at + 10..].split('"').next().unwrap().parse().unwrap()
}

#[test]
fn strict_priority_serves_interactive_before_queued_batch_and_bounds_the_queue() {
    // One slot, ~400 ms a request: everything after the first waits in kedge.
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--ttft-ms",
        "0",
        "--decode-ms-per-token",
        "40",
    ]);
    let (kedge, addr) = start(sim.addr, "strict");
    let depth = |k: &Kedge| metric_value(&k.metrics(), "kedge_queue_depth", &[("class", "batch")]);

    // The blocker holds the one slot for ~2 s while the queues fill.
    let blocker = send_long(addr, "batch", 50);
    wait_until(Duration::from_secs(5), "the blocker in flight", || {
        metric_value(
            &kedge.metrics(),
            "kedge_queue_in_flight",
            &[("backend", "gpu")],
        ) == 1.0
    });
    let batch: Vec<_> = (0..3).map(|_| send(addr, "batch")).collect();
    wait_until(
        Duration::from_secs(5),
        "three batch requests queued",
        || depth(&kedge) == 3.0,
    );

    // The batch queue is full (max_queue = 3): the next batch request is refused.
    let refused = http_post(
        addr,
        "/v1/chat/completions",
        &[("x-kedge-class", "batch")],
        r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert!(refused.contains(" 429 "), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after: "),
        "{refused}"
    );
    assert!(refused.contains("queue_full"), "{refused}");

    let interactive: Vec<_> = (0..2).map(|_| send(addr, "interactive")).collect();
    wait_until(Duration::from_secs(5), "interactive queued", || {
        metric_value(
            &kedge.metrics(),
            "kedge_queue_depth",
            &[("class", "interactive")],
        ) == 2.0
    });

    let blocker = served_order(&blocker.join().unwrap());
    let interactive: Vec<u64> = interactive
        .into_iter()
        .map(|h| served_order(&h.join().unwrap()))
        .collect();
    let batch: Vec<u64> = batch
        .into_iter()
        .map(|h| served_order(&h.join().unwrap()))
        .collect();
    // Served after the blocker, the two interactive requests overtake all queued batch ones.
    let last_interactive = *interactive.iter().max().unwrap();
    let first_batch = *batch.iter().min().unwrap();
    assert!(
        interactive.iter().all(|&i| i > blocker),
        "{blocker} {interactive:?}"
    );
    assert!(
        last_interactive < first_batch,
        "interactive {interactive:?} vs batch {batch:?}"
    );

    let m = kedge.metrics();
    assert_eq!(
        metric_value(
            &m,
            "kedge_queue_rejected_total",
            &[("class", "batch"), ("reason", "queue_full")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "kedge_queue_admitted_total",
            &[("class", "interactive")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "kedge_queue_admitted_total", &[("class", "batch")]),
        4.0,
        "{m}"
    );
}

#[test]
fn a_client_that_leaves_the_queue_frees_its_place() {
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--ttft-ms",
        "0",
        "--decode-ms-per-token",
        "30",
    ]);
    let (kedge, addr) = start(sim.addr, "strict");
    // ~3 s in flight: the hang-up below happens while it still holds the slot.
    let blocker = send_long(addr, "batch", 100);
    wait_until(Duration::from_secs(5), "the blocker in flight", || {
        metric_value(
            &kedge.metrics(),
            "kedge_queue_in_flight",
            &[("backend", "gpu")],
        ) == 1.0
    });
    // A client that queues, then hangs up.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let body = r#"{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
        write!(s, "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\nx-kedge-class: batch\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
        wait_until(Duration::from_secs(5), "the second request queued", || {
            metric_value(&kedge.metrics(), "kedge_queue_depth", &[("class", "batch")]) == 1.0
        });
    }
    wait_until(
        Duration::from_secs(5),
        "the queue to empty after the hang-up",
        || metric_value(&kedge.metrics(), "kedge_queue_depth", &[("class", "batch")]) == 0.0,
    );
    // Emptied by the hang-up, not by the slot freeing: the blocker still runs.
    assert_eq!(
        metric_value(
            &kedge.metrics(),
            "kedge_queue_in_flight",
            &[("backend", "gpu")]
        ),
        1.0
    );
    assert!(blocker.join().unwrap().contains(" 200 "));
    // Only the blocker ever reached the upstream.
    let m = kedge.metrics();
    assert_eq!(
        metric_value(&m, "kedge_queue_admitted_total", &[("class", "batch")]),
        1.0,
        "{m}"
    );
}

#[test]
fn a_persistently_full_queue_lowers_its_class_admission() {
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--ttft-ms",
        "0",
        "--decode-ms-per-token",
        "100",
    ]);
    let (kedge, addr) = start_with(
        sim.addr,
        "strict",
        "feedback = { high = 0.9, low = 0.5, hold_full_ms = 300, hold_drained_ms = 300 }",
    );
    let admission = |k: &Kedge| {
        metric_value(
            &k.metrics(),
            "kedge_admission_permille",
            &[("class", "batch")],
        )
    };
    assert_eq!(admission(&kedge), 1000.0);
    // One in flight for ~3 s and the batch queue (max 3) full behind it.
    let mut clients = vec![send_long(addr, "batch", 30)];
    wait_until(Duration::from_secs(5), "the first in flight", || {
        metric_value(
            &kedge.metrics(),
            "kedge_queue_in_flight",
            &[("backend", "gpu")],
        ) == 1.0
    });
    clients.extend((0..3).map(|_| send(addr, "batch")));
    wait_until(Duration::from_secs(5), "the batch queue full", || {
        metric_value(&kedge.metrics(), "kedge_queue_depth", &[("class", "batch")]) == 3.0
    });
    wait_until(Duration::from_secs(5), "batch admission cut", || {
        admission(&kedge) < 1000.0
    });
    let m = kedge.metrics();
    assert_eq!(
        metric_value(&m, "kedge_admission_permille", &[("class", "interactive")]),
        1000.0,
        "{m}"
    );
    for c in clients {
        c.join().unwrap();
    }
    // Drained: admission recovers.
    wait_until(Duration::from_secs(10), "batch admission restored", || {
        admission(&kedge) == 1000.0
    });
}
