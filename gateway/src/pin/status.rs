//! `tollgate pin status`: what is attached where, read back from the
//! pinned links themselves (not from the daemon), so it also answers while
//! the daemon is down.
//!
//! It fails (and so exits non-zero) when an agent cgroup lacks any of its
//! programs: a launcher that starts agents only once `pin status`
//! succeeds must not start them in a cgroup an interrupted install left
//! with connect4 and without connect6.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::Serialize;

use gateway_common::program_names;

use tracing::warn;

use super::{link_info, AGENT_CGROUP_PROGRAMS, HOST_LINK_SUFFIX};

/// `attached_to` of a cgroup link whose cgroup was removed.
const DETACHED: &str = "detached";

/// What `program` starts with for a link that runs none of tollgate's
/// programs at a hook of tollgate's.
const NOT_TOLLGATES: &str = "not tollgate's";

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

/// A configured agent cgroup, as `pin status` looks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredCgroup {
    pub path: String,
    /// Its id (the directory's inode), `None` when it does not exist.
    pub id: Option<String>,
}

/// An agent cgroup that does not have every program of
/// [`AGENT_CGROUP_PROGRAMS`] pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncompleteCgroup {
    /// Its path when configured, else `cgroup id N`.
    pub cgroup: String,
    /// The programs not pinned on it, in [`AGENT_CGROUP_PROGRAMS`] order.
    pub missing: Vec<&'static str>,
    /// A configured cgroup that does not exist (nothing can be attached).
    pub absent: bool,
}

/// Why `pin status` fails: agents in these cgroups are not (or not
/// wholly) kept to tollgate.
#[derive(Debug, thiserror::Error)]
pub struct IncompletePins {
    pub pin_dir: PathBuf,
    pub cgroups: Vec<IncompleteCgroup>,
}

impl fmt::Display for IncompletePins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tollgate's programs are not all pinned under {} (agents in a cgroup named here \
             are not, or not wholly, redirected; without the host-wide evidence a connection \
             around tollgate goes unrecorded: start no agent until `tollgate pin status` \
             succeeds; starting tollgate attaches them all):",
            self.pin_dir.display()
        )?;
        for cgroup in &self.cgroups {
            if cgroup.absent {
                write!(f, "\n  {}: does not exist", cgroup.cgroup)?;
            } else if cgroup.missing.len() == AGENT_CGROUP_PROGRAMS.len() {
                write!(f, "\n  {}: nothing pinned", cgroup.cgroup)?;
            } else {
                write!(
                    f,
                    "\n  {}: INCOMPLETE, missing {}",
                    cgroup.cgroup,
                    cgroup.missing.join(", ")
                )?;
            }
        }
        Ok(())
    }
}

/// The agent cgroups that lack any of [`AGENT_CGROUP_PROGRAMS`]: every
/// configured one not pinned in full, and every other cgroup that has
/// some of them pinned but not all (a set left by an install that failed
/// part-way, by a daemon of a version with fewer programs, or for a
/// cgroup since dropped from the configuration: whoever runs there can go
/// around what is missing). Host-wide links are not agent cgroups'.
pub fn incomplete_cgroups(
    programs: &[PinnedProgram],
    configured: &[ConfiguredCgroup],
) -> Vec<IncompleteCgroup> {
    let mut pinned: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    // A link whose cgroup is gone guards nothing, and no one can run there.
    for p in programs.iter().filter(|p| p.attached_to != DETACHED) {
        if AGENT_CGROUP_PROGRAMS.contains(&p.program.as_str()) {
            pinned
                .entry(p.attached_to.as_str())
                .or_default()
                .insert(p.program.as_str());
        }
    }
    let missing_on = |id: &str| -> Vec<&'static str> {
        let empty = BTreeSet::new();
        let have = pinned.get(id).unwrap_or(&empty);
        AGENT_CGROUP_PROGRAMS
            .into_iter()
            .filter(|program| !have.contains(program))
            .collect()
    };
    let mut out = Vec::new();
    let mut judged = BTreeSet::new();
    for cgroup in configured {
        let Some(id) = &cgroup.id else {
            out.push(IncompleteCgroup {
                cgroup: cgroup.path.clone(),
                missing: AGENT_CGROUP_PROGRAMS.to_vec(),
                absent: true,
            });
            continue;
        };
        judged.insert(id.as_str());
        let missing = missing_on(id);
        if !missing.is_empty() {
            out.push(IncompleteCgroup {
                cgroup: cgroup.path.clone(),
                missing,
                absent: false,
            });
        }
    }
    for id in pinned.keys().filter(|id| !judged.contains(*id)) {
        let missing = missing_on(id);
        if !missing.is_empty() {
            out.push(IncompleteCgroup {
                cgroup: format!("cgroup id {id}"),
                missing,
                absent: false,
            });
        }
    }
    out
}

