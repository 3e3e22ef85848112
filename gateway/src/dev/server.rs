//! The dev IdP's HTTP side: OIDC discovery and JWKS on Entra's paths, for
//! any tenant id. The keyring is re-read on every request so `tollgate dev
//! rotate` and `withdraw-old` take effect without a restart.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde_json::json;
use tokio::net::TcpListener;

use super::keyring::Keyring;

#[derive(Clone)]
struct AppState {
    dir: Arc<PathBuf>,
    base: Arc<String>,
}

/// Binds `listen` and serves until the returned task is aborted. Returns the
/// bound address (useful with port 0).
pub async fn spawn(
    dir: PathBuf,
    listen: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    // Make sure a key exists before the first request.
    Keyring::open_or_create(&dir)?;
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let router = router(dir, format!("http://{addr}"));
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "dev idp stopped");
        }
    });
    Ok((addr, task))
}

fn router(dir: PathBuf, base: String) -> Router {
    let state = AppState {
        dir: Arc::new(dir),
        base: Arc::new(base),
    };
    Router::new()
        .route(
            "/{tid}/v2.0/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/{tid}/discovery/v2.0/keys", get(keys))
        .route("/{tid}/discovery/keys", get(keys))
        .with_state(state)
}

async fn discovery(State(s): State<AppState>, Path(tid): Path<String>) -> Response {
    let base = &s.base;
    Json(json!({
        // Tokens carry Entra's real issuer, so the daemon's config is the
        // production one except for where keys come from.
        "issuer": format!("https://login.microsoftonline.com/{tid}/v2.0"),
        "jwks_uri": format!("{base}/{tid}/discovery/v2.0/keys"),
        "token_endpoint": format!("{base}/{tid}/oauth2/v2.0/token"),
        "authorization_endpoint": format!("{base}/{tid}/oauth2/v2.0/authorize"),
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["code", "id_token", "token id_token"],
        "subject_types_supported": ["pairwise"],
        "tenant_region_scope": "dev",
        "cloud_instance_name": "tollgate.dev",
    }))
    .into_response()
}

async fn keys(State(s): State<AppState>) -> Response {
    match Keyring::open(&s.dir) {
        Ok(ring) => Json(ring.jwks()).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dev idp cannot read its keyring");
            (StatusCode::INTERNAL_SERVER_ERROR, "keyring unreadable").into_response()
        }
    }
}
