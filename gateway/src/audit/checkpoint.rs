//! Ed25519 keys and signed checkpoints in the C2SP signed-note /
//! tlog-checkpoint format.
//!
//! Keys use the Go `golang.org/x/mod/sumdb/note` text encoding, so standard
//! note tooling reads them:
//! - private: `PRIVATE+KEY+<name>+<keyid hex>+<base64(0x01 || seed)>`
//! - public:  `<name>+<keyid hex>+<base64(0x01 || public key)>`
//!
//! with key id = SHA-256(name || 0x0A || 0x01 || public key)[:4].
//!
//! A checkpoint file `checkpoints/<counter:012>.note` is:
//! ```text
//! <origin>
//! <tree size: how many manifest lines it covers>
//! <base64 RFC 6962 root over the manifest lines>
//! tollgate-time <epoch ms>
//! tollgate-checkpoint <counter>
//!
//! — <key name> <base64(key id || Ed25519 signature over the lines above the blank line)>
//! ```

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use tracing::warn;

use super::{
    fsutil::{self, Perms},
    manifest::ManifestAppender,
    AuditConfig,
};

/// Ed25519 algorithm byte of the note key encoding.
const ALG_ED25519: u8 = 0x01;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a tollgate/note {what} key: {reason}")]
    Format {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
}

pub fn key_id(name: &str, public: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ALG_ED25519]);
    h.update(public.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

pub struct Signer {
    pub name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl Signer {
    pub fn new(name: &str, key: SigningKey) -> Signer {
        let id = key_id(name, &key.verifying_key());
        Signer {
            name: name.to_string(),
            key,
            id,
        }
    }

    pub fn generate(name: &str) -> Signer {
        let seed: [u8; 32] = rand::random();
        Signer::new(name, SigningKey::from_bytes(&seed))
    }

    pub fn private_text(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(raw)
        )
    }

    /// The key WAL batches are sealed with (see [`super::wal::Seal`]):
    /// derived from the signing key, so that whoever holds the one holds
    /// the other and nothing more needs keeping. A MAC, not a signature:
    /// a batch's seal is on the path of every acknowledged record, and an
    /// HMAC costs a fraction of a microsecond where an Ed25519 signature
    /// costs tens.
    pub fn wal_seal_key(&self) -> ring::hmac::Key {
        let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.as_bytes());
        let seal_key = ring::hmac::sign(&derive, b"tollgate WAL seal key v1");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, seal_key.as_ref())
    }

    pub fn public(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            key: self.key.verifying_key(),
            id: self.id,
        }
    }

    pub fn load(path: &Path) -> Result<Signer, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: &str| KeyError::Format {
            path: path.to_path_buf(),
            what: "private",
            reason: reason.to_string(),
        };
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| bad("missing PRIVATE+KEY+ prefix"))?;
        let (name, id, raw) = split_key(rest).ok_or_else(|| bad("expected name+id+key"))?;
        let raw = B64.decode(raw).map_err(|e| bad(&e.to_string()))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(bad("not an Ed25519 key"));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&raw[1..]);
        let signer = Signer::new(name, SigningKey::from_bytes(&seed));
        if hex::encode(signer.id) != id {
            return Err(bad("key id does not match the key"));
        }
        Ok(signer)
    }

    /// The configured key, or (when none is configured) the one under
    /// `{dir}/keys/`, generated on first start.
    pub fn load_or_generate(cfg: &AuditConfig, perms: &Perms) -> anyhow::Result<Signer> {
        if let Some(path) = &cfg.signing_key {
            return Ok(Signer::load(path)?);
        }
        let path = cfg.dir.join("keys").join("checkpoint.key");
        if path.exists() {
            return Ok(Signer::load(&path)?);
        }
        let name = cfg.origin.clone().unwrap_or_else(default_name);
        warn!(
            key = %path.display(),
            "no [audit] signing_key configured: generated one; set signing_key to a key kept outside the audit directory and give auditors its .pub"
        );
        let signer = Signer::generate(&name);
        perms.create_dir_all(&cfg.dir.join("keys"))?;
        write_keypair(perms, &signer, &path)?;
        Ok(signer)
    }

    /// Signs a note body (which must end in a newline); returns the whole note.
    pub fn sign_note(&self, body: &str) -> String {
        let sig = self.key.sign(body.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// `name+id+key` where the name itself may not contain '+'.
fn split_key(s: &str) -> Option<(&str, &str, &str)> {
    let mut it = s.splitn(3, '+');
    let name = it.next()?;
    let id = it.next()?;
    let key = it.next()?;
    if name.is_empty() || id.len() != 8 {
        return None;
    }
    Some((name, id, key))
}

fn default_name() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    if host.is_empty() {
        "tollgate".into()
    } else {
        format!("tollgate/{host}")
    }
}

/// Writes the private key (0600) at `path` and the public key at
/// `path.pub`. Refuses to overwrite an existing key.
///
/// Each file appears whole or not at all (written aside, synced, then
/// put in place), the private key last: a crash in the middle leaves no
/// key file that cannot load (a start would stop on it until someone
/// removed it), at most a public key of a key that never was, which the
/// next attempt replaces.
pub fn write_keypair(perms: &Perms, signer: &Signer, path: &Path) -> io::Result<()> {
    if path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists: a key is never overwritten", path.display()),
        ));
    }
    let mut pub_path = path.as_os_str().to_owned();
    pub_path.push(".pub");
    fsutil::write_atomic(
        perms,
        Path::new(&pub_path),
        format!("{}\n", signer.public().text()).as_bytes(),
        0o644,
    )?;
    let tmp = fsutil::tmp_path(path);
    // A leftover of an attempt a crash cut short: never a key in use.
    let _ = fs::remove_file(&tmp);
    let mut f = perms.create_with(&tmp, fsutil::KEY_MODE, true)?;
    f.write_all(format!("{}\n", signer.private_text()).as_bytes())?;
    f.sync_all()?;
    drop(f);
    // A link, unlike a rename, fails if a key appeared there meanwhile.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked?;
    if let Some(parent) = path.parent() {
        fsutil::fsync_dir(parent)?;
    }
    Ok(())
}

