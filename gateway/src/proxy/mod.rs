//! Protocol adapters. Every adapter has the same shape: read the credential
//! its protocol carries, verify it, then for each request normalise it, ask
//! the policy, audit it, forward it and audit the outcome.

pub mod postgres;
