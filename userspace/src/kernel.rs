//! The kernel edge from userspace: load, attach, pin, fill the maps, read counters.
//!
//! Everything lives under `<pin_root>/v<MAPS_ABI_VERSION>/`: one file per map
//! (same name as in the program) and one pinned link per attach point
//! (`link_<mode>_<interface>`). A restarted daemon reopens the pinned maps (state
//! survives) and swaps its freshly loaded program into the pinned link with one
//! `BPF_LINK_UPDATE`, so enforcement never stops. `kedge detach` removes the directory.

use std::{
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
    },
};
use kedge_common::{
    ADMIT_ALL, Admission, CLASS_DENY, COUNTER_SLOTS, ClassPolicy, GpuLoad, MAPS_ABI_VERSION,
    MAX_CLASSES, MAX_GPUS, MAX_PORTS, MAX_TENANTS, NetEntry, SETTINGS_ENABLED, SETTINGS_MARK,
    SETTINGS_NO_LINK_HEADER, Settings, TenantState,
};

use crate::config::{AttachMode, Loaded};

/// The eBPF object, built by build.rs with aya-build.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kedge-ebpf"));

/// Names of the pinned maps, as in the program and in docs/maps.md.
pub const MAP_NAMES: [&str; 11] = [
    "SETTINGS",
    "NETS_V4",
    "NETS_V6",
    "CLASSES",
    "ADMISSION",
    "CLASS_BUCKETS",
    "SRC_BUCKETS",
    "SRC_CLASSES",
    "TENANTS",
    "GPU_LOAD",
    "COUNTERS",
];

/// Whether packets on `iface` start with an Ethernet header (Ethernet,
/// loopback) or with their IP header (tun, WireGuard, IP tunnels), from its
/// link type (`/sys/class/net/IFACE/type`, an ARPHRD_* number). An interface
/// that does not exist (yet) counts as Ethernet: attaching to it fails anyway.
pub fn has_link_header(iface: &str) -> Result<bool> {
    let path = format!("/sys/class/net/{iface}/type");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(true);
    };
    let link_type: u32 = text
        .trim()
        .parse()
        .with_context(|| format!("reading {path}: {text:?}"))?;
    match link_type {
        // ARPHRD_ETHER, ARPHRD_LOOPBACK
        1 | 772 => Ok(true),
        // ARPHRD_RAWIP, ARPHRD_TUNNEL (ipip), ARPHRD_TUNNEL6, ARPHRD_SIT,
        // ARPHRD_IPGRE, ARPHRD_IP6GRE, ARPHRD_NONE (tun, WireGuard)
        519 | 768 | 769 | 776 | 778 | 823 | 65534 => Ok(false),
        other => bail!(
            "kernel.interface {iface} has link type {other} (ARPHRD_*), whose headers kedge \
             cannot parse; attach to an Ethernet, loopback or IP-only (tun, WireGuard, IP \
             tunnel) interface"
        ),
    }
}

/// Nanoseconds per kernel tick: the resolution of CLOCK_MONOTONIC_COARSE,
/// which the kernel advances once per tick (TICK_NSEC, 1e9 / HZ).
pub fn tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer; CLOCK_MONOTONIC_COARSE exists on every Linux
    // that runs these programs.
    unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Four random odd `u64`s from the kernel's CSPRNG (multiply-shift keys).
fn random_odd_keys() -> std::io::Result<[u64; 4]> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: valid buffer of the given length.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += got as usize;
        }
    }
    let mut keys = [0u64; 4];
    for (k, chunk) in keys.iter_mut().zip(bytes.chunks_exact(8)) {
        *k = u64::from_ne_bytes(chunk.try_into().expect("8 bytes")) | 1;
    }
    Ok(keys)
}

/// `<pin_root>/v<ABI>`: the directory of this layout's maps and links.
pub fn pin_dir(pin_root: &Path) -> PathBuf {
    pin_root.join(format!("v{MAPS_ABI_VERSION}"))
}

/// Loads the embedded object with fresh, unpinned maps and nothing attached:
/// for BPF_PROG_TEST_RUN fixtures and the benchmark. Configure `loader` first
/// (e.g. `map_max_entries`); take the maps with [`EdgeMaps::take`].
pub fn load_unpinned(loader: &mut EbpfLoader<'_>) -> Result<Ebpf> {
    loader
        .load(EBPF_OBJECT)
        .context("loading the eBPF object (is this kernel built with BPF and BTF?)")
}

