//! Which targets were protected when: each start of the daemon records its
//! protected targets (the `config` record), and a target an operator
//! removed is no longer protected after the start that removed it. A
//! connection is judged against the targets in force at its time, not
//! against every target ever configured, so a host that stops protecting
//! a server does not fail verification for every later direct connection
//! to it.
//!
//! A start replaces the kernel's redirect map before it writes its record
//! (it notes when it began, `installing_since_ms`). From then until the
//! record, either set may be the kernel's: both count, so a restart never
//! opens a gap in which neither does. Before the first record, the first
//! record's targets count (its probes ran before it was written).

use std::{collections::BTreeMap, net::SocketAddr};

use serde::Serialize;

use super::ConfigSnapshot;
use crate::pin::normalise;

/// The protected targets of one `config` record.
#[derive(Debug, Clone)]
struct Period {
    /// When the daemon began to install these targets; from then on they
    /// may be the kernel's.
    installing_since: i64,
    /// When its record was written; from then on the previous record's
    /// targets are no longer the kernel's.
    recorded_at: i64,
    targets: BTreeMap<SocketAddr, String>,
}

/// A change in what was protected, between one `config` record and the
/// next: an auditor reads a removal as a decision someone made, at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TargetChange {
    /// The record that made the change (Unix ms).
    pub time_ms: i64,
    /// "added" or "removed".
    pub change: &'static str,
    /// `name address`.
    pub target: String,
}

/// The protected targets of every `config` record of a stream, by time.
#[derive(Debug, Clone, Default)]
pub struct TargetsInForce {
    periods: Vec<Period>,
}

