//! Who is calling: validates a Microsoft Entra access token and turns it into
//! a [`Principal`]. Every protocol adapter calls [`Verifier::verify`] with the
//! credential its protocol already carries (PostgreSQL password, SSH
//! password, HTTP bearer).
//!
//! The order of checks is deliberate: size and shape first (cheap, before
//! any parsing of attacker bytes), then the header (alg, kid), then the
//! signature, and only then the claims, so nothing unsigned decides which
//! refusal a caller sees beyond "bad signature". The token itself is never
//! logged or stored; [`Principal::token_fingerprint`] identifies it.

mod graph;
mod keys;
pub use keys::DEVELOPMENT_KEY_MEMBER;
mod token;

#[cfg(test)]
pub(crate) mod forged_tests;
#[cfg(test)]
mod graph_tests;
#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
pub(crate) mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    str::FromStr,
    sync::{Arc, Weak},
    time::Duration,
};

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use graph::GraphClient;
pub use graph::GraphConfig;
use keys::KeyStore;
pub use keys::{check_url, KeySource};
pub use token::MAX_TOKEN_BYTES;
use token::{Claims, RawToken};

/// Identity provider settings (`[identity]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Tenant ids (GUIDs) whose tokens are accepted.
    pub tenants: Vec<String>,
    /// Accepted `aud` values: tollgate's client id (GUID) and/or its App ID
    /// URI (`api://...`). A trailing slash on either side is ignored.
    pub audiences: Vec<String>,
    /// Token versions accepted: 2 (`login.microsoftonline.com/{tid}/v2.0`)
    /// and/or 1 (`sts.windows.net/{tid}/`). Default: [2].
    #[serde(default = "default_versions")]
    pub token_versions: Vec<u8>,
    /// v2 issuer template; `{tenantid}` is replaced by the token's tid.
    #[serde(default = "default_issuer_v2")]
    pub issuer_v2: String,
    /// v1 issuer template; `{tenantid}` is replaced by the token's tid.
    #[serde(default = "default_issuer_v1")]
    pub issuer_v1: String,
    /// Where signing keys come from: exactly one of these three.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// OIDC metadata URL; its `jwks_uri` is followed on every refresh.
    #[serde(default)]
    pub discovery_uri: Option<String>,
    /// JWS algorithms accepted. Default: ["RS256"] (what Entra uses).
    #[serde(default = "default_algorithms")]
    pub allowed_algorithms: Vec<String>,
    /// Tolerance on exp/nbf/iat. Default 300 s, as Microsoft's libraries.
    #[serde(default = "default_skew")]
    pub clock_skew_secs: u64,
    /// Refuse tokens issued (iat) longer ago than this. Default: no limit
    /// beyond exp.
    #[serde(default)]
    pub max_token_age_secs: Option<u64>,
    /// Scheduled key refresh. Default 86400 s (Microsoft: daily).
    #[serde(default = "default_refresh")]
    pub jwks_refresh_secs: u64,
    /// Minimum time between refreshes triggered by an unknown kid. Default 60 s.
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh_secs: u64,
    /// How long the cached keys are trusted without a successful refresh.
    /// Default 259200 s (3 days).
    #[serde(default = "default_max_stale")]
    pub jwks_max_stale_secs: u64,
    /// Accept keys from the built-in development IdP (plain http on
    /// loopback). Never in production.
    #[serde(default)]
    pub development_idp: bool,
    /// What happens to a connection when its token expires: `end` (default;
    /// the client gets a protocol-native error and must reconnect with a
    /// fresh token) or `keep` (the session outlives the token).
    #[serde(default)]
    pub session_expiry: SessionExpiry,
    /// Seconds a session may outlive its token's `exp` before it is ended.
    #[serde(default)]
    pub session_grace_secs: u64,
    /// Delegated (user) tokens must carry one of these scopes in `scp`,
    /// e.g. `["access_as_user"]`. Empty (default): not checked.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// App-only tokens must carry at least one app role (`roles`): with
    /// *Assignment required* off, Entra gives any service principal of the
    /// tenant a token for tollgate, with no role in it. Default: false.
    #[serde(default)]
    pub app_tokens_need_a_role: bool,
    /// tollgate role name -> who holds it.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleRule>,
    /// Group overage lookup; without it, overage tokens are refused.
    #[serde(default)]
    pub graph: Option<GraphConfig>,
}

/// Who holds one tollgate role: any match grants it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleRule {
    /// Entra group object ids (the `groups` claim).
    #[serde(default)]
    pub groups: Vec<String>,
    /// App role values (the `roles` claim).
    #[serde(default)]
    pub app_roles: Vec<String>,
    /// Client application ids (azp/appid) of app-only tokens: the
    /// application itself, not a user signed in through it.
    #[serde(default)]
    pub apps: Vec<String>,
    /// Caller object ids (oid).
    #[serde(default)]
    pub object_ids: Vec<String>,
    /// Tenants whose callers the rule applies to. Empty: `object_ids`
    /// that are GUIDs (an `oid` is Entra's, unique everywhere) match in
    /// any configured tenant; `groups`, `app_roles` and `apps` only in the
    /// home tenant (the first of `identity.tenants`). Another tenant's
    /// administrator can assign an app role of the same value, and can
    /// name a group anything, a GUID of the home tenant's included, which
    /// a `groups` claim of names then carries.
    #[serde(default)]
    pub tenants: Vec<String>,
}

