//! The daemon's one TOML configuration file. Each stage owns the type of its
//! own section; this file puts them together and checks what spans them.
//! A bad file stops the daemon at start with the file, the key and the reason.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{audit::AuditConfig, identity::IdentityConfig, policy::PolicyConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub pin: PinConfig,
    pub identity: IdentityConfig,
    pub audit: AuditConfig,
    /// Who may do what; with no grant, nothing is allowed.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Protected targets, one listener each.
    #[serde(rename = "target")]
    pub targets: Vec<TargetConfig>,
}

/// Where the kernel programs attach and where their state is pinned.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinConfig {
    /// cgroup v2 directories whose processes are agents; created if missing.
    #[serde(default)]
    pub agent_cgroups: Vec<PathBuf>,
    /// Directory under bpffs where links and maps are pinned.
    #[serde(default = "default_pin_dir")]
    pub bpffs_dir: PathBuf,
    /// How often the evidence stream records the loss counters.
    #[serde(default = "default_loss_interval_secs")]
    pub loss_interval_secs: u64,
    /// What agent cgroups may reach besides the protected targets:
    /// `"allow"` (the default: everything else is allowed, so adopting
    /// tollgate breaks nothing an agent already does) or `"deny"` (only
    /// `egress_allow` destinations; everything else is refused with EPERM).
    #[serde(default)]
    pub egress_default: EgressDefault,
    /// Destinations allowed when `egress_default = "deny"`.
    #[serde(default)]
    pub egress_allow: Vec<EgressAllow>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EgressDefault {
    #[default]
    Allow,
    Deny,
}

/// One `[[pin.egress_allow]]` entry, e.g.
/// `{ cidr = "10.0.0.53/32", ports = "53", protocol = "udp" }`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressAllow {
    /// An address or prefix, IPv4 or IPv6: "10.0.0.0/8", "::1", "fd00::/8".
    pub cidr: String,
    /// "53", "8000-8080"; all ports when absent.
    #[serde(default)]
    pub ports: Option<String>,
    /// "tcp", "udp" or "any" (the default).
    #[serde(default)]
    pub protocol: Option<String>,
}

impl EgressAllow {
    /// The parsed rule, or why it is wrong.
    pub fn parse(&self) -> Result<crate::pin::AllowRule, String> {
        let (addr, prefix) = match self.cidr.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (self.cidr.as_str(), None),
        };
        let ip: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{:?} is not an IP address", self.cidr))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{:?}: prefix must be 0..={max}", self.cidr))?,
            None => max,
        };
        let (port_lo, port_hi) = match self.ports.as_deref() {
            None => (0, 65535),
            Some(text) => {
                let (lo, hi) = text.split_once('-').unwrap_or((text, text));
                let lo: u16 = lo
                    .trim()
                    .parse()
                    .map_err(|_| format!("ports {text:?}: give N or N-M"))?;
                let hi: u16 = hi
                    .trim()
                    .parse()
                    .map_err(|_| format!("ports {text:?}: give N or N-M"))?;
                if lo > hi {
                    return Err(format!("ports {text:?}: empty range"));
                }
                (lo, hi)
            }
        };
        let protocol = match self.protocol.as_deref().unwrap_or("any") {
            "any" => 0,
            "tcp" => gateway_common::IPPROTO_TCP,
            "udp" => gateway_common::IPPROTO_UDP,
            other => return Err(format!("protocol {other:?}: give tcp, udp or any")),
        };
        Ok(crate::pin::AllowRule {
            ip,
            prefix,
            port_lo,
            port_hi,
            protocol,
        })
    }
}

impl Default for PinConfig {
    fn default() -> Self {
        Self {
            agent_cgroups: Vec::new(),
            bpffs_dir: default_pin_dir(),
            loss_interval_secs: default_loss_interval_secs(),
            egress_default: EgressDefault::default(),
            egress_allow: Vec::new(),
        }
    }
}

impl PinConfig {
    /// What `[pin]` must hold, whatever else the file says.
    fn check(&self) -> Result<(), (String, String)> {
        // Where it is on the file system is checked when it is used
        // (`pin::ensure_inside_bpffs`): bpffs may be mounted later.
        // `..` would let a path below bpffs name bpffs's root itself.
        if !crate::pin::is_plain_absolute(&self.bpffs_dir) {
            return Err((
                "pin.bpffs_dir".into(),
                "must be an absolute path, without `..`, of a directory of tollgate's own below \
                 a bpffs mount (/sys/fs/bpf/tollgate)"
                    .into(),
            ));
        }
        // An hour at most: loss records are how verify shows completeness
        // per interval, and a period near u64::MAX overflows the timer.
        if !(1..=3600).contains(&self.loss_interval_secs) {
            return Err((
                "pin.loss_interval_secs".into(),
                "must be between 1 and 3600".into(),
            ));
        }
        if self.egress_allow.len() > gateway_common::EGRESS_RULE_ENTRIES as usize {
            return Err((
                "pin.egress_allow".into(),
                format!("at most {} rules", gateway_common::EGRESS_RULE_ENTRIES),
            ));
        }
        for (i, rule) in self.egress_allow.iter().enumerate() {
            rule.parse()
                .map_err(|reason| (format!("pin.egress_allow[{i}]"), reason))?;
        }
        // An allow list only means something under a default of deny:
        // with allow, agents reach everything, and a careful list would
        // let its author believe otherwise.
        if !self.egress_allow.is_empty() && self.egress_default != EgressDefault::Deny {
            return Err((
                "pin.egress_allow".into(),
                "is only applied with pin.egress_default = \"deny\" (with \"allow\", the \
                 default, agents may reach every destination): set the default, or remove the \
                 list"
                    .into(),
            ));
        }
        for (i, cgroup) in self.agent_cgroups.iter().enumerate() {
            if !cgroup.is_absolute() {
                return Err((
                    format!("pin.agent_cgroups[{i}]"),
                    "must be an absolute path under the cgroup v2 mount".into(),
                ));
            }
        }
        Ok(())
    }
}

fn default_loss_interval_secs() -> u64 {
    5
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tollgate")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
}