pub struct Verifier {
    pub name: String,
    pub key: VerifyingKey,
    pub id: [u8; 4],
}

impl Verifier {
    pub fn text(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{}+{}", self.name, hex::encode(self.id), B64.encode(raw))
    }

    pub fn load(path: &Path) -> Result<Verifier, KeyError> {
        let text = fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Verifier::parse(text.trim()).map_err(|reason| KeyError::Format {
            path: path.to_path_buf(),
            what: "public",
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Verifier, String> {
        let (name, id, raw) = split_key(text).ok_or("expected name+id+key")?;
        let raw = B64.decode(raw).map_err(|e| e.to_string())?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err("not an Ed25519 key".into());
        }
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&raw[1..]);
        let key = VerifyingKey::from_bytes(&pk).map_err(|e| e.to_string())?;
        let v = Verifier {
            name: name.to_string(),
            id: key_id(name, &key),
            key,
        };
        if hex::encode(v.id) != id {
            return Err("key id does not match the key".into());
        }
        Ok(v)
    }
}

/// A parsed checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: [u8; 32],
    pub time_ms: Option<i64>,
    pub counter: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoteError {
    Malformed(String),
    /// No signature line by the trusted key verifies.
    BadSignature,
}

/// Verifies a note against one trusted key and parses its checkpoint body.
/// Signature lines by other keys are ignored, as C2SP requires.
pub fn open_note(text: &str, key: &Verifier) -> Result<Checkpoint, NoteError> {
    let m = |s: &str| NoteError::Malformed(s.to_string());
    let split = text.find("\n\n").ok_or_else(|| m("no blank line"))?;
    let body = &text[..split + 1];
    let sigs = &text[split + 2..];
    let mut ok = false;
    for line in sigs.lines() {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            return Err(m("signature line does not start with an em dash"));
        };
        let Some((name, b64)) = rest.rsplit_once(' ') else {
            return Err(m("signature line without a signature"));
        };
        if name != key.name {
            continue;
        }
        let Ok(blob) = B64.decode(b64) else {
            return Err(m("signature is not base64"));
        };
        if blob.len() != 68 || blob[..4] != key.id {
            continue;
        }
        let mut sig = [0u8; 64];
        sig.copy_from_slice(&blob[4..]);
        if key
            .key
            .verify_strict(body.as_bytes(), &Signature::from_bytes(&sig))
            .is_ok()
        {
            ok = true;
        }
    }
    if !ok {
        return Err(NoteError::BadSignature);
    }
    let mut lines = body.lines();
    let origin = lines.next().ok_or_else(|| m("no origin line"))?.to_string();
    let size = lines
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| m("tree size is not a number"))?;
    let root: [u8; 32] = lines
        .next()
        .and_then(|s| B64.decode(s).ok())
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| m("root hash is not 32 bytes of base64"))?;
    let mut cp = Checkpoint {
        origin,
        size,
        root,
        time_ms: None,
        counter: None,
    };
    for ext in lines {
        if let Some(v) = ext.strip_prefix("tollgate-time ") {
            cp.time_ms = v.parse().ok();
        } else if let Some(v) = ext.strip_prefix("tollgate-checkpoint ") {
            cp.counter = v.parse().ok();
        }
    }
    Ok(cp)
}

