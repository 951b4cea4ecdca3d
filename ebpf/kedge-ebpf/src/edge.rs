use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action},
    btf_maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use kedge_common::{
    Admission, Bucket, CLASS_DENY, COUNTER_SLOTS, ClassPolicy, FAMILY_V4, FAMILY_V6, GLOBAL_SLOT,
    GpuLoad, MAX_CLASSES, MAX_GPUS, MAX_NETWORKS, MAX_PORTS, MAX_TENANTS, NetEntry, Reason,
    SETTINGS_ENABLED, SETTINGS_MARK, SETTINGS_NO_CLASS_CACHE, SETTINGS_NO_LINK_HEADER,
    SRC_BUCKET_ROWS, SRC_BUCKET_SLOTS, SRC_CLASS_SLOTS, Settings, SourceBucket, SourceClass,
    SourceKey, TenantState, counter_slot, encode_mark, source_bucket_slots, source_class_slot,
};

// ---- maps (the contract; see docs/maps.md) ---------------------------------

#[btf_map]
static SETTINGS: Array<Settings, 1> = Array::new();
#[btf_map]
static NETS_V4: LpmTrie<[u8; 4], NetEntry, { MAX_NETWORKS as usize }> = LpmTrie::new();
#[btf_map]
static NETS_V6: LpmTrie<[u8; 16], NetEntry, { MAX_NETWORKS as usize }> = LpmTrie::new();
#[btf_map]
static CLASSES: Array<ClassPolicy, { MAX_CLASSES as usize }> = Array::new();
#[btf_map]
static ADMISSION: Array<Admission, { MAX_CLASSES as usize }> = Array::new();
#[btf_map]
static CLASS_BUCKETS: Array<Bucket, { MAX_CLASSES as usize }> = Array::new();
/// The per-source buckets, a count-min sketch: `SRC_BUCKET_ROWS` rows of
/// `SRC_BUCKET_SLOTS`, a source's slot in each picked by a keyed hash
/// (`source_bucket_slots`). An array, so the lookups are inlined: an LRU hash
/// lookup (a jhash of 16 bytes and a bucket walk) was a third of an admitted SYN.
#[btf_map]
static SRC_BUCKETS: Array<SourceBucket, { (SRC_BUCKET_ROWS * SRC_BUCKET_SLOTS) as usize }> =
    Array::new();
/// Index = the tenant's slot (`NetEntry.tenant_slot`): an array, so the lookup
/// is inlined (a hash lookup by tenant id cost a sixth of an admitted SYN).
#[btf_map]
static TENANTS: Array<TenantState, { MAX_TENANTS as usize }> = Array::new();
/// Each CPU's cache of recent sources' classification (direct mapped by a hash
/// of the address): a repeat source skips the LPM walk. Keyed to
/// `Settings.generation`, so a `sync` makes every entry stale at once.
#[btf_map]
static SRC_CLASSES: PerCpuArray<SourceClass, { SRC_CLASS_SLOTS as usize }> = PerCpuArray::new();
/// Written by the daemon from NVML for inspection with bpftool; the kernel's
/// decisions use the admission ratios derived from it, not the raw load.
#[btf_map]
static GPU_LOAD: Array<GpuLoad, { MAX_GPUS as usize }> = Array::new();
#[btf_map]
static COUNTERS: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

// ---- attach points ---------------------------------------------------------

#[classifier]
pub fn kedge_tc(ctx: TcContext) -> i32 {
    let Some(settings) = settings() else {
        return TC_ACT_UNSPEC;
    };
    let l2 = has_link_header(settings);
    let mut seen = parse(ctx.data(), ctx.data_end(), l2);
    if let Parse::Short = seen {
        // The parser sees only the skb's linear part. A paged skb (GRO, some
        // drivers) can keep headers outside it: pull them in and look again.
        // Only packets whose headers did not fit pay for this.
        let len = ctx.len();
        if ((ctx.data_end() - ctx.data()) as u32) < len {
            let want = if len < HEADERS_MAX { len } else { HEADERS_MAX };
            if ctx.pull_data(want).is_ok() {
                seen = parse(ctx.data(), ctx.data_end(), l2);
            }
        }
    }
    match decide(settings, seen, ctx.data(), ctx.data_end()) {
        Verdict::Pass => TC_ACT_UNSPEC,
        Verdict::Drop => TC_ACT_SHOT as i32,
        Verdict::Tag(mark) => {
            ctx.set_mark(mark);
            TC_ACT_UNSPEC
        }
    }
}