/// The attached kernel edge: its maps (see [`EdgeMaps`], reachable through
/// `Deref`) plus the attachment that keeps the program running.
pub struct KernelEdge {
    pub dir: PathBuf,
    maps: EdgeMaps,
    /// Keeps our reference to the attach link; the pin keeps it past our exit.
    _link: FdLink,
}

impl std::ops::Deref for KernelEdge {
    type Target = EdgeMaps;
    fn deref(&self) -> &EdgeMaps {
        &self.maps
    }
}

impl std::ops::DerefMut for KernelEdge {
    fn deref_mut(&mut self) -> &mut EdgeMaps {
        &mut self.maps
    }
}

impl KernelEdge {
    /// Loads the program (reusing pinned maps), fills the maps from `cfg`, then
    /// attaches — or swaps the program into the existing pinned link.
    pub fn start(cfg: &Loaded) -> Result<KernelEdge> {
        let kcfg = &cfg.raw.kernel;
        let mode = cfg.attach();
        let iface = kcfg.interface.as_deref().ok_or_else(|| {
            anyhow!(
                "kernel.interface is required for attach = {}",
                mode.as_str()
            )
        })?;
        ensure_bpffs(&kcfg.pin_root)?;
        let dir = pin_dir(&kcfg.pin_root);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create pin directory {}", dir.display()))?;

        // A restart reuses the pinned maps; only a first start initialises them.
        let fresh = !dir.join("ADMISSION").exists();
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = MAP_NAMES.iter().map(|n| (*n, dir.join(n))).collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the eBPF object (is this kernel built with BPF and BTF?)")?;

        let mut maps = EdgeMaps::take(&mut ebpf, fresh)?;
        // Maps before the program: it acts only once everything it reads is in place.
        maps.sync(cfg)?;
        let edge = KernelEdge {
            maps,
            _link: attach(&mut ebpf, &dir, mode, iface)?,
            dir,
        };
        // A daemon of another map ABI left its links and maps pinned: unpinning
        // them detaches its program, which would otherwise keep judging
        // packets with its old maps next to ours.
        for old in remove_other_abi_dirs(&kcfg.pin_root)? {
            tracing::info!(dir = %old.display(), "removed the pins of another map ABI version");
        }
        if mode == AttachMode::Tc && kcfg.mark {
            // The accepted socket inherits the SYN's mark only with this on (per netns).
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")
                .context("enabling net.ipv4.tcp_fwmark_accept")?;
        }
        Ok(edge)
    }
}

/// Handles on the maps the daemon writes and reads (pinned or not).
///
/// Two kinds of state live here. The config's ([`EdgeMaps::sync`]): settings,
/// class policies, networks, the set of tenants. The running layers' (the
/// `set_*` writers): admission ratios, tenant budget state, GPU load. `sync`
/// never overwrites the second kind, so a config reload keeps what the budget
/// and GPU layers last wrote; a restart keeps it too (the maps are pinned).
pub struct EdgeMaps {
    settings: Array<MapData, Settings>,
    nets_v4: LpmTrie<MapData, [u8; 4], NetEntry>,
    nets_v6: LpmTrie<MapData, [u8; 16], NetEntry>,
    classes: Array<MapData, ClassPolicy>,
    admission: Array<MapData, Admission>,
    tenants: Array<MapData, TenantState>,
    /// Tenant id → its slot in `TENANTS` (read back from the map when reopened).
    tenant_slots: std::collections::HashMap<u32, u32>,
    gpu_load: Array<MapData, GpuLoad>,
    counters: PerCpuArray<MapData, u64>,
}

impl EdgeMaps {
    /// Takes the map handles out of a loaded object. `fresh` maps (just
    /// created, not reopened from pins) get every class's admission set to
    /// admit all: an array starts zeroed, which would shed everything.
    pub fn take(ebpf: &mut Ebpf, fresh: bool) -> Result<EdgeMaps> {
        let mut maps = EdgeMaps {
            settings: typed(ebpf, "SETTINGS")?,
            nets_v4: typed(ebpf, "NETS_V4")?,
            nets_v6: typed(ebpf, "NETS_V6")?,
            classes: typed(ebpf, "CLASSES")?,
            admission: typed(ebpf, "ADMISSION")?,
            tenants: typed(ebpf, "TENANTS")?,
            tenant_slots: std::collections::HashMap::new(),
            gpu_load: typed(ebpf, "GPU_LOAD")?,
            counters: typed(ebpf, "COUNTERS")?,
        };
        if fresh {
            for class in 0..MAX_CLASSES {
                maps.set_admission(class, ADMIT_ALL)?;
            }
        } else {
            maps.tenant_slots = tenant_slots(&maps.tenants)?;
        }
        Ok(maps)
    }

