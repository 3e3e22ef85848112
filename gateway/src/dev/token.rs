//! Entra-shaped access tokens for development and tests.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::keyring::{now, DevKey};

/// The client id dev tokens carry when none is given.
pub const DEV_CLIENT_ID: &str = "de000000-0000-4000-8000-00000000c11e";

/// Delegated (user) or app-only token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenKind {
    User,
    App,
}

/// What to put in a dev token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    pub tenant: String,
    pub oid: String,
    pub audience: String,
    pub app_id: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    /// Delegated scopes (`scp`); only user tokens carry them.
    pub scopes: Vec<String>,
    pub kind: TokenKind,
    /// Seconds from now; negative for an already expired token.
    pub expires_in: i64,
    /// 1 or 2.
    pub version: u8,
    /// Leave the groups out and point at Graph instead, as Entra does over 200 groups.
    pub overage: bool,
}

impl TokenSpec {
    pub fn new(tenant: &str, oid: &str, audience: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            oid: oid.to_string(),
            audience: audience.to_string(),
            app_id: DEV_CLIENT_ID.to_string(),
            name: None,
            groups: Vec::new(),
            roles: Vec::new(),
            scopes: Vec::new(),
            kind: TokenKind::User,
            expires_in: 3600,
            version: 2,
            overage: false,
        }
    }

    /// The claims Entra would issue for this spec, issued at `iat`.
    pub fn claims_at(&self, iat: i64) -> Value {
        let tid = &self.tenant;
        let mut c = Map::new();
        let v2 = self.version != 1;
        c.insert("aud".into(), json!(self.audience));
        if v2 {
            c.insert(
                "iss".into(),
                json!(format!("https://login.microsoftonline.com/{tid}/v2.0")),
            );
        } else {
            c.insert(
                "iss".into(),
                json!(format!("https://sts.windows.net/{tid}/")),
            );
        }
        c.insert("iat".into(), json!(iat));
        c.insert("nbf".into(), json!(iat));
        c.insert("exp".into(), json!(iat + self.expires_in));
        if v2 {
            c.insert("azp".into(), json!(self.app_id));
            c.insert("azpacr".into(), json!("1"));
        } else {
            c.insert("appid".into(), json!(self.app_id));
            c.insert("appidacr".into(), json!("1"));
        }
        c.insert(
            "idtyp".into(),
            json!(match self.kind {
                TokenKind::User => "user",
                TokenKind::App => "app",
            }),
        );
        if let Some(name) = &self.name {
            c.insert("name".into(), json!(name));
            if self.kind == TokenKind::User {
                let key = if v2 { "preferred_username" } else { "upn" };
                c.insert(key.into(), json!(name));
            }
        }
        c.insert("oid".into(), json!(self.oid));
        // Entra's sub: a user's is pairwise per application, never the
        // oid; an app-only token's is the service principal's object id,
        // the oid itself.
        match self.kind {
            TokenKind::User => {
                let sub = Sha256::digest(format!("{}|{}", self.app_id, self.oid).as_bytes());
                c.insert("sub".into(), json!(hex::encode(&sub[..16])));
            }
            TokenKind::App => {
                c.insert("sub".into(), json!(self.oid));
            }
        }
        c.insert("tid".into(), json!(tid));
        if self.kind == TokenKind::User {
            let scp = if self.scopes.is_empty() {
                "access_as_user".to_string()
            } else {
                self.scopes.join(" ")
            };
            c.insert("scp".into(), json!(scp));
        }
        if self.overage {
            c.insert("_claim_names".into(), json!({ "groups": "src1" }));
            c.insert(
                "_claim_sources".into(),
                json!({ "src1": { "endpoint": format!(
                    "https://graph.windows.net/{tid}/users/{}/getMemberObjects", self.oid) } }),
            );
        } else if !self.groups.is_empty() {
            c.insert("groups".into(), json!(self.groups));
        }
        if !self.roles.is_empty() {
            c.insert("roles".into(), json!(self.roles));
        }
        let uti: [u8; 16] = rand::random();
        c.insert("uti".into(), json!(base64_url(&uti)));
        c.insert("ver".into(), json!(if v2 { "2.0" } else { "1.0" }));
        Value::Object(c)
    }

    /// Signs the token with `key`.
    pub fn mint(&self, key: &DevKey) -> anyhow::Result<String> {
        let header = json!({ "typ": "JWT", "alg": "RS256", "kid": key.kid });
        key.sign_jwt(&header, &self.claims_at(now()))
    }
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