impl TargetsInForce {
    /// From each config record's time and snapshot, in any order.
    pub fn new<'a>(records: impl IntoIterator<Item = (i64, &'a ConfigSnapshot)>) -> Self {
        let mut periods: Vec<Period> = records
            .into_iter()
            .map(|(recorded_at, snapshot)| Period {
                // A record from before the time was noted: its targets
                // count from the record before it (set below), which is
                // what an older verify did for every target.
                installing_since: snapshot.installing_since_ms.unwrap_or(i64::MIN),
                recorded_at,
                targets: snapshot
                    .protected_targets
                    .iter()
                    .map(|t| (normalise(t.address), t.name.clone()))
                    .collect(),
            })
            .collect();
        periods.sort_by_key(|p| p.recorded_at);
        for i in 1..periods.len() {
            let previous = periods[i - 1].recorded_at;
            let period = &mut periods[i];
            period.installing_since = period
                .installing_since
                .max(previous)
                .min(period.recorded_at);
        }
        TargetsInForce { periods }
    }

    /// The name of the protected target at `destination` at `time`, if it
    /// was one then.
    pub fn at(&self, time: i64, destination: SocketAddr) -> Option<&str> {
        // How many records were written at or before `time`: the last of
        // them is in force, and the next one too once it began installing.
        let written = self.periods.partition_point(|p| p.recorded_at <= time);
        let in_force = written.checked_sub(1).map(|i| &self.periods[i]);
        let installing = self
            .periods
            .get(written)
            .filter(|next| in_force.is_none() || next.installing_since <= time);
        [in_force, installing]
            .into_iter()
            .flatten()
            .find_map(|p| p.targets.get(&destination))
            .map(String::as_str)
    }

    /// Every target any record names, with the name it had last.
    pub fn ever(&self) -> BTreeMap<SocketAddr, String> {
        self.periods
            .iter()
            .flat_map(|p| p.targets.iter().map(|(a, n)| (*a, n.clone())))
            .collect()
    }

    /// What each record added to or removed from the one before it, for
    /// records written within `in_window`.
    pub fn changes(&self, in_window: impl Fn(i64) -> bool) -> Vec<TargetChange> {
        let mut out = Vec::new();
        for pair in self.periods.windows(2) {
            let (before, after) = (&pair[0], &pair[1]);
            if !in_window(after.recorded_at) {
                continue;
            }
            let named = |a: &SocketAddr, n: &String| format!("{n} {a}");
            for (address, name) in &after.targets {
                if !before.targets.contains_key(address) {
                    out.push(TargetChange {
                        time_ms: after.recorded_at,
                        change: "added",
                        target: named(address, name),
                    });
                }
            }
            for (address, name) in &before.targets {
                if !after.targets.contains_key(address) {
                    out.push(TargetChange {
                        time_ms: after.recorded_at,
                        change: "removed",
                        target: named(address, name),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evidence::ProtectedTarget;

    const ORDERS: &str = "10.0.0.5:5432";
    const BILLING: &str = "10.0.0.6:5432";

    fn snapshot(targets: &[(&str, &str)], installing_since_ms: Option<i64>) -> ConfigSnapshot {
        ConfigSnapshot {
            protected_targets: targets
                .iter()
                .map(|(name, address)| ProtectedTarget {
                    name: (*name).into(),
                    address: address.parse().unwrap(),
                    listen: "127.0.0.1:15432".parse().unwrap(),
                })
                .collect(),
            agent_cgroups: Vec::new(),
            gateway_pid: 1,
            gateway_cgroup_id: 1,
            egress_default_deny: false,
            boot_id: String::new(),
            booted_at_ms: None,
            installing_since_ms,
        }
    }

    fn protected(targets: &TargetsInForce, time: i64, address: &str) -> bool {
        targets.at(time, address.parse().unwrap()).is_some()
    }

    /// orders-db protected from the start at 1 000, billing-db added and
    /// orders-db removed by the start that began installing at 4 900 and
    /// wrote its record at 5 000.
    fn removal_at_5000() -> (ConfigSnapshot, ConfigSnapshot) {
        (
            snapshot(&[("orders-db", ORDERS)], Some(990)),
            snapshot(&[("billing-db", BILLING)], Some(4_900)),
        )
    }

    #[test]
    fn a_removed_target_is_protected_until_the_start_that_removed_it() {
        let (first, second) = removal_at_5000();
        let targets = TargetsInForce::new([(5_000, &second), (1_000, &first)]);
        // Before and after the first record (its probes ran before it).
        assert!(protected(&targets, 500, ORDERS));
        assert!(protected(&targets, 3_000, ORDERS));
        assert!(!protected(&targets, 3_000, BILLING));
        // While the second start installs its targets, both count.
        assert!(protected(&targets, 4_950, ORDERS));
        assert!(protected(&targets, 4_950, BILLING));
        // From its record on, only its own.
        assert!(protected(&targets, 5_000, BILLING));
        assert!(!protected(&targets, 5_000, ORDERS));
        assert!(!protected(&targets, 90_000, ORDERS));
        assert_eq!(
            targets.at(90_000, BILLING.parse().unwrap()),
            Some("billing-db")
        );
    }

    #[test]
    fn a_record_without_its_install_time_shares_the_interval_before_it() {
        let (first, mut second) = removal_at_5000();
        second.installing_since_ms = None;
        let targets = TargetsInForce::new([(1_000, &first), (5_000, &second)]);
        // Conservative: the added target counts from the previous record.
        assert!(protected(&targets, 1_500, BILLING));
        assert!(protected(&targets, 1_500, ORDERS));
        assert!(!protected(&targets, 5_001, ORDERS));
    }

    #[test]
    fn an_install_time_is_kept_between_its_neighbours() {
        // A clock step could date the install before the previous record,
        // or after its own: neither widens the shared interval past them.
        let (first, mut second) = removal_at_5000();
        second.installing_since_ms = Some(-7);
        let targets = TargetsInForce::new([(1_000, &first), (5_000, &second)]);
        assert!(!protected(&targets, 500, BILLING));
        assert!(protected(&targets, 1_000, BILLING));
        second.installing_since_ms = Some(9_000);
        let targets = TargetsInForce::new([(1_000, &first), (5_000, &second)]);
        assert!(!protected(&targets, 4_999, BILLING));
        assert!(protected(&targets, 5_000, BILLING));
    }

    #[test]
    fn changes_name_what_each_start_added_and_removed() {
        let (first, second) = removal_at_5000();
        let targets = TargetsInForce::new([(1_000, &first), (5_000, &second), (8_000, &second)]);
        assert_eq!(
            targets.changes(|_| true),
            [
                TargetChange {
                    time_ms: 5_000,
                    change: "added",
                    target: format!("billing-db {BILLING}"),
                },
                TargetChange {
                    time_ms: 5_000,
                    change: "removed",
                    target: format!("orders-db {ORDERS}"),
                },
            ]
        );
        assert!(targets.changes(|t| t > 5_000).is_empty());
        assert_eq!(targets.ever().len(), 2);
    }

    #[test]
    fn no_record_protects_nothing() {
        let targets = TargetsInForce::new([]);
        assert!(!protected(&targets, 0, ORDERS));
        assert!(targets.changes(|_| true).is_empty());
    }
}
