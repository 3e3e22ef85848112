//! Group overage: when a caller is in more groups than fit in a token
//! (Entra: 200), the token has no `groups` claim but `_claim_names.groups`,
//! and the groups must be fetched from Microsoft Graph. Treating overage as
//! "no groups" would silently change what policy decides, so without a
//! working lookup the token is refused.
//!
//! tollgate asks Graph as itself (client credentials in the caller's tenant,
//! which needs the GroupMember.Read.All application permission there), never
//! with the caller's token, and never at the endpoint named inside the token
//! (`_claim_sources`): only at the configured one.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

use super::keys::check_url;

/// `[identity.graph]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Graph base URL. Default https://graph.microsoft.com.
    #[serde(default = "default_endpoint")]
    pub endpoint: String,
    /// Token authority; the token endpoint is `{authority}/{tid}/oauth2/v2.0/token`.
    /// Default https://login.microsoftonline.com.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// tollgate's client id (in a multi-tenant app, the same in every tenant).
    pub client_id: String,
    /// File holding the client secret (first line). One of this or `client_secret_env`.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// OAuth scope requested. Default `{endpoint}/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Only security groups (what the `groups` claim holds when the app is
    /// configured for "Security groups"). Default true.
    #[serde(default = "default_true")]
    pub security_enabled_only: bool,
    /// How long a caller's resolved groups are reused. Default 300 s.
    #[serde(default = "default_cache")]
    pub cache_secs: u64,
    /// Per-request timeout. Default 5 s.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_endpoint() -> String {
    "https://graph.microsoft.com".into()
}
fn default_authority() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_true() -> bool {
    true
}
fn default_cache() -> u64 {
    300
}
fn default_timeout() -> u64 {
    5
}

/// Largest Graph response read. 11,000 ids (Graph's documented limit for
/// getMemberObjects) are about 450 KiB.
const MAX_RESPONSE_BYTES: usize = 2 * 1024 * 1024;

/// A caller's groups and when they were fetched, keyed by (tid, oid).
type CachedGroups = (Vec<String>, Instant);

pub struct GraphClient {
    endpoint: String,
    authority: String,
    client_id: String,
    secret: String,
    scope: String,
    security_enabled_only: bool,
    cache_for: Duration,
    http: reqwest::Client,
    /// tid -> (app token, usable until).
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    members: Mutex<HashMap<(String, String), CachedGroups>>,
}

impl std::fmt::Debug for GraphClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("GraphClient")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// Longest `cache_secs`.
const MAX_CACHE_SECS: u64 = 3600;

impl GraphClient {
    pub fn new(c: &GraphConfig, development_idp: bool) -> anyhow::Result<Self> {
        let endpoint = c.endpoint.trim_end_matches('/').to_string();
        let authority = c.authority.trim_end_matches('/').to_string();
        check_url(&endpoint, development_idp)
            .map_err(|e| anyhow::anyhow!("identity.graph.endpoint {endpoint}: {e}"))?;
        check_url(&authority, development_idp)
            .map_err(|e| anyhow::anyhow!("identity.graph.authority {authority}: {e}"))?;
        let secret = match (&c.client_secret_file, &c.client_secret_env) {
            (Some(path), None) => std::fs::read_to_string(path)
                .with_context(|| format!("identity.graph.client_secret_file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string(),
            (None, Some(var)) => std::env::var(var)
                .with_context(|| format!("identity.graph.client_secret_env {var}"))?
                .trim()
                .to_string(),
            _ => bail!("identity.graph: set exactly one of client_secret_file, client_secret_env"),
        };
        if secret.is_empty() {
            bail!("identity.graph: the client secret is empty");
        }
        if c.client_id.trim().is_empty() {
            bail!("identity.graph.client_id: required");
        }
        // A lookup runs inside a login, which `VERIFY_TIMEOUT` bounds.
        let most = super::VERIFY_TIMEOUT.as_secs() / 2;
        if !(1..=most).contains(&c.timeout_secs) {
            bail!(
                "identity.graph.timeout_secs: {} is out of range; allowed: 1 to {most}",
                c.timeout_secs
            );
        }
        // A group removed from a caller keeps working for them as long as
        // the cache holds it (a deny that hangs off a group can be lost
        // the other way round): an hour at most.
        if c.cache_secs > MAX_CACHE_SECS {
            bail!(
                "identity.graph.cache_secs: {} is out of range; allowed: 0 to {MAX_CACHE_SECS}",
                c.cache_secs
            );
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(c.timeout_secs))
            .connect_timeout(Duration::from_secs(c.timeout_secs))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            scope: c
                .scope
                .clone()
                .unwrap_or_else(|| format!("{endpoint}/.default")),
            endpoint,
            authority,
            client_id: c.client_id.clone(),
            secret,
            security_enabled_only: c.security_enabled_only,
            cache_for: Duration::from_secs(c.cache_secs),
            http,
            tokens: Mutex::new(HashMap::new()),
            members: Mutex::new(HashMap::new()),
        })
    }

