//! IP allow-lists and the real client behind reverse proxies: pure functions over addresses and header
//! values.

use std::fmt;
use std::net::IpAddr;

/// An address block, `203.0.113.0/24` or `2001:db8::/32`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let bad = || {
            format!("{text:?} is not an address or a block such as 203.0.113.0/24 or 2001:db8::/32")
        };
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let written: IpAddr = address.trim().parse().map_err(|_| bad())?;
        let bits = if written.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= bits)
                .ok_or_else(bad)?,
            None => bits,
        };
        // An IPv4-mapped block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps, as clients are compared
        // in their IPv4 form; one wider than the mapped range stays an IPv6 block.
        let (network, prefix) = match canonical(written) {
            v4 @ IpAddr::V4(_) if written.is_ipv6() && prefix >= 96 => (v4, prefix - 96),
            IpAddr::V4(_) if written.is_ipv6() => (written, prefix),
            network => (network, prefix),
        };
        if mask(network, prefix) != network {
            return Err(format!(
                "{text:?} has host bits set: write {}/{prefix}",
                mask(network, prefix)
            ));
        }
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        address.is_ipv4() == self.network.is_ipv4() && mask(address, self.prefix) == self.network
    }
}

/// Whether `blocks` together hold every IPv4 address or every IPv6 address (`0.0.0.0/0`, or the two
/// halves `0.0.0.0/1` and `128.0.0.0/1`, ...): an allow-list that admits anyone who can reach the daemon.
pub fn cover_everyone(blocks: &[Cidr]) -> bool {
    [(true, 32u32), (false, 128u32)]
        .into_iter()
        .any(|(v4, bits)| {
            let mut ranges: Vec<(u128, u128)> = blocks
                .iter()
                .filter(|c| c.network.is_ipv4() == v4)
                .map(|c| {
                    let start = match c.network {
                        IpAddr::V4(a) => u128::from(u32::from(a)),
                        IpAddr::V6(a) => u128::from(a),
                    };
                    let host_bits = bits - u32::from(c.prefix);
                    let hosts = u128::MAX.checked_shr(128 - host_bits).unwrap_or(0);
                    (start, start | hosts)
                })
                .collect();
            ranges.sort_unstable();
            let top = if v4 { u128::from(u32::MAX) } else { u128::MAX };
            let mut next = 0u128;
            for (start, last) in ranges {
                if start > next {
                    return false;
                }
                if last >= top {
                    return true;
                }
                next = next.max(last + 1);
            }
            false
        })
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// An IPv4 address in IPv6 clothing (`::ffff:192.0.2.1`, what a dual-stack socket reports) is the IPv4
/// address, so one allow-list entry covers both.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

fn mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = if prefix == 0 {
                0
            } else {
                bits & (u32::MAX << (32 - u32::from(prefix)))
            };
            IpAddr::V4(kept.into())
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = if prefix == 0 {
                0
            } else {
                bits & (u128::MAX << (128 - u32::from(prefix)))
            };
            IpAddr::V6(kept.into())
        }
    }
}

/// The peers whose `X-Forwarded-For` is believed: address blocks, and whether a peer on the unix socket
/// (a reverse proxy on this machine) is one.
#[derive(Debug, Clone, Default)]
pub struct Trusted {
    pub blocks: Vec<Cidr>,
    pub unix: bool,
}

impl Trusted {
    /// No proxy is trusted: every peer is the client.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && !self.unix
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.blocks.iter().any(|c| c.contains(ip))
    }
}

/// Why the client behind a request cannot be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// A peer on the unix socket, which `trusted_proxies` does not name (`"unix"`).
    UntrustedUnix,
    /// A trusted peer on the unix socket that sent no `X-Forwarded-For`.
    NoForwardedFor,
    /// A trusted proxy passed on an `X-Forwarded-For` entry that is not an address.
    NotAnAddress,
}

impl fmt::Display for Unknown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unknown::UntrustedUnix => {
                "the peer is on the unix socket, whose X-Forwarded-For is believed only with \"unix\" in \
                 trusted_proxies"
            }
            Unknown::NoForwardedFor => "the trusted proxy on the unix socket sent no X-Forwarded-For",
            Unknown::NotAnAddress => {
                "a trusted proxy sent an X-Forwarded-For entry that is not an address"
            }
        })
    }
}

