//! The contract between kedge's kernel programs and its daemon.
//!
//! Every pinned map's key and value type lives here, `#[repr(C)]`, so both sides
//! agree on the layout and `bpftool map dump` prints named fields (the maps are
//! BTF-typed). `docs/maps.md` describes each map: who writes it, who reads it.
//!
//! Bump [`MAPS_ABI_VERSION`] whenever a layout here changes: the pin directory is
//! versioned by it, so a daemon never reads maps written with another layout.
#![no_std]

/// Version of the map layouts; names the pin directory `<pin_root>/v<N>`.
pub const MAPS_ABI_VERSION: u32 = 3;

/// Classes are small integers (index into [`ClassPolicy`] arrays).
pub const MAX_CLASSES: u32 = 16;
/// Entries per LPM trie (IPv4 and IPv6 each).
pub const MAX_NETWORKS: u32 = 65_536;
/// Slots in each row of the per-source bucket sketch `SRC_BUCKETS` (a power of two).
pub const SRC_BUCKET_SLOTS: u32 = 65_536;
/// Rows of `SRC_BUCKETS`: a source has one slot in each, picked by that row's hash.
pub const SRC_BUCKET_ROWS: u32 = 2;
/// Tenants mirrored into the kernel: slots of the `TENANTS` array.
pub const MAX_TENANTS: u32 = 4_096;
/// Entries of each CPU's source classification cache (`SRC_CLASSES`, direct
/// mapped: a source's slot is a hash of its address). A power of two.
pub const SRC_CLASS_SLOTS: u32 = 1_024;
/// GPUs whose load is mirrored into the kernel.
pub const MAX_GPUS: u32 = 16;
/// Proxy ports the programs watch.
pub const MAX_PORTS: usize = 8;

/// Counter slot used for per-packet reasons that carry no class (established
/// packets are not classified: that keeps their path cheap).
pub const GLOBAL_SLOT: u32 = MAX_CLASSES;

/// Why a packet got its verdict. Counters are indexed `class * REASONS + reason`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A new connection (SYN) passed every check.
    Admitted = 0,
    /// A packet of an existing connection (no SYN, or SYN+ACK): never rate limited.
    Established = 1,
    /// The source's class is a deny class.
    Denied = 2,
    /// The class's new-connection bucket was empty.
    ClassRate = 3,
    /// The source address's own bucket was empty.
    SourceRate = 4,
    /// Shed by the class's admission ratio (GPU pressure, queue pressure).
    Shed = 5,
    /// The source's tenant is blocked (hard budget spent, shed at the edge).
    TenantBlocked = 6,
    /// A truncated or malformed IP/TCP packet: passed untouched, counted here.
    Malformed = 7,
    /// An IPv6 packet whose extension headers we do not walk: passed untouched.
    Unparsed = 8,
}

/// Number of [`Reason`] values.
pub const REASONS: u32 = 9;
/// Slots in the counters array: one row per class plus the global row.
pub const COUNTER_SLOTS: u32 = (MAX_CLASSES + 1) * REASONS;

impl Reason {
    pub const ALL: [Reason; REASONS as usize] = [
        Reason::Admitted,
        Reason::Established,
        Reason::Denied,
        Reason::ClassRate,
        Reason::SourceRate,
        Reason::Shed,
        Reason::TenantBlocked,
        Reason::Malformed,
        Reason::Unparsed,
    ];

    /// Stable label for metrics and the CLI.
    pub const fn label(self) -> &'static str {
        match self {
            Reason::Admitted => "admitted",
            Reason::Established => "established",
            Reason::Denied => "denied",
            Reason::ClassRate => "class_rate",
            Reason::SourceRate => "source_rate",
            Reason::Shed => "shed",
            Reason::TenantBlocked => "tenant_blocked",
            Reason::Malformed => "malformed",
            Reason::Unparsed => "unparsed",
        }
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Reason::Denied
                | Reason::ClassRate
                | Reason::SourceRate
                | Reason::Shed
                | Reason::TenantBlocked
        )
    }
}

/// Index into the counters array.
#[inline(always)]
pub const fn counter_slot(class: u32, reason: Reason) -> u32 {
    class * REASONS + reason as u32
}

