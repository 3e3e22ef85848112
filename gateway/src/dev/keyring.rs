//! The development IdP's signing keys, kept in its state directory.
//!
//! `keyring.json` holds every key (PKCS#8, base64) with a `published` flag;
//! the last key is the signing key. `jwks.json` is the public half of the
//! published keys, rewritten on every change so a config can point
//! `jwks_file` at it. Keys are RSA-2048 generated and used through aws-lc-rs
//! (the `rsa` crate is avoided because of RUSTSEC-2023-0071).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::Context;
use aws_lc_rs::{
    encoding::AsDer,
    rand::SystemRandom,
    rsa::{KeyPair, KeySize},
    signature::{self, KeyPair as _},
};
use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const KEYRING_FILE: &str = "keyring.json";
const JWKS_FILE: &str = "jwks.json";

/// One RSA signing key.
pub struct DevKey {
    pair: KeyPair,
    /// RFC 7638 thumbprint: stable for the key, so restarts keep the kid.
    pub kid: String,
    n: String,
    e: String,
}

impl std::fmt::Debug for DevKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevKey").field("kid", &self.kid).finish()
    }
}

impl DevKey {
    pub fn generate() -> anyhow::Result<Self> {
        let pair = KeyPair::generate(KeySize::Rsa2048)
            .map_err(|_| anyhow::anyhow!("RSA key generation failed"))?;
        Ok(Self::from_pair(pair))
    }

    pub fn from_pkcs8(der: &[u8]) -> anyhow::Result<Self> {
        let pair = KeyPair::from_pkcs8(der).map_err(|e| anyhow::anyhow!("bad RSA key: {e}"))?;
        Ok(Self::from_pair(pair))
    }

    fn from_pair(pair: KeyPair) -> Self {
        let public = pair.public_key();
        let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
        // RFC 7638: members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));
        Self { pair, kid, n, e }
    }

    pub fn pkcs8(&self) -> anyhow::Result<Vec<u8>> {
        let der = self
            .pair
            .as_der()
            .map_err(|_| anyhow::anyhow!("cannot encode RSA key"))?;
        Ok(der.as_ref().to_vec())
    }

    /// DER (SubjectPublicKeyInfo) of the public key.
    pub fn public_key_der(&self) -> anyhow::Result<Vec<u8>> {
        let der = self
            .pair
            .public_key()
            .as_der()
            .map_err(|_| anyhow::anyhow!("cannot encode RSA public key"))?;
        Ok(der.as_ref().to_vec())
    }

    /// The public key as a JWK, shaped like the keys Entra publishes, and
    /// marked as a development key ([`crate::identity::DEVELOPMENT_KEY_MEMBER`]):
    /// the daemon trusts it only with `development_idp = true`, so that a
    /// production config pointed at a development key set by mistake
    /// accepts nothing minted by `tollgate dev token`.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "kid": self.kid, "n": self.n, "e": self.e,
            crate::identity::DEVELOPMENT_KEY_MEMBER: true,
        })
    }

    /// Signs `message` with RSASSA-PKCS1-v1_5 SHA-256 (RS256) or PSS SHA-256 (PS256).
    pub fn sign(&self, message: &[u8], pss: bool) -> anyhow::Result<Vec<u8>> {
        let mut sig = vec![0u8; self.pair.public_modulus_len()];
        let alg: &'static dyn signature::RsaEncoding = if pss {
            &signature::RSA_PSS_SHA256
        } else {
            &signature::RSA_PKCS1_SHA256
        };
        self.pair
            .sign(alg, &SystemRandom::new(), message, &mut sig)
            .map_err(|_| anyhow::anyhow!("RSA signing failed"))?;
        Ok(sig)
    }

    /// A compact JWS: RS256 over the given header and claims.
    pub fn sign_jwt(&self, header: &Value, claims: &Value) -> anyhow::Result<String> {
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(header)?);
        let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
        let message = format!("{h}.{p}");
        let sig = self.sign(message.as_bytes(), false)?;
        Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    /// PKCS#8 DER, standard base64.
    pkcs8: String,
    created_at: i64,
    published: bool,
}

#[derive(Serialize, Deserialize, Default)]
struct KeyringFile {
    keys: Vec<StoredKey>,
}

/// All keys of one dev IdP state directory.
pub struct Keyring {
    dir: PathBuf,
    /// (published, key), oldest first; the last one signs.
    keys: Vec<(bool, i64, DevKey)>,
}

impl Keyring {
    /// Opens the keyring in `dir`, creating the directory and a first key if
    /// there is none yet.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(KEYRING_FILE);
        if !path.exists() {
            let key = DevKey::generate()?;
            let ring = Self {
                dir: dir.to_path_buf(),
                keys: vec![(true, now(), key)],
            };
            // Two commands started at once on a fresh directory must agree on
            // one key: the first hard link wins, the loser reads the winner's.
            let tmp = dir.join(format!(".{KEYRING_FILE}.{}", uuid::Uuid::new_v4()));
            write_private(&tmp, &ring.serialize()?)?;
            let linked = fs::hard_link(&tmp, &path);
            let _ = fs::remove_file(&tmp);
            match linked {
                Ok(()) => {
                    ring.write_jwks()?;
                    return Ok(ring);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        let ring = Self::open(dir)?;
        // A key set published before development keys were marked is
        // published again, marked (atomically, by rename): otherwise a
        // production config pointed at it would still trust it. Here, not
        // in `open`, which the development IdP calls for every key request.
        let published = fs::read_to_string(ring.jwks_path()).unwrap_or_default();
        if !published.contains(crate::identity::DEVELOPMENT_KEY_MEMBER) {
            ring.write_jwks()?;
        }
        Ok(ring)
    }

    /// Opens an existing keyring.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(KEYRING_FILE);
        let text = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: KeyringFile =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut keys = Vec::with_capacity(file.keys.len());
        for k in file.keys {
            let der = STANDARD
                .decode(&k.pkcs8)
                .with_context(|| format!("key {}", k.kid))?;
            keys.push((k.published, k.created_at, DevKey::from_pkcs8(&der)?));
        }
        if keys.is_empty() {
            anyhow::bail!("{} holds no key", path.display());
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            keys,
        })
    }

