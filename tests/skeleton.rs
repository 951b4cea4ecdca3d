//! The walking skeleton, end to end: the real `kedge` binary attached to a veth
//! pair, real TCP from a client namespace, a real upstream. An allowed CIDR is
//! proxied (and tagged by the kernel); a `deny` CIDR never connects and the
//! kernel's counter for that class rises.

mod support;

use support::{Kedge, TestNet, Upstream, free_port};

const CONFIG: &str = r#"
[listen]
addr = "0.0.0.0:{port}"

[kernel]
interface = "{iface}"
attach = "{attach}"
pin_root = "{pin_root}"

[[class]]
name = "interactive"
priority = 0

[[class]]
name = "blocked"
priority = 4
deny = true

[[class]]
name = "standard"
priority = 2

[[network]]
cidr = "{subnet}/24"
class = "interactive"
tenant = "team-a"

[[network]]
cidr = "{denied}/32"
class = "blocked"

[[backend]]
name = "local"
url = "http://{upstream}"

[metrics]
addr = "{admin}"
"#;

fn allowed_is_proxied_and_denied_is_dropped(attach: &str) {
    require_kernel!();
    let net = TestNet::new(&[2, 3]);
    let upstream = Upstream::start();
    let port = free_port("0.0.0.0");
    let config = CONFIG
        .replace("{port}", &port.to_string())
        .replace("{iface}", &net.host_if)
        .replace("{attach}", attach)
        .replace("{subnet}", &format!("198.18.{}.0", net.id))
        .replace("{denied}", &net.client_ip(3))
        .replace("{upstream}", &upstream.addr.to_string());
    let kedge = Kedge::start(&config);
    let url = format!("http://{}:{port}/v1/models", net.host_ip);

    let (code, text) = net.curl(2, &url, 3);
    assert_eq!(code, 0, "allowed client failed: {text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""upstream_path":"/v1/models""#), "{text}");
    // The class and tenant came from the kernel: the SYN's mark (tc) or the
    // pinned LPM map (xdp).
    assert!(text.contains("x-kedge-class: interactive"), "{text}");
    assert!(text.contains("x-kedge-tenant: team-a"), "{text}");
    assert_eq!(upstream.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    let (code, text) = net.curl(3, &url, 1);
    assert_eq!(
        code, 28,
        "a denied SYN must time out, not be refused or answered: {text}"
    );
    assert_eq!(upstream.hits.load(std::sync::atomic::Ordering::SeqCst), 1);

    let denied = kedge.metric(
        "kedge_kernel_packets_total",
        &[
            ("class", "blocked"),
            ("verdict", "denied"),
            ("action", "drop"),
        ],
    );
    // curl's SYN and at least one retransmission within the 1 s timeout.
    assert!(
        denied >= 1.0,
        "denied counter {denied}\n{}",
        kedge.metrics()
    );
    let admitted = kedge.metric(
        "kedge_kernel_packets_total",
        &[("class", "interactive"), ("verdict", "admitted")],
    );
    assert_eq!(admitted, 1.0, "{}", kedge.metrics());
    let requests = kedge.metric(
        "kedge_requests_total",
        &[
            ("class", "interactive"),
            ("tenant", "team-a"),
            ("status", "200"),
        ],
    );
    assert_eq!(requests, 1.0, "{}", kedge.metrics());
}

#[test]
fn tc_allowed_is_proxied_and_denied_is_dropped() {
    allowed_is_proxied_and_denied_is_dropped("tc");
}

#[test]
fn xdp_allowed_is_proxied_and_denied_is_dropped() {
    allowed_is_proxied_and_denied_is_dropped("xdp");
}

#[test]
fn unknown_path_gets_an_openai_error_and_sigterm_stops_cleanly() {
    require_kernel!();
    let net = TestNet::new(&[2]);
    let upstream = Upstream::start();
    let port = free_port("0.0.0.0");
    let config = CONFIG
        .replace("{port}", &port.to_string())
        .replace("{iface}", &net.host_if)
        .replace("{attach}", "off")
        .replace("{subnet}", &format!("198.18.{}.0", net.id))
        .replace("{denied}", &net.client_ip(3))
        .replace("{upstream}", &upstream.addr.to_string());
    let mut kedge = Kedge::start(&config);
    let (code, text) = net.curl(2, &format!("http://{}:{port}/nope", net.host_ip), 3);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.contains(r#""code":"not_found""#), "{text}");
    // attach = "off": classified in userspace from the same networks.
    assert!(text.contains("x-kedge-class: interactive"), "{text}");
    assert_eq!(upstream.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let status = kedge.stop();
    assert!(status.success(), "kedge exited with {status}");
}