fn default_versions() -> Vec<u8> {
    vec![2]
}
fn default_issuer_v2() -> String {
    "https://login.microsoftonline.com/{tenantid}/v2.0".into()
}
fn default_issuer_v1() -> String {
    "https://sts.windows.net/{tenantid}/".into()
}
fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}
fn default_skew() -> u64 {
    300
}
fn default_refresh() -> u64 {
    86_400
}
/// See [`IdentityConfig::session_expiry`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionExpiry {
    #[default]
    End,
    Keep,
}

fn default_min_refresh() -> u64 {
    60
}

fn default_max_stale() -> u64 {
    3 * 86_400
}

impl IdentityConfig {
    /// The ports of the identity provider's URLs (keys, metadata, Graph
    /// and its token endpoint) that are on this host. An agent that held
    /// one while the service behind it is down (the development IdP is
    /// plain http on loopback) would answer tollgate's next key fetch with
    /// keys of its own, and mint tokens for anyone: these ports are kept
    /// from agents as the listeners' are (`pin::ports`).
    pub fn local_ports(&self) -> BTreeSet<u16> {
        let graph = self.graph.iter().flat_map(|g| [&g.endpoint, &g.authority]);
        self.jwks_uri
            .iter()
            .chain(&self.discovery_uri)
            .chain(graph)
            .filter_map(|url| reqwest::Url::parse(url).ok())
            .filter(|url| {
                // Loopback, and the names and address that reach it too.
                let host = url.host_str().unwrap_or_default();
                keys::is_loopback_host(host)
                    || keys::bare_ip(host).is_some_and(|ip| ip.is_unspecified())
                    || host
                        .trim_end_matches('.')
                        .to_ascii_lowercase()
                        .ends_with(".localhost")
            })
            .filter_map(|url| url.port_or_known_default())
            .filter(|&port| port != 0)
            .collect()
    }
}

/// Audiences of Microsoft Graph (and the retired Azure AD Graph) in every
/// cloud. Their tokens are not meant for third parties to validate; one
/// presented to tollgate is a token for someone else (confused deputy).
const GRAPH_AUDIENCES: &[&str] = &[
    "00000003-0000-0000-c000-000000000000",
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
    "00000002-0000-0000-c000-000000000000",
    "https://graph.windows.net",
];

fn is_graph_audience(aud: &str) -> bool {
    let a = aud.trim_end_matches('/');
    GRAPH_AUDIENCES.iter().any(|g| g.eq_ignore_ascii_case(a))
}

/// Delegated (a user, through a client app) or app-only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PrincipalKind {
    #[default]
    User,
    App,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::User => "user",
            PrincipalKind::App => "app",
        }
    }
}

/// The caller, as proven by a validated token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    /// tid. With object_id, the stable key of the caller.
    pub tenant_id: String,
    /// oid: the user or service principal.
    pub object_id: String,
    /// azp (v2) / appid (v1): the client application.
    pub app_id: String,
    /// upn / preferred_username / name: for display and audit only, never
    /// for decisions (users can change them).
    pub display_name: String,
    pub groups: Vec<String>,
    /// App roles (`roles` claim).
    pub roles: Vec<String>,
    /// uti: Entra's unique token id.
    pub token_id: String,
    /// Hex SHA-256 of the token as presented (after trimming).
    pub token_fingerprint: String,
    /// Token expiry, seconds since the epoch.
    pub expires_at: i64,
    /// Token issue time (iat), seconds since the epoch; 0 when absent.
    pub issued_at: i64,
    pub kind: PrincipalKind,
    /// Delegated scopes (`scp`); empty for app tokens.
    pub scopes: Vec<String>,
    /// Roles from `[identity.roles]`: the only roles policy sees.
    pub tollgate_roles: Vec<String>,
    /// 1 or 2.
    pub token_version: u8,
}