    /// Makes the maps say what `cfg` says: settings, class policies, networks, tenants.
    /// Entries no longer in the config are removed (a tenant with them); counters,
    /// buckets, admission ratios, GPU load and known tenants' state are kept.
    /// Bumps `Settings.generation`, so the programs' cached source
    /// classifications are all stale once the new settings are in.
    pub fn sync(&mut self, cfg: &Loaded) -> Result<()> {
        let previous = self.settings.get(&0, 0).context("reading SETTINGS")?;
        let mut generation = previous.generation.wrapping_add(1);
        if generation == 0 {
            generation = 1;
        }
        // Kept for the maps' life: new keys would move every source to other
        // bucket slots, handing each a fresh burst.
        let source_keys = if previous.source_keys[0] == 0 {
            random_odd_keys().context("drawing the source bucket keys")?
        } else {
            previous.source_keys
        };
        let mut settings = Settings {
            default_class: cfg.default_class,
            flags: SETTINGS_ENABLED,
            generation,
            source_keys,
            tick_ns: tick_ns(),
            ..Default::default()
        };
        if cfg.attach() == AttachMode::Tc && cfg.raw.kernel.mark {
            settings.flags |= SETTINGS_MARK;
        }
        if let Some(iface) = &cfg.raw.kernel.interface
            && !has_link_header(iface)?
        {
            settings.flags |= SETTINGS_NO_LINK_HEADER;
        }
        for (slot, port) in settings
            .ports
            .iter_mut()
            .zip(cfg.ports.iter().take(MAX_PORTS))
        {
            *slot = *port;
        }

        for class in 0..MAX_CLASSES {
            let policy = match cfg.raw.classes.get(class as usize) {
                Some(c) => class_policy(c),
                None => ClassPolicy::default(),
            };
            self.classes
                .set(class, policy, 0)
                .context("writing CLASSES")?;
        }

        // Tenants first: every slot a network names holds its tenant before
        // the network does. A slot freed below is not reused in this sync, so
        // a program still holding the old classification never reads another
        // tenant's state under it (and the kernel checks the slot's id anyway).
        let stale: Vec<u32> = self
            .tenant_slots
            .keys()
            .copied()
            .filter(|id| !cfg.tenant_ids.values().any(|v| v == id))
            .collect();
        for id in cfg.tenant_ids.values() {
            self.tenant_slot_or_new(*id)?;
        }

        let mut want_v4 = std::collections::HashMap::new();
        let mut want_v6 = std::collections::HashMap::new();
        for n in &cfg.raw.networks {
            let cidr = n.cidr.get_ref();
            let tenant = n.tenant.as_ref().map_or(0, |t| cfg.tenant_ids[t.get_ref()]);
            let entry = NetEntry {
                class: cfg.class_ids[n.class.get_ref()],
                tenant,
                tenant_slot: if tenant == 0 {
                    0
                } else {
                    self.tenant_slots[&tenant]
                },
            };
            match cidr.addr() {
                IpAddr::V4(a) => want_v4.insert((cidr.prefix() as u32, a.octets()), entry),
                IpAddr::V6(a) => want_v6.insert((cidr.prefix() as u32, a.octets()), entry),
            };
        }
        sync_trie(&mut self.nets_v4, &want_v4).context("writing NETS_V4")?;
        sync_trie(&mut self.nets_v6, &want_v6).context("writing NETS_V6")?;

        for id in stale {
            if let Some(slot) = self.tenant_slots.remove(&id) {
                self.tenants
                    .set(slot, TenantState::default(), 0)
                    .context("writing TENANTS")?;
            }
        }
        // Settings last: the program acts only once everything it reads is in place.
        self.settings
            .set(0, settings, 0)
            .context("writing SETTINGS")?;
        Ok(())
    }