#[xdp]
pub fn kedge_xdp(ctx: XdpContext) -> u32 {
    let Some(settings) = settings() else {
        return xdp_action::XDP_PASS;
    };
    let seen = parse(ctx.data(), ctx.data_end(), has_link_header(settings));
    match decide(settings, seen, ctx.data(), ctx.data_end()) {
        Verdict::Drop => xdp_action::XDP_DROP,
        // XDP has no mark: the daemon reads the same LPM maps for the tag.
        Verdict::Pass | Verdict::Tag(_) => xdp_action::XDP_PASS,
    }
}

// ---- benchmark baselines ---------------------------------------------------

/// Never attached: `cargo xtask bench kernel` runs it next to `kedge_tc` to
/// measure what any tc program costs under BPF_PROG_TEST_RUN.
#[classifier]
pub fn kedge_tc_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

/// Never attached: the XDP baseline of `cargo xtask bench kernel`.
#[xdp]
pub fn kedge_xdp_empty(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

// ---- the shared core -------------------------------------------------------

enum Verdict {
    Pass,
    Drop,
    /// Pass and set this mark (when marking is on).
    Tag(u32),
}

/// Ethernet + one VLAN tag + IPv6 + a few extension headers + TCP.
const HEADERS_MAX: u32 = 128;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Returns a pointer to `len` bytes at `off`, if they are inside the packet.
#[inline(always)]
fn bytes_at(start: usize, end: usize, off: usize, len: usize) -> Option<*const u8> {
    if start + off + len > end {
        return None;
    }
    Some((start + off) as *const u8)
}

#[inline(always)]
fn be16(p: *const u8) -> u16 {
    // SAFETY: callers checked that two bytes at `p` are inside the packet.
    unsafe { u16::from_be_bytes([*p, *p.add(1)]) }
}

#[inline(always)]
fn count(class: u32, reason: Reason) {
    if let Some(c) = COUNTERS.get_ptr_mut(counter_slot(class, reason)) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *c += 1 };
    }
}

/// Where the headers are and what the TCP header says. Offsets only: the
/// established path never reads, let alone copies, the source address.
struct Parsed {
    /// Offset of the IP header.
    l3: usize,
    is_v4: bool,
    dst_port: u16,
    flags: u8,
}

enum Parse {
    Tcp(Parsed),
    /// Not TCP/IP, or a later fragment: not ours.
    Other,
    /// A header runs past the end of what the program can see: truncated (or,
    /// in tc, not yet pulled into the linear part).
    Short,
    /// A header that makes no sense (bad IPv4 version or header length).
    Malformed,
    /// IPv6 extension headers we do not walk.
    Unparsed,
}

/// Settings, if the program is to act at all.
#[inline(always)]
fn settings() -> Option<&'static Settings> {
    let settings = SETTINGS.get(0)?;
    if settings.flags & SETTINGS_ENABLED == 0 {
        return None;
    }
    Some(settings)
}

/// Whether packets start with an Ethernet header (else with the IP header).
#[inline(always)]
fn has_link_header(settings: &Settings) -> bool {
    settings.flags & SETTINGS_NO_LINK_HEADER == 0
}

/// The link layer: the ethertype and where the IP header starts.
#[inline(always)]
fn link(start: usize, end: usize, l2: bool) -> Option<(u16, usize)> {
    if !l2 {
        // An IP-only device (tun, WireGuard): the version nibble says which.
        // Checked for a whole IPv4 header's 20 bytes (IPv6's is longer): a
        // one-byte check compiles to a compare the verifier cannot use.
        let ip = bytes_at(start, end, 0, 20)?;
        // SAFETY: 20 bytes checked above.
        let proto = match unsafe { *ip } >> 4 {
            4 => ETH_P_IP,
            6 => ETH_P_IPV6,
            _ => 0,
        };
        return Some((proto, 0));
    }
    let eth = bytes_at(start, end, 0, ETH_HLEN)?;
    // SAFETY: 14 bytes checked above.
    let proto = be16(unsafe { eth.add(12) });
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let tag = bytes_at(start, end, ETH_HLEN, 4)?;
        // SAFETY: 4 bytes checked above.
        return Some((be16(unsafe { tag.add(2) }), ETH_HLEN + 4));
    }
    Some((proto, ETH_HLEN))
}

