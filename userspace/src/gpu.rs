//! GPU load: where it comes from (NVML, a vLLM server's metrics, or nothing) and
//! what it does (the shedding table that turns load into kernel admission ratios).
//!
//! Sampling is blocking (NVML calls, an HTTP scrape), so it runs on its own
//! thread ([`spawn_poller`]) and publishes through a `tokio::sync::watch`; the
//! proxy only ever reads the latest sample and never waits on a GPU.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    path::PathBuf,
    time::{Duration, Instant},
};

use nvml_wrapper::Nvml;
use serde::Deserialize;
use tokio::sync::watch;

/// One reading of one GPU (or of one model server, for the vLLM source).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    /// 0..=100.
    pub utilization_pct: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// vLLM only: requests waiting for a slot.
    pub waiting_requests: Option<u64>,
    /// vLLM only: KV-cache usage, 0..=1.
    pub kv_cache_usage: Option<f64>,
}

/// Where load readings come from, as configured.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GpuConfig {
    /// `nvml` (default), `vllm` or `none`.
    #[serde(default)]
    pub source: SourceKind,
    /// Path of `libnvidia-ml.so` when it is not on the loader's path.
    pub nvml_library: Option<PathBuf>,
    /// vLLM server metrics endpoint, e.g. `http://127.0.0.1:8000/metrics`.
    pub vllm_metrics_url: Option<String>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Utilization → admission for low classes (checked in order, first match wins).
    #[serde(default, rename = "shed")]
    pub shed_rules: Vec<ShedRule>,
    /// How far below a rule's threshold utilization must fall before it stops applying.
    #[serde(default = "default_hysteresis_pct")]
    pub hysteresis_pct: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            source: SourceKind::Nvml,
            nvml_library: None,
            vllm_metrics_url: None,
            interval_ms: default_interval_ms(),
            shed_rules: Vec::new(),
            hysteresis_pct: default_hysteresis_pct(),
        }
    }
}

fn default_interval_ms() -> u64 {
    500
}

fn default_hysteresis_pct() -> u32 {
    5
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    #[default]
    Nvml,
    Vllm,
    None,
}

/// "Above `above_pct` utilization, admit classes with priority number
/// `min_priority` or larger (i.e. lower priority) at `admit_permille`."
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShedRule {
    pub above_pct: u32,
    pub min_priority: u8,
    pub admit_permille: u32,
}

/// A source of samples. Opening may fail (no driver, no server): the caller then
/// runs without GPU load and says so once.
pub enum GpuSource {
    Nvml(Box<Nvml>),
    Vllm { url: String },
}

impl GpuSource {
    pub fn open(cfg: &GpuConfig) -> Result<Option<GpuSource>, String> {
        match cfg.source {
            SourceKind::None => Ok(None),
            SourceKind::Nvml => {
                let mut builder = Nvml::builder();
                if let Some(path) = &cfg.nvml_library {
                    builder.lib_path(path.as_os_str());
                }
                builder
                    .init()
                    .map(|n| Some(GpuSource::Nvml(Box::new(n))))
                    .map_err(|e| format!("NVML unavailable ({e})"))
            }
            SourceKind::Vllm => cfg
                .vllm_metrics_url
                .clone()
                .map(|url| Some(GpuSource::Vllm { url }))
                .ok_or_else(|| "gpu.source = \"vllm\" needs gpu.vllm_metrics_url".to_string()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            GpuSource::Nvml(_) => "nvml",
            GpuSource::Vllm { .. } => "vllm",
        }
    }

    /// Reads every device once. Blocking.
    pub fn sample(&self) -> Result<Vec<GpuSample>, String> {
        match self {
            GpuSource::Nvml(nvml) => sample_nvml(nvml).map_err(|e| e.to_string()),
            GpuSource::Vllm { url } => {
                let text = http_get(url, Duration::from_secs(2))?;
                Ok(vec![parse_vllm_metrics(&text)])
            }
        }
    }
}

fn sample_nvml(nvml: &Nvml) -> Result<Vec<GpuSample>, nvml_wrapper::error::NvmlError> {
    let count = nvml.device_count()?;
    let mut out = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = nvml.device_by_index(index)?;
        let util = dev.utilization_rates()?;
        let mem = dev.memory_info()?;
        out.push(GpuSample {
            index,
            utilization_pct: util.gpu.min(100),
            memory_used_bytes: mem.used,
            memory_total_bytes: mem.total,
            ..Default::default()
        });
    }
    Ok(out)
}

