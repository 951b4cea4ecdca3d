//! CIDR parsing and a longest-prefix-match table.
//!
//! The kernel's LPM tries are the source of truth for classifying connections;
//! this table mirrors them in userspace where there is no kernel program
//! (`attach = "off"`) and lets config validation reason about overlaps.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 or IPv6 network: address with host bits clear, and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix /{prefix} is longer than {max} bits"));
        }
        let masked = mask(addr, prefix);
        if masked != addr {
            return Err(format!(
                "{addr}/{prefix} has host bits set; did you mean {masked}/{prefix}?"
            ));
        }
        Ok(Cidr { addr, prefix })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - prefix)
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            format!("`{s}` is not an IP network (expected e.g. 10.0.0.0/8 or fd00::/8)")
        })?;
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .map_err(|_| format!("`{s}`: prefix length `{p}` is not a number"))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Longest-prefix match over IPv4 and IPv6 networks: one hash map per prefix
/// length present, probed from the longest down (at most 33 or 129 probes).
#[derive(Clone, Debug)]
pub struct CidrTable<T> {
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for CidrTable<T> {
    fn default() -> Self {
        CidrTable {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T: Clone> CidrTable<T> {
    /// Inserts or replaces the value for exactly this network.
    pub fn insert(&mut self, cidr: Cidr, value: T) {
        match cidr.addr {
            IpAddr::V4(a) => insert_len(&mut self.v4, cidr.prefix, u32::from(a), value),
            IpAddr::V6(a) => insert_len(&mut self.v6, cidr.prefix, u128::from(a), value),
        }
    }

    /// The value of the longest network containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&T> {
        match ip {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                self.v4.iter().find_map(|(len, map)| {
                    let m = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                    map.get(&(bits & m))
                })
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                self.v6.iter().find_map(|(len, map)| {
                    let m = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    map.get(&(bits & m))
                })
            }
        }
    }
}

fn insert_len<K: std::hash::Hash + Eq, T>(
    levels: &mut Vec<(u8, HashMap<K, T>)>,
    len: u8,
    key: K,
    value: T,
) {
    // Kept sorted longest first so lookup returns the first hit.
    let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(i) => i,
        Err(i) => {
            levels.insert(i, (len, HashMap::new()));
            i
        }
    };
    levels[pos].1.insert(key, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_v4_v6_and_bare_addresses() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix(), 8);
        assert_eq!("192.0.2.7".parse::<Cidr>().unwrap().prefix(), 32);
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().prefix(), 8);
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix(), 128);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix(), 0);
    }

    #[test]
    fn rejects_bad_networks_with_a_hint() {
        let e = "10.1.2.3/8".parse::<Cidr>().unwrap_err();
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("ten.0.0.0/8".parse::<Cidr>().is_err());
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn longest_prefix_wins_per_family() {
        let mut t = CidrTable::default();
        t.insert("10.0.0.0/8".parse().unwrap(), "wide");
        t.insert("10.1.0.0/16".parse().unwrap(), "narrow");
        t.insert("10.1.2.3/32".parse().unwrap(), "host");
        t.insert("fd00::/8".parse().unwrap(), "v6");
        t.insert("0.0.0.0/0".parse().unwrap(), "default4");
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&"wide"));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&"narrow"));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&"host"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default4"));
        assert_eq!(t.lookup(ip("fd12::1")), Some(&"v6"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
    }

    #[test]
    fn insert_replaces_same_network() {
        let mut t = CidrTable::default();
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        t.insert(c, 1);
        t.insert(c, 2);
        assert_eq!(t.lookup(ip("10.0.0.1")), Some(&2));
        assert!(c.contains(ip("10.255.0.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
    }
}
