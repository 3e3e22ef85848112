//! Which targets were protected when: each start of the daemon records its
//! protected targets (the `config` record), and a target an operator
//! removed is no longer protected after the start that removed it. A
//! connection is judged against the targets in force at its time, not
//! against every target ever configured, so a host that stops protecting
//! a server does not fail verification for every later direct connection
//! to it.
//!
//! Where the moment a set took effect is uncertain, every set that may
//! have been the kernel's counts:
//! - A start replaces the kernel's redirect map before it writes its
//!   record (it notes when it began, `installing_since_ms`): from then
//!   until the record, both its targets and the previous record's count.
//! - What the map held when a start replaced it (`replaced_targets`)
//!   counts from the previous record to this one: a start that installed
//!   its targets and failed before writing its record leaves them there.
//! - A record is found by time, and by its place in the stream where the
//!   two may disagree because a clock stepped back dated a later start
//!   before earlier records or events; events a pinned probe recorded
//!   while the daemon was down are written after the next start's record,
//!   and only their time decides. Wall-clock times are all there is to
//!   go by: a clock stepped back while the daemon runs dates the events
//!   after it before the last record's, where they are judged by the
//!   record before it, and a clock stepped forward across a restart dates
//!   the events of the downtime after the new record.
//! - Before the first record (the stream's oldest, or the oldest left by
//!   retention), every target any record names counts.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use serde::Serialize;

use super::ConfigSnapshot;
use crate::pin::normalise;

/// The name verify gives a target that only a start's `replaced_targets`
/// names: the start that installed it wrote no record.
pub const UNRECORDED_TARGET: &str = "(protected by a start without a record)";

