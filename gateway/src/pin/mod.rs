//! Makes the gateway unavoidable: loads the kernel programs, attaches them to
//! the agent cgroups, pins links and maps in bpffs, fills the redirect map
//! with the protected targets and keeps agents off the listeners' ports.
//!
//! Links are pinned so they outlive the daemon: when tollgate is down, an
//! agent's connection to a protected target is still rewritten to the
//! (now closed) listener and refused, never sent direct. A restarted daemon
//! attaches fresh links next to the old ones, then atomically replaces the
//! old pins, so there is no moment without a redirect. The pinned bind
//! programs keep the listeners' ports free for the restarted daemon: no
//! agent can take one while tollgate is down and receive the connections
//! the redirect sends there.

pub mod btf;
pub mod link_info;
mod mounts;
pub mod ports;
pub mod status;

use std::{
    collections::BTreeSet,
    fs,
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        links::FdLink, BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock,
        CgroupSockAddr, SockOps,
    },
    Btf, Ebpf, EbpfLoader,
};
use gateway_common::{
    egress_setting, global_names, map_names, program_names, ClientEndpointKey, EgressRule,
    OriginalDestination, Redirect, TargetKey, EGRESS_RULE_ENTRIES, LISTENER_PORT_ENTRIES,
    REDIRECT_MAP_ENTRIES,
};
use tracing::{info, warn};

pub use mounts::{cgroup2_root, ensure_mounts, is_plain_absolute};

/// The kernel object, built from `gateway-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gateway-ebpf.o"));

/// cgroup attachments made through bpf_link always coexist with other
/// programs (the kernel treats them as BPF_F_ALLOW_MULTI) and reject any
/// explicit attach flag, so the link is created with none.
const LINK_ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
    program_names::SENDMSG4,
    program_names::SENDMSG6,
    program_names::BIND4,
    program_names::BIND6,
];

/// Every program an agent cgroup needs, each pinned as
/// `<program>-<cgroup id>`. Without any one of them an agent has a way
/// around tollgate (without connect6, `::ffff:target` on an AF_INET6
/// socket; without sock_create, a raw socket; ...), so `pin status` calls
/// a cgroup protected only when all are pinned.
pub const AGENT_CGROUP_PROGRAMS: [&str; SOCK_ADDR_PROGRAMS.len() + 3] = {
    let n = SOCK_ADDR_PROGRAMS.len();
    let mut all = [""; SOCK_ADDR_PROGRAMS.len() + 3];
    let mut i = 0;
    while i < n {
        all[i] = SOCK_ADDR_PROGRAMS[i];
        i += 1;
    }
    all[n] = program_names::SOCK_CREATE;
    all[n + 1] = program_names::SOCK_OPS;
    all[n + 2] = program_names::SOURCE_ROUTE;
    all
};

/// One egress allow rule, parsed from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    pub ip: IpAddr,
    /// Prefix length in the address's own family (0..=32 or 0..=128).
    pub prefix: u8,
    pub port_lo: u16,
    pub port_hi: u16,
    /// 0 TCP or UDP ("any" in the configuration), 6 TCP, 17 UDP.
    pub protocol: u32,
}

impl AllowRule {
    /// Whether the rule lets a TCP connection to `destination` through.
    pub fn allows_tcp(self, destination: SocketAddr) -> bool {
        self.to_kernel().allows(
            &ip_words(destination.ip()),
            u32::from(destination.port()),
            gateway_common::IPPROTO_TCP,
        )
    }

    /// The kernel's form: IPv4 prefixes become IPv4-mapped, as the
    /// programs see every destination.
    pub fn to_kernel(self) -> EgressRule {
        let (v6, prefix) = match self.ip {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped(), u32::from(self.prefix) + 96),
            IpAddr::V6(v6) => (v6, u32::from(self.prefix)),
        };
        let mask_bits: u128 = if prefix == 0 {
            0
        } else {
            u128::MAX << (128 - prefix)
        };
        let mask_octets = mask_bits.to_be_bytes();
        let addr_octets = (u128::from_be_bytes(v6.octets()) & mask_bits).to_be_bytes();
        EgressRule {
            addr: words_of(addr_octets),
            mask: words_of(mask_octets),
            port_lo: u32::from(self.port_lo),
            port_hi: u32::from(self.port_hi),
            protocol: self.protocol,
            _reserved: 0,
        }
    }
}

/// What agent cgroups may reach besides the protected targets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Refuse (EPERM) whatever no rule allows.
    pub default_deny: bool,
    pub allow: Vec<AllowRule>,
}

/// A protected destination and the listener that serves it.
#[derive(Debug, Clone, Copy)]
pub struct Protected {
    pub address: SocketAddr,
    pub listener: SocketAddr,
}

/// What the kernel saw of the agent behind an accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOrigin {
    /// The address the agent connected to.
    pub original_destination: SocketAddr,
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

/// What the evidence reader needs from the loaded object: the three ring
/// buffers, the loss counters and the host-wide evidence programs (for
/// their ids and recursion misses).
pub struct EvidenceHandles {
    /// Connects to anywhere but a protected target: anyone can fill it.
    pub ring: RingBuf<MapData>,
    /// Connections and packets to protected targets (and, from an older
    /// daemon's programs still attached, agent cgroups' events).
    pub reserved: RingBuf<MapData>,
    /// The agent cgroups' redirects and refusals.
    pub agents: RingBuf<MapData>,
    pub counters: PerCpuArray<MapData, u64>,
    /// (program name, program fd) of each host-wide evidence program.
    pub tracing_programs: Vec<(String, OwnedFd)>,
    /// The host-wide probe was already pinned (a previous daemon's, left
    /// attached while it was down): every connection made since it was
    /// pinned is an event. False on a first start in a boot, or after
    /// `tollgate unpin`: connections made before are not.
    pub probe_was_pinned: bool,
    /// (program name, its id and recursion misses) of each host-wide
    /// evidence program a previous daemon left pinned, read just before
    /// this start replaced it (see [`replaced_instance`]).
    pub replaced_programs: Vec<(String, crate::evidence::ProgStats)>,
}

/// Name of the pinned link of the host-wide evidence probe.
pub(super) const HOST_LINK_SUFFIX: &str = "host";

/// The loaded programs and their maps, attached and pinned.
pub struct Pinning {
    _ebpf: Ebpf,
    original_destinations: BpfHashMap<MapData, u64, OriginalDestination>,
    client_endpoints: BpfHashMap<MapData, ClientEndpointKey, u64>,
    evidence: Option<EvidenceHandles>,
    /// What the redirect map held before this start replaced it: the
    /// targets in force until then (normally the last start's; those of a
    /// start that installed its own and failed before recording them).
    replaced_targets: Vec<SocketAddr>,
}

