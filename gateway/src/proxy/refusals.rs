//! Refusals of connections nobody has authenticated, kept from flooding
//! the audit store.
//!
//! Anyone who can reach a listener can make tollgate refuse a connection:
//! a malformed startup, a bad token, a guessed cancel key. Each refusal is
//! an audit record, so without a limit a loop of bad logins fills the
//! audit disk (and then every request is refused, since tollgate fails
//! closed), and buries the refusals that matter. Each source (the agent
//! cgroup the kernel saw the connection come from, else its address) may
//! have [`PER_SOURCE_PER_SECOND`] refusals a second recorded one by one,
//! after a burst of [`PER_SOURCE_BURST`], and all sources together
//! [`OVERALL_PER_SECOND`]. Past that a source's refusals are still
//! recorded, but counted: one summary record per source every
//! [`SUMMARY_EVERY`] (`refusals_summarized`) says how many there were, of
//! which kinds, over which span, from where. The client is refused the
//! same way either way.
//!
//! A refusal after tollgate accepted the caller's identity (its record
//! names the caller) is always written one by one: it is accountable, and
//! rare. Refused tokens are not: their claims are not an identity.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::audit::AuditRecord;

/// Refusals a second one source may have recorded one by one, once its
/// burst is spent.
pub const PER_SOURCE_PER_SECOND: f64 = 10.0;
/// Refusals one source may have recorded one by one at once.
pub const PER_SOURCE_BURST: f64 = 100.0;
/// Refusals a second all sources together may have recorded one by one.
pub const OVERALL_PER_SECOND: f64 = 1_000.0;
/// Refusals all sources together may have recorded one by one at once.
pub const OVERALL_BURST: f64 = 2_000.0;
/// How often the counted refusals are written as summaries.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Sources tracked at once; past that, new sources share one count (an
/// attacker with many addresses cannot grow tollgate's memory).
pub const MAX_SOURCES: usize = 10_000;

/// Where refusals come from, as far as tollgate can tell.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Source {
    /// The cgroup the kernel saw the connection come from.
    Cgroup(i64),
    /// The peer address, when the connection did not come through the
    /// redirect (shared with the record, not copied).
    Address(crate::audit::SharedText),
    /// Any source past [`MAX_SOURCES`].
    Others,
}