/// The protected targets of one `config` record.
#[derive(Debug, Clone)]
struct Period {
    /// The record's place in the evidence stream.
    sequence: i64,
    /// When the daemon began to install these targets; from then on they
    /// may be the kernel's. `None` in records from before it was noted:
    /// from the previous record on.
    installing_since: Option<i64>,
    /// When its record was written; from then on the previous record's
    /// targets are no longer the kernel's.
    recorded_at: i64,
    targets: BTreeMap<SocketAddr, String>,
    /// What the kernel's map held before this start replaced it.
    replaced: BTreeSet<SocketAddr>,
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

/// The protected targets of every `config` record of a stream.
#[derive(Debug, Clone, Default)]
pub struct TargetsInForce {
    /// By `recorded_at`.
    periods: Vec<Period>,
    /// Indexes into `periods`, by `sequence`.
    by_sequence: Vec<usize>,
    /// Every target any record names, with the name it had last.
    ever: BTreeMap<SocketAddr, String>,
}

impl TargetsInForce {
    /// From each config record's time, sequence and snapshot, in any
    /// order.
    pub fn new<'a>(records: impl IntoIterator<Item = (i64, i64, &'a ConfigSnapshot)>) -> Self {
        let mut periods: Vec<Period> = records
            .into_iter()
            .map(|(recorded_at, sequence, snapshot)| Period {
                sequence,
                installing_since: snapshot.installing_since_ms,
                recorded_at,
                targets: snapshot
                    .protected_targets
                    .iter()
                    .map(|t| (normalise(t.address), t.name.clone()))
                    .collect(),
                replaced: snapshot
                    .replaced_targets
                    .iter()
                    .map(|a| normalise(*a))
                    .collect(),
            })
            .collect();
        periods.sort_by_key(|p| (p.recorded_at, p.sequence));
        let mut by_sequence: Vec<usize> = (0..periods.len()).collect();
        by_sequence.sort_by_key(|&i| periods[i].sequence);
        let ever = by_sequence
            .iter()
            .flat_map(|&i| periods[i].targets.iter().map(|(a, n)| (*a, n.clone())))
            .collect();
        TargetsInForce {
            periods,
            by_sequence,
            ever,
        }
    }

    /// The name of the protected target at `destination` for an event at
    /// `time`, written at `sequence` in the stream, if it was one then.
    pub fn at(&self, time: i64, sequence: i64, destination: SocketAddr) -> Option<&str> {
        let replaced = |period: &Period| {
            period.replaced.contains(&destination).then(|| {
                self.ever
                    .get(&destination)
                    .map_or(UNRECORDED_TARGET, String::as_str)
            })
        };
        // Before the first record: its probes ran before it was written,
        // and retention may have taken older ones.
        let first_in_stream = self.by_sequence.first().map(|&i| &self.periods[i]);
        let before_the_first = || {
            self.ever
                .get(&destination)
                .map(String::as_str)
                .or_else(|| self.periods.first().and_then(replaced))
                .or_else(|| first_in_stream.and_then(replaced))
        };
        let written_by_time = self.periods.partition_point(|p| p.recorded_at <= time);
        let Some(by_time) = written_by_time.checked_sub(1).map(|i| &self.periods[i]) else {
            return before_the_first();
        };
        // The record written last before the event in the stream (`last`):
        // - dated at or before the event too, it is in force, and a record
        //   found by time that was written before it is not (a clock
        //   stepped back dated it before an older record); the one after
        //   it in the stream may be installing;
        // - dated after the event, the event is one the probe recorded
        //   while the daemon was down (dated by the clock of the start
        //   that read it): the record found by time decides, with what
        //   `last` found in the map and was installing;
        // - when the record found by time was written after the event
        //   (the clock stepped back after `last`), both count.
        let written_before = self
            .by_sequence
            .partition_point(|&i| self.periods[i].sequence < sequence);
        let in_stream = |i: usize| self.by_sequence.get(i).map(|&i| &self.periods[i]);
        let (by_time, by_stream, next_in_stream) =
            match written_before.checked_sub(1).and_then(&in_stream) {
                Some(last) if by_time.sequence > sequence => {
                    (Some(by_time), Some(last), in_stream(written_before))
                }
                Some(last) if last.recorded_at <= time => (
                    (by_time.sequence >= last.sequence).then_some(by_time),
                    Some(last),
                    in_stream(written_before),
                ),
                Some(last) => (Some(by_time), None, Some(last)),
                None if by_time.sequence > sequence => return before_the_first(),
                None => (Some(by_time), None, None),
            };
        // The next record, by time and in the stream, while it installs its
        // targets; and what the map held when it replaced it, from the
        // record before it on.
        let next = self.periods.get(written_by_time);
        let installing = |n: &&Period| n.installing_since.is_none_or(|since| since <= time);
        [
            by_time,
            by_stream,
            next.filter(installing),
            next_in_stream.filter(installing),
        ]
        .into_iter()
        .flatten()
        .find_map(|p| p.targets.get(&destination))
        .map(String::as_str)
        .or_else(|| next.and_then(replaced))
        .or_else(|| next_in_stream.and_then(replaced))
    }

    /// Every target any record names, with the name it had last.
    pub fn ever(&self) -> &BTreeMap<SocketAddr, String> {
        &self.ever
    }

    /// The targets in force at some moment from `from` to `to` (either
    /// open), by time alone (where a clock step makes time and the
    /// stream's order disagree, [`Self::at`] reads both): a record's
    /// targets from its install to the next record, what it replaced from
    /// the record before it, and every target before the first record.
    pub fn during(&self, from: Option<i64>, to: Option<i64>) -> BTreeMap<SocketAddr, String> {
        // Whether [start, end) meets the window (`None`: unbounded).
        let meets = |start: Option<i64>, end: Option<i64>| {
            start.is_none_or(|start| to.is_none_or(|to| start <= to))
                && end.is_none_or(|end| from.is_none_or(|from| end > from))
        };
        let first_record = self.periods.first().map(|p| p.recorded_at);
        let mut out = BTreeMap::new();
        if self.periods.is_empty() || meets(None, first_record) {
            out.extend(self.ever.iter().map(|(a, n)| (*a, n.clone())));
        }
        for (i, period) in self.periods.iter().enumerate() {
            let previous = i.checked_sub(1).map(|j| self.periods[j].recorded_at);
            let next = self.periods.get(i + 1).map(|p| p.recorded_at);
            // As `at` reads it: from the previous record at the earliest.
            let installing = match (period.installing_since, previous) {
                (Some(since), previous) => Some(
                    previous
                        .map_or(since, |previous| since.max(previous))
                        .min(period.recorded_at),
                ),
                (None, previous) => previous,
            };
            if meets(installing, next) {
                out.extend(period.targets.iter().map(|(a, n)| (*a, n.clone())));
            }
            if meets(previous, Some(period.recorded_at)) {
                out.extend(period.replaced.iter().map(|a| {
                    let name = self.ever.get(a).map_or(UNRECORDED_TARGET, String::as_str);
                    (*a, name.to_owned())
                }));
            }
        }
        out
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
            // Added: listed now and not before; removed: the reverse.
            for (change, listed, absent_from) in [
                ("added", &after.targets, &before.targets),
                ("removed", &before.targets, &after.targets),
            ] {
                out.extend(
                    listed
                        .iter()
                        .filter(|(address, _)| !absent_from.contains_key(address))
                        .map(|(address, name)| TargetChange {
                            time_ms: after.recorded_at,
                            change,
                            target: format!("{name} {address}"),
                        }),
                );
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::evidence::ProtectedTarget;

    const ORDERS: &str = "10.0.0.5:5432";
    const BILLING: &str = "10.0.0.6:5432";
    const LEDGER: &str = "10.0.0.7:5432";

    /// A start's record protecting `targets` (name, address).
    pub(crate) fn snapshot(
        targets: &[(&str, &str)],
        installing_since_ms: Option<i64>,
    ) -> ConfigSnapshot {
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
            replaced_targets: Vec::new(),
            probe_was_pinned: None,
        }
    }

    /// An event at `time`, written in the stream in the same order as by
    /// time: just after a record of the same time (see [`in_order`]).
    fn protected(targets: &TargetsInForce, time: i64, address: &str) -> bool {
        targets
            .at(time, time * 10 + 1, address.parse().unwrap())
            .is_some()
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

    /// Records written in the stream in the order of their times.
    fn in_order(records: &[(i64, &ConfigSnapshot)]) -> TargetsInForce {
        TargetsInForce::new(records.iter().map(|(t, s)| (*t, *t * 10, *s)))
    }

    #[test]
    fn a_removed_target_is_protected_until_the_start_that_removed_it() {
        let (first, second) = removal_at_5000();
        let targets = in_order(&[(5_000, &second), (1_000, &first)]);
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
            targets.at(90_000, 900_001, BILLING.parse().unwrap()),
            Some("billing-db")
        );
    }

    #[test]
    fn before_the_first_record_every_target_counts() {
        // The first record's probes ran before it; retention may have
        // taken the records before it.
        let (first, second) = removal_at_5000();
        let targets = in_order(&[(1_000, &first), (5_000, &second)]);
        assert!(protected(&targets, 500, ORDERS));
        assert!(protected(&targets, 500, BILLING));
    }

    #[test]
    fn a_record_without_its_install_time_shares_the_interval_before_it() {
        let (first, mut second) = removal_at_5000();
        second.installing_since_ms = None;
        let targets = in_order(&[(1_000, &first), (5_000, &second)]);
        // Conservative: the added target counts from the previous record.
        assert!(protected(&targets, 1_500, BILLING));
        assert!(protected(&targets, 1_500, ORDERS));
        assert!(!protected(&targets, 5_001, ORDERS));
    }

    #[test]
    fn a_record_dated_before_earlier_events_does_not_unprotect_them() {
        // A clock stepped back: the second start's record is dated 2 000,
        // but it was written after an event dated 3 000.
        let (first, second) = removal_at_5000();
        let second = ConfigSnapshot {
            installing_since_ms: Some(1_990),
            ..second
        };
        let targets = TargetsInForce::new([(1_000, 1, &first), (2_000, 9, &second)]);
        let orders: SocketAddr = ORDERS.parse().unwrap();
        assert_eq!(targets.at(3_000, 5, orders), Some("orders-db"));
        // An event written after it is judged by it.
        assert_eq!(targets.at(3_000, 10, orders), None);
        // Events a pinned probe recorded while the daemon was down, under
        // the first start's targets, are written after the second's record:
        // their time finds the first, and only the first.
        assert_eq!(targets.at(1_500, 12, orders), Some("orders-db"));
        assert_eq!(targets.at(1_500, 12, BILLING.parse().unwrap()), None);
        // Once the clock passes the first record's time again, the second
        // (written after it, dated before it) is in force, and the first
        // no longer.
        let (first, second) = removal_at_5000();
        let targets = TargetsInForce::new([(3_000, 10, &first), (2_000, 20, &second)]);
        assert_eq!(
            targets.at(3_500, 30, BILLING.parse().unwrap()),
            Some("billing-db")
        );
        assert_eq!(targets.at(3_500, 30, orders), None);
        // An event the probe recorded while the daemon was down, under the
        // targets the last record found in the map, dated by a clock
        // stepped back past an older record: what that record replaced
        // counts.
        let with = |targets: &[(&str, &str)], replaced: &[&str]| ConfigSnapshot {
            replaced_targets: replaced.iter().map(|a| a.parse().unwrap()).collect(),
            ..snapshot(targets, None)
        };
        let r0 = with(&[("x", "10.0.1.1:5432")], &[]);
        let r1 = with(&[("y", "10.0.1.2:5432")], &["10.0.1.1:5432"]);
        let r2 = with(&[("a", "10.0.1.3:5432")], &["10.0.1.2:5432"]);
        let r3 = with(&[("b", "10.0.1.4:5432")], &["10.0.1.3:5432"]);
        let targets = TargetsInForce::new([
            (1_000, 10, &r0),
            (2_000, 20, &r1),
            (3_000, 30, &r2),
            (2_500, 40, &r3),
        ]);
        assert_eq!(
            targets.at(1_100, 45, "10.0.1.3:5432".parse().unwrap()),
            Some("a")
        );
        // What a record replaced counts for the events written before it.
        let mut second = second;
        second.replaced_targets = vec![LEDGER.parse().unwrap()];
        let targets = TargetsInForce::new([(1_000, 1, &first), (2_000, 9, &second)]);
        assert_eq!(
            targets.at(3_000, 5, LEDGER.parse().unwrap()),
            Some(UNRECORDED_TARGET)
        );
    }

    #[test]
    fn what_a_start_replaced_counts_from_the_record_before_it() {
        // A start installed ledger-db and failed before writing its record;
        // the next start found it in the map.
        let (first, mut second) = removal_at_5000();
        second.replaced_targets = vec![ORDERS.parse().unwrap(), LEDGER.parse().unwrap()];
        let targets = in_order(&[(1_000, &first), (5_000, &second)]);
        let ledger: SocketAddr = LEDGER.parse().unwrap();
        assert_eq!(targets.at(2_000, 20_001, ledger), Some(UNRECORDED_TARGET));
        assert_eq!(targets.at(5_000, 50_001, ledger), None);
        assert!(targets
            .during(Some(1_500), Some(3_000))
            .contains_key(&ledger));
        assert!(!targets.during(Some(5_500), None).contains_key(&ledger));
        // Replaced by the first record there is: before it too.
        let only = in_order(&[(5_000, &second)]);
        assert_eq!(only.at(2_000, 20_001, ledger), Some(UNRECORDED_TARGET));
    }

    #[test]
    fn the_targets_during_a_window_are_those_in_force_in_it() {
        let (first, second) = removal_at_5000();
        let targets = in_order(&[(1_000, &first), (5_000, &second)]);
        let names = |from, to| -> Vec<String> { targets.during(from, to).into_values().collect() };
        assert_eq!(names(Some(2_000), Some(3_000)), ["orders-db"]);
        assert_eq!(names(Some(6_000), None), ["billing-db"]);
        assert_eq!(names(Some(2_000), Some(6_000)), ["orders-db", "billing-db"]);
        // Ending while the second start installed its targets.
        assert_eq!(names(Some(2_000), Some(4_950)), ["orders-db", "billing-db"]);
        assert_eq!(names(None, None), ["orders-db", "billing-db"]);
        assert_eq!(names(None, Some(500)), ["orders-db", "billing-db"]);
    }

    #[test]
    fn changes_name_what_each_start_added_and_removed() {
        let (first, second) = removal_at_5000();
        let targets = in_order(&[(1_000, &first), (5_000, &second), (8_000, &second)]);
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
        assert!(targets.during(None, None).is_empty());
    }
}