/// The client a request really comes from; `peer` is `None` for a unix-socket peer. `X-Forwarded-For` is
/// believed only from a trusted peer: then its entries are read from the right (the hop nearest us),
/// skipping trusted proxies, and the first untrusted one is the client. From any other peer the header is
/// ignored: anyone can send one.
pub fn client(
    peer: Option<IpAddr>,
    forwarded_for: &[&str],
    trusted: &Trusted,
) -> Result<IpAddr, Unknown> {
    let mut client = match peer {
        Some(ip) if !trusted.contains(ip) => return Ok(canonical(ip)),
        Some(ip) => Some(canonical(ip)),
        None if trusted.unix => None,
        None => return Err(Unknown::UntrustedUnix),
    };
    for entry in forwarded_for.iter().rev().flat_map(|v| v.rsplit(',')) {
        if client.is_some_and(|ip| !trusted.contains(ip)) {
            break;
        }
        client = Some(canonical(
            parse_entry(entry.trim()).ok_or(Unknown::NotAnAddress)?,
        ));
    }
    client.ok_or(Unknown::NoForwardedFor)
}

/// One `X-Forwarded-For` entry: an address, perhaps with a port (`192.0.2.1:4711`, `[2001:db8::1]:80`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(is_port))
            .then(|| inside.parse().ok())
            .flatten();
    }
    let (address, port) = entry.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    address.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    fn blocks(list: &[&str]) -> Trusted {
        Trusted {
            blocks: list
                .iter()
                .map(|t| Cidr::parse(t).expect("block"))
                .collect(),
            unix: false,
        }
    }

    #[test]
    fn allow_lists_that_hold_every_address_are_told_apart() {
        let blocks = |list: &[&str]| -> Vec<Cidr> {
            list.iter()
                .map(|b| Cidr::parse(b).expect("block"))
                .collect()
        };
        for everyone in [
            &["0.0.0.0/0"][..],
            &["::/0"],
            &["0.0.0.0/1", "128.0.0.0/1"],
            &["128.0.0.0/2", "0.0.0.0/1", "192.0.0.0/2", "10.0.0.0/8"],
            &["::/1", "8000::/1", "203.0.113.0/24"],
        ] {
            assert!(cover_everyone(&blocks(everyone)), "{everyone:?}");
        }
        for some in [
            &[][..],
            &["10.0.0.0/8"],
            &["0.0.0.0/1"],
            &["0.0.0.0/1", "128.0.0.0/2", "224.0.0.0/3"],
            &["128.0.0.0/1", "0.0.0.0/2"],
            &["::/1", "0.0.0.0/1"],
            &["255.255.255.255", "0.0.0.0/1"],
        ] {
            assert!(!cover_everyone(&blocks(some)), "{some:?}");
        }
    }

    #[test]
    fn blocks_contain_what_they_should() {
        let net = Cidr::parse("203.0.113.0/24").expect("block");
        assert!(net.contains(ip("203.0.113.7")));
        assert!(
            net.contains(ip("::ffff:203.0.113.7")),
            "IPv4-mapped IPv6 is the IPv4 address"
        );
        assert!(!net.contains(ip("203.0.114.7")));
        assert!(!net.contains(ip("2001:db8::1")));
        let one = Cidr::parse("192.0.2.1").expect("address");
        assert!(one.contains(ip("192.0.2.1")) && !one.contains(ip("192.0.2.2")));
        let v6 = Cidr::parse("2001:db8::/32").expect("block");
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .expect("all")
                .contains(ip("8.8.8.8"))
        );
        assert!(Cidr::parse("::/0").expect("all").contains(ip("::1")));
        // IPv4-mapped blocks are the IPv4 blocks they map.
        let mapped = Cidr::parse("::ffff:10.0.0.0/104").expect("mapped block");
        assert_eq!(mapped, Cidr::parse("10.0.0.0/8").expect("block"));
        assert!(mapped.contains(ip("10.1.2.3")) && mapped.contains(ip("::ffff:10.1.2.3")));
        assert!(!mapped.contains(ip("11.0.0.1")));
        let every_v4 = Cidr::parse("::ffff:0:0/96").expect("the mapped range");
        assert!(every_v4.contains(ip("198.51.100.1")) && !every_v4.contains(ip("2001:db8::1")));
        assert!(
            Cidr::parse("::ffff:10.0.0.1")
                .expect("one")
                .contains(ip("10.0.0.1"))
        );
        for bad in [
            "::ffff:10.0.0.1/104",
            "",
            "203.0.113.0/33",
            "203.0.113.1/24",
            "host",
            "1.2.3.4/",
            "::/129",
            "1.2.3/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted = blocks(&["127.0.0.1/32", "10.0.0.0/8"]);
        // Straight from an untrusted peer: the header is ignored.
        assert_eq!(
            client(Some(ip("198.51.100.9")), &["203.0.113.5"], &trusted),
            Ok(ip("198.51.100.9"))
        );
        // Through one trusted proxy.
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["203.0.113.5"], &trusted),
            Ok(ip("203.0.113.5"))
        );
        // A client that forged an entry before the proxy appended the real one: the right-most untrusted wins.
        assert_eq!(
            client(
                Some(ip("127.0.0.1")),
                &["203.0.113.99, 198.51.100.1"],
                &trusted
            ),
            Ok(ip("198.51.100.1"))
        );
        // Two trusted hops, in two header fields.
        assert_eq!(
            client(
                Some(ip("127.0.0.1")),
                &["203.0.113.5", "10.1.2.3"],
                &trusted
            ),
            Ok(ip("203.0.113.5"))
        );
        // Ports and brackets.
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["203.0.113.5:4711"], &trusted),
            Ok(ip("203.0.113.5"))
        );
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["[2001:db8::1]:80"], &trusted),
            Ok(ip("2001:db8::1"))
        );
        // Only trusted hops: the left-most of them is the client.
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["10.0.0.1"], &trusted),
            Ok(ip("10.0.0.1"))
        );
        // No header from a trusted proxy: the proxy itself.
        assert_eq!(
            client(Some(ip("127.0.0.1")), &[], &trusted),
            Ok(ip("127.0.0.1"))
        );
        // Garbage from a trusted proxy: unknown, never a guess.
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["unknown"], &trusted),
            Err(Unknown::NotAnAddress)
        );
        assert_eq!(
            client(Some(ip("127.0.0.1")), &["203.0.113.5, "], &trusted),
            Err(Unknown::NotAnAddress)
        );
        // A port past 65535 is no port.
        for bad in [
            "203.0.113.5:99999",
            "[2001:db8::1]:65536",
            "203.0.113.5:+80",
        ] {
            assert_eq!(
                client(Some(ip("127.0.0.1")), &[bad], &trusted),
                Err(Unknown::NotAnAddress),
                "{bad}"
            );
        }
        // A unix-socket peer: unknown unless trusted, and then the header names the client.
        assert_eq!(
            client(None, &["203.0.113.5"], &trusted),
            Err(Unknown::UntrustedUnix)
        );
        let with_unix = Trusted {
            unix: true,
            ..trusted
        };
        assert_eq!(
            client(None, &["203.0.113.5"], &with_unix),
            Ok(ip("203.0.113.5"))
        );
        assert_eq!(client(None, &[], &with_unix), Err(Unknown::NoForwardedFor));
        // What the operator reads for the unix case says what to change.
        let why = Unknown::UntrustedUnix.to_string();
        assert!(
            why.contains("unix socket") && why.contains("\"unix\" in trusted_proxies"),
            "{why}"
        );
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn forwarded_for_parsing_never_panics_and_an_untrusted_peer_is_always_the_client(
            header in "[0-9a-f:.,\\[\\] ]{0,60}",
            a in any::<u8>(), b in any::<u8>(),
        ) {
            let trusted = blocks(&["127.0.0.0/8"]);
            let _ = client(Some(ip("127.0.0.1")), &[&header], &trusted);
            let peer = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, a, b));
            prop_assert_eq!(client(Some(peer), &[&header], &trusted), Ok(peer));
        }

        #[test]
        fn a_client_behind_trusted_hops_is_found_whatever_it_forged_before_them(
            forged in prop::collection::vec(any::<[u8; 4]>(), 0..4),
            real in any::<[u8; 4]>().prop_filter("not trusted", |o| o[0] != 10 && o[0] != 127),
            hops in prop::collection::vec(any::<[u8; 3]>(), 0..3),
        ) {
            let trusted = blocks(&["127.0.0.0/8", "10.0.0.0/8"]);
            let mut entries: Vec<String> = forged.iter().map(|o| std::net::Ipv4Addr::from(*o).to_string()).collect();
            entries.push(std::net::Ipv4Addr::from(real).to_string());
            entries.extend(hops.iter().map(|h| format!("10.{}.{}.{}", h[0], h[1], h[2])));
            let header = entries.join(", ");
            prop_assert_eq!(
                client(Some(ip("127.0.0.1")), &[&header], &trusted),
                Ok(IpAddr::V4(real.into()))
            );
        }
    }
}
