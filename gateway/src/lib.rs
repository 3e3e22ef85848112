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
