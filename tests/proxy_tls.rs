//! HTTP/2 and TLS with real clients: curl over h2c (prior knowledge) and over
//! TLS with ALPN h2 and http/1.1, a certificate swapped on SIGHUP, and kedge
//! as an https client of an https backend (rustls, private CA, pooled).
//! Certificates are throwaway ones made by the `openssl` CLI; the tests skip
//! when `openssl` or `curl` is missing.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use support::{Kedge, free_port, openai::FakeOpenAi};

fn tools_missing() -> Option<&'static str> {
    for tool in ["openssl", "curl"] {
        if Command::new(tool).arg("--version").output().is_err()
            && Command::new(tool).arg("version").output().is_err()
        {
            return Some(if tool == "curl" {
                "curl is not installed"
            } else {
                "openssl is not installed"
            });
        }
    }
    let v = Command::new("curl").arg("--version").output().unwrap();
    if !String::from_utf8_lossy(&v.stdout).contains("HTTP2") {
        return Some("curl has no HTTP/2 support");
    }
    None
}

macro_rules! require_tools {
    () => {
        if let Some(why) = tools_missing() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A throwaway CA and a leaf certificate it signed for 127.0.0.1 / localhost,
/// in `dir`: returns (ca, leaf chain, leaf key).
fn make_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = |ext: &str| dir.join(format!("{name}.{ext}"));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca, ca_key, key, csr, crt, ext) = (
        p("ca.crt"),
        p("ca.key"),
        p("key"),
        p("csr"),
        p("crt"),
        p("ext"),
    );
    let s = |p: &PathBuf| p.display().to_string();
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                &format!("/CN={name} test CA"),
                "-keyout",
                &s(&ca_key),
                "-out",
                &s(&ca),
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &s(&key),
                "-out",
                &s(&csr),
            ],
        ]
        .concat(),
    );
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&ca),
        "-CAkey",
        &s(&ca_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&crt),
    ]);
    (ca, crt, key)
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "kedge-{tag}-{}-{}",
        std::process::id(),
        support::unique_id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `upstream_model`: what `gpt-test` is called at the backend.
fn config(
    port: u16,
    tls: Option<(&Path, &Path)>,
    backend: &str,
    backend_extra: &str,
    upstream_model: &str,
) -> String {
    let tls = tls
        .map(|(c, k)| {
            format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .unwrap_or_default();
    format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
{tls}
[kernel]
attach = "off"
pin_root = "{{pin_root}}"
[limits]
header_read_timeout_ms = 500
[[class]]
name = "standard"
priority = 2
[[backend]]
name = "up"
url = "{backend}"
{backend_extra}
[[route]]
model = "gpt-test"
backend = "up"
upstream_model = "{upstream_model}"
[metrics]
addr = "{{admin}}"
"#
    )
}

/// curl: returns (exit code, body, the HTTP version it used).
fn curl(args: &[&str], url: &str, body: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "-w", "\n%{http_version}"])
        .args(args);
    if let Some(b) = body {
        cmd.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd.arg(url).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, version) = text.rsplit_once('\n').unwrap_or((&text, ""));
    let body = body.to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), body, version.to_string())
}

const CHAT: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM: &str =
    r#"{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn h2c_with_prior_knowledge() {
    require_tools!();
    let up = FakeOpenAi::start();
    let port = free_port("127.0.0.1");
    let _kedge = Kedge::start(&config(
        port,
        None,
        &format!("http://{}", up.addr),
        "",
        "normal",
    ));
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let (code, body, version) = curl(&["--http2-prior-knowledge"], &url, Some(CHAT));
    assert_eq!((code, version.as_str()), (0, "2"), "{body}");
    assert!(body.contains("Hello world"), "{body}");
    let (code, body, version) = curl(&["--http2-prior-knowledge", "-N"], &url, Some(CHAT_STREAM));
    assert_eq!((code, version.as_str()), (0, "2"), "{body}");
    assert!(body.contains("\"lo\"") && body.contains("[DONE]"), "{body}");
}