pub fn body(origin: &str, size: u64, root: &[u8; 32], time_ms: i64, counter: u64) -> String {
    format!(
        "{origin}\n{size}\n{}\ntollgate-time {time_ms}\ntollgate-checkpoint {counter}\n",
        B64.encode(root)
    )
}

pub fn file_name(counter: u64) -> String {
    format!("{counter:012}.note")
}

/// The counter of a checkpoint file name, only in the form
/// [`file_name`] writes (`7.note` or `+00000000007.note` would otherwise
/// pass for `000000000007.note`, and a problem found in one be reported
/// at the other).
pub fn parse_file_name(name: &str) -> Option<u64> {
    let counter = name.strip_suffix(".note")?.parse().ok()?;
    (file_name(counter) == name).then_some(counter)
}

/// Checkpoint files in counter order.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(parse_file_name) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The counter of the newest checkpoint in `dir` (0: none), and the time
/// it signed if it reads and its signature verifies with `key`: where the
/// next checkpoint goes on from, with one listing of the directory.
pub fn last_counter_and_time(dir: &Path, key: &Verifier) -> io::Result<(u64, Option<i64>)> {
    let Some((counter, path)) = list(dir)?.pop() else {
        return Ok((0, None));
    };
    let time = read_note(&path)
        .ok()
        .and_then(|text| open_note(&text, key).ok()?.time_ms);
    Ok((counter, time))
}

/// A checkpoint file's text. A note is a few hundred bytes; a file much
/// larger is none of the daemon's, and is not read into memory.
pub fn read_note(path: &Path) -> io::Result<String> {
    super::fsutil::read_regular_text_within(path, 64 << 10)
}

/// The newest checkpoint in `dir` whose signature verifies with `key`,
/// with the counter its file is named by, and whether any checkpoint file
/// is there at all.
pub fn newest_valid(dir: &Path, key: &Verifier) -> io::Result<(Option<(u64, Checkpoint)>, bool)> {
    let files = list(dir)?;
    let any = !files.is_empty();
    for (counter, path) in files.into_iter().rev() {
        let Ok(text) = read_note(&path) else {
            continue;
        };
        if let Ok(checkpoint) = open_note(&text, key) {
            return Ok((Some((counter, checkpoint)), any));
        }
    }
    Ok((None, any))
}