    /// Sets the share of `class`'s new connections the kernel admits, in per
    /// mille (clamped to 0..=1000). Written from GPU and queue pressure.
    pub fn set_admission(&mut self, class: u32, permille: u32) -> Result<()> {
        if class >= MAX_CLASSES {
            bail!("class {class} is out of range (at most {MAX_CLASSES} classes)");
        }
        let admission = Admission {
            admit_permille: permille.min(ADMIT_ALL),
        };
        self.admission
            .set(class, admission, 0)
            .context("writing ADMISSION")
    }

    /// The admission ratio in force for `class`, in per mille.
    pub fn admission(&self, class: u32) -> Result<u32> {
        Ok(self
            .admission
            .get(&class, 0)
            .context("reading ADMISSION")?
            .admit_permille)
    }

    /// Records what the budget layer knows about tenant `id`: tokens used and
    /// the limit of its tightest window, and whether the edge sheds it.
    pub fn set_tenant(&mut self, id: u32, used: u64, limit: u64, blocked: bool) -> Result<()> {
        let slot = self.tenant_slot_or_new(id)?;
        let state = TenantState {
            tokens_used: used,
            tokens_limit: limit,
            blocked: u32::from(blocked),
            id,
        };
        self.tenants.set(slot, state, 0).context("writing TENANTS")
    }

    /// The kernel's copy of tenant `id`'s state, if it has one.
    pub fn tenant(&self, id: u32) -> Option<TenantState> {
        let slot = self.tenant_slot(id)?;
        self.tenants.get(&slot, 0).ok().filter(|t| t.id == id)
    }

    /// Tenant `id`'s slot in `TENANTS` (what `NetEntry.tenant_slot` holds).
    pub fn tenant_slot(&self, id: u32) -> Option<u32> {
        self.tenant_slots.get(&id).copied()
    }

    /// Tenant `id`'s slot, giving it a free one (with zeroed state) if it has none.
    fn tenant_slot_or_new(&mut self, id: u32) -> Result<u32> {
        if id == 0 {
            bail!("tenant id 0 is reserved for \"no tenant\"");
        }
        if let Some(slot) = self.tenant_slot(id) {
            return Ok(slot);
        }
        let taken: std::collections::HashSet<u32> = self.tenant_slots.values().copied().collect();
        let slot = (0..MAX_TENANTS)
            .find(|s| !taken.contains(s))
            .ok_or_else(|| anyhow!("more than {MAX_TENANTS} tenants"))?;
        let state = TenantState {
            id,
            ..Default::default()
        };
        self.tenants
            .set(slot, state, 0)
            .context("writing TENANTS")?;
        self.tenant_slots.insert(id, slot);
        Ok(slot)
    }

    /// Records GPU `index`'s raw load (from NVML), stamped with CLOCK_MONOTONIC
    /// (the clock base of the kernel's bucket times).
    pub fn set_gpu_load(
        &mut self,
        index: u32,
        utilization_pct: u32,
        memory_used_bytes: u64,
        memory_total_bytes: u64,
    ) -> Result<()> {
        if index >= MAX_GPUS {
            bail!("GPU index {index} is out of range (at most {MAX_GPUS} GPUs)");
        }
        let load = GpuLoad {
            utilization_pct: utilization_pct.min(100),
            _pad: 0,
            memory_used_bytes,
            memory_total_bytes,
            updated_ns: crate::clock::clock_ns(libc::CLOCK_MONOTONIC),
        };
        self.gpu_load
            .set(index, load, 0)
            .context("writing GPU_LOAD")
    }

    /// The kernel's copy of GPU `index`'s load.
    pub fn gpu_load(&self, index: u32) -> Result<GpuLoad> {
        self.gpu_load.get(&index, 0).context("reading GPU_LOAD")
    }

    /// Per-slot packet counters summed over CPUs (`class * REASONS + reason`).
    pub fn counters(&self) -> Result<Vec<u64>> {
        (0..COUNTER_SLOTS)
            .map(|slot| {
                let per_cpu = self.counters.get(&slot, 0)?;
                Ok(per_cpu.iter().sum())
            })
            .collect()
    }
}

/// Tenant id → slot, read from a `TENANTS` array (one entry per slot in use).
pub fn tenant_slots(
    tenants: &Array<MapData, TenantState>,
) -> Result<std::collections::HashMap<u32, u32>> {
    let mut slots = std::collections::HashMap::new();
    for slot in 0..MAX_TENANTS {
        let t = tenants.get(&slot, 0).context("reading TENANTS")?;
        if t.id != 0 {
            slots.insert(t.id, slot);
        }
    }
    Ok(slots)
}