/// What stands for the host-wide evidence programs in [`IncompletePins`].
pub const HOST_EVIDENCE: &str = "host-wide evidence";

/// The host-wide evidence programs not pinned: the probe of every TCP
/// connection on the host (`host`) and the packet program at the cgroup
/// root (`root_id`). Without them a connection around tollgate goes
/// unrecorded, and `tollgate verify` cannot find it.
pub fn missing_host_programs(
    programs: &[PinnedProgram],
    root_id: Option<&str>,
) -> Vec<&'static str> {
    let pinned = |program: &str, at: &str| {
        programs
            .iter()
            .any(|p| p.program == program && p.attached_to == at)
    };
    let mut missing = Vec::new();
    if !pinned(program_names::TCP_STATE, HOST_LINK_SUFFIX) {
        missing.push(program_names::TCP_STATE);
    }
    if !root_id.is_some_and(|root| pinned(program_names::PACKET_EGRESS, root)) {
        missing.push(program_names::PACKET_EGRESS);
    }
    missing
}

/// Reads every pinned link under `{pin_dir}/links`. `agent_cgroups` (from
/// the configuration, possibly empty) names the cgroup ids. Fails with
/// [`IncompletePins`] when any agent cgroup, configured or found in the
/// pins, lacks one of its programs ([`incomplete_cgroups`]), or, when
/// anything is configured or pinned, a host-wide evidence program is
/// missing ([`missing_host_programs`]).
pub fn status(pin_dir: &Path, agent_cgroups: &[PathBuf]) -> Result<Vec<PinnedProgram>> {
    let mut configured = Vec::with_capacity(agent_cgroups.len());
    for cgroup in agent_cgroups {
        let id = match fs::metadata(cgroup) {
            Ok(meta) => Some(meta.ino().to_string()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => {
                return Err(err).with_context(|| format!("stat cgroup {}", cgroup.display()))
            }
        };
        configured.push(ConfiguredCgroup {
            path: cgroup.display().to_string(),
            id,
        });
    }
    // The root of the hierarchy, where the packet evidence sits.
    let root = super::cgroup2_root()
        .and_then(|root| Ok((fs::metadata(&root)?.ino().to_string(), root)))
        .ok();
    let programs = list(pin_dir, &configured, root.as_ref())?;
    let mut incomplete = incomplete_cgroups(&programs, &configured);
    if !programs.is_empty() || !configured.is_empty() {
        let root_id = root.as_ref().map(|(id, _)| id.as_str());
        let missing = missing_host_programs(&programs, root_id);
        if !missing.is_empty() {
            incomplete.push(IncompleteCgroup {
                cgroup: HOST_EVIDENCE.to_owned(),
                missing,
                absent: false,
            });
        }
    }
    if !incomplete.is_empty() {
        return Err(IncompletePins {
            pin_dir: pin_dir.to_owned(),
            cgroups: incomplete,
        }
        .into());
    }
    Ok(programs)
}

/// Every pinned link under `{pin_dir}/links`, cgroups named by
/// `configured` where they are among them, and the hierarchy's `root`
/// (its id and path).
fn list(
    pin_dir: &Path,
    configured: &[ConfiguredCgroup],
    root: Option<&(String, PathBuf)>,
) -> Result<Vec<PinnedProgram>> {
    let links_dir = pin_dir.join("links");
    let mut cgroup_paths = std::collections::HashMap::new();
    for cgroup in configured {
        if let Some(id) = &cgroup.id {
            cgroup_paths.insert(id.clone(), cgroup.path.clone());
        }
    }
    if let Some((id, path)) = root {
        cgroup_paths
            .entry(id.clone())
            .or_insert_with(|| format!("{} (root, host-wide)", path.display()));
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
        let facts = link_info::read(&path)
            .with_context(|| format!("read pinned link {}", path.display()))?;
        // What the link is comes from the kernel: a pin's name is only
        // what it was called, and a link whose cgroup was removed, or a
        // pin renamed, would otherwise count for a cgroup it does not
        // guard.
        let (program, attached_to) = match facts.tollgate_program() {
            Some((program, at)) if at == "0" => (program.to_owned(), DETACHED.to_owned()),
            Some((program, at)) => (program.to_owned(), at),
            None => (
                format!("{NOT_TOLLGATES} ({})", facts.program_name),
                facts
                    .cgroup_id
                    .map_or_else(String::new, |id| id.to_string()),
            ),
        };
        let named_so = name.rsplit_once('-') == Some((program.as_str(), attached_to.as_str()));
        if !named_so {
            warn!(pin = %path.display(), %program, %attached_to, "a pinned link's name is not what it is");
        }
        out.push(PinnedProgram {
            cgroup_path: cgroup_paths.get(&attached_to).cloned(),
            program,
            attached_to,
            link_id: facts.link_id,
            program_id: facts.program_id,
            link_type: facts.link_type_name(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pinned(program: &str, attached_to: &str) -> PinnedProgram {
        PinnedProgram {
            program: program.to_owned(),
            attached_to: attached_to.to_owned(),
            cgroup_path: None,
            link_id: 1,
            program_id: 1,
            link_type: "Cgroup".to_owned(),
            pin: format!("/sys/fs/bpf/tollgate/links/{program}-{attached_to}"),
        }
    }

    /// Every agent program on `id`, less `without`, and the host-wide ones.
    fn pins(id: &str, without: &[&str]) -> Vec<PinnedProgram> {
        let mut out: Vec<PinnedProgram> = AGENT_CGROUP_PROGRAMS
            .into_iter()
            .filter(|p| !without.contains(p))
            .map(|p| pinned(p, id))
            .collect();
        out.push(pinned("tollgate_tcp_state", "host"));
        out.push(pinned("tollgate_packet_egress", "1"));
        out
    }

    fn configured(path: &str, id: Option<&str>) -> ConfiguredCgroup {
        ConfiguredCgroup {
            path: path.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    #[test]
    fn a_cgroup_with_every_program_pinned_is_complete() {
        let agents = [configured("/sys/fs/cgroup/agents", Some("42"))];
        assert_eq!(incomplete_cgroups(&pins("42", &[]), &agents), []);
        // Without a configuration, judged from the pins alone; the root,
        // where the host-wide packet_egress sits, is no agent cgroup and
        // is not judged for lack of connect4.
        assert_eq!(incomplete_cgroups(&pins("42", &[]), &[]), []);
    }

    /// The host-wide evidence is judged apart: each of its two programs,
    /// where it belongs (the probe on the host, the packet program at the
    /// cgroup root, not at some other cgroup).
    #[test]
    fn a_missing_host_wide_evidence_program_is_named() {
        assert_eq!(
            missing_host_programs(&pins("42", &[]), Some("1")),
            Vec::<&str>::new()
        );
        let without = |program: &str| -> Vec<PinnedProgram> {
            pins("42", &[])
                .into_iter()
                .filter(|p| p.program != program)
                .collect()
        };
        assert_eq!(
            missing_host_programs(&without("tollgate_tcp_state"), Some("1")),
            ["tollgate_tcp_state"]
        );
        assert_eq!(
            missing_host_programs(&without("tollgate_packet_egress"), Some("1")),
            ["tollgate_packet_egress"]
        );
        assert_eq!(
            missing_host_programs(&pins("42", &[]), Some("7")),
            ["tollgate_packet_egress"],
            "at another cgroup than the root"
        );
        assert_eq!(
            missing_host_programs(&[], None),
            ["tollgate_tcp_state", "tollgate_packet_egress"]
        );
    }

    #[test]
    fn a_cgroup_missing_one_program_is_incomplete_and_names_it() {
        let agents = [configured("/sys/fs/cgroup/agents", Some("42"))];
        let partial = pins("42", &["tollgate_connect6", "tollgate_sock_create"]);
        let expected = [IncompleteCgroup {
            cgroup: "/sys/fs/cgroup/agents".to_owned(),
            missing: vec!["tollgate_connect6", "tollgate_sock_create"],
            absent: false,
        }];
        assert_eq!(incomplete_cgroups(&partial, &agents), expected);
        // Not configured (pin status without --config): named by id.
        let unnamed = incomplete_cgroups(&partial, &[]);
        assert_eq!(unnamed.len(), 1, "{unnamed:?}");
        assert_eq!(unnamed[0].cgroup, "cgroup id 42");
        assert_eq!(unnamed[0].missing, expected[0].missing);
    }

    #[test]
    fn a_configured_cgroup_with_nothing_pinned_or_not_there_is_incomplete() {
        let agents = [
            configured("/sys/fs/cgroup/agents", Some("42")),
            configured("/sys/fs/cgroup/more-agents", Some("43")),
            configured("/sys/fs/cgroup/gone", None),
        ];
        let found = incomplete_cgroups(&pins("42", &[]), &agents);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].cgroup, "/sys/fs/cgroup/more-agents");
        assert_eq!(found[0].missing, AGENT_CGROUP_PROGRAMS.to_vec());
        assert!(!found[0].absent);
        assert_eq!(found[1].cgroup, "/sys/fs/cgroup/gone");
        assert!(found[1].absent);
        // Nothing pinned and nothing configured: nothing to judge.
        assert_eq!(incomplete_cgroups(&[], &[]), []);
    }

    #[test]
    fn a_partial_set_on_a_cgroup_not_configured_is_reported_too() {
        let agents = [configured("/sys/fs/cgroup/agents", Some("42"))];
        let mut programs = pins("42", &[]);
        programs.push(pinned("tollgate_connect4", "77"));
        let found = incomplete_cgroups(&programs, &agents);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].cgroup, "cgroup id 77");
        assert_eq!(found[0].missing.len(), AGENT_CGROUP_PROGRAMS.len() - 1);
        assert!(!found[0].missing.contains(&"tollgate_connect4"));
    }

    /// A partial set on a cgroup that is gone (its links say cgroup 0)
    /// guards nothing and can hold no agent: it does not fail status.
    #[test]
    fn links_whose_cgroup_is_gone_are_no_incomplete_cgroup() {
        let agents = [configured("/sys/fs/cgroup/agents", Some("42"))];
        let mut programs = pins("42", &[]);
        programs.push(pinned("tollgate_connect4", DETACHED));
        assert!(incomplete_cgroups(&programs, &agents).is_empty());
    }

    #[test]
    fn the_error_says_what_is_missing_where() {
        let err = IncompletePins {
            pin_dir: "/sys/fs/bpf/tollgate".into(),
            cgroups: vec![
                IncompleteCgroup {
                    cgroup: "/sys/fs/cgroup/agents".to_owned(),
                    missing: vec!["tollgate_connect6"],
                    absent: false,
                },
                IncompleteCgroup {
                    cgroup: "/sys/fs/cgroup/more".to_owned(),
                    missing: AGENT_CGROUP_PROGRAMS.to_vec(),
                    absent: false,
                },
            ],
        };
        let text = err.to_string();
        assert!(
            text.contains("/sys/fs/cgroup/agents: INCOMPLETE, missing tollgate_connect6"),
            "{text}"
        );
        assert!(
            text.contains("/sys/fs/cgroup/more: nothing pinned"),
            "{text}"
        );
    }
}