/// Why a token was refused. `Display` is the human reason; [`code`](Self::code)
/// is a short stable machine reason for audit rows and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no token presented")]
    Missing,
    #[error("token is {0} bytes, more than the {MAX_TOKEN_BYTES} accepted")]
    Oversized(usize),
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    #[error("token {0} is not base64url")]
    BadEncoding(&'static str),
    #[error("token {0} is not a JSON object")]
    BadJson(&'static str),
    #[error("token {0} has a duplicate member")]
    DuplicateMember(&'static str),
    #[error("algorithm {0} is not accepted")]
    AlgNotAllowed(String),
    #[error("token header has no kid")]
    MissingKid,
    #[error("token header has a crit member, which is not supported")]
    UnsupportedCrit,
    #[error("no signing key with kid {0}")]
    UnknownKid(String),
    #[error("the signing key does not match algorithm {0}")]
    KeyAlgMismatch(String),
    #[error("no signing keys available (key source unreachable and nothing cached)")]
    KeysUnavailable,
    #[error("the signing keys were last refreshed {secs} s ago, longer than jwks_max_stale_secs")]
    KeysStale { secs: u64 },
    #[error("signature does not verify")]
    BadSignature,
    #[error("token expired at {exp} (now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("token issued in the future ({iat}, now {now})")]
    IssuedInFuture { iat: i64, now: i64 },
    #[error("token issued at {iat} is older than the {max_age} s accepted")]
    TooOld { iat: i64, max_age: u64 },
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    #[error("claim {0} has the wrong type")]
    BadClaimType(&'static str),
    #[error("issuer {0} is not an accepted Entra issuer")]
    BadIssuer(String),
    #[error("issuer {iss} does not belong to tenant {tid}")]
    IssuerTenantMismatch { iss: String, tid: String },
    #[error("issuer {iss} is not the issuer the signing key is for ({key_issuer})")]
    KeyIssuerMismatch { iss: String, key_issuer: String },
    #[error("v{0} tokens are not accepted")]
    VersionNotAccepted(u8),
    #[error("tenant {0} is not allowed")]
    TenantNotAllowed(String),
    #[error("audience {0} is not accepted")]
    BadAudience(String),
    #[error("token is for Microsoft Graph ({0}), not for tollgate")]
    GraphAudience(String),
    #[error("app-only token (idtyp=app) carries delegated scopes")]
    InconsistentKind,
    #[error("the token was issued to tollgate's own application (identity.graph.client_id), which is no agent")]
    OwnApplication,
    #[error(
        "caller has too many groups for the token (overage) and no Graph lookup is configured"
    )]
    GroupsOverage,
    #[error("group overage lookup failed: {0}")]
    GroupsLookupFailed(String),
    #[error("the token could not be verified within {} s", VERIFY_TIMEOUT.as_secs())]
    TimedOut,
    #[error("delegated token carries none of the required scopes ({0})")]
    ScopeMissing(String),
    #[error("app-only token carries no app role, and tollgate requires one")]
    AppRoleMissing,
}

/// How long verifying one token may take (key refreshes and the Graph
/// lookup included) before the login is refused: a slow identity provider
/// must not hold unauthenticated connections open.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(20);

impl IdentityError {
    /// Short stable machine reason.
    pub fn code(&self) -> &'static str {
        use IdentityError::*;
        match self {
            TimedOut => "verify_timeout",
            ScopeMissing(_) => "scope_missing",
            AppRoleMissing => "app_role_missing",
            Missing => "missing_token",
            Oversized(_) => "oversized",
            Malformed(_) => "malformed",
            BadEncoding(_) => "bad_encoding",
            BadJson(_) => "bad_json",
            DuplicateMember(_) => "duplicate_member",
            AlgNotAllowed(_) => "alg_not_allowed",
            MissingKid => "missing_kid",
            UnsupportedCrit => "unsupported_crit",
            UnknownKid(_) => "unknown_kid",
            KeyAlgMismatch(_) => "key_alg_mismatch",
            KeysUnavailable => "keys_unavailable",
            KeysStale { .. } => "keys_stale",
            BadSignature => "bad_signature",
            Expired { .. } => "expired",
            NotYetValid { .. } => "not_yet_valid",
            IssuedInFuture { .. } => "issued_in_future",
            TooOld { .. } => "too_old",
            MissingClaim(_) => "missing_claim",
            BadClaimType(_) => "bad_claim_type",
            BadIssuer(_) => "bad_issuer",
            IssuerTenantMismatch { .. } => "issuer_tenant_mismatch",
            KeyIssuerMismatch { .. } => "key_issuer_mismatch",
            VersionNotAccepted(_) => "version_not_accepted",
            TenantNotAllowed(_) => "tenant_not_allowed",
            BadAudience(_) => "bad_audience",
            GraphAudience(_) => "graph_audience",
            InconsistentKind => "inconsistent_kind",
            OwnApplication => "own_application",
            GroupsOverage => "groups_overage",
            GroupsLookupFailed(_) => "groups_lookup_failed",
        }
    }

    /// What the client is told. A failure on tollgate's side (its key
    /// source or Graph unreachable, a lookup's error) is the operator's
    /// business, kept in the log and the audit: an unauthenticated client
    /// learns only that its token could not be verified now.
    pub fn client_message(&self) -> String {
        match self {
            IdentityError::KeysUnavailable
            | IdentityError::KeysStale { .. }
            | IdentityError::GroupsLookupFailed(_)
            | IdentityError::TimedOut => format!(
                "the token could not be verified now ({}); try again later",
                self.code()
            ),
            _ => self.to_string(),
        }
    }
}

/// Claim values echoed into messages are attacker-chosen (and read
/// before any signature is checked): keep them short, and write their
/// control characters escaped, so that one cannot forge a line of the
/// daemon's log or send a terminal escape to whoever reads it.
fn clip(s: &str) -> String {
    const MAX: usize = 96;
    let mut end = s.len().min(MAX);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 3);
    for c in s[..end].chars() {
        // Control characters, and the line separators and bidirectional
        // overrides that viewers render as line breaks or reorderings.
        let unsafe_to_show = c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
        if unsafe_to_show {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if end < s.len() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod clip_tests {
    /// A value echoed from a token is cut at 96 bytes and its control
    /// characters come out escaped: no line break or escape sequence of
    /// the sender's reaches a log line.
    #[test]
    fn echoed_values_are_short_and_have_no_control_characters() {
        let forged = super::clip("x\n2026-01-01T00:00:00Z  INFO tollgate: authenticated\u{1b}[2J");
        assert!(!forged.chars().any(char::is_control), "{forged:?}");
        let reordered = super::clip("kid\u{202E}gnp.exe\u{2028}x");
        assert!(
            reordered.contains("\\u{202e}") && reordered.contains("\\u{2028}"),
            "{reordered:?}"
        );
        assert!(forged.starts_with("x\\n2026"), "{forged:?}");
        assert_eq!(super::clip("kid-1"), "kid-1");
        let long = super::clip(&"é".repeat(100));
        assert!(long.ends_with("...") && long.len() <= 99, "{long}");
    }
}

/// An issuer template split around `{tenantid}`.
#[derive(Debug, Clone)]
struct IssuerTemplate {
    prefix: String,
    suffix: String,
}

impl IssuerTemplate {
    fn parse(key: &str, t: &str) -> anyhow::Result<Self> {
        let Some((prefix, suffix)) = t.split_once("{tenantid}") else {
            bail!("identity.{key}: {t:?} has no {{tenantid}} placeholder");
        };
        if suffix.contains("{tenantid}") {
            bail!("identity.{key}: {t:?} has more than one {{tenantid}}");
        }
        Ok(Self {
            prefix: prefix.into(),
            suffix: suffix.into(),
        })
    }

    /// The tenant part of `iss` if it has this template's shape.
    fn tenant_of<'a>(&self, iss: &'a str) -> Option<&'a str> {
        iss.strip_prefix(self.prefix.as_str())?
            .strip_suffix(self.suffix.as_str())
    }
}

