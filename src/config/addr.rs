//! Which addresses may be a backend. One rule set for every way a backend arrives: the config
//! file, the registration API and a provider's reply. Pure: it is told which addresses headroom
//! itself listens on, and never looks at the network.

use std::net::{IpAddr, SocketAddr};

/// Why an address cannot be a backend. The text names the rule, as answers and logs show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddrRule {
    #[error("port 0 is not a port a backend can listen on")]
    PortZero,
    #[error("an unspecified address (0.0.0.0, ::) is not a backend")]
    Unspecified,
    #[error("a broadcast address is not a backend")]
    Broadcast,
    #[error("a multicast address is not a backend")]
    Multicast,
    #[error(
        "a link-local address (169.254.0.0/16, fe80::/10) is refused unless [admin] allow_link_local_backends = true"
    )]
    LinkLocal,
    #[error("headroom itself listens on this address (a backend there would loop back into headroom)")]
    Own,
}

impl AddrRule {
    /// A short stable name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PortZero => "port_zero",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Multicast => "multicast",
            Self::LinkLocal => "link_local",
            Self::Own => "own_listener",
        }
    }
}

/// What the rules need to know beyond the address.
#[derive(Debug, Clone, Default)]
pub struct AddrPolicy {
    /// Addresses headroom listens on (data and admin); an unspecified IP stands for every local
    /// address on that port.
    pub own: Vec<SocketAddr>,
    /// `[admin] allow_link_local_backends`.
    pub allow_link_local: bool,
}

impl AddrPolicy {
    /// Checks `addr` against every rule.
    pub fn check(&self, addr: SocketAddr) -> Result<(), AddrRule> {
        if addr.port() == 0 {
            return Err(AddrRule::PortZero);
        }
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() {
            return Err(AddrRule::Unspecified);
        }
        if ip.is_multicast() {
            return Err(AddrRule::Multicast);
        }
        match ip {
            IpAddr::V4(v4) if v4.is_broadcast() => return Err(AddrRule::Broadcast),
            IpAddr::V4(v4) if v4.is_link_local() && !self.allow_link_local => return Err(AddrRule::LinkLocal),
            // fe80::/10 (`Ipv6Addr::is_unicast_link_local` is stable only from Rust 1.84).
            IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 && !self.allow_link_local => {
                return Err(AddrRule::LinkLocal)
            }
            _ => {}
        }
        if self.own.iter().any(|own| is_same_listener(*own, ip, addr.port())) {
            return Err(AddrRule::Own);
        }
        Ok(())
    }
}

/// Whether a connection to `ip:port` would reach the listener bound at `own`.
fn is_same_listener(own: SocketAddr, ip: IpAddr, port: u16) -> bool {
    if own.port() != port {
        return false;
    }
    let own_ip = own.ip().to_canonical();
    // A wildcard listener takes every local address; loopback is surely local.
    own_ip == ip || (own_ip.is_unspecified() && ip.is_loopback())
}

/// Parses `ip:port`, or resolves `host:port` once.
pub(super) fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    if !text.contains(':') {
        return Err(format!("{text:?} needs a port, e.g. \"127.0.0.1:9001\""));
    }
    match std::net::ToSocketAddrs::to_socket_addrs(text) {
        Ok(mut it) => it.next().ok_or_else(|| format!("{text:?} resolves to no address")),
        Err(e) => Err(format!("invalid address {text:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &AddrPolicy, text: &str) -> Result<(), AddrRule> {
        policy.check(text.parse().unwrap())
    }

    #[test]
    fn the_addresses_the_probe_registered_are_refused_by_name() {
        let p = AddrPolicy { own: vec!["127.0.0.1:9901".parse().unwrap()], allow_link_local: false };
        assert_eq!(check(&p, "169.254.169.254:80"), Err(AddrRule::LinkLocal));
        assert_eq!(check(&p, "[fe80::1]:80"), Err(AddrRule::LinkLocal));
        assert_eq!(check(&p, "0.0.0.0:9901"), Err(AddrRule::Unspecified));
        assert_eq!(check(&p, "[::]:9901"), Err(AddrRule::Unspecified));
        assert_eq!(check(&p, "255.255.255.255:80"), Err(AddrRule::Broadcast));
        assert_eq!(check(&p, "224.0.0.1:80"), Err(AddrRule::Multicast));
        assert_eq!(check(&p, "[ff02::1]:80"), Err(AddrRule::Multicast));
        assert_eq!(check(&p, "127.0.0.1:0"), Err(AddrRule::PortZero));
        assert_eq!(check(&p, "127.0.0.1:9901"), Err(AddrRule::Own));
        assert_eq!(check(&p, "[::ffff:127.0.0.1]:9901"), Err(AddrRule::Own));
        assert_eq!(check(&p, "127.0.0.1:9902"), Ok(()));
        assert_eq!(check(&p, "10.0.0.7:9901"), Ok(()));
    }

    #[test]
    fn link_local_is_allowed_when_asked_and_wildcard_listeners_cover_loopback() {
        let p = AddrPolicy { own: vec!["0.0.0.0:8080".parse().unwrap()], allow_link_local: true };
        assert_eq!(check(&p, "169.254.1.2:8000"), Ok(()));
        assert_eq!(check(&p, "127.0.0.1:8080"), Err(AddrRule::Own));
        assert_eq!(check(&p, "[::1]:8080"), Err(AddrRule::Own));
        assert_eq!(check(&p, "10.1.2.3:8080"), Ok(()), "another machine's port 8080 is not ours to know");
    }
}
