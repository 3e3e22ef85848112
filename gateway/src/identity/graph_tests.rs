//! Group overage resolved through the dev IdP's Graph-like endpoint.

use std::{net::SocketAddr, path::Path};

use super::tests::{code, config_with, spec, start_idp, TID};
use super::*;
use crate::dev::{directory, Keyring, TokenSpec};

const G1: &str = "aaaaaaaa-0000-4000-8000-000000000001";
const G2: &str = "aaaaaaaa-0000-4000-8000-000000000002";

fn graph_config(dir: &Path, graph: SocketAddr, secret_file: &Path) -> IdentityConfig {
    config_with(
        &format!("jwks_file = {:?}", dir.join("jwks.json")),
        &format!(
            "development_idp = true\n\
             [roles.db-reader]\ngroups = [\"{G2}\"]\n\
             [graph]\nendpoint = \"http://{graph}\"\nauthority = \"http://{graph}\"\n\
             client_id = \"6a1e0c2d-3b4f-4a5e-9d6c-7b8a9f0e1d2c\"\n\
             client_secret_file = {secret_file:?}\n"
        ),
    )
}

fn overage_token(ring: &Keyring) -> String {
    TokenSpec {
        overage: true,
        ..spec()
    }
    .mint(ring.signing_key())
    .expect("mint")
}

#[tokio::test]
async fn overage_groups_are_resolved_through_graph_and_cached() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let ring = Keyring::open(dir.path()).expect("keyring");
    directory::set_members(dir.path(), &spec().oid, &[G1.into(), G2.into()]).expect("members");
    let secret = directory::graph_secret_file(dir.path()).expect("secret");
    let v = Verifier::from_config(&graph_config(dir.path(), addr, &secret))
        .await
        .expect("verifier");

    let token = overage_token(&ring);
    let claims = TokenSpec {
        overage: true,
        ..spec()
    }
    .claims_at(0);
    assert!(claims.get("groups").is_none() && claims.get("_claim_names").is_some());
    let p = v.verify(&token).await.expect("overage resolved");
    assert_eq!(p.groups, vec![G1, G2]);
    assert_eq!(p.tollgate_roles, vec!["db-reader"]);

    // Memberships are cached: Graph going away does not refuse the caller.
    idp.abort();
    let _ = idp.await;
    let again = v
        .verify(&overage_token(&ring))
        .await
        .expect("cached membership");
    assert_eq!(again.groups, vec![G1, G2]);
}

#[tokio::test]
async fn overage_with_graph_unreachable_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Keyring::open_or_create(dir.path()).expect("keyring");
    let secret = directory::graph_secret_file(dir.path()).expect("secret");
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let v = Verifier::from_config(&graph_config(dir.path(), closed, &secret))
        .await
        .expect("verifier");
    let r = v.verify(&overage_token(&ring)).await;
    assert_eq!(code(r.clone()), "groups_lookup_failed");
    assert!(r.unwrap_err().to_string().contains("unreachable"));
}

#[tokio::test]
async fn overage_with_wrong_graph_secret_is_refused_without_leaking_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let ring = Keyring::open(dir.path()).expect("keyring");
    directory::set_members(dir.path(), &spec().oid, &[G1.into()]).expect("members");
    let wrong = dir.path().join("wrong-secret");
    std::fs::write(&wrong, "not-the-secret\n").expect("write");
    let v = Verifier::from_config(&graph_config(dir.path(), addr, &wrong))
        .await
        .expect("verifier");
    let err = v.verify(&overage_token(&ring)).await.expect_err("refused");
    assert_eq!(err.code(), "groups_lookup_failed");
    let msg = err.to_string();
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(!msg.contains("not-the-secret"), "{msg}");
    // The log and the audit keep why; the client learns only the code.
    let told = err.client_message();
    assert!(told.contains("groups_lookup_failed"), "{told}");
    assert!(
        !told.contains("invalid_client") && !told.contains("401"),
        "{told}"
    );
    idp.abort();
}

#[tokio::test]
async fn overage_for_unknown_user_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let ring = Keyring::open(dir.path()).expect("keyring");
    let secret = directory::graph_secret_file(dir.path()).expect("secret");
    let v = Verifier::from_config(&graph_config(dir.path(), addr, &secret))
        .await
        .expect("verifier");
    let err = v.verify(&overage_token(&ring)).await.expect_err("refused");
    assert_eq!(err.code(), "groups_lookup_failed");
    assert!(err.to_string().contains("404"), "{err}");
    idp.abort();
}

#[tokio::test]
async fn graph_over_plain_http_needs_development_idp() {
    let dir = tempfile::tempdir().expect("tempdir");
    Keyring::open_or_create(dir.path()).expect("keyring");
    let secret = directory::graph_secret_file(dir.path()).expect("secret");
    let mut c = graph_config(dir.path(), "127.0.0.1:1".parse().expect("addr"), &secret);
    c.development_idp = false;
    assert!(Verifier::from_config(&c).await.is_err());
    assert_eq!(c.tenants, vec![TID]);
}

#[test]
fn app_token_lifetimes_from_the_endpoint_are_bounded() {
    use std::time::{Duration, Instant};
    let now = Instant::now();
    assert_eq!(
        graph::app_token_usable_until(now, 3600),
        now + Duration::from_secs(3540),
        "renewed a minute early"
    );
    // Shorter than the minute of margin (or negative after it): not reused.
    for short in [0, 30, 60] {
        assert_eq!(graph::app_token_usable_until(now, short), now, "{short}");
    }
    // Absurd lifetimes are capped at a day; u64::MAX used to overflow
    // Instant and panic the session.
    for huge in [u64::MAX, u64::MAX - 59, 86_460, 10_000_000] {
        assert_eq!(
            graph::app_token_usable_until(now, huge),
            now + Duration::from_secs(86_400),
            "{huge}"
        );
    }
}