    pub fn signing_key(&self) -> &DevKey {
        // open/open_or_create guarantee at least one key.
        &self.keys[self.keys.len() - 1].2
    }

    pub fn published(&self) -> impl Iterator<Item = &DevKey> {
        self.keys.iter().filter(|(p, _, _)| *p).map(|(_, _, k)| k)
    }

    /// The JWKS document, newest key first (the order Entra uses does not
    /// matter to validators, which select by kid).
    pub fn jwks(&self) -> Value {
        let mut keys: Vec<Value> = self.published().map(DevKey::jwk).collect();
        keys.reverse();
        json!({ "keys": keys })
    }

    /// Adds a new key and makes it the signing key; older keys stay published.
    pub fn rotate(&mut self) -> anyhow::Result<&DevKey> {
        self.keys.push((true, now(), DevKey::generate()?));
        self.save()?;
        Ok(self.signing_key())
    }

    /// Stops publishing every key but the signing key. Returns how many were withdrawn.
    pub fn withdraw_old(&mut self) -> anyhow::Result<usize> {
        let last = self.keys.len() - 1;
        let mut n = 0;
        for (i, (published, _, _)) in self.keys.iter_mut().enumerate() {
            if i != last && *published {
                *published = false;
                n += 1;
            }
        }
        self.save()?;
        Ok(n)
    }

    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join(JWKS_FILE)
    }

    fn serialize(&self) -> anyhow::Result<Vec<u8>> {
        let mut file = KeyringFile::default();
        for (published, created_at, key) in &self.keys {
            file.keys.push(StoredKey {
                kid: key.kid.clone(),
                pkcs8: STANDARD.encode(key.pkcs8()?),
                created_at: *created_at,
                published: *published,
            });
        }
        Ok(serde_json::to_vec_pretty(&file)?)
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self
            .dir
            .join(format!(".{KEYRING_FILE}.{}", uuid::Uuid::new_v4()));
        write_private(&tmp, &self.serialize()?)?;
        fs::rename(&tmp, self.dir.join(KEYRING_FILE))?;
        self.write_jwks()
    }

    fn write_jwks(&self) -> anyhow::Result<()> {
        let tmp = self
            .dir
            .join(format!(".{JWKS_FILE}.{}", uuid::Uuid::new_v4()));
        fs::write(&tmp, serde_json::to_vec_pretty(&self.jwks())?)?;
        fs::rename(&tmp, self.jwks_path())?;
        Ok(())
    }
}

/// Writes a file readable only by its owner (it holds private keys).
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

pub(crate) fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key set published before development keys were marked is
    /// marked when the keyring is next opened.
    #[test]
    fn an_unmarked_key_set_is_published_again_marked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ring = Keyring::open_or_create(dir.path()).expect("keyring");
        let mut unmarked = ring.jwks();
        for key in unmarked["keys"].as_array_mut().expect("keys") {
            key.as_object_mut()
                .expect("jwk")
                .remove(crate::identity::DEVELOPMENT_KEY_MEMBER);
        }
        fs::write(ring.jwks_path(), unmarked.to_string()).expect("write");
        Keyring::open_or_create(dir.path()).expect("reopen");
        let published = fs::read_to_string(ring.jwks_path()).expect("jwks");
        assert!(
            published.contains(crate::identity::DEVELOPMENT_KEY_MEMBER),
            "{published}"
        );
    }

    #[test]
    fn kid_is_stable_across_reopen_and_jwks_file_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Keyring::open_or_create(dir.path()).expect("create");
        let again = Keyring::open_or_create(dir.path()).expect("reopen");
        assert_eq!(first.signing_key().kid, again.signing_key().kid);
        let on_disk: Value =
            serde_json::from_slice(&fs::read(first.jwks_path()).expect("jwks.json")).expect("json");
        assert_eq!(on_disk, first.jwks());
        assert_eq!(on_disk["keys"][0]["kid"], json!(first.signing_key().kid));
    }

    #[test]
    fn keyring_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        Keyring::open_or_create(dir.path()).expect("create");
        let mode = fs::metadata(dir.path().join(KEYRING_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "keyring.json readable by others: {mode:o}");
    }

    #[test]
    fn rotate_publishes_both_and_withdraw_keeps_only_the_signing_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ring = Keyring::open_or_create(dir.path()).expect("create");
        let old = ring.signing_key().kid.clone();
        let new = ring.rotate().expect("rotate").kid.clone();
        assert_ne!(old, new);
        let reopened = Keyring::open(dir.path()).expect("open");
        assert_eq!(reopened.signing_key().kid, new);
        let kids: Vec<&str> = reopened.published().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, vec![old.as_str(), new.as_str()]);
        assert_eq!(ring.withdraw_old().expect("withdraw"), 1);
        let reopened = Keyring::open(dir.path()).expect("open");
        let kids: Vec<&str> = reopened.published().map(|k| k.kid.as_str()).collect();
        assert_eq!(kids, vec![new.as_str()]);
    }
}