/// The validated, normalised form of [`IdentityConfig`].
#[derive(Debug)]
struct Settings {
    tenants: BTreeSet<String>,
    /// The first of `identity.tenants` (see [`RoleRule::tenants`]).
    home_tenant: String,
    audiences: Vec<String>,
    versions: Vec<u8>,
    issuer_v2: IssuerTemplate,
    issuer_v1: IssuerTemplate,
    algorithms: Vec<Algorithm>,
    skew: i64,
    max_age: Option<u64>,
    roles: BTreeMap<String, RoleRule>,
    /// Scheduled key refresh period.
    refresh_every: Duration,
    /// How long keys are trusted without a successful refresh.
    max_stale: Duration,
    /// Seconds a session may outlive its token.
    session_grace: i64,
    required_scopes: Vec<String>,
    app_tokens_need_a_role: bool,
    /// tollgate's own client id (the Graph lookup's): whoever holds its
    /// secret could get a token for tollgate as tollgate itself.
    own_client_id: Option<String>,
}

/// Bounds of `jwks_refresh_secs`. Withdrawn keys stay trusted until the
/// next refresh, so a week is the most allowed; without a bound a huge
/// value also overflows the timer of the refresh task, which panics.
const JWKS_REFRESH_SECS: std::ops::RangeInclusive<u64> = 1..=7 * 86_400;

/// Bounds of `jwks_max_stale_secs`: keys the IdP withdrew (a compromised
/// key among them) are trusted for as long as no refresh succeeds, so
/// not for ever.
const JWKS_MAX_STALE_SECS: std::ops::RangeInclusive<u64> = 1..=30 * 86_400;

/// Most allowed for `session_grace_secs`: a day past a token's expiry.
/// Sessions meant to outlive their tokens say so with `session_expiry =
/// "keep"`; a larger number would also wrap to a negative deadline.
const MAX_SESSION_GRACE_SECS: u64 = 86_400;
/// Upper bound of `clock_skew_secs`: a larger tolerance would all but
/// switch off `exp` (Microsoft's libraries use 300).
const MAX_CLOCK_SKEW_SECS: u64 = 600;

fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

