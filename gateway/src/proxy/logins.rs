//! Connections still logging in, counted per source. A connection takes
//! one of its target's `max_connections` slots when it is accepted, and a
//! client may stall at its startup packet or its password for the whole
//! login deadline: without a bound per source, one agent opening
//! connections that never log in could hold every slot and keep every
//! other agent out. Each source (the agent cgroup the kernel saw, or the
//! peer address of a connection that did not come through the redirect)
//! may have at most a quarter of the slots logging in at once; a
//! connection past that is refused as one past the target's limit is.

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
            None => LoginSource::Address(connection.peer.ip()),
        }
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
    /// is dropped; `None` when the source is at its bound.
    pub fn enter(self: &Arc<Self>, source: LoginSource) -> Option<LoginPermit> {
        let mut counts = self.counts();
        let count = counts.entry(source.clone()).or_insert(0);
        if *count >= self.per_source {
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
/// whatever the outcome.
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

/// The permit of a connection, shared by the copies of its
/// [`Connection`], and let go of once the caller is authenticated (see
/// [`Connection::logged_in`]) or the connection ends.
#[derive(Debug, Clone, Default)]
pub struct LoggingIn(Arc<Mutex<Option<LoginPermit>>>);

impl LoggingIn {
    pub fn holding(permit: LoginPermit) -> Self {
        LoggingIn(Arc::new(Mutex::new(Some(permit))))
    }

    pub(super) fn end(&self) {
        let permit = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(permit);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_may_have_a_quarter_of_the_slots_logging_in_and_no_fewer_than_sixteen() {
        assert_eq!(LoginGate::for_target(1000).per_source(), 250);
        assert_eq!(LoginGate::for_target(10).per_source(), 16);
        let gate = LoginGate::for_target(64);
        let agent = LoginSource::Cgroup(77);
        let held: Vec<LoginPermit> = (0..16)
            .map(|_| gate.enter(agent.clone()).expect("under the bound"))
            .collect();
        assert!(gate.enter(agent.clone()).is_none(), "past the bound");
        // Another source is not held back.
        let other = gate.enter(LoginSource::Cgroup(78));
        assert!(other.is_some());
        // A login that ends makes room, and the count goes when empty.
        let logging_in = LoggingIn::holding(gate.enter(LoginSource::Cgroup(79)).expect("room"));
        logging_in.end();
        drop(held);
        drop(other);
        assert!(gate.counts().is_empty());
        assert!(gate.enter(agent).is_some());
    }
}