impl Source {
    fn of(record: &AuditRecord) -> Self {
        match record.actor_process_cgroup_id {
            Some(cgroup) => Source::Cgroup(cgroup),
            None => {
                // As the login bound counts them (see
                // `logins::source_address`): one process binding a fresh
                // loopback address for each attempt is one source, not a
                // new one with a fresh burst every time.
                let ip = record.src_endpoint_ip.clone();
                match ip.parse::<std::net::IpAddr>() {
                    Ok(peer) => {
                        let source = super::logins::source_address(peer);
                        match source == peer {
                            true => Source::Address(ip),
                            false => Source::Address(source.to_string().into()),
                        }
                    }
                    Err(_) => Source::Address(ip),
                }
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Cgroup(id) => format!("cgroup {id}"),
            Source::Address(ip) => format!("address {ip}"),
            Source::Others => format!("sources past the first {MAX_SOURCES}"),
        }
    }
}

/// A token bucket: `rate` a second, at most `burst` at once.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(now: Instant, burst: f64) -> Self {
        Bucket {
            tokens: burst,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, burst: f64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.updated = now;
    }

    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        self.refill(now, rate, burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The refusals of one source counted since its last summary.
#[derive(Debug)]
struct Counted {
    /// The first counted refusal: the summary says where and who as it did.
    first: AuditRecord,
    count: u64,
    last_ms: i64,
    codes: BTreeMap<String, u64>,
}

#[derive(Debug)]
struct SourceState {
    bucket: Bucket,
    /// By OCSF class (a refused login's, a refused cancel's): a summary
    /// has one class, so queries by class count it where it belongs.
    counted: BTreeMap<i32, Counted>,
}

#[derive(Debug)]
struct State {
    sources: HashMap<Source, SourceState>,
    overall: Bucket,
    /// The last summaries were taken (the daemon stops): from now on
    /// every refusal is written one by one, so that none is counted where
    /// no summary will ever say so (the store refuses what comes after it
    /// stopped, and that is logged).
    closed: bool,
}

/// Decides which refusals are written one by one and counts the others;
/// see the module's documentation.
#[derive(Debug)]
pub struct RefusalLimiter {
    state: Mutex<State>,
}

impl Default for RefusalLimiter {
    fn default() -> Self {
        RefusalLimiter {
            state: Mutex::new(State {
                sources: HashMap::new(),
                overall: Bucket::full(Instant::now(), OVERALL_BURST),
                closed: false,
            }),
        }
    }
}

impl RefusalLimiter {
    /// Whether `record`, the refusal of an unauthenticated connection, is
    /// to be written now; if not, it is counted into its source's next
    /// summary.
    pub fn admit(&self, record: &AuditRecord) -> bool {
        self.admit_at(record, Instant::now())
    }

    fn admit_at(&self, record: &AuditRecord, now: Instant) -> bool {
        // Refusals after the identity was accepted (the record names the
        // caller) are accountable: always written.
        if !record.actor_user_uid.is_empty() {
            return true;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State {
            sources,
            overall,
            closed,
        } = &mut *state;
        if *closed {
            return true;
        }
        let mut source = Source::of(record);
        if !sources.contains_key(&source) && sources.len() >= MAX_SOURCES {
            source = Source::Others;
        }
        let entry = sources.entry(source).or_insert_with(|| SourceState {
            bucket: Bucket::full(now, PER_SOURCE_BURST),
            counted: BTreeMap::new(),
        });
        // A source over its own limit does not spend the others' share.
        if entry
            .bucket
            .take(now, PER_SOURCE_PER_SECOND, PER_SOURCE_BURST)
            && overall.take(now, OVERALL_PER_SECOND, OVERALL_BURST)
        {
            return true;
        }
        let code = record
            .status_detail
            .split_once(':')
            .map_or(record.status_detail.as_str(), |(code, _)| code);
        let counted = entry
            .counted
            .entry(record.class_uid)
            .or_insert_with(|| Counted {
                first: record.clone(),
                count: 0,
                last_ms: record.time,
                codes: BTreeMap::new(),
            });
        counted.count += 1;
        counted.last_ms = counted.last_ms.max(record.time);
        // A code seen before is counted without allocating its name.
        match counted.codes.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                counted.codes.insert(code.to_owned(), 1);
            }
        }
        false
    }

    /// The summaries of every source with counted refusals, as records to
    /// write (stamped `now_ms`); the counts start again. Sources with
    /// nothing counted and a full bucket are forgotten.
    pub fn take_summaries(&self, now_ms: i64) -> Vec<AuditRecord> {
        self.take_summaries_at(now_ms, Instant::now(), false)
    }

    /// The last summaries, as the daemon stops: every refusal after them
    /// is written one by one (closed under the same lock the summaries are
    /// taken under, so that none is counted in between).
    pub fn take_last_summaries(&self, now_ms: i64) -> Vec<AuditRecord> {
        self.take_summaries_at(now_ms, Instant::now(), true)
    }

    fn take_summaries_at(&self, now_ms: i64, now: Instant, last: bool) -> Vec<AuditRecord> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.closed |= last;
        let mut summaries = Vec::new();
        state.sources.retain(|source, entry| {
            for counted in std::mem::take(&mut entry.counted).into_values() {
                summaries.push(summary(source, counted, now_ms));
            }
            entry
                .bucket
                .refill(now, PER_SOURCE_PER_SECOND, PER_SOURCE_BURST);
            entry.bucket.tokens < PER_SOURCE_BURST
        });
        summaries
    }
}