impl Settings {
    fn from_config(c: &IdentityConfig) -> anyhow::Result<Self> {
        if c.tenants.is_empty() {
            bail!("identity.tenants: at least one tenant id is required");
        }
        let mut tenants = BTreeSet::new();
        for t in &c.tenants {
            if !is_guid(t) {
                bail!("identity.tenants: {t:?} is not a tenant id (GUID)");
            }
            tenants.insert(t.to_ascii_lowercase());
        }
        let home_tenant = c.tenants[0].to_ascii_lowercase();
        let mut roles = c.roles.clone();
        for (name, rule) in &mut roles {
            for t in &mut rule.tenants {
                *t = t.to_ascii_lowercase();
                if !tenants.contains(t.as_str()) {
                    bail!("identity.roles.{name}.tenants: {t:?} is not one of identity.tenants");
                }
            }
        }
        for scope in &c.required_scopes {
            // `scp` holds bare names; the full `api://.../name` form (what
            // a client asks for) would never match and refuse every user.
            if scope.is_empty() || scope.contains('/') || scope.contains(char::is_whitespace) {
                bail!(
                    "identity.required_scopes: {scope:?} is not allowed: give scope names as \
                     tokens carry them in scp (e.g. \"access_as_user\", not \
                     \"api://tollgate/access_as_user\")"
                );
            }
        }
        if c.audiences.is_empty() {
            bail!("identity.audiences: at least one audience is required");
        }
        for a in &c.audiences {
            if a.trim().is_empty() {
                bail!("identity.audiences: empty audience");
            }
            if is_graph_audience(a) {
                bail!("identity.audiences: {a:?} is Microsoft Graph; Graph tokens are not for tollgate");
            }
        }
        let audiences = c
            .audiences
            .iter()
            .map(|a| a.trim_end_matches('/').to_string())
            .collect();
        if c.token_versions.is_empty() || c.token_versions.iter().any(|v| *v != 1 && *v != 2) {
            bail!("identity.token_versions: must list 1 and/or 2");
        }
        let mut algorithms = Vec::new();
        for name in &c.allowed_algorithms {
            let alg = Algorithm::from_str(name).map_err(|_| {
                anyhow::anyhow!("identity.allowed_algorithms: unknown algorithm {name:?}")
            })?;
            // Symmetric algorithms would let anyone holding the public key
            // (which is public) forge tokens; EdDSA is not used by Entra.
            if !matches!(alg.family(), AlgorithmFamily::Rsa | AlgorithmFamily::Ec) {
                bail!("identity.allowed_algorithms: {name} is not an asymmetric RSA/EC algorithm");
            }
            algorithms.push(alg);
        }
        if algorithms.is_empty() {
            bail!("identity.allowed_algorithms: at least one algorithm is required");
        }
        if !JWKS_REFRESH_SECS.contains(&c.jwks_refresh_secs) {
            bail!(
                "identity.jwks_refresh_secs: {} is out of range; allowed: {} to {} (7 days)",
                c.jwks_refresh_secs,
                JWKS_REFRESH_SECS.start(),
                JWKS_REFRESH_SECS.end()
            );
        }
        if c.clock_skew_secs > MAX_CLOCK_SKEW_SECS {
            bail!(
                "identity.clock_skew_secs: {} is out of range; allowed: 0 to {MAX_CLOCK_SKEW_SECS}",
                c.clock_skew_secs
            );
        }
        if !(1..=86_400).contains(&c.jwks_min_refresh_secs) {
            bail!(
                "identity.jwks_min_refresh_secs: {} is out of range; allowed: 1 to 86400 \
                 (tokens with an unknown kid fetch the keys at most this often)",
                c.jwks_min_refresh_secs
            );
        }
        if !c.required_scopes.is_empty() && !c.app_tokens_need_a_role {
            tracing::warn!(
                "identity.required_scopes holds delegated tokens to a scope, but app-only tokens carry none \
                 and pass without one; set app_tokens_need_a_role = true to hold them to an app role"
            );
        }
        if !JWKS_MAX_STALE_SECS.contains(&c.jwks_max_stale_secs) {
            bail!(
                "identity.jwks_max_stale_secs: {} is out of range; allowed: {} to {} (30 days)",
                c.jwks_max_stale_secs,
                JWKS_MAX_STALE_SECS.start(),
                JWKS_MAX_STALE_SECS.end()
            );
        }
        // Stale keys are refreshed on demand at most once per
        // jwks_min_refresh_secs: keys that went stale sooner would refuse
        // every login until the next refresh was allowed.
        if c.jwks_max_stale_secs < c.jwks_min_refresh_secs {
            bail!(
                "identity.jwks_max_stale_secs: {} is less than jwks_min_refresh_secs ({}): keys would go \
                 stale before tollgate may fetch them again, and logins be refused meanwhile",
                c.jwks_max_stale_secs,
                c.jwks_min_refresh_secs
            );
        }
        if c.session_grace_secs > MAX_SESSION_GRACE_SECS {
            bail!(
                "identity.session_grace_secs: {} is out of range; allowed: 0 to \
                 {MAX_SESSION_GRACE_SECS} (1 day); for sessions that outlive their tokens, \
                 set session_expiry = \"keep\"",
                c.session_grace_secs
            );
        }
        Ok(Self {
            tenants,
            home_tenant,
            audiences,
            versions: c.token_versions.clone(),
            issuer_v2: IssuerTemplate::parse("issuer_v2", &c.issuer_v2)?,
            issuer_v1: IssuerTemplate::parse("issuer_v1", &c.issuer_v1)?,
            algorithms,
            skew: i64::try_from(c.clock_skew_secs).context("identity.clock_skew_secs")?,
            max_age: c.max_token_age_secs,
            roles,
            refresh_every: Duration::from_secs(c.jwks_refresh_secs),
            max_stale: Duration::from_secs(c.jwks_max_stale_secs),
            required_scopes: c.required_scopes.clone(),
            own_client_id: c.graph.as_ref().map(|g| g.client_id.clone()),
            app_tokens_need_a_role: c.app_tokens_need_a_role,
            session_grace: i64::try_from(c.session_grace_secs)
                .context("identity.session_grace_secs")?,
        })
    }
}

fn key_source(c: &IdentityConfig) -> anyhow::Result<KeySource> {
    match (&c.jwks_uri, &c.jwks_file, &c.discovery_uri) {
        (Some(u), None, None) => Ok(KeySource::Jwks(u.clone())),
        (None, Some(p), None) => Ok(KeySource::File(p.clone())),
        (None, None, Some(u)) => Ok(KeySource::Discovery(u.clone())),
        _ => bail!("identity: set exactly one of jwks_uri, jwks_file, discovery_uri"),
    }
}

struct Inner {
    settings: Settings,
    keys: KeyStore,
    graph: Option<GraphClient>,
}

/// Validates tokens. Cheap to share: clone it or keep it behind an `Arc`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
    /// When a session must end, relative to its token's expiry.
    session_expiry: SessionExpiry,
}

// Many sessions share one verifier across tasks.
const _: fn() = || {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<Verifier>();
};

impl Verifier {
    /// What `from_config` would refuse, without starting anything or using
    /// the network: the settings, the key source and its URL, the Graph
    /// client, and a `jwks_file`'s keys (for `tollgate check-config`, and
    /// `tollgate run` before it pins anything). Stricter in one respect: a
    /// `jwks_file` holding development keys without `development_idp` is
    /// refused here, where `from_config` alone would drop those keys with a
    /// warning (as it does with keys fetched from a URL).
    pub fn check(config: &IdentityConfig) -> anyhow::Result<()> {
        Settings::from_config(config)?;
        let source = key_source(config)?;
        // The key store `from_config` builds checks the key URL; building
        // it uses no network.
        KeyStore::new(
            source.clone(),
            config.development_idp,
            Duration::from_secs(config.jwks_min_refresh_secs),
        )?;
        if let Some(g) = &config.graph {
            GraphClient::new(g, config.development_idp)?;
        }
        if let KeySource::File(path) = &source {
            let loaded = keys::read_key_file(path).and_then(|bytes| {
                let mut doc = keys::parse_json(&bytes)?;
                if keys::without_development_keys(&mut doc, config.development_idp) > 0 {
                    return Err(keys::KeyLoadError::Refused(
                        "it holds development keys (from `tollgate dev`), trusted only with \
                             development_idp = true"
                            .into(),
                    ));
                }
                keys::parse_jwks(&doc)
            });
            if let Err(e) = loaded {
                anyhow::bail!("identity.jwks_file: {e}");
            }
        }
        Ok(())
    }

