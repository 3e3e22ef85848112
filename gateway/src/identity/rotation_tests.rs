//! Key rotation, withdrawal, refresh schedule and IdP outages, against the
//! dev IdP over loopback HTTP.

use std::{net::SocketAddr, time::Duration};

use super::tests::{code, config_with, spec, start_idp, TID};
use super::*;
use crate::dev::{DevKey, Keyring};

fn http_config(addr: SocketAddr, extra: &str) -> IdentityConfig {
    config_with(
        &format!("discovery_uri = \"http://{addr}/{TID}/v2.0/.well-known/openid-configuration\""),
        &format!("development_idp = true\n{extra}"),
    )
}

#[tokio::test]
async fn rotated_key_is_accepted_without_restart_and_withdrawn_key_refused_after_refresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(addr, ""))
        .await
        .expect("verifier");

    let mut ring = Keyring::open(dir.path()).expect("keyring");
    let old_token = spec().mint(ring.signing_key()).expect("mint");
    v.verify(&old_token).await.expect("token of the first key");

    // `tollgate dev rotate`: a new signing key, the old one still published.
    let new_kid = ring.rotate().expect("rotate").kid.clone();
    let new_token = spec().mint(ring.signing_key()).expect("mint");
    assert!(
        !v.cached_kids().contains(&new_kid),
        "new key must not be cached yet"
    );
    let p = v
        .verify(&new_token)
        .await
        .expect("new key fetched on its unknown kid");
    assert_eq!(p.tenant_id, TID);
    assert!(v.cached_kids().contains(&new_kid));
    v.verify(&old_token).await.expect("old key still published");

    // `tollgate dev withdraw-old`: after the next refresh the old key is gone.
    assert_eq!(ring.withdraw_old().expect("withdraw"), 1);
    v.verify(&old_token)
        .await
        .expect("still cached until a refresh");
    assert_eq!(v.refresh_keys().await.expect("refresh"), 1);
    assert_eq!(code(v.verify(&old_token).await), "unknown_kid");
    v.verify(&new_token)
        .await
        .expect("current key still accepted");
    idp.abort();
}

#[tokio::test]
async fn unknown_kid_refresh_is_rate_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(addr, "jwks_min_refresh_secs = 60"))
        .await
        .expect("verifier");
    let mut ring = Keyring::open(dir.path()).expect("keyring");

    ring.rotate().expect("rotate");
    let second = spec().mint(ring.signing_key()).expect("mint");
    v.verify(&second)
        .await
        .expect("first unknown kid triggers a refresh");

    // A second unknown kid within the minute does not reach the IdP.
    ring.rotate().expect("rotate");
    let third = spec().mint(ring.signing_key()).expect("mint");
    assert_eq!(code(v.verify(&third).await), "unknown_kid");
    // An explicit (scheduled or admin) refresh is not rate limited.
    v.refresh_keys().await.expect("refresh");
    v.verify(&third).await.expect("accepted after the refresh");
    idp.abort();
}

#[tokio::test]
async fn idp_down_keeps_cached_keys_and_refuses_unknown_kids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(addr, ""))
        .await
        .expect("verifier");
    let ring = Keyring::open(dir.path()).expect("keyring");
    let token = spec().mint(ring.signing_key()).expect("mint");

    idp.abort();
    let _ = idp.await;
    assert!(
        v.refresh_keys().await.is_err(),
        "refresh must fail with the IdP down"
    );
    v.verify(&token).await.expect("cached key still verifies");
    let stranger = DevKey::generate().expect("key");
    let forged = spec().mint(&stranger).expect("mint");
    assert_eq!(code(v.verify(&forged).await), "unknown_kid");
    v.verify(&token)
        .await
        .expect("failed on-demand refresh kept the cache");
}

#[tokio::test]
async fn scheduled_refresh_picks_up_withdrawal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(addr, "jwks_refresh_secs = 1"))
        .await
        .expect("verifier");
    let mut ring = Keyring::open(dir.path()).expect("keyring");
    let first = ring.signing_key().kid.clone();
    let second = ring.rotate().expect("rotate").kid.clone();
    ring.withdraw_old().expect("withdraw");
    // No token is verified: only the schedule can change the cache.
    let mut kids = v.cached_kids();
    for _ in 0..40 {
        if kids == vec![second.clone()] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        kids = v.cached_kids();
    }
    assert_eq!(kids, vec![second], "first key {first} should be gone");
    idp.abort();
}