/// The record of `counted`'s refusals: its first refusal's where and who,
/// with the count, the kinds and the span.
fn summary(source: &Source, counted: Counted, now_ms: i64) -> AuditRecord {
    let Counted {
        first,
        count,
        last_ms,
        codes,
    } = counted;
    let first_ms = first.time;
    let kinds = codes
        .iter()
        .map(|(code, n)| format!("{code} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut record = first;
    record.status_detail = format!(
        "refusals_summarized: {count} refusals from {} between {first_ms} and {last_ms} (epoch ms) \
         are counted here instead of recorded one by one (more than {PER_SOURCE_PER_SECOND} a second \
         from one source, or {OVERALL_PER_SECOND} from all): {kinds}",
        source.describe(),
    );
    record.unmapped = serde_json::json!({
        "refusals_summarized": {
            "count": count,
            "first_time": first_ms,
            "last_time": last_ms,
            "by_code": codes,
        }
    })
    .to_string();
    record.time = now_ms;
    record.duration_us = Some(last_ms.saturating_sub(first_ms).saturating_mul(1000));
    // One summary spans many connections: the first one's are not its own.
    record.session_uid = Default::default();
    record.src_endpoint_port = None;
    record.request_uid = String::new();
    // Nor, past the sources tracked, is the first one's source theirs all.
    if *source == Source::Others {
        record.actor_process_pid = None;
        record.actor_process_name = Default::default();
        record.actor_process_cgroup_id = None;
        record.src_endpoint_ip = Default::default();
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(cgroup: Option<i64>, ip: &str, code: &str, time: i64) -> AuditRecord {
        AuditRecord {
            time,
            actor_process_cgroup_id: cgroup,
            src_endpoint_ip: ip.into(),
            src_endpoint_port: Some(40_000),
            session_uid: "s-1".into(),
            status_detail: format!("{code}: detail"),
            unmapped: "{}".into(),
            ..AuditRecord::default()
        }
    }

    /// How many of `n` refusals, one every `every`, are admitted.
    fn admitted(
        limiter: &RefusalLimiter,
        record: &AuditRecord,
        start: Instant,
        n: u32,
        every: Duration,
    ) -> u32 {
        (0..n)
            .filter(|i| limiter.admit_at(record, start + every * *i))
            .count() as u32
    }

    #[test]
    fn a_source_has_its_burst_then_its_rate_recorded_one_by_one() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let record = refusal(Some(7), "127.0.0.1", "token_invalid", 1_000);
        // 300 at once: the burst.
        let at_once = admitted(&limiter, &record, start, 300, Duration::ZERO);
        assert_eq!(at_once, PER_SOURCE_BURST as u32);
        // Then 30 s of one every 10 ms: the rate.
        let later = start + Duration::from_millis(1);
        let paced = admitted(&limiter, &record, later, 3_000, Duration::from_millis(10));
        let expected = (30.0 * PER_SOURCE_PER_SECOND) as u32;
        assert!(
            paced.abs_diff(expected) <= 1,
            "{paced} admitted in 30 s, expected {expected}"
        );
    }

    #[test]
    fn every_counted_refusal_is_in_its_sources_summary() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let flood = refusal(Some(7), "127.0.0.1", "token_invalid", 1_000);
        let mut other_kind = refusal(Some(7), "127.0.0.1", "protocol", 1_500);
        other_kind.time = 1_500;
        let admitted_flood = admitted(&limiter, &flood, start, 250, Duration::ZERO);
        let admitted_other = admitted(&limiter, &other_kind, start, 50, Duration::ZERO);
        assert_eq!(admitted_flood + admitted_other, PER_SOURCE_BURST as u32);

        let summaries = limiter.take_summaries_at(9_000, start, false);
        assert_eq!(summaries.len(), 1, "{summaries:?}");
        let summary = &summaries[0];
        let counts: serde_json::Value =
            serde_json::from_str(&summary.unmapped).expect("summary's unmapped is JSON");
        let counts = &counts["refusals_summarized"];
        assert_eq!(counts["count"], 200);
        assert_eq!(counts["by_code"]["token_invalid"], 150);
        assert_eq!(counts["by_code"]["protocol"], 50);
        assert_eq!(counts["first_time"], 1_000);
        assert_eq!(counts["last_time"], 1_500);
        assert!(summary
            .status_detail
            .starts_with("refusals_summarized: 200 refusals from cgroup 7"));
        assert_eq!(summary.time, 9_000);
        assert_eq!(summary.duration_us, Some(500_000));
        assert_eq!(summary.actor_process_cgroup_id, Some(7));
        assert!(summary.session_uid.is_empty());
        assert_eq!(summary.src_endpoint_port, None);

        // Counted once: the next summary has nothing of them.
        assert!(limiter.take_summaries_at(19_000, start, false).is_empty());
    }

    /// A source's refused cancels and refused logins are summarized apart,
    /// each with its own class, so a query by class counts each where it
    /// belongs.
    #[test]
    fn one_summary_per_class_of_refusal() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let mut cancel = refusal(Some(7), "127.0.0.1", "cancel_unknown_key", 1_000);
        cancel.class_uid = 6005;
        let mut login = refusal(Some(7), "127.0.0.1", "malformed", 1_000);
        login.class_uid = 3002;
        admitted(&limiter, &cancel, start, 101, Duration::ZERO);
        admitted(&limiter, &login, start, 500, Duration::ZERO);
        let mut summaries = limiter.take_summaries_at(2_000, start, false);
        summaries.sort_by_key(|s| s.class_uid);
        let by_class: Vec<(i32, u64)> = summaries
            .iter()
            .map(|s| {
                let v: serde_json::Value = serde_json::from_str(&s.unmapped).expect("JSON");
                (
                    s.class_uid,
                    v["refusals_summarized"]["count"].as_u64().expect("count"),
                )
            })
            .collect();
        assert_eq!(by_class, vec![(3002, 500), (6005, 1)]);
    }

    /// Once the last summaries are taken, nothing more is counted: a
    /// refusal then is written (and the stopped store says so).
    #[test]
    fn after_the_last_summaries_every_refusal_is_written() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let record = refusal(Some(7), "127.0.0.1", "malformed", 1_000);
        assert_eq!(
            admitted(&limiter, &record, start, 300, Duration::ZERO),
            PER_SOURCE_BURST as u32
        );
        assert_eq!(limiter.take_last_summaries(2_000).len(), 1);
        assert_eq!(admitted(&limiter, &record, start, 300, Duration::ZERO), 300);
        assert!(limiter.take_summaries_at(3_000, start, false).is_empty());
    }

    /// A refusal whose record names the caller (its identity was
    /// accepted) is written whatever its source's count.
    #[test]
    fn a_refusal_of_an_accepted_identity_is_always_written() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let record = refusal(Some(7), "127.0.0.1", "malformed", 1_000);
        admitted(&limiter, &record, start, 300, Duration::ZERO);
        let mut named = refusal(Some(7), "127.0.0.1", "masks_unresolved", 1_000);
        named.actor_user_uid = "oid-1".into();
        assert_eq!(admitted(&limiter, &named, start, 10, Duration::ZERO), 10);
    }

    #[test]
    fn one_source_flooding_leaves_the_others_their_share() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let flood = refusal(Some(1), "127.0.0.1", "token_invalid", 1_000);
        admitted(&limiter, &flood, start, 10_000, Duration::ZERO);
        let other = refusal(Some(2), "127.0.0.1", "token_invalid", 1_000);
        assert_eq!(
            admitted(&limiter, &other, start, 10, Duration::ZERO),
            10,
            "another cgroup's refusals are still recorded one by one"
        );
        let by_address = refusal(None, "10.0.0.9", "protocol", 1_000);
        assert!(limiter.admit_at(&by_address, start));
    }

    /// Every loopback address is one source, as for the login bound: a
    /// process that binds a fresh 127.x address for each attempt gets one
    /// burst, not one per address.
    #[test]
    fn every_loopback_address_is_one_source() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let admitted_of_addresses = (0..PER_SOURCE_BURST as u32 * 3)
            .filter(|i| {
                let ip = format!("127.0.{}.{}", i / 250, i % 250 + 1);
                limiter.admit_at(&refusal(None, &ip, "protocol", 1_000), start)
            })
            .count();
        assert_eq!(admitted_of_addresses, PER_SOURCE_BURST as usize);
        assert!(
            !limiter.admit_at(&refusal(None, "::1", "protocol", 1_000), start),
            "::1 is the same source"
        );
        assert!(limiter.admit_at(&refusal(None, "10.0.0.9", "protocol", 1_000), start));
    }

    #[test]
    fn all_sources_together_are_held_to_the_overall_rate() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        let mut written = 0;
        for cgroup in 0..100 {
            let record = refusal(Some(cgroup), "127.0.0.1", "protocol", 1_000);
            written += admitted(&limiter, &record, start, 50, Duration::ZERO);
        }
        assert_eq!(written, OVERALL_BURST as u32);
        let counted: u64 = limiter
            .take_summaries_at(2_000, start, false)
            .iter()
            .map(|s| {
                let v: serde_json::Value = serde_json::from_str(&s.unmapped).expect("JSON");
                v["refusals_summarized"]["count"].as_u64().expect("count")
            })
            .sum();
        assert_eq!(written as u64 + counted, 100 * 50);
    }

    #[test]
    fn sources_past_the_limit_share_one_count_and_idle_sources_are_forgotten() {
        let limiter = RefusalLimiter::default();
        let start = Instant::now();
        for cgroup in 0..MAX_SOURCES as i64 {
            limiter.admit_at(&refusal(Some(cgroup), "127.0.0.1", "protocol", 1), start);
        }
        // New sources past the limit are counted together (none is
        // written: the first sources spent the overall burst).
        for late in [-1, -2] {
            let record = refusal(Some(late), "127.0.0.1", "protocol", 1);
            assert_eq!(admitted(&limiter, &record, start, 100, Duration::ZERO), 0);
        }
        let summaries = limiter.take_summaries_at(2, start, false);
        let others: Vec<_> = summaries
            .iter()
            .filter(|s| s.status_detail.contains("sources past the first"))
            .collect();
        assert_eq!(
            others.len(),
            1,
            "one summary for the sources past the limit"
        );
        assert!(others[0]
            .status_detail
            .starts_with("refusals_summarized: 200 refusals"));
        // It names none of them.
        assert_eq!(others[0].actor_process_cgroup_id, None);
        assert!(others[0].src_endpoint_ip.is_empty());
        assert_eq!(limiter.state.lock().unwrap().sources.len(), MAX_SOURCES + 1);
        // Once their buckets have refilled, quiet sources are dropped.
        let refilled = start + Duration::from_secs_f64(PER_SOURCE_BURST / PER_SOURCE_PER_SECOND);
        assert!(limiter.take_summaries_at(3, refilled, false).is_empty());
        assert_eq!(limiter.state.lock().unwrap().sources.len(), 0);
    }
}