/// `Settings.flags`: the program acts at all (off = pass everything, count nothing).
pub const SETTINGS_ENABLED: u32 = 1;
/// `Settings.flags`: set `skb->mark` on admitted SYNs (tc mode only).
pub const SETTINGS_MARK: u32 = 2;
/// `Settings.flags`: never trust the source classification cache: every SYN
/// walks the LPM trie (and refills the cache). For benchmarks and debugging;
/// the daemon never sets it.
pub const SETTINGS_NO_CLASS_CACHE: u32 = 4;
/// `Settings.flags`: the interface has no link-layer header (tun, WireGuard,
/// IP tunnels): a packet starts with its IP header, whose version says which.
pub const SETTINGS_NO_LINK_HEADER: u32 = 8;

/// Global settings, the single entry of the `SETTINGS` array. Written by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Destination ports (host order) of the proxy; 0 = unused slot.
    pub ports: [u16; MAX_PORTS],
    /// Class given to sources that match no network.
    pub default_class: u32,
    /// `SETTINGS_*` bits.
    pub flags: u32,
    /// Bumped by every `sync` (never 0): a source classification cached under
    /// another generation is stale and the SYN is classified afresh.
    pub generation: u32,
    pub _pad: u32,
    /// Secret odd multipliers of [`source_bucket_slots`], drawn once when the
    /// maps are created (all 0 until then).
    pub source_keys: [u64; 4],
    /// Nanoseconds per kernel tick (1e9 / HZ): the bucket clock is
    /// `jiffies * tick_ns` (see [`Bucket`]).
    pub tick_ns: u64,
}

/// Value of the `NETS_V4` / `NETS_V6` LPM tries: what a source CIDR maps to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetEntry {
    pub class: u32,
    /// Tenant id (see `tenant_id` in userspace); 0 = no tenant.
    pub tenant: u32,
    /// The tenant's slot in the `TENANTS` array (meaningless when `tenant` is 0).
    pub tenant_slot: u32,
}

/// `SourceClass.family` of an IPv4 source (the LPM lookup went to `NETS_V4`).
pub const FAMILY_V4: u32 = 4;
/// `SourceClass.family` of an IPv6 source (`NETS_V6`).
pub const FAMILY_V6: u32 = 6;

/// One entry of the per-CPU source classification cache `SRC_CLASSES`: what
/// the LPM lookup said for `addr`, under settings generation `generation`.
/// Written by the programs only; an entry is used only when `addr`, `family`
/// and `generation` all match, so a config sync invalidates every entry at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceClass {
    pub addr: SourceKey,
    /// `Settings.generation` the entry was classified under; 0 = empty.
    pub generation: u32,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u32,
    /// The classification (the default class's when no network matched).
    pub entry: NetEntry,
    pub _pad: u32,
}

/// The slot of `addr` in the source classification cache.
#[inline(always)]
pub fn source_class_slot(addr: &SourceKey) -> u32 {
    let w = addr.words();
    let folded = w[0] ^ w[1] ^ w[2] ^ w[3];
    folded.wrapping_mul(0x9e37_79b1) >> (32 - SRC_CLASS_SLOTS.trailing_zeros())
}

/// One slot of the per-source bucket sketch `SRC_BUCKETS`.
///
/// A source owns one slot per row ([`source_bucket_slots`]); its bucket is the
/// row with the latest arrival time (the least credit), and an admitted SYN
/// moves every row to at least its new arrival time. Sources that share a slot
/// share its bucket, so a row only ever overstates a source's debt: a source
/// is never admitted beyond its own rate, and one is held back by another only
/// when both its slots are shared with sources over their rate (a count-min
/// sketch with conservative update).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBucket {
    /// As [`Bucket::tat_ns`].
    pub tat_ns: u64,
    /// The source whose SYN charged this slot last: for operators.
    pub last_source: SourceKey,
}

/// Index into `SRC_BUCKETS` of `addr`'s slot in each row.
///
/// Each row hashes the address's two double words with its own pair of secret
/// odd multipliers and keeps the top bits of the sum (vector multiply-shift,
/// an almost-universal family): for any two addresses, the chance that they
/// share a row's slot is about one in `SRC_BUCKET_SLOTS` over the choice of
/// keys, so a client that does not know the keys cannot pick addresses that
/// share another's slots. (Addresses of one IPv4 /16 never share a slot: the
/// last two octets are the top bits of the low double word.)
#[inline(always)]
pub fn source_bucket_slots(addr: &SourceKey, keys: &[u64; 4]) -> [u32; 2] {
    let [high, low] = addr.dwords();
    let shift = 64 - SRC_BUCKET_SLOTS.trailing_zeros();
    let row0 = high
        .wrapping_mul(keys[0])
        .wrapping_add(low.wrapping_mul(keys[1]))
        >> shift;
    let row1 = high
        .wrapping_mul(keys[2])
        .wrapping_add(low.wrapping_mul(keys[3]))
        >> shift;
    [row0 as u32, SRC_BUCKET_SLOTS + row1 as u32]
}

