//! The built-in development identity provider: serves OIDC discovery and a
//! JWKS on loopback and mints Entra-shaped tokens. Never for production; the
//! daemon accepts its keys only when the config says `development_idp = true`.

pub mod bench;
pub mod directory;
pub mod keyring;
pub mod server;
pub mod token;

use std::{net::SocketAddr, path::PathBuf};

pub use keyring::{DevKey, Keyring};
pub use token::{TokenKind, TokenSpec, DEV_CLIENT_ID};

/// `tollgate dev ...`
#[derive(Debug, clap::Subcommand)]
pub enum DevCommand {
    /// Run the development IdP in the foreground (loopback only).
    Idp {
        /// State directory: keys, jwks.json.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on; must be a loopback address.
        #[arg(long, default_value = "127.0.0.1:8950")]
        listen: SocketAddr,
    },
    /// Print a signed Entra-shaped access token on stdout.
    // Boxed: the token options would make every DevCommand (and the CLI's
    // command enum holding it) as large as they are.
    Token(Box<TokenArgs>),
    /// Add a new signing key; the old keys stay published.
    Rotate {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Stop publishing every key but the current signing key.
    WithdrawOld {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Validate a token read from stdin against the `[identity]` section of a
    /// config file; prints the principal as JSON, or the refusal (exit 1).
    CheckToken {
        /// A tollgate config file (only its [identity] table is used).
        #[arg(long)]
        config: PathBuf,
    },
    /// Time token validation with a cached key (no network); prints µs/validation.
    BenchVerify {
        #[arg(long, default_value_t = 10_000)]
        iterations: u32,
    },
}

/// Options of `tollgate dev token`.
#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Tenant id (tid).
    #[arg(long)]
    tenant: String,
    /// Object id of the caller (oid).
    #[arg(long)]
    oid: String,
    /// Audience (aud): the resource's client id or App ID URI.
    #[arg(long)]
    audience: String,
    /// Client application id (azp in v2, appid in v1).
    #[arg(long, default_value = DEV_CLIENT_ID)]
    app_id: String,
    /// Display name (name, and preferred_username/upn for users).
    #[arg(long)]
    name: Option<String>,
    /// Group object ids, comma separated.
    #[arg(long, value_delimiter = ',')]
    groups: Vec<String>,
    /// App roles, comma separated.
    #[arg(long, value_delimiter = ',')]
    roles: Vec<String>,
    /// Delegated scopes (scp), comma separated; user tokens only.
    #[arg(long, value_delimiter = ',')]
    scopes: Vec<String>,
    /// user (delegated, has scp) or app (app-only, idtyp=app, no scp).
    #[arg(long, value_enum, default_value = "user")]
    kind: TokenKind,
    /// Lifetime in seconds; negative mints an already expired token.
    #[arg(long, default_value_t = 3600, allow_hyphen_values = true)]
    expires_in: i64,
    /// Token version: 1 (sts.windows.net issuer) or 2.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    version: u8,
    /// Group overage: leave the groups out of the token (as Entra does past
    /// 200) and record them for the IdP's Graph-like getMemberObjects.
    #[arg(long)]
    overage: bool,
}

pub async fn run(command: DevCommand) -> anyhow::Result<()> {
    // main may or may not have installed a subscriber; the IdP must log either way.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    match command {
        DevCommand::Idp { dir, listen } => {
            if !listen.ip().is_loopback() {
                anyhow::bail!("the dev idp listens on loopback only, not {listen}");
            }
            let (addr, task) = server::spawn(dir.clone(), listen).await?;
            tracing::warn!("the development identity provider must never be used in production");
            tracing::info!(
                state_dir = %dir.display(),
                "dev idp listening on http://{addr} (jwks: http://{addr}/<tenant>/discovery/v2.0/keys)"
            );
            // Tests and service managers stop it with SIGTERM, people with Ctrl-C.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = task => r?,
                r = tokio::signal::ctrl_c() => r?,
                _ = term.recv() => {}
            }
            tracing::info!("dev idp stopped");
            Ok(())
        }
        DevCommand::Token(args) => {
            let TokenArgs {
                dir,
                tenant,
                oid,
                audience,
                app_id,
                name,
                groups,
                roles,
                scopes,
                kind,
                expires_in,
                version,
                overage,
            } = *args;
            let ring = Keyring::open_or_create(&dir)?;
            if overage {
                directory::set_members(&dir, &oid, &groups)?;
            }
            let spec = TokenSpec {
                app_id,
                name,
                groups,
                roles,
                scopes,
                kind,
                expires_in,
                version,
                overage,
                ..TokenSpec::new(&tenant, &oid, &audience)
            };
            println!("{}", spec.mint(ring.signing_key())?);
            Ok(())
        }
        DevCommand::Rotate { dir } => {
            let mut ring = Keyring::open_or_create(&dir)?;
            let kid = ring.rotate()?.kid.clone();
            println!("{kid}");
            Ok(())
        }
        DevCommand::CheckToken { config } => check_token(&config).await,
        DevCommand::BenchVerify { iterations } => {
            println!("{}", bench::bench_verify(iterations).await?);
            Ok(())
        }
        DevCommand::WithdrawOld { dir } => {
            let mut ring = Keyring::open(&dir)?;
            let n = ring.withdraw_old()?;
            eprintln!("withdrew {n} key(s); publishing {}", ring.signing_key().kid);
            Ok(())
        }
    }
}

/// The token comes from stdin, never argv, which other users can read in `ps`.
async fn check_token(config: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let identity = doc
        .remove("identity")
        .with_context(|| format!("{}: no [identity] table", config.display()))?;
    let identity: crate::identity::IdentityConfig = identity
        .try_into()
        .with_context(|| format!("{}: [identity]", config.display()))?;
    let verifier = crate::identity::Verifier::from_config(&identity).await?;
    let mut token = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)?;
    match verifier.verify(&token).await {
        Ok(p) => {
            let out = serde_json::json!({
                "tenant_id": p.tenant_id, "object_id": p.object_id, "app_id": p.app_id,
                "kind": p.kind.as_str(), "display_name": p.display_name,
                "groups": p.groups, "roles": p.roles, "scopes": p.scopes,
                "tollgate_roles": p.tollgate_roles, "token_id": p.token_id,
                "token_fingerprint": p.token_fingerprint, "token_version": p.token_version,
                "issued_at": p.issued_at, "expires_at": p.expires_at,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
        Err(e) => {
            eprintln!("refused: {}: {e}", e.code());
            std::process::exit(1);
        }
    }
}
