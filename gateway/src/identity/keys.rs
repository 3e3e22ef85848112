//! The signing keys tokens are checked against: loaded from a JWKS file, a
//! JWKS URL or OIDC discovery, cached, refreshed on a schedule and when a
//! token names a kid we do not know (rate limited, so a stream of forged
//! kids cannot turn into a stream of requests to the IdP). A failed refresh
//! keeps the last good set; a successful one replaces it, so withdrawn keys
//! stop working.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    jwk::{Jwk, PublicKeyUse},
    Algorithm, DecodingKey,
};
use serde_json::Value;

/// Largest JWKS or discovery document read (Entra's are a few KiB).
const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// When no key was ever loaded, retry sooner than the normal rate limit, so
/// a daemon started before its IdP does not refuse everyone for a minute.
const EMPTY_RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub enum KeySource {
    File(PathBuf),
    Jwks(String),
    Discovery(String),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "jwks_file {}", p.display()),
            KeySource::Jwks(u) => write!(f, "jwks_uri {u}"),
            KeySource::Discovery(u) => write!(f, "discovery_uri {u}"),
        }
    }
}

pub struct KeyEntry {
    pub key: DecodingKey,
    /// The JWK's `alg`, when it names one: the token must then use exactly it.
    pub alg: Option<Algorithm>,
    /// The JWK's `issuer`, when it names one (Entra's multi-tenant key sets
    /// do, with a `{tenantid}` placeholder): the token's `iss` must then be
    /// it, with the token's tenant in the placeholder.
    pub issuer: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyLoadError {
    #[error("{0}")]
    Fetch(String),
    #[error("{0}")]
    Parse(String),
    #[error("{0}")]
    Refused(String),
}

/// Reads a `jwks_file`: the keys every token is checked against, so only
/// a file its owner alone could have written is trusted. It must be a
/// regular file, owned by root or the daemon's user and writable by no
/// one else, in directories likewise root's or the daemon's and writable
/// by no one else unless sticky (those of the path as written and those
/// where it really leads, through any symlink), and at most
/// [`MAX_DOCUMENT_BYTES`] long. Otherwise anyone who
/// could write it could add a key of their own, and sign tokens for any
/// identity at the next refresh, which any token naming an unknown kid
/// brings on.
pub fn read_key_file(path: &std::path::Path) -> Result<Vec<u8>, KeyLoadError> {
    use std::{
        io::Read,
        os::unix::fs::{MetadataExt, OpenOptionsExt},
    };
    let refuse = |why: String| KeyLoadError::Refused(format!("{}: {why}", path.display()));
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let owned_safely = |meta: &std::fs::Metadata, what: &str| {
        let writable_by_others =
            meta.mode() & 0o022 != 0 && !(meta.is_dir() && meta.mode() & 0o1000 != 0);
        if (meta.uid() != 0 && meta.uid() != uid) || writable_by_others {
            return Err(refuse(format!(
                "{what} is owned by uid {} with mode {:o}: whoever else may write it could add a \
                 signing key of their own; make it root's (or tollgate's) and writable by no one else",
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
        Ok(())
    };
    // Every directory the path goes through, symlinks followed one hop at
    // a time: whoever may write the directory that holds a link may point
    // it elsewhere. Then the file where the path really leads (a
    // Kubernetes secret's file is a symlink), opened without following.
    let fetch = |e: std::io::Error| KeyLoadError::Fetch(format!("reading {}: {e}", path.display()));
    let (real, dirs, links) = resolve_through(path).map_err(fetch)?;
    for dir in &dirs {
        let meta = std::fs::symlink_metadata(dir)
            .map_err(|e| KeyLoadError::Fetch(format!("{}: {e}", dir.display())))?;
        owned_safely(&meta, &format!("its directory {}", dir.display()))?;
    }
    // A link's mode means nothing, but its owner does: in a sticky
    // directory (`/tmp`) anyone may make one, and only its owner may
    // remove it.
    for link in &links {
        let meta = std::fs::symlink_metadata(link)
            .map_err(|e| KeyLoadError::Fetch(format!("{}: {e}", link.display())))?;
        if meta.uid() != 0 && meta.uid() != uid {
            return Err(refuse(format!(
                "the symlink {} is owned by uid {}: whoever made it chose which file holds the keys",
                link.display(),
                meta.uid()
            )));
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)
        .map_err(fetch)?;
    let meta = file.metadata().map_err(fetch)?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    owned_safely(&meta, "the file")?;
    let mut bytes = Vec::new();
    file.take(MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(fetch)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(refuse(format!("longer than {MAX_DOCUMENT_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Where `path` leads, its symlinks followed one hop at a time; every
/// directory passed through on the way (the root included), in order; and
/// every symlink followed.
#[allow(clippy::type_complexity)]
fn resolve_through(
    path: &std::path::Path,
) -> std::io::Result<(
    std::path::PathBuf,
    Vec<std::path::PathBuf>,
    Vec<std::path::PathBuf>,
)> {
    use std::path::{Component, PathBuf};
    let mut pending: std::collections::VecDeque<PathBuf> = std::path::absolute(path)?
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = PathBuf::from("/");
    let mut dirs = vec![at.clone()];
    let mut links = Vec::new();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.components().next() {
            Some(Component::RootDir) => at = PathBuf::from("/"),
            Some(Component::CurDir) | None => {}
            Some(Component::ParentDir) => {
                at.pop();
            }
            Some(Component::Normal(name)) => {
                let next = at.join(name);
                if std::fs::symlink_metadata(&next)?.is_symlink() {
                    hops += 1;
                    if hops > 40 {
                        return Err(std::io::Error::other("too many symlinks"));
                    }
                    let target = std::fs::read_link(&next)?;
                    links.push(next);
                    for c in target.components().rev() {
                        pending.push_front(PathBuf::from(c.as_os_str()));
                    }
                    continue;
                }
                at = next;
                if !pending.is_empty() {
                    dirs.push(at.clone());
                }
            }
            Some(Component::Prefix(_)) => {}
        }
    }
    Ok((at, dirs, links))
}

pub struct KeyStore {
    source: KeySource,
    /// `identity.development_idp`: plain http from loopback is accepted
    /// and the development identity provider's keys are trusted.
    development_idp: bool,
    client: reqwest::Client,
    current: RwLock<Arc<HashMap<String, Arc<KeyEntry>>>>,
    /// When a refresh last succeeded.
    loaded_at: std::sync::Mutex<Option<Instant>>,
    /// Serialises on-demand refreshes and remembers when the last one ran.
    on_demand: tokio::sync::Mutex<Option<Instant>>,
    /// Held for the whole of every refresh, scheduled or on demand: a slow
    /// fetch that began before a key was withdrawn must not finish after a
    /// newer one and put the withdrawn key back (its kid then known, no
    /// on-demand refresh would take it out again before the next
    /// scheduled one).
    refreshing: tokio::sync::Mutex<()>,
    min_interval: Duration,
}

impl KeyStore {
    pub fn new(
        source: KeySource,
        development_idp: bool,
        min_interval: Duration,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            // A redirect could lead from https to somewhere we would not
            // have accepted in the config.
            .redirect(reqwest::redirect::Policy::none())
            // Refreshes are rare; a fresh connection each time also means a
            // stopped IdP is noticed instead of hidden by a pooled socket.
            .pool_max_idle_per_host(0)
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        if let KeySource::Jwks(u) | KeySource::Discovery(u) = &source {
            check_url(u, development_idp).map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
        }
        Ok(Self {
            source,
            development_idp,
            client,
            current: RwLock::new(Arc::new(HashMap::new())),
            loaded_at: std::sync::Mutex::new(None),
            on_demand: tokio::sync::Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
            min_interval,
        })
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    pub fn get(&self, kid: &str) -> Option<Arc<KeyEntry>> {
        self.snapshot().get(kid).cloned()
    }

    /// Whether any refresh has ever succeeded (an empty set can be a
    /// legitimate answer; "never loaded" means the source is unreachable).
    pub fn ever_loaded(&self) -> bool {
        self.age().is_some()
    }

    pub fn kids(&self) -> Vec<String> {
        let mut k: Vec<String> = self.snapshot().keys().cloned().collect();
        k.sort();
        k
    }

    fn snapshot(&self) -> Arc<HashMap<String, Arc<KeyEntry>>> {
        // A poisoned lock only means a writer panicked between two whole
        // Arc swaps; the value inside is still a complete key set.
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Fetches the key set and, when it parses, replaces the cached one.
    /// On any error the cached set is kept.
    pub async fn refresh(&self) -> Result<usize, KeyLoadError> {
        let _one_at_a_time = self.refreshing.lock().await;
        let mut doc = match &self.source {
            KeySource::File(path) => {
                let path = path.clone();
                let bytes = tokio::task::spawn_blocking(move || read_key_file(&path))
                    .await
                    .map_err(|e| KeyLoadError::Fetch(format!("reading the key file: {e}")))??;
                parse_json(&bytes)?
            }
            KeySource::Jwks(url) => self.get_json(url).await?,
            KeySource::Discovery(url) => {
                let meta = self.get_json(url).await?;
                let jwks_uri = meta
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        KeyLoadError::Parse(format!("{url}: discovery document has no jwks_uri"))
                    })?;
                check_url(jwks_uri, self.development_idp)
                    .map_err(|e| KeyLoadError::Refused(format!("jwks_uri {jwks_uri}: {e}")))?;
                self.get_json(jwks_uri).await?
            }
        };
        let development = without_development_keys(&mut doc, self.development_idp);
        if development > 0 {
            tracing::warn!(
                source = %self.source,
                keys = development,
                "development keys (from `tollgate dev`) ignored: they are trusted only with identity.development_idp = true"
            );
        }
        let keys = parse_jwks(&doc)?;
        let n = keys.len();
        if n == 0 {
            tracing::warn!(source = %self.source, "key set has no usable signing key; every token will be refused");
        }
        let mut w = match self.current.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *w = Arc::new(keys);
        drop(w);
        *self.loaded_at_lock() = Some(Instant::now());
        Ok(n)
    }

    fn loaded_at_lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.loaded_at
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How long ago a refresh last succeeded (`None`: never).
    pub fn age(&self) -> Option<Duration> {
        self.loaded_at_lock().map(|at| at.elapsed())
    }

    /// Refreshes when the keys are older than `max_age`, at most once per
    /// `min_interval` (as for an unknown kid); whether they are within
    /// `max_age` afterwards.
    pub async fn refresh_if_older(&self, max_age: Duration) -> bool {
        let fresh = || self.age().is_some_and(|age| age <= max_age);
        self.refresh_on_demand("stale key set", fresh).await;
        fresh()
    }

    /// Refresh triggered by a token whose kid is not cached: at most once per
    /// `min_interval` (concurrent callers wait for the one refresh in flight).
    pub async fn refresh_for_unknown_kid(&self, kid: &str) -> Option<Arc<KeyEntry>> {
        self.refresh_on_demand("unknown kid", || self.get(kid).is_some())
            .await;
        self.get(kid)
    }

    /// A refresh a token asks for (`why`), unless `satisfied` (someone else
    /// may have refreshed while this one waited for the lock); at most once
    /// per `min_interval`, sooner while no key set was ever loaded.
    async fn refresh_on_demand(&self, why: &str, satisfied: impl Fn() -> bool) {
        let mut last = self.on_demand.lock().await;
        if satisfied() {
            return;
        }
        let interval = if self.ever_loaded() {
            self.min_interval
        } else {
            self.min_interval.min(EMPTY_RETRY)
        };
        if last.is_some_and(|t| t.elapsed() < interval) {
            return;
        }
        *last = Some(Instant::now());
        match self.refresh().await {
            Ok(n) => tracing::info!(source = %self.source, keys = n, why, "key set refreshed"),
            Err(e) => {
                tracing::warn!(source = %self.source, error = %e, why, "key refresh failed; keeping the cached keys")
            }
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, KeyLoadError> {
        let fetch = |e: reqwest::Error| KeyLoadError::Fetch(format!("{url}: {e}"));
        let mut resp = self.client.get(url).send().await.map_err(fetch)?;
        if !resp.status().is_success() {
            return Err(KeyLoadError::Fetch(format!(
                "{url}: HTTP {}",
                resp.status()
            )));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(fetch)? {
            if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                return Err(KeyLoadError::Parse(format!(
                    "{url}: document larger than 1 MiB"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        parse_json(&body).map_err(|e| KeyLoadError::Parse(format!("{url}: {e}")))
    }
}

pub fn parse_json(bytes: &[u8]) -> Result<Value, KeyLoadError> {
    serde_json::from_slice(bytes).map_err(|e| KeyLoadError::Parse(format!("not JSON: {e}")))
}

/// The JWK member that marks a key of tollgate's development identity
/// provider (see `dev::keyring`).
pub const DEVELOPMENT_KEY_MEMBER: &str = "x-tollgate-development-key";

/// Takes the development identity provider's keys out of `doc`, unless
/// `development_idp` allows them; how many were taken.
pub fn without_development_keys(doc: &mut Value, development_idp: bool) -> usize {
    if development_idp {
        return 0;
    }
    let Some(keys) = doc.get_mut("keys").and_then(Value::as_array_mut) else {
        return 0;
    };
    let before = keys.len();
    keys.retain(|k| k.get(DEVELOPMENT_KEY_MEMBER).is_none());
    before - keys.len()
}

/// Usable signing keys of a JWKS by kid. Keys we cannot use (other types,
/// encryption keys, no kid) are skipped, not fatal: Entra may add key types
/// a validator does not know.
pub fn parse_jwks(doc: &Value) -> Result<HashMap<String, Arc<KeyEntry>>, KeyLoadError> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| KeyLoadError::Parse("JWKS has no \"keys\" array".into()))?;
    let mut out = HashMap::new();
    for k in keys {
        let Some(kid) = k.get("kid").and_then(Value::as_str) else {
            tracing::debug!("skipping a JWK without kid");
            continue;
        };
        let jwk: Jwk = match serde_json::from_value(k.clone()) {
            Ok(j) => j,
            Err(e) => {
                tracing::debug!(kid, error = %e, "skipping an unsupported JWK");
                continue;
            }
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        // An alg we do not know (e.g. an encryption alg) means the key is not for us.
        let alg = match k.get("alg").and_then(Value::as_str) {
            None => None,
            Some(a) => match Algorithm::from_str(a) {
                Ok(a) => Some(a),
                Err(_) => continue,
            },
        };
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(k) => k,
            Err(e) => {
                tracing::debug!(kid, error = %e, "skipping an unusable JWK");
                continue;
            }
        };
        // An `issuer` that is not a string cannot be honoured: the key is
        // not used, rather than used for every issuer. One that is null or
        // blank restricts nothing, as for Microsoft's validator.
        let issuer = match k.get("issuer") {
            None | Some(Value::Null) => None,
            Some(Value::String(issuer)) if issuer.trim().is_empty() => None,
            Some(Value::String(issuer)) => Some(issuer.clone()),
            Some(_) => {
                tracing::debug!(kid, "skipping a JWK whose issuer is not a string");
                continue;
            }
        };
        out.insert(kid.to_string(), Arc::new(KeyEntry { key, alg, issuer }));
    }
    Ok(out)
}

/// Whether a URL's host (`u.host_str()`: an IPv6 address in brackets) is
/// this host's loopback: a loopback address (IPv4-mapped too), or
/// `localhost`.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    match bare_ip(host) {
        Some(ip) => ip.is_loopback(),
        None => host.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
    }
}

/// A URL host's address, when it is one (IPv4-mapped as IPv4).
pub(crate) fn bare_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

/// Keys come over https; plain http only from loopback and only when the
/// development IdP is explicitly enabled.
pub fn check_url(url: &str, development_idp: bool) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    match u.scheme() {
        "https" => Ok(()),
        "http" => {
            if !is_loopback_host(u.host_str().unwrap_or("")) {
                Err("plain http is accepted only from a loopback address".into())
            } else if !development_idp {
                Err("plain http from loopback requires development_idp = true".into())
            } else {
                Ok(())
            }
        }
        other => Err(format!("scheme {other} is not http(s)")),
    }
}
