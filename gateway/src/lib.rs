//! tollgate: the daemon that sits on the only path between AI agents and
//! production systems.
//!
//! One module per stage of a request's path (see docs/architecture.md):
//!
//! | stage | module |
//! | --- | --- |
//! | the kernel redirect that makes the path unavoidable | [`pin`] |
//! | who is calling: Entra token -> [`identity::Principal`] | [`identity`] |
//! | may this request run | [`policy`] |
//! | protocol adapters (PostgreSQL, ...) | [`proxy`] |
//! | the tamper-evident record of every request | [`audit`] |
//! | kernel evidence that nothing went around the gateway | [`evidence`] |
//! | development identity provider | [`dev`] |

pub mod audit;
pub mod config;
pub mod dev;
pub mod evidence;
pub mod identity;
pub mod pin;
pub mod policy;
pub mod proxy;

/// The settings of every property test: `PROPTEST_CASES` cases (CI runs a
/// fixed budget; raise it locally for a longer hunt), else
/// `default_cases`; no failure files written into the tree.
#[cfg(test)]
pub(crate) fn proptest_config(default_cases: u32) -> proptest::prelude::ProptestConfig {
    proptest::prelude::ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(default_cases),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    }
}

/// jemalloc, not the system allocator. A session's records are built on
/// whichever runtime thread serves it and freed, a segment at a time, on the
/// segment thread: glibc spends that in chunk consolidation and in growing
/// and trimming its heaps (mprotect, page faults) on both. Measured in
/// docs/benchmarks.md: less CPU per statement on the request path and per
/// record in the audit store; mimalloc did better for the store alone but
/// worse on the request path.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