    /// Builds a verifier, loads the keys once and starts the scheduled
    /// refresh (which ends when the last clone of the verifier is dropped).
    /// Bad settings fail here; an unreachable key endpoint does not (tokens
    /// are refused until keys arrive), but an unreadable `jwks_file` does.
    pub async fn from_config(config: &IdentityConfig) -> anyhow::Result<Verifier> {
        let settings = Settings::from_config(config)?;
        let source = key_source(config)?;
        if config.development_idp {
            tracing::warn!(
                "identity.development_idp = true: keys from the built-in development IdP are \
                 trusted; this must NEVER be used in production"
            );
        }
        // Before any network use, so every configuration error stops start-up.
        let graph = match &config.graph {
            Some(g) => Some(GraphClient::new(g, config.development_idp)?),
            None => None,
        };
        let keys = KeyStore::new(
            source.clone(),
            config.development_idp,
            Duration::from_secs(config.jwks_min_refresh_secs),
        )?;
        match keys.refresh().await {
            Ok(n) => tracing::info!(source = %source, keys = n, "identity keys loaded"),
            Err(e) if matches!(source, KeySource::File(_)) => {
                return Err(anyhow::anyhow!("identity.jwks_file: {e}"));
            }
            Err(e) => tracing::warn!(
                source = %source, error = %e,
                "identity keys not loaded yet; tokens are refused until a refresh succeeds"
            ),
        }
        let refresh_every = settings.refresh_every;
        let inner = Arc::new(Inner {
            settings,
            keys,
            graph,
        });
        spawn_refresh(Arc::downgrade(&inner), refresh_every);
        Ok(Verifier {
            inner,
            session_expiry: config.session_expiry,
        })
    }

    /// When a session authenticated as `principal` must end (seconds since
    /// the epoch), or None when sessions outlive their tokens.
    pub fn session_deadline(&self, principal: &Principal) -> Option<i64> {
        match self.session_expiry {
            SessionExpiry::End => Some(
                principal
                    .expires_at
                    .saturating_add(self.inner.settings.session_grace),
            ),
            SessionExpiry::Keep => None,
        }
    }

