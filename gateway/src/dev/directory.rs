//! The dev IdP's tiny directory: group memberships served by its Graph-like
//! endpoint (for overage tokens) and the client secret its token endpoint
//! accepts. Both live in the state directory.

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::Context;

const MEMBERS_FILE: &str = "members.json";
const SECRET_FILE: &str = "graph-client-secret";

/// Records `groups` as the memberships of `oid` (replacing earlier ones).
pub fn set_members(dir: &Path, oid: &str, groups: &[String]) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let mut all = read_all(dir)?;
    all.insert(oid.to_ascii_lowercase(), groups.to_vec());
    let tmp = dir.join(format!(".{MEMBERS_FILE}.{}", uuid::Uuid::new_v4()));
    fs::write(&tmp, serde_json::to_vec_pretty(&all)?)?;
    fs::rename(&tmp, dir.join(MEMBERS_FILE))?;
    Ok(())
}

/// The groups recorded for `oid`, if any.
pub fn members(dir: &Path, oid: &str) -> anyhow::Result<Option<Vec<String>>> {
    Ok(read_all(dir)?.remove(&oid.to_ascii_lowercase()))
}

fn read_all(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let path = dir.join(MEMBERS_FILE);
    match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Path of the file holding the client secret the dev token endpoint accepts,
/// created with a random secret on first use. Point
/// `identity.graph.client_secret_file` at it.
pub fn graph_secret_file(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    fs::create_dir_all(dir)?;
    let path = dir.join(SECRET_FILE);
    let secret = hex::encode(rand::random::<[u8; 24]>());
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(format!("{secret}\n").as_bytes())?;
            f.sync_all()?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
    }
    Ok(path)
}

pub fn graph_secret(dir: &Path) -> anyhow::Result<String> {
    let path = graph_secret_file(dir)?;
    Ok(fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_string())
}
