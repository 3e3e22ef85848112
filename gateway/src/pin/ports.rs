//! tollgate's listener ports: which ones the bind programs keep from agent
//! cgroups, and whether the kernel could still hand one out to an agent on
//! its own.
//!
//! The bind programs see the port a process asks for. A process that asks
//! for none (bind to port 0, listen or connect without bind) gets a port
//! the kernel picks from `net.ipv4.ip_local_port_range`, minus
//! `net.ipv4.ip_local_reserved_ports`, after every hook. A listener port
//! in that range could thus be taken while tollgate is down by an agent
//! that keeps asking for any port until it gets that one.

use std::{collections::BTreeSet, fs};

use tracing::warn;

use super::Protected;

const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ports of the listeners of `protected`, each once. Port 0 is left
/// out: it is no listener's port, and in the map it would refuse every
/// bind to "any free port".
pub fn listener_ports(protected: &[Protected]) -> BTreeSet<u16> {
    protected
        .iter()
        .map(|p| p.listener.port())
        .filter(|&port| port != 0)
        .collect()
}

/// The ports no agent may bind: every listener's, and every protected
/// target's. An agent holding the port of a target on this host while the
/// database is down would be where tollgate connects next, and be handed
/// tollgate's login to the target (a cleartext or MD5 password, by the
/// server's method); binding `0.0.0.0:PORT` takes the port on every local
/// address at once, loopback or not.
///
/// Every target's port, not only those of targets whose address is this
/// host's: which addresses are local changes while the pins stay (DHCP, a
/// floating address moved onto the host, a bridge or container network
/// made after tollgate started), and the bind programs cannot ask. What
/// this costs is that agents cannot listen on a remote target's port
/// number either.
pub fn guarded_ports(protected: &[Protected]) -> BTreeSet<u16> {
    let target_ports = protected
        .iter()
        .map(|p| p.address.port())
        .filter(|&port| port != 0);
    listener_ports(protected)
        .into_iter()
        .chain(target_ports)
        .collect()
}

/// `ip_local_port_range`: "LOW<whitespace>HIGH".
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut words = text.split_whitespace();
    let low = words.next()?.parse().ok()?;
    let high = words.next()?.parse().ok()?;
    (words.next().is_none() && low <= high).then_some((low, high))
}

/// `ip_local_reserved_ports`: comma separated ports and LOW-HIGH ranges,
/// empty when none is reserved.
pub fn parse_reserved_ports(text: &str) -> Option<Vec<(u16, u16)>> {
    text.trim()
        .split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let item = item.trim();
            let (low, high) = match item.split_once('-') {
                Some((low, high)) => (low.trim().parse().ok()?, high.trim().parse().ok()?),
                None => {
                    let port = item.parse().ok()?;
                    (port, port)
                }
            };
            (low <= high).then_some((low, high))
        })
        .collect()
}

/// The ports of `ports` the kernel may pick by itself: inside `range` and
/// not reserved.
pub fn handed_out_by_the_kernel(
    ports: &BTreeSet<u16>,
    range: (u16, u16),
    reserved: &[(u16, u16)],
) -> Vec<u16> {
    ports
        .iter()
        .copied()
        .filter(|port| (range.0..=range.1).contains(port))
        .filter(|port| !reserved.iter().any(|(lo, hi)| (lo..=hi).contains(&port)))
        .collect()
}

/// Warns about guarded ports (listeners', targets') the kernel may hand
/// out by itself (see the module's comment): an agent given a local
/// target's port while the database is down would be handed tollgate's
/// login to it. A warning, not a refusal: the bind programs still
/// stop every agent that names the port, and which ports the host
/// reserves is the operator's decision (docs/pinning.md).
pub fn warn_if_handed_out_by_the_kernel(ports: &BTreeSet<u16>) {
    let range = fs::read_to_string(PORT_RANGE)
        .ok()
        .and_then(|text| parse_port_range(&text));
    let reserved = fs::read_to_string(RESERVED_PORTS)
        .ok()
        .and_then(|text| parse_reserved_ports(&text));
    let (Some(range), Some(reserved)) = (range, reserved) else {
        warn!(
            "cannot read {PORT_RANGE} or {RESERVED_PORTS}: not checking whether the kernel may \
             hand a listener port to an agent that asks for any port"
        );
        return;
    };
    let exposed = handed_out_by_the_kernel(ports, range, &reserved);
    if !exposed.is_empty() {
        let list = exposed
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        warn!(
            ports = %list,
            "listener, target or identity provider ports inside the kernel's ephemeral range \
             {}-{} and not reserved: an agent asking for any free port could be given one of \
             them (a listener's while tollgate is down, a local target's while the database is, \
             and then tollgate's login to it, a local identity provider's while it is down); \
             add them to net.ipv4.ip_local_reserved_ports (docs/pinning.md)",
            range.0,
            range.1
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn protected(listeners: &[&str]) -> Vec<Protected> {
        listeners
            .iter()
            .enumerate()
            .map(|(i, listener)| Protected {
                address: format!("10.0.0.{}:5432", i + 1).parse().unwrap(),
                listener: listener.parse().unwrap(),
            })
            .collect()
    }

    #[test]
    fn listener_ports_are_each_port_once_and_never_zero() {
        let ports = listener_ports(&protected(&[
            "127.0.0.1:15432",
            "127.0.0.2:15432",
            "127.0.0.1:15433",
            "127.0.0.1:0",
        ]));
        assert_eq!(ports.into_iter().collect::<Vec<_>>(), [15432, 15433]);
    }

    #[test]
    fn every_targets_port_is_guarded_with_the_listeners() {
        let mut targets = protected(&["127.0.0.1:15432", "127.0.0.1:15433"]);
        targets[1].address = "127.0.0.1:5433".parse().unwrap();
        targets.push(Protected {
            address: "[::1]:5434".parse().unwrap(),
            listener: "127.0.0.1:15434".parse().unwrap(),
        });
        // This host's LAN address, or another host's: guarded alike.
        targets.push(Protected {
            address: "192.0.2.7:5435".parse().unwrap(),
            listener: "127.0.0.1:15435".parse().unwrap(),
        });
        targets.push(Protected {
            address: "10.0.0.9:0".parse().unwrap(),
            listener: "127.0.0.1:15436".parse().unwrap(),
        });
        let guarded = guarded_ports(&targets);
        // 10.0.0.1:5432 is guarded too; port 0 never is (it would refuse
        // every bind to "any free port").
        assert_eq!(
            guarded.into_iter().collect::<Vec<_>>(),
            [5432, 5433, 5434, 5435, 15432, 15433, 15434, 15435, 15436]
        );
    }

    #[test]
    fn the_kernel_files_parse_or_are_refused() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_reserved_ports("\n"), Some(vec![]));
        assert_eq!(
            parse_reserved_ports("15432,40000-40010\n"),
            Some(vec![(15432, 15432), (40000, 40010)])
        );
        assert_eq!(parse_reserved_ports("40010-40000"), None);
        assert_eq!(parse_reserved_ports("http"), None);
    }

    #[test]
    fn only_unreserved_ports_inside_the_range_are_exposed() {
        let ports: BTreeSet<u16> = [15432, 40000, 40005, 50000, 61000].into();
        assert_eq!(
            handed_out_by_the_kernel(&ports, (32768, 60999), &[(40000, 40010)]),
            [50000]
        );
        assert_eq!(
            handed_out_by_the_kernel(&ports, (32768, 60999), &[]),
            [40000, 40005, 50000]
        );
        assert!(handed_out_by_the_kernel(&ports, (1024, 2000), &[]).is_empty());
    }
}
