//! Where readiness probes may go. A probe is a request the server makes on a client's say-so,
//! so by default it never reaches link-local or cloud-metadata addresses (where credentials
//! live), and an operator can narrow probes to named networks (`--probe-networks`). The policy
//! is applied to IP literals in the URL, to every address a name resolves to (the prober's
//! resolver drops refused ones, so a name that rebinds cannot slip through), and at
//! `PUT /v1/endpoints` for literals and known metadata names. Probes follow no redirects.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// An address block, `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(text: &str) -> Result<Network, String> {
        let bad = || format!("`{text}` is not a network (e.g. 10.0.0.0/8 or fd00::/8)");
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address judged as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Refused unless an operator's `--probe-networks` names them: link-local (where cloud
/// metadata services answer) and the other well-known metadata addresses.
fn refused_by_default(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_link_local() // 169.254.0.0/16
                || v4 == Ipv4Addr::new(100, 100, 100, 200) // Alibaba Cloud metadata
                || v4.is_unspecified()
        }
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80 // fe80::/10
                || v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) // AWS IMDS (IPv6)
                || v6.is_unspecified()
        }
    }
}

/// Host names of cloud metadata services; refused whatever they resolve to.
const METADATA_HOSTS: &[&str] = &[
    "metadata",
    "metadata.google.internal",
    "metadata.goog",
    "instance-data",
    "instance-data.ec2.internal",
    "metadata.azure.com",
    "metadata.tencentyun.com",
];

/// Which addresses probes may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeNetworks {
    /// `None`: anywhere but the default-refused addresses. `Some`: only these networks.
    allowed: Option<Vec<Network>>,
}

impl ProbeNetworks {
    /// Only these networks (the default-refused addresses too, if a network names them).
    pub fn only(networks: Vec<Network>) -> ProbeNetworks {
        ProbeNetworks {
            allowed: Some(networks),
        }
    }

    /// Parses `--probe-networks`: comma-separated networks; empty means the default.
    pub fn parse_list(text: &str) -> Result<ProbeNetworks, String> {
        let networks = text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(Network::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(if networks.is_empty() {
            ProbeNetworks::default()
        } else {
            ProbeNetworks::only(networks)
        })
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        match &self.allowed {
            Some(networks) => networks.iter().any(|n| n.contains(ip)),
            None => !refused_by_default(ip),
        }
    }

    /// Whether a URL's host may be probed as far as can be told without resolving it: an IP
    /// literal by the networks, a name unless it is a metadata service's.
    pub fn allows_host(&self, host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<IpAddr>() {
            Ok(ip) => self.allows(ip),
            Err(_) => {
                let name = host.trim_end_matches('.').to_ascii_lowercase();
                !METADATA_HOSTS.contains(&name.as_str())
            }
        }
    }

    /// `allows_host` for a URL; a URL without a host is refused.
    pub fn allows_url(&self, url: &str) -> bool {
        reqwest::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(|h| self.allows_host(h)))
            .unwrap_or(false)
    }

    /// A resolver for the prober that keeps only addresses probes may reach.
    pub fn resolver(&self) -> Arc<PolicyResolver> {
        Arc::new(PolicyResolver {
            networks: self.clone(),
        })
    }
}

/// Resolves with the system resolver, dropping the addresses the policy refuses; a name left
/// with none fails to resolve, so nothing is sent.
pub struct PolicyResolver {
    networks: ProbeNetworks,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let networks = self.networks.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            if !networks.allows_host(&host) {
                return Err("refused by the probe policy".into());
            }
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| networks.allows(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err("no address the probe policy allows".into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn by_default_link_local_and_metadata_are_refused() {
        let p = ProbeNetworks::default();
        for refused in [
            "169.254.169.254",
            "fe80::1",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
        ] {
            assert!(!p.allows(ip(refused)), "{refused}");
        }
        for allowed in ["127.0.0.1", "10.1.2.3", "::1", "93.184.216.34"] {
            assert!(p.allows(ip(allowed)), "{allowed}");
        }
        assert!(!p.allows_host("metadata.google.internal."));
        assert!(p.allows_host("svc.internal"));
        assert!(!p.allows_url("http://169.254.169.254/latest/meta-data/"));
        assert!(!p.allows_url("http://[fe80::1]:80/"));
        assert!(p.allows_url("http://127.0.0.1:8080/ready"));
    }

    #[test]
    fn an_operator_list_allows_only_its_networks() {
        let p = ProbeNetworks::parse_list("10.0.0.0/8, fd00::/8,192.168.1.7").unwrap();
        assert!(p.allows(ip("10.200.0.1")));
        assert!(p.allows(ip("fd12::1")));
        assert!(p.allows(ip("192.168.1.7")));
        assert!(!p.allows(ip("192.168.1.8")));
        assert!(!p.allows(ip("127.0.0.1")));
        assert!(ProbeNetworks::parse_list("10.0.0.0/33").is_err());
        assert_eq!(
            ProbeNetworks::parse_list("").unwrap(),
            ProbeNetworks::default()
        );
    }
}
