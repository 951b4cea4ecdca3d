//! Ethernet frames built byte by byte for BPF_PROG_TEST_RUN: TCP over IPv4 or
//! IPv6, optionally behind one VLAN tag, with IPv4 options, IPv6 extension
//! headers or a fragment offset. Checksums stay zero: nothing on the test-run
//! path verifies them.
#![allow(dead_code)]

use std::net::IpAddr;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

pub const HOP_BY_HOP: u8 = 0;
pub const ROUTING: u8 = 43;
pub const FRAGMENT: u8 = 44;
pub const DEST_OPTS: u8 = 60;
/// Mobility header: an extension header the program does not walk.
pub const MOBILITY: u8 = 135;

const TCP: u8 = 6;
const UDP: u8 = 17;

#[derive(Clone, Debug)]
pub struct Packet {
    src: IpAddr,
    dst: IpAddr,
    src_port: u16,
    dst_port: u16,
    flags: u8,
    udp: bool,
    vlan: Option<u16>,
    /// IPv4 options, in 32-bit words (IHL = 5 + words).
    ipv4_option_words: u8,
    /// Raw IHL override (to build a bad header).
    ihl: Option<u8>,
    /// Some(offset in 8-byte units): a fragment (IPv4 flags, or an IPv6 fragment header).
    fragment: Option<u16>,
    /// IPv6 extension headers, in order, before TCP.
    v6_ext: Vec<u8>,
    /// No Ethernet header: the packet as an IP-only device (tun, WireGuard) carries it.
    ip_only: bool,
}

impl Packet {
    /// A TCP segment from `src` (IPv4 or IPv6) to the matching test server address.
    pub fn tcp(src: &str, dst_port: u16, flags: u8) -> Packet {
        let src: IpAddr = src.parse().expect("an IP address");
        let dst = match src {
            IpAddr::V4(_) => "192.0.2.1".parse().unwrap(),
            IpAddr::V6(_) => "2001:db8::1".parse().unwrap(),
        };
        Packet {
            src,
            dst,
            src_port: 40_000,
            dst_port,
            flags,
            udp: false,
            vlan: None,
            ipv4_option_words: 0,
            ihl: None,
            fragment: None,
            v6_ext: Vec::new(),
            ip_only: false,
        }
    }

    /// Without the Ethernet header, as on a tun or WireGuard interface.
    pub fn ip_only(mut self) -> Packet {
        self.ip_only = true;
        self
    }

    pub fn syn(src: &str, dst_port: u16) -> Packet {
        Packet::tcp(src, dst_port, SYN)
    }

    /// The same addresses and ports, UDP instead of TCP.
    pub fn udp(mut self) -> Packet {
        self.udp = true;
        self
    }

    pub fn vlan(mut self, tpid: u16) -> Packet {
        self.vlan = Some(tpid);
        self
    }

    pub fn ipv4_options(mut self, words: u8) -> Packet {
        self.ipv4_option_words = words;
        self
    }

    pub fn ihl(mut self, ihl: u8) -> Packet {
        self.ihl = Some(ihl);
        self
    }

    /// A fragment at `offset` 8-byte units (0 = the first fragment, with more to
    /// come). For IPv6 this adds a fragment header after the other extensions.
    pub fn fragment(mut self, offset: u16) -> Packet {
        self.fragment = Some(offset);
        if self.src.is_ipv6() {
            self.v6_ext.push(FRAGMENT);
        }
        self
    }

    pub fn v6_ext(mut self, kind: u8) -> Packet {
        self.v6_ext.push(kind);
        self
    }

    /// Byte offset where the IP header starts.
    pub fn l3_offset(&self) -> usize {
        if self.ip_only {
            return 0;
        }
        14 + if self.vlan.is_some() { 4 } else { 0 }
    }

    /// Byte offset where the TCP header starts.
    pub fn l4_offset(&self) -> usize {
        self.l3_offset()
            + match self.src {
                IpAddr::V4(_) => 20 + 4 * self.ipv4_option_words as usize,
                IpAddr::V6(_) => 40 + 8 * self.v6_ext.len(),
            }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src_port.to_be_bytes());
        l4.extend_from_slice(&self.dst_port.to_be_bytes());
        if self.udp {
            l4.extend_from_slice(&8u16.to_be_bytes()); // length
            l4.extend_from_slice(&[0, 0]); // checksum
        } else {
            l4.extend_from_slice(&1u32.to_be_bytes()); // seq
            let ack: u32 = if self.flags & ACK != 0 { 1 } else { 0 };
            l4.extend_from_slice(&ack.to_be_bytes());
            l4.push(5 << 4); // data offset: 20 bytes
            l4.push(self.flags);
            l4.extend_from_slice(&64_240u16.to_be_bytes()); // window
            l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        }
        let l4_proto = if self.udp { UDP } else { TCP };

        let mut frame = Vec::new();
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]); // dst MAC
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]); // src MAC
        if let Some(tpid) = self.vlan {
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&42u16.to_be_bytes()); // VLAN id 42
        }
        match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let words = self.ipv4_option_words;
                let ihl = self.ihl.unwrap_or(5 + words);
                let total = 20 + 4 * words as usize + l4.len();
                frame.push(0x40 | (ihl & 0x0f));
                frame.push(0); // DSCP/ECN
                frame.extend_from_slice(&(total as u16).to_be_bytes());
                frame.extend_from_slice(&0x1234u16.to_be_bytes()); // id
                let frag: u16 = match self.fragment {
                    None => 0x4000,    // DF, the usual SYN
                    Some(0) => 0x2000, // MF: the first of several
                    Some(offset) => offset & 0x1fff,
                };
                frame.extend_from_slice(&frag.to_be_bytes());
                frame.push(64); // TTL
                frame.push(l4_proto);
                frame.extend_from_slice(&[0, 0]); // checksum
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                // NOP options, then end-of-list in the last byte.
                for i in 0..4 * words as usize {
                    frame.push(if i + 1 == 4 * words as usize { 0 } else { 1 });
                }
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                frame.extend_from_slice(&[0x60, 0, 0, 0]);
                let payload = 8 * self.v6_ext.len() + l4.len();
                frame.extend_from_slice(&(payload as u16).to_be_bytes());
                frame.push(self.v6_ext.first().copied().unwrap_or(l4_proto));
                frame.push(64); // hop limit
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                for (i, kind) in self.v6_ext.iter().enumerate() {
                    let next = self.v6_ext.get(i + 1).copied().unwrap_or(l4_proto);
                    frame.push(next);
                    if *kind == FRAGMENT {
                        frame.push(0); // reserved
                        let offset = self.fragment.unwrap_or(0);
                        let more = u16::from(offset == 0);
                        frame.extend_from_slice(&((offset << 3) | more).to_be_bytes());
                        frame.extend_from_slice(&0x1234_5678u32.to_be_bytes());
                    } else {
                        frame.push(0); // length: (0 + 1) * 8 bytes
                        frame.extend_from_slice(&[1, 4, 0, 0, 0, 0]); // PadN
                    }
                }
            }
            _ => unreachable!("both addresses come from the same family"),
        }
        frame.extend_from_slice(&l4);
        if self.ip_only {
            assert!(self.vlan.is_none(), "a VLAN tag needs an Ethernet header");
            frame.drain(..14);
        }
        frame
    }
}
