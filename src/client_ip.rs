//! Who the client is. The peer address is the truth unless the peer is a trusted proxy; only
//! then is `X-Forwarded-For` read, right to left, skipping trusted hops, and the first untrusted
//! address is the client. A malformed entry makes the client unknown (`None`), which fails any
//! `allowed_cidrs` check: never guess in the caller's favour.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::snapshot::canonical_ip;

/// `xff`: every `X-Forwarded-For` value in order of appearance.
pub fn client_ip<'a>(
    peer: IpAddr,
    xff: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = canonical_ip(peer);
    if !is_trusted(peer, trusted) {
        return Some(peer);
    }
    let mut last = peer;
    for value in xff.rev() {
        let text = std::str::from_utf8(value).ok()?;
        for part in text.rsplit(',') {
            let ip = canonical_ip(parse_entry(part.trim())?);
            if !is_trusted(ip, trusted) {
                return Some(ip);
            }
            last = ip;
        }
    }
    // Every hop was trusted: the leftmost is as far as the chain goes.
    Some(last)
}

pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// `203.0.113.7`, `2001:db8::1`, `[2001:db8::1]`, `[2001:db8::1]:443` or `203.0.113.7:443`.
fn parse_entry(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inner, _) = rest.split_once(']')?;
        return inner.parse().ok();
    }
    s.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn table() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            // An untrusted peer's header is ignored.
            ("203.0.113.9", &["1.2.3.4"], Some("203.0.113.9")),
            // A trusted peer: the rightmost untrusted entry.
            ("10.0.0.1", &["1.2.3.4, 198.51.100.7"], Some("198.51.100.7")),
            (
                "10.0.0.1",
                &["1.2.3.4", "198.51.100.7, 10.0.0.2"],
                Some("198.51.100.7"),
            ),
            ("10.0.0.1", &[], Some("10.0.0.1")),
            ("10.0.0.1", &["10.0.0.5"], Some("10.0.0.5")),
            ("10.0.0.1", &["[2001:db8::1]:443"], Some("2001:db8::1")),
            ("10.0.0.1", &["198.51.100.7:8080"], Some("198.51.100.7")),
            ("10.0.0.1", &["garbage"], None),
            ("10.0.0.1", &["1.2.3.4, , 10.0.0.3"], None),
            ("::ffff:10.0.0.1", &["198.51.100.7"], Some("198.51.100.7")),
            ("::1", &["::ffff:198.51.100.7"], Some("198.51.100.7")),
        ];
        for (peer, xff, want) in cases {
            let got = client_ip(ip(peer), xff.iter().map(|s| s.as_bytes()), &trusted);
            assert_eq!(got, want.map(ip), "peer {peer} xff {xff:?}");
        }
    }
}