/// Why a process in `cgroup` could be moved out of it by someone other
/// than root, if it could: moving a process between two cgroups takes
/// write access to `cgroup.procs` of a cgroup above both, so a delegated
/// subtree (a `cgroup.procs` its user may write, as under
/// `user@UID.service`) above or at the agent cgroup lets the agent's own
/// user take it out, to connect wherever it likes. Checked from `cgroup`
/// (or its nearest existing parent) up to the hierarchy's root.
/// `trusted` is the one owner allowed besides modes (root; tests pass
/// their own uid).
fn movable_out_by_others(cgroup: &Path, root: &Path, trusted: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut dir = Some(cgroup);
    while let Some(at) = dir {
        let procs = at.join("cgroup.procs");
        if let Ok(meta) = fs::metadata(&procs) {
            if meta.uid() != trusted || meta.mode() & 0o022 != 0 {
                return Some(format!(
                    "{} is owned by uid {} with mode {:o}: a process of that user (or group) can \
                     move itself out of the agent cgroup; use a cgroup only root can move \
                     processes in or out of (not one under a delegated subtree such as \
                     user@UID.service)",
                    procs.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ));
            }
        }
        if at == root {
            break;
        }
        dir = at.parent();
    }
    None
}

/// Makes the pin directory and its `maps` and `links` the daemon's own:
/// owned by it and writable by no one else, created so or taken over.
/// Whoever may write the directory that holds a link's pin may unlink the
/// pin, which detaches the program: the redirect or the evidence gone,
/// without an error anywhere. bpffs is mounted 1777, so an agent could
/// make the directory (and chmod it 777) before tollgate first pins there.
/// The directories above must be root's or the daemon's, and writable by
/// no one else unless sticky (as bpffs's root is), or it would not help.
fn own_pin_dirs(pin_dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
    mounts::ensure_inside_bpffs(pin_dir)?;
    // SAFETY: geteuid and getegid have no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if let Some(parent) = pin_dir.parent() {
        fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        for dir in parent.ancestors().filter(|d| !d.as_os_str().is_empty()) {
            let meta = fs::symlink_metadata(dir).with_context(|| format!("{}", dir.display()))?;
            let writable_by_others = meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0;
            if (meta.uid() != 0 && meta.uid() != uid) || writable_by_others {
                bail!(
                    "{} is owned by uid {} with mode {:o}: whoever may write it may remove the pins \
                     below it; use a bpffs_dir whose every parent is root's and not writable by others",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                );
            }
        }
    }
    for dir in [
        pin_dir.to_path_buf(),
        pin_dir.join("maps"),
        pin_dir.join("links"),
    ] {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
        }
        // Opened without following a symlink, then changed through that
        // handle: what is checked is what is changed.
        let handle = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&dir)
            .with_context(|| format!("open {} (a symlink is refused)", dir.display()))?;
        let meta = handle.metadata()?;
        if meta.uid() != uid || meta.mode() & 0o022 != 0 {
            warn!(
                dir = %dir.display(),
                owner = meta.uid(),
                mode = format!("{:o}", meta.mode() & 0o7777),
                "a pin directory was not the daemon's own: taken over (its owner now the daemon's, mode 700)"
            );
            std::os::unix::fs::fchown(&handle, Some(uid), Some(gid))
                .with_context(|| format!("chown {}", dir.display()))?;
            handle
                .set_permissions(fs::Permissions::from_mode(0o700))
                .with_context(|| format!("chmod {}", dir.display()))?;
            // Its maker could have renamed it away and put another in its
            // place since it was opened; once it is the daemon's (in a
            // sticky or the daemon's own parent) that can no longer happen,
            // so the name must still lead to the directory taken over.
            let now =
                fs::symlink_metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
            if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) {
                bail!(
                    "{} was replaced while tollgate took it over: someone else is making pin \
                     directories there; remove it (as root) and start again",
                    dir.display()
                );
            }
            // What its maker left in it is not the daemon's to use.
            for entry in fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
                let entry = entry?;
                let owner = entry.metadata()?.uid();
                let name = entry.file_name();
                let own_subdir = dir == pin_dir && (name == "maps" || name == "links");
                if owner != uid && !own_subdir {
                    bail!(
                        "{} holds {:?}, owned by uid {owner}: a pin directory someone else made \
                         is taken over only empty; remove what they left (as root) and start again",
                        dir.display(),
                        name
                    );
                }
            }
        }
    }
    Ok(())
}

/// Held while a daemon runs: an exclusive lock on its pin directory and
/// on each of its agent cgroups, and a shared one on every cgroup above
/// them (all released by the kernel when the process ends, however it
/// ends).
pub struct PinLock {
    _held: Vec<fs::File>,
    pin_dir: PathBuf,
    /// The agent cgroups as the file system has them (no `..`, no symlink),
    /// each once (all made): what the daemon pins.
    agent_cgroups: Vec<PathBuf>,
    /// The cgroup2 mount, as the file system has it.
    cgroup_root: PathBuf,
}

/// Takes the [`PinLock`] of `pin_dir` (created if missing) and
/// `agent_cgroups` (created if missing), before anything is pinned: a
/// second daemon started on either, which would point the redirect at
/// its own listeners and replace the first one's programs, stops here
/// with nothing changed. So does one on a cgroup above or below one of
/// this daemon's (a process there would run both daemons' programs): a
/// daemon holds the cgroups above its own shared, which an exclusive lock
/// on one of them, and a shared one on one of its own, then refuse.
pub fn lock(pin_dir: &Path, agent_cgroups: &[PathBuf]) -> Result<PinLock> {
    use std::os::unix::fs::MetadataExt;
    ensure_mounts()?;
    own_pin_dirs(pin_dir).with_context(|| format!("pin directory {}", pin_dir.display()))?;
    let mut held = vec![lock_dir(pin_dir, libc::LOCK_EX, "this pin directory")?];
    let root = fs::canonicalize(cgroup2_root()?).context("the cgroup2 mount")?;
    let inode = |dir: &Path| {
        fs::metadata(dir)
            .map(|m| (m.dev(), m.ino()))
            .with_context(|| format!("stat {}", dir.display()))
    };
    // Each cgroup as the file system has it (no `..`, no symlink), once
    // even if configured under two spellings, and under the cgroup2 mount:
    // the cgroups above it are then its path's parents.
    let mut own = std::collections::BTreeMap::new();
    let daemon_cgroup = own_cgroup_path(&root);
    for cgroup in agent_cgroups {
        let not_under = |real: &Path| {
            anyhow::anyhow!(
                "agent cgroup {} is {}, not under the cgroup2 mount {}",
                cgroup.display(),
                real.display(),
                root.display()
            )
        };
        // Where it would be made, checked before anything is made there.
        if let Some(existing) = cgroup.ancestors().find(|dir| dir.exists()) {
            let real = fs::canonicalize(existing)
                .with_context(|| format!("agent cgroup {}", cgroup.display()))?;
            if !real.starts_with(&root) {
                return Err(not_under(&real));
            }
        }
        fs::create_dir_all(cgroup)
            .with_context(|| format!("create agent cgroup {}", cgroup.display()))?;
        let real = fs::canonicalize(cgroup)
            .with_context(|| format!("agent cgroup {}", cgroup.display()))?;
        if !real.starts_with(&root) {
            return Err(not_under(&real));
        }
        // The daemon in an agent cgroup would be redirected to its own
        // listeners (and refused its own egress under deny): every session
        // would fail, with nothing at start to say why.
        if let Some(daemon) = daemon_cgroup.as_deref().filter(|d| d.starts_with(&real)) {
            bail!(
                "tollgate itself runs in cgroup {}, which is agent cgroup {} or below it: its own \
                 connections would be redirected to itself; run it outside the agent cgroups \
                 (and do not make the cgroup2 root or a slice holding it an agent cgroup)",
                daemon.display(),
                cgroup.display()
            );
        }
        if let std::collections::btree_map::Entry::Vacant(entry) = own.entry(inode(&real)?) {
            held.push(lock_dir(
                &real,
                libc::LOCK_EX,
                "this cgroup, or one below it, as an agent cgroup",
            )?);
            entry.insert(real);
        }
    }
    let mut above = std::collections::BTreeSet::new();
    for cgroup in own.values() {
        for dir in cgroup
            .ancestors()
            .skip(1)
            .take_while(|d| d.starts_with(&root))
        {
            let id = inode(dir)?;
            if !own.contains_key(&id) && above.insert(id) {
                let what = format!(
                    "this cgroup, above agent cgroup {}, as an agent cgroup",
                    cgroup.display()
                );
                held.push(lock_dir(dir, libc::LOCK_SH, &what)?);
            }
        }
    }
    Ok(PinLock {
        _held: held,
        pin_dir: pin_dir.to_path_buf(),
        agent_cgroups: own.into_values().collect(),
        cgroup_root: root,
    })
}

