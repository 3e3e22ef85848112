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
    crate::config::refuse_world_access(&config.key)
        .map_err(|reason| anyhow!("tls.key {reason}"))?;
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
        // An IPv4 target written IPv4-mapped ([::ffff:10.0.0.10]) is
        // matched as the IPv4 address its certificate names: a 16-byte
        // reference never matches a 4-byte SAN.
        None => ServerName::IpAddress(target_ip.to_canonical().into()),
    };
    Ok(UpstreamTls {
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        server_name,
    })
}

/// A self-signed certificate for 127.0.0.1 and its key (as the end-to-end
/// TLS tests make them): the listener's TLS material, and the client's
/// only trust anchor.
#[cfg(test)]
pub(crate) fn self_signed_cert(dir: &std::path::Path) -> ListenerTlsConfig {
    tollgate_tests::pki::self_signed_leaf(dir, "cert");
    ListenerTlsConfig {
        cert: dir.join("cert.pem"),
        key: dir.join("cert.key"),
        require: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(ca_file: PathBuf) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca_file,
            server_name: None,
        }
    }

    fn error_of(config: &UpstreamTlsConfig) -> String {
        match connector(config, IpAddr::from([127, 0, 0, 1])) {
            Ok(_) => panic!("a connector from {}", config.ca_file.display()),
            Err(err) => format!("{err:#}"),
        }
    }

    /// A CA file that yields no trust anchor is refused at start, naming
    /// the file, rather than making a connector that refuses every
    /// server one session at a time.
    #[test]
    fn an_upstream_ca_file_without_a_certificate_is_refused_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let key_only = dir.path().join("key.pem");
        std::fs::write(
            &key_only,
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF\n-----END PRIVATE KEY-----\n",
        )
        .expect("write");
        for file in [&empty, &key_only] {
            let err = error_of(&upstream(file.clone()));
            assert!(
                err.contains("holds no certificate") && err.contains(&file.display().to_string()),
                "{err}"
            );
        }
        let missing = dir.path().join("missing.pem");
        let err = error_of(&upstream(missing.clone()));
        assert!(
            err.contains("upstream_tls.ca_file") && err.contains(&missing.display().to_string()),
            "{err}"
        );
    }

    /// tollgate's own TLS key, readable by any user of the host, is
    /// refused; kept to its owner (as openssl writes it), it is taken.
    #[test]
    fn a_listener_key_any_user_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = self_signed_cert(dir.path());
        assert!(acceptor(&config).is_ok(), "a key kept to its owner");
        std::fs::set_permissions(&config.key, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let Err(err) = acceptor(&config) else {
            panic!("a key any user may read was taken");
        };
        let err = format!("{err:#}");
        assert!(
            err.contains("tls.key") && err.contains("any user of the host"),
            "{err}"
        );
    }

    #[test]
    fn a_certificate_that_is_not_pem_is_refused_with_the_file_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let err = error_of(&upstream(broken.clone()));
        // Refused for what it holds, not passed over as if it held nothing.
        assert!(
            err.contains("upstream_tls.ca_file")
                && err.contains(&broken.display().to_string())
                && !err.contains("holds no certificate"),
            "{err}"
        );
    }

    #[test]
    fn the_target_is_verified_by_its_address_unless_a_valid_server_name_is_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Any certificate is a trust anchor to rustls.
        let ca = self_signed_cert(dir.path()).cert;
        let made = connector(&upstream(ca.clone()), IpAddr::from([10, 0, 0, 7]))
            .expect("a connector from a CA certificate");
        // Without a name, the certificate must carry the target's address.
        assert_eq!(
            made.server_name,
            ServerName::IpAddress(IpAddr::from([10, 0, 0, 7]).into())
        );
        // Written IPv4-mapped, the address is still the IPv4 one the
        // certificate names (a 16-byte reference matches no 4-byte SAN).
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("an address");
        let made = connector(&upstream(ca.clone()), mapped).expect("a connector");
        assert_eq!(
            made.server_name,
            ServerName::IpAddress(IpAddr::from([10, 0, 0, 7]).into())
        );
        let mut named = upstream(ca);
        named.server_name = Some("db.internal".into());
        let made = connector(&named, IpAddr::from([10, 0, 0, 7])).expect("a connector with a name");
        assert_eq!(
            made.server_name,
            ServerName::try_from("db.internal").expect("a DNS name")
        );
        named.server_name = Some("not a host name!".into());
        let err = error_of(&named);
        assert!(err.contains("upstream_tls.server_name"), "{err}");
    }
}
