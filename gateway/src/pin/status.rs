//! `tollgate pin status`: what is attached where, read back from the
//! pinned links themselves (not from the daemon), so it also answers while
//! the daemon is down.

use std::{fs, os::unix::fs::MetadataExt, path::Path};

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};
use serde::Serialize;

/// One pinned link.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PinnedProgram {
    /// The program's name in the kernel object.
    pub program: String,
    /// `host` or a cgroup id.
    pub attached_to: String,
    /// The cgroup's path, when it is one of the configured agent cgroups.
    pub cgroup_path: Option<String>,
    pub link_id: u32,
    pub program_id: u32,
    pub link_type: String,
    pub pin: String,
}

/// Reads every pinned link under `{pin_dir}/links`. `agent_cgroups` (from
/// the configuration, possibly empty) names the cgroup ids.
pub fn status(pin_dir: &Path, agent_cgroups: &[std::path::PathBuf]) -> Result<Vec<PinnedProgram>> {
    let links_dir = pin_dir.join("links");
    let mut cgroup_paths = std::collections::HashMap::new();
    for cgroup in agent_cgroups {
        if let Ok(meta) = fs::metadata(cgroup) {
            cgroup_paths.insert(meta.ino().to_string(), cgroup.display().to_string());
        }
    }
    // The packet evidence sits at the root of the hierarchy: name it too.
    if let Ok(root) = super::cgroup2_root() {
        if let Ok(meta) = fs::metadata(&root) {
            cgroup_paths
                .entry(meta.ino().to_string())
                .or_insert_with(|| format!("{} (root, host-wide)", root.display()));
        }
    }
    let mut out = Vec::new();
    let entries = match fs::read_dir(&links_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(err) => return Err(err).with_context(|| format!("read {}", links_dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if name.starts_with("staging-") {
            continue;
        }
        let (program, attached_to) = name.rsplit_once('-').unwrap_or((name.as_str(), ""));
        let link: FdLink = PinnedLink::from_pin(&path)
            .with_context(|| format!("open pinned link {}", path.display()))?
            .into();
        let info = link
            .info()
            .with_context(|| format!("link info of {}", path.display()))?;
        out.push(PinnedProgram {
            program: program.to_owned(),
            attached_to: attached_to.to_owned(),
            cgroup_path: cgroup_paths.get(attached_to).cloned(),
            link_id: info.id(),
            program_id: info.program_id(),
            link_type: info
                .link_type()
                .map(|t| format!("{t:?}"))
                .unwrap_or_else(|_| "unknown".into()),
            pin: path.display().to_string(),
        });
    }
    out.sort_by(|a, b| (&a.attached_to, &a.program).cmp(&(&b.attached_to, &b.program)));
    Ok(out)
}

/// The table `tollgate pin status` prints.
pub fn render(pin_dir: &Path, programs: &[PinnedProgram]) -> String {
    let mut out = format!("pinned under {}\n", pin_dir.display());
    if programs.is_empty() {
        out.push_str("  nothing pinned: agent connections are NOT redirected\n");
        return out;
    }
    out.push_str(&format!(
        "  {:<24} {:<28} {:>8} {:>8}  {}\n",
        "program", "attached to", "prog id", "link id", "link type"
    ));
    for p in programs {
        let place = match (&p.cgroup_path, p.attached_to.as_str()) {
            (Some(path), _) => path.clone(),
            (None, "host") => "host (all sockets)".to_owned(),
            (None, id) => format!("cgroup id {id}"),
        };
        out.push_str(&format!(
            "  {:<24} {:<28} {:>8} {:>8}  {}\n",
            p.program, place, p.program_id, p.link_id, p.link_type
        ));
    }
    out
}