    /// `principal`, if a session of it would last past now: a token
    /// accepted within the clock skew after its `exp` whose session would
    /// end at once (`session_expiry = "end"` with less grace than skew) is
    /// refused as expired, rather than logged in, connected upstream and
    /// cut off.
    pub fn session_may_start(&self, principal: Principal) -> Result<Principal, IdentityError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match self.session_deadline(&principal) {
            Some(deadline) if deadline <= now => Err(IdentityError::Expired {
                exp: principal.expires_at,
                now,
            }),
            _ => Ok(principal),
        }
    }

    /// Reloads the keys now (admin action, tests). Keeps the cached keys on failure.
    pub async fn refresh_keys(&self) -> anyhow::Result<usize> {
        Ok(self.inner.keys.refresh().await?)
    }

    /// Kids currently cached, sorted.
    pub fn cached_kids(&self) -> Vec<String> {
        self.inner.keys.kids()
    }

    /// Validates `token` (surrounding whitespace ignored) within
    /// [`VERIFY_TIMEOUT`] and returns who it proves.
    pub async fn verify(&self, token: &str) -> Result<Principal, IdentityError> {
        tokio::time::timeout(VERIFY_TIMEOUT, self.verify_untimed(token))
            .await
            .unwrap_or(Err(IdentityError::TimedOut))
    }

    async fn verify_untimed(&self, token: &str) -> Result<Principal, IdentityError> {
        let token = token.trim();
        let raw = RawToken::parse(token)?;
        let s = &self.inner.settings;

        // Header.
        let header = Claims(&raw.header);
        let alg_name = header
            .opt_str("alg")
            .map_err(|_| IdentityError::AlgNotAllowed("(not a string)".into()))?;
        let alg_name =
            alg_name.ok_or_else(|| IdentityError::AlgNotAllowed("(none given)".into()))?;
        let alg = Algorithm::from_str(alg_name)
            .ok()
            .filter(|a| s.algorithms.contains(a))
            .ok_or_else(|| IdentityError::AlgNotAllowed(clip(alg_name)))?;
        if raw.header.contains_key("crit") {
            return Err(IdentityError::UnsupportedCrit);
        }
        let kid = match header.opt_str("kid") {
            Ok(Some(k)) if !k.is_empty() => k,
            _ => return Err(IdentityError::MissingKid),
        };

        // Keys no refresh has confirmed for too long may include ones the
        // IdP withdrew: one refresh is tried (rate limited), and without
        // it the token is refused.
        if let Some(age) = self.inner.keys.age().filter(|age| *age > s.max_stale) {
            let refreshed = tokio::spawn({
                let inner = self.inner.clone();
                let max_stale = s.max_stale;
                async move { inner.keys.refresh_if_older(max_stale).await }
            })
            .await
            .unwrap_or(false);
            if !refreshed {
                return Err(IdentityError::KeysStale {
                    secs: age.as_secs(),
                });
            }
        }

        // Key and signature.
        let entry = match self.inner.keys.get(kid) {
            Some(e) => e,
            // On a task of its own: if this login gives up (VERIFY_TIMEOUT),
            // the refresh still finishes and keeps the keys it fetched.
            None => match tokio::spawn({
                let inner = self.inner.clone();
                let kid = kid.to_owned();
                async move { inner.keys.refresh_for_unknown_kid(&kid).await }
            })
            .await
            .ok()
            .flatten()
            {
                Some(e) => e,
                None if !self.inner.keys.ever_loaded() => {
                    return Err(IdentityError::KeysUnavailable)
                }
                None => return Err(IdentityError::UnknownKid(clip(kid))),
            },
        };
        if entry.key.family() != alg.family() || entry.alg.is_some_and(|a| a != alg) {
            return Err(IdentityError::KeyAlgMismatch(alg_name.to_string()));
        }
        match jsonwebtoken::crypto::verify(
            raw.signature,
            raw.signing_input.as_bytes(),
            &entry.key,
            alg,
        ) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(IdentityError::BadSignature),
        }

        // Claims: from here on the bytes are the IdP's.
        let c = Claims(&raw.claims);
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let exp = c.int("exp")?;
        if now > exp.saturating_add(s.skew) {
            return Err(IdentityError::Expired { exp, now });
        }
        if let Some(nbf) = c.opt_int("nbf")? {
            if nbf > now.saturating_add(s.skew) {
                return Err(IdentityError::NotYetValid { nbf, now });
            }
        }
        let iat = c.opt_int("iat")?;
        if let Some(iat) = iat {
            if iat > now.saturating_add(s.skew) {
                return Err(IdentityError::IssuedInFuture { iat, now });
            }
        }
        if let Some(max_age) = s.max_age {
            let iat = iat.ok_or(IdentityError::MissingClaim("iat"))?;
            let limit = i64::try_from(max_age)
                .unwrap_or(i64::MAX)
                .saturating_add(s.skew);
            if now.saturating_sub(iat) > limit {
                return Err(IdentityError::TooOld { iat, max_age });
            }
        }

        let tid = c.str("tid")?.to_ascii_lowercase();
        if !s.tenants.contains(&tid) {
            return Err(IdentityError::TenantNotAllowed(clip(&tid)));
        }
        let iss = c.str("iss")?;
        let version = self.issuer_version(iss, &tid)?;
        if !s.versions.contains(&version) {
            return Err(IdentityError::VersionNotAccepted(version));
        }
        // A key Entra publishes for one issuer (its multi-tenant key sets
        // name it per key) signs for that issuer only, as Microsoft's
        // validation rules require: a key of another tenant or cloud cannot
        // vouch for this one's tokens.
        // Entra signs v1 and v2 tokens with the same keys, and its v2 key
        // sets name the v2 issuer: a v1 token passes on a key of its
        // tenant's v2 issuer, as Microsoft's own validator lets it.
        if let Some(key_issuer) = &entry.issuer {
            let expected = key_issuer.replace("{tenantid}", &tid);
            let signs_for_it = iss.eq_ignore_ascii_case(&expected)
                || (version == 1
                    && format!("{}{tid}{}", s.issuer_v2.prefix, s.issuer_v2.suffix)
                        .eq_ignore_ascii_case(&expected));
            if !signs_for_it {
                return Err(IdentityError::KeyIssuerMismatch {
                    iss: clip(iss),
                    key_issuer: clip(key_issuer),
                });
            }
        }

        let aud = c.str("aud")?;
        if is_graph_audience(aud) {
            return Err(IdentityError::GraphAudience(clip(aud)));
        }
        let aud_norm = aud.trim_end_matches('/');
        if !s.audiences.iter().any(|a| a.eq_ignore_ascii_case(aud_norm)) {
            return Err(IdentityError::BadAudience(clip(aud)));
        }

        let object_id = c.str("oid")?.to_string();
        let app_id = match (c.opt_str("azp")?, c.opt_str("appid")?) {
            (Some(a), _) | (None, Some(a)) => a.to_string(),
            (None, None) => {
                return Err(IdentityError::MissingClaim(if version == 1 {
                    "appid"
                } else {
                    "azp"
                }))
            }
        };
        let own = |id: &str| id.eq_ignore_ascii_case(&app_id);
        let scopes: Vec<String> = c
            .opt_str("scp")?
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        let kind = match c.opt_str("idtyp")? {
            Some("app") => PrincipalKind::App,
            Some("user") => PrincipalKind::User,
            Some(_) => return Err(IdentityError::BadClaimType("idtyp")),
            // idtyp is optional. A token with scp is delegated. Without
            // either, an app-only token is one whose subject is the
            // application itself: its sub is its service principal's
            // object id, oid (as Microsoft tells APIs to check). A user's
            // sub is pairwise, never the oid: a user's token without scp
            // (an app role reached through `.default`) stays the user's,
            // and does not take the roles of the client it came through.
            None if c.0.contains_key("scp") => PrincipalKind::User,
            None if c.opt_str("sub")? == Some(object_id.as_str()) => PrincipalKind::App,
            None => PrincipalKind::User,
        };
        if kind == PrincipalKind::App && c.0.contains_key("scp") {
            return Err(IdentityError::InconsistentKind);
        }
        // tollgate's own registration: the Graph lookup's client, or the
        // audience as its client id (a GUID audience, as v2 tokens name
        // it). An app-only token whose client is that registration was got
        // by a holder of its secret for tollgate as tollgate itself
        // (client credentials), and is no agent's. A user signing in
        // through that registration (one registration for a client and
        // its API) is someone.
        let own_registration = s.own_client_id.as_deref().is_some_and(own)
            || s.audiences.iter().any(|a| is_guid(a) && own(a));
        if kind == PrincipalKind::App && own_registration {
            return Err(IdentityError::OwnApplication);
        }
        let roles = c.str_list("roles")?.unwrap_or_default();
        // What Microsoft asks of an API: a delegated token must carry a
        // scope the API defines, an app-only token an app role it was
        // granted (when the operator asks for these checks).
        match kind {
            PrincipalKind::User
                if !s.required_scopes.is_empty()
                    && !scopes.iter().any(|sc| s.required_scopes.contains(sc)) =>
            {
                return Err(IdentityError::ScopeMissing(s.required_scopes.join(" ")));
            }
            PrincipalKind::App if s.app_tokens_need_a_role && roles.is_empty() => {
                return Err(IdentityError::AppRoleMissing);
            }
            _ => {}
        }
        let claim_names_overage = match c.0.get("_claim_names") {
            None => false,
            Some(serde_json::Value::Object(m)) => m.contains_key("groups"),
            Some(_) => return Err(IdentityError::BadClaimType("_claim_names")),
        };
        // The implicit flow marks overage with `hasgroups` instead (the
        // groups would not fit in a URL).
        let has_groups_overage = match c.0.get("hasgroups") {
            None => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(_) => return Err(IdentityError::BadClaimType("hasgroups")),
        };
        let overage = claim_names_overage || has_groups_overage;
        let groups = if overage {
            // Treating overage as "no groups" would silently drop the caller's
            // group-based roles, or worse, any deny rules keyed on groups.
            let graph = self
                .inner
                .graph
                .as_ref()
                .ok_or(IdentityError::GroupsOverage)?;
            graph.member_groups(&tid, &object_id).await.map_err(|e| {
                tracing::warn!(tid = %tid, oid = %object_id, reason = %e, "group overage lookup failed");
                IdentityError::GroupsLookupFailed(e)
            })?
        } else {
            c.str_list("groups")?.unwrap_or_default()
        };
        let display_name = ["upn", "preferred_username", "name", "unique_name"]
            .iter()
            .find_map(|k| c.0.get(*k).and_then(|v| v.as_str()))
            .unwrap_or_default()
            .to_string();
        let token_id = c.opt_str("uti")?.unwrap_or_default().to_string();

        let mut principal = Principal {
            tenant_id: tid,
            object_id,
            app_id,
            display_name,
            groups,
            roles,
            token_id,
            token_fingerprint: hex::encode(Sha256::digest(token.as_bytes())),
            expires_at: exp,
            issued_at: iat.unwrap_or(0),
            kind,
            scopes,
            tollgate_roles: Vec::new(),
            token_version: version,
        };
        principal.tollgate_roles = map_roles(&s.roles, &s.home_tenant, &principal);
        Ok(principal)
    }

    /// Which version's issuer `iss` is, for tenant `tid`.
    fn issuer_version(&self, iss: &str, tid: &str) -> Result<u8, IdentityError> {
        let s = &self.inner.settings;
        for (version, template) in [(2u8, &s.issuer_v2), (1u8, &s.issuer_v1)] {
            if let Some(t) = template.tenant_of(iss) {
                if t.eq_ignore_ascii_case(tid) {
                    return Ok(version);
                }
                return Err(IdentityError::IssuerTenantMismatch {
                    iss: clip(iss),
                    tid: tid.into(),
                });
            }
        }
        Err(IdentityError::BadIssuer(clip(iss)))
    }
}

