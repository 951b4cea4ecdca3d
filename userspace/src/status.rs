//! The operator's view: `kedge status` (what the kernel edge is doing, read
//! straight from the pinned maps, plus the running daemon's own report when it
//! answers) and `kedge maps` (what each pinned map is and how to dump it).

use std::{fmt::Write as _, net::SocketAddr, path::Path, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use kedge_common::{
    Admission, COUNTER_SLOTS, GLOBAL_SLOT, GpuLoad, MAX_CLASSES, MAX_GPUS, REASONS, Reason,
    TenantState,
};
use serde::Serialize;

use crate::{config::Loaded, kernel::pin_dir};

/// One pinned map: its name, what it holds, who writes it.
pub struct MapDoc {
    pub name: &'static str,
    pub holds: &'static str,
    pub writer: &'static str,
}

pub const MAP_DOCS: &[MapDoc] = &[
    MapDoc {
        name: "SETTINGS",
        holds: "proxy ports, default class, flags (enabled, mark)",
        writer: "daemon (config)",
    },
    MapDoc {
        name: "NETS_V4",
        holds: "IPv4 CIDR (LPM) -> class, tenant",
        writer: "daemon (config [[network]])",
    },
    MapDoc {
        name: "NETS_V6",
        holds: "IPv6 CIDR (LPM) -> class, tenant",
        writer: "daemon (config [[network]])",
    },
    MapDoc {
        name: "CLASSES",
        holds: "class -> connection rate limits (GCRA) and deny flag",
        writer: "daemon (config [[class]])",
    },
    MapDoc {
        name: "ADMISSION",
        holds: "class -> admitted share of new connections (per mille)",
        writer: "daemon (GPU and queue pressure)",
    },
    MapDoc {
        name: "CLASS_BUCKETS",
        holds: "class -> bucket state (theoretical arrival time)",
        writer: "kernel",
    },
    MapDoc {
        name: "SRC_BUCKETS",
        holds: "keyed hash of source address, 2 rows -> bucket state, last source (count-min)",
        writer: "kernel",
    },
    MapDoc {
        name: "SRC_CLASSES",
        holds: "hash of source address -> cached class and tenant (per CPU)",
        writer: "kernel",
    },
    MapDoc {
        name: "TENANTS",
        holds: "tenant slot -> tenant id, tokens used, limit, blocked at the edge",
        writer: "daemon (budgets)",
    },
    MapDoc {
        name: "GPU_LOAD",
        holds: "GPU index -> utilization and memory (for inspection)",
        writer: "daemon (NVML)",
    },
    MapDoc {
        name: "COUNTERS",
        holds: "class x reason -> packets (per CPU)",
        writer: "kernel",
    },
];

/// `kedge maps`: each map, what it holds, and the bpftool command that dumps it.
pub fn render_maps(pin_root: &Path) -> String {
    let dir = pin_dir(pin_root);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Pinned maps under {} (BTF-typed: bpftool prints named fields)\n",
        dir.display()
    );
    for m in MAP_DOCS {
        let present = if dir.join(m.name).exists() {
            ""
        } else {
            "  (not pinned now)"
        };
        let _ = writeln!(
            out,
            "{}{present}\n  holds:   {}\n  written: {}\n  dump:    bpftool map dump pinned {}\n",
            m.name,
            m.holds,
            m.writer,
            dir.join(m.name).display()
        );
    }
    let _ = writeln!(
        out,
        "Links: {}/link_<tc|xdp>_<interface>  (bpftool link show; `kedge detach` removes all)",
        dir.display()
    );
    out
}

#[derive(Debug, Serialize)]
pub struct ClassRow {
    pub id: u32,
    pub name: String,
    pub priority: u8,
    pub admitted: u64,
    pub dropped: u64,
    /// Drops by reason label.
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub admit_permille: u32,
}

#[derive(Debug, Serialize)]
pub struct TenantRow {
    pub name: String,
    pub id: u32,
    /// From the kernel's TENANTS map (the budget layer's mirror).
    pub tokens_used: u64,
    pub tokens_limit: u64,
    pub blocked: bool,
    /// From the usage ledger: this calendar month, in the budget time zone.
    pub month_tokens: u64,
    pub month_cost_micros: u64,
}

#[derive(Debug, Serialize)]
pub struct GpuRow {
    pub index: u32,
    pub utilization_pct: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub attach: &'static str,
    pub interface: Option<String>,
    pub pins: String,
    pub kernel_attached: bool,
    pub established_packets: u64,
    pub malformed_packets: u64,
    pub classes: Vec<ClassRow>,
    pub tenants: Vec<TenantRow>,
    pub gpus: Vec<GpuRow>,
    /// The running daemon's `/status` report, if it answered.
    pub daemon: Option<serde_json::Value>,
}

fn open_map(dir: &Path, name: &str) -> Result<Map> {
    let data =
        MapData::from_pin(dir.join(name)).with_context(|| format!("opening pinned map {name}"))?;
    Ok(Map::from_map_data(data)?)
}

