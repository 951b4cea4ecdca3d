//! GPU load through the real `nvml-wrapper` code path, against a fake
//! `libnvidia-ml.so.1` built here, and through a vLLM-style metrics endpoint.

mod support;

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::{Duration, Instant},
};

use kedge::gpu::{GpuConfig, GpuSource, SourceKind, spawn_poller};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kedge-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn nvml_source_reads_the_driver_and_follows_it() {
    let dir = temp_dir("fake-nvml");
    let state = dir.join("state");
    std::fs::write(&state, "35 1000 8000\n90 7000 8000\n").unwrap();
    let Some(lib) = support::build_fake_nvml(&dir, &state) else {
        eprintln!("skipped: no C compiler to build the fake NVML library");
        return;
    };
    let cfg = GpuConfig {
        source: SourceKind::Nvml,
        nvml_library: Some(lib),
        interval_ms: 20,
        ..Default::default()
    };
    let source = GpuSource::open(&cfg).unwrap().expect("nvml source");
    let samples = source.sample().unwrap();
    assert_eq!(samples.len(), 2);
    assert_eq!(samples[0].utilization_pct, 35);
    assert_eq!(samples[1].utilization_pct, 90);
    assert_eq!(samples[1].memory_used_bytes, 7000);
    assert_eq!(samples[1].memory_total_bytes, 8000);

    // The poller thread publishes what the driver says as it changes.
    let (mut rx, _thread) = spawn_poller(source, Duration::from_millis(cfg.interval_ms));
    std::fs::write(&state, "99 7900 8000\n10 100 8000\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let latest = rx.borrow_and_update().clone();
        if latest.first().is_some_and(|s| s.utilization_pct == 99) {
            assert_eq!(latest[1].utilization_pct, 10);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "poller never saw the new load: {latest:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vllm_source_scrapes_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(1) {
            let mut s = stream.unwrap();
            // The whole request head, however many segments it came in.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let body = "vllm:num_requests_waiting{model_name=\"m\"} 12\n\
                        vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.97\n";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let cfg = GpuConfig {
        source: SourceKind::Vllm,
        vllm_metrics_url: Some(url),
        ..Default::default()
    };
    let samples = GpuSource::open(&cfg).unwrap().unwrap().sample().unwrap();
    assert_eq!(samples[0].waiting_requests, Some(12));
    assert_eq!(samples[0].utilization_pct, 97);
}
