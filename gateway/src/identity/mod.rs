//! Who is calling: validates a Microsoft Entra access token and turns it into
//! a [`Principal`]. Every protocol adapter calls [`Verifier::verify`] with the
//! credential its protocol already carries.

use serde::Deserialize;

/// Identity provider settings (`[identity]` in the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {}

/// The caller, as proven by a validated token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: String,
    pub object_id: String,
    pub app_id: String,
    pub display_name: String,
    pub groups: Vec<String>,
    pub roles: Vec<String>,
    pub token_id: String,
    pub token_fingerprint: String,
    /// Token expiry, seconds since the epoch.
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("token refused: {0}")]
    Refused(String),
}

pub struct Verifier {}

impl Verifier {
    pub async fn from_config(_config: &IdentityConfig) -> anyhow::Result<Self> {
        anyhow::bail!("identity is not built yet")
    }

    pub async fn verify(&self, _token: &str) -> Result<Principal, IdentityError> {
        Err(IdentityError::Refused("identity is not built yet".into()))
    }
}