/// Reads what kedge needs from a vLLM `/metrics` page: waiting requests and
/// KV-cache usage (both metric names vLLM has used). Utilization is reported as
/// the KV-cache usage, the resource a vLLM server saturates on.
pub fn parse_vllm_metrics(text: &str) -> GpuSample {
    let mut waiting = None;
    let mut kv = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name_labels.split('{').next().unwrap_or("");
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        match name {
            "vllm:num_requests_waiting" => *waiting.get_or_insert(0.0) += v,
            "vllm:gpu_cache_usage_perc" | "vllm:kv_cache_usage_perc" => {
                kv = Some(kv.map_or(v, |k: f64| k.max(v)))
            }
            _ => {}
        }
    }
    let kv = kv.map(|k| k.clamp(0.0, 1.0));
    GpuSample {
        index: 0,
        utilization_pct: kv.map_or(0, |k| (k * 100.0).round() as u32),
        waiting_requests: waiting.map(|w| w as u64),
        kv_cache_usage: kv,
        ..Default::default()
    }
}

/// A plain HTTP/1.0 GET for `http://host:port/path`, the body of a 200 answer.
/// For local plaintext endpoints only (a vLLM server's metrics, kedge's own
/// admin listener), from threads where blocking is fine.
pub(crate) fn http_get(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// metrics URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // One write: `write!` on a bare socket sends each formatted piece as its
    // own segment, and a server that answers on the first one and closes
    // turns the rest into a broken pipe.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").as_bytes())
        .map_err(|e| format!("{url}: {e}"))?;
    let mut resp = String::new();
    s.take(8 << 20)
        .read_to_string(&mut resp)
        .map_err(|e| format!("{url}: {e}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!("{url}: {}", head.lines().next().unwrap_or("")));
    }
    Ok(body.to_string())
}

/// Polls `source` every `interval` on a dedicated thread and publishes each
/// reading. Errors are logged once per change of error, and publish nothing.
pub fn spawn_poller(
    source: GpuSource,
    interval: Duration,
) -> (watch::Receiver<Vec<GpuSample>>, std::thread::JoinHandle<()>) {
    let (tx, rx) = watch::channel(Vec::new());
    let handle = std::thread::Builder::new()
        .name("kedge-gpu".into())
        .spawn(move || {
            let mut last_error: Option<String> = None;
            loop {
                let started = Instant::now();
                match source.sample() {
                    Ok(samples) => {
                        last_error = None;
                        if tx.send(samples).is_err() {
                            return; // nobody listens any more
                        }
                    }
                    Err(e) => {
                        if last_error.as_deref() != Some(&e) {
                            tracing::warn!(source = source.name(), error = %e, "GPU sample failed");
                            last_error = Some(e);
                        }
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
                std::thread::sleep(interval.saturating_sub(started.elapsed()));
            }
        })
        .expect("spawn GPU poller thread");
    (rx, handle)
}

/// Turns the hottest GPU's utilization into per-class admission ratios through
/// the configured rules, with hysteresis: a rule starts applying when
/// utilization rises above its threshold and stops only once it falls
/// `hysteresis_pct` below it, so the kernel's ratio does not flap.
#[derive(Debug)]
pub struct ShedController {
    rules: Vec<ShedRule>,
    hysteresis_pct: u32,
    /// Which rules are currently engaged.
    engaged: Vec<bool>,
}

impl ShedController {
    pub fn new(cfg: &GpuConfig) -> ShedController {
        ShedController {
            rules: cfg.shed_rules.clone(),
            hysteresis_pct: cfg.hysteresis_pct,
            engaged: vec![false; cfg.shed_rules.len()],
        }
    }

    /// Admission per class (`priorities[i]` is class i's priority number) for
    /// the given utilization. Where several rules apply to a class, the lowest
    /// admission wins.
    pub fn update(&mut self, utilization_pct: u32, priorities: &[u8]) -> Vec<u32> {
        for (rule, on) in self.rules.iter().zip(self.engaged.iter_mut()) {
            if utilization_pct > rule.above_pct {
                *on = true;
            } else if utilization_pct + self.hysteresis_pct <= rule.above_pct {
                *on = false;
            }
        }
        priorities
            .iter()
            .map(|&prio| {
                self.rules
                    .iter()
                    .zip(&self.engaged)
                    .filter(|(rule, on)| **on && prio >= rule.min_priority)
                    .map(|(rule, _)| rule.admit_permille.min(1000))
                    .min()
                    .unwrap_or(1000)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rules: &[(u32, u8, u32)]) -> GpuConfig {
        GpuConfig {
            shed_rules: rules
                .iter()
                .map(|&(above_pct, min_priority, admit_permille)| ShedRule {
                    above_pct,
                    min_priority,
                    admit_permille,
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn shedding_applies_to_low_classes_with_hysteresis() {
        let mut c = ShedController::new(&cfg(&[(90, 3, 200)]));
        let prios = [0, 2, 3, 4];
        assert_eq!(c.update(50, &prios), vec![1000; 4]);
        assert_eq!(c.update(91, &prios), vec![1000, 1000, 200, 200]);
        // Inside the hysteresis band: still shedding.
        assert_eq!(c.update(88, &prios), vec![1000, 1000, 200, 200]);
        assert_eq!(c.update(86, &prios), vec![1000, 1000, 200, 200]);
        // 5 points below the threshold: released.
        assert_eq!(c.update(85, &prios), vec![1000; 4]);
        // And not re-engaged until it is above the threshold again.
        assert_eq!(c.update(90, &prios), vec![1000; 4]);
    }

    #[test]
    fn strictest_engaged_rule_wins() {
        let mut c = ShedController::new(&cfg(&[(80, 2, 500), (95, 3, 0)]));
        assert_eq!(c.update(85, &[1, 2, 3]), vec![1000, 500, 500]);
        assert_eq!(c.update(97, &[1, 2, 3]), vec![1000, 500, 0]);
    }

    #[test]
    fn parses_vllm_metrics_both_names() {
        let text = "# HELP vllm:num_requests_waiting x\n\
            vllm:num_requests_waiting{model_name=\"m\"} 7.0\n\
            vllm:gpu_cache_usage_perc{model_name=\"m\"} 0.42\n\
            vllm:num_requests_running{model_name=\"m\"} 3.0\n";
        let s = parse_vllm_metrics(text);
        assert_eq!(s.waiting_requests, Some(7));
        assert_eq!(s.kv_cache_usage, Some(0.42));
        assert_eq!(s.utilization_pct, 42);
        let s = parse_vllm_metrics("vllm:kv_cache_usage_perc{a=\"b\"} 0.9\n");
        assert_eq!(s.utilization_pct, 90);
        assert_eq!(s.waiting_requests, None);
    }

    #[test]
    fn config_rejects_unknown_keys_and_defaults() {
        let c: GpuConfig = toml::from_str("source = \"none\"").unwrap();
        assert_eq!(c.source, SourceKind::None);
        assert_eq!(c.interval_ms, 500);
        assert!(toml::from_str::<GpuConfig>("sauce = \"none\"").is_err());
        assert!(GpuSource::open(&c).unwrap().is_none());
        let c: GpuConfig = toml::from_str("source = \"vllm\"").unwrap();
        let e = GpuSource::open(&c).err().expect("needs a url");
        assert!(e.contains("vllm_metrics_url"), "{e}");
    }

    #[test]
    fn missing_nvml_library_is_an_error_not_a_panic() {
        let c = GpuConfig {
            nvml_library: Some("/nonexistent/libnvidia-ml.so.1".into()),
            ..Default::default()
        };
        let e = GpuSource::open(&c).err().expect("no such library");
        assert!(e.contains("NVML unavailable"), "{e}");
    }
}