/// A non-blocking lock (`how`: exclusive or shared) on the directory
/// `dir`; `what` names what another process holds when it refuses.
fn lock_dir(dir: &Path, how: libc::c_int, what: &str) -> Result<fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .with_context(|| format!("open {}", dir.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } != 0 {
        bail!(
            "{}: another tollgate runs with {what} ({}); stop it first, or give this one \
             its own bpffs_dir and agent cgroups",
            dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

impl Pinning {
    /// Loads the programs, attaches them to every agent cgroup of `lock`
    /// (which made the cgroups and the pin directory), pins everything
    /// under its pin directory and makes the redirect map
    /// hold exactly `protected` and the listener port map exactly
    /// `guarded`, the ports agents may not bind (their listeners', the
    /// targets' own and the identity provider's on this host, see
    /// `Config::guarded_ports`).
    pub fn install(
        lock: &PinLock,
        protected: &[Protected],
        guarded: &BTreeSet<u16>,
        egress: &EgressPolicy,
    ) -> Result<Self> {
        // The lock made the pin directory, checked who owns it, made the
        // agent cgroups and found them under the cgroup2 mount.
        let (pin_dir, agent_cgroups) = (&lock.pin_dir, &lock.agent_cgroups);
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for cgroup in agent_cgroups {
            if let Some(problem) = movable_out_by_others(cgroup, &lock.cgroup_root, 0) {
                bail!("agent cgroup {}: {problem}", cgroup.display());
            }
        }

        let offsets = btf::SockOffsets::from_btf(&btf::KernelBtf::from_sys_fs()?)
            .context("struct sock offsets from the kernel's BTF")?;
        info!(?offsets, "struct sock offsets read from the kernel's BTF");
        let mut loader = EbpfLoader::new();
        loader
            .override_global(global_names::SKC_DADDR, &offsets.skc_daddr, true)
            .override_global(global_names::SKC_DPORT, &offsets.skc_dport, true)
            .override_global(global_names::SKC_FAMILY, &offsets.skc_family, true)
            .override_global(global_names::SKC_V6_DADDR, &offsets.skc_v6_daddr, true)
            .override_global(global_names::SK_PROTOCOL, &offsets.sk_protocol, true)
            .override_global(global_names::OFFSETS_SET, &1u32, true);
        // The evidence ring buffers and counters are pinned too: the pinned
        // probe keeps recording while the daemon is down, and the next
        // daemon reads what it recorded. (A pin directory of a daemon from
        // before the reserved or the agents' ring gets it made here; its
        // still-attached programs keep writing to the rings they know until
        // replaced below.)
        //
        // With each, the size of a policy map (its content written at every
        // start): one an older version pinned at another size would be
        // taken as it is (the loader reuses a pin without looking at its
        // size), so its pin goes and a map of this version's size is made;
        // the older daemon's programs keep their map until their pins are
        // replaced. State maps (sockets, evidence) are kept whatever they
        // hold.
        let maps: [(&str, Option<u32>); 11] = [
            (map_names::REDIRECTS, Some(REDIRECT_MAP_ENTRIES)),
            (map_names::ORIGINAL_DESTINATIONS, None),
            (map_names::CLIENT_ENDPOINTS, None),
            (map_names::EVIDENCE, None),
            (map_names::EVIDENCE_RESERVED, None),
            (map_names::EVIDENCE_AGENTS, None),
            (map_names::EVIDENCE_COUNTERS, None),
            (map_names::EGRESS_RULES, Some(EGRESS_RULE_ENTRIES)),
            (map_names::EGRESS_SETTINGS, None),
            (map_names::LISTENER_PORTS, Some(LISTENER_PORT_ENTRIES)),
            (map_names::PROTECTED_ADDRESSES, Some(REDIRECT_MAP_ENTRIES)),
        ];
        let map_paths: Vec<(&str, PathBuf)> = maps
            .iter()
            .map(|(name, _)| (*name, maps_dir.join(name)))
            .collect();
        for ((_, entries), (name, path)) in maps.iter().zip(&map_paths) {
            if let Some(entries) = entries {
                remove_pin_of_other_size(path, *entries)?;
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("load the kernel programs")?;

        for name in SOCK_ADDR_PROGRAMS {
            let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
            program
                .load()
                .with_context(|| format!("load program {name}"))?;
        }
        program_mut::<SockOps>(&mut ebpf, program_names::SOCK_OPS)?
            .load()
            .context("load the sock_ops program")?;
        program_mut::<CgroupSock>(&mut ebpf, program_names::SOCK_CREATE)?
            .load()
            .context("load the sock_create program")?;
        program_mut::<CgroupSkb>(&mut ebpf, program_names::SOURCE_ROUTE)?
            .load()
            .context("load the source route program (cgroup_skb/egress)")?;

        // Redirects, listener ports and egress policy are in the (pinned,
        // shared) maps before any new attachment: a new program never runs
        // on stale policy.
        let mut redirects: BpfHashMap<MapData, TargetKey, Redirect> =
            take_map(&mut ebpf, map_names::REDIRECTS)?;
        let replaced_targets = sync_redirects(&mut redirects, protected)?;
        let mut protected_addresses: BpfHashMap<MapData, [u32; 4], u32> =
            take_map(&mut ebpf, map_names::PROTECTED_ADDRESSES)?;
        sync_protected_addresses(&mut protected_addresses, protected)?;
        let mut listener_port_map: BpfHashMap<MapData, u32, u32> =
            take_map(&mut ebpf, map_names::LISTENER_PORTS)?;
        sync_listener_ports(&mut listener_port_map, guarded)?;
        ports::warn_if_handed_out_by_the_kernel(guarded);
        sync_egress(&mut ebpf, egress)?;

        // Evidence first: from here on every TCP connect on the host is on
        // record, before any agent cgroup is attached.
        let kernel_btf = Btf::from_sys_fs().context("read the kernel's BTF")?;
        let probe: &mut BtfTracePoint = program_mut(&mut ebpf, program_names::TCP_STATE)?;
        probe
            .load("inet_sock_set_state", &kernel_btf)
            .context("load the evidence probe (tp_btf/inet_sock_set_state)")?;
        let link_id = probe.attach().context("attach the evidence probe")?;
        let link: FdLink = probe.take_link(link_id)?.into();
        let mut replaced_programs = Vec::new();
        if let Some(stats) =
            replaced_instance(&links_dir, program_names::TCP_STATE, HOST_LINK_SUFFIX)
        {
            replaced_programs.push((program_names::TCP_STATE.to_owned(), stats));
        }
        let probe_was_pinned =
            replace_pin(link, &links_dir, program_names::TCP_STATE, HOST_LINK_SUFFIX)?;
        let probe_fd = probe
            .fd()?
            .as_fd()
            .try_clone_to_owned()
            .context("duplicate the probe's fd")?;
        info!("evidence probe attached host-wide and pinned");
        let (packet_fd, replaced_packet) = attach_packet_evidence(&mut ebpf, &links_dir)?;
        if let Some(stats) = replaced_packet {
            replaced_programs.push((program_names::PACKET_EGRESS.to_owned(), stats));
        }

        let mut configured_places = Vec::with_capacity(agent_cgroups.len());
        for cgroup in agent_cgroups {
            let cgroup_file = fs::File::open(cgroup)
                .with_context(|| format!("open cgroup {}", cgroup.display()))?;
            let cgroup_id = cgroup_file
                .metadata()
                .with_context(|| format!("stat cgroup {}", cgroup.display()))?
                .ino();
            // Every program is attached before any pin is put in place: a
            // failure part-way then drops the links made so far (closing
            // their fds detaches them) instead of leaving the cgroup with
            // connect4 pinned and connect6 not, which agents could go
            // around through `::ffff:target`.
            let mut links: Vec<(&str, FdLink)> = Vec::with_capacity(AGENT_CGROUP_PROGRAMS.len());
            for name in SOCK_ADDR_PROGRAMS {
                let program: &mut CgroupSockAddr = program_mut(&mut ebpf, name)?;
                let link_id = program
                    .attach(&cgroup_file, LINK_ATTACH_MODE)
                    .with_context(|| format!("attach {name} to {}", cgroup.display()))?;
                links.push((name, program.take_link(link_id)?.try_into()?));
            }
            let program: &mut CgroupSock = program_mut(&mut ebpf, program_names::SOCK_CREATE)?;
            let link_id = program
                .attach(&cgroup_file, LINK_ATTACH_MODE)
                .with_context(|| format!("attach sock_create to {}", cgroup.display()))?;
            links.push((
                program_names::SOCK_CREATE,
                program.take_link(link_id)?.try_into()?,
            ));
            let program: &mut SockOps = program_mut(&mut ebpf, program_names::SOCK_OPS)?;
            let link_id = program
                .attach(&cgroup_file, LINK_ATTACH_MODE)
                .with_context(|| format!("attach sock_ops to {}", cgroup.display()))?;
            links.push((
                program_names::SOCK_OPS,
                program.take_link(link_id)?.try_into()?,
            ));
            let program: &mut CgroupSkb = program_mut(&mut ebpf, program_names::SOURCE_ROUTE)?;
            let link_id = program
                .attach(&cgroup_file, CgroupSkbAttachType::Egress, LINK_ATTACH_MODE)
                .with_context(|| format!("attach source_route to {}", cgroup.display()))?;
            links.push((
                program_names::SOURCE_ROUTE,
                program.take_link(link_id)?.try_into()?,
            ));
            replace_pins(links, &links_dir, &cgroup_id.to_string())
                .with_context(|| format!("pin the programs of {}", cgroup.display()))?;
            configured_places.push(cgroup_id.to_string());
            info!(cgroup = %cgroup.display(), cgroup_id, "redirect attached and pinned");
        }

        let left = unconfigured_pins(&links_dir, &configured_places);
        if !left.is_empty() {
            warn!(
                dir = %links_dir.display(),
                links = ?left,
                "pinned links of cgroups this configuration does not name (taken out of it, or left by a start killed part-way) stay attached: their agents stay redirected; `tollgate unpin` and a start remove them"
            );
        }

        // The configured agent cgroups' sock_ops are this daemon's now.
        // An older daemon's links left on a cgroup no longer configured
        // may still write its port-keyed map, which nothing reads.
        match fs::remove_file(maps_dir.join(map_names::CLIENT_PORTS_BEFORE)) {
            Ok(()) => info!("removed the pin of an older daemon's client port map"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "cannot remove an older daemon's client port map"),
        }
        let original_destinations = take_map(&mut ebpf, map_names::ORIGINAL_DESTINATIONS)?;
        let client_endpoints = take_map(&mut ebpf, map_names::CLIENT_ENDPOINTS)?;
        let ring: RingBuf<MapData> = take_map(&mut ebpf, map_names::EVIDENCE)?;
        let reserved: RingBuf<MapData> = take_map(&mut ebpf, map_names::EVIDENCE_RESERVED)?;
        let agents: RingBuf<MapData> = take_map(&mut ebpf, map_names::EVIDENCE_AGENTS)?;
        let counters = take_map(&mut ebpf, map_names::EVIDENCE_COUNTERS)?;
        Ok(Self {
            _ebpf: ebpf,
            original_destinations,
            client_endpoints,
            evidence: Some(EvidenceHandles {
                ring,
                reserved,
                agents,
                counters,
                tracing_programs: vec![
                    (program_names::TCP_STATE.to_owned(), probe_fd),
                    (program_names::PACKET_EGRESS.to_owned(), packet_fd),
                ],
                probe_was_pinned,
                replaced_programs,
            }),
            replaced_targets,
        })
    }

    /// See `replaced_targets` (recorded in the config record).
    pub fn replaced_targets(&self) -> &[SocketAddr] {
        &self.replaced_targets
    }

    /// Hands the evidence maps to their reader (once).
    pub fn take_evidence(&mut self) -> Option<EvidenceHandles> {
        self.evidence.take()
    }

    /// Names the agent behind a connection accepted on `listener` whose
    /// peer (the agent's side of the socket) is `peer`. `None` when the
    /// connection was not redirected by the kernel programs (e.g. a client
    /// that connected to the listener directly).
    pub fn client_origin(
        &mut self,
        peer: SocketAddr,
        listener: SocketAddr,
    ) -> Option<ClientOrigin> {
        let key = ClientEndpointKey {
            addr: ip_words(peer.ip()),
            port: u32::from(peer.port()),
            listener_port: u32::from(listener.port()),
        };
        let cookie = self.client_endpoints.get(&key, 0).ok()?;
        // One lookup per connection: the port will be reused by others.
        let _ = self.client_endpoints.remove(&key);
        let original = self.original_destinations.get(&cookie, 0).ok()?;
        Some(ClientOrigin {
            original_destination: SocketAddr::new(
                ip_from_words(original.addr),
                original.port as u16,
            ),
            pid: original.pid,
            comm: comm_to_string(&original.comm),
            cgroup_id: original.cgroup_id,
        })
    }
}

/// Attaches the packet evidence program (cgroup_skb/egress) at the root of
/// the cgroup v2 hierarchy, where it runs for the packets of every socket
/// on the host, and pins its link as `<program>-<root cgroup id>`,
/// replacing a previous daemon's. Returns a duplicate of the program's fd
/// (for its id in the loss records).
fn attach_packet_evidence(
    ebpf: &mut Ebpf,
    links_dir: &Path,
) -> Result<(OwnedFd, Option<crate::evidence::ProgStats>)> {
    let root = cgroup2_root()?;
    let root_file =
        fs::File::open(&root).with_context(|| format!("open cgroup root {}", root.display()))?;
    let root_id = root_file
        .metadata()
        .with_context(|| format!("stat cgroup root {}", root.display()))?
        .ino();
    let program: &mut CgroupSkb = program_mut(ebpf, program_names::PACKET_EGRESS)?;
    program
        .load()
        .context("load the packet evidence program (cgroup_skb/egress)")?;
    let link_id = program
        .attach(&root_file, CgroupSkbAttachType::Egress, LINK_ATTACH_MODE)
        .with_context(|| format!("attach the packet evidence program to {}", root.display()))?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    let replaced = replaced_instance(
        links_dir,
        program_names::PACKET_EGRESS,
        &root_id.to_string(),
    );
    replace_pin(
        link,
        links_dir,
        program_names::PACKET_EGRESS,
        &root_id.to_string(),
    )?;
    let fd = program
        .fd()?
        .as_fd()
        .try_clone_to_owned()
        .context("duplicate the packet evidence program's fd")?;
    info!(cgroup_root = %root.display(), "packet evidence attached at the cgroup root and pinned");
    Ok((fd, replaced))
}

/// The id and recursion misses of the instance of `program` a previous
/// daemon pinned at `<program>-<place>`, read just before this start
/// replaces it (both run until then). The kernel counts a program's
/// recursion misses per instance: what the replaced one missed since its
/// daemon's last loss record (all of a daemon's run that was killed, or
/// the time it was down) would otherwise be on no record. `None` when
/// there is none, or it cannot be read (then logged).
fn replaced_instance(
    links_dir: &Path,
    program: &str,
    place: &str,
) -> Option<crate::evidence::ProgStats> {
    let pin = links_dir.join(format!("{program}-{place}"));
    let read = link_info::read(&pin)
        .and_then(|facts| link_info::program_fd(facts.program_id))
        .and_then(|fd| crate::evidence::program_stats(&fd));
    match read {
        Ok(stats) => Some(stats),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => {
            warn!(pin = %pin.display(), error = %err, "cannot read the recursion misses of the program this start replaces: what it missed since its last loss record is on no record");
            None
        }
    }
}

/// This process's cgroup directory under the cgroup2 mount `root`, as
/// the file system has it.
fn own_cgroup_path(root: &Path) -> Option<PathBuf> {
    fs::canonicalize(cgroup_path_of(root, "self")?).ok()
}

/// The cgroup directory of process `pid` (a number, or `self`) under the
/// cgroup2 mount `root`.
fn cgroup_path_of(root: &Path, pid: &str) -> Option<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // cgroup v2's line is "0::/path".
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(rel.trim_start_matches('/')))
}

/// The cgroup v2 id (inode of the cgroup directory) of this process.
pub fn own_cgroup_id() -> Option<u64> {
    cgroup_id_of(&cgroup2_root().ok()?, "self")
}

/// The cgroup v2 id of process `pid` (a number, or `self`): the inode of
/// its cgroup's directory under the cgroup2 mount `root`, what the kernel
/// programs report.
pub fn cgroup_id_of(root: &Path, pid: &str) -> Option<u64> {
    fs::metadata(cgroup_path_of(root, pid)?)
        .ok()
        .map(|m| m.ino())
}

/// Removes everything tollgate pinned: the redirect stops, agent
/// connections go direct again.
///
/// Only what tollgate makes there goes: the `maps` and `links`
/// directories and the pins in them, then the directory itself, which is
/// left (with an error) if it holds anything else: a `bpffs_dir` that
/// names another tool's directory loses nothing of that tool's.
pub fn unpin(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        info!(dir = %pin_dir.display(), "nothing pinned");
        return Ok(());
    }
    mounts::ensure_inside_bpffs(pin_dir).context("unpin")?;
    // A running daemon's pins stay: it would go on without its redirect
    // and probes, and never know.
    let _running = lock_dir(pin_dir, libc::LOCK_EX, "these pins").context("unpin")?;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", dir.display())),
        }
    }
    fs::remove_dir(pin_dir).with_context(|| {
        format!(
            "remove {} (links and maps are gone; it holds something else, which is left in place)",
            pin_dir.display()
        )
    })?;
    info!(dir = %pin_dir.display(), "unpinned: links detached and maps released");
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the kernel object"))?;
    Ok(program.try_into()?)
}

