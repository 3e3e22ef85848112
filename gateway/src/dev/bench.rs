//! `tollgate dev bench-verify`: how long validating one token takes with the
//! key already cached (the common case: keys are fetched daily). Runs on
//! the operator's own hardware with the real verifier, no network.

use std::time::{Duration, Instant};

use super::{Keyring, TokenSpec};
use crate::identity::{IdentityConfig, Verifier};

pub struct BenchResult {
    pub iterations: u32,
    pub mean: Duration,
    pub p50: Duration,
    pub p99: Duration,
}

impl std::fmt::Display for BenchResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        write!(
            f,
            "{} validations: mean {:.1} µs/validation, p50 {:.1} µs, p99 {:.1} µs",
            self.iterations,
            us(self.mean),
            us(self.p50),
            us(self.p99)
        )
    }
}

const TID: &str = "8f3c1a52-7d4e-4b7a-9c1e-2a5b6d7e8f90";

/// Validates one RS256 token `iterations` times, one after the other.
pub async fn bench_verify(iterations: u32) -> anyhow::Result<BenchResult> {
    let iterations = iterations.max(1);
    let dir = tempfile_dir()?;
    let result = run(&dir, iterations).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run(dir: &std::path::Path, iterations: u32) -> anyhow::Result<BenchResult> {
    let ring = Keyring::open_or_create(dir)?;
    let config: IdentityConfig = toml::from_str(&format!(
        "tenants = [\"{TID}\"]\naudiences = [\"api://tollgate\"]\njwks_file = {:?}\ndevelopment_idp = true\n\
         [roles.reader]\ngroups = [\"aaaaaaaa-0000-4000-8000-000000000001\"]\n",
        dir.join("jwks.json")
    ))?;
    let verifier = Verifier::from_config(&config).await?;
    // A realistic token: a user with a few groups and roles.
    let spec = TokenSpec {
        name: Some("agent@example.com".into()),
        groups: (1..=8)
            .map(|i| format!("aaaaaaaa-0000-4000-8000-{i:012}"))
            .collect(),
        roles: vec!["Tollgate.Read".into()],
        ..TokenSpec::new(
            TID,
            "11111111-2222-4333-8444-555555555555",
            "api://tollgate",
        )
    };
    let token = spec.mint(ring.signing_key())?;
    for _ in 0..iterations.min(100) {
        verifier.verify(&token).await?;
    }
    let mut times = Vec::with_capacity(iterations as usize);
    let start = Instant::now();
    for _ in 0..iterations {
        let t = Instant::now();
        verifier.verify(&token).await?;
        times.push(t.elapsed());
    }
    let total = start.elapsed();
    times.sort();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    Ok(BenchResult {
        iterations,
        mean: total / iterations,
        p50: pick(0.5),
        p99: pick(0.99),
    })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