#[test]
fn tls_with_alpn_h2_and_http1_and_reload_on_sighup() {
    require_tools!();
    let dir = temp_dir("tls");
    let (ca_a, cert_a, key_a) = make_cert(&dir, "first");
    let (cert, key) = (dir.join("live.crt"), dir.join("live.key"));
    std::fs::copy(&cert_a, &cert).unwrap();
    std::fs::copy(&key_a, &key).unwrap();
    let up = FakeOpenAi::start();
    let port = free_port("127.0.0.1");
    let kedge = Kedge::start(&config(
        port,
        Some((&cert, &key)),
        &format!("http://{}", up.addr),
        "",
        "normal",
    ));
    let url = format!("https://127.0.0.1:{port}/v1/chat/completions");
    let ca_a = format!("{}", ca_a.display());

    let (code, body, version) = curl(&["--cacert", &ca_a, "--http2"], &url, Some(CHAT));
    assert_eq!((code, version.as_str()), (0, "2"), "ALPN h2: {body}");
    assert!(body.contains("Hello world"), "{body}");
    let (code, body, version) = curl(&["--cacert", &ca_a, "--http1.1"], &url, Some(CHAT_STREAM));
    assert_eq!(
        (code, version.as_str()),
        (0, "1.1"),
        "ALPN http/1.1: {body}"
    );
    assert!(body.contains("[DONE]"), "{body}");
    let (code, body, _) = curl(&[], &url, Some(CHAT));
    assert_ne!(
        code, 0,
        "an untrusted certificate must fail verification: {body}"
    );

    // Swap the files, SIGHUP: new handshakes get the new certificate.
    let (ca_b, cert_b, key_b) = make_cert(&dir, "second");
    std::fs::copy(&cert_b, &cert).unwrap();
    std::fs::copy(&key_b, &key).unwrap();
    kedge.signal(libc::SIGHUP);
    let ca_b = format!("{}", ca_b.display());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body, _) = curl(&["--cacert", &ca_b, "--http2"], &url, Some(CHAT));
        if code == 0 {
            assert!(body.contains("Hello world"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new certificate not served: {body}\n{}",
            kedge.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, _, _) = curl(&["--cacert", &ca_a], &url, Some(CHAT));
    assert_ne!(code, 0, "the old certificate is gone");
    assert!(kedge.log_text().contains("TLS certificate reloaded"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn https_backend_through_rustls_with_a_private_ca() {
    require_tools!();
    let dir = temp_dir("upstream-tls");
    let (ca, cert, key) = make_cert(&dir, "backend");
    let up = FakeOpenAi::start();
    // The https backend is a second kedge terminating TLS in front of the fake.
    let inner_port = free_port("127.0.0.1");
    let _inner = Kedge::start(&config(
        inner_port,
        Some((&cert, &key)),
        &format!("http://{}", up.addr),
        "",
        "normal",
    ));
    let outer_port = free_port("127.0.0.1");
    let ca = format!("ca_file = \"{}\"", ca.display());
    let _outer = Kedge::start(&config(
        outer_port,
        None,
        &format!("https://127.0.0.1:{inner_port}"),
        &ca,
        "gpt-test",
    ));
    let url = format!("http://127.0.0.1:{outer_port}/v1/chat/completions");
    for _ in 0..3 {
        let (code, body, _) = curl(&[], &url, Some(CHAT));
        assert_eq!(code, 0, "{body}");
        assert!(body.contains("Hello world"), "{body}");
    }
    let (code, body, _) = curl(&["-N"], &url, Some(CHAT_STREAM));
    assert_eq!(code, 0, "{body}");
    assert!(body.contains("\"lo\"") && body.contains("[DONE]"), "{body}");
    assert_eq!(up.seen().len(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stalled_tls_handshake_is_cut_off() {
    require_tools!();
    let dir = temp_dir("tls-stall");
    let (_ca, cert, key) = make_cert(&dir, "stall");
    let up = FakeOpenAi::start();
    let port = free_port("127.0.0.1");
    let _kedge = Kedge::start(&config(
        port,
        Some((&cert, &key)),
        &format!("http://{}", up.addr),
        "",
        "normal",
    ));
    // The first bytes of a ClientHello, then nothing.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, b"\x16\x03\x01\x02\x00").unwrap();
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let r = std::io::Read::read(&mut s, &mut buf);
    assert!(
        matches!(r, Ok(0) | Err(_)) && started.elapsed() < Duration::from_secs(3),
        "{r:?} after {:?}; header_read_timeout_ms = 500",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