/// Takes map `name` out of the loaded object as the map type `M` it is
/// declared as in the kernel programs.
fn take_map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<M> {
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the kernel object"))?;
    M::try_from(map).with_context(|| format!("map {name}"))
}

/// A link pinned under a staging name, not yet where `pin status` and the
/// next daemon look for it.
struct StagedPin {
    staging: PathBuf,
    path: PathBuf,
}

impl StagedPin {
    /// Pins `link` as `staging-<program>-<where>`, ready to replace
    /// `<program>-<where>` (`where` a cgroup id, or `host`).
    fn stage(link: FdLink, links_dir: &Path, program: &str, place: &str) -> Result<Self> {
        let path = links_dir.join(format!("{program}-{place}"));
        // bpffs refuses names with a dot in them.
        let staging = links_dir.join(format!("staging-{program}-{place}"));
        // One left by a daemon that died between staging and renaming.
        let _ = fs::remove_file(&staging);
        link.pin(&staging)
            .with_context(|| format!("pin link at {}", staging.display()))?;
        Ok(Self { staging, path })
    }

    /// Renames the staged pin into place: atomically replaces the link a
    /// previous daemon pinned there, whose program is then detached.
    /// Whether there was one.
    fn commit(self) -> Result<bool> {
        let replaced = self.path.exists();
        fs::rename(&self.staging, &self.path)
            .with_context(|| format!("replace pinned link {}", self.path.display()))?;
        Ok(replaced)
    }

