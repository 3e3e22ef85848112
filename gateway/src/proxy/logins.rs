//! Connections still logging in, counted per source. A connection takes
//! one of its target's `max_connections` slots when it is accepted, and a
//! client may stall at its startup packet or its password for the whole
//! login deadline: without a bound per source, one agent opening
//! connections that never log in could hold every slot and keep every
//! other agent out. Once fewer than a quarter of the slots are free, a
//! source (the agent cgroup the kernel saw, or for a connection that did
//! not come through the redirect, its peer address, every loopback
//! address as one) that already has a quarter of them logging in is
//! refused another, as a connection past the target's limit is: the last
//! quarter stays for the other sources. Before that, nobody is held back
//! (a pool opening many connections at once on a target with room).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::Connection;

/// The fewest connections a source may have logging in at once, however
/// small the target's `max_connections` (then all of them).
const MIN_PER_SOURCE: usize = 16;

/// Where a connection comes from, as far as the login bound goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LoginSource {
    /// The cgroup the kernel saw the connection come from.
    Cgroup(u64),
    /// The peer address, when the connection did not come through the
    /// redirect.
    Address(IpAddr),
}

impl LoginSource {
    pub fn of(connection: &Connection) -> Self {
        match &connection.origin {
            Some(origin) => LoginSource::Cgroup(origin.cgroup_id),
            None => Self::address(connection.peer.ip()),
        }
    }

    /// Any local process may bind any address of 127.0.0.0/8 (or ::1):
    /// every loopback address is one source, or one agent would be as many
    /// as it likes.
    fn address(peer: IpAddr) -> Self {
        LoginSource::Address(source_address(peer))
    }
}

/// A peer address as one source: an IPv4-mapped address as the IPv4
/// one, and every loopback address as 127.0.0.1 (any local process may
/// bind any of them).
pub fn source_address(peer: IpAddr) -> IpAddr {
    let peer = peer.to_canonical();
    if peer.is_loopback() {
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
    } else {
        peer
    }
}

/// One target's count of connections logging in, per source.
#[derive(Debug)]
pub struct LoginGate {
    per_source: usize,
    logging_in: Mutex<HashMap<LoginSource, usize>>,
}

impl LoginGate {
    pub fn for_target(max_connections: usize) -> Arc<Self> {
        Arc::new(LoginGate {
            per_source: (max_connections / 4).max(MIN_PER_SOURCE),
            logging_in: Mutex::new(HashMap::new()),
        })
    }

    /// How many connections one source may have logging in at once.
    pub fn per_source(&self) -> usize {
        self.per_source
    }

    /// Counts a connection of `source` as logging in, until the permit
    /// is dropped; `None` when the target is short of slots (`free`, after
    /// this connection's, fewer than a source's bound) and the source is at
    /// its bound.
    pub fn enter(self: &Arc<Self>, source: LoginSource, free: usize) -> Option<LoginPermit> {
        let mut counts = self.counts();
        let count = counts.entry(source.clone()).or_insert(0);
        if free < self.per_source && *count >= self.per_source {
            return None;
        }
        *count += 1;
        Some(LoginPermit {
            gate: self.clone(),
            source,
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<LoginSource, usize>> {
        // A count is an integer: a panic elsewhere cannot leave it torn.
        self.logging_in
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A connection counted as logging in; dropped when its login ends,
/// whatever the outcome (see `Connection::logged_in`).
#[derive(Debug)]
pub struct LoginPermit {
    gate: Arc<LoginGate>,
    source: LoginSource,
}

impl Drop for LoginPermit {
    fn drop(&mut self) {
        let mut counts = self.gate.counts();
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_may_have_a_quarter_of_the_slots_logging_in_when_slots_run_short() {
        assert_eq!(LoginGate::for_target(1000).per_source(), 250);
        assert_eq!(LoginGate::for_target(10).per_source(), 16);
        let gate = LoginGate::for_target(64);
        let agent = LoginSource::Cgroup(77);
        // With room, a source is not held back: 48 of 64.
        let held: Vec<LoginPermit> = (0..48)
            .map(|i| gate.enter(agent.clone(), 63 - i).expect("room"))
            .collect();
        // The last quarter: past its bound, refused.
        assert!(gate.enter(agent.clone(), 15).is_none(), "past the bound");
        // Another source is not held back.
        let other = gate.enter(LoginSource::Cgroup(78), 15);
        assert!(other.is_some());
        // A login that ends makes room, and the count goes when empty.
        let logging_in = gate.enter(LoginSource::Cgroup(79), 14).expect("room");
        drop(logging_in);
        drop(held);
        drop(other);
        assert!(gate.counts().is_empty());
        assert!(gate.enter(agent, 0).is_some());
    }

    #[test]
    fn every_loopback_address_is_one_source() {
        let from = |peer: &str| LoginSource::address(peer.parse().unwrap());
        assert_eq!(from("127.0.0.2"), from("127.0.0.1"));
        assert_eq!(from("127.9.9.9"), from("::1"));
        assert_eq!(from("::ffff:127.0.0.5"), from("127.0.0.1"));
        assert_ne!(from("10.0.0.9"), from("127.0.0.1"));
        assert_eq!(from("::ffff:10.0.0.9"), from("10.0.0.9"));
    }
}
