//! `kedge probe-capacity` against a simulated GPU server with a known number
//! of batch slots: past them requests queue and the median latency doubles, so
//! the probe must report exactly that many.

mod support;

use std::process::Command;

use support::Sim;

#[test]
fn probe_finds_the_slot_count_of_a_server() {
    // 4 slots, ~100 ms a request: concurrency 8 waits about twice as long.
    let sim = Sim::start(&[
        "--slots",
        "4",
        "--ttft-ms",
        "0",
        "--decode-ms-per-token",
        "20",
    ]);
    let dir = std::env::temp_dir().join(format!("kedge-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("kedge.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\naddr = \"127.0.0.1:1\"\n[[class]]\nname = \"c\"\npriority = 0\n\
             [[backend]]\nname = \"gpu\"\nurl = \"http://{}\"\n",
            sim.addr
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kedge"))
        .args([
            "probe-capacity",
            "--backend",
            "gpu",
            "--max-tokens",
            "5",
            "--latency-bound",
            "1.5",
        ])
        .args([
            "--step-seconds",
            "1.5",
            "--max-concurrency",
            "64",
            "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("max_in_flight = 4"), "{text}");
    assert!(text.contains("name = \"gpu\""), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