    /// Removes the staged pin; its link, held by nothing else, is detached.
    fn discard(&self) {
        if let Err(err) = fs::remove_file(&self.staging) {
            warn!(pin = %self.staging.display(), error = %err, "cannot remove a staged link");
        }
    }
}

/// Pins `link` as `<program>-<where>` (a cgroup id, or `host`), atomically
/// replacing the link a previous daemon pinned there (whose program is then
/// detached); whether there was one.
fn replace_pin(link: FdLink, links_dir: &Path, program: &str, place: &str) -> Result<bool> {
    StagedPin::stage(link, links_dir, program, place)?.commit()
}

/// Pinned agent-cgroup links this start did not pin (by name): a cgroup
/// taken out of the configuration keeps its redirect (to listeners that
/// may be gone) until `tollgate unpin` and a start, and a link staged by
/// a start that was killed part-way stays attached. Neither is removed,
/// only reported: an agent in that cgroup would then connect direct.
fn unconfigured_pins(
    links_dir: &Path,
    configured_places: &[String],
) -> std::collections::BTreeSet<String> {
    let mut left = std::collections::BTreeSet::new();
    let Ok(entries) = fs::read_dir(links_dir) else {
        return left;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let staged = name.strip_prefix("staging-");
        let Some((program, place)) = staged.unwrap_or(&name).rsplit_once('-') else {
            continue;
        };
        // Host-wide links (the evidence programs) are not an agent cgroup's.
        if !AGENT_CGROUP_PROGRAMS.contains(&program) {
            continue;
        }
        if staged.is_some() || !configured_places.iter().any(|p| p == place) {
            left.insert(name);
        }
    }
    left
}