impl Protocol {
    /// The name used in the config and the audit.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Name used in the audit and in policy, e.g. "orders-db".
    pub name: String,
    pub protocol: Protocol,
    /// The real address agents connect to; connections from agent cgroups
    /// to it are redirected to `listen`.
    pub address: SocketAddr,
    /// tollgate's listener for this target (IPv4 loopback).
    pub listen: SocketAddr,
    /// The credential tollgate presents upstream.
    pub credential: CredentialConfig,
    /// The databases agents may open on this target: policy names tables
    /// by schema and table, so one database is what a grant's tables
    /// mean. A session asking for any other is refused (42501).
    #[serde(default)]
    pub databases: Vec<String>,
    /// TLS offered to agents, with tollgate's certificate.
    #[serde(default)]
    pub tls: Option<crate::proxy::tls::ListenerTlsConfig>,
    /// Verified TLS to the target.
    #[serde(default)]
    pub upstream_tls: Option<crate::proxy::tls::UpstreamTlsConfig>,
    /// Most connections served at once; more are refused at once (FATAL
    /// 53300, as PostgreSQL's own limit), so a flood of connections that
    /// never log in cannot exhaust the daemon.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

impl TargetConfig {
    /// Whether nobody on a network can stand in the server's place: the
    /// connection is verified TLS, or the server is on this host (a
    /// loopback address, IPv4-mapped or not).
    pub fn path_is_protected(&self) -> bool {
        self.upstream_tls.is_some() || self.address.ip().to_canonical().is_loopback()
    }
}

fn default_max_connections() -> usize {
    1000
}

/// Bounds of `max_connections`.
const MAX_CONNECTIONS: std::ops::RangeInclusive<usize> = 1..=100_000;

// Debug by hand: the inline password must not reach a log.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    pub user: String,
    /// Password given inline (discouraged: prefer `password_file`).
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the password (first line). Checked when the
    /// configuration is loaded, and read again for every upstream
    /// connection, so a password rotated in the file is used without a
    /// restart.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for CredentialConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialConfig")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl CredentialConfig {
    /// The upstream password, if any (trust authentication needs none).
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        match &self.password_file {
            Some(path) => read_password_file(path)
                .map(Some)
                .map_err(|reason| anyhow::anyhow!("credential.password_file {reason}")),
            None => Ok(self.password.clone()),
        }
    }
}