#[inline(always)]
fn parse(start: usize, end: usize, l2: bool) -> Parse {
    let Some((proto, l3)) = link(start, end, l2) else {
        return Parse::Short;
    };

    let l4;
    let is_v4;
    if proto == ETH_P_IP {
        let Some(ip) = bytes_at(start, end, l3, 20) else {
            return Parse::Short;
        };
        // SAFETY: 20 bytes of IPv4 header checked above.
        let (vihl, frag, l4proto) = unsafe { (*ip, be16(ip.add(6)), *ip.add(9)) };
        if l4proto != IPPROTO_TCP {
            return Parse::Other;
        }
        if frag & 0x1fff != 0 {
            // A later fragment carries no TCP header; the first one was judged.
            return Parse::Other;
        }
        let ihl = (vihl & 0x0f) as usize;
        if vihl >> 4 != 4 || ihl < 5 {
            return Parse::Malformed;
        }
        l4 = l3 + ihl * 4;
        is_v4 = true;
    } else if proto == ETH_P_IPV6 {
        let Some(ip) = bytes_at(start, end, l3, 40) else {
            return Parse::Short;
        };
        // SAFETY: 40 bytes of IPv6 header checked above.
        let mut next = unsafe { *ip.add(6) };
        let mut off = l3 + 40;
        // Walk a bounded number of the extension headers a SYN may carry.
        let mut hops = 0;
        while hops < 4 && next != IPPROTO_TCP {
            let Some(ext) = bytes_at(start, end, off, 8) else {
                return Parse::Short;
            };
            // SAFETY: 8 bytes checked above.
            let (nh, len) = unsafe { (*ext, *ext.add(1)) };
            match next {
                // hop-by-hop, routing, destination options: (len + 1) * 8 bytes
                0 | 43 | 60 => off += (len as usize + 1) * 8,
                // fragment: fixed 8 bytes; only the first fragment has the TCP header
                44 => {
                    // SAFETY: inside the 8 checked bytes.
                    let frag = be16(unsafe { ext.add(2) });
                    if frag & 0xfff8 != 0 {
                        return Parse::Other;
                    }
                    off += 8;
                }
                // no next header, or an upper layer other than TCP
                59 | 1 | 17 | 58 | 132 => return Parse::Other,
                _ => return Parse::Unparsed,
            }
            next = nh;
            hops += 1;
        }
        if next != IPPROTO_TCP {
            return Parse::Unparsed;
        }
        l4 = off;
        is_v4 = false;
    } else {
        return Parse::Other;
    }

    let Some(tcp) = bytes_at(start, end, l4, 20) else {
        return Parse::Short;
    };
    // SAFETY: 20 bytes of TCP header checked above.
    let (dst_port, flags) = unsafe { (be16(tcp.add(2)), *tcp.add(13)) };
    Parse::Tcp(Parsed {
        l3,
        is_v4,
        dst_port,
        flags,
    })
}

/// `sync` fills the ports from slot 0 on, so the first empty slot ends the list:
/// a one-port config costs one comparison.
#[inline(always)]
fn is_proxy_port(settings: &Settings, port: u16) -> bool {
    let mut i = 0;
    while i < MAX_PORTS {
        let p = settings.ports[i];
        if p == 0 {
            return false;
        }
        if p == port {
            return true;
        }
        i += 1;
    }
    false
}

/// GCRA: a connection conforms if the bucket's theoretical arrival time is no
/// further ahead of now than the tolerance.
#[inline(always)]
fn conforms(tat: u64, now: u64, tolerance: u64) -> bool {
    tat <= now + tolerance
}

/// GCRA: charging a conforming connection moves the arrival time one interval on.
#[inline(always)]
fn charged(tat: u64, now: u64, interval: u64) -> u64 {
    (if tat > now { tat } else { now }) + interval
}