/// `ClassPolicy.flags`: every new connection of the class is dropped.
pub const CLASS_DENY: u32 = 1;

/// Per-class limits on new connections, index = class. Written by the daemon from config.
///
/// Both buckets are GCRA (virtual scheduling): equivalent to a token bucket of
/// rate `1e9 / interval_ns` per second and burst `tolerance_ns / interval_ns + 1`,
/// but one `u64` of state and no division in the kernel. `interval_ns == 0`
/// means unlimited.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassPolicy {
    pub interval_ns: u64,
    pub tolerance_ns: u64,
    pub source_interval_ns: u64,
    pub source_tolerance_ns: u64,
    /// `CLASS_*` bits.
    pub flags: u32,
    pub _pad: u32,
}

impl ClassPolicy {
    /// GCRA parameters for `rate` per second with `burst` (`burst >= 1`).
    pub const fn gcra(rate_per_sec: u32, burst: u32) -> (u64, u64) {
        if rate_per_sec == 0 {
            return (0, 0);
        }
        let interval = 1_000_000_000 / rate_per_sec as u64;
        let burst = if burst == 0 { 1 } else { burst as u64 };
        (interval, interval * (burst - 1))
    }
}

/// State of one GCRA bucket: the theoretical arrival time of the next conforming
/// connection, on the bucket clock: the kernel's tick counter (`jiffies`) times
/// `Settings.tick_ns`. Nanoseconds, one tick of resolution, its own epoch
/// (compare with `grep '^jiffies' /proc/timer_list` times the tick, not with
/// CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tat_ns: u64,
}

/// Per-class admission ratio, index = class. Written by the daemon (GPU and
/// queue pressure); the kernel admits a new connection with this probability.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    /// 0..=1000 per mille; 1000 admits all.
    pub admit_permille: u32,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            admit_permille: ADMIT_ALL,
        }
    }
}

/// `Admission.admit_permille` that admits every connection.
pub const ADMIT_ALL: u32 = 1000;

/// Key of the per-source buckets: the source address, IPv4 as `::ffff:a.b.c.d`.
/// Eight-byte aligned so the programs compare and hash it by words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceKey {
    pub addr: [u8; 16],
}

impl SourceKey {
    /// The address as four native-endian words.
    #[inline(always)]
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: 16 bytes, aligned to 8 (repr(align(8))).
        unsafe { *(self.addr.as_ptr() as *const [u32; 4]) }
    }

    /// The address as two native-endian double words.
    #[inline(always)]
    pub fn dwords(&self) -> [u64; 2] {
        // SAFETY: as above.
        unsafe { *(self.addr.as_ptr() as *const [u64; 2]) }
    }

    /// The key whose address is these two native-endian double words.
    #[inline(always)]
    pub fn from_dwords(d: [u64; 2]) -> SourceKey {
        let mut key = SourceKey::default();
        // SAFETY: 16 bytes, aligned to 8.
        unsafe { *(key.addr.as_mut_ptr() as *mut [u64; 2]) = d };
        key
    }
}

/// Per-tenant usage and state, index = the tenant's slot (`NetEntry.tenant_slot`).
/// The daemon assigns slots (`sync`) and writes the state (budget layer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantState {
    /// Tokens used in the tenant's tightest window.
    pub tokens_used: u64,
    /// That window's limit (0 = none).
    pub tokens_limit: u64,
    /// Non-zero: drop the tenant's new connections at the edge.
    pub blocked: u32,
    /// The tenant id holding this slot; 0 = a free slot. The programs act on
    /// `blocked` only when it matches the id they classified.
    pub id: u32,
}

/// Raw load of one GPU, index = GPU index. Written by the daemon (NVML), kept for inspection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuLoad {
    pub utilization_pct: u32,
    pub _pad: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub updated_ns: u64,
}

/// `skb->mark` layout on admitted SYNs: `0x6b` ('k') in the top byte, the class
/// in the next byte, the tenant id in the low 16 bits. The magic byte keeps a
/// foreign mark from being read as a kedge tag.
pub const MARK_MAGIC: u32 = 0x6b00_0000;
const MARK_MAGIC_MASK: u32 = 0xff00_0000;

#[inline(always)]
pub const fn encode_mark(class: u32, tenant: u32) -> u32 {
    MARK_MAGIC | ((class & 0xff) << 16) | (tenant & 0xffff)
}

