//! TLS for protocol adapters: tollgate's own certificate toward agents,
//! and verified TLS toward targets. rustls with the aws-lc-rs provider.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use anyhow::{anyhow, bail, Context, Result};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

/// Any byte stream a session runs over: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

pub type BoxedIo = Box<dyn Io>;

/// `[target.tls]`: TLS offered to agents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// PEM certificate chain presented to agents (for the target's name or
    /// address: agents connect to the real address).
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// Refuse agents that do not ask for TLS.
    #[serde(default)]
    pub require: bool,
}

/// `[target.upstream_tls]`: TLS to the target, always verified.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM CA certificates that may sign the target's certificate.
    pub ca_file: PathBuf,
    /// Name to verify the certificate against; default: the target's IP.
    #[serde(default)]
    pub server_name: Option<String>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub fn acceptor(config: &ListenerTlsConfig) -> Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&config.cert)
        .with_context(|| format!("tls.cert {}", config.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("tls.cert {}", config.cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "tls.cert {}: no certificate in the file",
            config.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .with_context(|| format!("tls.key {}", config.key.display()))?;
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("tls.cert and tls.key do not form a usable pair")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// A connector and the name the target's certificate must carry.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

pub fn connector(config: &UpstreamTlsConfig, target_ip: IpAddr) -> Result<UpstreamTls> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&config.ca_file)
        .with_context(|| format!("upstream_tls.ca_file {}", config.ca_file.display()))?
    {
        let cert =
            cert.with_context(|| format!("upstream_tls.ca_file {}", config.ca_file.display()))?;
        roots
            .add(cert)
            .context("upstream_tls.ca_file: unusable CA certificate")?;
    }
    // No certificate at all (an empty file, a key given by mistake) would
    // make a connector that refuses every server: an error at start, not
    // a refusal per session.
    if roots.is_empty() {
        bail!(
            "upstream_tls.ca_file {} holds no certificate",
            config.ca_file.display()
        );
    }
    let client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let server_name = match &config.server_name {
        Some(name) => ServerName::try_from(name.clone())
            .map_err(|e| anyhow!("upstream_tls.server_name {name:?}: {e}"))?,
        None => ServerName::IpAddress(target_ip.into()),
    };
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        server_name,
    })
}
