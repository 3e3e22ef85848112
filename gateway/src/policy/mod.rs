//! May this request run? Adapters normalise a request (SQL statement, exec
//! command, Kubernetes verb and resource) and ask [`Policy::decide`].

use crate::identity::Principal;

/// What the policy decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny { rule: String, reason: String },
}

/// A request as the policy sees it, whatever the protocol.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub target: &'a str,
    /// The exact request text (statement, command line, verb + path).
    pub text: &'a str,
}

/// The policy for all targets. Until rules are configured it allows every
/// request of an authenticated caller.
#[derive(Debug, Clone, Default)]
pub struct Policy {}

impl Policy {
    pub fn decide(&self, _who: &Principal, _request: &Request<'_>) -> Decision {
        Decision::Allow
    }
}