/// `(class, tenant)` from a socket mark, if it is a kedge tag.
pub const fn decode_mark(mark: u32) -> Option<(u32, u32)> {
    if mark & MARK_MAGIC_MASK == MARK_MAGIC {
        Some(((mark >> 16) & 0xff, mark & 0xffff))
    } else {
        None
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made of integers, with explicit padding.
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for NetEntry {}
    unsafe impl aya::Pod for ClassPolicy {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for Admission {}
    unsafe impl aya::Pod for SourceKey {}
    unsafe impl aya::Pod for SourceClass {}
    unsafe impl aya::Pod for SourceBucket {}
    unsafe impl aya::Pod for TenantState {}
    unsafe impl aya::Pod for GpuLoad {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_round_trips_and_rejects_foreign_marks() {
        assert_eq!(decode_mark(encode_mark(3, 0x1234)), Some((3, 0x1234)));
        assert_eq!(decode_mark(0), None);
        assert_eq!(decode_mark(0x0003_1234), None);
    }

    #[test]
    fn gcra_parameters_match_rate_and_burst() {
        assert_eq!(ClassPolicy::gcra(0, 5), (0, 0));
        assert_eq!(ClassPolicy::gcra(10, 1), (100_000_000, 0));
        assert_eq!(ClassPolicy::gcra(10, 5), (100_000_000, 400_000_000));
    }

    #[test]
    fn source_class_slots_are_in_range_and_spread() {
        let mut seen = [false; SRC_CLASS_SLOTS as usize];
        for i in 0..=255u8 {
            let mut k = SourceKey::default();
            k.addr[10] = 0xff;
            k.addr[11] = 0xff;
            k.addr[12..].copy_from_slice(&[10, 1, 2, i]);
            let slot = source_class_slot(&k);
            assert!(slot < SRC_CLASS_SLOTS);
            seen[slot as usize] = true;
        }
        // 256 consecutive addresses land on (nearly) 256 different slots.
        assert!(seen.iter().filter(|s| **s).count() > 200);
        assert_eq!(core::mem::size_of::<SourceClass>(), 40);
    }

    fn v4(a: [u8; 4]) -> SourceKey {
        let mut k = SourceKey::default();
        k.addr[10] = 0xff;
        k.addr[11] = 0xff;
        k.addr[12..].copy_from_slice(&a);
        k
    }

    #[test]
    fn source_bucket_slots_are_one_per_row_and_spread() {
        let keys = [
            0x0123_4567_89ab_cdef,
            0x8765_4321_0fed_cba9,
            0x5555_aaaa_3333_cccd,
            0x9e37_79b9_7f4a_7c15,
        ];
        let mut rows = [[false; SRC_BUCKET_SLOTS as usize]; 2];
        let mut slots_of = [[0u32; 2]; 4096];
        for (i, slots) in slots_of.iter_mut().enumerate() {
            // Neighbours across /16s: the third octet varies slowest.
            let s = source_bucket_slots(&v4([10, (i >> 8) as u8, i as u8, 7]), &keys);
            assert!(s[0] < SRC_BUCKET_SLOTS, "{s:?}");
            assert!((SRC_BUCKET_SLOTS..2 * SRC_BUCKET_SLOTS).contains(&s[1]));
            rows[0][s[0] as usize] = true;
            rows[1][(s[1] - SRC_BUCKET_SLOTS) as usize] = true;
            *slots = s;
        }
        // 4096 addresses in 65 536 slots: about 3 970 distinct per row if the
        // hash spreads them.
        for row in rows {
            assert!(row.iter().filter(|s| **s).count() > 3900);
        }
        // Sharing both rows is a one in 2^32 event per pair.
        for (i, a) in slots_of.iter().enumerate() {
            assert!(!slots_of[i + 1..].contains(a), "{a:?}");
        }
        // The keys move every source.
        let a = v4([192, 0, 2, 1]);
        let other = [keys[1], keys[0], keys[3], keys[2]];
        assert_ne!(
            source_bucket_slots(&a, &keys),
            source_bucket_slots(&a, &other)
        );
        assert_eq!(core::mem::size_of::<SourceBucket>(), 24);
    }

    #[test]
    fn counter_slots_do_not_overlap() {
        let last = counter_slot(GLOBAL_SLOT, Reason::Unparsed);
        assert_eq!(last, COUNTER_SLOTS - 1);
        assert_eq!(counter_slot(1, Reason::Admitted), REASONS);
    }
}