    /// The caller's group ids, from cache or Graph. The error is a reason
    /// for the refusal message (never contains a secret or token).
    pub async fn member_groups(&self, tid: &str, oid: &str) -> Result<Vec<String>, String> {
        // Both go into URLs: only GUIDs, so nothing can change the path.
        if !super::is_guid(tid) || !super::is_guid(oid) {
            return Err("tid or oid is not a GUID".into());
        }
        let key = (tid.to_string(), oid.to_ascii_lowercase());
        if let Some((groups, at)) = lock(&self.members).get(&key) {
            if at.elapsed() < self.cache_for {
                return Ok(groups.clone());
            }
        }
        let token = self.app_token(tid).await?;
        let url = format!(
            "{}/v1.0/directoryObjects/{oid}/getMemberObjects",
            self.endpoint
        );
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&token)
            .json(&json!({ "securityEnabledOnly": self.security_enabled_only }))
            .send()
            .await
            .map_err(|e| format!("Graph unreachable: {}", without_url(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            // A revoked or expired app token: drop it so the next call gets a new one.
            lock(&self.tokens).remove(tid);
        }
        if !status.is_success() {
            return Err(format!("Graph answered HTTP {status}"));
        }
        let body = read_json(resp).await?;
        let groups: Vec<String> = body
            .get("value")
            .and_then(Value::as_array)
            .ok_or("Graph answer has no value array")?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or("Graph answer holds a non-string id")
            })
            .collect::<Result<_, _>>()?;
        self.remember(key, groups.clone());
        Ok(groups)
    }

    /// Caches a caller's groups. Entries past their time are dropped as
    /// new ones come, so the cache holds at most the callers of one
    /// `cache_secs`, not every caller since the daemon started.
    fn remember(&self, key: (String, String), groups: Vec<String>) {
        let mut members = lock(&self.members);
        let cache_for = self.cache_for;
        members.retain(|_, (_, at)| at.elapsed() < cache_for);
        members.insert(key, (groups, Instant::now()));
    }

    async fn app_token(&self, tid: &str) -> Result<String, String> {
        if let Some((t, until)) = lock(&self.tokens).get(tid) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let url = format!("{}/{tid}/oauth2/v2.0/token", self.authority);
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.secret.as_str()),
            ("scope", self.scope.as_str()),
        ];
        let resp = self
            .http
            .post(&url)
            .form(&form)
            .send()
            .await
            .map_err(|e| format!("token endpoint unreachable: {}", without_url(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            // The OAuth error code (e.g. invalid_client) says what to fix; the
            // body may not even be JSON (a proxy's error page).
            let body = read_json(resp).await.unwrap_or(Value::Null);
            let err = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no error code");
            return Err(format!(
                "token endpoint refused tollgate's credentials ({status}, {err})"
            ));
        }
        let body = read_json(resp).await?;
        let token = body
            .get("access_token")
            .and_then(Value::as_str)
            .ok_or("token endpoint answer has no access_token")?
            .to_string();
        let lifetime = body
            .get("expires_in")
            .and_then(Value::as_u64)
            .unwrap_or(300);
        let until = app_token_usable_until(Instant::now(), lifetime);
        lock(&self.tokens).insert(tid.to_string(), (token.clone(), until));
        Ok(token)
    }
}

/// Longest an app token is reused, whatever `expires_in` says. Entra's
/// last about an hour; the number comes from the network, and a huge one
/// would overflow `Instant` (a panic) or keep a token cached long after a
/// revocation the endpoint would have reflected.
const MAX_APP_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Until when an app token the endpoint said lasts `expires_in` seconds
/// is reused, counting from `now`.
pub(super) fn app_token_usable_until(now: Instant, expires_in: u64) -> Instant {
    // Renewed a minute early so a token never expires between use and
    // arrival; one that lasts less is not reused at all.
    let lifetime = Duration::from_secs(expires_in.saturating_sub(60)).min(MAX_APP_TOKEN_LIFETIME);
    now.checked_add(lifetime).unwrap_or(now)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold only whole entries; a panic elsewhere cannot leave one half-written.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn without_url(e: &reqwest::Error) -> String {
    // reqwest errors embed the URL; keep messages short and stable.
    let mut s = e.to_string();
    if let Some(u) = e.url() {
        s = s
            .replace(&format!(" ({u})"), "")
            .replace(u.as_str(), "<url>");
    }
    s
}

async fn read_json(mut resp: reqwest::Response) -> Result<Value, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| without_url(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err("answer too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|_| "answer is not JSON".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_past_their_time_leave_the_cache_as_others_come() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").expect("write");
        let config: GraphConfig = serde_json::from_value(json!({
            "client_id": "x",
            "client_secret_file": secret,
            "cache_secs": 1,
        }))
        .expect("graph config");
        let client = GraphClient::new(&config, false).expect("client");
        let key = |oid: &str| ("t".to_string(), oid.to_string());
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(2))
            .expect("a host up for two seconds");
        lock(&client.members).insert(key("old"), (vec![], long_ago));
        lock(&client.members).insert(key("recent"), (vec![], Instant::now()));
        client.remember(key("new"), vec!["g".into()]);
        let members = lock(&client.members);
        assert!(
            !members.contains_key(&key("old")),
            "an expired caller stayed"
        );
        assert!(members.contains_key(&key("recent")) && members.contains_key(&key("new")));
    }

    #[test]
    fn a_cache_of_more_than_an_hour_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret\n").expect("write");
        let config = |cache_secs: u64| -> GraphConfig {
            serde_json::from_value(json!({
                "client_id": "x",
                "client_secret_file": secret,
                "cache_secs": cache_secs,
            }))
            .expect("graph config")
        };
        assert!(GraphClient::new(&config(3600), false).is_ok());
        let Err(err) = GraphClient::new(&config(3601), false) else {
            panic!("a cache of 3601 s was taken");
        };
        assert!(err.to_string().contains("cache_secs"), "{err}");
    }
}
