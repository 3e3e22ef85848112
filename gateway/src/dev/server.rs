//! The dev IdP's HTTP side: OIDC discovery and JWKS on Entra's paths, for
//! any tenant id. The keyring is re-read on every request so `tollgate dev
//! rotate` and `withdraw-old` take effect without a restart.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{Form, Path, State},
    http::{header::AUTHORIZATION, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;
use tokio::net::TcpListener;

use super::{directory, keyring::Keyring};

/// Lifetime of the app tokens the dev token endpoint issues.
const APP_TOKEN_SECS: u64 = 3600;

#[derive(Clone)]
struct AppState {
    dir: Arc<PathBuf>,
    base: Arc<String>,
    /// Opaque app tokens issued by the token endpoint -> expiry.
    issued: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Binds `listen` and serves until the returned task is aborted. Returns the
/// bound address (useful with port 0).
pub async fn spawn(
    dir: PathBuf,
    listen: SocketAddr,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    // Make sure a key exists before the first request.
    Keyring::open_or_create(&dir)?;
    directory::graph_secret_file(&dir)?;
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
        issued: Arc::new(Mutex::new(HashMap::new())),
    };
    Router::new()
        .route(
            "/{tid}/v2.0/.well-known/openid-configuration",
            get(discovery),
        )
        .route("/{tid}/discovery/v2.0/keys", get(keys))
        .route("/{tid}/discovery/keys", get(keys))
        .route("/{tid}/oauth2/v2.0/token", post(token))
        .route(
            "/v1.0/directoryObjects/{oid}/getMemberObjects",
            post(member_objects),
        )
        .route("/v1.0/users/{oid}/getMemberObjects", post(member_objects))
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

#[derive(serde::Deserialize)]
struct TokenRequest {
    grant_type: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
}

/// Client credentials grant, as tollgate uses it to call Graph: the secret
/// must be the one in the state directory's `graph-client-secret`.
async fn token(State(s): State<AppState>, Form(req): Form<TokenRequest>) -> Response {
    let oauth_error =
        |status: StatusCode, error: &str| (status, Json(json!({ "error": error }))).into_response();
    if req.grant_type != "client_credentials" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let expected = match directory::graph_secret(&s.dir) {
        Ok(secret) => secret,
        Err(e) => {
            tracing::error!(error = %e, "dev idp cannot read its client secret");
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error");
        }
    };
    let matches = aws_lc_rs::constant_time::verify_slices_are_equal(
        req.client_secret.as_bytes(),
        expected.as_bytes(),
    )
    .is_ok();
    if req.client_id.is_empty() || !matches {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let access = hex::encode(rand::random::<[u8; 24]>());
    let until = Instant::now() + Duration::from_secs(APP_TOKEN_SECS);
    match s.issued.lock() {
        Ok(mut m) => {
            m.retain(|_, t| *t > Instant::now());
            m.insert(access.clone(), until);
        }
        Err(_) => return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
    }
    Json(json!({ "token_type": "Bearer", "expires_in": APP_TOKEN_SECS, "access_token": access }))
        .into_response()
}

/// Graph's getMemberObjects, from `members.json` (written by `dev token --overage`).
async fn member_objects(
    State(s): State<AppState>,
    Path(oid): Path<String>,
    headers: HeaderMap,
) -> Response {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let valid = match (bearer, s.issued.lock()) {
        (Some(b), Ok(m)) => m.get(b).is_some_and(|t| *t > Instant::now()),
        _ => false,
    };
    if !valid {
        return graph_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
    }
    match directory::members(&s.dir, &oid) {
        Ok(Some(groups)) => Json(json!({
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#Collection(Edm.String)",
            "value": groups,
        }))
        .into_response(),
        Ok(None) => graph_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound"),
        Err(e) => {
            tracing::error!(error = %e, "dev idp cannot read members.json");
            graph_error(StatusCode::INTERNAL_SERVER_ERROR, "generalException")
        }
    }
}

fn graph_error(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({ "error": { "code": code, "message": code } })),
    )
        .into_response()
}