/// The source address, IPv4 as `::ffff:a.b.c.d` (the per-source bucket key).
/// Built by double words: byte stores read back as words (the cache's hash and
/// compare, the map helpers' hashing) would stall store forwarding.
#[inline(always)]
fn source(p: &Parsed, start: usize, end: usize) -> Option<SourceKey> {
    if p.is_v4 {
        let ip = bytes_at(start, end, p.l3, 20)?;
        // SAFETY: bytes 12..16 are inside the 20 checked bytes.
        let a = unsafe { core::ptr::read_unaligned(ip.add(12) as *const [u8; 4]) };
        let low = u64::from_ne_bytes([0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]);
        Some(SourceKey::from_dwords([0, low]))
    } else {
        let ip = bytes_at(start, end, p.l3, 40)?;
        // SAFETY: the source address is bytes 8..24 of the checked header.
        let (high, low) = unsafe {
            (
                core::ptr::read_unaligned(ip.add(8) as *const u64),
                core::ptr::read_unaligned(ip.add(16) as *const u64),
            )
        };
        Some(SourceKey::from_dwords([high, low]))
    }
}

/// The longest-prefix match for `src`, or the default class.
#[inline(always)]
fn lookup_nets(src: &SourceKey, is_v4: bool, default_class: u32) -> NetEntry {
    let found = if is_v4 {
        let key = Key::new(32, [src.addr[12], src.addr[13], src.addr[14], src.addr[15]]);
        NETS_V4.get(&key).copied()
    } else {
        NETS_V6.get(&Key::new(128, src.addr)).copied()
    };
    match found {
        Some(entry) if entry.class < MAX_CLASSES => entry,
        _ => NetEntry {
            class: default_class,
            tenant: 0,
            tenant_slot: 0,
        },
    }
}

/// The source's class and tenant: from this CPU's cache when it holds the
/// source under the current settings generation, else from the LPM tries
/// (and then cached). The cache only remembers what the tries said; every
/// check that follows (deny, tenant, admission, buckets) still runs.
#[inline(always)]
fn classify(settings: &Settings, src: &SourceKey, is_v4: bool) -> NetEntry {
    // One read: `sync` rewrites SETTINGS last, after the tries, so an entry
    // classified under this generation saw the tries of this generation or a
    // later one (and one cached under an older generation is never used).
    // SAFETY: a plain read of a map value field.
    let generation = unsafe { core::ptr::read_volatile(&settings.generation) };
    let family = if is_v4 { FAMILY_V4 } else { FAMILY_V6 };
    let cached = SRC_CLASSES.get_ptr_mut(source_class_slot(src));
    if let Some(c) = cached {
        // SAFETY: `c` points into this CPU's map value, which lives while we
        // run; nothing else on this CPU writes it meanwhile.
        let c = unsafe { &mut *c };
        let [a0, a1] = src.dwords();
        let [c0, c1] = c.addr.dwords();
        if c.generation == generation
            && generation != 0
            && a0 == c0
            && a1 == c1
            && c.family == family
            && settings.flags & SETTINGS_NO_CLASS_CACHE == 0
        {
            return c.entry;
        }
        let entry = lookup_nets(src, is_v4, settings.default_class);
        c.addr = *src;
        c.family = family;
        c.entry = entry;
        c.generation = generation;
        return entry;
    }
    lookup_nets(src, is_v4, settings.default_class)
}

#[inline(always)]
fn decide(settings: &Settings, seen: Parse, start: usize, end: usize) -> Verdict {
    let p = match seen {
        Parse::Tcp(p) => p,
        Parse::Other => return Verdict::Pass,
        Parse::Short | Parse::Malformed => {
            count(GLOBAL_SLOT, Reason::Malformed);
            return Verdict::Pass;
        }
        Parse::Unparsed => {
            count(GLOBAL_SLOT, Reason::Unparsed);
            return Verdict::Pass;
        }
    };
    if !is_proxy_port(settings, p.dst_port) {
        return Verdict::Pass;
    }
    if p.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        // The cheap path: no lookup, no bucket, one per-CPU increment.
        count(GLOBAL_SLOT, Reason::Established);
        return Verdict::Pass;
    }

    // Parsed a moment ago from the same bytes: cannot fail.
    let Some(src) = source(&p, start, end) else {
        return Verdict::Pass;
    };
    let entry = classify(settings, &src, p.is_v4);
    let class = entry.class;
    match admit(settings, &src, &entry) {
        Some(reason) => {
            count(class, reason);
            Verdict::Drop
        }
        None => {
            count(class, Reason::Admitted);
            if settings.flags & SETTINGS_MARK != 0 {
                Verdict::Tag(encode_mark(class, entry.tenant))
            } else {
                Verdict::Pass
            }
        }
    }
}