/// Pins every one of `links` as `<program>-<where>`, all staged first and
/// only then renamed into place: a failure while staging leaves the pins
/// as they were (a previous daemon's complete set, or none) rather than a
/// part of this set. The renames themselves are each atomic, and on a
/// restart each replaces a pin of the same program, so the cgroup has all
/// its programs throughout.
fn replace_pins(links: Vec<(&str, FdLink)>, links_dir: &Path, place: &str) -> Result<()> {
    let mut staged = Vec::with_capacity(links.len());
    for (program, link) in links {
        match StagedPin::stage(link, links_dir, program, place) {
            Ok(pin) => staged.push(pin),
            Err(err) => {
                // The links not yet staged are dropped on return, and so
                // detached, with these.
                for pin in &staged {
                    pin.discard();
                }
                return Err(err);
            }
        }
    }
    for pin in staged {
        pin.commit()?;
    }
    Ok(())
}

fn sync_egress(ebpf: &mut Ebpf, egress: &EgressPolicy) -> Result<()> {
    let mut rules: Array<MapData, EgressRule> = take_map(ebpf, map_names::EGRESS_RULES)?;
    let mut settings: Array<MapData, u32> = take_map(ebpf, map_names::EGRESS_SETTINGS)?;
    if egress.allow.len() > rules.len() as usize {
        bail!("at most {} egress rules", rules.len());
    }
    // Rules first, then the count, then the switch. The rules are
    // overwritten in place, so a program reading in between may see old
    // and new rules side by side (and, for a shrinking list, fewer):
    // each rule it sees is one of the two policies', so it allows nothing
    // neither allows, for the moment the update takes.
    for (i, rule) in egress.allow.iter().enumerate() {
        rules.set(i as u32, rule.to_kernel(), 0)?;
    }
    settings.set(egress_setting::RULE_COUNT, egress.allow.len() as u32, 0)?;
    settings.set(
        egress_setting::DEFAULT_DENY,
        u32::from(egress.default_deny),
        0,
    )?;
    info!(
        default = if egress.default_deny { "deny" } else { "allow" },
        rules = egress.allow.len(),
        "egress policy for agent cgroups"
    );
    Ok(())
}

/// Makes `map` hold exactly `wanted`: entries no longer wanted first go
/// (a target or listener removed from the configuration), then every
/// wanted one is written, so a changed value is replaced in place.
/// Returns the keys it held before.
fn sync_map<K: aya::Pod + PartialEq + std::fmt::Debug, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    map_name: &str,
    wanted: &[(K, V)],
) -> Result<Vec<K>> {
    let before: Vec<K> = map.keys().filter_map(|key| key.ok()).collect();
    for key in before
        .iter()
        .filter(|key| !wanted.iter().any(|(k, _)| k == *key))
    {
        map.remove(key)
            .with_context(|| format!("remove {key:?} from {map_name}"))?;
    }
    for (key, value) in wanted {
        map.insert(key, value, 0)
            .with_context(|| format!("add {key:?} to {map_name}"))?;
    }
    Ok(before)
}

/// Makes the listener port map hold exactly `wanted`: a port no longer
/// guarded is free for agents again.
fn sync_listener_ports(
    map: &mut BpfHashMap<MapData, u32, u32>,
    wanted: &BTreeSet<u16>,
) -> Result<()> {
    let entries: Vec<(u32, u32)> = wanted.iter().map(|port| (u32::from(*port), 1)).collect();
    sync_map(map, map_names::LISTENER_PORTS, &entries)?;
    info!(ports = ?wanted, "listener, target and identity provider ports closed to binds from agent cgroups");
    Ok(())
}

/// Returns what the map held before: the targets in force until now (a
/// previous start's, recorded or not).
fn sync_redirects(
    map: &mut BpfHashMap<MapData, TargetKey, Redirect>,
    protected: &[Protected],
) -> Result<Vec<SocketAddr>> {
    let wanted: Vec<(TargetKey, Redirect)> = protected
        .iter()
        .map(|p| Ok((target_key(p.address), redirect_to(p.listener)?)))
        .collect::<Result<_>>()?;
    let before = sync_map(map, map_names::REDIRECTS, &wanted)?;
    for p in protected {
        info!(target = %p.address, listener = %p.listener, "protected destination redirected");
    }
    Ok(before
        .into_iter()
        .filter_map(|key| {
            let port = u16::try_from(key.port).ok()?;
            Some(SocketAddr::new(ip_from_words(key.addr), port))
        })
        .collect())
}

/// Makes the address map hold exactly the protected targets' addresses
/// (one entry for several targets at one address).
fn sync_protected_addresses(
    map: &mut BpfHashMap<MapData, [u32; 4], u32>,
    protected: &[Protected],
) -> Result<()> {
    let addresses: BTreeSet<[u32; 4]> = protected
        .iter()
        .map(|p| target_key(p.address).addr)
        .collect();
    let entries: Vec<([u32; 4], u32)> = addresses.into_iter().map(|a| (a, 1)).collect();
    sync_map(map, map_names::PROTECTED_ADDRESSES, &entries).map(drop)
}

/// The map key for a destination: IPv4 is stored IPv4-mapped.
pub fn target_key(address: SocketAddr) -> TargetKey {
    TargetKey {
        addr: ip_words(address.ip()),
        port: u32::from(address.port()),
    }
}