/// Refuses a secret (a password, a private key) that every user of the
/// host may read or replace: whoever reads tollgate's upstream password
/// goes around it, whoever reads its checkpoint key can sign a rewritten
/// history. Group access is left to the operator (an auditor group, a
/// deployment group).
pub fn refuse_world_access(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|err| format!("{}: {err}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o006 != 0 {
        return Err(format!(
            "{}: any user of the host may read or change it (mode {:o}); make it readable by \
             tollgate's user alone (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

/// The first line of a password file, or why there is no password in it
/// (the reason starts with the file's path).
fn read_password_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    match text.lines().next() {
        // An empty password would only be refused by the target, session
        // after session, or accepted by a misconfigured one.
        None | Some("") => Err(format!("{}: the first line is empty", path.display())),
        Some(line) => Ok(line.to_owned()),
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: path.display().to_string(),
        key: "-".into(),
        reason: format!("cannot read: {err}"),
    })
}

/// `text` as a `T`, or an error naming the key and the reason, never the
/// value: the error's whole display quotes the offending line, which may
/// hold an inline password.
fn deserialize_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    let deserializer = toml::Deserializer::parse(text).map_err(|err| {
        let at = err.span().map_or(String::new(), |span| {
            let before = text.get(..span.start).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        ConfigError {
            file: file.into(),
            key: "-".into(),
            reason: format!("{}{at}", err.message().trim()),
        }
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        ConfigError {
            file: file.into(),
            key: if key.is_empty() || key == "." {
                "-".into()
            } else {
                key
            },
            reason: without_values(err.into_inner().message().trim()),
        }
    })
}

/// A configuration error that names the file, the key and the reason.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl Config {
    /// Reads and checks the file, and the files it names that sessions
    /// need (password files): what the daemon and `check-config` use.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Self::read(path)?;
        config.check_files().map_err(|(key, reason)| ConfigError {
            file: path.display().to_string(),
            key,
            reason,
        })?;
        Ok(config)
    }

    /// Reads and checks the file without opening the files it names.
    pub fn read(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        Self::parse(&read_text(path)?, &file)
    }

    /// Reads and checks `[pin]` alone: for the commands that need only it
    /// (`unpin`, `pin status`), so the redirect can still be removed or
    /// inspected when something else in the file (a policy typo, a broken
    /// credential) keeps the daemon from starting.
    pub fn read_pin(path: &Path) -> Result<PinConfig, ConfigError> {
        /// Everything but `[pin]` is left unread.
        #[derive(Deserialize)]
        struct PinOnly {
            #[serde(default)]
            pin: PinConfig,
        }
        let file = path.display().to_string();
        let only: PinOnly = deserialize_toml(&read_text(path)?, &file)?;
        only.pin
            .check()
            .map_err(|(key, reason)| ConfigError { file, key, reason })?;
        Ok(only.pin)
    }

    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = deserialize_toml(text, file)?;
        config.check().map_err(|(key, reason)| ConfigError {
            file: file.into(),
            key,
            reason,
        })?;
        Ok(config)
    }

    /// What agents' other traffic is held to: the default and the
    /// `egress_allow` rules, parsed (an error names the first rule that
    /// does not parse; `check` names its index).
    pub fn egress_policy(&self) -> Result<crate::pin::EgressPolicy, String> {
        Ok(crate::pin::EgressPolicy {
            default_deny: self.pin.egress_default == EgressDefault::Deny,
            allow: self
                .pin
                .egress_allow
                .iter()
                .map(|rule| rule.parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Loopback addresses of targets' servers agents could reach in their
    /// place: a target on `127.0.0.1:P` whose `[::1]:P` is not a target
    /// too (and the reverse; an IPv4-mapped `::ffff:127.0.0.1` is
    /// 127.0.0.1), while egress lets agents reach it (allowed by default,
    /// or by an `egress_allow` rule). A local PostgreSQL listens on both
    /// (`listen_addresses = 'localhost'`).
    pub fn unprotected_loopback_twins(&self) -> Vec<(String, std::net::SocketAddr)> {
        use crate::pin::normalise;
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let protected: HashSet<SocketAddr> =
            self.targets.iter().map(|t| normalise(t.address)).collect();
        // A configuration that passed `check` parses.
        let egress = self.egress_policy().unwrap_or_default();
        let reachable = |twin: SocketAddr| {
            !egress.default_deny || egress.allow.iter().any(|rule| rule.allows_tcp(twin))
        };
        self.targets
            .iter()
            .filter_map(|t| {
                let twin: IpAddr = match normalise(t.address).ip() {
                    IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => Ipv6Addr::LOCALHOST.into(),
                    IpAddr::V6(ip) if ip == Ipv6Addr::LOCALHOST => Ipv4Addr::LOCALHOST.into(),
                    _ => return None,
                };
                let twin = SocketAddr::new(twin, t.address.port());
                (!protected.contains(&twin) && reachable(twin)).then(|| (t.name.clone(), twin))
            })
            .collect()
    }

    /// The ports no agent may bind: every target's listener and own port
    /// (`pin::ports::guarded_ports`) and the identity provider's ports on
    /// this host ([`IdentityConfig::local_ports`]).
    pub fn guarded_ports(&self) -> std::collections::BTreeSet<u16> {
        let mut ports = crate::pin::ports::guarded_ports(&self.protected());
        ports.extend(self.identity.local_ports());
        ports
    }

    /// The destinations the kernel redirects, each to its listener.
    pub fn protected(&self) -> Vec<crate::pin::Protected> {
        self.targets
            .iter()
            .map(|t| crate::pin::Protected {
                address: t.address,
                listener: t.listen,
            })
            .collect()
    }

    /// Policy names that can never match what they mean to are refused:
    /// such a typo would silently switch a deny or a mask off. Tables are
    /// `schema.table`, masked columns `schema.table.column`, and every
    /// `targets` pattern must match a configured target.
    fn check_policy_names(&self) -> Result<(), (String, String)> {
        // A grant's `roles = ["*"]` means every caller: a role of that name
        // would read as one only its holders have.
        if self.identity.roles.contains_key("*") {
            return Err((
                "identity.roles.\"*\"".into(),
                "\"*\" cannot name a role: in a grant's roles it means every authenticated caller"
                    .into(),
            ));
        }
        // A `targets` list that is empty, or one of whose patterns matches
        // no target.
        let targets_check = |key: String, patterns: &[crate::policy::Pattern]| {
            if patterns.is_empty() {
                return Err((key, "is empty: the entry would apply to no target".into()));
            }
            match patterns
                .iter()
                .find(|p| !self.targets.iter().any(|t| p.matches(&t.name)))
            {
                Some(p) => Err((key, format!("{:?} matches no [[target]] name", p.text()))),
                None => Ok(()),
            }
        };
        // A role no `[identity.roles]` entry defines: no caller holds it,
        // so a grant's deny_tables for it would never apply.
        let roles_check = |key: String, roles: &[String]| match roles
            .iter()
            .find(|r| *r != "*" && !self.identity.roles.contains_key(*r))
        {
            Some(r) => Err((
                key,
                format!("{r:?} is not defined in [identity.roles]: no caller can hold it"),
            )),
            None => Ok(()),
        };
        for g in &self.policy.grants {
            let key = |field: &str| format!("policy.grant {}: {field}", g.name);
            for (field, patterns) in [
                ("read_tables", &g.read_tables),
                ("write_tables", &g.write_tables),
                ("deny_tables", &g.deny_tables),
            ] {
                if let Some(p) = patterns.iter().find(|p| !p.has_parts(2)) {
                    return Err((
                        key(field),
                        format!(
                            "{:?} is not schema.table (tables are named with their schema, e.g. public.{})",
                            p.text(),
                            p.text().rsplit('.').next().unwrap_or_default()
                        ),
                    ));
                }
            }
            targets_check(key("targets"), &g.targets)?;
            if g.roles.is_empty() {
                return Err((
                    key("roles"),
                    "is empty: no caller would hold the grant (\"*\" means every caller)".into(),
                ));
            }
            roles_check(key("roles"), &g.roles)?;
        }
        for m in &self.policy.masks {
            let key = |field: &str| format!("policy.mask {}: {field}", m.name);
            if m.except_roles.iter().any(|r| r == "*") {
                return Err((
                    key("except_roles"),
                    "\"*\" would except every caller: the mask would mask nothing".into(),
                ));
            }
            roles_check(key("except_roles"), &m.except_roles)?;
            if m.columns.is_empty() {
                return Err((
                    key("columns"),
                    "is empty: the mask would mask nothing".into(),
                ));
            }
            if let Some(p) = m.columns.iter().find(|p| !p.has_parts(3)) {
                return Err((
                    key("columns"),
                    format!(
                        "{:?} is not schema.table.column (e.g. public.customers.email)",
                        p.text()
                    ),
                ));
            }
            targets_check(key("targets"), &m.targets)?;
        }
        Ok(())
    }

    /// Why `ip` cannot be where a TCP connection goes, if it cannot: the
    /// unspecified address (in any of its forms), multicast, broadcast.
    fn not_a_destination(ip: std::net::IpAddr) -> Option<&'static str> {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_unspecified() {
            return Some("the unspecified address");
        }
        if ip.is_multicast() {
            return Some("a multicast address");
        }
        match ip {
            IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
            _ => None,
        }
    }

    /// Checks that span several keys.
    fn check(&self) -> Result<(), (String, String)> {
        if self.targets.is_empty() {
            return Err((
                "target".into(),
                "at least one [[target]] is required".into(),
            ));
        }
        self.check_policy_names()?;
        if let Some(t) = self.targets.iter().find(|t| t.databases.is_empty()) {
            return Err((
                "target.databases".into(),
                format!(
                    "target {}: list the databases agents may open (databases = [\"orders\"]): \
                     policy names tables by schema and table, so a grant means them in these",
                    t.name
                ),
            ));
        }
        // An empty name would match a startup packet that names no
        // database, which PostgreSQL then reads as the login user's name:
        // tollgate's own credential's database, not one listed here.
        if let Some(t) = self
            .targets
            .iter()
            .find(|t| t.databases.iter().any(|d| d.is_empty()))
        {
            return Err((
                "target.databases".into(),
                format!(
                    "target {}: a database name is empty; name each database agents may open",
                    t.name
                ),
            ));
        }
        // Each target is one entry of the kernel's redirect map: past its
        // size the daemon could not install the redirect. (The map of
        // ports agents may not bind holds two for each, its listener's and
        // its own: see the assertion below.)
        let redirect_entries = gateway_common::REDIRECT_MAP_ENTRIES as usize;
        if self.targets.len() > redirect_entries {
            return Err((
                "target".into(),
                format!("at most {redirect_entries} targets"),
            ));
        }
        // The targets' two ports each always fit (see the assertion
        // below); the identity provider's on this host may not.
        let port_entries = gateway_common::LISTENER_PORT_ENTRIES as usize;
        let guarded = self.guarded_ports().len();
        if guarded > port_entries {
            return Err((
                "identity".into(),
                format!(
                    "{guarded} ports to keep from agents (the targets' and listeners', and the identity \
                     provider's on this host), more than the {port_entries} the kernel's map holds"
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut listens = HashSet::new();
        let mut addresses = HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if !names.insert(&target.name) {
                return Err((
                    format!("target[{i}].name"),
                    format!("duplicate target name {:?}", target.name),
                ));
            }
            // Connections never go to these: the kernel sends one to
            // 0.0.0.0 or :: to a local address instead, which the redirect
            // and the evidence then see, so a target written so would
            // protect nothing and verify would match nothing.
            if let Some(why) = Self::not_a_destination(target.address.ip()) {
                return Err((
                    format!("target[{i}].address"),
                    format!(
                        "{} is {why}: no connection goes there; give the address agents connect to (127.0.0.1, the server's own)",
                        target.address
                    ),
                ));
            }
            // The redirect map holds one listener per address, as its key
            // has it (IPv4 as IPv4-mapped IPv6, no scope): a second target
            // for it would silently take the first one's agents.
            if !addresses.insert(crate::pin::target_key(target.address)) {
                return Err((
                    format!("target[{i}].address"),
                    format!("{} is protected by another target", target.address),
                ));
            }
            // By port, not address and port: the kernel keys what it
            // tells the proxy of a redirected connection (its process and
            // cgroup) by the agent's end and the listener's port, so two
            // listeners on one port of two loopback addresses could each
            // be told of the other's connection.
            if !listens.insert(target.listen.port()) {
                return Err((
                    format!("target[{i}].listen"),
                    format!(
                        "port {} is used by another target's listener (listeners need ports of their own)",
                        target.listen.port()
                    ),
                ));
            }
            if !target.listen.is_ipv4() || !target.listen.ip().is_loopback() {
                return Err((
                    format!("target[{i}].listen"),
                    "the listener must be an IPv4 loopback address (the kernel redirect points there)".into(),
                ));
            }
            if !MAX_CONNECTIONS.contains(&target.max_connections) {
                return Err((
                    format!("target[{i}].max_connections"),
                    format!(
                        "{} is out of range; allowed: {} to {}",
                        target.max_connections,
                        MAX_CONNECTIONS.start(),
                        MAX_CONNECTIONS.end()
                    ),
                ));
            }
            // Port 0 is where no connection goes: a listener there gets an
            // ephemeral port the redirect does not point at, and a target
            // there protects nothing.
            if target.listen.port() == 0 {
                return Err((
                    format!("target[{i}].listen"),
                    "port 0 is no port the redirect can point at; give the listener's port".into(),
                ));
            }
            if target.address.port() == 0 {
                return Err((
                    format!("target[{i}].address"),
                    "port 0 is no port agents connect to; give the target's port".into(),
                ));
            }
            if target.credential.user.is_empty() {
                return Err((
                    format!("target[{i}].credential.user"),
                    "is empty: give the user tollgate logs in upstream as".into(),
                ));
            }
            // As for a password file whose first line is empty: only the
            // target would refuse it, session after session, or a
            // misconfigured one accept it.
            if target.credential.password.as_deref() == Some("") {
                return Err((
                    format!("target[{i}].credential.password"),
                    "is empty: leave it out for trust authentication".into(),
                ));
            }
            if target.credential.password.is_some() && target.credential.password_file.is_some() {
                return Err((
                    format!("target[{i}].credential"),
                    "give password or password_file, not both".into(),
                ));
            }
        }
        // A target whose address is a listener (its own or another's,
        // in either spelling of an IPv4 address) sends tollgate's upstream
        // connections back into tollgate: every session would fail.
        for (i, target) in self.targets.iter().enumerate() {
            let address = crate::pin::target_key(target.address);
            if let Some(listener) = self
                .targets
                .iter()
                .find(|t| crate::pin::target_key(t.listen) == address)
            {
                return Err((
                    format!("target[{i}].address"),
                    format!(
                        "{} is the listener of target {:?}: tollgate would connect to itself",
                        target.address, listener.name
                    ),
                ));
            }
        }
        self.pin.check()
    }

    /// Checks the files the sessions read. A password file that cannot
    /// give a password would otherwise be noticed only at each upstream
    /// connection: the daemon would start and every session would fail.
    fn check_files(&self) -> Result<(), (String, String)> {
        for (i, target) in self.targets.iter().enumerate() {
            if let Some(path) = &target.credential.password_file {
                // At load only: a file rotated with looser modes while the
                // daemon runs keeps serving until the next start refuses
                // it, with this message.
                refuse_world_access(path)
                    .and_then(|()| read_password_file(path))
                    .map_err(|reason| {
                        (
                            format!("target[{i}].credential.password_file"),
                            format!("target {:?}: {reason}", target.name),
                        )
                    })?;
            }
        }
        Ok(())
    }
}

// Every target's listener port and own port are guarded (pin::ports): as
// many targets as the redirect map holds always fit the port map.
const _: () =
    assert!(gateway_common::LISTENER_PORT_ENTRIES >= 2 * gateway_common::REDIRECT_MAP_ENTRIES);

/// Descriptors a daemon holds besides its sessions': listeners, the audit
/// store's and the evidence stream's files, pinned maps, the identity
/// provider's connections, with room to spare.
const DESCRIPTORS_BESIDES_SESSIONS: u64 = 256;

impl Config {
    /// Open files the daemon may need at once: two a session (the agent's
    /// connection and the target's) for every target's `max_connections`,
    /// and [`DESCRIPTORS_BESIDES_SESSIONS`].
    pub fn descriptors_needed(&self) -> u64 {
        let sessions: u64 = self.targets.iter().map(|t| t.max_connections as u64).sum();
        2 * sessions + DESCRIPTORS_BESIDES_SESSIONS
    }
}

/// A deserializer's message with the value it quotes left out: "invalid
/// type: string \"hunter2\", expected ..." becomes "invalid type: string,
/// expected ...". The value may be an inline password put in the wrong
/// place, and the message goes to the terminal and the journal.
fn without_values(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let expected = rest.rsplit_once(", expected ").map_or("", |(_, e)| e);
        return format!("unknown variant, expected {expected}");
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // The last one: the value may hold the words too.
            let (found, expected) = rest.rsplit_once(", expected ").unwrap_or((rest, ""));
            let kind = found.split([' ', '`', '"']).next().unwrap_or_default();
            return match expected {
                "" => format!("{prefix}{kind}"),
                expected => format!("{prefix}{kind}, expected {expected}"),
            };
        }
    }
    message.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in deploy/ parses, and its identity settings pass the
    /// checks `check-config` runs (its files are placeholders).
    #[test]
    fn the_deploy_example_parses() {
        let text = include_str!("../../deploy/tollgate.toml");
        let config = Config::parse(text, "deploy/tollgate.toml").expect("parse");
        assert_eq!(config.targets.len(), 1);
        crate::identity::Verifier::check(&config.identity).expect("identity settings");
    }

    /// The open files a daemon may need: two a session of every target,
    /// and 256 besides (what the start-up warning is measured against).
    #[test]
    fn open_files_needed_count_two_a_session_of_every_target() {
        let text = with_targets(3, |i, t| {
            renamed(i, t, "db")
                .replace("127.0.0.1:16432", &format!("127.0.0.1:{}", 16432 + i))
                .replace("10.0.0.10:5432", &format!("10.0.0.{}:5432", 10 + i))
        });
        let config = Config::parse(&text, "tollgate.toml").expect("parse");
        let sessions: u64 = config
            .targets
            .iter()
            .map(|t| t.max_connections as u64)
            .sum();
        assert_eq!(sessions, 3 * config.targets[0].max_connections as u64);
        assert_eq!(config.descriptors_needed(), 2 * sessions + 256);
    }

    /// A value in the wrong place or of the wrong type is not quoted back
    /// in the error: it may be an inline password, and the error goes to
    /// the terminal and the journal.
    #[test]
    fn a_misplaced_secret_is_not_quoted_in_the_error() {
        let text = include_str!("../../deploy/tollgate.toml");
        let old = r#"credential = { user = "tollgate_agent", password_file = "/etc/tollgate/orders-db.password" }"#;
        assert!(text.contains(old));
        for (credential, key) in [
            (r#"credential = "hunter2-secret""#, "target[0].credential"),
            (
                r#"credential = "x, expected hunter2-secret""#,
                "target[0].credential",
            ),
            (
                r#"credential = { user = "u", password = 123456789 }"#,
                "target[0].credential.password",
            ),
        ] {
            let err = Config::parse(&text.replace(old, credential), "tollgate.toml")
                .expect_err("refused")
                .to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains("invalid type"), "{err}");
            assert!(
                !err.contains("hunter2-secret") && !err.contains("123456789"),
                "{err}"
            );
        }
        let err = Config::parse(
            &text.replace(r#"protocol = "postgres""#, r#"protocol = "hunter2-secret""#),
            "tollgate.toml",
        )
        .expect_err("refused")
        .to_string();
        assert!(
            err.contains("target[0].protocol") && err.contains("unknown variant"),
            "{err}"
        );
        assert!(!err.contains("hunter2-secret"), "{err}");
    }

    /// The loss interval is bounded both ways: 0 would never tick, and a
    /// period near u64::MAX overflows the evidence reader's timer.
    #[test]
    fn the_loss_interval_is_refused_outside_its_bounds() {
        let text = include_str!("../../deploy/tollgate.toml");
        for (secs, ok) in [
            ("0", false),
            ("1", true),
            ("3600", true),
            ("3601", false),
            ("18446744073709551615", false),
        ] {
            let edited = text.replacen("[pin]", &format!("[pin]\nloss_interval_secs = {secs}"), 1);
            let parsed = Config::parse(&edited, "tollgate.toml");
            assert_eq!(
                parsed.is_ok(),
                ok,
                "{secs}: {:?}",
                parsed.err().map(|e| e.to_string())
            );
        }
    }

    /// Port 0, an empty upstream user or inline password, and a target
    /// whose address is a listener (in either spelling of an IPv4
    /// address, its own or another target's) are refused: each would start
    /// a daemon every session of which fails.
    #[test]
    fn targets_that_no_session_could_use_are_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        let cases = [
            (
                "listen = \"127.0.0.1:16432\"",
                "listen = \"127.0.0.1:0\"",
                "target[0].listen",
            ),
            (
                "address = \"10.0.0.10:5432\"",
                "address = \"10.0.0.10:0\"",
                "target[0].address",
            ),
            (
                "address = \"10.0.0.10:5432\"",
                "address = \"[::ffff:127.0.0.1]:16432\"",
                "target[0].address",
            ),
            (
                "user = \"tollgate_agent\"",
                "user = \"\"",
                "target[0].credential.user",
            ),
            (
                "password_file = \"/etc/tollgate/orders-db.password\"",
                "password = \"\"",
                "target[0].credential.password",
            ),
        ];
        for (from, to, key) in cases {
            assert!(text.contains(from), "{from}");
            let err = Config::parse(&text.replacen(from, to, 1), "tollgate.toml").expect_err(to);
            assert_eq!(err.key, key, "{to}: {err}");
        }
        // Another target's listener as the address.
        let crossed = with_targets(2, |i, t| match i {
            0 => t.to_string(),
            _ => renamed(i, t, "cross")
                .replace("127.0.0.1:16432", "127.0.0.1:16433")
                .replace("10.0.0.10:5432", "127.0.0.1:16432"),
        });
        let err = Config::parse(&crossed, "tollgate.toml").expect_err("crossed");
        assert_eq!(err.key, "target[1].address", "{err}");
        assert!(
            err.reason.contains("the listener of target \"orders-db\""),
            "{err}"
        );
    }

    /// An allow list without a default of deny would be read as a
    /// restriction that does not exist: refused.
    #[test]
    fn an_egress_allow_list_without_a_default_of_deny_is_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        let deny = "egress_default = \"deny\"";
        assert!(text.contains(deny));
        for to in ["egress_default = \"allow\"", ""] {
            let err = Config::parse(&text.replacen(deny, to, 1), "tollgate.toml").expect_err(to);
            assert_eq!(err.key, "pin.egress_allow", "{to}: {err}");
        }
        Config::parse(text, "tollgate.toml").expect("the example, with deny");
    }

    /// `unpin` and `pin status` read `[pin]` alone: a mistake elsewhere in
    /// the file, which keeps the daemon from starting, does not keep the
    /// redirect from being removed; `[pin]`'s own rules still hold.
    #[test]
    fn pin_commands_read_pin_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = include_str!("../../deploy/tollgate.toml");
        let typo = text.replacen("[[policy.grant]]", "[[policy.grant]]\nno_such_key = 1", 1);
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, &typo).expect("write");
        assert!(Config::read(&path).is_err(), "the typo stops the daemon");
        let pin = Config::read_pin(&path).expect("[pin] alone reads");
        assert_eq!(pin.bpffs_dir, PathBuf::from("/sys/fs/bpf/tollgate"));
        assert_eq!(
            pin.agent_cgroups,
            vec![PathBuf::from("/sys/fs/cgroup/tollgate-agents")]
        );
        for dir in ["tollgate", "/sys/fs/bpf/x/..", "/sys/fs/bpf/../bpf"] {
            let edited = typo.replacen("[pin]", &format!("[pin]\nbpffs_dir = {dir:?}"), 1);
            std::fs::write(&path, edited).expect("write");
            let err = Config::read_pin(&path).expect_err(dir);
            assert_eq!(err.key, "pin.bpffs_dir", "{dir}: {err}");
        }
        std::fs::write(&path, "no [pin] at all = here").expect("write");
        assert!(Config::read_pin(&path).is_err(), "not TOML");
        std::fs::write(&path, "[identity]\nwhatever = 1\n").expect("write");
        assert_eq!(
            Config::read_pin(&path)
                .expect("no [pin]: the defaults")
                .bpffs_dir,
            PathBuf::from("/sys/fs/bpf/tollgate")
        );
    }

    /// `deploy/tollgate.toml` with its one target repeated `n` times, the
    /// i-th edited by `edit(i, target_text)`.
    /// Target `i` of `with_targets`, named `{prefix}-{i}`, except the first,
    /// which keeps its name: the grants name it.
    fn renamed(i: usize, t: &str, prefix: &str) -> String {
        match i {
            0 => t.to_string(),
            _ => t.replace("orders-db\"", &format!("{prefix}-{i}\"")),
        }
    }

    fn with_targets(n: usize, edit: impl Fn(usize, &str) -> String) -> String {
        let text = include_str!("../../deploy/tollgate.toml");
        let start = text.find("[[target]]").expect("a target");
        let end = start + text[start..].find("[[policy.grant]]").expect("a grant");
        let target = &text[start..end];
        let targets: String = (0..n).map(|i| edit(i, target)).collect();
        format!("{}{targets}{}", &text[..start], &text[end..])
    }

    /// A target on one loopback address of this host, with egress allowed
    /// by default, is named with the other loopback address of its port,
    /// which agents could reach the same server at; not when that one is
    /// a target too, nor under egress deny, nor for a remote target.
    #[test]
    fn a_loopback_target_without_its_twin_is_named() {
        let local = |twin: Option<&str>| {
            with_targets(if twin.is_some() { 2 } else { 1 }, |i, t| {
                let t = renamed(i, t, "local")
                    .replace("127.0.0.1:16432", &format!("127.0.0.1:{}", 16432 + i));
                match i {
                    0 => t.replace("10.0.0.10:5432", "127.0.0.1:5432"),
                    _ => t.replace("10.0.0.10:5432", twin.unwrap_or_default()),
                }
            })
        };
        // The example denies egress by default: allowed here.
        let allowing = |text: String| {
            let mut config = Config::parse(&text, "tollgate.toml").expect("parse");
            config.pin.egress_default = EgressDefault::Allow;
            config
        };
        let config = allowing(local(None));
        assert_eq!(
            config.unprotected_loopback_twins(),
            vec![("orders-db".to_string(), "[::1]:5432".parse().expect("addr"))]
        );
        let both = allowing(local(Some("[::1]:5432")));
        assert!(both.unprotected_loopback_twins().is_empty());
        let mut denied = config.clone();
        denied.pin.egress_default = EgressDefault::Deny;
        assert!(denied.unprotected_loopback_twins().is_empty());
        // Under deny, a rule that lets agents reach the twin brings it
        // back; one for another port does not.
        for (rule, named) in [("::1/128", true), ("::/0", true), ("127.0.0.0/8", false)] {
            let mut allowed = denied.clone();
            allowed.pin.egress_allow = vec![EgressAllow {
                cidr: rule.into(),
                ports: None,
                protocol: None,
            }];
            assert_eq!(
                !allowed.unprotected_loopback_twins().is_empty(),
                named,
                "{rule}"
            );
        }
        let mut other_port = denied.clone();
        other_port.pin.egress_allow = vec![EgressAllow {
            cidr: "::1/128".into(),
            ports: Some("5433".into()),
            protocol: None,
        }];
        assert!(other_port.unprotected_loopback_twins().is_empty());
        // An IPv4-mapped target is its IPv4 address; either form of the
        // twin protects it; another loopback address has no twin.
        let mapped = allowing(local(None).replace("127.0.0.1:5432", "[::ffff:127.0.0.1]:5432"));
        assert_eq!(
            mapped.unprotected_loopback_twins(),
            vec![("orders-db".to_string(), "[::1]:5432".parse().expect("addr"))]
        );
        let mapped_twin = allowing(
            local(Some("[::1]:5432")).replace("127.0.0.1:5432", "[::ffff:127.0.0.1]:5432"),
        );
        assert!(mapped_twin.unprotected_loopback_twins().is_empty());
        let other_loopback = allowing(local(None).replace("127.0.0.1:5432", "127.0.0.2:5432"));
        assert!(other_loopback.unprotected_loopback_twins().is_empty());
        let remote = allowing(with_targets(1, |_, t| t.to_string()));
        assert!(remote.unprotected_loopback_twins().is_empty());
    }

    /// Listeners need ports of their own: what the kernel tells the proxy
    /// of a redirected connection is keyed by the listener's port, so two
    /// listeners on one port of two loopback addresses would be told of
    /// each other's connections.
    #[test]
    fn two_listeners_on_one_port_are_refused() {
        let text = with_targets(2, |i, t| {
            let t = renamed(i, t, "orders-db")
                .replace("10.0.0.10:5432", &format!("10.0.0.{}:5432", 10 + i));
            match i {
                0 => t,
                _ => t.replace("127.0.0.1:16432", "127.0.0.2:16432"),
            }
        });
        let err = Config::parse(&text, "tollgate.toml").expect_err("refused");
        assert_eq!(err.key, "target[1].listen", "{err}");
        assert!(
            err.reason
                .contains("port 16432 is used by another target's listener"),
            "{err}"
        );
    }

    /// A second target for an address already protected is refused: the
    /// kernel's redirect map holds one listener per address, so it would
    /// silently take the other target's agents.
    #[test]
    fn two_targets_for_one_address_are_refused() {
        // The same address written twice, and an IPv4 address and its
        // IPv4-mapped IPv6 form: the kernel's map keys them alike.
        for second in ["10.0.0.10:5432", "[::ffff:10.0.0.10]:5432"] {
            let text = with_targets(2, |i, t| {
                let t = renamed(i, t, "orders-db")
                    .replace("127.0.0.1:16432", &format!("127.0.0.1:{}", 16432 + i));
                match i {
                    0 => t,
                    _ => t.replace("10.0.0.10:5432", second),
                }
            });
            let err = Config::parse(&text, "tollgate.toml").expect_err("refused");
            assert_eq!(err.key, "target[1].address", "{second}: {err}");
            assert!(
                err.reason.contains("protected by another target"),
                "{second}: {err}"
            );
        }
    }

    /// A target at an address no connection goes to (the kernel sends one
    /// to 0.0.0.0 or :: to a local address) would protect nothing, and
    /// verify would match nothing: refused, in every form.
    #[test]
    fn a_target_at_an_address_no_connection_goes_to_is_refused() {
        for address in [
            "0.0.0.0:5432",
            "[::]:5432",
            "[::ffff:0.0.0.0]:5432",
            "255.255.255.255:5432",
            "224.0.0.1:5432",
            "[ff02::1]:5432",
        ] {
            let text = with_targets(1, |_, t| t.replace("10.0.0.10:5432", address));
            let err = Config::parse(&text, "tollgate.toml").expect_err(address);
            assert_eq!(err.key, "target[0].address", "{address}: {err}");
            assert!(
                err.reason.contains("no connection goes there"),
                "{address}: {err}"
            );
        }
        let text = with_targets(1, |_, t| t.replace("10.0.0.10:5432", "[::1]:5432"));
        assert!(Config::parse(&text, "tollgate.toml").is_ok());
    }

    /// More targets than the kernel's maps hold are refused when the file is
    /// read, naming the limit, rather than when the redirect is installed.
    #[test]
    fn more_targets_than_the_kernel_maps_hold_are_refused() {
        let target = |i: usize, t: &str| {
            renamed(i, t, "db")
                .replace(
                    "10.0.0.10:5432",
                    &format!("10.0.{}.{}:5432", i / 250, i % 250 + 1),
                )
                .replace("127.0.0.1:16432", &format!("127.0.0.1:{}", 10_000 + i))
        };
        let entries = gateway_common::REDIRECT_MAP_ENTRIES as usize;
        Config::parse(&with_targets(entries, target), "tollgate.toml")
            .expect("as many targets as the map holds");
        let err = Config::parse(&with_targets(entries + 1, target), "tollgate.toml")
            .expect_err("one more is refused");
        assert!(
            err.reason.contains(&format!("at most {entries} targets")),
            "{err}"
        );

        // Every target's own port is guarded too: the most targets the
        // redirect map holds, each with a port of its own, still fit the
        // port map.
        let own_ports = |i: usize, t: &str| {
            renamed(i, t, "db")
                .replace("10.0.0.10:5432", &format!("127.0.0.1:{}", 30_000 + i))
                .replace("127.0.0.1:16432", &format!("127.0.0.1:{}", 10_000 + i))
        };
        Config::parse(&with_targets(entries, own_ports), "tollgate.toml")
            .expect("every port of the most targets is guarded");
        // The identity provider's port on this host is guarded too: one
        // more port than the map holds is refused; one already guarded is
        // not another.
        let full = with_targets(entries, own_ports);
        let local_keys = |port: u16| {
            full.replace(
                "discovery_uri = \"https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0/.well-known/openid-configuration\"",
                &format!("discovery_uri = \"https://127.0.0.1:{port}/.well-known/openid-configuration\""),
            )
        };
        let err = Config::parse(&local_keys(40_000), "tollgate.toml")
            .expect_err("one port past the map is refused");
        assert_eq!(err.key, "identity", "{err}");
        assert!(
            err.reason.contains("2049 ports to keep from agents"),
            "{err}"
        );
        Config::parse(&local_keys(30_000), "tollgate.toml")
            .expect("a port already guarded takes no entry of its own");
    }

    /// A policy name that can never match what it means to is refused when
    /// the file is read, naming the key: the typo would switch a deny or a
    /// mask off without a word.
    #[test]
    fn policy_names_that_match_nothing_are_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        for (from, to, key) in [
            (
                "deny_tables = [\"public.secrets\"]",
                "deny_tables = [\"secrets\"]",
                "deny_tables",
            ),
            (
                "read_tables = [\"public.*\"]",
                "read_tables = [\"public.orders.id\"]",
                "read_tables",
            ),
            (
                "targets = [\"orders-db\"]",
                "targets = [\"orders_db\"]",
                "targets",
            ),
        ] {
            assert!(text.contains(from), "{from}");
            let edited = text.replacen(from, to, 1);
            let err = Config::parse(&edited, "tollgate.toml").expect_err(to);
            assert!(err.to_string().contains(key), "{to}: {err}");
        }
        let with_mask = |columns: &str, targets: &str| {
            format!(
                "{text}\n[[policy.mask]]\nname = \"pii\"\ncolumns = [{columns}]\ntargets = [{targets}]\n"
            )
        };
        assert!(Config::parse(
            &with_mask("\"public.customers.email\", \"*.ssn\"", "\"orders-*\""),
            "tollgate.toml"
        )
        .is_ok());
        for (columns, targets) in [
            ("\"customers.email\"", "\"orders-db\""),
            ("\"public.customers.email\"", "\"orders_db\""),
        ] {
            let err =
                Config::parse(&with_mask(columns, targets), "tollgate.toml").expect_err(columns);
            assert!(err.to_string().contains("policy.mask pii"), "{err}");
        }
    }

    /// A role that no `[identity.roles]` entry defines can never be held:
    /// a grant naming it (its deny_tables would never apply) or a mask
    /// excepting it is refused, naming the key.
    #[test]
    fn roles_that_no_entry_defines_are_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        let from = "roles = [\"db-writer\"]";
        assert!(text.contains(from));
        let err = Config::parse(
            &text.replacen(from, "roles = [\"db-writers\"]", 1),
            "tollgate.toml",
        )
        .expect_err("an undefined role");
        assert!(
            err.to_string().contains("policy.grant writers: roles")
                && err.to_string().contains("\"db-writers\""),
            "{err}"
        );
        let with_mask = |except: &str| {
            format!(
                "{text}\n[[policy.mask]]\nname = \"pii\"\ncolumns = [\"public.customers.email\"]\nexcept_roles = [{except}]\n"
            )
        };
        assert!(Config::parse(&with_mask("\"db-reader\""), "tollgate.toml").is_ok());
        let err = Config::parse(&with_mask("\"pii-reader\""), "tollgate.toml")
            .expect_err("an undefined role");
        assert!(
            err.to_string().contains("policy.mask pii: except_roles"),
            "{err}"
        );
    }

    /// An empty list where a grant or mask needs one, and `*` where it
    /// would mean something other than what it reads as, are refused:
    /// each would switch the entry off (or on for everyone) silently.
    #[test]
    fn entries_that_would_apply_to_nothing_or_everyone_are_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        let from = "roles = [\"db-writer\"]";
        assert!(text.contains(from));
        let with_mask = |body: &str| format!("{text}\n[[policy.mask]]\nname = \"pii\"\n{body}\n");
        for (edited, key) in [
            (
                text.replacen(from, "roles = []", 1),
                "policy.grant writers: roles",
            ),
            (
                text.replacen(
                    "roles = [\"db-writer\"]\ntargets = [\"orders-db\"]",
                    "roles = [\"db-writer\"]\ntargets = []",
                    1,
                ),
                "policy.grant writers: targets",
            ),
            (
                with_mask("columns = [\"public.customers.email\"]\ntargets = []"),
                "policy.mask pii: targets",
            ),
            (with_mask("columns = []"), "policy.mask pii: columns"),
            (
                with_mask("columns = [\"public.customers.email\"]\nexcept_roles = [\"*\"]"),
                "policy.mask pii: except_roles",
            ),
            (
                format!("{text}\n[identity.roles.\"*\"]\ngroups = [\"db-admins\"]\n"),
                "identity.roles.\"*\"",
            ),
        ] {
            let err = Config::parse(&edited, "tollgate.toml").expect_err(key);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        // The unedited entries pass.
        assert!(Config::parse(
            &with_mask("columns = [\"public.customers.email\"]"),
            "tollgate.toml"
        )
        .is_ok());
    }

    /// A syntax error says where, without quoting the line: it may hold
    /// an inline password.
    #[test]
    fn a_syntax_error_does_not_quote_the_line() {
        let text = include_str!("../../deploy/tollgate.toml");
        let from = "credential = { user = \"tollgate_agent\", password_file = \"/etc/tollgate/orders-db.password\" }";
        assert!(text.contains(from));
        let broken = text.replacen(
            from,
            "credential = { user = \"tollgate_agent\", password = \"hunter2\\q-secret\" }",
            1,
        );
        let err = Config::parse(&broken, "tollgate.toml").expect_err("a bad escape");
        let line = broken
            .lines()
            .position(|l| l.contains("hunter2"))
            .map(|i| i + 1)
            .expect("the line");
        let shown = err.to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains(&format!("at line {line}, column ")),
            "{shown}"
        );
    }

    /// A target must say which databases agents may open: a grant's
    /// tables mean tables in them.
    #[test]
    fn a_target_without_databases_is_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        assert!(Config::parse(text, "tollgate.toml").is_ok());
        let without = text.replacen("databases = [\"orders\"]", "", 1);
        let err = Config::parse(&without, "tollgate.toml").expect_err("refused");
        assert!(err.to_string().contains("databases"), "{err}");
    }

    /// An empty database name would match a startup packet that names
    /// none, which the server reads as its login user's database.
    #[test]
    fn an_empty_database_name_is_refused() {
        let text = include_str!("../../deploy/tollgate.toml");
        let empty = text.replacen(
            "databases = [\"orders\"]",
            "databases = [\"orders\", \"\"]",
            1,
        );
        assert_ne!(empty, text);
        let err = Config::parse(&empty, "tollgate.toml").expect_err("refused");
        assert!(
            err.to_string().contains("a database name is empty"),
            "{err}"
        );
    }

    /// A target's inline password never shows in its Debug form (which
    /// logs and error chains may print).
    #[test]
    fn an_inline_password_is_not_in_debug_output() {
        let credential = CredentialConfig {
            user: "app".into(),
            password: Some("hunter2-secret".into()),
            password_file: None,
        };
        let shown = format!("{credential:?}");
        assert!(
            shown.contains("app") && shown.contains("<redacted>"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2-secret"), "{shown}");
    }

    /// A config file in `dir` whose one target takes its password from
    /// `password_file`, written there; the file's path.
    fn write_config(dir: &Path, password_file: &Path) -> PathBuf {
        let text = format!(
            "[identity]\n\
             tenants = [\"8f3c1a52-7d4e-4b7a-9c1e-2a5b6d7e8f90\"]\n\
             audiences = [\"api://tollgate\"]\n\
             jwks_file = \"/nonexistent/jwks.json\"\n\
             [audit]\n\
             dir = \"/nonexistent/audit\"\n\
             [[target]]\n\
             name = \"orders-db\"\n\
             protocol = \"postgres\"\n\
             address = \"10.0.0.5:5432\"\n\
             listen = \"127.0.0.1:15432\"\n\
             credential = {{ user = \"gateway\", password_file = {password_file:?} }}\n\
             databases = [\"orders\"]\n"
        );
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, text).expect("write config");
        path
    }

    /// Writes a secret file readable by its owner alone.
    fn write_secret(path: &Path, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, text).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    #[test]
    fn a_password_file_without_a_password_stops_loading() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let unreadable = dir.path().join("a-directory");
        std::fs::create_dir(&unreadable).expect("mkdir");
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let empty_line = dir.path().join("empty-line");
        write_secret(&empty_line, "\nsecret\n");
        let empty = dir.path().join("empty");
        write_secret(&empty, "");
        // Readable by every user of the host: refused, whatever it holds.
        let shared = dir.path().join("shared");
        write_secret(&shared, "secret\n");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        for (password_file, why) in [
            (dir.path().join("missing"), "No such file"),
            (unreadable, "directory"),
            (empty_line, "the first line is empty"),
            (empty, "the first line is empty"),
            (shared, "any user of the host may read or change it"),
        ] {
            let config = write_config(dir.path(), &password_file);
            let err = Config::load(&config).expect_err(why);
            assert_eq!(err.file, config.display().to_string());
            assert_eq!(err.key, "target[0].credential.password_file");
            assert!(err.reason.contains("\"orders-db\""), "{err}");
            assert!(
                err.reason.contains(&password_file.display().to_string()),
                "{err}"
            );
            assert!(err.reason.contains(why), "{err}");
            // Commands that need only [pin] still read the file.
            Config::read(&config).expect("read without the password file");
        }

        let good = dir.path().join("good");
        write_secret(&good, "secret\nignored\n");
        let config = Config::load(&write_config(dir.path(), &good)).expect("loads");
        assert_eq!(
            config.targets[0].credential.password().expect("password"),
            Some("secret".to_owned())
        );
    }
}