/// The checks a new connection must pass, cheapest and most final first.
/// Returns the drop reason, or `None` to admit.
#[inline(always)]
fn admit(settings: &Settings, src: &SourceKey, entry: &NetEntry) -> Option<Reason> {
    let class = entry.class;
    let policy = CLASSES.get(class)?;
    if policy.flags & CLASS_DENY != 0 {
        return Some(Reason::Denied);
    }
    if entry.tenant != 0 {
        // The slot's id guards against a slot the daemon has since given to
        // another tenant (a stale classification mid-sync): not ours, not blocked.
        if let Some(t) = TENANTS.get(entry.tenant_slot) {
            if t.id == entry.tenant && t.blocked != 0 {
                return Some(Reason::TenantBlocked);
            }
        }
    }
    if let Some(a) = ADMISSION.get(class) {
        let admit = a.admit_permille;
        if admit < 1000 {
            // SAFETY: helper without arguments.
            let roll = unsafe { bpf_get_prandom_u32() } % 1000;
            if roll >= admit {
                return Some(Reason::Shed);
            }
        }
    }
    if policy.interval_ns == 0 && policy.source_interval_ns == 0 {
        // No bucket: skip the clock read too.
        return None;
    }
    // The bucket clock is the tick counter in nanoseconds. The verifier turns
    // bpf_jiffies64 into one load, where any clock helper is a call (the coarse
    // clock's cost a tenth of an admitted SYN, bpf_ktime_get_ns more); the
    // resolution is one tick either way, as with CLOCK_MONOTONIC_COARSE. GCRA
    // keeps its bounds with it: a bucket gains at most one tick of extra credit.
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() }.wrapping_mul(settings.tick_ns);
    // Check both buckets, then charge both: a connection the class bucket drops
    // costs its source nothing, and the source bucket comes first so one abusive
    // address is stopped before it is weighed against its class. The updates are
    // not atomic across CPUs on purpose: a lost update admits at most one extra
    // connection per racing CPU.
    let source = if policy.source_interval_ns != 0 {
        let [s0, s1] = source_bucket_slots(src, &settings.source_keys);
        match (SRC_BUCKETS.get_ptr_mut(s0), SRC_BUCKETS.get_ptr_mut(s1)) {
            (Some(r0), Some(r1)) => {
                // SAFETY: both point into map values that live while we run.
                let (t0, t1) = unsafe { ((*r0).tat_ns, (*r1).tat_ns) };
                // The row that owes least is the closest to the source's own debt.
                let tat = if t0 < t1 { t0 } else { t1 };
                if !conforms(tat, now, policy.source_tolerance_ns) {
                    return Some(Reason::SourceRate);
                }
                Some((r0, r1, charged(tat, now, policy.source_interval_ns)))
            }
            // Unreachable (the slots are in range); admit rather than guess.
            _ => None,
        }
    } else {
        None
    };
    if policy.interval_ns != 0 {
        if let Some(b) = CLASS_BUCKETS.get_ptr_mut(class) {
            // SAFETY: as above.
            let tat = unsafe { (*b).tat_ns };
            if !conforms(tat, now, policy.tolerance_ns) {
                return Some(Reason::ClassRate);
            }
            // SAFETY: as above.
            unsafe { (*b).tat_ns = charged(tat, now, policy.interval_ns) };
        }
    }
    if let Some((r0, r1, tat)) = source {
        // Conservative update: no row falls below the source's new arrival
        // time, and a row a busier source pushed further keeps its time.
        for r in [r0, r1] {
            // SAFETY: as above.
            unsafe {
                if (*r).tat_ns < tat {
                    (*r).tat_ns = tat;
                }
                (*r).last_source = *src;
            }
        }
    }
    None
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