fn class_policy(c: &crate::config::Class) -> ClassPolicy {
    let rate = c.conn_rate.as_ref().map_or(0, |r| *r.get_ref());
    let burst = c.conn_burst.unwrap_or(rate.max(1));
    let src_rate = c.source_conn_rate.as_ref().map_or(0, |r| *r.get_ref());
    let src_burst = c.source_conn_burst.unwrap_or(src_rate.max(1));
    let (interval_ns, tolerance_ns) = ClassPolicy::gcra(rate, burst);
    let (source_interval_ns, source_tolerance_ns) = ClassPolicy::gcra(src_rate, src_burst);
    ClassPolicy {
        interval_ns,
        tolerance_ns,
        source_interval_ns,
        source_tolerance_ns,
        flags: if c.deny { CLASS_DENY } else { 0 },
        _pad: 0,
    }
}

fn sync_trie<const N: usize>(
    trie: &mut LpmTrie<MapData, [u8; N], NetEntry>,
    want: &std::collections::HashMap<(u32, [u8; N]), NetEntry>,
) -> Result<()>
where
    [u8; N]: aya::Pod,
{
    let have: Vec<Key<[u8; N]>> = trie.keys().filter_map(|k| k.ok()).collect();
    for key in have {
        if !want.contains_key(&(key.prefix_len(), key.data())) {
            trie.remove(&key)?;
        }
    }
    for ((len, data), entry) in want {
        trie.insert(&Key::new(*len, *data), *entry, 0)?;
    }
    Ok(())
}

fn typed<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

/// Attaches the program for `mode`, reusing a pinned link when there is one, and
/// removes links pinned for another mode or interface.
fn attach(ebpf: &mut Ebpf, dir: &Path, mode: AttachMode, iface: &str) -> Result<FdLink> {
    let link_name = format!("link_{}_{iface}", mode.as_str());
    let link_path = dir.join(&link_name);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("link_") && name != link_name {
            tracing::info!(link = %name, "removing a link pinned for another attach point");
            std::fs::remove_file(entry.path())?;
        }
    }

    let existing = if link_path.exists() {
        match PinnedLink::from_pin(&link_path) {
            Ok(pinned) => Some(FdLink::from(pinned)),
            Err(e) => {
                tracing::warn!(error = %e, path = %link_path.display(), "unusable pinned link, replacing it");
                std::fs::remove_file(&link_path)?;
                None
            }
        }
    } else {
        None
    };

    match mode {
        AttachMode::Tc => {
            let prog: &mut SchedClassifier = ebpf
                .program_mut("kedge_tc")
                .ok_or_else(|| anyhow!("program kedge_tc missing"))?
                .try_into()?;
            prog.load()?;
            if let Some(link) = existing {
                let swapped = (|| -> Result<_> { Ok(prog.attach_to_link(link.try_into()?)?) })();
                match swapped {
                    Ok(id) => return Ok(prog.take_link(id)?.try_into()?),
                    Err(e) => {
                        tracing::warn!(error = %e, "pinned tc link is stale, attaching afresh");
                        std::fs::remove_file(&link_path)?;
                    }
                }
            }
            // Kernels before 6.6 have no TCX: aya falls back to a clsact qdisc.
            let _ = tc::qdisc_add_clsact(iface);
            let id = prog
                .attach(iface, TcAttachType::Ingress)
                .with_context(|| format!("attaching tc ingress to {iface}"))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .map_err(|_| anyhow!("this kernel has no TCX (Linux >= 6.6), so the tc link cannot be pinned; use attach = \"xdp\""))?;
            pin_link(link, &link_path)
        }
        AttachMode::Xdp => {
            let prog: &mut Xdp = ebpf
                .program_mut("kedge_xdp")
                .ok_or_else(|| anyhow!("program kedge_xdp missing"))?
                .try_into()?;
            prog.load()?;
            if let Some(link) = existing {
                let swapped = (|| -> Result<_> { Ok(prog.attach_to_link(link.try_into()?)?) })();
                match swapped {
                    Ok(id) => return Ok(prog.take_link(id)?.try_into()?),
                    Err(e) => {
                        tracing::warn!(error = %e, "pinned xdp link is stale, attaching afresh");
                        std::fs::remove_file(&link_path)?;
                    }
                }
            }
            let id = prog
                .attach(iface, XdpMode::Default)
                .or_else(|_| prog.attach(iface, XdpMode::Skb))
                .with_context(|| format!("attaching xdp to {iface}"))?;
            let link: FdLink = prog.take_link(id)?.try_into()?;
            pin_link(link, &link_path)
        }
        AttachMode::Off => bail!("attach = \"off\" loads no program"),
    }
}