/// Reads the pinned maps of `cfg`'s pin root and asks the daemon for its view.
pub fn snapshot(cfg: &Loaded) -> Result<Snapshot> {
    let dir = pin_dir(&cfg.raw.kernel.pin_root);
    let attached = dir.join("COUNTERS").exists();
    let mut snap = Snapshot {
        attach: cfg.attach().as_str(),
        interface: cfg.raw.kernel.interface.clone(),
        pins: dir.display().to_string(),
        kernel_attached: attached,
        established_packets: 0,
        malformed_packets: 0,
        classes: Vec::new(),
        tenants: Vec::new(),
        gpus: Vec::new(),
        daemon: daemon_status(cfg.raw.metrics.addr),
    };
    let totals: Vec<u64> = if attached {
        let counters: PerCpuArray<MapData, u64> = open_map(&dir, "COUNTERS")?.try_into()?;
        (0..COUNTER_SLOTS)
            .map(|slot| counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0))
            .collect()
    } else {
        vec![0; COUNTER_SLOTS as usize]
    };
    let admission: Option<Array<MapData, Admission>> = if attached {
        open_map(&dir, "ADMISSION")?.try_into().ok()
    } else {
        None
    };
    let at = |class: u32, r: Reason| totals[(class * REASONS + r as u32) as usize];
    snap.established_packets = at(GLOBAL_SLOT, Reason::Established);
    snap.malformed_packets = at(GLOBAL_SLOT, Reason::Malformed) + at(GLOBAL_SLOT, Reason::Unparsed);
    for (id, class) in cfg
        .raw
        .classes
        .iter()
        .enumerate()
        .take(MAX_CLASSES as usize)
    {
        let id = id as u32;
        let drops: std::collections::BTreeMap<_, _> = Reason::ALL
            .iter()
            .filter(|r| r.is_drop())
            .map(|r| (r.label(), at(id, *r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        snap.classes.push(ClassRow {
            id,
            name: class.name.get_ref().clone(),
            priority: class.priority,
            admitted: at(id, Reason::Admitted),
            dropped: drops.values().sum(),
            drops,
            admit_permille: admission
                .as_ref()
                .and_then(|a| a.get(&id, 0).ok())
                .map_or(1000, |a| a.admit_permille),
        });
    }
    if attached {
        let tenants: Array<MapData, TenantState> = open_map(&dir, "TENANTS")?.try_into()?;
        let slots = crate::kernel::tenant_slots(&tenants)?;
        let month = month_spend(cfg);
        let mut names: Vec<(&String, &u32)> = cfg.tenant_ids.iter().collect();
        names.sort();
        for (name, id) in names {
            let t = slots
                .get(id)
                .and_then(|slot| tenants.get(slot, 0).ok())
                .unwrap_or_default();
            let (month_tokens, month_cost_micros) = month.get(name).copied().unwrap_or((0, 0));
            snap.tenants.push(TenantRow {
                name: name.clone(),
                id: *id,
                tokens_used: t.tokens_used,
                tokens_limit: t.tokens_limit,
                blocked: t.blocked != 0,
                month_tokens,
                month_cost_micros,
            });
        }
        let gpus: Array<MapData, GpuLoad> = open_map(&dir, "GPU_LOAD")?.try_into()?;
        for index in 0..MAX_GPUS {
            if let Ok(g) = gpus.get(&index, 0)
                && g.updated_ns != 0
            {
                snap.gpus.push(GpuRow {
                    index,
                    utilization_pct: g.utilization_pct,
                    memory_used_bytes: g.memory_used_bytes,
                    memory_total_bytes: g.memory_total_bytes,
                });
            }
        }
    }
    Ok(snap)
}

/// Tokens and money per tenant this month, from the ledger (empty if it cannot be read).
fn month_spend(cfg: &Loaded) -> std::collections::HashMap<String, (u64, u64)> {
    let mut out = std::collections::HashMap::new();
    let Ok(tz) = jiff::tz::TimeZone::get(cfg.raw.budget.timezone.get_ref()) else {
        return out;
    };
    let now = jiff::Timestamp::now();
    let Ok(start) = now
        .to_zoned(tz)
        .first_of_month()
        .and_then(|d| d.start_of_day())
    else {
        return out;
    };
    let path = &cfg.raw.budget.ledger.path;
    if let Ok(rows) = crate::ledger::usage_report(path, start.timestamp(), now) {
        for r in rows {
            let e = out.entry(r.tenant).or_insert((0, 0));
            e.0 += r.prompt_tokens + r.completion_tokens;
            e.1 += r.cost_micros;
        }
    }
    out
}

fn daemon_status(admin: SocketAddr) -> Option<serde_json::Value> {
    let body =
        crate::gpu::http_get(&format!("http://{admin}/status"), Duration::from_secs(2)).ok()?;
    serde_json::from_str(&body).ok()
}

/// The compact human table of `kedge status`.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "kedge  attach={} interface={} pins={} kernel={}",
        s.attach,
        s.interface.as_deref().unwrap_or("-"),
        s.pins,
        if s.kernel_attached {
            "attached"
        } else {
            "not attached"
        }
    );
    let _ = writeln!(
        out,
        "daemon {}",
        if s.daemon.is_some() {
            "running"
        } else {
            "not answering"
        }
    );
    let _ = writeln!(
        out,
        "\n{:<14} {:>4} {:>10} {:>10} {:>7}  drops by reason",
        "CLASS", "PRIO", "ADMITTED", "DROPPED", "ADMIT‰"
    );
    for c in &s.classes {
        let reasons: Vec<String> = c.drops.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            out,
            "{:<14} {:>4} {:>10} {:>10} {:>7}  {}",
            c.name,
            c.priority,
            c.admitted,
            c.dropped,
            c.admit_permille,
            reasons.join(" ")
        );
    }
    let _ = writeln!(
        out,
        "established packets: {}   malformed/unparsed: {}",
        s.established_packets, s.malformed_packets
    );
    if !s.tenants.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<16} {:>14} {:>14} {:>7} {:>8} {:>14} {:>12}",
            "TENANT", "TOKENS USED", "LIMIT", "USE%", "BLOCKED", "MONTH TOKENS", "MONTH $"
        );
        for t in &s.tenants {
            let pct = if t.tokens_limit > 0 {
                format!(
                    "{:.1}",
                    t.tokens_used as f64 * 100.0 / t.tokens_limit as f64
                )
            } else {
                "-".into()
            };
            let limit = if t.tokens_limit > 0 {
                t.tokens_limit.to_string()
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "{:<16} {:>14} {:>14} {:>7} {:>8} {:>14} {:>12}",
                t.name,
                t.tokens_used,
                limit,
                pct,
                if t.blocked { "yes" } else { "no" },
                t.month_tokens,
                crate::budget::format_dollars(t.month_cost_micros)
            );
        }
    }
    if !s.gpus.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<4} {:>6} {:>22}",
            "GPU", "UTIL%", "MEMORY USED/TOTAL GiB"
        );
        for g in &s.gpus {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let _ = writeln!(
                out,
                "{:<4} {:>6} {:>12.1} / {:.1}",
                g.index,
                g.utilization_pct,
                gib(g.memory_used_bytes),
                gib(g.memory_total_bytes)
            );
        }
    }
    if let Some(queues) = s
        .daemon
        .as_ref()
        .and_then(|d| d.get("queues"))
        .and_then(|q| q.as_array())
        && !queues.is_empty()
    {
        let _ = writeln!(
            out,
            "\n{:<14} {:>12} {:>6} {:>10} {:>10}",
            "QUEUE", "BACKEND", "DEPTH", "ADMITTED", "REJECTED"
        );
        for q in queues {
            let _ = writeln!(
                out,
                "{:<14} {:>12} {:>6} {:>10} {:>10}",
                q["class"].as_str().unwrap_or("-"),
                q["backend"].as_str().unwrap_or("-"),
                q["depth"].as_u64().unwrap_or(0),
                q["admitted"].as_u64().unwrap_or(0),
                q["rejected"].as_u64().unwrap_or(0)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_docs_cover_every_pinned_map() {
        let names: Vec<&str> = MAP_DOCS.iter().map(|m| m.name).collect();
        for name in crate::kernel::MAP_NAMES {
            assert!(names.contains(&name), "{name} has no MapDoc");
        }
        let text = render_maps(Path::new("/sys/fs/bpf/kedge"));
        assert!(
            text.contains("bpftool map dump pinned /sys/fs/bpf/kedge/v3/NETS_V4"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_table_with_drop_reasons_and_budget_use() {
        let s = Snapshot {
            attach: "tc",
            interface: Some("eth0".into()),
            pins: "/sys/fs/bpf/kedge/v3".into(),
            kernel_attached: true,
            established_packets: 10,
            malformed_packets: 0,
            classes: vec![ClassRow {
                id: 0,
                name: "batch".into(),
                priority: 3,
                admitted: 5,
                dropped: 7,
                drops: [("class_rate", 7)].into_iter().collect(),
                admit_permille: 200,
            }],
            tenants: vec![TenantRow {
                name: "research".into(),
                id: 9,
                tokens_used: 50,
                tokens_limit: 200,
                blocked: false,
                month_tokens: 1234,
                month_cost_micros: 2_500_000,
            }],
            gpus: vec![],
            daemon: None,
        };
        let t = render(&s);
        assert!(t.contains("class_rate=7"), "{t}");
        assert!(t.contains("25.0"), "{t}");
        assert!(t.contains("1234") && t.contains("$2.50"), "{t}");
        assert!(t.contains("not answering"), "{t}");
        assert!(t.contains("1234") && t.contains("$2.50"), "{t}");
    }
}
