//! SIGHUP reloads the config atomically: new connections get the new config,
//! open connections are not dropped, the kernel maps change in place, and a
//! bad file is refused while the old config keeps running.

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use support::{Kedge, Sim, TestNet, http_post, wait_until};

fn config(port: u16, backend: &str, a: SocketAddr, b: SocketAddr, kernel: &str) -> String {
    format!(
        r#"
[listen]
addr = "0.0.0.0:{port}"

{kernel}

[[class]]
name = "standard"
priority = 2

[[class]]
name = "blocked"
priority = 4
deny = true

[[backend]]
name = "a"
url = "http://{a}"

[[backend]]
name = "b"
url = "http://{b}"

[[route]]
model = "m"
backend = "{backend}"

[gpu]
source = "none"

[metrics]
addr = "{{admin}}"
"#
    )
}

fn route_of(resp: &str) -> &str {
    resp.lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-kedge-route:"))
        .map(|l| l.split_once(':').unwrap().1.trim())
        .unwrap_or("")
}

const CHAT: &str = r#"{"model":"m","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;

/// One request on an open keep-alive connection; returns the response head.
fn keepalive_request(conn: &mut BufReader<TcpStream>) -> String {
    write!(
        conn.get_mut(),
        "POST /v1/chat/completions HTTP/1.1\r\nhost: k\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    )
    .unwrap();
    let mut head = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).unwrap();
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    conn.read_exact(&mut body).unwrap();
    head
}

fn hup(kedge: &Kedge) {
    let pid = kedge.pid().expect("running");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
}

#[test]
fn sighup_applies_a_good_config_and_refuses_a_bad_one() {
    let a = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let b = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let port = support::free_port("127.0.0.1");
    let kedge = Kedge::start(&config(
        port,
        "a",
        a.addr,
        b.addr,
        "[kernel]\nattach = \"off\"",
    ));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(route_of(&http_post(addr, "/v1/chat/completions", &[], CHAT)).starts_with("a;"));

    // A keep-alive connection opened under the old config.
    let mut open = BufReader::new(TcpStream::connect(addr).unwrap());
    open.get_mut()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(keepalive_request(&mut open).starts_with("HTTP/1.1 200"));

    let text = std::fs::read_to_string(&kedge.config).unwrap();
    std::fs::write(
        &kedge.config,
        text.replace("backend = \"a\"", "backend = \"b\""),
    )
    .unwrap();
    hup(&kedge);
    wait_until(
        Duration::from_secs(5),
        "new connections routed to b",
        || route_of(&http_post(addr, "/v1/chat/completions", &[], CHAT)).starts_with("b;"),
    );
    // The old connection was not dropped.
    assert!(keepalive_request(&mut open).starts_with("HTTP/1.1 200"));

    // A broken file is refused; the running config stays.
    let good = std::fs::read_to_string(&kedge.config).unwrap();
    std::fs::write(
        &kedge.config,
        good.replace("[[route]]", "[[route]]\nbogus = 1"),
    )
    .unwrap();
    hup(&kedge);
    wait_until(Duration::from_secs(5), "the refusal in the log", || {
        kedge.log_text().contains("config refused")
    });
    assert!(
        kedge.log_text().contains("unknown field `bogus`"),
        "{}",
        kedge.log_text()
    );
    assert!(route_of(&http_post(addr, "/v1/chat/completions", &[], CHAT)).starts_with("b;"));
}

#[test]
fn sighup_updates_kernel_maps_in_place() {
    require_kernel!();
    let net = TestNet::new(&[2]);
    let a = Sim::start(&["--decode-ms-per-token", "0", "--ttft-ms", "0"]);
    let port = support::free_port("0.0.0.0");
    let kernel = format!(
        "[kernel]\ninterface = \"{}\"\nattach = \"tc\"\npin_root = \"{{pin_root}}\"\n\n\
         [[network]]\ncidr = \"{}/32\"\nclass = \"standard\"",
        net.host_if,
        net.client_ip(2)
    );
    let kedge = Kedge::start(&config(port, "a", a.addr, a.addr, &kernel));
    let url = format!("http://{}:{port}/v1/models", net.host_ip);
    let (code, text) = net.curl(2, &url, 2);
    assert_eq!(code, 0, "{text}");

    let text = std::fs::read_to_string(&kedge.config).unwrap();
    std::fs::write(
        &kedge.config,
        text.replace("class = \"standard\"", "class = \"blocked\""),
    )
    .unwrap();
    hup(&kedge);
    wait_until(Duration::from_secs(5), "the reload", || {
        kedge.log_text().contains("config reloaded")
    });
    let (code, text) = net.curl(2, &url, 1);
    assert_eq!(code, 28, "the source is now in a deny class: {text}");
}