fn pin_link(link: FdLink, path: &Path) -> Result<FdLink> {
    let pinned = link
        .pin(path)
        .with_context(|| format!("pinning link at {}", path.display()))?;
    Ok(FdLink::from(pinned))
}

/// Removes every pinned map and link of every ABI version under `pin_root`:
/// links go away with their last reference, so this detaches the programs.
pub fn detach(pin_root: &Path) -> Result<bool> {
    if !pin_root.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(pin_root)
        .with_context(|| format!("removing {}", pin_root.display()))?;
    Ok(true)
}

/// Removes `<pin_root>/v<N>` for every `N` but this build's `MAPS_ABI_VERSION`;
/// returns what it removed.
fn remove_other_abi_dirs(pin_root: &Path) -> Result<Vec<PathBuf>> {
    let ours = pin_dir(pin_root);
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(pin_root)? {
        let path = entry?.path();
        let versioned = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix('v'))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        if versioned && path.is_dir() && path != ours {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("removing {}", path.display()))?;
            removed.push(path);
        }
    }
    Ok(removed)
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf when `pin_root` is below it and nothing is mounted.
fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let parent = pin_root.parent().unwrap_or(pin_root);
    if is_bpffs(parent)? {
        return Ok(());
    }
    let base = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(base) {
        bail!("{} is not on a bpf filesystem", parent.display());
    }
    std::fs::create_dir_all(base)?;
    let src = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: static NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("mounting bpffs at /sys/fs/bpf");
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let mut p = path;
    // Walk up to an existing directory: the pin root may not exist yet.
    while !p.exists() {
        p = p.parent().unwrap_or(Path::new("/"));
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Reads a connection's kernel tag: the socket mark (tc mode), or a lookup in the
/// pinned LPM maps (XDP mode, or a mark lost to syncookies).
pub struct TagReader {
    nets_v4: LpmTrie<MapData, [u8; 4], NetEntry>,
    nets_v6: LpmTrie<MapData, [u8; 16], NetEntry>,
    default_class: u32,
}

impl TagReader {
    pub fn open(dir: &Path, default_class: u32) -> Result<TagReader> {
        let open = |name: &str| -> Result<Map> {
            let data = MapData::from_pin(dir.join(name))
                .with_context(|| format!("opening pinned map {name}"))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(TagReader {
            nets_v4: open("NETS_V4")?.try_into()?,
            nets_v6: open("NETS_V6")?.try_into()?,
            default_class,
        })
    }

    /// `(class, tenant)` for a connection accepted on `sock` from `peer`.
    pub fn tag(&self, sock: &impl AsRawFd, peer: IpAddr) -> (u32, u32) {
        if let Some(tag) = socket_mark(sock).and_then(kedge_common::decode_mark) {
            return tag;
        }
        let found = match peer {
            IpAddr::V4(a) => self.nets_v4.get(&Key::new(32, a.octets()), 0),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => self.nets_v4.get(&Key::new(32, v4.octets()), 0),
                None => self.nets_v6.get(&Key::new(128, a.octets()), 0),
            },
        };
        match found {
            Ok(e) => (e.class, e.tenant),
            Err(_) => (self.default_class, 0),
        }
    }
}

fn socket_mark(sock: &impl AsRawFd) -> Option<u32> {
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: valid fd, out pointer and length for SO_MARK (an int).
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mut mark as *mut u32).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_other_abi_versions_are_removed() {
        let root = std::env::temp_dir().join(format!("kedge-abi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let ours = pin_dir(&root);
        let old = root.join(format!("v{}", MAPS_ABI_VERSION - 1));
        for d in [&ours, &old, &root.join("vx"), &root.join("other")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(old.join("link_tc_eth0"), b"").unwrap();
        std::fs::write(ours.join("COUNTERS"), b"").unwrap();
        assert_eq!(remove_other_abi_dirs(&root).unwrap(), vec![old.clone()]);
        assert!(!old.exists());
        assert!(ours.join("COUNTERS").exists());
        assert!(root.join("vx").exists() && root.join("other").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