/// Addresses as the kernel keys them: IPv4-mapped IPv6 addresses compare
/// as IPv4, and an IPv6 address without its scope id and flow label (a
/// target configured as `[fe80::1%2]:5432` is keyed, and its connections
/// recorded, as `[fe80::1]:5432`: kept, the two would never match).
pub fn normalise(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An address as the maps hold it: IPv6 words, IPv4 mapped (see
/// [`words_of`]).
fn ip_words(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    words_of(v6.octets())
}

/// 16 address bytes as four words, each holding its bytes in network
/// order, as the kernel's `user_ip6` does.
fn words_of(octets: [u8; 16]) -> [u32; 4] {
    let mut words = [0u32; 4];
    for (word, bytes) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    words
}

fn redirect_to(listener: SocketAddr) -> Result<Redirect> {
    let IpAddr::V4(v4) = listener.ip() else {
        bail!("listener {listener} must be IPv4");
    };
    Ok(Redirect {
        addr4: u32::from_ne_bytes(v4.octets()),
        port: u32::from(listener.port()),
    })
}

/// The address a map's words hold (see [`words_of`]), IPv4 unmapped.
pub(crate) fn ip_from_words(words: [u32; 4]) -> IpAddr {
    let mut octets = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        octets[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// A task's name from the kernel's NUL-padded `comm`.
pub(crate) fn comm_to_string(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Removes the pin at `path` when it holds a map of other than `entries`
/// entries (see where it is called); nothing when there is no pin.
fn remove_pin_of_other_size(path: &Path, entries: u32) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let pinned = aya::maps::MapData::from_pin(path)
        .with_context(|| format!("open the pinned map {}", path.display()))?;
    let pinned_entries = pinned
        .info()
        .with_context(|| format!("read the pinned map {}", path.display()))?
        .max_entries();
    if pinned_entries != entries {
        fs::remove_file(path).with_context(|| format!("remove the pin of {}", path.display()))?;
        info!(
            map = %path.display(),
            pinned_entries,
            entries,
            "a pinned map of an older version's size is made again"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The links of a cgroup the configuration no longer names, and links
    /// a killed start left staged, are reported; the configured cgroups'
    /// and the host-wide evidence links are not.
    #[test]
    fn pins_of_cgroups_not_configured_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "tollgate_connect4-100",
            "tollgate_sock_ops-100",
            "tollgate_connect4-200",
            "staging-tollgate_connect6-100",
            "tollgate_tcp_state-host",
            "tollgate_packet_egress-1",
        ] {
            fs::write(dir.path().join(name), b"").expect("write");
        }
        let left = unconfigured_pins(dir.path(), &["100".to_owned()]);
        let left: Vec<&str> = left.iter().map(String::as_str).collect();
        assert_eq!(
            left,
            ["staging-tollgate_connect6-100", "tollgate_connect4-200"]
        );
    }

    /// A `cgroup.procs` someone else may write, at the agent cgroup or
    /// any cgroup above it up to the root, is found and named; one below
    /// the root only where the hierarchy is judged.
    #[test]
    fn a_cgroup_others_can_move_processes_out_of_is_found() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        let agents = root.join("delegated").join("agents");
        fs::create_dir_all(&agents).expect("dirs");
        for dir in [&root, &root.join("delegated"), &agents] {
            let procs = dir.join("cgroup.procs");
            fs::write(&procs, b"").expect("procs");
            fs::set_permissions(&procs, fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        assert_eq!(movable_out_by_others(&agents, &root, me), None);
        // Not yet made: judged from its nearest parent.
        assert_eq!(movable_out_by_others(&agents.join("new"), &root, me), None);
        // Another owner.
        let found = movable_out_by_others(&agents, &root, me + 1).expect("found");
        assert!(
            found.contains(&format!("{}/cgroup.procs", agents.display())),
            "{found}"
        );
        // Writable by others, above the agent cgroup.
        let delegated = root.join("delegated").join("cgroup.procs");
        fs::set_permissions(&delegated, fs::Permissions::from_mode(0o666)).expect("chmod");
        let found = movable_out_by_others(&agents, &root, me).expect("found");
        assert!(found.contains(&delegated.display().to_string()), "{found}");
        // Above the root is not judged.
        assert_eq!(movable_out_by_others(&agents, &agents, me), None);
    }

    #[test]
    fn ipv4_targets_are_stored_mapped_and_come_back() {
        let addr: SocketAddr = "10.1.2.3:5432".parse().unwrap();
        let key = target_key(addr);
        assert_eq!(
            key.addr,
            gateway_common::v4_mapped(u32::from_ne_bytes([10, 1, 2, 3]))
        );
        assert_eq!(key.port, 5432);
        assert_eq!(ip_from_words(key.addr), addr.ip());
    }

    #[test]
    fn ipv6_targets_round_trip() {
        let addr: SocketAddr = "[fd00::7]:5432".parse().unwrap();
        assert_eq!(ip_from_words(target_key(addr).addr), addr.ip());
    }

    #[test]
    fn allow_rules_become_masked_mapped_kernel_rules() {
        let v4 = AllowRule {
            ip: "10.1.2.3".parse().unwrap(),
            prefix: 8,
            port_lo: 53,
            port_hi: 53,
            protocol: 17,
        }
        .to_kernel();
        let inside = target_key("10.200.0.1:53".parse().unwrap());
        let outside = target_key("11.0.0.1:53".parse().unwrap());
        assert!(v4.allows(&inside.addr, 53, 17));
        assert!(!v4.allows(&inside.addr, 53, 6), "udp only");
        assert!(!v4.allows(&inside.addr, 54, 17), "port 53 only");
        assert!(!v4.allows(&outside.addr, 53, 17));
        let v6 = AllowRule {
            ip: "fd00::".parse().unwrap(),
            prefix: 8,
            port_lo: 0,
            port_hi: 65535,
            protocol: 0,
        }
        .to_kernel();
        assert!(v6.allows(&target_key("[fd12::1]:443".parse().unwrap()).addr, 443, 6));
        assert!(!v6.allows(&target_key("[fe80::1]:443".parse().unwrap()).addr, 443, 6));
        assert!(!v6.allows(&inside.addr, 53, 17));
        let everything = AllowRule {
            ip: "::".parse().unwrap(),
            prefix: 0,
            port_lo: 0,
            port_hi: 65535,
            protocol: 0,
        }
        .to_kernel();
        assert!(everything.allows(&outside.addr, 1, 6));
        assert!(everything.allows(&outside.addr, 1, 17));
        // "any" is TCP and UDP, as documented: not every protocol that
        // reaches a hook.
        for other in [1, 58, 132, 136] {
            assert!(
                !everything.allows(&outside.addr, 1, other),
                "protocol {other}"
            );
        }
    }

    #[test]
    fn agent_cgroup_programs_are_every_program_attached_to_an_agent_cgroup() {
        for name in SOCK_ADDR_PROGRAMS {
            assert!(AGENT_CGROUP_PROGRAMS.contains(&name), "{name}");
        }
        assert!(AGENT_CGROUP_PROGRAMS.contains(&program_names::SOCK_CREATE));
        assert!(AGENT_CGROUP_PROGRAMS.contains(&program_names::SOCK_OPS));
        assert!(AGENT_CGROUP_PROGRAMS.contains(&program_names::SOURCE_ROUTE));
        assert_eq!(AGENT_CGROUP_PROGRAMS.len(), SOCK_ADDR_PROGRAMS.len() + 3);
        let distinct: BTreeSet<&str> = AGENT_CGROUP_PROGRAMS.into_iter().collect();
        assert_eq!(distinct.len(), AGENT_CGROUP_PROGRAMS.len());
    }

    #[test]
    fn egress_config_entries_parse_or_say_why_not() {
        use crate::config::EgressAllow;
        let entry = |cidr: &str, ports: Option<&str>, protocol: Option<&str>| EgressAllow {
            cidr: cidr.into(),
            ports: ports.map(Into::into),
            protocol: protocol.map(Into::into),
        };
        let rule = entry("10.0.0.53", Some("53"), Some("udp")).parse().unwrap();
        assert_eq!(
            (rule.prefix, rule.port_lo, rule.port_hi, rule.protocol),
            (32, 53, 53, 17)
        );
        let rule = entry("fd00::/8", Some("8000-8080"), None).parse().unwrap();
        assert_eq!(
            (rule.prefix, rule.port_lo, rule.port_hi, rule.protocol),
            (8, 8000, 8080, 0)
        );
        assert!(entry("10.0.0.0/33", None, None).parse().is_err());
        assert!(entry("db.internal", None, None).parse().is_err());
        assert!(entry("10.0.0.1", Some("90-80"), None).parse().is_err());
        assert!(entry("10.0.0.1", None, Some("icmp")).parse().is_err());
    }

    /// What the kernel programs judge for a connect to `asked`:`port` from
    /// a socket with IPv4 source `source4` (`None`: not bound) and bound
    /// IPv6 address `source6`, when `protected` are the protected targets.
    fn judged(asked: &str, source4: Option<&str>, source6: &str, protected: &[&str]) -> SocketAddr {
        let words = |ip: &str| target_key(SocketAddr::new(ip.parse().unwrap(), 0)).addr;
        let protected: Vec<TargetKey> = protected
            .iter()
            .map(|p| target_key(p.parse().unwrap()))
            .collect();
        let source4 = source4
            .map(|ip| u32::from_ne_bytes(ip.parse::<std::net::Ipv4Addr>().unwrap().octets()))
            .unwrap_or(0);
        let key =
            gateway_common::destination_key(words(asked), 5432, source4, &words(source6), |key| {
                protected.contains(key)
            });
        SocketAddr::new(ip_from_words(key.addr), key.port as u16)
    }

    #[test]
    fn the_unspecified_address_is_judged_where_the_kernel_sends_it() {
        let none: &[&str] = &[];
        let cases = [
            ("0.0.0.0", None, "::", "127.0.0.1:5432"),
            ("0.0.0.0", Some("127.0.0.2"), "::", "127.0.0.2:5432"),
            ("::ffff:0.0.0.0", None, "::", "127.0.0.1:5432"),
            (
                "::ffff:0.0.0.0",
                Some("127.0.0.2"),
                "::ffff:127.0.0.2",
                "127.0.0.2:5432",
            ),
            ("::", None, "::", "[::1]:5432"),
            ("::", None, "::1", "[::1]:5432"),
            // A socket bound to an IPv4-mapped address reaches `::` over IPv4.
            (
                "::",
                Some("127.0.0.2"),
                "::ffff:127.0.0.2",
                "127.0.0.1:5432",
            ),
            ("10.1.2.3", Some("127.0.0.2"), "::", "10.1.2.3:5432"),
            ("fd00::7", None, "::1", "[fd00::7]:5432"),
        ];
        for (asked, source4, source6, expected) in cases {
            assert_eq!(
                judged(asked, source4, source6, none),
                expected.parse::<SocketAddr>().unwrap(),
                "{asked} from {source4:?} / {source6}"
            );
        }
    }

    #[test]
    fn of_two_places_an_unspecified_destination_may_reach_a_protected_one_wins() {
        // Bound to a multicast or broadcast address, a socket has no source
        // address and `0.0.0.0` reaches 127.0.0.1.
        assert_eq!(
            judged("0.0.0.0", Some("224.0.0.1"), "::", &["127.0.0.1:5432"]),
            "127.0.0.1:5432".parse::<SocketAddr>().unwrap()
        );
        // Where the kernel usually sends it stays first when both are protected.
        assert_eq!(
            judged(
                "0.0.0.0",
                Some("127.0.0.2"),
                "::",
                &["127.0.0.1:5432", "127.0.0.2:5432"]
            ),
            "127.0.0.2:5432".parse::<SocketAddr>().unwrap()
        );
        // A named destination has only one place, protected or not.
        assert_eq!(
            judged("127.0.0.3", Some("127.0.0.2"), "::", &["127.0.0.1:5432"]),
            "127.0.0.3:5432".parse::<SocketAddr>().unwrap()
        );
        // `::` from an IPv6 socket has one place too.
        assert_eq!(
            judged("::", None, "::", &["127.0.0.1:5432"]),
            "[::1]:5432".parse::<SocketAddr>().unwrap()
        );
    }

    /// Which ring buffer an event goes to: the tcp_state probe's by the
    /// same REDIRECTS key the connect hooks use, the packet program's to
    /// the protected targets' ring, the agent programs' to their own.
    #[test]
    fn connects_to_protected_targets_and_agent_events_have_rings_of_their_own() {
        use gateway_common::{counted_program, reports_protected_targets, ring_for, EvidenceRing};
        let protected = [
            target_key("10.0.0.5:5432".parse().unwrap()),
            target_key("[fd00::7]:5432".parse().unwrap()),
        ];
        let is_protected = |key: &TargetKey| protected.contains(key);
        let reserved = |program, dst: &str| {
            // As the probe reads it: an AF_INET socket's address mapped, an
            // AF_INET6 socket's as it is (IPv4-mapped when it reaches IPv4).
            ring_for(program, &target_key(dst.parse().unwrap()), is_protected)
                == EvidenceRing::Targets
        };
        let tcp = counted_program::TCP_STATE;
        assert!(reserved(tcp, "10.0.0.5:5432"));
        assert!(
            reserved(tcp, "[::ffff:10.0.0.5]:5432"),
            "an IPv6 socket to the IPv4 target"
        );
        assert!(reserved(tcp, "[fd00::7]:5432"));
        assert!(!reserved(tcp, "10.0.0.5:5433"), "another port");
        assert!(!reserved(tcp, "127.0.0.1:9"), "a flood to a closed port");
        assert!(!reserved(tcp, "[::ffff:10.0.0.6]:5432"));
        let key = TargetKey {
            addr: [0, 0, u32::to_be(0xffff), u32::from_ne_bytes([10, 0, 0, 5])],
            port: 5432,
        };
        assert!(
            ring_for(tcp, &key, is_protected) == EvidenceRing::Targets,
            "the probe's v4_mapped form"
        );
        assert!(reserved(counted_program::PACKET_EGRESS, "127.0.0.1:9"));
        for program in [
            counted_program::CONNECT4,
            counted_program::CONNECT6,
            counted_program::SENDMSG4,
            counted_program::SENDMSG6,
            counted_program::SOCK_CREATE,
            counted_program::SOURCE_ROUTE,
        ] {
            // Even to a protected target: a refused send to one is an
            // agent's event, not a connection that reached it.
            assert_eq!(
                ring_for(program, &protected[0], is_protected),
                EvidenceRing::Agents,
                "program {program}"
            );
        }
        // The loss counters follow the rings.
        for program in 0..counted_program::COUNT {
            let to_targets =
                ring_for(program, &protected[0], is_protected) == EvidenceRing::Targets;
            assert_eq!(
                reports_protected_targets(program),
                to_targets,
                "program {program}"
            );
        }
    }

    #[test]
    fn comm_stops_at_nul() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"psql");
        assert_eq!(comm_to_string(&comm), "psql");
    }
}