/// Checkpoints kept in full: the newest this many ...
pub const KEEP_RECENT: u64 = 1000;
/// ... and, older than that, every checkpoint whose counter is a multiple of
/// this. A loaded daemon closes a segment (and signs a checkpoint) every few
/// seconds, ~17 000 a day; each checkpoint signs the root of the whole
/// manifest, so a newer one vouches for everything an older one did, and
/// thinning keeps the directory and verify time bounded.
pub const KEEP_EVERY: u64 = 1000;

/// Removes the one checkpoint that falls out of the kept set when
/// checkpoint `latest` is written (called once per checkpoint, so it stays
/// O(1)). Failure to remove only leaves an extra file.
pub fn thin(dir: &Path, latest: u64, keep_recent: u64, keep_every: u64) {
    let Some(old) = latest.checked_sub(keep_recent) else {
        return;
    };
    if old == 0 || old % keep_every == 0 {
        return;
    }
    match fs::remove_file(dir.join(file_name(old))) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(counter = old, error = %e, "could not remove old checkpoint"),
    }
}

/// Signs and writes a checkpoint over the whole manifest.
pub fn write(
    dir: &Path,
    perms: &Perms,
    signer: &Signer,
    origin: &str,
    manifest: &ManifestAppender,
    counter: u64,
    now_ms: i64,
) -> io::Result<()> {
    let size = manifest.size();
    let root = manifest.root();
    let note = signer.sign_note(&body(origin, size as u64, &root, now_ms, counter));
    fsutil::write_atomic(
        perms,
        &dir.join(file_name(counter)),
        note.as_bytes(),
        fsutil::FILE_MODE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only names in the form the daemon writes are checkpoints: others
    /// would pass for one of its files and be reported as it.
    #[test]
    fn only_the_daemons_own_file_names_are_checkpoints() {
        assert_eq!(parse_file_name(&file_name(7)), Some(7));
        assert_eq!(parse_file_name("000000000007.note"), Some(7));
        for name in [
            "7.note",
            "+00000000007.note",
            "0000000000007.note",
            "00000000000x.note",
            "000000000007",
        ] {
            assert_eq!(parse_file_name(name), None, "{name}");
        }
    }

    #[test]
    fn note_round_trips_and_rejects_other_keys_and_edits() {
        let s = Signer::generate("example.com/log");
        let v = s.public();
        let note = s.sign_note(&body("example.com/log", 3, &[7u8; 32], 1000, 2));
        let cp = open_note(&note, &v).unwrap();
        assert_eq!(cp.size, 3);
        assert_eq!(cp.root, [7u8; 32]);
        assert_eq!(cp.counter, Some(2));
        assert_eq!(cp.time_ms, Some(1000));

        let other = Signer::generate("example.com/log").public();
        assert_eq!(open_note(&note, &other), Err(NoteError::BadSignature));
        let edited = note.replacen("\n3\n", "\n4\n", 1);
        assert_eq!(open_note(&edited, &v), Err(NoteError::BadSignature));
    }

    #[test]
    fn thinning_keeps_recent_and_every_nth_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        for c in 1..=60u64 {
            fs::write(tmp.path().join(file_name(c)), b"x").unwrap();
            thin(tmp.path(), c, 10, 20);
        }
        let kept: Vec<u64> = list(tmp.path()).unwrap().iter().map(|(c, _)| *c).collect();
        let mut want: Vec<u64> = vec![20, 40];
        want.extend(51..=60);
        assert_eq!(kept, want);
    }

    #[test]
    fn key_text_round_trips() {
        let s = Signer::generate("tollgate/host-1");
        let v = Verifier::parse(&s.public().text()).unwrap();
        assert_eq!(v.key, s.public().key);
        assert_eq!(v.id, s.public().id);
    }

    #[test]
    fn key_id_matches_go_note_reference() {
        // From golang.org/x/mod/sumdb/note's example: the verifier key
        // "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
        // has id c74f20a3.
        let v =
            Verifier::parse("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
                .unwrap();
        assert_eq!(hex::encode(v.id), "c74f20a3");
    }
}