#[tokio::test]
async fn started_before_idp_refuses_then_recovers() {
    // A free loopback port with nothing listening yet.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let ring = Keyring::open_or_create(dir.path()).expect("keyring");
    let token = spec().mint(ring.signing_key()).expect("mint");
    let v = Verifier::from_config(&http_config(addr, "jwks_min_refresh_secs = 1"))
        .await
        .expect("an unreachable IdP does not stop start-up");
    assert_eq!(code(v.verify(&token).await), "keys_unavailable");

    let (_, idp) = crate::dev::server::spawn(dir.path().to_path_buf(), addr)
        .await
        .expect("idp");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    v.verify(&token)
        .await
        .expect("keys loaded once the IdP is up");
    idp.abort();
}

/// Keys no refresh has confirmed for longer than `jwks_max_stale_secs`
/// may include ones the IdP withdrew since (a compromised key among them):
/// while the IdP stays unreachable, tokens are refused (`keys_stale`);
/// once a refresh succeeds, they are accepted again.
#[tokio::test]
async fn keys_not_refreshed_for_too_long_are_not_trusted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(
        addr,
        "jwks_max_stale_secs = 1\njwks_min_refresh_secs = 1",
    ))
    .await
    .expect("verifier");
    let ring = Keyring::open(dir.path()).expect("keyring");
    let token = spec().mint(ring.signing_key()).expect("mint");
    v.verify(&token).await.expect("fresh keys");

    idp.abort();
    let _ = idp.await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let refused = v.verify(&token).await;
    assert_eq!(code(refused), "keys_stale");

    let (_, idp) = crate::dev::server::spawn(dir.path().to_path_buf(), addr)
        .await
        .expect("the IdP again");
    // The next refresh may come once the rate limit allows it.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    v.verify(&token)
        .await
        .expect("accepted again once a refresh succeeded");
    idp.abort();
}

#[tokio::test]
async fn a_burst_of_forged_kids_cannot_force_repeated_refreshes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, idp) = start_idp(dir.path()).await;
    let v = Verifier::from_config(&http_config(addr, ""))
        .await
        .expect("verifier");
    // 32 concurrent tokens, each with its own unknown kid.
    let forged: Vec<String> = (0..32)
        .map(|i| {
            let header = serde_json::json!({ "alg": "RS256", "kid": format!("forged-{i}") });
            let key = Keyring::open(dir.path()).expect("keyring");
            key.signing_key()
                .sign_jwt(&header, &spec().claims_at(0))
                .expect("sign")
        })
        .collect();
    let tasks: Vec<_> = forged
        .into_iter()
        .map(|t| {
            let v = v.clone();
            tokio::spawn(async move { v.verify(&t).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(code(t.await.expect("task")), "unknown_kid");
    }
    // The burst used up the one refresh allowed this minute: a key rotated
    // in now is not fetched on demand yet.
    let mut ring = Keyring::open(dir.path()).expect("keyring");
    ring.rotate().expect("rotate");
    let genuine = spec().mint(ring.signing_key()).expect("mint");
    assert_eq!(code(v.verify(&genuine).await), "unknown_kid");
    idp.abort();
}

/// A TCP relay to `target` that holds every chunk of the answers for
/// `delay` before passing it on (every request on a kept-alive connection
/// too): an IdP that answers slowly.
async fn slow_relay(target: SocketAddr, delay: Duration) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut client_rd, mut client_wr) = client.into_split();
                let (mut upstream_rd, mut upstream_wr) = upstream.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rd, &mut upstream_wr).await;
                });
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = upstream_rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                    if client_wr.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    address
}

/// The keys fetched for an unknown kid are kept even when the login that
/// asked for them gives up first (as one does at VERIFY_TIMEOUT): the
/// fetch runs on a task of its own, so the agent's next attempt finds the
/// key instead of starting the same slow fetch again.
#[tokio::test]
async fn keys_fetched_for_a_login_that_gave_up_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (idp_addr, idp) = start_idp(dir.path()).await;
    let slow = slow_relay(idp_addr, Duration::from_millis(600)).await;
    let v = Verifier::from_config(&config_with(
        &format!("jwks_uri = \"http://{slow}/{TID}/discovery/v2.0/keys\""),
        "development_idp = true",
    ))
    .await
    .expect("verifier");
    let mut ring = Keyring::open(dir.path()).expect("keyring");
    let new_kid = ring.rotate().expect("rotate").kid.clone();
    let token = spec().mint(ring.signing_key()).expect("mint");
    assert!(!v.cached_kids().contains(&new_kid));

    let gave_up = tokio::time::timeout(Duration::from_millis(200), v.verify(&token)).await;
    assert!(gave_up.is_err(), "the slow fetch should outlast the login");
    // The fetch goes on without the login that started it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !v.cached_kids().contains(&new_kid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key fetched for the abandoned login was not kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v.verify(&token)
        .await
        .expect("the kept key verifies the token");
    idp.abort();
}