/// tollgate roles the principal holds, sorted, each once.
fn map_roles(rules: &BTreeMap<String, RoleRule>, home_tenant: &str, p: &Principal) -> Vec<String> {
    let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    rules
        .iter()
        .filter(|(_, r)| {
            // See RoleRule::tenants.
            let (any_match, tenant_bound_match) = if r.tenants.is_empty() {
                (true, eq(home_tenant, &p.tenant_id))
            } else {
                let listed = r.tenants.iter().any(|t| eq(t, &p.tenant_id));
                (listed, listed)
            };
            // An `oid` is Entra's own GUID for the caller: one in the rule
            // names one object everywhere. A `groups` entry does not: Entra
            // can be set to put group names there, and another tenant can
            // name a group like one of the home tenant's ids.
            let object_id_match = |id: &String| {
                eq(id, &p.object_id)
                    && (if is_guid(id) {
                        any_match
                    } else {
                        tenant_bound_match
                    })
            };
            (tenant_bound_match && r.groups.iter().any(|g| p.groups.iter().any(|x| eq(g, x))))
                || r.object_ids.iter().any(object_id_match)
                || (tenant_bound_match
                    // App role values are case-sensitive strings defined by us.
                    && (r.app_roles.iter().any(|ar| p.roles.contains(ar))
                        // The application itself, not whoever signs in
                        // through it: in a delegated token azp is the client
                        // the user signed in with (a public client such as
                        // the Azure CLI serves every user of the tenant).
                        || (p.kind == PrincipalKind::App
                            && r.apps.iter().any(|a| eq(a, &p.app_id)))))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn spawn_refresh(inner: Weak<Inner>, every: Duration) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            match inner.keys.refresh().await {
                Ok(n) => {
                    tracing::info!(source = %inner.keys.source(), keys = n, "identity keys refreshed")
                }
                Err(e) => tracing::warn!(
                    source = %inner.keys.source(), error = %e,
                    "scheduled key refresh failed; keeping the cached keys"
                ),
            }
        }
    });
}
